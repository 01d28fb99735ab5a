//! Making untrusted text safe to show: in error messages, logs and the CLI's
//! table.
//!
//! A manifest (and anything quoted from it, including serde's own messages)
//! may hold ANSI escapes that rewrite a terminal, bidirectional overrides that
//! reorder what a reader sees, or megabytes of text: `dynplug list` panicked
//! on an error longer than 65,535 characters (a `format!` width that large
//! panics). Public (hidden) only so that the `dynplug` binary uses the same
//! rule; not part of the API.

use std::borrow::Cow;

/// `text` with every character a terminal would act on escaped as `\u{…}`,
/// cut to at most `max` characters (the escapes count, and a cut text ends
/// with `…` within the `max`).
///
/// Escaped: control characters (C0, DEL, C1, which holds the 8-bit CSI) and
/// the invisible formatting characters that reorder or hide text (bidi
/// embeddings, overrides and isolates, zero-width characters, the BOM).
/// Returns the text itself, without copying, when there is nothing to do.
///
/// ```
/// # use dynplug::text::printable;
/// assert_eq!(printable("\u{1b}[31mred", 80), "\\u{1b}[31mred");
/// assert_eq!(printable("abcdef", 4), "abc…");
/// ```
#[must_use]
pub fn printable(text: &str, max: usize) -> Cow<'_, str> {
    let fits = |chars: usize| chars <= max;
    // Fast path: nothing to escape and short enough; stops reading after `max`.
    let mut chars = 0;
    let mut clean = true;
    for c in text.chars() {
        chars += 1;
        if !fits(chars) || is_unprintable(c) {
            clean = false;
            break;
        }
    }
    if clean {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max.saturating_mul(4)));
    // Characters in `out`, and the byte length of `out` when it last held at
    // most `max - 1` characters: where to cut to leave room for the `…`.
    let (mut used, mut cut_at) = (0usize, 0usize);
    for c in text.chars() {
        let before = out.len();
        if is_unprintable(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
        used += out[before..].chars().count();
        if used < max {
            cut_at = out.len();
        } else if used > max {
            out.truncate(cut_at);
            if max > 0 {
                out.push('…');
            }
            return Cow::Owned(out);
        }
    }
    Cow::Owned(out)
}

/// Whether a terminal would act on `c` rather than show it.
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width space/joiners, LRM, RLM
            | '\u{202a}'..='\u{202e}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}' // bidi isolates
            | '\u{feff}' // BOM, zero-width no-break space
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_short_text_is_borrowed() {
        assert!(matches!(printable("hello, wörld", 12), Cow::Borrowed(_)));
        assert!(matches!(printable("", 0), Cow::Borrowed(_)));
    }

    #[test]
    fn controls_and_ansi_escapes_are_escaped() {
        assert_eq!(
            printable("a\u{1b}[2Jb\nc\td\u{7f}\u{9b}e", 100),
            "a\\u{1b}[2Jb\\u{a}c\\u{9}d\\u{7f}\\u{9b}e"
        );
        assert_eq!(printable("x\u{202e}y\u{feff}", 100), "x\\u{202e}y\\u{feff}");
    }

    #[test]
    fn long_text_is_cut_to_max_characters_with_an_ellipsis() {
        let long = "é".repeat(70_000);
        let cut = printable(&long, 120);
        assert_eq!(cut.chars().count(), 120);
        assert!(cut.ends_with("é…"), "{cut}");
        // Exactly `max` characters fit without a cut.
        assert_eq!(printable("abcd", 4), "abcd");
        assert_eq!(printable("abcde", 4), "abc…");
        assert_eq!(printable("abcde", 1), "…");
        assert_eq!(printable("abcde", 0), "");
    }

    #[test]
    fn an_escape_is_never_split_by_the_cut() {
        // `\u{1b}` is 6 characters: with 5 of room it is left out whole.
        assert_eq!(printable("ab\u{1b}cd", 8), "ab…");
        assert_eq!(printable("ab\u{1b}", 8), "ab\\u{1b}");
        let escapes = "\u{1b}".repeat(10_000);
        let escaped = printable(&escapes, 1024);
        assert!(escaped.chars().count() <= 1024);
        assert!(escaped.ends_with("\\u{1b}…"), "{escaped}");
    }
}
