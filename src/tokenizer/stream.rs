//! Incremental detokenization for generation.
//!
//! A GPT-2 token is a run of bytes, not of characters: an emoji or a CJK character is often
//! split over two or three tokens. Printing each token's bytes lossily as it arrives would show
//! U+FFFD where the character is still incomplete, so the decoder holds back the bytes of an
//! unfinished UTF-8 sequence until the token that completes it arrives. Bytes that can never
//! become valid UTF-8 (a stray continuation byte, say) are replaced by U+FFFD right away so that
//! they do not block the text after them.

use super::{DecodeError, Tokenizer};

/// Turns a stream of token ids into text as they arrive. Create it with
/// [`Tokenizer::stream_decoder`].
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    /// Bytes of a UTF-8 sequence that is not complete yet (at most 3).
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    pub(super) fn new(tokenizer: &'t Tokenizer) -> Self {
        Self {
            tokenizer,
            pending: Vec::with_capacity(8),
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
        self.pending.extend_from_slice(bytes);
        Ok(self.take_complete())
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
        &self.pending
    }

    /// Ends the stream: whatever is still held back is returned with U+FFFD for the incomplete
    /// sequence.
    pub fn finish(mut self) -> String {
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
