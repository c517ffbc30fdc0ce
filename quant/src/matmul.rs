//! Weight × activation products for whole matrices: matrix-vector for decode, matrix-matrix
//! (tiled over tokens) for prefill, threaded with rayon. Activations are quantized once per call
//! into the weight type's dot-product format (Q8_K for K-quants, Q8_0 for Q8_0; F16, BF16 and
//! F32 weights are multiplied with the f32 activations directly, for accuracy).
//!
//! Shapes (llm.c style): W is (OC, C) row-major — `rows` = OC output features of `cols` = C
//! input features; x is (T, C) and y is (T, OC), both token-major: `y[t * OC + oc]`.
//!
//! Threads are rayon's current pool (the CLI sizes it with `-t`).

use crate::cpu::{self, Level};
use crate::dot::outer;
use crate::format::{
    self, DotFn, Format, GemmFn, PackFn, PackedGemmFn, Packing, RowsFn, Tile, WeightFormat,
};
use crate::tensor::cast_blocks;
use crate::{GgmlType, Plain};
use rayon::prelude::*;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// A row-major weight matrix in a format the runtime multiplies, borrowed (usually from an
/// mmapped GGUF): `rows` rows (output features) of `cols` values (input features, contiguous,
/// blocked). Only [`QMatrix::new`] makes one, so every `QMatrix` has been checked once.
#[derive(Clone, Copy)]
pub struct QMatrix<'a> {
    format: &'static Format,
    rows: usize,
    cols: usize,
    data: &'a [u8],
}

impl fmt::Debug for QMatrix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QMatrix")
            .field("ty", &self.format.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.data.len())
            .finish()
    }
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
    /// Check that `data` holds exactly `rows × cols` values of `ty`, aligned for its blocks,
    /// and that the runtime can multiply it. Use this on anything read from a file.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, MatrixError> {
        let format = format::format(ty)
            .filter(|f| f.is_weight())
            .ok_or(MatrixError::UnsupportedType(ty))?;
        if rows == 0 || cols == 0 {
            return Err(MatrixError::Empty);
        }
        if !cols.is_multiple_of(ty.block_size()) {
            return Err(MatrixError::RaggedRow { ty, cols });
        }
        let expected = ty
            .row_bytes(cols as u64)
            .and_then(|rb| rb.checked_mul(rows as u64));
        if expected != Some(data.len() as u64) {
            return Err(MatrixError::WrongSize {
                expected,
                found: data.len(),
            });
        }
        if !(data.as_ptr() as usize).is_multiple_of(format.align) {
            return Err(MatrixError::Misaligned {
                ty,
                align: format.align,
            });
        }
        Ok(QMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    /// The element type.
    pub fn ty(&self) -> GgmlType {
        self.format.ty
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrix bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows
    }
}

/// Reusable buffers (quantized activations, per-chunk outputs) so that steady-state decoding
/// does not allocate: they grow to the largest call seen and are then reused.
#[derive(Default)]
pub struct Scratch {
    act: Vec<Line>,
    out: Vec<f32>,
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scratch")
            .field("act_bytes", &(self.act.len() * 64))
            .field("out", &self.out.len())
            .finish()
    }
}

impl Scratch {
    /// Heap bytes held (for memory reports).
    pub fn bytes(&self) -> usize {
        self.act.capacity() * std::mem::size_of::<Line>() + self.out.capacity() * 4
    }
}

/// A cache line of scratch storage; activation buffers of any [`Plain`] type live in these.
#[doc(hidden)]
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Line([u8; 64]);

/// `buf` grown to hold `n` values of `A` and viewed as them (contents unspecified: callers
/// overwrite every value).
pub(crate) fn typed_buf<A: Plain>(buf: &mut Vec<Line>, n: usize) -> &mut [A] {
    const { assert!(std::mem::align_of::<A>() <= 64) };
    let bytes = n * std::mem::size_of::<A>();
    if buf.len() * 64 < bytes {
        buf.resize(bytes.div_ceil(64), Line([0; 64]));
    }
    // SAFETY: the buffer holds at least `bytes` initialised bytes, aligned to 64 ≥ align_of A;
    // A is Plain, so any bytes are a valid A; the result borrows `buf` exclusively.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<A>(), n) }
}

