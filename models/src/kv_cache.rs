//! The key/value cache: every layer's K and V rows for the positions already processed, for
//! one or more independent sequences.
//!
//! Layout: one block per (sequence, layer, K or V), `[head][row][head_dim]` with room for
//! `n_ctx` rows per head. One head of one sequence is a contiguous (n_ctx, hd) block whose
//! first `len` rows are filled, so a decode step reads each head's keys and values as one
//! sequential stream (which the hardware prefetcher follows; a transposed `[hd][pos]` layout,
//! tried first, turned each head into 64 short strided reads and made decoding at 576 tokens
//! of context 5× slower), and copying a prompt to another sequence is one `memcpy` per
//! (layer, head). A sequence's blocks are contiguous, so giving its memory back is one call.
//!
//! Memory follows the work without ever moving: the whole cache is one anonymous mapping of
//! address space reserved when the cache is created, whose pages the kernel supplies
//! (zeroed) only when a row is first stored in them. Nothing is allocated, copied or
//! zero-filled as the context grows: row p of a head lands in the same place whether the
//! sequence is 5 or 1000 tokens long, and the resident set follows the positions used, a
//! page (4 KiB: 32 rows of a 64-wide f16 head) per head at a time. A 5-token run with the
//! default 1024-token context holds 3 MiB of KV (GPT-2 Medium, F16: 24 layers × K,V × 16
//! heads × one page), not the whole context's 96 MiB. Transparent huge pages are turned off
//! for the mapping, which would otherwise make the first row of each block cost 2 MiB. A
//! server slot's pages are given back to the kernel when its sequence is cleared.
//!
//! Elements are F16 by default (llama.cpp's default: half the memory, 96 MiB for GPT-2
//! Medium at n_ctx 1024) or F32. Values are rounded to f16 when stored, so prefill and
//! decode see exactly the same K/V values whichever path wrote them.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::anon::AnonMap;
use crate::attention::{f16_to_f32, HeadKv};

/// Rows a sequence's capacity is counted in multiples of (and at least): the accounting
/// unit of [`KvCache::capacity`] and [`KvCache::allocated_bytes`], close to the kernel's
/// page granularity for common head sizes (16 rows of a 64-wide f16 head are 2 KiB).
const ROW_QUANTUM: usize = 16;

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

/// Per-layer K and V for `n_seq` sequences of up to `n_ctx` positions each.
pub struct KvCache {
    ty: KvType,
    n_layer: usize,
    n_seq: usize,
    n_ctx: usize,
    n_head: usize,
    head_dim: usize,
    /// Every block, `[seq][layer][K, V][head][row][hd]`.
    map: AnonMap,
    /// Rows counted as allocated per sequence: the positions reserved so far, rounded up to
    /// [`ROW_QUANTUM`].
    cap: Vec<usize>,
    /// Filled positions per sequence.
    len: Vec<usize>,
}

