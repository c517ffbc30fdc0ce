//! The GPT-2 forward pass (llama.cpp `build_gpt2`, HF `GPT2LMHeadModel`), written top to
//! bottom like llm.c.
//!
//! Letters: T tokens in the batch, C = n_embd, H heads, hd = C/H, F = n_ff, V = n_vocab.
//! Activations are token-major (T, C) row blocks; weights are (out, in) rows in the mmap.
//!
//! A batch is any list of tokens, each tagged with the sequence it extends. Prefill is a
//! whole prompt in sequence 0; batched decode is one token for each of n_seq sequences. Both
//! run the same code: every matmul sees all T rows at once, and attention is done per
//! (sequence run, head). Each token is appended at the next free position of its sequence.
//! Long batches are cut into micro-batches of [`UBATCH`] tokens so the scratch buffers stay
//! bounded (as llama.cpp's n_ubatch does).

use std::cell::RefCell;

use ggpt_quant::matmul::{matmul, Scratch};
use rayon::prelude::*;

use super::{Gpt2, Hparams, RunError};
use crate::attention;
use crate::kv_cache::{KvCache, KvType};
use crate::ops;

/// Most tokens pushed through the layers at once. Each micro-batch reads every weight once,
/// so fewer, larger ones are faster, but the activations grow with it (GPT-2 Medium: 28 KiB
/// per token); 256 keeps them at 7 MiB while a 512-token prompt reads the weights twice
/// instead of once (docs/performance.md).
pub const UBATCH: usize = 256;

/// Most sequences in one state (sampling this many continuations is already unusual).
pub const MAX_SEQ: usize = 256;

/// From this many queries of one sequence in a batch on, a head's f16 K/V is converted to
/// f32 once instead of widened row by row for every query.
const F32_HEAD_MIN_QUERIES: usize = 4;

/// Below this many multiply-adds per layer, attention runs on the calling thread: forking
/// work to rayon costs a few microseconds, more than a short decode step's attention.
const PAR_ATTENTION_MIN_WORK: usize = 1 << 15;

/// The model's sizes as `usize`, for indexing. [`Hparams`] holds them as u64 (as GGUF does),
/// validated at load to bounds far below `usize::MAX`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    /// V
    vocab: usize,
    /// C
    embd: usize,
    /// H
    head: usize,
    /// hd
    head_dim: usize,
    /// F
    ff: usize,
    layer: usize,
    /// The model's context length.
    ctx: usize,
}

impl Dims {
    fn of(hp: &Hparams) -> Dims {
        Dims {
            vocab: hp.n_vocab as usize,
            embd: hp.n_embd as usize,
            head: hp.n_head as usize,
            head_dim: hp.head_dim() as usize,
            ff: hp.n_ff as usize,
            layer: hp.n_layer as usize,
            ctx: hp.n_ctx as usize,
        }
    }
}

/// Which sequence each token of a batch belongs to.
#[derive(Clone, Copy, Debug)]
pub enum Seqs<'a> {
    /// Every token extends this sequence (a prompt).
    One(usize),
    /// Token i extends sequence `ids[i]`.
    Each(&'a [usize]),
}

impl Seqs<'_> {
    fn get(&self, i: usize) -> usize {
        match self {
            Seqs::One(s) => *s,
            Seqs::Each(ids) => ids[i],
        }
    }
}

