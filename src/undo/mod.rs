//! Undo of a finished import: the records it created are removed, as if
//! the file had never been imported, and what cannot be taken back is
//! counted and said.
//!
//! Requested by `undo_requested: true` on a final import (the dashboard, or
//! `importd undo ID`, which also cancels a running import first); run under
//! the undo lease of `claim::UndoLease` by a daemon or by the CLI itself.
//!
//! What it does:
//! - Records the import created (deals of a deals import, contacts of a
//!   contacts import) are found by the `_id` ranges their lines give
//!   (`domain::ids`), batch by batch of the per-line outcomes, and deleted
//!   with one `delete_many` per range, checked against `import.queue_id`.
//! - A created record changed since the import ended (its `updated_at`
//!   later than `completed_at` plus [`CLOCK_SLACK`]: edited in the CRM, or
//!   updated by a later import) is kept and counted: someone's work is in
//!   it.
//! - Stages the import created are removed when no deal uses them any more
//!   (a deal added since may have); the others are kept and named.
//! - Not taken back, and counted: updates of existing records
//!   (`duplicate_strategy: update`; their earlier values are not stored),
//!   and contacts a deals import created for its `contact_email` links
//!   (other records may link them since).
//! - Resumable and exact after a crash: each batch's deletes are
//!   idempotent, and the checkpoint (`undo.next_line`) is saved with the
//!   counts it covers in one update, so a later holder redoes at most the
//!   batches after the last save and recounts them identically.
//!
//! The import's `status` and its per-line outcomes stay as they were (what
//! the import did is history); the undo is recorded under `undo` on the
//! queue document and the `csv_imports` summary.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::claim::{self, UndoLease};
use crate::domain::{LineNo, RecordKind, collections, contact_fallback_id, deal_id, deal_id_range};
use crate::telemetry::error_chain;

/// Allowance for the clocks of the daemons that wrote an import: a record
/// counts as changed since the import only when its `updated_at` is later
/// than the import's `completed_at` by more than this.
pub const CLOCK_SLACK: Duration = Duration::from_secs(60);

/// How often a running undo saves its checkpoint (which renews its lease).
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Errors of an undo (it is then resumed by a later claim).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed past the retries.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// The undo lease was lost, or renewing it failed.
    #[error(transparent)]
    Claim(#[from] claim::Error),
}

/// What an undo did, stored under `undo` and printed by `importd undo`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UndoCounts {
    /// Records the import created that are gone now.
    pub removed: u64,
    /// Records the import created, kept because they changed since.
    pub kept_changed: u64,
    /// Existing records the import updated: not taken back.
    pub updates_not_reverted: u64,
    /// Contacts a deals import created for its links: kept.
    pub contacts_kept: u64,
    /// Labels of the stages it created and removed.
    pub stages_removed: Vec<String>,
    /// Labels of the stages it created that deals still use.
    pub stages_kept: Vec<String>,
}

impl UndoCounts {
    /// As stored under `undo`.
    pub fn to_doc(&self) -> Document {
        doc! {
            "removed": self.removed as i64,
            "kept_changed": self.kept_changed as i64,
            "updates_not_reverted": self.updates_not_reverted as i64,
            "contacts_kept": self.contacts_kept as i64,
            "stages_removed": &self.stages_removed,
            "stages_kept": &self.stages_kept,
        }
    }

    /// As stored under `undo` (absent fields count 0).
    pub fn from_doc(d: &Document) -> Self {
        let labels = |k: &str| -> Vec<String> {
            d.get_array(k)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            removed: count(d, "removed"),
            kept_changed: count(d, "kept_changed"),
            updates_not_reverted: count(d, "updates_not_reverted"),
            contacts_kept: count(d, "contacts_kept"),
            stages_removed: labels("stages_removed"),
            stages_kept: labels("stages_kept"),
        }
    }

