//! GPT-2's byte ↔ character alphabet.
//!
//! GPT-2's BPE works on bytes, but its vocabulary is stored as strings. To keep every token a
//! printable string, each byte is given a stand-in character: the 188 bytes that are already
//! printable Latin-1 (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) stand for themselves, and the other 68
//! (controls, space, DEL, NBSP, soft hyphen) are shifted, in byte order, to U+0100..U+0143.
//! That is why a space shows up as `Ġ` (U+0120) and a newline as `Ċ` (U+010A) in `vocab.json`.

/// Number of bytes that are not printable and so get a character from U+0100 upwards.
const N_SHIFTED: u32 = 68;

/// Bytes whose Latin-1 character is printable and stands for itself.
const fn is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// byte → stand-in character, computed at compile time.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut next_shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let cp = if is_printable(b as u8) {
            b as u32
        } else {
            let cp = 256 + next_shifted;
            next_shifted += 1;
            cp
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => panic!("GPT-2 byte alphabet: invalid code point"),
        };
        b += 1;
    }
    assert!(next_shifted == N_SHIFTED);
    table
};

/// U+0100 + n → the n-th non-printable byte, the inverse of the shifted half of `BYTE_TO_CHAR`.
const SHIFTED_TO_BYTE: [u8; N_SHIFTED as usize] = {
    let mut table = [0u8; N_SHIFTED as usize];
    let mut n = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if !is_printable(b as u8) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
};

/// The character GPT-2's vocabulary uses for byte `b`.
pub fn byte_to_char(b: u8) -> char {
    BYTE_TO_CHAR[b as usize]
}

/// The byte that character `c` stands for, or `None` if `c` is not in the alphabet.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 256 {
        let b = cp as u8;
        return is_printable(b).then_some(b);
    }
    SHIFTED_TO_BYTE.get((cp - 256) as usize).copied()
}

/// Decodes a vocabulary string (e.g. `Ġthe`) to the bytes it stands for (` the`), or `None` if
/// any character is outside the alphabet (which is the case for added tokens stored verbatim).
pub fn decode_token(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

/// [`decode_token`] appending to `out` instead of allocating: `false` (and `out` unchanged)
/// if any character is outside the alphabet.
pub fn decode_token_into(token: &str, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    for c in token.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.truncate(start);
                return false;
            }
        }
    }
    true
}

/// Encodes raw bytes as a vocabulary string (` the` → `Ġthe`).
pub fn encode_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_bijection_between_bytes_and_256_chars() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "char {c:?} used twice");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn matches_the_well_known_stand_ins() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(0), '\u{100}');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0xE9), 'é');
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(decode_token("Ġthe").as_deref(), Some(&b" the"[..]));
        assert_eq!(encode_bytes(b" the\n"), "ĠtheĊ");
    }
}
