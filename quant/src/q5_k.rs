//! Q5_K: Q4_K plus a fifth bit per value (5.5 bpw). llama.cpp's Q4_K_M stores `attn_qkv` in it.

use crate::f16::f16_to_f32;
use crate::kscale::get_scale_min_k4;
use crate::q4_k::quantize_kx;
use crate::q8_k::QK_K;
use crate::search::QKX2_Q5K;
use crate::{BlockFormat, GgmlType};
use half::f16;

/// ggml `block_q5_K`: `d`, `dmin`, packed scales, `qh` (5th bits), `qs` (low nibbles).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

// SAFETY: repr(C), 2+2+12+32+128 bytes with no padding; every bit pattern is valid.
unsafe impl BlockFormat for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    const BLOCK: usize = 256;
    /// `quantize_row_q5_K_ref`: Q4_K's algorithm with 5-bit levels and a shorter search.
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK_K,
            "Q5_K::from_float: length mismatch"
        );
        quantize_kx(x, QKX2_Q5K, |i, (levels, scales, d, dmin)| {
            let b = &mut out[i];
            b.d = d;
            b.dmin = dmin;
            b.scales = scales;
            b.qh = [0; 32];
            // Chunk c covers elements 64c..64c+64: nibbles as in Q4_K, and the 5th bits of the
            // two halves go to bits 2c and 2c+1 of qh[l].
            for (c, q) in b.qs.chunks_exact_mut(32).enumerate() {
                for (l, byte) in q.iter_mut().enumerate() {
                    let l1 = levels[64 * c + l];
                    let l2 = levels[64 * c + 32 + l];
                    b.qh[l] |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1));
                    *byte = (l1 & 0xF) | ((l2 & 0xF) << 4);
                }
            }
        });
    }
    /// `dequantize_row_q5_K`: y = (d·sc)·(q + 16·bit) − dmin·m.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK_K,
            "Q5_K::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            let d = f16_to_f32(b.d);
            let min = f16_to_f32(b.dmin);
            for (c, (ql, y)) in
                b.qs.chunks_exact(32)
                    .zip(y.chunks_exact_mut(64))
                    .enumerate()
            {
                let (sc, m) = get_scale_min_k4(2 * c, &b.scales);
                let (d1, m1) = (d * sc as f32, min * m as f32);
                let (sc, m) = get_scale_min_k4(2 * c + 1, &b.scales);
                let (d2, m2) = (d * sc as f32, min * m as f32);
                let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                let (lo, hi) = y.split_at_mut(32);
                for l in 0..32 {
                    let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                    lo[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                    hi[l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
    }
}

crate::format::k_quant_weight_format!(BlockQ5K, q5k_q8k, q5k_rows, pack_q5k);
