//! `synth`: a randomly initialised GPT-2 checkpoint in Hugging Face's original layout, of any
//! shape — for benchmarks (GPT-2 Medium cannot be downloaded here) and converter tests.
//!
//! Weights are N(0, 0.02), LayerNorm weights 1, biases 0, like `GPT2PreTrainedModel`'s init
//! (without its 1/√(2·n_layer) scaling of the residual projections). Names follow the original
//! OpenAI/HF files: no `transformer.` prefix and the causal-mask buffers `h.N.attn.bias`
//! ([1, 1, n_ctx, n_ctx], lower-triangular ones) and `h.N.attn.masked_bias` (a scalar −1e4).
//!
//! The safetensors file is streamed: its header is computed from the shapes first, then each
//! tensor is generated and written in chunks, so memory stays small whatever the shape. The
//! generator is counter-based (each value depends only on seed, tensor and index), so output is
//! identical for a given seed no matter how the work is split across threads.

use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::atomic::AtomicFile;
use crate::error::ConvertError;
use crate::hf::InputError;
use crate::pipeline::OutputError;
use crate::safetensors::SrcDtype;

/// Model dimensions of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthShape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_ctx: usize,
    pub vocab_size: usize,
}

impl SynthShape {
    /// `gpt2-xl` (1.5 B), `gpt2-large` (774 M), `gpt2-medium` (355 M), `gpt2` (124 M),
    /// `distilgpt2` (82 M), `tiny` (the bundled tiny-gpt2's shape, 18 M) or `gpt2-xl-2l` (GPT-2
    /// XL's width, 1600, with 2 layers, 144 M: row lengths that are not a multiple of 256, for
    /// the quantizer's fallbacks).
    pub fn named(name: &str) -> Option<SynthShape> {
        let (n_layer, n_embd, n_head) = match name {
            "gpt2-xl" => (48, 1600, 25),
            "gpt2-large" => (36, 1280, 20),
            "gpt2-medium" => (24, 1024, 16),
            "gpt2" => (12, 768, 12),
            "distilgpt2" => (6, 768, 12),
            "tiny" => (6, 256, 8),
            "gpt2-xl-2l" => (2, 1600, 25),
            _ => return None,
        };
        Some(SynthShape {
            n_layer,
            n_embd,
            n_head,
            n_ctx: 1024,
            vocab_size: 50257,
        })
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub shape: SynthShape,
    pub dtype: SrcDtype,
    pub seed: u64,
    /// Prefix names with `transformer.` (what `save_pretrained` of GPT2LMHeadModel writes today).
    pub prefix: bool,
    /// Include the `attn.bias` / `attn.masked_bias` buffers (as the original GPT-2 files do).
    pub buffers: bool,
    /// Include `lm_head.weight` (equal to `wte`, i.e. tied).
    pub lm_head: bool,
}

#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(0, 0.02) from the stream `key` (equal keys give equal tensors: the tied head).
    Normal(u64),
    Const(f32),
    /// `[.., n, n]` lower-triangular ones.
    Tril(usize),
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    /// Buffers are stored as F32 whatever the weights' dtype.
    dtype: SrcDtype,
}

impl Spec {
    fn n(&self) -> usize {
        self.shape.iter().product()
    }
}

