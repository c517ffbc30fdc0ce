//! `ggpt bench`: llama-bench-style speed table for one or more GGUF files, or for
//! GPT-2-Medium-shaped random models that ggpt builds itself (`--synthetic`).

use super::common::{bail_flag, Stdout};
use anyhow::Result;
use ggpt::bench::{
    bytes_per_token, decode, fma_peak, kv_bytes_per_token, matmul_sweep, prefill, prefill_flops,
    read_bandwidth, TestResult,
};
use ggpt::model::Model;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF files to benchmark.
    #[arg(short = 'm', long = "model")]
    pub models: Vec<PathBuf>,
    /// Build random models of this shape instead (gpt2-medium, gpt2, tiny) and bench them.
    #[arg(long)]
    pub synthetic: Option<String>,
    /// With --synthetic: which formats (f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m or all).
    #[arg(long = "type", default_value = "all")]
    pub ftype: String,
    /// With --synthetic: where the generated checkpoint and GGUF files are kept (reused).
    #[arg(long, default_value = "out/synth")]
    pub synth_dir: PathBuf,
    /// Prompt lengths for the prefill tests (0 = skip); as in llama-bench, a comma list or the
    /// flag repeated runs one test per value.
    #[arg(short = 'p', long, value_delimiter = ',', num_args = 1.., default_values_t = [512])]
    pub n_prompt: Vec<usize>,
    /// Tokens for the decode tests (0 = skip); a list runs one test per value.
    #[arg(short = 'n', long, value_delimiter = ',', num_args = 1.., default_values_t = [128])]
    pub n_gen: Vec<usize>,
    /// Tokens already in the KV cache when each test starts (llama-bench's `-d`): filled,
    /// untimed, before every repetition; the tests are then named `pp512 @ d512`, `tg128 @ d512`.
    /// A list runs every test at every depth.
    #[arg(short = 'd', long = "n-depth", value_delimiter = ',', num_args = 1.., default_values_t = [0])]
    pub n_depth: Vec<usize>,
    /// Timed repetitions per test (after one warm-up).
    #[arg(short = 'r', long, default_value_t = 3)]
    pub reps: usize,
    /// Threads (default: one per core); a list runs every test with each count, as
    /// llama-bench's `-t` does.
    #[arg(short = 't', long, value_delimiter = ',', num_args = 1..)]
    pub threads: Vec<usize>,
    /// Print JSON lines instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Memory budget (300M, 1.5G, bytes): weights that do not fit beside KV and scratch are
    /// streamed; the streamed bytes per token and the disk-read roofline are printed.
    #[arg(long = "mem-budget", value_parser = super::mem::parse_size_arg)]
    pub mem_budget: Option<u64>,
}

/// One table row.
pub struct Row {
    pub file: PathBuf,
    pub ftype: String,
    pub size: u64,
    pub params: u64,
    /// Weight bytes one decoded token reads (for the roofline of `tg` rows).
    pub bytes_per_token: u64,
    /// KV-cache bytes one token of a `tg` row reads, on average over the test (0 for `pp`).
    pub kv_bytes_per_token: f64,
    /// Floating-point operations per token of a `pp` row (0 for `tg` rows).
    pub flops_per_token: f64,
    /// For a `pp` row: GFLOP/s of its matmuls alone (`ggpt::bench::matmul_sweep`).
    pub matmul_gflops: Option<f64>,
    pub threads: usize,
    /// Tokens in the cache before the test (`-d`).
    pub n_depth: usize,
    pub result: TestResult,
}

impl Row {
    /// Bytes one token of a `tg` row reads: the weights and, on average, the KV cache. The
    /// decode roofline divides the read bandwidth by this.
    fn read_bytes_per_token(&self) -> f64 {
        self.bytes_per_token as f64 + self.kv_bytes_per_token
    }

