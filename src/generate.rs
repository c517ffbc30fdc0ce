//! Text generation: the loop behind `ggpt run` and the Python package's `generate`.
//!
//! The prompt is evaluated once. With several sequences its KV cache is copied to each
//! ([`Session::fork_prompt`]) and every step decodes one token per sequence as one batch
//! ([`Session::decode_batch`]). Sequence `i` draws from its own [`Sampler`] seeded
//! `seed + i`, so one seed reproduces every sequence, and sequence 0 of a batch is the text a
//! single sequence with the same seed gives. A sequence ends at `<|endoftext|>` (unless
//! `ignore_eos`), at a stop string, after `max_new_tokens`, or when the caller's callback
//! says so.
//!
//! ```no_run
//! use ggpt::generate::{generate, Flow, Request};
//! use ggpt::model::Model;
//! # fn main() -> ggpt::Result<()> {
//! let model = Model::load("tiny-gpt2-Q8_0.gguf".as_ref())?;
//! let mut req = Request::new(model.tokenizer().encode("The kernel"), 32);
//! req.stop = vec!["\n\n".into()];
//! let out = generate(&model, &req, |_seq, piece| {
//!     print!("{piece}");
//!     Ok::<_, ggpt::Error>(Flow::Continue)
//! })?;
//! println!("\n{} tokens", out.tokens[0].len());
//! # Ok(()) }
//! ```

use std::time::Instant;

use crate::model::Model;
use crate::sampler::{Sampler, SamplerConfig};
use crate::session::Session;
use crate::tokenizer::{DecodeError, TextStream};
use crate::Error;

/// One generation call.
#[derive(Clone, Debug)]
pub struct Request {
    /// The prompt's token ids; at least one (GPT-2 has no BOS: start an empty prompt with
    /// `<|endoftext|>`). Prompt plus `max_new_tokens` must fit the model's context.
    pub prompt: Vec<u32>,
    /// Most tokens to generate per sequence.
    pub max_new_tokens: usize,
    /// Sampling settings; sequence `i` uses `seed + i`.
    pub sampler: SamplerConfig,
    /// Continuations of the prompt to generate as one batch (≥ 1).
    pub n_seq: usize,
    /// A sequence ends before the first of these strings; they are never part of the text.
    pub stop: Vec<String>,
    /// Keep generating after `<|endoftext|>` (which then appears in the text).
    pub ignore_eos: bool,
}

impl Request {
    /// One sequence of up to `max_new_tokens` from `prompt`, with default sampling, no stop
    /// strings, ending at `<|endoftext|>`.
    pub fn new(prompt: Vec<u32>, max_new_tokens: usize) -> Request {
        Request {
            prompt,
            max_new_tokens,
            sampler: SamplerConfig::default(),
            n_seq: 1,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// What the callback wants after a piece of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep generating this sequence.
    Continue,
    /// End this sequence now (its reader went away); the others go on.
    Stop,
}

/// The result of [`generate`].
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// Each sequence's text, without the prompt, cut before a stop string.
    pub texts: Vec<String>,
    /// Each sequence's generated token ids, without the `<|endoftext|>` that ended it.
    pub tokens: Vec<Vec<u32>>,
    /// Milliseconds spent evaluating the prompt.
    pub prompt_ms: f64,
    /// Milliseconds spent generating after the prompt.
    pub generate_ms: f64,
}

/// Generate. `emit(seq, piece)` receives each sequence's text as it is decided: UTF-8
/// characters are never split, text that may begin a stop string is held back, and a piece
/// may be empty (every live sequence gets one call per step, so the caller can check for an
/// interrupt). An error from `emit` ends the generation with that error.
pub fn generate<E: From<Error>>(
    model: &Model,
    req: &Request,
    mut emit: impl FnMut(usize, &str) -> Result<Flow, E>,
) -> Result<Output, E> {
    let tok = model.tokenizer();
    let eos = if req.ignore_eos { None } else { tok.eos_id() };
    let n_seq = req.n_seq;
    let n_vocab = model.hparams().n_vocab as usize;
    let n_ctx = req.prompt.len().saturating_add(req.max_new_tokens);
    let mut session = Session::new(model, n_ctx, n_seq)?;

    let t_prompt = Instant::now();
    let mut logits = session.prefill(&req.prompt)?.to_vec();
    let prompt_ms = t_prompt.elapsed().as_secs_f64() * 1e3;

    let t_gen = Instant::now();
    if n_seq > 1 {
        session.fork_prompt();
    }
    let mut samplers: Vec<Sampler> = (0..n_seq)
        .map(|i| {
            Sampler::new(SamplerConfig {
                seed: req.sampler.seed.wrapping_add(i as u64),
                ..req.sampler
            })
        })
        .collect();
    let mut histories = vec![req.prompt.clone(); n_seq];
    let mut streams: Vec<TextStream> = (0..n_seq)
        .map(|_| TextStream::new(req.stop.clone()))
        .collect();
    let mut texts = vec![String::new(); n_seq];
    let mut tokens = vec![Vec::new(); n_seq];
    // Ended by <|endoftext|>, a stop string or the caller.
    let mut done = vec![false; n_seq];
    let mut left = vec![false; n_seq];
    for step in 0..req.max_new_tokens {
        let mut next = Vec::with_capacity(n_seq);
        for s in 0..n_seq {
            if done[s] {
                // A finished sequence still fills its row of the batch; its logits are unused.
                next.push(next.last().copied().unwrap_or(0));
                continue;
            }
            // Step 0: every sequence samples from the prompt's logits; then each has its row.
            let r = if step == 0 { 0 } else { s };
            let id = samplers[s].sample(&logits[r * n_vocab..(r + 1) * n_vocab], &histories[s]);
            histories[s].push(id);
            next.push(id);
            if Some(id) == eos {
                done[s] = true;
                continue;
            }
            tokens[s].push(id);
            let bytes = tok.token_bytes(id).ok_or(DecodeError::IdOutOfRange {
                id,
                n_vocab: tok.n_vocab(),
            });
            let bytes = bytes.map_err(Error::from)?;
            let piece = streams[s].push(bytes);
            texts[s].push_str(&piece);
            if emit(s, &piece)? == Flow::Stop {
                left[s] = true;
            }
            done[s] = left[s] || streams[s].stopped();
        }
        if done.iter().all(|&d| d) || step + 1 == req.max_new_tokens {
            break;
        }
        logits = if n_seq == 1 {
            session.decode(next[0])?.to_vec()
        } else {
            session.decode_batch(&next)?.to_vec()
        };
    }
    let generate_ms = t_gen.elapsed().as_secs_f64() * 1e3;
    // The held-back tail of every sequence that neither hit a stop string nor was left by
    // the caller.
    for (s, stream) in streams.iter_mut().enumerate() {
        if left[s] || stream.stopped() {
            continue;
        }
        let rest = stream.finish();
        texts[s].push_str(&rest);
        emit(s, &rest)?;
    }
    Ok(Output {
        texts,
        tokens,
        prompt_ms,
        generate_ms,
    })
}
