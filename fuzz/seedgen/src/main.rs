//! Write the seed corpora of the fuzz targets: `ggpt-fuzz-seedgen OUT_DIR` fills
//! `OUT_DIR/<target>/seed-*` with small, valid (or nearly valid) inputs generated here, so no
//! binary corpus is committed. See docs/fuzzing.md.

use std::path::{Path, PathBuf};

use ggpt_gguf::{Array, GgufWriter, Value};
use ggpt_quant::tensor::quantize;
use ggpt_quant::GgmlType;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut n = 0;
    for (target, seeds) in [
        ("gguf_reader", gguf_seeds()),
        ("safetensors_reader", safetensors_seeds()),
        ("tokenizer", tokenizer_seeds(&repo)),
        ("quant_blocks", quant_seeds()),
    ] {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus directory");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("write seed");
            n += 1;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    println!("{n} seeds");
}

fn wave(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * k).sin() * 0.5).collect()
}

/// GGUF bytes from a writer and the data of each tensor (f32 values, quantized to its type).
fn gguf(w: &GgufWriter, data: &[Vec<f32>]) -> Vec<u8> {
    let mut b = Vec::new();
    w.write_header(&mut b).expect("header");
    for (i, (t, x)) in w.tensors().iter().zip(data).enumerate() {
        let q = quantize(t.ty, x, t.dims[0] as usize).expect("quantize seed tensor");
        w.write_tensor_data(&mut b, i, &q).expect("tensor data");
    }
    b
}

/// How a seed's set of tensors relates to what its header declares.
#[derive(Clone, Copy, PartialEq)]
enum TensorSet {
    /// Exactly GPT-2's tensors for `gpt2.block_count`.
    Exact,
    /// Two blocks stored, `gpt2.block_count` = 1.
    MoreBlocksThanDeclared,
    /// An extra tensor `foo.weight` no GPT-2 has.
    Unknown,
    /// `blk.0.ffn_up.bias` left out.
    Missing,
}

/// A complete GPT-2 in miniature: byte-level vocabulary of 256 + a few merges + <|endoftext|>,
/// one layer, C = 32, F = 64, context 4, weights of type `wty`.
fn tiny_gpt2(wty: GgmlType) -> Vec<u8> {
    tiny_gpt2_with(wty, TensorSet::Exact)
}

/// [`tiny_gpt2`] with its tensors changed as `set` says (files the loader must refuse).
fn tiny_gpt2_with(wty: GgmlType, set: TensorSet) -> Vec<u8> {
    let (c, f, t, layers) = (32u64, 64u64, 4u64, 1u64);
    let stored = if set == TensorSet::MoreBlocksThanDeclared {
        layers + 1
    } else {
        layers
    };
    let mut tokens: Vec<String> = Vec::new();
    // GPT-2's byte alphabet: printable bytes map to themselves, the rest to U+0100 + k.
    let mut k = 0;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let ch = if printable {
            char::from_u32(b).unwrap()
        } else {
            k += 1;
            char::from_u32(0xff + k).unwrap()
        };
        tokens.push(ch.to_string());
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|endoftext|>".into());
    let v = tokens.len() as u64;
    let mut types = vec![1i32; tokens.len()];
    *types.last_mut().unwrap() = 3;

    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::from("gpt2"));
    w.add_kv("general.name", Value::from("seed"));
    w.add_kv("gpt2.block_count", Value::U32(layers as u32));
    w.add_kv("gpt2.context_length", Value::U32(t as u32));
    w.add_kv("gpt2.embedding_length", Value::U32(c as u32));
    w.add_kv("gpt2.feed_forward_length", Value::U32(f as u32));
    w.add_kv("gpt2.attention.head_count", Value::U32(2));
    w.add_kv("gpt2.attention.layer_norm_epsilon", Value::F32(1e-5));
    w.add_kv("tokenizer.ggml.model", Value::from("gpt2"));
    w.add_kv("tokenizer.ggml.pre", Value::from("gpt-2"));
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::from(tokens.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    w.add_kv("tokenizer.ggml.token_type", Value::from(types));
    w.add_kv("tokenizer.ggml.merges", Value::from(merges.to_vec()));
    w.add_kv("tokenizer.ggml.eos_token_id", Value::U32(v as u32 - 1));
    let mut data = Vec::new();
    let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64], ty: GgmlType| {
        if set == TensorSet::Missing && name == "blk.0.ffn_up.bias" {
            return;
        }
        w.add_tensor(name, dims, ty).expect("seed tensor");
        let n: u64 = dims.iter().product();
        data.push(wave(n as usize, 0.37 + data.len() as f32 * 0.01));
    };
    add(&mut w, "token_embd.weight", &[c, v], wty);
    add(&mut w, "position_embd.weight", &[c, t], GgmlType::F32);
    add(&mut w, "output_norm.weight", &[c], GgmlType::F32);
    add(&mut w, "output_norm.bias", &[c], GgmlType::F32);
    for i in 0..stored {
        let n = |s: &str| format!("blk.{i}.{s}");
        add(&mut w, &n("attn_norm.weight"), &[c], GgmlType::F32);
        add(&mut w, &n("attn_norm.bias"), &[c], GgmlType::F32);
        add(&mut w, &n("attn_qkv.weight"), &[c, 3 * c], wty);
        add(&mut w, &n("attn_qkv.bias"), &[3 * c], GgmlType::F32);
        add(&mut w, &n("attn_output.weight"), &[c, c], wty);
        add(&mut w, &n("attn_output.bias"), &[c], GgmlType::F32);
        add(&mut w, &n("ffn_norm.weight"), &[c], GgmlType::F32);
        add(&mut w, &n("ffn_norm.bias"), &[c], GgmlType::F32);
        add(&mut w, &n("ffn_up.weight"), &[c, f], wty);
        add(&mut w, &n("ffn_up.bias"), &[f], GgmlType::F32);
        add(&mut w, &n("ffn_down.weight"), &[f, c], wty);
        add(&mut w, &n("ffn_down.bias"), &[c], GgmlType::F32);
    }
    if set == TensorSet::Unknown {
        add(&mut w, "foo.weight", &[c], GgmlType::F32);
    }
    gguf(&w, &data)
}

