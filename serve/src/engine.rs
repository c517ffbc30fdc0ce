//! The engine: one thread that owns every model's KV cache and runs continuous batching.
//!
//! Each model has `parallel` slots, the sequences of one multi-sequence [`State`]. A step
//! gathers, for every model with work, the next token of every decoding sequence plus up to
//! `prefill_chunk` pending prompt tokens (oldest request first) into one `eval`, so the
//! weights are read once for all of them. Only the rows whose logits are needed go through
//! the output projection: one per sequence that samples this step, and every prompt row of a
//! request that asked for prompt logprobs (`echo`).
//!
//! Requests join at the next step and leave when done. A request whose event receiver was
//! dropped (the client went away) or whose cancel flag was set (a stop string matched) is
//! freed at the start of the next step, before any more work is done for it.
//!
//! Each sequence samples with its own [`Sampler`] seeded per request, so its tokens do not
//! depend on what else runs; with batch-invariant kernels its logits do not either.
//!
//! A request's events go through an [`EventSender`] that counts what its handler has not
//! read yet. A sequence whose request has [`EVENTS_PER_SEQ`] unread events per sequence is
//! paused: it keeps its slot but is left out of the steps until the handler catches up, so a
//! client that reads slowly paces its own generation and one that stops reading costs no
//! compute and no memory beyond that bound. The handler gives up on a client that has not
//! read for `--timeout` and drops its receiver, which frees the slot at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ggpt::model::Model;
use ggpt::sampler::{Sampler, SamplerConfig};
use ggpt_models::{KvType, Output, Seqs, State};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::metrics::Metrics;

/// Sampling settings of one sequence (OpenAI's fields plus llama.cpp's extensions).
#[derive(Clone, Debug)]
pub struct Params {
    pub sampler: SamplerConfig,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// Alternatives to report per position (`logprobs`); `None` = no logprobs.
    pub logprobs: Option<usize>,
    /// Report the logprob of every prompt token after the first (`echo` with `logprobs`).
    pub prompt_logprobs: bool,
    pub max_tokens: usize,
    /// Stop at the end-of-text token.
    pub stop_at_eos: bool,
}

/// A token's log-probability under the model (log-softmax of the raw logits, before
/// penalties, bias and temperature) and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` reached.
    Length,
    /// The end-of-text token.
    Eos,
}

/// What the engine tells a request about one of its sequences.
#[derive(Debug)]
pub enum Event {
    /// Logprobs of prompt tokens 1..len (sent once the prompt is processed).
    Prompt {
        choice: usize,
        logprobs: Vec<TokenLogprob>,
    },
    /// One generated token (never the end-of-text token).
    Token {
        choice: usize,
        token: u32,
        logprob: Option<TokenLogprob>,
    },
    /// The sequence ended; `generated` counts every sampled token, end-of-text included.
    Done {
        choice: usize,
        finish: Finish,
        generated: usize,
    },
    /// The sequence failed or the server is shutting down.
    Error { choice: usize, message: String },
}

/// Unread events allowed per sequence of a request before the engine pauses it. A step
/// sends at most three events per sequence (prompt logprobs, a token, the end), so a handler
/// that keeps up never sees its sequences paused.
pub const EVENTS_PER_SEQ: usize = 16;

/// The engine's end of a request's event channel: unbounded underneath, but counting the
/// events its receiver has not taken yet so the engine can pause the request's sequences
/// while that count is at the limit (see the module docs).
#[derive(Clone, Debug)]
pub struct EventSender {
    tx: tmpsc::UnboundedSender<Event>,
    unread: Arc<AtomicUsize>,
    limit: usize,
}

/// The handler's end of a request's event channel.
#[derive(Debug)]
pub struct EventReceiver {
    rx: tmpsc::UnboundedReceiver<Event>,
    unread: Arc<AtomicUsize>,
}

/// A channel for a request of `n_seqs` sequences: [`EVENTS_PER_SEQ`] unread events per
/// sequence pause them all.
pub fn event_channel(n_seqs: usize) -> (EventSender, EventReceiver) {
    let (tx, rx) = tmpsc::unbounded_channel();
    let unread = Arc::new(AtomicUsize::new(0));
    (
        EventSender {
            tx,
            unread: Arc::clone(&unread),
            limit: n_seqs.max(1) * EVENTS_PER_SEQ,
        },
        EventReceiver { rx, unread },
    )
}

