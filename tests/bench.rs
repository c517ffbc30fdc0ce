//! `ggpt bench` takes llama-bench's lists: `-p`, `-n`, `-d` and `-t` accept comma lists (or the
//! flag repeated), and every prefill and decode test runs at every depth and thread count, in
//! llama-bench's order.

mod common;

use common::{run_ggpt, tiny_model};

/// `ggpt bench --json -r 1` of the bundled Q8_0 model with `args`: every line it printed, parsed.
fn bench_json(args: &[&str]) -> Vec<serde_json::Value> {
    let m = tiny_model("Q8_0");
    let mut all = vec!["bench", "-m", m.to_str().unwrap(), "-r", "1", "--json"];
    all.extend(args);
    let o = run_ggpt(&all);
    assert_eq!(o.status.and_then(|s| s.code()), Some(0), "{o:?}");
    o.stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn lists_of_prompt_generation_and_depth_run_every_test() {
    let docs = bench_json(&["-p", "16,32", "-n", "4", "-n", "8", "-d", "0,8", "-t", "1"]);
    // One JSON line per test (those with samples), then the FMA-peak and roofline lines.
    let tests: Vec<(String, u64, f64)> = docs
        .iter()
        .filter(|v| v.get("samples_ts").is_some())
        .map(|v| {
            (
                v["test"].as_str().unwrap().to_string(),
                v["n_depth"].as_u64().unwrap(),
                v["avg_ts"].as_f64().unwrap(),
            )
        })
        .collect();
    let names: Vec<(&str, u64)> = tests.iter().map(|(t, d, _)| (t.as_str(), *d)).collect();
    assert_eq!(
        names,
        [
            ("pp16", 0),
            ("pp32", 0),
            ("tg4", 0),
            ("tg8", 0),
            ("pp16 @ d8", 8),
            ("pp32 @ d8", 8),
            ("tg4 @ d8", 8),
            ("tg8 @ d8", 8),
        ]
    );
    assert!(
        tests.iter().all(|t| t.2.is_finite() && t.2 > 0.0),
        "{tests:?}"
    );
    // The per-row summaries name each test too: four prefill rows with their FLOPs, four
    // decode rows with their roofline.
    let summary = |key: &str| docs.iter().filter(|v| v.get(key).is_some()).count();
    assert_eq!(summary("flops_per_token"), 4, "{docs:?}");
    assert_eq!(summary("roofline_ts"), 4, "{docs:?}");
}

#[test]
fn a_list_of_thread_counts_runs_every_test_with_each() {
    let docs = bench_json(&["-p", "16", "-n", "4", "-t", "1,2"]);
    let rows: Vec<(String, u64)> = docs
        .iter()
        .filter(|v| v.get("samples_ts").is_some())
        .map(|v| {
            (
                v["test"].as_str().unwrap().to_string(),
                v["n_threads"].as_u64().unwrap(),
            )
        })
        .collect();
    let rows: Vec<(&str, u64)> = rows.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    assert_eq!(rows, [("pp16", 1), ("tg4", 1), ("pp16", 2), ("tg4", 2)]);
    // Each summary row is related to the peak and the bandwidth measured with its own thread
    // count.
    let threads_of = |key: &str| -> Vec<u64> {
        docs.iter()
            .filter(|v| v.get(key).is_some())
            .map(|v| v["n_threads"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(threads_of("flops_per_token"), [1, 2], "{docs:?}");
    assert_eq!(threads_of("roofline_ts"), [1, 2], "{docs:?}");
}
