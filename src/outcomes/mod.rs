//! Per-line outcomes and the import summary (`csv_imports`).
//!
//! Storage, chosen so that recording every line costs almost nothing on the
//! write path and no document approaches 16 MB:
//! - `import_lines`: ONE document per written batch (≤ `import.batch_size`
//!   lines, at most 10,000), `_id = deal_id(queue_id, first_line)`, holding
//!   the batch's line range, the lines imported (their deal id is
//!   `deal_id(queue_id, line)`), and each failed line with field, value,
//!   message and its original cells for the error report. Cells of failed
//!   rows are capped per document ([`MAX_ROW_BYTES_PER_DOC`]), and all of a
//!   document's failures ([`MAX_FAILURE_BYTES_PER_DOC`]: past it a failure
//!   keeps its line, code, field and message, not its value or cells), so
//!   10,000 failures of huge rows or long non-ASCII values stay far below
//!   16 MB.
//! - Writing the batch document is an upsert on its deterministic `_id`:
//!   a replayed batch rewrites the same document, so every line has exactly
//!   one outcome however often it is processed. Batches are cut by row
//!   count only, so a resumed run cuts the same batches.
//! - Support's "what happened to line N of import X" is one indexed query
//!   on `(queue_id, first_line)` ([`line_outcome`]); all failed lines of X
//!   come from `(queue_id, failed_count)`.
//! - A batch's document is stored once all of its writes are done: a
//!   resumed run reuses the documents of the batches written after its
//!   checkpoint ([`recorded_batch`]) instead of writing them again.
//! - Totals are recomputed from these documents at the end ([`totals`]),
//!   so they are exact after any number of replays.
//! - `csv_imports` keeps one summary per import with totals and the first
//!   1,000 failures in `logs` (SPEC.md).

use std::collections::{HashMap, HashSet};

use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;
use mongodb::options::ReplaceOptions;

use crate::domain::{ImportSpec, LineNo, RowCode, RowError, collections, deal_id};
use crate::map::FailedRow;

/// Largest total size of failed rows' cells kept in one batch document.
pub const MAX_ROW_BYTES_PER_DOC: usize = 4 * 1024 * 1024;

/// Largest total size of one batch document's failures, about: what their
/// lines, codes, fields and messages (at most [`MAX_MESSAGE_BYTES`] each)
/// leave of it holds values and cells, in line order; a failure past it
/// keeps the former only. With 10,000 failures (the largest batch) and the
/// line lists, a document stays under 13 MB.
pub const MAX_FAILURE_BYTES_PER_DOC: usize = 12 * 1024 * 1024;

/// Longest message kept with a failed line, in bytes (importd's own
/// messages are far shorter; a database's could quote a record).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Failures copied into `csv_imports.logs`.
pub const SUMMARY_LOG_LIMIT: usize = 1000;

/// Result alias of this layer.
pub type Result<T, E = mongodb::error::Error> = std::result::Result<T, E>;

/// Outcomes of one batch of lines.
#[derive(Clone, Debug, Default)]
pub struct BatchOutcome {
    /// First physical line of the batch.
    pub first_line: LineNo,
    /// Last physical line where a record of the batch starts.
    pub last_line: LineNo,
    /// Lines whose record exists (created now or by an earlier run).
    pub imported: Vec<LineNo>,
    /// Lines that updated an existing record (`duplicate_strategy: update`).
    pub updated: Vec<(LineNo, ObjectId)>,
    /// Lines left out as duplicates of an existing record (`skip`).
    pub skipped: Vec<(LineNo, ObjectId)>,
    /// Failed lines.
    pub failed: Vec<FailedRow>,
    /// Contacts the batch's deals named and the batch created.
    pub contacts_created: u64,
}

/// The bytes of a failed line's entry without its value and cells: line,
/// code, field and message, with their BSON overhead.
fn fixed_bytes(e: &RowError) -> usize {
    let field = e
        .field
        .as_deref()
        .map_or(0, |s| s.len().min(MAX_MESSAGE_BYTES));
    64 + e.message.len().min(MAX_MESSAGE_BYTES) + field
}