fn gguf_seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![
        tiny_gpt2(GgmlType::Q8_0),
        tiny_gpt2(GgmlType::F16),
        tiny_gpt2(GgmlType::F32),
        tiny_gpt2_with(GgmlType::Q8_0, TensorSet::MoreBlocksThanDeclared),
        tiny_gpt2_with(GgmlType::Q8_0, TensorSet::Unknown),
        tiny_gpt2_with(GgmlType::Q8_0, TensorSet::Missing),
    ];
    // Every value type, nested arrays, and one small tensor of each block type.
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::from("gpt2"));
    w.add_kv("general.alignment", Value::U32(64));
    w.add_kv("t.u8", Value::U8(7));
    w.add_kv("t.i8", Value::I8(-7));
    w.add_kv("t.u16", Value::U16(700));
    w.add_kv("t.i16", Value::I16(-700));
    w.add_kv("t.i32", Value::I32(-70_000));
    w.add_kv("t.u64", Value::U64(1 << 40));
    w.add_kv("t.i64", Value::I64(-(1 << 40)));
    w.add_kv("t.f64", Value::F64(0.25));
    w.add_kv("t.bool", Value::Bool(true));
    w.add_kv("t.str", Value::from("héllo"));
    w.add_kv("a.f32", Value::from(vec![1.0f32, -2.0]));
    w.add_kv("a.bool", Value::Array(Array::Bool(vec![true, false])));
    w.add_kv(
        "a.nested",
        Value::Array(Array::Array(vec![
            Array::from(vec![1u8, 2]),
            Array::from(vec![3u8]),
        ])),
    );
    let mut data = Vec::new();
    for (i, ty) in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ]
    .into_iter()
    .enumerate()
    {
        let cols = ty.block_size().max(32) as u64;
        w.add_tensor(&format!("t{i}"), &[cols, 2], ty).unwrap();
        data.push(wave(2 * cols as usize, 0.11 * (i + 1) as f32));
    }
    seeds.push(gguf(&w, &data));
    // Header only: no tensors, no metadata.
    seeds.push(gguf(&GgufWriter::new(), &[]));
    seeds
}

fn safetensors(entries: &[(&str, &str, &[usize], Vec<u8>)], metadata: bool) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if metadata {
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let f32s: Vec<u8> = wave(8, 0.3).iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..12u16)
        .flat_map(|i| (0x3c00 + i).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = (0..6u16).flat_map(|i| (0x3f80 + i).to_le_bytes()).collect();
    vec![
        safetensors(
            &[
                ("transformer.wte.weight", "F16", &[3, 4], f16s.clone()),
                ("transformer.h.0.ln_1.bias", "F32", &[8], f32s.clone()),
                ("transformer.h.0.attn.c_attn.weight", "BF16", &[2, 3], bf16s),
            ],
            true,
        ),
        safetensors(&[("ln_f.weight", "F32", &[2, 2, 2], f32s)], false),
        safetensors(&[("x", "I64", &[1], 5i64.to_le_bytes().to_vec())], false),
        safetensors(&[], false),
    ]
}

fn tokenizer_seeds(repo: &Path) -> Vec<Vec<u8>> {
    let vectors =
        std::fs::read_to_string(repo.join("tests/fixtures/tokenizer/gpt2_tokenizer_vectors.jsonl"))
            .expect("tokenizer vectors");
    let mut seeds: Vec<Vec<u8>> = vectors
        .lines()
        .step_by(15)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|j| j["text"].as_str().map(|s| s.as_bytes().to_vec()))
        .collect();
    seeds.push(b"Hello <|endoftext|> world\r\n\t  123 don't".to_vec());
    // Custom vocabularies: 0xff, extra tokens, 0, merges, 0, text.
    seeds.push(b"\xffth\nthe\n\xc4\xa0t\0t h\nth e\0the thing".to_vec());
    seeds.push(b"\xffab\nabc\0a b\nab c\0abcabc ab".to_vec());
    seeds
}

fn quant_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for sel in 0..7u8 {
        let ty = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ][sel as usize];
        let cols = ty.block_size().max(32);
        let q = quantize(ty, &wave(cols, 0.21), cols).unwrap();
        for shape in [0u8, 0x15] {
            let mut s = vec![sel, shape];
            s.extend_from_slice(&q);
            seeds.push(s);
        }
    }
    seeds
}
