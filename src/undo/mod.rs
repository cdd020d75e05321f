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
//! - A created record changed since the import wrote it is kept and
//!   counted: someone's work is in it. Changed: updated by another import
//!   (`last_import`, `last_imports`), or its `updated_at` is later than
//!   the import's `completed_at` plus [`CLOCK_SLACK`], or differs from its
//!   `created_at` (edited in the CRM while the import still ran) unless
//!   the last to write it was the import itself (a later line of the file
//!   updated it). So is a contact of a contacts import that deals link (a
//!   later deals import may have linked it).
//! - Stages the import created are removed when no deal uses them any more
//!   (a deal added since may have) and no import into the pipeline is
//!   running (it may have just resolved one); the others are kept and
//!   named. Checked again once removed: a stage an import resolved in
//!   between is put back as it was.
//! - Updates of existing records (`duplicate_strategy: update`) are put
//!   back from the before images the import stored (`write::befores`),
//!   newest line first (`revert_updates`), unless the record changed
//!   since; those are counted as not reverted.
//! - Not taken back, and counted: updates made before importd stored
//!   before images, and contacts a deals import created for its
//!   `contact_email` links (other records may link them since).
//! - Resumable and exact after a crash: each batch's deletes are
//!   idempotent, and the checkpoint (`undo.next_line`) is saved with the
//!   counts it covers in one update, so a later holder redoes at most the
//!   batches after the last save and recounts them identically.
//!
//! The import's `status` and its per-line outcomes stay as they were (what
//! the import did is history); the undo is recorded under `undo` on the
//! queue document and the `csv_imports` summary.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, RawArrayBuf, RawDocumentBuf, doc};
use futures::TryStreamExt;
use mongodb::Database;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::claim::{self, UndoLease};
use crate::domain::{
    JobState, LineNo, RecordKind, collections, deal_id, deal_id_range, line_of_deal_id,
};
use crate::telemetry::error_chain;
use crate::write::befores;

/// Allowance for the clocks of the daemons that wrote an import: a record
/// counts as changed since the import only when its `updated_at` is later
/// than the import's `completed_at` by more than this.
pub const CLOCK_SLACK: Duration = Duration::from_secs(60);

/// Attempts of one undo ended by an error past the retries before it gives
/// up, with the last error as the reason (releases at shutdown, or by a
/// holder that died, do not count).
pub const MAX_ATTEMPTS: i64 = 10;

/// How often a running undo saves its checkpoint (which renews its lease).
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Before images put back between two saves of the checkpoint, at most: a
/// resumed undo checks that many after the checkpoint for ones already
/// put back.
const REVERT_WINDOW: usize = 100;

