//! The size-vs-quality report: one row per format with what it costs (file, bits per weight, RAM,
//! VRAM, measured peak RSS, load time, speed) and what it loses (perplexity, ΔPPL, KL divergence
//! and top-1 agreement against F16). [`measure_format`] fills a row (for `ggpt compare` and the
//! Python package's `ggpt.compare`); the rest of this file renders them.

use crate::chart::{Chart, Point};
use crate::memory::{estimate, MemShape, RunShape};
use crate::model::Model;
use crate::perplexity::{evaluate, Method};
use crate::scoring::Aggregate;
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Everything measured for one format.
#[derive(Clone, Debug, Default)]
pub struct FormatRow {
    pub format: String,
    pub file: PathBuf,
    pub file_bytes: u64,
    pub params: u64,
    pub bits_per_weight: f64,
    pub ram_estimate: u64,
    pub vram_estimate: u64,
    /// Peak RSS of a separate process that loaded the file, prefilled and decoded.
    pub peak_rss: u64,
    pub load_ms: f64,
    pub prefill_tps: f64,
    pub decode_tps: f64,
    pub ppl: f64,
    pub ppl_err: f64,
    /// (PPL / PPL_F16 − 1) × 100.
    pub delta_ppl_pct: f64,
    pub mean_kld: f64,
    pub median_kld: f64,
    pub p99_kld: f64,
    /// Top-1 agreement with F16 in %, and its standard error.
    pub same_top_pct: f64,
    pub same_top_err_pct: f64,
    pub rms_delta_p_pct: f64,
}

/// How the rows were measured (printed with the table).
#[derive(Clone, Debug, Default)]
pub struct Setup {
    pub model: String,
    pub text: String,
    pub method: String,
    pub mem_ctx: usize,
    pub bench: String,
    pub threads: usize,
}

/// How every format is measured.
#[derive(Clone, Copy, Debug)]
pub struct Measure {
    /// Perplexity windows.
    pub method: Method,
    /// Context length of the memory estimate.
    pub mem_ctx: usize,
    /// Prefill and decode lengths of the speed test (llama-bench's ppN / tgN, 2 timed runs each).
    pub bench_prompt: usize,
    pub bench_gen: usize,
    /// Threads the run uses (for the memory estimate's per-thread buffers).
    pub threads: usize,
}

/// Measure one loaded format: size, memory estimate, speed, perplexity, and against `base`
/// (the F16 file; `None` for the F16 row itself) KL divergence and top-1 agreement on the same
/// windows. `peak_rss` is the caller's measurement (a separate process; 0 if none).
/// `progress(done, total, aggregate)` is called after each perplexity window.
#[allow(clippy::too_many_arguments)]
pub fn measure_format(
    format: &str,
    path: &Path,
    model: &Model,
    base: Option<&Model>,
    tokens: &[u32],
    m: &Measure,
    peak_rss: u64,
    progress: impl FnMut(usize, usize, &Aggregate),
) -> crate::Result<FormatRow> {
    let shape = MemShape::of(model);
    let tensors = model.file().tensors();
    let tensor_bytes: u64 = tensors.iter().map(|t| t.size).sum();
    let params: u64 = tensors.iter().map(|t| t.n_elements()).sum();
    let run = RunShape {
        n_ctx: m.mem_ctx as u64,
        // The whole context as one prompt, as `ggpt mem` and `ggpt run` pass it.
        n_batch: m.mem_ctx as u64,
        n_seq: 1,
        kv_elem: 2,
        threads: m.threads as u64,
    };
    let est = estimate(&shape, model.file().file_len(), tensor_bytes, &run);
    let pp = crate::bench::prefill(model, m.bench_prompt.min(m.mem_ctx), 2, 0)?;
    let tg = crate::bench::decode(model, m.bench_gen.min(m.mem_ctx), 2, 0)?;
    let report = evaluate(model, base, tokens, m.method, progress)?;
    let s = &report.summary;
    let (ppl_f16, vs) = match &s.vs_base {
        Some(v) => (v.base_ppl, Some(v)),
        None => (s.ppl, None),
    };
    Ok(FormatRow {
        format: format.to_string(),
        file: path.to_path_buf(),
        file_bytes: model.file().file_len(),
        params,
        bits_per_weight: tensor_bytes as f64 * 8.0 / params.max(1) as f64,
        ram_estimate: est.ram_total,
        vram_estimate: est.vram_total,
        peak_rss,
        load_ms: model.load_ms(),
        prefill_tps: pp.mean(),
        decode_tps: tg.mean(),
        ppl: s.ppl,
        ppl_err: s.ppl_err,
        delta_ppl_pct: (s.ppl / ppl_f16 - 1.0) * 100.0,
        mean_kld: vs.map_or(0.0, |v| v.mean_kld),
        median_kld: vs.map_or(0.0, |v| v.median_kld),
        p99_kld: vs.map_or(0.0, |v| v.p99_kld),
        same_top_pct: vs.map_or(100.0, |v| v.same_top * 100.0),
        same_top_err_pct: vs.map_or(0.0, |v| v.same_top_err * 100.0),
        rms_delta_p_pct: vs.map_or(0.0, |v| v.rms_delta_p * 100.0),
    })
}

const MIB: f64 = 1024.0 * 1024.0;

