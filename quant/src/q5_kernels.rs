//! SIMD dot products for Q5_0 · Q8_0 and Q5_1 · Q8_1 (the scalar references are
//! `q5_0::vec_dot_q8_0` and `q5_1::vec_dot_q8_1`).
//!
//! Both formats unpack a block to 32 unsigned 5-bit quants `q` in value order (nibbles from
//! `qs`, fifth bits from `qh`), multiply them with the 32 signed activation bytes and keep the
//! block's integer sum exact, as the scalar reference does:
//! - x86-64: one AVX2 kernel per format, also used at the AVX-512 levels. ggml has no AVX-512
//!   variant of these two dot products either: a block is 32 values, one 256-bit vector, and a
//!   decode step is bound by reading the weights, not by the multiply. `vpmaddubsw` takes `q`
//!   as the unsigned operand (pair sums ≤ 2·31·128, no saturation); Q5_0's −16 offset is
//!   applied as `Σq·a − 16·Σa`, so every activation byte, −128 included, is exact.
//! - aarch64: one NEON kernel per format for both NEON levels (`smull` into i16, which holds
//!   every product of a 5-bit value and a byte, then pairwise widening adds).
//!
//! No multi-token (prefill) tile kernels exist for these formats: matmul dots each row with
//! each token.

use crate::dot::{DotFn, Isa};
use crate::q5_0::BlockQ5_0;
use crate::q5_1::BlockQ5_1;
use crate::q8_0::BlockQ8_0;
use crate::q8_1::BlockQ8_1;

/// The SIMD Q5_0 · Q8_0 kernel for `isa`, if there is one and this CPU runs it.
pub(crate) fn q5_0_q8_0(isa: Isa) -> Option<DotFn<BlockQ5_0, BlockQ8_0>> {
    if !isa.is_supported() {
        return None;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni | Isa::Amx => Some(avx2::q5_0_q8_0),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => Some(neon::q5_0_q8_0),
        _ => None,
    }
}

