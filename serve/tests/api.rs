//! The server end to end, in process on an ephemeral port, against the bundled tiny GPT-2:
//! completions in every mode, streaming, stop strings, UTF-8, every 4xx, auth, backpressure,
//! cancellation, shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const M: &str = "tiny-gpt2-F16";

fn text(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

/// Streamed `text` pieces of choice 0 and its finish reason.
fn stream_pieces(r: &Reply) -> (Vec<String>, Option<String>, Option<Value>) {
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut pieces = Vec::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
        }
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["text"].as_str() {
                pieces.push(t.to_string());
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (pieces, finish, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_plain_seeded_streamed_n_logprobs_echo() {
    let s = start(config(&[M])).await;
    let a = s.addr;

    // Plain, seeded: the same seed gives the same text; usage and finish_reason are set.
    let req = json!({"model": M, "prompt": "The quick brown fox", "max_tokens": 12, "seed": 7});
    let r1 = post(a, "/v1/completions", &req).await;
    assert_eq!(r1.status, 200, "{}", String::from_utf8_lossy(&r1.body));
    let v1 = r1.json();
    let v2 = post(a, "/v1/completions", &req).await.json();
    assert_eq!(text(&v1, 0), text(&v2, 0));
    assert_eq!(v1["object"], "text_completion");
    assert_eq!(v1["choices"][0]["finish_reason"], "length");
    assert_eq!(v1["usage"]["completion_tokens"], 12);
    assert_eq!(v1["usage"]["prompt_tokens"], 4);
    assert_eq!(v1["usage"]["total_tokens"], 16);

    // Streamed: the pieces add up to the same text, then [DONE]; usage on request.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let r = post(a, "/v1/completions", &sreq).await;
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let (pieces, finish, usage) = stream_pieces(&r);
    assert_eq!(pieces.concat(), text(&v1, 0));
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(usage.unwrap()["completion_tokens"], 12);

    // n > 1 and several prompts: prompt-major choices, each seeded seed + j.
    let v = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": ["The quick brown fox", "Hello"], "n": 2, "max_tokens": 12, "seed": 7}),
    )
    .await
    .json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_eq!(
        text(&v, 0),
        text(&v1, 0),
        "choice 0 of prompt 0 uses the seed itself"
    );
    assert_ne!(text(&v, 0), text(&v, 1), "choices of one prompt differ");
    // 12 tokens per choice unless one hit end-of-text first.
    let all_length = choices.iter().all(|c| c["finish_reason"] == "length");
    let used = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(if all_length { used == 48 } else { used < 48 }, "{v}");

    // Greedy with logprobs: the chosen token is the top-1 alternative, logprobs ≤ 0.
    let v = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": "Hello, my name is", "max_tokens": 6, "temperature": 0, "logprobs": 3}),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    let toks = lp["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), 6);
    for (i, t) in toks.iter().enumerate() {
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3);
        let best = top
            .iter()
            .max_by(|x, y| x.1.as_f64().partial_cmp(&y.1.as_f64()).unwrap())
            .unwrap();
        assert_eq!(best.0, t.as_str().unwrap());
        let l = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(l <= 0.0 && (l - best.1.as_f64().unwrap()).abs() < 1e-6);
    }
    assert_eq!(
        toks.iter().map(|t| t.as_str().unwrap()).collect::<String>(),
        text(&v, 0)
    );

    // Echo with logprobs and max_tokens 0 (lm-eval's loglikelihood): the prompt back, a null
    // for its first token and a logprob for every other one.
    let v = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": "The cat sat on the mat", "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(text(&v, 0), "The cat sat on the mat");
    let lp = &v["choices"][0]["logprobs"];
    let l = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(l.len(), 6);
    assert!(l[0].is_null());
    assert!(l[1..].iter().all(|x| x.as_f64().unwrap() < 0.0));
    assert_eq!(lp["text_offset"], json!([0, 3, 7, 11, 14, 18]));
    assert_eq!(v["usage"]["completion_tokens"], 0);

    // Echo's prompt logprobs equal the logprobs of the same tokens when generated: the
    // prompt "Hello, my name is" + its greedy continuation, scored by echo.
    let g = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": "Hello, my name is", "max_tokens": 4, "temperature": 0, "logprobs": 1}),
    )
    .await
    .json();
    let full = format!("Hello, my name is{}", text(&g, 0));
    let e = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": full, "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await
    .json();
    let gen_lp = g["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    let echo_lp = e["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    let tail = &echo_lp[echo_lp.len() - gen_lp.len()..];
    for (x, y) in gen_lp.iter().zip(tail) {
        // Different batch shapes (one prompt vs decode steps): equal to float tolerance.
        assert!(
            (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-3,
            "{gen_lp:?} vs {tail:?}"
        );
    }

    // Token-id prompts work like their text.
    let ids = post(
        a,
        "/tokenize",
        &json!({"model": M, "content": "The quick brown fox"}),
    )
    .await
    .json();
    let mut treq = req.clone();
    treq["prompt"] = ids["tokens"].clone();
    assert_eq!(
        text(&post(a, "/v1/completions", &treq).await.json(), 0),
        text(&v1, 0)
    );
    let d = post(a, "/detokenize", &json!({"tokens": ids["tokens"]}))
        .await
        .json();
    assert_eq!(d["content"], "The quick brown fox");

    s.shutdown();
    s.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_spanning_tokens_streamed_and_not() {
    let s = start(config(&[M])).await;
    let a = s.addr;
    let base = json!({"model": M, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "logprobs": 1});
    let v = post(a, "/v1/completions", &base).await.json();
    let full = text(&v, 0);
    let toks: Vec<String> = v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    // A stop string made of the end of token 3 and the start of token 5 (spans 3 tokens).
    assert!(
        toks.len() >= 8 && toks[3].len() >= 2 && !toks[5].is_empty(),
        "{toks:?}"
    );
    let stop = format!("{}{}{}", &toks[3][1..], toks[4], &toks[5][..1]);
    let before: String = toks[..3].concat() + &toks[3][..1];
    assert!(full.starts_with(&before));
    assert_eq!(
        full.find(&stop),
        Some(before.len()),
        "the stop string occurs first here"
    );

    let mut req = base.clone();
    req["stop"] = json!(["never-appears", stop]);
    let v = post(a, "/v1/completions", &req).await.json();
    assert_eq!(text(&v, 0), before);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Tokens up to the one that completed the stop string are counted.
    assert_eq!(v["usage"]["completion_tokens"], 6);

    req["stream"] = json!(true);
    let r = post(a, "/v1/completions", &req).await;
    let (pieces, finish, _) = stream_pieces(&r);
    assert_eq!(pieces.concat(), before);
    assert_eq!(finish.as_deref(), Some("stop"));
    // Nothing of the stop string was ever sent, even while the match was partial.
    assert!(pieces.iter().all(|p| !p.contains(&toks[4])), "{pieces:?}");
    s.shutdown();
    s.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_split_across_tokens_is_streamed_whole() {
    let s = start(config(&[M])).await;
    // Token 30325 is " \xF0\x9F\x98" and 222 is "\x80": together " 😀". Both biased up and
    // a strong repetition penalty make greedy decoding alternate between them.
    let req = json!({"model": M, "prompt": "Smile", "max_tokens": 4, "temperature": 0,
        "repeat_penalty": 10, "logit_bias": {"30325": 100, "222": 100}});
    let v = post(s.addr, "/v1/completions", &req).await.json();
    let full = text(&v, 0);
    assert!(full.contains(" 😀"), "{full:?}");
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (pieces, _, _) = stream_pieces(&post(s.addr, "/v1/completions", &sreq).await);
    assert_eq!(pieces.concat(), full);
    // The piece holding the emoji's first three bytes carried only the space; the emoji
    // arrived whole with the token that completed it.
    let i = pieces
        .iter()
        .position(|p| p.contains('😀'))
        .expect("emoji piece");
    assert!(i > 0 && pieces[i - 1].ends_with(' '), "{pieces:?}");
    assert!(
        pieces
            .iter()
            .all(|p| !p.starts_with('\u{fffd}') || p.len() == 3),
        "{pieces:?}"
    );
    s.shutdown();
    s.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_4xx_in_openai_shape() {
    let mut cfg = config(&[M]);
    cfg.body_limit = 4096;
    let s = start(cfg).await;
    let a = s.addr;
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (
            json!({"model": "nope", "prompt": "a"}),
            404,
            Some("model"),
            "nope",
        ),
        (json!({"prompt": "a"}), 400, Some("model"), "required"),
        (
            json!({"model": M, "prompt": "a", "max_tokens": "5"}),
            400,
            Some("max_tokens"),
            "integer",
        ),
        (
            json!({"model": M, "prompt": "a", "temperature": 3}),
            400,
            Some("temperature"),
            "between 0 and 2",
        ),
        (
            json!({"model": M, "prompt": "a", "top_p": 0}),
            400,
            Some("top_p"),
            "greater than 0",
        ),
        (
            json!({"model": M, "prompt": "a", "n": 0}),
            400,
            Some("n"),
            "between 1",
        ),
        (
            json!({"model": M, "prompt": "a", "logprobs": 6}),
            400,
            Some("logprobs"),
            "between 0 and 5",
        ),
        (
            json!({"model": M, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}),
            400,
            Some("stop"),
            "at most 4",
        ),
        (
            json!({"model": M, "prompt": "a", "suffix": "x"}),
            400,
            Some("suffix"),
            "not supported",
        ),
        (
            json!({"model": M, "prompt": "a", "best_of": 3}),
            400,
            Some("best_of"),
            "not supported",
        ),
        (
            json!({"model": M, "prompt": [1, 99999]}),
            400,
            Some("prompt"),
            "prompt[1]",
        ),
        (
            json!({"model": M, "prompt": ""}),
            400,
            Some("prompt"),
            "empty",
        ),
        (
            json!({"model": M, "prompt": 5}),
            400,
            Some("prompt"),
            "string or an array",
        ),
        (
            json!({"model": M, "prompt": "a", "logit_bias": {"x": 1}}),
            400,
            Some("logit_bias"),
            "token id",
        ),
        (
            json!({"model": M, "prompt": "a", "stream": "yes"}),
            400,
            Some("stream"),
            "boolean",
        ),
        (
            json!({"model": M, "prompt": "a", "seed": 1.5}),
            400,
            Some("seed"),
            "64-bit",
        ),
        (
            json!({"model": M, "prompt": "hello world", "max_tokens": 300}),
            400,
            Some("prompt"),
            "256 tokens",
        ),
    ];
    for (body, status, param, needle) in cases {
        let r = post(a, "/v1/completions", &body).await;
        let (st, p, msg) = r.error();
        assert_eq!(st, status, "{body}: {msg}");
        assert_eq!(p.as_deref(), param, "{body}: {msg}");
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    // Context overflow names both counts.
    let (_, _, msg) = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": "hello world", "max_tokens": 300}),
    )
    .await
    .error();
    assert!(
        msg.contains("2 in the prompt") && msg.contains("300 for the completion"),
        "{msg}"
    );
    // Not JSON, not UTF-8, not an object.
    for (body, needle) in [
        (&b"{\"model\": "[..], "not valid JSON"),
        (&b"{\"model\": \"\xff\xfe\"}"[..], "not valid UTF-8"),
        (&b"[1, 2]"[..], "JSON object"),
    ] {
        let (st, _, msg) = http(a, "POST", "/v1/completions", &[], body).await.error();
        assert_eq!(st, 400);
        assert!(msg.contains(needle), "{msg}");
    }
    // Too big: 413 in OpenAI shape.
    let big = json!({"model": M, "prompt": "x".repeat(8000)});
    let (st, _, msg) = post(a, "/v1/completions", &big).await.error();
    assert_eq!(st, 413);
    assert!(msg.contains("4096"), "{msg}");
    // Unknown route and wrong method.
    assert_eq!(http(a, "GET", "/v2/nothing", &[], b"").await.error().0, 404);
    assert_eq!(
        http(a, "GET", "/v1/completions", &[], b"").await.error().0,
        405
    );
    // Chat and embeddings refuse their bad fields too.
    let (st, p, _) = post(
        a,
        "/v1/chat/completions",
        &json!({"model": M, "messages": [{"role": "robot", "content": "x"}]}),
    )
    .await
    .error();
    assert_eq!((st, p.as_deref()), (400, Some("messages[0].role")));
    let (st, p, _) = post(
        a,
        "/v1/embeddings",
        &json!({"model": M, "input": "x", "encoding_format": "hex"}),
    )
    .await
    .error();
    assert_eq!((st, p.as_deref()), (400, Some("encoding_format")));
    // The metrics count them by status.
    let m = String::from_utf8(http(a, "GET", "/metrics", &[], b"").await.body).unwrap();
    assert!(
        metric(
            &m,
            "ggpt_requests_total{endpoint=\"/v1/completions\",status=\"400\"}"
        )
        .unwrap()
            >= 18.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "ggpt_requests_total{endpoint=\"/v1/completions\",status=\"413\"}"
        ),
        Some(1.0)
    );
    s.shutdown();
    s.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_except_for_health() {
    let mut cfg = config(&[M]);
    cfg.api_key = Some("sekret-key".into());
    let s = start(cfg).await;
    let a = s.addr;
    let body = json!({"model": M, "prompt": "a", "max_tokens": 1}).to_string();
    let r = http(a, "POST", "/v1/completions", &[], body.as_bytes()).await;
    assert_eq!(r.error().0, 401);
    assert!(r.error().2.contains("missing"));
    let r = http(
        a,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer sekret-kez")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.error().0, 401);
    let r = http(
        a,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer sekret-key")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(http(a, "GET", "/v1/models", &[], b"").await.status, 401);
    assert_eq!(http(a, "GET", "/health", &[], b"").await.status, 200);
    // The page's static files are public (the page asks for the key); its data is not.
    assert_eq!(http(a, "GET", "/", &[], b"").await.status, 200);
    assert_eq!(http(a, "GET", "/app.js", &[], b"").await.status, 200);
    let diff = json!({"models": [M], "prompt": "a", "max_tokens": 1}).to_string();
    assert_eq!(
        http(a, "POST", "/v1/diff", &[], diff.as_bytes())
            .await
            .status,
        401
    );
    s.shutdown();
    s.join().await.unwrap();
}

/// Read a streaming response until its first data event, then return the open socket.
async fn open_stream(addr: std::net::SocketAddr, body: &Value) -> tokio::net::TcpStream {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(&request_bytes(
        "POST",
        "/v1/completions",
        &[],
        body.to_string().as_bytes(),
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: {") {
        let n = tokio::time::timeout(Duration::from_secs(20), sock.read(&mut buf))
            .await
            .expect("first event within 20 s")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    sock
}

async fn busy_slots(addr: std::net::SocketAddr) -> f64 {
    let m = String::from_utf8(http(addr, "GET", "/metrics", &[], b"").await.body).unwrap();
    metric(&m, "ggpt_busy_slots").unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_slot_and_a_full_queue_says_503() {
    let mut cfg = config(&[M]);
    cfg.parallel = 1;
    cfg.max_queue = 0;
    cfg.ctx = Some(1024);
    let s = start(cfg).await;
    let a = s.addr;
    let long = json!({"model": M, "prompt": "Tell me a story", "max_tokens": 1000, "stream": true,
        "seed": 1, "logit_bias": {"50256": -100}});
    let sock = open_stream(a, &long).await;
    assert_eq!(busy_slots(a).await, 1.0);

    // The only slot is taken and the queue holds nothing: 503 with Retry-After.
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.error().0, 503);
    assert_eq!(r.header("retry-after"), Some("1"));

    // The client goes away mid-stream: the slot is free within a second.
    drop(sock);
    let t = Instant::now();
    while busy_slots(a).await != 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "slot still busy after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Cut short: far fewer than the 1000 tokens asked for were generated.
    let m = String::from_utf8(http(a, "GET", "/metrics", &[], b"").await.body).unwrap();
    assert!(
        metric(&m, "ggpt_generated_tokens_total").unwrap() < 1000.0,
        "{m}"
    );
    // And the next request gets it.
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": M, "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200);
    s.shutdown();
    s.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_a_final_event() {
    let s = start(config(&[M])).await;
    let a = s.addr;
    let mut sock = open_stream(
        a,
        &json!({"model": M, "prompt": "Tell me a story", "max_tokens": 250, "stream": true, "seed": 1, "logit_bias": {"50256": -100}}),
    )
    .await;
    s.shutdown();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut rest))
        .await
        .expect("the stream ends within 10 s")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("shutting down"), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    tokio::time::timeout(Duration::from_secs(10), s.join())
        .await
        .expect("the server stops within 10 s")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_embeddings_models_health_metrics() {
    let s = start(config(&[M, "Q4_K_M"])).await;
    let a = s.addr;
    assert_eq!(
        http(a, "GET", "/health", &[], b"").await.json()["status"],
        "ok"
    );
    let m = http(a, "GET", "/v1/models", &[], b"").await.json();
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [M, "tiny-gpt2-Q4_K_M"]);
    assert!(m["data"][0]["meta"]["chat_template"]
        .as_str()
        .unwrap()
        .contains("Assistant:"));

    let v = post(a, "/v1/chat/completions", &json!({"model": "tiny-gpt2-Q4_K_M",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        "max_tokens": 8, "seed": 3, "logprobs": true, "top_logprobs": 2})).await.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // "System: Be brief.\nUser: Hi there\nAssistant:" tokenized.
    let p = post(
        a,
        "/tokenize",
        &json!({"model": M, "content": "System: Be brief.\nUser: Hi there\nAssistant:"}),
    )
    .await
    .json();
    assert_eq!(v["usage"]["prompt_tokens"], p["count"]);
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);

    // Embeddings: float and base64 are the same vector; mean-pooled, n_embd long.
    let f = post(
        a,
        "/v1/embeddings",
        &json!({"model": M, "input": ["hello world", "x"]}),
    )
    .await
    .json();
    let b = post(
        a,
        "/v1/embeddings",
        &json!({"model": M, "input": ["hello world", "x"], "encoding_format": "base64"}),
    )
    .await
    .json();
    let fv: Vec<f32> = f["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(fv.len(), 256);
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let bv: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(fv, bv);
    assert_eq!(f["usage"]["prompt_tokens"], 3);
    assert_ne!(f["data"][0]["embedding"], f["data"][1]["embedding"]);

    let m = String::from_utf8(http(a, "GET", "/metrics", &[], b"").await.body).unwrap();
    for name in [
        "ggpt_prompt_tokens_total",
        "ggpt_generated_tokens_total",
        "ggpt_queue_depth",
        "ggpt_busy_slots",
        "ggpt_rss_bytes",
        "ggpt_step_tokens_bucket",
        "ggpt_time_to_first_token_seconds_bucket",
        "ggpt_inter_token_latency_seconds_bucket",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert_eq!(metric(&m, "ggpt_slots"), Some(8.0));
    assert!(metric(&m, "ggpt_rss_bytes").unwrap() > 1e6);
    s.shutdown();
    s.join().await.unwrap();
}
