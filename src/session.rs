//! An inference session: a KV cache plus scratch buffers over a shared [`Model`].
//!
//! Sequence 0 holds the prompt. For several continuations of one prompt, create the session
//! with `n_seq > 1`, [`prefill`](Session::prefill) once, [`fork_prompt`](Session::fork_prompt),
//! then [`decode_batch`](Session::decode_batch) one token per sequence per step: every matmul
//! then runs over n_seq rows at once, which costs little more than one row when decoding is
//! bound by reading the weights.
//!
//! ```no_run
//! use ggpt::model::Model;
//! use ggpt::session::Session;
//! # fn main() -> ggpt::Result<()> {
//! let model = Model::load("tiny-gpt2-F16.gguf".as_ref())?;
//! let prompt = model.tokenizer().encode("The kernel");
//! let mut session = Session::new(&model, 512, 1)?;
//! let mut logits = session.prefill(&prompt)?.to_vec();
//! for _ in 0..16 {
//!     // Greedy: take the most likely next token.
//!     let next = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
//!     logits = session.decode(next)?.to_vec();
//! }
//! # Ok(()) }
//! ```

use ggpt_models::{KvType, Output, RunError, Seqs, State};

use crate::model::{Model, NonFiniteWeights};
use crate::Result;

/// A running context over a [`Model`]: the KV cache for `n_seq` sequences of up to `n_ctx`
/// tokens, and the buffers one forward pass needs (allocated once, reused every step).
pub struct Session<'m> {
    model: &'m Model,
    state: State,
    n_seq: usize,
    /// Logits of the last call: (V) after prefill/decode, (n_seq, V) after decode_batch.
    logits: Vec<f32>,
    /// 0..n_seq: the sequence of each token in a batched decode step.
    seq_ids: Vec<usize>,
}

impl<'m> Session<'m> {
    /// A session with an F16 KV cache (llama.cpp's default). `n_ctx` must be in
    /// 1..=the model's context length; `n_seq` ≥ 1.
    pub fn new(model: &'m Model, n_ctx: usize, n_seq: usize) -> Result<Self> {
        Self::with_kv_type(model, n_ctx, n_seq, KvType::F16)
    }

    /// A session whose KV cache stores elements as `kv` (F16 or F32).
    pub fn with_kv_type(model: &'m Model, n_ctx: usize, n_seq: usize, kv: KvType) -> Result<Self> {
        let state = model.gpt2().new_state(n_ctx, n_seq, kv)?;
        let n_vocab = model.hparams().n_vocab as usize;
        Ok(Session {
            model,
            state,
            n_seq,
            logits: vec![0.0; n_seq * n_vocab],
            seq_ids: (0..n_seq).collect(),
        })
    }

    fn n_vocab(&self) -> usize {
        self.model.hparams().n_vocab as usize
    }

