//! Activation quantization: f32 hidden states into the format a weight type's dot product
//! consumes (Q8_K for the K-quants, Q8_0 for Q8_0). Done once per matmul call, not per row.
//!
//! Both functions reproduce ggml's bytes exactly, because the dot products (and so the logits)
//! should be the ones llama.cpp computes:
//! - Q8_K follows `quantize_row_q8_K_ref` (ggml's CPU path uses it too): the signed value of
//!   largest magnitude (the first one on ties) sets `iscale = -127/max`, values round half to
//!   even (ggml's `nearest_int`), `d = 1/iscale`.
//! - Q8_0 follows ggml's *CPU* `quantize_row_q8_0` (what llama.cpp runs), not the `_ref`
//!   quantizer used for weight files: the multiplier is `127/amax` (not `1/(amax/127)`) and
//!   rounding is half to even (`_mm256_round_ps`), not `roundf`'s half away from zero. The two
//!   differ on some values; `tests/fixtures/quant/q8_0.act_quant.bin` (made by ggml's CPU
//!   path) pins this choice (see quant/tests/kernels.rs).
//!
//! A block holding NaN or infinity gets a NaN scale (and zero values), so every product that
//! uses it is NaN: a non-finite activation must reach the logits, where the session reports
//! it, instead of being rounded into a plausible number (ggml's quantizers skip NaN when they
//! look for the largest magnitude). Finite blocks are quantized exactly as ggml does.
//!
//! The loops are written in fixed-width chunks so that the compiler vectorises them with the
//! baseline instruction set; activation quantization is a small fraction of a matmul.

use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use half::f16;

/// Quantize `x` (a whole number of 256-value blocks, `x.len() == out.len() * 256`) to Q8_K.
///
/// # Panics
/// If the lengths disagree (a caller bug, not an input property).
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * 256, "quantize_q8k: length mismatch");
    for (xb, y) in x.chunks_exact(256).zip(out.iter_mut()) {
        quantize_block_q8k(xb.try_into().expect("chunk of 256"), y);
    }
}

/// The largest magnitude in `x` (NaN skipped, as ggml's scan skips it) and whether every
/// value is finite, in one pass.
#[inline(always)]
pub(crate) fn amax_and_finite(x: &[f32]) -> (f32, bool) {
    let (amax, bad) = x.iter().fold((0.0f32, false), |(a, bad), v| {
        (a.max(v.abs()), bad | !v.is_finite())
    });
    (amax, !bad)
}

/// Round to nearest, ties to even, for |v| < 2²²: ggml's `nearest_int`. Adding 1.5·2²³ leaves
/// the rounded integer in the low mantissa bits. Unlike `f32::round_ties_even` (a libm call
/// on baseline x86-64) this is plain float/int arithmetic that vectorises.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline]
fn quantize_block_q8k(x: &[f32; 256], y: &mut BlockQ8K) {
    // Largest magnitude first (vectorisable), then the first element reaching it, which is
    // the one ggml's strict `>` scan keeps.
    // The same pass notes any NaN or infinity (a bitwise OR, which vectorises too).
    let mut lanes = [0.0f32; 16];
    let mut bad = [false; 16];
    for c in x.chunks_exact(16) {
        for ((m, b), v) in lanes.iter_mut().zip(&mut bad).zip(c) {
            *m = m.max(v.abs());
            *b |= !v.is_finite();
        }
    }
    let amax = lanes.iter().fold(0.0f32, |a, &b| a.max(b));
    let finite = !bad.iter().any(|&b| b);
    if amax == 0.0 || !finite {
        // ggml leaves `bsums` untouched for a zero block; zero is the value every consumer
        // expects. A non-finite block gets a NaN scale (see the module comment).
        y.d = if finite { 0.0 } else { f32::NAN };
        y.qs = [0; 256];
        y.bsums = [0; 16];
        return;
    }
    let max = x
        .chunks_exact(16)
        .find(|c| c.iter().fold(false, |hit, v| hit | (v.abs() == amax)))
        .and_then(|c| c.iter().copied().find(|v| v.abs() == amax))
        .unwrap_or(amax);
    let iscale = -127.0f32 / max;
    for (q, v) in y.qs.iter_mut().zip(x) {
        // |iscale·v| ≤ 127·(1+ε): clamped to 127 like ggml, so it fits i8.
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, g) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    y.d = 1.0 / iscale;
}

