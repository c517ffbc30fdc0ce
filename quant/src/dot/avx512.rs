//! AVX-512 (F/BW/VL) kernels, in two builds: `plain` (int8 products via `vpmaddubsw`) and
//! `vnni` (`vpdpbusd`, 64 multiply-adds in one instruction).
//!
//! Both builds are generated from the same source by the `avx512_family!` macro, each with its
//! own `#[target_feature]` list, so that the compiler can never place a VNNI instruction into
//! the plain build (which must run on AVX-512 CPUs without VNNI).
//!
//! K-quant superblocks are handled in one shape for all three formats: the 256 values are
//! unpacked into four 64-byte vectors of *unsigned* bytes in element order (Q4_K 0..15,
//! Q5_K 0..31, Q6_K 0..63 with its −32 offset moved to the activation sums), multiplied with the
//! Q8_K bytes into i32 lanes (lane i of vector k covers elements 64k+4i..64k+4i+3, i.e. the
//! 16-value group 4k+i/4), narrowed to i16 (no saturation: |lane| ≤ 4·63·127 = 32004) and
//! multiplied by the per-group scales with `vpmaddwd`. The mins (Q4_K/Q5_K) or the −32 offset
//! (Q6_K) use the Q8_K group sums, as in ggml. All integer work is exact; only the per-superblock
//! scaling is float. Decode's Q4_K/Q5_K row kernels keep the values in the order a load gives
//! them instead and reorder the token's values to match (`nibble_elem`), with the same sums.

#![allow(clippy::missing_safety_doc)]

use super::{in_memory, prefetch_ahead, prefetch_blocks, KPacked, Q8_0Packed};
use crate::act::{Q8KTile, Q8_0Tile};
use crate::kscale::scales_mins_bytes;
use crate::q4_k::BlockQ4K;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use half::f16;

/// Group-scale gather indices (16-bit lanes) for `vpermw`. With the 16 group scales of a
/// superblock in the low 256 bits, `PERM_01` builds the scales matching `packs(D0, D1)` (128-bit
/// lane L holds 4 lanes of group L then 4 of group 4+L) and `PERM_23` those of `packs(D2, D3)`.
/// For Q4_K/Q5_K the source vector holds 8 sub-block scales (a sub-block is 2 groups), so
/// group g reads index g/2.
const fn perm(first: u16, per_subblock: bool) -> [u16; 32] {
    let mut idx = [0u16; 32];
    let mut lane = 0;
    while lane < 4 {
        let mut j = 0;
        while j < 8 {
            let g = first + lane as u16 + if j < 4 { 0 } else { 4 };
            idx[lane * 8 + j] = if per_subblock { g / 2 } else { g };
            j += 1;
        }
        lane += 1;
    }
    idx
}
pub(crate) const PERM6_01: [u16; 32] = perm(0, false);
pub(crate) const PERM6_23: [u16; 32] = perm(8, false);
pub(crate) const PERM4_01: [u16; 32] = perm(0, true);
pub(crate) const PERM4_23: [u16; 32] = perm(8, true);
/// For Q4_K/Q5_K: group g's min is sub-block g/2's, stored at index 8 + g/2.
pub(crate) const PERM4_MINS: [u16; 16] =
    [8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15];

/// Decode (`q4k_rows`, `q5k_rows`) leaves Q4_K/Q5_K nibbles in the order one 64-byte load gives
/// them ("nibble order") and reorders the token's Q8_K values to match, once per call, instead
/// of shuffling every weight superblock into element order (four port-5 shuffles each). Within
/// a 64-byte load of `qs`, byte `b` of the low-nibble vector (`v` = 0) or the high-nibble
/// vector (`v` = 1) holds this element of the load's 128:
const fn nibble_elem(v: usize, b: usize) -> usize {
    32 * v + if b < 32 { b } else { b + 32 }
}

/// Where 16-bit lane `j` of 128-bit lane `k` of `packs(D_0, D_1)` comes from: (which of the two
/// vectors, which of its 32-bit lanes).
const fn packs_source(k: usize, j: usize) -> (usize, usize) {
    if j < 4 {
        (0, 4 * k + j)
    } else {
        (1, 4 * k + j - 4)
    }
}

/// `perm` for nibble order: the scale (sub-block) index at each 16-bit lane of
/// `packs(D_lo, D_hi)` for the `pair`-th 64-byte load of `qs` (0 or 1).
const fn perm_nibbles(pair: usize) -> [u16; 32] {
    let mut idx = [0u16; 32];
    let mut p = 0;
    while p < 32 {
        let (v, dword) = packs_source(p / 8, p % 8);
        idx[p] = ((128 * pair + nibble_elem(v, 4 * dword)) / 32) as u16;
        p += 1;
    }
    idx
}
const PERM4N_01: [u16; 32] = perm_nibbles(0);
const PERM4N_23: [u16; 32] = perm_nibbles(1);

/// The first element of i32 lane `lane` of a superblock sum (`superblock`'s result, 8 elements a
/// lane): in element order, or in nibble order.
const fn lane_first_elem(lane: usize, nibbles: bool) -> usize {
    let (v, dword) = packs_source(lane / 4, 2 * (lane % 4));
    if nibbles {
        nibble_elem(v, 4 * dword)
    } else {
        64 * v + 4 * dword
    }
}

/// `vpermps` indices that put the lanes of a nibble-order accumulator where the element-order
/// kernel has them. Each lane sums the same elements in the same way in both orders, only in
/// another lane, so the row's horizontal sum after this permutation is bit for bit the row
/// dot's.
const NIBBLE_TO_ELEMENT_LANES: [u32; 16] = {
    let mut idx = [0u32; 16];
    let mut old = 0;
    while old < 16 {
        let mut new = 0;
        while lane_first_elem(new, true) != lane_first_elem(old, false) {
            new += 1;
        }
        idx[old] = new as u32;
        old += 1;
    }
    idx
};

/// Decode's nibble-order copy of a token's Q8_K values is kept on the stack for rows of up to
/// this many superblocks (16 KiB, 16384 columns); longer rows take the element-order kernel.
const NIBBLE_ROW_MAX_BLOCKS: usize = 64;

/// One superblock's Q8_K values in nibble order.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct NibbleQs([u8; 256]);

/// `k4_scales`' byte shuffle: per i16 lane (the 16 values of `scales_mins_bytes`, 8 per
/// 128-bit half), the block-head byte with the value's low bits, then the byte with its top
/// 2 bits (-128: none, so zero). The 12 scale bytes start at head byte 4.
const K4_PICK: [i8; 32] = {
    let mut p = [-128i8; 32];
    let mut j = 0;
    while j < 8 {
        // Scale j: byte j (6 bits) for j < 4; else byte j + 4's low nibble, byte j − 4's top.
        p[2 * j] = 4 + (if j < 4 { j } else { j + 4 }) as i8;
        if j >= 4 {
            p[2 * j + 1] = 4 + (j - 4) as i8;
        }
        // Min j: byte j + 4 (6 bits) for j < 4; else its high nibble, and byte j's top.
        p[16 + 2 * j] = 4 + (j + 4) as i8;
        if j >= 4 {
            p[16 + 2 * j + 1] = 4 + j as i8;
        }
        j += 1;
    }
    p
};
/// `k4_scales`' per-lane right shift: the upper four mins sit in a high nibble.
const K4_SHIFT: [u16; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4];
/// `k4_scales`' low-bits mask: 6 bits for the lower four scales and mins, 4 for the rest.
const K4_MASK: [u16; 16] = [
    0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f, 0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f,
];

/// The float kernels (F16, BF16, F32 weights): one build for both AVX-512 levels, which
/// share them (they use no VNNI instruction), plus the horizontal sums the integer kernels use.
pub(crate) mod float {
    use super::super::outer::{Dest, Layout, OuterMicro};
    use super::super::tile::{self, FloatMicro};
    use half::{bf16, f16};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(crate) unsafe fn hsum(v: __m512) -> f32 {
        hsum256(_mm256_add_ps(
            _mm512_castps512_ps256(v),
            _mm512_extractf32x8_ps::<1>(v),
        ))
    }

