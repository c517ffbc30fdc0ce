//! The HTTP side: routes, the auth/error/metrics middleware, and the endpoints. Handlers
//! parse and validate, tokenize, submit sequences to the engine, and format what comes back;
//! they never run the model themselves.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use ggpt::model::Model;
use ggpt::tokenizer::TextStream;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot, watch};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use tower_http::trace::TraceLayer;

use crate::engine::{
    event_channel, EmbedJob, EngineConfig, EngineHandle, Event, EventReceiver, Finish, Params,
    SeqJob, SubmitError, TokenLogprob,
};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::request::{self, parse_object, Fields, Prompt};
use crate::{ServeConfig, ServeError};

/// The plain transcript template that renders chat messages for GPT-2, which was never
/// trained on a chat format. Reported by `/v1/models`.
pub const CHAT_TEMPLATE: &str = "Each message becomes '<Role>: <content>\\n' (Role is System, \
User or Assistant), then 'Assistant:' is appended; generation stops at '\\nUser:' or \
'\\nSystem:'.";

/// A loaded model and its name (the file stem).
pub struct Served {
    pub name: String,
    pub model: Arc<Model>,
}

pub struct Loaded {
    pub models: Vec<Served>,
    pub engine: Arc<EngineHandle>,
    pub n_ctx: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum LoadState {
    Loading,
    Ready,
    /// The message, and the file when that file could not be loaded (not a bad setting).
    Failed(String, Option<String>),
}

impl LoadState {
    fn failure(&self) -> Option<ServeError> {
        match self {
            LoadState::Failed(message, Some(path)) => Some(ServeError::Load {
                path: path.clone(),
                message: message.clone(),
            }),
            LoadState::Failed(message, None) => Some(ServeError::Config(message.clone())),
            _ => None,
        }
    }
}

/// Everything the handlers share.
pub struct App {
    pub cfg: ServeConfig,
    loaded: OnceLock<Loaded>,
    load_state: watch::Sender<LoadState>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    created: u64,
}

impl App {
    pub fn new(cfg: ServeConfig, shutdown: watch::Receiver<bool>) -> Arc<App> {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Arc::new(App {
            cfg,
            loaded: OnceLock::new(),
            load_state: watch::channel(LoadState::Loading).0,
            metrics: Metrics::new(),
            shutdown,
            created,
        })
    }

    /// Load every model and start the engine (blocking).
    pub fn load(&self) -> Result<(), ServeError> {
        let r = self.load_inner();
        self.load_state.send_replace(match &r {
            Ok(()) => LoadState::Ready,
            Err(ServeError::Load { path, message }) => {
                LoadState::Failed(message.clone(), Some(path.clone()))
            }
            Err(e) => LoadState::Failed(e.to_string(), None),
        });
        if let Err(e) = &r {
            tracing::error!("{e}");
        }
        r
    }

    fn load_inner(&self) -> Result<(), ServeError> {
        let mut models: Vec<Served> = Vec::new();
        for path in &self.cfg.models {
            let err = |message: String| ServeError::Load {
                path: path.display().to_string(),
                message,
            };
            let model = Model::load(path).map_err(|e| err(format!("{e:#}")))?;
            // A server refuses a bad file at start rather than on its first request.
            model.check_weights().map_err(|e| err(e.to_string()))?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or_else(|| err("the path has no file name".into()))?;
            if models.iter().any(|m| m.name == name) {
                return Err(err(format!("a model named '{name}' is already loaded")));
            }
            models.push(Served {
                name,
                model: Arc::new(model),
            });
        }
        let max_ctx = models
            .iter()
            .map(|m| m.model.hparams().n_ctx as usize)
            .min()
            .unwrap_or(0);
        let n_ctx = self.cfg.ctx.unwrap_or(max_ctx);
        if n_ctx == 0 || n_ctx > max_ctx {
            return Err(ServeError::Config(format!(
                "--ctx {n_ctx} is not in 1..={max_ctx} (the smallest context length of the models)"
            )));
        }
        let cfg = EngineConfig {
            parallel: self.cfg.parallel,
            n_ctx,
            prefill_chunk: self.cfg.prefill_chunk,
            max_queue: self.cfg.max_queue,
            kv_type: self.cfg.kv_type,
        };
        self.fit_budget(&mut models, &cfg)?;
        for m in &models {
            let hp = m.model.hparams();
            let per_slot =
                2 * hp.n_layer as usize * n_ctx * hp.n_embd as usize * cfg.kv_type.size();
            tracing::info!(
                "model '{}' ({}, {} layers, n_embd {}): {} slots x {:.1} MiB KV ({}) = {:.1} MiB, n_ctx {}",
                m.name,
                m.model.file_type_name(),
                hp.n_layer,
                hp.n_embd,
                cfg.parallel,
                per_slot as f64 / 1048576.0,
                cfg.kv_type,
                (per_slot * cfg.parallel) as f64 / 1048576.0,
                n_ctx
            );
        }
        let engine = EngineHandle::start(
            models.iter().map(|m| Arc::clone(&m.model)).collect(),
            cfg,
            Arc::clone(&self.metrics),
        )
        .map_err(|e| ServeError::Config(e.to_string()))?;
        let _ = self.loaded.set(Loaded {
            models,
            engine,
            n_ctx,
        });
        Ok(())
    }