/// The stored entry of a failed line; its value and cells only if they fit
/// in what is left of the document's `budget` for them (bytes, counted
/// down).
fn failure_doc(f: &FailedRow, budget: &mut usize, row_bytes: &mut usize) -> Document {
    let e = &f.error;
    let message = cut_to_bytes(&e.message, MAX_MESSAGE_BYTES);
    let field = e
        .field
        .as_deref()
        .map(|s| cut_to_bytes(s, MAX_MESSAGE_BYTES));
    let mut d = doc! {
        "line": e.line as i64,
        "code": e.code.as_str(),
        "field": field,
        "message": message,
    };
    let value = e.value.as_deref().map_or(0, |v| v.len() + 16);
    if value <= *budget {
        *budget -= value;
        d.insert("value", e.value.as_deref());
    } else {
        d.insert("value", Bson::Null);
        d.insert("value_omitted", true);
    }
    let cells = f.cells.iter().map(|c| c.len() + 16).sum::<usize>();
    let keep_row = cells <= *budget && *row_bytes + cells <= MAX_ROW_BYTES_PER_DOC;
    if keep_row {
        *budget -= cells;
        *row_bytes += cells;
        d.insert(
            "row",
            f.cells
                .iter()
                .map(|c| Bson::String(c.clone()))
                .collect::<Vec<_>>(),
        );
    } else {
        d.insert("row_omitted", true);
    }
    d
}

/// `s` cut at a character boundary to at most `max` bytes.
fn cut_to_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn pairs(lines: &[(LineNo, ObjectId)]) -> Vec<Document> {
    lines
        .iter()
        .map(|(l, id)| doc! { "line": *l as i64, "record_id": id })
        .collect()
}

/// The stored document of one batch's outcomes (pure); `None` for a
/// batch past the largest line number.
pub fn batch_document(queue_id: ObjectId, batch: &BatchOutcome) -> Option<Document> {
    let id = deal_id(&queue_id, batch.first_line)?;
    // Every failure keeps its line, code, field and message; values and
    // cells share what they leave.
    let fixed: usize = batch.failed.iter().map(|f| fixed_bytes(&f.error)).sum();
    let (mut budget, mut row_bytes) = (MAX_FAILURE_BYTES_PER_DOC.saturating_sub(fixed), 0);
    let failed: Vec<Document> = batch
        .failed
        .iter()
        .map(|f| failure_doc(f, &mut budget, &mut row_bytes))
        .collect();
    Some(doc! {
        "_id": id,
        "queue_id": queue_id,
        "first_line": batch.first_line as i64,
        "last_line": batch.last_line as i64,
        "imported": batch.imported.iter().map(|&l| l as i64).collect::<Vec<_>>(),
        "imported_count": batch.imported.len() as i64,
        "updated": pairs(&batch.updated),
        "updated_count": batch.updated.len() as i64,
        "skipped": pairs(&batch.skipped),
        "skipped_count": batch.skipped.len() as i64,
        "failed": failed,
        "failed_count": batch.failed.len() as i64,
        "contacts_created": batch.contacts_created as i64,
        "written_at": DateTime::now(),
    })
}

/// Stores one batch's outcomes (idempotent upsert).
pub async fn record_batch(db: &Database, queue_id: ObjectId, batch: &BatchOutcome) -> Result<()> {
    let Some(document) = batch_document(queue_id, batch) else {
        return Ok(());
    };
    db.collection::<Document>(collections::IMPORT_LINES)
        .replace_one(doc! { "_id": document.get("_id") }, document)
        .with_options(ReplaceOptions::builder().upsert(true).build())
        .await?;
    Ok(())
}

/// The first lines of the batches of `queue_id` recorded at or after
/// `from` (one index range): a resumed run reuses their outcomes instead
/// of writing them again.
pub async fn recorded_first_lines(
    db: &Database,
    queue_id: ObjectId,
    from: LineNo,
) -> Result<std::collections::BTreeSet<LineNo>> {
    let mut cursor = db
        .collection::<Document>(collections::IMPORT_LINES)
        .find(doc! { "queue_id": queue_id, "first_line": { "$gte": from as i64 } })
        .projection(doc! { "_id": 0, "first_line": 1 })
        .await?;
    let mut lines = std::collections::BTreeSet::new();
    while let Some(d) = cursor.try_next().await? {
        if let Some(line) = d
            .get_i64("first_line")
            .ok()
            .and_then(|l| LineNo::try_from(l).ok())
        {
            lines.insert(line);
        }
    }
    Ok(lines)
}