    /// The file's name, as the tables show it.
    fn name(&self) -> String {
        self.file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

pub fn run(args: Args) -> Result<()> {
    // One rayon pool per thread count; the kernels split their work by the current pool's
    // size, so a test run inside a pool uses that many threads.
    let mut pools = Vec::new();
    for t in thread_counts(&args.threads)? {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .map_err(|e| anyhow::anyhow!("a pool of {t} threads: {e}"))?;
        pools.push((t, pool));
    }
    let max_threads = pools.iter().map(|p| p.0).max().unwrap_or(1);
    if args.reps == 0 || args.reps > 1000 {
        bail_flag!("-r {} is outside 1..=1000", args.reps);
    }
    let files = match &args.synthetic {
        Some(shape) => synthetic_models(shape, &args.ftype, &args.synth_dir)?,
        None => args.models.clone(),
    };
    if files.is_empty() {
        bail_flag!("nothing to bench: give -m FILE (repeatable) or --synthetic gpt2-medium");
    }
    // Tests in llama-bench's order: per depth, the prefill tests, then the decode tests.
    let prompts: Vec<usize> = args.n_prompt.iter().copied().filter(|&p| p > 0).collect();
    let gens: Vec<usize> = args.n_gen.iter().copied().filter(|&n| n > 0).collect();
    let (max_p, max_n) = (
        prompts.iter().copied().max().unwrap_or(0),
        gens.iter().copied().max().unwrap_or(0),
    );
    let max_d = args.n_depth.iter().copied().max().unwrap_or(0);
    // Decode is memory-bound: measure what memory delivers to each thread count, before and
    // after the runs (the machine may be shared), and relate each decode result to it.
    // Prefill is compute-bound: measure the f32 FMA peak of each thread count likewise.
    let measure = |f: fn(usize) -> f64| -> Vec<f64> {
        pools
            .iter()
            .map(|(_, pool)| pool.install(|| f(5)))
            .collect()
    };
    let bw_before = (!gens.is_empty()).then(|| measure(read_bandwidth));
    let peak_before = (!prompts.is_empty()).then(|| measure(fma_peak));
    let mut out = Stdout::new();
    if !args.json {
        out.write(
            "| model | size | params | threads | test | t/s |\n|---|---:|---:|---:|---:|---:|\n",
        )?;
    }
    let mut decode_rows = Vec::new();
    let mut prefill_rows = Vec::new();
    for file in &files {
        let mut model = Model::load(file)?;
        let n_ctx = model.hparams().n_ctx as usize;
        if max_p.max(max_n).saturating_add(max_d) > n_ctx {
            bail_flag!(
                "-d {max_d} plus -p {max_p} / -n {max_n} exceed the context of {}: {n_ctx} tokens",
                file.display()
            );
        }
        if args.mem_budget.is_some() {
            let n = (max_d + max_p.max(max_n)).clamp(1, n_ctx);
            let fit =
                super::mem::fit_budget(&mut model, args.mem_budget, n, max_p, n, 1, max_threads)?;
            if let Some(line) = fit {
                super::common::note!("{}: {line}", file.display());
            }
            if let Some(r) = model.gpt2().residency() {
                let bw = ggpt::budget::disk_read_bandwidth(file, 256 << 20)?;
                super::common::note!(
                    "{}: streamed {:.1} MB per token; disk read {:.0} MB/s (cold O_DIRECT); disk roofline {:.2} t/s",
                    file.display(),
                    r.streamed_bytes() as f64 / 1e6,
                    bw / 1e6,
                    bw / r.streamed_bytes() as f64
                );
            }
        }
        let size: u64 = model.file().tensors().iter().map(|t| t.size).sum();
        let params: u64 = model.file().tensors().iter().map(|t| t.n_elements()).sum();
        let ftype = model.file_type_name();
        let bytes_per_token = bytes_per_token(&model);
        let row = |result: TestResult, threads: usize, n_depth: usize| Row {
            file: file.to_path_buf(),
            ftype: ftype.clone(),
            size,
            params,
            bytes_per_token,
            kv_bytes_per_token: 0.0,
            flops_per_token: 0.0,
            matmul_gflops: None,
            threads,
            n_depth,
            result,
        };
        // llama-bench's order: per thread count, per depth, the prefill then the decode tests.
        for (ti, (t, pool)) in pools.iter().enumerate() {
            for &d in &args.n_depth {
                for &p in &prompts {
                    let (result, (flops, secs)) = pool.install(|| {
                        anyhow::Ok((
                            prefill(&model, p, args.reps, d)?,
                            matmul_sweep(&model, p, args.reps)?,
                        ))
                    })?;
                    let r = Row {
                        flops_per_token: prefill_flops(&model, p, d) / p as f64,
                        matmul_gflops: Some(flops / secs / 1e9),
                        ..row(result, *t, d)
                    };
                    out.write(&format_row(&r, args.json))?;
                    prefill_rows.push((ti, r));
                }
                for &n in &gens {
                    let result = pool.install(|| decode(&model, n, args.reps, d))?;
                    let r = Row {
                        kv_bytes_per_token: kv_bytes_per_token(&model, n, d),
                        ..row(result, *t, d)
                    };
                    out.write(&format_row(&r, args.json))?;
                    decode_rows.push((ti, r));
                }
            }
        }
    }
    if let Some(before) = peak_before {
        let after = measure(fma_peak);
        let peak = |ti: usize| before[ti].max(after[ti]);
        if args.json {
            for (ti, r) in &prefill_rows {
                let gflops = r.result.mean() * r.flops_per_token / 1e9;
                let doc = serde_json::json!({
                    "model": r.file.display().to_string(),
                    "type": r.ftype,
                    "n_threads": r.threads,
                    "test": r.result.test,
                    "avg_ts": r.result.mean(),
                    "flops_per_token": r.flops_per_token,
                    "gflops": gflops,
                    "fma_peak_gflops_before": before[*ti] / 1e9,
                    "fma_peak_gflops_after": after[*ti] / 1e9,
                    "peak_fraction": gflops * 1e9 / peak(*ti),
                    "matmul_gflops": r.matmul_gflops,
                    "matmul_peak_fraction": r.matmul_gflops.map(|g| g * 1e9 / peak(*ti)),
                });
                out.write(&format!("{doc}\n"))?;
            }
        } else {
            out.write(&format!(
                "\nmatmuls alone: every layer matrix times the row's prompt tokens, one batch per matrix, best of {} sweeps\n",
                args.reps
            ))?;
            for (ti, (t, _)) in pools.iter().enumerate() {
                out.write(&format!(
                    "f32 FMA peak ({t} threads, {}, best of 5): {:.1} GFLOP/s before, {:.1} GFLOP/s after\n",
                    ggpt_quant::cpu::isa(),
                    before[ti] / 1e9,
                    after[ti] / 1e9
                ))?;
            }
            out.write("| model | threads | test | GFLOP per token | pp t/s | GFLOP/s | of f32 FMA peak | matmuls alone GFLOP/s | of f32 FMA peak |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n")?;
            for (ti, r) in &prefill_rows {
                let gflops = r.result.mean() * r.flops_per_token / 1e9;
                let mm = r.matmul_gflops.unwrap_or(0.0);
                out.write(&format!(
                    "| {} {} | {} | {} | {:.3} | {:.2} | {:.1} | {:.0} % | {:.1} | {:.0} % |\n",
                    r.name(),
                    r.ftype,
                    r.threads,
                    r.result.test,
                    r.flops_per_token / 1e9,
                    r.result.mean(),
                    gflops,
                    100.0 * gflops * 1e9 / peak(*ti),
                    mm,
                    100.0 * mm * 1e9 / peak(*ti)
                ))?;
            }
        }
    }
    if let Some(before) = bw_before {
        let after = measure(read_bandwidth);
        // The better of the two measurements: the fraction is then a lower bound.
        let bw = |ti: usize| before[ti].max(after[ti]);
        if args.json {
            for (ti, r) in &decode_rows {
                let ts = r.result.mean();
                let bpt = r.read_bytes_per_token();
                let doc = serde_json::json!({
                    "model": r.file.display().to_string(),
                    "type": r.ftype,
                    "n_threads": r.threads,
                    "test": r.result.test,
                    "avg_ts": ts,
                    "bytes_per_token": r.bytes_per_token,
                    "kv_bytes_per_token": r.kv_bytes_per_token,
                    "read_bandwidth_before": before[*ti],
                    "read_bandwidth_after": after[*ti],
                    "roofline_ts": bw(*ti) / bpt,
                    "roofline_fraction": ts * bpt / bw(*ti),
                });
                out.write(&format!("{doc}\n"))?;
            }
        } else {
            out.write("\n")?;
            for (ti, (t, _)) in pools.iter().enumerate() {
                out.write(&format!(
                    "memory read bandwidth ({t} threads, best of 5): {:.1} GB/s before, {:.1} GB/s after\n",
                    before[ti] / 1e9,
                    after[ti] / 1e9
                ))?;
            }
            out.write("| model | threads | test | weight bytes per token | KV bytes per token | roofline t/s | tg t/s | of roofline |\n|---|---:|---|---:|---:|---:|---:|---:|\n")?;
            for (ti, r) in &decode_rows {
                let ts = r.result.mean();
                let bpt = r.read_bytes_per_token();
                let roof = bw(*ti) / bpt;
                out.write(&format!(
                    "| {} {} | {} | {} | {:.1} MB | {:.1} MB | {:.1} | {:.2} | {:.0} % |\n",
                    r.name(),
                    r.ftype,
                    r.threads,
                    r.result.test,
                    r.bytes_per_token as f64 / 1e6,
                    r.kv_bytes_per_token / 1e6,
                    roof,
                    ts,
                    100.0 * ts / roof
                ))?;
            }
        }
    }
    Ok(())
}

/// The thread counts of `-t` (none given: one per core), each checked.
fn thread_counts(given: &[usize]) -> Result<Vec<usize>> {
    if given.is_empty() {
        return Ok(vec![super::common::thread_count(None)?]);
    }
    given
        .iter()
        .map(|&t| super::common::thread_count(Some(t)))
        .collect()
}

fn format_row(r: &Row, json: bool) -> String {
    if json {
        let doc = serde_json::json!({
            "model": r.file.display().to_string(),
            "type": r.ftype,
            "model_size": r.size,
            "model_n_params": r.params,
            "n_threads": r.threads,
            "n_depth": r.n_depth,
            "test": r.result.test,
            "samples_ts": r.result.samples,
            "avg_ts": r.result.mean(),
            "stddev_ts": r.result.sd(),
        });
        format!("{doc}\n")
    } else {
        format!(
            "| {} {} | {:.2} MiB | {:.2} M | {} | {} | {:.2} ± {:.2} |\n",
            r.name(),
            r.ftype,
            r.size as f64 / (1024.0 * 1024.0),
            r.params as f64 / 1e6,
            r.threads,
            r.result.test,
            r.result.mean(),
            r.result.sd()
        )
    }
}

/// GPT-2-shaped random models in every requested format, built once under `dir` and reused:
/// a float16 Hugging Face checkpoint (`ggpt synth`) converted in one pass.
fn synthetic_models(shape: &str, ftype: &str, dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    use ggpt_convert::pipeline::{convert_hf, ConvertOptions, NoProgress};
    use ggpt_convert::policy::FileType;
    use ggpt_convert::synth::{synth, SynthOptions, SynthShape};
    let Some(s) = SynthShape::named(shape) else {
        bail_flag!("--synthetic {shape:?}: expected gpt2-xl, gpt2-large, gpt2-medium, gpt2, distilgpt2 or tiny");
    };
    let types = FileType::parse_list(ftype)
        .map_err(|e| super::common::flag_error(format!("--type: {e}")))?;
    let hf = dir.join(shape);
    if !hf.join("model.safetensors").is_file() {
        super::common::note!("writing a random {shape} checkpoint to {}", hf.display());
        let opts = SynthOptions {
            shape: s,
            dtype: ggpt_convert::safetensors::SrcDtype::F16,
            seed: 0,
            prefix: false,
            buffers: true,
            lm_head: false,
        };
        synth(&opts, &hf, &super::compare::bundled("models/tiny-gpt2"))?;
    }
    let paths: Vec<PathBuf> = types
        .iter()
        .map(|t| dir.join(format!("{shape}-{}.gguf", t.label())))
        .collect();
    let missing: Vec<FileType> = types
        .iter()
        .zip(&paths)
        .filter(|(_, p)| !p.is_file())
        .map(|(t, _)| *t)
        .collect();
    if !missing.is_empty() {
        super::common::note!("converting {} to {} format(s)", hf.display(), missing.len());
        let opts = ConvertOptions {
            hf_dir: hf,
            types: missing,
            output: Some(dir.to_path_buf()),
            name: Some(shape.to_string()),
        };
        convert_hf(&opts, &NoProgress)?;
    }
    Ok(paths)
}