    /// Plan the memory budget for the loaded (not yet shared) models: stream what does not
    /// fit, refuse a budget too small even for that.
    fn fit_budget(&self, models: &mut [Served], cfg: &EngineConfig) -> Result<(), ServeError> {
        let threads = rayon::current_num_threads() as u64;
        let needs: Vec<_> = models
            .iter()
            .map(|m| {
                ggpt::budget::serving_needs(
                    &m.model,
                    cfg.n_ctx as u64,
                    cfg.parallel as u64,
                    cfg.prefill_chunk as u64,
                    cfg.kv_type.size() as u64,
                    threads,
                )
            })
            .collect();
        let mut refs: Vec<&mut Model> = models
            .iter_mut()
            .filter_map(|m| Arc::get_mut(&mut m.model))
            .collect();
        if refs.len() != needs.len() {
            return Err(ServeError::Config(
                "models are shared before loading ended".into(),
            ));
        }
        match ggpt::budget::fit_all(&mut refs, &needs, self.cfg.mem_budget) {
            Ok(None) => Ok(()),
            Ok(Some((budget, plans))) => {
                for (m, p) in models.iter().zip(plans) {
                    if p.in_memory() {
                        tracing::info!(
                            "model '{}': memory budget {budget}: every weight in memory",
                            m.name
                        );
                    } else {
                        tracing::info!(
                            "model '{}': memory budget {budget}: {:.1} MiB of weights resident, streaming {:.1} MB per token; full speed needs {:.1} MiB",
                            m.name,
                            p.resident_bytes as f64 / 1048576.0,
                            p.streamed_bytes as f64 / 1e6,
                            p.full_budget as f64 / 1048576.0
                        );
                    }
                }
                Ok(())
            }
            Err((i, e)) => Err(ServeError::Config(format!(
                "model '{}': memory budget: {e}",
                models[i].name
            ))),
        }
    }

    /// Wait for loading to end.
    pub async fn wait_loaded(&self) -> Result<(), ServeError> {
        let mut rx = self.load_state.subscribe();
        let s = rx
            .wait_for(|s| *s != LoadState::Loading)
            .await
            .map(|s| s.clone())
            .unwrap_or(LoadState::Failed("the server stopped".into(), None));
        s.failure().map_or(Ok(()), Err)
    }

    pub fn load_error(&self) -> Result<(), ServeError> {
        self.load_state.borrow().failure().map_or(Ok(()), Err)
    }

    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.loaded
            .get()
            .ok_or_else(|| ApiError::unavailable("the models are still loading"))
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// End the engine (every sequence gets a final error event). Blocking; idempotent.
    pub fn stop_engine(&self) {
        if let Some(l) = self.loaded.get() {
            l.engine.shutdown();
        }
    }

    fn find(&self, loaded: &Loaded, name: &str) -> Result<usize, ApiError> {
        loaded
            .models
            .iter()
            .position(|m| m.name == name)
            .ok_or_else(|| {
                let names: Vec<String> = loaded.models.iter().map(|m| m.name.clone()).collect();
                ApiError::model_not_found(name, &names)
            })
    }
}

/// Every route, behind the middleware.
pub fn router(app: Arc<App>) -> Router {
    let t = app.cfg.timeout;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::page::routes())
        .fallback(|| async { ApiError::status(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(RequestBodyLimitLayer::new(app.cfg.body_limit))
        .layer(RequestBodyTimeoutLayer::new(t))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            t,
        ))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), guard))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}

const ENDPOINTS: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
];

