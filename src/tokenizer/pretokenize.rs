//! GPT-2's pre-tokenizer: the split regex, hand-written.
//!
//! Before BPE, GPT-2 cuts text into pieces with
//!
//! ```text
//! 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//! ```
//!
//! applied as "find all" (leftmost-first alternation, greedy quantifiers). BPE never merges
//! across pieces, so the cut must be exact. Matching it by hand avoids a backtracking regex
//! engine (the `(?!\S)` look-ahead rules out the `regex` crate) and is several times faster.
//!
//! How each alternative resolves at a position `p`:
//! - the contractions are case-sensitive ASCII literals and are tried first;
//! - ` ?X+` (X = letter, number or "other"): a single U+0020 space is taken only when a
//!   character of class X follows it; otherwise the run starts at `p` itself;
//! - whitespace at `p` that no ` ?X+` claimed: the maximal whitespace run, except that when a
//!   non-whitespace character follows the run, its last whitespace character is left for the
//!   next piece (`\s+(?!\S)` backtracks by one) — unless the run is a single character, which
//!   `\s+` then takes alone.
//!
//! Character classes follow Unicode: `\s` is the White_Space property (`char::is_whitespace`),
//! `\p{N}` is general category N (`char::is_numeric`), `\p{L}` is general category L.

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// The class of a character as the split regex sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\s`
    Space,
    /// `[^\s\p{L}\p{N}]`
    Other,
}

/// Classes of the 128 ASCII characters, the common case, without a table lookup per category.
const ASCII_CLASS: [Class; 128] = {
    let mut t = [Class::Other; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        t[i] = if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if matches!(c, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ') {
            // ASCII White_Space: TAB, LF, VT, FF, CR, SPACE (not FS/GS/RS/US 0x1C-0x1F).
            Class::Space
        } else {
            Class::Other
        };
        i += 1;
    }
    t
};

fn classify(c: char) -> Class {
    if c.is_ascii() {
        ASCII_CLASS[c as usize]
    } else if c.is_whitespace() {
        Class::Space
    } else if c.general_category_group() == GeneralCategoryGroup::Letter {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else {
        Class::Other
    }
}

/// The first character of `s` (non-empty) and its class.
#[inline]
fn first(s: &str) -> Option<(char, Class)> {
    let c = s.chars().next()?;
    Some((c, classify(c)))
}

/// Byte length of the longest prefix of `s` whose characters all have class `class`.
#[inline]
fn run_len(s: &str, class: Class) -> usize {
    s.char_indices()
        .find(|&(_, c)| classify(c) != class)
        .map_or(s.len(), |(i, _)| i)
}

/// Byte length of the piece the split regex matches at the start of `s` (non-empty input gives a
/// non-zero length: every character belongs to some alternative).
pub fn piece_len(s: &str) -> usize {
    let b = s.as_bytes();
    if b.is_empty() {
        return 0;
    }
    // 's 't 're 've 'm 'll 'd
    if b[0] == b'\'' && b.len() >= 2 {
        match (b[1], b.get(2)) {
            (b's' | b't' | b'm' | b'd', _) => return 2,
            (b'r' | b'v', Some(b'e')) | (b'l', Some(b'l')) => return 3,
            _ => {}
        }
    }
    let Some((c0, class0)) = first(s) else {
        return 0;
    };
    // ` ?X+`: a space joins the run of the class that follows it, if that is not whitespace.
    if c0 == ' ' {
        if let Some((_, class1)) = first(&s[1..]) {
            if class1 != Class::Space {
                return 1 + run_len(&s[1..], class1);
            }
        }
    } else if class0 != Class::Space {
        return run_len(s, class0);
    }
    // Whitespace that no ` ?X+` claimed.
    let ws = run_len(s, Class::Space);
    if ws == s.len() {
        return ws; // `\s+(?!\S)` at the end of the text.
    }
    // A non-whitespace character follows: `\s+(?!\S)` must give back the last whitespace
    // character so that what follows it is whitespace; it fails if that leaves nothing.
    let last_start = s[..ws].char_indices().next_back().map_or(0, |(i, _)| i);
    if last_start > 0 {
        last_start
    } else {
        ws // `\s+`: the single whitespace character alone.
    }
}

/// Iterator over the pieces of `text` in order; concatenated they give `text` back.
pub struct Pieces<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let n = piece_len(self.rest);
        let (piece, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(piece)
    }
}

/// Splits `text` the way GPT-2's regex does before BPE.
pub fn split(text: &str) -> Pieces<'_> {
    Pieces { rest: text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(s: &str) -> Vec<&str> {
        split(s).collect()
    }

    #[test]
    fn words_spaces_and_punctuation() {
        assert_eq!(
            pieces("Hello, I'm a model!"),
            ["Hello", ",", " I", "'m", " a", " model", "!"]
        );
        assert_eq!(pieces(""), Vec::<&str>::new());
        assert_eq!(pieces(" "), [" "]);
        assert_eq!(pieces("a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces("trailing   "), ["trailing", "   "]);
        assert_eq!(pieces("\n\nx"), ["\n", "\n", "x"]);
        assert_eq!(pieces("x \n y"), ["x", " \n", " y"]);
        assert_eq!(pieces("\t\t x"), ["\t\t", " x"]);
        assert_eq!(pieces("a\nb"), ["a", "\n", "b"]);
    }

    #[test]
    fn contractions_are_lowercase_literals() {
        assert_eq!(pieces("we'll 'S 'LL"), ["we", "'ll", " '", "S", " '", "LL"]);
        assert_eq!(pieces("x''s"), ["x", "''", "s"]);
        assert_eq!(pieces("'re've"), ["'re", "'ve"]);
        assert_eq!(pieces("'"), ["'"]);
        assert_eq!(pieces("'l"), ["'", "l"]);
    }

    #[test]
    fn numbers_and_unicode_classes() {
        assert_eq!(pieces("3.14 1,000"), ["3", ".", "14", " 1", ",", "000"]);
        assert_eq!(pieces("naïve"), ["naïve"]);
        // U+0301 COMBINING ACUTE is a mark (Mn), neither letter nor number.
        assert_eq!(pieces("e\u{301}t"), ["e", "\u{301}", "t"]);
        // Superscript two (No) and Roman numeral (Nl) are numbers; CJK are letters.
        assert_eq!(pieces("x² Ⅻ 杜甫"), ["x", "²", " Ⅻ", " 杜甫"]);
        // NBSP and U+3000 are whitespace; U+200B ZERO WIDTH SPACE is not (it is Cf).
        assert_eq!(pieces("a\u{a0}\u{3000}b"), ["a", "\u{a0}", "\u{3000}", "b"]);
        assert_eq!(pieces("a\u{200b}b"), ["a", "\u{200b}", "b"]);
        // U+001F UNIT SEPARATOR is not White_Space.
        assert_eq!(pieces("a \u{1f}"), ["a", " \u{1f}"]);
    }

    #[test]
    fn pieces_always_concatenate_to_the_input() {
        let s = "  Mixed  \t\n\r\n 12ab'll\u{2028}— «quotes» 😀  end \u{85}";
        let joined: String = pieces(s).concat();
        assert_eq!(joined, s);
        assert!(pieces(s).iter().all(|p| !p.is_empty()));
    }
}
