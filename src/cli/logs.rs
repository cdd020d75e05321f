//! `importd logs ID [--failed] [--line N]`: what happened to the lines of an
//! import, for support. Read only; streams batch by batch from
//! `import_lines` (one indexed query), so it prints a million-line import
//! in constant memory.

use std::io::Write;

use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;

use crate::domain::text::printable;
use crate::domain::{LineNo, RecordKind, collections};
use crate::outcomes::{LineOutcome, RowErrorDoc};

/// Errors of `importd logs`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// Writing the output failed (closed pipe...).
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

/// Which lines to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Every batch's counts and its failed lines.
    All,
    /// Failed lines only.
    Failed,
}

/// One failed line, one output line: `line N  code  field  message`.
pub fn format_failure(f: &RowErrorDoc) -> String {
    format!(
        "line {}\tfailed\t{}\t{}\t{}",
        f.line,
        f.code,
        printable(f.field.as_deref().unwrap_or("-")),
        printable(&f.message)
    )
}

/// One line's outcome (`importd logs ID --line N`).
pub fn format_outcome(line: LineNo, o: &LineOutcome, kind: RecordKind) -> String {
    let noun = kind.noun();
    match o {
        LineOutcome::Imported { id } => format!("line {line}\timported\t{noun} {id}"),
        LineOutcome::Updated { id } => format!("line {line}\tupdated\t{noun} {id}"),
        LineOutcome::Skipped { id } => {
            format!("line {line}\tskipped\tduplicate of {noun} {id}")
        }
        LineOutcome::Failed(f) => format_failure(f),
    }
}

/// What import `queue_id` writes (`source` of its queue document; deals
/// when it is unknown), and whether it is a dry run.
pub async fn record_kind(db: &Database, queue_id: ObjectId) -> Result<(RecordKind, bool), Error> {
    let q = db
        .collection::<Document>(collections::QUEUES)
        .find_one(doc! { "_id": queue_id })
        .projection(doc! { "source": 1, "additional_data.dry_run": 1 })
        .await?;
    let kind = q
        .as_ref()
        .and_then(|q| q.get_str("source").ok())
        .and_then(RecordKind::from_source)
        .unwrap_or(RecordKind::Deals);
    let dry_run = q
        .as_ref()
        .and_then(|q| q.get_document("additional_data").ok())
        .is_some_and(|a| a.get_bool("dry_run") == Ok(true));
    Ok((kind, dry_run))
}

/// One line's outcome in a dry run of import `queue_id`: nothing was
/// written, so lines are only ready, would update or would skip; a
/// duplicate of a record an earlier line would create names that line.
pub fn format_checked(
    queue_id: &ObjectId,
    line: LineNo,
    o: &LineOutcome,
    kind: RecordKind,
) -> String {
    let noun = kind.noun();
    let record = |id: &ObjectId| match crate::domain::line_of_deal_id(queue_id, id) {
        Some(first) => format!("the {noun} line {first} would create"),
        None => format!("{noun} {id}"),
    };
    match o {
        LineOutcome::Imported { .. } => {
            format!("line {line}\tready\tvalid {noun} (dry run: nothing imported)")
        }
        LineOutcome::Updated { id } => {
            format!(
                "line {line}\twould update\t{} (dry run: nothing written)",
                record(id)
            )
        }
        LineOutcome::Skipped { id } => {
            format!("line {line}\twould skip\tduplicate of {}", record(id))
        }
        LineOutcome::Failed(f) => format_failure(f),
    }
}

fn count(d: &Document, key: &str) -> i64 {
    d.get_i64(key)
        .or_else(|_| d.get_i32(key).map(i64::from))
        .unwrap_or(0)
}

/// The header of one batch: its line range and counts.
pub fn format_batch(d: &Document) -> String {
    format!(
        "lines {}-{}\t{} imported, {} updated, {} skipped, {} failed",
        count(d, "first_line"),
        count(d, "last_line"),
        count(d, "imported_count"),
        count(d, "updated_count"),
        count(d, "skipped_count"),
        count(d, "failed_count"),
    )
}

