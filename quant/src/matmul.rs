//! Weight × activation products for whole matrices: matrix-vector for decode, matrix-matrix
//! (tiled over tokens) for prefill, threaded with rayon. Activations are quantized once per call
//! into the weight type's dot-product format (Q8_K for K-quants, Q8_0 for Q8_0, F16 for F16).
//! (H2 owns this module; the signatures below are the contract the model code uses.)

use crate::GgmlType;

/// A row-major weight matrix in a ggml type, borrowed (usually from an mmapped GGUF):
/// `rows` rows (output features) of `cols` values (input features, contiguous, blocked).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

/// Reusable buffers (quantized activations, per-thread tiles) so that steady-state
/// decoding does not allocate.
#[derive(Default)]
pub struct Scratch {
    pub act: Vec<u8>,
}

/// `y[t * w.rows + r] = dot(W[r, :], x[t * w.cols ..][..w.cols]) (+ bias[r])` for `t` in `0..n_tokens`.
pub fn matmul(
    _w: &QMatrix<'_>,
    _x: &[f32],
    _n_tokens: usize,
    _bias: Option<&[f32]>,
    _y: &mut [f32],
    _scratch: &mut Scratch,
) {
    todo!("H2")
}
