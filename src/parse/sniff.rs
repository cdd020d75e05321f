//! The dialect of a file, told from its first bytes: delimiter, line
//! ending, binary content.

use super::{LineEnding, SNIFF_BYTES};

/// The candidate delimiters, in order of preference on a tie.
const DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// End of the first line outside quotes (the index of its last terminator
/// byte) and how it ends. A `\r` as the buffer's last byte is not yet an
/// end: the next byte tells a lone `\r` from `\r\n`. As the CSV reader
/// has it, a quote opens a quoted field only at a field's start (the
/// line's, or after a candidate delimiter): the `"` of `Screen 15"` is text.
pub(super) fn first_line_end(buf: &[u8]) -> Option<(usize, LineEnding)> {
    let mut quoted = false;
    let mut at_start = true;
    let mut i = 0;
    while i < buf.len() {
        let b = buf[i];
        if quoted {
            if b == b'"' {
                // `""` inside quotes is a quote.
                if buf.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else {
            match b {
                b'"' if at_start => quoted = true,
                b'\n' => return Some((i, LineEnding::Lf)),
                b'\r' => {
                    return match buf.get(i + 1) {
                        Some(b'\n') => Some((i + 1, LineEnding::Lf)),
                        Some(_) => Some((i, LineEnding::Cr)),
                        None => None,
                    };
                }
                _ => {}
            }
        }
        at_start = !quoted && DELIMITERS.contains(&b);
        i += 1;
    }
    None
}

/// Line-break bytes in the delimiter's [`sample`] (the header and about a
/// dozen rows after it; a `\r\n` counts two).
const SAMPLE_BREAKS: usize = 24;

/// The part of `head` the delimiter is told from: up to its
/// [`SAMPLE_BREAKS`]th line-break byte, at most [`SNIFF_BYTES`]. Defined by
/// the file's content alone (never by how reads happened to cut it), so
/// every attempt of an import reads the file alike.
fn sample(head: &[u8]) -> &[u8] {
    let head = &head[..head.len().min(SNIFF_BYTES)];
    match head
        .iter()
        .enumerate()
        .filter(|(_, b)| matches!(b, b'\n' | b'\r'))
        .nth(SAMPLE_BREAKS - 1)
    {
        Some((i, _)) => &head[..=i],
        None => head,
    }
}

/// Whether `buf` holds a whole [`sample`] (or the file ends first).
pub(super) fn holds_sample(buf: &[u8]) -> bool {
    buf.len() >= SNIFF_BYTES
        || buf.iter().filter(|b| matches!(b, b'\n' | b'\r')).count() >= SAMPLE_BREAKS
}

/// How `buf` splits with `delimiter`: the field counts of its lines (line
/// ends `\n`, `\r\n`, and a lone `\r` if `lone_cr_ends`; a quote opens a
/// quoted field only at a field's start; a last line without its end
/// counts if it is the first, or if `whole`: `buf` is the rest of the
/// file, not cut by the sample's size), how often the delimiter stands
/// between two digits (`5,50`, a decimal comma rather than a separator),
/// and how many quotes stand inside an unquoted field (a quoted field
/// opening after some other delimiter: `"Doe, J";"Paris"` split at `,`).
fn field_counts(
    buf: &[u8],
    delimiter: u8,
    whole: bool,
    lone_cr_ends: bool,
) -> (Vec<usize>, usize, usize) {
    let mut counts = Vec::new();
    let (mut fields, mut quoted, mut at_start, mut empty) = (1, false, true, true);
    let (mut between_digits, mut stray_quotes) = (0, 0);
    let mut i = 0;
    while i < buf.len() {
        let b = buf[i];
        i += 1;
        empty = false;
        if quoted {
            if b == b'"' {
                if buf.get(i) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
            continue;
        }
        at_start = match b {
            b'"' if at_start => {
                quoted = true;
                false
            }
            b'"' => {
                stray_quotes += 1;
                false
            }
            b'\r' if !lone_cr_ends && buf.get(i) != Some(&b'\n') => false,
            b'\n' | b'\r' => {
                if b == b'\r' && buf.get(i) == Some(&b'\n') {
                    i += 1;
                }
                counts.push(fields);
                (fields, empty) = (1, true);
                true
            }
            _ if b == delimiter => {
                fields += 1;
                let digit = |k: usize| buf.get(k).is_some_and(u8::is_ascii_digit);
                if i >= 2 && digit(i - 2) && digit(i) {
                    between_digits += 1;
                }
                true
            }
            _ => false,
        };
    }
    if !empty && (whole || counts.is_empty()) {
        counts.push(fields);
    }
    (counts, between_digits, stray_quotes)
}

/// The delimiter among `,` `;` tab `|` of the header line (`,` when none
/// splits it), told from the file's `sample`: the one whose rows most
/// often have as many fields as the header, then the one splitting the
/// header most, then the one leaving fewer quotes inside unquoted fields,
/// then the one less often between two digits, then the earlier in that
/// list. So `Deal;Amount (EUR, net)` over `A;5` or `A;5,50` rows is
/// `;`-separated, so is `"Doe, J";"Paris, FR"`, and a stray quote inside a
/// field (`Size 5"`) hides nothing.
pub fn detect_delimiter(head: &[u8]) -> u8 {
    let sample = sample(head);
    DELIMITERS
        .iter()
        .enumerate()
        .filter_map(|(i, &d)| {
            // Shorter than its cap, the sample ends at a line break or at
            // the end of the file (see `skip_blank_lines`).
            let (counts, between_digits, stray_quotes) =
                field_counts(sample, d, sample.len() < SNIFF_BYTES, true);
            let header = *counts.first()?;
            let consistent = counts[1..].iter().filter(|&&n| n == header).count();
            // A delimiter absent from the header only serves a one-column
            // file (the one most rows agree with).
            let key = (
                header > 1,
                consistent,
                header,
                std::cmp::Reverse(stray_quotes),
                std::cmp::Reverse(between_digits),
                std::cmp::Reverse(i),
            );
            Some((key, d))
        })
        .max_by_key(|(key, _)| *key)
        .map_or(b',', |(_, d)| d)
}

/// How the file's lines end: as its header line ends (a lone `\r`: old
/// Mac exports), or, after a header ending in `\n` or `\r\n`, in a lone
/// `\r` when its rows end so: more rows of its `sample` have the header's
/// field count when lone `\r`s end lines than when they are text in a
/// cell (the latter, as in any `\n` file, wins a tie).
pub(super) fn detect_line_ending(head: &[u8], delimiter: u8) -> LineEnding {
    if let Some((_, LineEnding::Cr)) = first_line_end(head) {
        return LineEnding::Cr;
    }
    let sample = sample(head);
    let fitting = |lone_cr_ends| {
        let (counts, ..) =
            field_counts(sample, delimiter, sample.len() < SNIFF_BYTES, lone_cr_ends);
        counts.split_first().map_or(0, |(header, rows)| {
            rows.iter().filter(|&n| n == header).count()
        })
    };
    if fitting(true) > fitting(false) {
        LineEnding::Cr
    } else {
        LineEnding::Lf
    }
}

/// An Excel `sep=` line before the header (`sep=;`, or quoted `"sep=;"`,
/// `sep` in any case): the delimiter it names and the line's length with
/// its line end. Only a whole line counts (a header cell `sep=;x` is a
/// header), and only a delimiter that can be one (not a quote or a line
/// break).
pub(super) fn sep_line(head: &[u8]) -> Option<(u8, usize)> {
    let (quoted, rest) = match head.strip_prefix(b"\"") {
        Some(rest) => (true, rest),
        None => (false, head),
    };
    let (prefix, rest) = rest.split_at_checked(4)?;
    if !prefix.eq_ignore_ascii_case(b"sep=") {
        return None;
    }
    let (&delimiter, rest) = rest.split_first()?;
    if matches!(delimiter, b'"' | b'\r' | b'\n') || !delimiter.is_ascii() {
        return None;
    }
    let rest = if quoted {
        rest.strip_prefix(b"\"")?
    } else {
        rest
    };
    let end = match rest {
        [b'\r', b'\n', ..] => 2,
        [b'\n' | b'\r', ..] => 1,
        [] => 0,
        _ => return None,
    };
    Some((delimiter, head.len() - rest.len() + end))
}

/// Bytes [`looks_binary`] inspects.
pub(super) const BINARY_PROBE_BYTES: usize = 8192;

/// NUL bytes or a known binary signature in the first
/// [`BINARY_PROBE_BYTES`].
pub(super) fn looks_binary(head: &[u8]) -> bool {
    const SIGNATURES: [&[u8]; 5] = [
        b"PK\x03\x04",                       // zip, xlsx, ods
        b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1", // xls (OLE2)
        b"%PDF",
        b"\x89PNG",
        b"\x1F\x8B", // gzip
    ];
    SIGNATURES.iter().any(|s| head.starts_with(s))
        || head.iter().take(BINARY_PROBE_BYTES).any(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_excel_sep_line_names_the_delimiter() {
        assert_eq!(sep_line(b"sep=;\nName;Value\n"), Some((b';', 6)));
        assert_eq!(sep_line(b"SEP=|\r\nName|Value"), Some((b'|', 7)));
        assert_eq!(sep_line(b"\"sep=\t\"\rName"), Some((b'\t', 8)));
        assert_eq!(sep_line(b"sep=,"), Some((b',', 5)));
        // A header, not a sep line.
        assert_eq!(sep_line(b"sep=;x,y\n"), None);
        assert_eq!(sep_line(b"sep=\n"), None);
        assert_eq!(sep_line(b"sep=\"\n"), None);
        assert_eq!(sep_line(b"\"sep=;\n"), None);
        assert_eq!(sep_line(b"separator,x\n"), None);
        assert_eq!(sep_line(b"se"), None);
    }

    #[test]
    fn line_ending_is_told_from_the_first_line() {
        assert_eq!(first_line_end(b"a,b\n"), Some((3, LineEnding::Lf)));
        assert_eq!(first_line_end(b"a,b\r\nc"), Some((4, LineEnding::Lf)));
        assert_eq!(first_line_end(b"a,b\rc"), Some((3, LineEnding::Cr)));
        assert_eq!(first_line_end(b"\"a\rb\",c\nd"), Some((7, LineEnding::Lf)));
        assert_eq!(first_line_end(b"a,b\r"), None);
        assert_eq!(detect_delimiter(b"a;b;c\rd,e,f,g,h"), b';');
    }

    #[test]
    fn delimiter_ignores_quoted_text() {
        assert_eq!(detect_delimiter(b"\"a,b,c\";d;e\n"), b';');
        assert_eq!(detect_delimiter(b"a|b|c\n1,2"), b'|');
        assert_eq!(detect_delimiter(b"single\n"), b',');
        assert_eq!(detect_delimiter(b"a\tb\n"), b'\t');
    }

    #[test]
    fn quoted_cells_with_one_comma_each_do_not_make_a_semicolon_file_comma_separated() {
        // Either delimiter splits every line in two; only `;` leaves no
        // quote inside an unquoted field.
        let csv = b"\"Last, First\";\"City, Country\"\n\"Doe, John\";\"Paris, France\"\n";
        assert_eq!(detect_delimiter(csv), b';');
        // A stray inch mark counts the same under every delimiter.
        assert_eq!(detect_delimiter(b"Item,Size\nBolt,5\"\nNut,3\"\n"), b',');
    }

    #[test]
    fn the_delimiter_does_not_depend_on_where_reads_cut_the_file() {
        let mut csv = b"Deal;Amount (EUR, net);Stage\n".to_vec();
        for i in 0..40 {
            csv.extend_from_slice(format!("Deal {i};{i},5;Won\n").as_bytes());
        }
        let cut = sample(&csv).len();
        assert!(cut < csv.len());
        for end in cut..=csv.len() {
            assert_eq!(detect_delimiter(&csv[..end]), b';', "cut at {end}");
        }
        assert!(holds_sample(&csv[..cut]) && !holds_sample(&csv[..cut - 1]));
    }
}
