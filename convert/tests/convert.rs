//! End-to-end tests of the Hugging Face → GGUF conversion, requantization and synthetic
//! checkpoints, on the bundled models/tiny-gpt2 (a really trained GPT-2, fp16, sharded).
//!
//! Expected values come from the inputs themselves (the safetensors source read independently
//! with the `safetensors` crate, vocab.json/merges.txt parsed here) and from llama.cpp's rules
//! written out as explicit tables — never from a previous run of the code under test.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ggpt_convert::pipeline::{convert_hf, ConvertOptions, NoProgress};
use ggpt_convert::policy::FileType;
use ggpt_convert::requantize::requantize;
use ggpt_convert::safetensors::SrcDtype;
use ggpt_convert::synth::{synth, SynthOptions, SynthShape};
use ggpt_convert::ConvertError;
use ggpt_gguf::{Array, GgufFile, GgufWriter, Value};
use ggpt_quant::tensor::{dequantize, validate_row_data};
use ggpt_quant::GgmlType::{self, *};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-gpt2")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ggpt-convert-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    /// Every file in the directory (for "nothing was left behind" checks).
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copy the tiny model (optionally without some files) into a scratch directory.
fn copy_tiny(skip: &[&str]) -> TempDir {
    let d = TempDir::new("tiny");
    for e in fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if !skip.contains(&name.as_str()) {
            fs::copy(e.path(), d.path().join(&name)).unwrap();
        }
    }
    d
}

fn convert(dir: &Path, types: &[FileType], out: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let opts = ConvertOptions {
        hf_dir: dir.to_path_buf(),
        types: types.to_vec(),
        output: Some(out.to_path_buf()),
        name: None,
    };
    Ok(convert_hf(&opts, &NoProgress)?
        .files
        .into_iter()
        .map(|f| f.path)
        .collect())
}

/// All tensors of the source checkpoint, decoded to f32, keyed by name without `transformer.`.
fn source_tensors(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = HashMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let bytes = fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            let vals: Vec<f32> = match t.dtype() {
                Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::F16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                    .collect(),
                Dtype::BF16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                    .collect(),
                _ => continue,
            };
            let key = name
                .strip_prefix("transformer.")
                .unwrap_or(&name)
                .to_string();
            out.insert(key, (t.shape().to_vec(), vals));
        }
    }
    out
}

fn dequant(g: &GgufFile, name: &str) -> Vec<f32> {
    let t = g.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
    let mut v = vec![0f32; t.n_elements() as usize];
    dequantize(t.ty, g.tensor_data(t), &mut v).unwrap();
    v
}

/// (GGUF name, HF name, transposed) for every tensor of an `n_layer` GPT-2.
fn tensor_map(n_layer: usize) -> Vec<(String, String, bool)> {
    let mut v = vec![
        (
            "token_embd.weight".to_string(),
            "wte.weight".to_string(),
            false,
        ),
        ("position_embd.weight".into(), "wpe.weight".into(), false),
        ("output_norm.weight".into(), "ln_f.weight".into(), false),
        ("output_norm.bias".into(), "ln_f.bias".into(), false),
    ];
    for i in 0..n_layer {
        for (g, h, t) in [
            ("attn_norm.weight", "ln_1.weight", false),
            ("attn_norm.bias", "ln_1.bias", false),
            ("attn_qkv.weight", "attn.c_attn.weight", true),
            ("attn_qkv.bias", "attn.c_attn.bias", false),
            ("attn_output.weight", "attn.c_proj.weight", true),
            ("attn_output.bias", "attn.c_proj.bias", false),
            ("ffn_norm.weight", "ln_2.weight", false),
            ("ffn_norm.bias", "ln_2.bias", false),
            ("ffn_up.weight", "mlp.c_fc.weight", true),
            ("ffn_up.bias", "mlp.c_fc.bias", false),
            ("ffn_down.weight", "mlp.c_proj.weight", true),
            ("ffn_down.bias", "mlp.c_proj.bias", false),
        ] {
            v.push((format!("blk.{i}.{g}"), format!("h.{i}.{h}"), t));
        }
    }
    v
}