    /// Append `tokens` to sequence 0 and return the logits (V) after the last one. Only the
    /// last position goes through the output projection.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let v = self.n_vocab();
        let out = Output::LastLogits(&mut self.logits[..v]);
        self.model
            .gpt2()
            .eval(&mut self.state, tokens, Seqs::One(0), out)?;
        self.check_finite(&self.logits[..v], "logits")?;
        Ok(&self.logits[..v])
    }

    /// Append `tokens` to sequence 0 and write the logits at every position into `out`
    /// (resized to T × V, row t predicting token t+1): what perplexity needs.
    pub fn prefill_all_logits(&mut self, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.resize(tokens.len() * self.n_vocab(), 0.0);
        let o = Output::AllLogits(out);
        self.model
            .gpt2()
            .eval(&mut self.state, tokens, Seqs::One(0), o)?;
        self.check_finite(out, "logits")
    }

    /// Append one token to sequence 0 and return the next-token logits (V).
    pub fn decode(&mut self, token: u32) -> Result<&[f32]> {
        self.prefill(&[token])
    }

    /// Copy sequence 0's cache (the prompt) into sequences 1..n_seq, so each continues from
    /// the same prefix.
    pub fn fork_prompt(&mut self) {
        self.state.fork();
    }

    /// Append `tokens[s]` to sequence s for every s in 0..n_seq, as one batch, and return
    /// the logits as (n_seq, V): row s for sequence s.
    pub fn decode_batch(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        if tokens.len() != self.n_seq {
            return Err(RunError::BadRequest(format!(
                "decode_batch got {} tokens for {} sequences",
                tokens.len(),
                self.n_seq
            ))
            .into());
        }
        let n = self.n_seq * self.n_vocab();
        let out = Output::AllLogits(&mut self.logits[..n]);
        let seqs = Seqs::Each(&self.seq_ids);
        self.model.gpt2().eval(&mut self.state, tokens, seqs, out)?;
        self.check_finite(&self.logits[..n], "logits")?;
        Ok(&self.logits[..n])
    }

    /// The hidden state after the final LayerNorm at every position of `tokens`, as
    /// (T, n_embd) — Hugging Face's `GPT2Model(...).last_hidden_state`. Starts from an empty
    /// context (the session is reset first) and leaves `tokens` in sequence 0.
    pub fn hidden_states(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        let mut out = vec![0.0; tokens.len() * self.model.hparams().n_embd as usize];
        let o = Output::Hidden(&mut out);
        self.model
            .gpt2()
            .eval(&mut self.state, tokens, Seqs::One(0), o)?;
        self.check_finite(&out, "hidden-state values")?;
        Ok(out)
    }

    /// With finite weights every output is finite (an f32 overflow would need values near
    /// 3e38), so a NaN or infinity means the file's weights hold one: a bad quantized scale
    /// (named by [`Model::check_weights`], which runs only now, on this error path) or a bad
    /// F16/F32 value. Refusing here keeps NaN out of the sampler, which would otherwise turn it
    /// into plausible-looking garbage. The sequence has advanced by then; the error is meant
    /// to end the run.
    fn check_finite(&self, values: &[f32], what: &str) -> Result<()> {
        // No early exit, so the scan vectorises: microseconds for a row of 50k logits.
        if !values.iter().fold(false, |bad, x| bad | !x.is_finite()) {
            return Ok(());
        }
        self.model.check_weights()?;
        let n_bad = values.iter().filter(|x| !x.is_finite()).count();
        let file = self.model.file().path().display().to_string();
        Err(NonFiniteWeights {
            what: format!(
                "{n_bad} of the {} {what} a forward pass produced are NaN or infinite; the file \
                 is damaged or was converted from a broken checkpoint (`ggpt inspect` on it \
                 names the tensor)",
                values.len()
            ),
            file,
        }
        .into())
    }

    /// Tokens in sequence 0.
    pub fn n_past(&self) -> usize {
        self.state.n_past(0)
    }

    /// Tokens in sequence `seq` (0 if it does not exist).
    pub fn n_past_seq(&self, seq: usize) -> usize {
        if seq < self.n_seq {
            self.state.n_past(seq)
        } else {
            0
        }
    }

    /// Forget every sequence; buffers are kept.
    pub fn reset(&mut self) {
        self.state.reset();
    }

    /// Positions per sequence.
    pub fn n_ctx(&self) -> usize {
        self.state.cache().n_ctx()
    }

    /// Number of sequences.
    pub fn n_seq(&self) -> usize {
        self.n_seq
    }

    /// Element type of the KV cache.
    pub fn kv_type(&self) -> KvType {
        self.state.cache().ty()
    }

    /// Bytes the KV cache takes when every sequence fills its `n_ctx` positions: the most it
    /// grows to. It starts empty and grows as tokens arrive ([`kv_allocated_bytes`](Self::kv_allocated_bytes)).
    pub fn kv_bytes(&self) -> usize {
        self.state.cache().bytes()
    }

    /// Bytes the KV cache has allocated for the positions run so far.
    pub fn kv_allocated_bytes(&self) -> usize {
        self.state.cache().allocated_bytes()
    }

    /// Bytes of activation scratch and logits currently allocated.
    pub fn scratch_bytes(&self) -> usize {
        self.state.scratch_bytes() + self.logits.len() * 4
    }

    /// The model this session runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }
}
