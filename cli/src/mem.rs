//! `ggpt mem`: what a model costs in memory — predicted term by term, and with `--measure`
//! measured in this process (peak RSS, split into file-backed and anonymous pages).

use super::common::{bail_flag, flag_error, init_threads, print_stdout};
use anyhow::Result;
use ggpt::budget::{BudgetError, Needs, Source};
use ggpt::memory::{estimate, rss, Estimate, MemShape, Mib, RunShape};
use ggpt::model::Model;
use ggpt::session::Session;
use ggpt_models::residency::{Pinning, ReadMode};
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
    /// Prompt tokens per call into the model (default: the whole prompt in one call, as `ggpt
    /// run` passes it); each call runs in ggpt's micro-batches (256 tokens, a short last one).
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
    /// A memory budget (300M, 1.5G, bytes): the largest context that runs in memory within
    /// it, the predicted speed class, the smallest budgets that run and that run at full
    /// speed. With --measure: a real `ggpt run` under a cgroup limit of this size.
    #[arg(long, value_parser = parse_size_arg)]
    pub budget: Option<u64>,
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
    // The estimate reads no weights, but a file with bad scales is still refused here.
    model.check_weights()?;
    let hp = model.hparams().clone();
    let n_ctx = args.ctx.unwrap_or(hp.n_ctx as usize);
    if n_ctx == 0 || n_ctx as u64 > hp.n_ctx {
        bail_flag!("--ctx {n_ctx} is outside 1..={}", hp.n_ctx);
    }
    let n_batch = args.batch.unwrap_or(n_ctx).clamp(1, n_ctx);
    let shape = MemShape::of(&model);
    let tensor_bytes: u64 = model.file().tensors().iter().map(|t| t.size).sum();
    let run = RunShape {
        n_ctx: n_ctx as u64,
        n_batch: n_batch as u64,
        n_seq: args.seqs as u64,
        kv_elem,
        threads,
    };
    let est = estimate(&shape, model.file().file_len(), tensor_bytes, &run);
    if let Some(budget) = args.budget {
        return budget_report(&args, model, budget, n_ctx, &run);
    }

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

/// Positions the KV cache holds room for after `n_tokens`: it grows on demand by doubling
/// (kv_cache.rs), so at most twice the tokens, at least one 16-row quantum, at most the context.
pub fn kv_positions(n_tokens: usize, n_ctx: usize) -> usize {
    n_tokens.saturating_mul(2).max(16).min(n_ctx)
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
    Needs::of(&MemShape::of(model), kv_positions as u64, &run)
}

/// Fit `model` into the memory budget (`flag`, else the cgroup limit or MemAvailable) for a
/// run of `n_prompt` prompt tokens and `n_tokens` in all (per sequence) in a context of
/// `n_ctx`: weights that do not fit are streamed. A budget too small even for streaming is an error naming the smallest that
/// works (a [`super::common::FlagError`] when it came from the flag). Returns a line for the
/// user when the budget changes anything or was asked for.
pub fn fit_budget(
    model: &mut Model,
    flag: Option<u64>,
    n_ctx: usize,
    n_prompt: usize,
    n_tokens: usize,
    n_seq: usize,
    threads: usize,
) -> Result<Option<String>> {
    let Some(budget) = ggpt::budget::detect(flag) else {
        return Ok(None);
    };
    let needs = run_needs(
        model,
        kv_positions(n_tokens, n_ctx),
        n_ctx,
        n_prompt,
        n_seq,
        threads,
    );
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
    let r = model.gpt2().residency();
    let pinning = match r.map(|r| r.pinning().clone()) {
        Some(Pinning::Copied(why)) => format!("copied once, {why}"),
        _ => "locked".to_string(),
    };
    let reads = match r.and_then(|r| r.read_mode()) {
        Some(ReadMode::Direct) => "O_DIRECT reads into",
        Some(ReadMode::Buffered) => "buffered reads into",
        None => "read-ahead",
    };
    Ok(Some(format!(
        "memory budget {budget}: {} of weights resident ({pinning}), streaming {:.1} MB per token \
         ({reads} {} of buffers); full speed needs {}",
        Mib(plan.resident_bytes),
        plan.streamed_bytes as f64 / 1e6,
        Mib(r
            .map(|r| r.ring_bytes())
            .filter(|&b| b > 0)
            .unwrap_or(plan.window)),
        Mib(plan.full_budget)
    )))
}

