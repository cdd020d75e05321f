//! Bytes → CSV records, via csv-async. Knows dialects, encodings and
//! headers, not CRM fields.
//!
//! Guarantees:
//! - Streaming: one reused `ByteRecord` (replaced after an unusually big
//!   record, so its memory is given back); memory does not grow with the
//!   file. A record is capped at [`MAX_RECORD_BYTES`] and [`MAX_FIELDS`],
//!   enforced while it is read; past either the file is `malformed_csv`.
//! - Every record carries the physical line where it starts (header = line
//!   1, or the first line that is not blank: blank lines before the header
//!   are skipped), counting the extra lines of quoted fields that span
//!   several lines, the empty lines the parser skips and lone `\r`s inside
//!   `\n` files, so it matches what an editor shows.
//! - Every record carries the object byte offset just past it, so a resumed
//!   run can start a ranged GET at a record boundary.
//! - The reader is `flexible`: a ragged row is returned as is and `map`
//!   turns it into a row error we own; only a broken stream is an `Err`.
//! - Line endings: `\n`, `\r\n`, or a lone `\r` (old Mac exports), told
//!   from the header line and the first rows (`detect_line_ending`). In a
//!   lone-`\r` file every lone `\r` is read as `\n` (byte for byte, so
//!   offsets stay exact) and `\r\n` and `\n` end lines too, so a file that
//!   mixes them is read right.
//! - Encodings: UTF-8 with or without BOM (cells that are not valid UTF-8
//!   are read as Windows-1252, see `domain::text`), UTF-16 LE/BE with BOM
//!   (transcoded to UTF-8 on the fly). Delimiter `,` `;` tab or `|`, detected
//!   from the header line outside quotes, or named by an Excel `sep=` line
//!   above the header.
//! - Binary content (NUL bytes, zip/xlsx, xls, pdf signatures) is refused
//!   before any record is read.
//!
//! Here: opening a file (BOM, blank lines, header) and reading records.
//! `sniff` tells the dialect, `decode` adapts the stream (UTF-16, lone
//! `\r`), `lines` follows the bytes ahead of the parser for line numbers
//! and record caps.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use csv_async::{AsyncReader, AsyncReaderBuilder, ByteRecord};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::domain::text::decode_cell;
use crate::domain::{FileError, LineNo};

mod decode;
mod lines;
mod sniff;

use decode::{LoneCr, Transcode};
use lines::{Scan, Tail, Width};
pub use sniff::detect_delimiter;
use sniff::{
    BINARY_PROBE_BYTES, detect_line_ending, first_line_end, holds_sample, looks_binary, sep_line,
};

/// Errors of the parse layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file itself is unusable (empty, binary, no header).
    #[error(transparent)]
    File(#[from] FileError),
    /// Reading the underlying stream failed (usually storage trouble).
    #[error("reading the file near line {line}: {source}")]
    Io {
        /// Physical line reached.
        line: LineNo,
        /// Cause.
        source: std::io::Error,
    },
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Text encoding of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// UTF-8 (cells that are not valid UTF-8 are read as Windows-1252).
    Utf8,
    /// UTF-16 little-endian, with BOM.
    Utf16Le,
    /// UTF-16 big-endian, with BOM.
    Utf16Be,
}

impl Encoding {
    /// Whether parser byte offsets are object byte offsets (no transcoding).
    pub fn offsets_are_exact(self) -> bool {
        self == Self::Utf8
    }
}

/// How the file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dialect {
    /// Field delimiter.
    pub delimiter: u8,
    /// Text encoding.
    pub encoding: Encoding,
    /// How lines end.
    pub line_ending: LineEnding,
}

/// How the file's lines end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LineEnding {
    /// `\n` or `\r\n`.
    #[default]
    Lf,
    /// A lone `\r`.
    Cr,
}

/// Where reading starts: the file start, or a checkpoint's record boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Start {
    /// Physical line at which the next record starts (1 = file start).
    pub line: LineNo,
    /// Object byte offset of that line.
    pub byte: u64,
}

type BoxRead = Pin<Box<dyn AsyncRead + Send>>;

/// A stream of records.
pub struct Records {
    rdr: AsyncReader<Tail>,
    record: ByteRecord,
    /// The last record made `record` big: replace it before the next read.
    oversized: bool,
    /// Lone `\r`s (line breaks the parser does not count) read so far.
    lone_crs: u64,
    /// Line after the last record read.
    next_line: LineNo,
    line_base: u64,
    byte_base: u64,
    /// Dialect in use.
    pub dialect: Dialect,
    /// Bytes of the file read so far, when record offsets are not the
    /// file's (a transcoded file): progress is told from it.
    file_bytes_read: Option<Arc<AtomicU64>>,
}

/// One record, borrowed from the reader until the next call.
pub struct Record<'a> {
    /// Physical line where the record starts.
    pub line: LineNo,
    /// Object byte offset just past the record (exact for UTF-8 only).
    pub end_byte: u64,
    /// Physical line where the next record may start.
    pub next_line: LineNo,
    /// The raw fields.
    pub fields: &'a ByteRecord,
}

/// Longest record accepted, in bytes. The parser holds a whole record in
/// memory, so an unclosed quote (or a file without line ends) must not make
/// the rest of the file one record: past this it is a `malformed_csv`
/// file. Far above any real record (`import.max_field_chars` of 10,000
/// characters in each of 400 columns is ~16 MB of the widest UTF-8).
pub const MAX_RECORD_BYTES: u64 = 32 * 1024 * 1024;

/// The stream ran past [`MAX_RECORD_BYTES`] inside one record.
#[derive(Debug, thiserror::Error)]
#[error("a record is longer than {MAX_RECORD_BYTES} bytes")]
struct RecordTooLong;

