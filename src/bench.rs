//! Speed measurement in llama-bench's terms: `ppN` = one batch of N prompt tokens from an empty
//! cache (logits for the last token only), `tgN` = N tokens decoded one at a time from an empty
//! cache. Each test runs once to warm up, then `reps` timed times; t/s is reported as mean ± sd.

use crate::model::Model;
use crate::session::Session;
use anyhow::Result;
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

/// Time a prompt of `n` tokens processed as one batch.
pub fn prefill(model: &Model, n: usize, reps: usize) -> Result<TestResult> {
    let toks = tokens(n, model.hparams().n_vocab as u32);
    let mut session = Session::new(model, n, 1)?;
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        session.reset();
        let t = Instant::now();
        session.prefill(&toks)?;
        let secs = t.elapsed().as_secs_f64();
        if rep > 0 {
            samples.push(n as f64 / secs);
        }
    }
    Ok(TestResult {
        test: format!("pp{n}"),
        samples,
    })
}

/// Time `n` tokens decoded one by one from an empty cache.
pub fn decode(model: &Model, n: usize, reps: usize) -> Result<TestResult> {
    let toks = tokens(n, model.hparams().n_vocab as u32);
    let mut session = Session::new(model, n, 1)?;
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        session.reset();
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
        test: format!("tg{n}"),
        samples,
    })
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
    fn token_ids_stay_in_vocabulary() {
        let t = tokens(1000, 50257);
        assert!(t.iter().all(|&x| x < 50257));
        assert!(t.windows(2).any(|w| w[0] != w[1]));
    }
}
