//! `ggpt diff` against independent numbers: a model against itself shows zero divergence and
//! no flips; Q4_K_M against F16 on a passage agrees with `ggpt perplexity --kl-base` on the
//! same tokens; every per-token KLD, probability and top-5 equals a plain f64 recomputation
//! from the models' logits; and the JSON has the documented shape (docs/diff.md).

mod common;

use common::{ggpt, repo, run_ggpt, scratch, tiny_model};
use ggpt::model::Model;
use ggpt::session::Session;
use serde_json::Value;
use std::path::Path;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn json_of(args: &[String]) -> Value {
    let out = run_ggpt(args);
    assert!(out.success(), "{}", out.describe());
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// A passage from the bundled model's held-out text (about 130 tokens).
fn passage_file() -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join("models/tiny-gpt2/val.txt")).unwrap();
    let cut: String = text.chars().take(600).collect();
    let path = scratch("diff-passage").join("passage.txt");
    std::fs::write(&path, cut).unwrap();
    path
}

#[test]
fn a_model_against_itself_has_zero_kld_and_no_flips() {
    let f16 = s(&tiny_model("F16"));
    for extra in [vec![], vec!["--seed".to_string(), "11".to_string()]] {
        let mut args: Vec<String> = [
            "diff",
            "-m",
            &f16,
            "-m",
            &f16,
            "-p",
            "The history of",
            "-n",
            "24",
            "--json",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let d = json_of(&args);
        let tokens = d["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 24);
        for t in tokens {
            let m = t["models"].as_array().unwrap();
            assert_eq!(m.len(), 2);
            assert_eq!(m[1]["kld"].as_f64(), Some(0.0), "{t}");
            assert_eq!(m[1]["flip"].as_bool(), Some(false), "{t}");
            assert_eq!(m[0]["p"], m[1]["p"]);
            assert_eq!(m[0]["top"], m[1]["top"]);
        }
        for s in d["summary"].as_array().unwrap() {
            assert_eq!(s["flips"].as_u64(), Some(0));
            assert!(s["first_flip"].is_null());
            assert_eq!(s["mean_kld"].as_f64(), Some(0.0));
        }
        // Greedy decoding: the base's token is its own top-1 at every position.
        if extra.is_empty() {
            assert_eq!(d["decoding"], "greedy");
            for t in tokens {
                assert_eq!(t["id"], t["models"][0]["top"][0]["id"], "{t}");
            }
        } else {
            assert_eq!(d["decoding"], "sampled, seed 11");
        }
    }
}

/// llama-perplexity's percentile index, as `ggpt perplexity` computes it.
fn pct(sorted: &[f32], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64
}

#[test]
fn q4_k_m_against_f16_agrees_with_perplexity_kl_base() {
    let (f16, q4) = (s(&tiny_model("F16")), s(&tiny_model("Q4_K_M")));
    let file = passage_file();
    let d = json_of(&[
        "diff".into(),
        "-m".into(),
        f16.clone(),
        "-m".into(),
        q4.clone(),
        "-f".into(),
        s(&file),
        "--json".into(),
    ]);
    assert_eq!(d["mode"], "passage");
    let tokens = d["tokens"].as_array().unwrap();
    let n = tokens.len();
    assert!(n > 100, "{n} tokens");
    let ctx = (n + 1).to_string();
    let p = json_of(&[
        "perplexity".into(),
        "-m".into(),
        q4,
        "--kl-base".into(),
        f16,
        "-f".into(),
        s(&file),
        "-c".into(),
        ctx,
        "--chunks".into(),
        "1".into(),
        "--score-all".into(),
        "--json".into(),
    ]);
    assert_eq!(p["tokens_scored"].as_u64(), Some(n as u64));
    let kb = &p["kl_base"];
    // perplexity keeps each KLD as f32 for its percentiles; the same here.
    let klds: Vec<f64> = tokens
        .iter()
        .map(|t| t["models"][1]["kld"].as_f64().unwrap())
        .collect();
    let mut sorted: Vec<f32> = klds.iter().map(|&k| k as f32).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mean = sorted.iter().map(|&k| k as f64).sum::<f64>() / n as f64;
    let close = |a: f64, b: &Value, what: &str| {
        let b = b.as_f64().unwrap();
        assert!((a - b).abs() <= 1e-6, "{what}: diff {a} vs perplexity {b}");
    };
    close(mean, &kb["mean_kld"], "mean KLD");
    close(pct(&sorted, 0.5), &kb["median_kld"], "median KLD");
    close(pct(&sorted, 0.99), &kb["p99_kld"], "p99 KLD");
    close(sorted[n - 1] as f64, &kb["max_kld"], "max KLD");
    close(
        d["summary"][1]["max_kld"].as_f64().unwrap(),
        &kb["max_kld"],
        "summary max KLD",
    );
    let flips = d["summary"][1]["flips"].as_u64().unwrap() as f64;
    close(1.0 - flips / n as f64, &kb["same_top"], "top-1 agreement");
    close(
        d["summary"][1]["mean_nll"].as_f64().unwrap(),
        &p["mean_nll"],
        "mean NLL",
    );
    close(
        d["summary"][0]["ppl"].as_f64().unwrap(),
        &kb["base_ppl"],
        "base PPL",
    );
    // Q4_K_M does depart from F16 on this text.
    assert!(mean > 1e-4 && flips >= 1.0, "mean {mean}, flips {flips}");
}

/// Softmax of a logits row in f64, written out plainly.
fn probs(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

#[test]
fn per_token_numbers_match_a_plain_recomputation() {
    let (f16, q8, q4) = (tiny_model("F16"), tiny_model("Q8_0"), tiny_model("Q4_K_M"));
    let d = json_of(&[
        "diff".into(),
        "-m".into(),
        s(&f16),
        "-m".into(),
        s(&q8),
        "-m".into(),
        s(&q4),
        "-p".into(),
        "It was a bright cold day in April, and".into(),
        "-n".into(),
        "20".into(),
        "--seed".into(),
        "3".into(),
        "--json".into(),
    ]);
    let ids: Vec<u32> = d["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .chain(d["tokens"].as_array().unwrap())
        .map(|t| t["id"].as_u64().unwrap() as u32)
        .collect();
    let first = d["prompt"].as_array().unwrap().len();
    let logits = |path: &Path| {
        let m = Model::load(path).unwrap();
        let mut sess = Session::new(&m, ids.len(), 1).unwrap();
        let mut out = Vec::new();
        sess.prefill_all_logits(&ids, &mut out).unwrap();
        (m.hparams().n_vocab as usize, out)
    };
    let (v, base) = logits(&f16);
    for (mi, path) in [&f16, &q8, &q4].into_iter().enumerate() {
        let (_, mine) = logits(path);
        for (i, t) in d["tokens"].as_array().unwrap().iter().enumerate() {
            let row = first + i - 1;
            let p = probs(&base[row * v..(row + 1) * v]);
            let q = probs(&mine[row * v..(row + 1) * v]);
            let kld: f64 = p
                .iter()
                .zip(&q)
                .filter(|(pi, _)| **pi > 0.0)
                .map(|(pi, qi)| pi * (pi / qi).ln())
                .sum();
            let at = &t["models"][mi];
            let got = at["kld"].as_f64().unwrap();
            // The library subtracts the row maximum in f32 (as llama-perplexity does); up to
            // a few 1e-9 nats of difference from this all-f64 sum come from that.
            assert!(
                (got - kld.max(0.0)).abs() < 1e-8,
                "model {mi} token {i}: {got} vs {kld}"
            );
            let id = t["id"].as_u64().unwrap() as usize;
            assert!((at["p"].as_f64().unwrap() - q[id]).abs() < 1e-8);
            // Top-5: the five largest probabilities, in order.
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| q[b].total_cmp(&q[a]).then(a.cmp(&b)));
            let top = at["top"].as_array().unwrap();
            assert_eq!(top.len(), 5);
            for (k, e) in top.iter().enumerate() {
                assert_eq!(
                    e["id"].as_u64(),
                    Some(order[k] as u64),
                    "model {mi} token {i}"
                );
                assert!((e["p"].as_f64().unwrap() - q[order[k]]).abs() < 1e-8);
            }
            let base_top = (0..v)
                .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
                .unwrap();
            assert_eq!(at["flip"].as_bool(), Some(order[0] != base_top));
        }
    }
}

#[test]
fn json_has_the_documented_shape_and_errors_are_clear() {
    let (f16, q6) = (s(&tiny_model("F16")), s(&tiny_model("Q6_K")));
    let d = json_of(&[
        "diff".into(),
        "-m".into(),
        f16.clone(),
        "-m".into(),
        q6.clone(),
        "-p".into(),
        "Hello".into(),
        "-n".into(),
        "4".into(),
        "--json".into(),
    ]);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&d),
        ["decoding", "mode", "models", "prompt", "summary", "tokens"]
    );
    assert_eq!(d["mode"], "generate");
    assert_eq!(
        d["models"],
        serde_json::json!(["tiny-gpt2-F16", "tiny-gpt2-Q6_K"])
    );
    assert_eq!(keys(&d["prompt"][0]), ["id", "text"]);
    assert_eq!(d["prompt"][0]["text"], "Hello");
    let t = &d["tokens"][0];
    assert_eq!(keys(t), ["id", "models", "position", "text"]);
    assert_eq!(t["position"].as_u64(), Some(1));
    assert_eq!(keys(&t["models"][0]), ["flip", "kld", "p", "top"]);
    assert_eq!(keys(&t["models"][0]["top"][0]), ["id", "p", "text"]);
    assert_eq!(
        keys(&d["summary"][0]),
        [
            "first_flip",
            "flips",
            "max_kld",
            "mean_kld",
            "mean_nll",
            "model",
            "ppl"
        ]
    );
    // The terminal view without colour (stdout is a pipe): the summary names every model.
    let out = run_ggpt(&["diff", "-m", &f16, "-m", &q6, "-p", "Hello", "-n", "4"]);
    assert!(out.success(), "{}", out.describe());
    assert!(
        !out.stdout.contains('\x1b'),
        "ANSI codes on a pipe: {:?}",
        out.stdout
    );
    assert!(out.stdout.starts_with("Hello"));
    assert!(out.stdout.contains("tiny-gpt2-Q6_K") && out.stdout.contains("mean KLD"));
    // Bad requests: one model, a prompt beyond the context.
    let one = run_ggpt(&["diff", "-m", &f16, "-p", "Hi"]);
    assert_eq!(one.code(), Some(2), "{}", one.describe());
    let long = run_ggpt(&["diff", "-m", &f16, "-m", &q6, "-p", "Hi", "-n", "5000"]);
    assert_eq!(long.code(), Some(2), "{}", long.describe());
    assert!(
        long.stderr.contains("5000") && long.stderr.contains("context"),
        "{}",
        long.stderr
    );
    let _ = ggpt();
}
