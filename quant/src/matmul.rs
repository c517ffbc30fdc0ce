//! Weight × activation products for whole matrices: matrix-vector for decode, matrix-matrix
//! (tiled over tokens) for prefill, threaded with rayon. Activations are quantized once per call
//! into the weight type's dot-product format (Q8_K for K-quants, Q8_0 for Q8_0 and Q5_0, Q8_1
//! for Q5_1; F16, BF16 and
//! F32 weights are multiplied with the f32 activations directly, for accuracy).
//!
//! Shapes (llm.c style): W is (OC, C) row-major — `rows` = OC output features of `cols` = C
//! input features; x is (T, C) and y is (T, OC), both token-major: `y[t * OC + oc]`.
//!
//! Threads are rayon's current pool (the CLI sizes it with `-t`).

use crate::act::{Q8KTile, Q8_0Tile};
use crate::dot::{self, DotFn, KPacked, Kernels, Q8_0Packed, TileKernels};
use crate::q4_k::BlockQ4K;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use crate::{act, GgmlType};
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;
use std::fmt;

/// A row-major weight matrix in a ggml type, borrowed (usually from an mmapped GGUF):
/// `rows` rows (output features) of `cols` values (input features, contiguous, blocked).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

/// Why a byte range cannot be used as a [`QMatrix`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MatrixError {
    /// The runtime has no kernels for this type.
    UnsupportedType(GgmlType),
    /// `cols` is not a whole number of blocks of the type.
    RaggedRow { ty: GgmlType, cols: usize },
    /// The data is not `rows × row_bytes` long.
    WrongSize { expected: Option<u64>, found: usize },
    /// The data does not start at an address aligned for the block type.
    Misaligned { ty: GgmlType, align: usize },
    /// `rows` or `cols` is zero.
    Empty,
}

impl fmt::Display for MatrixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatrixError::UnsupportedType(t) => write!(f, "no matmul kernels for weight type {t}"),
            MatrixError::RaggedRow { ty, cols } => write!(
                f,
                "row length {cols} is not a multiple of the {ty} block size {}",
                ty.block_size()
            ),
            MatrixError::WrongSize {
                expected: Some(e),
                found,
            } => {
                write!(f, "weight data is {found} bytes, expected {e}")
            }
            MatrixError::WrongSize {
                expected: None,
                found,
            } => {
                write!(f, "weight data is {found} bytes; the shape overflows")
            }
            MatrixError::Misaligned { ty, align } => {
                write!(f, "{ty} weight data is not {align}-byte aligned")
            }
            MatrixError::Empty => write!(f, "weight matrix has no rows or no columns"),
        }
    }
}

impl std::error::Error for MatrixError {}

impl<'a> QMatrix<'a> {
    /// Check that `data` holds exactly `rows × cols` values of `ty`, suitably aligned, and
    /// that the runtime can multiply it. Use this on anything read from a file: [`matmul`]
    /// treats a malformed matrix as a caller bug and panics.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, MatrixError> {
        let m = QMatrix {
            ty,
            rows,
            cols,
            data,
        };
        m.validate()?;
        Ok(m)
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// The checks of [`QMatrix::new`].
    pub fn validate(&self) -> Result<(), MatrixError> {
        let ty = self.ty;
        let align = match ty {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 => 2,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 2,
            GgmlType::Q5_0 | GgmlType::Q5_1 => 2,
            t => return Err(MatrixError::UnsupportedType(t)),
        };
        if self.rows == 0 || self.cols == 0 {
            return Err(MatrixError::Empty);
        }
        if !self.cols.is_multiple_of(ty.block_size()) {
            return Err(MatrixError::RaggedRow {
                ty,
                cols: self.cols,
            });
        }
        let expected = ty
            .row_bytes(self.cols as u64)
            .and_then(|rb| rb.checked_mul(self.rows as u64));
        if expected != Some(self.data.len() as u64) {
            return Err(MatrixError::WrongSize {
                expected,
                found: self.data.len(),
            });
        }
        if !(self.data.as_ptr() as usize).is_multiple_of(align) {
            return Err(MatrixError::Misaligned { ty, align });
        }
        Ok(())
    }
}

