//! Prompts with F16 and BF16 weights on the AMX tile unit (the `amx` level).
//!
//! One `tdpbf16ps` adds a 16 × 32 bf16 tile times a 32 × 16 bf16 tile into a 16 × 16 tile of
//! f32 sums: 8192 products, which a core of this project's host retires in about 16 cycles,
//! some 13 times its f32 FMA peak. bf16 keeps 8 significant bits, an f16 weight has 11 and an
//! f32 activation 24, so both are split into sums of bf16 parts (bf16 has f32's exponent range,
//! so no part under- or overflows where f16 and normal f32 values do not):
//!
//! - an f16 weight `w = w_hi + w_lo` exactly (`w_hi` its value rounded to bf16, `w_lo` the at
//!   most 3 bits left); a bf16 weight is its own `w_hi`;
//! - an activation `a ≈ a_hi + a_lo`, each rounded to nearest, `|a − a_hi − a_lo| ≤ 2⁻¹⁶|a|`
//!   (for `2⁻¹⁰⁰ ≤ |a|` and `|a|` short of f32's largest by 2⁻⁹ of it, which rounds to infinity;
//!   below 2⁻¹⁰⁰ `a_lo` can fall under bf16's normal range, which the tile unit reads as zero).
//!   A NaN stays NaN.
//!
//! The product of two bf16 values is exact in f32 and the unit sums in f32, so
//! `w·a ≈ w_hi·a_hi + w_hi·a_lo + w_lo·a_hi` — three tile products per 32 columns (two for
//! BF16 weights) — leaves out `w_lo·a_lo` (≤ 2⁻¹⁶|w·a|) and the activation's remainder: at
//! most 2⁻¹⁵ of each product, against 2⁻²⁴ for an f32 FMA and 2⁻¹¹ for ggml's F16 path, which
//! rounds activations to f16. Unlike the FMA tiles (`dot::outer`), a token's sums here depend on
//! the path, so `matmul` keeps this path off when batch invariance is asked for.
//!
//! Layouts (one tile = 16 rows of 64 bytes = 1 KiB, [`Tile`]):
//! - weights (packed per work item, [`pack_group`]): rows in groups of 16, padded to pairs of
//!   groups; per group, per step of 32 columns, the `w_hi` tile then (F16) the `w_lo` tile,
//!   row r = weight row r's 32 values of the step (the A operand of `tdpbf16ps`, so packing is
//!   a conversion and no transpose);
//! - activations ([`lay_out`], once per call): tokens in groups of 16, padded with zero tokens
//!   to whole pairs of groups; per group, per step, the `a_hi` tile then the `a_lo` tile, in
//!   the pair-interleaved order of the B operand: tile row q holds, for each of the 16 tokens,
//!   its columns `2q` and `2q + 1` of the step.
//!
//! The register blocking is 2 × 2 tiles of sums (32 weight rows × 32 tokens, `tmm0..3`), two
//! weight tiles (`tmm4/5`) and two activation tiles (`tmm6/7`): per step 12 (BF16: 8) tile
//! products from as many tile loads. A tile of sums is `[row][token]`; it is transposed on the
//! way out.

use crate::matmul::Line;
use half::{bf16, f16};

/// Columns per step: one tile row of bf16.
pub(crate) const STEP: usize = 32;
/// Tokens per activation tile, weight rows per weight tile.
pub(crate) const GROUP: usize = 16;

/// One tile: 16 rows of 32 bf16 (as their bits), 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Tile(pub(crate) [u16; GROUP * STEP]);

// SAFETY: an array of u16 without padding, valid for every bit pattern.
unsafe impl crate::Plain for Tile {}

