//! `serve --mem-budget`: a budget that makes the server stream part of the weights serves the
//! same greedy completion as no budget; one too small even for streaming stops loading with
//! an error that names the smallest budget that works.

mod common;

use common::{config, model, post, start};
use serde_json::json;

/// (smallest budget that streams, smallest at full speed) for the served config.
fn bounds(label: &str, cfg: &ggpt_serve::ServeConfig) -> (u64, u64) {
    let m = ggpt::model::Model::load(&model(label)).expect("load");
    let needs = ggpt::budget::serving_needs(
        &m,
        cfg.ctx.unwrap() as u64,
        cfg.parallel as u64,
        cfg.prefill_chunk as u64,
        cfg.kv_type.size() as u64,
        rayon::current_num_threads() as u64,
    );
    let layout = ggpt::budget::Layout::of(m.gpt2());
    let p = ggpt::budget::plan(&layout, needs, u64::MAX).unwrap();
    (p.min_budget, p.full_budget)
}

async fn complete(cfg: ggpt_serve::ServeConfig) -> String {
    let s = start(cfg).await;
    let body = json!({"model": "tiny-gpt2-Q8_0", "prompt": "The history of",
        "max_tokens": 16, "temperature": 0});
    let r = post(s.addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    s.shutdown();
    let _ = s.join().await;
    text
}

#[tokio::test]
async fn streamed_server_answers_the_same_and_impossible_budget_is_refused() {
    let cfg = config(&["Q8_0"]);
    let (min, full) = bounds("Q8_0", &cfg);
    assert!(min < full);
    let free = complete(cfg.clone()).await;

    let mut streamed = cfg.clone();
    streamed.mem_budget = Some((min + full) / 2);
    assert_eq!(complete(streamed).await, free);

    let mut tiny = cfg.clone();
    tiny.mem_budget = Some(min - 1);
    let s = ggpt_serve::start(tiny).await.expect("the socket opens");
    let e = s.ready().await.expect_err("loading must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("cannot run this model") && msg.contains("give at least"),
        "{msg}"
    );
    assert_eq!(e.exit_code(), 2);
    s.shutdown();
    let _ = s.join().await;
}
