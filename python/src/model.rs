//! `ggpt.Model`: one mapped GGUF file shared by every call; each call runs its own session.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use ggpt::memory::{estimate, MemShape, RunShape};
use ggpt::model::Model as RustModel;
use ggpt::perplexity::{evaluate, window_count, Method, Report};
use ggpt::sampler::SamplerConfig;
use ggpt::session::Session;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::blocking::{self, SIGNAL_CHECK};
use crate::errors::{bad_arg, catch, guard, require_exists, Cancelled};
use ggpt::generate::{generate, Flow, Request};

/// Most sequences one call may ask for (the CLI's `--num-return-sequences` limit).
const MAX_SEQUENCES: usize = 64;

/// A prompt or text: a string, or token ids.
#[derive(FromPyObject)]
pub enum Input {
    Text(String),
    Ids(Vec<i64>),
}

/// The model and the thread pool its calls run on; shared with stream threads.
struct Shared {
    model: RustModel,
    pool: Option<rayon::ThreadPool>,
}

impl Shared {
    /// Token ids of an input, checked against the vocabulary.
    fn ids(&self, input: Input) -> Result<Vec<u32>> {
        let n_vocab = self.model.hparams().n_vocab;
        match input {
            Input::Text(t) => Ok(self.model.tokenizer().encode(&t)),
            Input::Ids(ids) => ids
                .into_iter()
                .map(|id| {
                    if id < 0 || id as u64 >= n_vocab {
                        bad_arg!("token id {id} is out of range (vocabulary has {n_vocab} tokens)")
                    }
                    Ok(id as u32)
                })
                .collect(),
        }
    }
}

/// A GPT-2 GGUF file, mapped once and validated: Model(path, n_ctx=None, n_threads=None).
///
/// Thread-safe: several Python threads may call one Model at once; each call runs its own
/// session (KV cache and buffers) with the GIL released. Ctrl-C interrupts a long call with
/// KeyboardInterrupt. n_ctx: the longest context calls may use (default and maximum: the
/// model's). n_threads: threads each call computes on (default: one per core).
#[pyclass(module = "ggpt", frozen)]
pub struct Model {
    shared: Arc<Shared>,
    path: PathBuf,
    n_ctx: usize,
    n_threads: usize,
}

#[allow(clippy::too_many_arguments)]
fn sampler_config(
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    seed: Option<u64>,
) -> Result<SamplerConfig> {
    let cfg = SamplerConfig {
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty,
        repeat_last_n,
        seed: seed.unwrap_or_else(crate::seed::next_seed),
    };
    if let Err(e) = cfg.validate() {
        bad_arg!("{e:#}");
    }
    Ok(cfg)
}

impl Model {
    /// Build a generation request from the Python arguments, checking them all.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        prompt: Input,
        max_new_tokens: usize,
        cfg: SamplerConfig,
        num_return_sequences: usize,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
    ) -> Result<Request> {
        if num_return_sequences == 0 || num_return_sequences > MAX_SEQUENCES {
            bad_arg!("num_return_sequences={num_return_sequences} is outside 1..={MAX_SEQUENCES}");
        }
        let stop = stop.unwrap_or_default();
        if stop.iter().any(|s| s.is_empty()) {
            bad_arg!("stop strings must not be empty");
        }
        let mut ids = self.shared.ids(prompt)?;
        if ids.is_empty() {
            // GPT-2 has no BOS; like `ggpt run` and Hugging Face's pipeline, condition on
            // <|endoftext|>.
            match self.shared.model.tokenizer().eos_id() {
                Some(e) => ids.push(e),
                None => bad_arg!(
                    "the prompt is empty and the vocabulary has no <|endoftext|> to start from"
                ),
            }
        }
        let n_ctx = self.n_ctx;
        if ids
            .len()
            .checked_add(max_new_tokens)
            .is_none_or(|t| t > n_ctx)
        {
            bad_arg!(
                "the prompt ({} tokens) plus max_new_tokens={max_new_tokens} exceeds the context \
                 of {n_ctx} tokens; shorten the prompt or lower max_new_tokens",
                ids.len()
            );
        }
        Ok(Request {
            prompt: ids,
            max_new_tokens,
            sampler: cfg,
            n_seq: num_return_sequences,
            stop,
            ignore_eos,
        })
    }

    fn perplexity_report(
        &self,
        py: Python<'_>,
        base: Option<&Model>,
        text: &str,
        n_ctx: usize,
        max_chunks: Option<usize>,
        score_all: bool,
    ) -> PyResult<Report> {
        let shared = &self.shared;
        blocking::run(py, shared.pool.as_ref(), |cancel| {
            let method = Method {
                n_ctx,
                max_chunks,
                score_all,
            };
            if let Err(e) = method.validate(shared.model.hparams().n_ctx as usize) {
                bad_arg!("n_ctx={n_ctx}: {e}");
            }
            if let Some(b) = base {
                let (nb, nm) = (b.n_vocab(), shared.model.hparams().n_vocab);
                if nb != nm {
                    bad_arg!(
                        "the base model's vocabulary ({nb} tokens) differs from the model's ({nm})"
                    );
                }
            }
            let tokens = shared.model.tokenizer().encode_ordinary(text);
            if window_count(tokens.len(), &method) == 0 {
                bad_arg!(
                    "n_ctx={n_ctx}: the text has {} tokens, fewer than one window",
                    tokens.len()
                );
            }
            evaluate(
                &shared.model,
                base.map(|b| &b.shared.model),
                &tokens,
                method,
                // The evaluation cannot return early; a cancelled call unwinds out of it.
                |_, _, _| cancel.unwind_if_set(),
            )
            .map_err(anyhow::Error::from)
        })
    }
}

