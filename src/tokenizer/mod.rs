//! GPT-2's byte-level BPE tokenizer.
//!
//! Encoding is three steps, each in its own file:
//! 1. special tokens (`<|endoftext|>` and any other control token) are cut out of the text;
//! 2. the rest is split into pieces by GPT-2's regex ([`pretokenize`]);
//! 3. each piece's UTF-8 bytes are merged by rank ([`bpe`]), with a cache for repeated pieces.
//!
//! Decoding maps each token back to its bytes ([`byte_alphabet`] undoes GPT-2's byte-to-
//! character trick) and concatenates them; [`StreamDecoder`] does that incrementally, and
//! [`TextStream`] adds stop strings for generation.
//!
//! The vocabulary comes from GGUF metadata (`tokenizer.ggml.*`, [`Tokenizer::from_gguf`]) or
//! from a Hugging Face checkpoint's `vocab.json` + `merges.txt` ([`Tokenizer::from_hf_files`]).

mod bpe;
pub mod byte_alphabet;
mod gguf;
pub mod pretokenize;
mod stop;
mod stream;
mod vocab;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;

use bpe::{FxBuildHasher, Merge, MergeTable};
pub use gguf::TokenizerError;
pub use stop::TextStream;
pub use stream::{StreamDecoder, Utf8Stream};
use vocab::Vocab;

/// GGUF `tokenizer.ggml.token_type` of an ordinary token.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `tokenizer.ggml.token_type` of a control token such as `<|endoftext|>`.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` of a token added by the user (also matched verbatim).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's end-of-text token, which is also its BOS and EOS.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// Pieces longer than this are not cached: they are rare and would bloat the cache.
const MAX_CACHED_PIECE: usize = 64;
/// The piece cache is cleared when it reaches this many entries, bounding its memory.
const MAX_CACHE_ENTRIES: usize = 1 << 17;

/// Why token ids could not be turned into text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("token id {id} is out of range (the vocabulary has {n_vocab} tokens)")]
    IdOutOfRange { id: u32, n_vocab: usize },
    #[error(
        "the tokens decode to bytes that are not valid UTF-8 (first bad byte at offset {offset})"
    )]
    InvalidUtf8 { offset: usize },
}

/// `return Err(TokenizerError::Tables(format!(...)))`.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err(TokenizerError::Tables(format!($($t)*)))
    };
}

/// A token that is matched verbatim in the input before pre-tokenization.
#[derive(Debug, Clone)]
struct Special {
    text: Box<str>,
    id: u32,
}

/// GPT-2's tokenizer. Cheap to share between threads (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    /// All tokens' bytes back to back; token `i` is `bytes[offsets[i]..offsets[i + 1]]`
    /// (32-bit: the vocabulary's strings fit 4 GiB, see [`Vocab::new`], and decoding never
    /// makes a token longer than its string).
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// Vocabulary string (as stored, e.g. `Ġthe`) → id; the first id wins for duplicates.
    token_to_id: Vocab,
    /// Token id of each single byte, where every BPE starts.
    byte_ids: [u32; 256],
    merges: MergeTable,
    /// Matched in `encode` (not `encode_ordinary`), longest first so that a special token that
    /// is a prefix of another does not shadow it.
    specials: Vec<Special>,
    /// First bytes of the special tokens, to skip the search at most positions.
    special_first_byte: [bool; 256],
    eos: Option<u32>,
    /// piece → its BPE tokens.
    cache: Mutex<HashMap<Box<str>, Box<[u32]>, FxBuildHasher>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.n_vocab())
            .field("n_merges", &self.merges.len())
            .field("specials", &self.specials)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// Splits a merges entry "left right" at the first space after the first character, as
/// llama.cpp does (so a left token that starts with a space would still split correctly).
fn split_merge(line: &str) -> Option<(&str, &str)> {
    let (i, _) = line.char_indices().skip(1).find(|&(_, c)| c == ' ')?;
    Some((&line[..i], &line[i + 1..]))
}

