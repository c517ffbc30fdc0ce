//! The key/value cache: every layer's K and V rows for the positions already processed, for
//! one or more independent sequences.
//!
//! Layout: `[layer][seq][head][pos][head_dim]`. One head of one sequence is a contiguous
//! (n_ctx, hd) matrix whose first `len` rows are filled, so attention reads K and V as plain
//! row-major blocks, and copying a prompt from sequence 0 to the others is one `memcpy` per
//! (layer, head).
//!
//! Elements are F16 by default (llama.cpp's default: half the memory, 96 MiB for GPT-2
//! Medium at n_ctx 1024) or F32. Rows are rounded to f16 when stored, so prefill and
//! decode see exactly the same K/V values whichever path wrote them.

use half::f16;
use half::slice::HalfFloatSliceExt;

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

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Store::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            Store::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }

    /// `n` elements from `at` as f32: borrowed for F32, converted into `buf` for F16.
    fn read<'a>(&'a self, at: usize, n: usize, buf: &'a mut [f32]) -> &'a [f32] {
        match self {
            Store::F16(v) => {
                let out = &mut buf[..n];
                v[at..at + n].convert_to_f32_slice(out);
                out
            }
            Store::F32(v) => &v[at..at + n],
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            Store::F16(v) => v.copy_within(src, dst),
            Store::F32(v) => v.copy_within(src, dst),
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

    /// Start of (layer, seq, head, pos) in the flat store.
    fn index(&self, layer: usize, seq: usize, head: usize, pos: usize) -> usize {
        (((layer * self.n_seq + seq) * self.n_head + head) * self.n_ctx + pos) * self.head_dim
    }

    /// Store one token's K and V rows (each C = n_head·hd values, heads concatenated, as the
    /// QKV projection produces them) at `pos` of `seq` in `layer`. Does not change `len`:
    /// the caller commits the positions with [`KvCache::set_len`] once all layers are done.
    pub fn store(&mut self, layer: usize, seq: usize, pos: usize, k_row: &[f32], v_row: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.n_head {
            let at = self.index(layer, seq, h, pos);
            self.k.write(at, &k_row[h * hd..(h + 1) * hd]);
            self.v.write(at, &v_row[h * hd..(h + 1) * hd]);
        }
    }

    /// K of positions 0..n for (layer, seq, head) as an (n, hd) f32 matrix. `buf` (≥ n·hd)
    /// holds the converted values when the cache is F16; an F32 cache is borrowed directly.
    pub fn keys<'a>(
        &'a self,
        layer: usize,
        seq: usize,
        head: usize,
        n: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        self.k
            .read(self.index(layer, seq, head, 0), n * self.head_dim, buf)
    }

    /// V of positions 0..n for (layer, seq, head); see [`KvCache::keys`].
    pub fn values<'a>(
        &'a self,
        layer: usize,
        seq: usize,
        head: usize,
        n: usize,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        self.v
            .read(self.index(layer, seq, head, 0), n * self.head_dim, buf)
    }

    /// Mark the first `len` positions of `seq` as filled.
    pub fn set_len(&mut self, seq: usize, len: usize) {
        debug_assert!(len <= self.n_ctx);
        self.len[seq] = len;
    }

    /// Copy sequence `src`'s filled positions into every other sequence (a shared prompt
    /// before sampling several continuations), making them all the same length.
    pub fn fork(&mut self, src: usize) {
        let n = self.len[src] * self.head_dim;
        for dst in (0..self.n_seq).filter(|&s| s != src) {
            for layer in 0..self.n_layer {
                for h in 0..self.n_head {
                    let from = self.index(layer, src, h, 0);
                    let to = self.index(layer, dst, h, 0);
                    self.k.copy_within(from..from + n, to);
                    self.v.copy_within(from..from + n, to);
                }
            }
            self.len[dst] = self.len[src];
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
            let mut buf = vec![0.0; n_ctx * hd];
            let k = kv.keys(1, 1, 2, 3, &mut buf).to_vec();
            // Head 2 of position p holds elements 8..12 of that position's row.
            for p in 0..3 {
                for d in 0..hd {
                    assert_eq!(k[p * hd + d], p as f32 * 10.0 + (8 + d) as f32 * 0.25);
                }
            }
            let v = kv.values(1, 1, 0, 3, &mut buf);
            assert_eq!(v[hd], -1.0);
            // Other layers and sequences are untouched.
            assert!(kv.keys(0, 1, 2, 3, &mut buf).iter().all(|&x| x == 0.0));
            assert!(kv.keys(1, 0, 2, 3, &mut buf).iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn f16_store_rounds_to_nearest_even() {
        let mut kv = KvCache::new(KvType::F16, 1, 1, 1, 1, 2).unwrap();
        // 1 + 2^-11 is exactly half-way between two f16 values: ties go to the even one (1.0).
        kv.store(0, 0, 0, &[1.0 + 1.0 / 2048.0, 0.1], &[0.0, 0.0]);
        let mut buf = vec![0.0; 2];
        let k = kv.keys(0, 0, 0, 1, &mut buf);
        assert_eq!(k[0], 1.0);
        assert_eq!(k[1], f16::from_f32(0.1).to_f32());
    }

    #[test]
    fn fork_copies_the_prompt_to_every_sequence() {
        let (n_layer, n_seq, n_ctx, n_head, hd) = (2, 3, 4, 2, 2);
        let mut kv = KvCache::new(KvType::F32, n_layer, n_seq, n_ctx, n_head, hd).unwrap();
        for layer in 0..n_layer {
            for pos in 0..2 {
                let base = (layer * 100 + pos * 10) as f32;
                kv.store(layer, 0, pos, &row(4, base), &row(4, -base));
            }
        }
        kv.set_len(0, 2);
        kv.fork(0);
        let mut b0 = vec![0.0; 8];
        let mut b1 = vec![0.0; 8];
        for s in 1..n_seq {
            assert_eq!(kv.len(s), 2);
            for layer in 0..n_layer {
                for h in 0..n_head {
                    assert_eq!(
                        kv.keys(layer, 0, h, 2, &mut b0),
                        kv.keys(layer, s, h, 2, &mut b1)
                    );
                    assert_eq!(
                        kv.values(layer, 0, h, 2, &mut b0),
                        kv.values(layer, s, h, 2, &mut b1)
                    );
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