/// llama-quantize's file order for an `n_layer` GPT-2, written out explicitly.
fn expected_order(n_layer: usize) -> Vec<String> {
    let mut v: Vec<String> = [
        "output_norm.bias",
        "output_norm.weight",
        "position_embd.weight",
        "token_embd.weight",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..n_layer {
        for t in [
            "attn_norm.bias",
            "attn_norm.weight",
            "attn_output.bias",
            "attn_output.weight",
            "attn_qkv.bias",
            "attn_qkv.weight",
            "ffn_down.bias",
            "ffn_down.weight",
            "ffn_norm.bias",
            "ffn_norm.weight",
            "ffn_up.bias",
            "ffn_up.weight",
        ] {
            v.push(format!("blk.{i}.{t}"));
        }
    }
    v
}

/// llama-quantize's type for `name` in a Q4_K_M file (tied head, every row a multiple of 256).
fn q4_k_m_type(name: &str, more_bits_layers: &[usize]) -> GgmlType {
    k_mix_type(name, Q4K, Q5K, more_bits_layers)
}

/// A K-quant mix (llama.cpp's rules for GPT-2, tied head, every row a multiple of 256): the
/// output head Q6_K, `attn_qkv` in `qkv`, `ffn_down` Q6_K on `more_bits_layers`, other
/// matrices in `base`.
fn k_mix_type(name: &str, base: GgmlType, qkv: GgmlType, more_bits_layers: &[usize]) -> GgmlType {
    if name == "token_embd.weight" {
        return Q6K;
    }
    if !name.ends_with(".weight") || name.contains("norm") || name == "position_embd.weight" {
        return F32;
    }
    let layer: usize = name.split('.').nth(1).unwrap().parse().unwrap();
    if name.contains("attn_qkv") {
        qkv
    } else if name.contains("ffn_down") && more_bits_layers.contains(&layer) {
        Q6K
    } else {
        base
    }
}

#[test]
fn tiny_model_converts_to_every_type() {
    let out = TempDir::new("all");
    let files = convert(&tiny(), &FileType::KNOWN, out.path()).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "tiny-gpt2-F16.gguf",
            "tiny-gpt2-Q8_0.gguf",
            "tiny-gpt2-Q6_K.gguf",
            "tiny-gpt2-Q5_K_M.gguf",
            "tiny-gpt2-Q5_K_S.gguf",
            "tiny-gpt2-Q4_K_M.gguf"
        ]
    );
    assert_eq!(out.files(), {
        let mut n = names.clone();
        n.sort();
        n
    });

    // The tokenizer, parsed independently.
    let vocab: HashMap<String, usize> =
        serde_json::from_str(&fs::read_to_string(tiny().join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<String> = fs::read_to_string(tiny().join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(merges.len(), 50_000);

    let order = expected_order(6);
    let (e, ff, v, ctx) = (256u64, 1024u64, 50257u64, 1024u64);
    for (path, ftype) in files.iter().zip(FileType::KNOWN) {
        let g = GgufFile::open(path).unwrap();
        // Metadata: keys in llama.cpp converter order, values from config/tokenizer files.
        let keys: Vec<&str> = g.metadata().iter().map(|(k, _)| k.as_str()).collect();
        // convert_hf_to_gguf.py's order for F16; llama-quantize moves quantization_version and
        // file_type to the end when it sets them.
        let mut want = vec![
            "general.architecture",
            "general.type",
            "general.name",
            "gpt2.block_count",
            "gpt2.context_length",
            "gpt2.embedding_length",
            "gpt2.feed_forward_length",
            "gpt2.attention.head_count",
            "gpt2.attention.layer_norm_epsilon",
            "general.file_type",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "general.quantization_version",
        ];
        if ftype != FileType::F16 {
            want.retain(|k| *k != "general.file_type");
            want.push("general.file_type");
        }
        assert_eq!(keys, want, "{ftype}");
        let get = |k: &str| g.get(k).unwrap().clone();
        assert_eq!(get("general.architecture"), Value::String("gpt2".into()));
        assert_eq!(get("general.type"), Value::String("model".into()));
        assert_eq!(get("general.name"), Value::String("tiny-gpt2".into()));
        assert_eq!(get("gpt2.block_count"), Value::U32(6));
        assert_eq!(get("gpt2.context_length"), Value::U32(1024));
        assert_eq!(get("gpt2.embedding_length"), Value::U32(256));
        assert_eq!(get("gpt2.feed_forward_length"), Value::U32(1024));
        assert_eq!(get("gpt2.attention.head_count"), Value::U32(8));
        assert_eq!(get("gpt2.attention.layer_norm_epsilon"), Value::F32(1e-5));
        assert_eq!(get("general.file_type"), Value::U32(ftype as u32));
        assert_eq!(get("general.quantization_version"), Value::U32(2));
        assert_eq!(get("tokenizer.ggml.model"), Value::String("gpt2".into()));
        assert_eq!(get("tokenizer.ggml.pre"), Value::String("gpt-2".into()));
        for k in ["bos", "eos", "unknown"] {
            assert_eq!(
                get(&format!("tokenizer.ggml.{k}_token_id")),
                Value::U32(50256),
                "{k}"
            );
        }
        let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
        assert_eq!(tokens.len(), 50257);
        for (t, &id) in &vocab {
            assert_eq!(tokens[id], t, "token {id}");
        }
        let types = g
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap();
        assert!(matches!(
            g.get("tokenizer.ggml.token_type"),
            Some(Value::Array(Array::I32(_)))
        ));
        assert_eq!(types[50256], 3, "<|endoftext|> is a control token");
        assert!(types[..50256].iter().all(|&t| t == 1));
        assert_eq!(
            g.get_str_array("tokenizer.ggml.merges").unwrap().unwrap(),
            merges
        );

        // Tensors: llama-quantize's order, GGUF dims (ne0 first), llama.cpp's types.
        let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, order, "{ftype}");
        assert!(
            g.tensor("output.weight").is_none(),
            "tied head must not be duplicated"
        );
        for t in g.tensors() {
            let n = t.name.as_str();
            let field = n.rsplit('.').nth(1).unwrap();
            let dims: Vec<u64> = match (field, n.ends_with(".weight")) {
                ("token_embd", _) => vec![e, v],
                ("position_embd", _) => vec![e, ctx],
                ("attn_qkv", true) => vec![e, 3 * e],
                ("attn_qkv", false) => vec![3 * e],
                ("attn_output", true) => vec![e, e],
                ("ffn_up", true) => vec![e, ff],
                ("ffn_up", false) => vec![ff],
                ("ffn_down", true) => vec![ff, e],
                _ => vec![e],
            };
            assert_eq!(t.dims, dims, "{n}");
            let is_matrix = dims.len() == 2 && n != "position_embd.weight";
            let want = match ftype {
                _ if !is_matrix => F32,
                FileType::F16 => F16,
                FileType::Q8_0 => Q8_0,
                FileType::Q6K => Q6K,
                // use_more_bits(i, 6): n/8 = 0, 7n/8 = 5, (i − 0) % 3 == 2 → layers 2 and 5.
                FileType::Q4KM => q4_k_m_type(n, &[2, 5]),
                FileType::Q5KM => k_mix_type(n, Q5K, Q6K, &[2, 5]),
                FileType::Q5KS => k_mix_type(n, Q5K, Q5K, &[]),
            };
            assert_eq!(t.ty, want, "{ftype} {n}");
        }
    }
}

#[test]
fn f16_file_holds_the_exact_fp16_weights_transposed_where_needed() {
    let out = TempDir::new("f16");
    let files = convert(&tiny(), &[FileType::F16], out.path()).unwrap();
    let g = GgufFile::open(&files[0]).unwrap();
    let src = source_tensors(&tiny());
    for (gname, hname, transposed) in tensor_map(6) {
        let (shape, want) = &src[&hname];
        let got = dequant(&g, &gname);
        assert_eq!(got.len(), want.len(), "{gname}");
        if transposed {
            // HF Conv1D stores [in, out]; GGUF row o holds output o's weights over the inputs.
            let (n_in, n_out) = (shape[0], shape[1]);
            for o in 0..n_out {
                for i in 0..n_in {
                    assert_eq!(got[o * n_in + i], want[i * n_out + o], "{gname} [{o}, {i}]");
                }
            }
        } else {
            assert_eq!(&got, want, "{gname}");
        }
    }
    // One explicit element as a sanity anchor for the transposition: c_fc.weight[3][7] of
    // layer 1 is GGUF ffn_up row 7, column 3.
    let (_, w) = &src["h.1.mlp.c_fc.weight"];
    let up = dequant(&g, "blk.1.ffn_up.weight");
    assert_eq!(up[7 * 256 + 3], w[3 * 1024 + 7]);
    assert_ne!(
        up[7 * 256 + 3],
        up[3 * 256 + 7],
        "transposition must matter for this check"
    );
}

#[test]
fn quantized_files_stay_close_to_the_weights() {
    let out = TempDir::new("close");
    let files = convert(&tiny(), &[FileType::Q8_0, FileType::Q4KM], out.path()).unwrap();
    let src = source_tensors(&tiny());
    // Relative RMS error bounds per type (ggml's own test thresholds are of this order).
    let bound = |t: GgmlType| match t {
        Q8_0 => 0.01,
        Q6K => 0.03,
        Q5K => 0.06,
        Q4K => 0.12,
        _ => 0.0,
    };
    for f in &files {
        let g = GgufFile::open(f).unwrap();
        for (gname, hname, transposed) in tensor_map(6) {
            let t = g.tensor(&gname).unwrap();
            let got = dequant(&g, &gname);
            let (shape, want) = &src[&hname];
            let want: Vec<f32> = if transposed {
                let (n_in, n_out) = (shape[0], shape[1]);
                (0..n_in * n_out)
                    .map(|k| want[(k % n_in) * n_out + k / n_in])
                    .collect()
            } else {
                want.clone()
            };
            let err: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            let rel = if norm == 0.0 {
                err
            } else {
                (err / norm).sqrt()
            };
            assert!(
                rel <= bound(t.ty),
                "{} {gname} {}: relative RMS error {rel}",
                f.display(),
                t.ty
            );
        }
    }
}

#[test]
fn one_pass_equals_separate_runs_and_requantize_equals_convert() {
    let out = TempDir::new("onepass");
    let all = convert(&tiny(), &FileType::ALL, out.path()).unwrap();
    let sep = TempDir::new("sep");
    for (ft, p) in FileType::ALL.iter().zip(&all) {
        let one = convert(&tiny(), &[*ft], &sep.path().join(format!("x-{ft}.gguf"))).unwrap();
        assert_eq!(fs::read(&one[0]).unwrap(), fs::read(p).unwrap(), "{ft}");
    }
    // Requantizing our F16 file (llama-quantize's path) gives the very same files.
    for (ft, p) in FileType::ALL.iter().zip(&all).skip(1) {
        let rq = out.path().join(format!("rq-{ft}.gguf"));
        requantize(&all[0], &rq, *ft, &NoProgress).unwrap();
        assert!(fs::read(&rq).unwrap() == fs::read(p).unwrap(), "{ft}");
        let b = GgufFile::open(&rq).unwrap();
        let keys: Vec<&str> = b.metadata().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            &keys[keys.len() - 2..],
            ["general.quantization_version", "general.file_type"]
        );
        assert_eq!(b.get("general.file_type"), Some(&Value::U32(*ft as u32)));
    }
    // And an F16 → F16 requantization copies every tensor.
    let rq = out.path().join("rq-F16.gguf");
    requantize(&all[0], &rq, FileType::F16, &NoProgress).unwrap();
    let (a, b) = (
        GgufFile::open(&all[0]).unwrap(),
        GgufFile::open(&rq).unwrap(),
    );
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!((&x.name, x.ty), (&y.name, y.ty));
        assert!(a.tensor_data(x) == b.tensor_data(y), "{}", x.name);
    }
}

