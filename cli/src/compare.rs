//! `ggpt compare`: the whole job in one command — convert a checkpoint to F16, Q8_0, Q6_K,
//! Q5_K_M, Q5_K_S and Q4_K_M (reusing files already converted), then measure every format's size,
//! memory, speed and quality against F16, and write a Markdown table, a JSON report and two
//! charts (SVG and PNG).
//! With no arguments it runs on the bundled tiny GPT-2 and its held-out text.

use super::common::{
    bail_flag, flag_error, init_threads, output_error, print_stdout, read_text_file,
};
use anyhow::{bail, Context, Result};
use ggpt::compare::{charts, markdown, measure_format, to_json, FormatRow, Measure, Setup};
use ggpt::model::Model;
use ggpt::perplexity::{window_count, Method};
use ggpt_convert::atomic::AtomicFile;
use ggpt_convert::hf::{HfConfig, InputError};
use ggpt_convert::pipeline::{convert_hf, model_name, ConvertOptions, NoProgress};
use ggpt_convert::policy::FileType;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The bundled default model and texts, found next to the sources this binary was built from
/// or, failing that, relative to the working directory.
pub fn bundled(rel: &str) -> PathBuf {
    // The CLI crate sits one level below the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let built = root.join(rel);
    if built.exists() {
        built
    } else {
        PathBuf::from(rel)
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face GPT-2 checkpoint directory (default: the bundled models/tiny-gpt2).
    pub hf_dir: Option<PathBuf>,
    /// Evaluation text (default: the bundled model's held-out val.txt; WikiText-2 test for other models).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Output directory for the GGUF files and the report (default: out/compare/<model>).
    #[arg(short = 'o', long)]
    pub out: Option<PathBuf>,
    /// Perplexity window (llama-perplexity's default 512).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most this many windows per format.
    #[arg(long, default_value_t = 100)]
    pub chunks: usize,
    /// Prefill test length and decode test length for the speed columns.
    #[arg(long, default_value_t = 256)]
    pub bench_prompt: usize,
    #[arg(long, default_value_t = 64)]
    pub bench_gen: usize,
    /// Skip the separate-process peak-RSS measurement.
    #[arg(long)]
    pub no_rss: bool,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

pub fn run(args: Args) -> Result<()> {
    let threads = init_threads(args.threads)?;
    let is_default = args.hf_dir.is_none();
    let hf_dir = args
        .hf_dir
        .clone()
        .unwrap_or_else(|| bundled("models/tiny-gpt2"));
    if !hf_dir.is_dir() {
        return Err(InputError::new(
            &hf_dir,
            "not a directory (expected a Hugging Face GPT-2 checkpoint)",
        )
        .into());
    }
    // Every flag and input is checked before the (minutes long, for real models) conversion.
    if args.chunks == 0 {
        bail_flag!("--chunks 0: must be at least 1");
    }
    if args.bench_prompt == 0 || args.bench_gen == 0 {
        bail_flag!(
            "--bench-prompt {} / --bench-gen {}: both must be at least 1",
            args.bench_prompt,
            args.bench_gen
        );
    }
    let config = HfConfig::load(&hf_dir)?;
    let method = Method {
        n_ctx: args.ctx,
        max_chunks: Some(args.chunks),
        score_all: false,
    };
    method
        .validate(config.n_ctx)
        .map_err(|e| flag_error(format!("--ctx {}: {e}", args.ctx)))?;
    let text_path = match &args.text {
        Some(t) => t.clone(),
        None if is_default => bundled("models/tiny-gpt2/val.txt"),
        None => bundled("tests/fixtures/text/wikitext-2-test.txt"),
    };
    let text = read_text_file(&text_path)?;
    let name = model_name(&hf_dir);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("out/compare").join(&name));
    ggpt_convert::atomic::create_dir_all(&out)
        .map_err(|e| output_error(&out, "cannot create the output directory", e))?;

    // 1. Convert what is missing (one pass over the checkpoint for all missing formats).
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
        super::common::note!(
            "converting {} to {}",
            hf_dir.display(),
            missing
                .iter()
                .map(|t| t.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let opts = ConvertOptions {
            hf_dir: hf_dir.clone(),
            types: missing.clone(),
            output: Some(out.clone()),
            name: Some(name.clone()),
        };
        let report = convert_hf(&opts, &NoProgress)?;
        super::common::note!("converted in {:.1} s", report.seconds);
    } else {
        super::common::note!("reusing the GGUF files in {}", out.display());
    }

    // 2. The evaluation text, tokenized once with the F16 file's tokenizer.
    let base = Model::load(&files[0].1)?;
    let tokens = base.tokenizer().encode_ordinary(&text);
    let windows = window_count(tokens.len(), &method);
    if windows == 0 {
        bail_flag!(
            "--ctx {}: {} has {} tokens, fewer than one window",
            args.ctx,
            text_path.display(),
            tokens.len()
        );
    }
    let mem_ctx = base.hparams().n_ctx as usize;
    let measure = Measure {
        method,
        mem_ctx,
        bench_prompt: args.bench_prompt,
        bench_gen: args.bench_gen,
        threads,
    };

    let mut rows: Vec<FormatRow> = Vec::new();
    for (ftype, path) in &files {
        super::common::note!("== {} ({})", ftype.label(), path.display());
        let model = Model::load(path)?;
        let peak_rss = if args.no_rss {
            0
        } else {
            measure_rss(path, mem_ctx, threads)?
        };
        let pb = bar(windows as u64, "perplexity");
        let is_base = *ftype == FileType::F16;
        let row = measure_format(
            ftype.label(),
            path,
            &model,
            if is_base { None } else { Some(&base) },
            &tokens,
            &measure,
            peak_rss,
            |done, _, agg| {
                pb.set_position(done as u64);
                pb.set_message(format!("PPL {:.4}", agg.ppl()));
            },
        )?;
        pb.finish_and_clear();
        super::common::note!("   PPL {:.4} ± {:.4}", row.ppl, row.ppl_err);
        rows.push(row);
    }

    let setup = Setup {
        model: name.clone(),
        text: text_path.display().to_string(),
        method: method.describe(windows),
        mem_ctx,
        bench: format!(
            "pp{} / tg{}",
            args.bench_prompt.min(mem_ctx),
            args.bench_gen.min(mem_ctx)
        ),
        threads,
    };
    let md = markdown(&setup, &rows);
    print_stdout(&format!("{md}\n"))?;
    let (ppl_chart, kld_chart) = charts(&setup, &rows);
    write(&out.join("report.md"), md.as_bytes())?;
    write(
        &out.join("report.json"),
        serde_json::to_string_pretty(&to_json(&setup, &rows))?.as_bytes(),
    )?;
    for (stem, chart) in [("ppl_vs_size", &ppl_chart), ("kld_vs_size", &kld_chart)] {
        write(
            &out.join(format!("{stem}.svg")),
            ggpt::chart::svg(chart)?.as_bytes(),
        )?;
        write(&out.join(format!("{stem}.png")), &ggpt::chart::png(chart)?)?;
    }
    super::common::note!(
        "wrote {}/report.md, report.json, ppl_vs_size.{{svg,png}}, kld_vs_size.{{svg,png}}",
        out.display()
    );
    Ok(())
}

/// Write a report file whole or not at all (a temporary renamed into place).
fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = AtomicFile::create(path)?;
        f.write_all(bytes)?;
        f.commit()
    };
    write().map_err(|e| output_error(path, "cannot write", e))
}

/// Peak RSS of a fresh process that loads `path`, prefills the context and decodes
/// (`ggpt mem --measure`): a separate process, so each format's peak is its own.
fn measure_rss(path: &Path, n_ctx: usize, threads: usize) -> Result<u64> {
    let exe = std::env::current_exe().context("cannot locate the ggpt executable")?;
    let out = Command::new(exe)
        .args(["mem", "--measure", "--json", "--ctx"])
        .arg(n_ctx.to_string())
        .arg("-t")
        .arg(threads.to_string())
        .arg(path)
        .output()
        .context("running `ggpt mem --measure`")?;
    if !out.status.success() {
        bail!(
            "`ggpt mem --measure {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("parsing `ggpt mem --measure --json` output")?;
    doc["measured"]["peak_rss_bytes"]
        .as_u64()
        .context("`ggpt mem --measure --json` printed no peak_rss_bytes")
}
