//! Stop strings over streamed text.
//!
//! A stop string may arrive split over several tokens ("\n" then "\nUser"), so text that could
//! be the start of one is held back until it either completes the stop string (then it and
//! everything after it are dropped) or can no longer do so (then it is released).
//! [`TextStream`] puts this behind a [`Utf8Stream`]: token bytes in, releasable text out.

use super::stream::Utf8Stream;

/// Holds back text that may begin a stop string and cuts the text at the first one.
#[derive(Debug, Default, Clone)]
struct StopMatcher {
    stops: Vec<String>,
    /// Text not released yet: its end may be the start of a stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; an empty list releases all text at once.
    fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            ..Default::default()
        }
    }

    /// Whether a stop string has been found.
    fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds text and returns what is safe to release. Once a stop string is found, returns
    /// the text before the earliest one and nothing ever again.
    fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // The longest tail (on a character boundary) that some stop string starts with stays.
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

    /// The end of the text: whatever is still held (no stop string can complete any more).
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// One generated sequence's text as its tokens arrive: whole UTF-8 characters only, stop
/// strings found across token boundaries, held back while a partial match is pending and
/// never part of the text.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    utf8: Utf8Stream,
    stop: StopMatcher,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            utf8: Utf8Stream::new(),
            stop: StopMatcher::new(stops),
        }
    }

    /// Whether a stop string has been seen.
    pub fn stopped(&self) -> bool {
        self.stop.stopped()
    }

    /// Feeds one token's bytes; returns the text that can be released now. After a stop
    /// string is found, returns the text before it and nothing ever again.
    pub fn push(&mut self, token_bytes: &[u8]) -> String {
        if self.stopped() {
            return String::new();
        }
        let text = self.utf8.push(token_bytes);
        self.stop.push(&text)
    }

    /// End of the stream (length or end-of-text): everything still held, an unfinished
    /// character as U+FFFD. A stop string that ends in that last piece still cuts the text.
    pub fn finish(&mut self) -> String {
        if self.stopped() {
            return String::new();
        }
        let tail = self.utf8.finish();
        let out = self.stop.push(&tail);
        out + &self.stop.finish()
    }
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

    fn joined(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let pieces: Vec<&[u8]> = pieces.iter().map(|p| p.as_bytes()).collect();
        let (outs, fin, stopped) = run(stops, &pieces);
        (outs.concat() + &fin, stopped)
    }

    #[test]
    fn a_multibyte_character_split_over_tokens_is_released_whole() {
        let (outs, fin, _) = run(&[], &[b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x98", b"\x80!"]);
        assert_eq!(outs, ["caf", "é ", "", "", "😀!"]);
        assert_eq!(fin, "");
        let (outs, fin, _) = run(&[], &[b"ab\xe2\x82"]);
        assert_eq!(
            (outs, fin),
            (vec!["ab".to_string()], "\u{fffd}".to_string())
        );
    }

    #[test]
    fn a_stop_string_spanning_tokens_is_held_back_and_excluded() {
        let (outs, fin, stopped) = run(&["\n\nUser"], &[b"Hi", b" there\n", b"\nUs", b"er: more"]);
        assert_eq!(outs, ["Hi", " there", "", ""]);
        assert_eq!(fin, "");
        assert!(stopped);
        assert_eq!(joined(&["\n\n"], &["a", "\n", "\nb"]), ("a".into(), true));
        assert_eq!(joined(&["END"], &["xE", "N", "D"]), ("x".into(), true));
    }

    #[test]
    fn a_partial_match_that_fails_is_released() {
        let (outs, fin, stopped) = run(&["END"], &[b"a E", b"N", b"x", b"EN"]);
        assert_eq!(outs, ["a ", "", "ENx", ""]);
        assert_eq!(fin, "EN");
        assert!(!stopped);
        assert_eq!(joined(&["END"], &["xE", "N", "d"]), ("xENd".into(), false));
        assert_eq!(joined(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (outs, _, stopped) = run(&["cd", "b"], &[b"abcd"]);
        assert_eq!(outs, ["a"]);
        assert!(stopped);
        assert_eq!(joined(&["b", "a"], &["xyab"]), ("xy".into(), true));
    }

    #[test]
    fn a_multibyte_stop_string_split_inside_a_character() {
        let (outs, _, stopped) = run(&["é!"], &[b"x\xc3", b"\xa9", b"!y"]);
        assert_eq!(outs, ["x", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn a_stop_string_completed_by_the_lossy_tail_still_cuts() {
        // The unfinished "\xe2" becomes U+FFFD at the end, completing the stop string.
        let (outs, fin, stopped) = run(&["a\u{fffd}"], &[b"xa\xe2"]);
        assert_eq!(
            (outs.concat(), fin, stopped),
            ("x".to_string(), String::new(), true)
        );
    }

    #[test]
    fn nothing_is_released_after_a_stop() {
        let mut t = TextStream::new(vec!["!".into()]);
        assert_eq!(t.push(b"ok!more"), "ok");
        assert_eq!(t.push(b"later"), "");
        assert_eq!(t.finish(), "");
    }
}
