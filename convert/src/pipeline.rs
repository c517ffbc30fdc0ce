//! `convert_hf`: one streaming pass from a Hugging Face GPT-2 checkpoint to one or several GGUF
//! files (F16, Q8_0, Q6_K, Q4_K_M).
//!
//! The result is meant to equal what llama.cpp's two tools produce together —
//! `convert_hf_to_gguf.py --outtype f16` followed by `llama-quantize` — tensor for tensor:
//! - tensors are written in llama-quantize's order ([`policy::tensor_order`]) with its types
//!   ([`policy::Policy`]), no duplicate `output.weight` (the current converter's choice);
//! - a 2-D weight that ends up F16 or quantized is first rounded to f16, because llama-quantize
//!   reads it from the F16 file: quantizing the f16-rounded values is what makes our Q8_0 /
//!   Q6_K / Q4_K_M bytes identical to `convert → llama-quantize` even for an F32 checkpoint;
//! - norms, biases and the position table stay F32 with the source's exact values.
//!
//! Memory: the header of every output is known before any data (shapes come from the
//! safetensors headers, types from the policy), so each file's header is written first and then
//! every tensor streams through in row chunks of at most [`CHUNK_VALUES`] values; each source
//! tensor is decoded to f32 once and feeds all outputs, then its pages are released. Conv1D
//! weights are stored transposed ([in, out]) and are the one case where a whole tensor is
//! decoded at once (≤ 4·n_embd² values, 16 MiB for GPT-2 Medium).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ggpt_quant::tensor::{quantize_into, validate_row_data};
use ggpt_quant::GgmlType;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use wide::f32x4;

use crate::atomic::{describe, AtomicFile, UnusableOutput};
use crate::error::ConvertError;
use crate::hf::{expected_tensors, map_tensor_name, HfConfig, HfTensor, HfVocab, InputError};
use crate::policy::{converter_type, tensor_order, Fallback, FileType, Policy};
use crate::safetensors::{decode_f32, Checkpoint, SrcDtype};
use ggpt_gguf::gpt2::{self, keys};
use ggpt_gguf::{GgufWriter, Value};

/// Values per streamed chunk (4 MiB of f32): small enough that four outputs' buffers stay
/// far below the memory budget, large enough to keep both cores busy quantizing.
pub const CHUNK_VALUES: usize = 1 << 20;

/// An output file could not be created or written. The path is the destination; the I/O
/// error is the source (printed after it by `{:#}`).
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}", path.display())]
pub struct OutputError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

/// Observer for long conversions (the CLI draws progress bars with it).
pub trait Progress: Sync {
    /// Output files and their final sizes in bytes, before any data is written.
    fn begin(&self, _files: &[(PathBuf, u64)]) {}
    /// Tensor `index` of `count` is being converted.
    fn tensor(&self, _index: usize, _count: usize, _name: &str) {}
    /// `bytes` more bytes were written to output file `file`.
    fn wrote(&self, _file: usize, _bytes: u64) {}
    /// Everything has been written and committed.
    fn finish(&self) {}
}

/// A [`Progress`] that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What was written to one output file.
#[derive(Debug, Clone)]
pub struct FileSummary {
    pub path: PathBuf,
    pub ftype: FileType,
    pub n_tensors: usize,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Tensor data bytes (without header and padding).
    pub tensor_bytes: u64,
    pub n_params: u64,
    /// Time spent encoding and writing this file's tensors (the shared reading and decoding of
    /// the source is reported in the total of [`ConvertReport`]; a tensor whose encoding an
    /// earlier file of the same run shares counts only its writing here).
    pub seconds: f64,
    /// Tensors whose type differs from what llama.cpp would write: name, type written, why
    /// (see [`Fallback`]).
    pub differs: Vec<(String, GgmlType, Fallback)>,
    /// Number of tensors of each type, in first-seen order.
    pub type_counts: Vec<(GgmlType, usize)>,
}

impl FileSummary {
    /// Bits per weight over the tensor data, as llama.cpp reports model size.
    pub fn bpw(&self) -> f64 {
        if self.n_params == 0 {
            0.0
        } else {
            self.tensor_bytes as f64 * 8.0 / self.n_params as f64
        }
    }
}

