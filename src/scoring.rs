//! Per-token quality statistics over logits: negative log-likelihood, KL divergence from a base
//! model, top-1 agreement and Δp of the correct token — and their aggregation into the numbers
//! `ggpt perplexity` prints (llama-perplexity's definitions, computed in f64).

/// `log Σ exp(x)` of a logit row and its argmax (lowest index on ties).
pub fn logsumexp_argmax(logits: &[f32]) -> (f64, usize) {
    let mut max = f32::NEG_INFINITY;
    let mut arg = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > max {
            max = v;
            arg = i;
        }
    }
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (max as f64 + sum.ln(), arg)
}

/// Everything measured at one scored position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenScore {
    /// −log p(target).
    pub nll: f64,
    /// The model's most likely token.
    pub argmax: usize,
    /// Present when a base model was scored in lockstep.
    pub vs_base: Option<VsBase>,
}

/// The comparison of one position against the base model's distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VsBase {
    /// KL(P_base ‖ P_model), in nats.
    pub kld: f64,
    /// The two models' top tokens agree.
    pub same_top: bool,
    /// p_model(target) − p_base(target).
    pub delta_p: f64,
    /// The base model's −log p(target).
    pub base_nll: f64,
}

/// Score one position: `logits` predicts `target`; `base` is the base model's logits for the same position.
pub fn score(logits: &[f32], target: usize, base: Option<&[f32]>) -> TokenScore {
    let (lse, argmax) = logsumexp_argmax(logits);
    let nll = lse - logits[target] as f64;
    let vs_base = base.map(|b| {
        let (blse, bargmax) = logsumexp_argmax(b);
        // KL(P‖Q) = Σ p (log p − log q) with log p = b − blse, log q = l − lse.
        let mut kld = 0.0f64;
        for (&bv, &lv) in b.iter().zip(logits) {
            let lp = bv as f64 - blse;
            let lq = lv as f64 - lse;
            let p = lp.exp();
            if p > 0.0 {
                kld += p * (lp - lq);
            }
        }
        let base_nll = blse - b[target] as f64;
        VsBase {
            kld: kld.max(0.0),
            same_top: bargmax == argmax,
            delta_p: (-nll).exp() - (-base_nll).exp(),
            base_nll,
        }
    });
    TokenScore {
        nll,
        argmax,
        vs_base,
    }
}

/// Running aggregate of [`TokenScore`]s.
#[derive(Clone, Debug, Default)]
pub struct Aggregate {
    n: u64,
    sum_nll: f64,
    sum_nll2: f64,
    base_sum_nll: f64,
    klds: Vec<f32>,
    same_top: u64,
    sum_dp: f64,
    sum_dp2: f64,
}

/// The summary numbers (see docs/quality.md for the definitions).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub tokens: u64,
    pub mean_nll: f64,
    pub ppl: f64,
    /// Standard error of the PPL (PPL × standard error of the mean NLL).
    pub ppl_err: f64,
    pub vs_base: Option<BaseSummary>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BaseSummary {
    pub base_ppl: f64,
    pub ppl_ratio: f64,
    pub mean_kld: f64,
    pub median_kld: f64,
    pub p99_kld: f64,
    pub max_kld: f64,
    /// Fraction of positions whose top token agrees, and its binomial standard error.
    pub same_top: f64,
    pub same_top_err: f64,
    pub mean_delta_p: f64,
    pub rms_delta_p: f64,
}

impl Aggregate {
    pub fn add(&mut self, s: &TokenScore) {
        self.n += 1;
        self.sum_nll += s.nll;
        self.sum_nll2 += s.nll * s.nll;
        if let Some(v) = s.vs_base {
            self.base_sum_nll += v.base_nll;
            self.klds.push(v.kld as f32);
            self.same_top += v.same_top as u64;
            self.sum_dp += v.delta_p;
            self.sum_dp2 += v.delta_p * v.delta_p;
        }
    }

    pub fn tokens(&self) -> u64 {
        self.n
    }

    /// Current perplexity (for progress displays).
    pub fn ppl(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            (self.sum_nll / self.n as f64).exp()
        }
    }

    pub fn summary(&self) -> Summary {
        let n = self.n.max(1) as f64;
        let mean = self.sum_nll / n;
        let var = (self.sum_nll2 / n - mean * mean).max(0.0);
        let se_mean = if self.n > 1 {
            (var / (n - 1.0)).sqrt()
        } else {
            f64::NAN
        };
        let ppl = mean.exp();
        let vs_base = (!self.klds.is_empty()).then(|| {
            let m = self.klds.len() as f64;
            let mut sorted = self.klds.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let pct = |q: f64| -> f64 {
                let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
                sorted[idx] as f64
            };
            let p = self.same_top as f64 / m;
            let base_ppl = (self.base_sum_nll / m).exp();
            BaseSummary {
                base_ppl,
                ppl_ratio: ppl / base_ppl,
                mean_kld: self.klds.iter().map(|&k| k as f64).sum::<f64>() / m,
                median_kld: pct(0.5),
                p99_kld: pct(0.99),
                max_kld: sorted.last().copied().unwrap_or(0.0) as f64,
                same_top: p,
                same_top_err: if m > 1.0 {
                    (p * (1.0 - p) / (m - 1.0)).sqrt()
                } else {
                    f64::NAN
                },
                mean_delta_p: self.sum_dp / m,
                rms_delta_p: (self.sum_dp2 / m).sqrt(),
            }
        });
        Summary {
            tokens: self.n,
            mean_nll: mean,
            ppl,
            ppl_err: ppl * se_mean,
            vs_base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_matches_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let s = score(&logits, 2, None);
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        assert!((s.nll - (z.ln() - 3.0)).abs() < 1e-12);
        assert_eq!(s.argmax, 2);
    }

    #[test]
    fn kl_of_identical_is_zero_and_positive_otherwise() {
        let a = [0.5f32, -1.0, 2.0, 0.0];
        let s = score(&a, 1, Some(&a));
        let v = s.vs_base.unwrap();
        assert!(v.kld.abs() < 1e-12);
        assert!(v.same_top);
        assert_eq!(v.delta_p, 0.0);
        let b = [0.5f32, -1.0, 1.0, 3.0];
        let v = score(&a, 1, Some(&b)).vs_base.unwrap();
        assert!(v.kld > 0.01);
        assert!(!v.same_top);
    }

    #[test]
    fn aggregate_definitions() {
        let mut agg = Aggregate::default();
        let a = [0.0f32, 1.0];
        let b = [1.0f32, 0.0];
        agg.add(&score(&a, 1, Some(&a)));
        agg.add(&score(&a, 0, Some(&b)));
        let s = agg.summary();
        assert_eq!(s.tokens, 2);
        let nll1 = (1.0f64 + 1f64.exp()).ln() - 1.0;
        let nll2 = (1.0f64 + 1f64.exp()).ln();
        assert!((s.mean_nll - (nll1 + nll2) / 2.0).abs() < 1e-12);
        let vb = s.vs_base.unwrap();
        assert!((vb.same_top - 0.5).abs() < 1e-12);
        assert!(vb.mean_kld > 0.0);
        assert!(vb.median_kld <= vb.p99_kld);
    }
}