/// Without GGUF token types (a Hugging Face `vocab.json`), tokens written `<|…|>` are taken as
/// control tokens; in GPT-2 that is exactly `<|endoftext|>`.
fn looks_like_control(token: &str) -> bool {
    token.len() > 4 && token.starts_with("<|") && token.ends_with("|>")
}

impl Tokenizer {
    /// Builds a tokenizer from a vocabulary (`tokens[id]`, strings in GPT-2's byte alphabet
    /// like `Ġthe`), merge rules (`"left right"`, rank = position in the list) and optional
    /// GGUF token types (3 = control, 4 = user-defined: both are matched verbatim by
    /// [`encode`](Self::encode); without types, tokens written `<|…|>` are control tokens).
    ///
    /// The EOS token is `<|endoftext|>` if the vocabulary has it (see [`with_eos`](Self::with_eos)).
    pub fn new<T, M>(
        tokens: impl IntoIterator<Item = T>,
        merges: impl IntoIterator<Item = M>,
        token_types: Option<Vec<i32>>,
    ) -> Result<Tokenizer, TokenizerError>
    where
        T: AsRef<str>,
        M: AsRef<str>,
    {
        let tokens: Vec<T> = tokens.into_iter().collect();
        let Some(token_to_id) = Vocab::new(tokens.iter().map(AsRef::as_ref)) else {
            bail!("the vocabulary is too large");
        };
        let mut bytes = Vec::with_capacity(token_to_id.heap_bytes() / 4);
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        offsets.push(0u32);
        let mut specials = Vec::new();
        let n_tokens = tokens.len();
        debug_assert_eq!(token_to_id.len(), n_tokens);
        if n_tokens == 0 {
            bail!("the vocabulary is empty");
        }
        if let Some(types) = &token_types {
            if types.len() != n_tokens {
                bail!(
                    "token types list has {} entries but the vocabulary has {n_tokens} tokens",
                    types.len()
                );
            }
        }
        for (i, token) in tokens.iter().enumerate() {
            let token = token.as_ref();
            let Ok(id) = u32::try_from(i) else {
                bail!("vocabulary has more than {} tokens", u32::MAX);
            };
            let ty = match &token_types {
                Some(types) => types[i],
                None if looks_like_control(token) => TOKEN_TYPE_CONTROL,
                None => TOKEN_TYPE_NORMAL,
            };
            let verbatim = ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED;
            if verbatim && !token.is_empty() {
                specials.push(Special {
                    text: token.into(),
                    id,
                });
            }
            // Control and user-defined tokens are stored as plain text; ordinary tokens in the
            // byte alphabet. An ordinary token with characters outside the alphabet cannot come
            // out of BPE on bytes anyway; it decodes to its text as stored.
            if verbatim || !byte_alphabet::decode_token_into(token, &mut bytes) {
                bytes.extend_from_slice(token.as_bytes());
            }
            let Ok(end) = u32::try_from(bytes.len()) else {
                bail!("the vocabulary's decoded bytes exceed 4 GiB");
            };
            offsets.push(end);
        }

        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let c = byte_alphabet::byte_to_char(b as u8);
            let mut buf = [0u8; 4];
            *slot = token_to_id.get(c.encode_utf8(&mut buf)).ok_or_else(|| {
                TokenizerError::Tables(format!(
                    "the vocabulary has no token for byte 0x{b:02x} (written {c:?}), which \
                     byte-level BPE needs: this is not a GPT-2 style vocabulary"
                ))
            })?;
        }

