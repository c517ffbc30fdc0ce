//! Perplexity and KL divergence the way llama-perplexity measures them: tokenize the whole text,
//! cut it into non-overlapping windows of `n_ctx` tokens, evaluate each window from an empty
//! cache, and score only the second half of each window (positions n_ctx/2 … n_ctx−2 predicting
//! the next token), so every scored token sees at least n_ctx/2 tokens of context.
//! With a base model, both models run the same windows in lockstep and every scored position is
//! also compared with the base distribution — no logits are stored on disk.

use crate::model::Model;
use crate::scoring::{score, Aggregate, Summary, TokenScore};
use crate::session::Session;
use crate::Result;
use rayon::prelude::*;
use std::fmt;
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

/// Why a [`Method`] cannot run on a model: the window scores no prediction (shorter than 2
/// tokens, or 3 when only the second half is scored) or is longer than the model's context,
/// no window may be evaluated, the text is shorter than one window, or the base model's
/// vocabulary differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodError {
    BadWindow {
        n_ctx: usize,
        min: usize,
        max: usize,
    },
    NoChunks,
    TextTooShort {
        n_tokens: usize,
        n_ctx: usize,
    },
    BaseVocabDiffers {
        base: u64,
        model: u64,
    },
}

impl fmt::Display for MethodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MethodError::BadWindow { n_ctx, min, max } => write!(
                f,
                "a window of {n_ctx} tokens is outside {min}..={max} (at least one scored \
                 prediction, at most the model's context)"
            ),
            MethodError::NoChunks => write!(f, "at most 0 windows: nothing to evaluate"),
            MethodError::TextTooShort { n_tokens, n_ctx } => write!(
                f,
                "the text has {n_tokens} tokens, fewer than one window of {n_ctx}"
            ),
            MethodError::BaseVocabDiffers { base, model } => write!(
                f,
                "the base model's vocabulary ({base}) differs from the model's ({model})"
            ),
        }
    }
}

impl std::error::Error for MethodError {}

impl Method {
    /// Check the method against a model's trained context `n_ctx_train`. [`evaluate`] does
    /// this first; callers that print [`describe`](Self::describe) should too.
    pub fn validate(&self, n_ctx_train: usize) -> Result<(), MethodError> {
        // The shortest window that scores one prediction: 0 → 1 with every prediction
        // scored; position 1 → 2 when scoring starts half way (n_ctx / 2 = 1 needs n_ctx 3).
        let min = if self.score_all { 2 } else { 3 };
        if self.n_ctx < min || self.n_ctx > n_ctx_train {
            return Err(MethodError::BadWindow {
                n_ctx: self.n_ctx,
                min,
                max: n_ctx_train,
            });
        }
        if self.max_chunks == Some(0) {
            return Err(MethodError::NoChunks);
        }
        Ok(())
    }

    /// The first position whose prediction is scored.
    pub fn first_scored(&self) -> usize {
        if self.score_all {
            0
        } else {
            self.n_ctx / 2
        }
    }

    /// Scored predictions per window (0 for a window that [`validate`](Self::validate)
    /// refuses, rather than an underflow).
    pub fn scored_per_window(&self) -> usize {
        self.n_ctx.saturating_sub(1 + self.first_scored())
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
            n_windows.saturating_mul(self.scored_per_window())
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
    method.validate(model.hparams().n_ctx as usize)?;
    if let Some(b) = base {
        if b.hparams().n_vocab != model.hparams().n_vocab {
            return Err(MethodError::BaseVocabDiffers {
                base: b.hparams().n_vocab,
                model: model.hparams().n_vocab,
            }
            .into());
        }
    }
    let windows = window_count(tokens.len(), &method);
    if windows == 0 {
        return Err(MethodError::TextTooShort {
            n_tokens: tokens.len(),
            n_ctx: method.n_ctx,
        }
        .into());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn method(n_ctx: usize, score_all: bool) -> Method {
        Method {
            n_ctx,
            max_chunks: None,
            score_all,
        }
    }

    #[test]
    fn windows_too_short_or_too_long_are_errors_not_underflows() {
        for n_ctx in [0, 1, 1025, usize::MAX] {
            for score_all in [false, true] {
                let m = method(n_ctx, score_all);
                let min = if score_all { 2 } else { 3 };
                assert_eq!(
                    m.validate(1024),
                    Err(MethodError::BadWindow {
                        n_ctx,
                        min,
                        max: 1024
                    })
                );
                // Describing a refused method must not panic either.
                let _ = m.describe(window_count(1000, &m));
            }
        }
        assert_eq!(method(0, false).scored_per_window(), 0);
        assert_eq!(method(1, true).scored_per_window(), 0);
        let none = Method {
            max_chunks: Some(0),
            ..method(16, false)
        };
        assert_eq!(none.validate(1024), Err(MethodError::NoChunks));
    }

    #[test]
    fn scored_positions_follow_llama_perplexity() {
        // llama-perplexity scores positions n_ctx/2 .. n_ctx-2 of each window.
        // A window of 2 scores nothing in llama.cpp's mode, one prediction with --score-all.
        assert_eq!(method(2, false).scored_per_window(), 0);
        assert!(method(2, false).validate(1024).is_err());
        assert_eq!(method(2, true).scored_per_window(), 1);
        assert!(method(2, true).validate(1024).is_ok());
        assert_eq!(method(3, false).scored_per_window(), 1);
        assert!(method(3, false).validate(1024).is_ok());
        assert!(method(1024, false).validate(1024).is_ok());
        assert_eq!(method(512, false).scored_per_window(), 255);
        assert_eq!(method(512, true).scored_per_window(), 511);
        assert_eq!(window_count(1000, &method(512, false)), 1);
    }
}
