//! Module-level functions over files: `convert`, `quantize`.

use std::io::Write as _;
use std::path::PathBuf;

use ggpt::convert::pipeline::{convert_hf, ConvertOptions, FileSummary, Progress};
use ggpt::convert::policy::FileType;
use ggpt::convert::requantize::requantize;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::blocking::{self, Cancel};
use crate::errors::{bad_arg, guard, require_exists};

/// Output types from Python: "f16", "q8_0", …, or "all" (each as `ggpt convert --type`).
pub fn parse_types(types: &[String]) -> anyhow::Result<Vec<FileType>> {
    let mut out = Vec::new();
    for t in types {
        match FileType::parse_list(t) {
            Ok(ts) => out.extend(ts),
            Err(e) => bad_arg!("{e}"),
        }
    }
    if out.is_empty() {
        bad_arg!("no output type given");
    }
    out.dedup();
    Ok(out)
}

/// Progress on standard error (one line rewritten in place); checks the cancel flag at every
/// tensor, unwinding out of the conversion when it is set (the output temporaries are
/// removed as they are dropped, so nothing half-written stays behind).
struct StderrProgress<'a> {
    cancel: &'a Cancel,
    show: bool,
}

impl Progress for StderrProgress<'_> {
    fn tensor(&self, index: usize, count: usize, name: &str) {
        self.cancel.unwind_if_set();
        if self.show {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[2Kggpt: tensor {}/{count} {name}", index + 1);
            let _ = e.flush();
        }
    }

    fn finish(&self) {
        if self.show {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn summary_dict<'py>(py: Python<'py>, f: &FileSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", &f.path)?;
    d.set_item("type", f.ftype.label())?;
    d.set_item("n_tensors", f.n_tensors)?;
    d.set_item("file_bytes", f.file_bytes)?;
    d.set_item("tensor_bytes", f.tensor_bytes)?;
    d.set_item("n_params", f.n_params)?;
    d.set_item("bpw", f.bpw())?;
    d.set_item("seconds", f.seconds)?;
    let counts = PyDict::new(py);
    for (t, n) in &f.type_counts {
        counts.set_item(t.to_string(), n)?;
    }
    d.set_item("tensor_types", counts)?;
    let differs: Vec<(String, String, Option<String>)> = f
        .differs
        .iter()
        .map(|(name, wrote, fb)| {
            (
                name.clone(),
                wrote.to_string(),
                fb.llama_cpp.map(|t| t.to_string()),
            )
        })
        .collect();
    d.set_item("differs_from_llama_cpp", differs)?;
    Ok(d)
}

/// Convert a Hugging Face GPT-2 checkpoint to GGUF files, all types in one pass.
#[pyfunction]
#[pyo3(signature = (hf_dir, out_dir=None, types=vec!["f16".to_string(), "q8_0".to_string(),
    "q6_k".to_string(), "q4_k_m".to_string()], progress=true, name=None))]
pub fn convert<'py>(
    py: Python<'py>,
    hf_dir: PathBuf,
    out_dir: Option<PathBuf>,
    types: Vec<String>,
    progress: bool,
    name: Option<String>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    require_exists(&hf_dir)?;
    let types = guard(|| {
        if let Some(n) = &name {
            if n.is_empty() || n.contains(['/', '\\', '\0']) || n == "." || n == ".." {
                bad_arg!("name={n:?}: must be a non-empty file-name stem without '/' or '\\'");
            }
        }
        parse_types(&types)
    })?;
    let opts = ConvertOptions {
        hf_dir,
        types,
        output: out_dir,
        name,
    };
    let report = blocking::run(py, None, |cancel| {
        convert_hf(
            &opts,
            &StderrProgress {
                cancel,
                show: progress,
            },
        )
        .map_err(anyhow::Error::from)
    })?;
    report.files.iter().map(|f| summary_dict(py, f)).collect()
}

/// Requantize an F32/F16/BF16 GPT-2 GGUF with llama-quantize's per-tensor rules.
#[pyfunction]
#[pyo3(signature = (src, dst, r#type, progress=false))]
pub fn quantize<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    r#type: String,
    progress: bool,
) -> PyResult<Bound<'py, PyDict>> {
    require_exists(&src)?;
    let ftype = guard(|| match FileType::parse(r#type.trim()) {
        Some(t) => Ok(t),
        None => {
            bad_arg!("unknown type {type:?}; expected f16, q8_0, q6_k, q5_k_m, q5_k_s or q4_k_m")
        }
    })?;
    let summary = blocking::run(py, None, |cancel| {
        requantize(
            &src,
            &dst,
            ftype,
            &StderrProgress {
                cancel,
                show: progress,
            },
        )
        .map_err(anyhow::Error::from)
    })?;
    summary_dict(py, &summary)
}

