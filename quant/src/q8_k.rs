//! Q8_K: the activation format the K-quant dot products consume (never stored in files).

use crate::search::nearest_int;
use crate::{BlockFormat, GgmlType};

/// Values per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// ggml `block_q8_K`: f32 scale, 256 signed bytes in −127..=127, and the sum of each
/// 16-value group (used to apply the K-quants' mins without touching the values).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

// SAFETY: repr(C), 4+256+32 bytes with no padding; every bit pattern is valid.
unsafe impl BlockFormat for BlockQ8K {
    const TYPE: GgmlType = GgmlType::Q8K;
    const BLOCK: usize = 256;
    /// `quantize_row_q8_K_ref`: iscale = −127/max (max = the signed value of largest
    /// magnitude), q = min(127, nearest_int(iscale·x)), d = 1/iscale kept in f32.
    fn from_float(x: &[f32], out: &mut [Self]) {
        assert_eq!(
            x.len(),
            out.len() * QK_K,
            "Q8_K::from_float: length mismatch"
        );
        for (b, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
            let mut max = 0.0f32;
            let mut amax = 0.0f32;
            for &v in x {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                // ggml leaves bsums untouched here; a zeroed block is the only sane content.
                *b = BlockQ8K {
                    d: 0.0,
                    qs: [0; QK_K],
                    bsums: [0; QK_K / 16],
                };
                continue;
            }
            // The largest-magnitude value lands on −127. ggml uses 127 rather than 128 so that
            // every q stays inside ±127, which its AVX kernels rely on (u8×i8 pair sums
            // cannot saturate).
            let iscale = -127.0f32 / max;
            for (q, &v) in b.qs.iter_mut().zip(x) {
                *q = nearest_int(iscale * v).min(127) as i8;
            }
            for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = g.iter().map(|&q| q as i32).sum::<i32>() as i16;
            }
            b.d = 1.0 / iscale;
        }
    }
    /// `dequantize_row_q8_K`: y = d·q.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        assert_eq!(
            out.len(),
            blocks.len() * QK_K,
            "Q8_K::to_float: length mismatch"
        );
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
            for (o, &q) in y.iter_mut().zip(&b.qs) {
                *o = b.d * q as f32;
            }
        }
    }
}
