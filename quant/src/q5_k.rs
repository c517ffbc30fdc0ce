//! Q5_K: Q4_K plus a fifth bit per value (5.5 bpw). llama.cpp's Q4_K_M stores `attn_qkv` in it.

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
    fn from_float(_x: &[f32], _out: &mut [Self]) {
        todo!("H1: quantize_row_q5_K_ref")
    }
    fn to_float(_blocks: &[Self], _out: &mut [f32]) {
        todo!("H1: dequantize_row_q5_K")
    }
}
