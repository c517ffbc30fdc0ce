//! The vocabulary's strings as stored (`Ġthe`, `<|endoftext|>`) and the index from string to
//! id, in three flat arrays: every string back to back, where each ends, and an
//! open-addressing hash table of ids. Building it allocates three times instead of once per
//! token, and a lookup touches one slot run and one string instead of chasing a boxed key.

use std::hash::Hasher;

use super::bpe::FxHasher;

/// Marks an empty slot of the table (ids are stored + 1).
const EMPTY: u32 = 0;

pub struct Vocab {
    /// Every token's string, back to back.
    text: Vec<u8>,
    /// End of token i's string in `text` (it starts where token i-1's ends).
    ends: Vec<u32>,
    /// id + 1 of the token hashed to each slot, or EMPTY; the length is a power of two at
    /// least twice the token count, so probe runs stay short.
    slots: Vec<u32>,
    /// 64 − log2(slots.len()): a hash's top bits pick its first slot.
    shift: u32,
}

fn hash(s: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(s);
    h.write_u8(0xff);
    h.finish()
}

impl Vocab {
    /// The index over `tokens` (in id order). For a string listed twice the first id wins.
    /// `None` if the strings do not fit 32-bit offsets (4 GiB of vocabulary).
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Option<Vocab> {
        let mut text = Vec::new();
        let mut ends = Vec::new();
        for t in tokens {
            text.extend_from_slice(t.as_bytes());
            ends.push(u32::try_from(text.len()).ok()?);
        }
        u32::try_from(ends.len()).ok()?;
        let n_slots = (2 * ends.len()).next_power_of_two().max(2);
        let mut v = Vocab {
            text,
            ends,
            slots: vec![EMPTY; n_slots],
            shift: 64 - n_slots.trailing_zeros(),
        };
        let mask = n_slots - 1;
        for id in 0..v.ends.len() {
            let s = v.bytes(id);
            let mut i = (hash(s) >> v.shift) as usize;
            loop {
                match v.slots[i] {
                    EMPTY => {
                        v.slots[i] = id as u32 + 1;
                        break;
                    }
                    other if v.bytes(other as usize - 1) == s => break,
                    _ => i = (i + 1) & mask,
                }
            }
        }
        Some(v)
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The string of token `id` as stored.
    fn bytes(&self, id: usize) -> &[u8] {
        let start = if id == 0 {
            0
        } else {
            self.ends[id - 1] as usize
        };
        &self.text[start..self.ends[id] as usize]
    }

    /// The id of `s` (the first, if the vocabulary lists it twice).
    pub fn get(&self, s: &str) -> Option<u32> {
        let s = s.as_bytes();
        let mask = self.slots.len() - 1;
        let mut i = (hash(s) >> self.shift) as usize;
        loop {
            match self.slots[i] {
                EMPTY => return None,
                id if self.bytes(id as usize - 1) == s => return Some(id - 1),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + 4 * (self.ends.capacity() + self.slots.capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_token_and_nothing_else() {
        let tokens: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
        let mut with_dups: Vec<&str> = tokens.iter().map(String::as_str).collect();
        with_dups.extend(["", "t17", "x"]);
        let v = Vocab::new(with_dups.iter().copied()).unwrap();
        assert_eq!(v.len(), 5003);
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(v.get(t), Some(i as u32));
        }
        // Duplicates keep the first id; the empty string is a token like any other.
        assert_eq!(v.get("t17"), Some(17));
        assert_eq!(v.get(""), Some(5000));
        assert_eq!(v.get("x"), Some(5002));
        assert_eq!(v.get("t5000"), None);
        assert_eq!(v.get("t1 "), None);
        assert!(Vocab::new([].into_iter()).unwrap().get("a").is_none());
    }
}