/// Errors of an undo (it is then resumed by a later claim).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed past the retries.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// The undo lease was lost, or renewing it failed.
    #[error(transparent)]
    Claim(#[from] claim::Error),
    /// A bulk write failed past the retries.
    #[error(transparent)]
    Write(#[from] crate::write::Error),
}

/// What an undo did, stored under `undo` and printed by `importd undo`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UndoCounts {
    /// Records the import created that are gone now.
    pub removed: u64,
    /// Records the import created, kept because they changed since.
    pub kept_changed: u64,
    /// Contacts a contacts import created, kept because deals link them.
    pub kept_linked: u64,
    /// Updates of existing records put back as the import found them.
    pub updates_reverted: u64,
    /// Updates of existing records not taken back: changed since, or made
    /// before importd kept what updates overwrite.
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
            "kept_linked": self.kept_linked as i64,
            "updates_reverted": self.updates_reverted as i64,
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
            kept_linked: count(d, "kept_linked"),
            updates_reverted: count(d, "updates_reverted"),
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
        if self.kept_linked > 0 {
            out += &format!(
                "kept: {} contacts it created that deals link\n",
                self.kept_linked
            );
        }
        if self.updates_reverted > 0 {
            out += &format!(
                "reverted: {} updates of existing {noun}s\n",
                self.updates_reverted
            );
        }
        if self.updates_not_reverted > 0 {
            out += &format!(
                "not reverted: {} updates of existing {noun}s (changed since)\n",
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

/// The `_id` range holding the records lines `first..=last` of import
/// `queue_id` created: a deal, or a contact of a contacts import, takes its
/// line's id (`domain::ids`). Pure.
pub fn id_range(queue_id: &ObjectId, first: LineNo, last: LineNo) -> (ObjectId, ObjectId) {
    let (_, top) = deal_id_range(queue_id);
    let id = |line| deal_id(queue_id, line).unwrap_or(top);
    (id(first), id(last))
}

/// The latest `updated_at` a record may have and still be removed: the
/// import's end plus [`CLOCK_SLACK`]; none when the end is not recorded.
/// Pure.
pub fn cutoff(queue_doc: &Document) -> Option<DateTime> {
    let ended = queue_doc.get_datetime("completed_at").ok()?;
    Some(DateTime::from_millis(
        ended.timestamp_millis() + CLOCK_SLACK.as_millis() as i64,
    ))
}

fn retry() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(6)
        .with_jitter()
}

/// Where an undo is and what the batches before it counted, saved in one
/// update so that a resumed undo counts each batch once.
#[derive(Debug, Default)]
struct Tally {
    next_line: u64,
    imported: u64,
    kept_changed: u64,
    kept_linked: u64,
    not_reverted: u64,
    /// Updates put back (of existing records, from their before images).
    reverted: u64,
    /// The before images of lines from here on are done (newest first).
    revert_below: Option<u64>,
}

impl Tally {
    fn from_doc(undo: &Document) -> Self {
        Self {
            next_line: count(undo, "next_line"),
            imported: count(undo, "imported"),
            kept_changed: count(undo, "kept_changed"),
            kept_linked: count(undo, "kept_linked"),
            not_reverted: count(undo, "updates_not_reverted"),
            reverted: count(undo, "updates_reverted"),
            // A number once the phase began (null before).
            revert_below: match undo.get("revert_below_line") {
                Some(Bson::Int64(n)) => Some((*n).max(0) as u64),
                Some(Bson::Int32(n)) => Some((*n).max(0) as u64),
                _ => None,
            },
        }
    }

    fn to_doc(&self) -> Document {
        doc! {
            "next_line": self.next_line as i64,
            "imported": self.imported as i64,
            "kept_changed": self.kept_changed as i64,
            "kept_linked": self.kept_linked as i64,
            "updates_not_reverted": self.not_reverted as i64,
            "updates_reverted": self.reverted as i64,
            "revert_below_line": self.revert_below.map(|l| l as i64),
        }
    }
}

/// Updates of records that existed before the import, listed in a batch
/// document: those cannot be taken back (an update of the import's own
/// record is gone with it). Pure.
fn foreign_updates(batch: &Document, queue_id: &ObjectId) -> u64 {
    batch
        .get_array("updated")
        .map(|u| {
            u.iter()
                .filter_map(Bson::as_document)
                .filter_map(|d| d.get_object_id("record_id").ok())
                .filter(|id| line_of_deal_id(queue_id, id).is_none())
                .count() as u64
        })
        .unwrap_or(0)
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
        _ if q
            .get_document("retention")
            .and_then(|r| r.get_str("state"))
            .is_ok_and(|s| s != crate::claim::retention::KEPT) =>
        {
            return refuse(
                lease,
                "its per-line records were purged after the retention period (retention.days), so \
                 what it changed can no longer be put back",
            )
            .await;
        }
        (Some(kind), Ok(account)) => (kind, account),
        _ => return refuse(lease, "not an import importd wrote").await,
    };
    let Some(cutoff) = cutoff(q) else {
        return refuse(
            lease,
            "the import's end (completed_at) is not recorded, so what changed since cannot be told",
        )
        .await;
    };
    let undo = q.get_document("undo").cloned().unwrap_or_default();
    if count(&undo, "error_releases") as i64 >= MAX_ATTEMPTS {
        // What it removed so far stays removed.
        let last = undo
            .get_document("last_error")
            .and_then(|e| e.get_str("message"))
            .unwrap_or("not recorded");
        let reason = format!(
            "it did not finish in {MAX_ATTEMPTS} attempts (last: {last}); what it removed so far \
             stays removed; please contact support"
        );
        return refuse(lease, &reason).await;
    }
    let mut tally = Tally::from_doc(&undo);
    let records = db.collection::<Document>(match kind {
        RecordKind::Deals => collections::DEALS,
        RecordKind::Contacts => collections::CONTACTS,
    });
    let deals = db.collection::<Document>(collections::DEALS);
    info!(resume_line = tally.next_line, "Undo started");

    let mut batches = db
        .collection::<Document>(collections::IMPORT_LINES)
        .find(doc! { "queue_id": queue_id, "first_line": { "$gte": tally.next_line as i64 } })
        .sort(doc! { "queue_id": 1, "first_line": 1 })
        .projection(doc! {
            "first_line": 1, "last_line": 1, "imported_count": 1, "updated.record_id": 1,
        })
        .batch_size(1_000)
        .await?;
    let mut last_save = Instant::now();
    let mut unsaved = false;
    while let Some(b) = batches.try_next().await? {
        let (first, last) = (count(&b, "first_line"), count(&b, "last_line"));
        let (lo, hi) = id_range(&queue_id, first, last);
        // Contacts deals link stay: removing them would leave those links
        // dangling. (On MongoDB this wants the CRM's index on
        // `deals.contact_id`; an undo is rare, imports are not, so importd
        // adds no index to `deals`.)
        let linked: Vec<ObjectId> = match kind {
            RecordKind::Deals => Vec::new(),
            RecordKind::Contacts => {
                let filter = doc! {
                    "account_id": account_id,
                    "contact_id": { "$gte": lo, "$lte": hi },
                };
                // One id per linked contact, however many deals link it.
                let found = (|| deals.distinct("contact_id", filter.clone()).into_future())
                    .retry(retry())
                    .when(crate::db::is_transient)
                    .await?;
                found.iter().filter_map(Bson::as_object_id).collect()
            }
        };
        let remove = doc! {
            "_id": { "$gte": lo, "$lte": hi, "$nin": &linked },
            "import.queue_id": queue_id,
            // Not changed since the import ended, nor updated by another
            // import (`last_import` absent, or this import's own); nor
            // edited since its insert (`remove_untouched`).
            "updated_at": { "$lte": cutoff },
            "last_import.queue_id": { "$in": [Bson::Null, Bson::ObjectId(queue_id)] },
        };
        (|| remove_untouched(&records, &remove, &queue_id))
            .retry(retry())
            .when(crate::db::is_transient)
            .await?;
        // What is left of the import's records here is kept.
        let left = doc! { "_id": { "$gte": lo, "$lte": hi }, "import.queue_id": queue_id };
        let left = (|| records.count_documents(left.clone()).into_future())
            .retry(retry())
            .when(crate::db::is_transient)
            .await?;
        let linked_left = (linked.len() as u64).min(left);
        tally.kept_linked += linked_left;
        tally.kept_changed += left - linked_left;
        tally.imported += count(&b, "imported_count");
        tally.not_reverted += foreign_updates(&b, &queue_id);
        tally.next_line = last + 1;
        unsaved = true;
        if last_save.elapsed() >= SAVE_EVERY || stop.is_cancelled() {
            lease.save(tally.to_doc()).await?;
            last_save = Instant::now();
            unsaved = false;
        }
        if stop.is_cancelled() {
            lease.release().await?;
            info!(next_line = tally.next_line, "Undo released at shutdown");
            return Ok(UndoEnd::Released);
        }
    }
    if unsaved {
        lease.save(tally.to_doc()).await?;
    }
    if revert_updates(db, lease, &records, &mut tally, stop).await? {
        return Ok(UndoEnd::Released);
    }

    let mut counts = UndoCounts::from_doc(&undo);
    counts.kept_changed = tally.kept_changed;
    counts.kept_linked = tally.kept_linked;
    counts.removed = tally
        .imported
        .saturating_sub(tally.kept_changed + tally.kept_linked);
    counts.updates_reverted = tally.reverted;
    counts.updates_not_reverted = tally.not_reverted.saturating_sub(tally.reverted);
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
    // Put back, or not to be: an undo is done once.
    if let Err(e) = befores::delete_all(db, queue_id).await {
        warn!(error = %error_chain(&e), "Deleting the undone import's before images failed");
    }
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
        kept_linked = counts.kept_linked,
        stages_removed = counts.stages_removed.len(),
        "Undo done"
    );
    Ok(UndoEnd::Done(counts))
}