impl EventSender {
    /// Send an event (never blocks, never refused for being full: the engine checks
    /// [`EventSender::is_full`] before doing more work). False if the receiver is gone.
    pub fn send(&self, ev: Event) -> bool {
        // Counted before sending so the receiver never takes an event it has not counted.
        self.unread.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(ev).is_err() {
            self.unread.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The receiver was dropped (the client went away or timed out).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The receiver has the limit of unread events: generate nothing more for now.
    pub fn is_full(&self) -> bool {
        self.unread.load(Ordering::SeqCst) >= self.limit
    }

    /// Events sent and not yet received.
    pub fn unread(&self) -> usize {
        self.unread.load(Ordering::SeqCst)
    }
}

impl EventReceiver {
    /// The next event; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await;
        if ev.is_some() {
            self.unread.fetch_sub(1, Ordering::SeqCst);
        }
        ev
    }
}

/// One sequence to run: a prompt and its settings.
pub struct SeqJob {
    pub model: usize,
    pub prompt: Vec<u32>,
    pub params: Params,
    pub choice: usize,
    /// Set by the request's handler to end the sequence (e.g. a stop string matched).
    pub cancel: Arc<AtomicBool>,
    pub events: EventSender,
    pub arrived: Instant,
}

/// Mean-pooled embeddings of some token lists.
pub struct EmbedJob {
    pub model: usize,
    pub inputs: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

enum Job {
    Seqs(Vec<SeqJob>),
    Embed(EmbedJob),
    Shutdown,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Slots (concurrent sequences) per model.
    pub parallel: usize,
    /// Context per slot.
    pub n_ctx: usize,
    /// Prompt tokens processed per step at most (across all prompts of a model).
    pub prefill_chunk: usize,
    /// Sequences that may wait for a slot, per model; more are refused.
    pub max_queue: usize,
    pub kv_type: KvType,
}

/// Why a submission was refused.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull { waiting: usize, max: usize },
    ShuttingDown,
}

/// Per-model counters the handlers read.
struct ModelLoad {
    /// Sequences submitted and not yet finished (waiting + running).
    in_system: AtomicUsize,
}

/// The handlers' side of the engine.
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    load: Vec<ModelLoad>,
    cfg: EngineConfig,
    shutting_down: AtomicBool,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl EngineHandle {
    /// Start the engine thread over `models`.
    pub fn start(
        models: Vec<Arc<Model>>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<EngineHandle>, ggpt_models::RunError> {
        // Per-row matmul results independent of how many rows share a call: a request's
        // tokens and logprobs do not depend on what else runs (docs/serving.md).
        ggpt_quant::matmul::set_batch_invariant(true);
        let mut runners = Vec::with_capacity(models.len());
        for m in &models {
            runners.push(Runner::new(Arc::clone(m), &cfg)?);
        }
        metrics.slots.set((cfg.parallel * models.len()) as f64);
        let (tx, rx) = mpsc::channel();
        let handle = Arc::new(EngineHandle {
            tx,
            load: models
                .iter()
                .map(|_| ModelLoad {
                    in_system: AtomicUsize::new(0),
                })
                .collect(),
            cfg,
            shutting_down: AtomicBool::new(false),
            thread: std::sync::Mutex::new(None),
        });
        let h = Arc::clone(&handle);
        let t = std::thread::Builder::new()
            .name("ggpt-engine".into())
            .spawn(move || engine_loop(runners, rx, h, metrics))
            .expect("spawn the engine thread");
        *handle.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(handle)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Queue sequences (all of one request, all for one model). Refused as a whole if the
    /// model's queue cannot take them.
    pub fn submit(&self, jobs: Vec<SeqJob>) -> Result<(), SubmitError> {
        if jobs.is_empty() {
            return Ok(());
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let m = jobs[0].model;
        let cap = self.cfg.parallel + self.cfg.max_queue;
        let n = jobs.len();
        let load = &self.load[m].in_system;
        let mut cur = load.load(Ordering::SeqCst);
        loop {
            if cur + n > cap {
                return Err(SubmitError::QueueFull {
                    waiting: cur.saturating_sub(self.cfg.parallel),
                    max: self.cfg.max_queue,
                });
            }
            match load.compare_exchange(cur, cur + n, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(x) => cur = x,
            }
        }
        if self.tx.send(Job::Seqs(jobs)).is_err() {
            load.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(())
    }

    /// Run an embedding job between steps.
    pub fn embed(&self, job: EmbedJob) -> Result<(), SubmitError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        self.tx
            .send(Job::Embed(job))
            .map_err(|_| SubmitError::ShuttingDown)
    }

    /// Stop taking work, end every sequence with an error event, and wait for the thread.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Job::Shutdown);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    fn finished(&self, model: usize) {
        self.load[model].in_system.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A sequence in a slot.
struct Seq {
    job: SeqJob,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    generated: usize,
    /// Prompt and generated tokens (the repetition penalty's window).
    history: Vec<u32>,
    sampler: Sampler,
    /// Token sampled last step, to be fed this step.
    next: Option<u32>,
    prompt_lp: Vec<TokenLogprob>,
    /// Occurrences of each generated token (presence/frequency penalties); empty if unused.
    counts: Vec<(u32, u32)>,
    last_token_at: Option<Instant>,
}

impl Seq {
    fn gone(&self) -> bool {
        self.job.cancel.load(Ordering::Relaxed) || self.job.events.is_closed()
    }
}

/// What to do with one output row of a step.
#[derive(Clone, Copy)]
enum RowUse {
    /// Sample the next token of the sequence in `slot`.
    Sample(usize),
    /// Logprob of prompt token `pos + 1` (the row holds prompt token `pos`); when
    /// `pos + 1` is the prompt length, sample instead.
    Prompt(usize, usize),
}

/// One model's slots and buffers.
struct Runner {
    model: Arc<Model>,
    state: State,
    embed_state: Option<State>,
    slots: Vec<Option<Seq>>,
    waiting: VecDeque<SeqJob>,
    /// Slots still prefilling, in admission order.
    prefilling: VecDeque<usize>,
    prefill_chunk: usize,
    n_vocab: usize,
    eos: Option<u32>,
    // Step buffers, reused.
    tokens: Vec<u32>,
    seq_ids: Vec<usize>,
    rows: Vec<usize>,
    uses: Vec<RowUse>,
    logits: Vec<f32>,
    adjusted: Vec<f32>,
}

impl Runner {
    fn new(model: Arc<Model>, cfg: &EngineConfig) -> Result<Runner, ggpt_models::RunError> {
        let state = model
            .gpt2()
            .new_state(cfg.n_ctx, cfg.parallel, cfg.kv_type)?;
        let n_vocab = model.hparams().n_vocab as usize;
        let eos = model.tokenizer().eos_id();
        Ok(Runner {
            state,
            embed_state: None,
            slots: (0..cfg.parallel).map(|_| None).collect(),
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            prefill_chunk: cfg.prefill_chunk.max(1),
            n_vocab,
            eos,
            tokens: Vec::new(),
            seq_ids: Vec::new(),
            rows: Vec::new(),
            uses: Vec::new(),
            logits: Vec::new(),
            adjusted: Vec::new(),
            model,
        })
    }

    fn has_work(&self) -> bool {
        !self.waiting.is_empty() || self.slots.iter().any(|s| s.is_some())
    }

    fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Decoding sequences left out of the steps until their client reads.
    fn paused(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|s| s.next.is_some() && s.job.events.is_full())
            .count()
    }

    /// Free slots whose client left or whose request was cancelled; drop such waiting jobs.
    fn reap(&mut self, engine: &EngineHandle, m: usize) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].as_ref().is_some_and(|s| s.gone()) {
                self.free(slot, engine, m);
            }
        }
        let before = self.waiting.len();
        self.waiting
            .retain(|j| !(j.cancel.load(Ordering::Relaxed) || j.events.is_closed()));
        for _ in self.waiting.len()..before {
            engine.finished(m);
        }
    }

    fn free(&mut self, slot: usize, engine: &EngineHandle, m: usize) {
        if self.slots[slot].take().is_some() {
            self.state.reset_seq(slot);
            self.prefilling.retain(|&s| s != slot);
            engine.finished(m);
        }
    }

    /// Move waiting jobs into free slots.
    fn admit(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                continue;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.state.reset_seq(slot);
            let p = &job.params;
            let uses_counts = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
            let seq = Seq {
                prefilled: 0,
                generated: 0,
                history: job.prompt.clone(),
                sampler: Sampler::new(p.sampler),
                next: None,
                prompt_lp: Vec::new(),
                counts: if uses_counts {
                    Vec::with_capacity(64)
                } else {
                    Vec::new()
                },
                last_token_at: None,
                job,
            };
            self.slots[slot] = Some(seq);
            self.prefilling.push_back(slot);
        }
    }

