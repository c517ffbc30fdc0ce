//! The float weight formats F32, F16 and BF16: one value per "block", multiplied with the f32
//! activations directly (no activation quantization, for accuracy). F16's conversions live in
//! [`crate::f16`].

use crate::cpu::{Isa, Level};
use crate::dot::scalar;
use crate::f16::{bf16_to_f32_row, f16_to_f32_row, f32_to_bf16_row, f32_to_f16_row};
use crate::format::{Kernels, WeightFormat};
use crate::{matmul, BlockFormat, GgmlType};
use half::{bf16, f16};

// SAFETY: f32 is primitive; every bit pattern is valid.
unsafe impl BlockFormat for f32 {
    const TYPE: GgmlType = GgmlType::F32;
    const BLOCK: usize = 1;
    fn from_float(x: &[f32], out: &mut [Self]) {
        out.copy_from_slice(x);
    }
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        out.copy_from_slice(blocks);
    }
}

// SAFETY: half::f16 is repr(transparent) over u16; every bit pattern is valid.
unsafe impl BlockFormat for f16 {
    const TYPE: GgmlType = GgmlType::F16;
    const BLOCK: usize = 1;
    /// `ggml_fp32_to_fp16_row`.
    fn from_float(x: &[f32], out: &mut [Self]) {
        f32_to_f16_row(x, out);
    }
    /// `ggml_fp16_to_fp32_row`.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        f16_to_f32_row(blocks, out);
    }
}

// SAFETY: half::bf16 is repr(transparent) over u16; every bit pattern is valid.
unsafe impl BlockFormat for bf16 {
    const TYPE: GgmlType = GgmlType::BF16;
    const BLOCK: usize = 1;
    /// `ggml_fp32_to_bf16_row_ref`.
    fn from_float(x: &[f32], out: &mut [Self]) {
        f32_to_bf16_row(x, out);
    }
    /// `ggml_bf16_to_fp32_row`.
    fn to_float(blocks: &[Self], out: &mut [f32]) {
        bf16_to_f32_row(blocks, out);
    }
}

/// The float formats' shared [`WeightFormat`] body: f32 activations, not quantized (laid out
/// for the outer-product tile by the matmul driver on prompts, `dot::outer`).
macro_rules! float_format {
    ($t:ty, $dot:ident, $gemm:ident, $outer:ident, $amx:expr) => {
        impl WeightFormat for $t {
            type Act = f32;
            type Packed = ();
            fn quantize_act(x: &[f32], out: &mut [f32]) {
                out.copy_from_slice(x);
            }
            /// `x` itself when it starts on a cache line, else a copy that does: the tile
            /// kernels load 64 bytes at a time, and a load that straddles two lines costs two
            /// (docs/kernels.md). The model's activations are page-aligned and never copied.
            fn activations<'a>(
                x: &'a [f32],
                _: usize,
                buf: &'a mut Vec<matmul::Line>,
            ) -> &'a [f32] {
                if (x.as_ptr() as usize).is_multiple_of(64) {
                    return x;
                }
                let copy = matmul::typed_buf::<f32>(buf, x.len());
                copy.copy_from_slice(x);
                copy
            }
            fn kernels(level: Level) -> Kernels<Self> {
                #[cfg(target_arch = "aarch64")]
                use crate::dot::neon;
                #[cfg(target_arch = "x86_64")]
                use crate::dot::{avx2, avx2_tile, avx512};
                let (dot, tile): (fn(&[$t], &[f32]) -> f32, _) = match level.isa() {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => (
                        avx2::$dot,
                        Some(crate::format::Tile::Outer {
                            few: avx2_tile::$gemm,
                            many: avx2_tile::$outer,
                            layout: avx2_tile::LAYOUT,
                            amx: None,
                        }),
                    ),
                    // The float kernels use no VNNI instruction: one build serves the AVX-512
                    // levels, and at `amx` prompts with F16/BF16 weights go to the tiles.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 | Isa::Avx512Vnni | Isa::Amx => (
                        avx512::float::$dot,
                        Some(crate::format::Tile::Outer {
                            few: avx512::float::$gemm,
                            many: avx512::float::$outer,
                            layout: avx512::float::LAYOUT,
                            amx: if level.isa() == Isa::Amx { $amx } else { None },
                        }),
                    ),
                    #[cfg(target_arch = "aarch64")]
                    Isa::Neon => (neon::plain::$dot, None),
                    #[cfg(target_arch = "aarch64")]
                    Isa::NeonDot => (neon::dot::$dot, None),
                    _ => (scalar::$dot, None),
                };
                Kernels { dot, tile }
            }
        }
    };
}

// F32 weights stay on the FMA tiles at `amx`: splitting 24 bits into bf16 parts takes three
// of them per operand.
float_format!(f32, f32_f32, f32_gemm, f32_outer, None);
float_format!(
    f16,
    f16_f32,
    f16_gemm,
    f16_outer,
    Some(crate::dot::amx::gemm::<f16> as crate::format::GemmFn<_, _>)
);
float_format!(
    bf16,
    bf16_f32,
    bf16_gemm,
    bf16_outer,
    Some(crate::dot::amx::gemm::<bf16> as crate::format::GemmFn<_, _>)
);
