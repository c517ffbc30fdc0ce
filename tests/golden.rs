//! The forward pass against PyTorch: models/tiny-gpt2/golden.json holds transformers' float32
//! outputs for four prompts (per-position argmax and logsumexp, last-position top-10 logits,
//! a 32-token greedy continuation). ggpt converts the same checkpoint itself (once per test
//! binary) and must reproduce them; the quantized files are checked for argmax agreement with
//! ggpt's own F16 on WikiText-2.
//!
//! Prompts are fed as golden.json's `input_ids`, so these tests do not depend on the
//! tokenizer (except the WikiText one, which tokenizes text).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ggpt::model::{KvType, Model};
use ggpt::session::Session;
use ggpt_convert::pipeline::{convert_hf, ConvertOptions, NoProgress};
use ggpt_convert::policy::FileType;
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny model converted to every type, once per test binary.
fn model_path(ty: FileType) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("golden-models");
        std::fs::create_dir_all(&dir).expect("create test model dir");
        let opts = ConvertOptions {
            hf_dir: repo().join("models/tiny-gpt2"),
            types: FileType::ALL.to_vec(),
            output: Some(dir.clone()),
            name: Some("tiny-gpt2".to_string()),
        };
        convert_hf(&opts, &NoProgress).expect("convert models/tiny-gpt2");
        dir
    });
    dir.join(format!("tiny-gpt2-{}.gguf", ty.label()))
}

fn load(ty: FileType) -> Model {
    Model::load(&model_path(ty)).expect("load converted model")
}

struct Prompt {
    name: String,
    ids: Vec<u32>,
    argmax: Vec<usize>,
    logsumexp: Vec<f64>,
    top10_ids: Vec<usize>,
    top10_logits: Vec<f64>,
    greedy: Vec<u32>,
}

fn prompts() -> Vec<Prompt> {
    let text = std::fs::read_to_string(repo().join("models/tiny-gpt2/golden.json")).unwrap();
    let g: Value = serde_json::from_str(&text).unwrap();
    let nums = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Prompt {
            name: p["name"].as_str().unwrap().to_string(),
            ids: nums(&p["input_ids"]).iter().map(|&x| x as u32).collect(),
            argmax: nums(&p["per_position"]["argmax"])
                .iter()
                .map(|&x| x as usize)
                .collect(),
            logsumexp: nums(&p["per_position"]["logsumexp"]),
            top10_ids: nums(&p["last_position"]["top10_ids"])
                .iter()
                .map(|&x| x as usize)
                .collect(),
            top10_logits: nums(&p["last_position"]["top10_logits"]),
            greedy: nums(&p["greedy"]["new_ids"])
                .iter()
                .map(|&x| x as u32)
                .collect(),
        })
        .collect()
}

/// Index of the largest logit; ties go to the lowest id (as torch.argmax does).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// Per-prompt comparison with PyTorch at every position; returns the worst |Δ| of the
/// logsumexp and of the last position's top-10 logits over all prompts.
fn compare_with_pytorch(kv: KvType) -> (f64, f64) {
    let model = load(FileType::F16);
    let v = model.hparams().n_vocab as usize;
    let (mut worst_lse, mut worst_top) = (0.0f64, 0.0f64);
    let mut logits = Vec::new();
    for p in prompts() {
        let mut s = Session::with_kv_type(&model, 512, 1, kv).unwrap();
        s.prefill_all_logits(&p.ids, &mut logits).unwrap();
        assert_eq!(logits.len(), p.ids.len() * v);
        for (t, row) in logits.chunks_exact(v).enumerate() {
            assert_eq!(
                argmax(row),
                p.argmax[t],
                "{}: argmax at position {t}",
                p.name
            );
            worst_lse = worst_lse.max((logsumexp(row) - p.logsumexp[t]).abs());
        }
        let last = &logits[(p.ids.len() - 1) * v..];
        for (&id, &want) in p.top10_ids.iter().zip(&p.top10_logits) {
            worst_top = worst_top.max((last[id] as f64 - want).abs());
        }
    }
    eprintln!(
        "KV {kv}: max |Δ logsumexp| = {worst_lse:.2e}, max |Δ top-10 logit| = {worst_top:.2e}"
    );
    (worst_lse, worst_top)
}