/// All files of one conversion, and the wall time of the whole pass.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub files: Vec<FileSummary>,
    pub seconds: f64,
}

/// Options for [`convert_hf`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The Hugging Face model directory.
    pub hf_dir: PathBuf,
    /// Output file types, written in one pass.
    pub types: Vec<FileType>,
    /// A directory (files named `<name>-<TYPE>.gguf`) or, for a single type, a `.gguf` path.
    /// `None`: the model directory.
    pub output: Option<PathBuf>,
    /// `general.name` and file-name stem; default: the model directory's name.
    pub name: Option<String>,
}

/// One GGUF tensor to produce, and where its data comes from.
#[derive(Debug, Clone)]
struct Planned {
    gguf_name: String,
    source: String,
    /// GGUF dims, ne0 first.
    dims: Vec<u64>,
    transpose: bool,
    dtype: SrcDtype,
    /// The type in a converter F16 file (what llama-quantize would read).
    f16_file_type: GgmlType,
}

impl Planned {
    fn cols(&self) -> usize {
        self.dims[0] as usize
    }
    fn rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }
}

/// Resolve where each output goes.
pub fn output_paths(opts: &ConvertOptions, name: &str) -> Result<Vec<PathBuf>, ConvertError> {
    if opts.types.is_empty() {
        return Err(ConvertError::Request("no output type given".into()));
    }
    let out = opts.output.clone().unwrap_or_else(|| opts.hf_dir.clone());
    let is_file = !out.is_dir()
        && out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_file {
        if opts.types.len() != 1 {
            return Err(UnusableOutput::new(
                &out,
                format!(
                    "a single output file was given for {} types; give a directory instead",
                    opts.types.len()
                ),
            )
            .into());
        }
        return Ok(vec![out]);
    }
    if !out.is_dir() {
        let what = describe(&out);
        if what != "missing" {
            return Err(UnusableOutput::new(
                &out,
                format!(
                    "{what}: neither a directory nor a name ending in .gguf; give one of those"
                ),
            )
            .into());
        }
        return Err(OutputError {
            path: out,
            what: "output directory",
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "does not exist (to write one file, give a name ending in .gguf)",
            ),
        }
        .into());
    }
    Ok(opts
        .types
        .iter()
        .map(|t| out.join(format!("{name}-{}.gguf", t.label())))
        .collect())
}

