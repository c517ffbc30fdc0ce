//! `ggpt quantize IN.gguf OUT.gguf --type q8_0|q6_k|q4_k_m|f16`: requantize an F32/F16/BF16
//! GPT-2 GGUF with llama-quantize's per-tensor rules (see docs/convert.md).

use std::path::PathBuf;

use anyhow::Result;
use ggpt_convert::policy::FileType;
use ggpt_convert::requantize::requantize;

use super::convert::{print_summary, Bars};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input GGUF (F32, F16 or BF16 weights).
    pub input: PathBuf,
    /// Output GGUF (written atomically).
    pub output: PathBuf,
    /// Output type: f16, q8_0, q6_k or q4_k_m.
    #[arg(long = "type", short = 't', value_parser = parse_type)]
    pub ftype: FileType,
}

fn parse_type(s: &str) -> Result<FileType, String> {
    FileType::parse(s)
        .ok_or_else(|| format!("unknown type {s:?}; expected f16, q8_0, q6_k or q4_k_m"))
}

pub fn run(args: Args) -> Result<()> {
    let bars = Bars::new();
    let summary = requantize(&args.input, &args.output, args.ftype, &bars)?;
    let seconds = summary.seconds;
    print_summary(&[summary], seconds)
}