/// `ggpt mem FILE --budget B [--measure]`: what fits in `budget` (see [`Args::budget`]).
fn budget_report(
    args: &Args,
    model: Model,
    budget: u64,
    n_ctx: usize,
    run: &RunShape,
) -> Result<()> {
    use ggpt::budget::{plan, Layout};
    let shape = MemShape::of(&model);
    let layout = Layout::of(model.gpt2());
    let needs_at = |c: usize| Needs::of(&shape, c as u64, run);
    let p = match plan(&layout, needs_at(n_ctx), budget) {
        Ok(p) => p,
        Err(e @ BudgetError::TooSmall { .. }) => {
            return Err(flag_error(format!("--budget: {e} (at --ctx {n_ctx})")))
        }
        Err(e) => return Err(e.into()),
    };
    // The largest context whose KV and scratch fit beside every weight.
    let fits = |c: usize| needs_at(c).total() + layout.total() <= budget;
    let max_ctx = model.hparams().n_ctx as usize;
    debug_assert!(max_ctx > 0);
    let largest = if !fits(1) {
        0
    } else {
        let (mut lo, mut hi) = (1, max_ctx);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid) {
                lo = mid
            } else {
                hi = mid - 1
            }
        }
        lo
    };
    let disk_bw = if p.in_memory() {
        None
    } else {
        Some(ggpt::budget::disk_read_bandwidth(&args.path, 256 << 20)?)
    };
    let roofline = disk_bw.and_then(|bw| p.roofline(bw));
    let name = model.file_type_name();
    let max_ctx = model.hparams().n_ctx as usize;
    // Unmapped, so that the measurement can drop the file's pages from the cache.
    drop(model);
    let measured = if args.measure {
        Some(measure_in_cgroup(
            &args.path,
            budget,
            n_ctx,
            run.threads as usize,
        )?)
    } else {
        None
    };
    if args.json {
        let mut doc = json!({
            "format": name,
            "budget_bytes": budget,
            "n_ctx": n_ctx,
            "weights_per_token_bytes": layout.total(),
            "kv_bytes": p.needs.kv,
            "scratch_bytes": p.needs.scratch,
            "runtime_bytes": p.needs.runtime,
            "largest_in_memory_ctx": largest,
            "in_memory": p.in_memory(),
            "resident_bytes": p.resident_bytes,
            "streamed_bytes_per_token": p.streamed_bytes,
            "window_bytes": p.window,
            "disk_read_bandwidth": disk_bw,
            "roofline_ts": roofline,
            "min_budget_bytes": p.min_budget,
            "full_speed_budget_bytes": p.full_budget,
        });
        if let Some(m) = measured {
            doc["measured"] = m;
        }
        return print_stdout(&format!("{doc}\n"));
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} ({name}), budget {}, ctx {n_ctx}",
        args.path.display(),
        Mib(budget)
    );
    let largest_text = match largest {
        0 => "none: the weights alone do not fit".to_string(),
        c if c == max_ctx => format!("{c} (the model's whole context)"),
        c => format!("{c} tokens"),
    };
    let speed = if p.in_memory() {
        "in memory (full speed)".to_string()
    } else {
        format!(
            "streaming {:.1} MB per token ({} resident, read-ahead window {})",
            p.streamed_bytes as f64 / 1e6,
            Mib(p.resident_bytes),
            Mib(p.window)
        )
    };
    let rows = [
        ("weights read per token", Mib(layout.total()).to_string()),
        ("KV + scratch + runtime", Mib(p.needs.total()).to_string()),
        ("largest context in memory", largest_text),
        ("at this context", speed),
        ("smallest budget that runs", Mib(p.min_budget).to_string()),
        (
            "smallest budget at full speed",
            Mib(p.full_budget).to_string(),
        ),
    ];
    for (label, v) in rows {
        let _ = writeln!(o, "  {label:<30} {v}");
    }
    if let (Some(bw), Some(roof)) = (disk_bw, roofline) {
        let _ = writeln!(
            o,
            "  {:<30} {:.0} MB/s (cold O_DIRECT read of this file): roofline {roof:.1} t/s",
            "disk read bandwidth",
            bw / 1e6
        );
    }
    if let Some(m) = measured {
        let _ = writeln!(
            o,
            "measured under a cgroup limit of {}: {:.2} t/s, {:.1} MB read per token, peak usage {}, OOM kills {}",
            Mib(budget),
            m["tokens_per_second"].as_f64().unwrap_or(0.0),
            m["storage_read_mb_per_token"].as_f64().unwrap_or(0.0),
            Mib(m["peak_usage_bytes"].as_u64().unwrap_or(0)),
            m["oom_kills"].as_u64().unwrap_or(0)
        );
    }
    print_stdout(&o)
}