/// Writes the outcomes of `queue_id` to `out`; returns how many batches
/// were read (0: nothing processed yet, or no such import).
pub async fn write_logs(
    db: &Database,
    queue_id: ObjectId,
    filter: Filter,
    out: &mut impl Write,
) -> Result<u64, Error> {
    let mut query = doc! { "queue_id": queue_id };
    if filter == Filter::Failed {
        query.insert("failed_count", doc! { "$gt": 0_i64 });
    }
    let mut cursor = db
        .collection::<Document>(collections::IMPORT_LINES)
        .find(query)
        .sort(doc! { "queue_id": 1, "first_line": 1 })
        .projection(doc! { "imported": 0, "updated": 0, "skipped": 0, "failed.row": 0 })
        .await?;
    let mut batches = 0;
    while let Some(d) = cursor.try_next().await? {
        batches += 1;
        if filter == Filter::All {
            writeln!(out, "{}", format_batch(&d))?;
        }
        if let Ok(failed) = d.get_array("failed") {
            for f in failed.iter().filter_map(Bson::as_document) {
                let f = RowErrorDoc::from_doc(f);
                let indent = if filter == Filter::All { "  " } else { "" };
                writeln!(out, "{indent}{}", format_failure(&f))?;
            }
        }
    }
    out.flush()?;
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> RowErrorDoc {
        RowErrorDoc {
            line: 12,
            code: "invalid_number".into(),
            field: Some("value".into()),
            value: Some("abc".into()),
            message: "\"Value\" is not a number\nlike 5000.".into(),
        }
    }

    #[test]
    fn a_failed_line_is_one_output_line() {
        assert_eq!(
            format_failure(&failure()),
            "line 12\tfailed\tinvalid_number\tvalue\t\"Value\" is not a number like 5000."
        );
    }

    #[test]
    fn outcomes_name_the_deal() {
        let id = ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").unwrap();
        assert_eq!(
            format_outcome(3, &LineOutcome::Imported { id }, RecordKind::Deals),
            "line 3\timported\tdeal 64b7f0c2a1b2c3d4e5f60718"
        );
        assert_eq!(
            format_outcome(4, &LineOutcome::Skipped { id }, RecordKind::Deals),
            "line 4\tskipped\tduplicate of deal 64b7f0c2a1b2c3d4e5f60718"
        );
        assert_eq!(
            format_outcome(5, &LineOutcome::Updated { id }, RecordKind::Contacts),
            "line 5\tupdated\tcontact 64b7f0c2a1b2c3d4e5f60718"
        );
        assert!(
            format_outcome(12, &LineOutcome::Failed(failure()), RecordKind::Deals)
                .starts_with("line 12\tfailed")
        );
        let q = ObjectId::new();
        assert_eq!(
            format_checked(&q, 3, &LineOutcome::Imported { id }, RecordKind::Deals),
            "line 3\tready\tvalid deal (dry run: nothing imported)"
        );
        assert_eq!(
            format_checked(&q, 4, &LineOutcome::Updated { id }, RecordKind::Deals),
            "line 4\twould update\tdeal 64b7f0c2a1b2c3d4e5f60718 (dry run: nothing written)"
        );
        let own = crate::domain::contact_id(&q, 2).unwrap();
        assert_eq!(
            format_checked(
                &q,
                9,
                &LineOutcome::Skipped { id: own },
                RecordKind::Contacts
            ),
            "line 9\twould skip\tduplicate of the contact line 2 would create"
        );
    }

    #[test]
    fn a_batch_header_counts_its_lines() {
        let d = doc! { "first_line": 2_i64, "last_line": 1001_i64, "imported_count": 995_i64,
        "updated_count": 0_i64, "skipped_count": 0_i64, "failed_count": 5_i64 };
        assert_eq!(
            format_batch(&d),
            "lines 2-1001\t995 imported, 0 updated, 0 skipped, 5 failed"
        );
    }
}
