//! Picking the next token from a row of logits.
//!
//! The chain and its defaults follow llama.cpp's common sampler (`common/sampling.cpp`), so
//! that the same settings mean the same thing in both:
//!
//! 1. repetition penalty on the tokens of the last `repeat_last_n` positions (each distinct
//!    token once: positive logits are divided by the penalty, negative ones multiplied);
//! 2. top-k: keep the k highest logits;
//! 3. top-p (nucleus): keep the smallest prefix, by descending probability at temperature 1,
//!    whose probability mass reaches p;
//! 4. min-p: drop tokens whose probability is below `min_p` × that of the best token;
//! 5. temperature: divide the logits by it;
//! 6. draw from the softmax of what is left.
//!
//! `temperature <= 0` means greedy decoding: the argmax of the (penalised) logits, the lowest
//! id on ties. Draws come from an own xoshiro256** generator seeded from `seed`, so a seed
//! gives the same tokens on every platform and run.
//!
//! Buffers are kept between calls: sampling from a 50257-token vocabulary allocates nothing
//! after the first call, and top-k uses a partial selection instead of a full sort.

/// A sampler setting out of range; the message names the field and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            return Err(ConfigError(format!($($t)*)));
        }
    };
}

/// Sampling settings. `Default` gives llama.cpp's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `<= 0` is greedy argmax. llama.cpp default 0.8.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all. Default 40.
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1]; 1 disables it. Default 0.95.
    pub top_p: f32,
    /// Minimum probability relative to the best token, in [0, 1]; 0 disables it. Default 0.05.
    pub min_p: f32,
    /// Repetition penalty (> 0); 1 disables it, > 1 discourages repeats. Default 1.0.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the repetition penalty looks at. Default 64.
    pub repeat_last_n: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5EED,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding (argmax), with everything else at its default.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range, naming the field and the value in the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = self.temperature;
        ensure!(
            t.is_finite() && t >= 0.0,
            "temperature must be a finite number >= 0 (0 = greedy), got {t}"
        );
        let p = self.top_p;
        ensure!(
            p > 0.0 && p <= 1.0,
            "top_p must be in (0, 1] (1 = off), got {p}"
        );
        let m = self.min_p;
        ensure!(
            (0.0..=1.0).contains(&m),
            "min_p must be in [0, 1] (0 = off), got {m}"
        );
        let r = self.repeat_penalty;
        ensure!(
            r.is_finite() && r > 0.0,
            "repeat_penalty must be a finite number > 0 (1 = off), got {r}"
        );
        Ok(())
    }

    /// Whether `sample` is a plain argmax.
    pub fn is_greedy(&self) -> bool {
        // A NaN temperature goes to greedy too, instead of producing NaN weights.
        self.temperature.is_nan() || self.temperature <= 0.0
    }
}

/// One token still in the running.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Descending logit, then ascending id: a total order, so every step is deterministic.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Draws token ids from logits; see the module docs for the steps.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Xoshiro256StarStar,
    /// Candidate buffer, reused between calls.
    cands: Vec<Candidate>,
    /// Distinct recent tokens, reused between calls.
    recent: Vec<u32>,
    /// Softmax weights of the candidates, reused between calls.
    weights: Vec<f64>,
}