#[test]
fn requantize_with_duplicate_output_head_and_quantized_inputs() {
    let out = TempDir::new("dup");
    let f16 = convert(&tiny(), &[FileType::F16], out.path())
        .unwrap()
        .remove(0);
    // Rebuild the file the way the Feb-2025 llama.cpp converter wrote it: with output.weight.
    let g = GgufFile::open(&f16).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        w.add_kv(k, v.clone());
    }
    let mut tensors: Vec<_> = g.tensors().to_vec();
    let mut out_w = g.tensor("token_embd.weight").unwrap().clone();
    out_w.name = "output.weight".into();
    tensors.insert(0, out_w);
    for t in &tensors {
        w.add_tensor(&t.name, &t.dims, t.ty).unwrap();
    }
    let dup = out.path().join("dup-F16.gguf");
    let mut bytes = w.header_bytes();
    for t in &tensors {
        let src = g
            .tensor(if t.name == "output.weight" {
                "token_embd.weight"
            } else {
                &t.name
            })
            .unwrap();
        bytes.extend_from_slice(g.tensor_data(src));
        bytes.resize(bytes.len().next_multiple_of(32), 0);
    }
    fs::write(&dup, bytes).unwrap();

    let q = out.path().join("dup-Q4_K_M.gguf");
    requantize(&dup, &q, FileType::Q4KM, &NoProgress).unwrap();
    let r = GgufFile::open(&q).unwrap();
    assert_eq!(r.tensor("token_embd.weight").unwrap().ty, Q4K);
    assert_eq!(r.tensor("output.weight").unwrap().ty, Q6K);
    // llama.cpp order puts output.weight among the non-block tensors, sorted by name.
    let first: Vec<&str> = r.tensors()[..5].iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        first,
        [
            "output.weight",
            "output_norm.bias",
            "output_norm.weight",
            "position_embd.weight",
            "token_embd.weight"
        ]
    );

    // A quantized input is refused when the type would change ...
    let e = requantize(&q, &out.path().join("x.gguf"), FileType::Q8_0, &NoProgress).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("already quantized") && msg.contains("dup-Q4_K_M.gguf"),
        "{msg}"
    );
    assert!(matches!(e, ConvertError::Input(_)), "{e:?}");
    assert!(!out.path().join("x.gguf").exists());
    // ... and copied when it stays the same.
    let same = out.path().join("same.gguf");
    requantize(&q, &same, FileType::Q4KM, &NoProgress).unwrap();
    let s = GgufFile::open(&same).unwrap();
    for t in r.tensors() {
        assert!(
            s.tensor_data(s.tensor(&t.name).unwrap()) == r.tensor_data(t),
            "{}",
            t.name
        );
    }
}

