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

/// The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K block (ggml `get_scale_min_k4`).
///
/// Sub-blocks 0..4 keep their scale and min in the low 6 bits of bytes j and j+4; sub-blocks
/// 4..8 keep their low 4 bits in the nibbles of byte j+4 and their top 2 bits in the spare
/// top bits of bytes j-4 (scale) and j (min).
#[inline(always)]
pub fn unpack_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
    }
    for j in 4..8 {
        sc[j] = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    (sc, mn)
}

/// Q4_K/Q5_K 6-bit scales and mins as 16 bytes: scales of sub-blocks 0..8, then their mins.
/// (Four bytes at a time: the layout of reference-facts B1, applied to u32 words.)
#[inline(always)]
pub fn scales_mins_bytes(s: &[u8; 12]) -> [u8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (w(0), w(4), w(8));
    let sc_lo = a & 0x3f3f_3f3f;
    let sc_hi = (c & 0x0f0f_0f0f) | ((a >> 2) & 0x3030_3030);
    let mn_lo = b & 0x3f3f_3f3f;
    let mn_hi = ((c >> 4) & 0x0f0f_0f0f) | ((b >> 2) & 0x3030_3030);
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&sc_lo.to_le_bytes());
    out[4..8].copy_from_slice(&sc_hi.to_le_bytes());
    out[8..12].copy_from_slice(&mn_lo.to_le_bytes());
    out[12..16].copy_from_slice(&mn_hi.to_le_bytes());
    out
}

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
        // q[i] for the 256 values, rebuilt in element order (see reference-facts B1).
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
