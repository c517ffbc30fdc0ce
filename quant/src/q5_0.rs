//! Q5_0: 32 values as one fp16 scale and 5-bit signed quants (5.5 bits per weight).
//!
//! llama-quantize writes it where a Q4_K tensor's row length is not a multiple of 256
//! (GPT-2 XL's 1600). Its dot product consumes Q8_0 activations (ggml's `vec_dot_type`),
//! quantized as [`crate::act::quantize_q8_0`] does.

use crate::dot::{DotFn, Isa};
use crate::f16::{f16_to_f32, f32_to_f16};
use crate::q8_0::BlockQ8_0;
use crate::{BlockFormat, GgmlType};
use half::f16;

/// Values per Q5_0 block.
pub const QK5_0: usize = 32;

/// ggml `block_q5_0`: `d`, then the fifth bit of each value (`qh`, bit j = value j, little
/// endian), then the low four bits (`qs[j]` holds value j in its low nibble and value j+16 in
/// its high nibble). Value j = `d · (q_j − 16)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

impl BlockQ5_0 {
    /// The 32 five-bit quants, 0..=31, in value order.
    #[inline(always)]
    pub fn quants(&self) -> [u8; 32] {
        unpack5(&self.qs, &self.qh)
    }
}

/// The 32 five-bit quants of a Q5_0/Q5_1 block, in value order.
#[inline(always)]
pub(crate) fn unpack5(qs: &[u8; 16], qh: &[u8; 4]) -> [u8; 32] {
    let qh = u32::from_le_bytes(*qh);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4) as u8;
        q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
    }
    q
}

/// C's float-to-integer conversion as gcc compiles it on x86-64 (`cvttss2si`): truncation
/// toward zero, and the "integer indefinite" `i32::MIN` for NaN and out-of-range values
/// (Rust's `as` would saturate instead). The narrowing to 8 bits that follows in C keeps the
/// low byte, so callers apply `as i8`/`as u8`.
#[inline(always)]
pub(crate) fn c_f32_to_i32(v: f32) -> i32 {
    if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    }
}

/// Pack 32 five-bit quants (value order) into `qs` and `qh` as ggml lays them out.
#[inline(always)]
pub(crate) fn pack5(q: &[u8; 32], qs: &mut [u8; 16], qh: &mut [u8; 4]) {
    let mut h = 0u32;
    for j in 0..16 {
        let (a, b) = (q[j], q[j + 16]);
        qs[j] = (a & 0x0f) | ((b & 0x0f) << 4);
        h |= (((a & 0x10) >> 4) as u32) << j;
        h |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    *qh = h.to_le_bytes();
}

// SAFETY: repr(C), 2 + 4 + 16 bytes with no padding (alignment 2); every bit pattern is a
// valid f16/u8.
unsafe impl BlockFormat for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const BLOCK: usize = QK5_0;
    /// `quantize_row_q5_0_ref`: the signed value of largest magnitude (the first on ties)
    /// gives `d = max / −16`; `q = min(31, (int8)(x·(1/d) + 16.5))`.
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK5_0,
            "Q5_0::from_float: length mismatch"
        );
        for (b, x) in out.iter_mut().zip(x.chunks_exact(QK5_0)) {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in x {
                // Written as in C so that a NaN never wins.
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f32_to_f16(d);
            let mut q = [0u8; 32];
            for (q, &v) in q.iter_mut().zip(x) {
                // MIN(31, (int8_t)…) stored to uint8_t: a negative result keeps its low byte.
                *q = (c_f32_to_i32(v * id + 16.5) as i8).min(31) as u8;
            }
            pack5(&q, &mut b.qs, &mut b.qh);
        }
    }
    /// `dequantize_row_q5_0`: y = (q − 16)·d.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK5_0,
            "Q5_0::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK5_0)) {
            let d = f16_to_f32(b.d);
            for (o, q) in y.iter_mut().zip(b.quants()) {
                *o = (q as i32 - 16) as f32 * d;
            }
        }
    }
}

