//! Bodies of the fuzz targets. Each takes arbitrary bytes and must return normally: a panic is
//! either a crash in the code under test or a violated property asserted here (both are bugs).
//!
//! This file depends only on the ggpt crates (no libFuzzer), so the main test suite includes it
//! (`#[path]` in tests/malformed.rs) to replay the saved inputs in
//! tests/fixtures/fuzz-regressions/ on every `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ggpt::model::Model;
use ggpt::session::Session;
use ggpt::tokenizer::byte_alphabet;
use ggpt::tokenizer::Tokenizer;
use ggpt_convert::safetensors::{decode_f32, Checkpoint};
use ggpt_gguf::GgufFile;
use ggpt_quant::cpu::available_isas;
use ggpt_quant::matmul::{matmul_at, QMatrix, Scratch};
use ggpt_quant::tensor::{can_dequantize, dequantize, quantize, validate_row_data};
use ggpt_quant::GgmlType;

/// Tensors larger than this (elements) are not dequantized by the GGUF target: the point is
/// the parser, and big allocations only slow the fuzzer down.
const MAX_DEQUANT: u64 = 1 << 16;
/// A model is evaluated only if one token costs at most about this many multiply-adds.
const MAX_EVAL_WORK: u64 = 1 << 22;

// ---------------------------------------------------------------------------------------------
// GGUF

/// The GGUF reader, then everything that consumes a parsed file: typed metadata getters,
/// tensor slices and dequantization, GPT-2 and tokenizer validation, and — for a file small
/// enough — one forward pass.
pub fn gguf_reader(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else {
        return;
    };
    for (k, v) in f.metadata() {
        let _ = (f.get_u64(k), f.get_f32(k), f.get_bool(k), f.get_str(k));
        let _ = (f.get_str_array(k), f.get_i32_array(k));
        let _ = (v.to_string(), v.type_label());
    }
    // With no tensors the data section may start (aligned) past a short file's end.
    assert!(f.tensors().is_empty() || f.data_offset() <= f.file_len());
    for t in f.tensors() {
        let bytes = f.tensor_data(t);
        // The reader validated every tensor against the file: the slice is exactly its size.
        assert_eq!(bytes.len() as u64, t.size, "tensor {}", t.name);
        assert_eq!(
            Some(t.size),
            t.ty.row_bytes(t.n_elements()),
            "tensor {}",
            t.name
        );
        if t.n_elements() <= MAX_DEQUANT && can_dequantize(t.ty) {
            let mut out = vec![0f32; t.n_elements() as usize];
            dequantize(t.ty, bytes, &mut out).expect("dequantize a validated tensor");
            if validate_row_data(t.ty, bytes).is_ok() {
                assert!(
                    out.iter().all(|v| v.is_finite()),
                    "tensor {}: scales are finite but values are not",
                    t.name
                );
            }
        }
    }
    let Ok(model) = Model::from_file(f) else {
        return;
    };
    let tok = model.tokenizer();
    let ids = tok.encode("Hello, world! <|endoftext|>");
    assert!(ids.iter().all(|&i| (i as usize) < tok.n_vocab()));
    let hp = model.hparams();
    let work = (hp.n_layer * hp.n_embd * (4 * hp.n_embd + 2 * hp.n_ff))
        .saturating_add(hp.n_vocab * hp.n_embd);
    if work <= MAX_EVAL_WORK {
        let n_ctx = (hp.n_ctx as usize).min(4);
        if let Ok(mut s) = Session::new(&model, n_ctx, 1) {
            let first = ids.first().copied().unwrap_or(0);
            if let Ok(logits) = s.prefill(&[first]) {
                assert_eq!(logits.len(), hp.n_vocab as usize);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// A directory private to this process (libFuzzer's -jobs/-fork run several).
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("ggpt-fuzz-st-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create fuzz scratch directory");
        d
    })
}

/// A single-file checkpoint `model.safetensors` holding the input: the header must be
/// validated completely before any tensor is handed out, and every tensor handed out must be
/// exactly as long as its shape and dtype say.
pub fn safetensors_reader(data: &[u8]) {
    let dir = scratch_dir();
    std::fs::write(dir.join("model.safetensors"), data).expect("write fuzz input");
    let Ok(ck) = Checkpoint::open(dir) else {
        return;
    };
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    for name in &names {
        let t = ck.get(name).expect("a listed tensor can be fetched");
        if let Ok(dt) = t.src_dtype() {
            assert_eq!(
                Some(t.data.len()),
                t.shape
                    .iter()
                    .try_fold(dt.size(), |acc, &d| acc.checked_mul(d)),
                "tensor {name}: {} bytes for shape {:?}",
                t.data.len(),
                t.shape
            );
            let n = t.n_elements();
            if n as u64 <= MAX_DEQUANT {
                let mut out = vec![0f32; n];
                decode_f32(dt, t.data, &mut out);
            }
        }
        ck.release_range(name, 1, usize::MAX);
        ck.release(name);
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

fn fixtures_dir() -> PathBuf {
    // The fuzz crate lives in fuzz/, the main crate at the repository root.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    [here, here.parent().unwrap_or(here)]
        .iter()
        .map(|p| p.join("tests/fixtures/tokenizer"))
        .find(|p| p.is_dir())
        .expect("tests/fixtures/tokenizer")
}

fn gpt2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let d = fixtures_dir();
        Tokenizer::from_hf_files(&d.join("vocab.json"), &d.join("merges.txt"))
            .expect("GPT-2 tokenizer fixture")
    })
}