/// What a forward pass writes out (besides filling the KV cache).
pub enum Output<'a> {
    /// Nothing: only extend the cache.
    Nothing,
    /// Logits of the batch's last token: (V).
    LastLogits(&'a mut [f32]),
    /// Logits of every token: (T, V). Perplexity needs these; generation does not, and
    /// skipping the (V, C) projection for all but one row saves most of a short prompt's work.
    AllLogits(&'a mut [f32]),
    /// Hidden state after the final LayerNorm for every token: (T, C).
    Hidden(&'a mut [f32]),
    /// Logits of the listed rows of the batch (strictly increasing indices into `tokens`):
    /// (rows.len(), V), in the order listed. A server step that decodes some sequences and
    /// advances others' prompts needs the logits of one row per finished sequence, not of
    /// every row.
    Rows {
        rows: &'a [usize],
        out: &'a mut [f32],
    },
}

thread_local! {
    /// Per-thread attention scratch: one head's K and V as f32 (a prompt over an F16 cache),
    /// and two rows of scores (queries are attended in pairs; sized for the full context on
    /// first use, so decoding does not allocate).
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A forward pass's mutable state: the KV cache and activation buffers. One per session.
pub struct State {
    cache: KvCache,
    /// Tokens the activation buffers currently hold; grown to the largest micro-batch seen.
    cap: usize,
    /// Residual stream (T, C).
    x: Vec<f32>,
    /// LayerNorm output (T, C); between the QKV projection and the next LayerNorm, the
    /// attention output token-major (T, C), the input of the output projection.
    ln: Vec<f32>,
    /// Fused QKV projection (T, 3C) until attention has read it, then the MLP hidden (T, F):
    /// (T, max(3C, F)).
    wide: Vec<f32>,
    /// Attention output head-major (H, T, hd), as the parallel heads write it, until it is
    /// turned token-major; then the projection outputs before the residual add (T, C).
    heads: Vec<f32>,
    /// Position and sequence of each token of the current micro-batch.
    pos: Vec<usize>,
    seq: Vec<usize>,
    /// Next free position per sequence while a batch is being placed.
    next: Vec<usize>,
    mm: Scratch,
}

impl State {
    /// A state for `n_seq` sequences of up to `n_ctx` tokens, KV elements of type `kv`.
    pub fn new(hp: &Hparams, n_ctx: usize, n_seq: usize, kv: KvType) -> Result<State, RunError> {
        let d = Dims::of(hp);
        if n_ctx == 0 || n_ctx > d.ctx {
            return Err(RunError::BadContext { n_ctx, max: d.ctx });
        }
        if n_seq == 0 || n_seq > MAX_SEQ {
            return Err(RunError::BadRequest(format!(
                "n_seq = {n_seq} is not in 1..={MAX_SEQ}"
            )));
        }
        let cache = KvCache::new(kv, d.layer, n_seq, n_ctx, d.head, d.head_dim)
            .map_err(RunError::BadRequest)?;
        Ok(State {
            cache,
            cap: 0,
            x: Vec::new(),
            ln: Vec::new(),
            wide: Vec::new(),
            heads: Vec::new(),
            pos: Vec::new(),
            seq: Vec::new(),
            next: vec![0; n_seq],
            mm: Scratch::default(),
        })
    }

    /// Grow the activation buffers to hold `t` tokens (no-op once they are large enough).
    fn reserve(&mut self, d: Dims, t: usize) {
        if t <= self.cap {
            return;
        }
        let c = d.embd;
        self.x.resize(t * c, 0.0);
        self.ln.resize(t * c, 0.0);
        self.wide.resize(t * wide_width(d), 0.0);
        self.heads.resize(t * c, 0.0);
        self.pos.resize(t, 0);
        self.seq.resize(t, 0);
        self.cap = t;
    }

    /// The KV cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }
    /// Tokens already in sequence `seq`.
    pub fn n_past(&self, seq: usize) -> usize {
        self.cache.len(seq)
    }
    /// Copy sequence 0's cache into every other sequence.
    pub fn fork(&mut self) {
        self.cache.fork(0);
    }
    /// Empty every sequence.
    pub fn reset(&mut self) {
        self.cache.clear();
    }
    /// Empty sequence `seq` only (a server slot being reused); the others keep their tokens.
    pub fn reset_seq(&mut self, seq: usize) {
        self.cache.clear_seq(seq);
    }
    /// Bytes of activation scratch currently allocated (excluding the KV cache and the
    /// matmul's own scratch).
    pub fn scratch_bytes(&self) -> usize {
        4 * (self.x.len() + self.ln.len() + self.wide.len() + self.heads.len())
    }
}

impl Gpt2 {
    /// A fresh [`State`] for this model.
    pub fn new_state(&self, n_ctx: usize, n_seq: usize, kv: KvType) -> Result<State, RunError> {
        State::new(&self.hparams, n_ctx, n_seq, kv)
    }

    /// Run `tokens` through the model, appending each to its sequence's cache, and write
    /// `out`. Everything is validated first: on error the state is unchanged.
    pub fn eval(
        &self,
        st: &mut State,
        tokens: &[u32],
        seqs: Seqs<'_>,
        out: Output<'_>,
    ) -> Result<(), RunError> {
        // Run the whole pass on a pool worker. Called from outside the pool, every parallel
        // loop (about a hundred per decoded token) would be injected into the pool, woken up and
        // waited for; from inside, the calling worker takes part in each loop and the others
        // steal from it, and only this one call pays the hand-off. With `-t 2` on two cores it
        // also keeps the number of busy threads equal to the number of cores.
        if rayon::current_thread_index().is_some() {
            self.eval_in_pool(st, tokens, seqs, out)
        } else {
            rayon::scope(|_| self.eval_in_pool(st, tokens, seqs, out))
        }
    }

    fn eval_in_pool(
        &self,
        st: &mut State,
        tokens: &[u32],
        seqs: Seqs<'_>,
        mut out: Output<'_>,
    ) -> Result<(), RunError> {
        let hp = &self.hparams;
        let d = Dims::of(hp);
        let (t_all, c, v) = (tokens.len(), d.embd, d.vocab);
        if t_all == 0 {
            return Err(RunError::BadRequest("no tokens to evaluate".to_string()));
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(RunError::TokenOutOfRange { token, n_vocab: v });
        }
        let n_seq = st.cache.n_seq();
        match seqs {
            Seqs::One(s) if s >= n_seq => {
                return Err(RunError::BadRequest(format!(
                    "sequence {s} does not exist (n_seq = {n_seq})"
                )))
            }
            Seqs::Each(ids) if ids.len() != t_all => {
                return Err(RunError::BadRequest(format!(
                    "{} sequence ids for {t_all} tokens",
                    ids.len()
                )))
            }
            Seqs::Each(ids) => {
                if let Some(&s) = ids.iter().find(|&&s| s >= n_seq) {
                    return Err(RunError::BadRequest(format!(
                        "sequence {s} does not exist (n_seq = {n_seq})"
                    )));
                }
            }
            Seqs::One(_) => {}
        }
        // Room in every sequence touched.
        for s in 0..n_seq {
            st.next[s] = st.cache.len(s);
        }
        for i in 0..t_all {
            st.next[seqs.get(i)] += 1;
        }
        for s in 0..n_seq {
            if st.next[s] > st.cache.n_ctx() {
                let have = st.cache.len(s);
                return Err(RunError::ContextFull {
                    seq: s,
                    have,
                    adding: st.next[s] - have,
                    n_ctx: st.cache.n_ctx(),
                });
            }
        }
        if let Output::Rows { rows, .. } = &out {
            if rows.windows(2).any(|w| w[0] >= w[1]) || rows.last().is_some_and(|&r| r >= t_all) {
                return Err(RunError::BadRequest(format!(
                    "output rows must be strictly increasing and below {t_all}"
                )));
            }
        }
        let want = match &out {
            Output::Nothing => 0,
            Output::LastLogits(_) => v,
            Output::AllLogits(_) => t_all * v,
            Output::Hidden(_) => t_all * c,
            Output::Rows { rows, .. } => rows.len() * v,
        };
        let got = match &out {
            Output::Nothing => 0,
            Output::LastLogits(o) | Output::AllLogits(o) | Output::Hidden(o) => o.len(),
            Output::Rows { out, .. } => out.len(),
        };
        if got != want {
            return Err(RunError::BadRequest(format!(
                "output buffer holds {got} values, expected {want}"
            )));
        }

        // KV rows for every position this batch adds, allocated now (not at creation, so
        // memory follows the tokens actually run).
        for s in 0..n_seq {
            st.cache.reserve(s, st.next[s]);
        }

        // Place the tokens: each goes at the next free position of its sequence.
        for s in 0..n_seq {
            st.next[s] = st.cache.len(s);
        }
        let mut start = 0;
        while start < t_all {
            let end = (start + UBATCH).min(t_all);
            let t = end - start;
            st.reserve(d, t);
            for i in 0..t {
                let s = seqs.get(start + i);
                st.seq[i] = s;
                st.pos[i] = st.next[s];
                st.next[s] += 1;
            }
            self.forward(st, &tokens[start..end])?;
            for s in 0..n_seq {
                st.cache.set_len(s, st.next[s]);
            }

            // Final LayerNorm and the head, only for the rows asked for.
            let lnf = &self.weights.output_norm;
            let head = self.weights.lm_head();
            let (x, ln) = (&st.x[..t * c], &mut st.ln[..t * c]);
            // The head is step n_layer for a streamed model (only when it is used).
            let head_step = d.layer;
            match &mut out {
                Output::Nothing => {}
                Output::LastLogits(o) => {
                    if end == t_all {
                        let last = &x[(t - 1) * c..];
                        ops::layer_norm(last, &lnf.w, &lnf.b, hp.eps, &mut ln[..c]);
                        self.enter_step(head_step);
                        let mm = &mut st.mm;
                        self.with_weight(head, |w| matmul(w, &ln[..c], 1, None, o, mm))?;
                        self.leave_step(head_step);
                    }
                }
                Output::AllLogits(o) => {
                    layer_norm_rows_par(x, &lnf.w, &lnf.b, hp.eps, ln);
                    self.enter_step(head_step);
                    let (o, mm) = (&mut o[start * v..end * v], &mut st.mm);
                    self.with_weight(head, |w| matmul(w, ln, t, None, o, mm))?;
                    self.leave_step(head_step);
                }
                Output::Hidden(o) => {
                    layer_norm_rows_par(x, &lnf.w, &lnf.b, hp.eps, &mut o[start * c..end * c]);
                }
                Output::Rows { rows, out } => {
                    // The listed rows of this micro-batch, gathered into `ln` in order.
                    let first = rows.partition_point(|&r| r < start);
                    let n = rows[first..].partition_point(|&r| r < end);
                    for (k, &r) in rows[first..first + n].iter().enumerate() {
                        let xr = &x[(r - start) * c..(r - start + 1) * c];
                        ops::layer_norm(xr, &lnf.w, &lnf.b, hp.eps, &mut ln[k * c..(k + 1) * c]);
                    }
                    if n > 0 {
                        let o = &mut out[first * v..(first + n) * v];
                        self.enter_step(head_step);
                        let (ln, mm) = (&ln[..n * c], &mut st.mm);
                        self.with_weight(head, |w| matmul(w, ln, n, None, o, mm))?;
                        self.leave_step(head_step);
                    }
                }
            }
            start = end;
        }
        Ok(())
    }

    /// One micro-batch through the embeddings and every block, leaving the residual stream
    /// (T, C) in `st.x` and the new K/V rows in the cache. `st.pos`/`st.seq` are set.
    fn forward(&self, st: &mut State, tokens: &[u32]) -> Result<(), RunError> {
        let hp = &self.hparams;
        let d = Dims::of(hp);
        let w = &self.weights;
        let (t, c, f) = (tokens.len(), d.embd, d.ff);
        let State {
            cache,
            x,
            ln,
            wide,
            heads,
            pos,
            seq,
            mm,
            ..
        } = st;
        // Each buffer holds two activations whose lifetimes within a block do not overlap
        // (see the fields of `State`).
        let (x, ln, heads) = (&mut x[..t * c], &mut ln[..t * c], &mut heads[..t * c]);
        let wide = &mut wide[..t * wide_width(d)];
        let (pos, seq) = (&pos[..t], &seq[..t]);

        // x = wte[token] + wpe[pos]                                           (T, C)
        for (i, (xr, &tok)) in x.chunks_exact_mut(c).zip(tokens).enumerate() {
            let tmp_row = &mut heads[..c];
            embed_row(&w.token_embd, tok as usize, xr)?;
            embed_row(&w.pos_embd, pos[i], tmp_row)?;
            ops::add_inplace(xr, tmp_row);
        }

        for (l, lw) in w.layers.iter().enumerate() {
            // Streamed weights of this block read ahead, and of the next ones (residency.rs).
            self.enter_step(l);
            // --- attention ---
            // ln = LN1(x)                                                       (T, C)
            layer_norm_rows_par(x, &lw.attn_norm.w, &lw.attn_norm.b, hp.eps, ln);
            // qkv = ln · W_qkvᵀ + b                                             (T, 3C)
            let qkv = &mut wide[..t * 3 * c];
            self.with_weight(&lw.attn_qkv, |w| {
                matmul(w, ln, t, Some(&lw.attn_qkv_b), qkv, mm)
            })?;
            // K, V rows into the cache, then each query attends over its sequence's
            // positions 0..=pos (causal: later tokens of this batch are not yet visible).
            for (i, row) in qkv.chunks_exact(3 * c).enumerate() {
                cache.store(l, seq[i], pos[i], &row[c..2 * c], &row[2 * c..]);
            }
            attention(cache, d, l, qkv, pos, seq, heads);
            // (H, T, hd) → (T, C): heads side by side, as the output projection expects.
            let hd = d.head_dim;
            let att = &mut *ln;
            for (h, head_out) in heads.chunks_exact(t * hd).enumerate() {
                for (i, r) in head_out.chunks_exact(hd).enumerate() {
                    att[i * c + h * hd..i * c + (h + 1) * hd].copy_from_slice(r);
                }
            }
            // x += att · W_oᵀ + b                                               (T, C)
            self.with_weight(&lw.attn_out, |w| {
                matmul(w, att, t, Some(&lw.attn_out_b), heads, mm)
            })?;
            ops::add_inplace(x, heads);

            // --- MLP ---
            // ln = LN2(x)                                                       (T, C)
            layer_norm_rows_par(x, &lw.ffn_norm.w, &lw.ffn_norm.b, hp.eps, ln);
            // up = GELU(ln · W_upᵀ + b)                                         (T, F)
            let up = &mut wide[..t * f];
            self.with_weight(&lw.ffn_up, |w| matmul(w, ln, t, Some(&lw.ffn_up_b), up, mm))?;
            if t > 1 {
                up.par_chunks_mut(f).for_each(ops::gelu_inplace);
            } else {
                ops::gelu_inplace(up);
            }
            // x += up · W_downᵀ + b                                             (T, C)
            self.with_weight(&lw.ffn_down, |w| {
                matmul(w, up, t, Some(&lw.ffn_down_b), heads, mm)
            })?;
            ops::add_inplace(x, heads);
            self.leave_step(l);
        }
        Ok(())
    }
}

/// Width of the buffer that holds Q|K|V (3C) and then the MLP hidden (F).
fn wide_width(d: Dims) -> usize {
    (3 * d.embd).max(d.ff)
}

/// Row `r` of an embedding table, dequantized into `out` (C).
fn embed_row(m: &super::weights::Matrix, r: usize, out: &mut [f32]) -> Result<(), RunError> {
    let bytes = m.row(r).ok_or_else(|| {
        RunError::BadRequest(format!("row {r} of {} is out of range", m.info.name))
    })?;
    m.check_row(r)?;
    ggpt_quant::tensor::dequantize(m.ty(), bytes, out)
        .map_err(|e| RunError::BadRequest(format!("{}: {e}", m.info.name)))
}

/// LayerNorm over the rows of (T, C), split across threads when there are many rows.
fn layer_norm_rows_par(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let c = w.len();
    if x.len() / c < 16 {
        ops::layer_norm_rows(x, w, b, eps, out);
    } else {
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(o, xr)| ops::layer_norm(xr, w, b, eps, o));
    }
}

/// Causal multi-head attention for one layer: out (H, T, hd) from Q (columns 0..C of qkv,
/// (T, 3C)) and each token's sequence's cache, positions 0..=pos.
///
/// Heads run in parallel. Within a head, each run of consecutive tokens from one sequence
/// fetches that sequence's K and V once (as f32, converted from an F16 cache) and every query
/// of the run attends over its own prefix.
fn attention(
    cache: &KvCache,
    d: Dims,
    layer: usize,
    qkv: &[f32],
    pos: &[usize],
    seq: &[usize],
    out: &mut [f32],
) {
    let (t, c, hd) = (pos.len(), d.embd, d.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    let head = |h: usize, out_h: &mut [f32]| {
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            let (kv_buf, scores) = (&mut scratch.0, &mut scratch.1);
            // Sized for the whole context at once: growing with n_kv would reallocate
            // during decoding.
            // Two rows: prompts attend two queries at a time.
            let row = cache.n_ctx() + 4 * hd;
            if scores.len() < 2 * row {
                scores.resize(2 * row, 0.0);
            }
            let (s0, s1) = scores.split_at_mut(row);
            let mut i = 0;
            while i < t {
                let s = seq[i];
                let end = i + seq[i..].iter().take_while(|&&x| x == s).count();
                let n_kv = pos[i..end].iter().max().map_or(0, |&p| p + 1);
                // A prompt's many queries share one conversion of the head to f32; a few
                // (decode) read the cache in place.
                let kv = if end - i >= F32_HEAD_MIN_QUERIES {
                    cache.head_f32(layer, s, h, n_kv, kv_buf)
                } else {
                    cache.head(layer, s, h, n_kv)
                };
                let q = |j: usize| &qkv[j * 3 * c + h * hd..j * 3 * c + (h + 1) * hd];
                let mut j = i;
                // Queries in pairs (the kernel reads K and V once for both), results the
                // same as one at a time.
                while j + 2 <= end {
                    let (o0, o1) = out_h[j * hd..(j + 2) * hd].split_at_mut(hd);
                    let n = [pos[j] + 1, pos[j + 1] + 1];
                    attention::attend2([q(j), q(j + 1)], &kv, n, scale, [s0, s1], [o0, o1]);
                    j += 2;
                }
                if j < end {
                    let o = &mut out_h[j * hd..(j + 1) * hd];
                    attention::attend(q(j), &kv, pos[j] + 1, scale, s0, o);
                }
                i = end;
            }
        })
    };
    let work: usize = pos.iter().map(|p| (p + 1) * c).sum();
    if work < PAR_ATTENTION_MIN_WORK {
        out.chunks_exact_mut(t * hd)
            .enumerate()
            .for_each(|(h, o)| head(h, o));
    } else {
        out.par_chunks_exact_mut(t * hd)
            .enumerate()
            .for_each(|(h, o)| head(h, o));
    }
}
