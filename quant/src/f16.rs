//! F16 (and F32/BF16 conversions): one value per "block".
//!
//! ggml's reference conversions (`ggml-impl.h`) are what llama-quantize uses when it writes a
//! file, so these functions follow them bit for bit:
//! - f32 → f16 rounds to nearest, ties to even, with subnormals kept; a NaN becomes the
//!   canonical quiet NaN `0x7E00` with the input's sign (ggml's software path; the F16C
//!   instruction would keep some payload bits, but ggml-base is built without F16C).
//! - f32 → bf16 rounds to nearest even by adding `0x7FFF + lsb` to the bits; a NaN keeps its
//!   top 16 bits with the quiet bit forced on. Overflow rounds to ±inf.
//! - f16/bf16 → f32 are exact widenings.

use half::{bf16, f16};

/// f32 → f16 exactly as ggml's `GGML_FP32_TO_FP16` (round to nearest even).
#[inline]
pub fn f32_to_f16(x: f32) -> f16 {
    if x.is_nan() {
        // ggml returns a fixed quiet NaN rather than propagating the payload.
        let sign = ((x.to_bits() >> 16) & 0x8000) as u16;
        return f16::from_bits(sign | 0x7E00);
    }
    // half's conversion (software or F16C) rounds to nearest even for every non-NaN input,
    // including subnormal results and overflow to infinity, which is what ggml computes.
    f16::from_f32(x)
}

/// f16 → f32, exact (ggml's `GGML_FP16_TO_FP32`).
#[inline]
pub fn f16_to_f32(h: f16) -> f32 {
    h.to_f32()
}

/// bf16 bits → f32, exact (ggml's `GGML_BF16_TO_FP32`): the bits are the top half of an f32.
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits exactly as ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaNs made quiet.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        // NaN: truncating could clear every mantissa bit and turn it into infinity, so set
        // the quiet bit (bit 6 of the bf16) to keep it a NaN.
        return ((u >> 16) | 64) as u16;
    }
    // Adding 0x7FFF plus the lowest kept bit rounds ties to even; the carry may ripple into
    // the exponent, which is exactly how rounding up to the next binade (or to inf) works.
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// bf16 → f32, exact.
#[inline]
pub fn bf16_to_f32(h: bf16) -> f32 {
    bf16_bits_to_f32(h.to_bits())
}

/// f32 → bf16 with ggml's rounding (see [`f32_to_bf16_bits`]).
#[inline]
pub fn f32_to_bf16(x: f32) -> bf16 {
    bf16::from_bits(f32_to_bf16_bits(x))
}

/// Convert a row of f32 to bf16 with ggml's rounding (`ggml_fp32_to_bf16_row_ref`).
pub fn f32_to_bf16_row(x: &[f32], out: &mut [bf16]) {
    assert_eq!(x.len(), out.len(), "f32_to_bf16_row: length mismatch");
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_bf16(v);
    }
}

/// Convert a row of bf16 to f32 (`ggml_bf16_to_fp32_row`).
pub fn bf16_to_f32_row(x: &[bf16], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "bf16_to_f32_row: length mismatch");
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16_to_f32(v);
    }
}

/// Convert a row of f32 to f16 exactly as ggml's reference `ggml_fp32_to_fp16_row` does
/// (see [`f32_to_f16`]); uses F16C when the CPU has it.
pub fn f32_to_f16_row(x: &[f32], out: &mut [f16]) {
    assert_eq!(x.len(), out.len(), "f32_to_f16_row: length mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            // SAFETY: `available()` checked that the CPU has AVX and F16C.
            unsafe { x86::f32_to_f16_row(x, out) };
            return;
        }
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_f16(v);
    }
}

/// Convert a row of f16 to f32 (exact); uses F16C when the CPU has it.
pub fn f16_to_f32_row(x: &[f16], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "f16_to_f32_row: length mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            // SAFETY: `available()` checked that the CPU has AVX and F16C.
            unsafe { x86::f16_to_f32_row(x, out) };
            return;
        }
    }
    f16_to_f32_portable(x, out)
}