#[pymethods]
impl Model {
    /// Map and validate a GGUF file.
    #[new]
    #[pyo3(signature = (path, n_ctx=None, n_threads=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        n_ctx: Option<usize>,
        n_threads: Option<usize>,
    ) -> PyResult<Model> {
        require_exists(&path)?;
        let pool = guard(|| match n_threads {
            None => Ok(None),
            Some(0) => bad_arg!("n_threads=0: must be at least 1"),
            Some(t) if t > 1024 => bad_arg!("n_threads={t} is more than the maximum of 1024"),
            Some(t) => Ok(Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .map_err(|e| anyhow::anyhow!("cannot start {t} threads: {e}"))?,
            )),
        })?;
        // Loading checks every quantized block's scales in parallel: on the model's own pool.
        let model = blocking::run(py, pool.as_ref(), |_| Ok(RustModel::load(&path)?))?;
        let train = model.hparams().n_ctx as usize;
        let n_ctx = n_ctx.unwrap_or(train);
        if n_ctx == 0 || n_ctx > train {
            return Err(PyValueError::new_err(format!(
                "n_ctx={n_ctx} is outside 1..={train} (the model's trained context)"
            )));
        }
        let n_threads = pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        Ok(Model {
            shared: Arc::new(Shared { model, pool }),
            path,
            n_ctx,
            n_threads,
        })
    }

    /// Generate continuations of `prompt`; returns the generated text of each sequence
    /// (without the prompt).
    #[pyo3(signature = (prompt, max_new_tokens=128, temperature=0.8, top_k=40, top_p=0.95,
        min_p=0.05, repeat_penalty=1.0, repeat_last_n=64, num_return_sequences=1, seed=None,
        stop=None, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: Input,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        num_return_sequences: usize,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
    ) -> PyResult<Vec<String>> {
        let req = guard(|| {
            let cfg = sampler_config(
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty,
                repeat_last_n,
                seed,
            )?;
            self.request(
                prompt,
                max_new_tokens,
                cfg,
                num_return_sequences,
                stop,
                ignore_eos,
            )
        })?;
        let shared = &self.shared;
        blocking::run(py, shared.pool.as_ref(), |cancel| {
            let out = generate(&shared.model, &req, |_, _| {
                cancel.check().map(|()| Flow::Continue)
            })?;
            Ok(out.texts)
        })
    }

    /// Like `generate` with one sequence, yielding the text as it is generated.
    #[pyo3(signature = (prompt, max_new_tokens=128, temperature=0.8, top_k=40, top_p=0.95,
        min_p=0.05, repeat_penalty=1.0, repeat_last_n=64, seed=None, stop=None,
        ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        prompt: Input,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        seed: Option<u64>,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
    ) -> PyResult<TextStream> {
        let req = guard(|| {
            let cfg = sampler_config(
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty,
                repeat_last_n,
                seed,
            )?;
            self.request(prompt, max_new_tokens, cfg, 1, stop, ignore_eos)
        })?;
        TextStream::start(Arc::clone(&self.shared), req)
    }

    /// GPT-2 byte-level BPE token ids of `text` (`<|endoftext|>` is the special token).
    fn tokenize(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let shared = &self.shared;
        py.detach(|| guard(|| Ok(shared.model.tokenizer().encode(text))))
    }

    /// The text of token ids (invalid UTF-8 replaced by U+FFFD).
    fn detokenize(&self, ids: Vec<i64>) -> PyResult<String> {
        guard(|| {
            let ids = self.shared.ids(Input::Ids(ids))?;
            Ok(self.shared.model.tokenizer().decode_lossy(&ids)?)
        })
    }

    /// Raw next-token logits at every position: float32 array of shape (T, n_vocab), row t
    /// predicting token t+1. `ids` may also be text.
    fn logits<'py>(&self, py: Python<'py>, ids: Input) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let shared = &self.shared;
        let n_ctx = self.n_ctx;
        let (t, v, out) = blocking::run(py, shared.pool.as_ref(), |_| {
            let ids = nonempty_ids(shared, ids, n_ctx)?;
            let mut out = Vec::new();
            let mut s = Session::new(&shared.model, ids.len(), 1)?;
            s.prefill_all_logits(&ids, &mut out)?;
            Ok((ids.len(), shared.model.hparams().n_vocab as usize, out))
        })?;
        array2(py, t, v, out)
    }

    /// The last hidden state (after the final LayerNorm) at every position: float32 array of
    /// shape (T, n_embd), as transformers' `GPT2Model(...).last_hidden_state[0]`.
    fn features<'py>(&self, py: Python<'py>, text: Input) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let shared = &self.shared;
        let n_ctx = self.n_ctx;
        let (t, c, out) = blocking::run(py, shared.pool.as_ref(), |_| {
            let ids = nonempty_ids(shared, text, n_ctx)?;
            let mut s = Session::new(&shared.model, ids.len(), 1)?;
            let out = s.hidden_states(&ids)?;
            Ok((ids.len(), shared.model.hparams().n_embd as usize, out))
        })?;
        array2(py, t, c, out)
    }

    /// Perplexity of `text` by llama-perplexity's method (windows of `n_ctx` tokens, the
    /// second half of each scored).
    #[pyo3(signature = (text, n_ctx=512, max_chunks=None, score_all=false))]
    fn perplexity<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        n_ctx: usize,
        max_chunks: Option<usize>,
        score_all: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let r = self.perplexity_report(py, None, text, n_ctx, max_chunks, score_all)?;
        let s = &r.summary;
        let d = PyDict::new(py);
        d.set_item("ppl", s.ppl)?;
        d.set_item("ppl_err", s.ppl_err)?;
        d.set_item("tokens_scored", s.tokens)?;
        d.set_item("mean_nll", s.mean_nll)?;
        d.set_item("windows", r.windows)?;
        d.set_item("method", r.method.describe(r.windows))?;
        d.set_item("tokens_per_second", r.tokens_per_second)?;
        d.set_item("seconds", r.seconds)?;
        Ok(d)
    }

    /// KL divergence of this model's next-token distributions from `base`'s on `text`
    /// (usually `base` is the F16 file), with top-1 agreement, on the windows `perplexity` uses.
    #[pyo3(signature = (base, text, n_ctx=512, max_chunks=None, score_all=false))]
    fn kl_divergence<'py>(
        &self,
        py: Python<'py>,
        base: PyRef<'py, Model>,
        text: &str,
        n_ctx: usize,
        max_chunks: Option<usize>,
        score_all: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let r = self.perplexity_report(py, Some(&base), text, n_ctx, max_chunks, score_all)?;
        let s = &r.summary;
        let Some(b) = &s.vs_base else {
            return Err(PyValueError::new_err(
                "no position was compared with the base model",
            ));
        };
        let d = PyDict::new(py);
        d.set_item("mean_kld", b.mean_kld)?;
        d.set_item("median_kld", b.median_kld)?;
        d.set_item("p99_kld", b.p99_kld)?;
        d.set_item("max_kld", b.max_kld)?;
        d.set_item("same_top", b.same_top)?;
        d.set_item("same_top_err", b.same_top_err)?;
        d.set_item("mean_delta_p", b.mean_delta_p)?;
        d.set_item("rms_delta_p", b.rms_delta_p)?;
        d.set_item("ppl", s.ppl)?;
        d.set_item("base_ppl", b.base_ppl)?;
        d.set_item("ppl_ratio", b.ppl_ratio)?;
        d.set_item("tokens_scored", s.tokens)?;
        d.set_item("method", r.method.describe(r.windows))?;
        Ok(d)
    }

    /// Predicted memory for a run, term by term: the same numbers as `ggpt mem --json`.
    #[pyo3(signature = (n_ctx=None, n_batch=None, n_seq=1, kv="f16"))]
    fn memory<'py>(
        &self,
        py: Python<'py>,
        n_ctx: Option<usize>,
        n_batch: Option<usize>,
        n_seq: usize,
        kv: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (est, run) = guard(|| {
            let hp = self.shared.model.hparams();
            let kv_elem = match kv.to_ascii_lowercase().as_str() {
                "f16" => 2,
                "f32" => 4,
                other => bad_arg!("kv={other:?}: expected \"f16\" or \"f32\""),
            };
            let n_ctx = n_ctx.unwrap_or(hp.n_ctx as usize);
            if n_ctx == 0 || n_ctx as u64 > hp.n_ctx {
                bad_arg!("n_ctx={n_ctx} is outside 1..={}", hp.n_ctx);
            }
            if n_seq == 0 || n_seq > MAX_SEQUENCES {
                bad_arg!("n_seq={n_seq} is outside 1..={MAX_SEQUENCES}");
            }
            if n_batch == Some(0) {
                bad_arg!("n_batch=0: must be at least 1");
            }
            // As `ggpt mem`: the whole context as one prompt unless the caller chunks it.
            let n_batch = n_batch.unwrap_or(n_ctx).clamp(1, n_ctx);
            let shape = MemShape::of(&self.shared.model);
            let file = self.shared.model.file();
            let run = RunShape {
                n_ctx: n_ctx as u64,
                n_batch: n_batch as u64,
                n_seq: n_seq as u64,
                kv_elem,
                threads: self.n_threads as u64,
            };
            Ok((
                estimate(
                    &shape,
                    file.file_len(),
                    tensor_bytes(&self.shared.model),
                    &run,
                ),
                run,
            ))
        })?;
        let d = PyDict::new(py);
        d.set_item("format", self.shared.model.file_type_name())?;
        d.set_item("n_ctx", run.n_ctx)?;
        d.set_item("n_batch", run.n_batch)?;
        d.set_item("n_seq", run.n_seq)?;
        d.set_item("kv_type", if run.kv_elem == 2 { "f16" } else { "f32" })?;
        d.set_item("file_bytes", est.file_bytes)?;
        d.set_item("tensor_bytes", est.tensor_bytes)?;
        d.set_item("kv_bytes", est.kv_bytes)?;
        d.set_item("scratch_bytes", est.scratch_bytes)?;
        d.set_item("logits_bytes", est.logits_bytes)?;
        d.set_item("runtime_bytes", est.runtime_bytes)?;
        d.set_item("ram_total_bytes", est.ram_total)?;
        d.set_item("gpu_compute_bytes", est.gpu_compute_bytes)?;
        d.set_item("vram_total_bytes", est.vram_total)?;
        Ok(d)
    }

    /// The file's quantization mix as llama.cpp names it: "F16", "Q8_0", "Q6_K", "Q4_K_M", …
    #[getter]
    fn format(&self) -> String {
        self.shared.model.file_type_name()
    }

    /// Path of the GGUF file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Size of the GGUF file in bytes.
    #[getter]
    fn file_size(&self) -> u64 {
        self.shared.model.file().file_len()
    }

    /// Bits per weight over the tensor data, as llama.cpp reports model size.
    #[getter]
    fn bpw(&self) -> f64 {
        tensor_bytes(&self.shared.model) as f64 * 8.0 / self.n_params().max(1) as f64
    }

    /// Number of weights in the file.
    #[getter]
    fn n_params(&self) -> u64 {
        self.shared
            .model
            .file()
            .tensors()
            .iter()
            .map(|t| t.n_elements())
            .sum()
    }

    /// Context length calls on this Model may use (at most `n_ctx_train`).
    #[getter]
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Context length the model was trained for.
    #[getter]
    fn n_ctx_train(&self) -> u64 {
        self.shared.model.hparams().n_ctx
    }

    /// Width of the hidden state.
    #[getter]
    fn n_embd(&self) -> u64 {
        self.shared.model.hparams().n_embd
    }

    /// Number of transformer blocks.
    #[getter]
    fn n_layer(&self) -> u64 {
        self.shared.model.hparams().n_layer
    }

    /// Attention heads per block.
    #[getter]
    fn n_head(&self) -> u64 {
        self.shared.model.hparams().n_head
    }

    /// Vocabulary size.
    #[getter]
    fn n_vocab(&self) -> u64 {
        self.shared.model.hparams().n_vocab
    }

    /// Threads each call runs on.
    #[getter]
    fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Id of `<|endoftext|>`, or None.
    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.shared.model.tokenizer().eos_id()
    }

    fn __repr__(&self) -> String {
        format!(
            "ggpt.Model({:?}, format={}, n_ctx={}, n_threads={})",
            self.path.display().to_string(),
            self.format(),
            self.n_ctx,
            self.n_threads
        )
    }
}

