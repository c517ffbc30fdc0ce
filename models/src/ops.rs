//! The non-matmul operations of a GPT-2 forward pass: LayerNorm, GELU (tanh form), softmax
//! and residual add. (The attention kernel is in [`crate::attention`].)
//!
//! Everything here is plain safe Rust written so that LLVM vectorises it: fixed-width
//! accumulator arrays over `chunks_exact` (explicit lanes, so no float reassociation is
//! needed), and no bounds checks inside the inner loops. `exp` is a polynomial rather than
//! libm's `expf` for the same reason: a libm call cannot be vectorised, and GELU plus the
//! attention softmax evaluate it millions of times per prompt.
//!
//! Shapes use llm.c's letters: T tokens, C channels (n_embd), hd head_dim.

/// Accumulator lanes for reductions. Eight f32 lanes fill two SSE registers or one AVX one,
/// and give the CPU independent add chains to overlap.
const LANES: usize = 8;

/// Σ a[i]·b[i] over equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    sum_lanes(&acc) + tail
}

/// Σ x[i].
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    sum_lanes(&acc) + rem.iter().sum::<f32>()
}

#[inline(always)]
fn sum_lanes(acc: &[f32; LANES]) -> f32 {
    // Pairwise, so the reduction order is fixed and independent of the target's vector width.
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// x[i] *= a.
#[inline]
pub fn scale(x: &mut [f32], a: f32) {
    for v in x {
        *v *= a;
    }
}

/// Residual connection: x[i] += y[i].
#[inline]
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// LayerNorm of one row of C values: out = (x − mean) / √(var + eps) · w + b, with the
/// biased variance, as PyTorch and ggml compute it. Two passes (mean, then the squared
/// deviations) rather than Σx² − mean², which cancels badly on GPT-2's large residuals.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let c = x.len();
    debug_assert!(w.len() == c && b.len() == c && out.len() == c);
    let mean = sum(x) / c as f32;
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            let d = ch[l] - mean;
            acc[l] += d * d;
        }
    }
    let tail: f32 = rem.iter().map(|v| (v - mean) * (v - mean)).sum();
    let var = (sum_lanes(&acc) + tail) / c as f32;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((o, xi), wi), bi) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (xi - mean) * rstd * wi + bi;
    }
}

/// LayerNorm applied to each of the T rows of a T×C matrix.
pub fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let c = w.len();
    for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        layer_norm(xr, w, b, eps, or);
    }
}

/// e^x in f32, vectorisable (no libm call, no branches).
///
/// Range reduction e^x = 2ⁿ·e^r with n = round(x·log₂e) and |r| ≤ ln2/2, ln2 split in a
/// high part exact in few bits and a low correction (Cody–Waite), then a degree-6 minimax
/// polynomial for e^r (Cephes `expf` coefficients). Relative error ≈ 2 ulp. Inputs are
/// clamped to [−87.3, 88.0] so that 2ⁿ stays a normal float: below that e^x < 1.2e−38,
/// which every caller treats as zero anyway.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    use exp_consts::*;
    let x = x.clamp(X_MIN, X_MAX);
    let t = x * LOG2E + SHIFTER;
    let n = t.to_bits() as i32 - SHIFTER.to_bits() as i32;
    let nf = t - SHIFTER;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let p = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let er = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((n + 127) as u32) << 23);
    er * two_n
}

/// The constants of [`exp`], shared with the attention kernel's 8-lane copy, which must stay
/// bit-identical to it.
pub(crate) mod exp_consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Adding 1.5·2²³ rounds to an integer (ties to even) and leaves n in the low mantissa bits.
    pub const SHIFTER: f32 = 12_582_912.0;
    /// The input clamp that keeps 2ⁿ a normal float.
    pub const X_MIN: f32 = -87.3;
    pub const X_MAX: f32 = 88.0;
    /// e^r ≈ 1 + r + r²·(P[5] + P[4]·r + … + P[0]·r⁵).
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
}

/// √(2/π), the GELU tanh-approximation constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of GELU's tanh approximation.
const GELU_COEF_A: f32 = 0.044_715;

/// GELU, tanh approximation (HF `gelu_new`), in place:
/// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
///
/// Evaluated through the identity 0.5·(1 + tanh(u)) = 1 / (1 + e^(−2u)), which is exact in
/// real arithmetic and avoids both libm's tanh and the cancellation of 1 + tanh(u) for very
/// negative u. (ggml uses an fp16 lookup table here; we compute in f32 to stay close to
/// PyTorch.)
pub fn gelu_inplace(x: &mut [f32]) {
    for v in x {
        *v = gelu(*v);
    }
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// Softmax in place, in f32: subtract the max first so no exponent overflows.
pub fn softmax_inplace(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let mut max = f32::NEG_INFINITY;
    for &v in x.iter() {
        max = max.max(v);
    }
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let s = sum(x);
    scale(x, 1.0 / s);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for test inputs (xorshift), so tests need no `rand`.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn exp_matches_f64_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.3e-38);
        assert!(exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn gelu_matches_tanh_formula_in_f64() {
        let xs = values(10_000, 1, 12.0);
        let mut got = xs.clone();
        gelu_inplace(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let xd = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
            let want = 0.5 * xd * (1.0 + u.tanh());
            assert!(
                (g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "gelu({x}) = {g}, want {want}"
            );
        }
        // Far tails: identity for large x, zero for very negative x (and never NaN).
        let mut t = [50.0f32, -50.0, -1e30, 1e30];
        gelu_inplace(&mut t);
        assert_eq!(t[0], 50.0);
        assert!(
            t[1].abs() < 1e-30 && t[2].abs() < 1e-6 && t[3] == 1e30,
            "{t:?}"
        );
    }

    #[test]
    fn softmax_sums_to_one_and_matches_f64() {
        let xs = values(1000, 2, 30.0);
        let mut p = xs.clone();
        softmax_inplace(&mut p);
        let max = xs
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
        let z: f64 = xs.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (&x, &pi) in xs.iter().zip(&p) {
            let want = (x as f64 - max).exp() / z;
            assert!(
                (pi as f64 - want).abs() < 1e-6 * want.max(1e-3),
                "{pi} vs {want}"
            );
        }
        assert!((p.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn layer_norm_matches_f64() {
        let c = 1027; // not a multiple of the lane count
        let x: Vec<f32> = values(c, 3, 5.0).iter().map(|v| v + 40.0).collect();
        let w = values(c, 4, 1.0);
        let b = values(c, 5, 0.5);
        let mut out = vec![0.0; c];
        layer_norm(&x, &w, &b, 1e-5, &mut out);
        let mean: f64 = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var: f64 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        for i in 0..c {
            let want = (x[i] as f64 - mean) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() < 2e-5,
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }

    #[test]
    fn dot_and_sum_handle_remainders() {
        for n in [0, 1, 7, 8, 9, 64, 100] {
            let a = values(n, 6, 1.0);
            let b = values(n, 7, 1.0);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n={n}");
            let want_s: f64 = a.iter().map(|&x| x as f64).sum();
            assert!((sum(&a) as f64 - want_s).abs() < 1e-5, "n={n}");
        }
    }
}
