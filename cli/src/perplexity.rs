//! `ggpt perplexity`: llama-perplexity's measurement, and with `--kl-base` the KL divergence,
//! top-1 agreement and Δp against a base model run in lockstep on the same windows.

use super::common::{bail_flag, flag_error, init_threads, print_stdout, read_text_file};
use anyhow::Result;
use ggpt::model::Model;
use ggpt::perplexity::{evaluate, window_count, Method};
use indicatif::{ProgressBar, ProgressStyle};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model file.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Text file to evaluate (UTF-8).
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Window length in tokens.
    #[arg(short = 'c', long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most N windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Base model (usually the F16 file) for KL divergence and top-1 agreement.
    #[arg(long)]
    pub kl_base: Option<PathBuf>,
    /// Score every prediction in each window instead of llama.cpp's second half.
    #[arg(long)]
    pub score_all: bool,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    init_threads(args.threads)?;
    if args.chunks == Some(0) {
        bail_flag!("--chunks 0: must be at least 1");
    }
    let method = Method {
        n_ctx: args.ctx,
        max_chunks: args.chunks,
        score_all: args.score_all,
    };
    let text = read_text_file(&args.file)?;
    let model = Model::load(&args.model)?;
    // Everything about the method is checked before anything is printed or evaluated.
    method
        .validate(model.hparams().n_ctx as usize)
        .map_err(|e| flag_error(format!("--ctx {}: {e}", args.ctx)))?;
    let base = match &args.kl_base {
        Some(p) => Some(Model::load(p)?),
        None => None,
    };
    if let (Some(b), Some(p)) = (&base, &args.kl_base) {
        if b.hparams().n_vocab != model.hparams().n_vocab {
            bail_flag!(
                "--kl-base {}: its vocabulary ({} tokens) differs from the model's ({})",
                p.display(),
                b.hparams().n_vocab,
                model.hparams().n_vocab
            );
        }
    }
    let tokens = model.tokenizer().encode_ordinary(&text);
    let n_windows = window_count(tokens.len(), &method);
    if n_windows == 0 {
        bail_flag!(
            "--ctx {}: {} has {} tokens, fewer than one window",
            args.ctx,
            args.file.display(),
            tokens.len()
        );
    }
    super::common::note!(
        "{}: {} tokens; {}",
        args.file.display(),
        tokens.len(),
        method.describe(n_windows)
    );
    let pb = ProgressBar::new(n_windows as u64);
    pb.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} windows {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let report = evaluate(&model, base.as_ref(), &tokens, method, |done, _, agg| {
        pb.set_position(done as u64);
        pb.set_message(format!("PPL {:.4}", agg.ppl()));
    })?;
    pb.finish_and_clear();
    let s = &report.summary;
    let how = method.describe(report.windows);
    if args.json {
        let mut doc = serde_json::json!({
            "model": args.model.display().to_string(),
            "text": args.file.display().to_string(),
            "method": how,
            "tokens_scored": s.tokens,
            "ppl": s.ppl,
            "ppl_err": s.ppl_err,
            "mean_nll": s.mean_nll,
            "tokens_per_second": report.tokens_per_second,
            "seconds": report.seconds,
        });
        if let Some(b) = &s.vs_base {
            doc["kl_base"] = serde_json::json!({
                "file": args.kl_base.as_ref().map(|p| p.display().to_string()),
                "base_ppl": b.base_ppl,
                "ppl_ratio": b.ppl_ratio,
                "mean_kld": b.mean_kld,
                "median_kld": b.median_kld,
                "p99_kld": b.p99_kld,
                "max_kld": b.max_kld,
                "same_top": b.same_top,
                "same_top_err": b.same_top_err,
                "mean_delta_p": b.mean_delta_p,
                "rms_delta_p": b.rms_delta_p,
            });
        }
        return print_stdout(&format!("{doc}\n"));
    }
    // Formatting into a String cannot fail; only writing it out can.
    let mut o = String::new();
    let _ = writeln!(o, "method: {how}");
    let _ = writeln!(o, "text:   {}", args.file.display());
    let _ = writeln!(
        o,
        "PPL = {:.4} ± {:.4}  (mean NLL {:.5}, {} tokens scored, {:.1} tokens/s)",
        s.ppl, s.ppl_err, s.mean_nll, s.tokens, report.tokens_per_second
    );
    if let Some(b) = &s.vs_base {
        let _ = writeln!(
            o,
            "vs base {}:",
            args.kl_base
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        );
        let _ = writeln!(o, "  base PPL        {:.4}", b.base_ppl);
        let _ = writeln!(
            o,
            "  PPL ratio       {:.6} ({:+.3} %)",
            b.ppl_ratio,
            (b.ppl_ratio - 1.0) * 100.0
        );
        let _ = writeln!(o, "  mean KLD        {:.6}", b.mean_kld);
        let _ = writeln!(o, "  median KLD      {:.6}", b.median_kld);
        let _ = writeln!(o, "  99th pct KLD    {:.6}", b.p99_kld);
        let _ = writeln!(o, "  max KLD         {:.6}", b.max_kld);
        let _ = writeln!(
            o,
            "  same top p      {:.3} ± {:.3} %",
            b.same_top * 100.0,
            b.same_top_err * 100.0
        );
        let _ = writeln!(o, "  mean Δp         {:+.4} %", b.mean_delta_p * 100.0);
        let _ = writeln!(o, "  RMS Δp          {:.4} %", b.rms_delta_p * 100.0);
    }
    print_stdout(&o)
}