fn specs(o: &SynthOptions) -> Vec<Spec> {
    let s = o.shape;
    let (e, f) = (s.n_embd, 4 * s.n_embd);
    let p = if o.prefix { "transformer." } else { "" };
    let mut v = Vec::new();
    let mut key = 0u64;
    let mut normal = || {
        key += 1;
        Init::Normal(key)
    };
    let wte_init = normal();
    let mut add = |name: String, shape: Vec<usize>, init: Init, dtype: SrcDtype| {
        v.push(Spec {
            name,
            shape,
            init,
            dtype,
        })
    };
    let d = o.dtype;
    add(format!("{p}wte.weight"), vec![s.vocab_size, e], wte_init, d);
    add(format!("{p}wpe.weight"), vec![s.n_ctx, e], normal(), d);
    for i in 0..s.n_layer {
        let h = format!("{p}h.{i}.");
        add(format!("{h}ln_1.weight"), vec![e], Init::Const(1.0), d);
        add(format!("{h}ln_1.bias"), vec![e], Init::Const(0.0), d);
        if o.buffers {
            add(
                format!("{h}attn.bias"),
                vec![1, 1, s.n_ctx, s.n_ctx],
                Init::Tril(s.n_ctx),
                SrcDtype::F32,
            );
            add(
                format!("{h}attn.masked_bias"),
                vec![],
                Init::Const(-1e4),
                SrcDtype::F32,
            );
        }
        add(
            format!("{h}attn.c_attn.weight"),
            vec![e, 3 * e],
            normal(),
            d,
        );
        add(
            format!("{h}attn.c_attn.bias"),
            vec![3 * e],
            Init::Const(0.0),
            d,
        );
        add(format!("{h}attn.c_proj.weight"), vec![e, e], normal(), d);
        add(format!("{h}attn.c_proj.bias"), vec![e], Init::Const(0.0), d);
        add(format!("{h}ln_2.weight"), vec![e], Init::Const(1.0), d);
        add(format!("{h}ln_2.bias"), vec![e], Init::Const(0.0), d);
        add(format!("{h}mlp.c_fc.weight"), vec![e, f], normal(), d);
        add(format!("{h}mlp.c_fc.bias"), vec![f], Init::Const(0.0), d);
        add(format!("{h}mlp.c_proj.weight"), vec![f, e], normal(), d);
        add(format!("{h}mlp.c_proj.bias"), vec![e], Init::Const(0.0), d);
    }
    add(format!("{p}ln_f.weight"), vec![e], Init::Const(1.0), d);
    add(format!("{p}ln_f.bias"), vec![e], Init::Const(0.0), d);
    if o.lm_head {
        add("lm_head.weight".into(), vec![s.vocab_size, e], wte_init, d);
    }
    v
}

fn dtype_name(d: SrcDtype) -> &'static str {
    match d {
        SrcDtype::F32 => "F32",
        SrcDtype::F16 => "F16",
        SrcDtype::BF16 => "BF16",
    }
}

/// The safetensors header: JSON padded with spaces to a multiple of 8 bytes, as the reference
/// writer does, so the data section starts aligned.
fn header(specs: &[Spec]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.n() * s.dtype.size();
        let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
        let _ = write!(
            json,
            ",\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            s.name,
            dtype_name(s.dtype),
            shape.join(",")
        );
        offset = end;
    }
    json.push('}');
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// splitmix64's output function: a strong 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Values `start..start + out.len()` of the tensor `init`.
fn fill(init: Init, seed: u64, start: usize, out: &mut [f32]) {
    match init {
        Init::Const(c) => out.fill(c),
        Init::Tril(n) => {
            for (k, o) in out.iter_mut().enumerate() {
                let i = start + k;
                let (row, col) = ((i / n) % n, i % n);
                *o = if col <= row { 1.0 } else { 0.0 };
            }
        }
        Init::Normal(key) => {
            let stream = mix(seed ^ mix(key.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            // Box–Muller: one 64-bit draw gives the pair of values 2j, 2j+1.
            let end = start + out.len();
            for j in start / 2..end.div_ceil(2) {
                let bits = mix(stream.wrapping_add(j as u64));
                let u1 = ((bits >> 40) as f64 + 1.0) / (1u64 << 24) as f64; // (0, 1]
                let u2 = (bits & 0xff_ffff) as f64 / (1u64 << 24) as f64; // [0, 1)
                let r = 0.02 * (-2.0 * u1.ln()).sqrt();
                let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
                for (i, z) in [(2 * j, r * c), (2 * j + 1, r * s)] {
                    if (start..end).contains(&i) {
                        out[i - start] = z as f32;
                    }
                }
            }
        }
    }
}

fn encode(dtype: SrcDtype, x: &[f32], out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        SrcDtype::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        SrcDtype::F16 => out.extend(
            x.iter()
                .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes()),
        ),
        SrcDtype::BF16 => out.extend(
            x.iter()
                .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes()),
        ),
    }
}