/// Refuse an output path that is one of the files the conversion reads (a checkpoint shard, the
/// config or a tokenizer file), also through a symbolic or hard link: writing it would destroy
/// the user's checkpoint.
fn refuse_input_as_output(paths: &[PathBuf], ckpt: &Checkpoint) -> Result<(), ConvertError> {
    const SIDE_FILES: [&str; 6] = [
        "config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ];
    let dir = ckpt.dir();
    let inputs: Vec<PathBuf> = ckpt
        .files()
        .into_iter()
        .map(Path::to_path_buf)
        .chain(SIDE_FILES.iter().map(|f| dir.join(f)))
        .collect();
    for out in paths {
        crate::atomic::refuse_input_as_output(
            out,
            inputs.iter().map(PathBuf::as_path),
            "the checkpoint",
        )?;
    }
    Ok(())
}

/// The model's name: the directory name, as llama.cpp's converter falls back to.
pub fn model_name(hf_dir: &Path) -> String {
    let canon = hf_dir
        .canonicalize()
        .unwrap_or_else(|_| hf_dir.to_path_buf());
    canon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".to_string())
}

/// The metadata llama.cpp writes for `gpt2`, in its order.
///
/// F16 files get `convert_hf_to_gguf.py`'s order (`general.file_type` right after the
/// hyper-parameters, `general.quantization_version` last). Quantized files are what
/// llama-quantize makes of that F16 file: the same pairs, except that it sets
/// `quantization_version` and then `file_type` again, which moves both to the end. With that,
/// a quantized file from `ggpt convert` is byte for byte the file `llama-quantize` writes.
pub fn gguf_metadata(
    c: &HfConfig,
    v: &HfVocab,
    name: &str,
    ftype: FileType,
) -> Vec<(String, Value)> {
    let converter = ftype == FileType::F16;
    let mut kv: Vec<(String, Value)> = vec![
        (keys::ARCHITECTURE.into(), gpt2::ARCH.into()),
        (keys::TYPE.into(), "model".into()),
        (keys::NAME.into(), name.into()),
        (keys::BLOCK_COUNT.into(), Value::U32(c.n_layer as u32)),
        (keys::CONTEXT_LENGTH.into(), Value::U32(c.n_ctx as u32)),
        (keys::EMBEDDING_LENGTH.into(), Value::U32(c.n_embd as u32)),
        (keys::FEED_FORWARD_LENGTH.into(), Value::U32(c.n_ff as u32)),
        (keys::HEAD_COUNT.into(), Value::U32(c.n_head as u32)),
        (
            keys::LAYER_NORM_EPSILON.into(),
            Value::F32(c.layer_norm_eps),
        ),
    ];
    if converter {
        kv.push((keys::FILE_TYPE.into(), Value::U32(ftype.code())));
    }
    kv.extend([
        (keys::TOKENIZER_MODEL.into(), "gpt2".into()),
        // The converter identifies the pre-tokenizer by hashing HF's tokenization of a probe
        // text; for GPT-2's own tokenizer that is "gpt-2", the only one ggpt accepts.
        (keys::TOKENIZER_PRE.into(), "gpt-2".into()),
        (keys::TOKENIZER_TOKENS.into(), Value::from(v.tokens.clone())),
        (
            keys::TOKENIZER_TOKEN_TYPE.into(),
            Value::from(v.token_types.clone()),
        ),
        (keys::TOKENIZER_MERGES.into(), Value::from(v.merges.clone())),
    ]);
    for &(key, id) in &v.special_ids {
        kv.push((key.into(), Value::U32(id)));
    }
    for &(key, b) in &v.add_flags {
        kv.push((key.into(), Value::Bool(b)));
    }
    if let Some(t) = &v.chat_template {
        kv.push((keys::CHAT_TEMPLATE.into(), t.as_str().into()));
    }
    kv.push((keys::QUANTIZATION_VERSION.into(), Value::U32(2)));
    if !converter {
        kv.push((keys::FILE_TYPE.into(), Value::U32(ftype.code())));
    }
    kv
}

/// Match the checkpoint's tensors to GPT-2's, check names, shapes and dtypes, and return the
/// tensors to write in llama-quantize's order.
fn plan(ckpt: &Checkpoint, c: &HfConfig) -> Result<Vec<Planned>, InputError> {
    let mut found: Vec<Planned> = Vec::new();
    let wte_shape = [c.vocab_size, c.n_embd];
    for name in ckpt.names() {
        let Some(t) = ckpt.get(name) else { continue };
        let mapped = map_tensor_name(name, c)
            .map_err(|e| InputError::new(t.file, format!("tensor {name}: {e}")))?;
        match mapped {
            None => {
                return Err(InputError::new(
                    t.file,
                    format!("unexpected tensor {name}: not part of a GPT-2 checkpoint"),
                ))
            }
            Some(HfTensor::DropBuffer) => {}
            Some(HfTensor::ExtraHead) => {
                eprintln!(
                    "note: {}: skipping {name}: a task head that is not part of the language model",
                    t.file.display()
                );
            }
            Some(HfTensor::TiedHead) => {
                if t.shape != wte_shape {
                    return Err(InputError::new(
                        t.file,
                        format!(
                            "tensor {name} has shape {:?}, expected {wte_shape:?} (tied to wte: config.json has tie_word_embeddings true or unset)",
                            t.shape
                        ),
                    ));
                }
            }
            Some(HfTensor::Keep {
                gguf_name,
                hf_shape,
                transpose,
            }) => {
                if let Some(prev) = found.iter().find(|p| p.gguf_name == gguf_name) {
                    return Err(InputError::new(
                        t.file,
                        format!(
                            "tensors {} and {name} are the same GPT-2 tensor",
                            prev.source
                        ),
                    ));
                }
                if t.shape != hf_shape.as_slice() {
                    return Err(InputError::new(
                        t.file,
                        format!(
                            "tensor {name} has shape {:?}, but config.json (n_layer {}, n_embd {}, n_head {}, n_ff {}, n_ctx {}, vocab_size {}) implies {:?}",
                            t.shape, c.n_layer, c.n_embd, c.n_head, c.n_ff, c.n_ctx, c.vocab_size, hf_shape
                        ),
                    ));
                }
                let dtype = t.src_dtype()?;
                let dims: Vec<u64> = if transpose {
                    // [in, out] transposed to [out, in]; GGUF reverses numpy order: [in, out].
                    hf_shape.iter().map(|&d| d as u64).collect()
                } else {
                    hf_shape.iter().rev().map(|&d| d as u64).collect()
                };
                let f16_file_type = converter_type(&gguf_name, hf_shape.len());
                found.push(Planned {
                    gguf_name,
                    source: name.to_string(),
                    dims,
                    transpose,
                    dtype,
                    f16_file_type,
                });
            }
        }
    }
    for (gguf, hf) in expected_tensors(c) {
        if !found.iter().any(|p| p.gguf_name == gguf) {
            return Err(InputError::new(
                ckpt.dir(),
                format!("missing tensor {hf} (or transformer.{hf}), needed for GGUF {gguf}"),
            ));
        }
    }
    found.sort_by(|a, b| tensor_order(&a.gguf_name, &b.gguf_name));
    Ok(found)
}

/// One output file being written.
struct Out {
    file: AtomicFile,
    writer: GgufWriter,
    ftype: FileType,
    types: Vec<GgmlType>,
    seconds: f64,
    differs: Vec<(String, GgmlType, Fallback)>,
}

fn write_out(out: &mut Out, bytes: &[u8]) -> Result<(), OutputError> {
    out.file.write_all(bytes).map_err(|source| OutputError {
        path: out.file.dest().to_path_buf(),
        what: "cannot write",
        source,
    })
}

/// Zero padding after a tensor, to the writer's alignment.
fn pad_out(out: &mut Out, size: u64) -> Result<(), OutputError> {
    let a = out.writer.alignment();
    let pad = (a - size % a) % a;
    write_out(out, &vec![0u8; pad as usize])
}

/// The header (metadata + tensor infos) of one output file, each tensor's type, and the
/// tensors whose type differs from llama.cpp's choice.
type Layout = (GgufWriter, Vec<GgmlType>, Vec<(String, GgmlType, Fallback)>);

fn layout(
    config: &HfConfig,
    vocab: &HfVocab,
    name: &str,
    ftype: FileType,
    planned: &[Planned],
) -> Result<Layout, ConvertError> {
    let mut writer = GgufWriter::new();
    for (k, v) in gguf_metadata(config, vocab, name, ftype) {
        writer.add_kv(&k, v);
    }
    let has_output = planned.iter().any(|p| p.gguf_name == gpt2::OUTPUT);
    let policy = Policy::new(ftype, config.n_layer, has_output);
    let mut types = Vec::with_capacity(planned.len());
    let mut differs = Vec::new();
    for p in planned {
        let choice = policy.choose(&p.gguf_name, &p.dims, p.f16_file_type)?;
        if let Some(d) = choice.differs {
            differs.push((p.gguf_name.clone(), choice.ty, d));
        }
        writer.add_tensor(&p.gguf_name, &p.dims, choice.ty)?;
        types.push(choice.ty);
    }
    Ok((writer, types, differs))
}

/// What converting to one file type would produce, computed from the checkpoint's headers
/// alone (no tensor data is read): used by `ggpt mem HF_DIR` to predict before converting.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub ftype: FileType,
    pub config: HfConfig,
    /// Exact size of the file `convert` would write.
    pub file_bytes: u64,
    /// Tensor data bytes (without header and padding).
    pub tensor_bytes: u64,
    pub n_params: u64,
}

