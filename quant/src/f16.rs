//! F16 (and F32/BF16 conversions): one value per "block".

use crate::{BlockFormat, GgmlType};
use half::f16;

// SAFETY: half::f16 is repr(transparent) over u16; every bit pattern is valid.
unsafe impl BlockFormat for f16 {
    const TYPE: GgmlType = GgmlType::F16;
    const BLOCK: usize = 1;
    fn from_float(_x: &[f32], _out: &mut [Self]) {
        todo!("H1: ggml_fp32_to_fp16_row (round to nearest even)")
    }
    fn to_float(_blocks: &[Self], _out: &mut [f32]) {
        todo!("H1")
    }
}
