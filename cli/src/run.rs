//! `ggpt run`: generate text from a prompt, streaming it to stdout, with llama.cpp-style timing
//! lines on stderr.

use super::common::{bail_flag, flag_error, init_threads, read_text_file, text_arg, Stdout};
use anyhow::{bail, Result};
use ggpt::generate::{generate, Flow, Request};
use ggpt::model::Model;
use ggpt::sampler::SamplerConfig;
use std::path::PathBuf;

/// Most sequences `--num-return-sequences` may ask for at once.
pub const MAX_SEQUENCES: usize = 64;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model file.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Prompt text (`-` reads standard input).
    #[arg(short = 'p', long, conflicts_with = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Context size in tokens (default: the model's, 1024 for GPT-2).
    #[arg(short = 'c', long = "ctx")]
    pub ctx: Option<usize>,
    /// Temperature; 0 means greedy (argmax).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temp: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1 = off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens less likely than P × the top token's probability (0 = off).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalise tokens seen in the last `--repeat-last-n` tokens (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed (default: from the clock; printed so a run can be repeated).
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Generate N continuations of the prompt as one batch sharing the prompt's KV cache.
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Treat `<|endoftext|>` in the prompt as plain text instead of the special token.
    #[arg(long)]
    pub no_special: bool,
    /// Keep generating after `<|endoftext|>`.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Memory this run may use (300M, 1.5G, bytes); default: the cgroup limit or
    /// MemAvailable. Weights that do not fit are streamed from the file (docs/memory.md).
    #[arg(long = "mem-budget", value_parser = super::mem::parse_size_arg)]
    pub mem_budget: Option<u64>,
}

