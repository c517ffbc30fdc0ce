//! Perplexity and KL divergence the way llama-perplexity measures them: tokenize the whole text,
//! cut it into non-overlapping windows of `n_ctx` tokens, evaluate each window from an empty
//! cache, and score only the second half of each window (positions n_ctx/2 … n_ctx−2 predicting
//! the next token), so every scored token sees at least n_ctx/2 tokens of context.
//! With a base model, both models run the same windows in lockstep and every scored position is
//! also compared with the base distribution — no logits are stored on disk.

use crate::model::Model;
use crate::scoring::{score, Aggregate, Summary, TokenScore};
use crate::session::Session;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::time::Instant;

/// How the text is windowed and scored.
#[derive(Clone, Copy, Debug)]
pub struct Method {
    /// Window length in tokens.
    pub n_ctx: usize,
    /// Evaluate at most this many windows.
    pub max_chunks: Option<usize>,
    /// Score every prediction in the window (positions 0 … n_ctx−2), as Hugging Face's
    /// fixed-length evaluation with stride = n_ctx does, instead of llama.cpp's second half.
    pub score_all: bool,
}

impl Method {
    /// The first position whose prediction is scored.
    pub fn first_scored(&self) -> usize {
        if self.score_all {
            0
        } else {
            self.n_ctx / 2
        }
    }

    /// Scored predictions per window.
    pub fn scored_per_window(&self) -> usize {
        self.n_ctx - 1 - self.first_scored()
    }

    /// One line describing the method, printed beside every number.
    pub fn describe(&self, n_windows: usize) -> String {
        format!(
            "{} windows of {} tokens, no overlap, {} scored per window ({}), {} tokens scored",
            n_windows,
            self.n_ctx,
            self.scored_per_window(),
            if self.score_all {
                "every next-token prediction"
            } else {
                "second half, as llama-perplexity"
            },
            n_windows * self.scored_per_window()
        )
    }
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct Report {
    pub summary: Summary,
    pub windows: usize,
    pub method: Method,
    pub seconds: f64,
    /// Tokens evaluated per second by the model under test (base model time excluded).
    pub tokens_per_second: f64,
}

/// Number of whole windows in `n_tokens`, after `max_chunks`.
pub fn window_count(n_tokens: usize, m: &Method) -> usize {
    let n = n_tokens / m.n_ctx.max(1);
    m.max_chunks.map_or(n, |c| n.min(c))
}

/// Run the evaluation. `progress(done, total, aggregate)` is called after each window.
pub fn evaluate(
    model: &Model,
    base: Option<&Model>,
    tokens: &[u32],
    method: Method,
    mut progress: impl FnMut(usize, usize, &Aggregate),
) -> Result<Report> {
    if method.n_ctx < 2 || method.n_ctx > model.hparams().n_ctx as usize {
        bail!(
            "--ctx {} is outside 2..={} (the model's context)",
            method.n_ctx,
            model.hparams().n_ctx
        );
    }
    if let Some(b) = base {
        if b.hparams().n_vocab != model.hparams().n_vocab {
            bail!(
                "the base model's vocabulary ({}) differs from the model's ({})",
                b.hparams().n_vocab,
                model.hparams().n_vocab
            );
        }
    }
    let windows = window_count(tokens.len(), &method);
    if windows == 0 {
        bail!(
            "the text has {} tokens, fewer than one window of {}",
            tokens.len(),
            method.n_ctx
        );
    }
    let n_vocab = model.hparams().n_vocab as usize;
    let mut session = Session::new(model, method.n_ctx, 1)?;
    let mut base_session = match base {
        Some(b) => Some(Session::new(b, method.n_ctx, 1)?),
        None => None,
    };
    let mut logits = Vec::new();
    let mut base_logits = Vec::new();
    let mut agg = Aggregate::default();
    let mut model_secs = 0.0;
    let t0 = Instant::now();
    let first = method.first_scored();
    for w in 0..windows {
        let window = &tokens[w * method.n_ctx..(w + 1) * method.n_ctx];
        session.reset();
        let t = Instant::now();
        session.prefill_all_logits(window, &mut logits)?;
        model_secs += t.elapsed().as_secs_f64();
        if let Some(bs) = base_session.as_mut() {
            bs.reset();
            bs.prefill_all_logits(window, &mut base_logits)?;
        }
        let have_base = base_session.is_some();
        let scores: Vec<TokenScore> = (first..method.n_ctx - 1)
            .into_par_iter()
            .map(|i| {
                let row = &logits[i * n_vocab..(i + 1) * n_vocab];
                let base_row = have_base.then(|| &base_logits[i * n_vocab..(i + 1) * n_vocab]);
                score(row, window[i + 1] as usize, base_row)
            })
            .collect();
        for s in &scores {
            agg.add(s);
        }
        progress(w + 1, windows, &agg);
    }
    Ok(Report {
        summary: agg.summary(),
        windows,
        method,
        seconds: t0.elapsed().as_secs_f64(),
        tokens_per_second: (windows * method.n_ctx) as f64 / model_secs.max(1e-9),
    })
}
