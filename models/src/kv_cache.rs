//! The key/value cache: every layer's K and V rows for the positions already processed, for
//! one or more independent sequences.
//!
//! Layout, per (layer, sequence, head), one block of n_ctx × hd values:
//! - K as `[pos][head_dim]`: the attention scores are one dot product per cached position,
//!   each over a contiguous row of hd values;
//! - V transposed, as `[head_dim][pos]` (llama.cpp's layout without flash attention): the
//!   weighted sum Σⱼ pⱼ·V[j] becomes one dot product of the probabilities with each
//!   contiguous row of positions.
//!
//! So attention is nothing but dot products straight off the stored elements, done by the
//! SIMD kernels of `ggpt_quant::dot` (f16·f32 converts in registers; nothing is unpacked
//! into a temporary buffer). Copying a prompt to another sequence is one `memcpy` for K and
//! hd short ones for V per (layer, head).
//!
//! Elements are F16 by default (llama.cpp's default: half the memory, 96 MiB for GPT-2
//! Medium at n_ctx 1024) or F32. Values are rounded to f16 when stored, so prefill and
//! decode see exactly the same K/V values whichever path wrote them.

use ggpt_quant::dot::{kernels, Kernels};
use ggpt_quant::matmul::QMatrix;
use ggpt_quant::tensor::blocks_as_bytes;
use ggpt_quant::GgmlType;
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::ops::Rows;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    /// IEEE half precision (round to nearest even on store), like llama.cpp's default.
    #[default]
    F16,
    /// Full precision.
    F32,
}

impl KvType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        })
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "f32" => Ok(KvType::F32),
            _ => Err(format!("unknown KV cache type '{s}' (expected f16 or f32)")),
        }
    }
}

enum Store {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Store {
    fn new(ty: KvType, n: usize) -> Store {
        match ty {
            KvType::F16 => Store::F16(vec![f16::ZERO; n]),
            KvType::F32 => Store::F32(vec![0.0; n]),
        }
    }

    /// Write `src` contiguously from `at`.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Store::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            Store::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }

    /// Write `src[i]` at `at + i·stride` (a column of a transposed block).
    fn write_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        match self {
            Store::F16(v) => {
                for (i, &x) in src.iter().enumerate() {
                    v[at + i * stride] = f16::from_f32(x);
                }
            }
            Store::F32(v) => {
                for (i, &x) in src.iter().enumerate() {
                    v[at + i * stride] = x;
                }
            }
        }
    }

    /// The block of `len` elements from `at`, viewed as rows of `stride` elements.
    fn view(&self, at: usize, len: usize, stride: usize) -> HeadView<'_> {
        let k = kernels();
        match self {
            Store::F16(v) => HeadView::F16 {
                data: &v[at..at + len],
                stride,
                k,
            },
            Store::F32(v) => HeadView::F32 {
                data: &v[at..at + len],
                stride,
                k,
            },
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            Store::F16(v) => v.copy_within(src, dst),
            Store::F32(v) => v.copy_within(src, dst),
        }
    }
}

/// The bytes of an f32 slice, for handing cache blocks to the matmul as F32 matrices.
fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte of it is initialised; u8 has alignment 1 and
    // the length is exactly the slice's size; the result borrows `x`, so it cannot outlive
    // it or alias a mutable borrow.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Scratch for [`KvCache::matrices`]: one head's V rows gathered contiguously, in the cache's
/// element type.
#[derive(Default)]
pub struct VGather {
    f16: Vec<f16>,
    f32: Vec<f32>,
}

/// One head's K (rows = positions) or transposed V (rows = channels) of one sequence, read in
/// place. Row r starts at `r · stride`; a dot product with an f32 vector x covers the first
/// `x.len()` elements of the row.
#[derive(Clone, Copy)]
pub enum HeadView<'a> {
    F16 {
        data: &'a [f16],
        stride: usize,
        k: &'static Kernels,
    },
    F32 {
        data: &'a [f32],
        stride: usize,
        k: &'static Kernels,
    },
}