/// `y[t * w.rows + r] = dot(W[r, :], x[t * w.cols ..][..w.cols]) (+ bias[r])` for `t` in
/// `0..n_tokens`, with the kernels of the level in use ([`cpu::level`]).
///
/// # Panics
/// If `x`, `y` or `bias` do not have the lengths the shapes imply.
pub fn matmul(
    w: &QMatrix<'_>,
    x: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    matmul_at(cpu::level(), w, x, n_tokens, bias, y, scratch)
}

/// [`matmul`] with the kernels of an explicit level (tests compare levels with it).
pub fn matmul_at(
    level: Level,
    w: &QMatrix<'_>,
    x: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
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
    let run = w
        .format
        .matmul
        .expect("QMatrix::new admits only weight formats");
    run(level, w, x, n_tokens, bias, y, scratch)
}

/// From this many tokens on, a matmul with float weights may copy its activations into
/// [`Scratch`]: as f32 (`tokens × cols`, cols rounded up to a whole vector) from
/// `dot::outer::MIN_TOKENS` (32) at levels with an outer-product tile (AVX-512, AVX2), and as
/// bf16 tiles (tokens and cols rounded up to 32) from `dot::amx::MIN_TOKENS` (20) at `amx`, so
/// the smaller of the two; quantized weights always quantize them there.
pub const FLOAT_COPY_MIN_TOKENS: usize = if crate::dot::amx::MIN_TOKENS < outer::MIN_TOKENS {
    crate::dot::amx::MIN_TOKENS
} else {
    outer::MIN_TOKENS
};

static BATCH_INVARIANT: AtomicBool = AtomicBool::new(false);

/// Make every matmul of this process batch-invariant: a token's output row is then
/// bit-identical whatever the number of tokens in the call and the token's position among them
/// (what a server batching sequences needs to give a request the same logits alone or beside
/// others). Float formats always are; for packed formats it routes one to three tokens through
/// the tile kernels too, which costs decode speed on levels with tile kernels (docs/kernels.md).
pub fn set_batch_invariant(on: bool) {
    BATCH_INVARIANT.store(on, Ordering::Relaxed);
}

/// Whether [`set_batch_invariant`] is on.
pub fn batch_invariant() -> bool {
    BATCH_INVARIANT.load(Ordering::Relaxed)
}

