//! Speed measurement in llama-bench's terms: `ppN` = one batch of N prompt tokens (logits for
//! the last token only), `tgN` = N tokens decoded one at a time. Both start from an empty cache,
//! or, with a depth D (llama-bench's `-d`, shown as `tgN @ dD`), from a cache already holding D
//! tokens, filled before the clock starts. Each test runs once to warm up, then `reps` timed
//! times; t/s is reported as mean ± sd.

use crate::model::KvType;
use crate::model::Model;
use crate::session::Session;
use crate::Result;
use std::time::Instant;

/// One test's samples.
#[derive(Clone, Debug)]
pub struct TestResult {
    /// `pp512`, `tg128`, …
    pub test: String,
    /// Tokens per second of every timed repetition.
    pub samples: Vec<f64>,
}

impl TestResult {
    pub fn mean(&self) -> f64 {
        self.samples.iter().sum::<f64>() / self.samples.len().max(1) as f64
    }

    /// Sample standard deviation (0 for a single sample).
    pub fn sd(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples.iter().map(|s| (s - m) * (s - m)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
}

/// Deterministic pseudo-random token ids (the speed does not depend on which tokens).
fn tokens(n: usize, n_vocab: u32) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n_vocab as u64) as u32
        })
        .collect()
}

/// The name llama-bench gives a test: `pp512`, or `pp512 @ d256` after a depth of 256 tokens.
fn test_name(kind: &str, n: usize, depth: usize) -> String {
    if depth == 0 {
        format!("{kind}{n}")
    } else {
        format!("{kind}{n} @ d{depth}")
    }
}

/// A session of `depth + n` positions, and the `depth` tokens that fill it before each timed
/// repetition.
fn session_with_depth(model: &Model, n: usize, depth: usize) -> Result<(Session<'_>, Vec<u32>)> {
    let session = Session::new(model, depth + n, 1)?;
    Ok((session, tokens(depth, model.hparams().n_vocab as u32)))
}

/// Empty the session and, untimed, prefill the depth tokens (as llama-bench does before each
/// repetition of a test with `-d`).
fn refill(session: &mut Session<'_>, fill: &[u32]) -> Result<()> {
    session.reset();
    if !fill.is_empty() {
        session.prefill(fill)?;
    }
    Ok(())
}

/// Time a prompt of `n` tokens processed as one batch, after `depth` tokens already in the cache.
pub fn prefill(model: &Model, n: usize, reps: usize, depth: usize) -> Result<TestResult> {
    let toks = tokens(n, model.hparams().n_vocab as u32);
    let (mut session, fill) = session_with_depth(model, n, depth)?;
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        refill(&mut session, &fill)?;
        let t = Instant::now();
        session.prefill(&toks)?;
        let secs = t.elapsed().as_secs_f64();
        if rep > 0 {
            samples.push(n as f64 / secs);
        }
    }
    Ok(TestResult {
        test: test_name("pp", n, depth),
        samples,
    })
}

/// Time `n` tokens decoded one by one, after `depth` tokens already in the cache.
pub fn decode(model: &Model, n: usize, reps: usize, depth: usize) -> Result<TestResult> {
    let toks = tokens(n, model.hparams().n_vocab as u32);
    let (mut session, fill) = session_with_depth(model, n, depth)?;
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        refill(&mut session, &fill)?;
        let t = Instant::now();
        for &tok in &toks {
            session.decode(tok)?;
        }
        let secs = t.elapsed().as_secs_f64();
        if rep > 0 {
            samples.push(n as f64 / secs);
        }
    }
    Ok(TestResult {
        test: test_name("tg", n, depth),
        samples,
    })
}