/// Puts back the existing records the import updated, from the before
/// images its updates stored (`write::befores`), newest line first: a
/// record several lines updated ends as the first found it. Each image
/// applies only to its record as its line left it ([`befores::guard`]): a
/// record written since (by another import, or a CRM edit that set
/// `updated_at`) is left as it is, and counted as not reverted. The
/// import's own records (a later line updating one an earlier line
/// created) are not: they were removed, or kept as changed. Updates the
/// database refused are applied (later images of their record were taken
/// as if they had) but not counted; a restore the database refuses for
/// good leaves its record and is counted as not reverted. Images go in
/// windows of [`REVERT_WINDOW`], each put back with one read and one
/// write ([`revert_window`]). Resumable: the checkpoint
/// (`revert_below_line`) is saved with the count after every window; a
/// resumed run counts an image of its first
/// window whose record already holds what it (or a later image of the
/// record) puts back. That count is exact unless a record was written
/// again between the stop and the resume (then counted as not reverted),
/// or an image is of an update that never ran (a failed import: then
/// counted as put back). Returns true when `stop` asked for a release.
async fn revert_updates(
    db: &Database,
    lease: &UndoLease,
    records: &mongodb::Collection<Document>,
    tally: &mut Tally,
    stop: &CancellationToken,
) -> Result<bool, Error> {
    let queue_id = lease.queue_id;
    let (lo, top) = deal_id_range(&queue_id);
    // Line 0: all done.
    let ids = match tally.revert_below.map(|l| (l, deal_id(&queue_id, l))) {
        Some((0, _)) => return Ok(false),
        Some((_, Some(below))) => doc! { "$gte": lo, "$lt": below },
        _ => doc! { "$gte": lo, "$lte": top },
    };
    let filter = doc! { "_id": ids, "queue_id": queue_id };
    let mut images = db
        .collection::<Document>(befores::COLLECTION)
        .find(filter)
        .sort(doc! { "_id": -1 })
        .batch_size(1_000)
        .await?;
    // A resumed run's first window may hold images the run before it put
    // back after its last save (it saved at least every window), even
    // when that run died in its first window, before any save.
    let mut resumed = tally.revert_below.is_some() || lease.attempt > 1;
    let mut window: Vec<Document> = Vec::with_capacity(REVERT_WINDOW);
    loop {
        window.clear();
        while window.len() < REVERT_WINDOW {
            match images.try_next().await? {
                Some(image) => window.push(image),
                None => break,
            }
        }
        if window.is_empty() {
            break;
        }
        let put_back = revert_window(records, &queue_id, &window, resumed).await?;
        for (image, back) in window.iter().zip(put_back) {
            if back && image.get_bool("refused") != Ok(true) {
                // An image of a contact stands for the lines merged into it.
                tally.reverted += count(image, "lines").max(1);
            }
        }
        let line = window.last().map_or(0, |image| count(image, "line"));
        tally.revert_below = Some(line);
        resumed = false;
        lease.save(tally.to_doc()).await?;
        if stop.is_cancelled() {
            lease.release().await?;
            info!(revert_below = line, "Undo released at shutdown");
            return Ok(true);
        }
    }
    tally.revert_below = Some(0);
    lease.save(tally.to_doc()).await?;
    Ok(false)
}