/// Auth (everything but `/health`, `/metrics` and the comparison page's static files needs the
/// key if one is set: the page itself carries no data and asks for the key on a 401), OpenAI-shaped
/// bodies for the errors the tower layers produce (413, 408, 405), and the request counter.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| **e == path)
        .copied()
        .unwrap_or("other");
    let public = endpoint == "/health"
        || endpoint == "/metrics"
        || crate::page::STATIC_PATHS.contains(&path);
    let resp = match &app.cfg.api_key {
        Some(key) if !public && !authorized(req.headers(), key.as_bytes()) => {
            let msg = if req.headers().contains_key(header::AUTHORIZATION) {
                "incorrect API key provided"
            } else {
                "missing API key: send 'Authorization: Bearer <key>'"
            };
            ApiError::unauthorized(msg).into_response()
        }
        _ => next.run(req).await,
    };
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let resp = if (status.is_client_error() || status.is_server_error()) && !is_json {
        let msg = match status {
            StatusCode::PAYLOAD_TOO_LARGE => format!(
                "the request body is larger than the limit of {} bytes",
                app.cfg.body_limit
            ),
            StatusCode::REQUEST_TIMEOUT => format!(
                "the request did not complete within {} s",
                app.cfg.timeout.as_secs_f64()
            ),
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this endpoint".to_string(),
            s => s.canonical_reason().unwrap_or("error").to_string(),
        };
        ApiError::status(status, msg).into_response()
    } else {
        resp
    };
    app.metrics.request(endpoint, resp.status().as_u16());
    resp
}

/// `Authorization: Bearer KEY`, compared in constant time.
fn authorized(headers: &HeaderMap, key: &[u8]) -> bool {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = v.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    given.ct_eq(key).into()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.is_shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    match &*app.load_state.borrow() {
        LoadState::Ready => Json(json!({"status": "ok"})).into_response(),
        LoadState::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
        LoadState::Failed(m, path) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "message": match path {
                Some(p) => format!("cannot load {p}: {m}"),
                None => m.clone(),
            }})),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let l = app.loaded()?;
    let data: Vec<Value> = l
        .models
        .iter()
        .map(|m| {
            let hp = m.model.hparams();
            json!({
                "id": m.name,
                "object": "model",
                "created": app.created,
                "owned_by": "ggpt",
                "meta": {
                    "file_type": m.model.file_type_name(),
                    "n_ctx": l.n_ctx,
                    "n_ctx_train": hp.n_ctx,
                    "n_vocab": hp.n_vocab,
                    "n_embd": hp.n_embd,
                    "n_layer": hp.n_layer,
                    "slots": l.engine.config().parallel,
                    "chat_template": CHAT_TEMPLATE,
                }
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// The model a tokenize/detokenize request names, or the only one loaded.
fn model_for<'a>(app: &App, l: &'a Loaded, f: &Fields) -> Result<&'a Served, ApiError> {
    match f.str("model")? {
        Some(name) => Ok(&l.models[app.find(l, name)?]),
        None if l.models.len() == 1 => Ok(&l.models[0]),
        None => Err(ApiError::invalid(
            "model",
            "'model' is required when several models are loaded",
        )),
    }
}

async fn tokenize(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let l = app.loaded()?;
    let m = parse_object(&body)?;
    let f = Fields::new(&m);
    let served = model_for(&app, l, &f)?;
    let key = if f.get("content").is_some() {
        "content"
    } else {
        "prompt"
    };
    let text = f.required_str(key)?;
    let ids = served.model.tokenizer().encode(text);
    Ok(Json(json!({"tokens": ids, "count": ids.len(), "model": served.name})).into_response())
}

async fn detokenize(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let l = app.loaded()?;
    let m = parse_object(&body)?;
    let f = Fields::new(&m);
    let served = model_for(&app, l, &f)?;
    let tok = served.model.tokenizer();
    let ids = match request::prompts("tokens", f.get("tokens"), tok.n_vocab()) {
        Ok(p) => match p.as_slice() {
            [Prompt::Tokens(ids)] => ids.clone(),
            _ => {
                return Err(ApiError::invalid(
                    "tokens",
                    "'tokens' must be an array of token ids",
                ))
            }
        },
        Err(e) => return Err(e),
    };
    let text = tok
        .decode_lossy(&ids)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(json!({"content": text, "model": served.name})).into_response())
}

/// What a generation request resolved to.
struct Gen {
    model: usize,
    name: String,
    prompts: Vec<Vec<u32>>,
    n: usize,
    params: Params,
    seed: Option<u64>,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

/// Format of the responses.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion { echo: bool },
    Chat,
}

fn stream_flags(f: &Fields) -> Result<(bool, bool), ApiError> {
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    "stream_options.include_usage",
                    "'stream_options.include_usage' must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "'stream_options' must be an object",
            ))
        }
    };
    Ok((stream, include_usage))
}