/// Write `config.json`, `model.safetensors`, and copies of `vocab.json` + `merges.txt` from
/// `vocab_from` into `out_dir` (created if missing). Returns the safetensors file size.
pub fn synth(o: &SynthOptions, out_dir: &Path, vocab_from: &Path) -> Result<u64, ConvertError> {
    let s = o.shape;
    if s.n_layer == 0 || s.n_embd == 0 || s.n_head == 0 || s.n_ctx == 0 || s.vocab_size == 0 {
        return Err(ConvertError::Request(format!(
            "synth: every dimension must be positive: {s:?}"
        )));
    }
    if !s.n_embd.is_multiple_of(s.n_head) {
        return Err(ConvertError::Request(format!(
            "synth: n_embd {} is not a multiple of n_head {}",
            s.n_embd, s.n_head
        )));
    }
    for f in ["vocab.json", "merges.txt"] {
        if !vocab_from.join(f).is_file() {
            return Err(InputError::new(
                vocab_from.join(f),
                "missing (synth copies the GPT-2 tokenizer from there)",
            )
            .into());
        }
    }
    crate::atomic::create_dir_all(out_dir)
        .map_err(out_err(out_dir, "cannot create the output directory"))?;

    let mut config = serde_json::json!({
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-5,
        "model_type": "gpt2",
        "n_ctx": s.n_ctx,
        "n_embd": s.n_embd,
        "n_head": s.n_head,
        "n_layer": s.n_layer,
        "n_positions": s.n_ctx,
        "resid_pdrop": 0.1,
        "vocab_size": s.vocab_size,
    });
    if s.vocab_size > 50256 {
        config["bos_token_id"] = 50256.into();
        config["eos_token_id"] = 50256.into();
    }
    write_atomic(
        &out_dir.join("config.json"),
        format!("{config:#}").as_bytes(),
    )?;
    for f in ["vocab.json", "merges.txt"] {
        let bytes = fs::read(vocab_from.join(f))
            .map_err(|e| InputError::new(vocab_from.join(f), format!("cannot read: {e}")))?;
        write_atomic(&out_dir.join(f), &bytes)?;
    }

    let specs = specs(o);
    let dest = out_dir.join("model.safetensors");
    let mut file = AtomicFile::create(&dest).map_err(out_err(&dest, "cannot write"))?;
    let head = header(&specs);
    let werr = out_err(&dest, "cannot write");
    file.write_all(&head).map_err(&werr)?;
    let mut total = head.len() as u64;
    const CHUNK: usize = 1 << 20;
    const PIECE: usize = 1 << 14;
    let mut x = vec![0f32; CHUNK];
    let mut bytes = Vec::with_capacity(CHUNK * 4);
    for spec in &specs {
        let n = spec.n();
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let xs = &mut x[..len];
            xs.par_chunks_mut(PIECE)
                .enumerate()
                .for_each(|(k, piece)| fill(spec.init, o.seed, start + k * PIECE, piece));
            encode(spec.dtype, xs, &mut bytes);
            file.write_all(&bytes).map_err(&werr)?;
            total += bytes.len() as u64;
            start += len;
        }
    }
    file.commit().map_err(&werr)?;
    Ok(total)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let write = || -> std::io::Result<()> {
        let mut f = AtomicFile::create(path)?;
        f.write_all(bytes)?;
        f.commit()
    };
    write().map_err(out_err(path, "cannot write"))
}

/// An output failure of `path` (exit code 4 in the CLI).
fn out_err(path: &Path, what: &'static str) -> impl Fn(std::io::Error) -> OutputError {
    let path = path.to_path_buf();
    move |source| OutputError {
        path: path.clone(),
        what,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_stream_is_split_invariant_and_plausible() {
        let mut a = vec![0f32; 50_001];
        fill(Init::Normal(3), 7, 0, &mut a);
        let mut b = vec![0f32; 50_001];
        for (k, piece) in b.chunks_mut(777).enumerate() {
            fill(Init::Normal(3), 7, k * 777, piece);
        }
        assert_eq!(a, b);
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.001, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.0005, "std {}", var.sqrt());
        let mut c = vec![0f32; 100];
        fill(Init::Normal(4), 7, 0, &mut c);
        assert_ne!(a[..100], c[..]);
    }

    #[test]
    fn tril_buffer() {
        let mut t = vec![0f32; 2 * 9];
        fill(Init::Tril(3), 0, 0, &mut t);
        assert_eq!(&t[..9], &[1., 0., 0., 1., 1., 0., 1., 1., 1.]);
        assert_eq!(&t[9..], &t[..9]);
    }

    #[test]
    fn header_is_valid_safetensors() {
        let o = SynthOptions {
            shape: SynthShape {
                n_layer: 1,
                n_embd: 8,
                n_head: 2,
                n_ctx: 4,
                vocab_size: 10,
            },
            dtype: SrcDtype::F16,
            seed: 1,
            prefix: false,
            buffers: true,
            lm_head: true,
        };
        let sp = specs(&o);
        let mut file = header(&sp);
        assert_eq!((file.len() - 8) % 8, 0);
        let data: usize = sp.iter().map(|s| s.n() * s.dtype.size()).sum();
        file.resize(file.len() + data, 0);
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.len(), sp.len());
        let mb = st.tensor("h.0.attn.masked_bias").unwrap();
        assert_eq!((mb.dtype(), mb.shape()), (safetensors::Dtype::F32, &[][..]));
        assert_eq!(st.tensor("lm_head.weight").unwrap().shape(), &[10, 8]);
    }
}
