//! AVX2 + FMA + F16C kernels (x86-64 CPUs without AVX-512).
//!
//! K-quants follow the shape of ggml's AVX2 kernels: 32 values at a time, `vpmaddubsw`
//! (unsigned weight byte × signed activation byte → i16 pair sums; no saturation since the
//! weight side is at most 63) and `vpmaddwd` with the group scale, accumulated in i32 per
//! superblock, scaled once per superblock into 8-lane f32 accumulators that are summed once per
//! row. The group scales reach their i16 lanes by byte shuffles (`K4_SCALE`, `K6_SCALE`), one
//! shuffle each, where broadcasts from general registers took two. Q8_0 widens both sides to
//! i16 so that signed × signed products are exact for every byte value.
//!
//! The multi-token (prefill) kernels of this level are in `avx2_tile.rs`.

use super::{in_memory, prefetch_blocks};
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

/// `pshufb` patterns over a superblock's 16 scale/min bytes (both 128-bit lanes): `K4_SCALE[k]`
/// puts byte `k` zero-extended in every i16 lane (the scale of sub-block `k`), `K4_MINS` byte
/// `8 + g / 2` in i16 lane `g` (the min of 16-value group `g`).
const K4_SCALE: [[u8; 32]; 8] = {
    let mut p = [[0x80u8; 32]; 8];
    let mut k = 0;
    while k < 8 {
        let mut i = 0;
        while i < 32 {
            p[k][i] = k as u8;
            i += 2;
        }
        k += 1;
    }
    p
};
const K4_MINS: [u8; 32] = {
    let mut p = [0x80u8; 32];
    let mut g = 0;
    while g < 16 {
        p[2 * g] = 8 + (g / 2) as u8;
        g += 1;
    }
    p
};

/// `pshufb` patterns over eight i16 group scales (both 128-bit lanes): `K6_SCALE[r]` puts
/// scale `2r` in every i16 lane of the low lane and scale `2r + 1` in the high one.
const K6_SCALE: [[u8; 32]; 4] = {
    let mut p = [[0u8; 32]; 4];
    let mut r = 0;
    while r < 4 {
        let mut i = 0;
        while i < 16 {
            p[r][i] = (4 * r + i % 2) as u8;
            p[r][16 + i] = (4 * r + 2 + i % 2) as u8;
            i += 1;
        }
        r += 1;
    }
    p
};

/// Shared body of Q4_K/Q5_K: adds the superblock's `d·Σ` and `dmin·Σ min` (times the
/// activation scale) into the 8-lane accumulators. `hi_bits(c)` returns the 5th bits (0 or 16)
/// for chunk c's low and high nibbles (all zero for Q4_K). The sub-block scales and mins are
/// spread to i16 lanes by byte shuffles of the 16 unpacked bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn k4_dot(
    w_d: f16,
    w_dmin: f16,
    scales: &[u8; 12],
    qs: &[u8; 128],
    y: &BlockQ8K,
    hi_bits: impl Fn(usize) -> (__m256i, __m256i),
    acc: &mut __m256,
    acc_min: &mut __m256,
) {
    let b = scales_mins_bytes(scales);
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(b.as_ptr().cast()));
    let spread = |k: usize| _mm256_shuffle_epi8(v, load(K4_SCALE[k].as_ptr()));
    let m4 = _mm256_set1_epi8(0x0f);
    let mut isum = _mm256_setzero_si256();
    for c in 0..4 {
        let q = load(qs.as_ptr().add(32 * c));
        let (h_lo, h_hi) = hi_bits(c);
        let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h_lo);
        let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), h_hi);
        let a = y.qs.as_ptr().add(64 * c);
        isum = _mm256_add_epi32(isum, scaled_dot32(lo, a, spread(2 * c)));
        isum = _mm256_add_epi32(isum, scaled_dot32(hi, a.add(32), spread(2 * c + 1)));
    }
    let mins = _mm256_shuffle_epi8(v, load(K4_MINS.as_ptr()));
    let imin = _mm256_madd_epi16(mins, load(y.bsums.as_ptr().cast()));
    let dd = [y.d * f16_to_f32(w_d), y.d * f16_to_f32(w_dmin)];
    let dd = in_memory(&dd);
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dd[0]), *acc);
    *acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin), _mm256_set1_ps(dd[1]), *acc_min);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_q8k_impl(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let z = _mm256_setzero_si256();
    let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (x, y) in w.iter().zip(a) {
        prefetch_blocks(x);
        k4_dot(
            x.d,
            x.dmin,
            &x.scales,
            &x.qs,
            y,
            |_| (z, z),
            &mut acc,
            &mut acc_min,
        );
    }
    hsum(acc) - hsum(acc_min)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5k_q8k_impl(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let sixteen = _mm256_set1_epi8(16);
    let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (x, y) in w.iter().zip(a) {
        prefetch_blocks(x);
        let qh = load(x.qh.as_ptr());
        let bit = |m: i32| {
            let m = _mm256_set1_epi8(m as i8);
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m), sixteen)
        };
        let hi_bits = |c: usize| (bit(1 << (2 * c)), bit(1 << (2 * c + 1)));
        k4_dot(
            x.d,
            x.dmin,
            &x.scales,
            &x.qs,
            y,
            hi_bits,
            &mut acc,
            &mut acc_min,
        );
    }
    hsum(acc) - hsum(acc_min)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_q8k_impl(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let m4 = _mm256_set1_epi8(0x0f);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.iter().zip(a) {
        prefetch_blocks(x);
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr().cast()));
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
            // This half's eight group scales (as i16) in both 128-bit lanes.
            let sh = if h == 0 {
                _mm256_permute4x64_epi64::<0x44>(sc16)
            } else {
                _mm256_permute4x64_epi64::<0xEE>(sc16)
            };
            for (r, q) in runs.into_iter().enumerate() {
                // Groups 8h + 2r and 8h + 2r + 1 of this run, one per 128-bit lane.
                let s = _mm256_shuffle_epi8(sh, load(K6_SCALE[r].as_ptr()));
                isum = _mm256_add_epi32(
                    isum,
                    scaled_dot32(q, y.qs.as_ptr().add(128 * h + 32 * r), s),
                );
            }
        }
        // Values were taken as 0..63: subtract 32·Σ_g sc_g·Σ_group a, in integers.
        let off = _mm256_madd_epi16(sc16, load(y.bsums.as_ptr().cast()));
        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(off));
        let d = [y.d * f16_to_f32(x.d)];
        let d = _mm256_set1_ps(in_memory(&d)[0]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc);
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
            prefetch_blocks(x);
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