        // Each rule's three lookups (left, right, joined) are independent: resolve them on
        // every core, in rank order within chunks, then insert in rank order so that the
        // first rule for a pair wins and the first bad rule is the one reported.
        let merges: Vec<M> = merges.into_iter().collect();
        if u32::try_from(merges.len()).is_err() {
            bail!("more than {} merges", u32::MAX);
        }
        let lines: Vec<&str> = merges.iter().map(AsRef::as_ref).collect();
        const CHUNK: usize = 4096;
        /// (left id, right id, merge) of each rule in a chunk.
        type Resolved = Vec<(u32, u32, Merge)>;
        let resolved: Vec<Result<Resolved, TokenizerError>> = lines
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(c, chunk)| {
                let mut joined = String::new();
                let mut out = Vec::with_capacity(chunk.len());
                for (k, &line) in chunk.iter().enumerate() {
                    let rank = c * CHUNK + k;
                    let (left, right) = split_merge(line).ok_or_else(|| {
                        TokenizerError::Tables(format!(
                            "merge {rank} ({line:?}) is not of the form \"left right\""
                        ))
                    })?;
                    let found = |id: Option<u32>, s: &str| {
                        id.ok_or_else(|| {
                            TokenizerError::Tables(format!(
                                "merge {rank} ({line:?}): {s:?} is not in the vocabulary"
                            ))
                        })
                    };
                    joined.clear();
                    joined.push_str(left);
                    joined.push_str(right);
                    // Parts first: an unknown part is the more useful message than the
                    // unknown result.
                    let left_id = found(token_to_id.get(left), left)?;
                    let right_id = found(token_to_id.get(right), right)?;
                    // GPT-2's vocabulary lists the 256 byte tokens, then each merge's result
                    // in rank order: try that id before hashing.
                    let hint = u32::try_from(256 + rank).unwrap_or(u32::MAX);
                    let id = found(token_to_id.get_hinted(&joined, hint), &joined)?;
                    let merged = Merge {
                        rank: rank as u32,
                        id,
                    };
                    out.push((left_id, right_id, merged));
                }
                Ok(out)
            })
            .collect();
        let mut table = MergeTable::with_capacity(merges.len());
        for chunk in resolved {
            for (left, right, merged) in chunk? {
                table.insert(left, right, merged);
            }
        }

        specials.sort_by_key(|s: &Special| std::cmp::Reverse(s.text.len()));
        let mut special_first_byte = [false; 256];
        for s in &specials {
            special_first_byte[s.text.as_bytes()[0] as usize] = true;
        }
        let eos = token_to_id.get(ENDOFTEXT);

        Ok(Tokenizer {
            bytes,
            offsets,
            token_to_id,
            byte_ids,
            merges: table,
            specials,
            special_first_byte,
            eos,
            cache: Mutex::new(HashMap::default()),
        })
    }

    /// Reads a Hugging Face GPT-2 tokenizer: `vocab.json` (token → id, ids 0..n without gaps)
    /// and `merges.txt` (one "left right" merge per line after a `#version` line).
    pub fn from_hf_files(
        vocab_json: &Path,
        merges_txt: &Path,
    ) -> Result<Tokenizer, TokenizerError> {
        let tokens = read_vocab_json(vocab_json)?;
        let merges_text =
            std::fs::read_to_string(merges_txt).map_err(|e| TokenizerError::Invalid {
                file: merges_txt.display().to_string(),
                problem: format!("cannot read: {e}"),
            })?;
        let merges: Vec<&str> = merges_text
            .lines()
            .enumerate()
            .filter(|&(i, line)| !(i == 0 && line.starts_with("#version")))
            .map(|(_, line)| line.strip_suffix('\r').unwrap_or(line))
            .filter(|line| !line.is_empty())
            .collect();
        Tokenizer::new(tokens, merges, None).map_err(|e| TokenizerError::Invalid {
            file: format!("{} + {}", vocab_json.display(), merges_txt.display()),
            problem: format!("invalid tokenizer: {e}"),
        })
    }

    /// Sets the end-of-sequence token.
    pub fn with_eos(mut self, id: u32) -> Result<Tokenizer, TokenizerError> {
        if id as usize >= self.n_vocab() {
            bail!(
                "EOS token id {id} is out of range (the vocabulary has {} tokens)",
                self.n_vocab()
            );
        }
        self.eos = Some(id);
        Ok(self)
    }

    /// Number of tokens in the vocabulary (50257 for GPT-2).
    pub fn n_vocab(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The end-of-sequence token (`<|endoftext|>`, 50256, for GPT-2), if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Number of merge rules.
    pub fn n_merges(&self) -> usize {
        self.merges.len()
    }

    /// The id of a vocabulary string as stored (e.g. `Ġthe` or `<|endoftext|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.token_to_id.get(token)
    }

    /// Whether `id` is a control or user-defined token (matched verbatim by `encode`).
    pub fn is_special(&self, id: u32) -> bool {
        self.specials.iter().any(|s| s.id == id)
    }

    /// The bytes token `id` stands for, or `None` if it is out of range.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let start = *self.offsets.get(i)? as usize;
        let end = *self.offsets.get(i + 1)? as usize;
        self.bytes.get(start..end)
    }

    /// Encodes text, recognising control tokens such as `<|endoftext|>` in it.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let mut rest = text;
        while let Some((pos, special)) = self.find_special(rest) {
            self.encode_ordinary_into(&rest[..pos], &mut out);
            out.push(special.id);
            rest = &rest[pos + special.text.len()..];
        }
        self.encode_ordinary_into(rest, &mut out);
        out
    }

    /// Encodes text with control tokens treated as plain text (`<|endoftext|>` becomes seven
    /// ordinary tokens), for untrusted input.
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_ordinary_into(text, &mut out);
        out
    }

    /// Appends the tokens of `text` (no special-token matching) to `out`.
    pub fn encode_ordinary_into(&self, text: &str, out: &mut Vec<u32>) {
        for piece in pretokenize::split(text) {
            self.encode_piece(piece, out);
        }
    }

    /// The tokens' bytes, concatenated.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let b = self.token_bytes(id).ok_or(DecodeError::IdOutOfRange {
                id,
                n_vocab: self.n_vocab(),
            })?;
            out.extend_from_slice(b);
        }
        Ok(out)
    }

    /// The tokens' text. Fails on an unknown id or if the bytes are not valid UTF-8 (a sequence
    /// cut in the middle of a character; use [`StreamDecoder`] or [`decode_lossy`](Self::decode_lossy)
    /// for partial output).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DecodeError> {
        let bytes = self.decode_bytes(ids)?;
        String::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 {
            offset: e.utf8_error().valid_up_to(),
        })
    }

    /// The tokens' text with invalid UTF-8 replaced by U+FFFD. Fails only on an unknown id.
    pub fn decode_lossy(&self, ids: &[u32]) -> Result<String, DecodeError> {
        let bytes = self.decode_bytes(ids)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Empties the piece cache (to measure cold encoding, or to free its memory).
    pub fn clear_cache(&self) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// A decoder that turns tokens into text one at a time, holding back incomplete characters.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// The leftmost special token in `s` (longest on a tie) and its byte offset.
    fn find_special(&self, s: &str) -> Option<(usize, &Special)> {
        if self.specials.is_empty() {
            return None;
        }
        let b = s.as_bytes();
        // A special token's first byte starts a UTF-8 character, so every match is at a
        // character boundary and the slicing in `encode` is valid.
        (0..b.len())
            .filter(|&i| self.special_first_byte[b[i] as usize])
            .find_map(|i| {
                self.specials
                    .iter()
                    .find(|sp| b[i..].starts_with(sp.text.as_bytes()))
                    .map(|sp| (i, sp))
            })
    }

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        if piece.len() == 1 {
            out.push(self.byte_ids[piece.as_bytes()[0] as usize]);
            return;
        }
        let cacheable = piece.len() <= MAX_CACHED_PIECE;
        if cacheable {
            // The cache only ever holds complete entries, so a panic elsewhere while it was
            // locked cannot have left it inconsistent: ignore poisoning.
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let start = out.len();
        self.merges.encode(&self.byte_ids, piece.as_bytes(), out);
        if cacheable {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(piece.into(), out[start..].into());
        }
    }
}