    /// One forward pass over this model's active sequences. Returns (tokens, sequences).
    fn step(&mut self, engine: &EngineHandle, m: usize, metrics: &Metrics) -> (usize, usize) {
        self.tokens.clear();
        self.seq_ids.clear();
        self.rows.clear();
        self.uses.clear();
        // Decoding sequences: one token each, except those whose client has the limit of
        // unread events (paused until it reads).
        for (slot, s) in self.slots.iter().enumerate() {
            let ready = s.as_ref().filter(|s| !s.job.events.is_full());
            if let Some(tok) = ready.and_then(|s| s.next) {
                self.rows.push(self.tokens.len());
                self.uses.push(RowUse::Sample(slot));
                self.tokens.push(tok);
                self.seq_ids.push(slot);
            }
        }
        let n_decode = self.tokens.len();
        // Prompts: a bounded chunk, oldest first.
        let mut budget = self.prefill_chunk;
        let mut n_seqs = n_decode;
        for &slot in &self.prefilling {
            if budget == 0 {
                break;
            }
            let s = self.slots[slot]
                .as_ref()
                .expect("prefilling slot holds a sequence");
            let len = s.job.prompt.len();
            let take = (len - s.prefilled).min(budget);
            let echo = s.job.params.prompt_logprobs;
            for p in s.prefilled..s.prefilled + take {
                if echo || p + 1 == len {
                    self.rows.push(self.tokens.len());
                    self.uses.push(RowUse::Prompt(slot, p));
                }
                self.tokens.push(s.job.prompt[p]);
                self.seq_ids.push(slot);
            }
            budget -= take;
            n_seqs += 1;
        }
        if self.tokens.is_empty() {
            return (0, 0);
        }
        let v = self.n_vocab;
        self.logits.resize(self.rows.len() * v, 0.0);
        let out = Output::Rows {
            rows: &self.rows,
            out: &mut self.logits[..self.rows.len() * v],
        };
        let result = self.model.gpt2().eval(
            &mut self.state,
            &self.tokens,
            Seqs::Each(&self.seq_ids),
            out,
        );
        // Advance the prompt counters (the cache holds these tokens now).
        let mut advanced = 0;
        for &slot in self.prefilling.iter() {
            let pending = self.tokens.len() - n_decode - advanced;
            if pending == 0 {
                break;
            }
            let s = self.slots[slot]
                .as_mut()
                .expect("prefilling slot holds a sequence");
            let take = (s.job.prompt.len() - s.prefilled).min(pending);
            s.prefilled += take;
            advanced += take;
        }
        self.prefilling.retain(|&slot| {
            self.slots[slot]
                .as_ref()
                .is_some_and(|s| s.prefilled < s.job.prompt.len())
        });
        if let Err(e) = result {
            let msg = format!("forward pass failed: {e}");
            for slot in self.seq_ids.clone() {
                if let Some(s) = &self.slots[slot] {
                    let _ = s.job.events.send(Event::Error {
                        choice: s.job.choice,
                        message: msg.clone(),
                    });
                    self.free(slot, engine, m);
                }
            }
            return (self.tokens.len(), n_seqs);
        }
        for k in 0..self.uses.len() {
            self.use_row(k, engine, m, metrics);
        }
        (self.tokens.len(), n_seqs)
    }

