//! Q8_0: 32 values as one fp16 scale and 32 signed bytes (8.5 bits per weight).

use crate::{BlockFormat, GgmlType};
use half::f16;

/// ggml `block_q8_0`: `d` then `qs`; value i = d · qs[i].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

// SAFETY: repr(C), 2 + 32 bytes with no padding; every bit pattern is a valid f16/i8.
unsafe impl BlockFormat for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const BLOCK: usize = 32;
    fn from_float(_x: &[f32], _out: &mut [Self]) {
        todo!("H1: quantize_row_q8_0_ref")
    }
    fn to_float(_blocks: &[Self], _out: &mut [f32]) {
        todo!("H1: dequantize_row_q8_0")
    }
}