/// Reusable buffers (quantized activations, per-chunk outputs) so that steady-state decoding
/// does not allocate: they grow to the largest call seen and are then reused.
#[derive(Default)]
pub struct Scratch {
    q8k: Vec<BlockQ8K>,
    q8_0: Vec<BlockQ8_0>,
    q8_1: Vec<crate::q8_1::BlockQ8_1>,
    q8k_tile: Vec<Q8KTile>,
    q8_0_tile: Vec<Q8_0Tile>,
    out: Vec<f32>,
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scratch")
            .field("q8k_blocks", &self.q8k.len())
            .field("q8_0_blocks", &self.q8_0.len())
            .field("out", &self.out.len())
            .finish()
    }
}

impl Scratch {
    /// Heap bytes held (for memory reports).
    pub fn bytes(&self) -> usize {
        self.q8k.capacity() * std::mem::size_of::<BlockQ8K>()
            + self.q8_0.capacity() * std::mem::size_of::<BlockQ8_0>()
            + self.q8_1.capacity() * std::mem::size_of::<crate::q8_1::BlockQ8_1>()
            + self.q8k_tile.capacity() * std::mem::size_of::<Q8KTile>()
            + self.q8_0_tile.capacity() * std::mem::size_of::<Q8_0Tile>()
            + self.out.capacity() * 4
    }
}

/// Plain-data element types a weight row can be viewed as.
///
/// # Safety
/// Implementors must be `#[repr(C)]`/primitive with no padding and no invalid bit patterns.
unsafe trait Pod: Copy + Sync + 'static {}
// SAFETY: all are repr(C) or primitive, without padding, valid for every bit pattern.
unsafe impl Pod for BlockQ4K {}
// SAFETY: as above.
unsafe impl Pod for BlockQ5K {}
// SAFETY: as above.
unsafe impl Pod for BlockQ6K {}
// SAFETY: as above.
unsafe impl Pod for BlockQ8_0 {}
// SAFETY: f16/bf16 are repr(transparent) over u16.
unsafe impl Pod for f16 {}
// SAFETY: as above.
unsafe impl Pod for bf16 {}
// SAFETY: primitive.
unsafe impl Pod for f32 {}

/// View `bytes` as `[T]`; `None` if the length or alignment does not fit.
fn cast<T: Pod>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: length and alignment checked above; T is plain data valid for any bytes
    // (Pod), and the result borrows `bytes` so it cannot outlive or alias a mutable use.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// `y[t * w.rows + r] = dot(W[r, :], x[t * w.cols ..][..w.cols]) (+ bias[r])` for `t` in `0..n_tokens`.
///
/// # Panics
/// On a malformed matrix (see [`QMatrix::new`], which callers use to validate file data) or
/// if `x`, `y` or `bias` do not have the lengths the shapes imply.
pub fn matmul(
    w: &QMatrix<'_>,
    x: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    matmul_with(dot::kernels(), w, x, n_tokens, bias, y, scratch)
}