    /// One line per count, for support.
    pub fn describe(&self, kind: RecordKind) -> String {
        let noun = kind.noun();
        let mut out = format!("removed: {} {noun}s the import created\n", self.removed);
        if self.kept_changed > 0 {
            out += &format!(
                "kept: {} {noun}s it created that changed since\n",
                self.kept_changed
            );
        }
        if self.updates_not_reverted > 0 {
            out += &format!(
                "not reverted: {} updates of existing {noun}s\n",
                self.updates_not_reverted
            );
        }
        if self.contacts_kept > 0 {
            out += &format!(
                "kept: {} contacts it created for links\n",
                self.contacts_kept
            );
        }
        if !self.stages_removed.is_empty() {
            out += &format!("stages removed: {}\n", self.stages_removed.join(", "));
        }
        if !self.stages_kept.is_empty() {
            out += &format!("stages kept (in use): {}\n", self.stages_kept.join(", "));
        }
        out
    }
}

fn count(d: &Document, key: &str) -> u64 {
    match d.get(key) {
        Some(Bson::Int64(n)) => (*n).max(0) as u64,
        Some(Bson::Int32(n)) => (*n).max(0) as u64,
        _ => 0,
    }
}

/// How an undo run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UndoEnd {
    /// Finished: `undo.state` is `done`.
    Done(UndoCounts),
    /// Nothing to undo (a dry run, an unknown source): `undo.state` is
    /// `refused`, with the reason.
    Refused(String),
    /// Stopped by shutdown; resumed by a later claim.
    Released,
}

/// The `_id` ranges holding the records lines `first..=last` of import
/// `queue_id` can have created: a deal or contact takes the line's id, a
/// contact whose id was taken the fallback id (`domain::ids`). Pure.
pub fn id_ranges(
    kind: RecordKind,
    queue_id: &ObjectId,
    first: LineNo,
    last: LineNo,
) -> Vec<(ObjectId, ObjectId)> {
    let (_, top) = deal_id_range(queue_id);
    let id = |line| deal_id(queue_id, line).unwrap_or(top);
    let mut ranges = vec![(id(first), id(last))];
    if kind == RecordKind::Contacts
        && let (Some(lo), Some(hi)) = (
            contact_fallback_id(queue_id, first),
            contact_fallback_id(queue_id, last),
        )
    {
        ranges.push((lo, hi));
    }
    ranges
}

/// The latest `updated_at` a record may have and still be removed. Pure.
pub fn cutoff(queue_doc: &Document, now: DateTime) -> DateTime {
    let ended = queue_doc
        .get_datetime("completed_at")
        .copied()
        .unwrap_or(now);
    DateTime::from_millis(ended.timestamp_millis() + CLOCK_SLACK.as_millis() as i64)
}

fn retry() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(6)
        .with_jitter()
}

