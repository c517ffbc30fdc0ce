//! AVX2 + FMA + F16C kernels (x86-64 CPUs without AVX-512).
//!
//! K-quants follow the shape of ggml's AVX2 kernels: 32 values at a time, `vpmaddubsw`
//! (unsigned weight byte × signed activation byte → i16 pair sums; no saturation since the
//! weight side is at most 63) and `vpmaddwd` with the group scale, accumulated in i32 per
//! superblock, scaled once per superblock in f32. Q8_0 widens both sides to i16 so that
//! signed × signed products are exact for every byte value.
//!
//! The multi-token (prefill) kernels of this level are in `avx2_tile.rs`.

use crate::kscale::scales_mins_bytes;

use crate::q4_k::BlockQ4K;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use half::{bf16, f16};
use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn f16_to_f32(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

/// `super::prefetch_ahead` for one weight block.
#[inline(always)]
fn prefetch<T>(x: &T) {
    super::prefetch_ahead((x as *const T).cast(), std::mem::size_of::<T>());
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Σ (u · s) for 32 unsigned and 32 signed bytes, scaled by `scale` (i16 per pair lane).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scaled_dot32(u: __m256i, a: *const i8, scale: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, load(a.cast())), scale)
}

/// Per-group (16-value) mins for Q4_K/Q5_K from the 8 sub-block mins, as i16.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group_mins(b: &[u8; 16]) -> __m256i {
    let m = _mm_cvtepu8_epi16(_mm_loadl_epi64(b.as_ptr().add(8).cast()));
    _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m))
}

/// Shared body of Q4_K/Q5_K: `hi_bits(c)` returns the 5th bits (0 or 16) for chunk c's low and
/// high nibbles (all zero for Q4_K).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_dot(
    w_d: f16,
    w_dmin: f16,
    scales: &[u8; 12],
    qs: &[u8; 128],
    y: &BlockQ8K,
    hi_bits: impl Fn(usize) -> (__m256i, __m256i),
) -> (f32, f32) {
    let b = scales_mins_bytes(scales);
    let m4 = _mm256_set1_epi8(0x0f);
    let mut isum = _mm256_setzero_si256();
    for c in 0..4 {
        let q = load(qs.as_ptr().add(32 * c));
        let (h_lo, h_hi) = hi_bits(c);
        let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h_lo);
        let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), h_hi);
        let a = y.qs.as_ptr().add(64 * c);
        let s_lo = _mm256_set1_epi16(b[2 * c] as i16);
        let s_hi = _mm256_set1_epi16(b[2 * c + 1] as i16);
        isum = _mm256_add_epi32(isum, scaled_dot32(lo, a, s_lo));
        isum = _mm256_add_epi32(isum, scaled_dot32(hi, a.add(32), s_hi));
    }
    let imin = _mm256_madd_epi16(group_mins(&b), load(y.bsums.as_ptr().cast()));
    let d = y.d * f16_to_f32(w_d);
    let dmin = y.d * f16_to_f32(w_dmin);
    (
        d * hsum(_mm256_cvtepi32_ps(isum)),
        dmin * hsum(_mm256_cvtepi32_ps(imin)),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_q8k_impl(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let z = _mm256_setzero_si256();
    let mut sum = 0.0;
    for (x, y) in w.iter().zip(a) {
        prefetch(x);
        let (s, m) = k4_dot(x.d, x.dmin, &x.scales, &x.qs, y, |_| (z, z));
        sum += s - m;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5k_q8k_impl(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let sixteen = _mm256_set1_epi8(16);
    let mut sum = 0.0;
    for (x, y) in w.iter().zip(a) {
        prefetch(x);
        let qh = load(x.qh.as_ptr());
        let bit = |m: i32| {
            let m = _mm256_set1_epi8(m as i8);
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m), sixteen)
        };
        let (s, m) = k4_dot(x.d, x.dmin, &x.scales, &x.qs, y, |c| {
            (bit(1 << (2 * c)), bit(1 << (2 * c + 1)))
        });
        sum += s - m;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_q8k_impl(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let m4 = _mm256_set1_epi8(0x0f);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        prefetch(x);
        let mut isum = _mm256_setzero_si256();
        for h in 0..2 {
            let qh = load(x.qh.as_ptr().add(32 * h));
            let ql0 = load(x.ql.as_ptr().add(64 * h));
            let ql1 = load(x.ql.as_ptr().add(64 * h + 32));
            // The four 32-value runs of this half and the qh bit pair each takes.
            let runs = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    _mm256_and_si256(qh, m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
                ),
            ];
            for (r, q) in runs.into_iter().enumerate() {
                let g = 8 * h + 2 * r; // first of the two 16-value groups in this run
                let s = _mm256_set_m128i(
                    _mm_set1_epi16(x.scales[g + 1] as i16),
                    _mm_set1_epi16(x.scales[g] as i16),
                );
                isum = _mm256_add_epi32(
                    isum,
                    scaled_dot32(q, y.qs.as_ptr().add(128 * h + 32 * r), s),
                );
            }
        }
        // Values were taken as 0..63: subtract 32·Σ_g sc_g·Σ_group a, in integers.
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr().cast()));
        let off = _mm256_madd_epi16(sc16, load(y.bsums.as_ptr().cast()));
        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(off));
        let d = y.d * f16_to_f32(x.d);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc);
    }
    hsum(acc)
}