fn tensor_bytes(model: &RustModel) -> u64 {
    model.file().tensors().iter().map(|t| t.size).sum()
}

/// Token ids of a non-empty input that fits the context.
fn nonempty_ids(shared: &Shared, input: Input, n_ctx: usize) -> Result<Vec<u32>> {
    let ids = shared.ids(input)?;
    if ids.is_empty() {
        bad_arg!("the input is empty: there is no token to evaluate");
    }
    if ids.len() > n_ctx {
        bad_arg!(
            "the input has {} tokens, more than the context of {n_ctx}",
            ids.len()
        );
    }
    Ok(ids)
}

fn array2(
    py: Python<'_>,
    rows: usize,
    cols: usize,
    v: Vec<f32>,
) -> PyResult<Bound<'_, PyArray2<f32>>> {
    let a = Array2::from_shape_vec((rows, cols), v)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("array shape: {e}")))?;
    Ok(a.into_pyarray(py))
}

/// What the generating thread sends to a [`TextStream`].
enum Msg {
    Text(String),
    Error(anyhow::Error),
    Done,
}

/// Iterator over the text pieces of one generation (from `Model.stream`). The tokens are
/// generated on a background thread at most a few pieces ahead of the reader; dropping the
/// iterator stops it.
#[pyclass(module = "ggpt")]
pub struct TextStream {
    rx: Mutex<Option<Receiver<Msg>>>,
}