/// Predict the file each of `types` would give, exactly, without converting.
pub fn predict(hf_dir: &Path, types: &[FileType]) -> Result<Vec<Prediction>, ConvertError> {
    if !hf_dir.is_dir() {
        return Err(InputError::new(hf_dir, "not a directory").into());
    }
    let config = HfConfig::load(hf_dir)?;
    let vocab = HfVocab::load(hf_dir, &config)?;
    let ckpt = Checkpoint::open(hf_dir)?;
    let planned = plan(&ckpt, &config)?;
    let name = model_name(hf_dir);
    types
        .iter()
        .map(|&ftype| {
            let (writer, types, _) = layout(&config, &vocab, &name, ftype, &planned)?;
            let mut tensor_bytes = 0u64;
            let mut n_params = 0u64;
            for (p, ty) in planned.iter().zip(&types) {
                let n: u64 = p.dims.iter().product();
                n_params += n;
                tensor_bytes += ty.row_bytes(p.dims[0]).unwrap_or(0) * (n / p.dims[0].max(1));
            }
            Ok(Prediction {
                ftype,
                config: config.clone(),
                file_bytes: writer.total_size(),
                tensor_bytes,
                n_params,
            })
        })
        .collect()
}

/// One tensor of a [`DryRun`] file.
#[derive(Debug, Clone)]
pub struct DryRunTensor {
    pub gguf_name: String,
    /// Name in the checkpoint.
    pub source: String,
    /// GGUF dims, ne0 first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Data bytes (without alignment padding).
    pub bytes: u64,
}

