//! ggml's block formats, their reference quantizers and the dot-product kernels
//! that multiply them — with no knowledge of any model.
//!
//! One file per format (`q8_0.rs`, `q4_k.rs`, …): a `#[repr(C)]` struct that mirrors
//! the bytes on disk, its size asserted at compile time, and a [`BlockFormat`]
//! impl with ggml's reference quantizer (`from_float`) and dequantizer (`to_float`).
//! Dot products live in [`dot`] (scalar reference beside the SIMD variants, chosen
//! once at run time) and whole-matrix products in [`matmul`].

pub mod types;
pub mod util;

pub mod f16;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod q8_1;
pub mod q8_k;

pub mod act;
pub mod dot;
pub mod matmul;
mod q5_kernels;
pub mod tensor;

pub use types::GgmlType;

/// A ggml block format: a fixed-size group of `BLOCK` values stored in `size_of::<Self>()` bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]` plain data with no padding and no invalid bit
/// patterns, so that a byte slice of the right length and alignment may be viewed
/// as a slice of blocks (see [`tensor::cast_blocks`]).
pub unsafe trait BlockFormat: Copy + Send + Sync + 'static {
    /// The ggml type code this block represents.
    const TYPE: GgmlType;
    /// Number of values in one block.
    const BLOCK: usize;
    /// Reference quantizer, equal byte for byte to ggml's `quantize_row_*_ref`.
    /// `x.len()` must be `out.len() * BLOCK`.
    fn from_float(x: &[f32], out: &mut [Self]);
    /// Dequantizer, equal bit for bit to ggml's `dequantize_row_*`.
    /// `out.len()` must be `blocks.len() * BLOCK`.
    fn to_float(blocks: &[Self], out: &mut [f32]);
}
