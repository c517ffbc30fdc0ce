//! The `ggpt` command line: a thin layer over the `ggpt` library, one file per subcommand.
//! Every command returns `anyhow::Result`; `main` prints the error chain and maps it to an
//! exit code (docs/errors.md).

use std::io::Write;

use clap::{Parser, Subcommand};

mod bench;
mod common;
mod compare;
mod convert;
mod diff;
mod dump;
mod features;
mod inspect;
mod mem;
mod perplexity;
mod quantize;
mod run;
mod serve;
mod synth;
mod tokenize;

/// Quantize GPT-2 to GGUF and run it fast on small machines.
#[derive(Parser, Debug)]
#[command(name = "ggpt", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert a Hugging Face GPT-2 checkpoint to GGUF (f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m or all).
    Convert(convert::Args),
    /// Requantize an F32/F16/BF16 GGUF with llama.cpp's per-tensor rules.
    Quantize(quantize::Args),
    /// Print a GGUF file's metadata and tensor table.
    Inspect(inspect::Args),
    /// Write every tensor of a GGUF, dequantized to f32, as .npy files (for cross-checks).
    Dump(dump::Args),
    /// Write a randomly initialised Hugging Face checkpoint of a given shape (for benchmarks).
    Synth(synth::Args),
    /// Generate text from a prompt (streamed to stdout; timings on stderr).
    Run(run::Args),
    /// Print the token ids of a text.
    Tokenize(tokenize::Args),
    /// Print the final hidden state of every token (JSON or .npy).
    Features(features::Args),
    /// Measure prefill and decode speed (llama-bench style).
    Bench(bench::Args),
    /// Predict and measure memory: weights, KV cache, scratch, RAM, VRAM, peak RSS.
    Mem(mem::Args),
    /// Perplexity (llama-perplexity's method), optionally KL divergence against a base model.
    Perplexity(perplexity::Args),
    /// Convert to every format and compare size, memory, speed and quality in one table.
    Compare(compare::Args),
    /// Serve models over an OpenAI-compatible HTTP API with continuous batching.
    Serve(serve::Args),
    /// Show token by token where formats depart from a base model (KLD, flips, top-5).
    Diff(diff::Args),
}

fn main() {
    let cli = Cli::parse();
    // `serve` shuts down gracefully on SIGINT/SIGTERM itself (and exits 0).
    if !matches!(cli.command, Command::Serve(_)) {
        install_signal_handler();
    }
    if let Err(err) = run(cli) {
        // The signal handler removed the temporaries (so this error is likely their commit
        // failing) and is exiting with 130 on its own thread: exit the same way, not with the
        // code of an error the interruption caused.
        if ggpt_convert::atomic::shutting_down() {
            std::process::exit(EXIT_INTERRUPTED);
        }
        // Not eprintln!: it panics when stderr itself cannot be written (`2>/dev/full`); the
        // exit code still tells what happened.
        let _ = writeln!(std::io::stderr(), "error: {err:#}");
        std::process::exit(exit_code(&err));
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Dump(a) => dump::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Run(a) => run::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Features(a) => features::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Mem(a) => mem::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Diff(a) => diff::run(a),
    }
}

/// Exit codes (docs/errors.md): 1 = any other failure, 2 = bad command line (clap's own
/// errors, [`common::FlagError`], an unusable output path), 3 = a bad or unsupported input
/// file (GGUF, safetensors, config, tokenizer, model shape, NaN/inf weights, a prompt or text
/// file), 4 = the output could not be written, 130 = interrupted (SIGINT/SIGTERM). An
/// unusable output path anywhere in the chain gives 2; otherwise the outermost typed error
/// in the chain decides (inside a `ggpt::Error` or a `ConvertError`, the error it wraps).
fn exit_code(err: &anyhow::Error) -> i32 {
    // An output path that names a directory, a socket, the input, … is a bad command line,
    // however deeply the writer wrapped it.
    if err
        .chain()
        .map(ggpt_convert::ConvertError::unwrap_ref)
        .any(ggpt_convert::atomic::UnusableOutput::is_in)
    {
        return EXIT_USAGE;
    }
    for cause in err.chain() {
        // `ggpt::Error` wraps the error of the layer that found the problem: sort by that.
        let cause = ggpt_convert::ConvertError::unwrap_ref(ggpt::Error::unwrap_ref(cause));
        if cause.is::<ggpt_convert::pipeline::OutputError>() {
            return EXIT_OUTPUT;
        }
        if cause.is::<common::FlagError>() {
            return EXIT_USAGE;
        }
        if let Some(e) = cause.downcast_ref::<ggpt_serve::ServeError>() {
            return e.exit_code();
        }
        if cause.is::<ggpt_gguf::GgufError>()
            || cause.is::<ggpt_convert::hf::InputError>()
            || cause.is::<common::InputError>()
            || cause.is::<ggpt_models::LoadError>()
            || cause.is::<ggpt::tokenizer::TokenizerError>()
            || cause.is::<ggpt::model::NonFiniteWeights>()
            || matches!(
                cause.downcast_ref::<ggpt_models::RunError>(),
                Some(ggpt_models::RunError::InvalidWeights { .. })
            )
        {
            return EXIT_INPUT;
        }
    }
    1
}

/// The same code clap uses for a command line it cannot parse.
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INPUT: i32 = 3;
pub const EXIT_OUTPUT: i32 = 4;
pub const EXIT_INTERRUPTED: i32 = 130;

/// On SIGINT/SIGTERM remove every temporary output file still being written, then exit:
/// an interrupted `convert` or `quantize` leaves neither a partial file nor a stray temp file.
fn install_signal_handler() {
    let _ = ctrlc::set_handler(|| {
        ggpt_convert::atomic::cleanup_temp_files();
        common::note!("interrupted");
        std::process::exit(EXIT_INTERRUPTED);
    });
}