/// Runs (or resumes) the undo `lease` holds until it is done, refused, or
/// `stop` asks for a release.
pub async fn run(
    db: &Database,
    lease: &UndoLease,
    stop: &CancellationToken,
) -> Result<UndoEnd, Error> {
    let q = &lease.doc;
    let queue_id = lease.queue_id;
    let dry_run = q
        .get_document("additional_data")
        .ok()
        .and_then(|a| a.get_bool("dry_run").ok())
        == Some(true);
    let kind = q.get_str("source").ok().and_then(RecordKind::from_source);
    let (kind, account_id) = match (kind, q.get_object_id("account_id")) {
        _ if dry_run => {
            return refuse(
                lease,
                "a dry run writes nothing, so there is nothing to undo",
            )
            .await;
        }
        (Some(kind), Ok(account)) => (kind, account),
        _ => return refuse(lease, "not an import importd wrote").await,
    };
    let undo = q.get_document("undo").cloned().unwrap_or_default();
    let mut next_line = count(&undo, "next_line");
    let mut imported = count(&undo, "imported");
    let mut kept = count(&undo, "kept_changed");
    let cutoff = cutoff(q, DateTime::now());
    let records = db.collection::<Document>(match kind {
        RecordKind::Deals => collections::DEALS,
        RecordKind::Contacts => collections::CONTACTS,
    });
    info!(resume_line = next_line, "Undo started");

    let mut batches = db
        .collection::<Document>(collections::IMPORT_LINES)
        .find(doc! { "queue_id": queue_id, "first_line": { "$gte": next_line as i64 } })
        .sort(doc! { "queue_id": 1, "first_line": 1 })
        .projection(doc! { "first_line": 1, "last_line": 1, "imported_count": 1 })
        .batch_size(1_000)
        .await?;
    let mut last_save = Instant::now();
    let mut unsaved = false;
    while let Some(b) = batches.try_next().await? {
        let (first, last) = (count(&b, "first_line"), count(&b, "last_line"));
        for (lo, hi) in id_ranges(kind, &queue_id, first, last) {
            let range = doc! { "$gte": lo, "$lte": hi };
            let remove = doc! {
                "_id": range.clone(),
                "import.queue_id": queue_id,
                "updated_at": { "$lte": cutoff },
            };
            (|| records.delete_many(remove.clone()).into_future())
                .retry(retry())
                .when(crate::db::is_transient)
                .await?;
            // What is left of the import's records here changed since.
            let left = doc! { "_id": range, "import.queue_id": queue_id };
            kept += (|| records.count_documents(left.clone()).into_future())
                .retry(retry())
                .when(crate::db::is_transient)
                .await?;
        }
        imported += count(&b, "imported_count");
        next_line = last + 1;
        unsaved = true;
        if last_save.elapsed() >= SAVE_EVERY || stop.is_cancelled() {
            save(lease, next_line, imported, kept).await?;
            last_save = Instant::now();
            unsaved = false;
        }
        if stop.is_cancelled() {
            lease.release().await?;
            info!(next_line, "Undo released at shutdown");
            return Ok(UndoEnd::Released);
        }
    }
    if unsaved {
        save(lease, next_line, imported, kept).await?;
    }

    let mut counts = UndoCounts::from_doc(&undo);
    counts.kept_changed = kept;
    counts.removed = imported.saturating_sub(kept);
    let progress = q.get_document("progress").cloned().unwrap_or_default();
    counts.updates_not_reverted = count(&progress, "updated_rows");
    if kind == RecordKind::Deals {
        counts.contacts_kept = count(q, "contacts_created");
        if let Ok(pipeline_id) = q
            .get_document("additional_data")
            .and_then(|a| a.get_object_id("pipeline_id"))
        {
            remove_stages(db, lease, account_id, pipeline_id, &mut counts).await?;
        }
    }
    let result = counts.to_doc();
    lease.finish("done", result.clone()).await?;
    let mut summary = result;
    summary.insert("finished_at", DateTime::now());
    if let Err(e) = db
        .collection::<Document>(collections::CSV_IMPORTS)
        .update_one(
            doc! { "queue_id": queue_id },
            doc! { "$set": { "undo": summary } },
        )
        .await
    {
        // The queue document has the result; the summary copy is for support.
        warn!(error = %error_chain(&e), "Recording the undo on the summary failed");
    }
    info!(
        removed = counts.removed,
        kept_changed = counts.kept_changed,
        stages_removed = counts.stages_removed.len(),
        "Undo done"
    );
    Ok(UndoEnd::Done(counts))
}

async fn save(lease: &UndoLease, next_line: u64, imported: u64, kept: u64) -> Result<(), Error> {
    lease
        .save(doc! {
            "next_line": next_line as i64,
            "imported": imported as i64,
            "kept_changed": kept as i64,
        })
        .await?;
    Ok(())
}

async fn refuse(lease: &UndoLease, reason: &str) -> Result<UndoEnd, Error> {
    lease.finish("refused", doc! { "reason": reason }).await?;
    info!(reason, "Undo refused");
    Ok(UndoEnd::Refused(reason.to_owned()))
}