/// Convert and return the error message, checking that nothing but the listed files remain.
fn convert_err(dir: &Path, out: &TempDir) -> (ConvertError, String) {
    let before = out.files();
    let e = convert(dir, &FileType::ALL, out.path()).unwrap_err();
    assert_eq!(
        out.files(),
        before,
        "no output (or temporary) file may be left behind"
    );
    let msg = format!("{e:#}");
    (e, msg)
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_no_output() {
    let out = TempDir::new("bad-out");

    // Truncated shard.
    let d = copy_tiny(&[]);
    let shard = d.path().join("model-00002-of-00002.safetensors");
    let len = fs::metadata(&shard).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    let (e, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("invalid safetensors"),
        "{msg}"
    );
    assert!(matches!(e, ConvertError::Input(_)), "{e:?}");

    // Header offsets beyond the data.
    let d = copy_tiny(&[]);
    let shard = d.path().join("model-00001-of-00002.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let end = (bytes.len() - 8 - n).to_string();
    let bigger = (bytes.len() - 8 - n + 4096).to_string();
    assert_eq!(bigger.len(), end.len(), "keep the header length");
    let patched = header.replace(&format!(",{end}]"), &format!(",{bigger}]"));
    assert_ne!(patched, header);
    bytes[8..8 + n].copy_from_slice(patched.as_bytes());
    fs::write(&shard, &bytes).unwrap();
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("model-00001-of-00002.safetensors") && msg.contains("invalid safetensors"),
        "{msg}"
    );

    // config.json disagreeing with the tensors.
    let d = copy_tiny(&[]);
    let cfg = fs::read_to_string(d.path().join("config.json")).unwrap();
    fs::write(
        d.path().join("config.json"),
        cfg.replace("\"n_inner\": null", "\"n_inner\": 512"),
    )
    .unwrap();
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("h.0.mlp.c_fc.bias") && msg.contains("[1024]") && msg.contains("[512]"),
        "{msg}"
    );
    fs::write(
        d.path().join("config.json"),
        cfg.replace("\"n_layer\": 6", "\"n_layer\": 7"),
    )
    .unwrap();
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("missing tensor h.6.") && msg.contains("blk.6."),
        "{msg}"
    );
    fs::write(
        d.path().join("config.json"),
        cfg.replace("\"n_layer\": 6", "\"n_layer\": 5"),
    )
    .unwrap();
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("transformer.h.5.") && msg.contains("n_layer = 5"),
        "{msg}"
    );
    fs::write(
        d.path().join("config.json"),
        cfg.replace("\"gpt2\"", "\"gpt_neo\""),
    )
    .unwrap();
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("config.json") && msg.contains("gpt_neo"),
        "{msg}"
    );
    fs::write(
        d.path().join("config.json"),
        cfg.replace(
            "\"scale_attn_by_inverse_layer_idx\": false",
            "\"scale_attn_by_inverse_layer_idx\": true",
        ),
    )
    .unwrap();
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("scale_attn_by_inverse_layer_idx: true is not supported"),
        "{msg}"
    );

    // No merges: tokenizer.json gone and merges.txt gone.
    let d = copy_tiny(&["merges.txt", "tokenizer.json"]);
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("merges.txt") && msg.contains("missing"),
        "{msg}"
    );

    // A missing shard.
    let d = copy_tiny(&["model-00001-of-00002.safetensors"]);
    let (_, msg) = convert_err(d.path(), &out);
    assert!(
        msg.contains("model-00001-of-00002.safetensors") && msg.contains("missing"),
        "{msg}"
    );

    // Unwritable output: the output "directory" is a regular file.
    let blocker = out.path().join("not-a-dir");
    fs::write(&blocker, b"x").unwrap();
    let e = convert(&tiny(), &[FileType::F16], &blocker.join("out.gguf")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("not-a-dir/out.gguf") && msg.contains("cannot create"),
        "{msg}"
    );
    assert!(matches!(e, ConvertError::Output(_)), "{e:?}");
    let e = convert(&tiny(), &FileType::ALL, &out.path().join("nowhere")).unwrap_err();
    assert!(format!("{e:#}").contains("nowhere"));
    assert_eq!(out.files(), ["not-a-dir"]);
}