#[test]
fn f16_with_f16_kv_cache_matches_pytorch() {
    // llama.cpp's default cache type. Rounding K and V to f16 moves logits by ~1e-3.
    let (lse, top) = compare_with_pytorch(KvType::F16);
    assert!(top <= 2e-3, "top-10 logits differ by {top:e}");
    assert!(lse <= 4e-3, "logsumexp differs by {lse:e}");
}

#[test]
fn f16_with_f32_kv_cache_matches_pytorch_tightly() {
    // With an f32 cache the only differences from PyTorch are summation order: ~1e-5.
    let (lse, top) = compare_with_pytorch(KvType::F32);
    assert!(top <= 1e-4, "top-10 logits differ by {top:e}");
    assert!(lse <= 1e-4, "logsumexp differs by {lse:e}");
}

/// Greedy continuation with the KV cache (prefill, then one decode per token).
fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = Session::new(model, 512, 1).unwrap();
    let mut next = argmax(s.prefill(prompt).unwrap()) as u32;
    let mut out = vec![next];
    while out.len() < n {
        next = argmax(s.decode(next).unwrap()) as u32;
        out.push(next);
    }
    out
}

#[test]
fn f16_greedy_continuations_match_pytorch() {
    let model = load(FileType::F16);
    for p in prompts() {
        assert_eq!(
            greedy(&model, &p.ids, p.greedy.len()),
            p.greedy,
            "{}",
            p.name
        );
    }
}

#[test]
fn q8_0_greedy_continuations_match_on_most_prompts() {
    let model = load(FileType::Q8_0);
    let ps = prompts();
    let same: Vec<bool> = ps
        .iter()
        .map(|p| greedy(&model, &p.ids, p.greedy.len()) == p.greedy)
        .collect();
    eprintln!("Q8_0 greedy identical: {same:?}");
    assert!(same.iter().filter(|&&x| x).count() >= 3, "{same:?}");
}

/// Per-position argmax over `tokens` in windows of `window`, each from an empty context.
fn window_argmaxes(model: &Model, tokens: &[u32], window: usize) -> Vec<usize> {
    let v = model.hparams().n_vocab as usize;
    let mut s = Session::new(model, window, 1).unwrap();
    let mut logits = Vec::new();
    let mut out = Vec::with_capacity(tokens.len());
    for w in tokens.chunks(window) {
        s.reset();
        s.prefill_all_logits(w, &mut logits).unwrap();
        out.extend(logits.chunks_exact(v).map(argmax));
    }
    out
}

#[test]
fn quantized_argmax_agrees_with_f16_on_wikitext() {
    const N_TOKENS: usize = 4096;
    const WINDOW: usize = 512;
    let f16 = load(FileType::F16);
    let text =
        std::fs::read_to_string(repo().join("tests/fixtures/text/wikitext-2-test.txt")).unwrap();
    let mut tokens = f16.tokenizer().encode(&text);
    assert!(tokens.len() >= N_TOKENS);
    tokens.truncate(N_TOKENS);
    let reference = window_argmaxes(&f16, &tokens, WINDOW);
    // Measured on this checkpoint: Q8_0 4016/4096 (98.05 %), Q6_K 3924 (95.80 %), Q4_K_M 3746
    // (91.46 %). The thresholds sit just below (the issue asked for at least 97.5/95/88 %).
    for (ty, min) in [
        (FileType::Q8_0, 0.977),
        (FileType::Q6K, 0.955),
        (FileType::Q4KM, 0.91),
    ] {
        let got = window_argmaxes(&load(ty), &tokens, WINDOW);
        let same = got.iter().zip(&reference).filter(|(a, b)| a == b).count();
        let rate = same as f64 / N_TOKENS as f64;
        eprintln!(
            "{}: argmax agreement with F16 {same}/{N_TOKENS} = {:.2} %",
            ty.label(),
            rate * 100.0
        );
        assert!(rate >= min, "{}: {rate} < {min}", ty.label());
    }
}
