//! The downloadable error report: for each failed line, its original
//! columns plus `line` and `error`, ready to fix and re-import.
//!
//! Built by streaming the import's outcome documents (one batch at a time)
//! into a temporary file, then uploaded to
//! `reports/<account>/<queue_id>/errors.csv`; memory does not grow with the
//! number of failures. Cells that a spreadsheet would run as a formula
//! (`=`, `+`, `-`, `@`, tab or CR first, after optional spaces or quotes)
//! are prefixed with `'` (OWASP "CSV injection"), and every cell is quoted,
//! so a spreadsheet that splits on another delimiter (`;` in many locales)
//! cannot cut a cell into a formula (`Acme;=cmd|...`). The file starts with
//! a UTF-8 BOM so Excel reads accents right.

use std::borrow::Cow;

use bson::oid::ObjectId;
use bson::{Document, doc};
use futures::TryStreamExt;
use mongodb::Database;
use tokio::io::AsyncWriteExt;

use crate::domain::collections;
use crate::fetch::Storage;

/// Errors of the report layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] crate::fetch::Error),
    /// Writing the temporary file failed.
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    /// CSV encoding failed.
    #[error("writing the report: {0}")]
    Csv(#[from] csv_async::Error),
}

/// Makes a cell inert in spreadsheets: a `'` goes before a formula
/// character (`=`, `+`, `-`, `@`, their full-width forms, tab or CR, after
/// optional spaces of any kind or quotes) at the cell's start, and also after each `;`, tab or line break
/// in the cell. A spreadsheet that splits the report on `;` (Excel in many
/// locales) or tabs only honours a quote at the start of what it sees as a
/// cell, so the text after one of those inside a quoted cell can become a
/// cell of its own there.
pub fn neutralise(cell: &str) -> Cow<'_, str> {
    fn dangerous(segment: &str) -> bool {
        let first = segment
            .trim_start_matches(|c: char| {
                matches!(c, '"' | '\'') || (c.is_whitespace() && !matches!(c, '\t' | '\r' | '\n'))
            })
            .chars()
            .next();
        matches!(
            first,
            Some('=' | '+' | '-' | '@' | '\t' | '\r' | '＝' | '＋' | '－' | '＠')
        )
    }
    let starts = std::iter::once(0).chain(
        cell.match_indices([';', '\t', '\n', '\r'])
            .map(|(i, sep)| i + sep.len()),
    );
    let mut out: Option<String> = None;
    let mut copied = 0;
    for start in starts {
        if dangerous(&cell[start..]) {
            let o = out.get_or_insert_with(|| String::with_capacity(cell.len() + 2));
            o.push_str(&cell[copied..start]);
            o.push('\'');
            copied = start;
        }
    }
    match out {
        Some(mut o) => {
            o.push_str(&cell[copied..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(cell),
    }
}

/// Object key of an import's report.
pub fn report_key(account_id: &ObjectId, queue_id: &ObjectId) -> String {
    format!(
        "reports/{}/{}/errors.csv",
        account_id.to_hex(),
        queue_id.to_hex()
    )
}

/// Writes and uploads the report. Returns the number of rows written
/// (0: nothing failed, no report uploaded).
pub async fn write_report(
    db: &Database,
    storage: &Storage,
    queue_id: ObjectId,
    columns: &[String],
    key: &str,
) -> Result<u64, Error> {
    let mut cursor = db
        .collection::<Document>(collections::IMPORT_LINES)
        .find(doc! { "queue_id": queue_id, "failed_count": { "$gt": 0_i64 } })
        .sort(doc! { "queue_id": 1, "first_line": 1 })
        .projection(doc! { "failed": 1 })
        .await?;
    let tmp = tempfile::NamedTempFile::new()?;
    let file = tokio::fs::File::from_std(tmp.reopen()?);
    let mut w = report_writer(tokio::io::BufWriter::new(file)).await?;
    // One reused record; no closure-typed iterator is held across an await.
    let mut rec = csv_async::ByteRecord::new();
    for c in columns {
        rec.push_field(neutralise(c).as_bytes());
    }
    rec.push_field(b"line");
    rec.push_field(b"error");
    w.write_byte_record(&rec).await?;
    let mut rows = 0u64;
    while let Some(d) = cursor.try_next().await? {
        for f in d.get_array("failed").map(Vec::as_slice).unwrap_or_default() {
            let Some(f) = f.as_document() else { continue };
            let line = f.get_i64("line").unwrap_or(0).to_string();
            let mut message = f.get_str("message").unwrap_or_default().to_owned();
            rec.clear();
            let row: Vec<&str> = match f.get_array("row") {
                Ok(row) => row.iter().map(|c| c.as_str().unwrap_or_default()).collect(),
                Err(_) => {
                    message.push_str(" (row too large to include)");
                    Vec::new()
                }
            };
            for cell in report_cells(&row, columns.len(), &line, &message) {
                rec.push_field(neutralise(cell).as_bytes());
            }
            w.write_byte_record(&rec).await?;
            rows += 1;
        }
    }
    let mut inner = w
        .into_inner()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    inner.flush().await?;
    drop(inner);
    if rows > 0 {
        storage.put_file(key, tmp.path()).await?;
    }
    Ok(rows)
}

/// UTF-8 byte order mark: Excel reads a CSV without one in the system's
/// legacy code page.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Starts a report on `out`: writes the BOM, returns a CSV writer that
/// quotes every cell.
async fn report_writer<W>(mut out: W) -> std::io::Result<csv_async::AsyncWriter<W>>
where
    W: tokio::io::AsyncWrite + Unpin + Send,
{
    out.write_all(BOM).await?;
    Ok(csv_async::AsyncWriterBuilder::new()
        .flexible(true)
        .quote_style(csv_async::QuoteStyle::Always)
        .create_writer(out))
}

/// A failed row's cells in report order: one per header (a short, ragged
/// row padded with empty cells), then `line` and `error` under their
/// headers, then any cells past the header's width (a long ragged row
/// loses nothing). Pure.
fn report_cells<'a>(
    row: &'a [&'a str],
    width: usize,
    line: &'a str,
    error: &'a str,
) -> impl Iterator<Item = &'a str> {
    let known = row.len().min(width);
    row[..known]
        .iter()
        .copied()
        .chain(std::iter::repeat_n("", width - known))
        .chain([line, error])
        .chain(row[known..].iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ragged_rows_keep_line_and_error_under_their_headers() {
        fn cells(row: &[&str]) -> Vec<String> {
            report_cells(row, 3, "7", "bad")
                .map(str::to_owned)
                .collect()
        }
        assert_eq!(cells(&["a", "b", "c"]), ["a", "b", "c", "7", "bad"]);
        assert_eq!(cells(&["a"]), ["a", "", "", "7", "bad"]);
        assert_eq!(cells(&[]), ["", "", "", "7", "bad"]);
        assert_eq!(
            cells(&["a", "b", "c", "d", "e"]),
            ["a", "b", "c", "7", "bad", "d", "e"]
        );
    }

    /// The report bytes for these rows, written as `write_report` does.
    fn report(rows: &[&[&str]]) -> Vec<u8> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async {
                let mut w = report_writer(Vec::new()).await.unwrap();
                for row in rows {
                    let cells: Vec<_> = row.iter().map(|c| neutralise(c)).collect();
                    w.write_record(cells.iter().map(|c| c.as_bytes()))
                        .await
                        .unwrap();
                }
                w.into_inner().await.unwrap()
            })
    }

    #[test]
    fn every_cell_is_quoted_after_a_utf8_bom() {
        let out = report(&[
            &["Name", "line", "error"],
            &["Acme;=cmd|' /C calc'!A0", "7", "bad"],
            &["Café \"Bleu\"", "", "=1"],
        ]);
        assert!(out.starts_with(BOM));
        assert_eq!(
            std::str::from_utf8(&out[BOM.len()..]).unwrap(),
            "\"Name\",\"line\",\"error\"\n\
             \"Acme;'=cmd|' /C calc'!A0\",\"7\",\"bad\"\n\
             \"Café \"\"Bleu\"\"\",\"\",\"'=1\"\n"
        );
    }

    #[test]
    fn a_semicolon_spreadsheet_sees_no_formula() {
        // Read back as Excel in a `;` locale would: every cell it shows
        // stays inert.
        let out = report(&[
            &["Name", "Notes"],
            &["Acme;=cmd|' /C calc'!A0", "x;+1;-2;@SUM(A1)"],
            &["=1", " \"-2"],
            &["Acme", "x\n=cmd|' /C calc'!A0"],
            &["Acme", "x\r\n-1"],
        ]);
        for delimiter in [b',', b';', b'\t'] {
            for row in split(&out, delimiter) {
                for cell in &row {
                    let first = cell.trim_start_matches([' ', '"']).chars().next();
                    assert!(
                        !matches!(first, Some('=' | '+' | '-' | '@')),
                        "{cell:?} with {:?}",
                        delimiter as char
                    );
                }
            }
        }
    }

    /// The report's rows as a reader splitting on `delimiter` sees them.
    fn split(out: &[u8], delimiter: u8) -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(delimiter)
            .from_reader(&out[BOM.len()..])
            .records()
            .map(|r| r.unwrap().iter().map(str::to_owned).collect())
            .collect()
    }

    proptest::proptest! {
        /// Whatever the cells, a reader splitting the report on `,` gets
        /// them back (neutralised), and one splitting on `;` or `\t` sees no
        /// cell starting with a formula character.
        #[test]
        fn no_split_of_the_report_starts_a_formula(
            rows in proptest::collection::vec(
                proptest::collection::vec("[a;,\"= +@\\-\n\r\t'é＝\u{a0}]{0,8}", 1..4), 1..4),
        ) {
            let rows_ref: Vec<Vec<&str>> =
                rows.iter().map(|r| r.iter().map(String::as_str).collect()).collect();
            let slices: Vec<&[&str]> = rows_ref.iter().map(Vec::as_slice).collect();
            let out = report(&slices);
            proptest::prop_assert!(out.starts_with(BOM));
            for delimiter in [b',', b';', b'\t'] {
                let got = split(&out, delimiter);
                for cell in got.iter().flatten() {
                    let first = cell.trim_start_matches([' ', '"', '\u{a0}']).chars().next();
                    proptest::prop_assert!(
                        !matches!(first, Some('=' | '+' | '-' | '@' | '\t' | '\r' | '＝')),
                        "{:?} split on {:?}", cell, delimiter as char
                    );
                }
                if delimiter == b',' {
                    let want: Vec<Vec<String>> = rows
                        .iter()
                        .map(|r| r.iter().map(|c| neutralise(c).into_owned()).collect())
                        .collect();
                    proptest::prop_assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn formulas_are_neutralised() {
        for bad in [
            "=SUM(A1)",
            "+1",
            "-2+3",
            "@cmd",
            "  =1",
            "\"=HYPERLINK(x)",
            "'=1",
            "\tx",
            // Full-width signs, and spaces of other kinds before a sign.
            "＝1+1",
            "＠cmd",
            "\u{a0}=1",
            "\u{3000}+1",
        ] {
            assert!(neutralise(bad).starts_with('\''), "{bad:?}");
        }
        for ok in ["Acme", "5000", "", " plain", "a=b", "a; b", "x\ny", "a,=b"] {
            assert_eq!(neutralise(ok), ok);
        }
        assert_eq!(
            neutralise("Acme;=cmd|' /C calc'!A0"),
            "Acme;'=cmd|' /C calc'!A0"
        );
        assert_eq!(neutralise("=1;+2; -3"), "'=1;'+2;' -3");
        assert_eq!(neutralise("a\r\n@x"), "a\r\n'@x");
        assert_eq!(neutralise("a\n\"=x"), "a\n'\"=x");
        assert_eq!(neutralise("Café;=1"), "Café;'=1");
        assert_eq!(neutralise("a\t+1"), "a\t'+1");
    }
}
