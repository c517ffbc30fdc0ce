//! Where formats of one model depart from each other, token by token.
//!
//! The first model is the base. In [`generate`] it continues a prompt (greedily, or sampled
//! with a seed); in [`passage`] the tokens are a given text. Every model, the base included,
//! then reads the same token sequence in one forward pass (teacher forcing), so position *i*
//! of every model predicts the same next token. At each position the report gives, per model:
//! the probability of the base's token, the model's own top-5, its KL divergence from the base
//! distribution and whether its top-1 differs from the base's (a *flip*). The numbers are
//! [`scoring::score`]'s, the same function `ggpt perplexity --kl-base` aggregates.
//!
//! The result serialises to the JSON that `ggpt diff --json` prints and the server's
//! `POST /v1/diff` returns (docs/diff.md).

use crate::model::Model;
use crate::sampler::{Sampler, SamplerConfig};
use crate::scoring::{logsumexp_argmax, score};
use crate::session::Session;
use serde::{Deserialize, Serialize};

/// How many of a model's most likely tokens each position lists.
pub const TOP_N: usize = 5;

/// Why a diff cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("a diff needs at least one model (the base)")]
    NoModels,
    #[error("model {model}: its vocabulary ({got} tokens) differs from the base model's ({want})")]
    VocabMismatch {
        model: String,
        got: usize,
        want: usize,
    },
    #[error("the text has {tokens} tokens; a diff needs at least 2 (one to predict from, one to predict)")]
    TooShort { tokens: usize },
    #[error(
        "{prompt} prompt tokens + {n_predict} to generate = {total} exceeds model {model}'s context of {n_ctx} tokens"
    )]
    TooLong {
        model: String,
        prompt: usize,
        n_predict: usize,
        total: usize,
        n_ctx: usize,
    },
    #[error("the prompt is empty and the vocabulary has no <|endoftext|> to start from")]
    EmptyPrompt,
    #[error("running model {model}: {message}")]
    Run { model: String, message: String },
}

/// One model under comparison: a display name (usually the file stem) and the loaded model.
pub struct Named<'a> {
    pub name: String,
    pub model: &'a Model,
}

/// A token and its probability under one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenProb {
    pub id: u32,
    /// The token's bytes as text (invalid UTF-8, e.g. half a character, shown as U+FFFD).
    pub text: String,
    pub p: f64,
}

/// A token of the prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
}

/// One model at one position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelAt {
    /// Probability this model gives the base's token.
    pub p: f64,
    /// This model's most likely tokens, most likely first ([`TOP_N`] of them).
    pub top: Vec<TokenProb>,
    /// KL(P_base ‖ P_model) in nats (0 for the base itself).
    pub kld: f64,
    /// This model's top-1 differs from the base's top-1.
    pub flip: bool,
}

/// One position of the compared sequence: the token the base produced (or the passage has)
/// and what every model made of the prediction that led to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Index in the whole token sequence (prompt included).
    pub position: usize,
    pub id: u32,
    pub text: String,
    /// One entry per model, in [`DiffReport::models`] order (the base first).
    pub models: Vec<ModelAt>,
}

/// Per-model totals over all positions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub model: String,
    /// Index into [`DiffReport::tokens`] of the first flip.
    pub first_flip: Option<usize>,
    pub flips: usize,
    pub mean_kld: f64,
    pub max_kld: f64,
    /// Mean −log p of the base's tokens under this model, and its exp (perplexity).
    pub mean_nll: f64,
    pub ppl: f64,
}

/// Everything a diff measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiffReport {
    /// `"generate"` (the base continued a prompt) or `"passage"` (a given text scored).
    pub mode: String,
    /// Model names, the base first.
    pub models: Vec<String>,
    /// The prompt's tokens (in passage mode: the first token, which nothing predicts).
    pub prompt: Vec<Token>,
    /// How the base chose its tokens: `"greedy"`, `"sampled, seed S"` or `"given text"`.
    pub decoding: String,
    pub tokens: Vec<Position>,
    /// One per model, the base first (zero KLD and no flips by construction).
    pub summary: Vec<Summary>,
}

/// How the base continues the prompt in [`generate`].
#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    pub n_predict: usize,
    /// `None`: greedy. `Some`: sampled with this configuration (its seed included).
    pub sampler: Option<SamplerConfig>,
    /// Stop at `<|endoftext|>` (it is still compared).
    pub stop_at_eos: bool,
}

fn token(model: &Model, id: u32, p: f64) -> TokenProb {
    let text = model
        .tokenizer()
        .token_bytes(id)
        .map_or_else(String::new, |b| String::from_utf8_lossy(b).into_owned());
    TokenProb { id, text, p }
}

fn run_err(name: &str, e: crate::Error) -> DiffError {
    DiffError::Run {
        model: name.to_string(),
        message: format!("{e:#}"),
    }
}

fn check_models(models: &[Named]) -> Result<(), DiffError> {
    let base = models.first().ok_or(DiffError::NoModels)?;
    let want = base.model.hparams().n_vocab as usize;
    for m in &models[1..] {
        let got = m.model.hparams().n_vocab as usize;
        if got != want {
            return Err(DiffError::VocabMismatch {
                model: m.name.clone(),
                got,
                want,
            });
        }
    }
    Ok(())
}

fn check_fits(models: &[Named], prompt: usize, n_predict: usize) -> Result<(), DiffError> {
    let total = prompt + n_predict;
    for m in models {
        let n_ctx = m.model.hparams().n_ctx as usize;
        if total > n_ctx {
            return Err(DiffError::TooLong {
                model: m.name.clone(),
                prompt,
                n_predict,
                total,
                n_ctx,
            });
        }
    }
    Ok(())
}