/// Bytes of weights one decoded token reads: every tensor except the position embedding and,
/// when the model has its own output matrix, the token embedding (each contributes one row
/// per token). With a tied head the token embedding *is* the output matrix and is read whole.
/// The KV cache's reads come on top ([`kv_bytes_per_token`]).
pub fn bytes_per_token(model: &Model) -> u64 {
    let tensors = model.file().tensors();
    let has_output = tensors.iter().any(|t| t.name == "output.weight");
    tensors
        .iter()
        .filter(|t| t.name != "position_embd.weight")
        .filter(|t| !(has_output && t.name == "token_embd.weight"))
        .map(|t| t.size)
        .sum()
}

/// Bytes of F16 KV cache one token of a `tgN @ dD` test reads, averaged over its N tokens:
/// token i (from 0) attends over D + i + 1 positions, each holding a K and a V row of n_embd
/// values in every layer, so the mean context is D + (N + 1)/2.
pub fn kv_bytes_per_token(model: &Model, n: usize, depth: usize) -> f64 {
    let hp = model.hparams();
    let row = (hp.n_layer * 2 * hp.n_embd) as f64 * KvType::F16.size() as f64;
    row * (depth as f64 + (n as f64 + 1.0) / 2.0)
}

/// Read bandwidth of this machine in bytes per second, measured the way decoding uses memory:
/// every thread of the current rayon pool streams its own contiguous part of a buffer much
/// larger than the last-level cache, summing it. Best of `reps` passes.
pub fn read_bandwidth(reps: usize) -> f64 {
    use rayon::prelude::*;
    // 256 MiB: eight times a 32 MiB L3, small enough for a low-memory machine.
    const BYTES: usize = 256 << 20;
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let threads = rayon::current_num_threads().max(1);
    let per = buf.len().div_ceil(threads);
    let mut best = 0.0f64;
    // One untimed pass first: it wakes the pool's threads and brings the clocks up.
    for rep in 0..=reps.max(1) {
        let t = Instant::now();
        let sum: u64 = buf
            .par_chunks(per)
            .map(|part| {
                // Eight independent lanes so the compiler vectorizes and the adds never
                // become the bottleneck; memory is.
                let mut acc = [0u64; 8];
                let mut it = part.chunks_exact(8);
                for c in &mut it {
                    for (a, v) in acc.iter_mut().zip(c) {
                        *a = a.wrapping_add(*v);
                    }
                }
                let tail: u64 = it.remainder().iter().fold(0, |a, v| a.wrapping_add(*v));
                acc.iter().fold(tail, |a, v| a.wrapping_add(*v))
            })
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        if rep > 0 {
            best = best.max(BYTES as f64 / secs);
        }
    }
    best
}

/// Floating-point operations of one `ppN @ dD` test (`n` prompt tokens after `depth` cached
/// ones, logits for the last one): 2 per multiply-add of every layer matrix for every token, of
/// the output matrix for one token, and of causal attention (`QKᵀ` and `AV`: prompt token i
/// attends over D + i + 1 positions, so (n·D + n(n+1)/2) · n_embd multiply-adds each per
/// layer). Norms, GELU and softmax (well under 1 %) are left out.
pub fn prefill_flops(model: &Model, n: usize, depth: usize) -> f64 {
    let hp = model.hparams();
    let tensors = model.file().tensors();
    let layer_params: u64 = tensors
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.name.ends_with(".weight") && t.dims.len() == 2)
        .map(|t| t.n_elements())
        .sum();
    let head = hp.n_vocab * hp.n_embd;
    let n = n as f64;
    let positions = n * depth as f64 + n * (n + 1.0) / 2.0;
    let attn = hp.n_layer as f64 * 2.0 * positions * hp.n_embd as f64;
    2.0 * (n * layer_params as f64 + head as f64) + 2.0 * attn
}

/// The layer matrices of `model` (every 2-D `blk.*.weight`), as the matmuls of prefill see them.
fn layer_matrices(model: &Model) -> Result<Vec<ggpt_quant::matmul::QMatrix<'_>>> {
    let file = model.file();
    file.tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.name.ends_with(".weight") && t.dims.len() == 2)
        .map(|t| {
            ggpt_quant::matmul::QMatrix::new(
                t.ty,
                t.rows() as usize,
                t.cols() as usize,
                file.tensor_data(t),
            )
            .map_err(|e| {
                crate::Error::Load(ggpt_models::LoadError::BadValues {
                    file: "model".into(),
                    name: t.name.clone(),
                    what: e.to_string(),
                })
            })
        })
        .collect()
}

