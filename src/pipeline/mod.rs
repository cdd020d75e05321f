//! One claimed import, end to end: fetch → parse → map → stages → write →
//! outcomes, with progress, checkpoints and a final state. Wires the stage
//! modules together; holds no business rule of its own.
//!
//! Shape: a producer task streams the object, parses and maps rows and cuts
//! them into batches of `import.batch_size` rows (by count only, so a resumed
//! run cuts the same batches); a bounded channel (`import.channel_batches`)
//! carries them to this task, which resolves stages and keeps up to
//! `import.writers` bulk writes in flight, completing them in order. A full
//! channel is what slows the S3 read: memory is bounded by the channel and
//! the writes in flight, never by the file.
//!
//! Checkpoints: after the writes of a batch and all batches before it are
//! committed (deals, then the batch's outcome document), the position just
//! past its last record is the checkpoint, saved with progress at most every
//! `import.progress_interval`. A resumed run continues there. The batches
//! past it whose outcome documents an earlier run stored keep those
//! outcomes and are not written again (an update replayed now could undo
//! what changed since); any other batch is written again, absorbed by the
//! idempotent writes.
//!
//! Stopping: a heartbeat task renews the lease every third of it. Lease lost
//! → stop writing at once (in-flight writes are dropped). Cancellation
//! requested → finish the writes in flight, then `cancelled`. Shutdown →
//! finish the writes in flight, checkpoint, release the lease. Transient
//! trouble that outlasts the retries → checkpoint and release, so a later
//! attempt resumes.
//!
//! Here: the run's life (claimed → final state or release) and the wiring.
//! `drive` is the write loop and its batches, `deals`, `contacts` and
//! `check` (a dry run) the sinks it writes through, `progress` the
//! counters and checkpoint, `stop` the reasons a run stops and the
//! heartbeat that watches them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bson::oid::ObjectId;
use bson::{Document, doc};
use mongodb::Database;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, info, warn};

use crate::claim::{self, Checkpoint, ClaimedJob, Final, Lease, Progress, Release};
use crate::config::Settings;
use crate::domain::{
    DuplicateStrategy, FileError, ImportSpec, JobState, LineNo, RecordKind, collections,
};
use crate::fetch::{ObjectInfo, Storage};
use crate::map::{FailedRow, Plan, RawCells, Rules};
use crate::outcomes::{self, BatchOutcome, RecordedBatch};
use crate::parse::{self, Start};
use crate::telemetry::error_chain;
use crate::write::ContactWriter;

mod check;
mod contacts;
mod deals;
mod drive;
mod progress;
mod stop;

use check::CheckSink;
use contacts::ContactSink;
use deals::{DealSink, record_stages};
use drive::{Run, Source};
use progress::{Tracker, progress_from_doc, progress_from_totals};
use stop::{Abort, Stop, heartbeat};

/// What a pipeline needs from the outside world.
#[derive(Clone)]
pub struct Services {
    /// The CRM database.
    pub db: Database,
    /// The uploads bucket.
    pub storage: Storage,
    /// Configuration.
    pub settings: Arc<Settings>,
}

/// How a run ended, for the daemon's bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The import reached a final state.
    Finished(JobState),
    /// The lease was given back; another attempt resumes at the checkpoint.
    Released,
    /// The lease was lost; another daemon owns the import.
    LeaseLost,
}

/// Most rows a batch may hold, whatever a checkpoint says (an outcome
/// document holds one batch).
const MAX_BATCH_ROWS: usize = 10_000;

/// Retry policy of one database operation of the write path.
fn write_retry() -> ExponentialBuilder {
    // ~1 minute in all, enough for a server restart or a primary election;
    // past it the lease is released and a later attempt resumes.
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(15))
        .with_max_times(8)
        .with_jitter()
}

