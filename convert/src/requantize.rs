//! `requantize`: GGUF → GGUF with llama-quantize's rules, for GPT-2 files written by any
//! converter (e.g. llama.cpp's own F16/F32/BF16 output, which may carry a duplicate
//! `output.weight`: then `token_embd` keeps the default type and `output.weight` gets Q6_K).
//!
//! Like llama-quantize: every KV pair is copied in order, then `general.quantization_version`
//! and `general.file_type` are set (which moves them to the end); tensors are written in
//! llama.cpp's (layer, name) order; a tensor already in its target type is copied byte for
//! byte; anything else is dequantized to f32 and quantized with ggml's reference quantizers.
//! Quantized inputs are refused unless the type stays the same: quantizing twice compounds the
//! error, so start from F16/F32.
//!
//! Tensor data is read with ordinary file reads, one row chunk at a time, rather than through
//! the map, so resident memory stays at a few chunks whatever the model size.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use ggpt_quant::tensor::{dequantize, quantize_into, validate_row_data};
use ggpt_quant::GgmlType;

use crate::atomic::{refuse_input_as_output, AtomicFile};
use crate::error::ConvertError;
use crate::hf::InputError;
use crate::pipeline::{
    first_non_finite, scratch, FileSummary, OutputError, Progress, CHUNK_VALUES,
};
use crate::policy::{tensor_order, FileType, Policy};
use ggpt_gguf::gpt2::keys;
use ggpt_gguf::{GgufFile, GgufWriter, Value};

/// Keys llama-quantize drops (it writes a single file).
const SPLIT_KEYS: &[&str] = &["split.no", "split.count", "split.tensors.count"];

