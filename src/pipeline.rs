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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use bson::oid::ObjectId;
use bson::{DateTime, Document, RawDocumentBuf, doc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use mongodb::Database;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, info, warn};

use crate::claim::{self, Checkpoint, ClaimedJob, Final, Lease, Progress, Release};
use crate::config::Settings;
use crate::contacts::{ContactLinker, ContactRef, Linked};
use crate::domain::{
    DuplicateStrategy, FileError, ImportSpec, JobState, LineNo, RecordKind, collections,
};
use crate::fetch::{self, Storage};
use crate::map::{FailedRow, Mapped, MappedContact, MappedDeal, Plan, RawCells, Rules};
use crate::outcomes::{self, BatchOutcome, LineOutcome, RecordedBatch, Totals};
use crate::parse::{self, Records, Start};
use crate::stages::StageCache;
use crate::telemetry::error_chain;
use crate::telemetry::metrics as m;
use crate::write::{self, ContactWrite, ContactWriter, DealWriter, LineWrite, Match, NameIndex};

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

/// Why a run stopped before the end of the file.
#[derive(Debug)]
enum Abort {
    File(FileError),
    Transient(String),
    LeaseLost,
    Shutdown,
    Cancelled,
}

impl From<claim::Error> for Abort {
    fn from(e: claim::Error) -> Self {
        match e {
            claim::Error::LeaseLost { .. } => Self::LeaseLost,
            e => Self::Transient(error_chain(&e)),
        }
    }
}

impl From<mongodb::error::Error> for Abort {
    fn from(e: mongodb::error::Error) -> Self {
        // A non-transient database error is retried too: the lease is
        // released and the attempt cap ends a truly stuck import.
        Self::Transient(error_chain(&e))
    }
}

impl From<crate::stages::Error> for Abort {
    fn from(e: crate::stages::Error) -> Self {
        Self::Transient(error_chain(&e))
    }
}

impl From<fetch::Error> for Abort {
    fn from(e: fetch::Error) -> Self {
        match e {
            fetch::Error::NotFound => Self::File(FileError::ObjectNotFound),
            e => Self::Transient(error_chain(&e)),
        }
    }
}

impl From<parse::Error> for Abort {
    fn from(e: parse::Error) -> Self {
        match e {
            parse::Error::File(f) => Self::File(f),
            e => Self::Transient(error_chain(&e)),
        }
    }
}

const STOP_NONE: u8 = 0;
const STOP_LEASE_LOST: u8 = 1;
const STOP_CANCELLED: u8 = 2;
const STOP_SHUTDOWN: u8 = 3;

/// Shared stop signal with its first reason.
#[derive(Clone)]
struct Stop {
    /// Any reason to stop.
    token: CancellationToken,
    /// The lease is lost (also after another reason): stop writing at once,
    /// even the batches a cancellation or shutdown lets finish.
    lost: CancellationToken,
    reason: Arc<AtomicU8>,
}

impl Stop {
    fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            lost: CancellationToken::new(),
            reason: Arc::new(AtomicU8::new(STOP_NONE)),
        }
    }
    fn trigger(&self, reason: u8) {
        let _ = self
            .reason
            .compare_exchange(STOP_NONE, reason, Ordering::SeqCst, Ordering::SeqCst);
        if reason == STOP_LEASE_LOST {
            self.lost.cancel();
        }
        self.token.cancel();
    }
    fn abort(&self) -> Abort {
        match self.reason.load(Ordering::SeqCst) {
            STOP_LEASE_LOST => Abort::LeaseLost,
            STOP_CANCELLED => Abort::Cancelled,
            _ => Abort::Shutdown,
        }
    }
}

/// A batch of mapped rows (deals or contacts), cut by row count.
struct Batch<R> {
    rows: Vec<Result<R, Box<FailedRow>>>,
    first_line: LineNo,
    last_line: LineNo,
    /// Where reading resumes after this batch.
    end: Start,
    /// Data records read through this batch.
    records_end: u64,
    /// Bytes of its records' fields.
    bytes: usize,
}

/// Where a batch ends in the file.
struct Mark {
    end: Start,
    records_end: u64,
}

impl Mark {
    /// The batch written, with `outcome`.
    fn done(self, outcome: BatchOutcome) -> Done {
        Done {
            outcome,
            end: self.end,
            records_end: self.records_end,
            skipped_raws: Vec::new(),
            failed_creates: Vec::new(),
        }
    }
}

impl<R> Batch<R> {
    /// Its outcome so far (the rows mapping refused, as failed lines), its
    /// valid rows, and where it ends.
    fn split(self) -> (BatchOutcome, Vec<R>, Mark) {
        let mut outcome = BatchOutcome {
            first_line: self.first_line,
            last_line: self.last_line,
            ..BatchOutcome::default()
        };
        let mut rows = Vec::with_capacity(self.rows.len());
        for row in self.rows {
            match row {
                Ok(r) => rows.push(r),
                Err(f) => outcome.failed.push(*f),
            }
        }
        let mark = Mark {
            end: self.end,
            records_end: self.records_end,
        };
        (outcome, rows, mark)
    }
}

/// Most record bytes a batch holds before it is cut early: a batch of huge
/// rows stays a few MB in memory, never `batch_size` × 32 MB.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Progress of a run: in-memory counters and the committed checkpoint.
struct Tracker {
    progress: Progress,
    checkpoint: Checkpoint,
    /// The checkpoint's line when this run began.
    start_line: LineNo,
    /// The checkpoint's byte when this run began, and when it began.
    start_byte: u64,
    started: Instant,
    /// Whether byte offsets are the file's (not a transcoded file's): the
    /// time left is told from them.
    exact_offsets: bool,
    size: u64,
    last_save: Instant,
}

/// Seconds a run that began at byte `from` of a `size`-byte file and is at
/// byte `at` after `elapsed` still needs at that pace (pure); none before
/// it has run two seconds or read anything.
fn eta_seconds(elapsed: Duration, from: u64, at: u64, size: u64) -> Option<u64> {
    let done = at.checked_sub(from).filter(|&d| d > 0)?;
    if elapsed < Duration::from_secs(2) {
        return None;
    }
    let left = size.saturating_sub(at) as f64;
    Some((left * elapsed.as_secs_f64() / done as f64).ceil() as u64)
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
        size: 0,
        last_save: Instant::now(),
    };
    let max_attempts = svc.settings.scheduler.max_attempts;
    // The spec is read even past the attempts cap: the summary needs it.
    let spec = claim::spec_from_doc(&job.doc);
    let result = match &spec {
        // Cancelled while pending (or between attempts): nothing more is
        // written; what earlier attempts imported is reported.
        _ if job.doc.get_bool("cancel_requested") == Ok(true) => Err(Abort::Cancelled),
        _ if counted_attempts(&job.doc, lease.attempt) > i64::from(max_attempts) => {
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
    let of = match e.get("attempt") {
        Some(bson::Bson::Int64(n)) => *n,
        Some(bson::Bson::Int32(n)) => i64::from(*n),
        _ => return None,
    };
    (of == attempt)
        .then(|| e.get_str("message").ok().map(str::to_owned))
        .flatten()
}

/// Claims that count towards `scheduler.max_attempts`: all but those that
/// ended in a release on shutdown, or in a release after trouble once the
/// run had moved the checkpoint on (a long import meeting several outages
/// is not stuck; one that fails where it stands is).
pub fn counted_attempts(doc: &Document, attempt: i64) -> i64 {
    let n = |key: &str| match doc.get(key) {
        Some(bson::Bson::Int64(n)) => (*n).max(0),
        Some(bson::Bson::Int32(n)) => i64::from(*n).max(0),
        _ => 0,
    };
    attempt - n("shutdown_releases") - n("progress_releases")
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

fn progress_from_totals(t: Totals, before: Progress, outcome: &Final) -> Progress {
    let completed = matches!(outcome, Final::Completed);
    Progress {
        total_rows: if completed {
            Some(t.rows)
        } else {
            before.total_rows
        },
        processed_rows: t.rows,
        imported_rows: t.imported,
        updated_rows: t.updated,
        skipped_rows: t.skipped,
        failed_rows: t.failed,
        percent: if completed { 100.0 } else { before.percent },
        eta_seconds: None,
    }
}

fn progress_from_doc(doc: &Document) -> Progress {
    let Ok(p) = doc.get_document("progress") else {
        return Progress::default();
    };
    let n = |k: &str| {
        p.get(k)
            .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)))
            .map_or(0, |v| v as u64)
    };
    Progress {
        total_rows: None,
        processed_rows: n("processed_rows"),
        imported_rows: n("imported_rows"),
        updated_rows: n("updated_rows"),
        skipped_rows: n("skipped_rows"),
        failed_rows: n("failed_rows"),
        percent: p.get_f64("percent").unwrap_or(0.0),
        eta_seconds: None,
    }
}

