//! `ggpt features`: the final hidden state (after the last LayerNorm) for every token of a text —
//! what Hugging Face's `GPT2Model(...).last_hidden_state` returns — as JSON or `.npy`.

use super::common::{bail_flag, init_threads, output_error, print_stdout, text_arg};
use anyhow::Result;
use ggpt::model::Model;
use ggpt::session::Session;
use ggpt_convert::atomic::AtomicFile;
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
        bail_flag!("the text is empty: there is no token to compute a hidden state for");
    }
    let n_ctx = model.hparams().n_ctx as usize;
    if ids.len() > n_ctx {
        bail_flag!(
            "the text has {} tokens, more than the model's context of {n_ctx}",
            ids.len()
        );
    }
    let mut session = Session::new(&model, ids.len(), 1)?;
    let hidden = session.hidden_states(&ids)?;
    let n_embd = model.hparams().n_embd as usize;
    match &args.npy {
        Some(path) => {
            // Through a temporary and a rename: a failed write leaves no partial .npy behind.
            let write = || -> std::io::Result<()> {
                let mut f = AtomicFile::create(path)?;
                ggpt::npy::write_f32(&mut f, &[ids.len(), n_embd], &hidden)?;
                f.flush()?;
                f.commit()
            };
            write().map_err(|e| output_error(path, "cannot write", e))?;
            super::common::note!(
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
            print_stdout(&format!("{doc}\n"))?;
        }
    }
    Ok(())
}
