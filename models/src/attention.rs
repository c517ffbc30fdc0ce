//! The attention kernel: one query against one head's cached keys and values.
//!
//! K and V of a head are (n, hd) row-major blocks, contiguous in the cache (see
//! [`crate::kv_cache`]), so a decode step streams each head's prefix straight from memory.
//! - scores: s[j] = q·K[j]·scale, computed four keys at a time so the four dot products'
//!   multiply-add chains overlap instead of waiting on each other;
//! - output: o = Σⱼ p[j]·V[j], an axpy of each V row into o (which stays in L1).
//!
//! The loops are plain Rust, compiled twice: for the baseline target (SSE2 on x86-64, NEON on
//! aarch64) and, on x86-64, inside a `#[target_feature(enable = "avx2,fma")]` function, which
//! lets LLVM use 8-wide FMA. The variant is picked once at run time. Both are deterministic,
//! and prefill and decode run the same kernel on the same data, so a query's attention output
//! does not depend on how the tokens were batched.

#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

use crate::ops;

/// One head's cached keys and values as f32, (positions, hd) row-major: row j of `k` is
/// `k[j * hd..(j + 1) * hd]`.
#[derive(Clone, Copy, Debug)]
pub struct HeadKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// Causal attention of one query: out = softmax(q·Kᵀ·scale)·V over positions 0..n.
/// q, out: (hd); scores: scratch of ≥ n. The rows of `kv` must hold at least n positions.
pub fn attend(
    q: &[f32],
    kv: &HeadKv<'_>,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above), which is
        // all `attend_avx2` requires; it is otherwise the safe generic code.
        return unsafe { attend_avx2(q, kv, n, scale, scores, out) };
    }
    attend_impl::<false>(q, kv, n, scale, scores, out)
}

/// The portable variant, whatever the CPU (tests compare the two).
pub fn attend_portable(
    q: &[f32],
    kv: &HeadKv<'_>,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_impl::<false>(q, kv, n, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        // GGPT_ISA=scalar (the switch the matmul kernels honour) forces the portable path.
        let forced = std::env::var("GGPT_ISA").is_ok_and(|v| v.eq_ignore_ascii_case("scalar"));
        !forced && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    q: &[f32],
    kv: &HeadKv<'_>,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_impl::<true>(q, kv, n, scale, scores, out)
}

/// a·b + c, fused when the variant is compiled with FMA (an unfused `mul_add` would be a
/// libm call on the baseline target).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn attend_impl<const FMA: bool>(
    q: &[f32],
    kv: &HeadKv<'_>,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let s = &mut scores[..n];
    let (k, v) = (&kv.k[..n * hd], &kv.v[..n * hd]);
    // Scores, four keys per step.
    let mut sc = s.chunks_exact_mut(4);
    let mut kc = k.chunks_exact(4 * hd);
    for (s4, k4) in (&mut sc).zip(&mut kc) {
        let d4 = dot4::<FMA>(q, k4);
        for (sj, dj) in s4.iter_mut().zip(d4) {
            *sj = dj * scale;
        }
    }
    for (sj, kr) in sc
        .into_remainder()
        .iter_mut()
        .zip(kc.remainder().chunks_exact(hd))
    {
        *sj = dot_impl::<FMA>(q, kr) * scale;
    }
    softmax_impl::<FMA>(s);
    // Output: o = Σ p[j]·V[j].
    out.fill(0.0);
    for (&p, vr) in s.iter().zip(v.chunks_exact(hd)) {
        for (o, &x) in out.iter_mut().zip(vr) {
            *o = madd::<FMA>(p, x, *o);
        }
    }
}

/// q·K[j] for the four rows of `k4` (4·hd values), with independent accumulators.
#[inline(always)]
fn dot4<const FMA: bool>(q: &[f32], k4: &[f32]) -> [f32; 4] {
    let hd = q.len();
    let (k0, k1, k2, k3) = (
        &k4[..hd],
        &k4[hd..2 * hd],
        &k4[2 * hd..3 * hd],
        &k4[3 * hd..],
    );
    let mut acc = [[0.0f32; 8]; 4];
    let chunks = hd / 8 * 8;
    for c in (0..chunks).step_by(8) {
        for l in 0..8 {
            let x = q[c + l];
            acc[0][l] = madd::<FMA>(x, k0[c + l], acc[0][l]);
            acc[1][l] = madd::<FMA>(x, k1[c + l], acc[1][l]);
            acc[2][l] = madd::<FMA>(x, k2[c + l], acc[2][l]);
            acc[3][l] = madd::<FMA>(x, k3[c + l], acc[3][l]);
        }
    }
    let mut out = [0.0f32; 4];
    for (r, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
        let row = &k4[r * hd..(r + 1) * hd];
        let mut tail = 0.0f32;
        for i in chunks..hd {
            tail = madd::<FMA>(q[i], row[i], tail);
        }
        *o = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tail;
    }
    out
}