/// Removes the stages the import created that no deal uses any more; the
/// rest are kept. Each decision is saved as it is made, so a resumed undo
/// still names a stage an earlier holder removed.
async fn remove_stages(
    db: &Database,
    lease: &UndoLease,
    account_id: ObjectId,
    pipeline_id: ObjectId,
    counts: &mut UndoCounts,
) -> Result<(), Error> {
    let queue_id = lease.queue_id;
    let stages = db.collection::<Document>(collections::PIPELINE_STAGES);
    let deals = db.collection::<Document>(collections::DEALS);
    let created: Vec<Document> = stages
        .find(doc! { "account_id": account_id, "pipeline_id": pipeline_id, "import.queue_id": queue_id })
        .projection(doc! { "label": 1, "name": 1 })
        .await?
        .try_collect()
        .await?;
    for s in created {
        let Ok(id) = s.get_object_id("_id") else {
            continue;
        };
        let label = s
            .get_str("label")
            .or_else(|_| s.get_str("name"))
            .unwrap_or_default()
            .to_owned();
        // A rare operation over a few stages: a lookup per stage, with
        // whatever index the CRM keeps on deals.
        let used = deals
            .find_one(doc! { "account_id": account_id, "pipeline_id": pipeline_id, "stage_id": id })
            .projection(doc! { "_id": 1 })
            .await?
            .is_some();
        if used {
            if !counts.stages_kept.contains(&label) {
                counts.stages_kept.push(label);
            }
        } else {
            stages
                .delete_one(doc! { "_id": id, "import.queue_id": queue_id })
                .await?;
            if !counts.stages_removed.contains(&label) {
                counts.stages_removed.push(label);
            }
        }
        lease
            .save(doc! {
                "stages_removed": &counts.stages_removed,
                "stages_kept": &counts.stages_kept,
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::line_of_deal_id;

    #[test]
    fn ranges_cover_exactly_the_lines_of_the_import() {
        let q = ObjectId::new();
        let [(lo, hi)] = id_ranges(RecordKind::Deals, &q, 2, 1001)[..] else {
            panic!("one range for deals");
        };
        assert_eq!(line_of_deal_id(&q, &lo), Some(2));
        assert_eq!(line_of_deal_id(&q, &hi), Some(1001));
        let inside = deal_id(&q, 500).unwrap();
        assert!(lo <= inside && inside <= hi);
        for outside in [
            deal_id(&q, 1),
            deal_id(&q, 1002),
            deal_id(&ObjectId::new(), 500),
        ] {
            let o = outside.unwrap();
            assert!(o < lo || o > hi, "{o}");
        }
    }

    #[test]
    fn contacts_also_cover_their_fallback_ids() {
        let q = ObjectId::new();
        let ranges = id_ranges(RecordKind::Contacts, &q, 2, 10);
        assert_eq!(ranges.len(), 2);
        let fallback = contact_fallback_id(&q, 7).unwrap();
        assert!(ranges[1].0 <= fallback && fallback <= ranges[1].1);
        assert!(!(ranges[0].0 <= fallback && fallback <= ranges[0].1));
    }

    #[test]
    fn the_cutoff_is_the_end_of_the_import_plus_the_slack() {
        let ended = DateTime::from_millis(1_700_000_000_000);
        let now = DateTime::from_millis(1_800_000_000_000);
        let q = doc! { "completed_at": ended };
        assert_eq!(cutoff(&q, now).timestamp_millis(), 1_700_000_060_000);
        assert_eq!(cutoff(&doc! {}, now).timestamp_millis(), 1_800_000_060_000);
    }

    #[test]
    fn counts_round_trip_and_read_well() {
        let c = UndoCounts {
            removed: 98,
            kept_changed: 2,
            updates_not_reverted: 5,
            contacts_kept: 0,
            stages_removed: vec!["Brand New".into()],
            stages_kept: vec!["Won".into()],
        };
        assert_eq!(UndoCounts::from_doc(&c.to_doc()), c);
        let text = c.describe(RecordKind::Deals);
        assert!(text.contains("removed: 98 deals"), "{text}");
        assert!(
            text.contains("kept: 2 deals it created that changed since"),
            "{text}"
        );
        assert!(text.contains("not reverted: 5 updates"), "{text}");
        assert!(text.contains("stages kept (in use): Won"), "{text}");
        assert!(!text.contains("contacts"), "{text}");
    }
}