/// The SIMD Q5_1 · Q8_1 kernel for `isa`, if there is one and this CPU runs it.
pub(crate) fn q5_1_q8_1(isa: Isa) -> Option<DotFn<BlockQ5_1, BlockQ8_1>> {
    if !isa.is_supported() {
        return None;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni | Isa::Amx => Some(avx2::q5_1_q8_1),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => Some(neon::q5_1_q8_1),
        _ => None,
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_to_f32(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 quants (0..=31) of a block, byte i = value i.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn quants(qs: &[u8; 16], qh: &[u8; 4]) -> __m256i {
        let raw = _mm_loadu_si128(qs.as_ptr().cast());
        let m4 = _mm_set1_epi8(0x0f);
        let nib = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16::<4>(raw), m4),
            _mm_and_si128(raw, m4),
        );
        // Byte i takes qh byte i/8 and tests bit i%8 of it.
        let h = _mm256_shuffle_epi8(
            _mm256_set1_epi32(i32::from_le_bytes(*qh)),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
        _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(16)))
    }

    /// Σ u·a per i32 lane (4 adjacent products each): `u` unsigned ≤ 31, `a` signed bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_u5_i8(u: __m256i, a: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0_q8_0_impl(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
        let ones = _mm256_set1_epi8(1);
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(a) {
            let ay = _mm256_loadu_si256(y.qs.as_ptr().cast());
            let qa = dot_u5_i8(quants(&x.qs, &x.qh), ay);
            let sa = dot_u5_i8(ones, ay);
            let isum = _mm256_sub_epi32(qa, _mm256_slli_epi32::<4>(sa));
            let d = _mm256_set1_ps(f16_to_f32(x.d) * f16_to_f32(y.d));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_1_q8_1_impl(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0.0f32;
        for (x, y) in w.iter().zip(a) {
            let ay = _mm256_loadu_si256(y.qs.as_ptr().cast());
            let isum = dot_u5_i8(quants(&x.qs, &x.qh), ay);
            let d = _mm256_set1_ps(f16_to_f32(x.d) * f16_to_f32(y.d));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc);
            mins += f16_to_f32(x.m) * f16_to_f32(y.s);
        }
        hsum(acc) + mins
    }

    // Safe entry points. `super::q5_0_q8_0`/`q5_1_q8_1` hand these out only after checking
    // that the CPU supports AVX2, FMA and F16C.
    pub(super) fn q5_0_q8_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
        // SAFETY: the CPU features were checked before this function was handed out; the
        // kernel reads only within the blocks `zip` yields.
        unsafe { q5_0_q8_0_impl(w, a) }
    }
    pub(super) fn q5_1_q8_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
        // SAFETY: as above.
        unsafe { q5_1_q8_1_impl(w, a) }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// The 32 quants (0..=31) of a block as values 0..16 and 16..32.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn quants(qs: &[u8; 16], qh: &[u8; 4]) -> (uint8x16_t, uint8x16_t) {
        const BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        let raw = vld1q_u8(qs.as_ptr());
        let bits = vld1q_u8(BITS.as_ptr());
        let s16 = vdupq_n_u8(16);
        // Byte i of each half takes qh byte i/8 and tests bit i%8 of it.
        let h0 = vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1]));
        let h1 = vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3]));
        let lo = vorrq_u8(
            vandq_u8(raw, vdupq_n_u8(0x0f)),
            vandq_u8(vtstq_u8(h0, bits), s16),
        );
        let hi = vorrq_u8(vshrq_n_u8::<4>(raw), vandq_u8(vtstq_u8(h1, bits), s16));
        (lo, hi)
    }

    /// Σ w·a over 16 byte pairs (|w| ≤ 31, so every product fits i16), as 4 i32 lanes.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot16(w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let p0 = vmull_s8(vget_low_s8(w), vget_low_s8(a));
        let p1 = vmull_high_s8(w, a);
        vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1))
    }

    /// Σ over the block of `w`·a with `w` the 32 values as signed bytes.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn block_sum(w: (int8x16_t, int8x16_t), a: &[i8; 32]) -> i32 {
        let a0 = vld1q_s8(a.as_ptr());
        let a1 = vld1q_s8(a.as_ptr().add(16));
        vaddvq_s32(vaddq_s32(dot16(w.0, a0), dot16(w.1, a1)))
    }

    #[target_feature(enable = "neon")]
    unsafe fn q5_0_q8_0_impl(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
        let s16 = vdupq_n_s8(16);
        let mut sum = 0.0f32;
        for (x, y) in w.iter().zip(a) {
            let (lo, hi) = quants(&x.qs, &x.qh);
            let v = (
                vsubq_s8(vreinterpretq_s8_u8(lo), s16),
                vsubq_s8(vreinterpretq_s8_u8(hi), s16),
            );
            sum += x.d.to_f32() * y.d.to_f32() * block_sum(v, &y.qs) as f32;
        }
        sum
    }

    #[target_feature(enable = "neon")]
    unsafe fn q5_1_q8_1_impl(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
        let (mut sum, mut mins) = (0.0f32, 0.0f32);
        for (x, y) in w.iter().zip(a) {
            let (lo, hi) = quants(&x.qs, &x.qh);
            let v = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
            sum += x.d.to_f32() * y.d.to_f32() * block_sum(v, &y.qs) as f32;
            mins += x.m.to_f32() * y.s.to_f32();
        }
        sum + mins
    }

    // Safe entry points, handed out only when the CPU reports NEON.
    pub(super) fn q5_0_q8_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
        // SAFETY: NEON was checked before this function was handed out; the kernel reads only
        // within the blocks `zip` yields.
        unsafe { q5_0_q8_0_impl(w, a) }
    }
    pub(super) fn q5_1_q8_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
        // SAFETY: as above.
        unsafe { q5_1_q8_1_impl(w, a) }
    }
}