/// Encoding is lossless: decoding the ids of any text gives the text back, with and without
/// special-token parsing; decoding arbitrary ids never panics, and the streaming decoder
/// agrees with the one-shot one. A first byte of 0xff instead builds a tokenizer from the
/// input (extra tokens and merges over the 256 byte tokens) and checks the same round trip.
pub fn tokenizer(data: &[u8]) {
    match data.split_first() {
        Some((0xff, rest)) => custom_tokenizer(rest),
        _ => gpt2_tokenizer(data),
    }
}

fn gpt2_tokenizer(data: &[u8]) {
    let tok = gpt2();
    let text = String::from_utf8_lossy(data);
    let ids = tok.encode_ordinary(&text);
    assert_eq!(
        tok.decode_bytes(&ids).expect("own ids decode"),
        text.as_bytes()
    );
    let ids = tok.encode(&text);
    assert_eq!(
        tok.decode_bytes(&ids).expect("own ids decode"),
        text.as_bytes()
    );

    // Arbitrary ids, some out of range.
    let n = tok.n_vocab() as u32;
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % (n + 8))
        .collect();
    let whole = tok.decode_bytes(&ids);
    let mut stream = tok.stream_decoder();
    let mut streamed = String::new();
    let mut failed = false;
    for &id in &ids {
        match stream.push(id) {
            Ok(s) => streamed.push_str(&s),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert_eq!(
        failed,
        whole.is_err(),
        "stream and one-shot decoders disagree on {ids:?}"
    );
    if !failed {
        streamed.push_str(&stream.finish());
        let lossy = String::from_utf8_lossy(&whole.expect("checked")).into_owned();
        assert_eq!(streamed, lossy, "streamed text differs for {ids:?}");
    }
}

fn custom_tokenizer(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (extra, merges, text) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|b| byte_alphabet::byte_to_char(b).to_string())
        .collect();
    for line in extra.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let t = byte_alphabet::encode_bytes(line);
        // `<|…|>` tokens are control tokens stored as plain text; keep the vocabulary to
        // ordinary byte-level tokens so the round trip below is well defined.
        if !(t.starts_with("<|") && t.ends_with("|>")) {
            tokens.push(t);
        }
    }
    let merges: Vec<String> = String::from_utf8_lossy(merges)
        .lines()
        .map(str::to_string)
        .collect();
    let Ok(tok) = Tokenizer::new(&tokens, &merges, None) else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    let ids = tok.encode_ordinary(&text);
    assert_eq!(
        tok.decode_bytes(&ids).expect("own ids decode"),
        text.as_bytes(),
        "round trip with tokens {tokens:?} merges {merges:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Quantized blocks

const TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Bytes copied into a buffer aligned for every block type (a map is page-aligned too).
struct Aligned(Vec<u64>, usize);

impl Aligned {
    fn new(bytes: &[u8]) -> Aligned {
        let mut v = vec![0u64; bytes.len().div_ceil(8)];
        for (dst, src) in v.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..src.len()].copy_from_slice(src);
            *dst = u64::from_le_bytes(b);
        }
        Aligned(v, bytes.len())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the Vec<u64> owns at least `self.1` initialised bytes (len.div_ceil(8)
        // words); u8 has no alignment or validity requirements; the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.1) }
    }
}

