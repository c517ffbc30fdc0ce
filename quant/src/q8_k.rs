//! Q8_K: the activation format the K-quant dot products consume (never stored in files).

use crate::{BlockFormat, GgmlType};

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
    fn from_float(_x: &[f32], _out: &mut [Self]) {
        todo!("H1: quantize_row_q8_K_ref")
    }
    fn to_float(_blocks: &[Self], _out: &mut [f32]) {
        todo!("H1: dequantize_row_q8_K")
    }
}