impl Sampler {
    /// A sampler with settings `cfg`. Call [`SamplerConfig::validate`] on user input first;
    /// out-of-range values do not panic here but are clamped to their nearest meaning
    /// (e.g. a NaN temperature is greedy, top_p > 1 is off).
    pub fn new(cfg: SamplerConfig) -> Sampler {
        Sampler {
            cfg,
            rng: Xoshiro256StarStar::from_seed(cfg.seed),
            cands: Vec::new(),
            recent: Vec::new(),
            weights: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Restarts the random sequence as if the sampler had been created with `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.cfg.seed = seed;
        self.rng = Xoshiro256StarStar::from_seed(seed);
    }

    /// Picks the next token from `logits` (one per vocabulary entry); `history` is the context
    /// so far (prompt and generated tokens), used by the repetition penalty. NaN logits count
    /// as −∞. Returns 0 for an empty `logits`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        self.cands.clear();
        self.cands
            .extend(logits.iter().enumerate().map(|(i, &l)| Candidate {
                id: i as u32,
                logit: if l.is_nan() { f32::NEG_INFINITY } else { l },
            }));
        self.apply_repeat_penalty(history);

        if self.cfg.is_greedy() {
            return argmax(&self.cands);
        }
        self.top_k();
        self.top_p();
        self.min_p();
        self.draw()
    }

    /// Penalises each distinct token of the last `repeat_last_n` history entries once.
    fn apply_repeat_penalty(&mut self, history: &[u32]) {
        let penalty = self.cfg.repeat_penalty;
        if penalty == 1.0 || self.cfg.repeat_last_n == 0 || penalty.is_nan() || penalty <= 0.0 {
            return;
        }
        let start = history.len().saturating_sub(self.cfg.repeat_last_n);
        self.recent.clear();
        self.recent.extend_from_slice(&history[start..]);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &id in &self.recent {
            // `cands` is still indexed by token id here. Ids past the vocabulary are ignored.
            if let Some(c) = self.cands.get_mut(id as usize) {
                c.logit = if c.logit <= 0.0 {
                    c.logit * penalty
                } else {
                    c.logit / penalty
                };
            }
        }
    }

    /// Keeps the `top_k` best candidates, sorted by descending logit. With top-k off, sorts all
    /// candidates only if top-p needs them in order.
    fn top_k(&mut self) {
        let n = self.cands.len();
        let k = self.cfg.top_k;
        if k > 0 && k < n {
            self.cands.select_nth_unstable_by(k - 1, by_logit_desc);
            self.cands.truncate(k);
            self.cands.sort_unstable_by(by_logit_desc);
        } else if self.cfg.top_p < 1.0 {
            self.cands.sort_unstable_by(by_logit_desc);
        }
    }

    /// Nucleus: the shortest prefix (candidates are sorted) whose softmax mass reaches top_p.
    fn top_p(&mut self) {
        let p = f64::from(self.cfg.top_p);
        if p.is_nan() || p >= 1.0 || self.cands.len() <= 1 {
            return;
        }
        let max = self.cands[0].logit;
        if !max.is_finite() {
            return; // ±∞ is settled in `draw`.
        }
        self.weights.clear();
        self.weights
            .extend(self.cands.iter().map(|c| f64::from(c.logit - max).exp()));
        let total: f64 = self.weights.iter().sum();
        let mut cum = 0.0;
        let mut keep = self.cands.len();
        for (i, w) in self.weights.iter().enumerate() {
            cum += w;
            if cum >= p * total {
                keep = i + 1;
                break;
            }
        }
        self.cands.truncate(keep.max(1));
    }

    /// Drops candidates below `min_p` × the best candidate's probability, i.e. whose logit is
    /// below max + ln(min_p).
    fn min_p(&mut self) {
        let m = self.cfg.min_p;
        if m.is_nan() || m <= 0.0 || self.cands.len() <= 1 {
            return;
        }
        let max = self
            .cands
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return;
        }
        let threshold = max + m.min(1.0).ln();
        self.cands.retain(|c| c.logit >= threshold);
    }

    /// Applies the temperature and draws one candidate from the softmax.
    fn draw(&mut self) -> u32 {
        let max = self
            .cands
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            // All −∞ (nothing is possible) or some +∞ (certain): the best, lowest id.
            return argmax(&self.cands);
        }
        let inv_t = 1.0 / f64::from(self.cfg.temperature);
        self.weights.clear();
        self.weights.extend(
            self.cands
                .iter()
                .map(|c| (f64::from(c.logit - max) * inv_t).exp()),
        );
        let total: f64 = self.weights.iter().sum();
        let target = self.rng.next_f64() * total;
        let mut cum = 0.0;
        for (c, w) in self.cands.iter().zip(&self.weights) {
            cum += w;
            if target < cum {
                return c.id;
            }
        }
        // Rounding left `target` at or past the last cumulative sum: the last token with weight.
        self.cands
            .iter()
            .zip(&self.weights)
            .rev()
            .find(|(_, &w)| w > 0.0)
            .map_or(self.cands[0].id, |(c, _)| c.id)
    }
}

/// The highest logit's id, the lowest id among equal ones.
fn argmax(cands: &[Candidate]) -> u32 {
    cands
        .iter()
        .copied()
        .min_by(by_logit_desc)
        .map_or(0, |c| c.id)
}

/// xoshiro256** (Blackman & Vigna), seeded through SplitMix64 as its authors recommend. Small,
/// fast, and defined entirely by integer arithmetic, so identical on every platform.
#[derive(Clone, Debug)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Xoshiro256StarStar {
    fn from_seed(seed: u64) -> Self {
        let mut sm = seed;
        // SplitMix64 never yields four zeros in a row, so the state is never all-zero.
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs of the reference C implementation seeded with 0 (as used to seed
        // xoshiro in Vigna's test code and widely reproduced).
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn uniform_draws_are_in_range_and_spread() {
        let mut r = Xoshiro256StarStar::from_seed(7);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            buckets[(x * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_400..10_600).contains(&b), "{buckets:?}");
        }
    }
}