/// Run `ggpt run` on `path` (64 greedy tokens) inside a new cgroup v1 memory group limited to
/// `limit` bytes, after dropping the file's pages from the page cache (so every page it uses
/// is read, and charged to the group). Needs root and /sys/fs/cgroup/memory.
fn measure_in_cgroup(
    path: &std::path::Path,
    limit: u64,
    n_ctx: usize,
    threads: usize,
) -> Result<serde_json::Value> {
    use anyhow::Context as _;
    let root = std::path::Path::new("/sys/fs/cgroup/memory");
    let dir = root.join(format!("ggpt-mem-{}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| {
        format!(
            "--measure --budget needs a cgroup v1 memory group: cannot create {}",
            dir.display()
        )
    })?;
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let group = Remove(dir.clone());
    std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())
        .with_context(|| format!("cannot set {}/memory.limit_in_bytes", dir.display()))?;
    ggpt::budget::drop_cached(path)?;
    let exe = std::env::current_exe().context("cannot find the ggpt executable")?;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(&dir)
        .arg(exe)
        .args([
            "run",
            "-p",
            "The history of",
            "-n",
            "64",
            "--temp",
            "0",
            "--ignore-eos",
        ])
        .arg("-c")
        .arg(n_ctx.to_string())
        .arg("-t")
        .arg(threads.to_string())
        .arg("-m")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot start ggpt run")?;
    let err = String::from_utf8_lossy(&out.stderr);
    let read = |f: &str| std::fs::read_to_string(group.0.join(f)).unwrap_or_default();
    let oom_kills: u64 = read("memory.oom_control")
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let peak: u64 = read("memory.max_usage_in_bytes")
        .trim()
        .parse()
        .unwrap_or(0);
    // "… ( x ms per token,  y tokens per second)" on the eval line.
    let field = |prefix: &str, before: &str| -> Option<f64> {
        let line = err.lines().find(|l| l.starts_with(prefix))?;
        let head = line.split(before).next()?;
        head.rsplit([' ', '('])
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    let tps = field("ggpt:        eval time", " tokens per second");
    let mb = field("ggpt: storage reads", " MB per generated token");
    if !out.status.success() {
        anyhow::bail!(
            "ggpt run under a cgroup limit of {} failed ({}, OOM kills {oom_kills}): {}",
            Mib(limit),
            out.status,
            err.lines().last().unwrap_or("")
        );
    }
    Ok(json!({
        "tokens_per_second": tps,
        "storage_read_mb_per_token": mb.unwrap_or(0.0),
        "peak_usage_bytes": peak,
        "oom_kills": oom_kills,
    }))
}

/// `MemAvailable` from /proc/meminfo in bytes (`None` where there is no such file).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Prefill (almost) the whole context in calls of `n_batch` tokens, decode a few tokens, read
/// /proc.
fn measure(
    model: &Model,
    n_ctx: usize,
    n_batch: usize,
    n_seq: usize,
    kv: KvType,
) -> Result<serde_json::Value> {
    let n_vocab = model.hparams().n_vocab as u32;
    // Decode the last few positions one at a time; prefill the rest.
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
            // Every matrix of an F16 file is F16 (convert's policy for its default type).
            float_down: p.ftype.default_type().block_size() == 1,
        };
        let n_ctx = args.ctx.unwrap_or(c.n_ctx) as u64;
        if n_ctx == 0 || n_ctx > c.n_ctx as u64 {
            bail_flag!("--ctx {n_ctx} is outside 1..={}", c.n_ctx);
        }
        let run = RunShape {
            n_ctx,
            n_batch: args
                .batch
                .unwrap_or(n_ctx as usize)
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