/// Renews the lease every third of it until aborted (after the run's final
/// write), through cancellation and shutdown too, so the batches those let
/// finish are still written under a live lease. Watches cancellation and
/// shutdown; a lost lease, or one unrenewed for two thirds of it, stops
/// every write.
async fn heartbeat(lease: Lease, stop: Stop, shutdown: CancellationToken) {
    // Renew at a third of the lease so one missed heartbeat does not lose it.
    let period = lease.duration() / 3;
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    // When the last successful renewal was sent: the lease runs from then
    // at the latest.
    let mut renewed = Instant::now();
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                stop.trigger(STOP_SHUTDOWN);
                continue;
            }
            _ = ticker.tick() => {}
        }
        // One renewal, retried soon after a failure; every try bounded (a
        // hanging call cannot outlive the lease unnoticed) and none running
        // past two thirds of the lease since the last renewal: then writing
        // stops, a third of the lease before another daemon may claim.
        let cutoff = lease.duration() * 2 / 3;
        loop {
            if shutdown.is_cancelled() && !shutting_down {
                shutting_down = true;
                stop.trigger(STOP_SHUTDOWN);
            }
            let left = cutoff.saturating_sub(renewed.elapsed());
            if left.is_zero() {
                warn!("Lease not renewed for two thirds of it; stopping");
                stop.trigger(STOP_LEASE_LOST);
                return;
            }
            let sent = Instant::now();
            let beat = tokio::time::timeout((period / 2).min(left), lease.heartbeat())
                .await
                .unwrap_or_else(|_| Err(claim::Error::Timeout));
            match beat {
                Ok(hb) => {
                    renewed = sent;
                    if hb.cancel_requested && !stop.token.is_cancelled() {
                        info!("Cancellation requested");
                        stop.trigger(STOP_CANCELLED);
                    }
                    break;
                }
                Err(claim::Error::LeaseLost { .. }) => {
                    stop.trigger(STOP_LEASE_LOST);
                    return;
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "Heartbeat failed; retrying");
                    let pause = (period / 10).min(cutoff.saturating_sub(renewed.elapsed()));
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

async fn import(
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
    let reader = svc.storage.open(&spec.csv_key, 0, info.size).await?;
    let (headers, records) = parse::open(reader).await?;
    tracker.exact_offsets = records.dialect.encoding.offsets_are_exact();
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
        let reader = svc
            .storage
            .open(&spec.csv_key, resume.byte, info.size)
            .await?;
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
    lease
        .set_fields(doc! {
            "file_size": info.size as i64,
            "columns": &headers,
            "checkpoint.batch_size": batch_size as i64,
        })
        .await?;
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
            let mut sink =
                DealSink::new(svc, lease.queue_id, spec, pipeline_id, &plan, replayed).await?;
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
                writer: ContactWriter::new(svc.db.collection(collections::CONTACTS), spec),
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

/// Where the rows of a run come from.
struct Source {
    records: Records,
    batch_size: usize,
    max_rows: Option<u64>,
    /// Data records before the first one read (a resumed run's checkpoint).
    records_before: u64,
    /// Records to read and drop first (a resumed transcoded file).
    skip: u64,
}

/// Runs one step of the write loop (preparing a batch, which may retry its
/// stage lookups for a minute; settling or committing one) unless the
/// lease is lost first: then the run stops at once, and returning drops
/// the writes in flight, which aborts them.
async fn unless_lost<T>(
    stop: &Stop,
    step: impl std::future::Future<Output = Result<T, Abort>>,
) -> Result<T, Abort> {
    tokio::select! {
        biased;
        () = stop.lost.cancelled() => Err(Abort::LeaseLost),
        done = step => done,
    }
}

/// What writes the batches of one kind of record.
trait Sink<R> {
    /// Prepares `batch` and starts writing it in its own task.
    async fn start(&mut self, batch: Batch<R>) -> Result<AbortOnDropHandle<Written>, Abort>;
    /// Runs on each written batch, in file order, before it is committed.
    async fn settle(&mut self, _done: &mut Done) -> Result<(), Abort> {
        Ok(())
    }
    /// Over the row limit: takes back what the import wrote, if it can.
    /// Returns whether it did (else what was written stays, and is
    /// reported).
    async fn roll_back(&self) -> Result<bool, Abort>;
}

/// The shared context of one run's write loop.
struct Run<'a> {
    svc: &'a Services,
    lease: &'a Lease,
    stop: &'a Stop,
    channel: usize,
}

impl Run<'_> {
    /// Streams `source` through `map` into batches (a producer task), and
    /// writes them through `sink` with up to `writers` in flight,
    /// committing them in file order. Returns at the end of the file, or
    /// with the reason the run stopped.
    async fn drive<R, M, S>(
        &self,
        tracker: &mut Tracker,
        source: Source,
        map: M,
        writers: usize,
        sink: &mut S,
    ) -> Result<(), Abort>
    where
        R: Send + 'static,
        M: Fn(LineNo, &csv_async::ByteRecord) -> Result<R, Box<FailedRow>> + Send + 'static,
        S: Sink<R>,
    {
        let (svc, lease, stop) = (self.svc, self.lease, self.stop);
        let (tx, mut rx) = mpsc::channel::<Batch<R>>(self.channel);
        let producer = tokio::spawn(produce(source, map, tx, stop.token.clone()).in_current_span());
        let mut inflight = FuturesOrdered::new();
        let mut producer_done = false;
        let mut aborted: Option<Abort> = None;
        loop {
            if producer_done && inflight.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                _ = stop.token.cancelled(), if aborted.is_none() => {
                    aborted = Some(stop.abort());
                    break;
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    let mut done = joined(done)?;
                    unless_lost(stop, sink.settle(&mut done)).await?;
                    unless_lost(stop, commit(svc, lease, tracker, stop, &done)).await?;
                }
                batch = rx.recv(), if !producer_done && inflight.len() < writers => match batch {
                    Some(batch) => inflight.push_back(unless_lost(stop, sink.start(batch)).await?),
                    None => producer_done = true,
                },
            }
        }
        match aborted {
            Some(Abort::LeaseLost) => {
                // Stop writing at once: dropping the handles aborts the writes.
                drop(inflight);
                producer.abort();
                return Err(Abort::LeaseLost);
            }
            Some(reason) => {
                // Finish the batches already being written, then stop;
                // unless the lease is lost meanwhile.
                producer.abort();
                loop {
                    let done = tokio::select! {
                        biased;
                        _ = stop.lost.cancelled() => return Err(Abort::LeaseLost),
                        done = inflight.next() => match done {
                            Some(done) => done,
                            None => break,
                        },
                    };
                    let mut done = joined(done)?;
                    sink.settle(&mut done).await?;
                    commit(svc, lease, tracker, stop, &done).await?;
                }
                save(lease, tracker, stop).await?;
                return Err(reason);
            }
            None => {}
        }
        let total_records = match producer
            .await
            .map_err(|e| Abort::Transient(format!("parser task failed: {e}")))?
        {
            Err(Abort::File(FileError::TooManyRows { limit })) => {
                // Over the row limit: the import fails. Deals are taken back
                // (a split and re-imported file must not meet these rows
                // again); contacts may be shared by then, so they stay.
                return Err(Abort::File(if sink.roll_back().await? {
                    FileError::TooManyRows { limit }
                } else {
                    FileError::TooManyRowsKept { limit }
                }));
            }
            other => other?,
        };
        tracker.progress.total_rows = Some(total_records);
        info!(rows = total_records, "All rows written");
        Ok(())
    }
}