/// The stored outcomes of the batch of `queue_id` starting at
/// `first_line`, without the failed rows' cells.
pub async fn recorded_batch(
    db: &Database,
    queue_id: ObjectId,
    first_line: LineNo,
) -> Result<Option<RecordedBatch>> {
    let Some(id) = deal_id(&queue_id, first_line) else {
        return Ok(None);
    };
    let stored = db
        .collection::<Document>(collections::IMPORT_LINES)
        .find_one(doc! { "_id": id })
        .projection(doc! { "failed.row": 0 })
        .await?;
    Ok(stored.map(|d| RecordedBatch::from_doc(queue_id, &d)))
}

/// A stored batch document read back: what each of its lines came to.
/// The document is stored only once all of its batch's writes are done
/// (and stored again if a row it skipped as a repeat of an earlier row of
/// the file turns out to repeat a row that failed: that row then fails).
#[derive(Clone, Debug, Default)]
pub struct RecordedBatch {
    queue_id: ObjectId,
    /// Last line where a record of the batch starts.
    pub last_line: Option<LineNo>,
    imported: HashSet<LineNo>,
    updated: HashMap<LineNo, ObjectId>,
    skipped: HashMap<LineNo, ObjectId>,
    failed: HashMap<LineNo, RowErrorDoc>,
    /// Contacts the batch's deals named and the batch created.
    pub contacts_created: u64,
}

impl RecordedBatch {
    /// Reads a batch document of import `queue_id` (pure).
    pub fn from_doc(queue_id: ObjectId, d: &Document) -> Self {
        let docs = |key: &str| {
            d.get_array(key)
                .into_iter()
                .flatten()
                .filter_map(Bson::as_document)
        };
        let line_of = |b: &Bson| b.as_i64().and_then(|l| LineNo::try_from(l).ok());
        let pairs = |key: &str| {
            docs(key)
                .filter_map(|p| {
                    let line = line_of(p.get("line")?)?;
                    // `deal_id`: documents of the first releases.
                    let id = p
                        .get_object_id("record_id")
                        .or_else(|_| p.get_object_id("deal_id"))
                        .ok()?;
                    Some((line, id))
                })
                .collect()
        };
        Self {
            queue_id,
            last_line: d.get("last_line").and_then(line_of),
            imported: d
                .get_array("imported")
                .into_iter()
                .flatten()
                .filter_map(line_of)
                .collect(),
            updated: pairs("updated"),
            skipped: pairs("skipped"),
            failed: docs("failed")
                .map(RowErrorDoc::from_doc)
                .map(|f| (f.line, f))
                .collect(),
            contacts_created: d
                .get("contacts_created")
                .and_then(Bson::as_i64)
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or_default(),
        }
    }

    /// What `line` came to; `None` if the batch holds no outcome for it.
    pub fn outcome(&self, line: LineNo) -> Option<LineOutcome> {
        if let Some(f) = self.failed.get(&line) {
            return Some(LineOutcome::Failed(f.clone()));
        }
        if let Some(id) = self.updated.get(&line) {
            return Some(LineOutcome::Updated { id: *id });
        }
        if let Some(id) = self.skipped.get(&line) {
            return Some(LineOutcome::Skipped { id: *id });
        }
        self.imported
            .contains(&line)
            .then(|| deal_id(&self.queue_id, line))
            .flatten()
            .map(|id| LineOutcome::Imported { id })
    }
}

/// Deletes every outcome document of `queue_id` (an import rolled back).
pub async fn delete_batches(db: &Database, queue_id: ObjectId) -> Result<u64> {
    let r = db
        .collection::<Document>(collections::IMPORT_LINES)
        .delete_many(doc! { "queue_id": queue_id })
        .await?;
    Ok(r.deleted_count)
}

