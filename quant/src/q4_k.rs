//! Q4_K: 256 values in 8 sub-blocks of 32, 4-bit quants with 6-bit scales and mins (4.5 bpw).

use crate::f16::{f16_to_f32, f32_to_f16};
use crate::kscale::{get_scale_min_k4, set_scale_min_k4};
use crate::q8_k::QK_K;
use crate::search::Qkx2Params;
use crate::search::{make_qkx2_quants_superblocks, nearest_int, KX_GROUP};
use crate::search::{QKX2_N, QKX2_Q4K};
use crate::{BlockFormat, GgmlType};
use half::f16;

/// ggml `block_q4_K`: super-scale `d`, super-min `dmin`, 12 bytes of packed 6-bit
/// (scale, min) pairs, then 128 bytes of nibbles.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

// SAFETY: repr(C), 2+2+12+128 bytes with no padding; every bit pattern is valid.
unsafe impl BlockFormat for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    const BLOCK: usize = 256;
    /// `quantize_row_q4_K_ref` (what llama-quantize uses without an imatrix).
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK_K,
            "Q4_K::from_float: length mismatch"
        );
        quantize_kx(x, QKX2_Q4K, |i, (levels, scales, d, dmin)| {
            let b = &mut out[i];
            b.d = d;
            b.dmin = dmin;
            b.scales = scales;
            // Chunk c of 32 bytes: low nibble = element 64c + l, high nibble = 64c + 32 + l.
            for (c, q) in b.qs.chunks_exact_mut(32).enumerate() {
                for (l, byte) in q.iter_mut().enumerate() {
                    *byte = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4);
                }
            }
        });
    }
    /// `dequantize_row_q4_K`: y = (d·sc)·q − dmin·m per 32-value sub-block.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK_K,
            "Q4_K::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            let min = f16_to_f32(b.dmin);
            for (c, (q, y)) in
                b.qs.chunks_exact(32)
                    .zip(y.chunks_exact_mut(64))
                    .enumerate()
            {
                let (sc, m) = get_scale_min_k4(2 * c, &b.scales);
                let (d1, m1) = (d * sc as f32, min * m as f32);
                let (sc, m) = get_scale_min_k4(2 * c + 1, &b.scales);
                let (d2, m2) = (d * sc as f32, min * m as f32);
                let (lo, hi) = y.split_at_mut(32);
                for l in 0..32 {
                    lo[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    hi[l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
    }
}

/// A quantized Q4_K/Q5_K super-block before packing: the levels (0..=nmax, one per value),
/// the packed 6-bit scales and mins, and the fp16 `d` and `dmin`.
pub(crate) type KxBlock = ([u8; QK_K], [u8; 12], f16, f16);

/// The part of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` that the two share, for
/// every super-block of `x` in order: `put(i, block)` receives super-block `i`. The scale
/// searches run [`KX_GROUP`] super-blocks at a time ([`make_qkx2_quants_superblocks`]); a
/// short last group is padded with all-zero super-blocks whose results are dropped.
pub(crate) fn quantize_kx(x: &[f32], p: Qkx2Params, mut put: impl FnMut(usize, KxBlock)) {
    const ZERO: [f32; QK_K] = [0.0; QK_K];
    for (g, xs) in x.chunks(KX_GROUP * QK_K).enumerate() {
        let n = xs.len() / QK_K;
        let blocks: [&[f32; QK_K]; KX_GROUP] = std::array::from_fn(|s| {
            xs.get(s * QK_K..(s + 1) * QK_K)
                .map_or(&ZERO, |b| b.try_into().expect("256-value super-block"))
        });
        let weights: [[f32; QK_K]; KX_GROUP] = std::array::from_fn(|s| kx_weights(blocks[s]));
        let mut levels = [[0u8; QK_K]; KX_GROUP];
        let fits = make_qkx2_quants_superblocks(blocks, weights.each_ref(), p, levels.each_mut());
        for s in 0..n {
            put(
                g * KX_GROUP + s,
                kx_finish(blocks[s], p, fits[s], levels[s]),
            );
        }
    }
}

/// Weight each value by its sub-block's RMS plus its own magnitude: large values matter
/// more, but small ones are not ignored.
fn kx_weights(xs: &[f32; QK_K]) -> [f32; QK_K] {
    let mut w = [0.0f32; QK_K];
    for (ws, xs) in w.chunks_exact_mut(QKX2_N).zip(xs.chunks_exact(QKX2_N)) {
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (wi, &v) in ws.iter_mut().zip(xs) {
            *wi = av_x + v.abs();
        }
    }
    w
}

/// After the search: quantize the 8 scales and 8 mins to 6 bits against the super-block's
/// largest ones, then re-quantize the values with the stored (rounded) scales.
fn kx_finish(
    x: &[f32; QK_K],
    p: Qkx2Params,
    fits: [(f32, f32); QK_K / QKX2_N],
    mut levels: [u8; QK_K],
) -> KxBlock {
    let mut scales = [0.0f32; QK_K / QKX2_N];
    let mut mins = [0.0f32; QK_K / QKX2_N];
    // As the min is subtracted, the scales are never negative.
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for (j, &(scale, min)) in fits.iter().enumerate() {
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..QK_K / QKX2_N {
        // C stores nearest_int's result in a uint8_t (wrapping) before clamping to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        set_scale_min_k4(j, ls, lm, &mut packed);
    }
    let d = f32_to_f16(max_scale / 63.0);
    let dmin = f32_to_f16(max_min / 63.0);

    // Re-quantize against the scales as they will be decoded. A sub-block whose decoded scale
    // is zero keeps the levels from the search, as in ggml.
    let nmax = p.nmax as i32;
    for j in 0..QK_K / QKX2_N {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dj = f16_to_f32(d) * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = f16_to_f32(dmin) * m as f32;
        for ii in 0..QKX2_N {
            let q = nearest_int((x[QKX2_N * j + ii] + dm) / dj);
            levels[QKX2_N * j + ii] = q.clamp(0, nmax) as u8;
        }
    }
    (levels, packed, d, dmin)
}

crate::format::k_quant_weight_format!(BlockQ4K, q4k_q8k, q4k_rows, pack_q4k);