/// Reads `vocab.json` into `tokens[id]`, checking that the ids are exactly 0..n.
fn read_vocab_json(path: &Path) -> Result<Vec<String>, TokenizerError> {
    let invalid = |problem: String| TokenizerError::Invalid {
        file: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
    // A hash map, not `serde_json::Value`, whose B-tree map costs several times more here.
    let map: HashMap<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => invalid(format!(
                "expected a JSON object mapping tokens to ids ({e})"
            )),
            _ => invalid(format!("not valid JSON: {e}")),
        })?;
    let n = map.len();
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (token, id) in map {
        let Some(id) = id.as_u64() else {
            return Err(invalid(format!(
                "the id of {token:?} is not a non-negative integer"
            )));
        };
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get_mut(i))
            .ok_or_else(|| {
                invalid(format!(
                    "id {id} of {token:?} is out of range for {n} tokens (ids must be 0..n)"
                ))
            })?;
        if let Some(other) = slot.replace(token.clone()) {
            return Err(invalid(format!(
                "id {id} is used by both {other:?} and {token:?}"
            )));
        }
    }
    // n distinct ids below n: no gaps are possible, but keep the check explicit.
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| invalid(format!("no token has id {i}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the 256 byte characters plus "Ġt", "he", "Ġthe" and `<|endoftext|>`.
    fn toy() -> Tokenizer {
        let mut tokens: Vec<String> = (0..=255u8)
            .map(|b| byte_alphabet::byte_to_char(b).to_string())
            .collect();
        tokens.extend(["Ġt", "he", "Ġthe", ENDOFTEXT].map(String::from));
        Tokenizer::new(tokens, ["Ġ t", "h e", "Ġt he"], None).expect("toy tokenizer")
    }

    #[test]
    fn merges_and_specials() {
        let t = toy();
        assert_eq!(t.n_vocab(), 260);
        assert_eq!(t.eos_id(), Some(259));
        assert_eq!(t.encode(" the"), [258]);
        assert_eq!(t.encode("the"), [u32::from(b't'), 257]);
        assert_eq!(t.encode("a<|endoftext|> the"), [u32::from(b'a'), 259, 258]);
        // The toy vocabulary has no merges for it, so as plain text it is one token per byte.
        let plain: Vec<u32> = ENDOFTEXT.bytes().map(u32::from).collect();
        assert_eq!(t.encode_ordinary(ENDOFTEXT), plain);
        assert_eq!(t.decode(&[258, 259]).as_deref(), Ok(" the<|endoftext|>"));
        assert!(t.is_special(259) && !t.is_special(258));
        // Called twice to go through the cache.
        for _ in 0..2 {
            assert_eq!(t.encode(" the the"), [258, 258]);
        }
    }

    #[test]
    fn rejects_broken_vocabularies() {
        let err = Tokenizer::new(["a", "b"], Vec::<String>::new(), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("no token for byte 0x00"),
            "{err:#}"
        );
        let bytes: Vec<String> = (0..=255u8)
            .map(|b| byte_alphabet::byte_to_char(b).to_string())
            .collect();
        let err = Tokenizer::new(&bytes, ["a b"], None).unwrap_err();
        assert!(
            format!("{err:#}").contains("\"ab\" is not in the vocabulary"),
            "{err:#}"
        );
        let err = Tokenizer::new(&bytes, ["ab"], None).unwrap_err();
        assert!(format!("{err:#}").contains("not of the form"), "{err:#}");
        let err = Tokenizer::new(&bytes, Vec::<String>::new(), Some(vec![1; 3])).unwrap_err();
        assert!(format!("{err:#}").contains("token types"), "{err:#}");
        let err = Tokenizer::new(Vec::<String>::new(), Vec::<String>::new(), None).unwrap_err();
        assert!(format!("{err:#}").contains("empty"), "{err:#}");
    }

    #[test]
    fn merge_lines_split_after_the_first_character() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(split_merge("  x"), Some((" ", "x")));
        assert_eq!(split_merge("ab"), None);
    }
}