/// Writes a deals import: stages, duplicate strategy, contact links.
struct DealSink {
    db: Database,
    queue_id: ObjectId,
    writer: DealWriter,
    stages: StageCache,
    linker: Option<ContactLinker>,
    dedupe: Dedupe,
    /// Lines whose deal later rows of the same name matched, but whose
    /// write failed (see `settle_own`).
    failed_own: std::collections::HashSet<LineNo>,
    /// First lines of the batches an earlier run recorded (not written
    /// again: see [`reuse_deals`]).
    replayed: BTreeSet<LineNo>,
}

impl DealSink {
    async fn new(
        svc: &Services,
        queue_id: ObjectId,
        spec: &ImportSpec,
        pipeline_id: ObjectId,
        plan: &Plan,
        replayed: BTreeSet<LineNo>,
    ) -> Result<Self, Abort> {
        let stages = load_stages(svc, spec, pipeline_id).await?;
        let names = match spec.duplicate_strategy {
            DuplicateStrategy::Create => None,
            _ => Some(deal_names(svc, spec, pipeline_id).await?),
        };
        Ok(Self {
            db: svc.db.clone(),
            queue_id,
            writer: DealWriter::new(svc.db.collection(collections::DEALS), spec, pipeline_id),
            stages,
            linker: plan.links_contacts().then(|| {
                ContactLinker::new(&svc.db, spec, svc.settings.import.contact_cache.get())
            }),
            dedupe: Dedupe {
                strategy: spec.duplicate_strategy,
                names,
            },
            failed_own: std::collections::HashSet::new(),
            replayed,
        })
    }
}

impl Sink<MappedDeal> for DealSink {
    async fn start(
        &mut self,
        batch: Batch<MappedDeal>,
    ) -> Result<AbortOnDropHandle<Written>, Abort> {
        let replay = self.replayed.remove(&batch.first_line);
        let prepared = prepare(&self.writer, &mut self.stages, &mut self.dedupe, batch).await?;
        // Its own task: a write makes progress (reply, then the outcome
        // write) while the loop commits or prepares.
        Ok(AbortOnDropHandle::new(tokio::spawn(
            write_batch(
                self.db.clone(),
                self.writer.clone(),
                self.linker.clone(),
                self.queue_id,
                prepared,
                replay,
            )
            .in_current_span(),
        )))
    }

    async fn settle(&mut self, done: &mut Done) -> Result<(), Abort> {
        settle_own(
            &self.db,
            self.queue_id,
            &mut self.dedupe,
            &mut self.failed_own,
            done,
        )
        .await
    }

    async fn roll_back(&self) -> Result<bool, Abort> {
        // Under `skip` or `update` a re-import of the split file meets its
        // own deals by name (no duplicate), and the updates of existing
        // deals could not be taken back: what was written stays.
        if self.dedupe.strategy != DuplicateStrategy::Create {
            return Ok(false);
        }
        roll_back(&self.db, self.queue_id).await?;
        Ok(true)
    }
}

/// The names of the pipeline's deals, for `skip` / `update` matching.
async fn deal_names(
    svc: &Services,
    spec: &ImportSpec,
    pipeline_id: ObjectId,
) -> Result<NameIndex, Abort> {
    Ok(NameIndex::load(
        &svc.db.collection(collections::DEALS),
        spec.queue_id,
        spec.account_id,
        pipeline_id,
    )
    .await?)
}

/// A dry run's sink: records each line's outcome as a real run would (a
/// valid row would create a record, or, under `skip` / `update`, meet an
/// existing one: in the database or created by an earlier row of the
/// file), writes nothing else.
struct CheckSink {
    db: Database,
    queue_id: ObjectId,
    dupes: Option<CheckDupes>,
    /// Deals naming stages: the pipeline's, and those the import would
    /// create.
    stages: Option<StageCache>,
}

/// Duplicate matching of a dry run (see [`CheckSink`]).
struct CheckDupes {
    strategy: DuplicateStrategy,
    /// Deals: the pipeline's names, read as a real run reads them;
    /// contacts: the emails met so far.
    names: NameIndex,
    /// Contacts: the account whose contacts each batch's emails are
    /// looked up in.
    contacts_of: Option<ObjectId>,
}

impl CheckSink {
    async fn new(svc: &Services, spec: &ImportSpec, plan: &Plan) -> Result<Self, Abort> {
        let stages = match spec.pipeline_id {
            Some(pipeline_id) if plan.maps_stages() => {
                Some(load_stages(svc, spec, pipeline_id).await?)
            }
            _ => None,
        };
        let names = match (spec.kind, spec.duplicate_strategy, spec.pipeline_id) {
            (_, DuplicateStrategy::Create, _) => None,
            (RecordKind::Deals, _, Some(pipeline_id)) => {
                Some(deal_names(svc, spec, pipeline_id).await?)
            }
            _ => Some(NameIndex::empty(spec.queue_id)),
        };
        Ok(Self {
            db: svc.db.clone(),
            queue_id: spec.queue_id,
            dupes: names.map(|names| CheckDupes {
                strategy: spec.duplicate_strategy,
                names,
                contacts_of: (spec.kind == RecordKind::Contacts).then_some(spec.account_id),
            }),
            stages,
        })
    }