impl KvCache {
    /// An empty cache that may grow to `n_ctx` positions per sequence: address space for
    /// all of it is reserved, but no memory is used until rows are stored. Sizes must already
    /// be validated by the caller (non-zero). Fails if the full cache's size overflows or the
    /// address space cannot be reserved.
    pub fn new(
        ty: KvType,
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_head: usize,
        head_dim: usize,
    ) -> Result<KvCache, String> {
        let bytes = n_layer
            .checked_mul(n_seq)
            .and_then(|x| x.checked_mul(n_ctx))
            .and_then(|x| x.checked_mul(n_head))
            .and_then(|x| x.checked_mul(head_dim))
            .and_then(|x| x.checked_mul(2 * ty.size()))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| "KV cache size overflows".to_string())?;
        let map = AnonMap::new(bytes, "KV cache")?;
        Ok(KvCache {
            ty,
            n_layer,
            n_seq,
            n_ctx,
            n_head,
            head_dim,
            map,
            cap: vec![0; n_seq],
            len: vec![0; n_seq],
        })
    }

    /// Element type.
    pub fn ty(&self) -> KvType {
        self.ty
    }
    /// Positions per sequence (the ceiling the cache may grow to).
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
    /// Positions counted as allocated for sequence `seq` (≥ its length, ≤ `n_ctx`): those
    /// reserved so far, rounded up to a multiple of 16.
    pub fn capacity(&self, seq: usize) -> usize {
        self.cap[seq]
    }
    /// Bytes of K and V for one position of one sequence, every layer.
    pub fn bytes_per_position(&self) -> usize {
        2 * self.n_layer * self.n_head * self.head_dim * self.ty.size()
    }
    /// Bytes K and V take when every sequence is full (`n_ctx` positions each): the most
    /// this cache can grow to.
    pub fn bytes(&self) -> usize {
        self.n_seq * self.n_ctx * self.bytes_per_position()
    }
    /// Bytes of K and V in use now (the rows reserved so far; the resident set rounds each
    /// head's rows up to whole pages).
    pub fn allocated_bytes(&self) -> usize {
        self.cap.iter().sum::<usize>() * self.bytes_per_position()
    }

    /// Count positions 0..n of `seq` (n ≤ `n_ctx`) as in use. Nothing moves: the rows'
    /// place in the mapping is fixed, and their pages are supplied when first written.
    pub fn reserve(&mut self, seq: usize, n: usize) {
        debug_assert!(n <= self.n_ctx);
        if n > self.cap[seq] {
            self.cap[seq] = n.next_multiple_of(ROW_QUANTUM).min(self.n_ctx).max(n);
        }
    }

    /// Element offset of row 0 of `head` of the K (`kv` = 0) or V (1) block of (layer, seq).
    fn at(&self, layer: usize, seq: usize, kv: usize, head: usize) -> usize {
        (((seq * self.n_layer + layer) * 2 + kv) * self.n_head + head) * self.n_ctx * self.head_dim
    }

    /// Store one token's K and V rows (each C = n_head·hd values, heads concatenated, as the
    /// QKV projection produces them) at `pos` of `seq` in `layer`. Does not change `len`:
    /// the caller commits the positions with [`KvCache::set_len`] once all layers are done.
    pub fn store(&mut self, layer: usize, seq: usize, pos: usize, k_row: &[f32], v_row: &[f32]) {
        self.reserve(seq, pos + 1);
        let hd = self.head_dim;
        for h in 0..self.n_head {
            let (ka, va) = (
                self.at(layer, seq, 0, h) + pos * hd,
                self.at(layer, seq, 1, h) + pos * hd,
            );
            let (kh, vh) = (&k_row[h * hd..(h + 1) * hd], &v_row[h * hd..(h + 1) * hd]);
            match self.ty {
                KvType::F16 => {
                    let e = self.map.elems_mut::<f16>();
                    e[ka..ka + hd].convert_from_f32_slice(kh);
                    e[va..va + hd].convert_from_f32_slice(vh);
                }
                KvType::F32 => {
                    let e = self.map.elems_mut::<f32>();
                    e[ka..ka + hd].copy_from_slice(kh);
                    e[va..va + hd].copy_from_slice(vh);
                }
            }
        }
    }

    /// Positions 0..n of (layer, seq, head), read in place in the cache's element type (for
    /// a few queries: the kernel widens f16 rows as it goes).
    pub fn head(&self, layer: usize, seq: usize, head: usize, n: usize) -> HeadKv<'_> {
        let m = n * self.head_dim;
        let (ka, va) = (self.at(layer, seq, 0, head), self.at(layer, seq, 1, head));
        match self.ty {
            KvType::F32 => {
                let e = self.map.elems::<f32>();
                HeadKv::F32 {
                    k: &e[ka..ka + m],
                    v: &e[va..va + m],
                }
            }
            KvType::F16 => {
                let e = self.map.elems::<f16>();
                HeadKv::F16 {
                    k: &e[ka..ka + m],
                    v: &e[va..va + m],
                }
            }
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
        let m = n * self.head_dim;
        match self.head(layer, seq, head, n) {
            HeadKv::F16 { k, v } => {
                if buf.len() < 2 * m {
                    buf.resize(2 * m, 0.0);
                }
                let (kb, vb) = buf[..2 * m].split_at_mut(m);
                f16_to_f32(k, kb);
                f16_to_f32(v, vb);
                HeadKv::F32 { k: kb, v: vb }
            }
            f32_rows => f32_rows,
        }
    }

    /// Mark the first `len` positions of `seq` as filled.
    pub fn set_len(&mut self, seq: usize, len: usize) {
        debug_assert!(len <= self.cap[seq]);
        self.len[seq] = len;
    }

    /// Copy sequence `src`'s filled positions into every other sequence (a shared prompt
    /// before sampling several continuations), making them all the same length.
    pub fn fork(&mut self, src: usize) {
        let n = self.len[src];
        let m = n * self.head_dim;
        let es = self.ty.size();
        for dst in (0..self.n_seq).filter(|&s| s != src) {
            self.reserve(dst, n);
            for layer in 0..self.n_layer {
                for kv in 0..2 {
                    for h in 0..self.n_head {
                        let (f, t) = (self.at(layer, src, kv, h), self.at(layer, dst, kv, h));
                        self.map.copy_within(f * es..(f + m) * es, t * es);
                    }
                }
            }
            self.len[dst] = n;
        }
    }

    /// Forget every sequence. The memory is kept: the same session usually runs a similar
    /// length next (a benchmark repetition, the next perplexity window).
    pub fn clear(&mut self) {
        self.len.fill(0);
    }

    /// Forget sequence `seq` only, leaving the others as they are, and give its memory back:
    /// a server slot whose request ended is reused from position 0 by a request of any
    /// length. No-op for a sequence that does not exist.
    pub fn clear_seq(&mut self, seq: usize) {
        if seq >= self.n_seq {
            return;
        }
        self.len[seq] = 0;
        self.cap[seq] = 0;
        // The sequence's blocks are one range; its whole pages go back to the kernel (the
        // partial pages at its ends, shared with the neighbouring sequences, stay).
        let per_seq = self.n_ctx * self.bytes_per_position();
        self.map.release(seq * per_seq, (seq + 1) * per_seq);
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
            // The other layer of the sequence is untouched (zero); the other sequence was
            // never given memory.
            let (k, v) = read(&kv, 0, 1, 2, 3);
            assert!(k.iter().chain(&v).all(|&x| x == 0.0));
            assert_eq!(kv.capacity(0), 0);
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
    fn memory_grows_with_the_positions_used() {
        for ty in [KvType::F16, KvType::F32] {
            let (n_layer, n_ctx, n_head, hd) = (2, 100, 3, 4);
            let mut kv = KvCache::new(ty, n_layer, 2, n_ctx, n_head, hd).unwrap();
            let per_pos = 2 * n_layer * n_head * hd * ty.size();
            assert_eq!(kv.bytes_per_position(), per_pos);
            assert_eq!(kv.bytes(), 2 * n_ctx * per_pos);
            assert_eq!(kv.allocated_bytes(), 0);
            // A 5-token prompt: rounded up to the row quantum, not the context.
            kv.reserve(0, 5);
            assert_eq!(kv.capacity(0), ROW_QUANTUM);
            assert_eq!(kv.allocated_bytes(), ROW_QUANTUM * per_pos);
            // Appending one position at a time grows the count by the quantum, up to n_ctx
            // and never past it; nothing moves: a head's rows stay where they were first
            // stored, and so do their values, in every layer and head.
            let c = n_head * hd;
            let first_row = |kv: &KvCache| match kv.head(1, 0, 2, 1) {
                HeadKv::F16 { k, .. } => k.as_ptr() as usize,
                HeadKv::F32 { k, .. } => k.as_ptr() as usize,
            };
            let addr = first_row(&kv);
            let mut caps = vec![kv.capacity(0)];
            for pos in 0..n_ctx {
                for layer in 0..n_layer {
                    let base = (layer * 1000 + pos) as f32;
                    kv.store(layer, 0, pos, &row(c, base), &row(c, -base));
                }
                kv.set_len(0, pos + 1);
                if *caps.last().unwrap() != kv.capacity(0) {
                    caps.push(kv.capacity(0));
                }
            }
            assert_eq!(caps, [16, 32, 48, 64, 80, 96, 100]);
            assert_eq!(first_row(&kv), addr);
            for layer in 0..n_layer {
                for h in 0..n_head {
                    let (k, v) = read(&kv, layer, 0, h, n_ctx);
                    for p in 0..n_ctx {
                        let want = (layer * 1000 + p) as f32 + (h * hd) as f32 * 0.25;
                        // f16 holds these integers + quarters exactly below 2048.
                        assert_eq!(k[p * hd], want, "layer {layer} head {h} pos {p}");
                        assert_eq!(
                            v[p * hd],
                            -(layer as f32 * 1000.0 + p as f32) + (h * hd) as f32 * 0.25
                        );
                    }
                }
            }
            // Sequence 1 was never used: it holds nothing.
            assert_eq!(kv.capacity(1), 0);
            assert_eq!(kv.allocated_bytes(), n_ctx * per_pos);
            // Clearing everything keeps the memory; clearing one slot gives it back.
            kv.clear();
            assert_eq!(kv.allocated_bytes(), n_ctx * per_pos);
            kv.clear_seq(0);
            assert_eq!((kv.capacity(0), kv.allocated_bytes()), (0, 0));
        }
    }

    #[test]
    fn fork_grows_the_other_sequences_to_the_prompt() {
        let mut kv = KvCache::new(KvType::F16, 1, 2, 64, 2, 2).unwrap();
        kv.reserve(0, 20);
        for pos in 0..20 {
            kv.store(0, 0, pos, &row(4, pos as f32), &row(4, 1.0));
        }
        kv.set_len(0, 20);
        assert_eq!(kv.capacity(1), 0);
        kv.fork(0);
        assert_eq!((kv.len(1), kv.capacity(1)), (20, 32));
        assert_eq!(read(&kv, 0, 1, 1, 20), read(&kv, 0, 0, 1, 20));
    }

    #[test]
    fn clear_seq_gives_the_pages_back() {
        // 1024 positions of one 64-wide f16 head, K and V: 256 KiB per sequence, whole pages.
        let (n_ctx, hd) = (1024, 64);
        let mut kv = KvCache::new(KvType::F16, 1, 2, n_ctx, 1, hd).unwrap();
        for s in 0..2 {
            for pos in 0..300 {
                kv.store(0, s, pos, &row(hd, 1.0 + pos as f32), &row(hd, 2.0));
            }
            kv.set_len(s, 300);
        }
        kv.clear_seq(1);
        assert_eq!((kv.len(1), kv.capacity(1)), (0, 0));
        // The dropped pages read back as the kernel's zero pages; sequence 0 keeps its rows.
        let (k, v) = read(&kv, 0, 1, 0, 300);
        assert!(k.iter().chain(&v).all(|&x| x == 0.0));
        let (k, _) = read(&kv, 0, 0, 0, 300);
        assert_eq!(k[299 * hd], 300.0);
        // The slot is reused from position 0.
        kv.store(0, 1, 0, &row(hd, 7.0), &row(hd, 7.0));
        kv.set_len(1, 1);
        assert_eq!(read(&kv, 0, 1, 0, 1).0[0], 7.0);
    }

    #[test]
    fn overflowing_sizes_are_refused() {
        assert!(KvCache::new(KvType::F16, usize::MAX, 2, 1, 1, 1).is_err());
    }
}