/// `x` rounded to the nearest bf16 (ties to even), as bits, the way `vcvtneps2bf16` does it: a
/// NaN stays a (quiet) NaN, so that a NaN weight or activation gives NaN sums as it does on the
/// FMA tiles, and a subnormal f32 is read as zero of its sign.
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b | 0x0040_0000) >> 16) as u16;
    }
    if b & 0x7F80_0000 == 0 {
        return (b >> 16) as u16 & 0x8000;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The bf16 of `bits` as f32.
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
#[inline(always)]
fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `x` as two bf16 parts `(hi, lo)`: `hi` is `x` rounded to bf16, `lo` the rest rounded to
/// bf16 (exactly the rest when `x` has at most 16 significant bits, as every f16 value does).
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
#[inline(always)]
pub(crate) fn split(x: f32) -> (u16, u16) {
    let hi = bf16_bits(x);
    (hi, bf16_bits(x - widen(hi)))
}

/// A weight element the tiles take, with its bf16 parts.
pub(crate) trait Split: Copy + Sync {
    /// Weight parts: 2 (`w_hi`, `w_lo`) or 1 (`w_hi`).
    const PARTS: usize;
    /// The element's parts (`lo` unused where `PARTS == 1`).
    #[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
    fn parts(self) -> (u16, u16);
}

impl Split for f16 {
    const PARTS: usize = 2;
    fn parts(self) -> (u16, u16) {
        split(self.to_f32())
    }
}

impl Split for bf16 {
    const PARTS: usize = 1;
    fn parts(self) -> (u16, u16) {
        (self.to_bits(), 0)
    }
}

/// From this many tokens on, F16/BF16 matmuls at the `amx` level take the tiles (padded to 32
/// tokens). GPT-2-Medium-shaped F16, `ggpt bench -t 2`, against the FMA tiles: pp16 257 vs 267
/// t/s, pp18 even, pp20 310–312 vs 281–286, pp22 342 vs 285, pp24 370 vs 301.
pub(crate) const MIN_TOKENS: usize = 20;

/// Bytes of packed tiles a work item keeps per weight row of `n` columns: two bf16 parts of
/// one chunk of columns (a BF16 row needs half).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn packed_row_bytes(n: usize) -> usize {
    4 * n.min(STEP * CHUNK).next_multiple_of(STEP)
}

/// Steps (of 32 columns) per chunk: a work item takes the columns a chunk at a time, its sums
/// kept in memory between chunks, so that a chunk of its packed weights (1 MiB for 256 F16
/// rows) stays in L2 while every token pair passes it, and the activations of a 4096-column
/// matrix are read from memory once per chunk of an item rather than the whole row at once
/// for fewer rows.
pub(crate) const CHUNK: usize = 32;

/// Bytes per token of the call that a work item keeps for its sums between chunks (matrices
/// of more than one chunk of columns): 4 per row, for at most the rows that `PANEL_BYTES` of
/// packed chunks hold.
pub(crate) const SUMS_PER_TOKEN: usize = 4 * (crate::matmul::PANEL_BYTES / (4 * STEP * CHUNK));

/// Activation tiles for `tokens` rows of `n` columns ([`lay_out`]).
pub(crate) fn act_tiles(tokens: usize, n: usize) -> usize {
    tokens.div_ceil(2 * GROUP) * 2 * n.div_ceil(STEP) * 2
}

/// Tile `s` of a group of up to 16 rows of `n` values (`value(j, c)`, row j, column c) as
/// the A operand: row j, element k is `value(j, 32s + k)`; zero past `rows` and `n`.
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
fn rows_ref(rows: usize, n: usize, s: usize, value: impl Fn(usize, usize) -> u16, t: &mut Tile) {
    for j in 0..GROUP {
        for k in 0..STEP {
            let c = STEP * s + k;
            t.0[j * STEP + k] = if j < rows && c < n { value(j, c) } else { 0 };
        }
    }
}

/// The same as the B operand: row q, element `2j + i` is `value(j, 32s + 2q + i)`.
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
fn pairs_ref(rows: usize, n: usize, s: usize, value: impl Fn(usize, usize) -> u16, t: &mut Tile) {
    for q in 0..GROUP {
        for j in 0..GROUP {
            for i in 0..2 {
                let c = STEP * s + 2 * q + i;
                t.0[q * STEP + 2 * j + i] = if j < rows && c < n { value(j, c) } else { 0 };
            }
        }
    }
}

