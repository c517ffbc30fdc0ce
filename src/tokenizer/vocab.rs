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
    /// No string is listed twice (so a string equal to token i's has id i).
    unique: bool,
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
            unique: true,
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
                    other if v.bytes(other as usize - 1) == s => {
                        v.unique = false;
                        break;
                    }
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

    /// [`Vocab::get`], trying `hint` first: one comparison with a string read in order
    /// instead of a hash probe, for callers that can usually guess the id (the result of GPT-2's
    /// merge of rank r is token 256 + r). The same answer as `get` whatever the hint.
    pub fn get_hinted(&self, s: &str, hint: u32) -> Option<u32> {
        let hit = self.unique
            && (hint as usize) < self.len()
            && self.bytes(hint as usize) == s.as_bytes();
        if hit {
            Some(hint)
        } else {
            self.get(s)
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
        // A hint is only a shortcut: right, wrong, out of range, or pointing at a duplicate's
        // later id, the answer is `get`'s.
        for (s, hint) in [
            ("t3", 3),
            ("t3", 4),
            ("t3", 99_999),
            ("x", 5002),
            ("t17", 5001),
        ] {
            assert_eq!(v.get_hinted(s, hint), v.get(s), "{s} hint {hint}");
        }
        assert_eq!(v.get_hinted("nope", 0), None);
        let unique = Vocab::new(tokens.iter().map(String::as_str)).unwrap();
        assert_eq!(unique.get_hinted("t42", 42), Some(42));
        assert_eq!(unique.get_hinted("t42", 41), Some(42));
    }
}
