//! Q8_0: 32 values as one fp16 scale and 32 signed bytes (8.5 bits per weight).

use crate::f16::{f16_to_f32, f32_to_f16};
use crate::{BlockFormat, GgmlType};
use half::f16;

/// Values per Q8_0 block.
pub const QK8_0: usize = 32;

/// ggml `block_q8_0`: `d` then `qs`; value i = `d · qs[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

// SAFETY: repr(C), 2 + 32 bytes with no padding; every bit pattern is a valid f16/i8.
unsafe impl BlockFormat for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const BLOCK: usize = 32;
    /// `quantize_row_q8_0_ref`: d = amax/127, q = roundf(x·(1/d)) (ties away from zero).
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK8_0,
            "Q8_0::from_float: length mismatch"
        );
        for (b, x) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
            // C's MAX(a, b) is `a > b ? a : b`: written out so a NaN propagates as in ggml.
            let amax = x
                .iter()
                .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
            let d = amax / 127.0;
            // ggml multiplies by the reciprocal rather than dividing by d; the two can
            // differ in the last bit and so flip a rounding.
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f32_to_f16(d);
            // With finite values and a finite 1/d (a block below ~4e-37 overflows it) every
            // product is within ±127·(1 + 2⁻²²), where `round_away_small` is `roundf`.
            if id.is_finite() && x.iter().all(|v| v.is_finite()) {
                for (q, &v) in b.qs.iter_mut().zip(x) {
                    *q = round_away_small(v * id) as i8;
                }
            } else {
                for (q, &v) in b.qs.iter_mut().zip(x) {
                    // C converts the rounded float to int8_t; going through i32 wraps like
                    // gcc does instead of saturating (only reachable with NaN/inf input).
                    *q = (v * id).round() as i32 as i8;
                }
            }
        }
    }
    /// `dequantize_row_q8_0`: y = q·d.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK8_0,
            "Q8_0::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
            let d = f16_to_f32(b.d);
            for (o, &q) in y.iter_mut().zip(&b.qs) {
                *o = q as f32 * d;
            }
        }
    }
}

/// C's `roundf` (ties away from zero) for finite `y` with |y| < 2³¹, as `i32`: truncate, then
/// step away from zero when the dropped fraction is at least one half. `y − trunc(y)` is exact,
/// so this is `roundf` bit for bit, and unlike `f32::round` (a libm call on baseline x86-64)
/// the loop around it vectorises. Q8_0's `x·(1/d)` stays within ±127·(1 + 2⁻²²).
#[inline(always)]
fn round_away_small(y: f32) -> i32 {
    let t = y as i32;
    let frac = y - t as f32;
    t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)
}

/// Quantize activations to Q8_0 the way ggml's CPU backend does on x86 (`quantize_row_q8_0`,
/// AVX2/AVX-512 path), which is what llama.cpp feeds its Q8_0 dot products:
/// `id = 127/amax` (not `1/d`), rounding to nearest **even**, and saturating conversion to i8.
/// It differs from the reference [`BlockQ8_0::from_float`] only on exact ties and in the last
/// bit of `id`; d is the same.
pub fn quantize_row_q8_0_nearest_even(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(
        x.len(),
        out.len() * QK8_0,
        "Q8_0 activation: length mismatch"
    );
    for (b, x) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        b.d = f32_to_f16(amax / 127.0);
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (q, &v) in b.qs.iter_mut().zip(x) {
            let r = (v * id).round_ties_even();
            // cvtps_epi32 gives i32::MIN for NaN and out-of-range values; the packs then
            // saturate to i8.
            let i = if r.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&r) {
                i32::MIN
            } else {
                r as i32
            };
            *q = i.clamp(-128, 127) as i8;
        }
    }
}

