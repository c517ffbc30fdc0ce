//! Q6_K: 256 values in 16 sub-blocks of 16, 6-bit quants with signed 8-bit scales (6.5625 bpw).

use crate::f16::{f16_to_f32, f32_to_f16};
use crate::q8_k::QK_K;
use crate::search::{make_qx_quants_superblock, nearest_int, QX_N};
use crate::{BlockFormat, GgmlType};
use half::f16;

/// ggml `block_q6_K`: low nibbles, high 2-bit pairs, 16 scales, and the super-scale `d` **last**.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

// SAFETY: repr(C), 128+64+16+2 bytes with no padding (d is 2-aligned at offset 208).
unsafe impl BlockFormat for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    const BLOCK: usize = 256;
    /// `quantize_row_q6_K_ref`: a signed scale per 16 values from `make_qx_quants`, the
    /// scales quantized to i8 against the largest one, values re-quantized with the stored
    /// scales.
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK_K,
            "Q6_K::from_float: length mismatch"
        );
        for (b, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
            quantize_block(x, b);
        }
    }
    /// `dequantize_row_q6_K`: y = (d·scale)·(q − 32).
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK_K,
            "Q6_K::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            // Two halves of 128 values, each with 64 ql bytes, 32 qh bytes and 8 scales.
            for h in 0..2 {
                let ql = &b.ql[64 * h..64 * h + 64];
                let qh = &b.qh[32 * h..32 * h + 32];
                let sc = &b.scales[8 * h..8 * h + 8];
                let y = &mut y[128 * h..128 * h + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * sc[is] as f32 * q1 as f32;
                    y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                    y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                    y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
                }
            }
        }
    }
}

/// One super-block of `quantize_row_q6_K_ref`.
fn quantize_block(x: &[f32], b: &mut BlockQ6K) {
    debug_assert_eq!(x.len(), QK_K);
    // Levels 0..=63 (value + 32).
    let mut levels = [0u8; QK_K];
    let xs: &[f32; QK_K] = x.try_into().expect("256-value super-block");
    let scales = make_qx_quants_superblock(xs, 32, &mut levels);
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &scale in &scales {
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }

    if max_abs_scale < 1e-15 {
        // All (nearly) zero: ggml zeroes the whole block, levels included.
        *b = BlockQ6K {
            ql: [0; 128],
            qh: [0; 64],
            scales: [0; 16],
            d: f32_to_f16(0.0),
        };
        return;
    }

    // The sign is chosen so that the largest scale maps to −128, using the full i8 range.
    let iscale = -128.0f32 / max_scale;
    b.d = f32_to_f16(1.0 / iscale);
    for (s, &v) in b.scales.iter_mut().zip(&scales) {
        // C stores MIN(127, int) into an int8_t, which wraps; the value is ≥ −128 anyway.
        *s = nearest_int(iscale * v).min(127) as i8;
    }

    // Re-quantize with the scales as they will be decoded; a zero scale keeps the
    // search's levels, as in ggml.
    let d_block = f16_to_f32(b.d);
    for j in 0..QK_K / QX_N {
        let d = d_block * b.scales[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..QX_N {
            let q = nearest_int(x[QX_N * j + ii] / d).clamp(-32, 31);
            levels[QX_N * j + ii] = (q + 32) as u8;
        }
    }

    // Pack: per half of 128 values, element l and l+64 share ql[l], l+32 and l+96 share
    // ql[l+32]; the top two bits of all four go to qh[l].
    for h in 0..2 {
        let lv = &levels[128 * h..128 * h + 128];
        for l in 0..32 {
            let (a, c, e, g) = (lv[l], lv[l + 32], lv[l + 64], lv[l + 96]);
            b.ql[64 * h + l] = (a & 0xF) | ((e & 0xF) << 4);
            b.ql[64 * h + l + 32] = (c & 0xF) | ((g & 0xF) << 4);
            b.qh[32 * h + l] = (a >> 4) | ((c >> 4) << 2) | ((e >> 4) << 4) | ((g >> 4) << 6);
        }
    }
}

crate::format::k_quant_weight_format!(BlockQ6K, q6k_q8k, q6k_rows, pack_q6k);