/// f16 → f32 for a row without explicit SIMD: a branch-free loop the compiler vectorises with
/// whatever instruction set the calling function is compiled for (inline it into a
/// `#[target_feature]` kernel to get that set). Exact for every input.
#[inline(always)]
pub fn f16_to_f32_portable(x: &[f16], out: &mut [f32]) {
    for (o, &h) in out.iter_mut().zip(x) {
        *o = f16_bits_to_f32(h.to_bits());
    }
}

/// f16 bits to f32, exactly, without branches on the common path so loops vectorise (the
/// `half` crate converts one value at a time in software on baseline x86-64). Placing the
/// f16 exponent and mantissa at the f32 positions and multiplying by 2¹¹² rebias the exponent
/// exactly, for subnormals too; infinities and NaNs get the all-ones exponent.
#[inline(always)]
pub fn f16_bits_to_f32(b: u16) -> f32 {
    let h = b as u32;
    let em = h & 0x7fff;
    let mut v = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    if em >= 0x7c00 {
        v = f32::from_bits((em << 13) | 0x7f80_0000);
    }
    f32::from_bits(v.to_bits() | ((h & 0x8000) << 16))
}

/// F16C conversions, 8 values per instruction. Both are exact conversions (f32 → f16 rounds
/// to nearest even, like ggml), except that F16C keeps NaN payload bits where ggml's
/// reference writes `0x7E00`, so NaN lanes are patched.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::f32_to_f16;
    use half::f16;
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        crate::cpu::avx2()
    }

    /// # Safety
    /// The CPU must support AVX and F16C; `out.len() == x.len()`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f32_to_f16_row(x: &[f32], out: &mut [f16]) {
        let n8 = x.len() / 8 * 8;
        for (xs, os) in x[..n8].chunks_exact(8).zip(out[..n8].chunks_exact_mut(8)) {
            // SAFETY: `xs` holds 8 f32 and `os` 8 f16 (16 bytes); unaligned load/store.
            let v = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            // SAFETY: as above.
            unsafe { _mm_storeu_si128(os.as_mut_ptr().cast::<__m128i>(), h) };
            if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v)) != 0 {
                for (o, &f) in os.iter_mut().zip(xs) {
                    *o = f32_to_f16(f);
                }
            }
        }
        for (o, &f) in out[n8..].iter_mut().zip(&x[n8..]) {
            *o = f32_to_f16(f);
        }
    }

    /// # Safety
    /// The CPU must support AVX and F16C; `out.len() == x.len()`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32_row(x: &[f16], out: &mut [f32]) {
        let n8 = x.len() / 8 * 8;
        for (xs, os) in x[..n8].chunks_exact(8).zip(out[..n8].chunks_exact_mut(8)) {
            // SAFETY: `xs` holds 8 f16 (16 bytes) and `os` 8 f32; unaligned load/store.
            let h = unsafe { _mm_loadu_si128(xs.as_ptr().cast::<__m128i>()) };
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(os.as_mut_ptr(), _mm256_cvtph_ps(h)) };
        }
        for (o, &h) in out[n8..].iter_mut().zip(&x[n8..]) {
            *o = h.to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounds_ties_to_even() {
        // 1 + 2^-11 lies exactly between 1 and the next f16 (1 + 2^-10): ties go to the even 1.0.
        assert_eq!(f32_to_f16(1.0 + f32::powi(2.0, -11)).to_bits(), 0x3C00);
        // 1 + 3·2^-11 lies between 1+2^-10 (odd mantissa) and 1+2^-9: goes up to even.
        assert_eq!(
            f32_to_f16(1.0 + 3.0 * f32::powi(2.0, -11)).to_bits(),
            0x3C02
        );
        // Largest finite f16 is 65504; 65520 is the tie with "65536" and rounds to inf.
        assert_eq!(f32_to_f16(65520.0).to_bits(), 0x7C00);
        assert_eq!(f32_to_f16(65519.0).to_bits(), 0x7BFF);
        // Subnormal: 2^-24 is the smallest f16; half of it ties to zero (even).
        assert_eq!(f32_to_f16(f32::powi(2.0, -24)).to_bits(), 0x0001);
        assert_eq!(f32_to_f16(f32::powi(2.0, -25)).to_bits(), 0x0000);
        assert_eq!(f32_to_f16(1.5 * f32::powi(2.0, -25)).to_bits(), 0x0001);
        assert_eq!(f32_to_f16(-0.0).to_bits(), 0x8000);
    }

    #[test]
    fn f16_nan_is_ggml_canonical() {
        assert_eq!(f32_to_f16(f32::from_bits(0x7f80_0001)).to_bits(), 0x7E00);
        assert_eq!(f32_to_f16(f32::from_bits(0xffc0_1234)).to_bits(), 0xFE00);
        assert_eq!(f32_to_f16(f32::INFINITY).to_bits(), 0x7C00);
    }

    #[test]
    fn row_conversions_equal_scalar() {
        // Every f16 bit pattern, widened by the row function and by the scalar one.
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut wide = vec![0.0f32; all.len()];
        f16_to_f32_row(&all, &mut wide);
        for (h, w) in all.iter().zip(&wide) {
            let want = f16_to_f32(*h);
            // A NaN stays a NaN; its payload may differ (aarch64's hardware conversion behind
            // `half` quiets signalling NaNs, the bit-exact portable path keeps them).
            if want.is_nan() {
                assert!(w.is_nan(), "{:#06x}", h.to_bits());
                continue;
            }
            assert_eq!(w.to_bits(), want.to_bits(), "{:#06x}", h.to_bits());
        }
        // f32 inputs around every f16 boundary (ties included), plus NaNs with payloads.
        let mut xs: Vec<f32> = Vec::new();
        for &w in wide.iter().filter(|w| w.is_finite()) {
            let b = w.to_bits();
            xs.extend([w, f32::from_bits(b + 1), f32::from_bits(b.wrapping_sub(1))]);
            xs.push(w * (1.0 + f32::powi(2.0, -11)));
        }
        xs.extend([
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc1_2345),
            1e10,
            -1e-10,
        ]);
        let mut h = vec![f16::ZERO; xs.len()];
        f32_to_f16_row(&xs, &mut h);
        for (x, h) in xs.iter().zip(&h) {
            assert_eq!(h.to_bits(), f32_to_f16(*x).to_bits(), "{x:e}");
        }
    }

    #[test]
    fn bf16_rounding_and_nan() {
        // 1 + 2^-8 is the tie between 1.0 (even) and 1 + 2^-7.
        assert_eq!(f32_to_bf16_bits(1.0 + f32::powi(2.0, -8)), 0x3F80);
        // 1 + 3·2^-8 ties between 1+2^-7 (odd) and 1+2^-6 (even): rounds up.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * f32::powi(2.0, -8)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(1.0 + 1.5 * f32::powi(2.0, -8)), 0x3F81);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80);
        assert_eq!(f32_to_bf16_bits(f32::NEG_INFINITY), 0xFF80);
        // A signalling NaN whose payload lives only in the low 16 bits must stay a NaN.
        let b = f32_to_bf16_bits(f32::from_bits(0x7f80_0001));
        assert_eq!(b, 0x7FC0);
        assert!(bf16_bits_to_f32(b).is_nan());
        assert_eq!(bf16_bits_to_f32(0xC040), -3.0);
        // Every bf16 survives a round trip through f32.
        for bits in 0..=u16::MAX {
            let f = bf16_bits_to_f32(bits);
            if !f.is_nan() {
                assert_eq!(f32_to_bf16_bits(f), bits);
            }
        }
    }
}
