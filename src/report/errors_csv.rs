//! The downloadable error report: for each failed line, its original
//! columns plus `line` and `error`, ready to fix and re-import.
//!
//! Built by streaming the import's outcome documents (one batch at a time)
//! into a temporary file, then uploaded to
//! `reports/<account>/<queue_id>/errors.csv`; memory does not grow with the
//! number of failures. Cells that a spreadsheet would run as a formula
//! (`=`, `+`, `-`, `@`, tab or CR first, after optional spaces or quotes)
//! are prefixed with `'` (OWASP "CSV injection").

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

/// Makes a cell inert in spreadsheets.
pub fn neutralise(cell: &str) -> Cow<'_, str> {
    let first = cell.trim_start_matches([' ', '"', '\'']).chars().next();
    match first {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => Cow::Owned(format!("'{cell}")),
        _ => Cow::Borrowed(cell),
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
    let mut w = csv_async::AsyncWriterBuilder::new()
        .flexible(true)
        .create_writer(tokio::io::BufWriter::new(file));
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
        ] {
            assert!(neutralise(bad).starts_with('\''), "{bad:?}");
        }
        for ok in ["Acme", "5000", "", " plain", "a=b"] {
            assert_eq!(neutralise(ok), ok);
        }
    }
}