/// Totals of an import, from its outcome documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Data rows with an outcome.
    pub rows: u64,
    /// Rows whose record was created.
    pub imported: u64,
    /// Rows that updated an existing record.
    pub updated: u64,
    /// Rows skipped as duplicates.
    pub skipped: u64,
    /// Failed rows.
    pub failed: u64,
    /// Contacts created for the deals' contact emails.
    pub contacts_created: u64,
}

/// Sums the outcome documents of `queue_id`.
pub async fn totals(db: &Database, queue_id: ObjectId) -> Result<Totals> {
    let mut cursor = db
        .collection::<Document>(collections::IMPORT_LINES)
        .aggregate([
            doc! { "$match": { "queue_id": queue_id } },
            doc! { "$group": {
                "_id": Bson::Null,
                "imported": { "$sum": "$imported_count" },
                "updated": { "$sum": "$updated_count" },
                "skipped": { "$sum": "$skipped_count" },
                "failed": { "$sum": "$failed_count" },
                "contacts_created": { "$sum": "$contacts_created" },
            } },
        ])
        .await?;
    let Some(d) = cursor.try_next().await? else {
        return Ok(Totals::default());
    };
    let n = |k: &str| match d.get(k) {
        Some(Bson::Int64(v)) => *v as u64,
        Some(Bson::Int32(v)) => *v as u64,
        Some(Bson::Double(v)) => *v as u64,
        _ => 0,
    };
    let t = Totals {
        imported: n("imported"),
        updated: n("updated"),
        skipped: n("skipped"),
        failed: n("failed"),
        contacts_created: n("contacts_created"),
        rows: 0,
    };
    Ok(Totals {
        rows: t.imported + t.updated + t.skipped + t.failed,
        ..t
    })
}

