//! Text rules shared by parse and map (SPEC.md, "Normalisation rules").
//! Pure functions; each is idempotent: `f(f(x)) == f(x)`.

use std::borrow::Cow;

/// A cell's text: UTF-8 when valid, else Windows-1252 (Excel's "CSV" on
/// Windows), which maps every byte to a character, so no cell is ever lost.
pub fn decode_cell(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => {
            encoding_rs::WINDOWS_1252
                .decode_without_bom_handling(bytes)
                .0
        }
    }
}

/// Trims and collapses every run of whitespace to one space.
pub fn collapse_whitespace(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Header matching key: BOM stripped, whitespace collapsed, lower-case.
pub fn header_key(s: &str) -> String {
    collapse_whitespace(s.trim_start_matches('\u{feff}')).to_lowercase()
}

/// Key of a record name for duplicate matching: like [`stage_key`].
pub fn name_key(s: &str) -> String {
    stage_key(s)
}

/// Stage name key (SPEC.md): trimmed, inner whitespace collapsed, lower-case.
/// "Qualified", " qualified " and "QUALIFIED" share one key.
pub fn stage_key(s: &str) -> String {
    collapse_whitespace(s).to_lowercase()
}

/// Status and contract type (SPEC.md): trimmed, lower-case, every run of
/// spaces, dashes and underscores becomes one `_`, none at the ends.
/// "Closed - Won", "closed-won" and "CLOSED_WON" all give `closed_won`.
pub fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_sep = false;
    for c in s.chars() {
        if c.is_whitespace() || c == '-' || c == '_' {
            pending_sep = !out.is_empty();
        } else {
            if pending_sep {
                out.push('_');
                pending_sep = false;
            }
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// `s` safe to print on one terminal line: tabs and line breaks become
/// spaces, other control characters (escape sequences) their `\u{..}`
/// escape; everything else, accents and emoji included, as is.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_keeps_one_line_and_no_escape_sequence() {
        assert_eq!(printable("Café 😀"), "Café 😀");
        assert_eq!(
            printable("a\nstatus: completed\r\tb"),
            "a status: completed  b"
        );
        assert_eq!(printable("\x1b]0;x\x07\u{9b}"), "\\u{1b}]0;x\\u{7}\\u{9b}");
    }
    use proptest::prelude::*;

    #[test]
    fn status_tokens() {
        for s in [
            "Closed - Won",
            "closed-won",
            "CLOSED_WON",
            "  closed   won ",
            "closed__-won",
        ] {
            assert_eq!(token(s), "closed_won", "{s:?}");
        }
        assert_eq!(token("Open"), "open");
        assert_eq!(token(" - "), "");
    }

    #[test]
    fn stage_keys() {
        for s in ["Qualified", " qualified ", "QUALIFIED", "qualified\t"] {
            assert_eq!(stage_key(s), "qualified");
        }
        assert_eq!(stage_key("  Proposal   Sent "), "proposal sent");
    }

    #[test]
    fn headers_match_without_bom_case_or_spacing() {
        assert_eq!(header_key("\u{feff}Deal  Name "), "deal name");
    }

    proptest! {
        #[test]
        fn normalisers_are_idempotent(s in "\\PC{0,40}") {
            prop_assert_eq!(token(&token(&s)), token(&s));
            prop_assert_eq!(stage_key(&stage_key(&s)), stage_key(&s));
            prop_assert_eq!(header_key(&header_key(&s)), header_key(&s));
        }

        #[test]
        fn tokens_have_no_separator_runs(s in "[ a-zA-Z_-]{0,40}") {
            let t = token(&s);
            prop_assert!(!t.starts_with('_') && !t.ends_with('_'));
            prop_assert!(!t.contains("__") && !t.contains(' ') && !t.contains('-'));
        }

        #[test]
        fn any_bytes_decode(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = decode_cell(&bytes);
            if let Ok(u) = std::str::from_utf8(&bytes) { prop_assert_eq!(s.as_ref(), u); }
        }
    }
}