/// What [`convert_hf`] would write to one file, computed without writing anything.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub path: PathBuf,
    pub ftype: FileType,
    /// Exact size of the file.
    pub file_bytes: u64,
    pub tensors: Vec<DryRunTensor>,
    pub differs: Vec<(String, GgmlType, Fallback)>,
}

/// Everything `convert_hf(opts)` would do up to the first byte written: read and check the
/// config, tokenizer and checkpoint headers, plan every tensor's type and every file's size.
pub fn dry_run(opts: &ConvertOptions) -> Result<Vec<DryRun>, ConvertError> {
    let dir = &opts.hf_dir;
    if !dir.is_dir() {
        return Err(InputError::new(dir, "not a directory").into());
    }
    let config = HfConfig::load(dir)?;
    let vocab = HfVocab::load(dir, &config)?;
    let ckpt = Checkpoint::open(dir)?;
    let planned = plan(&ckpt, &config)?;
    let name = opts.name.clone().unwrap_or_else(|| model_name(dir));
    let paths = output_paths(opts, &name)?;
    refuse_input_as_output(&paths, &ckpt)?;
    let mut files = Vec::with_capacity(paths.len());
    for (&ftype, path) in opts.types.iter().zip(paths) {
        let (writer, types, differs) = layout(&config, &vocab, &name, ftype, &planned)?;
        let tensors = planned
            .iter()
            .zip(&types)
            .zip(writer.tensors())
            .map(|((p, &ty), info)| DryRunTensor {
                gguf_name: p.gguf_name.clone(),
                source: p.source.clone(),
                dims: p.dims.clone(),
                ty,
                bytes: info.size,
            })
            .collect();
        files.push(DryRun {
            path,
            ftype,
            file_bytes: writer.total_size(),
            tensors,
            differs,
        });
    }
    Ok(files)
}

