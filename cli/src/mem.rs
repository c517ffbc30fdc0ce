//! `ggpt mem`: what a model costs in memory — predicted term by term, and with `--measure`
//! measured in this process (peak RSS, split into file-backed and anonymous pages).

use super::common::{bail_flag, flag_error, init_threads, print_stdout};
use anyhow::Result;
use ggpt::budget::{BudgetError, Needs, Source};
use ggpt::memory::{estimate, rss, Estimate, MemShape, Mib, RunShape};
use ggpt::model::Model;
use ggpt::session::Session;
use ggpt_models::residency::Pinning;
use ggpt_models::KvType;
use serde_json::json;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Most sequences `--seqs` may ask for (the forward pass's own limit).
const MAX_SEQS: usize = ggpt_models::gpt2::forward::MAX_SEQ;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, or a Hugging Face checkpoint directory (predicts every format before converting).
    pub path: PathBuf,
    /// Context length (default: the model's).
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Tokens per forward pass during the prompt (default: ggpt's micro-batch, capped by ctx).
    #[arg(short = 'b', long)]
    pub batch: Option<usize>,
    /// Parallel sequences (as `run --num-return-sequences`, or the slots of
    /// `serve --parallel`: one KV cache of --ctx positions each).
    #[arg(long, visible_alias = "parallel", default_value_t = 1)]
    pub seqs: usize,
    /// KV cache element type: f16 (default) or f32.
    #[arg(long, default_value = "f16")]
    pub kv: String,
    /// For a checkpoint directory: which formats (f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, all).
    #[arg(long = "type", default_value = "all")]
    pub ftype: String,
    /// Run a real prefill of the whole context plus decoding, and report peak RSS beside the estimate.
    #[arg(long)]
    pub measure: bool,
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

fn kv_type(name: &str) -> Result<(KvType, u64)> {
    match name.to_ascii_lowercase().as_str() {
        "f16" => Ok((KvType::F16, 2)),
        "f32" => Ok((KvType::F32, 4)),
        other => bail_flag!("--kv {other}: expected f16 or f32"),
    }
}

pub fn run(args: Args) -> Result<()> {
    let threads = init_threads(args.threads)? as u64;
    let (kv, kv_elem) = kv_type(&args.kv)?;
    if args.seqs == 0 || args.seqs > MAX_SEQS {
        bail_flag!("--seqs {} is outside 1..={MAX_SEQS}", args.seqs);
    }
    if args.batch == Some(0) {
        bail_flag!("--batch 0: must be at least 1");
    }
    if args.ctx == Some(0) {
        bail_flag!("--ctx 0: must be at least 1");
    }
    if args.path.is_dir() {
        return predict_checkpoint(&args, kv_elem, threads);
    }
    let model = Model::load(&args.path)?;
    let hp = model.hparams().clone();
    let n_ctx = args.ctx.unwrap_or(hp.n_ctx as usize);
    if n_ctx == 0 || n_ctx as u64 > hp.n_ctx {
        bail_flag!("--ctx {n_ctx} is outside 1..={}", hp.n_ctx);
    }
    let n_batch = args
        .batch
        .unwrap_or(ggpt_models::gpt2::forward::UBATCH)
        .clamp(1, n_ctx);
    let shape = MemShape::of(model.hparams());
    let tensor_bytes: u64 = model.file().tensors().iter().map(|t| t.size).sum();
    let run = RunShape {
        n_ctx: n_ctx as u64,
        n_batch: n_batch as u64,
        n_seq: args.seqs as u64,
        kv_elem,
        threads,
    };
    let est = estimate(&shape, model.file().file_len(), tensor_bytes, &run);

    let measured = if args.measure {
        // The measurement fills the whole KV cache of every sequence: refuse a shape this
        // machine cannot hold rather than be killed by the OOM killer half way.
        if let Some(avail) = mem_available() {
            if est.ram_total > avail {
                bail_flag!(
                    "--measure with --ctx {n_ctx} --seqs {} needs about {} of RAM, but only {} \
                     is available; lower --ctx or --seqs",
                    args.seqs,
                    Mib(est.ram_total),
                    Mib(avail)
                );
            }
        }
        Some(measure(&model, n_ctx, n_batch, args.seqs, kv)?)
    } else {
        None
    };
    let name = model.file_type_name();
    if args.json {
        let mut doc = estimate_json(&name, &est, &run);
        if let Some(m) = &measured {
            doc["measured"] = m.clone();
        }
        print_stdout(&format!("{doc}\n"))?;
    } else {
        let mut o = table(&args.path.display().to_string(), &name, &est, &run);
        if let Some(m) = &measured {
            let peak = m["peak_rss_bytes"].as_u64().unwrap_or(0);
            let _ = writeln!(
                o,
                "measured: peak RSS {} (file-backed {}, anonymous {}); estimate {} ({:+.1} %)",
                Mib(peak),
                Mib(m["rss_file_bytes"].as_u64().unwrap_or(0)),
                Mib(m["rss_anon_bytes"].as_u64().unwrap_or(0)),
                Mib(est.ram_total),
                (est.ram_total as f64 / peak.max(1) as f64 - 1.0) * 100.0
            );
        }
        print_stdout(&o)?;
    }
    Ok(())
}

/// `--mem-budget` / `--budget` values: bytes, or a number with K, M, G or T (binary units).
pub fn parse_size_arg(text: &str) -> std::result::Result<u64, String> {
    ggpt::budget::parse_size(text).map_err(|e| e.to_string())
}

/// The run's needs besides the weights: KV for `kv_positions` per sequence, scratch for a
/// prompt of `n_prompt` tokens.
fn run_needs(
    model: &Model,
    kv_positions: usize,
    n_ctx: usize,
    n_prompt: usize,
    n_seq: usize,
    threads: usize,
) -> Needs {
    let run = RunShape {
        n_ctx: n_ctx as u64,
        n_batch: n_prompt.clamp(1, ggpt_models::gpt2::forward::UBATCH) as u64,
        n_seq: n_seq as u64,
        kv_elem: 2,
        threads: threads as u64,
    };
    Needs::of(&MemShape::of(model.hparams()), kv_positions as u64, &run)
}

/// Fit `model` into the memory budget (`flag`, else the cgroup limit or MemAvailable) for a
/// run of `n_prompt` prompt tokens in a context of `n_ctx`: weights that do not fit are
/// streamed. A budget too small even for streaming is an error naming the smallest that
/// works (a [`super::common::FlagError`] when it came from the flag). Returns a line for the
/// user when the budget changes anything or was asked for.
pub fn fit_budget(
    model: &mut Model,
    flag: Option<u64>,
    n_ctx: usize,
    n_prompt: usize,
    n_seq: usize,
    threads: usize,
) -> Result<Option<String>> {
    let Some(budget) = ggpt::budget::detect(flag) else {
        return Ok(None);
    };
    // The KV cache is allocated (and touched) for the whole context.
    let needs = run_needs(model, n_ctx, n_ctx, n_prompt, n_seq, threads);
    let plan = match ggpt::budget::fit(model, budget.bytes, needs) {
        Ok(p) => p,
        Err(e @ BudgetError::TooSmall { .. }) if budget.source == Source::Flag => {
            return Err(flag_error(format!("--mem-budget: {e}")))
        }
        Err(e @ BudgetError::TooSmall { .. }) => {
            return Err(anyhow::Error::new(e).context(format!("memory budget {budget}")))
        }
        Err(e) => return Err(e.into()),
    };
    if plan.in_memory() {
        return Ok((budget.source == Source::Flag).then(|| {
            format!(
                "memory budget {budget}: every weight stays in memory (full speed from {})",
                Mib(plan.full_budget)
            )
        }));
    }
    let pinning = match model.gpt2().residency().map(|r| r.pinning().clone()) {
        Some(Pinning::Unlocked(why)) => format!("not locked, {why}"),
        _ => "locked".to_string(),
    };
    Ok(Some(format!(
        "memory budget {budget}: {} of weights resident ({pinning}), streaming {:.1} MB per token \
         (read-ahead window {}); full speed needs {}",
        Mib(plan.resident_bytes),
        plan.streamed_bytes as f64 / 1e6,
        Mib(plan.window),
        Mib(plan.full_budget)
    )))
}

/// `MemAvailable` from /proc/meminfo in bytes (`None` where there is no such file).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Prefill (almost) the whole context in micro-batches, decode a few tokens, read /proc.
fn measure(
    model: &Model,
    n_ctx: usize,
    n_batch: usize,
    n_seq: usize,
    kv: KvType,
) -> Result<serde_json::Value> {
    let n_vocab = model.hparams().n_vocab as u32;
    // Decode the last few positions one at a time; prefill the rest in micro-batches.
    let n_decode = (n_ctx / 8).clamp(1, 16).min(n_ctx);
    let n_prompt = n_ctx - n_decode;
    // Arbitrary in-vocabulary ids; u64 so that i × 7919 cannot overflow at any context size.
    let prompt: Vec<u32> = (0..n_prompt as u64)
        .map(|i| (i * 7919 % u64::from(n_vocab)) as u32)
        .collect();
    let mut session = Session::with_kv_type(model, n_ctx, n_seq, kv)?;
    let t = std::time::Instant::now();
    for chunk in prompt.chunks(n_batch.max(1)) {
        session.prefill(chunk)?;
    }
    if n_seq > 1 {
        session.fork_prompt();
    }
    let remaining = n_ctx - session.n_past();
    for i in 0..remaining.min(n_decode) {
        let tok = (i as u64 * 31 % u64::from(n_vocab)) as u32;
        if n_seq > 1 {
            session.decode_batch(&vec![tok; n_seq])?;
        } else {
            session.decode(tok)?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let r = rss().unwrap_or_default();
    Ok(json!({
        "peak_rss_bytes": r.peak,
        "rss_bytes": r.current,
        "rss_file_bytes": r.file,
        "rss_anon_bytes": r.anon,
        "prompt_tokens": prompt.len(),
        "decoded_tokens": remaining.min(n_decode),
        "seconds": secs,
        "load_ms": model.load_ms(),
    }))
}

fn estimate_json(name: &str, e: &Estimate, r: &RunShape) -> serde_json::Value {
    json!({
        "format": name,
        "n_ctx": r.n_ctx, "n_batch": r.n_batch, "n_seq": r.n_seq,
        "kv_type": if r.kv_elem == 2 { "f16" } else { "f32" },
        "file_bytes": e.file_bytes,
        "tensor_bytes": e.tensor_bytes,
        "kv_bytes": e.kv_bytes,
        "scratch_bytes": e.scratch_bytes,
        "logits_bytes": e.logits_bytes,
        "runtime_bytes": e.runtime_bytes,
        "ram_total_bytes": e.ram_total,
        "gpu_compute_bytes": e.gpu_compute_bytes,
        "vram_total_bytes": e.vram_total,
    })
}

/// The estimate as text. Formatting into a String cannot fail, hence the ignored results.
fn table(what: &str, name: &str, e: &Estimate, r: &RunShape) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{what} ({name}), ctx {}, batch {}, {} sequence(s), KV {}",
        r.n_ctx,
        r.n_batch,
        r.n_seq,
        if r.kv_elem == 2 { "f16" } else { "f32" }
    );
    let rows = [
        ("weights (mapped file)", e.file_bytes),
        ("  of which tensor data", e.tensor_bytes),
        ("KV cache", e.kv_bytes),
        ("activations / scratch", e.scratch_bytes),
        ("logits", e.logits_bytes),
        ("runtime (tokenizer, program)", e.runtime_bytes),
        ("total RAM", e.ram_total),
        ("GPU compute buffer (model)", e.gpu_compute_bytes),
        ("VRAM for full offload", e.vram_total),
    ];
    for (label, v) in rows {
        let _ = writeln!(o, "  {label:<30} {:>14}", Mib(v).to_string());
    }
    o
}

/// `ggpt mem HF_DIR`: predict each format's file and memory before converting.
fn predict_checkpoint(args: &Args, kv_elem: u64, threads: u64) -> Result<()> {
    use ggpt_convert::policy::FileType;
    let types =
        FileType::parse_list(&args.ftype).map_err(|e| flag_error(format!("--type: {e}")))?;
    let plans = ggpt_convert::pipeline::predict(&args.path, &types)?;
    let mut docs = Vec::new();
    let mut text = String::new();
    for p in &plans {
        let c = &p.config;
        let shape = MemShape {
            n_layer: c.n_layer as u64,
            n_embd: c.n_embd as u64,
            n_ff: c.n_ff as u64,
            n_head: c.n_head as u64,
            n_vocab: c.vocab_size as u64,
        };
        let n_ctx = args.ctx.unwrap_or(c.n_ctx) as u64;
        if n_ctx == 0 || n_ctx > c.n_ctx as u64 {
            bail_flag!("--ctx {n_ctx} is outside 1..={}", c.n_ctx);
        }
        let run = RunShape {
            n_ctx,
            n_batch: args
                .batch
                .unwrap_or(ggpt_models::gpt2::forward::UBATCH)
                .clamp(1, n_ctx as usize) as u64,
            n_seq: args.seqs as u64,
            kv_elem,
            threads,
        };
        let est = estimate(&shape, p.file_bytes, p.tensor_bytes, &run);
        if args.json {
            docs.push(estimate_json(p.ftype.label(), &est, &run));
        } else {
            text.push_str(&table(
                &args.path.display().to_string(),
                p.ftype.label(),
                &est,
                &run,
            ));
        }
    }
    if args.json {
        text = format!("{}\n", serde_json::Value::from(docs));
    }
    print_stdout(&text)
}
