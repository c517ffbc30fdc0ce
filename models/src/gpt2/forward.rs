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
use crate::anon::AnonMap;
use crate::attention;
use crate::kv_cache::{KvCache, KvType};
use crate::ops;

/// Most tokens pushed through the layers at once. Each micro-batch reads every weight once,
/// so fewer, larger ones are faster, but the activations grow with it (GPT-2 Medium: 28 KiB
/// per token); 256 keeps them at 7 MiB while a 512-token prompt reads the weights twice
/// instead of once (docs/performance.md).
pub const UBATCH: usize = 256;

/// Tokens in the last micro-batch of a batch that needs more than one. The last pass runs
/// beside a nearly full KV cache, and its activations are what the session's peak memory
/// adds to the cache, so it is kept short (2.1 MiB of activations for GPT-2 Medium instead
/// of 8.3 at [`UBATCH`]); the rest of the batch is spread evenly over as few passes as fit.
/// This costs one pass more than cutting at UBATCH for most long prompts (docs/memory.md).
pub const TAIL: usize = 64;

/// The micro-batch sizes, in order, that a batch of `t_all` tokens is run in: one pass when it
/// fits in [`UBATCH`]; otherwise a last pass of [`TAIL`] tokens after the rest, split into
/// the fewest passes of at most UBATCH tokens, of near-equal size.
pub fn micro_batches(t_all: usize) -> MicroBatches {
    if t_all <= UBATCH {
        MicroBatches {
            rest: t_all,
            parts: usize::from(t_all > 0),
            tail: 0,
        }
    } else {
        let rest = t_all - TAIL;
        MicroBatches {
            rest,
            parts: rest.div_ceil(UBATCH),
            tail: TAIL,
        }
    }
}

/// Iterator of [`micro_batches`].
#[derive(Clone, Debug)]
pub struct MicroBatches {
    /// Tokens before the tail not yet handed out.
    rest: usize,
    /// Passes left for them.
    parts: usize,
    /// Tokens of the last pass (0: no separate last pass).
    tail: usize,
}

impl Iterator for MicroBatches {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.parts > 0 {
            let u = self.rest.div_ceil(self.parts);
            self.rest -= u;
            self.parts -= 1;
            Some(u)
        } else if self.tail > 0 {
            Some(std::mem::take(&mut self.tail))
        } else {
            None
        }
    }
}

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
    /// Activations of the current micro-batch (x, ln, wide, heads below).
    acts: Activations,
    /// Position and sequence of each token of the current micro-batch.
    pos: Vec<usize>,
    seq: Vec<usize>,
    /// Next free position per sequence while a batch is being placed.
    next: Vec<usize>,
    mm: Scratch,
}

/// The activation buffers of one micro-batch, each with room for [`UBATCH`] tokens, as four
/// page-aligned regions of one anonymous mapping: pages become resident when a micro-batch
/// first writes them and are given back when a shorter one follows, so the memory held is
/// that of the micro-batch being run, not of the largest one seen.
///
/// Each region holds two activations whose lifetimes within a block do not overlap:
/// - x: the residual stream (T, C);
/// - ln: the LayerNorm output (T, C); between the QKV projection and the next LayerNorm,
///   the attention output token-major (T, C), the input of the output projection;
/// - heads: the attention output head-major (H, T, hd), as the parallel heads write it,
///   until it is turned token-major; then the projection outputs before the residual add (T, C);
/// - wide: the fused QKV projection (T, 3C) until attention has read it, then the MLP hidden
///   (T, F): (T, max(3C, F)).
struct Activations {
    map: AnonMap,
    /// f32 values per token of x, ln, heads, wide.
    widths: [usize; 4],
    /// f32 offset of each region (page-aligned).
    starts: [usize; 4],
    /// Tokens of the current micro-batch: no page of a region beyond them is resident.
    used: usize,
}

impl Activations {
    fn new(d: Dims) -> Result<Activations, RunError> {
        let c = d.embd;
        let widths = [c, c, c, wide_width(d)];
        let page_f32 = (crate::anon::page_size() / 4).max(1);
        let mut starts = [0; 4];
        let mut end = 0usize;
        for (s, &w) in starts.iter_mut().zip(&widths) {
            *s = end;
            end = w
                .checked_mul(UBATCH)
                .and_then(|n| n.checked_add(end))
                .map(|e| e.next_multiple_of(page_f32))
                .filter(|&e| e <= isize::MAX as usize / 4)
                .ok_or_else(|| RunError::BadRequest("activation buffers overflow".into()))?;
        }
        let map = AnonMap::new(4 * end, "activations").map_err(RunError::BadRequest)?;
        Ok(Activations {
            map,
            widths,
            starts,
            used: 0,
        })
    }

