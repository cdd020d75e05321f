//! Physical line numbers: a scan of the bytes the parser reads, ahead of
//! it, that knows where each record starts (quoted line breaks, skipped
//! empty lines, lone `\r`s) and caps a record's fields while it is read.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::domain::LineNo;

use super::{BoxRead, MAX_FIELDS, MAX_RECORD_BYTES, RecordTooLong, RecordTooWide};

/// Pass-through reader remembering how many bytes went by and following the
/// records ahead of the parser ([`Width`]), so the parser can tell whether
/// the file's last record ends with its `\n`; enforces
/// [`MAX_RECORD_BYTES`] and [`MAX_FIELDS`] before the parser buffers a
/// record past them.
pub(super) struct Tail {
    inner: BoxRead,
    pub(super) total: u64,
    pub(super) eof: bool,
    /// Stream offset where the record being parsed starts.
    pub(super) record_start: u64,
    /// Fields of the record at the read frontier.
    pub(super) width: Width,
}

impl Tail {
    /// Reads `inner`, from a record's start, following records with `width`.
    pub(super) fn new(inner: BoxRead, width: Width) -> Self {
        Self {
            inner,
            total: 0,
            eof: false,
            record_start: 0,
            width,
        }
    }
}

/// Where [`Width`] is in the CSV grammar (csv-core's, with `"` quotes,
/// doubled `""` escapes and `\n` as the only terminator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scan {
    /// Before a record; a `\n` here is an empty line the parser skips.
    RecordStart,
    /// Before a field; a `"` here opens a quoted field.
    FieldStart,
    /// In a field that is not quoted (a `"` in it is text).
    Unquoted,
    /// In a quoted field.
    Quoted,
    /// A `"` in a quoted field: closing, or the first of a `""`.
    QuoteInQuoted,
}

/// Follows the stream ahead of the parser, as the parser will split it,
/// and counts the fields of the record being read and the physical lines,
/// so a record over [`MAX_FIELDS`] is refused before the parser holds it,
/// with the line where it starts (which may be past records the parser has
/// not returned yet). Quoted delimiters are not counted.
#[derive(Clone, Debug)]
pub(super) struct Width {
    delimiter: u8,
    /// [`MAX_FIELDS`] (smaller in tests).
    pub(super) max_fields: usize,
    pub(super) state: Scan,
    /// Fields of the record being scanned.
    fields: usize,
    /// Physical line of the next byte.
    line: LineNo,
    /// Physical line where the record being scanned starts.
    record_line: LineNo,
    /// The last byte was a `\r`: a line break unless a `\n` follows.
    after_cr: bool,
    /// Stream offset of the next byte.
    offset: u64,
    /// Lone `\r`s (an editor shows each as a line break, the parser does
    /// not count them) of the record being scanned.
    lone_crs: u64,
    /// Per record scanned ahead of the parser that holds lone `\r`s: the
    /// stream offset just past its `\n` terminator, and how many. One entry
    /// per record, only for the records in the parser's buffer.
    lone_by_record: std::collections::VecDeque<(u64, u64)>,
}

impl Width {
    pub(super) fn new(delimiter: u8, line: LineNo) -> Self {
        Self {
            delimiter,
            max_fields: MAX_FIELDS,
            state: Scan::RecordStart,
            fields: 0,
            line,
            record_line: line,
            after_cr: false,
            offset: 0,
            lone_crs: 0,
            lone_by_record: std::collections::VecDeque::new(),
        }
    }

    /// Counts (and forgets) the lone `\r`s of the records that end at or
    /// before stream offset `end`, and, `at_end` of the stream, those of an
    /// unterminated last record.
    pub(super) fn lone_crs_before(&mut self, end: u64, at_end: bool) -> u64 {
        let mut n = 0;
        while let Some(&(past, count)) = self.lone_by_record.front()
            && past <= end
        {
            n += count;
            self.lone_by_record.pop_front();
        }
        if at_end {
            n += std::mem::take(&mut self.lone_crs);
        }
        n
    }

