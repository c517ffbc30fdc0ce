//! AVX2 + FMA + F16C multi-token (prefill) kernels: the tile entries of the `avx2` level.
//!
//! The layouts are the shared ones (docs/kernels.md): activations in `act::Q8KTile` /
//! `act::Q8_0Tile`, weights packed into `KPacked` / `Q8_0Packed` with one 16-value group (or one
//! 32-value Q8_0 block) per dword lane, "dword-transposed" so that a group's products collect in
//! one lane without horizontal work. A 64-byte vector of the AVX-512 layout is two 256-bit
//! vectors here: bytes 0..32 hold groups (blocks) 0..8, bytes 32..64 groups 8..16, so each
//! superblock is processed as two halves of 8 lanes. The packing writes exactly the bytes the
//! AVX-512 packing writes.
//!
//! Without VNNI, an int8 product of 4 bytes into a dword lane is `vpmaddubsw` (u8 × i8 → i16
//! pair sums) followed by `vpmaddwd` with ones (i16 pairs → i32). The i16 stage is where
//! saturation could bite; the bounds are next to each kernel.
//!
//! Everything here is only reachable through `WeightFormat::kernels` for a `cpu::Level` that
//! was checked for AVX2, FMA and F16C.

use super::avx2::{f16_to_f32, load};
use super::outer::{Dest, Layout, OuterMicro};
use super::tile::{self, FloatMicro};
use super::{prefetch_blocks, KPacked, Q8_0Packed};
use crate::act::{q8_0_tiles, Q8KTile, Q8_0Tile};
use crate::kscale::scales_mins_bytes;
use crate::q4_k::BlockQ4K;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use half::{bf16, f16};
use std::arch::x86_64::*;

// ---------------------------------------------------------------------------------------------
// Packing.

/// Store 256 values given in element order (`v[e]` = elements 32e..32e+32, i.e. groups 2e and
/// 2e+1) in tile order: `qs[64k + 4g + j]` = value `16g + 4k + j`.
///
/// Per half h (groups 8h..8h+8, vectors 4h..4h+4) this is an 8×4 transpose of dwords (group ×
/// dword index). Two rounds of unpacks leave vector k holding dword k of the groups in the
/// order 0,2,4,6 | 1,3,5,7 (the unpacks work inside 128-bit lanes), which one `vpermd` puts
/// back in group order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store_tile_order(qs: &mut [u8; 256], v: &[__m256i; 8]) {
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for h in 0..2 {
        let (v0, v1, v2, v3) = (v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
        let t0 = _mm256_unpacklo_epi32(v0, v1); // g0k0 g2k0 g0k1 g2k1 | g1k0 g3k0 g1k1 g3k1
        let t1 = _mm256_unpackhi_epi32(v0, v1); // the same for k2, k3
        let t2 = _mm256_unpacklo_epi32(v2, v3); // groups 4, 6 | 5, 7
        let t3 = _mm256_unpackhi_epi32(v2, v3);
        let by_k = [
            _mm256_unpacklo_epi64(t0, t2), // g0 g2 g4 g6 | g1 g3 g5 g7, dword 0
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
        ];
        for (k, x) in by_k.into_iter().enumerate() {
            let dst = qs.as_mut_ptr().add(64 * k + 32 * h);
            _mm256_storeu_si256(dst.cast(), _mm256_permutevar8x32_epi32(x, order));
        }
    }
}

/// Q4_K/Q5_K per-group factors: `ws_g = d·sc_{g/2}`, `wm_g = dmin·m_{g/2}` (a sub-block of 32
/// is two groups). Each is a 6-bit integer times an f16 value, exact in f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k4_factors(p: &mut KPacked, scales: &[u8; 12], d: f16, dmin: f16) {
    let b = scales_mins_bytes(scales);
    let (d, dmin) = (f16_to_f32(d), f16_to_f32(dmin));
    for g in 0..16 {
        p.ws[g] = d * b[g / 2] as f32;
        p.wm[g] = dmin * b[8 + g / 2] as f32;
    }
}