/// Most fields accepted in one record. The parser keeps a position per
/// field and `map` a string per cell, so a line of 30 million commas (well
/// under [`MAX_RECORD_BYTES`]) would take about a gigabyte: past this it is a
/// `malformed_csv` file. Far above any real file (`import` mappings name a
/// few hundred columns).
pub const MAX_FIELDS: usize = 100_000;

/// A record has more than [`MAX_FIELDS`] fields.
#[derive(Debug, thiserror::Error)]
#[error("the record starting on line {line} has more than {max} fields")]
struct RecordTooWide {
    /// Physical line where that record starts.
    line: LineNo,
    /// The limit ([`MAX_FIELDS`]).
    max: usize,
}

/// The text of a field, without the `\r` of a CRLF line end.
pub fn field_text(fields: &ByteRecord, i: usize) -> Option<&[u8]> {
    let f = fields.get(i)?;
    Some(if i + 1 == fields.len() {
        f.strip_suffix(b"\r").unwrap_or(f)
    } else {
        f
    })
}

impl crate::map::Fields for ByteRecord {
    fn count(&self) -> usize {
        self.len()
    }
    fn field(&self, i: usize) -> Option<&[u8]> {
        field_text(self, i)
    }
}

/// Bytes peeked from the start of the stream before parsing.
const SNIFF_BYTES: usize = 64 * 1024;

/// Opens a file from its start: sniffs encoding and dialect, reads the
/// header row. Returns the header names (BOM stripped, decoded) and the
/// records after it.
pub async fn open<R>(reader: R) -> Result<(Vec<String>, Records)>
where
    R: AsyncRead + Send + 'static,
{
    let reader: BoxRead = Box::pin(reader);
    let (head, reader) = peek(reader, SNIFF_BYTES).await?;
    if head.is_empty() {
        return Err(FileError::EmptyFile.into());
    }
    let (encoding, bom) = if head.starts_with(&[0xEF, 0xBB, 0xBF]) {
        (Encoding::Utf8, 3)
    } else if head.starts_with(&[0xFF, 0xFE]) {
        (Encoding::Utf16Le, 2)
    } else if head.starts_with(&[0xFE, 0xFF]) {
        (Encoding::Utf16Be, 2)
    } else {
        (Encoding::Utf8, 0)
    };
    // UTF-16 text has NUL bytes: it is checked once decoded, below.
    if encoding == Encoding::Utf8 && looks_binary(&head[bom..]) {
        return Err(FileError::NotCsv.into());
    }
    let mut reader: BoxRead = Box::pin(std::io::Cursor::new(head).chain(reader));
    if bom > 0 {
        let mut skip = [0u8; 3];
        reader
            .read_exact(&mut skip[..bom])
            .await
            .map_err(|source| Error::Io { line: 1, source })?;
    }
    let mut read = None;
    if encoding != Encoding::Utf8 {
        let enc = if encoding == Encoding::Utf16Le {
            encoding_rs::UTF_16LE
        } else {
            encoding_rs::UTF_16BE
        };
        read = Some(Arc::new(AtomicU64::new(bom as u64)));
        reader = Box::pin(Transcode::new(
            reader,
            enc,
            read.clone().unwrap_or_default(),
        ));
    }
    // Peek again after transcoding: the delimiter is found in text, in the
    // header line, after any blank lines.
    let (blank, mut head, reader) = skip_blank_lines(reader).await?;
    if encoding != Encoding::Utf8 && looks_binary(&head) {
        return Err(FileError::NotCsv.into());
    }
    // An Excel `sep=` line names the delimiter; the header follows it.
    let sep = sep_line(&head);
    if let Some((_, len)) = sep {
        head.drain(..len);
    }
    if head.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(if head.is_empty() && blank.bytes == 0 && sep.is_none() {
            FileError::EmptyFile
        } else {
            FileError::NoHeader
        }
        .into());
    }
    let delimiter = sep.map_or_else(|| detect_delimiter(&head), |(d, _)| d);
    let sep_bytes = sep.map_or(0, |(_, len)| len as u64);
    let dialect = Dialect {
        delimiter,
        encoding,
        line_ending: detect_line_ending(&head, delimiter),
    };
    let reader: BoxRead = Box::pin(std::io::Cursor::new(head).chain(reader));
    let mut records = Records::new(
        reader,
        dialect,
        Start {
            line: 1 + blank.lines + u64::from(sep.is_some()),
            byte: bom as u64 + blank.bytes + sep_bytes,
        },
    );
    let headers = match records.next().await? {
        // The header row is kept (the queue document lists the columns, the
        // error report repeats them): one far beyond any real one is no
        // header.
        Some(r) if r.fields.as_slice().len() > MAX_HEADER_BYTES => {
            return Err(FileError::Malformed {
                line: r.line,
                detail: format!(
                    "its first line, taken for the header row, is over {} KiB",
                    MAX_HEADER_BYTES / 1024
                ),
            }
            .into());
        }
        Some(r) => (0..r.fields.len())
            .map(|i| decode_cell(field_text(r.fields, i).unwrap_or_default()).into_owned())
            .collect::<Vec<_>>(),
        None => return Err(FileError::NoHeader.into()),
    };
    if headers.iter().all(|h| h.trim().is_empty()) {
        return Err(FileError::NoHeader.into());
    }
    records.file_bytes_read = read;
    Ok((headers, records))
}

/// Opens the rest of a file at a record boundary found earlier (`start`),
/// for a UTF-8 file whose dialect is known.
pub fn resume<R>(reader: R, dialect: Dialect, start: Start) -> Records
where
    R: AsyncRead + Send + 'static,
{
    Records::new(Box::pin(reader), dialect, start)
}

impl Records {
    /// How many bytes of the file have been read, for a transcoded file
    /// (whose record offsets count decoded bytes); `None` when record
    /// offsets are the file's own. Runs ahead of the records by what is
    /// buffered.
    pub fn file_bytes_read(&self) -> Option<Arc<AtomicU64>> {
        self.file_bytes_read.clone()
    }