/// The matmuls of a `ppN` test on their own: every layer matrix of `model` (in file order, so
/// the weights stream as in a forward pass) multiplied with the same `n` tokens of activations,
/// as one batch each, through [`ggpt_quant::matmul::matmul`] with the pool's threads. Returns the
/// floating-point operations of one sweep (2 per multiply-add) and the best sweep time in
/// seconds over `reps` timed sweeps after one warm-up. Activations are deterministic values in
/// (−1, 1), starting on a cache line like the model's; the speed of the kernels does not depend
/// on the values.
pub fn matmul_sweep(model: &Model, n: usize, reps: usize) -> Result<(f64, f64)> {
    let mats = layer_matrices(model)?;
    let max_cols = mats.iter().map(|m| m.cols()).max().unwrap_or(0);
    let max_rows = mats.iter().map(|m| m.rows()).max().unwrap_or(0);
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    // 16 spare values so the activations can start on a cache line, as the model's (page-
    // aligned) ones do; unaligned ones would be copied by the float matmuls first.
    let store: Vec<f32> = (0..n * max_cols + 16)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let skip = store.as_ptr().align_offset(64).min(16);
    let x = &store[skip..skip + n * max_cols];
    let mut y = vec![0.0f32; n * max_rows];
    let mut scratch = ggpt_quant::matmul::Scratch::default();
    let flops: f64 = mats
        .iter()
        .map(|m| 2.0 * (m.rows() * m.cols() * n) as f64)
        .sum();
    let mut best = f64::INFINITY;
    for rep in 0..=reps.max(1) {
        let t = Instant::now();
        for m in &mats {
            ggpt_quant::matmul::matmul(
                m,
                &x[..n * m.cols()],
                n,
                None,
                &mut y[..n * m.rows()],
                &mut scratch,
            );
        }
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(&y);
        if rep > 0 {
            best = best.min(secs);
        }
    }
    Ok((flops, best))
}

/// The f32 FMA peak of this machine in FLOP/s, measured the way prefill uses the cores: every
/// thread of the current rayon pool runs [`ggpt_quant::peak::fma_burst`] at the level the
/// kernels use, at the same time. Best of `reps` passes of ~50 ms.
pub fn fma_peak(reps: usize) -> f64 {
    use rayon::prelude::*;
    let level = ggpt_quant::cpu::level();
    let threads = rayon::current_num_threads().max(1);
    let iters = 1 << 23;
    let mut best = 0.0f64;
    for rep in 0..=reps.max(1) {
        let t = Instant::now();
        let (flops, v) = (0..threads)
            .into_par_iter()
            .map(|_| ggpt_quant::peak::fma_burst(level, iters))
            .reduce(|| (0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(v);
        if rep > 0 {
            best = best.max(flops as f64 / secs);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sd() {
        let r = TestResult {
            test: "tg1".into(),
            samples: vec![1.0, 2.0, 3.0],
        };
        assert!((r.mean() - 2.0).abs() < 1e-12);
        assert!((r.sd() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bandwidth_is_positive_and_finite() {
        let b = read_bandwidth(1);
        assert!(b.is_finite() && b > 1e8, "{b}");
    }

    #[test]
    fn fma_peak_is_positive_and_finite() {
        let p = fma_peak(1);
        assert!(p.is_finite() && p > 1e8, "{p}");
    }

    #[test]
    fn token_ids_stay_in_vocabulary() {
        let t = tokens(1000, 50257);
        assert!(t.iter().all(|&x| x < 50257));
        assert!(t.windows(2).any(|w| w[0] != w[1]));
    }
}
