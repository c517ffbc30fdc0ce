//! The key/value cache: every layer's K and V rows for the positions already processed, for
//! one or more independent sequences.
//!
//! Layout: `[layer][seq][head][pos][head_dim]`. One head of one sequence is a contiguous
//! (n_ctx, hd) block whose first `len` rows are filled, so a decode step reads each head's
//! keys and values as one sequential stream (which the hardware prefetcher follows; a
//! transposed `[hd][pos]` layout, tried first, turned each head into 64 short strided reads
//! and made decoding at 576 tokens of context 5× slower), and copying a prompt to another
//! sequence is one `memcpy` per (layer, head).
//!
//! Elements are F16 by default (llama.cpp's default: half the memory, 96 MiB for GPT-2
//! Medium at n_ctx 1024) or F32. Values are rounded to f16 when stored, so prefill and
//! decode see exactly the same K/V values whichever path wrote them.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::attention::{f16_to_f32, HeadKv};

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

/// K and V storage, one flat vector each, in one element type.
enum Store {
    F16 { k: Vec<f16>, v: Vec<f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
}

/// Per-layer K and V for `n_seq` sequences of up to `n_ctx` positions each.
pub struct KvCache {
    ty: KvType,
    n_layer: usize,
    n_seq: usize,
    n_ctx: usize,
    n_head: usize,
    head_dim: usize,
    store: Store,
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
        let store = match ty {
            KvType::F16 => Store::F16 {
                k: vec![f16::ZERO; n],
                v: vec![f16::ZERO; n],
            },
            KvType::F32 => Store::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
        };
        Some(KvCache {
            ty,
            n_layer,
            n_seq,
            n_ctx,
            n_head,
            head_dim,
            store,
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

    /// Start of the (layer, seq, head) block (n_ctx rows of hd) in the flat stores.
    fn base(&self, layer: usize, seq: usize, head: usize) -> usize {
        ((layer * self.n_seq + seq) * self.n_head + head) * self.n_ctx * self.head_dim
    }

    /// Store one token's K and V rows (each C = n_head·hd values, heads concatenated, as the
    /// QKV projection produces them) at `pos` of `seq` in `layer`. Does not change `len`:
    /// the caller commits the positions with [`KvCache::set_len`] once all layers are done.
    pub fn store(&mut self, layer: usize, seq: usize, pos: usize, k_row: &[f32], v_row: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.n_head {
            let at = self.base(layer, seq, h) + pos * hd;
            let (kh, vh) = (&k_row[h * hd..(h + 1) * hd], &v_row[h * hd..(h + 1) * hd]);
            match &mut self.store {
                Store::F16 { k, v } => {
                    k[at..at + hd].convert_from_f32_slice(kh);
                    v[at..at + hd].convert_from_f32_slice(vh);
                }
                Store::F32 { k, v } => {
                    k[at..at + hd].copy_from_slice(kh);
                    v[at..at + hd].copy_from_slice(vh);
                }
            }
        }
    }

    /// Positions 0..n of (layer, seq, head), read in place in the cache's element type (for
    /// a few queries: the kernel widens f16 rows as it goes).
    pub fn head(&self, layer: usize, seq: usize, head: usize, n: usize) -> HeadKv<'_> {
        let base = self.base(layer, seq, head);
        let r = base..base + n * self.head_dim;
        match &self.store {
            Store::F32 { k, v } => HeadKv::F32 {
                k: &k[r.clone()],
                v: &v[r],
            },
            Store::F16 { k, v } => HeadKv::F16 {
                k: &k[r.clone()],
                v: &v[r],
            },
        }
    }

    /// Positions 0..n of (layer, seq, head) as f32 (for many queries, e.g. a prompt, which
    /// would otherwise widen every f16 row once per query): borrowed from an F32 cache,
    /// converted once into `buf` (grown to 2·n·hd if needed) from an F16 one.
    pub fn head_f32<'a>(
        &'a self,
        layer: usize,
        seq: usize,
        head: usize,
        n: usize,
        buf: &'a mut Vec<f32>,
    ) -> HeadKv<'a> {
        let base = self.base(layer, seq, head);
        let m = n * self.head_dim;
        match &self.store {
            Store::F32 { .. } => self.head(layer, seq, head, n),
            Store::F16 { k, v } => {
                if buf.len() < 2 * m {
                    buf.resize(2 * m, 0.0);
                }
                let (kb, vb) = buf[..2 * m].split_at_mut(m);
                f16_to_f32(&k[base..base + m], kb);
                f16_to_f32(&v[base..base + m], vb);
                HeadKv::F32 { k: kb, v: vb }
            }
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
        let m = self.len[src] * self.head_dim;
        for dst in (0..self.n_seq).filter(|&s| s != src) {
            for layer in 0..self.n_layer {
                for h in 0..self.n_head {
                    let (f, t) = (self.base(layer, src, h), self.base(layer, dst, h));
                    match &mut self.store {
                        Store::F16 { k, v } => {
                            k.copy_within(f..f + m, t);
                            v.copy_within(f..f + m, t);
                        }
                        Store::F32 { k, v } => {
                            k.copy_within(f..f + m, t);
                            v.copy_within(f..f + m, t);
                        }
                    }
                }
            }
            self.len[dst] = self.len[src];
        }
    }