/// The product for one format `W` (the [`Format`] table's `matmul` entry).
pub(crate) fn matmul_format<W: WeightFormat>(
    level: Level,
    w: &QMatrix<'_>,
    x: &[f32],
    n_tokens: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let (rows, cols) = (w.rows, w.cols);
    let wb = cast_blocks::<W>(w.data).expect("QMatrix::new checked length and alignment");
    let nb = cols / W::BLOCK;
    let k = W::kernels(level);
    match k.tile {
        // The AMX tiles (F16/BF16 at the `amx` level): activations split into bf16 tiles once
        // per call, work items of whole pairs of 16-row tile groups, about PANEL_BYTES of
        // packed tiles each (4 bytes a column of a chunk of columns, `dot::amx::CHUNK`).
        #[cfg(target_arch = "x86_64")]
        Some(Tile::Outer {
            amx: Some(gemm), ..
        }) if n_tokens >= crate::dot::amx::MIN_TOKENS && !batch_invariant() => {
            use crate::dot::amx;
            let act = typed_buf::<amx::Tile>(&mut scratch.act, amx::act_tiles(n_tokens, cols));
            amx::lay_out(x, cols, act);
            let rb = tile_rows(rows, amx::packed_row_bytes(cols), PANEL_BYTES)
                .next_multiple_of(2 * amx::GROUP);
            return direct_tiled(wb, act, nb, n_tokens, rows, rb, bias, y, gemm);
        }
        // Float rows as stored: the two tiles serve every token count, one included, and give
        // each (row, token) the same operations in the same order, so a token's result is the
        // same alone or in a batch. Many tokens: the activations laid out once per call for the
        // outer-product tile.
        Some(Tile::Outer { many, layout, .. }) if n_tokens >= outer::MIN_TOKENS => {
            let act = typed_buf::<f32>(&mut scratch.act, layout.len(n_tokens, cols));
            layout.lay_out(x, cols, act);
            // Work items of whole panels, about PANEL_BYTES of them (f32, 4 bytes a column).
            let rm = layout.panel_rows();
            let rb = tile_rows(rows, cols * 4, PANEL_BYTES).next_multiple_of(rm);
            return direct_tiled(wb, act, nb, n_tokens, rows, rb, bias, y, many);
        }
        Some(Tile::Outer { few, .. }) => {
            let act = W::activations(x, cols, &mut scratch.act);
            let rb = tile_rows(rows, nb * std::mem::size_of::<W>(), TILE_BYTES);
            return direct_tiled(wb, act, nb, n_tokens, rows, rb, bias, y, few);
        }
        // Packed rows: packing costs more than it saves below TILE_MIN_TOKENS, unless batch
        // invariance is asked for (then every token count packs; see `set_batch_invariant`).
        Some(Tile::Packed { pack, gemm }) if n_tokens >= TILE_MIN_TOKENS || batch_invariant() => {
            return packed_tiled(wb, x, nb, rows, bias, y, &mut scratch.act, pack, gemm);
        }
        _ => {}
    }
    let act = W::activations(x, cols, &mut scratch.act);
    if n_tokens == 1 {
        if let Some(rows_fn) = W::rows_kernel(level) {
            return matvec_rows(wb, act, rows, bias, y, rows_fn);
        }
    }
    run(
        wb,
        act,
        nb,
        n_tokens,
        rows,
        bias,
        y,
        &mut scratch.out,
        k.dot,
    )
}

/// Decode with a many-rows kernel: as `run` for one token (the same chunks of `y`), each chunk
/// computed by one `rows_fn` call, then the bias added (the same `dot + bias` per row as `run`).
fn matvec_rows<W: Sync, A: Sync>(
    w: &[W],
    act: &[A],
    rows: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    rows_fn: RowsFn<W, A>,
) {
    let nb = act.len();
    let chunk = row_chunk(rows);
    y.par_chunks_mut(chunk).enumerate().for_each(|(c, yc)| {
        let r0 = c * chunk;
        rows_fn(&w[r0 * nb..(r0 + yc.len()) * nb], act, yc);
        if let Some(b) = bias {
            for (yr, br) in yc.iter_mut().zip(&b[r0..]) {
                *yr += br;
            }
        }
    });
}