/// `ggpt compare` without the separate peak-RSS processes: convert what is missing, then
/// measure every format with the library's `measure_format`; returns report.json's document
/// as a JSON string (parsed by the Python wrapper).
#[pyfunction]
#[pyo3(signature = (hf_dir, text=None, out_dir=None, n_ctx=512, chunks=100, bench_prompt=256,
    bench_gen=64))]
#[allow(clippy::too_many_arguments)]
pub fn compare(
    py: Python<'_>,
    hf_dir: PathBuf,
    text: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    n_ctx: usize,
    chunks: usize,
    bench_prompt: usize,
    bench_gen: usize,
) -> PyResult<String> {
    use ggpt::compare::{measure_format, to_json, Measure, Setup};
    use ggpt::convert::hf::HfConfig;
    use ggpt::convert::pipeline::model_name;
    use ggpt::model::Model;
    use ggpt::perplexity::{window_count, Method};

    require_exists(&hf_dir)?;
    let text_path = text.unwrap_or_else(|| hf_dir.join("val.txt"));
    require_exists(&text_path)?;
    blocking::run(py, None, |cancel| {
        if chunks == 0 {
            bad_arg!("chunks=0: must be at least 1");
        }
        if bench_prompt == 0 || bench_gen == 0 {
            bad_arg!(
                "bench_prompt={bench_prompt} / bench_gen={bench_gen}: both must be at least 1"
            );
        }
        let config = HfConfig::load(&hf_dir)?;
        let method = Method {
            n_ctx,
            max_chunks: Some(chunks),
            score_all: false,
        };
        if let Err(e) = method.validate(config.n_ctx) {
            bad_arg!("n_ctx={n_ctx}: {e}");
        }
        let text = match std::fs::read_to_string(&text_path) {
            Ok(t) => t,
            Err(e) => bad_arg!("{}: cannot read as UTF-8 text: {e}", text_path.display()),
        };
        let name = model_name(&hf_dir);
        let out = out_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("out/compare").join(&name));
        ggpt::convert::atomic::create_dir_all(&out).map_err(|e| {
            ggpt::convert::pipeline::OutputError {
                path: out.clone(),
                what: "cannot create the output directory",
                source: e,
            }
        })?;
        let files: Vec<(FileType, PathBuf)> = FileType::KNOWN
            .iter()
            .map(|&t| (t, out.join(format!("{name}-{}.gguf", t.label()))))
            .collect();
        let missing: Vec<FileType> = files
            .iter()
            .filter(|(_, p)| !p.exists())
            .map(|(t, _)| *t)
            .collect();
        if !missing.is_empty() {
            let opts = ConvertOptions {
                hf_dir: hf_dir.clone(),
                types: missing,
                output: Some(out.clone()),
                name: Some(name.clone()),
            };
            convert_hf(
                &opts,
                &StderrProgress {
                    cancel,
                    show: false,
                },
            )?;
        }
        let base = Model::load(&files[0].1)?;
        let tokens = base.tokenizer().encode_ordinary(&text);
        let windows = window_count(tokens.len(), &method);
        if windows == 0 {
            bad_arg!(
                "n_ctx={n_ctx}: {} has {} tokens, fewer than one window",
                text_path.display(),
                tokens.len()
            );
        }
        let mem_ctx = base.hparams().n_ctx as usize;
        let threads = rayon::current_num_threads();
        let measure = Measure {
            method,
            mem_ctx,
            bench_prompt,
            bench_gen,
            threads,
        };
        let mut rows = Vec::new();
        for (ftype, path) in &files {
            let model = Model::load(path)?;
            let base = (*ftype != FileType::F16).then_some(&base);
            rows.push(measure_format(
                ftype.label(),
                path,
                &model,
                base,
                &tokens,
                &measure,
                0,
                |_, _, _| cancel.unwind_if_set(),
            )?);
        }
        let setup = Setup {
            model: name,
            text: text_path.display().to_string(),
            method: method.describe(windows),
            mem_ctx,
            bench: format!(
                "pp{} / tg{}",
                bench_prompt.min(mem_ctx),
                bench_gen.min(mem_ctx)
            ),
            threads,
        };
        Ok(to_json(&setup, &rows).to_string())
    })
}