/// The reference activation layout (see the module comment): tile `(g·steps + s)·2 + p` holds
/// part p of tokens `16g..16g + 16`, step s, as the B operand.
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
pub(crate) fn lay_out_ref(x: &[f32], n: usize, out: &mut [Tile]) {
    let tokens = x.len() / n;
    let steps = n.div_ceil(STEP);
    assert_eq!(
        out.len(),
        act_tiles(tokens, n),
        "amx lay_out: output length"
    );
    for (gsp, tile) in out.iter_mut().enumerate() {
        let (g, s, p) = (gsp / (2 * steps), gsp / 2 % steps, gsp % 2);
        let rows = tokens.saturating_sub(GROUP * g).min(GROUP);
        let value = |j: usize, c: usize| {
            let (hi, lo) = split(x[(GROUP * g + j) * n + c]);
            if p == 0 {
                hi
            } else {
                lo
            }
        };
        pairs_ref(rows, n, s, value, tile);
    }
}

/// The reference weight packing of one group of rows `w[..rows]` (`rows ≤ 16`, `n` columns
/// each): tile `s·PARTS + p` holds part p of step s as the A operand.
#[cfg_attr(not(all(test, target_arch = "x86_64")), allow(dead_code))]
pub(crate) fn pack_group_ref<E: Split>(w: &[E], n: usize, out: &mut [Tile]) {
    let rows = w.len() / n;
    let steps = n.div_ceil(STEP);
    assert!(rows <= GROUP, "amx pack: at most 16 rows");
    assert_eq!(out.len(), steps * E::PARTS, "amx pack: output length");
    for (sp, tile) in out.iter_mut().enumerate() {
        let (s, p) = (sp / E::PARTS, sp % E::PARTS);
        let value = |j: usize, c: usize| {
            let (hi, lo) = w[j * n + c].parts();
            if p == 0 {
                hi
            } else {
                lo
            }
        };
        rows_ref(rows, n, s, value, tile);
    }
}

