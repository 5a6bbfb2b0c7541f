//! Code point classes the BPE pre-tokenizers split on: \p{L}, \p{N} and \s, as llama.cpp defines them
//! (general categories from Unicode 15.1, whitespace = the White_Space property).

use super::unicode_tables::{LETTER, NUMBER};

pub(crate) const LETTER_F: u8 = 1;
pub(crate) const NUMBER_F: u8 = 2;
pub(crate) const SPACE_F: u8 = 4;
/// Set for every code point, so that "in range" can be told from "past the end" (flags 0).
pub(crate) const ANY_F: u8 = 8;

static ASCII: [u8; 128] = {
    let mut t = [ANY_F; 128];
    let mut c = 0;
    while c < 128 {
        let b = c as u8;
        if b.is_ascii_alphabetic() {
            t[c] |= LETTER_F;
        } else if b.is_ascii_digit() {
            t[c] |= NUMBER_F;
        } else if matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ') {
            t[c] |= SPACE_F;
        }
        c += 1;
    }
    t
};

fn in_ranges(table: &[(u32, u32)], cp: u32) -> bool {
    // Index of the first range whose start is > cp; the candidate is the one before it.
    let i = table.partition_point(|&(lo, _)| lo <= cp);
    i > 0 && cp <= table[i - 1].1
}

fn is_white_space(cp: u32) -> bool {
    matches!(
        cp,
        0x09..=0x0D | 0x20 | 0x85 | 0xA0 | 0x1680 | 0x2000..=0x200A | 0x2028 | 0x2029 | 0x202F | 0x205F | 0x3000
    )
}

/// Class flags of one code point (always includes `ANY_F`).
#[inline]
pub(crate) fn flags(c: char) -> u8 {
    let cp = c as u32;
    if cp < 128 {
        return ASCII[cp as usize];
    }
    let mut f = ANY_F;
    if is_white_space(cp) {
        f |= SPACE_F;
    } else if in_ranges(&LETTER, cp) {
        f |= LETTER_F;
    } else if in_ranges(&NUMBER, cp) {
        f |= NUMBER_F;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(flags('a') & LETTER_F, LETTER_F);
        assert_eq!(flags('7') & NUMBER_F, NUMBER_F);
        assert_eq!(flags(' ') & SPACE_F, SPACE_F);
        assert_eq!(flags('\u{3000}') & SPACE_F, SPACE_F);
        assert_eq!(flags('é') & LETTER_F, LETTER_F);
        assert_eq!(flags('日') & LETTER_F, LETTER_F);
        assert_eq!(flags('٣') & NUMBER_F, NUMBER_F);
        assert_eq!(flags('½') & NUMBER_F, NUMBER_F);
        // Combining marks (Mn) and vowel signs (Mc) are not letters, unlike char::is_alphabetic.
        assert_eq!(flags('\u{0301}') & (LETTER_F | NUMBER_F | SPACE_F), 0);
        assert_eq!(flags('\u{093E}') & LETTER_F, 0);
        assert_eq!(flags('🦙') & (LETTER_F | NUMBER_F | SPACE_F), 0);
        assert_eq!(flags('\u{10FFFF}'), ANY_F);
    }
}