/// Quantize `x` (`x.len() == out.len() * 32`) to Q8_0 the way ggml's CPU path does.
///
/// # Panics
/// If the lengths disagree (a caller bug, not an input property).
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * 32, "quantize_q8_0: length mismatch");
    for (xb, y) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (amax, finite) = amax_and_finite(xb);
        if !finite {
            y.d = f16::NAN;
            y.qs = [0; 32];
            continue;
        }
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        y.d = f16::from_f32(d);
        for (q, v) in y.qs.iter_mut().zip(xb) {
            // |v·id| ≤ 127·(1+ε) rounds into −127..=127.
            *q = nearest_int(v * id) as i8;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tile layouts for the multi-token (prefill) kernels.
//
// The prefill kernels keep one 16-value group (K-quants) or one 32-value block (Q8_0) per i32
// lane, so that `vpdpbusd` — which sums 4 adjacent byte products into a lane — accumulates a
// whole group in one lane over 4 (or 8) instructions and the per-group scales apply lane-wise
// in f32, with no horizontal work per group. That needs the bytes "dword-transposed": in vector
// k, lane g holds bytes 4k..4k+3 of group g. Activations are stored that way once per matmul
// call (here); weights are packed the same way once per row tile (see `dot`).

/// One Q8_K superblock of activations in tile layout (384 bytes, cache-line aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct Q8KTile {
    /// The 256 quantized values, `qs[64k + 4g + j]` = value `16g + 4k + j`.
    pub qs: [i8; 256],
    /// `d · bsum_g`: each group's sum, scaled (for the K-quant mins and Q6_K's −32 offset).
    pub bsd: [f32; 16],
    /// The block scale `d`.
    pub d: f32,
    _pad: [f32; 15],
}
const _: () = assert!(std::mem::size_of::<Q8KTile>() == 384);

impl Q8KTile {
    /// An all-zero tile (no activation, contributes nothing).
    pub const ZERO: Q8KTile = Q8KTile {
        qs: [0; 256],
        bsd: [0.0; 16],
        d: 0.0,
        _pad: [0.0; 15],
    };

    /// The same quantized values as `b`, rearranged (no re-quantization).
    pub fn from_block(b: &BlockQ8K) -> Q8KTile {
        let mut t = Q8KTile::ZERO;
        for g in 0..16 {
            for k in 0..4 {
                let (src, dst) = (16 * g + 4 * k, 64 * k + 4 * g);
                t.qs[dst..dst + 4].copy_from_slice(&b.qs[src..src + 4]);
            }
            t.bsd[g] = b.d * b.bsums[g] as f32;
        }
        t.d = b.d;
        t
    }
}

/// Quantize `x` (`x.len() == out.len() * 256`) to Q8_K (same values as [`quantize_q8k`]) in
/// tile layout.
pub fn quantize_q8k_tile(x: &[f32], out: &mut [Q8KTile]) {
    assert_eq!(
        x.len(),
        out.len() * 256,
        "quantize_q8k_tile: length mismatch"
    );
    let mut b = [BlockQ8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    }];
    for (xb, t) in x.chunks_exact(256).zip(out.iter_mut()) {
        quantize_q8k(xb, &mut b);
        *t = Q8KTile::from_block(&b[0]);
    }
}

/// Sixteen Q8_0 blocks (512 values) of activations in tile layout (640 bytes).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct Q8_0Tile {
    /// `qs[64k + 4b + j]` = byte `4k + j` of block b.
    pub qs: [i8; 512],
    /// Each block's scale as f32 (0 for padding blocks past the end of the row).
    pub d: [f32; 16],
    /// −128 · Σ qs of each block: the kernels multiply `w + 128` (unsigned) by the
    /// activations and start each lane from this to cancel the offset exactly.
    pub ncorr: [i32; 16],
}
const _: () = assert!(std::mem::size_of::<Q8_0Tile>() == 640);

impl Q8_0Tile {
    /// An all-zero tile.
    pub const ZERO: Q8_0Tile = Q8_0Tile {
        qs: [0; 512],
        d: [0.0; 16],
        ncorr: [0; 16],
    };
}

/// Tiles per row of `n_blocks` Q8_0 blocks (the last tile zero-padded).
pub const fn q8_0_tiles(n_blocks: usize) -> usize {
    n_blocks.div_ceil(16)
}

/// Quantize one row `x` (`x.len()` a multiple of 32) to Q8_0 (same values as
/// [`quantize_q8_0`]) in tile layout; `out.len()` must be `q8_0_tiles(x.len() / 32)`.
pub fn quantize_q8_0_tile(x: &[f32], out: &mut [Q8_0Tile]) {
    let nb = x.len() / 32;
    assert!(
        x.len().is_multiple_of(32) && out.len() == q8_0_tiles(nb),
        "quantize_q8_0_tile: length mismatch"
    );
    let mut blocks = [BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }; 16];
    for (xt, t) in x.chunks(512).zip(out.iter_mut()) {
        let n = xt.len() / 32;
        quantize_q8_0(xt, &mut blocks[..n]);
        *t = Q8_0Tile::ZERO;
        for (b, blk) in blocks[..n].iter().enumerate() {
            for k in 0..8 {
                let dst = 64 * k + 4 * b;
                t.qs[dst..dst + 4].copy_from_slice(&blk.qs[4 * k..4 * k + 4]);
            }
            t.d[b] = blk.d.to_f32();
            t.ncorr[b] = -128 * blk.qs.iter().map(|&q| q as i32).sum::<i32>();
        }
    }
}

// SAFETY: repr(C) arrays of integers and floats, sizes asserted above (no padding beyond the
// explicit `_pad`), valid for every bit pattern.
unsafe impl crate::Plain for Q8KTile {}
// SAFETY: as above.
unsafe impl crate::Plain for Q8_0Tile {}