thread_local! {
    /// Per thread: the packed weight tiles of the rows a call is given.
    static PACKED: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) use x86::pack_group;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{gemm, lay_out};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{act_tiles, Split, Tile, CHUNK, GROUP, PACKED, STEP};
    use crate::dot::avx512::float::transpose16;
    use half::{bf16, f16};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The tile configuration every call loads: palette 1, tiles 0–7 all 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
        reserved2: [u8; 16],
    }

    const CONFIG: Config = {
        let mut c = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
            reserved2: [0; 16],
        };
        let mut i = 0;
        while i < 8 {
            c.colsb[i] = 64;
            c.rows[i] = 16;
            i += 1;
        }
        c
    };

    /// The masks of a step's two halves of 16 columns when `rem` columns remain.
    #[inline(always)]
    fn masks(rem: usize) -> (__mmask16, __mmask16) {
        let m = |lo: usize| {
            let k = rem.saturating_sub(lo).min(16) as u32;
            ((1u32 << k) - 1) as u16
        };
        (m(0), m(16))
    }

    /// 32 values split into bf16 parts ([`super::split`]): (hi, lo), each 32 bf16 in order.
    /// `vcvtne2ps2bf16` rounds to nearest even, keeps NaN a quiet NaN and reads a subnormal
    /// f32 as zero, which is what [`super::bf16_bits`] is written to do.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    #[inline]
    unsafe fn split32(a: __m512, b: __m512) -> (__m512i, __m512i) {
        let hi = _mm512_cvtne2ps_pbh(b, a);
        let bits = |x: __m512bh| -> __m512i { std::mem::transmute(x) };
        let h = bits(hi);
        let ha = _mm512_cvtpbh_ps(std::mem::transmute::<__m256i, __m256bh>(
            _mm512_castsi512_si256(h),
        ));
        let hb = _mm512_cvtpbh_ps(std::mem::transmute::<__m256i, __m256bh>(
            _mm512_extracti64x4_epi64::<1>(h),
        ));
        let lo = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
        (h, bits(lo))
    }

    /// An element the tiles are made from, with its split 32-value load.
    pub(crate) trait Load: Copy {
        /// The bf16 parts `(hi, lo)` of the 32 values at `p` ([`super::Split`] for weights,
        /// [`super::split`] for f32), lanes outside the masks zero and not read.
        ///
        /// # Safety
        /// The CPU has AVX-512F/BW, AVX512-BF16 and F16C; the masked lanes are readable at `p`.
        unsafe fn parts32(p: *const Self, m0: __mmask16, m1: __mmask16) -> (__m512i, __m512i);
    }

    impl Load for f32 {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
        #[inline]
        unsafe fn parts32(p: *const f32, m0: __mmask16, m1: __mmask16) -> (__m512i, __m512i) {
            split32(
                _mm512_maskz_loadu_ps(m0, p),
                _mm512_maskz_loadu_ps(m1, p.add(16)),
            )
        }
    }

    impl Load for f16 {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
        #[inline]
        unsafe fn parts32(p: *const f16, m0: __mmask16, m1: __mmask16) -> (__m512i, __m512i) {
            let p = p.cast::<i16>();
            split32(
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, p)),
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, p.add(16))),
            )
        }
    }

    impl Load for bf16 {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
        #[inline]
        unsafe fn parts32(p: *const bf16, m0: __mmask16, m1: __mmask16) -> (__m512i, __m512i) {
            let m = u32::from(m0) | u32::from(m1) << 16;
            (
                _mm512_maskz_loadu_epi16(m, p.cast()),
                _mm512_setzero_si512(),
            )
        }
    }

    /// [`super::lay_out_ref`] with AVX-512, groups of tokens spread over the threads: per step,
    /// each token's 32 values split into parts (16 column pairs a vector), then a 16 × 16
    /// transpose of the pairs gives the tile rows.
    pub(crate) fn lay_out(x: &[f32], n: usize, out: &mut [Tile]) {
        use rayon::prelude::*;
        let tokens = x.len() / n;
        let steps = n.div_ceil(STEP);
        assert!(
            crate::cpu::Isa::Amx.is_supported(),
            "amx lay_out: the amx level"
        );
        assert_eq!(x.len(), tokens * n, "amx lay_out: rows");
        assert_eq!(
            out.len(),
            act_tiles(tokens, n),
            "amx lay_out: output length"
        );
        out.par_chunks_mut(2 * steps)
            .enumerate()
            .for_each(|(g, tiles)| {
                let rows = tokens.saturating_sub(GROUP * g).min(GROUP);
                // SAFETY: the amx level (checked above) has AVX-512 and AVX512-BF16; rows
                // 16g..16g + rows of x exist and `tiles` is the group's 2·steps tiles.
                unsafe { pairs(x.as_ptr().add(GROUP * g * n), rows, n, tiles) }
            });
    }

    /// `rows ≤ 16` rows of `n` values at `src` into `2·steps` tiles (step s: parts 0 and 1) in
    /// the B operand's order.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW and AVX512-BF16; `src` holds `rows·n` values, `tiles` `2·⌈n/32⌉`
    /// tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    unsafe fn pairs<E: Load>(src: *const E, rows: usize, n: usize, tiles: &mut [Tile]) {
        for (s, pair) in tiles.chunks_exact_mut(2).enumerate() {
            let (m0, m1) = masks(n - STEP * s);
            let mut hi = [_mm512_setzero_ps(); GROUP];
            let mut lo = [_mm512_setzero_ps(); GROUP];
            for j in 0..rows {
                let (h, l) = E::parts32(src.add(j * n + STEP * s), m0, m1);
                hi[j] = _mm512_castsi512_ps(h);
                lo[j] = _mm512_castsi512_ps(l);
            }
            for (q, v) in transpose16(hi).into_iter().enumerate() {
                _mm512_store_ps(pair[0].0.as_mut_ptr().add(q * STEP).cast(), v);
            }
            for (q, v) in transpose16(lo).into_iter().enumerate() {
                _mm512_store_ps(pair[1].0.as_mut_ptr().add(q * STEP).cast(), v);
            }
        }
    }

    /// [`super::pack_group_ref`] with AVX-512, for the steps `steps` of the rows (tile
    /// `(s − steps.start)·PARTS + p`): each row's 32 values of a step split and stored as a row
    /// of each part's tile.
    pub(crate) fn pack_group<E: Split + Load>(
        w: &[E],
        n: usize,
        steps: std::ops::Range<usize>,
        out: &mut [Tile],
    ) {
        assert!(
            crate::cpu::Isa::Amx.is_supported(),
            "amx pack: the amx level"
        );
        let rows = w.len() / n;
        assert!(rows <= GROUP, "amx pack: at most 16 rows");
        assert_eq!(w.len(), rows * n, "amx pack: rows");
        assert!(
            steps.start <= steps.end && steps.end <= n.div_ceil(STEP),
            "amx pack: steps"
        );
        assert_eq!(out.len(), steps.len() * E::PARTS, "amx pack: output length");
        // SAFETY: the amx level (checked above) has AVX-512 and AVX512-BF16; lengths checked.
        unsafe { pack_group_impl(w.as_ptr(), rows, n, steps, out) }
    }

    /// # Safety
    /// As [`pack_group`]'s checks: AVX-512 and AVX512-BF16, `w` holds `rows·n` values, `steps`
    /// lie within the row, `out` holds `steps.len()·PARTS` tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    unsafe fn pack_group_impl<E: Split + Load>(
        w: *const E,
        rows: usize,
        n: usize,
        steps: std::ops::Range<usize>,
        out: &mut [Tile],
    ) {
        // Row by row, so that each row is read from memory in order.
        for j in 0..GROUP {
            for (i, s) in steps.clone().enumerate() {
                let (h, l) = if j < rows {
                    let (m0, m1) = masks(n - STEP * s);
                    E::parts32(w.add(j * n + STEP * s), m0, m1)
                } else {
                    (_mm512_setzero_si512(), _mm512_setzero_si512())
                };
                let t = out.as_mut_ptr().add(i * E::PARTS);
                _mm512_store_si512((*t).0.as_mut_ptr().add(j * STEP).cast(), h);
                if E::PARTS == 2 {
                    _mm512_store_si512((*t.add(1)).0.as_mut_ptr().add(j * STEP).cast(), l);
                }
            }
        }
    }

    /// `out[t][r] = Σ_c w[r][c]·x[t][c] + bias[r]` for the rows of `w` and the tokens of `out`,
    /// with `a` the activations laid out by [`lay_out`] for `out.len()` tokens: per pair of
    /// token groups (so that their tiles stay in L2), every pair of row groups, packed into the
    /// thread's buffer when the first token pair reaches it. The F16 and BF16 formats' AMX
    /// `GemmFn` (with `n` the columns).
    pub(crate) fn gemm<E: Split + Load>(
        w: &[E],
        a: &[Tile],
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [&mut [f32]],
    ) {
        assert!(
            crate::cpu::Isa::Amx.is_supported(),
            "amx gemm: the amx level"
        );
        let rows = w.len() / n;
        let tokens = out.len();
        let steps = n.div_ceil(STEP);
        assert_eq!(w.len(), rows * n, "amx gemm: rows");
        assert_eq!(a.len(), act_tiles(tokens, n), "amx gemm: activations");
        assert!(out.iter().all(|o| o.len() == rows), "amx gemm: outputs");
        assert!(bias.is_none_or(|b| b.len() == rows), "amx gemm: bias");
        let row_pairs = rows.div_ceil(2 * GROUP);
        let token_pairs = tokens.div_ceil(2 * GROUP);
        let chunks = steps.div_ceil(CHUNK);
        // Per group, the tiles of one chunk of steps.
        let per_group = steps.min(CHUNK) * E::PARTS;
        let row_bytes = n * std::mem::size_of::<E>();
        PACKED.with_borrow_mut(|buf| {
            let (packed, sums) = crate::matmul::typed_buf::<Tile>(
                buf,
                2 * row_pairs * per_group
                    + if chunks > 1 {
                        4 * row_pairs * token_pairs
                    } else {
                        0
                    },
            )
            .split_at_mut(2 * row_pairs * per_group);
            let mut own = [Tile([0; GROUP * STEP]); 4];
            // SAFETY: the `amx` level is supported (checked above), so the CPU has the tile unit
            // and this process was granted its state; `CONFIG` is a valid palette-1 one.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
            for c in 0..chunks {
                let (s0, s1) = (c * CHUNK, (c * CHUNK + CHUNK).min(steps));
                let last = c + 1 == chunks;
                for tp in 0..token_pairs {
                    // SAFETY: `act_tiles` covers whole pairs of token groups of `steps` steps.
                    let b0 = unsafe { a.as_ptr().add((2 * tp * steps + s0) * 2) };
                    // SAFETY: as above, the pair's second group.
                    let b1 = unsafe { b0.add(2 * steps) };
                    for rp in 0..row_pairs {
                        let tiles = &mut packed[2 * rp * per_group..2 * (rp + 1) * per_group];
                        // With the first token pair: pack the chunk of the pair of row groups
                        // just before its products, and request the same columns of the next
                        // pair's rows into L2 a share per step, so that reading them from
                        // memory overlaps these products.
                        let mut ahead = Ahead::NONE;
                        if tp == 0 {
                            for (g, tiles) in tiles.chunks_exact_mut(per_group).enumerate() {
                                let r0 = (2 * rp + g) * GROUP;
                                let (r0, r1) = (r0.min(rows), (r0 + GROUP).min(rows));
                                let used = &mut tiles[..(s1 - s0) * E::PARTS];
                                pack_group(&w[r0 * n..r1 * n], n, s0..s1, used);
                            }
                            let next = ((2 * rp + 2) * GROUP).min(rows);
                            ahead = Ahead {
                                // SAFETY: row `next` ≤ rows starts inside `w` or at its end.
                                at: unsafe { w.as_ptr().add(next * n + STEP * s0).cast() },
                                stride: row_bytes,
                                rows: (rows - next).min(2 * GROUP),
                                bytes: (STEP * (s1 - s0)).min(n - STEP * s0)
                                    * std::mem::size_of::<E>(),
                            };
                        }
                        let a0 = tiles.as_ptr();
                        // SAFETY: the pair's second group follows its first.
                        let a1 = unsafe { a0.add(per_group) };
                        let c_tiles: &mut [Tile; 4] = if chunks > 1 {
                            let k = 4 * (tp * row_pairs + rp);
                            (&mut sums[k..k + 4]).try_into().expect("four tiles")
                        } else {
                            &mut own
                        };
                        // SAFETY: tiles configured above; the pointers address s1 − s0 steps.
                        unsafe { block::<E>(a0, a1, b0, b1, s1 - s0, c > 0, ahead, c_tiles) };
                        if last {
                            // SAFETY: AVX-512 and AVX512-BF16 are part of the `amx` level.
                            unsafe {
                                write_block(c_tiles, 2 * rp * GROUP, 2 * tp * GROUP, bias, out)
                            };
                        }
                    }
                }
            }
            // SAFETY: tiles configured above; this returns them to their initial state.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        });
    }

    /// Rows to request into L2 during a block, a share per step: `rows` runs of `bytes` bytes,
    /// `stride` apart, from `at` (a hint: any address will do).
    #[derive(Clone, Copy)]
    struct Ahead {
        at: *const u8,
        stride: usize,
        rows: usize,
        bytes: usize,
    }

    impl Ahead {
        const NONE: Ahead = Ahead {
            at: std::ptr::null(),
            stride: 0,
            rows: 0,
            bytes: 0,
        };

        /// Step `s` of `steps`' share: the rows `⌊rows·s/steps⌋ .. ⌊rows·(s+1)/steps⌋`.
        #[inline(always)]
        fn request(self, s: usize, steps: usize) {
            for r in self.rows * s / steps..self.rows * (s + 1) / steps {
                crate::dot::prefetch_l2(self.at.wrapping_add(r * self.stride), self.bytes);
            }
        }
    }

    /// One block of 32 weight rows × 32 tokens over `steps` steps into `sums` (added to the sums
    /// already there where `acc`, else from zero): tile `2i + j` is row group i × token group j,
    /// 16 × 16 f32 as `[row][token]`. Each step also requests its share of `ahead` into L2.
    ///
    /// # Safety
    /// Tiles configured with [`CONFIG`]; `a0`/`a1` address `steps·E::PARTS` weight tiles and
    /// `b0`/`b1` `2·steps` activation tiles each.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<E: Split>(
        a0: *const Tile,
        a1: *const Tile,
        b0: *const Tile,
        b1: *const Tile,
        steps: usize,
        acc: bool,
        ahead: Ahead,
        sums: &mut [Tile; 4],
    ) {
        // SAFETY (each `asm!` below): the tiles are configured (the caller's contract); every
        // `tileloadd` reads a tile the caller says exists, 16 rows 64 bytes apart, or `sums`;
        // the `tilestored`s write the four tiles of `sums`, which this function borrows
        // mutably. Tile registers are not Rust-visible state: the compiler never allocates them.
        const S: usize = 64;
        let o = sums.as_mut_ptr();
        if acc {
            asm!(
                "tileloadd tmm0, [{o0} + {s}*1]",
                "tileloadd tmm1, [{o1} + {s}*1]",
                "tileloadd tmm2, [{o2} + {s}*1]",
                "tileloadd tmm3, [{o3} + {s}*1]",
                o0 = in(reg) o, o1 = in(reg) o.add(1), o2 = in(reg) o.add(2), o3 = in(reg) o.add(3),
                s = in(reg) S,
                options(nostack, readonly, preserves_flags)
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            );
        }
        // One product of a pair of weight tiles by a pair of activation tiles into the four
        // sums, each load placed just before its first use so loads overlap products.
        macro_rules! product {
            ($w0:expr, $w1:expr, $x0:expr, $x1:expr) => {
                asm!(
                    "tileloadd tmm4, [{w0} + {s}*1]",
                    "tileloadd tmm6, [{x0} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{x1} + {s}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{w1} + {s}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    w0 = in(reg) $w0, w1 = in(reg) $w1, x0 = in(reg) $x0, x1 = in(reg) $x1,
                    s = in(reg) S,
                    options(nostack, readonly, preserves_flags)
                )
            };
        }
        for s in 0..steps {
            ahead.request(s, steps);
            let (wh0, wh1) = (a0.add(s * E::PARTS), a1.add(s * E::PARTS));
            let (ah0, ah1) = (b0.add(2 * s), b1.add(2 * s));
            product!(wh0, wh1, ah0, ah1);
            product!(wh0, wh1, ah0.add(1), ah1.add(1));
            if E::PARTS == 2 {
                product!(wh0.add(1), wh1.add(1), ah0, ah1);
            }
        }
        asm!(
            "tilestored [{o0} + {s}*1], tmm0",
            "tilestored [{o1} + {s}*1], tmm1",
            "tilestored [{o2} + {s}*1], tmm2",
            "tilestored [{o3} + {s}*1], tmm3",
            o0 = in(reg) o, o1 = in(reg) o.add(1), o2 = in(reg) o.add(2), o3 = in(reg) o.add(3),
            s = in(reg) S,
            options(nostack, preserves_flags)
        );
    }

    /// A block's sums into `out` (bias added) for the rows and tokens that exist: each tile of
    /// sums transposed to `[token][row]`, then one masked store per token.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW and AVX512-BF16 (the amx level).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")]
    unsafe fn write_block(
        sums: &[Tile; 4],
        r0: usize,
        t0: usize,
        bias: Option<&[f32]>,
        out: &mut [&mut [f32]],
    ) {
        let (tokens, rows) = (out.len(), out[0].len());
        for (k, tile) in sums.iter().enumerate() {
            let (r, t) = (r0 + GROUP * (k / 2), t0 + GROUP * (k % 2));
            if r >= rows || t >= tokens {
                continue;
            }
            let nr = (rows - r).min(GROUP);
            let m = ((1u32 << nr) - 1) as u16;
            let b = match bias {
                Some(b) => _mm512_maskz_loadu_ps(m, b.as_ptr().add(r)),
                None => _mm512_setzero_ps(),
            };
            let f = tile.0.as_ptr().cast::<f32>();
            let v: [__m512; GROUP] = std::array::from_fn(|i| _mm512_load_ps(f.add(i * GROUP)));
            for (i, c) in transpose16(v).into_iter().take(tokens - t).enumerate() {
                let dst = out[t + i].as_mut_ptr().add(r);
                _mm512_mask_storeu_ps(dst, m, _mm512_add_ps(c, b));
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every finite f16 is the sum of its two bf16 parts, exactly.
    #[test]
    fn f16_weights_split_exactly() {
        for bits in 0..=u16::MAX {
            let w = f16::from_bits(bits);
            if !w.is_finite() {
                continue;
            }
            let (hi, lo) = w.parts();
            assert_eq!(widen(hi) + widen(lo), w.to_f32(), "f16 {bits:#06x}");
        }
    }

    /// An activation's parts leave at most 2⁻¹⁶ of it, for magnitudes from 2⁻¹⁰⁰ to f32's
    /// largest short of overflow.
    #[test]
    fn activation_split_leaves_at_most_2_pow_minus_16() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Random sign and mantissa, biased exponent 27..=253.
            let bits = (s as u32 & 0x807F_FFFF) | ((27 + (s >> 32) as u32 % 227) << 23);
            let a = f32::from_bits(bits);
            let (hi, lo) = split(a);
            let rest = (a as f64 - widen(hi) as f64 - widen(lo) as f64).abs();
            assert!(
                rest <= a.abs() as f64 * 2f64.powi(-16),
                "{a:e}: {rest:e} left"
            );
        }
    }

    /// NaN in, NaN parts out (scalar and SIMD), whatever its payload.
    #[test]
    fn nan_stays_nan() {
        for bits in [
            0x7FC0_0000u32,
            0x7FFF_FFFF,
            0xFFFF_FFFF,
            0x7F80_0001,
            0xFF80_8000,
        ] {
            let x = f32::from_bits(bits);
            let (hi, lo) = split(x);
            assert!(
                widen(hi).is_nan() && widen(lo).is_nan(),
                "{bits:#x}: {hi:#x} {lo:#x}"
            );
        }
        let w = [f16::from_bits(0x7FFF), f16::from_bits(0xFE01)];
        for v in w {
            let (hi, _) = v.parts();
            assert!(widen(hi).is_nan(), "f16 {:#x}", v.to_bits());
        }
        if crate::cpu::Isa::Amx.is_supported() {
            let x = vec![f32::from_bits(0x7FFF_FFFF); 32];
            let mut t = vec![Tile([0; 512]); act_tiles(1, 32)];
            lay_out(&x, 32, &mut t);
            assert!(widen(t[0].0[0]).is_nan() && widen(t[1].0[0]).is_nan());
            let w = vec![f16::from_bits(0x7FFF); 32];
            let mut t = vec![Tile([0; 512]); 2];
            pack_group(&w, 32, 0..1, &mut t);
            assert!(widen(t[0].0[0]).is_nan());
        }
    }

    fn bits(t: &[Tile]) -> Vec<u16> {
        t.iter().flat_map(|t| t.0).collect()
    }

    /// The AVX-512 activation layout and weight packing put every part where the references
    /// do, with ragged token counts, rows and columns.
    #[test]
    fn simd_layouts_equal_the_references() {
        if !crate::cpu::Isa::Amx.is_supported() {
            eprintln!("skipped: this CPU or kernel has no AMX-BF16 tiles");
            return;
        }
        let vals = |n: usize, k: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * k)
                .collect()
        };
        for n in [1, 5, 31, 32, 33, 100, 1024] {
            for tokens in [1, 15, 16, 17, 32, 33, 50] {
                let mut x = vals(tokens * n, 0.0137);
                // Edge values where the reference must round as the instruction does: a
                // subnormal (read as zero), its negative, f32's largest (rounds to infinity),
                // a tie, a NaN.
                let edge = [
                    f32::from_bits(0x0000_8001),
                    -f32::from_bits(0x007F_FFFF),
                    f32::MAX,
                    1.0 + 1.0 / 256.0,
                    f32::from_bits(0x7FFF_FFFF),
                ];
                for (v, e) in x.iter_mut().step_by(3).zip(edge) {
                    *v = e;
                }
                let len = act_tiles(tokens, n);
                let (mut want, mut got) = (vec![Tile([1; 512]); len], vec![Tile([2; 512]); len]);
                lay_out_ref(&x, n, &mut want);
                lay_out(&x, n, &mut got);
                assert_eq!(bits(&got), bits(&want), "activations: {tokens} × {n}");
            }
            for rows in [1, 7, 16] {
                let w16: Vec<f16> = vals(rows * n, 0.003)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let len = n.div_ceil(STEP) * 2;
                let (mut want, mut got) = (vec![Tile([1; 512]); len], vec![Tile([2; 512]); len]);
                pack_group_ref(&w16, n, &mut want);
                pack_group(&w16, n, 0..n.div_ceil(STEP), &mut got);
                assert_eq!(bits(&got), bits(&want), "f16 rows: {rows} × {n}");
                let wb: Vec<bf16> = vals(rows * n, 0.003)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect();
                let len = n.div_ceil(STEP);
                let (mut want, mut got) = (vec![Tile([1; 512]); len], vec![Tile([2; 512]); len]);
                pack_group_ref(&wb, n, &mut want);
                pack_group(&wb, n, 0..n.div_ceil(STEP), &mut got);
                assert_eq!(bits(&got), bits(&want), "bf16 rows: {rows} × {n}");
            }
        }
    }
}