    fn new(reader: BoxRead, dialect: Dialect, start: Start) -> Self {
        // `\n` is the only terminator: a `\r` before it stays in the last
        // field (readers strip it, see `map::Fields`). With csv's default
        // CRLF handling the `\n` of a `\r\n` is consumed lazily by the next
        // read, which makes record positions inconsistent.
        let rdr = AsyncReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(dialect.delimiter)
            .terminator(csv_async::Terminator::Any(b'\n'))
            .buffer_capacity(256 * 1024)
            .create_reader(Tail::new(
                match dialect.line_ending {
                    LineEnding::Cr => Box::pin(LoneCr::new(reader)),
                    LineEnding::Lf => reader,
                },
                Width::new(dialect.delimiter, start.line.max(1)),
            ));
        Self {
            rdr,
            record: ByteRecord::new(),
            oversized: false,
            lone_crs: 0,
            file_bytes_read: None,
            next_line: start.line.max(1),
            line_base: start.line.saturating_sub(1),
            byte_base: start.byte,
            dialect,
        }
    }

    /// The next record, or `None` at the end of the file.
    pub async fn next(&mut self) -> Result<Option<Record<'_>>> {
        if std::mem::take(&mut self.oversized) {
            self.record = ByteRecord::new();
        }
        let more = self
            .rdr
            .read_byte_record(&mut self.record)
            .await
            .map_err(|e| {
                let line = self.line_base + self.rdr.position().line();
                let source = match e.into_kind() {
                    csv_async::ErrorKind::Io(io) => io,
                    other => std::io::Error::other(format!("{other:?}")),
                };
                if let Some(wide) = source
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<RecordTooWide>())
                {
                    return Error::File(FileError::Malformed {
                        line: wide.line,
                        detail: format!(
                            "the row starting here has more than {} columns \
                             (is it a damaged file, or one very long line?)",
                            wide.max
                        ),
                    });
                }
                if source
                    .get_ref()
                    .is_some_and(|inner| inner.is::<RecordTooLong>())
                {
                    return Error::File(FileError::Malformed {
                        line: self.next_line,
                        detail: format!(
                            "the record starting here runs over {} MB (is a quote left open?)",
                            MAX_RECORD_BYTES / (1024 * 1024)
                        ),
                    });
                }
                Error::Io { line, source }
            })?;
        if !more {
            return Ok(None);
        }
        self.oversized = self.record.len() > BIG_RECORD_FIELDS
            || self.record.as_slice().len() > BIG_RECORD_BYTES;
        // The record's own position is taken before the parser skips empty
        // lines, so it is wrong after a blank line. Count back from the end
        // instead: the record spans the line breaks inside its (quoted)
        // fields plus its `\n` terminator, which only a last record running
        // to the end of the stream lacks. The parser counts `\n`s only; the
        // lone `\r`s among its bytes (found by `width`, which sees a quoted
        // field's last `\r` from the `\r` of a `\r\n` terminator) are added.
        let end = self.rdr.position().clone();
        let newlines = self
            .record
            .as_slice()
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        let tail = self.rdr.get_mut();
        // At the end of the stream `width` has scanned every byte: it is
        // back before a record only if the last one ended with its `\n`
        // (not with a `\n` inside a quote left open).
        let at_end = tail.eof && end.byte() == tail.total;
        let unterminated = at_end && tail.width.state != Scan::RecordStart;
        let lone_crs = tail.width.lone_crs_before(end.byte(), at_end);
        self.lone_crs += lone_crs;
        let end_line = end.line() + self.lone_crs;
        let start_line = end_line
            .saturating_sub(newlines + lone_crs + u64::from(!unterminated))
            .max(1);
        self.next_line = self.line_base + end_line;
        self.rdr.get_mut().record_start = end.byte();
        Ok(Some(Record {
            line: self.line_base + start_line,
            end_byte: self.byte_base + end.byte(),
            next_line: self.next_line,
            fields: &self.record,
        }))
    }
}

/// A record with more fields than this made the reused `ByteRecord` big.
const BIG_RECORD_FIELDS: usize = 4096;
/// A record with more bytes than this made the reused `ByteRecord` big.
const BIG_RECORD_BYTES: usize = 1024 * 1024;

/// Whitespace-only lines skipped before the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Blank {
    /// How many.
    lines: u64,
    /// Their bytes (object bytes for UTF-8).
    bytes: u64,
}

/// Reads past the whitespace-only lines at the start of the text (each
/// ended by `\n`, `\r\n` or a lone `\r`), then up to [`SNIFF_BYTES`],
/// stopping once the first line that is not blank and the delimiter's
/// [`sample`] are in the buffer (or the file ends). Returns what was skipped, the bytes read after it, and the
/// reader of the rest.
async fn skip_blank_lines(mut reader: BoxRead) -> Result<(Blank, Vec<u8>, BoxRead)> {
    let mut blank = Blank::default();
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    loop {
        let mut cut = 0;
        while let Some((end, _)) = first_line_end(&buf[cut..]) {
            if !buf[cut..=cut + end].iter().all(u8::is_ascii_whitespace) {
                break;
            }
            cut += end + 1;
            blank.lines += 1;
        }
        if cut > 0 {
            buf.drain(..cut);
            blank.bytes += cut as u64;
        }
        // The whole sample the delimiter is told from, whatever the reads.
        if first_line_end(&buf).is_some() && holds_sample(&buf) {
            break;
        }
        if buf.len() >= SNIFF_BYTES {
            break;
        }
        let n = reader.read(&mut chunk).await.map_err(|source| Error::Io {
            line: 1 + blank.lines,
            source,
        })?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((blank, buf, reader))
}

/// Reads up to `limit` bytes, stopping early once a full line (outside
/// quotes) and [`BINARY_PROBE_BYTES`] are in the buffer (so the binary
/// check sees the same bytes however the storage cuts its reads); returns
/// them and a reader that yields them again followed by the rest.
async fn peek(mut reader: BoxRead, limit: usize) -> Result<(Vec<u8>, BoxRead)> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 8192];
    while buf.len() < limit {
        let n = reader
            .read(&mut chunk)
            .await
            .map_err(|source| Error::Io { line: 1, source })?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= BINARY_PROBE_BYTES && first_line_end(&buf).is_some() {
            break;
        }
    }
    Ok((buf, reader))
}

