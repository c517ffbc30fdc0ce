//! Q6_K: 256 values in 16 sub-blocks of 16, 6-bit quants with signed 8-bit scales (6.5625 bpw).

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
    fn from_float(_x: &[f32], _out: &mut [Self]) {
        todo!("H1: quantize_row_q6_K_ref")
    }
    fn to_float(_blocks: &[Self], _out: &mut [f32]) {
        todo!("H1: dequantize_row_q6_K")
    }
}
