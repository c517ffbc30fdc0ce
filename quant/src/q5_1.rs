//! Q5_1: 32 values as an fp16 scale, an fp16 minimum and 5-bit unsigned quants (6 bits per
//! weight).
//!
//! llama-quantize writes it where a Q5_K tensor's row length is not a multiple of 256 (GPT-2
//! XL's 1600). Its dot product consumes Q8_1 activations (ggml's `vec_dot_type`; see
//! [`crate::q8_1`]), whose per-block sum applies the minimum without touching the values.

use crate::dot::{DotFn, Isa};
use crate::f16::{f16_to_f32, f32_to_f16};
use crate::q5_0::{c_f32_to_i32, pack5, unpack5};
use crate::q8_1::BlockQ8_1;
use crate::{BlockFormat, GgmlType};
use half::f16;

/// Values per Q5_1 block.
pub const QK5_1: usize = 32;

/// ggml `block_q5_1`: `d`, `m`, then `qh` and `qs` laid out as in [`crate::q5_0::BlockQ5_0`].
/// Value j = `d · q_j + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

impl BlockQ5_1 {
    /// The 32 five-bit quants, 0..=31, in value order.
    #[inline(always)]
    pub fn quants(&self) -> [u8; 32] {
        unpack5(&self.qs, &self.qh)
    }
}

// SAFETY: repr(C), 2 + 2 + 4 + 16 bytes with no padding (alignment 2); every bit pattern is
// a valid f16/u8.
unsafe impl BlockFormat for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const BLOCK: usize = QK5_1;
    /// `quantize_row_q5_1_ref`: `d = (max − min)/31`, `m = min`,
    /// `q = (uint8)((x − min)·(1/d) + 0.5)` (no clamp: a 32 keeps only its low five bits).
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK5_1,
            "Q5_1::from_float: length mismatch"
        );
        for (b, x) in out.iter_mut().zip(x.chunks_exact(QK5_1)) {
            let (mut min, mut max) = (f32::MAX, -f32::MAX);
            for &v in x {
                if v < min {
                    min = v;
                }
                if v > max {
                    max = v;
                }
            }
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f32_to_f16(d);
            b.m = f32_to_f16(min);
            let mut q = [0u8; 32];
            for (q, &v) in q.iter_mut().zip(x) {
                *q = c_f32_to_i32((v - min) * id + 0.5) as u8;
            }
            pack5(&q, &mut b.qs, &mut b.qh);
        }
    }
    /// `dequantize_row_q5_1`: y = q·d + m. The product of a 5-bit integer and an fp16 value is
    /// exact in f32, so it does not matter whether a C compiler contracts this into an FMA.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK5_1,
            "Q5_1::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK5_1)) {
            let (d, m) = (f16_to_f32(b.d), f16_to_f32(b.m));
            for (o, q) in y.iter_mut().zip(b.quants()) {
                *o = q as f32 * d + m;
            }
        }
    }
}

/// Q5_1 · Q8_1, scalar reference: per block the exact integer `Σ q·a` (|Σ| ≤ 32·31·128)
/// scaled by `d_w·d_a`, plus `m_w·s_a` (the Q8_1 block's `d_a·Σa`). The SIMD kernels compute
/// the same integers and differ only in float summation order.
pub fn vec_dot_q8_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    let (mut sum, mut mins) = (0.0f32, 0.0f32);
    for (x, y) in w.iter().zip(a) {
        let q = x.quants();
        let s: i32 = q
            .iter()
            .zip(&y.qs)
            .map(|(&q, &a)| q as i32 * a as i32)
            .sum();
        sum += f16_to_f32(x.d) * f16_to_f32(y.d) * s as f32;
        mins += f16_to_f32(x.m) * f16_to_f32(y.s);
    }
    sum + mins
}

/// The Q5_1 · Q8_1 kernel for `isa`: the SIMD one where this CPU runs it, else the scalar
/// reference (see [`crate::q5_0::dot_kernel`] for the choice per level).
pub fn dot_kernel(isa: Isa) -> DotFn<BlockQ5_1, BlockQ8_1> {
    crate::q5_kernels::q5_1_q8_1(isa).unwrap_or(vec_dot_q8_1)
}

impl crate::format::WeightFormat for BlockQ5_1 {
    type Act = BlockQ8_1;
    type Packed = ();
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_1]) {
        crate::q8_1::quantize_q8_1(x, out)
    }
    /// Rows are dotted one by one at every level (no tile kernels).
    fn kernels(level: crate::cpu::Level) -> crate::format::Kernels<Self> {
        crate::format::Kernels {
            dot: dot_kernel(level.isa()),
            tile: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero() -> BlockQ5_1 {
        BlockQ5_1 {
            d: f16::ZERO,
            m: f16::ZERO,
            qh: [0; 4],
            qs: [0; 16],
        }
    }

    #[test]
    fn min_and_range_map_to_0_and_31() {
        let mut x = [1.0f32; 32];
        x[0] = -2.0;
        x[31] = 1.875; // max: d = 3.875/31 = 0.125
        let mut b = [zero()];
        BlockQ5_1::from_float(&x, &mut b);
        assert_eq!((f16_to_f32(b[0].d), f16_to_f32(b[0].m)), (0.125, -2.0));
        let q = b[0].quants();
        assert_eq!((q[0], q[1], q[31]), (0, 24, 31));
        let mut y = [0.0f32; 32];
        BlockQ5_1::to_float(&b, &mut y);
        assert_eq!((y[0], y[1], y[31]), (-2.0, 1.0, 1.875));
    }

    #[test]
    fn constant_block_has_zero_scale() {
        let mut b = [zero()];
        BlockQ5_1::from_float(&[0.7; 32], &mut b);
        assert_eq!(b[0].d.to_bits(), 0);
        assert_eq!(b[0].m, f16::from_f32(0.7));
        assert_eq!(b[0].quants(), [0; 32]);
    }

    #[test]
    fn scalar_dot_equals_dequantized_dot() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 5.0) * 0.1)
            .collect();
        let a: Vec<f32> = (0..64)
            .map(|i| ((i * 11 % 19) as f32 - 9.0) * 0.3)
            .collect();
        let mut w = [zero(); 2];
        BlockQ5_1::from_float(&x, &mut w);
        let mut q = [BlockQ8_1::ZERO; 2];
        crate::q8_1::quantize_q8_1(&a, &mut q);
        let (mut wf, mut af) = ([0.0f32; 64], [0.0f32; 64]);
        BlockQ5_1::to_float(&w, &mut wf);
        BlockQ8_1::to_float(&q, &mut af);
        let want: f32 = wf.iter().zip(&af).map(|(a, b)| a * b).sum();
        let got = vec_dot_q8_1(&w, &q);
        // s is d·Σa rounded to f16, so the min term carries a relative error of 2⁻¹¹.
        assert!(
            (got - want).abs() <= 2e-3 * want.abs().max(1.0),
            "{got} {want}"
        );
    }
}