/// The Markdown table.
pub fn markdown(setup: &Setup, rows: &[FormatRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Model: `{}`  ", setup.model);
    let _ = writeln!(s, "Text: `{}` — {}  ", setup.text, setup.method);
    let _ = writeln!(
        s,
        "Memory at ctx {}; speed: {}, {} threads; KLD and top-1 against F16 on the same windows.\n",
        setup.mem_ctx, setup.bench, setup.threads
    );
    s.push_str("| format | file MiB | bpw | RAM est. MiB | VRAM est. MiB | peak RSS MiB | load ms | prefill t/s | decode t/s | PPL | ΔPPL | mean KLD | p99 KLD | top-1 agree |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.4} ± {:.4} | {:+.3} % | {:.6} | {:.5} | {:.2} ± {:.2} % |",
            r.format,
            r.file_bytes as f64 / MIB,
            r.bits_per_weight,
            r.ram_estimate as f64 / MIB,
            r.vram_estimate as f64 / MIB,
            r.peak_rss as f64 / MIB,
            r.load_ms,
            r.prefill_tps,
            r.decode_tps,
            r.ppl,
            r.ppl_err,
            r.delta_ppl_pct,
            r.mean_kld,
            r.p99_kld,
            r.same_top_pct,
            r.same_top_err_pct
        );
    }
    s
}

/// The JSON document (`report.json`).
pub fn to_json(setup: &Setup, rows: &[FormatRow]) -> serde_json::Value {
    json!({
        "setup": {
            "model": setup.model,
            "text": setup.text,
            "method": setup.method,
            "mem_ctx": setup.mem_ctx,
            "bench": setup.bench,
            "threads": setup.threads,
        },
        "formats": rows.iter().map(|r| json!({
            "format": r.format,
            "file": r.file.display().to_string(),
            "file_bytes": r.file_bytes,
            "params": r.params,
            "bits_per_weight": r.bits_per_weight,
            "ram_estimate_bytes": r.ram_estimate,
            "vram_estimate_bytes": r.vram_estimate,
            "peak_rss_bytes": r.peak_rss,
            "load_ms": r.load_ms,
            "prefill_tps": r.prefill_tps,
            "decode_tps": r.decode_tps,
            "ppl": r.ppl,
            "ppl_err": r.ppl_err,
            "delta_ppl_pct": r.delta_ppl_pct,
            "mean_kld": r.mean_kld,
            "median_kld": r.median_kld,
            "p99_kld": r.p99_kld,
            "same_top_pct": r.same_top_pct,
            "same_top_err_pct": r.same_top_err_pct,
            "rms_delta_p_pct": r.rms_delta_p_pct,
        })).collect::<Vec<_>>(),
    })
}

/// Two charts: perplexity (± its standard error) against file size, and mean KLD from F16
/// against file size on a log axis (F16 itself, the reference at KLD 0, has no place on it).
pub fn charts(setup: &Setup, rows: &[FormatRow]) -> (Chart, Chart) {
    let text = std::path::Path::new(&setup.text)
        .file_name()
        .map_or(setup.text.clone(), |f| f.to_string_lossy().into_owned());
    let ppl = Chart {
        title: format!("{}: perplexity vs file size", setup.model),
        subtitle: format!(
            "text: {text}; bars: ± 1 standard error; line: formats no smaller file beats"
        ),
        x_label: "file size (MiB)".into(),
        y_label: "perplexity (lower is better)".into(),
        log_y: false,
        points: rows
            .iter()
            .map(|r| Point {
                label: format!("{} ({:.2} bpw)", r.format, r.bits_per_weight),
                x: r.file_bytes as f64 / MIB,
                y: r.ppl,
                y_err: Some(r.ppl_err),
            })
            .collect(),
    };
    let reference: Vec<&str> = rows
        .iter()
        .filter(|r| r.mean_kld <= 0.0)
        .map(|r| r.format.as_str())
        .collect();
    let kld = Chart {
        title: format!("{}: KL divergence from F16 vs file size", setup.model),
        subtitle: if reference.is_empty() {
            format!("text: {text}; line: formats no smaller file beats")
        } else {
            format!(
                "text: {text}; {} is the reference (KLD 0, not drawn on the log axis)",
                reference.join(", ")
            )
        },
        x_label: "file size (MiB)".into(),
        y_label: "mean KLD vs F16 (nats, log scale)".into(),
        log_y: true,
        points: rows
            .iter()
            .filter(|r| r.mean_kld > 0.0)
            .map(|r| Point {
                label: format!("{} ({:.1} % top-1)", r.format, r.same_top_pct),
                x: r.file_bytes as f64 / MIB,
                y: r.mean_kld,
                y_err: None,
            })
            .collect(),
    };
    (ppl, kld)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<FormatRow> {
        ["F16", "Q8_0", "Q6_K", "Q4_K_M"]
            .iter()
            .enumerate()
            .map(|(i, f)| FormatRow {
                format: f.to_string(),
                file_bytes: (40 - 8 * i as u64) << 20,
                ppl: 29.0 + i as f64,
                mean_kld: 0.01 * i as f64,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn table_has_a_row_per_format() {
        let md = markdown(&Setup::default(), &rows());
        assert_eq!(md.lines().filter(|l| l.starts_with("| Q")).count(), 3);
        assert!(md.contains("| F16 | 40.00 |"));
    }

    #[test]
    fn json_has_every_field_for_every_format() {
        let doc = to_json(&Setup::default(), &rows());
        let formats = doc["formats"].as_array().unwrap();
        assert_eq!(formats.len(), 4);
        for f in formats {
            assert_eq!(f.as_object().unwrap().len(), 20);
        }
        let (a, b) = charts(&Setup::default(), &rows());
        assert_eq!(a.points.len(), 4);
        // F16's KLD is 0: the reference, left off the log axis and named in the subtitle.
        assert_eq!(b.points.len(), 3);
        assert!(b.log_y && b.subtitle.contains("F16 is the reference"));
    }
}