/// The base continues `prompt` by up to `opts.n_predict` tokens; every model is then compared
/// along that continuation. An empty prompt starts from `<|endoftext|>`, as `ggpt run` does.
pub fn generate(
    models: &[Named],
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<DiffReport, DiffError> {
    check_models(models)?;
    let base = &models[0];
    let mut prompt = prompt.to_vec();
    let eos = base.model.tokenizer().eos_id();
    if prompt.is_empty() {
        prompt.push(eos.ok_or(DiffError::EmptyPrompt)?);
    }
    check_fits(models, prompt.len(), opts.n_predict)?;
    let mut seq = prompt.clone();
    if opts.n_predict > 0 {
        let mut session = Session::new(base.model, prompt.len() + opts.n_predict, 1)
            .map_err(|e| run_err(&base.name, e))?;
        let mut sampler = Sampler::new(opts.sampler.unwrap_or_else(SamplerConfig::greedy));
        let mut logits = session
            .prefill(&prompt)
            .map_err(|e| run_err(&base.name, e))?
            .to_vec();
        for i in 0..opts.n_predict {
            let next = sampler.sample(&logits, &seq);
            seq.push(next);
            if opts.stop_at_eos && Some(next) == eos {
                break;
            }
            if i + 1 < opts.n_predict {
                logits = session
                    .decode(next)
                    .map_err(|e| run_err(&base.name, e))?
                    .to_vec();
            }
        }
    }
    let decoding = match opts.sampler {
        None => "greedy".to_string(),
        Some(c) if c.is_greedy() => "greedy".to_string(),
        Some(c) => format!("sampled, seed {}", c.seed),
    };
    compare(models, &seq, prompt.len(), "generate", decoding)
}

/// Score a given token sequence: every position from 1 on is predicted from the ones before.
pub fn passage(models: &[Named], tokens: &[u32]) -> Result<DiffReport, DiffError> {
    check_models(models)?;
    if tokens.len() < 2 {
        return Err(DiffError::TooShort {
            tokens: tokens.len(),
        });
    }
    check_fits(models, tokens.len(), 0)?;
    compare(models, tokens, 1, "passage", "given text".into())
}

/// Teacher-force every model along `seq` and compare positions `first..seq.len()` (each
/// predicted by the logits one position earlier).
fn compare(
    models: &[Named],
    seq: &[u32],
    first: usize,
    mode: &str,
    decoding: String,
) -> Result<DiffReport, DiffError> {
    let base = &models[0];
    let n_vocab = base.model.hparams().n_vocab as usize;
    // The logits rows that predict positions first..len: rows first-1 ..= len-2.
    let rows_of = |m: &Named| -> Result<Vec<f32>, DiffError> {
        let mut session = Session::new(m.model, seq.len(), 1).map_err(|e| run_err(&m.name, e))?;
        let mut all = Vec::new();
        session
            .prefill_all_logits(seq, &mut all)
            .map_err(|e| run_err(&m.name, e))?;
        Ok(all[(first - 1) * n_vocab..(seq.len() - 1) * n_vocab].to_vec())
    };
    let n = seq.len() - first;
    let base_rows = rows_of(base)?;
    let mut tokens: Vec<Position> = (0..n)
        .map(|i| {
            let id = seq[first + i];
            Position {
                position: first + i,
                id,
                text: token(base.model, id, 0.0).text,
                models: Vec::with_capacity(models.len()),
            }
        })
        .collect();
    let mut summary = Vec::with_capacity(models.len());
    for (mi, m) in models.iter().enumerate() {
        let own;
        let rows: &[f32] = if mi == 0 {
            &base_rows
        } else {
            own = rows_of(m)?;
            &own
        };
        let (mut flips, mut first_flip, mut sum_kld, mut max_kld, mut sum_nll) =
            (0, None, 0.0f64, 0.0f64, 0.0f64);
        for (i, pos) in tokens.iter_mut().enumerate() {
            let row = &rows[i * n_vocab..(i + 1) * n_vocab];
            let base_row = &base_rows[i * n_vocab..(i + 1) * n_vocab];
            let s = score(row, pos.id as usize, Some(base_row));
            let v = s.vs_base.expect("scored against the base");
            let flip = !v.same_top;
            if flip {
                flips += 1;
                first_flip.get_or_insert(i);
            }
            sum_kld += v.kld;
            max_kld = max_kld.max(v.kld);
            sum_nll += s.nll;
            pos.models.push(ModelAt {
                p: (-s.nll).exp(),
                top: top_n(m.model, row, TOP_N),
                kld: v.kld,
                flip,
            });
        }
        let mean_nll = sum_nll / n as f64;
        summary.push(Summary {
            model: m.name.clone(),
            first_flip,
            flips,
            mean_kld: sum_kld / n as f64,
            max_kld,
            mean_nll,
            ppl: mean_nll.exp(),
        });
    }
    Ok(DiffReport {
        mode: mode.into(),
        models: models.iter().map(|m| m.name.clone()).collect(),
        prompt: seq[..first]
            .iter()
            .map(|&id| {
                let t = token(base.model, id, 0.0);
                Token {
                    id: t.id,
                    text: t.text,
                }
            })
            .collect(),
        decoding,
        tokens,
        summary,
    })
}

/// The `k` most likely tokens of a logits row with their probabilities (ties: lower id first).
pub fn top_n(model: &Model, row: &[f32], k: usize) -> Vec<TokenProb> {
    let (lse, _) = logsumexp_argmax(row);
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|id| token(model, id, (row[id as usize] as f64 - lse).exp()))
        .collect()
}
