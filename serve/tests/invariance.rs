//! Batch invariance: a seeded request's tokens and logprobs are bit-identical whether it runs
//! alone, amid 7 concurrent requests (in whatever slot is free, sharing every step with
//! them), or with its prompt split over several steps; for all four formats.
//!
//! Everything the server adds (slots, chunked prefill, attention per sequence, the output
//! rows, per-request samplers) is batch-invariant by construction. The weight matmuls are
//! only invariant if their per-row results do not depend on how many tokens share a call;
//! the server turns on `ggpt_quant::matmul::set_batch_invariant`, and this file checks the
//! whole path with the machine's own (SIMD) kernels.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The request under test: sampled (not greedy), with the 5 best alternatives per token.
fn probe(model: &str) -> Value {
    json!({
        "model": model,
        "prompt": "In the beginning the universe was created. This has made a lot of people very angry",
        "max_tokens": 24,
        "temperature": 0.9,
        "seed": 1234,
        "logprobs": 5,
        "logit_bias": {"50256": -100},
    })
}

/// Tokens, their logprobs and the alternatives, exactly as sent.
fn fingerprint(v: &Value) -> (Value, Value, Value) {
    let lp = &v["choices"][0]["logprobs"];
    assert!(
        lp["tokens"].as_array().is_some_and(|t| t.len() == 24),
        "{v}"
    );
    (
        lp["tokens"].clone(),
        lp["token_logprobs"].clone(),
        lp["top_logprobs"].clone(),
    )
}

async fn alone(chunk: usize, model: &str) -> (Value, Value, Value) {
    let mut cfg = config(&[model]);
    cfg.parallel = 8;
    cfg.prefill_chunk = chunk;
    let s = start(cfg).await;
    let r = post(
        s.addr,
        "/v1/completions",
        &probe(&format!("tiny-gpt2-{model}")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    s.shutdown();
    s.join().await.unwrap();
    fingerprint(&r.json())
}

async fn amid_others(model: &str) -> (Value, Value, Value) {
    let name = format!("tiny-gpt2-{model}");
    let mut cfg = config(&[model]);
    cfg.parallel = 8;
    cfg.prefill_chunk = 16;
    let s = start(cfg).await;
    let addr = s.addr;
    let prompts = [
        "Hello",
        "The quick brown fox jumps over the lazy dog and keeps running far away",
        "Once upon a time",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18",
        "Dear Sir,",
        "It was the best of times, it was the worst of times",
        "import numpy as np",
    ];
    let others: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let body = json!({"model": name, "prompt": p, "max_tokens": 40 + 7 * i, "seed": i,
                "temperature": 1.0, "stream": i % 2 == 0, "logit_bias": {"50256": -100}});
            tokio::spawn(async move { post(addr, "/v1/completions", &body).await })
        })
        .collect();
    // Join while the others are prefilling and decoding.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = post(addr, "/v1/completions", &probe(&name)).await;
    for o in others {
        assert_eq!(o.await.unwrap().status, 200);
    }
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The step-size histogram shows steps that batched several sequences.
    let m = String::from_utf8(http(addr, "GET", "/metrics", &[], b"").await.body).unwrap();
    let multi = metric(&m, "ggpt_step_sequences_count").unwrap()
        - metric(&m, "ggpt_step_sequences_bucket{le=\"1\"}").unwrap();
    assert!(multi > 10.0, "few batched steps:\n{m}");
    s.shutdown();
    s.join().await.unwrap();
    fingerprint(&r.json())
}

async fn check(model: &str) {
    let reference = alone(256, model).await;
    let split = alone(3, model).await;
    assert_eq!(
        reference, split,
        "{model}: prompt in one step vs in chunks of 3"
    );
    let busy = amid_others(model).await;
    assert_eq!(reference, busy, "{model}: alone vs amid 7 others");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_is_batch_invariant() {
    check("F16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q8_0_is_batch_invariant() {
    check("Q8_0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q6_k_is_batch_invariant() {
    check("Q6_K").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q4_k_m_is_batch_invariant() {
    check("Q4_K_M").await;
}