/// Q4_K nibbles (0..15) in element order: chunk c's low nibbles are elements 64c..64c+32, its
/// high nibbles the next 32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack_q4k(qs: &[u8; 128]) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0f);
    let mut v = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        let q = load(qs.as_ptr().add(32 * c));
        v[2 * c] = _mm256_and_si256(q, m4);
        v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
    }
    v
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_q4k_impl(row: &[BlockQ4K], out: &mut [KPacked]) {
    for (x, p) in row.iter().zip(out.iter_mut()) {
        prefetch_blocks(x);
        k4_factors(p, &x.scales, x.d, x.dmin);
        store_tile_order(&mut p.qs, &unpack_q4k(&x.qs));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_q5k_impl(row: &[BlockQ5K], out: &mut [KPacked]) {
    let sixteen = _mm256_set1_epi8(16);
    for (x, p) in row.iter().zip(out.iter_mut()) {
        prefetch_blocks(x);
        k4_factors(p, &x.scales, x.d, x.dmin);
        let mut v = unpack_q4k(&x.qs);
        // Values 0..31: element 32e + l (e = 2c or 2c+1) takes bit e of qh[l] as +16.
        let qh = load(x.qh.as_ptr());
        for (e, ve) in v.iter_mut().enumerate() {
            let m = _mm256_set1_epi8((1u8 << e) as i8);
            let bit = _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m);
            *ve = _mm256_or_si256(*ve, _mm256_and_si256(bit, sixteen));
        }
        store_tile_order(&mut p.qs, &v);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_q6k_impl(row: &[BlockQ6K], out: &mut [KPacked]) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m30 = _mm256_set1_epi8(0x30);
    for (x, p) in row.iter().zip(out.iter_mut()) {
        prefetch_blocks(x);
        // Values 0..63 (before the −32 offset), in element order: half h's four 32-value runs
        // take the low/high nibbles of ql and bit pairs 0-1, 2-3, 4-5, 6-7 of qh.
        let mut v = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let qh = load(x.qh.as_ptr().add(32 * h));
            let ql0 = load(x.ql.as_ptr().add(64 * h));
            let ql1 = load(x.ql.as_ptr().add(64 * h + 32));
            let hi = |s: __m256i| _mm256_and_si256(s, m30);
            v[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, m4), hi(_mm256_slli_epi16::<4>(qh)));
            v[4 * h + 1] =
                _mm256_or_si256(_mm256_and_si256(ql1, m4), hi(_mm256_slli_epi16::<2>(qh)));
            v[4 * h + 2] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), hi(qh));
            v[4 * h + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                hi(_mm256_srli_epi16::<2>(qh)),
            );
        }
        // The −32 offset becomes a min: wm_g = 32·d·sc_g (32·d is exact).
        let d = f16_to_f32(x.d);
        for g in 0..16 {
            p.ws[g] = d * x.scales[g] as f32;
            p.wm[g] = 32.0 * d * x.scales[g] as f32;
        }
        store_tile_order(&mut p.qs, &v);
    }
}

