//! Incremental detokenization for generation.
//!
//! A GPT-2 token is a run of bytes, not of characters: an emoji or a CJK character is often
//! split over two or three tokens. Printing each token's bytes lossily as it arrives would show
//! U+FFFD where the character is still incomplete, so [`Utf8Stream`] holds back the bytes of an
//! unfinished UTF-8 sequence until the bytes that complete it arrive. Bytes that can never
//! become valid UTF-8 (a stray continuation byte, say) are replaced by U+FFFD right away so that
//! they do not block the text after them. [`StreamDecoder`] feeds it token ids.

use super::{DecodeError, Tokenizer};

/// Turns a stream of bytes into text, never splitting a UTF-8 character. It holds no
/// reference to a tokenizer, so it can live beside one (a server keeps one per choice).
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    /// Bytes of a UTF-8 sequence that is not complete yet (at most 3 after each push).
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes and returns the text they complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    /// The bytes held back because they end in an incomplete UTF-8 sequence.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream: whatever is still held back is returned with U+FFFD for the incomplete
    /// sequence. The stream is empty afterwards.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Removes and returns the longest prefix of `pending` that is decided: valid UTF-8, with
    /// invalid sequences replaced, stopping before a trailing incomplete sequence.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // The prefix up to `valid` was just checked by `from_utf8`.
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        // Broken bytes that no later byte can fix.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + n;
                        }
                        // A sequence cut short by the end of the buffer: wait for more.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

/// Turns a stream of token ids into text as they arrive. Create it with
/// [`Tokenizer::stream_decoder`].
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    utf8: Utf8Stream,
}

impl<'t> StreamDecoder<'t> {
    pub(super) fn new(tokenizer: &'t Tokenizer) -> Self {
        Self {
            tokenizer,
            utf8: Utf8Stream::new(),
        }
    }

    /// Feeds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, DecodeError> {
        let bytes = self
            .tokenizer
            .token_bytes(id)
            .ok_or(DecodeError::IdOutOfRange {
                id,
                n_vocab: self.tokenizer.n_vocab(),
            })?;
        Ok(self.utf8.push(bytes))
    }

    /// Feeds several tokens and returns the text they complete.
    pub fn push_all(&mut self, ids: &[u32]) -> Result<String, DecodeError> {
        let mut text = String::new();
        for &id in ids {
            text.push_str(&self.push(id)?);
        }
        Ok(text)
    }

    /// The bytes held back because they end in an incomplete UTF-8 sequence.
    pub fn pending(&self) -> &[u8] {
        self.utf8.pending()
    }

    /// Ends the stream: whatever is still held back is returned with U+FFFD for the incomplete
    /// sequence.
    pub fn finish(mut self) -> String {
        self.utf8.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    fn run(pieces: &[&[u8]]) -> (Vec<String>, String) {
        let mut s = Utf8Stream::new();
        let outs = pieces.iter().map(|p| s.push(p)).collect();
        (outs, s.finish())
    }

    #[test]
    fn a_multibyte_character_split_over_pushes_is_released_whole() {
        // "é" is C3 A9; "😀" is F0 9F 98 80.
        let (outs, fin) = run(&[b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x98", b"\x80!"]);
        assert_eq!(outs, ["caf", "é ", "", "", "😀!"]);
        assert_eq!(fin, "");
    }

    #[test]
    fn broken_bytes_are_replaced_at_once_and_an_unfinished_tail_at_the_end() {
        let (outs, fin) = run(&[b"ab\xe2\x82"]);
        assert_eq!(outs, ["ab"]);
        assert_eq!(fin, "\u{fffd}");
        let (outs, fin) = run(&[b"\x80x", b"\xc3(", b"y"]);
        assert_eq!(outs, ["\u{fffd}x", "\u{fffd}(", "y"]);
        assert_eq!(fin, "");
    }
}