/// Arbitrary bytes as blocks of each type: dequantization never fails on whole blocks, finite
/// scales give finite values, every instruction set's matmul agrees with the exact product of
/// the dequantized weights (within the error of quantizing the activations), and the
/// reference quantizers take any floats (NaN and infinities included) without panicking.
pub fn quant_blocks(data: &[u8]) {
    let [sel, shape, ref rest @ ..] = *data else {
        return;
    };
    if rest.is_empty() {
        return;
    }
    let ty = TYPES[usize::from(sel) % TYPES.len()];
    let (bs, ts) = (ty.block_size(), ty.type_size());

    // 1. Raw blocks.
    let n_blocks = (rest.len() / ts).min(64);
    let raw = &rest[..n_blocks * ts];
    let mut out = vec![0f32; n_blocks * bs];
    dequantize(ty, raw, &mut out).expect("whole blocks dequantize");
    let finite_scales = validate_row_data(ty, raw).is_ok();
    if finite_scales {
        assert!(
            out.iter().all(|v| v.is_finite()),
            "{ty}: finite scales, non-finite values"
        );
    }

    // 2. Matmul on every instruction set against the exact product.
    let unit = if bs == 1 { 32 } else { bs };
    let cols = unit * (1 + usize::from(shape & 3));
    let rows = 1 + usize::from((shape >> 2) & 3);
    let n_tokens = [1usize, 2, 4, 5][usize::from(shape >> 4) & 3];
    let row_bytes = cols / bs * ts;
    let wbytes: Vec<u8> = rest
        .iter()
        .copied()
        .cycle()
        .take(rows * row_bytes)
        .collect();
    let w_al = Aligned::new(&wbytes);
    let w = QMatrix::new(ty, rows, cols, w_al.bytes()).expect("valid matrix");
    // Activations: small multiples of 1/8 from the input bytes, so they are exact in f32.
    let x: Vec<f32> = rest
        .iter()
        .rev()
        .copied()
        .cycle()
        .take(n_tokens * cols)
        .map(|b| f32::from(b as i8) * 0.125)
        .collect();
    let mut wf = vec![0f32; rows * cols];
    dequantize(ty, &wbytes, &mut wf).expect("dequantize weights");
    // |w| plus the size of the constant part of each weight's dequantization, which kernels
    // may apply separately (see `offset_terms`): the scale of the rounding error.
    let wabs: Vec<f32> = wf
        .iter()
        .zip(offset_terms(ty, &wbytes))
        .map(|(w, o)| w.abs() + o)
        .collect();
    let exact_ok = validate_row_data(ty, &wbytes).is_ok();
    for isa in available_isas() {
        let Some(k) = isa.level() else { continue };
        let mut y = vec![0f32; n_tokens * rows];
        matmul_at(k, &w, &x, n_tokens, None, &mut y, &mut Scratch::default());
        if !exact_ok {
            continue;
        }
        for t in 0..n_tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            for r in 0..rows {
                let wr = &wf[r * cols..(r + 1) * cols];
                let wa = &wabs[r * cols..(r + 1) * cols];
                let exact: f64 = wr
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let mag: f64 = wa
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b.abs()))
                    .sum();
                // Quantized activations (Q8_0 / Q8_K) err by at most ~amax/200 per element
                // within their 32- or 256-value block; float types only by summation order.
                let act_block = match ty {
                    GgmlType::Q8_0 => 32,
                    GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
                    _ => 0,
                };
                let act_err: f64 = if act_block == 0 {
                    0.0
                } else {
                    wa.chunks(act_block)
                        .zip(xt.chunks(act_block))
                        .map(|(wb, xb)| {
                            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                            let wsum: f64 = wb.iter().map(|&v| f64::from(v)).sum();
                            wsum * f64::from(amax) / 200.0
                        })
                        .sum()
                };
                if mag > 1e30 {
                    // The f32 kernels overflow where the f64 reference does not.
                    continue;
                }
                let got = f64::from(y[t * rows + r]);
                let tol = act_err + 1e-4 * mag + 1e-5;
                assert!(
                    (got - exact).abs() <= tol,
                    "{ty} on {isa:?}: row {r} token {t}: got {got}, exact {exact} (tolerance {tol})"
                );
            }
        }
    }

    // 3. The reference quantizer on arbitrary floats.
    quantize_floats(ty, unit, rest);
}