impl crate::format::WeightFormat for BlockQ8_0 {
    type Act = BlockQ8_0;
    type Packed = crate::dot::Q8_0Packed;
    fn quantize_act(x: &[f32], out: &mut [BlockQ8_0]) {
        crate::act::quantize_q8_0(x, out)
    }
    fn rows_kernel(level: crate::cpu::Level) -> Option<crate::format::RowsFn<Self, BlockQ8_0>> {
        match level.isa() {
            #[cfg(target_arch = "x86_64")]
            crate::cpu::Isa::Avx2 => Some(crate::dot::avx2::q8_0_rows),
            #[cfg(target_arch = "x86_64")]
            crate::cpu::Isa::Avx512 => Some(crate::dot::avx512::plain::q8_0_rows),
            #[cfg(target_arch = "x86_64")]
            crate::cpu::Isa::Avx512Vnni | crate::cpu::Isa::Amx => {
                Some(crate::dot::avx512::vnni::q8_0_rows)
            }
            _ => None,
        }
    }
    fn kernels(level: crate::cpu::Level) -> crate::format::Kernels<Self> {
        use crate::cpu::Isa;
        use crate::dot::*;
        use crate::format::Kernels;
        let (dot, tile): (crate::format::DotFn<Self, BlockQ8_0>, _) = match level.isa() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (
                avx2::q8_0_q8_0,
                Some(crate::format::Tile::Packed {
                    pack: avx2_tile::pack_q8_0,
                    gemm: avx2_tile::q8_0_gemm,
                }),
            ),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => (
                avx512::plain::q8_0_q8_0,
                Some(crate::format::Tile::Packed {
                    pack: avx512::plain::pack_q8_0,
                    gemm: avx512::plain::q8_0_gemm,
                }),
            ),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => (
                avx512::vnni::q8_0_q8_0,
                Some(crate::format::Tile::Packed {
                    pack: avx512::vnni::pack_q8_0,
                    gemm: avx512::vnni::q8_0_gemm,
                }),
            ),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => (neon::plain::q8_0_q8_0, None),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => (neon::dot::q8_0_q8_0, None),
            _ => (scalar::q8_0_q8_0, None),
        };
        Kernels { dot, tile }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero() -> BlockQ8_0 {
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32],
        }
    }

    /// `from_float` with `f32::round` on every value (the libm `roundf` path), for comparison.
    fn from_float_roundf(x: &[f32; 32]) -> BlockQ8_0 {
        let amax = x
            .iter()
            .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        BlockQ8_0 {
            d: f32_to_f16(d),
            qs: x.map(|v| (v * id).round() as i32 as i8),
        }
    }

    #[test]
    fn from_float_equals_roundf_everywhere() {
        // Ordinary blocks, exact ties, values so small that 1/d overflows to inf (the products
        // are then ±inf or NaN), and non-finite inputs.
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for scale in [1.0f32, 1e-3, 1e-30, 1e-37, 3e-39, 1e-40, 1e-45] {
            blocks.push(std::array::from_fn(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            }));
        }
        blocks.push(std::array::from_fn(|i| {
            if i == 0 {
                127.0
            } else {
                i as f32 - 15.5
            }
        }));
        blocks.push(std::array::from_fn(|i| {
            if i == 3 {
                f32::NAN
            } else {
                i as f32
            }
        }));
        blocks.push(std::array::from_fn(|i| {
            if i == 7 {
                f32::INFINITY
            } else {
                0.25
            }
        }));
        for x in &blocks {
            let mut got = [zero()];
            BlockQ8_0::from_float(x, &mut got);
            let want = from_float_roundf(x);
            assert_eq!(got[0].d.to_bits(), want.d.to_bits(), "{x:?}");
            assert_eq!(got[0].qs, want.qs, "{x:?}");
        }
    }

    #[test]
    fn round_away_small_is_roundf() {
        let mut vals = vec![
            0.0f32, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 127.0,
        ];
        vals.extend([
            0.49999997f32,
            -0.49999997,
            0.50000006,
            1.4999999,
            -1.4999999,
        ]);
        // Every f32 in ±128 at a stride, plus the neighbours of each half-integer.
        let mut bits = 0u32;
        while bits < 0x4300_0000 {
            let v = f32::from_bits(bits);
            vals.extend([v, -v]);
            bits += 997;
        }
        for k in -256i32..=256 {
            let h = k as f32 * 0.5;
            vals.extend([h, h.next_up(), h.next_down()]);
        }
        for v in vals {
            assert_eq!(round_away_small(v), v.round() as i32, "{v:e}");
        }
    }

    #[test]
    fn reference_rounds_ties_away_simd_path_to_even() {
        // amax = 127 gives d = 1 and id = 1 in both versions, so 2.5 and -0.5 are exact ties.
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -0.5;
        x[3] = 3.5;
        let (mut r, mut s) = ([zero()], [zero()]);
        BlockQ8_0::from_float(&x, &mut r);
        quantize_row_q8_0_nearest_even(&x, &mut s);
        assert_eq!(r[0].d, s[0].d);
        assert_eq!(f16_to_f32(r[0].d), 1.0);
        assert_eq!(&r[0].qs[..4], &[127, 3, -1, 4]);
        assert_eq!(&s[0].qs[..4], &[127, 2, 0, 4]);
        let mut y = [0.0f32; 32];
        BlockQ8_0::to_float(&r, &mut y);
        assert_eq!(&y[..4], &[127.0, 3.0, -1.0, 4.0]);
    }

    #[test]
    fn zero_block_has_zero_scale() {
        let mut r = [zero()];
        r[0].qs = [5; 32];
        BlockQ8_0::from_float(&[0.0; 32], &mut r);
        assert_eq!(r[0].d.to_bits(), 0);
        assert_eq!(r[0].qs, [0; 32]);
    }
}