/// Convert `opts.hf_dir` to every type in `opts.types` in one pass.
pub fn convert_hf(
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let start = Instant::now();
    let dir = &opts.hf_dir;
    if !dir.is_dir() {
        return Err(InputError::new(dir, "not a directory").into());
    }
    let config = HfConfig::load(dir)?;
    let vocab = HfVocab::load(dir, &config)?;
    let ckpt = Checkpoint::open(dir)?;
    let planned = plan(&ckpt, &config)?;
    let name = opts.name.clone().unwrap_or_else(|| model_name(dir));
    let paths = output_paths(opts, &name)?;
    refuse_input_as_output(&paths, &ckpt)?;

    let mut outs: Vec<Out> = Vec::with_capacity(paths.len());
    for (&ftype, path) in opts.types.iter().zip(&paths) {
        let (writer, types, differs) = layout(&config, &vocab, &name, ftype, &planned)?;
        let file = AtomicFile::create(path).map_err(|source| OutputError {
            path: path.clone(),
            what: "cannot create output",
            source,
        })?;
        outs.push(Out {
            file,
            writer,
            ftype,
            types,
            seconds: 0.0,
            differs,
        });
    }
    progress.begin(
        &outs
            .iter()
            .map(|o| (o.file.dest().to_path_buf(), o.writer.total_size()))
            .collect::<Vec<_>>(),
    );
    for (i, o) in outs.iter_mut().enumerate() {
        let header = o.writer.header_bytes();
        write_out(o, &header)?;
        progress.wrote(i, header.len() as u64);
    }

    let mut x: Vec<f32> = Vec::new();
    let mut rounded: Vec<f32> = Vec::new();
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    let mut whole: Vec<f32> = Vec::new();
    let mut tmp: Vec<f32> = Vec::new();
    for (ti, p) in planned.iter().enumerate() {
        progress.tensor(ti, planned.len(), &p.gguf_name);
        let src = ckpt.get(&p.source).ok_or_else(|| {
            InputError::new(
                dir,
                format!("tensor {} is no longer in the checkpoint", p.source),
            )
        })?;
        let (rows, cols) = (p.rows(), p.cols());
        if p.transpose {
            let whole = scratch(&mut whole, src.n_elements());
            let tmp = scratch(&mut tmp, src.n_elements());
            decode_par(p.dtype, src.data, tmp);
            // Source is [in = cols, out = rows]; GGUF row r is source column r.
            transpose(tmp, cols, rows, whole);
            ckpt.release(&p.source);
        }
        let needs_f16 = outs.iter().any(|o| o.types[ti] != GgmlType::F32);
        let rows_per_chunk = (CHUNK_VALUES / cols).max(1);
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + rows_per_chunk).min(rows);
            let n = (r1 - r0) * cols;
            let x: &[f32] = if p.transpose {
                &whole[r0 * cols..r1 * cols]
            } else {
                let x = scratch(&mut x, n);
                let es = p.dtype.size();
                decode_par(p.dtype, &src.data[r0 * cols * es..r1 * cols * es], x);
                ckpt.release_range(&p.source, r0 * cols * es, r1 * cols * es);
                x
            };
            check_finite(x, p, r0 * cols, src.file)?;
            let rounded = scratch(&mut rounded, if needs_f16 { n } else { 0 });
            if needs_f16 {
                round_f16(x, rounded).map_err(|i| {
                    InputError::new(
                        src.file,
                        format!(
                            "tensor {}: value {} at element {} is outside the f16 range (±65504)",
                            p.source,
                            x[i],
                            r0 * cols + i
                        ),
                    )
                })?;
            }
            // Every output encodes this chunk at once (each quantizer is itself parallel over
            // rows): the cheap F16/Q8_0 encodings fill the gaps of the K-quant searches.
            // Outputs that store the tensor in the same type share one encoding (the Q6_K
            // tensors of a Q4_K_M file are the Q6_K file's bytes): the first of them encodes,
            // the others then write its bytes.
            if bytes.len() < outs.len() {
                bytes.resize_with(outs.len(), Vec::new);
            }
            let owner = |fi: usize| {
                (0..fi)
                    .find(|&fj| outs[fj].types[ti] == outs[fi].types[ti])
                    .unwrap_or(fi)
            };
            let owners: Vec<usize> = (0..outs.len()).map(owner).collect();
            let chunk_bytes =
                |ty: GgmlType| (r1 - r0) * ty.row_bytes(cols as u64).unwrap_or(0) as usize;
            let rounded: &[f32] = rounded;
            outs.par_iter_mut()
                .zip(bytes.par_iter_mut())
                .enumerate()
                .filter(|(fi, _)| owners[*fi] == *fi)
                .try_for_each(|(fi, (o, buf))| -> Result<(), ConvertError> {
                    let t0 = Instant::now();
                    let ty = o.types[ti];
                    let buf = scratch(buf, chunk_bytes(ty));
                    let input: &[f32] = if ty == GgmlType::F32 { x } else { rounded };
                    let encode = |what: String| ConvertError::Encode {
                        tensor: p.gguf_name.clone(),
                        what,
                    };
                    quantize_into(ty, input, cols, buf).map_err(|e| encode(e.to_string()))?;
                    if ty != GgmlType::F32 && ty != GgmlType::F16 {
                        validate_row_data(ty, buf)
                            .map_err(|e| encode(format!("quantized data invalid: {e}")))?;
                    }
                    write_out(o, buf)?;
                    o.seconds += t0.elapsed().as_secs_f64();
                    progress.wrote(fi, buf.len() as u64);
                    Ok(())
                })?;
            for (fi, &from) in owners.iter().enumerate().filter(|&(fi, &from)| from != fi) {
                let t0 = Instant::now();
                let o = &mut outs[fi];
                let buf = &bytes[from][..chunk_bytes(o.types[ti])];
                write_out(o, buf)?;
                o.seconds += t0.elapsed().as_secs_f64();
                progress.wrote(fi, buf.len() as u64);
            }
            r0 = r1;
        }
        for (fi, o) in outs.iter_mut().enumerate() {
            let size = o.writer.tensors()[ti].size;
            pad_out(o, size)?;
            progress.wrote(
                fi,
                (o.writer.alignment() - size % o.writer.alignment()) % o.writer.alignment(),
            );
        }
        ckpt.release(&p.source);
    }

    let n_params: u64 = planned.iter().map(|p| p.dims.iter().product::<u64>()).sum();
    let mut files = Vec::with_capacity(outs.len());
    for o in outs {
        let path = o.file.dest().to_path_buf();
        let tensor_bytes = o.writer.tensors().iter().map(|t| t.size).sum();
        let file_bytes = o.writer.total_size();
        let mut type_counts: Vec<(GgmlType, usize)> = Vec::new();
        for &t in &o.types {
            match type_counts.iter_mut().find(|(u, _)| *u == t) {
                Some((_, c)) => *c += 1,
                None => type_counts.push((t, 1)),
            }
        }
        let t0 = Instant::now();
        o.file.commit().map_err(|source| OutputError {
            path: path.clone(),
            what: "cannot commit",
            source,
        })?;
        files.push(FileSummary {
            path,
            ftype: o.ftype,
            n_tensors: o.types.len(),
            file_bytes,
            tensor_bytes,
            n_params,
            seconds: o.seconds + t0.elapsed().as_secs_f64(),
            differs: o.differs,
            type_counts,
        });
    }
    progress.finish();
    Ok(ConvertReport {
        files,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The first `n` elements of a reusable buffer, grown (never shrunk) as needed, so streaming
/// does not zero-fill a fresh buffer for every chunk.
pub(crate) fn scratch<T: Copy + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    &mut buf[..n]
}

/// Decode source bytes to f32 on all cores.
pub(crate) fn decode_par(dtype: SrcDtype, bytes: &[u8], out: &mut [f32]) {
    const PIECE: usize = 1 << 16;
    out.par_chunks_mut(PIECE)
        .zip(bytes.par_chunks(PIECE * dtype.size()))
        .for_each(|(o, b)| decode_f32(dtype, b, o));
}

/// Round to f16 and back; `Err(index)` of the first finite value that overflows f16.
fn round_f16(x: &[f32], out: &mut [f32]) -> Result<(), usize> {
    const PIECE: usize = 1 << 14;
    out.par_chunks_mut(PIECE)
        .zip(x.par_chunks(PIECE))
        .enumerate()
        .try_for_each(|(k, (o, s))| {
            let mut h = vec![f16::ZERO; s.len()];
            h.convert_from_f32_slice(s);
            h.convert_to_f32_slice(o);
            match o.iter().position(|v| v.is_infinite()) {
                Some(i) => Err(k * PIECE + i),
                None => Ok(()),
            }
        })
}

/// Index of the first NaN or infinite value, searched in pieces on all cores.
pub(crate) fn first_non_finite(x: &[f32]) -> Option<usize> {
    const PIECE: usize = 1 << 16;
    // A branch-free OR over 64 values at a time (one vector loop), then the exact position
    // inside the first flagged group.
    let bad = |v: &f32| v.to_bits() & 0x7f80_0000 == 0x7f80_0000;
    x.par_chunks(PIECE).enumerate().find_map_first(|(k, s)| {
        let g = s
            .chunks(64)
            .position(|g| g.iter().fold(false, |a, v| a | bad(v)))?;
        let i = s[64 * g..].iter().position(bad)?;
        Some(k * PIECE + 64 * g + i)
    })
}

/// NaN or infinite weights make a broken model; say where instead of writing it.
fn check_finite(x: &[f32], p: &Planned, base: usize, file: &Path) -> Result<(), InputError> {
    match first_non_finite(x) {
        None => Ok(()),
        Some(i) => Err(InputError::new(
            file,
            format!("tensor {}: element {} is {}", p.source, base + i, x[i]),
        )),
    }
}

/// `dst[r][c] = src[c][r]` for a `src` of `src_rows × src_cols`, in cache-sized tiles, bands
/// of destination rows on all cores. `dst` is `src_cols × src_rows`.
pub(crate) fn transpose(src: &[f32], src_rows: usize, src_cols: usize, dst: &mut [f32]) {
    const T: usize = 32;
    debug_assert_eq!(src.len(), src_rows * src_cols);
    debug_assert_eq!(dst.len(), src.len());
    if src.is_empty() {
        return;
    }
    // A band is T destination rows (= T source columns).
    dst.par_chunks_mut(T * src_rows)
        .enumerate()
        .for_each(|(band, d)| {
            let c0 = band * T;
            let c1 = (c0 + T).min(src_cols);
            for r0 in (0..src_rows).step_by(T) {
                let r1 = (r0 + T).min(src_rows);
                let mut r = r0;
                // 4 × 4 squares transposed in registers (SSE / NEON through `wide`), then the
                // ragged edges value by value.
                while r + 4 <= r1 {
                    let mut c = c0;
                    while c + 4 <= c1 {
                        let rows: [f32x4; 4] = std::array::from_fn(|k| {
                            let at = (r + k) * src_cols + c;
                            f32x4::new(src[at..at + 4].try_into().expect("4 values"))
                        });
                        for (j, col) in f32x4::transpose(rows).iter().enumerate() {
                            let at = (c - c0 + j) * src_rows + r;
                            d[at..at + 4].copy_from_slice(col.as_array());
                        }
                        c += 4;
                    }
                    for c in c..c1 {
                        for k in r..r + 4 {
                            d[(c - c0) * src_rows + k] = src[k * src_cols + c];
                        }
                    }
                    r += 4;
                }
                for r in r..r1 {
                    for c in c0..c1 {
                        d[(c - c0) * src_rows + r] = src[r * src_cols + c];
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_small() {
        // 2 × 3 → 3 × 2
        let src = [1., 2., 3., 4., 5., 6.];
        let mut dst = [0f32; 6];
        transpose(&src, 2, 3, &mut dst);
        assert_eq!(dst, [1., 4., 2., 5., 3., 6.]);
        // Larger than one tile: non-multiple sizes, and whole tiles only.
        for (r, c) in [(70, 45), (64, 96), (9, 33)] {
            let src: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
            let mut dst = vec![0f32; r * c];
            transpose(&src, r, c, &mut dst);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(dst[j * r + i], src[i * c + j], "{r} × {c}: ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn first_non_finite_finds_the_earliest_across_pieces() {
        let mut x = vec![1.0f32; 300_000];
        assert_eq!(first_non_finite(&x), None);
        x[250_000] = f32::INFINITY;
        x[70_000] = f32::NAN;
        assert_eq!(first_non_finite(&x), Some(70_000));
        x[70_000] = 0.0;
        assert_eq!(first_non_finite(&x), Some(250_000));
        // Last of a group of 64, and -inf.
        x[127] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&x), Some(127));
    }

    #[test]
    fn f16_rounding_and_overflow() {
        let x: Vec<f32> = (0..40_000).map(|i| i as f32 * 1.001).collect();
        let mut out = vec![0f32; x.len()];
        round_f16(&x, &mut out).unwrap();
        for (a, b) in x.iter().zip(&out) {
            assert_eq!(*b, f16::from_f32(*a).to_f32());
        }
        let mut x = vec![1.0f32; 20_000];
        x[17_000] = 70_000.0;
        assert_eq!(round_f16(&x, &mut out[..20_000]), Err(17_000));
    }
}