/// Applies a window of before images (newest line first; see
/// [`revert_updates`]) with their records read once and one ordered
/// `update` command: which images apply, and what each leaves for the
/// record's next image, is judged in memory as the server judges it
/// ([`befores::guard_matches`], [`befores::put_back`]). Returns, per
/// image, whether its record is put back (by this call, or, `in_doubt`,
/// by the run before, as [`revert_one`] tells). When the server matched
/// fewer statements than judged (a record written meanwhile, a statement
/// refused, a retried command), each image of the window is judged again
/// one by one, as a resumed window is: already put back, or put back now.
async fn revert_window(
    records: &mongodb::Collection<Document>,
    queue_id: &ObjectId,
    window: &[Document],
    in_doubt: bool,
) -> Result<Vec<bool>, Error> {
    let mut back = vec![false; window.len()];
    let mut targets: Vec<(usize, ObjectId)> = Vec::new();
    for (i, image) in window.iter().enumerate() {
        match image.get_object_id("record_id") {
            Ok(id)
                if line_of_deal_id(queue_id, &id).is_none() && befores::guard(image).is_some() =>
            {
                targets.push((i, id));
            }
            _ => {}
        }
    }
    if targets.is_empty() {
        return Ok(back);
    }
    let mut ids: Vec<ObjectId> = targets.iter().map(|&(_, id)| id).collect();
    ids.sort_unstable();
    ids.dedup();
    let found: Vec<Document> = (|| async {
        records
            .find(doc! { "_id": { "$in": &ids } })
            .selection_criteria(primary())
            .await?
            .try_collect()
            .await
    })
    .retry(retry())
    .when(crate::db::is_transient)
    .await?;
    let mut now: HashMap<ObjectId, Document> = found
        .into_iter()
        .filter_map(|d| Some((d.get_object_id("_id").ok()?, d)))
        .collect();
    let mut statements = RawArrayBuf::new();
    let mut bytes = 0;
    let mut applied = Vec::new();
    for &(i, id) in &targets {
        let image = &window[i];
        let (Some(record), Some(guard)) = (now.get_mut(&id), befores::guard(image)) else {
            continue;
        };
        if befores::guard_matches(record, image) {
            befores::put_back(record, image);
            let statement = doc! { "q": guard, "u": befores::restore(image) };
            let statement =
                RawDocumentBuf::from_document(&statement).map_err(crate::write::Error::from)?;
            bytes += statement.as_bytes().len();
            statements.push(statement);
            applied.push(i);
        } else if in_doubt {
            back[i] = befores::holds(record, image)
                || window[i + 1..]
                    .iter()
                    .filter(|l| l.get_object_id("record_id") == Ok(id))
                    .any(|l| befores::holds(record, l));
        }
    }
    if applied.is_empty() {
        return Ok(back);
    }
    // Before values of huge records: one by one (a command has a size
    // limit; such windows are rare).
    let sent = bytes <= crate::write::UPDATE_COMMAND_BYTES;
    if sent {
        let raw = records.clone_with_type::<RawDocumentBuf>();
        let reply = (|| crate::write::update_command(&raw, statements.clone(), true))
            .retry(retry())
            .when(crate::write::Error::is_transient)
            .await;
        let matched = match reply {
            Ok(r) if r.get("writeErrors").is_none() => r
                .get("n")
                .and_then(|n| n.as_i64().or_else(|| n.as_i32().map(i64::from))),
            // Refused statements: judged one by one below.
            Ok(_) => None,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(_) => None,
        };
        if matched == Some(applied.len() as i64) {
            for i in applied {
                back[i] = true;
            }
            return Ok(back);
        }
        warn!(
            images = window.len(),
            "A window of updates was not put back as judged; putting it back one by one"
        );
    }
    for (i, image) in window.iter().enumerate() {
        // In doubt: what the command (or, resumed, the run before) may
        // have put back already.
        let doubt = in_doubt || (sent && applied.contains(&i));
        back[i] = revert_one(records, queue_id, image, doubt.then(|| &window[i + 1..])).await?;
    }
    Ok(back)
}