impl HeadView<'_> {
    /// Element `col` of row `row`, as f32.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        match self {
            HeadView::F16 { data, stride, .. } => data[row * stride + col].to_f32(),
            HeadView::F32 { data, stride, .. } => data[row * stride + col],
        }
    }
}

impl Rows for HeadView<'_> {
    #[inline]
    fn dot_row(&self, row: usize, x: &[f32]) -> f32 {
        match self {
            HeadView::F16 { data, stride, k } => {
                let at = row * stride;
                (k.f16_f32)(&data[at..at + x.len()], x)
            }
            HeadView::F32 { data, stride, k } => {
                let at = row * stride;
                (k.f32_f32)(&data[at..at + x.len()], x)
            }
        }
    }
}

/// Per-layer K and V for `n_seq` sequences of up to `n_ctx` positions each.
pub struct KvCache {
    ty: KvType,
    n_layer: usize,
    n_seq: usize,
    n_ctx: usize,
    n_head: usize,
    head_dim: usize,
    k: Store,
    v: Store,
    /// Filled positions per sequence.
    len: Vec<usize>,
}

impl KvCache {
    /// An empty cache. Sizes must already be validated by the caller (non-zero, and the
    /// product small enough to allocate); `None` if the element count overflows.
    pub fn new(
        ty: KvType,
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_head: usize,
        head_dim: usize,
    ) -> Option<KvCache> {
        let n = n_layer
            .checked_mul(n_seq)?
            .checked_mul(n_ctx)?
            .checked_mul(n_head)?
            .checked_mul(head_dim)?;
        Some(KvCache {
            ty,
            n_layer,
            n_seq,
            n_ctx,
            n_head,
            head_dim,
            k: Store::new(ty, n),
            v: Store::new(ty, n),
            len: vec![0; n_seq],
        })
    }

    /// Element type.
    pub fn ty(&self) -> KvType {
        self.ty
    }
    /// Positions per sequence.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    /// Number of sequences.
    pub fn n_seq(&self) -> usize {
        self.n_seq
    }
    /// Filled positions of sequence `seq`.
    pub fn len(&self, seq: usize) -> usize {
        self.len[seq]
    }
    /// Whether sequence `seq` is empty.
    pub fn is_empty(&self, seq: usize) -> bool {
        self.len[seq] == 0
    }
    /// Bytes held by K and V together.
    pub fn bytes(&self) -> usize {
        2 * self.n_layer * self.n_seq * self.n_ctx * self.n_head * self.head_dim * self.ty.size()
    }

    /// Elements in one (layer, seq, head) block.
    fn block(&self) -> usize {
        self.n_ctx * self.head_dim
    }

    /// Start of the (layer, seq, head) block in the flat stores.
    fn base(&self, layer: usize, seq: usize, head: usize) -> usize {
        ((layer * self.n_seq + seq) * self.n_head + head) * self.block()
    }

    /// Store one token's K and V rows (each C = n_head·hd values, heads concatenated, as the
    /// QKV projection produces them) at `pos` of `seq` in `layer`. Does not change `len`:
    /// the caller commits the positions with [`KvCache::set_len`] once all layers are done.
    pub fn store(&mut self, layer: usize, seq: usize, pos: usize, k_row: &[f32], v_row: &[f32]) {
        let (hd, n_ctx) = (self.head_dim, self.n_ctx);
        for h in 0..self.n_head {
            let base = self.base(layer, seq, h);
            self.k.write(base + pos * hd, &k_row[h * hd..(h + 1) * hd]);
            self.v
                .write_strided(base + pos, n_ctx, &v_row[h * hd..(h + 1) * hd]);
        }
    }

