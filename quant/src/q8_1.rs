//! Q8_1: the activation format Q5_1's dot product consumes (never stored in model files).
//! Q8_0 plus `s = d·Σq`, so that a weight format with a minimum (`y = d·q + m`) can apply
//! `m·Σa` per block without touching the values.

use crate::f16::{f16_to_f32, f32_to_f16};
use crate::search::nearest_int;
use crate::{BlockFormat, GgmlType};
use half::f16;

/// Values per Q8_1 block.
pub const QK8_1: usize = 32;

/// ggml `block_q8_1`: `d`, `s` (= d · Σ qs), then 32 signed bytes; value i = `d · qs[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

impl BlockQ8_1 {
    /// An all-zero block.
    pub const ZERO: BlockQ8_1 = BlockQ8_1 {
        d: f16::ZERO,
        s: f16::ZERO,
        qs: [0; 32],
    };
}

// SAFETY: repr(C), 2 + 2 + 32 bytes with no padding; every bit pattern is a valid f16/i8.
unsafe impl BlockFormat for BlockQ8_1 {
    const TYPE: GgmlType = GgmlType::Q8_1;
    const BLOCK: usize = QK8_1;
    /// `quantize_row_q8_1_ref`: d = amax/127, q = roundf(x·(1/d)) (ties away from zero),
    /// s = Σq·d.
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK8_1,
            "Q8_1::from_float: length mismatch"
        );
        for (b, x) in out.iter_mut().zip(x.chunks_exact(QK8_1)) {
            // C's MAX(a, b) is `a > b ? a : b`: written out so a NaN propagates as in ggml.
            let amax = x
                .iter()
                .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f32_to_f16(d);
            let mut sum = 0i32;
            for (q, &v) in b.qs.iter_mut().zip(x) {
                *q = crate::q5_0::c_f32_to_i32((v * id).round()) as i8;
                sum += *q as i32;
            }
            b.s = f32_to_f16(sum as f32 * d);
        }
    }
    /// y = q·d (ggml has no Q8_1 dequantizer; this is the value the block stands for).
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK8_1,
            "Q8_1::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK8_1)) {
            let d = f16_to_f32(b.d);
            for (o, &q) in y.iter_mut().zip(&b.qs) {
                *o = q as f32 * d;
            }
        }
    }
}

/// Quantize activations (`x.len() == out.len() * 32`) to Q8_1 the way ggml's CPU backend
/// does on x86 (`quantize_row_q8_1`, AVX2 path), which is what llama.cpp's Q5_1 matmul
/// consumes: `id = 127/amax` (not `1/d`), rounding half to even, and `s = d·Σq` from the
/// integers before they are narrowed to bytes. The same choice as
/// [`crate::act::quantize_q8_0`] for Q8_0; `tests/fixtures/quant/q5_1.act_quant.bin` pins it.
///
/// # Panics
/// If the lengths disagree (a caller bug, not an input property).
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * QK8_1, "quantize_q8_1: length mismatch");
    for (xb, y) in x.chunks_exact(QK8_1).zip(out.iter_mut()) {
        let (amax, finite) = crate::act::amax_and_finite(xb);
        if !finite {
            // A NaN scale and sum carry the bad value into every product (crate::act).
            y.d = f32_to_f16(f32::NAN);
            y.s = y.d;
            y.qs = [0; QK8_1];
            continue;
        }
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        y.d = f32_to_f16(d);
        let mut sum = 0i32;
        for (q, v) in y.qs.iter_mut().zip(xb) {
            // |v·id| ≤ 127·(1+ε) rounds into −127..=127.
            let i = nearest_int(v * id);
            sum += i;
            *q = i as i8;
        }
        y.s = f32_to_f16(d * sum as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_is_scaled_quant_sum() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        let mut a = [BlockQ8_1::ZERO];
        let mut r = [BlockQ8_1::ZERO];
        quantize_q8_1(&x, &mut a);
        BlockQ8_1::from_float(&x, &mut r);
        for b in [a[0], r[0]] {
            // s uses the f32 scale, not the fp16-rounded one stored in d.
            let d = 21.0f32 / 127.0;
            assert_eq!(b.d, f32_to_f16(d));
            let s: i32 = b.qs.iter().map(|&q| q as i32).sum();
            assert_eq!(b.s, f32_to_f16(d * s as f32));
            assert_eq!(b.qs[31], 127);
        }
        // 21 → 127, 0 → 0, −10 → −60.476… → −60 in both.
        assert_eq!((a[0].qs[10], a[0].qs[0]), (0, -60));
        assert_eq!(r[0].qs[0], -60);
    }

    #[test]
    fn reference_rounds_ties_away_cpu_path_to_even() {
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -0.5;
        let (mut r, mut c) = ([BlockQ8_1::ZERO], [BlockQ8_1::ZERO]);
        BlockQ8_1::from_float(&x, &mut r);
        quantize_q8_1(&x, &mut c);
        assert_eq!(&r[0].qs[..3], &[127, 3, -1]);
        assert_eq!(&c[0].qs[..3], &[127, 2, 0]);
        assert_eq!((f16_to_f32(r[0].s), f16_to_f32(c[0].s)), (129.0, 129.0));
    }
}