    fn use_row(&mut self, k: usize, engine: &EngineHandle, m: usize, metrics: &Metrics) {
        let v = self.n_vocab;
        let row = &self.logits[k * v..(k + 1) * v];
        let (slot, sample) = match self.uses[k] {
            RowUse::Sample(slot) => (slot, true),
            RowUse::Prompt(slot, pos) => {
                let Some(s) = self.slots[slot].as_mut() else {
                    return;
                };
                let len = s.job.prompt.len();
                if pos + 1 < len {
                    let n_top = s.job.params.logprobs.unwrap_or(0);
                    s.prompt_lp
                        .push(logprob_of(row, s.job.prompt[pos + 1], n_top));
                    return;
                }
                if s.job.params.prompt_logprobs {
                    let _ = s.job.events.send(Event::Prompt {
                        choice: s.job.choice,
                        logprobs: std::mem::take(&mut s.prompt_lp),
                    });
                }
                (slot, true)
            }
        };
        debug_assert!(sample);
        if !row.iter().fold(true, |ok, x| ok & x.is_finite()) {
            if let Some(s) = &self.slots[slot] {
                let _ = s.job.events.send(Event::Error {
                    choice: s.job.choice,
                    message: format!(
                        "the forward pass produced non-finite logits; the model file {} is damaged",
                        self.model.file().path().display()
                    ),
                });
            }
            self.free(slot, engine, m);
            return;
        }
        let eos = self.eos;
        let Some(s) = self.slots[slot].as_mut() else {
            return;
        };
        let p = &s.job.params;
        if p.max_tokens == 0 {
            let _ = s.job.events.send(Event::Done {
                choice: s.job.choice,
                finish: Finish::Length,
                generated: 0,
            });
            self.free(slot, engine, m);
            return;
        }
        // Bias and penalties on a copy; the sampler applies the rest.
        let logits: &[f32] = if p.logit_bias.is_empty() && s.counts.is_empty() {
            row
        } else {
            self.adjusted.clear();
            self.adjusted.extend_from_slice(row);
            for &(id, b) in &p.logit_bias {
                self.adjusted[id as usize] += b;
            }
            for &(id, n) in &s.counts {
                self.adjusted[id as usize] -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
            &self.adjusted
        };
        let token = s.sampler.sample(logits, &s.history);
        let lp = p.logprobs.map(|n| logprob_of(row, token, n));
        s.generated += 1;
        s.history.push(token);
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            match s.counts.iter_mut().find(|(id, _)| *id == token) {
                Some((_, n)) => *n += 1,
                None => s.counts.push((token, 1)),
            }
        }
        let now = Instant::now();
        match s.last_token_at {
            None => metrics
                .ttft
                .record(now.duration_since(s.job.arrived).as_secs_f64()),
            Some(t) => metrics.itl.record(now.duration_since(t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        metrics.generated_tokens.increment(1);
        let choice = s.job.choice;
        let is_eos = p.stop_at_eos && Some(token) == eos;
        if !is_eos {
            let _ = s.job.events.send(Event::Token {
                choice,
                token,
                logprob: lp,
            });
        }
        let finish = if is_eos {
            Some(Finish::Eos)
        } else if s.generated >= p.max_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        match finish {
            Some(finish) => {
                let _ = s.job.events.send(Event::Done {
                    choice,
                    finish,
                    generated: s.generated,
                });
                self.free(slot, engine, m);
            }
            None => s.next = Some(token),
        }
    }

    fn embed(&mut self, inputs: &[Vec<u32>], n_ctx: usize) -> Result<Vec<Vec<f32>>, String> {
        let c = self.model.hparams().n_embd as usize;
        if self.embed_state.is_none() {
            self.embed_state = Some(
                self.model
                    .gpt2()
                    .new_state(n_ctx, 1, KvType::F16)
                    .map_err(|e| e.to_string())?,
            );
        }
        let st = self.embed_state.as_mut().expect("just set");
        let mut out = Vec::with_capacity(inputs.len());
        let mut hidden = Vec::new();
        for ids in inputs {
            st.reset();
            hidden.clear();
            hidden.resize(ids.len() * c, 0.0);
            self.model
                .gpt2()
                .eval(st, ids, Seqs::One(0), Output::Hidden(&mut hidden))
                .map_err(|e| e.to_string())?;
            let mut mean = vec![0f64; c];
            for r in hidden.chunks_exact(c) {
                for (m, x) in mean.iter_mut().zip(r) {
                    *m += f64::from(*x);
                }
            }
            let n = ids.len() as f64;
            let e: Vec<f32> = mean.iter().map(|m| (m / n) as f32).collect();
            if e.iter().any(|x| !x.is_finite()) {
                return Err("the forward pass produced non-finite hidden states".into());
            }
            out.push(e);
        }
        Ok(out)
    }
}

/// Log-softmax of `row` at `token`, and the `n_top` most likely tokens (highest first, lowest
/// id on ties).
pub fn logprob_of(row: &[f32], token: u32, n_top: usize) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |x: f32| (f64::from(x) - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n_top + 1);
    if n_top > 0 {
        for (i, &x) in row.iter().enumerate() {
            if top.len() == n_top && x <= top[n_top - 1].1 {
                continue;
            }
            let at = top.partition_point(|&(_, y)| y >= x);
            top.insert(at, (i as u32, x));
            top.truncate(n_top);
        }
    }
    TokenLogprob {
        token,
        logprob: lp(row[token as usize]),
        top: top.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    }
}

/// Sets the busy-slot and queue-depth gauges from the runners' current state.
fn publish_occupancy(runners: &[Runner], metrics: &Metrics) {
    let busy: usize = runners.iter().map(Runner::busy).sum();
    let paused: usize = runners.iter().map(Runner::paused).sum();
    metrics.paused_slots.set(paused as f64);
    let waiting: usize = runners.iter().map(|r| r.waiting.len()).sum();
    metrics.busy_slots.set(busy as f64);
    metrics.queue_depth.set(waiting as f64);
}

/// How long the engine waits between looks at paused sequences' clients when nothing else
/// can run.
const PAUSED_POLL: Duration = Duration::from_millis(2);

fn engine_loop(
    mut runners: Vec<Runner>,
    rx: mpsc::Receiver<Job>,
    engine: Arc<EngineHandle>,
    metrics: Arc<Metrics>,
) {
    let n_ctx = engine.cfg.n_ctx;
    let mut shutdown = false;
    // The last round ran no tokens although sequences were active: all of them are paused
    // for clients that have not read their events.
    let mut stalled = false;
    while !shutdown {
        let idle = !runners.iter().any(|r| r.has_work());
        let mut incoming = Vec::new();
        if idle {
            match rx.recv() {
                Ok(j) => incoming.push(j),
                Err(_) => break,
            }
        } else if stalled {
            // Wait for new work, or a little while for clients to read (or leave).
            match rx.recv_timeout(PAUSED_POLL) {
                Ok(j) => incoming.push(j),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(j) = rx.try_recv() {
            incoming.push(j);
        }
        for job in incoming {
            match job {
                Job::Seqs(jobs) => {
                    for j in jobs {
                        metrics.prompt_tokens.increment(j.prompt.len() as u64);
                        let m = j.model;
                        runners[m].waiting.push_back(j);
                    }
                }
                Job::Embed(e) => {
                    let r = runners[e.model].embed(&e.inputs, n_ctx);
                    let _ = e.reply.send(r);
                }
                Job::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            break;
        }
        // The gauges are published after admission and before the step, so a client that
        // has seen its first event also sees its slot counted.
        for (m, r) in runners.iter_mut().enumerate() {
            r.reap(&engine, m);
            r.admit();
        }
        publish_occupancy(&runners, &metrics);
        let mut ran = 0;
        for (m, r) in runners.iter_mut().enumerate() {
            if r.has_work() {
                let (t, s) = r.step(&engine, m, &metrics);
                ran += t;
                if t > 0 {
                    metrics.step_tokens.record(t as f64);
                    metrics.step_seqs.record(s as f64);
                }
                // Free slots of clients that left during the step right away.
                r.reap(&engine, m);
            }
        }
        stalled = ran == 0;
        publish_occupancy(&runners, &metrics);
    }
    // Shutting down: every sequence still known gets a final error event.
    for (m, r) in runners.iter_mut().enumerate() {
        let jobs: Vec<SeqJob> = r
            .waiting
            .drain(..)
            .chain(r.slots.iter_mut().filter_map(|s| s.take()).map(|s| s.job))
            .collect();
        for j in jobs {
            let _ = j.events.send(Event::Error {
                choice: j.choice,
                message: "the server is shutting down".into(),
            });
            engine.finished(m);
        }
    }
    // Jobs that arrived after the shutdown message.
    while let Ok(j) = rx.try_recv() {
        if let Job::Seqs(jobs) = j {
            for j in jobs {
                let _ = j.events.send(Event::Error {
                    choice: j.choice,
                    message: "the server is shutting down".into(),
                });
                engine.finished(j.model);
            }
        }
    }
    metrics.busy_slots.set(0.0);
    metrics.paused_slots.set(0.0);
    metrics.queue_depth.set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_sorted_alternatives() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprob_of(&row, 2, 3);
        let z: f64 = row.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((f64::from(lp.logprob) - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!(logprob_of(&row, 0, 0).top.is_empty());
    }
}