    /// Four `hsum`s at once: lane r of the result is `hsum(v[r])`, bit for bit (the same
    /// additions of the same operands, four rows a step; decode's row kernels sum a run of rows
    /// this way).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(crate) unsafe fn hsum4(v: [__m512; 4]) -> __m128 {
        // [a.lo + a.hi | b.lo + b.hi]: `hsum`'s first step for two rows.
        let halves = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xee>(a, b),
            )
        };
        hsum256_4(halves(v[0], v[1]), halves(v[2], v[3]))
    }

    /// Four `hsum256`s at once: lane r of the result is `hsum256(v[r])`, bit for bit.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(crate) unsafe fn hsum256x4(v: [__m256; 4]) -> __m128 {
        let pair = |a: __m256, b: __m256| _mm512_insertf32x8::<1>(_mm512_castps256_ps512(a), b);
        hsum256_4(pair(v[0], v[1]), pair(v[2], v[3]))
    }

    /// `hsum256` of the four 8-lane rows in `x` (rows 0, 1) and `y` (rows 2, 3).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum256_4(x: __m512, y: __m512) -> __m128 {
        // 128-bit chunk r: row r's low four lanes (`lo`), its high four (`hi`).
        let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y);
        let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y);
        let s = _mm512_add_ps(lo, hi);
        // Per chunk, as `hsum256`: lanes 0 + 2 and 1 + 3 (`movehl`), then 0 + 1.
        let s = _mm512_add_ps(s, _mm512_permute_ps::<0b11_10_11_10>(s));
        let s = _mm512_add_ps(s, _mm512_movehdup_ps(s));
        _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, s))
    }

    /// A float weight element and its 16-lane widening load, the one place each is written.
    pub(crate) trait Widen: Copy {
        /// The 16 values at `p` as f32; lanes outside `m` are zero and their memory is not read.
        ///
        /// # Safety
        /// The CPU has AVX-512F/BW; the lanes of `m` are readable at `p`.
        unsafe fn load16(p: *const Self, m: __mmask16) -> __m512;
    }

    impl Widen for f16 {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        #[inline]
        unsafe fn load16(p: *const f16, m: __mmask16) -> __m512 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast()))
        }
    }

    impl Widen for bf16 {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        #[inline]
        unsafe fn load16(p: *const bf16, m: __mmask16) -> __m512 {
            let h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }

    impl Widen for f32 {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        #[inline]
        unsafe fn load16(p: *const f32, m: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
    }

    /// Σ w·a over the common length, four accumulators deep, with a masked tail so any length
    /// works.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn float_dot<E: Widen>(w: &[E], a: &[f32]) -> f32 {
        let n = w.len().min(a.len());
        let (w, a) = (w.as_ptr(), a.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let full = !0;
        let mut i = 0;
        while i + 64 <= n {
            for (j, s) in acc.iter_mut().enumerate() {
                let k = i + 16 * j;
                *s = _mm512_fmadd_ps(E::load16(w.add(k), full), _mm512_loadu_ps(a.add(k)), *s);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(E::load16(w.add(i), full), _mm512_loadu_ps(a.add(i)), acc[0]);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            acc[1] = _mm512_fmadd_ps(
                E::load16(w.add(i), m),
                _mm512_maskz_loadu_ps(m, a.add(i)),
                acc[1],
            );
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        hsum(s)
    }

    /// R float weight rows × T f32 token rows, 16 columns per step (masked tail).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    unsafe fn float_micro<E: Widen, const R: usize, const T: usize>(
        w: *const E,
        a: *const f32,
        n: usize,
    ) -> [[f32; T]; R] {
        // Plain loops, no closures: a closure is a separate function that LLVM may
        // leave un-inlined (it did once, after unrelated code moved between codegen
        // units, costing F16 prefill 25 %), and outside this function's target features.
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        // One step of 16 columns from `i` with lane mask `m` (all ones in the main loop,
        // so the loads there are plain).
        macro_rules! step {
            ($i:expr, $m:expr) => {{
                let (i, m): (usize, __mmask16) = ($i, $m);
                // The same columns two tiles ahead (rows 2R.. from here: the tile after next
                // of a matrix-vector product) are requested into L2 now, so they arrive while
                // these are multiplied; a prefetch never faults, past the matrix's end
                // included. docs/kernels.md has the measurements.
                for r in 0..R {
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((2 * R + r) * n + i).cast());
                }
                let mut wv = [_mm512_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = E::load16(w.add(r * n + i), m);
                }
                let mut av = [_mm512_setzero_ps(); T];
                for (t, v) in av.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(m, a.add(t * n + i));
                }
                for r in 0..R {
                    for t in 0..T {
                        acc[r][t] = _mm512_fmadd_ps(wv[r], av[t], acc[r][t]);
                    }
                }
            }};
        }
        let mut i = 0;
        while i + 16 <= n {
            step!(i, !0);
            i += 16;
        }
        if i < n {
            step!(i, ((1u32 << (n - i)) - 1) as u16);
        }
        let mut out = [[0.0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = hsum(acc[r][t]);
            }
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn float_gemm_impl<E: Widen>(
        w: &[E],
        a: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [&mut [f32]],
    ) {
        let m = FloatTile::<E>(std::marker::PhantomData);
        tile::float_gemm::<_, 4>(&m, w, a, n, bias, out)
    }

    /// The float register tile for the shared driver: `float_micro` for the element.
    struct FloatTile<E>(std::marker::PhantomData<E>);
    impl<E: Widen> FloatMicro for FloatTile<E> {
        type E = E;
        #[inline(always)]
        unsafe fn tile<const R: usize, const T: usize>(
            &self,
            w: *const E,
            a: *const f32,
            n: usize,
        ) -> [[f32; T]; R] {
            // SAFETY: the caller's contract (`FloatMicro::tile`) is `float_micro`'s.
            unsafe { float_micro::<E, R, T>(w, a, n) }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Prompts: the outer-product tile (`dot::outer` explains why it gives `float_micro`'s bits).

    /// This level's activation layout: 16 lanes, groups of 14 tokens, panels of 32 rows, laid
    /// out by 16 × 16 transposes.
    pub(crate) const LAYOUT: Layout = Layout {
        group_fn: lay_out_group,
        ..super::super::outer::AVX512
    };

    /// `outer::scalar_group` for 16 lanes (`lanes` must be 16), a 16 × 16 transpose per 16
    /// columns: the tokens' rows are the transpose's rows (zero past `T` and past `n`), and the
    /// first `T` lanes of result `j` are position `(j·steps + s)·T`.
    pub(crate) fn lay_out_group(lanes: usize, x: &[f32], n: usize, out: &mut [f32]) {
        let t_n = x.len() / n;
        let steps = n.div_ceil(16);
        assert!(
            lanes == 16 && (1..=16).contains(&t_n),
            "lay_out: group shape"
        );
        assert_eq!(x.len(), t_n * n, "lay_out: group rows");
        assert_eq!(out.len(), t_n * 16 * steps, "lay_out: group length");
        // SAFETY: LAYOUT, the only place this function is named, is reached only through this
        // level's kernel table, which `cpu::level` selects when the CPU has AVX-512F/BW; the
        // lengths were checked above.
        unsafe { lay_out_group_impl(x.as_ptr(), t_n, n, out.as_mut_ptr()) }
    }

    /// # Safety
    /// The CPU has AVX-512F/BW; `x` holds `t_n ≤ 16` rows of `n` floats and `out`
    /// `t_n · 16 · ⌈n / 16⌉` floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn lay_out_group_impl(x: *const f32, t_n: usize, n: usize, out: *mut f32) {
        let steps = n.div_ceil(16);
        let keep: __mmask16 = ((1u32 << t_n) - 1) as u16;
        for s in 0..steps {
            let rem = n - 16 * s;
            let m: __mmask16 = if rem >= 16 {
                !0
            } else {
                ((1u32 << rem) - 1) as u16
            };
            let v: [__m512; 16] = std::array::from_fn(|t| {
                if t < t_n {
                    _mm512_maskz_loadu_ps(m, x.add(t * n + 16 * s))
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (j, c) in transpose16(v).into_iter().enumerate() {
                _mm512_mask_storeu_ps(out.add((j * steps + s) * t_n), keep, c);
            }
        }
    }

    /// 16 f32 lanes, 64-byte aligned: 16 rows of one packed column.
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct V16([f32; 16]);

    // SAFETY: an array of f32 without padding, valid for every bit pattern.
    unsafe impl crate::Plain for V16 {}

    /// The 16 × 16 transpose: lane j of result c is lane c of `v[j]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(crate) unsafe fn transpose16(v: [__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved, then quads: u[4i + k] holds, in 128-bit lane L, column
        // 4L + k of rows 4i..4i + 4.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (v[i & !1], v[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (q, k) = (i / 4, i % 4);
            let (a, b) = (t[4 * q + k / 2], t[4 * q + k / 2 + 2]);
            if k % 2 == 0 {
                _mm512_shuffle_ps::<0x44>(a, b)
            } else {
                _mm512_shuffle_ps::<0xEE>(a, b)
            }
        });
        // Then the 4 × 4 transpose of 128-bit lanes: column 4L + k gathers lane L of u[k],
        // u[4 + k], u[8 + k], u[12 + k].
        let mut out = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let x0 = _mm512_shuffle_f32x4::<0x44>(u[k], u[4 + k]);
            let x1 = _mm512_shuffle_f32x4::<0xEE>(u[k], u[4 + k]);
            let y0 = _mm512_shuffle_f32x4::<0x44>(u[8 + k], u[12 + k]);
            let y1 = _mm512_shuffle_f32x4::<0xEE>(u[8 + k], u[12 + k]);
            out[k] = _mm512_shuffle_f32x4::<0x88>(x0, y0);
            out[4 + k] = _mm512_shuffle_f32x4::<0xDD>(x0, y0);
            out[8 + k] = _mm512_shuffle_f32x4::<0x88>(x1, y1);
            out[12 + k] = _mm512_shuffle_f32x4::<0xDD>(x1, y1);
        }
        out
    }

    /// Rows `w[..rows]` (≤ 32, `n` columns each) as f32, lane-major: `dst[(j·steps + s)·2 + h]`
    /// is rows 16h.. of column 16s + j, zero for rows past `rows` and columns past `n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    unsafe fn pack_panel<E: Widen>(w: *const E, rows: usize, n: usize, dst: &mut [V16]) {
        let steps = n.div_ceil(16);
        assert!(dst.len() >= 32 * steps, "pack_panel: destination length");
        let d = dst.as_mut_ptr();
        for s in 0..steps {
            let rem = n - 16 * s;
            let m: __mmask16 = if rem >= 16 {
                !0
            } else {
                ((1u32 << rem) - 1) as u16
            };
            for h in 0..2 {
                let v: [__m512; 16] = std::array::from_fn(|i| {
                    let r = 16 * h + i;
                    if r < rows {
                        E::load16(w.add(r * n + 16 * s), m)
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for (j, c) in transpose16(v).into_iter().enumerate() {
                    _mm512_store_ps(d.add((j * steps + s) * 2 + h).cast(), c);
                }
            }
        }
    }

    /// The lanes in the order that adds them in `hsum`'s tree when each sum is merged like a
    /// binary counter: (0 + 8) + (4 + 12), … (bit-reversed indices).
    const LANE_ORDER: [usize; 16] = [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15];

    /// Tokens `dst.t0..dst.t0 + T` (their lane-major group at `a`) times one packed panel
    /// (rows `dst.r0..dst.r0 + dst.nr` of the call), written into `dst`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    unsafe fn outer_tile<const T: usize>(
        panel: &[V16],
        a: *const f32,
        n: usize,
        dst: &mut Dest<'_, '_>,
    ) {
        let steps = n.div_ceil(16);
        // pending[i]: the sum of the 2^i lanes before, while bit i of the lane count is set.
        // Left unset: level i is written (bit i of k set) before it is read (the carry out of
        // bit i), so zeroing it would only cost stores.
        let mut pending = [[[MaybeUninit::<__m512>::uninit(); 2]; T]; 4];
        let mut sum = [[_mm512_setzero_ps(); 2]; T];
        for (k, &j) in LANE_ORDER.iter().enumerate() {
            // Lane j has a column in step s while 16s + j < n.
            let len = if j < n { (n - j).div_ceil(16) } else { 0 };
            let w = panel.as_ptr().add(j * steps * 2);
            let aj = a.add(j * steps * T);
            let mut c = [[_mm512_setzero_ps(); 2]; T];
            for s in 0..len {
                let w0 = _mm512_load_ps(w.add(2 * s).cast());
                let w1 = _mm512_load_ps(w.add(2 * s + 1).cast());
                for (t, ct) in c.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*aj.add(s * T + t));
                    ct[0] = _mm512_fmadd_ps(w0, b, ct[0]);
                    ct[1] = _mm512_fmadd_ps(w1, b, ct[1]);
                }
            }
            let mut level = 0;
            while (k >> level) & 1 == 1 {
                for (ct, pt) in c.iter_mut().zip(&pending[level]) {
                    // SAFETY: level `level` was written when bit `level` of k was set, and is
                    // read here, at the carry out of that bit, before anything overwrites it.
                    let (p0, p1) = unsafe { (pt[0].assume_init(), pt[1].assume_init()) };
                    ct[0] = _mm512_add_ps(p0, ct[0]);
                    ct[1] = _mm512_add_ps(p1, ct[1]);
                }
                level += 1;
            }
            match pending.get_mut(level) {
                Some(p) => {
                    for (pt, ct) in p.iter_mut().zip(&c) {
                        *pt = [MaybeUninit::new(ct[0]), MaybeUninit::new(ct[1])];
                    }
                }
                None => sum = c,
            }
        }
        for (h, r) in [0, 16].into_iter().enumerate().filter(|&(_, r)| r < dst.nr) {
            let k = dst.nr - r;
            let m: __mmask16 = if k >= 16 {
                !0
            } else {
                ((1u32 << k) - 1) as u16
            };
            let b = match dst.bias {
                Some(b) => _mm512_maskz_loadu_ps(m, b.as_ptr().add(dst.r0 + r)),
                None => _mm512_setzero_ps(),
            };
            for (t, st) in sum.iter().enumerate() {
                let v = _mm512_add_ps(st[h], b);
                _mm512_mask_storeu_ps(dst.out[dst.t0 + t].as_mut_ptr().add(dst.r0 + r), m, v);
            }
        }
    }

    /// The outer-product tile of this level for the shared driver (`outer::gemm`).
    struct Outer<E>(std::marker::PhantomData<E>);
    impl<E: Widen> OuterMicro for Outer<E> {
        type E = E;
        type V = V16;
        const LAYOUT: Layout = LAYOUT;
        #[inline(always)]
        unsafe fn pack(w: *const E, rows: usize, n: usize, dst: &mut [V16]) {
            // SAFETY: the caller's contract (`OuterMicro::pack`) is `pack_panel`'s.
            unsafe { pack_panel(w, rows, n, dst) }
        }
        #[inline(always)]
        unsafe fn tile(nt: usize, panel: &[V16], a: *const f32, n: usize, dst: &mut Dest<'_, '_>) {
            macro_rules! go {
                ($($t:literal)*) => {
                    match nt {
                        // SAFETY: the caller's contract (`OuterMicro::tile`) is `outer_tile`'s.
                        $($t => unsafe { outer_tile::<$t>(panel, a, n, dst) },)*
                        _ => unreachable!("1 ≤ nt ≤ LAYOUT.group = 14"),
                    }
                };
            }
            go!(1 2 3 4 5 6 7 8 9 10 11 12 13 14)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn outer_gemm_impl<E: Widen>(
        w: &[E],
        a: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [&mut [f32]],
    ) {
        // SAFETY: the caller's contract is the driver's.
        unsafe { super::super::outer::gemm::<Outer<E>>(w, a, n, bias, out) }
    }

    super::super::entry_points! { "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c";
        gemm f16_gemm = float_gemm_impl(f16, f32);
        gemm bf16_gemm = float_gemm_impl(bf16, f32);
        gemm f32_gemm = float_gemm_impl(f32, f32);
        outer f16_outer = outer_gemm_impl(f16) in LAYOUT;
        outer bf16_outer = outer_gemm_impl(bf16) in LAYOUT;
        outer f32_outer = outer_gemm_impl(f32) in LAYOUT;
        dot f16_f32 = float_dot(f16, f32);
        dot bf16_f32 = float_dot(bf16, f32);
        dot f32_f32 = float_dot(f32, f32);
    }
}

macro_rules! avx512_family {
    ($name:ident, $features:literal, $ops:ident) => {
        pub(crate) mod $name {
            use super::float::{hsum, hsum256, hsum256x4, hsum4};
            use super::$ops::{dp, dp_full, q8_pair};
            use super::*;
            use std::arch::x86_64::*;

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn load(p: *const u8) -> __m512i {
                _mm512_loadu_si512(p.cast())
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn f16_to_f32(h: f16) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
            }

            /// Σ over the superblock of scale(group) · Σ_group w·a, as 16 i32 lanes.
            /// `w`: the 256 unsigned values in element order; `a`: the Q8_K bytes;
            /// `s01`/`s23`: group scales laid out for `packs(D0,D1)`/`packs(D2,D3)`.
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn superblock(
                w: &[__m512i; 4],
                a: *const i8,
                s01: __m512i,
                s23: __m512i,
            ) -> __m512i {
                let z = _mm512_setzero_si512();
                let d0 = dp(z, w[0], load(a.cast()));
                let d1 = dp(z, w[1], load(a.add(64).cast()));
                let d2 = dp(z, w[2], load(a.add(128).cast()));
                let d3 = dp(z, w[3], load(a.add(192).cast()));
                let p01 = _mm512_madd_epi16(_mm512_packs_epi32(d0, d1), s01);
                let p23 = _mm512_madd_epi16(_mm512_packs_epi32(d2, d3), s23);
                _mm512_add_epi32(p01, p23)
            }

            /// The nibbles of `qs` in nibble order (`nibble_elem`): the low and the high nibbles
            /// of each 64-byte load, each in the low 4 bits of a byte, the upper 4 bits not yet
            /// cleared.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn nibbles_unmasked(qs: &[u8; 128]) -> [__m512i; 4] {
                let qa = load(qs.as_ptr());
                let qb = load(qs.as_ptr().add(64));
                [
                    qa,
                    _mm512_srli_epi16::<4>(qa),
                    qb,
                    _mm512_srli_epi16::<4>(qb),
                ]
            }

            /// Nibble order to element order: a 32-byte chunk's low nibbles are elements
            /// 64c..64c+32, its high nibbles the next 32, so interleave the 256-bit halves.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn element_order([la, ha, lb, hb]: [__m512i; 4]) -> [__m512i; 4] {
                [
                    _mm512_shuffle_i64x2::<0x44>(la, ha),
                    _mm512_shuffle_i64x2::<0xee>(la, ha),
                    _mm512_shuffle_i64x2::<0x44>(lb, hb),
                    _mm512_shuffle_i64x2::<0xee>(lb, hb),
                ]
            }

            /// Q4_K values in nibble order.
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn nibbles_q4k(qs: &[u8; 128]) -> [__m512i; 4] {
                let m = _mm512_set1_epi8(0x0f);
                nibbles_unmasked(qs).map(|v| _mm512_and_si512(v, m))
            }

            /// Q4_K values in element order (see the module comment).
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn unpack_q4k(qs: &[u8; 128]) -> [__m512i; 4] {
                element_order(nibbles_q4k(qs))
            }

            /// Q5_K values from unmasked nibbles `w`: the low 4 bits of each byte, plus 16 where
            /// the element's `qh` bit is set. Element e uses bit e/32 of `qh[e % 32]`; `w[c]`
            /// holds elements whose bit is `bits[c].0` in its low 256 bits and `bits[c].1` in its
            /// high ones. Per vector a bit test, a zero-masked 16 and one select.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn with_q5k_bits(
                w: [__m512i; 4],
                qh: &[u8; 32],
                bits: [(u8, u8); 4],
            ) -> [__m512i; 4] {
                let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(qh.as_ptr().cast()));
                let (m4, sixteen) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(16));
                let mut out = w;
                for (o, (lo, hi)) in out.iter_mut().zip(bits) {
                    let lo = _mm256_set1_epi8((1u8 << lo) as i8);
                    let hi = _mm256_set1_epi8((1u8 << hi) as i8);
                    let bit = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    let fifth = _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(h, bit), sixteen);
                    // 0xE4: m4 ? nibble bits : fifth bit, bit by bit.
                    *o = _mm512_ternarylogic_epi32::<0xE4>(*o, fifth, m4);
                }
                out
            }

            /// Q5_K values in element order: `w[c]` is elements 64c..64c+64.
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn unpack_q5k(qs: &[u8; 128], qh: &[u8; 32]) -> [__m512i; 4] {
                let w = element_order(nibbles_unmasked(qs));
                with_q5k_bits(w, qh, [(0, 1), (2, 3), (4, 5), (6, 7)])
            }

            /// Q5_K values in nibble order (`nibble_elem`).
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn nibbles_q5k(qs: &[u8; 128], qh: &[u8; 32]) -> [__m512i; 4] {
                with_q5k_bits(nibbles_unmasked(qs), qh, [(0, 2), (1, 3), (4, 6), (5, 7)])
            }

            /// Q6_K 6-bit values (0..63, i.e. before the −32 offset) in element order.
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn unpack_q6k(ql: &[u8; 128], qh: &[u8; 64]) -> [__m512i; 4] {
                let m4 = _mm512_set1_epi8(0x0f);
                let m33 = _mm512_set1_epi8(0x33);
                let half = |h: usize| {
                    let l = load(ql.as_ptr().add(64 * h));
                    let q = _mm256_loadu_si256(qh.as_ptr().add(32 * h).cast());
                    // [qh | qh >> 2]: bits 0-1 then 4-5 of each half feed the four 32-value runs;
                    // keep only those (0x33), so that bits 6-7 of both results are zero.
                    let x = _mm512_and_si512(
                        _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(q),
                            _mm256_srli_epi16::<2>(q),
                        ),
                        m33,
                    );
                    // 0xE4: m4 ? low bits : high bits, bit by bit. The 16-bit shifts carry bits
                    // across bytes only into the bits m4 takes from the other operand.
                    let lo = _mm512_ternarylogic_epi32::<0xE4>(l, _mm512_slli_epi16::<4>(x), m4);
                    let hi = _mm512_ternarylogic_epi32::<0xE4>(_mm512_srli_epi16::<4>(l), x, m4);
                    (lo, hi)
                };
                let (w0, w1) = half(0);
                let (w2, w3) = half(1);
                [w0, w1, w2, w3]
            }

            /// Group scales for `superblock` from 16 i16 values (see `PERM*`).
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn group_scales(
                v16: __m256i,
                p01: &[u16; 32],
                p23: &[u16; 32],
            ) -> (__m512i, __m512i) {
                let v = _mm512_zextsi256_si512(v16);
                (
                    _mm512_permutexvar_epi16(_mm512_loadu_si512(p01.as_ptr().cast()), v),
                    _mm512_permutexvar_epi16(_mm512_loadu_si512(p23.as_ptr().cast()), v),
                )
            }

            /// Q4_K/Q5_K: (scales for `superblock`, per-group mins as 16 i16) from the block's
            /// first 16 bytes at `head` (`d`, `dmin`, then the 12 packed scale bytes). The 16
            /// values of `scales_mins_bytes` are formed as i16 lanes: a byte shuffle puts each
            /// value's low-bits byte low and the byte with its top 2 bits high, then
            /// `t >> K4_SHIFT` gives the low bits where `K4_MASK` is set and `t >> 10` (the top
            /// 2 bits land on bits 4–5) the rest: 7 vector instructions where unpacking the
            /// bytes with 128-bit shifts and masks took 13 (the decode kernel ran 8 % faster in
            /// cache). The scales are laid out by `p01`/`p23` (`PERM4_*` for values in element
            /// order, `PERM4N_*` for nibble order).
            /// Safety: `head` points at a `BlockQ4K` or `BlockQ5K` (both begin `d`, `dmin`,
            /// `scales`), so its 16 bytes are readable.
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn k4_scales(
                head: *const u8,
                p01: &[u16; 32],
                p23: &[u16; 32],
            ) -> (__m512i, __m512i, __m256i) {
                let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(head.cast()));
                let t = _mm256_shuffle_epi8(v, _mm256_loadu_si256(K4_PICK.as_ptr().cast()));
                let lo = _mm256_srlv_epi16(t, _mm256_loadu_si256(K4_SHIFT.as_ptr().cast()));
                let hi = _mm256_srli_epi16::<10>(t);
                let mask = _mm256_loadu_si256(K4_MASK.as_ptr().cast());
                // 0xE4: mask ? lo : hi, bit by bit.
                let v16 = _mm256_ternarylogic_epi32::<0xE4>(lo, hi, mask);
                let (s01, s23) = group_scales(v16, p01, p23);
                let mins =
                    _mm256_permutexvar_epi16(_mm256_loadu_si256(PERM4_MINS.as_ptr().cast()), v16);
                (s01, s23, mins)
            }

            /// Q6_K: (scales for `superblock`, the 16 signed group scales as i16).
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn k6_scales(s: &[i8; 16]) -> (__m512i, __m512i, __m256i) {
                let v16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(s.as_ptr().cast()));
                let (s01, s23) = group_scales(v16, &PERM6_01, &PERM6_23);
                (s01, s23, v16)
            }

            /// Σ_g m_g · bsums_g as 8 i32 lanes.
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn min_sums(m16: __m256i, bsums: &[i16; 16]) -> __m256i {
                _mm256_madd_epi16(m16, _mm256_loadu_si256(bsums.as_ptr().cast()))
            }

            /// `(y_d·d, y_d·dmin)` of a Q4_K/Q5_K superblock, broadcast to 16 and 8 lanes. `dd`
            /// points at the block, which starts with the f16 `d` and `dmin` (both converted by
            /// one `vcvtph2ps`; the products round exactly as the scalar `y_d * d`). The
            /// products are broadcast from memory (`in_memory`).
            /// Safety: `dd` points at a `BlockQ4K` or `BlockQ5K` (its first 8 bytes are read).
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn k4_dmin(dd: *const u8, y_d: f32) -> (__m512, __m256) {
                // Eight bytes (`d`, `dmin` and two scale bytes): `vcvtph2ps` reads them from
                // memory, with no instruction to move them into a register first.
                let f = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64(dd.cast())), _mm_set1_ps(y_d));
                let mut slot = [0f32; 4];
                _mm_storeu_ps(slot.as_mut_ptr(), f);
                let slot = in_memory(&slot);
                (_mm512_set1_ps(slot[0]), _mm256_set1_ps(slot[1]))
            }

            /// Q6_K values were taken as 0..63: apply their −32 offset, −32·Σ_g sc_g·Σ_group a,
            /// in integers so the result stays exact (|·| < 2.7e8 < 2³¹).
            #[target_feature(enable = $features)]
            #[inline]
            pub(crate) unsafe fn q6k_offset(
                isum: __m512i,
                sc16: __m256i,
                bsums: &[i16; 16],
            ) -> __m512i {
                let off = _mm256_slli_epi32::<5>(min_sums(sc16, bsums));
                _mm512_sub_epi32(isum, _mm512_zextsi256_si512(off))
            }

            /// A Q4_K/Q5_K row (`B`) times a token: its 16-lane sum and 8-lane min accumulators
            /// (the row dot is `hsum(sum) − hsum256(min)`). `values` gives a superblock's 256
            /// values in the layout the scale gathers `p01`/`p23` follow, and `act(i, y)` the
            /// token's values of superblock `i` (Q8_K block `y`) in that same order.
            /// Safety: `B` is `BlockQ4K` or `BlockQ5K` (both begin with `d`, `dmin` and the 12
            /// scale bytes, read through the block's address); `act` returns 256 readable bytes.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn k4_acc<B>(
                row: &[B],
                a: &[BlockQ8K],
                values: impl Fn(&B) -> [__m512i; 4],
                act: impl Fn(usize, &BlockQ8K) -> *const i8,
                p01: &[u16; 32],
                p23: &[u16; 32],
            ) -> (__m512, __m256) {
                let mut acc = _mm512_setzero_ps();
                let mut acc_min = _mm256_setzero_ps();
                for (i, (x, y)) in row.iter().zip(a).enumerate() {
                    prefetch_blocks(x);
                    let head = (x as *const B).cast::<u8>();
                    let (s01, s23, mins) = k4_scales(head, p01, p23);
                    let isum = superblock(&values(x), act(i, y), s01, s23);
                    let imin = min_sums(mins, &y.bsums);
                    let (d, dmin) = k4_dmin(head, y.d);
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc);
                    acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin), dmin, acc_min);
                }
                (acc, acc_min)
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4k_q8k_impl(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
                // SAFETY (closure): `x` is a whole block.
                let values = |x: &BlockQ4K| unsafe { unpack_q4k(&x.qs) };
                let act = |_, y: &BlockQ8K| y.qs.as_ptr();
                let (acc, acc_min) = k4_acc(w, a, values, act, &PERM4_01, &PERM4_23);
                hsum(acc) - hsum256(acc_min)
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q5k_q8k_impl(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
                // SAFETY (closure): `x` is a whole block.
                let values = |x: &BlockQ5K| unsafe { unpack_q5k(&x.qs, &x.qh) };
                let act = |_, y: &BlockQ8K| y.qs.as_ptr();
                let (acc, acc_min) = k4_acc(w, a, values, act, &PERM4_01, &PERM4_23);
                hsum(acc) - hsum256(acc_min)
            }

            /// The Q8_K values of `a` in nibble order (`nibble_elem`: per 128 values 0–31,
            /// 64–95, 32–63, 96–127), into `out`, which holds at least `a.len()` blocks.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn nibble_order(a: &[BlockQ8K], out: *mut NibbleQs) {
                for (i, y) in a.iter().enumerate() {
                    let (q, o) = (y.qs.as_ptr().cast::<u8>(), out.add(i).cast::<u8>());
                    for half in [0, 128] {
                        let (x0, x1) = (load(q.add(half)), load(q.add(half + 64)));
                        let lo = _mm512_inserti64x4::<1>(x0, _mm512_castsi512_si256(x1));
                        let hi = _mm512_shuffle_i64x2::<0xee>(x0, x1);
                        _mm512_store_si512(o.add(half).cast(), lo);
                        _mm512_store_si512(o.add(half + 64).cast(), hi);
                    }
                }
            }

            /// Decode for Q4_K/Q5_K (`B`): every row of `w` (`a.len()` blocks each) dotted with
            /// `a`, bit for bit `dot` of the row. The token's values are put in nibble order once
            /// per call (rows up to `NIBBLE_ROW_MAX_BLOCKS` blocks; longer ones run `dot`), so
            /// `nibbles` (a superblock's values in that order) needs no shuffle; the scales
            /// follow `PERM4N_*`, and each row's accumulator is put back in element order before
            /// its horizontal sum.
            /// Safety: `B` is `BlockQ4K` or `BlockQ5K` (both begin with `d`, `dmin` and the 12
            /// scale bytes, read through the block's address); `w` is `out.len()` rows of
            /// `a.len()` blocks.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn k4_rows<B>(
                w: &[B],
                a: &[BlockQ8K],
                out: &mut [f32],
                nibbles: impl Fn(&B) -> [__m512i; 4],
                dot: unsafe fn(&[B], &[BlockQ8K]) -> f32,
            ) {
                let n = a.len();
                if n > NIBBLE_ROW_MAX_BLOCKS {
                    for (o, row) in out.iter_mut().zip(w.chunks_exact(n)) {
                        *o = dot(row, a);
                    }
                    return;
                }
                let mut buf = std::mem::MaybeUninit::<[NibbleQs; NIBBLE_ROW_MAX_BLOCKS]>::uninit();
                let aq = buf.as_mut_ptr().cast::<NibbleQs>();
                nibble_order(a, aq);
                let to_element = _mm512_loadu_si512(NIBBLE_TO_ELEMENT_LANES.as_ptr().cast());
                // SAFETY (closure): `k4_acc` asks for i < a.len() ≤ NIBBLE_ROW_MAX_BLOCKS, a
                // block of `buf` that `nibble_order` filled.
                let act = |i: usize, _: &BlockQ8K| unsafe { aq.add(i).cast::<i8>().cast_const() };
                rows4::<B, true>(w, n, out, |row| {
                    let (acc, acc_min) = k4_acc(row, a, &nibbles, act, &PERM4N_01, &PERM4N_23);
                    (_mm512_permutexvar_ps(to_element, acc), acc_min)
                })
            }

            /// Decode's loop over the rows of `w` (`n` blocks each): `row` gives a row's two
            /// accumulators, and `out` gets `hsum(acc)`, minus `hsum256(acc_min)` if `MINS`,
            /// for four rows at once (`hsum4`), a last 1–3 rows one by one.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn rows4<B, const MINS: bool>(
                w: &[B],
                n: usize,
                out: &mut [f32],
                row: impl Fn(&[B]) -> (__m512, __m256),
            ) {
                for (o, w4) in out.chunks_mut(4).zip(w.chunks(4 * n)) {
                    let mut accs = [_mm512_setzero_ps(); 4];
                    let mut acc_mins = [_mm256_setzero_ps(); 4];
                    for (r, x) in w4.chunks_exact(n).enumerate() {
                        // `row` keeps its accumulators in registers; indexing `accs` there
                        // would keep the chain in memory, a store and a load per superblock.
                        (accs[r], acc_mins[r]) = row(x);
                    }
                    if let Ok(o4) = <&mut [f32; 4]>::try_from(&mut *o) {
                        let mut sums = hsum4(accs);
                        if MINS {
                            sums = _mm_sub_ps(sums, hsum256x4(acc_mins));
                        }
                        _mm_storeu_ps(o4.as_mut_ptr(), sums);
                    } else {
                        for (r, or) in o.iter_mut().enumerate() {
                            *or = hsum(accs[r]);
                            if MINS {
                                *or -= hsum256(acc_mins[r]);
                            }
                        }
                    }
                }
            }

            /// Decode rows for Q4_K (`k4_rows`).
            /// Safety: `w` is `out.len()` rows of `a.len()` blocks.
            #[target_feature(enable = $features)]
            unsafe fn q4k_rows_impl(w: &[BlockQ4K], a: &[BlockQ8K], out: &mut [f32]) {
                // SAFETY (closure): the caller's contract; `x` is a whole block.
                let nibbles = |x: &BlockQ4K| unsafe { nibbles_q4k(&x.qs) };
                k4_rows(w, a, out, nibbles, q4k_q8k_impl)
            }

            /// Decode rows for Q5_K (`k4_rows`).
            /// Safety: as `q4k_rows_impl`.
            #[target_feature(enable = $features)]
            unsafe fn q5k_rows_impl(w: &[BlockQ5K], a: &[BlockQ8K], out: &mut [f32]) {
                // SAFETY (closure): as in `q4k_rows_impl`.
                let nibbles = |x: &BlockQ5K| unsafe { nibbles_q5k(&x.qs, &x.qh) };
                k4_rows(w, a, out, nibbles, q5k_q8k_impl)
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q6k_q8k_impl(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
                hsum(q6k_acc(w, a))
            }

            /// A Q6_K row's 16-lane accumulator (`q6k_q8k_impl` is its horizontal sum).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q6k_acc(w: &[BlockQ6K], a: &[BlockQ8K]) -> __m512 {
                let mut acc = _mm512_setzero_ps();
                for (x, y) in w.iter().zip(a) {
                    prefetch_blocks(x);
                    let (s01, s23, sc16) = k6_scales(&x.scales);
                    let isum = superblock(&unpack_q6k(&x.ql, &x.qh), y.qs.as_ptr(), s01, s23);
                    let d = y.d * f16_to_f32(x.d);
                    acc = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(q6k_offset(isum, sc16, &y.bsums)),
                        _mm512_set1_ps(d),
                        acc,
                    );
                }
                acc
            }

            /// Decode rows for Q6_K, four rows summed at once (`rows4`).
            /// Safety: `w` is `out.len()` rows of `a.len()` blocks.
            #[target_feature(enable = $features)]
            unsafe fn q6k_rows_impl(w: &[BlockQ6K], a: &[BlockQ8K], out: &mut [f32]) {
                // SAFETY (closure): the caller's contract; `x` is one whole row.
                let row = |x: &[BlockQ6K]| unsafe { (q6k_acc(x, a), _mm256_setzero_ps()) };
                rows4::<BlockQ6K, false>(w, a.len(), out, row)
            }

            /// Q8_0 · Q8_0 for `R` weight rows (each `a.len()` blocks) and one activation row:
            /// eight blocks per step (four 64-byte pairs), so that the sixteen f16 scales convert
            /// in two instructions; `q8_pair` gives exact i32 sums with lanes 0..8 from the first
            /// block of a pair and 8..16 from the second. A row's arithmetic is the same whatever
            /// `R` is. One row is a chain of dependent FMAs that leaves the core waiting on
            /// latency; two rows give two chains and load each activation pair once.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q8_0_q8_0_impl<const R: usize>(
                w: [&[BlockQ8_0]; R],
                a: &[BlockQ8_0],
            ) -> [f32; R] {
                let w = w.map(|r| &r[..a.len()]);
                let mut acc = [_mm512_setzero_ps(); R];
                let pair = |x: &[BlockQ8_0]| {
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(x[0].qs.as_ptr().cast())),
                        _mm256_loadu_si256(x[1].qs.as_ptr().cast()),
                    )
                };
                let scales = |x: &[BlockQ8_0]| {
                    // Four f16 scales packed into each of two general registers (shifts and
                    // ors on the integer ports), not eight lane inserts on the shuffle port.
                    let q = |k: usize| {
                        (0..4).fold(0u64, |v, i| {
                            v | (x[4 * k + i].d.to_bits() as u64) << (16 * i)
                        })
                    };
                    let h = _mm_insert_epi64::<1>(_mm_cvtsi64_si128(q(0) as i64), q(1) as i64);
                    _mm256_cvtph_ps(h)
                };
                let groups = a.len() / 8;
                for g in 0..groups {
                    let y = &a[8 * g..8 * g + 8];
                    let ys = scales(y);
                    let yv: [__m512i; 4] = std::array::from_fn(|p| pair(&y[2 * p..]));
                    for r in 0..R {
                        let x = &w[r][8 * g..8 * g + 8];
                        prefetch_blocks(x);
                        let d = _mm512_castps256_ps512(_mm256_mul_ps(scales(x), ys));
                        for (p, yp) in yv.iter().enumerate() {
                            let s = q8_pair(pair(&x[2 * p..]), *yp);
                            let idx = _mm512_set1_epi32(2 * p as i32);
                            let idx = _mm512_mask_add_epi32(idx, 0xff00, idx, _mm512_set1_epi32(1));
                            acc[r] = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(s),
                                _mm512_permutexvar_ps(idx, d),
                                acc[r],
                            );
                        }
                    }
                }
                std::array::from_fn(|r| {
                    let mut sum = hsum(acc[r]);
                    let tail = w[r][8 * groups..].iter().zip(&a[8 * groups..]);
                    for (x, y) in tail {
                        let p = _mm512_madd_epi16(
                            _mm512_cvtepi8_epi16(_mm256_loadu_si256(x.qs.as_ptr().cast())),
                            _mm512_cvtepi8_epi16(_mm256_loadu_si256(y.qs.as_ptr().cast())),
                        );
                        sum +=
                            f16_to_f32(x.d) * f16_to_f32(y.d) * _mm512_reduce_add_epi32(p) as f32;
                    }
                    sum
                })
            }

            // ---------------------------------------------------------------------------
            // Multi-token (prefill) kernels: packing and register tiles.

            /// Element order (vector s = groups 4s..4s+3, four dwords each) to tile order
            /// (vector k, lane g = dword k of group g): a 16×4 dword transpose.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn to_tile_order(v: [__m512i; 4]) -> [__m512i; 4] {
                let mut out = [_mm512_setzero_si512(); 4];
                for (k, o) in out.iter_mut().enumerate() {
                    // Lanes 0..8 gather dword k of groups 0..8 from (v0, v1); likewise for
                    // groups 8..16 from (v2, v3); then the two halves are joined.
                    let idx: [i32; 16] =
                        std::array::from_fn(|g| ((g % 8) / 4 * 16 + 4 * (g % 4) + k) as i32);
                    let idx = _mm512_loadu_si512(idx.as_ptr().cast());
                    let t01 = _mm512_permutex2var_epi32(v[0], idx, v[1]);
                    let t23 = _mm512_permutex2var_epi32(v[2], idx, v[3]);
                    *o = _mm512_shuffle_i64x2::<0x44>(t01, t23);
                }
                out
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn store_packed(p: &mut KPacked, v: [__m512i; 4], ws: __m512, wm: __m512) {
                let t = to_tile_order(v);
                for (k, tk) in t.iter().enumerate() {
                    _mm512_storeu_si512(p.qs.as_mut_ptr().add(64 * k).cast(), *tk);
                }
                _mm512_storeu_ps(p.ws.as_mut_ptr(), ws);
                _mm512_storeu_ps(p.wm.as_mut_ptr(), wm);
            }

            /// Per-group f32 factors for Q4_K/Q5_K: (d·sc_g, dmin·m_g), sub-block j = groups 2j, 2j+1.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn k4_factors(s: &[u8; 12], d: f16, dmin: f16) -> (__m512, __m512) {
                let b = scales_mins_bytes(s);
                let v16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(b.as_ptr().cast()));
                let sc_idx: [u16; 16] = std::array::from_fn(|g| (g / 2) as u16);
                let mn_idx: [u16; 16] = std::array::from_fn(|g| (8 + g / 2) as u16);
                let per_group = |idx: &[u16; 16]| {
                    let v = _mm256_permutexvar_epi16(_mm256_loadu_si256(idx.as_ptr().cast()), v16);
                    _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(v))
                };
                (
                    _mm512_mul_ps(per_group(&sc_idx), _mm512_set1_ps(f16_to_f32(d))),
                    _mm512_mul_ps(per_group(&mn_idx), _mm512_set1_ps(f16_to_f32(dmin))),
                )
            }

            #[target_feature(enable = $features)]
            unsafe fn pack_q4k_impl(row: &[BlockQ4K], out: &mut [KPacked]) {
                for (x, p) in row.iter().zip(out.iter_mut()) {
                    prefetch_blocks(x);
                    let (ws, wm) = k4_factors(&x.scales, x.d, x.dmin);
                    store_packed(p, unpack_q4k(&x.qs), ws, wm);
                }
            }

            #[target_feature(enable = $features)]
            unsafe fn pack_q5k_impl(row: &[BlockQ5K], out: &mut [KPacked]) {
                for (x, p) in row.iter().zip(out.iter_mut()) {
                    prefetch_blocks(x);
                    let (ws, wm) = k4_factors(&x.scales, x.d, x.dmin);
                    store_packed(p, unpack_q5k(&x.qs, &x.qh), ws, wm);
                }
            }

            #[target_feature(enable = $features)]
            unsafe fn pack_q6k_impl(row: &[BlockQ6K], out: &mut [KPacked]) {
                for (x, p) in row.iter().zip(out.iter_mut()) {
                    prefetch_blocks(x);
                    let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        x.scales.as_ptr().cast(),
                    )));
                    let d = f16_to_f32(x.d);
                    // The 0..63 values carry a −32 offset: wm = 32·d·sc_g (32·d is exact).
                    let ws = _mm512_mul_ps(sc, _mm512_set1_ps(d));
                    let wm = _mm512_mul_ps(sc, _mm512_set1_ps(32.0 * d));
                    store_packed(p, unpack_q6k(&x.ql, &x.qh), ws, wm);
                }
            }

            /// Q8_0 row → tiles of 16 blocks: block b's dword k to lane b of vector k, as
            /// `w + 128`; scales to f32. Gathers (stride 34 bytes) skip padding lanes.
            #[target_feature(enable = $features)]
            unsafe fn pack_q8_0_impl(row: &[BlockQ8_0], out: &mut [Q8_0Packed]) {
                let base = row.as_ptr().cast::<u8>();
                let flip = _mm512_set1_epi8(-128);
                for (i, p) in out.iter_mut().enumerate() {
                    let first = 16 * i;
                    prefetch_ahead(base.wrapping_add(34 * first), 16 * 34);
                    let nblk = row.len().saturating_sub(first).min(16);
                    let m: __mmask16 = ((1u32 << nblk) - 1) as u16;
                    let blk = _mm512_mullo_epi32(
                        _mm512_add_epi32(
                            _mm512_set1_epi32(first as i32),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                        ),
                        _mm512_set1_epi32(34),
                    );
                    for k in 0..8 {
                        let off = _mm512_add_epi32(blk, _mm512_set1_epi32(2 + 4 * k as i32));
                        let v = _mm512_mask_i32gather_epi32::<1>(
                            _mm512_setzero_si512(),
                            m,
                            off,
                            base.cast(),
                        );
                        _mm512_storeu_si512(
                            p.qs.as_mut_ptr().add(64 * k).cast(),
                            _mm512_xor_si512(v, flip),
                        );
                    }
                    let dv = _mm512_mask_i32gather_epi32::<1>(
                        _mm512_setzero_si512(),
                        m,
                        blk,
                        base.cast(),
                    );
                    let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(
                        dv,
                        _mm512_set1_epi32(0xffff),
                    )));
                    _mm512_storeu_ps(p.d.as_mut_ptr(), d);
                }
            }

            /// One packed K-quant row × T tokens. `w`: the row's `n` superblocks; `a`: token
            /// 0's `n` tiles, token t's at `a + t·n`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn kq_micro<const T: usize>(
                w: *const KPacked,
                a: *const Q8KTile,
                n: usize,
            ) -> [f32; T] {
                let mut acc = [_mm512_setzero_ps(); T];
                for s in 0..n {
                    let p = &*w.add(s);
                    let wq = p.qs.as_ptr();
                    let wv = [
                        load(wq),
                        load(wq.add(64)),
                        load(wq.add(128)),
                        load(wq.add(192)),
                    ];
                    let ws = _mm512_loadu_ps(p.ws.as_ptr());
                    let wm = _mm512_loadu_ps(p.wm.as_ptr());
                    for (t, acc_t) in acc.iter_mut().enumerate() {
                        let at = &*a.add(t * n + s);
                        let q = at.qs.as_ptr().cast::<u8>();
                        let z = _mm512_setzero_si512();
                        // Lane g: Σ over group g (exact i32); two chains for latency.
                        let i01 = dp(dp(z, wv[0], load(q)), wv[1], load(q.add(64)));
                        let i23 = dp(dp(z, wv[2], load(q.add(128))), wv[3], load(q.add(192)));
                        let f = _mm512_mul_ps(
                            _mm512_cvtepi32_ps(_mm512_add_epi32(i01, i23)),
                            _mm512_set1_ps(at.d),
                        );
                        *acc_t = _mm512_fmadd_ps(f, ws, *acc_t);
                        *acc_t = _mm512_fnmadd_ps(wm, _mm512_loadu_ps(at.bsd.as_ptr()), *acc_t);
                    }
                }
                acc.map(|v| hsum(v))
            }

            /// One packed Q8_0 row × T tokens; `n` tiles per row.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q8_0_micro<const T: usize>(
                w: *const Q8_0Packed,
                a: *const Q8_0Tile,
                n: usize,
            ) -> [f32; T] {
                let mut acc = [_mm512_setzero_ps(); T];
                for g in 0..n {
                    let p = &*w.add(g);
                    let wq = p.qs.as_ptr();
                    let mut wv = [_mm512_setzero_si512(); 8];
                    for (k, v) in wv.iter_mut().enumerate() {
                        *v = load(wq.add(64 * k)); // a loop, not a closure: see float_micro
                    }
                    let dw = _mm512_loadu_ps(p.d.as_ptr());
                    for (t, acc_t) in acc.iter_mut().enumerate() {
                        let at = &*a.add(t * n + g);
                        let q = at.qs.as_ptr().cast::<u8>();
                        // Lane b: Σ_block (w+128)·a − 128·Σ a = Σ w·a, exactly.
                        let mut i0 = _mm512_loadu_si512(at.ncorr.as_ptr().cast());
                        let mut i1 = _mm512_setzero_si512();
                        for k in 0..4 {
                            i0 = dp_full(i0, wv[k], load(q.add(64 * k)));
                            i1 = dp_full(i1, wv[k + 4], load(q.add(64 * (k + 4))));
                        }
                        let f = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
                        *acc_t = _mm512_fmadd_ps(
                            f,
                            _mm512_mul_ps(dw, _mm512_loadu_ps(at.d.as_ptr())),
                            *acc_t,
                        );
                    }
                }
                acc.map(|v| hsum(v))
            }

            /// Tokens per register tile of the quantized kernels.
            const NT: usize = 4;

            // The safe entry points (`dot::entry_points` states why they are sound).
            crate::dot::entry_points! { $features;
                tile kq_gemm = kq_gemm_impl: kq_micro(KPacked, Q8KTile) x NT;
                tile q8_0_gemm = q8_0_gemm_impl: q8_0_micro(Q8_0Packed, Q8_0Tile) x NT;
                pack pack_q4k = pack_q4k_impl(BlockQ4K => KPacked, crate::dot::same);
                pack pack_q5k = pack_q5k_impl(BlockQ5K => KPacked, crate::dot::same);
                pack pack_q6k = pack_q6k_impl(BlockQ6K => KPacked, crate::dot::same);
                pack pack_q8_0 = pack_q8_0_impl(BlockQ8_0 => Q8_0Packed, crate::act::q8_0_tiles);
                dot q4k_q8k = q4k_q8k_impl(BlockQ4K, BlockQ8K);
                dot q5k_q8k = q5k_q8k_impl(BlockQ5K, BlockQ8K);
                dot q6k_q8k = q6k_q8k_impl(BlockQ6K, BlockQ8K);
                rows_fn q4k_rows = q4k_rows_impl(BlockQ4K, BlockQ8K);
                rows_fn q5k_rows = q5k_rows_impl(BlockQ5K, BlockQ8K);
                rows_fn q6k_rows = q6k_rows_impl(BlockQ6K, BlockQ8K);
                rows q8_0_q8_0, q8_0_rows = q8_0_q8_0_impl(BlockQ8_0, BlockQ8_0) x 2;
            }
        }
    };
}