/// Write a small single-file checkpoint with the given tensors (name, dtype, shape, bytes).
fn write_checkpoint(
    dir: &Path,
    cfg: &serde_json::Value,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn small_shape() -> SynthShape {
    SynthShape {
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_ctx: 32,
        vocab_size: 50257,
    }
}

#[test]
fn unsupported_dtype_and_unexpected_tensors_are_named() {
    let out = TempDir::new("dtype-out");
    let d = TempDir::new("dtype");
    let s = small_shape();
    synth(
        &SynthOptions {
            shape: s,
            dtype: SrcDtype::F32,
            seed: 1,
            prefix: true,
            buffers: false,
            lm_head: false,
        },
        d.path(),
        &tiny(),
    )
    .unwrap();
    let bytes = fs::read(d.path().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(d.path().join("config.json")).unwrap()).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    drop(st);

    // An I64 bias.
    let bad = TempDir::new("i64");
    let mut t2 = tensors.clone();
    let b = t2
        .iter_mut()
        .find(|t| t.0 == "transformer.h.1.attn.c_proj.bias")
        .unwrap();
    b.1 = Dtype::I64;
    b.2 = vec![64];
    b.3 = vec![0u8; 64 * 8];
    write_checkpoint(bad.path(), &cfg, t2);
    let (e, msg) = convert_err(bad.path(), &out);
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("transformer.h.1.attn.c_proj.bias")
            && msg.contains("I64"),
        "{msg}"
    );
    assert!(matches!(e, ConvertError::Input(_)), "{e:?}");

    // A tensor that is not part of GPT-2.
    let bad = TempDir::new("extra");
    let mut t2 = tensors.clone();
    t2.push((
        "transformer.h.0.attn.q_proj.weight".into(),
        Dtype::F32,
        vec![2],
        vec![0u8; 8],
    ));
    write_checkpoint(bad.path(), &cfg, t2);
    let (_, msg) = convert_err(bad.path(), &out);
    assert!(
        msg.contains("unexpected tensor transformer.h.0.attn.q_proj.weight"),
        "{msg}"
    );

    // A missing tensor.
    let bad = TempDir::new("missing");
    tensors.retain(|t| t.0 != "transformer.h.1.ln_2.bias");
    write_checkpoint(bad.path(), &cfg, tensors);
    let (_, msg) = convert_err(bad.path(), &out);
    assert!(
        msg.contains("missing tensor h.1.ln_2.bias") && msg.contains("blk.1.ffn_norm.bias"),
        "{msg}"
    );

    // NaN weights are refused (a broken checkpoint should not become a broken GGUF).
    let bad = TempDir::new("nan");
    synth(
        &SynthOptions {
            shape: s,
            dtype: SrcDtype::F32,
            seed: 1,
            prefix: false,
            buffers: false,
            lm_head: false,
        },
        bad.path(),
        &tiny(),
    )
    .unwrap();
    let p = bad.path().join("model.safetensors");
    let mut bytes = fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + n + 40; // inside wte, the first tensor written
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    fs::write(&p, bytes).unwrap();
    let (_, msg) = convert_err(bad.path(), &out);
    assert!(msg.contains("wte.weight") && msg.contains("NaN"), "{msg}");
}

