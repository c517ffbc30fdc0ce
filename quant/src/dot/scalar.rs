//! Scalar reference dot products. Every SIMD variant is tested against these.
//!
//! Each K-quant kernel keeps the integer part of the sum exact (i32 per superblock, no
//! overflow possible: see the bounds next to each function) and only converts to f32 when
//! applying the block scales, in the same grouping the SIMD kernels use, so the variants can
//! differ only by float summation order.

use crate::q4_k::BlockQ4K;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use half::{bf16, f16};

pub use crate::kscale::{scales_mins_bytes, unpack_scales_mins};

/// Σ_j min_j · (sum of the 32 activations of sub-block j), from the Q8_K group sums.
#[inline(always)]
fn min_term(mins: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    let mut s = 0i32;
    for j in 0..8 {
        s += mins[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
    }
    s
}

/// Q4_K · Q8_K. Per superblock: d·Σ_j s_j·Σ q·a − dmin·Σ_j m_j·Σ a.
/// Bound: |Σ q·a| ≤ 32·15·127 per sub-block, × 63 × 8 sub-blocks ≈ 3.1e7 < 2³¹.
pub fn q4k_q8k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let (sc, mn) = unpack_scales_mins(&x.scales);
        let mut sumi = 0i32;
        for c in 0..4 {
            let q = &x.qs[32 * c..32 * c + 32];
            let lo = &y.qs[64 * c..64 * c + 32];
            let hi = &y.qs[64 * c + 32..64 * c + 64];
            let mut s_lo = 0i32;
            let mut s_hi = 0i32;
            for l in 0..32 {
                s_lo += (q[l] & 0x0f) as i32 * lo[l] as i32;
                s_hi += (q[l] >> 4) as i32 * hi[l] as i32;
            }
            sumi += sc[2 * c] as i32 * s_lo + sc[2 * c + 1] as i32 * s_hi;
        }
        let d = y.d * x.d.to_f32();
        let dmin = y.d * x.dmin.to_f32();
        sum += d * sumi as f32 - dmin * min_term(&mn, &y.bsums) as f32;
    }
    sum
}

/// Q5_K · Q8_K: Q4_K with a fifth bit per value from `qh` (bit 2c for the low half of chunk c,
/// bit 2c+1 for the high half). Bound: 32·31·127·63·8 ≈ 6.4e7 < 2³¹.
pub fn q5k_q8k(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let (sc, mn) = unpack_scales_mins(&x.scales);
        let mut sumi = 0i32;
        for c in 0..4 {
            let q = &x.qs[32 * c..32 * c + 32];
            let lo = &y.qs[64 * c..64 * c + 32];
            let hi = &y.qs[64 * c + 32..64 * c + 64];
            let mut s_lo = 0i32;
            let mut s_hi = 0i32;
            for l in 0..32 {
                let h = x.qh[l] >> (2 * c);
                let q_lo = (q[l] & 0x0f) | ((h & 1) << 4);
                let q_hi = (q[l] >> 4) | (((h >> 1) & 1) << 4);
                s_lo += q_lo as i32 * lo[l] as i32;
                s_hi += q_hi as i32 * hi[l] as i32;
            }
            sumi += sc[2 * c] as i32 * s_lo + sc[2 * c + 1] as i32 * s_hi;
        }
        let d = y.d * x.d.to_f32();
        let dmin = y.d * x.dmin.to_f32();
        sum += d * sumi as f32 - dmin * min_term(&mn, &y.bsums) as f32;
    }
    sum
}

/// Q6_K · Q8_K. Values are (6-bit − 32), 16 groups of 16 with signed 8-bit scales.
/// Bound: 16·32·127 per group × 128 × 16 groups ≈ 1.3e8 < 2³¹.
pub fn q6k_q8k(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        // q[i] for the 256 values, rebuilt in element order.
        let mut q = [0i8; 256];
        for h in 0..2 {
            let ql = &x.ql[64 * h..64 * h + 64];
            let qh = &x.qh[32 * h..32 * h + 32];
            let out = &mut q[128 * h..128 * h + 128];
            for l in 0..32 {
                out[l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                out[l + 32] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                out[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                out[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        let mut sumi = 0i32;
        for ((qg, ag), &sc) in q.chunks_exact(16).zip(y.qs.chunks_exact(16)).zip(&x.scales) {
            let s: i32 = qg.iter().zip(ag).map(|(&q, &a)| q as i32 * a as i32).sum();
            sumi += sc as i32 * s;
        }
        sum += y.d * x.d.to_f32() * sumi as f32;
    }
    sum
}

/// Q8_0 · Q8_0: Σ_blocks d_w·d_a·Σ q_w·q_a (|Σ| ≤ 32·128·128, exact in i32 and in f32).
pub fn q8_0_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let mut s = 0i32;
        for l in 0..32 {
            s += x.qs[l] as i32 * y.qs[l] as i32;
        }
        sum += x.d.to_f32() * y.d.to_f32() * s as f32;
    }
    sum
}

pub use crate::f16::f16_bits_to_f32;

/// Σ w·a over 8 interleaved partial sums (so the compiler can vectorise), `w` converted by
/// `cvt`.
#[inline(always)]
fn lanes_dot<W: Copy>(w: &[W], a: &[f32], cvt: impl Fn(W) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (wc, ac) = (w.chunks_exact(8), a.chunks_exact(8));
    let (wr, ar) = (wc.remainder(), ac.remainder());
    for (x, y) in wc.zip(ac) {
        for l in 0..8 {
            acc[l] += cvt(x[l]) * y[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in wr.iter().zip(ar) {
        sum += cvt(*x) * y;
    }
    sum
}

/// F16 weights · f32 activations, accumulated in f32.
pub fn f16_f32(w: &[f16], a: &[f32]) -> f32 {
    lanes_dot(w, a, |x| f16_bits_to_f32(x.to_bits()))
}

/// BF16 weights · f32 activations, accumulated in f32.
pub fn bf16_f32(w: &[bf16], a: &[f32]) -> f32 {
    lanes_dot(w, a, |x| f32::from_bits((x.to_bits() as u32) << 16))
}

/// F32 · F32.
pub fn f32_f32(w: &[f32], a: &[f32]) -> f32 {
    lanes_dot(w, a, |x| x)
}
