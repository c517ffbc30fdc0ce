//! The size-vs-quality report: one row per format with what it costs (file, bits per weight, RAM,
//! VRAM, measured peak RSS, load time, speed) and what it loses (perplexity, ΔPPL, KL divergence
//! and top-1 agreement against F16). `ggpt compare` fills the rows; this file renders them.

use crate::chart::{Chart, Point};
use serde_json::json;
use std::fmt::Write as _;
use std::path::PathBuf;

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