    /// K of (layer, seq, head): row `pos` holds that position's hd values.
    pub fn keys(&self, layer: usize, seq: usize, head: usize) -> HeadView<'_> {
        self.k
            .view(self.base(layer, seq, head), self.block(), self.head_dim)
    }

    /// V of (layer, seq, head), transposed: row `d` holds channel d at every position.
    pub fn values_t(&self, layer: usize, seq: usize, head: usize) -> HeadView<'_> {
        self.v
            .view(self.base(layer, seq, head), self.block(), self.n_ctx)
    }

    /// K and V of positions 0..n of (layer, seq, head) as matmul weights, for attending many
    /// queries at once: K as (n, hd), so `matmul(K, Q)` gives each query's scores, and Vᵀ as
    /// (hd, n), so `matmul(Vᵀ, P)` gives each query's output from its probabilities. K is
    /// borrowed in place; Vᵀ's rows are n_ctx apart in the cache, so the first n of each are
    /// copied into `buf` (hd·n elements, no conversion).
    pub fn matrices<'a>(
        &'a self,
        layer: usize,
        seq: usize,
        head: usize,
        n: usize,
        buf: &'a mut VGather,
    ) -> (QMatrix<'a>, QMatrix<'a>) {
        let (hd, n_ctx, base) = (self.head_dim, self.n_ctx, self.base(layer, seq, head));
        let mat = |ty, rows, cols, data| QMatrix {
            ty,
            rows,
            cols,
            data,
        };
        match (&self.k, &self.v) {
            (Store::F16(k), Store::F16(v)) => {
                buf.f16.clear();
                for d in 0..hd {
                    let at = base + d * n_ctx;
                    buf.f16.extend_from_slice(&v[at..at + n]);
                }
                let kb = blocks_as_bytes(&k[base..base + n * hd]);
                let vb = blocks_as_bytes(&buf.f16[..]);
                (mat(GgmlType::F16, n, hd, kb), mat(GgmlType::F16, hd, n, vb))
            }
            (Store::F32(k), Store::F32(v)) => {
                buf.f32.clear();
                for d in 0..hd {
                    let at = base + d * n_ctx;
                    buf.f32.extend_from_slice(&v[at..at + n]);
                }
                let kb = f32_bytes(&k[base..base + n * hd]);
                let vb = f32_bytes(&buf.f32[..]);
                (mat(GgmlType::F32, n, hd, kb), mat(GgmlType::F32, hd, n, vb))
            }
            _ => unreachable!("K and V always share one element type"),
        }
    }

    /// Mark the first `len` positions of `seq` as filled.
    pub fn set_len(&mut self, seq: usize, len: usize) {
        debug_assert!(len <= self.n_ctx);
        self.len[seq] = len;
    }

    /// Copy sequence `src`'s filled positions into every other sequence (a shared prompt
    /// before sampling several continuations), making them all the same length.
    pub fn fork(&mut self, src: usize) {
        let n = self.len[src];
        let (hd, n_ctx) = (self.head_dim, self.n_ctx);
        for dst in (0..self.n_seq).filter(|&s| s != src) {
            for layer in 0..self.n_layer {
                for h in 0..self.n_head {
                    let from = self.base(layer, src, h);
                    let to = self.base(layer, dst, h);
                    self.k.copy_within(from..from + n * hd, to);
                    for d in 0..hd {
                        let (f, t) = (from + d * n_ctx, to + d * n_ctx);
                        self.v.copy_within(f..f + n, t);
                    }
                }
            }
            self.len[dst] = n;
        }
    }

    /// Forget every sequence (the memory is kept).
    pub fn clear(&mut self) {
        self.len.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(c: usize, base: f32) -> Vec<f32> {
        (0..c).map(|i| base + i as f32 * 0.25).collect()
    }

    #[test]
    fn store_then_read_per_head_rows() {
        for ty in [KvType::F16, KvType::F32] {
            let (n_layer, n_seq, n_ctx, n_head, hd) = (2, 2, 5, 3, 4);
            let mut kv = KvCache::new(ty, n_layer, n_seq, n_ctx, n_head, hd).unwrap();
            let c = n_head * hd;
            for pos in 0..3 {
                kv.store(
                    1,
                    1,
                    pos,
                    &row(c, pos as f32 * 10.0),
                    &row(c, -(pos as f32)),
                );
            }
            kv.set_len(1, 3);
            // Head 2 of position p holds elements 8..12 of that position's row.
            let k = kv.keys(1, 1, 2);
            let v = kv.values_t(1, 1, 2);
            for p in 0..3 {
                for d in 0..hd {
                    assert_eq!(k.get(p, d), p as f32 * 10.0 + (8 + d) as f32 * 0.25);
                    assert_eq!(v.get(d, p), -(p as f32) + (8 + d) as f32 * 0.25);
                }
            }
            // Dot products read the same elements: K rows over hd, V rows over positions.
            let ones = vec![1.0f32; hd];
            let want: f32 = (0..hd).map(|d| k.get(1, d)).sum();
            assert_eq!(k.dot_row(1, &ones), want);
            let p = [0.5f32, 0.25, 0.25];
            let want: f32 = (0..3).map(|j| p[j] * v.get(3, j)).sum();
            assert!((v.dot_row(3, &p) - want).abs() < 1e-6);
            // Other layers and sequences are untouched.
            for (l, s) in [(0, 1), (1, 0)] {
                let (k, v) = (kv.keys(l, s, 2), kv.values_t(l, s, 2));
                assert!((0..3).all(|p| (0..hd).all(|d| k.get(p, d) == 0.0 && v.get(d, p) == 0.0)));
            }
        }
    }

    #[test]
    fn f16_store_rounds_to_nearest_even() {
        let mut kv = KvCache::new(KvType::F16, 1, 1, 1, 1, 2).unwrap();
        // 1 + 2^-11 is exactly half-way between two f16 values: ties go to the even one (1.0).
        kv.store(
            0,
            0,
            0,
            &[1.0 + 1.0 / 2048.0, 0.1],
            &[1.0 + 3.0 / 2048.0, 0.1],
        );
        let (k, v) = (kv.keys(0, 0, 0), kv.values_t(0, 0, 0));
        assert_eq!(k.get(0, 0), 1.0);
        assert_eq!(k.get(0, 1), f16::from_f32(0.1).to_f32());
        // 1 + 3·2^-11 is half-way between 1 + 2^-10 (odd) and 1 + 2^-9 (even).
        assert_eq!(v.get(0, 0), 1.0 + 1.0 / 512.0);
        assert_eq!(v.get(1, 0), f16::from_f32(0.1).to_f32());
    }

    #[test]
    fn fork_copies_the_prompt_to_every_sequence() {
        let (n_layer, n_seq, n_ctx, n_head, hd) = (2, 3, 4, 2, 2);
        let mut kv = KvCache::new(KvType::F32, n_layer, n_seq, n_ctx, n_head, hd).unwrap();
        for layer in 0..n_layer {
            for pos in 0..2 {
                let base = (layer * 100 + pos * 10 + 1) as f32;
                kv.store(layer, 0, pos, &row(4, base), &row(4, -base));
            }
        }
        kv.set_len(0, 2);
        kv.fork(0);
        for s in 1..n_seq {
            assert_eq!(kv.len(s), 2);
            for layer in 0..n_layer {
                for h in 0..n_head {
                    let (k0, ks) = (kv.keys(layer, 0, h), kv.keys(layer, s, h));
                    let (v0, vs) = (kv.values_t(layer, 0, h), kv.values_t(layer, s, h));
                    for p in 0..2 {
                        for d in 0..hd {
                            assert_eq!(k0.get(p, d), ks.get(p, d));
                            assert_eq!(v0.get(d, p), vs.get(d, p));
                            assert_ne!(ks.get(p, d), 0.0);
                        }
                    }
                }
            }
        }
        assert_eq!(kv.bytes(), 2 * 2 * 3 * 4 * 2 * 2 * 4);
        kv.clear();
        assert!((0..n_seq).all(|s| kv.is_empty(s)));
    }

    #[test]
    fn overflowing_sizes_are_refused() {
        assert!(KvCache::new(KvType::F16, usize::MAX, 2, 1, 1, 1).is_none());
    }
}