impl Gen {
    /// The fields completions and chat read alike, with OpenAI's meanings and defaults:
    /// `model` (required), `n`, `stop`, `stream`/`stream_options`, and the sampling settings
    /// (`temperature`, `top_p`, `top_k`, `min_p`, `repeat_penalty`, the presence and frequency
    /// penalties, `logit_bias`, `seed`). The endpoint sets the prompts, `max_tokens` and the
    /// log-probabilities, which the two name differently.
    fn parse(app: &App, l: &Loaded, f: &Fields) -> Result<Gen, ApiError> {
        let name = f.required_str("model")?;
        let model = app.find(l, name)?;
        let n_vocab = l.models[model].model.tokenizer().n_vocab();
        let n = f.int_in("n", 1, request::MAX_N as i64)?.unwrap_or(1) as usize;
        let stops = f.stop()?;
        let (stream, include_usage) = stream_flags(f)?;
        let mut sampler = f.sampler(n_vocab, 1.0)?;
        sampler.repeat_penalty = f.f64_in("repeat_penalty", 0.01, 10.0)?.unwrap_or(1.0) as f32;
        let presence_penalty = f.f64_in("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
        let frequency_penalty = f.f64_in("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
        let logit_bias = f.logit_bias(n_vocab)?;
        let seed = f.seed("seed")?;
        Ok(Gen {
            model,
            name: name.to_string(),
            prompts: Vec::new(),
            n,
            params: Params {
                sampler,
                presence_penalty,
                frequency_penalty,
                logit_bias,
                logprobs: None,
                prompt_logprobs: false,
                max_tokens: 0,
                stop_at_eos: true,
            },
            seed,
            stops,
            stream,
            include_usage,
        })
    }

    /// Set the prompts and `max_tokens`, refusing an empty prompt or one that leaves no room
    /// for `max_tokens` in the context (`param` names the field the prompt came from).
    fn with_prompts(
        mut self,
        prompts: Vec<Vec<u32>>,
        max_tokens: usize,
        n_ctx: usize,
        param: &str,
    ) -> Result<Gen, ApiError> {
        check_context(&prompts, max_tokens, n_ctx, param)?;
        self.prompts = prompts;
        self.params.max_tokens = max_tokens;
        Ok(self)
    }
}

fn check_context(
    prompts: &[Vec<u32>],
    max_tokens: usize,
    n_ctx: usize,
    param: &str,
) -> Result<(), ApiError> {
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ApiError::invalid(
                param,
                format!("prompt {i} is empty (0 tokens)"),
            ));
        }
        if p.len() + max_tokens > n_ctx {
            return Err(ApiError::context_overflow(
                param,
                format!(
                    "this model's maximum context length is {n_ctx} tokens, but {} were requested: {} in the prompt{} and {max_tokens} for the completion (max_tokens); shorten the prompt or lower max_tokens",
                    p.len() + max_tokens,
                    p.len(),
                    if prompts.len() > 1 { format!(" {i}") } else { String::new() },
                ),
            ));
        }
    }
    Ok(())
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let l = app.loaded()?;
    let m = parse_object(&body)?;
    let f = Fields::new(&m);
    let mut gen = Gen::parse(&app, l, &f)?;
    let tok = l.models[gen.model].model.tokenizer();
    f.refuse_unless(
        "suffix",
        |v| v.as_str() == Some(""),
        "is not supported: GPT-2 was not trained for fill-in-the-middle",
    )?;
    f.refuse_unless(
        "best_of",
        |v| v.as_u64() == Some(1),
        "is not supported (only best_of = 1): ranking candidates would hide the cost of generating them",
    )?;
    let prompts = request::prompts("prompt", f.get("prompt"), tok.n_vocab())?;
    let max_tokens = f
        .int_in("max_tokens", 0, i64::from(u32::MAX))?
        .unwrap_or(16) as usize;
    let logprobs = f
        .int_in("logprobs", 0, request::MAX_LOGPROBS as i64)?
        .map(|x| x as usize);
    let echo = f.bool("echo")?.unwrap_or(false);
    gen.params.logprobs = logprobs;
    gen.params.prompt_logprobs = echo && logprobs.is_some();
    let prompts = prompts
        .into_iter()
        .map(|p| match p {
            Prompt::Text(s) => tok.encode(&s),
            Prompt::Tokens(t) => t,
        })
        .collect();
    let gen = gen.with_prompts(prompts, max_tokens, l.n_ctx, "prompt")?;
    generate(app, gen, Kind::Completion { echo }).await
}