    /// Decides, in file order, what each valid row of a batch would do.
    async fn classify<R: Mapped>(
        &mut self,
        rows: &[R],
        outcome: &mut BatchOutcome,
    ) -> Result<(), Abort> {
        if let Some(d) = self.dupes.as_mut()
            && let Some(account_id) = d.contacts_of
        {
            let coll = self.db.collection(collections::CONTACTS);
            let emails: Vec<&str> = rows.iter().map(Mapped::match_key).collect();
            let found = (|| crate::contacts::contact_ids(&coll, account_id, &emails))
                .retry(write_retry())
                .when(crate::db::is_transient)
                .await?;
            for (email, id) in &found {
                d.names.remember(email, *id);
            }
        }
        let mut refused = false;
        for r in rows {
            // As a real run: the duplicate decision first (a row to skip
            // names no stage), then the stage of a row to create or update.
            let decided = match self.dupes.as_mut() {
                None => Match::Create,
                Some(d) => match (d.names.decide(r.line(), r.match_key()), d.strategy) {
                    (Match::Existing(id), DuplicateStrategy::Skip) => {
                        outcome.skipped.push((r.line(), id));
                        continue;
                    }
                    (decided, _) => decided,
                },
            };
            if let (Some(stages), Some(stage)) = (self.stages.as_mut(), r.stage())
                && let Err(crate::stages::Error::Limit(limit)) = stages.preview(stage)
            {
                // One new stage too many: the row fails, and creates no
                // deal later rows of its name could match.
                if let Some(d) = self.dupes.as_mut() {
                    d.names.forget(r.line(), r.match_key());
                }
                outcome
                    .failed
                    .push(stage_limit_row(r.line(), stage, r.cells(), limit));
                refused = true;
                continue;
            }
            match decided {
                Match::Create => outcome.imported.push(r.line()),
                Match::Existing(id) => outcome.updated.push((r.line(), id)),
            }
        }
        if refused {
            outcome.failed.sort_by_key(|f| f.error.line);
        }
        Ok(())
    }
}

impl<R: Mapped + Send + 'static> Sink<R> for CheckSink {
    async fn start(&mut self, batch: Batch<R>) -> Result<AbortOnDropHandle<Written>, Abort> {
        let (mut outcome, rows, mark) = batch.split();
        // Here, in file order, not in the spawned task.
        self.classify(&rows, &mut outcome).await?;
        drop(rows);
        let (db, queue_id) = (self.db.clone(), self.queue_id);
        Ok(AbortOnDropHandle::new(tokio::spawn(
            async move {
                record_outcome(&db, queue_id, &outcome).await?;
                Ok(mark.done(outcome))
            }
            .in_current_span(),
        )))
    }

    async fn roll_back(&self) -> Result<bool, Abort> {
        delete_outcomes(&self.db, self.queue_id).await?;
        Ok(true)
    }
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

/// Writes a contacts import.
struct ContactSink {
    db: Database,
    writer: ContactWriter,
    queue_id: ObjectId,
    /// First lines of the batches an earlier run recorded.
    replayed: BTreeSet<LineNo>,
}

impl Sink<MappedContact> for ContactSink {
    async fn start(
        &mut self,
        batch: Batch<MappedContact>,
    ) -> Result<AbortOnDropHandle<Written>, Abort> {
        let replay = self.replayed.remove(&batch.first_line);
        Ok(AbortOnDropHandle::new(tokio::spawn(
            write_contacts(
                self.db.clone(),
                self.writer.clone(),
                self.queue_id,
                batch,
                replay,
            )
            .in_current_span(),
        )))
    }

    async fn roll_back(&self) -> Result<bool, Abort> {
        // Other imports may already link to, skip against or update the
        // contacts it created: they stay, with their line outcomes.
        Ok(false)
    }
}

