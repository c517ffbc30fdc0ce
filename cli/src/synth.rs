//! `ggpt synth --shape gpt2-medium|gpt2|tiny|gpt2-xl-2l [--dtype f32|f16|bf16] [--seed S] -o DIR`: a
//! randomly initialised GPT-2 checkpoint in Hugging Face's original layout, for benchmarks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use ggpt_convert::safetensors::SrcDtype;
use ggpt_convert::synth::{synth, SynthOptions, SynthShape};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model shape: gpt2-xl, gpt2-large, gpt2-medium, gpt2, distilgpt2, tiny (18 M, like
    /// models/tiny-gpt2) or gpt2-xl-2l (GPT-2 XL's width with 2 layers, 144 M).
    #[arg(long, default_value = "gpt2-medium")]
    pub shape: String,
    /// Weight dtype in model.safetensors: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Number of layers instead of the shape's (e.g. a 2-layer GPT-2-XL-shaped model for tests).
    #[arg(long)]
    pub n_layer: Option<usize>,
    /// Random seed (same seed, same weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created if missing).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Where to copy vocab.json and merges.txt from (the real GPT-2 tokenizer files).
    /// Default: models/tiny-gpt2 of the working directory, else of the source tree ggpt was
    /// built from.
    #[arg(long)]
    pub vocab_from: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let Some(mut shape) = SynthShape::named(&args.shape) else {
        super::common::bail_flag!(
            "--shape {:?}: expected gpt2-xl, gpt2-large, gpt2-medium, gpt2, distilgpt2, tiny or gpt2-xl-2l",
            args.shape
        );
    };
    if let Some(n) = args.n_layer {
        if n == 0 || n > 1024 {
            super::common::bail_flag!("--n-layer {n}: expected 1..=1024");
        }
        shape.n_layer = n;
    }
    let dtype = match args.dtype.to_ascii_lowercase().as_str() {
        "f32" => SrcDtype::F32,
        "f16" => SrcDtype::F16,
        "bf16" => SrcDtype::BF16,
        other => super::common::bail_flag!("--dtype {other:?}: expected f32, f16 or bf16"),
    };
    let vocab_from = args
        .vocab_from
        .unwrap_or_else(|| super::compare::bundled("models/tiny-gpt2"));
    let opts = SynthOptions {
        shape,
        dtype,
        seed: args.seed,
        prefix: false,
        buffers: true,
        lm_head: false,
    };
    let t0 = Instant::now();
    let bytes = synth(&opts, &args.output, &vocab_from)?;
    super::common::print_stdout(&format!(
        "{}: {} ({} layers, n_embd {}), {} weights, model.safetensors {:.1} MiB in {:.1} s\n",
        args.output.display(),
        args.shape,
        shape.n_layer,
        shape.n_embd,
        args.dtype,
        bytes as f64 / (1024.0 * 1024.0),
        t0.elapsed().as_secs_f64()
    ))
}