    /// Forget every sequence (the memory is kept).
    pub fn clear(&mut self) {
        self.len.fill(0);
    }

    /// Forget sequence `seq` only, leaving the others as they are: a server slot whose
    /// request ended is reused from position 0. No-op for a sequence that does not exist.
    pub fn clear_seq(&mut self, seq: usize) {
        if let Some(l) = self.len.get_mut(seq) {
            *l = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(c: usize, base: f32) -> Vec<f32> {
        (0..c).map(|i| base + i as f32 * 0.25).collect()
    }

    /// K and V of positions 0..n of a head, (n, hd), through both accessors (which must
    /// agree).
    fn read(kv: &KvCache, layer: usize, seq: usize, head: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let widen = |x: HeadKv<'_>| -> (Vec<f32>, Vec<f32>) {
            match x {
                HeadKv::F32 { k, v } => (k.to_vec(), v.to_vec()),
                HeadKv::F16 { k, v } => (
                    k.iter().map(|x| x.to_f32()).collect(),
                    v.iter().map(|x| x.to_f32()).collect(),
                ),
            }
        };
        let in_place = widen(kv.head(layer, seq, head, n));
        let mut buf = Vec::new();
        let converted = widen(kv.head_f32(layer, seq, head, n, &mut buf));
        assert_eq!(in_place, converted);
        in_place
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
            let (k, v) = read(&kv, 1, 1, 2, 3);
            assert_eq!(k.len(), 3 * hd);
            for p in 0..3 {
                for d in 0..hd {
                    assert_eq!(k[p * hd + d], p as f32 * 10.0 + (8 + d) as f32 * 0.25);
                    assert_eq!(v[p * hd + d], -(p as f32) + (8 + d) as f32 * 0.25);
                }
            }
            // Other layers and sequences are untouched.
            for (l, s) in [(0, 1), (1, 0)] {
                let (k, v) = read(&kv, l, s, 2, 3);
                assert!(k.iter().chain(&v).all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn f16_store_rounds_to_nearest_even() {
        let mut kv = KvCache::new(KvType::F16, 1, 1, 1, 1, 2).unwrap();
        // 1 + 2^-11 is exactly half-way between two f16 values: ties go to the even one (1.0).
        // 1 + 3·2^-11 is half-way between 1 + 2^-10 (odd) and 1 + 2^-9 (even).
        kv.store(
            0,
            0,
            0,
            &[1.0 + 1.0 / 2048.0, 0.1],
            &[1.0 + 3.0 / 2048.0, 0.1],
        );
        let (k, v) = read(&kv, 0, 0, 0, 1);
        assert_eq!(k, [1.0, f16::from_f32(0.1).to_f32()]);
        assert_eq!(v, [1.0 + 1.0 / 512.0, f16::from_f32(0.1).to_f32()]);
    }

    #[test]
    fn fork_copies_the_prompt_to_every_sequence() {
        for ty in [KvType::F16, KvType::F32] {
            let (n_layer, n_seq, n_ctx, n_head, hd) = (2, 3, 4, 2, 2);
            let mut kv = KvCache::new(ty, n_layer, n_seq, n_ctx, n_head, hd).unwrap();
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
                        let (k0, v0) = read(&kv, layer, 0, h, 2);
                        let (ks, vs) = read(&kv, layer, s, h, 2);
                        assert_eq!((&k0, &v0), (&ks, &vs));
                        assert!(ks.iter().all(|&x| x != 0.0));
                    }
                }
            }
            assert_eq!(kv.bytes(), 2 * 2 * 3 * 4 * 2 * 2 * ty.size());
            kv.clear();
            assert!((0..n_seq).all(|s| kv.is_empty(s)));
        }
    }

    #[test]
    fn clear_seq_empties_one_sequence_and_keeps_the_others() {
        let mut kv = KvCache::new(KvType::F16, 1, 3, 4, 1, 2).unwrap();
        for s in 0..3 {
            kv.store(0, s, 0, &[s as f32 + 1.0, 1.0], &[1.0, 1.0]);
            kv.set_len(s, 1);
        }
        kv.clear_seq(1);
        kv.clear_seq(7);
        assert_eq!((kv.len(0), kv.len(1), kv.len(2)), (1, 0, 1));
        // The kept sequences still read their own rows.
        assert_eq!(read(&kv, 0, 2, 0, 1).0, [3.0, 1.0]);
        assert_eq!(read(&kv, 0, 0, 0, 1).0, [1.0, 1.0]);
    }

    #[test]
    fn overflowing_sizes_are_refused() {
        assert!(KvCache::new(KvType::F16, usize::MAX, 2, 1, 1, 1).is_none());
    }
}