/// Q8_0 · Q8_0 for `R` weight rows (each `a.len()` blocks) and one activation row. A row's
/// arithmetic is the same whatever `R` is; several rows share the activation's widening and
/// scale conversion and give the core independent FMA chains.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_0_q8_0_impl<const R: usize>(w: [&[BlockQ8_0]; R], a: &[BlockQ8_0]) -> [f32; R] {
    let w = w.map(|r| &r[..a.len()]);
    let mut acc = [_mm256_setzero_ps(); R];
    let wide = |p: *const i8, o: usize| _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(o).cast()));
    for (i, y) in a.iter().enumerate() {
        let (y0, y1) = (wide(y.qs.as_ptr(), 0), wide(y.qs.as_ptr(), 16));
        let yd = f16_to_f32(y.d);
        for r in 0..R {
            let x = &w[r][i];
            prefetch(x);
            let p0 = _mm256_madd_epi16(wide(x.qs.as_ptr(), 0), y0);
            let p1 = _mm256_madd_epi16(wide(x.qs.as_ptr(), 16), y1);
            let d = f16_to_f32(x.d) * yd;
            acc[r] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)),
                _mm256_set1_ps(d),
                acc[r],
            );
        }
    }
    std::array::from_fn(|r| hsum(acc[r]))
}

/// Σ w·a with `wload(i)` giving 8 f32 weights from index i; four accumulators; scalar tail.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn float_dot(
    n: usize,
    a: &[f32],
    wload: impl Fn(usize) -> __m256,
    wscalar: impl Fn(usize) -> f32,
) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            let k = i + 8 * j;
            *s = _mm256_fmadd_ps(wload(k), _mm256_loadu_ps(a.as_ptr().add(k)), *s);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(wload(i), _mm256_loadu_ps(a.as_ptr().add(i)), acc[0]);
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        sum += wscalar(i) * a[i];
        i += 1;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_f32_impl(w: &[f16], a: &[f32]) -> f32 {
    let n = w.len().min(a.len());
    let p = w.as_ptr();
    float_dot(
        n,
        a,
        |i| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i).cast())),
        |i| w[i].to_f32(),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_f32_impl(w: &[bf16], a: &[f32]) -> f32 {
    let n = w.len().min(a.len());
    let p = w.as_ptr();
    float_dot(
        n,
        a,
        |i| {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(i).cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        },
        |i| w[i].to_f32(),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_f32_impl(w: &[f32], a: &[f32]) -> f32 {
    let n = w.len().min(a.len());
    float_dot(n, a, |i| _mm256_loadu_ps(w.as_ptr().add(i)), |i| w[i])
}

// The safe entry points (`dot::entry_points` states why they are sound).
super::entry_points! { "avx2,fma,f16c";
    dot q4k_q8k = q4k_q8k_impl(BlockQ4K, BlockQ8K);
    dot q5k_q8k = q5k_q8k_impl(BlockQ5K, BlockQ8K);
    dot q6k_q8k = q6k_q8k_impl(BlockQ6K, BlockQ8K);
    rows q8_0_q8_0, q8_0_rows = q8_0_q8_0_impl(BlockQ8_0, BlockQ8_0) x 2;
    dot f16_f32 = f16_f32_impl(f16, f32);
    dot bf16_f32 = bf16_f32_impl(bf16, f32);
    dot f32_f32 = f32_f32_impl(f32, f32);
}
