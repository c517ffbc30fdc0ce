//! ggml's block formats, their reference quantizers and the dot-product kernels
//! that multiply them — with no knowledge of any model.
//!
//! One file per format (`q8_0.rs`, `q4_k.rs`, …): a `#[repr(C)]` struct that mirrors
//! the bytes on disk, its size asserted at compile time, and a [`BlockFormat`]
//! impl with ggml's reference quantizer (`from_float`) and dequantizer (`to_float`); formats
//! the runtime multiplies also implement [`WeightFormat`] (activation block and kernels per
//! instruction-set level). [`format::FORMATS`] lists every format once. Dot products live in
//! [`dot`] (scalar reference beside the SIMD variants, the level chosen once at run time by
//! [`cpu`]) and whole-matrix products in [`matmul`].

pub mod cpu;
pub mod kscale;
pub mod search;
pub mod types;

pub mod f16;
pub mod float;
pub mod format;
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
pub mod peak;
mod q5_kernels;
pub mod tensor;

pub use format::{format, Format, WeightFormat};
pub use types::GgmlType;

/// Plain data: `#[repr(C)]` or primitive, no padding, no invalid bit patterns, so that
/// zeroed or arbitrary bytes of the right size and alignment are a valid value. Blocks,
/// activation tiles and packed weights are all `Plain`; buffers of them are viewed as bytes
/// and back.
///
/// # Safety
/// Implementors must satisfy the description above.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}

// SAFETY: BlockFormat has the same contract.
unsafe impl<B: BlockFormat> Plain for B {}
// SAFETY: a zero-sized type has no bytes.
unsafe impl Plain for () {}

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