/// Writes a batch of contacts, then stores its outcomes; retried as a whole
/// on transient errors (both steps are idempotent). A `replay`ed batch an
/// earlier run recorded is not written again: its outcomes stand.
async fn write_contacts(
    db: Database,
    writer: ContactWriter,
    queue_id: ObjectId,
    batch: Batch<MappedContact>,
    replay: bool,
) -> Written {
    let started = Instant::now();
    let (mut outcome, rows, mark) = batch.split();
    if replay && let Some(recorded) = recorded_batch(&db, queue_id, outcome.first_line).await? {
        if reuse_contacts(&mut outcome, &rows, &recorded) {
            metrics::counter!(m::BATCHES_REUSED).increment(1);
            return Ok(mark.done(outcome));
        }
        warn!("The recorded outcomes do not cover the batch; writing it again");
    }
    let results = (|| writer.write(&rows))
        .retry(write_retry())
        .when(|e| e.is_transient())
        .notify(|e, d| warn!(error = %error_chain(e), delay_ms = d.as_millis() as u64, "Contact batch write failed; retrying"))
        .await
        .map_err(|e| Abort::Transient(error_chain(&e)))?;
    for (c, result) in rows.iter().zip(results) {
        match result {
            ContactWrite::Created | ContactWrite::AlreadyImported => outcome.imported.push(c.line),
            // Superseded: its first run applied it (else the batch's
            // outcomes would be recorded and not written again).
            ContactWrite::Updated(id) | ContactWrite::Superseded(id) => {
                outcome.updated.push((c.line, id));
            }
            ContactWrite::Skipped(id) => outcome.skipped.push((c.line, id)),
            ContactWrite::Rejected(message) => {
                outcome.failed.push(rejected_row(c.line, message, &c.raw));
            }
        }
    }
    outcome.contacts_created = outcome.imported.len() as u64;
    outcome.failed.sort_by_key(|f| f.error.line);
    record_outcome(&db, queue_id, &outcome).await?;
    metrics::histogram!(m::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(mark.done(outcome))
}

/// Completes `outcome` (its mapping failures) with the outcomes an earlier
/// run recorded for `rows` (pure). Returns false, leaving `outcome` as it
/// was, unless the record is of the same lines and covers every row.
fn reuse_contacts(
    outcome: &mut BatchOutcome,
    rows: &[MappedContact],
    recorded: &RecordedBatch,
) -> bool {
    if recorded.last_line != Some(outcome.last_line) {
        return false;
    }
    let Some(found) = rows
        .iter()
        .map(|c| recorded.outcome(c.line))
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    for (c, found) in rows.iter().zip(found) {
        match found {
            LineOutcome::Imported { .. } => outcome.imported.push(c.line),
            LineOutcome::Updated { id } => outcome.updated.push((c.line, id)),
            LineOutcome::Skipped { id } => outcome.skipped.push((c.line, id)),
            LineOutcome::Failed(f) => outcome.failed.push(f.to_failed_row(c.raw.to_cells())),
        }
    }
    outcome.contacts_created = outcome.imported.len() as u64;
    outcome.failed.sort_by_key(|f| f.error.line);
    true
}

/// A written batch.
struct Done {
    outcome: BatchOutcome,
    /// Where reading resumes after it.
    end: Start,
    /// Data records read through it.
    records_end: u64,
    /// Per `outcome.skipped`: the record, when it matched a deal an earlier
    /// row of this import was to create.
    skipped_raws: Vec<Option<RawCells>>,
    /// Rows that were to create a deal and failed: `(line, name)`.
    failed_creates: Vec<(LineNo, String)>,
}

type Written = Result<Done, Abort>;

/// The result of a batch writer task (a panic is a transient failure: the
/// lease is released and the batch is written again by the next attempt).
fn joined(done: Result<Written, tokio::task::JoinError>) -> Written {
    done.map_err(|e| Abort::Transient(format!("batch writer task failed: {e}")))?
}

/// Deletes the deals this import created and its per-line outcomes
/// (idempotent: a retry or a later attempt deletes what is left).
async fn roll_back(db: &Database, queue_id: ObjectId) -> Result<(), Abort> {
    let deleted = (|| write::delete_created(db, queue_id))
        .retry(write_retry())
        .when(|e| e.is_transient())
        .await
        .map_err(|e| Abort::Transient(error_chain(&e)))?;
    delete_outcomes(db, queue_id).await?;
    warn!(deleted, "Import over the row limit: its deals were removed");
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

/// Reads, maps and batches rows until the end of the file.
async fn produce<R, M>(
    source: Source,
    map: M,
    tx: mpsc::Sender<Batch<R>>,
    stop: CancellationToken,
) -> Result<u64, Abort>
where
    M: Fn(LineNo, &csv_async::ByteRecord) -> Result<R, Box<FailedRow>>,
{
    let Source {
        mut records,
        batch_size,
        max_rows,
        records_before,
        mut skip,
    } = source;
    let mut count = records_before;
    let mut batch: Option<Batch<R>> = None;
    loop {
        let Some(record) = records.next().await? else {
            break;
        };
        if record
            .fields
            .iter()
            .all(|f| f.iter().all(u8::is_ascii_whitespace))
        {
            // A blank line, or one of empty cells only (`,,,,`: spreadsheet
            // exports add them below the data), is not a row (nor counted
            // in the checkpoint's records, so not in `skip` either).
            continue;
        }
        if skip > 0 {
            skip -= 1;
            continue;
        }
        count += 1;
        if let Some(limit) = max_rows
            && count > limit
        {
            // The rows up to the limit are written (and taken back, or
            // kept, by the sink) like any others.
            if let Some(last) = batch.take() {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tx.send(last) => {}
                }
            }
            return Err(Abort::File(FileError::TooManyRows { limit }));
        }
        let line = record.line;
        // Field bytes plus a per-field cost (a row of 100,000 empty fields
        // still weighs): what the batch holds of it, about.
        let bytes = record.fields.as_slice().len() + 8 * record.fields.len();
        let row = map(line, record.fields);
        let end = Start {
            line: record.next_line,
            byte: record.end_byte,
        };
        let b = batch.get_or_insert_with(|| Batch {
            rows: Vec::with_capacity(batch_size),
            first_line: line,
            last_line: line,
            end,
            records_end: count,
            bytes: 0,
        });
        b.rows.push(row);
        b.last_line = line;
        b.end = end;
        b.records_end = count;
        b.bytes += bytes;
        // Cut by rows, or early by bytes (a file of huge rows): both depend
        // only on the records from the batch's start, so a resumed run cuts
        // the same batches.
        if b.rows.len() >= batch_size || b.bytes >= MAX_BATCH_BYTES {
            let full = batch.take().expect("batch was just filled");
            tokio::select! {
                _ = stop.cancelled() => return Ok(count),
                sent = tx.send(full) => if sent.is_err() { return Ok(count) },
            }
        }
    }
    if let Some(last) = batch.take() {
        let _ = tx.send(last).await;
    }
    Ok(count)
}

/// A batch ready to write: documents of the valid rows, failed rows aside.
struct Prepared {
    docs: Vec<RawDocumentBuf>,
    lines: Vec<LineNo>,
    /// The records of `docs`, for the report of a line the database refuses.
    raws: Vec<RawCells>,
    /// The contact each of `docs` names.
    contacts: Vec<Option<Contact>>,
    /// `(line, existing deal, $set, record)` for `duplicate_strategy: update`.
    updates: Vec<(LineNo, ObjectId, RawDocumentBuf, RawCells)>,
    /// The contact each of `updates` names.
    update_contacts: Vec<Option<Contact>>,
    /// `(line, existing deal)` for `duplicate_strategy: skip`.
    skipped: Vec<(LineNo, ObjectId)>,
    /// Per `skipped`: the record, when the deal matched is one an earlier
    /// row of this import creates (its write may yet fail).
    skipped_raws: Vec<Option<RawCells>>,
    failed: Vec<FailedRow>,
    first_line: LineNo,
    last_line: LineNo,
    end: Start,
    records_end: u64,
}

/// A deal's contact: email, then name.
type Contact = (String, Option<String>);

/// Duplicate handling of one import: the strategy and, unless it is
/// `create`, the names of the pipeline's deals.
struct Dedupe {
    strategy: DuplicateStrategy,
    names: Option<NameIndex>,
}

async fn prepare(
    writer: &DealWriter,
    stages: &mut StageCache,
    dedupe: &mut Dedupe,
    batch: Batch<MappedDeal>,
) -> Result<Prepared, Abort> {
    let now = DateTime::now();
    let mut docs = Vec::with_capacity(batch.rows.len());
    let mut lines = Vec::with_capacity(batch.rows.len());
    let mut raws = Vec::with_capacity(batch.rows.len());
    let mut contacts = Vec::with_capacity(batch.rows.len());
    let mut updates = Vec::new();
    let mut update_contacts = Vec::new();
    let mut skipped = Vec::new();
    let mut skipped_raws = Vec::new();
    let mut failed = Vec::new();
    for row in batch.rows {
        match row {
            Ok(mut deal) => {
                let existing = match dedupe
                    .names
                    .as_mut()
                    .map(|n| n.decide(deal.line, &deal.name))
                {
                    Some(Match::Existing(id)) => Some(id),
                    _ => None,
                };
                if let (Some(id), DuplicateStrategy::Skip) = (existing, dedupe.strategy) {
                    let own = dedupe.names.as_ref().is_some_and(|n| n.is_own(&id));
                    skipped.push((deal.line, id));
                    skipped_raws.push(own.then(|| std::mem::take(&mut deal.raw)));
                    continue;
                }
                let stage_id = match &deal.stage {
                    Some(stage) => match resolve_stage(stages, stage).await? {
                        Ok(id) => Some(id),
                        Err(limit) => {
                            // Not created: later rows of its name must not
                            // match it.
                            if let Some(names) = dedupe.names.as_mut() {
                                names.forget(deal.line, &deal.name);
                            }
                            let cells = std::mem::take(&mut deal.raw).to_cells();
                            failed.push(stage_limit_row(deal.line, stage, cells, limit));
                            continue;
                        }
                    },
                    None => None,
                };
                if let Some(id) = existing {
                    let set = writer.builder().update_fields(&deal, stage_id, now);
                    updates.push((deal.line, id, set, std::mem::take(&mut deal.raw)));
                    update_contacts.push(contact_of(&mut deal));
                    continue;
                }
                let doc = writer.builder().build(&deal, stage_id, now).map_err(|e| {
                    Abort::File(FileError::Malformed {
                        line: deal.line,
                        detail: e.to_string(),
                    })
                })?;
                lines.push(deal.line);
                raws.push(std::mem::take(&mut deal.raw));
                contacts.push(contact_of(&mut deal));
                docs.push(doc);
            }
            Err(f) => failed.push(*f),
        }
    }
    Ok(Prepared {
        docs,
        lines,
        raws,
        contacts,
        updates,
        update_contacts,
        skipped,
        skipped_raws,
        failed,
        first_line: batch.first_line,
        last_line: batch.last_line,
        end: batch.end,
        records_end: batch.records_end,
    })
}

/// The contact a deal names (its email is the key; a name alone links
/// nothing and stays on the deal as text).
fn contact_of(deal: &mut MappedDeal) -> Option<Contact> {
    let email = deal.contact_email.take()?;
    Some((email, deal.contact_name.take()))
}

/// The stage's id, or `Err(limit)` if it would be one new stage too many.
async fn resolve_stage(
    stages: &mut StageCache,
    stage: &crate::map::StageName,
) -> Result<Result<ObjectId, usize>, Abort> {
    let mut delays = write_retry().build();
    loop {
        match stages.resolve(stage).await {
            Ok(id) => return Ok(Ok(id)),
            Err(crate::stages::Error::Limit(limit)) => return Ok(Err(limit)),
            Err(e) if e.is_transient() => match delays.next() {
                Some(d) => {
                    warn!(error = %error_chain(&e), "Stage lookup failed; retrying");
                    tokio::time::sleep(d).await;
                }
                None => return Err(Abort::Transient(error_chain(&e))),
            },
            Err(e) => return Err(Abort::Transient(error_chain(&e))),
        }
    }
}

/// The stages of the import's pipeline, as its run (or check) resolves
/// them, under `import.max_new_stages`.
async fn load_stages(
    svc: &Services,
    spec: &ImportSpec,
    pipeline_id: ObjectId,
) -> Result<StageCache, Abort> {
    Ok(StageCache::load(
        &svc.db,
        spec.account_id,
        pipeline_id,
        spec.user_id,
        spec.queue_id,
        svc.settings.import.max_new_stages,
    )
    .await?)
}

/// Lists the stages the import created (or, a dry run, would create) on
/// its queue document: at most `max_new_stages` labels, each cut short, so
/// far below 16 MB.
async fn record_stages(lease: &Lease, stages: &StageCache) -> Result<(), Abort> {
    if stages.created().is_empty() {
        return Ok(());
    }
    let labels: Vec<String> = stages
        .created()
        .iter()
        .map(|l| crate::domain::truncate_value(l))
        .collect();
    lease.set_fields(doc! { "stages_created": labels }).await?;
    Ok(())
}

/// The failed line of a deal whose stage would be new past the import's
/// limit of `limit` new stages.
fn stage_limit_row(
    line: LineNo,
    stage: &crate::map::StageName,
    cells: Vec<String>,
    limit: usize,
) -> FailedRow {
    FailedRow {
        error: crate::domain::RowError {
            line,
            code: crate::domain::RowCode::TooManyStages,
            field: Some("stage_id".into()),
            value: Some(crate::domain::truncate_value(&stage.label)),
            message: format!(
                "Not imported: its stage would be new, and this import already has {limit} \
                 new stages, as many as one import may create. Is the right column mapped to \
                 the stage?"
            ),
        },
        cells,
    }
}

/// Inserts a batch's deals, then stores its outcomes; retried as a whole on
/// transient errors (both steps are idempotent). A `replay`ed batch an
/// earlier run recorded is not written again: its outcomes stand.
async fn write_batch(
    db: Database,
    writer: DealWriter,
    linker: Option<ContactLinker>,
    queue_id: ObjectId,
    mut p: Prepared,
    replay: bool,
) -> Written {
    let started = Instant::now();
    if replay && let Some(recorded) = recorded_batch(&db, queue_id, p.first_line).await? {
        if covers(&p, &recorded) {
            metrics::counter!(m::BATCHES_REUSED).increment(1);
            return Ok(reuse_deals(p, &recorded));
        }
        warn!("The recorded outcomes do not cover the batch; writing it again");
    }
    let (contacts_created, refused, mut failed_creates) = match &linker {
        Some(linker) => link_contacts(linker, &mut p).await?,
        None => (0, Vec::new(), Vec::new()),
    };
    let results = (|| writer.insert(&p.docs, &p.lines))
        .retry(write_retry())
        .when(|e| e.is_transient())
        .notify(|e, d| warn!(error = %error_chain(e), delay_ms = d.as_millis() as u64, "Batch write failed; retrying"))
        .await
        .map_err(|e| Abort::Transient(error_chain(&e)))?;
    let sets: Vec<(ObjectId, &RawDocumentBuf)> =
        p.updates.iter().map(|(_, id, set, _)| (*id, set)).collect();
    // After the inserts, never beside them: a row may update the deal an
    // earlier row of the same batch creates.
    let update_results = (|| writer.update(&sets))
        .retry(write_retry())
        .when(|e| e.is_transient())
        .notify(|e, _| warn!(error = %error_chain(e), "Update failed; retrying"))
        .await
        .map_err(|e| Abort::Transient(error_chain(&e)))?;
    let mut outcome = BatchOutcome {
        first_line: p.first_line,
        last_line: p.last_line,
        imported: Vec::with_capacity(p.lines.len()),
        updated: Vec::new(),
        skipped: p.skipped,
        failed: p.failed,
        contacts_created,
    };
    outcome.failed.extend(refused);
    for (((line, result), raw), doc) in p.lines.iter().zip(results).zip(&p.raws).zip(&p.docs) {
        match result {
            LineWrite::Rejected(message) => {
                outcome.failed.push(rejected_row(*line, message, raw));
                failed_creates.push((*line, doc.get_str("name").unwrap_or_default().to_owned()));
            }
            _ => outcome.imported.push(*line),
        }
    }
    for ((line, id, _, raw), result) in p.updates.iter().zip(update_results) {
        match result {
            LineWrite::Rejected(message) => outcome.failed.push(rejected_row(*line, message, raw)),
            // Superseded: its first run applied it (else the batch's
            // outcomes would be recorded and not written again).
            _ => outcome.updated.push((*line, *id)),
        }
    }
    outcome.failed.sort_by_key(|f| f.error.line);
    record_outcome(&db, queue_id, &outcome).await?;
    metrics::histogram!(m::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(Done {
        outcome,
        end: p.end,
        records_end: p.records_end,
        skipped_raws: p.skipped_raws,
        failed_creates,
    })
}

/// The batch `p` as an earlier run recorded it (pure). The record is the
/// final word on each line it holds: the rows to insert or update take
/// their recorded outcomes (replayed now, an update would undo what changed
/// since, and a row refused then could update the deal a later row of its
/// name created since); this run's duplicates and mapping failures stand
/// where the record agrees or is silent. For a record that [`covers`] `p`.
fn reuse_deals(p: Prepared, recorded: &RecordedBatch) -> Done {
    let mut done = Done {
        outcome: BatchOutcome {
            first_line: p.first_line,
            last_line: p.last_line,
            imported: Vec::with_capacity(p.lines.len()),
            contacts_created: recorded.contacts_created,
            ..BatchOutcome::default()
        },
        end: p.end,
        records_end: p.records_end,
        skipped_raws: Vec::new(),
        failed_creates: Vec::new(),
    };
    for ((line, raw), doc) in p.lines.iter().zip(&p.raws).zip(&p.docs) {
        if let Some(found) = recorded.outcome(*line) {
            if matches!(found, LineOutcome::Failed(_)) {
                let name = doc.get_str("name").unwrap_or_default();
                done.failed_creates.push((*line, name.to_owned()));
            }
            add_recorded(&mut done, *line, found, Some(raw));
        }
    }
    for (line, _, _, raw) in &p.updates {
        if let Some(found) = recorded.outcome(*line) {
            add_recorded(&mut done, *line, found, Some(raw));
        }
    }
    for ((line, id), raw) in p.skipped.into_iter().zip(p.skipped_raws) {
        match recorded.outcome(line) {
            Some(found @ (LineOutcome::Imported { .. } | LineOutcome::Updated { .. })) => {
                add_recorded(&mut done, line, found, None);
            }
            Some(LineOutcome::Failed(f)) => {
                let raw = raw.unwrap_or_default();
                add_recorded(&mut done, line, LineOutcome::Failed(f), Some(&raw));
            }
            _ => {
                done.outcome.skipped.push((line, id));
                done.skipped_raws.push(raw);
            }
        }
    }
    for f in p.failed {
        match recorded.outcome(f.error.line) {
            Some(LineOutcome::Failed(_)) | None => done.outcome.failed.push(f),
            Some(found) => add_recorded(&mut done, f.error.line, found, None),
        }
    }
    done.outcome.failed.sort_by_key(|f| f.error.line);
    done
}

/// Adds `line`'s recorded outcome to `done`; a failed line keeps the cells
/// of `raw`.
fn add_recorded(done: &mut Done, line: LineNo, found: LineOutcome, raw: Option<&RawCells>) {
    let outcome = &mut done.outcome;
    match found {
        LineOutcome::Imported { .. } => outcome.imported.push(line),
        LineOutcome::Updated { id } => outcome.updated.push((line, id)),
        LineOutcome::Skipped { id } => {
            outcome.skipped.push((line, id));
            done.skipped_raws.push(None);
        }
        LineOutcome::Failed(f) => {
            let cells = raw.map(RawCells::to_cells).unwrap_or_default();
            outcome.failed.push(f.to_failed_row(cells));
        }
    }
}

/// Whether `recorded` is the record of batch `p` (pure): the same lines,
/// and for every row to insert or update an outcome this run agrees could
/// be its own. A row this run creates that the record says skipped or
/// updated a deal: that deal is not in the pipeline now (its row failed
/// after all, or it was deleted since), and the batch is written again.
fn covers(p: &Prepared, recorded: &RecordedBatch) -> bool {
    let creates = p.lines.iter().all(|line| {
        matches!(
            recorded.outcome(*line),
            Some(LineOutcome::Imported { .. } | LineOutcome::Failed(_))
        )
    });
    let updates = p.updates.iter().all(|(line, ..)| {
        matches!(
            recorded.outcome(*line),
            Some(
                LineOutcome::Updated { .. } | LineOutcome::Imported { .. } | LineOutcome::Failed(_)
            )
        )
    });
    recorded.last_line == Some(p.last_line) && creates && updates
}

/// A row that was to create a deal and failed must not stand as the deal
/// later rows of the same name are duplicates of (`skip` would drop them
/// silently). Runs as batches complete, in file order: the failed row's
/// name is forgotten, so batches prepared from now on create it again, and
/// rows of this or an in-flight batch already skipped against it become
/// failed lines, with their cells, in the report.
async fn settle_own(
    db: &Database,
    queue_id: ObjectId,
    dedupe: &mut Dedupe,
    failed_own: &mut std::collections::HashSet<LineNo>,
    done: &mut Done,
) -> Result<(), Abort> {
    let Some(names) = dedupe.names.as_mut() else {
        return Ok(());
    };
    for (line, name) in &done.failed_creates {
        if names.forget(*line, name) {
            failed_own.insert(*line);
        }
    }
    if failed_own.is_empty() {
        return Ok(());
    }
    let outcome = &mut done.outcome;
    let mut moved = false;
    let mut kept = Vec::with_capacity(outcome.skipped.len());
    let raws = std::mem::take(&mut done.skipped_raws);
    for ((line, id), raw) in outcome.skipped.drain(..).zip(raws) {
        match (crate::domain::line_of_deal_id(&queue_id, &id), raw) {
            (Some(of), Some(raw)) if failed_own.contains(&of) => {
                moved = true;
                outcome.failed.push(FailedRow {
                    error: crate::domain::RowError {
                        line,
                        code: crate::domain::RowCode::WriteRejected,
                        field: None,
                        value: None,
                        message: format!(
                            "Not imported: it repeats the name of line {of}, which failed."
                        ),
                    },
                    cells: raw.to_cells(),
                });
            }
            _ => kept.push((line, id)),
        }
    }
    outcome.skipped = kept;
    if moved {
        outcome.failed.sort_by_key(|f| f.error.line);
        record_outcome(db, queue_id, outcome).await?;
    }
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

/// Links each deal of the batch to its contact, creating the missing ones,
/// and adds `contact_id` to its document (or its `$set`). A line whose
/// contact the database refuses leaves the batch as a failed line. Returns
/// the contacts created and those lines.
async fn link_contacts(
    linker: &ContactLinker,
    p: &mut Prepared,
) -> Result<(u64, Vec<FailedRow>, Vec<(LineNo, String)>), Abort> {
    let refs: Vec<ContactRef<'_>> = p
        .lines
        .iter()
        .zip(&p.contacts)
        .chain(p.updates.iter().map(|u| &u.0).zip(&p.update_contacts))
        .filter_map(|(line, c)| {
            c.as_ref().map(|(email, name)| ContactRef {
                line: *line,
                email,
                name: name.as_deref(),
            })
        })
        .collect();
    if refs.is_empty() {
        return Ok((0, Vec::new(), Vec::new()));
    }
    let linked = (|| linker.link(&refs))
        .retry(write_retry())
        .when(|e| e.is_transient())
        .notify(|e, _| warn!(error = %error_chain(e), "Contact lookup failed; retrying"))
        .await
        .map_err(|e| Abort::Transient(error_chain(&e)))?;
    drop(refs);
    let mut links = linked.links.into_iter();
    let mut refused = Vec::new();
    let mut refused_names = Vec::new();
    let mut keep = vec![true; p.docs.len()];
    for (i, contact) in p.contacts.iter().enumerate() {
        match (contact, contact.as_ref().and_then(|_| links.next())) {
            (Some(_), Some(Linked::Contact(id))) => p.docs[i].append("contact_id", id),
            (Some(_), Some(Linked::Refused(message))) => {
                keep[i] = false;
                refused.push(rejected_row(p.lines[i], message, &p.raws[i]));
                let name = p.docs[i].get_str("name").unwrap_or_default();
                refused_names.push((p.lines[i], name.to_owned()));
            }
            _ => {}
        }
    }
    retain_by(&mut p.docs, &keep);
    retain_by(&mut p.lines, &keep);
    retain_by(&mut p.raws, &keep);
    retain_by(&mut p.contacts, &keep);
    let mut keep = vec![true; p.updates.len()];
    for (i, contact) in p.update_contacts.iter().enumerate() {
        let (line, _, set, raw) = &mut p.updates[i];
        match (contact, contact.as_ref().and_then(|_| links.next())) {
            (Some(_), Some(Linked::Contact(id))) => set.append("contact_id", id),
            (Some(_), Some(Linked::Refused(message))) => {
                keep[i] = false;
                refused.push(rejected_row(*line, message, raw));
            }
            _ => {}
        }
    }
    retain_by(&mut p.updates, &keep);
    retain_by(&mut p.update_contacts, &keep);
    Ok((linked.created, refused, refused_names))
}

/// Keeps the items of `v` whose flag in `keep` is set.
fn retain_by<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut flags = keep.iter();
    v.retain(|_| flags.next().copied().unwrap_or(true));
}

/// Counts a committed batch and saves progress at most every interval.
async fn commit(
    svc: &Services,
    lease: &Lease,
    tracker: &mut Tracker,
    stop: &Stop,
    done: &Done,
) -> Result<(), Abort> {
    let (outcome, end, records_end) = (&done.outcome, done.end, done.records_end);
    for (label, n) in [
        ("imported", outcome.imported.len()),
        ("updated", outcome.updated.len()),
        ("skipped", outcome.skipped.len()),
        ("failed", outcome.failed.len()),
    ] {
        if n > 0 {
            metrics::counter!(m::ROWS, "outcome" => label).increment(n as u64);
        }
    }
    let p = &mut tracker.progress;
    p.imported_rows += outcome.imported.len() as u64;
    p.failed_rows += outcome.failed.len() as u64;
    p.updated_rows += outcome.updated.len() as u64;
    p.skipped_rows += outcome.skipped.len() as u64;
    p.processed_rows = p.imported_rows + p.updated_rows + p.skipped_rows + p.failed_rows;
    if tracker.size > 0 {
        p.percent = (end.byte as f64 / tracker.size as f64 * 100.0).min(99.9);
        p.eta_seconds = tracker
            .exact_offsets
            .then(|| {
                eta_seconds(
                    tracker.started.elapsed(),
                    tracker.start_byte,
                    end.byte,
                    tracker.size,
                )
            })
            .flatten();
    }
    tracker.checkpoint = Checkpoint {
        line: end.line,
        byte: end.byte,
        records: records_end,
        batch_size: tracker.checkpoint.batch_size,
    };
    if tracker.last_save.elapsed() >= svc.settings.import.progress_interval {
        save(lease, tracker, stop).await?;
    }
    Ok(())
}

async fn save(lease: &Lease, tracker: &mut Tracker, stop: &Stop) -> Result<(), Abort> {
    // Bounded like a heartbeat: a database that does not answer must not
    // hold the run (and its writers) past the point its lease is lost.
    let saved = tokio::time::timeout(
        lease.duration() / 3,
        lease.save_progress(tracker.progress, tracker.checkpoint),
    )
    .await
    .unwrap_or(Err(claim::Error::Timeout));
    match saved {
        Ok(hb) => {
            tracker.last_save = Instant::now();
            if hb.cancel_requested {
                info!("Cancellation requested");
                stop.trigger(STOP_CANCELLED);
            }
            Ok(())
        }
        Err(claim::Error::LeaseLost { .. }) => Err(Abort::LeaseLost),
        Err(e) => {
            // Progress is advisory; the next save carries it.
            warn!(error = %error_chain(&e), "Progress save failed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_all_claims_but_clean_releases() {
        assert_eq!(counted_attempts(&doc! {}, 3), 3);
        let d = doc! { "shutdown_releases": 1_i64, "progress_releases": 2_i32 };
        assert_eq!(counted_attempts(&d, 6), 3);
        assert_eq!(
            counted_attempts(&doc! { "progress_releases": -4_i64 }, 2),
            2
        );
    }

    /// A resumed batch an earlier run recorded: every line it holds takes
    /// its recorded outcome, whatever this run decided; a refused create
    /// is handed on so later rows of its name do not match it.
    #[test]
    fn a_recorded_batch_is_reused_line_by_line() {
        let q = ObjectId::new();
        let (existing, other) = (ObjectId::new(), ObjectId::new());
        let cells = |v: &str| RawCells::copy(&[v][..]);
        let mut doc = RawDocumentBuf::new();
        doc.append("name", "Zed");
        let mapping_failure = FailedRow {
            error: crate::domain::RowError {
                line: 7,
                code: crate::domain::RowCode::Required,
                field: Some("name".into()),
                value: None,
                message: "A name is required.".into(),
            },
            cells: vec![String::new()],
        };
        // This run: creates 2 and 3, updates 4 (as line 4 of the first
        // run refused, the deal line 6 created since has its name), skips
        // 5 and 6, line 7 fails to map.
        let p = Prepared {
            docs: vec![doc.clone(), doc],
            lines: vec![2, 3],
            raws: vec![cells("a"), cells("b")],
            contacts: vec![None, None],
            updates: vec![(4, other, RawDocumentBuf::new(), cells("d"))],
            update_contacts: vec![None],
            skipped: vec![(5, existing), (6, existing)],
            skipped_raws: vec![None, Some(cells("f"))],
            failed: vec![mapping_failure.clone()],
            first_line: 2,
            last_line: 7,
            end: Start { line: 8, byte: 99 },
            records_end: 6,
        };
        let stage = crate::map::StageName {
            key: "nine".into(),
            label: "Nine".into(),
        };
        let first_run = BatchOutcome {
            first_line: 2,
            last_line: 7,
            imported: vec![2, 6],
            updated: vec![],
            skipped: vec![(5, existing)],
            failed: vec![
                stage_limit_row(3, &stage, vec!["b".into()], 8),
                rejected_row(4, "refused too".into(), &cells("d")),
                mapping_failure,
            ],
            contacts_created: 1,
        };
        let recorded_stage_message = first_run.failed[0].error.message.clone();
        let recorded =
            RecordedBatch::from_doc(q, &outcomes::batch_document(q, &first_run).unwrap());
        assert!(covers(&p, &recorded));
        let done = reuse_deals(p, &recorded);
        let o = &done.outcome;
        assert_eq!(o.imported, [2, 6]);
        assert!(o.updated.is_empty());
        assert_eq!(o.skipped, [(5, existing)]);
        assert_eq!(done.skipped_raws, [None]);
        let failed: Vec<(LineNo, &str)> = o
            .failed
            .iter()
            .map(|f| (f.error.line, f.error.message.as_str()))
            .collect();
        assert_eq!(
            failed,
            [
                (3, recorded_stage_message.as_str()),
                (4, "refused too"),
                (7, "A name is required.")
            ]
        );
        // Recorded failures keep their code and field, and this run's cells.
        assert_eq!(o.failed[0].cells, ["b"]);
        assert_eq!(
            o.failed[0].error.code,
            crate::domain::RowCode::TooManyStages
        );
        assert_eq!(o.failed[0].error.field.as_deref(), Some("stage_id"));
        assert_eq!(
            o.failed[1].error.code,
            crate::domain::RowCode::WriteRejected
        );
        assert_eq!(o.failed[2].error.code, crate::domain::RowCode::Required);
        assert_eq!(o.contacts_created, 1);
        assert_eq!(done.failed_creates, [(3, "Zed".to_owned())]);
        assert_eq!(done.end.line, 8);
        // Not covered: a record of other lines, one silent on a row to
        // write, one that says a row this run creates was a duplicate (the
        // deal it matched is not there now).
        let lines_only = |lines: Vec<LineNo>, last_line| Prepared {
            docs: vec![],
            lines,
            raws: vec![],
            contacts: vec![],
            updates: vec![],
            update_contacts: vec![],
            skipped: vec![],
            skipped_raws: vec![],
            failed: vec![],
            first_line: 2,
            last_line,
            end: Start {
                line: last_line + 1,
                byte: 9,
            },
            records_end: 2,
        };
        assert!(covers(&lines_only(vec![2, 3], 7), &recorded));
        assert!(!covers(&lines_only(vec![2, 3], 6), &recorded));
        assert!(!covers(&lines_only(vec![2, 8], 7), &recorded));
        assert!(!covers(&lines_only(vec![2, 5], 7), &recorded));
    }

    #[test]
    fn the_eta_follows_the_pace_of_this_run() {
        let s = Duration::from_secs;
        // A quarter of the file in 10 s: 30 s to go.
        assert_eq!(eta_seconds(s(10), 0, 250, 1_000), Some(30));
        // A resumed run counts from its own start.
        assert_eq!(eta_seconds(s(10), 500, 750, 1_000), Some(10));
        assert_eq!(eta_seconds(s(10), 0, 1_000, 1_000), Some(0));
        // No pace yet.
        assert_eq!(eta_seconds(s(1), 0, 250, 1_000), None);
        assert_eq!(eta_seconds(s(10), 500, 500, 1_000), None);
    }

    #[test]
    fn last_error_speaks_only_for_its_attempt() {
        let d = doc! { "last_error": { "message": "HTTP 403", "attempt": 4_i64 } };
        assert_eq!(last_error(&d, 4).as_deref(), Some("HTTP 403"));
        assert_eq!(last_error(&d, 5), None);
        assert_eq!(last_error(&doc! {}, 1), None);
    }
}