/// Reads on the primary: what an undo judges from must be what its
/// writes will meet, whatever the connection's read preference.
fn primary() -> mongodb::options::SelectionCriteria {
    mongodb::options::SelectionCriteria::ReadPreference(mongodb::options::ReadPreference::Primary)
}

/// Applies one before image (see [`revert_updates`]); returns whether its
/// record is put back (by this call, or, `in_doubt`, by the run before:
/// its record holds what this image, or a later one of the same record in
/// the rest of the window, puts back). The import's own records are left.
async fn revert_one(
    records: &mongodb::Collection<Document>,
    queue_id: &ObjectId,
    image: &Document,
    in_doubt: Option<&[Document]>,
) -> Result<bool, Error> {
    let Ok(record_id) = image.get_object_id("record_id") else {
        return Ok(false);
    };
    if line_of_deal_id(queue_id, &record_id).is_some() {
        return Ok(false);
    }
    let Some(guard) = befores::guard(image) else {
        return Ok(false);
    };
    let restore = befores::restore(image);
    let applied = (|| {
        records
            .update_one(guard.clone(), restore.clone())
            .into_future()
    })
    .retry(retry())
    .when(crate::db::is_transient)
    .await;
    match applied {
        Ok(r) if r.matched_count == 1 => return Ok(true),
        Ok(_) => {}
        // Refused for good (a validator added since, ...): this record
        // stays as it is, the others are still put back.
        Err(e) if !crate::db::is_transient(&e) => {
            let line = count(image, "line");
            warn!(line, error = %error_chain(&e), "An update could not be put back");
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    }
    let Some(later) = in_doubt else {
        return Ok(false);
    };
    let now = (|| records.find_one(doc! { "_id": record_id }).into_future())
        .retry(retry())
        .when(crate::db::is_transient)
        .await?;
    let Some(now) = now else {
        return Ok(false);
    };
    Ok(befores::holds(&now, image)
        || later
            .iter()
            .filter(|l| l.get_object_id("record_id") == Ok(record_id))
            .any(|l| befores::holds(&now, l)))
}

/// Deletes the records `guard` matches that were not edited since their
/// insert ([`untouched`]). The records are read first (ids and times, one
/// index range) and compared here: a filter comparing two fields of a
/// record (`$expr`) makes some servers scan the whole collection.
async fn remove_untouched(
    records: &mongodb::Collection<Document>,
    guard: &Document,
    queue_id: &ObjectId,
) -> mongodb::error::Result<()> {
    let found: Vec<Document> = records
        .find(guard.clone())
        .selection_criteria(primary())
        .projection(doc! {
            "_id": 1, "created_at": 1, "updated_at": 1,
            "last_import.queue_id": 1, "last_imports.queue_id": 1,
        })
        .await?
        .try_collect()
        .await?;
    let ids: Vec<ObjectId> = found
        .iter()
        .filter(|d| untouched(d, queue_id))
        .filter_map(|d| d.get_object_id("_id").ok())
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let mut remove = guard.clone();
    remove.insert("_id", doc! { "$in": ids });
    records.delete_many(remove).await?;
    Ok(())
}

/// Whether a record the import created was not edited since its insert
/// (pure): its `updated_at` is its `created_at`, or the last to write it
/// was the import itself (a later line of the same name updated it), and
/// no other import updated it in between (its `last_imports`).
fn untouched(record: &Document, queue_id: &ObjectId) -> bool {
    let others = record
        .get_array("last_imports")
        .into_iter()
        .flatten()
        .filter_map(Bson::as_document)
        .any(|u| u.get_object_id("queue_id").ok() != Some(*queue_id));
    if others {
        return false;
    }
    let last_import = record
        .get_document("last_import")
        .and_then(|l| l.get_object_id("queue_id"));
    if last_import.is_ok() {
        return last_import == Ok(*queue_id);
    }
    match (
        record.get_datetime("created_at"),
        record.get_datetime("updated_at"),
    ) {
        (Ok(created), Ok(updated)) => created == updated,
        _ => false,
    }
}

async fn refuse(lease: &UndoLease, reason: &str) -> Result<UndoEnd, Error> {
    lease.finish("refused", doc! { "reason": reason }).await?;
    info!(reason, "Undo refused");
    Ok(UndoEnd::Refused(reason.to_owned()))
}

/// Whether stage `id` may be in use: a deal has it, or an import into the
/// pipeline is running (it may have resolved it and not written yet).
async fn stage_in_use(
    db: &Database,
    account_id: ObjectId,
    pipeline_id: ObjectId,
    id: ObjectId,
) -> mongodb::error::Result<bool> {
    // An equality on status over the few running imports.
    let busy = db
        .collection::<Document>(collections::QUEUES)
        .find_one(doc! {
            "status": JobState::Processing.as_str(),
            "additional_data.pipeline_id": pipeline_id,
        })
        .projection(doc! { "_id": 1 })
        .await?
        .is_some();
    if busy {
        return Ok(true);
    }
    // A rare operation over a few stages: a lookup per stage, with
    // whatever index the CRM keeps on deals.
    Ok(db
        .collection::<Document>(collections::DEALS)
        .find_one(doc! { "account_id": account_id, "pipeline_id": pipeline_id, "stage_id": id })
        .projection(doc! { "_id": 1 })
        .await?
        .is_some())
}

/// Removes stage `id`, then checks again that nothing uses it: an import
/// claimed between the first check and the removal may have resolved it;
/// it is then running, or its deals are written, and the stage is put
/// back as it was. (An import claimed after the removal no longer sees it,
/// and creates its own stage of that name.) Returns whether it is gone.
pub async fn remove_stage(
    db: &Database,
    account_id: ObjectId,
    pipeline_id: ObjectId,
    id: ObjectId,
    queue_id: ObjectId,
) -> mongodb::error::Result<bool> {
    let stages = db.collection::<Document>(collections::PIPELINE_STAGES);
    let Some(stage) = stages
        .find_one_and_delete(doc! { "_id": id, "import.queue_id": queue_id })
        .await?
    else {
        return Ok(true);
    };
    if !stage_in_use(db, account_id, pipeline_id, id).await? {
        return Ok(true);
    }
    match stages.insert_one(&stage).await {
        Ok(_) => Ok(false),
        Err(e) if crate::db::is_duplicate_key(&e) => {
            // A new stage of the same name was created meanwhile: the
            // deals that had this one keep a stage id that is gone.
            warn!("A stage in use was removed and another of its name created meanwhile");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Removes the stages the import created that no deal uses any more; the
/// rest are kept. While an import into the pipeline runs, all are kept (it
/// may have resolved one of them a moment ago). Each decision is saved as
/// it is made, so a resumed undo still names a stage an earlier holder
/// removed.
async fn remove_stages(
    db: &Database,
    lease: &UndoLease,
    account_id: ObjectId,
    pipeline_id: ObjectId,
    counts: &mut UndoCounts,
) -> Result<(), Error> {
    let queue_id = lease.queue_id;
    let stages = db.collection::<Document>(collections::PIPELINE_STAGES);
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
        let removed = !stage_in_use(db, account_id, pipeline_id, id).await?
            && remove_stage(db, account_id, pipeline_id, id, queue_id).await?;
        let list = if removed {
            &mut counts.stages_removed
        } else {
            &mut counts.stages_kept
        };
        if !list.contains(&label) {
            list.push(label);
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

    #[test]
    fn the_range_covers_exactly_the_lines_of_the_import() {
        let q = ObjectId::new();
        let (lo, hi) = id_range(&q, 2, 1001);
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
    fn a_record_is_untouched_unless_written_since_its_insert_by_someone_else() {
        let q = ObjectId::new();
        let at = DateTime::from_millis(1_700_000_000_000);
        let later = DateTime::from_millis(1_700_000_001_000);
        assert!(untouched(&doc! { "created_at": at, "updated_at": at }, &q));
        // Edited in the CRM while the import still ran.
        assert!(!untouched(
            &doc! { "created_at": at, "updated_at": later },
            &q
        ));
        // Updated by a later line of the same import; by another import.
        let own = doc! { "created_at": at, "updated_at": later, "last_import": { "queue_id": q } };
        assert!(untouched(&own, &q));
        let other = doc! { "created_at": at, "updated_at": at, "last_import": { "queue_id": ObjectId::new() } };
        assert!(!untouched(&other, &q));
        // The import updated it last, but another import in between.
        let between = doc! {
            "created_at": at, "updated_at": later, "last_import": { "queue_id": q },
            "last_imports": [{ "queue_id": ObjectId::new() }, { "queue_id": q }],
        };
        assert!(!untouched(&between, &q));
        let own = doc! {
            "created_at": at, "updated_at": later, "last_import": { "queue_id": q },
            "last_imports": [{ "queue_id": q }],
        };
        assert!(untouched(&own, &q));
        // Times not as the import wrote them: someone else's record shape.
        assert!(!untouched(&doc! { "created_at": at }, &q));
        assert!(!untouched(&doc! {}, &q));
    }

    #[test]
    fn the_cutoff_is_the_end_of_the_import_plus_the_slack() {
        let ended = DateTime::from_millis(1_700_000_000_000);
        let q = doc! { "completed_at": ended };
        assert_eq!(cutoff(&q).unwrap().timestamp_millis(), 1_700_000_060_000);
        assert_eq!(cutoff(&doc! {}), None);
    }

    #[test]
    fn only_updates_of_records_from_before_the_import_count_as_not_reverted() {
        let q = ObjectId::new();
        let batch = doc! { "updated": [
            { "line": 3_i64, "record_id": ObjectId::new() },
            { "line": 7_i64, "record_id": deal_id(&q, 3).unwrap() },
            { "line": 9_i64, "record_id": ObjectId::new() },
        ] };
        assert_eq!(foreign_updates(&batch, &q), 2);
        assert_eq!(foreign_updates(&doc! {}, &q), 0);
    }

    /// The checkpoint of the revert phase is a number once it began; the
    /// null saved before it is no checkpoint (else a resumed undo would
    /// take it for "done" and put nothing back).
    #[test]
    fn a_null_revert_checkpoint_is_none() {
        let saved = Tally::default().to_doc();
        assert_eq!(saved.get("revert_below_line"), Some(&Bson::Null));
        assert_eq!(Tally::from_doc(&saved).revert_below, None);
        let t = Tally::from_doc(&doc! { "revert_below_line": 7_i64 });
        assert_eq!(t.revert_below, Some(7));
    }

    #[test]
    fn counts_round_trip_and_read_well() {
        let c = UndoCounts {
            removed: 98,
            kept_changed: 2,
            kept_linked: 0,
            updates_reverted: 4,
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
        assert!(text.contains("reverted: 4 updates"), "{text}");
        assert!(text.contains("stages kept (in use): Won"), "{text}");
        assert!(!text.contains("contacts"), "{text}");
    }
}