/// Longest header row accepted (its fields' bytes).
const MAX_HEADER_BYTES: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn read_all(bytes: Vec<u8>) -> Result<(Vec<String>, Vec<(u64, Vec<String>)>)> {
        let (headers, mut records) = open(std::io::Cursor::new(bytes)).await?;
        let mut out = Vec::new();
        while let Some(r) = records.next().await? {
            out.push((
                r.line,
                (0..r.fields.len())
                    .map(|i| decode_cell(field_text(r.fields, i).unwrap()).into_owned())
                    .collect(),
            ));
        }
        Ok((headers, out))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn an_unclosed_quote_fails_the_file_instead_of_swallowing_it() {
        use tokio::io::AsyncReadExt as _;
        let head = std::io::Cursor::new(b"Name,Notes\nok,fine\nbad,\"never closed\n".to_vec());
        let rest = tokio::io::repeat(b'x').take(MAX_RECORD_BYTES + 1024 * 1024);
        let err = rt().block_on(async {
            let (_, mut records) = open(head.chain(rest)).await?;
            while records.next().await?.is_some() {}
            Ok::<_, Error>(())
        });
        match err {
            Err(Error::File(FileError::Malformed { line, .. })) => assert_eq!(line, 3),
            other => panic!("expected malformed_csv at line 3, got {other:?}"),
        }
    }

    fn malformed_line(result: Result<impl Sized>) -> (LineNo, String) {
        match result {
            Err(Error::File(e @ FileError::Malformed { .. })) => {
                let FileError::Malformed { line, .. } = &e else {
                    unreachable!()
                };
                (*line, e.to_string())
            }
            Err(other) => panic!("expected malformed_csv, got {other:?}"),
            Ok(_) => panic!("expected malformed_csv, got Ok"),
        }
    }

    #[test]
    fn a_record_over_max_fields_fails_the_file_at_its_line() {
        let wide = ",".repeat(MAX_FIELDS);
        let csv = format!("name,value\nok,1\n\nB,\"two\nlines\"\n{wide}\nlater,2\n");
        let (line, message) = malformed_line(rt().block_on(read_all(csv.into_bytes())));
        assert_eq!(line, 6);
        assert!(
            message.contains("near line 6") && message.contains("more than 100000 columns"),
            "{message}"
        );
        // The header too.
        let csv = format!("{wide}\nx\n");
        assert_eq!(
            malformed_line(rt().block_on(read_all(csv.into_bytes()))).0,
            1
        );
    }

    #[test]
    fn a_wide_record_is_refused_at_its_own_line_even_in_read_ahead() {
        // Many small records then the wide one, all within one buffer of
        // the parser: the error names the wide record's line, not the
        // line the parser had reached.
        let mut csv = "name,value\n".to_owned();
        for i in 0..2000 {
            csv.push_str(&format!("r{i},{i}\n"));
        }
        csv.push_str(&",".repeat(MAX_FIELDS + 5));
        csv.push_str("\nlast,1\n");
        let (line, _) = malformed_line(rt().block_on(read_all(csv.into_bytes())));
        assert_eq!(line, 2002);
    }

    #[test]
    fn thirty_million_commas_fail_without_being_buffered() {
        use tokio::io::AsyncReadExt as _;
        let head = std::io::Cursor::new(b"name,value\n".to_vec());
        let rest = tokio::io::repeat(b',')
            .take(30_000_000)
            .chain(std::io::Cursor::new(b"\n".to_vec()));
        let result = rt().block_on(async {
            let (_, mut records) = open(head.chain(rest)).await?;
            while records.next().await?.is_some() {}
            Ok::<_, Error>(())
        });
        assert_eq!(malformed_line(result).0, 2);
    }

    #[test]
    fn max_fields_is_allowed_and_quoted_delimiters_do_not_count() {
        let full = ",".repeat(MAX_FIELDS - 1);
        let quoted = format!("\"{}\"", ",".repeat(MAX_FIELDS * 2));
        let csv = format!("name,notes\n{full}\nq,{quoted}\nsmall,1\n");
        rt().block_on(async {
            let (_, mut records) = open(std::io::Cursor::new(csv.into_bytes())).await.unwrap();
            let r = records.next().await.unwrap().unwrap();
            assert_eq!((r.line, r.fields.len()), (2, MAX_FIELDS));
            // The record made the reused buffer big: it is replaced at the
            // next read.
            assert!(records.oversized);
            let r = records.next().await.unwrap().unwrap();
            assert_eq!((r.line, r.fields.len()), (3, 2));
            assert_eq!(r.fields[1].len(), MAX_FIELDS * 2);
            let r = records.next().await.unwrap().unwrap();
            assert_eq!((r.line, r.fields.len()), (4, 2));
            assert!(!records.oversized);
            assert!(records.next().await.unwrap().is_none());
        });
    }

    #[test]
    fn a_wide_record_after_a_resume_names_its_physical_line() {
        let csv = format!("A,1\nB,2\n{}\n", ",".repeat(MAX_FIELDS));
        let dialect = Dialect {
            delimiter: b',',
            encoding: Encoding::Utf8,
            line_ending: LineEnding::Lf,
        };
        let result = rt().block_on(async {
            let start = Start {
                line: 40,
                byte: 1000,
            };
            let mut r = resume(std::io::Cursor::new(csv.into_bytes()), dialect, start);
            while r.next().await?.is_some() {}
            Ok::<_, Error>(())
        });
        assert_eq!(malformed_line(result).0, 42);
    }

    #[test]
    fn a_quote_left_open_at_the_end_keeps_its_line() {
        // The last byte is a `\n`, but inside the quote: the record has no
        // terminator of its own.
        let (_, rows) = rt()
            .block_on(read_all(b"n,v\nA,1\nB,\"x\n".to_vec()))
            .unwrap();
        let lines: Vec<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(lines, vec![2, 3]);
        assert_eq!(rows[1].1, vec!["B", "x\n"]);
    }

    #[test]
    fn line_numbers_are_physical_lines() {
        let csv = b"name,notes\nA,one\n\nB,\"two\nlines\"\nC,three\r\nD,four".to_vec();
        let (h, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(h, vec!["name", "notes"]);
        let lines: Vec<u64> = rows.iter().map(|r| r.0).collect();
        // A on 2, an empty line 3, B spans 4-5, C on 6, D on 7.
        assert_eq!(lines, vec![2, 4, 6, 7]);
        assert_eq!(rows[1].1[1], "two\nlines");
    }

    #[test]
    fn crlf_files_and_trailing_blank_lines() {
        let csv = b"name,notes\r\nA,one\r\n\r\nB,\"two\r\nlines\"\r\nC,three\r\n\nD,four".to_vec();
        let (h, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(h, vec!["name", "notes"]);
        let lines: Vec<u64> = rows.iter().map(|r| r.0).collect();
        // The CRLF blank line 3 is a whitespace record the pipeline skips.
        assert_eq!(lines, vec![2, 3, 4, 6, 8]);
        assert_eq!(rows[2].1, vec!["B", "two\r\nlines"]);
        assert_eq!(rows[4].1, vec!["D", "four"]);
    }

    #[test]
    fn a_lone_cr_in_a_newline_file_is_a_line_break() {
        for (csv, lines) in [
            (&b"name,notes\na,\"x\ry\"\nb,1\n"[..], vec![2, 4]),
            (b"name,notes\r\na,\"x\ry\"\r\nb,1\r\n", vec![2, 4]),
            // At the end of a field that is not the last one.
            (b"name,notes,more\na,\"x\r\",z\nb,1,2\n", vec![2, 4]),
            (b"name,notes\na,x\ry\nb,1\n", vec![2, 4]),
            (b"name,notes\na,\"x\r\r\ny\"\nb,1\n", vec![2, 5]),
            (b"name,notes\na,\"\r\r\r\"\n\nb,1", vec![2, 7]),
            // A quoted last field ending in a lone `\r`, and one that ends
            // a CRLF line unquoted (not a line break of its own).
            (b"name,notes\na,\"x\r\"\nb,1\n", vec![2, 4]),
            (b"name,notes\na,\"x\r\"\r\nb,1\r\n", vec![2, 4]),
            (b"name,notes\na,x\r\nb,1\n", vec![2, 3]),
            (b"name,notes\r\na,\"\"\"\r\"\r\nb,1\r\n", vec![2, 4]),
        ] {
            let (_, rows) = rt().block_on(read_all(csv.to_vec())).unwrap();
            let got: Vec<u64> = rows.iter().map(|r| r.0).collect();
            assert_eq!(got, lines, "{csv:?}");
        }
        // A resumed run continues from the right line.
        let csv = b"n,v\nA,\"x\ry\"\nB,2\nC,3\n".to_vec();
        let rt = rt();
        let (dialect, start) = rt.block_on(async {
            let (_, mut r) = open(std::io::Cursor::new(csv.clone())).await.unwrap();
            let a = r.next().await.unwrap().unwrap();
            assert_eq!((a.line, a.next_line), (2, 4));
            let dialect = r.dialect;
            let b = r.next().await.unwrap().unwrap();
            (
                dialect,
                Start {
                    line: b.next_line,
                    byte: b.end_byte,
                },
            )
        });
        assert_eq!(start, Start { line: 5, byte: 16 });
        assert_eq!(&csv[16..18], b"C,");
        rt.block_on(async {
            let rest = std::io::Cursor::new(csv[start.byte as usize..].to_vec());
            let mut r = resume(rest, dialect, start);
            assert_eq!(r.next().await.unwrap().unwrap().line, 5);
        });
    }

    #[test]
    fn lone_cr_line_endings() {
        let csv = b"name;notes\rA;one\r\rB;\"two\rlines\"\rC;three".to_vec();
        let (h, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(h, vec!["name", "notes"]);
        let lines: Vec<u64> = rows.iter().map(|r| r.0).collect();
        // A on 2, an empty line 3, B spans 4-5, C on 6.
        assert_eq!(lines, vec![2, 4, 6]);
        assert_eq!(rows[1].1, vec!["B", "two\nlines"]);
        assert_eq!(rows[2].1, vec!["C", "three"]);
    }

    #[test]
    fn blank_lines_before_the_header_are_skipped() {
        for (csv, header_line) in [
            (&b"\r\nname;value\r\nA;1\r\n"[..], 2),
            (b"\nname;value\nA;1\n", 2),
            (b"  \n\t\n\r\nname;value\nA;1\n", 4),
            (b"\xEF\xBB\xBF\n\nname;value\nA;1\n", 3),
            (b"\r\rname;value\rA;1\r", 3),
            // ` \r\n`, `\n`, a lone `\r`, ` \n`: four blank lines.
            (b" \r\n\n\r \nname;value\nA;1", 5),
        ] {
            let (h, rows) = rt().block_on(read_all(csv.to_vec())).unwrap();
            assert_eq!(h, vec!["name", "value"], "{csv:?}");
            assert_eq!(
                rows,
                vec![(header_line + 1, vec!["A".to_owned(), "1".to_owned()])],
                "{csv:?}"
            );
        }
        let text = "\n\nName\tValue\nCafé\t5\n";
        let mut bytes = vec![0xFF, 0xFE];
        for u in text.encode_utf16() {
            bytes.extend_from_slice(&u.to_le_bytes());
        }
        let (h, rows) = rt().block_on(read_all(bytes)).unwrap();
        assert_eq!(h, vec!["Name", "Value"]);
        assert_eq!(rows, vec![(4, vec!["Café".to_owned(), "5".to_owned()])]);
    }

    #[test]
    fn many_blank_lines_before_the_header() {
        let mut csv = "\n".repeat(200_000).into_bytes();
        csv.extend_from_slice(b"name,value\nA,1\n");
        let (h, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(h, vec!["name", "value"]);
        assert_eq!(rows[0].0, 200_002);
    }

    /// An Excel `sep=` line: its delimiter is the file's (the header would
    /// tell `,` here), the header is the next line, lines and offsets
    /// count it.
    #[test]
    fn an_excel_sep_line_sets_the_delimiter_and_counts_as_a_line() {
        let csv = b"\xEF\xBB\xBFsep=;\r\nName;Amount (EUR, net)\r\nAcme;5,5\r\n".to_vec();
        let (h, rows) = rt().block_on(read_all(csv.clone())).unwrap();
        assert_eq!(h, vec!["Name", "Amount (EUR, net)"]);
        assert_eq!(rows, vec![(3, vec!["Acme".to_owned(), "5,5".to_owned()])]);
        let end = rt().block_on(async {
            let (_, mut r) = open(std::io::Cursor::new(csv.clone())).await.unwrap();
            r.next().await.unwrap().unwrap().end_byte
        });
        assert_eq!(end, csv.len() as u64);
        // Only the sep line: no header.
        let code = match rt().block_on(read_all(b"sep=;\r\n".to_vec())) {
            Err(Error::File(e)) => e.code(),
            other => panic!("expected a file error, got {:?}", other.map(|_| ())),
        };
        assert_eq!(code, "no_header");
    }

    #[test]
    fn offsets_after_leading_blank_lines_are_exact_for_resume() {
        let csv = b"\xEF\xBB\xBF\r\n \r\nname;value\r\nA;1\r\nB;\"x\r\ny\"\r\nC;3\r\n".to_vec();
        let rt = rt();
        let (dialect, after_a, a_start, rest) = rt.block_on(async {
            let (_, mut r) = open(std::io::Cursor::new(csv.clone())).await.unwrap();
            let dialect = r.dialect;
            let a = r.next().await.unwrap().unwrap();
            let a_start = Start {
                line: a.line,
                byte: a.end_byte - b"A;1\r\n".len() as u64,
            };
            let after_a = Start {
                line: a.next_line,
                byte: a.end_byte,
            };
            let mut rest = Vec::new();
            while let Some(rec) = r.next().await.unwrap() {
                rest.push((rec.line, rec.end_byte, rec.next_line));
            }
            (dialect, after_a, a_start, rest)
        });
        assert_eq!(dialect.delimiter, b';');
        // BOM 3 + `\r\n` 2 + ` \r\n` 3 + `name;value\r\n` 12 bytes.
        assert_eq!(a_start, Start { line: 4, byte: 20 });
        assert_eq!(&csv[20..23], b"A;1");
        assert_eq!(after_a, Start { line: 5, byte: 25 });
        assert_eq!(&csv[25..27], b"B;");
        assert_eq!(rest, vec![(5, 35, 7), (7, 40, 8)]);
        assert_eq!(csv.len(), 40);
        rt.block_on(async {
            let tail = std::io::Cursor::new(csv[after_a.byte as usize..].to_vec());
            let mut r = resume(tail, dialect, after_a);
            let mut again = Vec::new();
            while let Some(rec) = r.next().await.unwrap() {
                again.push((rec.line, rec.end_byte, rec.next_line));
            }
            assert_eq!(again, rest);
        });
    }

    #[test]
    fn bom_is_stripped_and_delimiter_detected() {
        let csv = b"\xEF\xBB\xBFDeal Name;Value\nAcme;\"5,00\"\n".to_vec();
        let (h, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(h, vec!["Deal Name", "Value"]);
        assert_eq!(rows[0].1, vec!["Acme", "5,00"]);
    }

    #[test]
    fn utf16_with_bom_is_transcoded() {
        let text = "Name\tValue\nCafé\t5\n";
        let mut bytes = vec![0xFF, 0xFE];
        for u in text.encode_utf16() {
            bytes.extend_from_slice(&u.to_le_bytes());
        }
        let (h, rows) = rt().block_on(read_all(bytes)).unwrap();
        assert_eq!(h, vec!["Name", "Value"]);
        assert_eq!(rows, vec![(2, vec!["Café".to_owned(), "5".to_owned()])]);
    }

    #[test]
    fn windows_1252_cells_are_decoded() {
        let csv = b"Name\nCaf\xE9\n".to_vec();
        let (_, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(rows[0].1[0], "Café");
    }

    #[test]
    fn file_level_problems_have_codes() {
        let code = |b: &[u8]| match rt().block_on(read_all(b.to_vec())) {
            Err(Error::File(e)) => e.code(),
            other => panic!("expected a file error, got {:?}", other.map(|_| ())),
        };
        assert_eq!(code(b""), "empty_file");
        assert_eq!(code(b"\xEF\xBB\xBF"), "empty_file");
        assert_eq!(code(b"\n\n  \n"), "no_header");
        assert_eq!(code(b"\r\n\r"), "no_header");
        assert_eq!(code(b"\n\n,,\n1,2,3\n"), "no_header");
        assert_eq!(code(b"PK\x03\x04binary"), "not_csv");
        assert_eq!(code(b"a,b\x00c\n"), "not_csv");
        // UTF-16 is checked once decoded (its raw bytes are half NULs).
        let utf16 = |text: &str| {
            let mut b = vec![0xFF, 0xFE];
            b.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
            b
        };
        assert_eq!(code(&utf16("a,b\n\u{0}\u{0}\u{1}x\n")), "not_csv");
        assert!(rt().block_on(read_all(utf16("a,b\n1,2\n"))).is_ok());
        assert_eq!(code(b",,\n1,2,3\n"), "no_header");
        let huge = format!("{},b\n1,2\n", "h".repeat(MAX_HEADER_BYTES + 1));
        match rt().block_on(read_all(huge.into_bytes())) {
            Err(Error::File(e)) => assert!(e.to_string().contains("KiB"), "{e}"),
            other => panic!("expected a file error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_transcoded_file_counts_its_own_bytes_for_progress() {
        let mut raw = vec![0xFF, 0xFE];
        raw.extend(
            "Name,Note\nÅsa,日本\nBo,x\n"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        );
        let size = raw.len() as u64;
        rt().block_on(async {
            let (_, mut records) = open(std::io::Cursor::new(raw)).await.unwrap();
            let read = records.file_bytes_read().expect("a UTF-16 file counts");
            let mut last_end = 0;
            while let Some(r) = records.next().await.unwrap() {
                last_end = r.end_byte;
            }
            // Decoded offsets fall short of the file (ASCII halves)...
            assert!(last_end < size);
            // ...the count of the file's bytes does not.
            assert_eq!(read.load(std::sync::atomic::Ordering::Relaxed), size);
            let (_, utf8) = open(std::io::Cursor::new(b"a\n1\n".to_vec()))
                .await
                .unwrap();
            assert!(utf8.file_bytes_read().is_none());
        });
    }

    #[test]
    fn a_nul_in_the_first_8_kib_is_found_however_the_reads_are_cut() {
        let mut csv = b"a,b\n".to_vec();
        csv.extend(std::iter::repeat_n(b'x', 5000));
        csv.push(0);
        csv.extend_from_slice(b",y\n");
        for size in [64, 1000, 8192, csv.len()] {
            // One read per chunk of `size` bytes, as a slow storage gives.
            let mut reader: BoxRead = Box::pin(tokio::io::empty());
            for chunk in csv.chunks(size).rev() {
                reader = Box::pin(std::io::Cursor::new(chunk.to_vec()).chain(reader));
            }
            match rt().block_on(open(reader)) {
                Err(Error::File(e)) => assert_eq!(e.code(), "not_csv", "reads of {size}"),
                other => panic!("reads of {size}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn delimiter_follows_the_rows_and_the_readers_quote_rule() {
        // A stray quote inside a field is text, as the reader has it.
        assert_eq!(detect_delimiter(b"Screen 15\";Name;Price\nA;B;1,5\n"), b';');
        assert_eq!(
            first_line_end(b"Size 5\",v\rA,1\rB,2\r"),
            Some((9, LineEnding::Cr))
        );
        let csv = b"Screen 15\";Name;Price\rA;B;1,5\r".to_vec();
        let (h, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(h, vec!["Screen 15\"", "Name", "Price"]);
        assert_eq!(rows, vec![(2, vec!["A".into(), "B".into(), "1,5".into()])]);
        // A tie in the header is broken by the rows below it.
        assert_eq!(
            detect_delimiter(b"Deal;Amount (EUR, net)\nA;5\nB;6\n"),
            b';'
        );
        assert_eq!(
            detect_delimiter(b"Deal;Amount (EUR, net, gross)\nA;5\nB;6\n"),
            b';'
        );
        assert_eq!(detect_delimiter(b"a,b;c\n1,2;3\n"), b',');
        // One row, no final line break.
        assert_eq!(detect_delimiter(b"Deal;Amount (EUR, net)\nA;5"), b';');
        // Decimal commas in the rows do not make `,` the separator.
        assert_eq!(
            detect_delimiter(b"Deal;Amount (EUR, net)\nA;5,50\nB;6,75\n"),
            b';'
        );
        // A one-column file: the delimiter its rows do not contain.
        assert_eq!(detect_delimiter(b"Name\nAcme, Inc\nFoo, Ltd\n"), b';');
        // Quoted fields, `""` escapes and line breaks inside quotes.
        assert_eq!(
            detect_delimiter(b"\"a \"\"x\"\", b\"|c\n\"1\n2\"|3\n4|5\n"),
            b'|'
        );
    }

    #[test]
    fn resume_continues_lines_and_bytes() {
        let csv = b"n,v\nA,1\nB,\"x\ny\"\nC,3\n".to_vec();
        let rt = rt();
        let (start, first_b) = rt.block_on(async {
            let (_, mut r) = open(std::io::Cursor::new(csv.clone())).await.unwrap();
            let a = r.next().await.unwrap().unwrap();
            let start = Start {
                line: a.next_line,
                byte: a.end_byte,
            };
            let b = r.next().await.unwrap().unwrap();
            (start, (b.line, b.end_byte))
        });
        assert_eq!(start, Start { line: 3, byte: 8 });
        let rest = csv[start.byte as usize..].to_vec();
        rt.block_on(async {
            let dialect = Dialect {
                delimiter: b',',
                encoding: Encoding::Utf8,
                line_ending: LineEnding::Lf,
            };
            let mut r = resume(std::io::Cursor::new(rest), dialect, start);
            let b = r.next().await.unwrap().unwrap();
            assert_eq!((b.line, b.end_byte), first_b);
            let c = r.next().await.unwrap().unwrap();
            assert_eq!(c.line, 5);
        });
    }

    /// Rows ending in a lone `\r` under a header ending in `\n` or `\r\n`
    /// are rows; a lone `\r` inside the rows of a `\n` file stays text.
    #[test]
    fn rows_ending_in_a_lone_cr_under_a_newline_header_are_rows() {
        for (csv, expected) in [
            (&b"a,b\n1,2\r3,4\r"[..], vec![(2, "1", "2"), (3, "3", "4")]),
            (
                b"a,b\r\n1,2\r3,4\r5,\"x\ry\"",
                vec![(2, "1", "2"), (3, "3", "4"), (4, "5", "x\ny")],
            ),
            (b"a,b\n1,x\ry\n", vec![(2, "1", "x\ry")]),
            (b"a,b\n1,x\ry", vec![(2, "1", "x\ry")]),
            (b"a,b\n1,x\ry\n2,z\n", vec![(2, "1", "x\ry"), (4, "2", "z")]),
        ] {
            let (_, rows) = rt().block_on(read_all(csv.to_vec())).unwrap();
            let got: Vec<(u64, &str, &str)> = rows
                .iter()
                .map(|(l, f)| (*l, f[0].as_str(), f.get(1).map_or("", String::as_str)))
                .collect();
            assert_eq!(got, expected, "{csv:?}");
        }
    }

    /// A file whose header ends in a lone `\r` and whose rows end in
    /// `\r\n` (or `\n`, or mix them) is read line by line.
    #[test]
    fn a_lone_cr_header_over_mixed_line_ends_reads_every_line() {
        let csv = b"n,v\rA,1\r\nB,\"x\r\ny\"\r\nC,3\nD,4\rE,5".to_vec();
        let (headers, rows) = rt().block_on(read_all(csv)).unwrap();
        assert_eq!(headers, ["n", "v"]);
        let got: Vec<(u64, &str, &str)> = rows
            .iter()
            .map(|(l, f)| (*l, f[0].as_str(), f[1].as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "A", "1"),
                (3, "B", "x\r\ny"),
                (5, "C", "3"),
                (6, "D", "4"),
                (7, "E", "5")
            ]
        );
    }

    #[test]
    fn resume_of_a_lone_cr_file_keeps_its_line_ending() {
        let csv = b"n,v\rA,1\rB,\"x\ry\"\rC,3\r".to_vec();
        let rt = rt();
        let (start, dialect) = rt.block_on(async {
            let (_, mut r) = open(std::io::Cursor::new(csv.clone())).await.unwrap();
            let a = r.next().await.unwrap().unwrap();
            let start = Start {
                line: a.next_line,
                byte: a.end_byte,
            };
            (start, r.dialect)
        });
        assert_eq!(dialect.line_ending, LineEnding::Cr);
        assert_eq!(start, Start { line: 3, byte: 8 });
        rt.block_on(async {
            let rest = std::io::Cursor::new(csv[start.byte as usize..].to_vec());
            let mut r = resume(rest, dialect, start);
            let b = r.next().await.unwrap().unwrap();
            assert_eq!(b.line, 3);
            assert_eq!(field_text(b.fields, 1), Some(&b"x\ny"[..]));
            assert_eq!(r.next().await.unwrap().unwrap().line, 5);
        });
    }

    proptest! {
        /// Lines are strictly increasing and each record's line is the line
        /// of the file where it starts, whatever the quoted line breaks
        /// (the file's own or a lone `\r`) and the line ending (`\n`,
        /// `\r\n` or a lone `\r`).
        #[test]
        fn lines_match_the_text(
            rows in proptest::collection::vec(
                (
                    proptest::string::string_regex("[a-z ]{0,6}").unwrap(),
                    proptest::collection::vec(any::<bool>(), 0..3),
                    any::<bool>(),
                    any::<bool>(),
                ),
                1..40,
            ),
            eol in proptest::sample::select(vec!["\n", "\r\n", "\r"]),
        ) {
            let mut text = format!("name,notes{eol}");
            let mut expected = Vec::new();
            let mut line = 2u64;
            for (name, breaks, blank_before, ends_on_break) in &rows {
                if *blank_before {
                    text.push_str(eol);
                    line += 1;
                }
                expected.push(line);
                let notes: String = breaks
                    .iter()
                    .map(|&lone_cr| format!("x{}", if lone_cr { "\r" } else { eol }))
                    .collect();
                // The quoted field may end on its last line break.
                let end = if *ends_on_break { "" } else { "end" };
                text.push_str(&format!("{name}z,\"{notes}{end}\"{eol}"));
                line += 1 + breaks.len() as u64;
            }
            let (_, got) = rt().block_on(read_all(text.into_bytes())).unwrap();
            // A blank CRLF line is a whitespace record, which the pipeline skips.
            let lines: Vec<u64> = got
                .iter()
                .filter(|r| !(r.1.len() == 1 && r.1[0].trim().is_empty()))
                .map(|r| r.0)
                .collect();
            prop_assert_eq!(lines, expected);
        }

        /// The field cap, checked ahead of the parser, fails the file
        /// exactly when the parser would return a record over it, at that
        /// record's line.
        #[test]
        fn the_field_cap_agrees_with_the_parser(
            text in "[a;\"\n\r]{0,60}",
            max in 1usize..5,
        ) {
            let dialect = Dialect {
                delimiter: b';',
                encoding: Encoding::Utf8,
                line_ending: LineEnding::Lf,
            };
            let read = |max_fields: usize| {
                let text = text.clone();
                rt().block_on(async move {
                    let mut r = resume(
                        std::io::Cursor::new(text.into_bytes()),
                        dialect,
                        Start { line: 1, byte: 0 },
                    );
                    r.rdr.get_mut().width.max_fields = max_fields;
                    let mut out = Vec::new();
                    while let Some(rec) = r.next().await? {
                        out.push((rec.line, rec.fields.len()));
                    }
                    Ok::<_, Error>(out)
                })
            };
            let all = read(usize::MAX).unwrap();
            let first_wide = all.iter().find(|r| r.1 > max);
            match (read(max), first_wide) {
                (Ok(got), None) => prop_assert_eq!(got, all),
                (Err(Error::File(FileError::Malformed { line, .. })), Some(&(want, _))) => {
                    prop_assert_eq!(line, want);
                }
                (got, want) => prop_assert!(false, "{:?} for {:?}", got.map(|_| ()), want),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = rt().block_on(read_all(bytes));
        }
    }
}