/// Per weight, the magnitude of the constant part of its dequantization: `32·d·sc` for Q6_K
/// (values are stored as q + 32), `dmin·m` for Q4_K/Q5_K, 0 for the rest. SIMD kernels apply
/// it as a separate correction (through the activations' block sums), so a weight that
/// dequantizes to 0 can still carry the rounding error of two large terms that cancel.
fn offset_terms(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let f16 = |b: &[u8]| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    let mut out = Vec::with_capacity(bytes.len() / ty.type_size() * ty.block_size());
    for blk in bytes.chunks_exact(ty.type_size()) {
        match ty {
            GgmlType::Q6K => {
                let d = f16(&blk[208..]);
                for s in 0..16 {
                    let sc = f32::from(blk[192 + s] as i8);
                    out.extend([(32.0 * d * sc).abs(); 16]);
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let dmin = f16(&blk[2..]);
                let scales: [u8; 12] = blk[4..16].try_into().expect("12 scale bytes");
                for j in 0..8 {
                    let (_, m) = ggpt_quant::kscale::get_scale_min_k4(j, &scales);
                    out.extend([(dmin * f32::from(m)).abs(); 32]);
                }
            }
            _ => out.extend(std::iter::repeat_n(0.0, ty.block_size())),
        }
    }
    out
}

fn quantize_floats(ty: GgmlType, unit: usize, rest: &[u8]) {
    let floats: Vec<f32> = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let n = floats.len() / unit * unit;
    if n == 0 {
        return;
    }
    let src = &floats[..n];
    let q = quantize(ty, src, unit).expect("quantize whole blocks");
    assert_eq!(
        q,
        quantize(ty, src, unit).expect("quantize"),
        "{ty}: not deterministic"
    );
    let mut back = vec![0f32; n];
    dequantize(ty, &q, &mut back).expect("dequantize own output");
    if validate_row_data(ty, &q).is_ok() && src.iter().all(|v| v.is_finite() && v.abs() < 1e4) {
        for (blk, (a, b)) in src.chunks(unit).zip(back.chunks(unit)).enumerate() {
            let amax = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (&u, &v)) in a.iter().zip(b).enumerate() {
                // Scales are fp16: for blocks whose values are all below ~1e-4 the scale
                // underflows (as in ggml) and the block comes back as zeros.
                assert!(
                    (u - v).abs() <= amax * 0.51 + 1e-4 || ty == GgmlType::F32,
                    "{ty}: block {blk} value {i}: {u} came back as {v} (block max {amax})"
                );
            }
        }
    }
}