#[test]
fn synthetic_checkpoints_with_original_hf_naming_convert_exactly() {
    let s = small_shape();
    for dtype in [SrcDtype::F32, SrcDtype::BF16] {
        let d = TempDir::new("synth");
        synth(
            &SynthOptions {
                shape: s,
                dtype,
                seed: 42,
                prefix: false,
                buffers: true,
                lm_head: true,
            },
            d.path(),
            &tiny(),
        )
        .unwrap();
        // The synthetic file really has the original naming, buffers and head.
        let src = source_tensors(d.path());
        assert!(src.contains_key("h.0.attn.masked_bias") && src.contains_key("h.1.attn.bias"));
        assert!(
            src.contains_key("lm_head.weight")
                && !src.keys().any(|k| k.starts_with("transformer."))
        );
        assert_eq!(src["lm_head.weight"].1, src["wte.weight"].1, "tied head");
        let (_, w) = &src["wte.weight"];
        let std = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "wte std {std}");
        assert!(src["h.0.ln_1.weight"].1.iter().all(|&v| v == 1.0));

        let out = TempDir::new("synth-out");
        let files = convert(d.path(), &FileType::ALL, out.path()).unwrap();
        let f16 = GgufFile::open(&files[0]).unwrap();
        assert_eq!(
            f16.tensors().len(),
            4 + 2 * 12,
            "buffers and lm_head dropped"
        );
        assert_eq!(f16.get("gpt2.context_length"), Some(&Value::U32(32)));
        for (gname, hname, transposed) in tensor_map(2) {
            let (shape, want) = &src[&hname];
            let got = dequant(&f16, &gname);
            let t = f16.tensor(&gname).unwrap();
            // F32 tensors keep the source exactly; F16 ones are the source rounded to f16.
            let round = |x: f32| {
                if t.ty == F16 {
                    f16::from_f32(x).to_f32()
                } else {
                    x
                }
            };
            for k in 0..got.len() {
                let w = if transposed {
                    let (n_in, n_out) = (shape[0], shape[1]);
                    want[(k % n_in) * n_out + k / n_in]
                } else {
                    want[k]
                };
                assert_eq!(got[k], round(w), "{dtype:?} {gname}[{k}]");
            }
        }
        // n_embd 64 is not a multiple of 256: K-quants fall back as llama-quantize does
        // (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), and the tied output head goes to Q8_0.
        let q4 = GgufFile::open(&files[3]).unwrap();
        for t in q4.tensors() {
            let want = match t.name.as_str() {
                n if !n.ends_with(".weight")
                    || n.contains("norm")
                    || n == "position_embd.weight" =>
                {
                    F32
                }
                // ne0 = 4·64 = 256: a K-quant fits. use_more_bits(i, 2): n/8 = 0, 7n/8 = 1, so
                // only layer 1 gets more bits.
                "blk.0.ffn_down.weight" => Q4K,
                "blk.1.ffn_down.weight" => Q6K,
                "token_embd.weight" => Q8_0,
                n if n.contains("attn_qkv") => Q5_1,
                _ => Q5_0,
            };
            assert_eq!(t.ty, want, "{}", t.name);
        }
        let q6 = GgufFile::open(&files[2]).unwrap();
        assert_eq!(q6.tensor("blk.0.ffn_down.weight").unwrap().ty, Q6K);
        assert_eq!(q6.tensor("blk.0.ffn_up.weight").unwrap().ty, Q8_0);
    }
}