/// Runs one claimed import to a final state, a release or a lost lease.
pub async fn run(svc: &Services, job: ClaimedJob, shutdown: CancellationToken) -> RunEnd {
    let lease = job.lease.clone();
    let stop = Stop::new();
    // Aborted when this run ends however it ends (a panic included): an
    // orphan heartbeat would keep a dead run's lease alive.
    let heartbeat = AbortOnDropHandle::new(tokio::spawn(
        heartbeat(lease.clone(), stop.clone(), shutdown).in_current_span(),
    ));
    let checkpoint = Checkpoint::from_queue_doc(&job.doc);
    let mut tracker = Tracker {
        progress: progress_from_doc(&job.doc),
        checkpoint,
        start_line: checkpoint.line,
        start_byte: checkpoint.byte,
        started: Instant::now(),
        exact_offsets: false,
        file_bytes_read: None,
        size: 0,
        object: object_read_before(&job.doc),
        last_save: Instant::now(),
    };
    let max_attempts = svc.settings.scheduler.max_attempts;
    // Counted once: the update marks the earlier claim as accounted for
    // (if it fails, the claim stays counted: the safe side).
    let mut uncounted = 0;
    if advanced_then_lost(&job.doc, lease.attempt) && lease.not_counting_previous().await.is_ok() {
        uncounted = 1;
    }
    // The spec is read even past the attempts cap: the summary needs it.
    let spec = claim::spec_from_doc(&job.doc);
    let result = match &spec {
        // Cancelled while pending (or between attempts): nothing more is
        // written; what earlier attempts imported is reported.
        _ if job.doc.get_bool("cancel_requested") == Ok(true) => Err(Abort::Cancelled),
        _ if counted_attempts(&job.doc, lease.attempt) - uncounted > i64::from(max_attempts) => {
            Err(Abort::File(FileError::TooManyAttempts {
                attempts: max_attempts,
                last_error: Some(last_error(&job.doc, lease.attempt - 1).unwrap_or_else(|| {
                    "the last attempt stopped without recording why (its daemon died or lost \
                     its lease)"
                        .into()
                })),
            }))
        }
        Ok(spec) => import(svc, &lease, spec, &mut tracker, &stop).await,
        Err(e) => Err(Abort::File(e.clone())),
    };
    // The lease is renewed until the final state or release is written.
    let end = conclude(svc, &lease, spec.as_ref().ok(), &mut tracker, &stop, result).await;
    drop(heartbeat);
    info!(outcome = ?end, "Import run ended");
    end
}

/// What ended attempt `attempt`, if its release recorded it (a
/// `last_error` of an earlier attempt says nothing about a later one).
pub fn last_error(doc: &Document, attempt: i64) -> Option<String> {
    let e = doc.get_document("last_error").ok()?;
    let of = claim::whole_number(e, "attempt")?;
    (of == attempt)
        .then(|| e.get_str("message").ok().map(str::to_owned))
        .flatten()
}

/// Claims that count towards `scheduler.max_attempts`: all but those that
/// ended in a release on shutdown, or once the run had moved the
/// checkpoint on, in a release after trouble or in a lost lease (a long
/// import meeting several outages is not stuck; one that fails where it
/// stands is).
pub fn counted_attempts(doc: &Document, attempt: i64) -> i64 {
    let n = |key: &str| claim::whole_number(doc, key).unwrap_or(0).max(0);
    attempt - n("shutdown_releases") - n("progress_releases")
}

/// Whether the claim before `attempt` moved the checkpoint on and then
/// ended without a release: its lease ran out (an outage that outlasted
/// the heartbeat, or its daemon died). Such a claim is not counted, as a
/// release after progress is not (pure).
pub fn advanced_then_lost(doc: &Document, attempt: i64) -> bool {
    let previous = attempt - 1;
    previous >= 1
        && claim::whole_number(doc, "advanced_attempt") == Some(previous)
        && claim::whole_number(doc, "released_attempt") != Some(previous)
}

