//! The `ggpt serve` command line (clap), shared by the `ggpt` CLI and the `ggpt-serve`
//! binary so both take the same flags.

use std::path::PathBuf;
use std::time::Duration;

use ggpt_models::KvType;

use crate::ServeConfig;

/// Serve models over an OpenAI-compatible HTTP API with continuous batching.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// GGUF model file; repeat to serve several (chosen per request by `model` = file stem).
    #[arg(short = 'm', long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Concurrent sequences (slots) per model; each holds a KV cache of --ctx positions.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Context per slot (default: the model's context length).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Sequences per model that may wait for a slot; beyond that requests get 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` (all endpoints but /health and /metrics).
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from a file (first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Seconds allowed for reading a request body, for a non-streamed request, and for a
    /// streaming client that stops reading.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Most prompt tokens processed per engine step (bounds how long a new prompt stalls
    /// the streams already running).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    pub body_limit: usize,
    /// KV cache element type: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub kv_type: KvType,
    /// `ggpt compare`'s report.json: the comparison page at / shows its table and charts.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Threads for the forward pass (default: one per core).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Memory budget (300M, 1.5G, bytes; default: the cgroup limit or MemAvailable), split
    /// evenly between the models: weights that do not fit beside the slots' KV caches are
    /// streamed from the file; a budget too small even for that is refused at start.
    #[arg(long = "mem-budget", value_parser = parse_budget)]
    pub mem_budget: Option<u64>,
}

fn parse_budget(s: &str) -> Result<u64, String> {
    ggpt::budget::parse_size(s).map_err(|e| e.to_string())
}

impl ServeArgs {
    /// The server configuration these flags describe; `Err` names the bad flag.
    pub fn config(&self) -> Result<ServeConfig, String> {
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(p)) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("--api-key-file {}: {e}", p.display()))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            (None, None) => None,
        };
        if api_key.as_deref() == Some("") {
            return Err("the API key is empty".into());
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= 86_400.0) {
            return Err(format!(
                "--timeout {} must be in (0, 86400] seconds",
                self.timeout
            ));
        }
        if self.prefill_chunk == 0 {
            return Err("--prefill-chunk must be at least 1".into());
        }
        if self.body_limit < 1024 {
            return Err(format!(
                "--body-limit {} is below 1024 bytes",
                self.body_limit
            ));
        }
        Ok(ServeConfig {
            models: self.models.clone(),
            host: self.host.clone(),
            port: self.port,
            parallel: self.parallel,
            ctx: self.ctx,
            max_queue: self.max_queue,
            api_key,
            timeout: Duration::from_secs_f64(self.timeout),
            prefill_chunk: self.prefill_chunk,
            body_limit: self.body_limit,
            kv_type: self.kv_type,
            report: self.report.clone(),
            mem_budget: self.mem_budget,
        })
    }
}

/// Log to stderr (`RUST_LOG` overrides the default `info` level), build the runtime and
/// serve until SIGINT/SIGTERM. The caller sizes rayon's pool first.
pub fn serve_blocking(config: ServeConfig) -> Result<(), crate::ServeError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::run(config))
}