/// Render chat messages with [`CHAT_TEMPLATE`].
fn render_chat(v: Option<&Value>) -> Result<String, ApiError> {
    let msgs = match v {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "'messages' must not be empty",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                "'messages' must be an array of message objects",
            ))
        }
        None => return Err(ApiError::invalid("messages", "'messages' is required")),
    };
    let mut out = String::new();
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        let m = m
            .as_object()
            .ok_or_else(|| ApiError::invalid(&at, format!("'{at}' must be an object")))?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => "System",
            Some("user") => "User",
            Some("assistant") => "Assistant",
            Some(r) => {
                return Err(ApiError::invalid(
                    format!("{at}.role"),
                    format!(
                        "'{at}.role' = '{r}' is not supported (system, developer, user, assistant)"
                    ),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("{at}.role"),
                    format!("'{at}.role' is required"),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("{at}.content[{j}]"),
                                format!("'{at}.content[{j}]' must be a text part ({{\"type\": \"text\", \"text\": …}}); GPT-2 reads text only"),
                            ))
                        }
                    }
                }
                s
            }
            Some(Value::Null) | None if role == "Assistant" => String::new(),
            _ => {
                return Err(ApiError::invalid(
                    format!("{at}.content"),
                    format!("'{at}.content' must be a string or an array of text parts"),
                ))
            }
        };
        out.push_str(role);
        out.push_str(": ");
        out.push_str(&content);
        out.push('\n');
    }
    out.push_str("Assistant:");
    Ok(out)
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let l = app.loaded()?;
    let m = parse_object(&body)?;
    let f = Fields::new(&m);
    let mut gen = Gen::parse(&app, l, &f)?;
    let text = render_chat(f.get("messages"))?;
    for key in ["tools", "functions", "response_format"] {
        f.refuse_unless(
            key,
            |v| v.is_null(),
            "is not supported: GPT-2 has no tool or format training",
        )?;
    }
    let prompt = l.models[gen.model].model.tokenizer().encode(&text);
    let max_tokens = match f.int_in("max_completion_tokens", 0, i64::from(u32::MAX))? {
        Some(x) => Some(x),
        None => f.int_in("max_tokens", 0, i64::from(u32::MAX))?,
    };
    let max_tokens = match max_tokens {
        Some(x) => x as usize,
        None => l.n_ctx.saturating_sub(prompt.len()).max(1),
    };
    let want_lp = f.bool("logprobs")?.unwrap_or(false);
    let top = f
        .int_in("top_logprobs", 0, request::MAX_CHAT_LOGPROBS as i64)?
        .map(|x| x as usize);
    if top.is_some() && !want_lp {
        return Err(ApiError::invalid(
            "top_logprobs",
            "'top_logprobs' needs 'logprobs': true",
        ));
    }
    gen.params.logprobs = want_lp.then(|| top.unwrap_or(0));
    // The transcript's next speaker ends the reply.
    gen.stops.push("\nUser:".into());
    gen.stops.push("\nSystem:".into());
    let gen = gen.with_prompts(vec![prompt], max_tokens, l.n_ctx, "messages")?;
    generate(app, gen, Kind::Chat).await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{:x}{:04x}", t, n & 0xffff)
}

/// A seed for a request that gave none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Per-choice state while formatting.
struct ChoiceState {
    text: TextStream,
    /// Text released so far (for `text_offset` and the non-streamed answer).
    out: String,
    tokens: Vec<(u32, Option<TokenLogprob>)>,
    prompt_lp: Option<Vec<TokenLogprob>>,
    finish: Option<&'static str>,
    completion_tokens: usize,
    /// Chat: the first content piece has not been sent yet (its leading space is dropped).
    at_start: bool,
}

/// Submit every (prompt, choice) sequence; choice index = prompt × n + j, seeded with
/// seed + j so choices of one prompt differ and each is reproducible alone.
fn submit(app: &App, gen: &Gen) -> Result<(EventReceiver, Vec<Arc<AtomicBool>>), ApiError> {
    let l = app.loaded()?;
    let (tx, rx) = event_channel(gen.prompts.len() * gen.n);
    let base = gen.seed.unwrap_or_else(random_seed);
    let mut jobs = Vec::new();
    let mut cancels = Vec::new();
    let arrived = Instant::now();
    for (i, p) in gen.prompts.iter().enumerate() {
        for j in 0..gen.n {
            let mut params = gen.params.clone();
            params.sampler.seed = base.wrapping_add(j as u64);
            let cancel = Arc::new(AtomicBool::new(false));
            cancels.push(Arc::clone(&cancel));
            jobs.push(SeqJob {
                model: gen.model,
                prompt: p.clone(),
                params,
                choice: i * gen.n + j,
                cancel,
                events: tx.clone(),
                arrived,
            });
        }
    }
    match l.engine.submit(jobs) {
        Ok(()) => Ok((rx, cancels)),
        Err(SubmitError::QueueFull { waiting, max }) => Err(ApiError::overloaded(format!(
            "the server is busy: {waiting} sequences are waiting for a slot (queue limit {max}); retry later"
        ))),
        Err(SubmitError::ShuttingDown) => Err(ApiError::unavailable("the server is shutting down")),
    }
}

/// Token string for logprobs output (lossy for a token that is part of a character).
fn token_str(model: &Model, id: u32) -> String {
    String::from_utf8_lossy(model.tokenizer().token_bytes(id).unwrap_or(&[])).into_owned()
}

