//! `ggpt run`: generate text from a prompt, streaming it to stdout, with llama.cpp-style timing
//! lines on stderr.

use super::common::{bail_flag, flag_error, init_threads, read_text_file, text_arg, Stdout};
use anyhow::{bail, Context, Result};
use ggpt::model::Model;
use ggpt::sampler::{Sampler, SamplerConfig};
use ggpt::session::Session;
use std::path::PathBuf;
use std::time::Instant;

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
    let tok = model.tokenizer();
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

    let mut session = Session::new(&model, n_ctx, n_seq)?;
    let t_prompt = Instant::now();
    let first_logits = session.prefill(&prompt_ids)?.to_vec();
    let prompt_ms = t_prompt.elapsed().as_secs_f64() * 1e3;

    let mut samplers: Vec<Sampler> = (0..n_seq)
        .map(|i| {
            Sampler::new(SamplerConfig {
                seed: seed.wrapping_add(i as u64),
                ..cfg
            })
        })
        .collect();
    let mut histories: Vec<Vec<u32>> = vec![prompt_ids.clone(); n_seq];
    let mut done = vec![false; n_seq];
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); n_seq];
    let mut out = Stdout::new();
    let mut stream = tok.stream_decoder();
    if n_seq == 1 {
        out.write(&prompt)?;
    } else {
        session.fork_prompt();
    }

    let read_before = ggpt::budget::storage_read_bytes();
    let t_gen = Instant::now();
    let mut n_generated = 0usize;
    let mut logits = first_logits;
    let n_vocab = model.hparams().n_vocab as usize;
    for step in 0..args.n_predict {
        let mut next = Vec::with_capacity(n_seq);
        for s in 0..n_seq {
            // Step 0: every sequence samples from the prompt's logits; then each has its own row.
            let r = if step == 0 { 0 } else { s };
            let row = &logits[r * n_vocab..(r + 1) * n_vocab];
            let id = if done[s] {
                next.last().copied().unwrap_or(0)
            } else {
                samplers[s].sample(row, &histories[s])
            };
            if !done[s] {
                histories[s].push(id);
                if Some(id) == eos && !args.ignore_eos {
                    done[s] = true;
                } else {
                    outputs[s].push(id);
                    n_generated += 1;
                    if n_seq == 1 && !out.write(&stream.push(id)?)? {
                        // The reader closed the pipe (`| head`): nothing more to generate for.
                        done[s] = true;
                    }
                }
            }
            next.push(id);
        }
        if done.iter().all(|&d| d) || step + 1 == args.n_predict {
            break;
        }
        logits = if n_seq == 1 {
            session.decode(next[0])?.to_vec()
        } else {
            session.decode_batch(&next)?.to_vec()
        };
    }
    let gen_ms = t_gen.elapsed().as_secs_f64() * 1e3;
    let read_during = ggpt::budget::storage_read_bytes()
        .zip(read_before)
        .map(|(a, b)| a.saturating_sub(b));
    if n_seq == 1 {
        out.write(&format!("{}\n", stream.finish()))?;
    } else {
        for (s, ids) in outputs.iter().enumerate() {
            let text = tok
                .decode_bytes(ids)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .context("decoding generated tokens")?;
            out.write(&format!("=== sequence {} ===\n{prompt}{text}\n", s + 1))?;
        }
    }

    let per = |ms: f64, n: usize| {
        if n == 0 {
            (0.0, 0.0)
        } else {
            (ms / n as f64, n as f64 * 1e3 / ms)
        }
    };
    let (pp_ms, pp_tps) = per(prompt_ms, prompt_ids.len());
    let (tg_ms, tg_tps) = per(gen_ms, n_generated);
    super::common::note!("ggpt: load time        = {:10.2} ms", model.load_ms());
    super::common::note!(
        "ggpt: prompt eval time = {:10.2} ms / {:5} tokens ({:8.2} ms per token, {:8.2} tokens per second)",
        prompt_ms,
        prompt_ids.len(),
        pp_ms,
        pp_tps
    );
    super::common::note!(
        "ggpt:        eval time = {:10.2} ms / {:5} tokens ({:8.2} ms per token, {:8.2} tokens per second)",
        gen_ms, n_generated, tg_ms, tg_tps
    );
    if let (Some(bytes), Some(_)) = (read_during, model.gpt2().residency()) {
        super::common::note!(
            "ggpt: storage reads     = {:10.1} MB per generated token",
            bytes as f64 / 1e6 / n_generated.max(1) as f64
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