/// f16 → f32 for a whole slice (`dst.len() == src.len()`), exact, vectorised.
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: AVX2 and FMA are available (checked at run time just above).
        return unsafe { f16_to_f32_avx2(src, dst) };
    }
    f16_to_f32_impl(src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn f16_to_f32_avx2(src: &[half::f16], dst: &mut [f32]) {
    f16_to_f32_impl(src, dst)
}

/// Branchless half → float on the bit patterns (F. Giesen's method), so LLVM vectorises it
/// with plain integer and float ops: move exponent and mantissa into place, rebias the
/// exponent with one exact multiply by 2¹¹² (which also normalises subnormals), patch
/// infinities and NaNs, then restore the sign. Exact for every input.
#[inline(always)]
fn f16_to_f32_impl(src: &[half::f16], dst: &mut [f32]) {
    const REBIAS: f32 = f32::from_bits((254 - 15) << 23); // 2^112
    const INF_NAN: f32 = f32::from_bits((127 + 16) << 23); // 65536: f16 exponent was all ones
    for (d, h) in dst.iter_mut().zip(src) {
        let h = h.to_bits() as u32;
        let f = f32::from_bits((h & 0x7fff) << 13) * REBIAS;
        let bits = if f >= INF_NAN {
            f.to_bits() | (255 << 23)
        } else {
            f.to_bits()
        };
        *d = f32::from_bits(bits | ((h & 0x8000) << 16));
    }
}

/// Softmax with the exponential inlined, so it vectorises in each variant.
#[inline(always)]
fn softmax_impl<const FMA: bool>(x: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for &v in x.iter() {
        m = m.max(v);
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = ops::exp(c[l] - m);
            acc[l] += c[l];
        }
    }
    let mut total = 0.0f32;
    for v in chunks.into_remainder() {
        *v = ops::exp(*v - m);
        total += *v;
    }
    let total =
        (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + total;
    let inv = 1.0 / total;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn dot_impl<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ar.iter().zip(br) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Naive attention in f64 from K and V in (pos, hd) layout.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, scale: f32) -> Vec<f64> {
        let hd = q.len();
        let s: Vec<f64> = (0..n)
            .map(|j| {
                (0..hd)
                    .map(|d| q[d] as f64 * k[j * hd + d] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        (0..hd)
            .map(|d| {
                (0..n)
                    .map(|j| (s[j] - m).exp() / z * v[j * hd + d] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut got = vec![0.0f32; all.len()];
        f16_to_f32(&all, &mut got);
        let mut portable = vec![0.0f32; all.len()];
        f16_to_f32_impl(&all, &mut portable);
        for (i, h) in all.iter().enumerate() {
            let want = h.to_f32();
            for g in [got[i], portable[i]] {
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{:#06x}: {g} vs {want}",
                    h.to_bits()
                );
            }
        }
    }

    #[test]
    fn both_variants_match_naive_attention() {
        for (hd, n) in [
            (64, 1),
            (64, 37),
            (32, 300),
            (16, 17),
            (6, 9),
            (64, 4),
            (12, 7),
        ] {
            let q: Vec<f32> = values(hd, 1).iter().map(|x| x * 4.0).collect();
            // Rows beyond n hold garbage the kernel must not read into the result.
            let k = values((n + 3) * hd, 2);
            let v = values((n + 3) * hd, 3);
            let kv = HeadKv { k: &k, v: &v };
            let scale = 1.0 / (hd as f32).sqrt();
            let want = reference(&q, &k, &v, n, scale);
            let mut scores = vec![0.0; n + 5];
            let (mut a, mut b) = (vec![9.0; hd], vec![9.0; hd]);
            attend(&q, &kv, n, scale, &mut scores, &mut a);
            attend_portable(&q, &kv, n, scale, &mut scores, &mut b);
            for d in 0..hd {
                assert!(
                    (a[d] as f64 - want[d]).abs() < 1e-5,
                    "hd {hd} n {n}: {} vs {}",
                    a[d],
                    want[d]
                );
                assert!(
                    (b[d] as f64 - want[d]).abs() < 1e-5,
                    "hd {hd} n {n}: {} vs {}",
                    b[d],
                    want[d]
                );
            }
        }
    }
}