#[test]
fn tokenizer_json_and_vocab_files_agree() {
    // Same model directory, once read through tokenizer.json and once through
    // vocab.json + merges.txt: the metadata must not depend on which files are present.
    let a = TempDir::new("tok-a");
    let b = TempDir::new("tok-b");
    let with_json = convert(&tiny(), &[FileType::Q8_0], a.path()).unwrap();
    let d = copy_tiny(&["tokenizer.json"]);
    let without = convert(d.path(), &[FileType::Q8_0], b.path()).unwrap();
    let (x, y) = (
        GgufFile::open(&with_json[0]).unwrap(),
        GgufFile::open(&without[0]).unwrap(),
    );
    for k in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    ] {
        assert!(x.get(k) == y.get(k), "{k}");
    }
    // Without tokenizer.json the unk name cannot be resolved (as in gguf-py): only bos/eos.
    assert!(y.get("tokenizer.ggml.unknown_token_id").is_none());
    assert_eq!(
        y.get("tokenizer.ggml.bos_token_id"),
        Some(&Value::U32(50256))
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF tensor-data validation with quant's block-format checker

/// A file with an F16 and a Q8_0 tensor; returns its bytes and each tensor's data offset.
fn two_tensors() -> (Vec<u8>, u64, u64) {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::from("gpt2"));
    w.add_tensor("a", &[64], GgmlType::F16).unwrap();
    w.add_tensor("b", &[64, 2], GgmlType::Q8_0).unwrap();
    let mut bytes = Vec::new();
    w.write_header(&mut bytes).unwrap();
    let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.1).sin()).collect();
    let a = ggpt_quant::tensor::quantize(GgmlType::F16, &x[..64], 64).unwrap();
    let b = ggpt_quant::tensor::quantize(GgmlType::Q8_0, &x, 64).unwrap();
    w.write_tensor_data(&mut bytes, 0, &a).unwrap();
    w.write_tensor_data(&mut bytes, 1, &b).unwrap();
    let d = w.data_offset();
    (bytes, d + w.tensors()[0].offset, d + w.tensors()[1].offset)
}

