//! Q4_K: 256 values in 8 sub-blocks of 32, 4-bit quants with 6-bit scales and mins (4.5 bpw).

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
    fn from_float(_x: &[f32], _out: &mut [Self]) {
        todo!("H1: quantize_row_q4_K_ref")
    }
    fn to_float(_blocks: &[Self], _out: &mut [f32]) {
        todo!("H1: dequantize_row_q4_K")
    }
}