impl TextStream {
    fn start(shared: Arc<Shared>, req: Request) -> PyResult<TextStream> {
        let (tx, rx) = sync_channel::<Msg>(4);
        std::thread::Builder::new()
            .name("ggpt-stream".into())
            .spawn(move || run_stream(shared, req, tx))
            .map_err(|e| {
                pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start a thread: {e}"))
            })?;
        Ok(TextStream {
            rx: Mutex::new(Some(rx)),
        })
    }
}

fn run_stream(shared: Arc<Shared>, req: Request, tx: SyncSender<Msg>) {
    let send = |piece: &str| -> Result<Flow> {
        if piece.is_empty() {
            return Ok(Flow::Continue);
        }
        // A send fails only when the reader has dropped the stream.
        tx.send(Msg::Text(piece.to_string()))
            .map(|()| Flow::Continue)
            .map_err(|_| anyhow::Error::from(Cancelled))
    };
    let work = || generate(&shared.model, &req, |_, p| send(p));
    let r = catch(|| match &shared.pool {
        Some(p) => p.install(work),
        None => work(),
    });
    let last = match r {
        Ok(_) => Msg::Done,
        Err(e) if e.is::<Cancelled>() => return,
        Err(e) => Msg::Error(e),
    };
    let _ = tx.send(last);
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let mut slot = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut rx) = slot.take() else {
            return Ok(None);
        };
        loop {
            // The receiver goes into the GIL-free closure and comes back out.
            let (back, got) = py.detach(move || {
                let got = rx.recv_timeout(SIGNAL_CHECK);
                (rx, got)
            });
            rx = back;
            match got {
                Ok(Msg::Text(t)) => {
                    *slot = Some(rx);
                    return Ok(Some(t));
                }
                Ok(Msg::Done) | Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Ok(Msg::Error(e)) => return Err(crate::errors::to_py(e)),
                Err(RecvTimeoutError::Timeout) => py.check_signals()?,
            }
        }
    }

    /// Stop generating; the iterator then ends.
    fn close(&self) {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