/// Q8_0 row → tiles of 16 blocks: dword k of block b goes to `qs[64k + 4b..]` as `w + 128`
/// (the shared `Q8_0Packed` meaning; padding past the row end is `w = 0` with `d = 0`). Plain
/// code: a tile is only 512 bytes and is reused by every token of the call.
fn pack_q8_0_rows(row: &[BlockQ8_0], out: &mut [Q8_0Packed]) {
    for (blocks, p) in row.chunks(16).zip(out.iter_mut()) {
        prefetch_blocks(blocks);
        p.qs = [0x80; 512];
        p.d = [0.0; 16];
        for (b, blk) in blocks.iter().enumerate() {
            for k in 0..8 {
                for j in 0..4 {
                    p.qs[64 * k + 4 * b + j] = blk.qs[4 * k + j] as u8 ^ 0x80;
                }
            }
            p.d[b] = blk.d.to_f32();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Register tiles.

/// Sums of four f32 vectors: lane t of the result is the sum of `v[t]`'s 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h = _mm256_hadd_ps(h01, h23); // per 128-bit half: [Σv0, Σv1, Σv2, Σv3] of that half
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

/// The horizontal sums of `acc`, four at a time.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsums<const T: usize>(acc: &[__m256; T]) -> [f32; T] {
    let z = _mm256_setzero_ps();
    let mut s = [0.0f32; T];
    for c in (0..T).step_by(4) {
        let v: [__m256; 4] = std::array::from_fn(|i| if c + i < T { acc[c + i] } else { z });
        let mut q = [0.0f32; 4];
        _mm_storeu_ps(q.as_mut_ptr(), hsum4(v));
        for (i, qi) in q.iter().enumerate().take(T - c) {
            s[c + i] = *qi;
        }
    }
    s
}

/// One packed K-quant row × T tokens. `w`: the row's `n` superblocks; `a`: token 0's `n`
/// tiles, token t's at `a + t·n`.
///
/// Per half (8 groups, one per dword lane) and token: four `vpmaddubsw` of 32 weight bytes
/// with 32 activation bytes. Bound: weights are 0..63 (Q4_K ≤ 15, Q5_K ≤ 31, Q6_K ≤ 63) and
/// activations −128..127, so each i16 pair sum is at most 2·63·128 = 16128 in magnitude, and
/// two of them added (`vpaddw`) at most 32256 < 32767: no saturation anywhere. `vpmaddwd` with
/// ones then gives each lane its group's exact 16-product sum (|·| ≤ 16·63·128 = 129024, i32).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn kq_micro<const T: usize>(w: *const KPacked, a: *const Q8KTile, n: usize) -> [f32; T] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    for s in 0..n {
        let p = &*w.add(s);
        for h in 0..2 {
            let wq = p.qs.as_ptr().add(32 * h);
            let wv = [
                load(wq),
                load(wq.add(64)),
                load(wq.add(128)),
                load(wq.add(192)),
            ];
            let ws = _mm256_loadu_ps(p.ws.as_ptr().add(8 * h));
            let wm = _mm256_loadu_ps(p.wm.as_ptr().add(8 * h));
            for (t, acc_t) in acc.iter_mut().enumerate() {
                let at = &*a.add(t * n + s);
                let q = at.qs.as_ptr().add(32 * h).cast::<u8>();
                let p01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(wv[0], load(q)),
                    _mm256_maddubs_epi16(wv[1], load(q.add(64))),
                );
                let p23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(wv[2], load(q.add(128))),
                    _mm256_maddubs_epi16(wv[3], load(q.add(192))),
                );
                let i =
                    _mm256_add_epi32(_mm256_madd_epi16(p01, ones), _mm256_madd_epi16(p23, ones));
                // Σ_g ws_g·isum_g·d_a − Σ_g wm_g·(d_a·bsum_g), lane-wise.
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(at.d));
                *acc_t = _mm256_fmadd_ps(f, ws, *acc_t);
                *acc_t = _mm256_fnmadd_ps(wm, _mm256_loadu_ps(at.bsd.as_ptr().add(8 * h)), *acc_t);
            }
        }
    }
    hsums(&acc)
}

/// One packed Q8_0 row × T tokens; `n` tiles of 16 blocks per row.
///
/// ggml's sign trick: Σ w·a = Σ |w|·(a with w's sign), so the unsigned operand of
/// `vpmaddubsw` is |w| ≤ 128 (`vpabsb` of −128 is 0x80, read as 128 unsigned) and the pair
/// sums are at most 2·128·127 = 32512 < 32767. This is exact whenever the activation byte is
/// not −128 (negating it would wrap): `act::quantize_q8_0` produces −127..=127 (|v·127/amax|
/// rounds to at most 127; a NaN activation is garbage whichever way it is multiplied). The
/// `ncorr` term of the tile is for the `w + 128` form of the AVX-512 kernels and is not used.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_0_micro<const T: usize>(
    w: *const Q8_0Packed,
    a: *const Q8_0Tile,
    n: usize,
) -> [f32; T] {
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); T];
    for g in 0..n {
        let p = &*w.add(g);
        let at: [&Q8_0Tile; T] = std::array::from_fn(|t| &*a.add(t * n + g));
        for h in 0..2 {
            // Lane b: block 8h+b's exact sum, |·| ≤ 32·128·127 < 2²⁰.
            let mut isum = [_mm256_setzero_si256(); T];
            for k in 0..8 {
                let wk = _mm256_xor_si256(load(p.qs.as_ptr().add(64 * k + 32 * h)), flip);
                let wabs = _mm256_abs_epi8(wk);
                for (t, is) in isum.iter_mut().enumerate() {
                    let av = load(at[t].qs.as_ptr().add(64 * k + 32 * h).cast());
                    let pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(av, wk));
                    *is = _mm256_add_epi32(*is, _mm256_madd_epi16(pairs, ones));
                }
            }
            let dw = _mm256_loadu_ps(p.d.as_ptr().add(8 * h));
            for (t, acc_t) in acc.iter_mut().enumerate() {
                let d = _mm256_mul_ps(dw, _mm256_loadu_ps(at[t].d.as_ptr().add(8 * h)));
                *acc_t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), d, *acc_t);
            }
        }
    }
    hsums(&acc)
}

