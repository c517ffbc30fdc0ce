//! `ggpt features`: the final hidden state (after the last LayerNorm) for every token of a text —
//! what Hugging Face's `GPT2Model(...).last_hidden_state` returns — as JSON or `.npy`.

use super::common::{init_threads, text_arg};
use crate::model::Model;
use crate::session::Session;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Text (`-` reads standard input).
    pub text: String,
    /// Write a float32 array of shape [tokens, n_embd] to this .npy file instead of JSON on stdout.
    #[arg(long)]
    pub npy: Option<PathBuf>,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    init_threads(args.threads)?;
    let text = text_arg(&args.text)?;
    let model = Model::load(&args.model)?;
    let ids = model.tokenizer().encode(&text);
    if ids.is_empty() {
        bail!("the text has no tokens");
    }
    let n_ctx = model.hparams().n_ctx as usize;
    if ids.len() > n_ctx {
        bail!(
            "the text has {} tokens, more than the model's context of {n_ctx}",
            ids.len()
        );
    }
    let mut session = Session::new(&model, ids.len(), 1)?;
    let hidden = session.hidden_states(&ids)?;
    let n_embd = model.hparams().n_embd as usize;
    match &args.npy {
        Some(path) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create {}", path.display()))?,
            );
            crate::npy::write_f32(&mut f, &[ids.len(), n_embd], &hidden)
                .and_then(|_| f.flush())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {} × {} hidden states to {}",
                ids.len(),
                n_embd,
                path.display()
            );
        }
        None => {
            let rows: Vec<serde_json::Value> = hidden
                .chunks_exact(n_embd)
                .map(|r| serde_json::Value::from(r.to_vec()))
                .collect();
            let doc = serde_json::json!({ "tokens": ids, "n_embd": n_embd, "hidden": rows });
            println!("{doc}");
        }
    }
    Ok(())
}