/// The int8 products of the build without VNNI.
mod plain_ops {
    use std::arch::x86_64::*;

    /// u8 × i8 products, 4 adjacent pairs summed into each i32 lane, added to `acc`; the
    /// unsigned side must be ≤ 127 (K-quant values are ≤ 63).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn dp(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
        // Pair sums fit i16: |2 · 255 · 128| would not, but the unsigned side here is at most
        // 63 (K-quant values), so |pair| ≤ 2·63·128.
        let pairs = _mm512_maddubs_epi16(u, s);
        _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
    }

    /// As `dp`, for any unsigned byte (the `w + 128` of packed Q8_0).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn dp_full(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
        // u up to 255 would saturate vpmaddubsw: widen to i16 instead, then add the pair sums
        // of each dword (even + odd i32 lane) and narrow back to one lane per dword.
        let lo = _mm512_madd_epi16(
            _mm512_cvtepu8_epi16(_mm512_castsi512_si256(u)),
            _mm512_cvtepi8_epi16(_mm512_castsi512_si256(s)),
        );
        let hi = _mm512_madd_epi16(
            _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(u)),
            _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64::<1>(s)),
        );
        let lo = _mm512_cvtepi64_epi32(_mm512_add_epi32(lo, _mm512_srli_epi64::<32>(lo)));
        let hi = _mm512_cvtepi64_epi32(_mm512_add_epi32(hi, _mm512_srli_epi64::<32>(hi)));
        _mm512_add_epi32(acc, _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi))
    }

    /// Signed × signed bytes of two Q8_0 blocks side by side: exact i32 sums, lanes 0..8
    /// holding block 0's, lanes 8..16 block 1's.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn q8_pair(w: __m512i, a: __m512i) -> __m512i {
        // Widen to i16 (exact for every byte), then fold each block's 16 pair sums to 8 lanes.
        let half = |w: __m256i, a: __m256i| {
            let p = _mm512_madd_epi16(_mm512_cvtepi8_epi16(w), _mm512_cvtepi8_epi16(a));
            _mm256_add_epi32(_mm512_castsi512_si256(p), _mm512_extracti64x4_epi64::<1>(p))
        };
        let lo = half(_mm512_castsi512_si256(w), _mm512_castsi512_si256(a));
        let hi = half(
            _mm512_extracti64x4_epi64::<1>(w),
            _mm512_extracti64x4_epi64::<1>(a),
        );
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }
}

/// The int8 products of the VNNI build (`vpdpbusd`).
mod vnni_ops {
    use std::arch::x86_64::*;

    /// u8 × i8 products, 4 adjacent pairs summed into each i32 lane, added to `acc`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn dp(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, u, s)
    }

    /// As `dp` (any unsigned byte works with `vpdpbusd`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn dp_full(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, u, s)
    }

    /// Signed × signed bytes of two Q8_0 blocks side by side, as `plain_ops::q8_pair`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn q8_pair(w: __m512i, a: __m512i) -> __m512i {
        // vpdpbusd wants an unsigned side: Σ (w+128)·a − 128·Σ a, both exact in i32.
        let z = _mm512_setzero_si512();
        let flip = _mm512_set1_epi8(-128);
        _mm512_sub_epi32(
            _mm512_dpbusd_epi32(z, _mm512_xor_si512(w, flip), a),
            _mm512_dpbusd_epi32(z, flip, a),
        )
    }
}

avx512_family!(
    plain,
    "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c",
    plain_ops
);
avx512_family!(
    vnni,
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c",
    vnni_ops
);