/// Q5_0 · Q8_0, scalar reference: per block an exact integer sum `Σ (q − 16)·a`
/// (|Σ| ≤ 32·16·128), then `d_w·d_a` applied in f32. The SIMD kernels compute the same
/// integers and differ only in float summation order.
pub fn vec_dot_q8_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let q = x.quants();
        let s: i32 = q
            .iter()
            .zip(&y.qs)
            .map(|(&q, &a)| (q as i32 - 16) * a as i32)
            .sum();
        sum += f16_to_f32(x.d) * f16_to_f32(y.d) * s as f32;
    }
    sum
}

/// The Q5_0 · Q8_0 kernel for `isa`: the SIMD one where this CPU runs it, else the scalar
/// reference. x86 levels share the AVX2 kernel (as ggml does for this type); both aarch64
/// levels use one NEON kernel.
pub fn dot_kernel(isa: Isa) -> DotFn<BlockQ5_0, BlockQ8_0> {
    crate::q5_kernels::q5_0_q8_0(isa).unwrap_or(vec_dot_q8_0)
}

impl crate::format::WeightFormat for BlockQ5_0 {
    type Act = BlockQ8_0;
    type Packed = ();
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_0]) {
        crate::act::quantize_q8_0(x, out)
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

    fn zero() -> BlockQ5_0 {
        BlockQ5_0 {
            d: f16::ZERO,
            qh: [0; 4],
            qs: [0; 16],
        }
    }

    #[test]
    fn extreme_values_map_to_the_ends_of_the_range() {
        // max = −8 (largest magnitude) gives d = 0.5: −8 → q 0, 7.5 → q 31 (clamped from 31.5),
        // 0 → q 16.
        let mut x = [0.0f32; 32];
        x[0] = -8.0;
        x[1] = 7.5;
        x[20] = 3.0;
        let mut b = [zero()];
        BlockQ5_0::from_float(&x, &mut b);
        assert_eq!(f16_to_f32(b[0].d), 0.5);
        let q = b[0].quants();
        assert_eq!((q[0], q[1], q[2], q[20]), (0, 31, 16, 22));
        let mut y = [0.0f32; 32];
        BlockQ5_0::to_float(&b, &mut y);
        assert_eq!((y[0], y[1], y[2], y[20]), (-8.0, 7.5, 0.0, 3.0));
    }

    #[test]
    fn fifth_bits_land_in_qh_by_value_index() {
        let mut q = [0u8; 32];
        q[3] = 0x13;
        q[16] = 0x1f;
        q[31] = 0x10;
        let mut b = zero();
        pack5(&q, &mut b.qs, &mut b.qh);
        assert_eq!(u32::from_le_bytes(b.qh), (1 << 3) | (1 << 16) | (1 << 31));
        assert_eq!(b.qs[3], 0x03);
        assert_eq!(b.qs[0], 0xf0);
        assert_eq!(b.quants(), q);
    }

    #[test]
    fn zero_and_nan_blocks() {
        let mut b = [zero()];
        BlockQ5_0::from_float(&[0.0; 32], &mut b);
        // d = 0 / −16 is −0, stored as such (as ggml does).
        assert_eq!(b[0].d.to_bits(), 0x8000);
        assert_eq!(b[0].quants(), [16; 32]);
        // A NaN never becomes the max; it quantizes through cvttss2si's i32::MIN → low byte 0.
        let mut x = [1.0f32; 32];
        x[5] = f32::NAN;
        BlockQ5_0::from_float(&x, &mut b);
        assert_eq!(f16_to_f32(b[0].d), -1.0 / 16.0);
        assert_eq!(b[0].quants()[5], 0);
        assert_eq!(b[0].quants()[0], 0);
    }

    #[test]
    fn scalar_dot_equals_dequantized_dot() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let a: Vec<f32> = (0..64)
            .map(|i| ((i * 11 % 19) as f32 - 9.0) * 0.3)
            .collect();
        let mut w = [zero(); 2];
        BlockQ5_0::from_float(&x, &mut w);
        let mut q = [BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32],
        }; 2];
        crate::act::quantize_q8_0(&a, &mut q);
        let (mut wf, mut af) = ([0.0f32; 64], [0.0f32; 64]);
        BlockQ5_0::to_float(&w, &mut wf);
        BlockQ8_0::to_float(&q, &mut af);
        let want: f32 = wf.iter().zip(&af).map(|(a, b)| a * b).sum();
        let got = vec_dot_q8_0(&w, &q);
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{got} {want}"
        );
    }
}