const NT: usize = 4;
/// Tokens per register tile of the Q8_0 kernel. Its i32 sums live only through one half-tile
/// and the f32 accumulators are touched once per half, so spilling those is cheap, while every
/// extra token reuses the transformed weights (`|w|`, `w`): 8 measured ~15 % faster than 4.
const NT_Q8_0: usize = 8;

/// How a float weight type becomes f32 lanes: 8 values at a pointer, or the first `len` (< 8)
/// with zeros after them (the row's tail; nothing past it is read).
trait FloatWeight: Copy {
    unsafe fn load8(p: *const Self) -> __m256;
    unsafe fn load_tail(p: *const Self, len: usize) -> __m256;
}

/// `len` (< 8) values from `p`, zero-padded, as 8 u16 bits.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tail_u16(p: *const u16, len: usize) -> __m128i {
    let mut buf = [0u16; 8];
    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
    _mm_loadu_si128(buf.as_ptr().cast())
}

/// Lane mask for `_mm256_maskload_ps`: the first `len` (≤ 8) lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn first_lanes(len: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(len as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

impl FloatWeight for f16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_tail(p: *const f16, len: usize) -> __m256 {
        _mm256_cvtph_ps(tail_u16(p.cast(), len))
    }
}

impl FloatWeight for bf16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const bf16) -> __m256 {
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_tail(p: *const bf16, len: usize) -> __m256 {
        let h = _mm256_cvtepu16_epi32(tail_u16(p.cast(), len));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    }
}

impl FloatWeight for f32 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_tail(p: *const f32, len: usize) -> __m256 {
        _mm256_maskload_ps(p, first_lanes(len))
    }
}

/// R float weight rows (`w`, stride `n`) × T f32 token rows (`a`, stride `n`), 8 columns per
/// step, the last `n % 8` columns zero-padded. R·T accumulators + R weight vectors + 1
/// activation vector must fit the 16 ymm registers: R = 3, T = 4 uses all of them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn float_micro<E: FloatWeight, const R: usize, const T: usize>(
    w: *const E,
    a: *const f32,
    n: usize,
) -> [[f32; T]; R] {
    // acc[t][r]: token t · row r.
    let mut acc = [[_mm256_setzero_ps(); R]; T];
    let mut i = 0;
    while i + 8 <= n {
        // The same columns two tiles ahead (rows 2R.. from here: the tile after next of a
        // matrix-vector product) are requested into L2 now; a prefetch never faults, past
        // the matrix's end included. docs/kernels.md has the measurements.
        for r in 0..R {
            _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((2 * R + r) * n + i).cast());
        }
        // A loop, not `array::from_fn`: a closure may be left un-inlined, outside this
        // function's target features (it happened to the AVX-512 float kernel).
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = E::load8(w.add(r * n + i));
        }
        for (t, acc_t) in acc.iter_mut().enumerate() {
            let av = _mm256_loadu_ps(a.add(t * n + i));
            for (s, wr) in acc_t.iter_mut().zip(&wv) {
                *s = _mm256_fmadd_ps(*wr, av, *s);
            }
        }
        i += 8;
    }
    if i < n {
        let len = n - i;
        let mask = first_lanes(len);
        let mut wv = [_mm256_setzero_ps(); R];
        for (r, v) in wv.iter_mut().enumerate() {
            *v = E::load_tail(w.add(r * n + i), len);
        }
        for (t, acc_t) in acc.iter_mut().enumerate() {
            let av = _mm256_maskload_ps(a.add(t * n + i), mask);
            for (s, wr) in acc_t.iter_mut().zip(&wv) {
                *s = _mm256_fmadd_ps(*wr, av, *s);
            }
        }
    }
    std::array::from_fn(|r| hsums::<T>(&std::array::from_fn(|t| acc[t][r])))
}

/// Weight rows per float register tile (see `float_micro`).
const FR: usize = 3;

