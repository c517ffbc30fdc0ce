//! `ggpt tokenize`: print the token ids of a text with a model file's tokenizer.

use super::common::{print_stdout, text_arg};
use anyhow::Result;
use ggpt::model::Model;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model file (its tokenizer metadata is used).
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Text to tokenize (`-` reads standard input).
    pub text: String,
    /// Print one `id -> 'piece'` line per token instead of the id list.
    #[arg(long)]
    pub pieces: bool,
    /// Treat `<|endoftext|>` as plain text.
    #[arg(long)]
    pub no_special: bool,
}

pub fn run(args: Args) -> Result<()> {
    let text = text_arg(&args.text)?;
    let model = Model::load(&args.model)?;
    let tok = model.tokenizer();
    let ids = if args.no_special {
        tok.encode_ordinary(&text)
    } else {
        tok.encode(&text)
    };
    let mut out = String::new();
    if args.pieces {
        for &id in &ids {
            let bytes = tok.token_bytes(id).unwrap_or_default();
            // Writing into a String cannot fail.
            let _ = writeln!(out, "{id:6} -> {:?}", String::from_utf8_lossy(bytes));
        }
    } else {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        out = format!("[{}]\n", list.join(", "));
    }
    print_stdout(&out)
}