fn is_float(t: GgmlType) -> bool {
    matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Requantize `input` to `ftype`, writing `output` atomically.
pub fn requantize(
    input: &Path,
    output: &Path,
    ftype: FileType,
    progress: &dyn Progress,
) -> Result<FileSummary, ConvertError> {
    let gg = GgufFile::open(input)?;
    let bad = |msg: String| InputError::new(input, msg);
    match gg.get_str(keys::ARCHITECTURE)? {
        Some("gpt2") => {}
        Some(a) => {
            return Err(bad(format!(
                "general.architecture is {a:?}; ggpt quantizes GPT-2 (\"gpt2\") files only"
            ))
            .into())
        }
        None => return Err(bad("general.architecture is missing".into()).into()),
    }
    if gg.get_u64("split.count")?.is_some_and(|n| n > 1) {
        return Err(bad(
            "is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)".into(),
        )
        .into());
    }
    let n_layer = gg
        .get_u64(keys::BLOCK_COUNT)?
        .ok_or_else(|| bad("gpt2.block_count is missing".into()))? as usize;
    refuse_input_as_output(output, [input], "the input")?;

    let mut order: Vec<usize> = (0..gg.tensors().len()).collect();
    order.sort_by(|&a, &b| tensor_order(&gg.tensors()[a].name, &gg.tensors()[b].name));
    let has_output = gg.tensor("output.weight").is_some();
    // llama-quantize asserts one attention-value tensor (GPT-2: the fused qkv) per layer.
    let n_qkv = gg
        .tensors()
        .iter()
        .filter(|t| t.name.contains("attn_qkv.weight"))
        .count();
    if n_qkv != n_layer {
        return Err(bad(format!(
            "has {n_qkv} attn_qkv.weight tensors but gpt2.block_count is {n_layer}"
        ))
        .into());
    }

    let mut writer = GgufWriter::new();
    for (k, v) in gg.metadata() {
        if !SPLIT_KEYS.contains(&k.as_str()) {
            writer.add_kv(k, v.clone());
        }
    }
    writer.add_kv(keys::QUANTIZATION_VERSION, Value::U32(2));
    writer.add_kv(keys::FILE_TYPE, Value::U32(ftype.code()));

    let policy = Policy::new(ftype, n_layer, has_output);
    let mut types = Vec::with_capacity(order.len());
    let mut differs = Vec::new();
    for &i in &order {
        let t = &gg.tensors()[i];
        let choice = policy
            .choose(&t.name, &t.dims, t.ty)
            .map_err(|e| bad(e.to_string()))?;
        if choice.ty != t.ty && !is_float(t.ty) {
            return Err(bad(format!(
                "tensor {} is already quantized ({}); requantizing it to {} would compound the error — start from an F32/F16/BF16 file",
                t.name, t.ty, choice.ty
            ))
            .into());
        }
        if let Some(d) = choice.differs {
            differs.push((t.name.clone(), choice.ty, d));
        }
        writer.add_tensor(&t.name, &t.dims, choice.ty)?;
        types.push(choice.ty);
    }

    let start = Instant::now();
    let out_err = |what: &'static str| {
        move |source| OutputError {
            path: output.to_path_buf(),
            what,
            source,
        }
    };
    let mut out = AtomicFile::create(output).map_err(out_err("cannot create output"))?;
    let mut src = File::open(input).map_err(|e| bad(format!("cannot open: {e}")))?;
    progress.begin(&[(output.to_path_buf(), writer.total_size())]);
    let header = writer.header_bytes();
    out.write_all(&header).map_err(out_err("cannot write"))?;
    progress.wrote(0, header.len() as u64);

    let align = writer.alignment();
    // Every row chunk of every tensor, in file order: (tensor k, first row, end row).
    let mut chunks: Vec<(usize, usize, usize)> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let t = &gg.tensors()[i];
        let (cols, rows) = (t.cols() as usize, t.rows() as usize);
        let rows_per_chunk = (CHUNK_VALUES / cols.max(1)).max(1);
        if rows == 0 {
            chunks.push((k, 0, 0));
        }
        chunks.extend(
            (0..rows)
                .step_by(rows_per_chunk)
                .map(|r0| (k, r0, (r0 + rows_per_chunk).min(rows))),
        );
    }
    let read_chunk = |src: &mut File, (k, r0, r1): (usize, usize, usize), raw: &mut Vec<u8>| {
        let t = &gg.tensors()[order[k]];
        let in_row = t.row_bytes() as usize;
        let raw = scratch(raw, (r1 - r0) * in_row);
        let base = gg.data_offset() + t.offset;
        src.seek(SeekFrom::Start(base + (r0 * in_row) as u64))
            .and_then(|_| src.read_exact(raw))
            .map_err(|e| bad(format!("cannot read tensor {}: {e}", t.name)))
    };
    // Reading chunk j+1 (a copy out of the page cache, or disk) overlaps encoding chunk j.
    let (mut raw, mut next_raw): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
    let mut x: Vec<f32> = Vec::new();
    let mut q: Vec<u8> = Vec::new();
    if let Some(&first) = chunks.first() {
        read_chunk(&mut src, first, &mut raw)?;
    }
    for (j, &(k, r0, r1)) in chunks.iter().enumerate() {
        let t = &gg.tensors()[order[k]];
        if r0 == 0 {
            progress.tensor(k, order.len(), &t.name);
        }
        let new = types[k];
        let cols = t.cols() as usize;
        let in_bytes = (r1 - r0) * t.row_bytes() as usize;
        let encode = || -> Result<bool, ConvertError> {
            if new == t.ty {
                return Ok(false);
            }
            let x = scratch(&mut x, (r1 - r0) * cols);
            dequantize(t.ty, &raw[..in_bytes], x)
                .map_err(|e| bad(format!("tensor {}: {e}", t.name)))?;
            if let Some(i) = first_non_finite(x) {
                return Err(bad(format!(
                    "tensor {}: element {} is {}",
                    t.name,
                    r0 * cols + i,
                    x[i]
                ))
                .into());
            }
            let q = scratch(
                &mut q,
                (r1 - r0) * new.row_bytes(cols as u64).unwrap_or(0) as usize,
            );
            quantize_into(new, x, cols, q).map_err(|e| ConvertError::Encode {
                tensor: t.name.clone(),
                what: e.to_string(),
            })?;
            validate_row_data(new, q).map_err(|e| ConvertError::Encode {
                tensor: t.name.clone(),
                what: format!("quantized data invalid: {e}"),
            })?;
            Ok(true)
        };
        let prefetch = || match chunks.get(j + 1) {
            Some(&c) => read_chunk(&mut src, c, &mut next_raw),
            None => Ok(()),
        };
        let (encoded, read) = rayon::join(encode, prefetch);
        let bytes: &[u8] = if encoded? {
            &q[..(r1 - r0) * new.row_bytes(cols as u64).unwrap_or(0) as usize]
        } else {
            &raw[..in_bytes]
        };
        out.write_all(bytes).map_err(out_err("cannot write"))?;
        progress.wrote(0, bytes.len() as u64);
        read?;
        std::mem::swap(&mut raw, &mut next_raw);
        if r1 == t.rows() as usize {
            let size = writer.tensors()[k].size;
            let pad = ((align - size % align) % align) as usize;
            out.write_all(&vec![0u8; pad])
                .map_err(out_err("cannot write"))?;
            progress.wrote(0, pad as u64);
        }
    }
    out.commit().map_err(out_err("cannot commit"))?;
    progress.finish();

    let mut type_counts: Vec<(GgmlType, usize)> = Vec::new();
    for &t in &types {
        match type_counts.iter_mut().find(|(u, _)| *u == t) {
            Some((_, c)) => *c += 1,
            None => type_counts.push((t, 1)),
        }
    }
    Ok(FileSummary {
        path: output.to_path_buf(),
        ftype,
        n_tensors: types.len(),
        file_bytes: writer.total_size(),
        tensor_bytes: writer.tensors().iter().map(|t| t.size).sum(),
        n_params: gg.tensors().iter().map(|t| t.n_elements()).sum(),
        seconds: start.elapsed().as_secs_f64(),
        differs,
        type_counts,
    })
}