/// The sampling flags, each checked by name (the sampler's own validation, run after this,
/// knows the values but not the flags).
fn check_sampling_flags(a: &Args) -> Result<()> {
    if !(a.temp.is_finite() && a.temp >= 0.0) {
        bail_flag!(
            "--temp {}: the temperature must be a finite number >= 0 (0 = greedy)",
            a.temp
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail_flag!("--top-p {}: top_p must be in (0, 1] (1 = off)", a.top_p);
    }
    if !(0.0..=1.0).contains(&a.min_p) {
        bail_flag!("--min-p {}: min_p must be in [0, 1] (0 = off)", a.min_p);
    }
    if !(a.repeat_penalty.is_finite() && a.repeat_penalty > 0.0) {
        bail_flag!(
            "--repeat-penalty {}: must be a finite number > 0 (1 = off)",
            a.repeat_penalty
        );
    }
    Ok(())
}

/// `-n` against the context: checked before any work, without overflow for any `-n`.
fn check_lengths(n_prompt: usize, n_predict: usize, n_ctx: usize) -> Result<()> {
    if n_predict >= n_ctx {
        bail_flag!(
            "-n {n_predict} leaves no room for the prompt in a context of {n_ctx} tokens \
             (--ctx); lower -n"
        );
    }
    match n_prompt.checked_add(n_predict) {
        Some(total) if total <= n_ctx => Ok(()),
        _ => Err(flag_error(format!(
            "the prompt ({n_prompt} tokens) plus -n {n_predict} exceeds the context of {n_ctx} \
             tokens (--ctx); shorten the prompt or lower -n"
        ))),
    }
}

pub fn run(args: Args) -> Result<()> {
    let threads = init_threads(args.threads)?;
    if args.num_return_sequences == 0 || args.num_return_sequences > MAX_SEQUENCES {
        bail_flag!(
            "--num-return-sequences {} is outside 1..={MAX_SEQUENCES}",
            args.num_return_sequences
        );
    }
    check_sampling_flags(&args)?;
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => text_arg(p)?,
        (None, Some(f)) => read_text_file(f)?,
        (None, None) => String::new(),
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let cfg = SamplerConfig {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed,
    };
    cfg.validate().map_err(|e| flag_error(format!("{e:#}")))?;

    let mut model = Model::load(&args.model)?;
    let tok = model.tokenizer();
    let n_ctx_train = model.hparams().n_ctx as usize;
    let n_ctx = args.ctx.unwrap_or(n_ctx_train);
    if n_ctx == 0 || n_ctx > n_ctx_train {
        bail_flag!("--ctx {n_ctx} is outside 1..={n_ctx_train} (the model's trained context)");
    }
    let mut prompt_ids = if args.no_special {
        tok.encode_ordinary(&prompt)
    } else {
        tok.encode(&prompt)
    };
    let eos = tok.eos_id();
    if prompt_ids.is_empty() {
        // GPT-2 has no BOS; like Hugging Face's pipeline, condition on <|endoftext|>.
        match eos {
            Some(e) => prompt_ids.push(e),
            None => {
                bail!("the prompt is empty and the vocabulary has no <|endoftext|> to start from")
            }
        }
    }
    check_lengths(prompt_ids.len(), args.n_predict, n_ctx)?;
    let n_seq = args.num_return_sequences;
    let fit = super::mem::fit_budget(
        &mut model,
        args.mem_budget,
        n_ctx,
        prompt_ids.len(),
        prompt_ids.len() + args.n_predict,
        n_seq,
        threads,
    )?;
    super::common::note!(
        "ggpt: {} | {} threads | seed {} | prompt {} tokens",
        args.model.display(),
        threads,
        seed,
        prompt_ids.len()
    );
    if let Some(line) = fit {
        super::common::note!("ggpt: {line}");
    }

    // Storage reads are counted from the first generated piece, after the prompt's evaluation.
    let mut read_before = None;
    let waited = || model.gpt2().residency().map(|r| r.waited());
    let mut waited_before = None;
    let req = Request {
        prompt: prompt_ids,
        max_new_tokens: args.n_predict,
        sampler: cfg,
        n_seq,
        stop: Vec::new(),
        ignore_eos: args.ignore_eos,
    };
    let mut out = Stdout::new();
    // One sequence streams to stdout, after the prompt (written once the prompt has been
    // evaluated, so that an error there leaves stdout empty); several are printed at the end.
    let mut prompt_written = false;
    let gen = generate(&model, &req, |_, piece| {
        if read_before.is_none() {
            read_before = Some(ggpt::budget::storage_read_bytes());
            waited_before = waited();
        }
        if n_seq > 1 {
            return Ok(Flow::Continue);
        }
        if !prompt_written {
            prompt_written = true;
            out.write(&prompt)?;
        }
        // `false`: the reader closed the pipe (`| head`), nothing more to generate for.
        Ok::<_, anyhow::Error>(if out.write(piece)? {
            Flow::Continue
        } else {
            Flow::Stop
        })
    })?;
    let read_during = ggpt::budget::storage_read_bytes()
        .zip(read_before.flatten())
        .map(|(a, b)| a.saturating_sub(b));
    let waited_during = waited()
        .zip(waited_before)
        .map(|(a, b)| a.saturating_sub(b));
    if n_seq == 1 {
        if !prompt_written {
            out.write(&prompt)?;
        }
        out.write("\n")?;
    } else {
        for (s, text) in gen.texts.iter().enumerate() {
            out.write(&format!("=== sequence {} ===\n{prompt}{text}\n", s + 1))?;
        }
    }
    let n_prompt = req.prompt.len();
    let n_generated: usize = gen.tokens.iter().map(Vec::len).sum();
    let (prompt_ms, gen_ms) = (gen.prompt_ms, gen.generate_ms);

    let per = |ms: f64, n: usize| {
        if n == 0 {
            (0.0, 0.0)
        } else {
            (ms / n as f64, n as f64 * 1e3 / ms)
        }
    };
    let (pp_ms, pp_tps) = per(prompt_ms, n_prompt);
    let (tg_ms, tg_tps) = per(gen_ms, n_generated);
    super::common::note!("ggpt: load time        = {:10.2} ms", model.load_ms());
    super::common::note!(
        "ggpt: prompt eval time = {:10.2} ms / {:5} tokens ({:8.2} ms per token, {:8.2} tokens per second)",
        prompt_ms,
        n_prompt,
        pp_ms,
        pp_tps
    );
    super::common::note!(
        "ggpt:        eval time = {:10.2} ms / {:5} tokens ({:8.2} ms per token, {:8.2} tokens per second)",
        gen_ms, n_generated, tg_ms, tg_tps
    );
    if let (Some(bytes), Some(_)) = (read_during, model.gpt2().residency()) {
        super::common::note!(
            "ggpt: storage reads    = {:10.1} MB per generated token",
            bytes as f64 / 1e6 / n_generated.max(1) as f64
        );
    }
    if let Some(w) = waited_during {
        // Time the token loop stood still for streamed weights: near zero means the run is
        // bound by computation (and whatever else shares its cores), not by the disk.
        let ms = w.as_secs_f64() * 1e3;
        super::common::note!(
            "ggpt: waited for reads = {:10.2} ms ({:.1} % of eval time)",
            ms,
            100.0 * ms / gen_ms.max(1e-9)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::FlagError;

    #[test]
    fn lengths_are_checked_without_overflow() {
        assert!(check_lengths(1, 1023, 1024).is_ok());
        assert!(check_lengths(1000, 24, 1024).is_ok());
        assert!(check_lengths(1, 0, 1).is_ok());
        for (prompt, n, want) in [
            (1, usize::MAX, "leaves no room"),
            (usize::MAX, 1, "plus -n 1 exceeds"),
            (1, 1024, "leaves no room"),
            (1000, 25, "plus -n 25 exceeds"),
        ] {
            let e = check_lengths(prompt, n, 1024).unwrap_err();
            assert!(e.is::<FlagError>(), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
    }
}
