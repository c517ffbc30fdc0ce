//! `ggpt diff`: where formats depart. The first `-m` model (the base) continues the prompt;
//! every other model reads the base's tokens (teacher forcing), and each position shows how
//! far its distribution is from the base's (KL divergence) and whether its top-1 token differs
//! (a flip). With `-f` a whole text is scored instead. On a terminal the continuation is
//! printed once, tokens coloured by divergence and flips marked, then a summary per model;
//! `--json` prints the whole [`DiffReport`] (docs/diff.md).

use super::common::{bail_flag, flag_error, init_threads, print_stdout, read_text_file, text_arg};
use anyhow::Result;
use ggpt::diff::{generate, passage, DiffError, DiffReport, GenerateOptions, Named};
use ggpt::model::Model;
use ggpt::sampler::SamplerConfig;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model files: the first is the base, each other one is compared with it.
    #[arg(short = 'm', long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// Prompt the base model continues ('-' reads standard input).
    #[arg(
        short = 'p',
        long,
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub prompt: Option<String>,
    /// Score this text file as given instead of generating (at most the model's context).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Tokens the base generates.
    #[arg(short = 'n', long = "n-predict", default_value_t = 32)]
    pub n_predict: usize,
    /// Sample the base's tokens (llama.cpp's default sampler settings) with this seed
    /// instead of taking the most likely token.
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Print the full report as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

fn stem(p: &Path) -> String {
    p.file_stem().map_or_else(
        || p.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

pub fn run(args: Args) -> Result<()> {
    init_threads(args.threads)?;
    if args.models.len() < 2 {
        bail_flag!(
            "-m given {} time(s): give the base model and at least one to compare with it",
            args.models.len()
        );
    }
    let text = match (&args.prompt, &args.file) {
        (Some(p), _) => text_arg(p)?,
        (None, Some(f)) => read_text_file(f)?,
        (None, None) => bail_flag!("give a prompt (-p) or a text file (-f)"),
    };
    let loaded: Vec<Model> = args
        .models
        .iter()
        .map(|p| Model::load(p))
        .collect::<ggpt::Result<_>>()?;
    let named: Vec<Named> = args
        .models
        .iter()
        .zip(&loaded)
        .map(|(p, m)| Named {
            name: stem(p),
            model: m,
        })
        .collect();
    let tok = loaded[0].tokenizer();
    let report = if args.file.is_some() {
        // The same tokens `ggpt perplexity` scores: control-token text is plain text.
        let mut tokens = tok.encode_ordinary(&text);
        let n_ctx = loaded
            .iter()
            .map(|m| m.hparams().n_ctx as usize)
            .min()
            .unwrap_or(0);
        if tokens.len() > n_ctx {
            super::common::note!(
                "ggpt diff: scoring the first {n_ctx} of {} tokens (the models' context)",
                tokens.len()
            );
            tokens.truncate(n_ctx);
        }
        passage(&named, &tokens)
    } else {
        let sampler = args.seed.map(|seed| SamplerConfig {
            seed,
            ..SamplerConfig::default()
        });
        let opts = GenerateOptions {
            n_predict: args.n_predict,
            sampler,
            stop_at_eos: true,
        };
        generate(&named, &tok.encode(&text), &opts)
    }
    .map_err(|e| match e {
        DiffError::TooLong { .. }
        | DiffError::TooShort { .. }
        | DiffError::VocabMismatch { .. } => flag_error(e.to_string()),
        e => e.into(),
    })?;
    if args.json {
        return print_stdout(&format!("{}\n", serde_json::to_string(&report)?));
    }
    let colour = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    print_stdout(&render(&report, colour))
}

/// The largest KLD any model shows at a position, and whether any flips there.
fn worst(report: &DiffReport, i: usize) -> (f64, bool) {
    report.tokens[i].models[1..]
        .iter()
        .fold((0.0f64, false), |(k, f), m| (k.max(m.kld), f || m.flip))
}

/// Text for the terminal: the prompt, the continuation with every token coloured by the
/// largest KLD any model shows there and flips marked, a legend, then one line per model.
pub fn render(report: &DiffReport, colour: bool) -> String {
    let mut o = String::new();
    let prompt: String = report.prompt.iter().map(|t| t.text.as_str()).collect();
    if colour {
        let _ = write!(o, "\x1b[2m{prompt}\x1b[0m");
    } else {
        o.push_str(&prompt);
    }
    for (i, t) in report.tokens.iter().enumerate() {
        let (kld, flip) = worst(report, i);
        if colour {
            let fg = if kld >= 1.0 {
                "1;31"
            } else if kld >= 0.1 {
                "31"
            } else if kld >= 0.01 {
                "33"
            } else {
                "39"
            };
            let mark = if flip { ";7" } else { "" };
            let _ = write!(o, "\x1b[{fg}{mark}m{}\x1b[0m", t.text);
        } else if flip {
            let _ = write!(o, "[{}]", t.text);
        } else {
            o.push_str(&t.text);
        }
    }
    o.push_str("\n\n");
    let _ = writeln!(
        o,
        "base {} ({}, {} tokens compared); {}",
        report.models[0],
        report.decoding,
        report.tokens.len(),
        if colour {
            "colour = largest KLD of any model: plain < 0.01, \x1b[33myellow\x1b[0m ≥ 0.01, \
             \x1b[31mred\x1b[0m ≥ 0.1, \x1b[1;31mbold red\x1b[0m ≥ 1 nat; \x1b[7mreversed\x1b[0m = a flip"
        } else {
            "[token] = a flip (some model's top-1 differs from the base's)"
        }
    );
    let width = report
        .models
        .iter()
        .map(|m| m.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        o,
        "{:<width$}  {:>22}  {:>9}  {:>10}  {:>9}  {:>9}",
        "model", "first flip", "flips", "mean KLD", "max KLD", "PPL"
    );
    for s in &report.summary {
        let first = match s.first_flip {
            Some(i) => {
                let t = &report.tokens[i];
                let shown: String = format!("{:?}", t.text).chars().take(14).collect();
                format!("#{i} {shown}")
            }
            None => "none".into(),
        };
        let _ = writeln!(
            o,
            "{:<width$}  {:>22}  {:>9}  {:>10.6}  {:>9.5}  {:>9.3}",
            s.model,
            first,
            format!("{}/{}", s.flips, report.tokens.len()),
            s.mean_kld,
            s.max_kld,
            s.ppl
        );
    }
    o
}