/// The float register tile of this level for the shared driver.
struct FloatTile<E>(std::marker::PhantomData<E>);
impl<E: FloatWeight> FloatMicro for FloatTile<E> {
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

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_gemm_impl<E: FloatWeight>(
    w: &[E],
    a: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [&mut [f32]],
) {
    let m = FloatTile::<E>(std::marker::PhantomData);
    // SAFETY: the caller's contract is the driver's.
    unsafe { tile::float_gemm::<_, FR>(&m, w, a, n, bias, out) }
}

// ---------------------------------------------------------------------------------------------
// Prompts: the outer-product float tile (`dot::outer` explains why it gives `float_micro`'s
// bits; here the tree is `hsum4`'s, adjacent lanes first: ((0+1)+(2+3)) + ((4+5)+(6+7))).

/// This level's activation layout: 8 lanes, groups of 6 tokens, panels of 16 rows.
pub(crate) const LAYOUT: Layout = super::outer::AVX2;

/// 8 f32 lanes, 32-byte aligned: 8 rows of one packed column.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
struct V8([f32; 8]);

// SAFETY: an array of f32 without padding, valid for every bit pattern.
unsafe impl crate::Plain for V8 {}

/// The 8 × 8 transpose: lane j of result c is lane c of `v[j]`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
    // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (low, high pairs of each 128-bit half).
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // u[4q + k]: in 128-bit half H, column 4H + k of rows 4q..4q + 4.
    let u: [__m256; 8] = std::array::from_fn(|i| {
        let (q, k) = (i / 4, i % 4);
        let (a, b) = (t[4 * q + k / 2], t[4 * q + k / 2 + 2]);
        if k % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xEE>(a, b)
        }
    });
    std::array::from_fn(|c| {
        let (h, k) = (c / 4, c % 4);
        if h == 0 {
            _mm256_permute2f128_ps::<0x20>(u[k], u[4 + k])
        } else {
            _mm256_permute2f128_ps::<0x31>(u[k], u[4 + k])
        }
    })
}

/// Rows `w[..rows]` (≤ 16, `n` columns each) as f32, lane-major: `dst[(j·steps + s)·2 + h]`
/// is rows 8h.. of column 8s + j, zero for rows past `rows` and columns past `n`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pack_panel<E: FloatWeight>(w: *const E, rows: usize, n: usize, dst: &mut [V8]) {
    let steps = n.div_ceil(8);
    assert!(dst.len() >= 16 * steps, "pack_panel: destination length");
    let d = dst.as_mut_ptr();
    for s in 0..steps {
        let len = (n - 8 * s).min(8);
        for h in 0..2 {
            let mut v = [_mm256_setzero_ps(); 8];
            for (i, x) in v.iter_mut().enumerate() {
                let r = 8 * h + i;
                if r < rows {
                    let p = w.add(r * n + 8 * s);
                    *x = if len == 8 {
                        E::load8(p)
                    } else {
                        E::load_tail(p, len)
                    };
                }
            }
            for (j, c) in transpose8(v).into_iter().enumerate() {
                _mm256_store_ps(d.add((j * steps + s) * 2 + h).cast(), c);
            }
        }
    }
}