/// The first `limit` failed lines of `queue_id`, in line order.
pub async fn failures(db: &Database, queue_id: ObjectId, limit: usize) -> Result<Vec<RowErrorDoc>> {
    let mut cursor = db
        .collection::<Document>(collections::IMPORT_LINES)
        .find(doc! { "queue_id": queue_id, "failed_count": { "$gt": 0_i64 } })
        .sort(doc! { "queue_id": 1, "first_line": 1 })
        .projection(doc! { "failed.row": 0 })
        .await?;
    // Batches are in line order and lines within a batch too: stop reading
    // as soon as `limit` are in hand (memory stays bounded by one batch).
    let mut out = Vec::new();
    while out.len() < limit
        && let Some(d) = cursor.try_next().await?
    {
        if let Ok(failed) = d.get_array("failed") {
            out.extend(
                failed
                    .iter()
                    .filter_map(Bson::as_document)
                    .map(RowErrorDoc::from_doc),
            );
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// A stored failed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowErrorDoc {
    /// Physical line.
    pub line: LineNo,
    /// Row code.
    pub code: String,
    /// Field concerned.
    pub field: Option<String>,
    /// Offending value (truncated).
    pub value: Option<String>,
    /// Explanation.
    pub message: String,
}

impl RowErrorDoc {
    /// The failed row again, with `cells` for the error report (a code
    /// this release does not know reads as `write_rejected`).
    pub fn to_failed_row(&self, cells: Vec<String>) -> FailedRow {
        FailedRow {
            error: RowError {
                line: self.line,
                code: RowCode::parse(&self.code).unwrap_or(RowCode::WriteRejected),
                field: self.field.clone(),
                value: self.value.clone(),
                message: self.message.clone(),
            },
            cells,
        }
    }

    /// A failed line as stored in `import_lines.failed`.
    pub fn from_doc(d: &Document) -> Self {
        Self {
            line: d.get_i64("line").map_or(0, |l| l as u64),
            code: d.get_str("code").unwrap_or_default().to_owned(),
            field: d.get_str("field").ok().map(str::to_owned),
            value: d.get_str("value").ok().map(str::to_owned),
            message: d.get_str("message").unwrap_or_default().to_owned(),
        }
    }

    /// Entry of `csv_imports.logs`.
    pub fn to_log(&self) -> Document {
        doc! {
            "line": self.line as i64,
            "field": self.field.as_deref(),
            "message": &self.message,
            "value": self.value.as_deref(),
            "code": &self.code,
        }
    }
}

impl From<&RowError> for RowErrorDoc {
    fn from(e: &RowError) -> Self {
        Self {
            line: e.line,
            code: e.code.as_str().to_owned(),
            field: e.field.clone(),
            value: e.value.clone(),
            message: e.message.clone(),
        }
    }
}

/// One line's outcome, as support sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineOutcome {
    /// The record exists, with this id.
    Imported {
        /// The record's `_id`.
        id: ObjectId,
    },
    /// The line updated this existing record.
    Updated {
        /// The record's `_id`.
        id: ObjectId,
    },
    /// The line duplicated this existing record and was left out.
    Skipped {
        /// The record's `_id`.
        id: ObjectId,
    },
    /// The line failed.
    Failed(RowErrorDoc),
}

/// What happened to `line` of import `queue_id`: one indexed query.
/// `None` when no record starts on that line or it was not processed yet.
pub async fn line_outcome(
    db: &Database,
    queue_id: ObjectId,
    line: LineNo,
) -> Result<Option<LineOutcome>> {
    let Some(d) = db
        .collection::<Document>(collections::IMPORT_LINES)
        // The batch starting last at or before `line` (one index step;
        // testing `last_line` in the query would scan every earlier batch
        // of the import for a line past the end).
        .find_one(doc! { "queue_id": queue_id, "first_line": { "$lte": line as i64 } })
        .sort(doc! { "queue_id": 1, "first_line": -1 })
        .projection(doc! { "failed.row": 0 })
        .await?
    else {
        return Ok(None);
    };
    if d.get_i64("last_line").is_ok_and(|last| last < line as i64) {
        return Ok(None);
    }
    Ok(RecordedBatch::from_doc(queue_id, &d).outcome(line))
}

/// Creates the import's summary document if it does not exist yet.
pub async fn open_summary(db: &Database, spec: &ImportSpec) -> Result<ObjectId> {
    let coll = db.collection::<Document>(collections::CSV_IMPORTS);
    let d = coll
        .find_one_and_update(
            doc! { "queue_id": spec.queue_id },
            doc! {
                "$setOnInsert": {
                    "queue_id": spec.queue_id,
                    "account_id": spec.account_id,
                    "user_id": spec.user_id,
                    "source": spec.kind.as_str(),
                    "dry_run": spec.dry_run,
                    "file_name": &spec.file_name,
                    "started_at": DateTime::now(),
                    "logs": [],
                },
                "$set": { "status": "processing" },
            },
        )
        .upsert(true)
        .return_document(mongodb::options::ReturnDocument::After)
        .projection(doc! { "_id": 1 })
        .await?;
    Ok(d.and_then(|d| d.get_object_id("_id").ok())
        .unwrap_or_default())
}

/// Writes the final totals and the first failures into the summary.
pub async fn close_summary(
    db: &Database,
    queue_id: ObjectId,
    status: &str,
    totals: Totals,
    logs: &[RowErrorDoc],
) -> Result<()> {
    db.collection::<Document>(collections::CSV_IMPORTS)
        .update_one(
            doc! { "queue_id": queue_id },
            doc! { "$set": {
                "status": status,
                "total_rows": totals.rows as i64,
                "total_records_added": totals.imported as i64,
                "total_updated": totals.updated as i64,
                "total_skipped": totals.skipped as i64,
                "total_errors": totals.failed as i64,
                "total_contacts_created": totals.contacts_created as i64,
                "logs": logs.iter().map(RowErrorDoc::to_log).collect::<Vec<_>>(),
                "finished_at": DateTime::now(),
            } },
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(line: LineNo, cells: usize) -> FailedRow {
        FailedRow {
            error: RowError {
                line,
                code: RowCode::WriteRejected,
                field: None,
                value: None,
                message: format!("line {line} refused"),
            },
            cells: vec!["x".repeat(1024); cells],
        }
    }

    proptest::proptest! {
        /// Every line of a stored batch reads back as what it came to,
        /// and no other line reads as anything.
        #[test]
        fn a_stored_batch_reads_back_line_by_line(
            kinds in proptest::collection::vec(0u8..5, 1..200),
            first in 2u64..1_000_000,
        ) {
            let q = ObjectId::new();
            let mut batch = BatchOutcome { first_line: first, ..BatchOutcome::default() };
            let other = ObjectId::new();
            for (i, kind) in kinds.iter().enumerate() {
                let line = first + 2 * i as u64;
                match kind {
                    0 => batch.imported.push(line),
                    1 => batch.updated.push((line, other)),
                    2 => batch.skipped.push((line, other)),
                    3 => batch.failed.push(failed(line, 1)),
                    _ => {}
                }
                batch.last_line = line;
            }
            batch.contacts_created = kinds.len() as u64;
            let read = RecordedBatch::from_doc(q, &batch_document(q, &batch).unwrap());
            proptest::prop_assert_eq!(read.contacts_created, kinds.len() as u64);
            for (i, kind) in kinds.iter().enumerate() {
                let line = first + 2 * i as u64;
                let expected = match kind {
                    0 => Some(LineOutcome::Imported { id: deal_id(&q, line).unwrap() }),
                    1 => Some(LineOutcome::Updated { id: other }),
                    2 => Some(LineOutcome::Skipped { id: other }),
                    3 => Some(LineOutcome::Failed(RowErrorDoc::from(&failed(line, 0).error))),
                    _ => None,
                };
                proptest::prop_assert_eq!(read.outcome(line), expected);
                proptest::prop_assert_eq!(read.outcome(line + 1), None);
            }
        }
    }

    /// The largest batch, every line failed with the longest value (200
    /// emoji), a long message and its cells: the document stays far below
    /// 16 MB; the last failures keep their message without value or cells.
    #[test]
    fn ten_thousand_long_failures_stay_far_below_16_mb() {
        let q = ObjectId::new();
        let value = crate::domain::truncate_value(&"😀".repeat(1000));
        let failed: Vec<FailedRow> = (2..10_002)
            .map(|line| FailedRow {
                error: RowError {
                    line,
                    code: RowCode::InvalidNumber,
                    field: Some("value".into()),
                    value: Some(value.clone()),
                    message: "é".repeat(2000),
                },
                cells: vec!["ü".repeat(200); 3],
            })
            .collect();
        let batch = BatchOutcome {
            first_line: 2,
            last_line: 10_001,
            failed,
            ..BatchOutcome::default()
        };
        let d = batch_document(q, &batch).unwrap();
        let size = bson::to_vec(&d).unwrap().len();
        assert!(size < 13 * 1024 * 1024, "{size} bytes");
        let failed = d.get_array("failed").unwrap();
        assert_eq!(failed.len(), 10_000);
        let first = failed[0].as_document().unwrap();
        assert_eq!(first.get_str("value").unwrap(), value);
        assert!(first.contains_key("row"));
        assert_eq!(first.get_str("message").unwrap().len(), MAX_MESSAGE_BYTES);
        let last = failed[9_999].as_document().unwrap();
        assert_eq!(last.get_bool("value_omitted"), Ok(true));
        assert_eq!(last.get_bool("row_omitted"), Ok(true));
        assert_eq!(last.get_i64("line"), Ok(10_001));
        // It reads back as failed, with its message.
        let read = RecordedBatch::from_doc(q, &d);
        assert!(matches!(read.outcome(10_001), Some(LineOutcome::Failed(_))));
    }

    #[test]
    fn cells_of_failed_rows_stop_at_the_per_document_cap() {
        let q = ObjectId::new();
        let batch = BatchOutcome {
            first_line: 2,
            last_line: 10,
            failed: (2..10).map(|l| failed(l, 1024)).collect(),
            ..BatchOutcome::default()
        };
        let d = batch_document(q, &batch).unwrap();
        let rows: Vec<bool> = d
            .get_array("failed")
            .unwrap()
            .iter()
            .map(|f| f.as_document().unwrap().contains_key("row"))
            .collect();
        // Just over 1 MiB of cells each: three fit under 4 MiB, the rest are
        // left out.
        assert_eq!(rows, [true, true, true, false, false, false, false, false]);
        assert!(bson::to_vec(&d).unwrap().len() < 4 * 1024 * 1024);
    }
}