/// Quantize each token's activation row (in parallel over tokens when there are several).
pub(crate) fn quantize_rows<A: Send>(
    x: &[f32],
    act: &mut [A],
    cols: usize,
    q: fn(&[f32], &mut [A]),
) {
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

/// The row-by-row driver, generic over weight element `W` and activation element `A`:
/// `nb` elements per weight row and per activation row.
#[allow(clippy::too_many_arguments)]
fn run<W: Sync, A: Sync>(
    w: &[W],
    act: &[A],
    nb: usize,
    n_tokens: usize,
    rows: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    out: &mut Vec<f32>,
    dot: DotFn<W, A>,
) {
    debug_assert_eq!(w.len(), rows * nb);
    debug_assert_eq!(act.len(), n_tokens * nb);
    let (wb, ab) = (nb, nb);
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

/// From this many tokens on, packed formats with tile kernels at the level use them;
/// below it, packing would cost more than it saves and rows are dotted one by one.
pub const TILE_MIN_TOKENS: usize = 4;

/// Bytes of packed weights a work item aims for: a row tile stays in the 1 MiB L2 while the
/// tokens stream past it. Each thread keeps a buffer of about this size (rows are rounded up
/// to a multiple of 4) once it has run such a matmul.
pub const TILE_BYTES: usize = 192 << 10;

/// Bytes of f32 panels a work item of the outer-product float tile packs. Each group of tokens
/// is read once for all of an item's panels, so larger items read the activations fewer times;
/// with a group's activations beside them (56 KiB a 1024-column group) the panels stay in a
/// 2 MiB L2. On such a core (docs/kernels.md) 1 MiB ran the 1024-column matrices 2–6 % and the
/// 4096-column one 6 % faster on two threads than 384 KiB. Each thread keeps a buffer of
/// this size once it has run such a matmul.
pub const PANEL_BYTES: usize = 1 << 20;

/// Bytes per token of a prompt that a thread keeps beside its [`PANEL_BYTES`] at the AMX level
/// (F16/BF16 weights): the sums of a work item between chunks of columns, for at most
/// `PANEL_BYTES / 4096` rows; tokens are rounded up to 32 there.
pub const FLOAT_SUMS_BYTES_PER_TOKEN: usize = crate::dot::amx::SUMS_PER_TOKEN;

/// Rows per work item: about `budget` bytes of rows of `packed_row_bytes` each, but at least 4
/// items per thread when the matrix allows, so rayon can balance; a multiple of 4 (the float
/// kernels' rows).
fn tile_rows(rows: usize, packed_row_bytes: usize, budget: usize) -> usize {
    let by_cache = (budget / packed_row_bytes.max(1)).max(4);
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

/// Packed formats: each work item packs its run of rows once (into the thread's buffer),
/// then multiplies it with every token's activation tiles.
#[allow(clippy::too_many_arguments)]
fn packed_tiled<W: WeightFormat>(
    w: &[W],
    x: &[f32],
    nb: usize,
    rows: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    act_buf: &mut Vec<Line>,
    pack: PackFn<W>,
    gemm: PackedGemmFn<W>,
) {
    let cols = nb * W::BLOCK;
    let n_tokens = x.len() / cols;
    let (np, na) = (W::Packed::per_row(nb), W::Packed::act_per_row(nb));
    let act = typed_buf::<<W::Packed as Packing>::Act>(act_buf, n_tokens * na);
    quantize_rows(x, act, cols, W::Packed::quantize_act);
    let act: &[_] = act;
    let rb = tile_rows(rows, np * std::mem::size_of::<W::Packed>(), TILE_BYTES);
    let mut out = split_out(y, rows, rb);
    out.par_chunks_mut(n_tokens)
        .enumerate()
        .for_each(|(b, out)| {
            let (r0, nr) = (b * rb, out[0].len());
            W::Packed::with_buffer(|buf| {
                let packed = typed_vec(buf, nr * np);
                for (r, p) in packed.chunks_exact_mut(np).enumerate() {
                    pack(&w[(r0 + r) * nb..(r0 + r + 1) * nb], p);
                }
                gemm(packed, act, na, bias.map(|b| &b[r0..r0 + nr]), out);
            });
        });
}

/// `buf` grown to `n` values (new ones zeroed) and cut to them.
fn typed_vec<P: Plain>(buf: &mut Vec<P>, n: usize) -> &mut [P] {
    if buf.len() < n {
        // SAFETY: P is Plain, so all-zero bytes are a valid P.
        buf.resize(n, unsafe { std::mem::zeroed() });
    }
    &mut buf[..n]
}

/// Formats multiplied as stored: each item multiplies `rb` rows (a multiple of the tile's) with
/// all tokens.
#[allow(clippy::too_many_arguments)]
fn direct_tiled<W: Sync, A: Sync>(
    w: &[W],
    act: &[A],
    nb: usize,
    n_tokens: usize,
    rows: usize,
    rb: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    gemm: GemmFn<W, A>,
) {
    let rb = rb.min(rows.next_multiple_of(4));
    let mut out = split_out(y, rows, rb);
    out.par_chunks_mut(n_tokens)
        .enumerate()
        .for_each(|(b, out)| {
            let (r0, nr) = (b * rb, out[0].len());
            gemm(
                &w[r0 * nb..(r0 + nr) * nb],
                act,
                nb,
                bias.map(|b| &b[r0..r0 + nr]),
                out,
            );
        });
}