/// Writes the end of a run: final state, or release, or nothing.
async fn conclude(
    svc: &Services,
    lease: &Lease,
    spec: Option<&ImportSpec>,
    tracker: &mut Tracker,
    stop: &Stop,
    result: Result<(), Abort>,
) -> RunEnd {
    if stop.lost.is_cancelled() {
        // Whatever the run's result, the import is no longer ours to end.
        warn!("Lease lost; stopped writing");
        return RunEnd::LeaseLost;
    }
    let outcome = match result {
        Ok(()) => Final::Completed,
        Err(Abort::File(e)) => {
            warn!(code = e.code(), "Import failed on a file-level problem");
            Final::Failed(e)
        }
        Err(Abort::Cancelled) => Final::Cancelled,
        Err(Abort::LeaseLost) => {
            warn!("Lease lost; stopped writing");
            return RunEnd::LeaseLost;
        }
        Err(reason @ (Abort::Shutdown | Abort::Transient(_))) => {
            if let Abort::Transient(e) = &reason {
                warn!(error = %e, "Import paused on a transient error; releasing the lease");
            }
            let why = match &reason {
                Abort::Transient(e) => Release::Trouble {
                    error: e,
                    advanced: tracker.checkpoint.line > tracker.start_line,
                },
                _ => Release::Shutdown,
            };
            return match lease
                .release(tracker.progress, tracker.checkpoint, why)
                .await
            {
                Ok(()) => RunEnd::Released,
                Err(e) => {
                    warn!(error = %error_chain(&e), "Could not release the lease; it will expire");
                    RunEnd::Released
                }
            };
        }
    };
    let finished = finish(svc, lease, spec, tracker, stop, &outcome).await;
    match finished {
        Ok(()) => RunEnd::Finished(outcome.state()),
        Err(claim::Error::LeaseLost { .. }) => RunEnd::LeaseLost,
        Err(e) => {
            // The final write itself failed: give the import back so the
            // next attempt completes it (its lines are all idempotent).
            let e = error_chain(&e);
            warn!(error = %e, "Could not store the final state; releasing");
            let why = Release::Trouble {
                error: &e,
                advanced: tracker.checkpoint.line > tracker.start_line,
            };
            let _ = lease
                .release(tracker.progress, tracker.checkpoint, why)
                .await;
            RunEnd::Released
        }
    }
}

async fn finish(
    svc: &Services,
    lease: &Lease,
    spec: Option<&ImportSpec>,
    tracker: &mut Tracker,
    stop: &Stop,
    outcome: &Final,
) -> Result<(), claim::Error> {
    // Each step is retried like a batch write (a primary election here
    // must not cost a fully written import an attempt), while the lease
    // holds.
    let again = |e: &mongodb::error::Error| crate::db::is_transient(e) && !stop.lost.is_cancelled();
    let (db, queue_id, state) = (&svc.db, lease.queue_id, outcome.state().as_str());
    let mut extra = Document::new();
    if let Some(spec) = spec {
        let log_id = (|| outcomes::open_summary(db, spec))
            .retry(write_retry())
            .when(again)
            .await?;
        let totals = (|| outcomes::totals(db, queue_id))
            .retry(write_retry())
            .when(again)
            .await?;
        let logs = (|| outcomes::failures(db, queue_id, outcomes::SUMMARY_LOG_LIMIT))
            .retry(write_retry())
            .when(again)
            .await?;
        (|| outcomes::close_summary(db, queue_id, state, totals, &logs))
            .retry(write_retry())
            .when(again)
            .await?;
        tracker.progress = progress_from_totals(totals, tracker.progress, outcome);
        extra.insert("log_id", log_id);
        extra.insert("contacts_created", totals.contacts_created as i64);
    }
    let progress = tracker.progress;
    (|| lease.finish(outcome, progress, extra.clone()))
        .retry(write_retry())
        .when(|e| e.is_transient() && !stop.lost.is_cancelled())
        .await
}