    /// Size the buffers for a micro-batch of `t` ≤ [`UBATCH`] tokens: the pages of tokens
    /// beyond `t` go back to the kernel; those up to `t` are supplied as they are written.
    fn fit(&mut self, t: usize) {
        debug_assert!(t <= UBATCH);
        if t < self.used {
            for (&s, &w) in self.starts.iter().zip(&self.widths) {
                self.map.release(4 * (s + t * w), 4 * (s + self.used * w));
            }
        }
        self.used = t;
    }

    /// (x, ln, heads, wide) for `t` tokens, each `t` × its width.
    fn split(&mut self, t: usize) -> [&mut [f32]; 4] {
        let [w0, w1, w2, w3] = self.widths;
        let [s0, s1, s2, s3] = self.starts;
        let all = self.map.elems_mut::<f32>();
        let (a, rest) = all[s0..].split_at_mut(s1 - s0);
        let (b, rest) = rest.split_at_mut(s2 - s1);
        let (h, wide) = rest.split_at_mut(s3 - s2);
        [
            &mut a[..t * w0],
            &mut b[..t * w1],
            &mut h[..t * w2],
            &mut wide[..t * w3],
        ]
    }

    /// Bytes of the regions' tokens in use.
    fn bytes(&self) -> usize {
        4 * self.used * self.widths.iter().sum::<usize>()
    }
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
            acts: Activations::new(d)?,
            pos: Vec::new(),
            seq: Vec::new(),
            next: vec![0; n_seq],
            mm: Scratch::default(),
        })
    }

    /// Buffers for a micro-batch of `t` tokens. A shorter one than the last gives the
    /// difference back (activations and the matmuls' quantized inputs), so what stays
    /// resident beside the KV cache is what the current micro-batch needs.
    fn fit(&mut self, t: usize) {
        if t < self.acts.used {
            self.mm = Scratch::default();
        }
        self.acts.fit(t);
        if self.pos.len() < t {
            self.pos.resize(t, 0);
            self.seq.resize(t, 0);
        }
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
        self.acts.bytes()
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
        for t in micro_batches(t_all) {
            let end = start + t;
            st.fit(t);
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
            let [x, ln, _, _] = st.acts.split(t);
            let x = &*x;
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
            acts,
            pos,
            seq,
            mm,
            ..
        } = st;
        // Each buffer holds two activations whose lifetimes within a block do not overlap
        // (see `Activations`).
        let [x, ln, heads, wide] = acts.split(t);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_by_hand() {
        let v = |n| micro_batches(n).collect::<Vec<_>>();
        assert_eq!(v(0), Vec::<usize>::new());
        assert_eq!(v(1), [1]);
        assert_eq!(v(UBATCH), [UBATCH]);
        // Past one micro-batch the last pass is TAIL tokens and the rest is spread evenly.
        assert_eq!(v(UBATCH + 1), [UBATCH + 1 - TAIL, TAIL]);
        assert_eq!(v(300), [236, 64]);
        assert_eq!(v(512), [224, 224, 64]);
        assert_eq!(v(1008), [236, 236, 236, 236, 64]);
        assert_eq!(v(1024), [240, 240, 240, 240, 64]);
        assert_eq!(v(1025), [241, 240, 240, 240, 64]);
        assert_eq!(v(1090), [206, 205, 205, 205, 205, 64]);
    }

    #[test]
    fn micro_batches_cover_the_batch_in_the_fewest_passes() {
        for n in 0..3000 {
            let v: Vec<usize> = micro_batches(n).collect();
            assert_eq!(v.iter().sum::<usize>(), n, "{n}: {v:?}");
            assert!(v.iter().all(|&u| (1..=UBATCH).contains(&u)), "{n}: {v:?}");
            if n > UBATCH {
                let (last, rest) = v.split_last().unwrap();
                assert_eq!(*last, TAIL, "{n}: {v:?}");
                assert_eq!(rest.len(), (n - TAIL).div_ceil(UBATCH), "{n}: {v:?}");
                let (lo, hi) = (rest.iter().min().unwrap(), rest.iter().max().unwrap());
                assert!(hi - lo <= 1, "{n}: {v:?}");
            } else {
                assert_eq!(v.len(), usize::from(n > 0), "{n}: {v:?}");
            }
        }
    }
}