    fn scan(&mut self, bytes: &[u8]) -> Result<(), RecordTooWide> {
        for &b in bytes {
            self.offset += 1;
            if self.after_cr && b != b'\n' {
                self.line += 1;
                self.lone_crs += 1;
            }
            self.after_cr = b == b'\r';
            let before = self.state;
            self.state = match (self.state, b) {
                (Scan::RecordStart, b'\n') => Scan::RecordStart,
                (Scan::Quoted, b'"') => Scan::QuoteInQuoted,
                (Scan::Quoted, _) => Scan::Quoted,
                (Scan::RecordStart | Scan::FieldStart, b'"') | (Scan::QuoteInQuoted, b'"') => {
                    self.start_record();
                    Scan::Quoted
                }
                (_, b'\n') => Scan::RecordStart,
                (_, d) if d == self.delimiter => {
                    self.start_record();
                    self.fields += 1;
                    if self.fields > self.max_fields {
                        return Err(RecordTooWide {
                            line: self.record_line,
                            max: self.max_fields,
                        });
                    }
                    Scan::FieldStart
                }
                _ => {
                    self.start_record();
                    Scan::Unquoted
                }
            };
            if b == b'\n' {
                self.line += 1;
                // A record's terminator (not a blank line, not a line break
                // inside quotes).
                if before != Scan::RecordStart
                    && self.state == Scan::RecordStart
                    && self.lone_crs > 0
                {
                    let count = std::mem::take(&mut self.lone_crs);
                    self.lone_by_record.push_back((self.offset, count));
                }
            }
        }
        Ok(())
    }

    /// At a record's first byte: the record starts on this line, with one
    /// field so far.
    fn start_record(&mut self) {
        if self.state == Scan::RecordStart {
            self.record_line = self.line;
            self.fields = 1;
        }
    }
}

impl AsyncRead for Tail {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = this.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let filled = &buf.filled()[before..];
            if filled.is_empty() {
                this.eof = true;
            }
            this.total += filled.len() as u64;
            if this.total.saturating_sub(this.record_start) > MAX_RECORD_BYTES {
                return Poll::Ready(Err(std::io::Error::other(RecordTooLong)));
            }
            if let Err(e) = this.width.scan(filled) {
                return Poll::Ready(Err(std::io::Error::other(e)));
            }
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_follows_the_parser_grammar() {
        let count = |text: &[u8]| {
            let mut w = Width::new(b';', 1);
            w.scan(text).unwrap();
            (w.record_line, w.fields, w.line)
        };
        // Quoted delimiters and line breaks, doubled quotes, text after a
        // closing quote, a quote inside an unquoted field.
        assert_eq!(count(b"a;\"x;\ny\";\"\"\"\";b\"c;d"), (1, 5, 2));
        assert_eq!(count(b"a;b\n\n\nc"), (4, 1, 4));
        assert_eq!(count(b"a;b\r\nc;d;e"), (2, 3, 2));
        assert_eq!(count(b"\"x\ry\";z"), (1, 2, 2));
        assert_eq!(count(b"\"a\"b;c"), (1, 2, 1));
    }

    /// Lone `\r`s are kept as one count per record, however many a record
    /// holds (memory does not grow with a record of them).
    #[test]
    fn lone_crs_are_counted_per_record() {
        let mut w = Width::new(b',', 1);
        let mut text = b"a,\"".to_vec();
        text.extend(std::iter::repeat_n(b'\r', 50_000));
        for _ in 0..25_000 {
            text.extend(b"\r\r\n");
        }
        text.extend(b"\"\r\nb,\rc\nd,1");
        w.scan(&text).unwrap();
        assert_eq!(w.lone_by_record.len(), 2);
        let first_end = text.windows(3).position(|w| w == b"\"\r\n").unwrap() as u64 + 3;
        assert_eq!(w.lone_crs_before(first_end, false), 75_000);
        assert_eq!(w.lone_crs_before(text.len() as u64, false), 1);
        assert!(w.lone_by_record.is_empty());
        w.scan(b"\re").unwrap();
        assert_eq!(w.lone_crs_before(text.len() as u64 + 2, true), 1);
    }
}
