//! `ggpt serve`: an OpenAI-compatible HTTP server over ggpt models, with continuous batching.
//!
//! - [`engine`]: the engine thread (slots, scheduling, sampling, cancellation).
//! - [`api`]: the HTTP endpoints (parse, tokenize, format; they talk to the engine through
//!   channels).
//! - [`request`]: request fields, validated with the field named in every refusal.
//! - [`metrics`]: the Prometheus metrics.
//!
//! ```no_run
//! # async fn f() -> Result<(), ggpt_serve::ServeError> {
//! let config = ggpt_serve::ServeConfig::new(vec!["tiny-gpt2-Q4_K_M.gguf".into()]);
//! ggpt_serve::run(config).await
//! # }
//! ```

pub mod api;
pub mod args;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod page;
pub mod request;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ggpt_models::KvType;
use tokio::sync::watch;

pub use api::router;
pub use error::ApiError;

/// Everything `ggpt serve` can be told.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// GGUF files; each is served under its file stem.
    pub models: Vec<PathBuf>,
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// Slots (concurrent sequences) per model.
    pub parallel: usize,
    /// Context per slot; `None` = the smallest context length of the models.
    pub ctx: Option<usize>,
    /// Sequences per model that may wait for a slot; more get 503.
    pub max_queue: usize,
    pub api_key: Option<String>,
    /// Bounds reading a request body, a non-streamed request's total time, and how long a
    /// stream may wait for a client that does not read.
    pub timeout: Duration,
    /// Most prompt tokens per engine step.
    pub prefill_chunk: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    pub kv_type: KvType,
    /// `compare`'s report.json for the comparison page (page.rs).
    pub report: Option<PathBuf>,
    /// Memory budget in bytes (`None`: the cgroup limit or `MemAvailable`); weights that do
    /// not fit beside the slots' KV caches are streamed (docs/memory.md).
    pub mem_budget: Option<u64>,
}

impl ServeConfig {
    /// Defaults: 127.0.0.1:8080, 4 slots, queue 64, 120 s timeout, 256-token prompt chunks,
    /// 2 MiB bodies, F16 KV cache.
    pub fn new(models: Vec<PathBuf>) -> ServeConfig {
        ServeConfig {
            models,
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            ctx: None,
            max_queue: 64,
            api_key: None,
            timeout: Duration::from_secs(120),
            prefill_chunk: 256,
            body_limit: 2 << 20,
            kv_type: KvType::F16,
            mem_budget: None,
            report: None,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot load {path}: {message}")]
    Load { path: String, message: String },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// The process exit code for this error (docs/errors.md): 3 for a model file that cannot
    /// be loaded, 2 for settings that cannot be used, 1 for anything else (e.g. the port is
    /// taken).
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Load { .. } => 3,
            ServeError::Config(_) => 2,
            ServeError::Bind { .. } | ServeError::Io(_) => 1,
        }
    }
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    app: Arc<api::App>,
    shutdown_tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Server {
    /// Ask the server to stop: no new connections, open streams get a final event, every
    /// running sequence ends.
    pub fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Wait until the models are loaded (or loading failed).
    pub async fn ready(&self) -> Result<(), ServeError> {
        self.app.wait_loaded().await
    }

    /// Wait for the server to stop.
    pub async fn join(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Bind, start serving (`/health` answers 503 until the models are loaded), and load the
/// models in the background.
pub async fn start(config: ServeConfig) -> Result<Server, ServeError> {
    if config.models.is_empty() {
        return Err(ServeError::Config("no model given (-m FILE)".into()));
    }
    if config.parallel == 0 || config.parallel > ggpt_models::gpt2::forward::MAX_SEQ {
        return Err(ServeError::Config(format!(
            "--parallel must be in 1..={}, got {}",
            ggpt_models::gpt2::forward::MAX_SEQ,
            config.parallel
        )));
    }
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = api::App::new(config, shutdown_rx.clone());
    let router = api::router(Arc::clone(&app));
    // Load in the background: the socket is open, /health says 503 meanwhile.
    let loader = Arc::clone(&app);
    let stop_on_error = shutdown_tx.clone();
    tokio::task::spawn_blocking(move || {
        if loader.load().is_err() {
            let _ = stop_on_error.send(true);
        }
    });
    let upkeep = Arc::clone(&app);
    let mut upkeep_stop = shutdown_rx.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.metrics.upkeep(),
                _ = upkeep_stop.changed() => break,
            }
        }
    });
    let serve_app = Arc::clone(&app);
    let mut stop = shutdown_rx;
    let task = tokio::spawn(async move {
        let graceful = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let on_stop = Arc::clone(&serve_app);
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                graceful.await;
                // Every sequence ends now (streams then send their final event).
                let _ = tokio::task::spawn_blocking(move || on_stop.stop_engine()).await;
            })
            .await;
        let app = serve_app;
        let a = Arc::clone(&app);
        let _ = tokio::task::spawn_blocking(move || a.stop_engine()).await;
        served?;
        app.load_error()
    });
    Ok(Server {
        addr: local,
        app,
        shutdown_tx,
        task,
    })
}

/// Serve until SIGINT or SIGTERM, then shut down gracefully. A model that fails to load
/// stops the server with that error.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    let server = start(config).await?;
    tracing::info!("listening on http://{}", server.addr);
    let waited: Result<(), ServeError> = tokio::select! {
        r = signal() => r.map_err(ServeError::from),
        r = async {
            server.ready().await?;
            signal().await.map_err(ServeError::from)
        } => r,
    };
    tracing::info!("shutting down");
    server.shutdown();
    let joined = server.join().await;
    waited.and(joined)
}

/// SIGINT or SIGTERM.
async fn signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
