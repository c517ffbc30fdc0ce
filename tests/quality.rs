//! The quality measurements against independent references: perplexity equals PyTorch's on the
//! tiny model's held-out tokens (golden.json `val_perplexity`), a model compared with itself has
//! zero KL divergence and full top-1 agreement, and `ggpt compare` writes every field for every
//! format with the expected ordering of KL divergence.

mod common;

use common::{ggpt, repo, scratch, tiny_model};
use ggpt::model::Model;
use ggpt::perplexity::{evaluate, Method};
use serde_json::Value;

/// `val_tokens.npy`: a uint16 .npy vector (numpy's v1 header, then raw little-endian data).
fn val_tokens() -> Vec<u32> {
    let bytes = std::fs::read(repo().join("models/tiny-gpt2/val_tokens.npy")).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'<u2'"), "unexpected dtype in {header}");
    bytes[10 + hlen..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect()
}

fn golden() -> Value {
    let text = std::fs::read_to_string(repo().join("models/tiny-gpt2/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn perplexity_matches_pytorch_on_held_out_tokens() {
    // golden.json: windows of 512 from val_tokens.npy, every prediction in a window scored,
    // PyTorch float32. Eight windows keep the test short; each is checked on its own too.
    let g = golden();
    let per_window: Vec<f64> = g["val_perplexity"]["per_window_mean_nll"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let n = 8;
    let tokens = val_tokens();
    let model = Model::load(&tiny_model("F16")).unwrap();
    let method = Method {
        n_ctx: 512,
        max_chunks: Some(n),
        score_all: true,
    };
    let mut window_nll = Vec::new();
    let mut prev_sum = 0.0;
    let report = evaluate(&model, None, &tokens, method, |done, _, agg| {
        // The running aggregate gives each window's mean NLL by difference.
        let s = agg.summary();
        let sum = s.mean_nll * s.tokens as f64;
        window_nll.push((sum - prev_sum) / 511.0);
        prev_sum = sum;
        assert_eq!(s.tokens, done as u64 * 511);
    })
    .unwrap();
    assert_eq!(report.windows, n);
    for (w, (ours, reference)) in window_nll.iter().zip(&per_window).enumerate() {
        assert!(
            (ours - reference).abs() < 2e-3,
            "window {w}: mean NLL {ours} vs PyTorch {reference}"
        );
    }
    let reference: f64 = per_window[..n].iter().sum::<f64>() / n as f64;
    let ppl_ref = reference.exp();
    let s = report.summary;
    assert!(
        (s.ppl / ppl_ref - 1.0).abs() < 1e-3,
        "PPL {} vs exp(mean PyTorch NLL) {}",
        s.ppl,
        ppl_ref
    );
}

#[test]
fn a_model_against_itself_has_zero_divergence() {
    let text = std::fs::read_to_string(repo().join("models/tiny-gpt2/val.txt")).unwrap();
    let a = Model::load(&tiny_model("Q6_K")).unwrap();
    let b = Model::load(&tiny_model("Q6_K")).unwrap();
    let tokens = a.tokenizer().encode_ordinary(&text[..20_000]);
    let method = Method {
        n_ctx: 256,
        max_chunks: Some(3),
        score_all: false,
    };
    let r = evaluate(&a, Some(&b), &tokens, method, |_, _, _| {}).unwrap();
    let vs = r.summary.vs_base.expect("compared with a base");
    assert!(vs.mean_kld.abs() < 1e-9, "mean KLD {}", vs.mean_kld);
    assert!(vs.max_kld.abs() < 1e-6, "max KLD {}", vs.max_kld);
    assert_eq!(vs.same_top, 1.0);
    assert!((vs.ppl_ratio - 1.0).abs() < 1e-12);
    assert_eq!(r.summary.tokens, 3 * 127);

    // And a different format does diverge.
    let c = Model::load(&tiny_model("Q4_K_M")).unwrap();
    let r = evaluate(&c, Some(&b), &tokens, method, |_, _, _| {}).unwrap();
    assert!(r.summary.vs_base.unwrap().mean_kld > 1e-4);
}

#[test]
fn compare_reports_every_format() {
    let dir = scratch("compare");
    let text = std::fs::read_to_string(repo().join("models/tiny-gpt2/val.txt")).unwrap();
    let small = dir.join("small.txt");
    std::fs::write(&small, &text[..40_000]).unwrap();
    let out = std::process::Command::new(ggpt())
        .arg("compare")
        .arg(repo().join("models/tiny-gpt2"))
        .arg("--text")
        .arg(&small)
        .args([
            "--chunks",
            "4",
            "--bench-prompt",
            "32",
            "--bench-gen",
            "8",
            "-t",
            "2",
        ])
        .arg("-o")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compare failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/report.json")).unwrap())
            .unwrap();
    let formats = doc["formats"].as_array().unwrap();
    let names: Vec<&str> = formats
        .iter()
        .map(|f| f["format"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M"]);
    let fields = [
        "file_bytes",
        "bits_per_weight",
        "ram_estimate_bytes",
        "vram_estimate_bytes",
        "peak_rss_bytes",
        "load_ms",
        "prefill_tps",
        "decode_tps",
        "ppl",
        "ppl_err",
        "delta_ppl_pct",
        "mean_kld",
        "same_top_pct",
    ];
    for f in formats {
        for k in fields {
            let v = f[k].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{}: field {k} = {:?}", f["format"], f[k]);
        }
        assert!(f["peak_rss_bytes"].as_u64().unwrap() > f["file_bytes"].as_u64().unwrap());
    }
    let kld = |i: usize| formats[i]["mean_kld"].as_f64().unwrap();
    assert_eq!(kld(0), 0.0);
    assert!(kld(5) > kld(2), "Q4_K_M KLD {} ≤ Q6_K {}", kld(5), kld(2));
    assert!(kld(2) > kld(1), "Q6_K KLD {} ≤ Q8_0 {}", kld(2), kld(1));
    // Q5_K_S stores every layer matrix in Q5_K: between Q6_K and Q4_K_M.
    assert!(kld(4) > kld(2) && kld(4) < kld(5), "Q5_K_S KLD {}", kld(4));
    assert!(kld(3) > kld(1) && kld(3) < kld(5), "Q5_K_M KLD {}", kld(3));
    assert!(kld(1) >= 0.0);
    // Smaller files, in the order the formats are listed.
    let size = |i: usize| formats[i]["file_bytes"].as_u64().unwrap();
    assert!((1..formats.len()).all(|i| size(i - 1) > size(i)));
    // One point marker (the blue circles; error bars add black ones) per format, except that
    // F16's KLD of 0 has no place on the logarithmic KLD axis.
    for (svg, points) in [
        ("ppl_vs_size.svg", formats.len()),
        ("kld_vs_size.svg", formats.len() - 1),
    ] {
        let s = std::fs::read_to_string(dir.join("out").join(svg)).unwrap();
        let markers = s
            .split("<circle")
            .skip(1)
            .filter(|c| c.split('>').next().unwrap_or("").contains("#1F77B4"))
            .count();
        assert_eq!(markers, points, "{svg}");
    }
}