/// [`matmul`] with an explicit kernel table (tests compare instruction sets with it).
pub fn matmul_with(
    k: &Kernels,
    w: &QMatrix<'_>,
    x: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    if let Err(e) = w.validate() {
        panic!(
            "matmul: invalid weight matrix ({} × {}): {e}",
            w.rows, w.cols
        );
    }
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "matmul: x must be n_tokens × cols"
    );
    assert_eq!(
        y.len(),
        n_tokens * rows,
        "matmul: y must be n_tokens × rows"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), rows, "matmul: bias must have one value per row");
    }
    if n_tokens == 0 {
        return;
    }
    // Q5_0/Q5_1 have no tile kernels: their rows are dotted one by one below.
    let has_tiles = !matches!(w.ty, GgmlType::Q5_0 | GgmlType::Q5_1);
    if n_tokens >= TILE_MIN_TOKENS && has_tiles {
        if let Some(tk) = k.tile {
            tiled(tk, w, x, n_tokens, bias, y, scratch);
            return;
        }
    }
    let bad = || -> ! { unreachable!("validated above") };
    let out = &mut scratch.out;
    match w.ty {
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let nb = cols / 256;
            scratch.q8k.resize(n_tokens * nb, ZERO_Q8K);
            let act = &mut scratch.q8k[..n_tokens * nb];
            quantize_rows(x, act, cols, act::quantize_q8k);
            let act: &[BlockQ8K] = act;
            match w.ty {
                GgmlType::Q4K => {
                    let wb = cast::<BlockQ4K>(w.data).unwrap_or_else(|| bad());
                    run(wb, act, nb, nb, n_tokens, rows, bias, y, out, k.q4k_q8k)
                }
                GgmlType::Q5K => {
                    let wb = cast::<BlockQ5K>(w.data).unwrap_or_else(|| bad());
                    run(wb, act, nb, nb, n_tokens, rows, bias, y, out, k.q5k_q8k)
                }
                _ => {
                    let wb = cast::<BlockQ6K>(w.data).unwrap_or_else(|| bad());
                    run(wb, act, nb, nb, n_tokens, rows, bias, y, out, k.q6k_q8k)
                }
            }
        }
        GgmlType::Q8_0 => {
            let nb = cols / 32;
            scratch.q8_0.resize(n_tokens * nb, ZERO_Q8_0);
            let act = &mut scratch.q8_0[..n_tokens * nb];
            quantize_rows(x, act, cols, act::quantize_q8_0);
            let wb = cast::<BlockQ8_0>(w.data).unwrap_or_else(|| bad());
            run(wb, act, nb, nb, n_tokens, rows, bias, y, out, k.q8_0_q8_0)
        }
        GgmlType::Q5_0 => {
            let nb = cols / 32;
            scratch.q8_0.resize(n_tokens * nb, ZERO_Q8_0);
            let act = &mut scratch.q8_0[..n_tokens * nb];
            quantize_rows(x, act, cols, act::quantize_q8_0);
            let wb = crate::tensor::cast_blocks(w.data).unwrap_or_else(|| bad());
            let dot = crate::q5_0::dot_kernel(k.isa);
            run(wb, act, nb, nb, n_tokens, rows, bias, y, out, dot)
        }
        GgmlType::Q5_1 => {
            let nb = cols / 32;
            scratch
                .q8_1
                .resize(n_tokens * nb, crate::q8_1::BlockQ8_1::ZERO);
            let act = &mut scratch.q8_1[..n_tokens * nb];
            quantize_rows(x, act, cols, crate::q8_1::quantize_q8_1);
            let wb = crate::tensor::cast_blocks(w.data).unwrap_or_else(|| bad());
            let dot = crate::q5_1::dot_kernel(k.isa);
            run(wb, act, nb, nb, n_tokens, rows, bias, y, out, dot)
        }
        GgmlType::F16 => {
            let wb = cast::<f16>(w.data).unwrap_or_else(|| bad());
            run(wb, x, cols, cols, n_tokens, rows, bias, y, out, k.f16_f32)
        }
        GgmlType::BF16 => {
            let wb = cast::<bf16>(w.data).unwrap_or_else(|| bad());
            run(wb, x, cols, cols, n_tokens, rows, bias, y, out, k.bf16_f32)
        }
        GgmlType::F32 => {
            let wb = cast::<f32>(w.data).unwrap_or_else(|| bad());
            run(wb, x, cols, cols, n_tokens, rows, bias, y, out, k.f32_f32)
        }
        _ => bad(),
    }
}

const ZERO_Q8K: BlockQ8K = BlockQ8K {
    d: 0.0,
    qs: [0; 256],
    bsums: [0; 16],
};
const ZERO_Q8_0: BlockQ8_0 = BlockQ8_0 {
    d: f16::ZERO,
    qs: [0; 32],
};

/// Quantize each token's activation row (in parallel over tokens when there are several).
fn quantize_rows<A: Send>(x: &[f32], act: &mut [A], cols: usize, q: fn(&[f32], &mut [A])) {
    let nb = act.len() / (x.len() / cols);
    if x.len() == cols {
        q(x, act);
    } else {
        x.par_chunks(cols)
            .zip(act.par_chunks_mut(nb))
            .for_each(|(xr, ar)| q(xr, ar));
    }
}

/// Rows per work item when splitting a matrix over threads: a few items per thread so that
/// rayon can balance uneven cores, but coarse enough that the ~100 calls per decoded token
/// spend little on scheduling.
fn row_chunk(rows: usize) -> usize {
    let items = rayon::current_num_threads().max(1) * 4;
    rows.div_ceil(items).max(16)
}

