//! The comparison page and the endpoints only it needs:
//!
//! - `GET /` (and `/app.js`, `/style.css`): the page from the repository's `web/` folder,
//!   embedded in the binary (no CDN, works offline).
//! - `GET /report`: `compare`'s report.json given with `--report FILE`, plus which charts sit
//!   beside it; `GET /report/{chart}` serves those charts (404 when no report was given).
//! - `POST /v1/diff`: `ggpt diff` over the loaded models — the base continues the prompt, every
//!   other model is teacher-forced along its tokens; the answer is a [`ggpt::diff::DiffReport`]
//!   (docs/diff.md).
//!
//! [`routes`] is merged into the server's router, so the same middleware (auth, body limit,
//! timeouts, metrics) applies.

use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ggpt::diff::{generate, DiffError, GenerateOptions, Named};
use ggpt::sampler::SamplerConfig;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::api::App;
use crate::request::{parse_object, prompts, Fields, Prompt};
use crate::ApiError;

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");

/// The chart files `compare` writes next to report.json, the only ones `/report/` serves.
pub const CHARTS: &[&str] = &[
    "ppl_vs_size.svg",
    "kld_vs_size.svg",
    "ppl_vs_size.png",
    "kld_vs_size.png",
];

/// Most tokens one diff may generate.
pub const MAX_DIFF_TOKENS: i64 = 512;

/// The page's static files: served without the API key (they hold no data; the page asks for
/// the key when an API call answers 401).
pub const STATIC_PATHS: &[&str] = &["/", "/app.js", "/style.css"];

/// The page's routes, to be merged into the server's router.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/report", get(report))
        .route("/report/{file}", get(chart))
        .route("/v1/diff", post(diff))
}

fn asset(mime: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn no_report() -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "no report: start the server with --report out/compare/<model>/report.json",
    )
}

/// `{"report": <report.json>, "charts": [names of the charts present]}`.
async fn report(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let path = app.cfg.report.clone().ok_or_else(no_report)?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ApiError::internal(format!("cannot read the report {}: {e}", path.display()))
    })?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| {
        ApiError::internal(format!("the report {} is not JSON: {e}", path.display()))
    })?;
    let dir = path.parent().map(|d| d.to_path_buf()).unwrap_or_default();
    let charts: Vec<&str> = CHARTS
        .iter()
        .copied()
        .filter(|c| dir.join(c).is_file())
        .collect();
    Ok(Json(json!({"report": doc, "charts": charts})).into_response())
}

async fn chart(
    State(app): State<Arc<App>>,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let path = app.cfg.report.clone().ok_or_else(no_report)?;
    // Only the four chart names: nothing else on disk is reachable.
    let name = CHARTS
        .iter()
        .find(|c| **c == file)
        .ok_or_else(|| ApiError::status(StatusCode::NOT_FOUND, format!("no chart '{file}'")))?;
    let full = path.parent().map(|d| d.join(name)).unwrap_or_default();
    let bytes = std::fs::read(&full).map_err(|e| {
        ApiError::status(
            StatusCode::NOT_FOUND,
            format!("chart {} cannot be read: {e}", full.display()),
        )
    })?;
    let mime = if name.ends_with(".svg") {
        "image/svg+xml"
    } else {
        "image/png"
    };
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

/// One diff at a time: it runs every model over the whole sequence on the shared thread pool.
fn diff_gate() -> &'static Semaphore {
    static GATE: OnceLock<Semaphore> = OnceLock::new();
    GATE.get_or_init(|| Semaphore::new(1))
}

/// `POST /v1/diff`: `{"prompt": string | [ids], "models": [names] (default: all, the first
/// is the base), "max_tokens": n (default 32), "temperature", "top_p", "top_k", "min_p",
/// "seed"}` → a DiffReport. Sampling fields mean what they mean for `/v1/completions`;
/// `temperature` 0 (the default here) is greedy.
async fn diff(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let loaded = app.loaded()?;
    let map = parse_object(&body)?;
    let f = Fields::new(&map);
    let names: Vec<String> = match f.get("models") {
        None | Some(Value::Null) => loaded.models.iter().map(|m| m.name.clone()).collect(),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid("models", format!("'models[{i}]' must be a model name"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "models",
                "'models' must be a non-empty array of model names",
            ))
        }
    };
    let all: Vec<String> = loaded.models.iter().map(|m| m.name.clone()).collect();
    let picked: Vec<usize> = names
        .iter()
        .map(|n| {
            all.iter()
                .position(|m| m == n)
                .ok_or_else(|| ApiError::model_not_found(n, &all))
        })
        .collect::<Result<_, _>>()?;
    let base = &loaded.models[picked[0]].model;
    let n_vocab = base.hparams().n_vocab as usize;
    let prompt = match prompts("prompt", f.get("prompt"), n_vocab)?.as_slice() {
        [Prompt::Text(t)] => base.tokenizer().encode(t),
        [Prompt::Tokens(t)] => t.clone(),
        _ => return Err(ApiError::invalid("prompt", "'prompt' must be one prompt")),
    };
    let n_predict = f.int_in("max_tokens", 0, MAX_DIFF_TOKENS)?.unwrap_or(32) as usize;
    let sampler = f.sampler(n_vocab, 0.0)?;
    let seed = f.seed("seed")?;
    let sampler = (sampler.temperature > 0.0).then(|| SamplerConfig {
        seed: seed.unwrap_or(0),
        ..sampler
    });
    let models: Vec<(String, Arc<ggpt::model::Model>)> = picked
        .iter()
        .map(|&i| {
            (
                loaded.models[i].name.clone(),
                Arc::clone(&loaded.models[i].model),
            )
        })
        .collect();
    let _permit = diff_gate()
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    let report = tokio::task::spawn_blocking(move || {
        let named: Vec<Named> = models
            .iter()
            .map(|(name, m)| Named {
                name: name.clone(),
                model: m,
            })
            .collect();
        let opts = GenerateOptions {
            n_predict,
            sampler,
            stop_at_eos: true,
        };
        generate(&named, &prompt, &opts)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the diff task failed: {e}")))?
    .map_err(|e| match e {
        DiffError::TooLong { .. } => ApiError::context_overflow("max_tokens", e.to_string()),
        DiffError::VocabMismatch { .. } => ApiError::invalid("models", e.to_string()),
        DiffError::EmptyPrompt | DiffError::TooShort { .. } => {
            ApiError::invalid("prompt", e.to_string())
        }
        e => ApiError::internal(e.to_string()),
    })?;
    Ok(Json(report).into_response())
}
