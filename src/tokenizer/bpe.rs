//! Byte-pair encoding of one pre-tokenized piece.
//!
//! A piece starts as one symbol per byte. The adjacent pair with the lowest merge rank is
//! merged into one symbol, repeatedly, until no adjacent pair has a merge. Ties in rank go to
//! the leftmost pair, which reproduces GPT-2's reference (it merges every occurrence of the best
//! pair left to right before looking again).
//!
//! Symbols live in a doubly linked list over a vector and candidate pairs in a min-heap keyed
//! by (rank, position). A merge only changes the two pairs around it, so each step costs
//! O(log n) instead of rescanning the piece; stale heap entries are skipped when popped by
//! checking that the pair still exists with the same rank.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// One merge rule: the rank (its line in the merges list, lower merges first) and the token it
/// produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Merge {
    pub rank: u32,
    pub id: u32,
}

/// The merge rules, keyed by the ids of the left and right token.
#[derive(Debug, Default)]
pub struct MergeTable {
    map: HashMap<u64, Merge, FxBuildHasher>,
}

#[inline]
fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// Marks a symbol that was merged into its left neighbour.
const GONE: u32 = u32::MAX;
/// "No neighbour" in the linked list.
const NONE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: u32,
    next: u32,
}

impl MergeTable {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            map: HashMap::with_capacity_and_hasher(n, FxBuildHasher::default()),
        }
    }

    /// Adds a rule; if the pair already has one, the earlier (lower-rank) rule is kept.
    pub fn insert(&mut self, left: u32, right: u32, merge: Merge) {
        self.map.entry(pair_key(left, right)).or_insert(merge);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[inline]
    pub fn get(&self, left: u32, right: u32) -> Option<Merge> {
        self.map.get(&pair_key(left, right)).copied()
    }

    /// Appends the BPE tokens of `piece` to `out`; `byte_ids[b]` is the token of single byte `b`.
    pub fn encode(&self, byte_ids: &[u32; 256], piece: &[u8], out: &mut Vec<u32>) {
        match piece.len() {
            0 => return,
            1 => {
                out.push(byte_ids[piece[0] as usize]);
                return;
            }
            _ => {}
        }
        let n = piece.len() as u32;
        let mut syms: Vec<Symbol> = piece
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let i = i as u32;
                Symbol {
                    id: byte_ids[b as usize],
                    prev: if i == 0 { NONE } else { i - 1 },
                    next: if i + 1 == n { NONE } else { i + 1 },
                }
            })
            .collect();

        // Min-heap of (rank << 32 | left position): the lowest rank, then the leftmost pair.
        let mut heap: BinaryHeap<Reverse<u64>> = BinaryHeap::with_capacity(piece.len());
        let push = |heap: &mut BinaryHeap<Reverse<u64>>, syms: &[Symbol], left: u32| {
            let right = syms[left as usize].next;
            if right == NONE {
                return;
            }
            if let Some(m) = self.get(syms[left as usize].id, syms[right as usize].id) {
                heap.push(Reverse((u64::from(m.rank) << 32) | u64::from(left)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &syms, i);
        }

        while let Some(Reverse(key)) = heap.pop() {
            let rank = (key >> 32) as u32;
            let left = key as u32;
            let l = syms[left as usize];
            if l.id == GONE || l.next == NONE {
                continue;
            }
            let r = syms[l.next as usize];
            // The pair may have changed since this entry was pushed: only merge if the rule
            // that ranks it now is the one the entry was made for.
            let merge = match self.get(l.id, r.id) {
                Some(m) if m.rank == rank => m,
                _ => continue,
            };
            syms[left as usize].id = merge.id;
            syms[left as usize].next = r.next;
            syms[l.next as usize].id = GONE;
            if r.next != NONE {
                syms[r.next as usize].prev = left;
            }
            if l.prev != NONE {
                push(&mut heap, &syms, l.prev);
            }
            push(&mut heap, &syms, left);
        }

        // The first symbol is never merged away (merges absorb the right symbol), so the list
        // starts at 0.
        let mut i = 0u32;
        while i != NONE {
            let s = syms[i as usize];
            out.push(s.id);
            i = s.next;
        }
    }
}

/// A small, fast, non-cryptographic hasher (the "Fx" multiply-rotate hash used in rustc) for
/// maps keyed by token ids and by short pieces; their keys are not attacker-controlled in a
/// way that matters for a local tokenizer, and SipHash would dominate the encode time.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte b ↦ token b, and a few merges over the letters a, b, c.
    fn toy() -> ([u32; 256], MergeTable) {
        let mut byte_ids = [0u32; 256];
        for (b, id) in byte_ids.iter_mut().enumerate() {
            *id = b as u32;
        }
        let (a, b, c) = (u32::from(b'a'), u32::from(b'b'), u32::from(b'c'));
        let mut t = MergeTable::default();
        t.insert(b, c, Merge { rank: 0, id: 300 }); // "bc"
        t.insert(a, b, Merge { rank: 1, id: 301 }); // "ab"
        t.insert(a, 300, Merge { rank: 2, id: 302 }); // "abc"
        t.insert(a, a, Merge { rank: 3, id: 303 }); // "aa"
        (byte_ids, t)
    }

    fn enc(piece: &str) -> Vec<u32> {
        let (byte_ids, t) = toy();
        let mut out = Vec::new();
        t.encode(&byte_ids, piece.as_bytes(), &mut out);
        out
    }

    #[test]
    fn lowest_rank_wins_over_position() {
        // "ab" (rank 1) is leftmost but "bc" (rank 0) merges first, then a+bc.
        assert_eq!(enc("abc"), [302]);
        assert_eq!(enc("abx"), [301, u32::from(b'x')]);
    }

    #[test]
    fn equal_ranks_merge_left_to_right_without_overlap() {
        assert_eq!(enc("aaa"), [303, u32::from(b'a')]);
        assert_eq!(enc("aaaa"), [303, 303]);
    }

    #[test]
    fn trivial_pieces() {
        assert_eq!(enc(""), Vec::<u32>::new());
        assert_eq!(enc("c"), [u32::from(b'c')]);
        assert_eq!(enc("xyz"), [120, 121, 122]);
    }
}