/// The threaded driver, generic over weight element `W` and activation element `A`.
/// `wb`/`ab` are the elements per weight/activation row.
#[allow(clippy::too_many_arguments)]
fn run<W: Sync, A: Sync>(
    w: &[W],
    act: &[A],
    wb: usize,
    ab: usize,
    n_tokens: usize,
    rows: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    out: &mut Vec<f32>,
    dot: DotFn<W, A>,
) {
    debug_assert_eq!(w.len(), rows * wb);
    debug_assert_eq!(act.len(), n_tokens * ab);
    let chunk = row_chunk(rows);
    let b = |r: usize| bias.map_or(0.0, |b| b[r]);
    if n_tokens == 1 {
        // Decode: y is one row; each item owns a contiguous run of it.
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, yc)| {
            let r0 = c * chunk;
            for (i, yr) in yc.iter_mut().enumerate() {
                let r = r0 + i;
                *yr = dot(&w[r * wb..(r + 1) * wb], act) + b(r);
            }
        });
        return;
    }
    // Several tokens: each item takes a run of weight rows and dots it with every token, so
    // each weight row is loaded once per call. Results go to a chunk-major buffer (an item's
    // outputs are strided in y) and are then scattered into y token by token.
    out.resize(rows * n_tokens, 0.0);
    out.par_chunks_mut(chunk * n_tokens)
        .enumerate()
        .for_each(|(c, oc)| {
            let r0 = c * chunk;
            let len = oc.len() / n_tokens;
            for i in 0..len {
                let r = r0 + i;
                let wr = &w[r * wb..(r + 1) * wb];
                for t in 0..n_tokens {
                    oc[t * len + i] = dot(wr, &act[t * ab..(t + 1) * ab]) + b(r);
                }
            }
        });
    let out: &[f32] = out;
    y.par_chunks_mut(rows).enumerate().for_each(|(t, yt)| {
        for (c, yc) in yt.chunks_mut(chunk).enumerate() {
            let len = yc.len();
            let base = c * chunk * n_tokens;
            yc.copy_from_slice(&out[base + t * len..base + (t + 1) * len]);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Prefill: weight tiles packed once, multiplied with many tokens.

/// From this many tokens on, levels with [`TileKernels`] pack weights and use register tiles;
/// below it, packing would cost more than it saves and rows are dotted one by one.
const TILE_MIN_TOKENS: usize = 4;

/// Bytes of packed weights a work item aims for: a row tile stays in the 1 MiB L2 while the
/// tokens stream past it.
const TILE_BYTES: usize = 192 << 10;

thread_local! {
    // Per-worker packing buffers, grown once and reused across calls.
    static PACK_K: RefCell<Vec<KPacked>> = const { RefCell::new(Vec::new()) };
    static PACK_Q8_0: RefCell<Vec<Q8_0Packed>> = const { RefCell::new(Vec::new()) };
}

/// Rows per work item: about `TILE_BYTES` of packed rows, but at least 4 items per thread
/// when the matrix allows, so rayon can balance; a multiple of 4 (the float kernels' rows).
fn tile_rows(rows: usize, packed_row_bytes: usize) -> usize {
    let by_cache = (TILE_BYTES / packed_row_bytes.max(1)).max(4);
    let by_threads = rows.div_ceil(rayon::current_num_threads().max(1) * 4);
    by_cache
        .min(by_threads)
        .max(4)
        .next_multiple_of(4)
        .min(rows.next_multiple_of(4))
}

/// Per-item output slices, item-major: entry `b * n_tokens + t` is token t's run of rows
/// `b * rb ..` in y. (Two small allocations per call; prefill only.)
fn split_out(y: &mut [f32], rows: usize, rb: usize) -> Vec<&mut [f32]> {
    let mut per_token: Vec<_> = y.chunks_mut(rows).map(|yt| yt.chunks_mut(rb)).collect();
    let n_tokens = per_token.len();
    let mut out = Vec::with_capacity(rows.div_ceil(rb) * n_tokens);
    for _ in 0..rows.div_ceil(rb) {
        for it in per_token.iter_mut() {
            out.extend(it.next());
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn tiled(
    tk: &TileKernels,
    w: &QMatrix<'_>,
    x: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let (rows, cols) = (w.rows, w.cols);
    let bad = || -> ! { unreachable!("validated by matmul_with") };
    let bias_for = |r0: usize, n: usize| bias.map(|b| &b[r0..r0 + n]);
    match w.ty {
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            let nb = cols / 256;
            scratch.q8k_tile.resize(n_tokens * nb, Q8KTile::ZERO);
            let act = &mut scratch.q8k_tile[..n_tokens * nb];
            quantize_rows(x, act, cols, act::quantize_q8k_tile);
            let act: &[Q8KTile] = act;
            let rb = tile_rows(rows, nb * std::mem::size_of::<KPacked>());
            // Pack a row tile with `pack`, then multiply it with every token.
            let mut run = |pack: &(dyn Fn(usize, &mut [KPacked]) + Sync)| {
                let mut out = split_out(y, rows, rb);
                out.par_chunks_mut(n_tokens)
                    .enumerate()
                    .for_each(|(b, out)| {
                        let (r0, nr) = (b * rb, out[0].len());
                        PACK_K.with(|buf| {
                            let mut buf = buf.borrow_mut();
                            buf.resize(nr * nb, KPacked::ZERO);
                            for (r, p) in buf[..nr * nb].chunks_exact_mut(nb).enumerate() {
                                pack(r0 + r, p);
                            }
                            (tk.kq)(&buf[..nr * nb], act, nb, bias_for(r0, nr), out);
                        });
                    });
            };
            match w.ty {
                GgmlType::Q4K => {
                    let wb = cast::<BlockQ4K>(w.data).unwrap_or_else(|| bad());
                    run(&|r, p| (tk.pack_q4k)(&wb[r * nb..(r + 1) * nb], p))
                }
                GgmlType::Q5K => {
                    let wb = cast::<BlockQ5K>(w.data).unwrap_or_else(|| bad());
                    run(&|r, p| (tk.pack_q5k)(&wb[r * nb..(r + 1) * nb], p))
                }
                _ => {
                    let wb = cast::<BlockQ6K>(w.data).unwrap_or_else(|| bad());
                    run(&|r, p| (tk.pack_q6k)(&wb[r * nb..(r + 1) * nb], p))
                }
            }
        }
        GgmlType::Q8_0 => {
            let nb = cols / 32;
            let nt = act::q8_0_tiles(nb);
            scratch.q8_0_tile.resize(n_tokens * nt, Q8_0Tile::ZERO);
            let act = &mut scratch.q8_0_tile[..n_tokens * nt];
            if n_tokens == 1 {
                act::quantize_q8_0_tile(x, act);
            } else {
                x.par_chunks(cols)
                    .zip(act.par_chunks_mut(nt))
                    .for_each(|(xr, ar)| act::quantize_q8_0_tile(xr, ar));
            }
            let act: &[Q8_0Tile] = act;
            let wb = cast::<BlockQ8_0>(w.data).unwrap_or_else(|| bad());
            let rb = tile_rows(rows, nt * std::mem::size_of::<Q8_0Packed>());
            let mut out = split_out(y, rows, rb);
            out.par_chunks_mut(n_tokens)
                .enumerate()
                .for_each(|(b, out)| {
                    let (r0, nr) = (b * rb, out[0].len());
                    PACK_Q8_0.with(|buf| {
                        let mut buf = buf.borrow_mut();
                        buf.resize(nr * nt, Q8_0Packed::ZERO);
                        for (r, p) in buf[..nr * nt].chunks_exact_mut(nt).enumerate() {
                            (tk.pack_q8_0)(&wb[(r0 + r) * nb..(r0 + r + 1) * nb], p);
                        }
                        (tk.q8_0)(&buf[..nr * nt], act, nt, bias_for(r0, nr), out);
                    });
                });
        }
        GgmlType::F16 => {
            let wb = cast::<f16>(w.data).unwrap_or_else(|| bad());
            float_tiled(wb, x, rows, cols, bias, y, tk.f16)
        }
        GgmlType::BF16 => {
            let wb = cast::<bf16>(w.data).unwrap_or_else(|| bad());
            float_tiled(wb, x, rows, cols, bias, y, tk.bf16)
        }
        GgmlType::F32 => {
            let wb = cast::<f32>(w.data).unwrap_or_else(|| bad());
            float_tiled(wb, x, rows, cols, bias, y, tk.f32)
        }
        _ => bad(),
    }
}

/// Float weights need no packing: each item multiplies its rows, as stored, with all tokens.
fn float_tiled<W: Sync>(
    w: &[W],
    x: &[f32],
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    gemm: dot::GemmFn<W, f32>,
) {
    let n_tokens = x.len() / cols;
    let rb = tile_rows(rows, cols * std::mem::size_of::<W>());
    let mut out = split_out(y, rows, rb);
    out.par_chunks_mut(n_tokens)
        .enumerate()
        .for_each(|(b, out)| {
            let (r0, nr) = (b * rb, out[0].len());
            gemm(
                &w[r0 * cols..(r0 + nr) * cols],
                x,
                cols,
                bias.map(|b| &b[r0..r0 + nr]),
                out,
            );
        });
}