/// Tokens `dst.t0..dst.t0 + T` (their group in [`LAYOUT`] at `a`) times one packed panel
/// (rows `dst.r0..dst.r0 + dst.nr` of the call), written into `dst`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn outer_tile<const T: usize>(
    panel: &[V8],
    a: *const f32,
    n: usize,
    dst: &mut Dest<'_, '_>,
) {
    let steps = n.div_ceil(8);
    // pending[i]: the sum of the 2^i lanes before, while bit i of the lane index is set.
    let mut pending = [[[_mm256_setzero_ps(); 2]; T]; 3];
    let mut sum = [[_mm256_setzero_ps(); 2]; T];
    for j in 0..8 {
        // Lane j has a column in step s while 8s + j < n.
        let len = if j < n { (n - j).div_ceil(8) } else { 0 };
        let w = panel.as_ptr().add(j * steps * 2);
        let aj = a.add(j * steps * T);
        let mut c = [[_mm256_setzero_ps(); 2]; T];
        for s in 0..len {
            let w0 = _mm256_load_ps(w.add(2 * s).cast());
            let w1 = _mm256_load_ps(w.add(2 * s + 1).cast());
            for (t, ct) in c.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*aj.add(s * T + t));
                ct[0] = _mm256_fmadd_ps(w0, b, ct[0]);
                ct[1] = _mm256_fmadd_ps(w1, b, ct[1]);
            }
        }
        let mut level = 0;
        while (j >> level) & 1 == 1 {
            for (ct, pt) in c.iter_mut().zip(&pending[level]) {
                ct[0] = _mm256_add_ps(pt[0], ct[0]);
                ct[1] = _mm256_add_ps(pt[1], ct[1]);
            }
            level += 1;
        }
        match pending.get_mut(level) {
            Some(p) => *p = c,
            None => sum = c,
        }
    }
    for (h, r) in [0, 8].into_iter().enumerate().filter(|&(_, r)| r < dst.nr) {
        let k = (dst.nr - r).min(8);
        let mut b = [0.0f32; 8];
        if let Some(bias) = dst.bias {
            b[..k].copy_from_slice(&bias[dst.r0 + r..dst.r0 + r + k]);
        }
        let b = _mm256_loadu_ps(b.as_ptr());
        for (t, st) in sum.iter().enumerate() {
            let mut v = [0.0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), _mm256_add_ps(st[h], b));
            dst.out[dst.t0 + t][dst.r0 + r..dst.r0 + r + k].copy_from_slice(&v[..k]);
        }
    }
}

/// The outer-product tile of this level for the shared driver (`outer::gemm`).
struct Outer<E>(std::marker::PhantomData<E>);
impl<E: FloatWeight> OuterMicro for Outer<E> {
    type E = E;
    type V = V8;
    const LAYOUT: Layout = LAYOUT;
    #[inline(always)]
    unsafe fn pack(w: *const E, rows: usize, n: usize, dst: &mut [V8]) {
        // SAFETY: the caller's contract (`OuterMicro::pack`) is `pack_panel`'s.
        unsafe { pack_panel(w, rows, n, dst) }
    }
    #[inline(always)]
    unsafe fn tile(nt: usize, panel: &[V8], a: *const f32, n: usize, dst: &mut Dest<'_, '_>) {
        macro_rules! go {
            ($($t:literal)*) => {
                match nt {
                    // SAFETY: the caller's contract (`OuterMicro::tile`) is `outer_tile`'s.
                    $($t => unsafe { outer_tile::<$t>(panel, a, n, dst) },)*
                    _ => unreachable!("1 ≤ nt ≤ LAYOUT.group = 6"),
                }
            };
        }
        go!(1 2 3 4 5 6)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn outer_gemm_impl<E: FloatWeight>(
    w: &[E],
    a: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [&mut [f32]],
) {
    // SAFETY: the caller's contract is the driver's.
    unsafe { super::outer::gemm::<Outer<E>>(w, a, n, bias, out) }
}

// The safe entry points (`dot::entry_points` states why they are sound). The Q8_0 packer is
// safe code (it calls the AVX2 transpose inside).
pub(crate) fn pack_q8_0(row: &[BlockQ8_0], out: &mut [Q8_0Packed]) {
    assert_eq!(q8_0_tiles(row.len()), out.len(), "pack_q8_0: length");
    pack_q8_0_rows(row, out)
}
super::entry_points! { "avx2,fma,f16c";
    tile kq_gemm = kq_gemm_impl: kq_micro(KPacked, Q8KTile) x NT;
    tile q8_0_gemm = q8_0_gemm_impl: q8_0_micro(Q8_0Packed, Q8_0Tile) x NT_Q8_0;
    gemm f16_gemm = float_gemm_impl(f16, f32);
    gemm bf16_gemm = float_gemm_impl(bf16, f32);
    gemm f32_gemm = float_gemm_impl(f32, f32);
    outer f16_outer = outer_gemm_impl(f16) in LAYOUT;
    outer bf16_outer = outer_gemm_impl(bf16) in LAYOUT;
    outer f32_outer = outer_gemm_impl(f32) in LAYOUT;
    pack pack_q4k = pack_q4k_impl(BlockQ4K => KPacked, super::same);
    pack pack_q5k = pack_q5k_impl(BlockQ5K => KPacked, super::same);
    pack pack_q6k = pack_q6k_impl(BlockQ6K => KPacked, super::same);
}