#[test]
fn gguf_validation_with_quant_checker_finds_non_finite_values_and_scales() {
    let (good, a, b) = two_tensors();
    let f = GgufFile::from_bytes(good.clone(), "ok.gguf").unwrap();
    assert!(f.validate_tensor_data(|_| true, validate_row_data).is_ok());

    // NaN in the F16 tensor's 4th value.
    let mut bad = good.clone();
    let at = a as usize + 6;
    bad[at..at + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
    let e = GgufFile::from_bytes(bad, "nan.gguf")
        .unwrap()
        .validate_tensor_data(|_| true, validate_row_data)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nan.gguf") && e.contains("'a'") && e.contains("NaN"),
        "{e}"
    );

    // +inf in the scale d of the Q8_0 tensor's third block (34-byte blocks).
    let mut bad = good;
    let at = b as usize + 2 * 34;
    bad[at..at + 2].copy_from_slice(&0x7c00u16.to_le_bytes());
    let f = GgufFile::from_bytes(bad, "inf.gguf").unwrap();
    let e = f
        .validate_tensor_data(|_| true, validate_row_data)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'b'") && e.contains("inf") && e.contains("block 2"),
        "{e}"
    );
    assert!(f
        .validate_tensor(&f.tensors()[0], validate_row_data)
        .is_ok());
}