async fn import(
    svc: &Services,
    lease: &Lease,
    spec: &ImportSpec,
    tracker: &mut Tracker,
    stop: &Stop,
) -> Result<(), Abort> {
    match import_file(svc, lease, spec, tracker, stop).await {
        Err(Abort::File(e)) if e.takes_back() => {
            // Refused as a whole after rows of it were written (all of
            // them committed by now).
            let taken = take_back(&svc.db, spec).await?;
            Err(Abort::File(if taken { e } else { e.kept() }))
        }
        other => other,
    }
}

/// Takes back what the import wrote, where it can: the deals it created
/// (a split or corrected file imported again must not meet them), or a
/// check's outcomes. Under `skip` or `update` a re-import meets its deals
/// by name and the updates could not be taken back, and other imports may
/// already link to, skip against or update the contacts it created: what
/// those wrote stays, with their line outcomes. Returns whether it took
/// back.
async fn take_back(db: &Database, spec: &ImportSpec) -> Result<bool, Abort> {
    if spec.dry_run {
        delete_outcomes(db, spec.queue_id).await?;
        return Ok(true);
    }
    match (spec.kind, spec.duplicate_strategy) {
        (RecordKind::Deals, DuplicateStrategy::Create) => {
            deals::roll_back(db, spec.queue_id).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The object an earlier run of the import read (`file_size`, `file_etag`
/// it stored), if one did.
fn object_read_before(doc: &Document) -> Option<ObjectInfo> {
    let size = match doc.get("file_size")? {
        bson::Bson::Int64(n) => u64::try_from(*n).ok()?,
        bson::Bson::Int32(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    Some(ObjectInfo {
        size,
        etag: doc.get_str("file_etag").ok().map(str::to_owned),
    })
}

async fn import_file(
    svc: &Services,
    lease: &Lease,
    spec: &ImportSpec,
    tracker: &mut Tracker,
    stop: &Stop,
) -> Result<(), Abort> {
    let settings = &svc.settings;
    let pipeline_id = match spec.kind {
        RecordKind::Deals => Some(spec.pipeline_id.ok_or_else(|| {
            Abort::File(FileError::InvalidQueueDocument(
                "`additional_data.pipeline_id` is missing".into(),
            ))
        })?),
        RecordKind::Contacts => None,
    };
    outcomes::open_summary(&svc.db, spec).await?;
    if let Some(pipeline_id) = pipeline_id {
        let pipeline = svc
            .db
            .collection::<Document>(collections::PIPELINES)
            .find_one(doc! { "_id": pipeline_id, "account_id": spec.account_id })
            .projection(doc! { "_id": 1 })
            .await?;
        if pipeline.is_none() {
            return Err(Abort::File(FileError::PipelineNotFound));
        }
    }
    let info = svc.storage.head(&spec.csv_key).await?;
    if let Some(before) = &tracker.object
        && info.differs_from(before)
    {
        // Replaced since an earlier run read it: its rows and this file's
        // are not the same lines.
        return Err(Abort::File(FileError::FileChanged));
    }
    tracker.size = info.size;
    if let Some(limit) = settings.import.max_file_bytes
        && info.size > limit
    {
        return Err(Abort::File(FileError::FileTooLarge {
            size: info.size,
            limit,
        }));
    }
    if info.size == 0 {
        return Err(Abort::File(FileError::EmptyFile));
    }
    let reader = svc.storage.open(&spec.csv_key, &info, 0).await?;
    let (headers, records) = parse::open(reader).await?;
    tracker.exact_offsets = records.dialect.encoding.offsets_are_exact();
    tracker.file_bytes_read = records.file_bytes_read();
    let rules = Rules {
        max_field_chars: settings.import.max_field_chars,
        number_locale: settings.import.number_locale,
        date_order: settings.import.date_order,
    };
    let plan = Plan::new(spec.kind, &headers, &spec.mappings, rules).map_err(Abort::File)?;
    if spec.dry_run
        && (spec.duplicate_strategy != DuplicateStrategy::Create || plan.maps_stages())
        && tracker.checkpoint.line > 0
    {
        // A check matches rows against the file's earlier rows too (names,
        // stages it would create), which a resumed run would not have read:
        // it starts over (it writes only outcomes, which a replay rewrites
        // alike).
        tracker.checkpoint = Checkpoint {
            batch_size: tracker.checkpoint.batch_size,
            ..Checkpoint::default()
        };
        tracker.progress = Progress::default();
        tracker.start_byte = 0;
    }
    let resume = tracker.checkpoint;
    let (records, skip) = if resume.line == 0 {
        (records, 0)
    } else if records.dialect.encoding.offsets_are_exact() {
        // Ranged GET from the checkpoint's byte: the lines before it are not
        // read again.
        let dialect = records.dialect;
        drop(records);
        let reader = svc.storage.open(&spec.csv_key, &info, resume.byte).await?;
        (
            parse::resume(
                reader,
                dialect,
                Start {
                    line: resume.line,
                    byte: resume.byte,
                },
            ),
            0,
        )
    } else {
        // Transcoded files have no byte mapping: read and skip.
        (records, resume.records)
    };
    info!(
        resume_line = resume.line,
        size = info.size,
        columns = headers.len(),
        "Import started"
    );
    // The batches of the first run, kept by every later one (outcome
    // documents are keyed by their batch's first line): stored before the
    // first batch is written, so even a run that dies before its first
    // progress save leaves it.
    let batch_size = match usize::try_from(resume.batch_size) {
        Ok(n) if n > 0 => n.min(MAX_BATCH_ROWS),
        _ => settings.import.batch_size.get(),
    };
    tracker.checkpoint.batch_size = batch_size as u64;
    let mut fields = doc! {
        "file_size": info.size as i64,
        "columns": &headers,
        "checkpoint.batch_size": batch_size as i64,
    };
    if let Some(etag) = &info.etag {
        fields.insert("file_etag", etag);
    }
    lease.set_fields(fields).await?;
    let source = Source {
        records,
        batch_size,
        max_rows: settings.import.max_rows,
        records_before: resume.records,
        skip,
    };
    let run = Run {
        svc,
        lease,
        stop,
        channel: settings.import.channel_batches.get(),
    };
    if spec.dry_run {
        // Every line checked, its outcome recorded; no record, stage or
        // contact written.
        let mut sink = CheckSink::new(svc, spec, &plan).await?;
        let writers = settings.import.writers.get();
        match spec.kind {
            RecordKind::Deals => {
                let map = move |line, fields: &csv_async::ByteRecord| plan.map_deal(line, fields);
                run.drive(tracker, source, map, writers, &mut sink).await?;
            }
            RecordKind::Contacts => {
                let map =
                    move |line, fields: &csv_async::ByteRecord| plan.map_contact(line, fields);
                run.drive(tracker, source, map, writers, &mut sink).await?;
            }
        }
        // The stages it would create, for the summary.
        if let Some(stages) = &sink.stages {
            record_stages(lease, stages).await?;
        }
        return Ok(());
    }
    // Batches an earlier run wrote and recorded after the checkpoint (it
    // died before saving the next one): their recorded outcomes stand, and
    // nothing of them is written again (an update replayed now could undo
    // what another import or a user changed since).
    let replayed = outcomes::recorded_first_lines(&svc.db, spec.queue_id, resume.line).await?;
    if !replayed.is_empty() {
        info!(
            batches = replayed.len(),
            "Reusing outcomes recorded after the checkpoint"
        );
    }
    match pipeline_id {
        Some(pipeline_id) => {
            let mut sink = DealSink::new(svc, lease, spec, pipeline_id, &plan, replayed).await?;
            let writers = match spec.duplicate_strategy {
                // Updates must see the deals earlier batches create.
                DuplicateStrategy::Update => 1,
                _ => settings.import.writers.get(),
            };
            let map = move |line, fields: &csv_async::ByteRecord| plan.map_deal(line, fields);
            run.drive(tracker, source, map, writers, &mut sink).await?;
            record_stages(lease, &sink.stages).await?;
        }
        None => {
            let mut sink = ContactSink {
                db: svc.db.clone(),
                writer: ContactWriter::new(svc.db.collection(collections::CONTACTS), spec)
                    .with_clock(lease.clock().clone()),
                queue_id: lease.queue_id,
                replayed,
            };
            let map = move |line, fields: &csv_async::ByteRecord| plan.map_contact(line, fields);
            // One batch at a time: the first line of an email in the file
            // is the one that creates its contact.
            run.drive(tracker, source, map, 1, &mut sink).await?;
        }
    }
    Ok(())
}

/// The outcomes an earlier run recorded for the batch starting at
/// `first_line`, retrying transient failures.
async fn recorded_batch(
    db: &Database,
    queue_id: ObjectId,
    first_line: LineNo,
) -> Result<Option<RecordedBatch>, Abort> {
    Ok((|| outcomes::recorded_batch(db, queue_id, first_line))
        .retry(write_retry())
        .when(crate::db::is_transient)
        .await?)
}

/// Stores a batch's outcomes, retrying transient failures.
async fn record_outcome(
    db: &Database,
    queue_id: ObjectId,
    outcome: &BatchOutcome,
) -> Result<(), Abort> {
    (|| outcomes::record_batch(db, queue_id, outcome))
        .retry(write_retry())
        .when(crate::db::is_transient)
        .notify(|e, _| warn!(error = %error_chain(e), "Outcome write failed; retrying"))
        .await?;
    Ok(())
}

/// Deletes the per-line outcomes of an import, retrying transient failures.
async fn delete_outcomes(db: &Database, queue_id: ObjectId) -> Result<(), Abort> {
    (|| outcomes::delete_batches(db, queue_id))
        .retry(write_retry())
        .when(crate::db::is_transient)
        .await
        .map_err(|e| Abort::Transient(error_chain(&e)))?;
    Ok(())
}

/// A line the database refused, with its original cells for the report.
fn rejected_row(line: LineNo, message: String, raw: &RawCells) -> FailedRow {
    FailedRow {
        error: crate::domain::RowError {
            line,
            code: crate::domain::RowCode::WriteRejected,
            field: None,
            value: None,
            message,
        },
        cells: raw.to_cells(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_all_claims_but_clean_releases() {
        assert_eq!(counted_attempts(&doc! {}, 3), 3);
        // A double (`$inc` on a dashboard's 0.0) counts as its number.
        assert_eq!(counted_attempts(&doc! { "shutdown_releases": 1.0 }, 3), 2);
        let d = doc! { "shutdown_releases": 1_i64, "progress_releases": 2_i32 };
        assert_eq!(counted_attempts(&d, 6), 3);
        assert_eq!(
            counted_attempts(&doc! { "progress_releases": -4_i64 }, 2),
            2
        );
    }

    #[test]
    fn a_claim_that_moved_on_then_lost_its_lease_is_not_counted_once() {
        // Attempt 3 saved a checkpoint past where it began, then its lease
        // ran out: claim 4 does not count it.
        let lost = doc! { "attempts": 4_i64, "advanced_attempt": 3_i64 };
        assert!(advanced_then_lost(&lost, 4));
        // Released (the release counted it already), or accounted for.
        let released = doc! { "advanced_attempt": 3_i64, "released_attempt": 3_i64 };
        assert!(!advanced_then_lost(&released, 4));
        // An older claim's progress says nothing about the last one.
        assert!(!advanced_then_lost(&doc! { "advanced_attempt": 2_i64 }, 4));
        assert!(!advanced_then_lost(&doc! {}, 1));
    }

    #[test]
    fn last_error_speaks_only_for_its_attempt() {
        let d = doc! { "last_error": { "message": "HTTP 403", "attempt": 4_i64 } };
        assert_eq!(last_error(&d, 4).as_deref(), Some("HTTP 403"));
        assert_eq!(last_error(&d, 5), None);
        assert_eq!(last_error(&doc! {}, 1), None);
    }
}
