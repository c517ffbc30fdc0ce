//! Turning a choice's tokens into text as they arrive: whole UTF-8 characters only, and stop
//! strings found across token boundaries, held back while a partial match is pending and
//! never part of the text.

/// Incremental text of one choice.
#[derive(Debug, Default)]
pub struct TextStream {
    /// Bytes of a UTF-8 sequence not complete yet.
    bytes: Vec<u8>,
    /// Decoded text not released yet: it may be the start of a stop string.
    held: String,
    stops: Vec<String>,
    /// Set once a stop string was found; everything after it is dropped.
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            stops,
            ..Default::default()
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feed one token's bytes; returns the text that can be released now. After a stop
    /// string is found, returns the text before it and nothing ever again.
    pub fn push(&mut self, token_bytes: &[u8]) -> String {
        if self.stopped {
            return String::new();
        }
        self.bytes.extend_from_slice(token_bytes);
        let complete = take_complete_utf8(&mut self.bytes);
        self.held.push_str(&complete);
        self.release()
    }

    /// End of the stream (length or end-of-text): everything still held, an unfinished
    /// character as U+FFFD. A stop string cannot start any more.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let rest = String::from_utf8_lossy(&std::mem::take(&mut self.bytes)).into_owned();
        self.held.push_str(&rest);
        // A complete stop string may still sit in `held` (it ended in the lossy tail).
        let out = self.release();
        out + &std::mem::take(&mut self.held)
    }

    fn release(&mut self) -> String {
        // The earliest complete stop string ends the text.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            self.bytes.clear();
            return out;
        }
        // Hold back the longest suffix that some stop string starts with.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        out
    }
}

/// Remove and return the decided prefix of `bytes`: valid UTF-8, with bytes that can never
/// become valid replaced by U+FFFD, stopping before a trailing incomplete sequence.
pub fn take_complete_utf8(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = bytes.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&bytes[start..valid]));
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid + n;
                    }
                    None => {
                        start = valid;
                        break;
                    }
                }
            }
        }
    }
    bytes.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, String, bool) {
        let mut t = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let outs: Vec<String> = pieces.iter().map(|p| t.push(p)).collect();
        let fin = t.finish();
        (outs, fin, t.stopped())
    }

    #[test]
    fn a_multibyte_character_split_over_tokens_is_released_whole() {
        // "é" is C3 A9; "😀" is F0 9F 98 80.
        let (outs, fin, _) = run(&[], &[b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x98", b"\x80!"]);
        assert_eq!(outs, ["caf", "é ", "", "", "😀!"]);
        assert_eq!(fin, "");
    }

    #[test]
    fn an_unfinished_character_at_the_end_becomes_a_replacement() {
        let (outs, fin, _) = run(&[], &[b"ab\xe2\x82"]);
        assert_eq!(outs, ["ab"]);
        assert_eq!(fin, "\u{fffd}");
        let (outs, _, _) = run(&[], &[b"\x80x"]);
        assert_eq!(outs, ["\u{fffd}x"]);
    }

    #[test]
    fn a_stop_string_spanning_tokens_is_held_back_and_excluded() {
        let (outs, fin, stopped) = run(&["\n\nUser"], &[b"Hi", b" there\n", b"\nUs", b"er: more"]);
        assert_eq!(outs, ["Hi", " there", "", ""]);
        assert_eq!(fin, "");
        assert!(stopped);
    }

    #[test]
    fn a_partial_match_that_fails_is_released() {
        let (outs, fin, stopped) = run(&["END"], &[b"a E", b"N", b"x", b"EN"]);
        assert_eq!(outs, ["a ", "", "ENx", ""]);
        assert_eq!(fin, "EN");
        assert!(!stopped);
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (outs, _, stopped) = run(&["cd", "b"], &[b"abcd"]);
        assert_eq!(outs, ["a"]);
        assert!(stopped);
    }

    #[test]
    fn a_multibyte_stop_string_split_inside_a_character() {
        let (outs, _, stopped) = run(&["é!"], &[b"x\xc3", b"\xa9", b"!y"]);
        assert_eq!(outs, ["x", "", ""]);
        assert!(stopped);
    }
}