/// Completions' logprobs object for `entries` (None = the first prompt token, which has no
/// logprob), text offsets starting at `offset`.
fn completion_logprobs(
    model: &Model,
    entries: &[(u32, Option<&TokenLogprob>)],
    mut offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for (id, lp) in entries {
        let s = token_str(model, *id);
        offsets.push(offset);
        offset += s.len();
        tokens.push(Value::String(s));
        match lp {
            Some(lp) => {
                lps.push(json!(lp.logprob));
                let mut m = Map::new();
                for (t, x) in &lp.top {
                    m.insert(token_str(model, *t), json!(x));
                }
                tops.push(Value::Object(m));
            }
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Chat's logprobs object.
fn chat_logprobs(model: &Model, entries: &[(u32, &TokenLogprob)]) -> Value {
    let one = |id: u32, lp: f32| {
        let b = model.tokenizer().token_bytes(id).unwrap_or(&[]).to_vec();
        json!({"token": String::from_utf8_lossy(&b), "logprob": lp, "bytes": b})
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|(id, lp)| {
            let mut v = one(*id, lp.logprob);
            v["top_logprobs"] = Value::Array(lp.top.iter().map(|(t, x)| one(*t, *x)).collect());
            v
        })
        .collect();
    json!({"content": content})
}

fn finish_name(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Eos => "stop",
    }
}

/// Apply one engine event to the choice states. Returns (choice, released text, the token
/// entries it carried) for formatting, or an error to end the request with.
/// What one event released: (choice, text, its tokens with logprobs, choice finished).
type Released = (usize, String, Vec<(u32, Option<TokenLogprob>)>, bool);

fn apply(
    ev: Event,
    model: &Model,
    states: &mut [ChoiceState],
    cancels: &[Arc<AtomicBool>],
) -> Result<Option<Released>, String> {
    match ev {
        Event::Prompt { choice, logprobs } => {
            states[choice].prompt_lp = Some(logprobs);
            Ok(None)
        }
        Event::Token {
            choice,
            token,
            logprob,
        } => {
            let st = &mut states[choice];
            if st.finish.is_some() {
                return Ok(None);
            }
            st.completion_tokens += 1;
            let bytes = model.tokenizer().token_bytes(token).unwrap_or(&[]);
            let text = st.text.push(bytes);
            st.out.push_str(&text);
            st.tokens.push((token, logprob.clone()));
            if st.text.stopped() {
                st.finish = Some("stop");
                cancels[choice].store(true, Ordering::Relaxed);
            }
            Ok(Some((
                choice,
                text,
                vec![(token, logprob)],
                st.finish.is_some(),
            )))
        }
        Event::Done {
            choice,
            finish,
            generated,
        } => {
            let st = &mut states[choice];
            if st.finish.is_some() {
                return Ok(None);
            }
            st.completion_tokens = generated;
            let text = st.text.finish();
            st.out.push_str(&text);
            st.finish = Some(finish_name(finish));
            Ok(Some((choice, text, Vec::new(), true)))
        }
        Event::Error { message, .. } => Err(message),
    }
}

fn usage(prompts: &[Vec<u32>], states: &[ChoiceState]) -> Value {
    let p: usize = prompts.iter().map(Vec::len).sum();
    let c: usize = states.iter().map(|s| s.completion_tokens).sum();
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

async fn generate(app: Arc<App>, gen: Gen, kind: Kind) -> Result<Response, ApiError> {
    let l = app.loaded()?;
    let model = Arc::clone(&l.models[gen.model].model);
    let (rx, cancels) = submit(&app, &gen)?;
    let n_choices = gen.prompts.len() * gen.n;
    let states: Vec<ChoiceState> = (0..n_choices)
        .map(|_| ChoiceState {
            text: TextStream::new(gen.stops.clone()),
            out: String::new(),
            tokens: Vec::new(),
            prompt_lp: None,
            finish: None,
            completion_tokens: 0,
            at_start: true,
        })
        .collect();
    if gen.stream {
        Ok(stream_response(app, gen, kind, model, rx, cancels, states))
    } else {
        collect_response(gen, kind, model, rx, cancels, states).await
    }
}

async fn collect_response(
    gen: Gen,
    kind: Kind,
    model: Arc<Model>,
    mut rx: EventReceiver,
    cancels: Vec<Arc<AtomicBool>>,
    mut states: Vec<ChoiceState>,
) -> Result<Response, ApiError> {
    while states.iter().any(|s| s.finish.is_none()) {
        let Some(ev) = rx.recv().await else {
            return Err(ApiError::internal("the engine stopped"));
        };
        if let Err(m) = apply(ev, &model, &mut states, &cancels) {
            return Err(if m.contains("shutting down") {
                ApiError::unavailable(&m)
            } else {
                ApiError::internal(m)
            });
        }
    }
    drop(rx);
    let usage = usage(&gen.prompts, &states);
    let tok = model.tokenizer();
    let choices: Vec<Value> = states
        .iter_mut()
        .enumerate()
        .map(|(i, st)| match kind {
            Kind::Completion { echo } => {
                let prompt = &gen.prompts[i / gen.n];
                let prompt_text = if echo {
                    tok.decode_lossy(prompt).unwrap_or_default()
                } else {
                    String::new()
                };
                let logprobs = gen.params.logprobs.map(|_| {
                    let mut entries: Vec<(u32, Option<&TokenLogprob>)> = Vec::new();
                    if echo {
                        entries.push((prompt[0], None));
                        let plp = st.prompt_lp.as_deref().unwrap_or(&[]);
                        for (k, &id) in prompt.iter().enumerate().skip(1) {
                            entries.push((id, plp.get(k - 1)));
                        }
                    }
                    entries.extend(st.tokens.iter().map(|(id, lp)| (*id, lp.as_ref())));
                    completion_logprobs(&model, &entries, 0)
                });
                json!({
                    "index": i,
                    "text": prompt_text + &st.out,
                    "logprobs": logprobs,
                    "finish_reason": st.finish,
                })
            }
            Kind::Chat => {
                let content = st.out.strip_prefix(' ').unwrap_or(&st.out).to_string();
                let logprobs = gen.params.logprobs.map(|_| {
                    let e: Vec<(u32, &TokenLogprob)> = st
                        .tokens
                        .iter()
                        .filter_map(|(id, lp)| lp.as_ref().map(|lp| (*id, lp)))
                        .collect();
                    chat_logprobs(&model, &e)
                });
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": logprobs,
                    "finish_reason": st.finish,
                })
            }
        })
        .collect();
    let (id, object) = match kind {
        Kind::Completion { .. } => (request_id("cmpl"), "text_completion"),
        Kind::Chat => (request_id("chatcmpl"), "chat.completion"),
    };
    Ok(Json(json!({
        "id": id,
        "object": object,
        "created": unix_now(),
        "model": gen.name,
        "choices": choices,
        "usage": usage,
    }))
    .into_response())
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The streamed answer: a task turns engine events into SSE frames and feeds them to the
/// body through a small channel. A client that stops reading for the timeout, or goes away,
/// ends the task, which drops the engine receiver and so frees the slots.
fn stream_response(
    app: Arc<App>,
    gen: Gen,
    kind: Kind,
    model: Arc<Model>,
    mut rx: EventReceiver,
    cancels: Vec<Arc<AtomicBool>>,
    mut states: Vec<ChoiceState>,
) -> Response {
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(8);
    let stall = app.cfg.timeout;
    let mut shutdown = app.shutdown.clone();
    let (id, object) = match kind {
        Kind::Completion { .. } => (request_id("cmpl"), "text_completion"),
        Kind::Chat => (request_id("chatcmpl"), "chat.completion.chunk"),
    };
    let created = unix_now();
    tokio::spawn(async move {
        let send = |b: Bytes| {
            let tx = body_tx.clone();
            async move { matches!(tokio::time::timeout(stall, tx.send(b)).await, Ok(Ok(()))) }
        };
        let chunk = |choices: Vec<Value>| json!({"id": id, "object": object, "created": created, "model": gen.name, "choices": choices});
        let tok = model.tokenizer();
        // Opening chunks: the role (chat), the prompt text (completions with echo and no
        // logprobs; with logprobs it comes with the prompt's logprobs).
        let mut opening = Vec::new();
        for (i, _) in states.iter().enumerate() {
            match kind {
                Kind::Chat => opening.push(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})),
                Kind::Completion { echo: true } if gen.params.logprobs.is_none() => {
                    let t = tok.decode_lossy(&gen.prompts[i / gen.n]).unwrap_or_default();
                    opening.push(json!({"index": i, "text": t, "logprobs": null, "finish_reason": null}));
                }
                _ => {}
            }
        }
        for c in opening {
            if !send(sse(&chunk(vec![c]))).await {
                return;
            }
        }
        let mut offsets = vec![0usize; states.len()];
        loop {
            if states.iter().all(|s| s.finish.is_some()) {
                break;
            }
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = shutdown.wait_for(|s| *s) => None,
            };
            let Some(ev) = ev else {
                let e = ApiError::unavailable("the server is shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), body_tx.send(sse(&e.body())))
                    .await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    body_tx.send(Bytes::from_static(b"data: [DONE]\n\n")),
                )
                .await;
                return;
            };
            let prompt_event = match &ev {
                Event::Prompt { choice, .. } => Some(*choice),
                _ => None,
            };
            let applied = match apply(ev, &model, &mut states, &cancels) {
                Ok(a) => a,
                Err(m) => {
                    let e = if m.contains("shutting down") {
                        ApiError::unavailable(&m)
                    } else {
                        ApiError::internal(m)
                    };
                    let _ = send(sse(&e.body())).await;
                    let _ = send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
            };
            if let (Some(i), Kind::Completion { echo: true }) = (prompt_event, kind) {
                // Echo with logprobs: the prompt text and its logprobs.
                let prompt = &gen.prompts[i / gen.n];
                let plp = states[i].prompt_lp.clone().unwrap_or_default();
                let mut entries: Vec<(u32, Option<&TokenLogprob>)> = vec![(prompt[0], None)];
                for (k, &id) in prompt.iter().enumerate().skip(1) {
                    entries.push((id, plp.get(k - 1)));
                }
                let text = tok.decode_lossy(prompt).unwrap_or_default();
                let lp = completion_logprobs(&model, &entries, 0);
                offsets[i] = text.len();
                if !send(sse(&chunk(vec![
                    json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null}),
                ])))
                .await
                {
                    return;
                }
                continue;
            }
            let Some((i, mut text, entries, done)) = applied else {
                continue;
            };
            let finish = if done { states[i].finish } else { None };
            let has_lp = gen.params.logprobs.is_some() && !entries.is_empty();
            if text.is_empty() && !has_lp && finish.is_none() {
                continue;
            }
            let c = match kind {
                Kind::Completion { .. } => {
                    let lp = has_lp.then(|| {
                        let e: Vec<(u32, Option<&TokenLogprob>)> =
                            entries.iter().map(|(id, lp)| (*id, lp.as_ref())).collect();
                        completion_logprobs(&model, &e, offsets[i])
                    });
                    offsets[i] += text.len();
                    json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
                }
                Kind::Chat => {
                    if states[i].at_start && !text.is_empty() {
                        if let Some(t) = text.strip_prefix(' ') {
                            text = t.to_string();
                        }
                        states[i].at_start = false;
                    }
                    let lp = has_lp.then(|| {
                        let e: Vec<(u32, &TokenLogprob)> = entries
                            .iter()
                            .filter_map(|(id, lp)| lp.as_ref().map(|lp| (*id, lp)))
                            .collect();
                        chat_logprobs(&model, &e)
                    });
                    let delta = if text.is_empty() {
                        json!({})
                    } else {
                        json!({"content": text})
                    };
                    json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
                }
            };
            if !send(sse(&chunk(vec![c]))).await {
                return;
            }
        }
        drop(rx);
        if gen.include_usage {
            let mut last = chunk(Vec::new());
            last["usage"] = usage(&gen.prompts, &states);
            if !send(sse(&last)).await {
                return;
            }
        }
        let _ = send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn embeddings(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let l = app.loaded()?;
    let m = parse_object(&body)?;
    let f = Fields::new(&m);
    let name = f.required_str("model")?;
    let mi = app.find(l, name)?;
    let model = &l.models[mi].model;
    let n_embd = model.hparams().n_embd as i64;
    let tok = model.tokenizer();
    let inputs = request::prompts("input", f.get("input"), tok.n_vocab())?;
    let base64 = match f.str("encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("'encoding_format' must be 'float' or 'base64', got '{other}'"),
            ))
        }
    };
    if let Some(d) = f.int_in("dimensions", 1, i64::MAX)? {
        if d != n_embd {
            return Err(ApiError::invalid(
                "dimensions",
                format!("'dimensions' must be {n_embd} (this model's embedding size), got {d}"),
            ));
        }
    }
    let ids: Vec<Vec<u32>> = inputs
        .into_iter()
        .map(|p| match p {
            Prompt::Text(s) => tok.encode(&s),
            Prompt::Tokens(t) => t,
        })
        .collect();
    for (i, p) in ids.iter().enumerate() {
        if p.is_empty() {
            return Err(ApiError::invalid(
                "input",
                format!("input {i} is empty (0 tokens)"),
            ));
        }
        if p.len() > l.n_ctx {
            return Err(ApiError::context_overflow(
                "input",
                format!(
                    "input {i} has {} tokens, more than this model's maximum context length of {} tokens",
                    p.len(),
                    l.n_ctx
                ),
            ));
        }
    }
    let n_tokens: usize = ids.iter().map(Vec::len).sum();
    let (reply, wait) = oneshot::channel();
    l.engine
        .embed(EmbedJob {
            model: mi,
            inputs: ids,
            reply,
        })
        .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    let vecs = match wait.await {
        Ok(Ok(v)) => v,
        Ok(Err(m)) => return Err(ApiError::internal(m)),
        Err(_) => return Err(ApiError::unavailable("the server is shutting down")),
    };
    let data: Vec<Value> = vecs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let emb = if base64 {
                let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(e)
            };
            json!({"object": "embedding", "index": i, "embedding": emb})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }))
    .into_response())
}
