//! Claims, leases and state transitions of `queues` documents: the ONLY
//! writer of queue state.
//!
//! Guarantees:
//! - A claim is one atomic `findOneAndUpdate` whose filter is
//!   `status: "pending"` and no live lease, oldest first by `claim_order`. It
//!   sets `status: "processing"`, `in_progress: true`, the lease (owner,
//!   expiry, heartbeat) and `$inc`s `attempts`, and returns the document. Two
//!   daemons can never both win one document: the server applies the update
//!   to a document only while it still matches the filter.
//! - `attempts` after the claim is the fencing token. Every later write to
//!   the document ([`Lease`]) filters on `_id`, `status: "processing"`,
//!   `lease.owner` and `attempts`; zero matches means the lease is lost
//!   ([`Error::LeaseLost`]) and the holder must stop writing at once.
//! - An expired lease is never claimed directly: [`Claimer::rescue_expired`]
//!   (its own periodic task) moves `processing` documents whose lease expired
//!   back to `pending`, guarded on that expiry, and the next claim takes them.
//! - `claim_order` is stamped on pending documents from `created_at`, else
//!   `createdAt`, else the `_id` timestamp, because dashboards differ in what
//!   they set and a sort on missing fields would put those first.
//! - Every time a claimer writes or compares (lease expiries, backoffs,
//!   delivery rounds) is in the database server's clock ([`Clock`]), so
//!   daemons on hosts whose clocks disagree still agree on a lease.
//!
//! The claim filter is an equality on `status` over the few pending imports
//! (never rows): on the target server a limit-1 query over a range costs time
//! in proportion to the matches (STACK.md).

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};

use crate::clock::Clock;
use crate::domain::{FileError, JobState, collections};

pub mod retention;
mod spec;
mod undo;

pub use spec::spec_from_doc;
pub use undo::UndoLease;

/// Errors of the claim layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lease on this import is no longer ours (expired and rescued,
    /// claimed by another daemon, or the document changed state).
    #[error("lease lost on import {queue_id} (attempt {attempt})")]
    LeaseLost {
        /// Queue document.
        queue_id: ObjectId,
        /// Our fencing token.
        attempt: i64,
    },
    /// MongoDB failed.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// A lease renewal did not answer in time.
    #[error("the lease renewal timed out")]
    Timeout,
}

impl Error {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::LeaseLost { .. } => false,
            Self::Mongo(e) => crate::db::is_transient(e),
            Self::Timeout => true,
        }
    }
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Claims imports for one daemon instance.
#[derive(Clone)]
pub struct Claimer {
    queues: Collection<Document>,
    owner: String,
    lease: Duration,
    clock: Clock,
}

/// A claimed import: the document as the claim returned it, and its lease.
#[derive(Debug)]
pub struct ClaimedJob {
    /// The queue document after the claim.
    pub doc: Document,
    /// Fenced handle for every later write to the document.
    pub lease: Lease,
}

/// Fenced handle on one claimed queue document.
#[derive(Clone, Debug)]
pub struct Lease {
    queues: Collection<Document>,
    /// Queue document id.
    pub queue_id: ObjectId,
    /// Fencing token: the `attempts` value set by our claim.
    pub attempt: i64,
    /// This daemon's owner id.
    pub owner: String,
    duration: Duration,
    clock: Clock,
}

/// What a heartbeat learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The dashboard set `cancel_requested: true`.
    pub cancel_requested: bool,
}

/// Progress counters stored under `progress` (dashboard contract).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Progress {
    /// Data rows in the file, once known (end of file reached).
    pub total_rows: Option<u64>,
    /// Rows with an outcome.
    pub processed_rows: u64,
    /// Rows that created a record.
    pub imported_rows: u64,
    /// Rows that updated an existing record.
    pub updated_rows: u64,
    /// Rows left alone as duplicates.
    pub skipped_rows: u64,
    /// Rows that failed.
    pub failed_rows: u64,
    /// 0–100: by rows when the total is known, else by bytes read.
    pub percent: f64,
    /// Seconds the run still needs at its pace so far (by bytes read);
    /// none before its pace is known, or once it is final.
    pub eta_seconds: Option<u64>,
}

impl Progress {
    fn to_doc(self) -> Document {
        doc! {
            "total_rows": self.total_rows.map(|n| n as i64),
            "processed_rows": self.processed_rows as i64,
            "imported_rows": self.imported_rows as i64,
            "updated_rows": self.updated_rows as i64,
            "skipped_rows": self.skipped_rows as i64,
            "failed_rows": self.failed_rows as i64,
            "percent": (self.percent * 10.0).round() / 10.0,
            "eta_seconds": self.eta_seconds.map(|s| s as i64),
        }
    }
}

/// Where a resumed run may continue: everything before is committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Physical line where reading resumes: every record starting before it
    /// is committed (0 = from the start of the file).
    pub line: u64,
    /// Object byte offset of that line (exact for UTF-8 files; transcoded
    /// files resume by skipping `records` instead).
    pub byte: u64,
    /// Data records consumed up to `line`.
    pub records: u64,
    /// Rows per batch of the run that wrote it (0 = unknown). A resumed run
    /// cuts batches the same way whatever its own configuration, so each
    /// line's outcome stays in exactly one batch document.
    pub batch_size: u64,
}

impl Checkpoint {
    fn to_doc(self) -> Document {
        doc! {
            "line": self.line as i64,
            "byte": self.byte as i64,
            "records": self.records as i64,
            "batch_size": self.batch_size as i64,
        }
    }

    /// Reads `checkpoint` from a queue document (absent → start of file).
    pub fn from_queue_doc(doc: &Document) -> Self {
        let Ok(c) = doc.get_document("checkpoint") else {
            return Self::default();
        };
        let n = |k: &str| match c.get(k) {
            Some(Bson::Int64(v)) => u64::try_from(*v).unwrap_or(0),
            Some(Bson::Int32(v)) => u64::try_from(*v).unwrap_or(0),
            _ => 0,
        };
        Self {
            line: n("line"),
            byte: n("byte"),
            records: n("records"),
            batch_size: n("batch_size"),
        }
    }
}

/// How an import ended.
#[derive(Clone, Debug)]
pub enum Final {
    /// Every line has an outcome.
    Completed,
    /// A file-level error.
    Failed(FileError),
    /// Cancelled on request.
    Cancelled,
}

impl Final {
    /// The state it stores.
    pub fn state(&self) -> JobState {
        match self {
            Self::Completed => JobState::Completed,
            Self::Failed(_) => JobState::Failed,
            Self::Cancelled => JobState::Cancelled,
        }
    }
}

/// The server's `TypeMismatch` (e.g. `$inc` on a string).
const TYPE_MISMATCH: i32 = 14;

/// A whole number stored at `key` of `doc`, whatever its numeric type
/// (`$inc` on a double stays a double).
pub fn whole_number(doc: &Document, key: &str) -> Option<i64> {
    match doc.get(key)? {
        Bson::Int64(n) => Some(*n),
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
        _ => None,
    }
}

fn after(t: DateTime, d: Duration) -> DateTime {
    DateTime::from_millis(t.timestamp_millis() + d.as_millis() as i64)
}

impl Claimer {
    /// A claimer for `owner` (unique per daemon process).
    pub fn new(db: &Database, owner: impl Into<String>, lease: Duration) -> Self {
        Self {
            queues: db.collection(collections::QUEUES),
            owner: owner.into(),
            lease,
            clock: Clock::default(),
        }
    }

    /// The clock this claimer writes and compares times in (shared by its
    /// clones and leases): [`Clock::sync`] it to the database server.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// A unique owner id for this process: host, pid and a random suffix.
    pub fn default_owner() -> String {
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown-host".to_owned());
        let rand = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}:{}:{}", std::process::id(), &rand[..8])
    }

    /// This claimer's owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Gives pending documents without `claim_order` one: `created_at`,
    /// else `createdAt`, else the `_id` timestamp. Returns how many.
    pub async fn stamp_claim_order(&self) -> Result<u64> {
        let mut cursor = self
            .queues
            .find(doc! { "status": JobState::Pending.as_str(), "claim_order": Bson::Null })
            .projection(doc! { "created_at": 1, "createdAt": 1 })
            .limit(1000)
            .await?;
        let mut stamped = 0;
        while cursor.advance().await? {
            let d = cursor.deserialize_current()?;
            let Ok(id) = d.get_object_id("_id") else {
                continue;
            };
            let order = d
                .get_datetime("created_at")
                .or_else(|_| d.get_datetime("createdAt"))
                .copied()
                .unwrap_or_else(|_| DateTime::from_system_time(id.timestamp().to_system_time()));
            let r = self
                .queues
                .update_one(
                    doc! { "_id": id, "claim_order": Bson::Null },
                    doc! { "$set": { "claim_order": order } },
                )
                .await?;
            stamped += r.modified_count;
        }
        Ok(stamped)
    }

    /// Claims the oldest pending import, if any. Whatever its `source`: one
    /// this daemon cannot import ends `failed` (`unsupported_source`) and
    /// its user is told, rather than waiting forever.
    pub async fn claim_next(&self) -> Result<Option<ClaimedJob>> {
        let now = self.clock.now();
        let expires = after(now, self.lease);
        let filter = doc! {
            "status": JobState::Pending.as_str(),
            // A pending document normally has no lease at all; one whose
            // lease is still live (written by hand, or by a dashboard retry
            // racing a rescue) is not ours to take.
            "lease.expires_at": { "$not": { "$gt": now } },
            // Released after trouble: not before its backoff has passed.
            "retry_at": { "$not": { "$gt": now } },
        };
        let update = doc! {
            "$set": {
                "status": JobState::Processing.as_str(),
                "in_progress": true,
                "lease": { "owner": &self.owner, "expires_at": expires, "heartbeat_at": now },
            },
            "$min": { "started_at": now },
            "$inc": { "attempts": 1_i64 },
        };
        let claim = || {
            self.queues
                .find_one_and_update(filter.clone(), update.clone())
                .sort(doc! { "claim_order": 1 })
                .return_document(ReturnDocument::After)
        };
        let doc = match claim().await {
            // A pending document whose `attempts` is not a number (written
            // by hand or by a dashboard) refuses the `$inc`, and would
            // refuse every claim while it is the oldest: reset, then claim.
            Err(e) if crate::db::error_code(&e) == Some(TYPE_MISMATCH) => {
                let reset = self.reset_invalid_attempts().await?;
                tracing::warn!(
                    documents = reset,
                    "Pending imports with a non-numeric `attempts` reset to 0"
                );
                claim().await?
            }
            claimed => claimed?,
        };
        Ok(doc.map(|doc| {
            let queue_id = doc.get_object_id("_id").unwrap_or_default();
            let attempt = whole_number(&doc, "attempts").unwrap_or(1);
            ClaimedJob {
                lease: Lease {
                    queues: self.queues.clone(),
                    queue_id,
                    attempt,
                    owner: self.owner.clone(),
                    duration: self.lease,
                    clock: self.clock.clone(),
                },
                doc,
            }
        }))
    }

    /// Sets `attempts` to 0 on pending documents where it is not a number.
    async fn reset_invalid_attempts(&self) -> Result<u64> {
        let r = self
            .queues
            .update_many(
                doc! {
                    "status": JobState::Pending.as_str(),
                    "attempts": { "$exists": true, "$not": { "$type": "number" } },
                },
                doc! { "$set": { "attempts": 0_i64 } },
            )
            .await?;
        Ok(r.modified_count)
    }

    /// Moves `processing` imports whose lease expired back to `pending`, so
    /// the next claim (by any daemon) takes them, and does the same for
    /// delivery rounds whose sender went quiet: due again after `grace`
    /// (time for a sender cut off from the database after its delivery to
    /// record `sent`; a round claimed past the last one records the
    /// failure). Returns how many imports.
    pub async fn rescue_expired(&self, grace: Duration) -> Result<u64> {
        let now = self.clock.now();
        let r = self
            .queues
            .update_many(
                doc! {
                    "status": JobState::Processing.as_str(),
                    "lease.expires_at": { "$lt": now },
                },
                doc! {
                    "$set": {
                        "status": JobState::Pending.as_str(), "in_progress": false, "rescued_at": now,
                    },
                    // `$unset`, not a `$set` to null: a dashboard's scalar
                    // `progress` must not make the whole rescue fail.
                    "$unset": { "lease": "", "progress.eta_seconds": "" },
                },
            )
            .await?;
        // A cancellation does not wait out a backoff: the next claim ends
        // the import `cancelled`.
        let cancelled = self
            .queues
            .update_many(
                doc! {
                    "status": JobState::Pending.as_str(),
                    "cancel_requested": true,
                    "retry_at": { "$gt": now },
                },
                doc! { "$set": { "retry_at": now } },
            )
            .await;
        if let Err(e) = cancelled {
            // The next rescue tick retries; the rounds below still run.
            tracing::warn!(error = %e, "Could not clear the backoff of cancelled imports");
        }
        for channel in [Channel::Email, Channel::Webhook, Channel::UndoEmail] {
            self.queues
                .update_many(
                    doc! { channel.key("state"): "sending", channel.key("expires_at"): { "$lt": now } },
                    doc! {
                        "$set": {
                            channel.key("state"): "pending",
                            channel.key("next_attempt_at"): after(now, grace),
                        },
                        "$unset": { channel.key("owner"): "" },
                    },
                )
                .await?;
        }
        Ok(r.modified_count)
    }
}

impl Lease {
    fn guard(&self) -> Document {
        doc! {
            "_id": self.queue_id,
            "status": JobState::Processing.as_str(),
            "lease.owner": &self.owner,
            "attempts": self.attempt,
        }
    }

    fn lost(&self) -> Error {
        Error::LeaseLost {
            queue_id: self.queue_id,
            attempt: self.attempt,
        }
    }

    /// Lease duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The clock of the claimer that took the lease (the database server's
    /// time): the import's records are stamped with it, as its queue
    /// document is.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Extends the lease and reports whether cancellation was requested.
    pub async fn heartbeat(&self) -> Result<Heartbeat> {
        self.renew(Document::new()).await
    }

    /// Stores progress and checkpoint, and extends the lease; says whether
    /// cancellation was requested (so an import stops at the next batch,
    /// not at the next heartbeat).
    pub async fn save_progress(
        &self,
        progress: Progress,
        checkpoint: Checkpoint,
        advanced: bool,
    ) -> Result<Heartbeat> {
        let mut fields = doc! { "progress": progress.to_doc(), "checkpoint": checkpoint.to_doc() };
        if advanced {
            // This claim moved the import on: if its lease runs out, the
            // next claim does not count it (`advanced_then_lost`).
            fields.insert("advanced_attempt", self.attempt);
        }
        self.renew(fields).await
    }

    /// Counts the claim before this one among those not counted towards
    /// `scheduler.max_attempts` (it moved the import on, then lost its
    /// lease), and marks it accounted for.
    pub async fn not_counting_previous(&self) -> Result<()> {
        let r = self
            .queues
            .update_one(
                self.guard(),
                doc! {
                    "$set": { "released_attempt": self.attempt - 1 },
                    "$inc": { "progress_releases": 1_i64 },
                },
            )
            .await?;
        if r.matched_count == 0 {
            return Err(self.lost());
        }
        Ok(())
    }

    /// Extends the lease, setting `fields` too, in one guarded update that
    /// reads back `cancel_requested`.
    async fn renew(&self, mut fields: Document) -> Result<Heartbeat> {
        let now = self.clock.now();
        fields.insert("lease.expires_at", after(now, self.duration));
        fields.insert("lease.heartbeat_at", now);
        let doc = self
            .queues
            .find_one_and_update(self.guard(), doc! { "$set": fields })
            .projection(doc! { "cancel_requested": 1 })
            .return_document(ReturnDocument::After)
            .await?
            .ok_or_else(|| self.lost())?;
        Ok(Heartbeat {
            cancel_requested: doc.get_bool("cancel_requested").unwrap_or(false),
        })
    }

    /// Records data found once the import is claimed (e.g. `started_at`).
    pub async fn set_fields(&self, fields: Document) -> Result<()> {
        let r = self
            .queues
            .update_one(self.guard(), doc! { "$set": fields })
            .await?;
        if r.matched_count == 0 {
            return Err(self.lost());
        }
        Ok(())
    }

    /// Moves the import to its final state, in one update guarded on our
    /// lease. `extra` is merged into the `$set` (totals, `log_id`, report).
    pub async fn finish(&self, outcome: &Final, progress: Progress, extra: Document) -> Result<()> {
        let now = self.clock.now();
        let mut set = doc! {
            "status": outcome.state().as_str(),
            "in_progress": false,
            "completed_at": now,
            "progress": progress.to_doc(),
            // Exactly-once notification starts here (report/notify).
            "notify.state": "pending",
            // Its per-line data is kept until `retention.days` (retention).
            "retention.state": retention::KEPT,
        };
        if let Final::Failed(e) = outcome {
            let mut error = doc! { "code": e.code(), "message": e.to_string() };
            if let Some(detail) = e.detail() {
                error.insert("detail", detail);
            }
            set.insert("error", error);
        }
        set.extend(extra);
        let r = self
            .queues
            .update_one(
                self.guard(),
                doc! { "$set": set, "$unset": { "lease": "" } },
            )
            .await?;
        if r.matched_count == 0 {
            return Err(self.lost());
        }
        Ok(())
    }

    /// Gives the import back (`pending`, no lease) with its progress and
    /// checkpoint, so that the next claim resumes there. After
    /// [`Release::Shutdown`] any daemon may claim it at once; after
    /// [`Release::Trouble`] not before [`retry_delay`] has passed, so an
    /// outage of S3 or MongoDB does not burn the import's attempts in a
    /// few ticks.
    pub async fn release(
        &self,
        progress: Progress,
        checkpoint: Checkpoint,
        why: Release<'_>,
    ) -> Result<()> {
        let now = self.clock.now();
        // Not running: no time left to tell.
        let progress = Progress {
            eta_seconds: None,
            ..progress
        };
        let mut set = doc! {
            "status": JobState::Pending.as_str(),
            "in_progress": false,
            "progress": progress.to_doc(),
            "checkpoint": checkpoint.to_doc(),
            "released_at": now,
            // Its release counted it as it should (`advanced_then_lost`).
            "released_attempt": self.attempt,
        };
        let mut unset = doc! { "lease": "" };
        match why {
            Release::Trouble { error, .. } => {
                set.insert("retry_at", after(now, retry_delay(self.attempt)));
                set.insert(
                    "last_error",
                    doc! { "message": error, "at": now, "attempt": self.attempt },
                );
            }
            Release::Shutdown => {
                unset.insert("retry_at", "");
            }
        }
        let r = self
            .queues
            .update_one(
                self.guard(),
                doc! {
                    "$set": set,
                    "$inc": {
                        "shutdown_releases": i64::from(why == Release::Shutdown),
                        "progress_releases": i64::from(matches!(why, Release::Trouble { advanced: true, .. })),
                    },
                    "$unset": unset,
                },
            )
            .await?;
        if r.matched_count == 0 {
            return Err(self.lost());
        }
        Ok(())
    }
}

/// Why a lease is given back before the import is final.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release<'a> {
    /// The daemon is stopping: not the import's fault, not counted towards
    /// `scheduler.max_attempts`, claimable at once.
    Shutdown,
    /// Trouble that outlasted the retries (an outage): claimable again
    /// after [`retry_delay`].
    Trouble {
        /// What it was, for support (stored as `last_error`; never a cell
        /// value).
        error: &'a str,
        /// Whether this run moved the checkpoint on: such a release is not
        /// counted towards `scheduler.max_attempts` (`progress_releases`).
        advanced: bool,
    },
}

/// How long an import released after trouble waits before its next claim:
/// 10 s after the first attempt, doubling, at most 5 minutes. With the
/// default 5 attempts, and the minutes of retrying each attempt does
/// itself, an outage of about ten minutes costs a delay, not the import.
pub fn retry_delay(attempt: i64) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1).clamp(0, 16)).unwrap_or(0);
    Duration::from_secs(10)
        .saturating_mul(1 << doublings)
        .min(Duration::from_secs(300))
}

/// A way the outcome of a final import is delivered, each with its own
/// state machine on the queue document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The summary email (`notify.*`).
    Email,
    /// The completion webhook (`webhook.*`), due once the email round
    /// recorded its result.
    Webhook,
    /// The email saying an import was undone (`undo_notify.*`), due in
    /// the update that records the undo as done.
    UndoEmail,
}

impl Channel {
    /// The number of the round a claimed document is in.
    pub fn round_of(self, doc: &Document) -> i64 {
        doc.get_document(self.field())
            .ok()
            .and_then(|d| match d.get("rounds") {
                Some(Bson::Int64(n)) => Some(*n),
                Some(Bson::Int32(n)) => Some(i64::from(*n)),
                _ => None,
            })
            .unwrap_or(1)
    }

    /// The queue document's field holding the channel's state.
    pub fn field(self) -> &'static str {
        match self {
            Self::Email => "notify",
            Self::Webhook => "webhook",
            Self::UndoEmail => "undo_notify",
        }
    }

    fn key(self, sub: &str) -> String {
        format!("{}.{sub}", self.field())
    }
}

/// The delivery guard: `<channel>.state` moves `pending` (set by
/// [`Lease::finish`] for the email, by the email round's end for the
/// webhook) → `sending` (one daemon, under its own short lease, renewed while
/// it works) → `sent` | `skipped` | `failed`, or back to `pending` with a
/// `next_attempt_at` after a failed round. Each move is one atomic update
/// guarded on the current state (and owner), so two daemons, a retry or a
/// restart never deliver twice. A daemon that dies while `sending` leaves
/// a lease that [`Claimer::rescue_expired`] turns back into `pending`: after
/// a crash in the instant between the receiver's acceptance and the `sent`
/// write, a second delivery is possible; a lost one is not. A sender that
/// delivered but lost the database keeps trying to record it
/// ([`Claimer::record_delivered`]) past its lease and the rescue's grace.
impl Claimer {
    /// Takes the delivery on `channel` of `queue_id` (or of any final import
    /// whose delivery is due) for sending; the document returned carries the
    /// round's number ([`Channel::round_of`]).
    pub async fn claim_notification(
        &self,
        channel: Channel,
        queue_id: Option<ObjectId>,
        lease: Duration,
    ) -> Result<Option<Document>> {
        let now = self.clock.now();
        let mut filter = doc! {
            channel.key("state"): "pending",
            channel.key("next_attempt_at"): { "$not": { "$gt": now } },
        };
        if let Some(id) = queue_id {
            filter.insert("_id", id);
        }
        Ok(self
            .queues
            .find_one_and_update(
                filter,
                doc! {
                    "$set": {
                        channel.key("state"): "sending",
                        channel.key("owner"): &self.owner,
                        channel.key("expires_at"): after(now, lease),
                    },
                    "$inc": { channel.key("rounds"): 1_i64 },
                },
            )
            .return_document(ReturnDocument::After)
            .await?)
    }

    /// Matches round `round` of `queue_id` while this daemon holds it: the
    /// round number fences off a stale round of the same daemon (one that
    /// ran past its lease while this daemon claimed the next round).
    fn round_guard(&self, channel: Channel, queue_id: ObjectId, round: i64) -> Document {
        doc! {
            "_id": queue_id,
            channel.key("state"): "sending",
            channel.key("owner"): &self.owner,
            channel.key("rounds"): round,
        }
    }

    /// Extends this daemon's sending round of `queue_id` by `lease`.
    /// Returns false when the round is no longer ours.
    pub async fn renew_notification(
        &self,
        channel: Channel,
        queue_id: ObjectId,
        round: i64,
        lease: Duration,
    ) -> Result<bool> {
        let r = self
            .queues
            .update_one(
                self.round_guard(channel, queue_id, round),
                doc! { "$set": { channel.key("expires_at"): after(self.clock.now(), lease) } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Records that round `round` delivered, even after its lease ran out
    /// (a sender cut off from the database while it delivered): as long as
    /// no later round was claimed, or only the one that gave up past the
    /// last round (`gave_up`), the delivery stands, so no second one
    /// follows. Returns false when a later round was claimed to deliver.
    pub async fn record_delivered(
        &self,
        channel: Channel,
        queue_id: ObjectId,
        round: i64,
        fields: Document,
    ) -> Result<bool> {
        let mut set =
            doc! { channel.key("state"): "sent", channel.key("updated_at"): self.clock.now() };
        set.extend(fields);
        let r = self
            .queues
            .update_one(
                doc! {
                    "_id": queue_id,
                    "$or": [
                        {
                            channel.key("rounds"): round,
                            channel.key("state"): { "$in": ["sending", "pending"] },
                        },
                        {
                            channel.key("rounds"): round + 1,
                            channel.key("state"): "failed",
                            channel.key("gave_up"): true,
                        },
                    ],
                },
                doc! {
                    "$set": set,
                    "$unset": {
                        channel.key("owner"): "",
                        channel.key("expires_at"): "",
                        channel.key("next_attempt_at"): "",
                        channel.key("gave_up"): "",
                    },
                },
            )
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Ends a sending round: `state` is `sent`, `skipped`, `failed`, or
    /// `pending` (another round later). `fields` are merged into the `$set`.
    /// Returns false when the round was no longer ours.
    pub async fn finish_notification(
        &self,
        channel: Channel,
        queue_id: ObjectId,
        round: i64,
        state: &str,
        fields: Document,
    ) -> Result<bool> {
        let mut set =
            doc! { channel.key("state"): state, channel.key("updated_at"): self.clock.now() };
        set.extend(fields);
        let r = self
            .queues
            .update_one(
                self.round_guard(channel, queue_id, round),
                doc! { "$set": set, "$unset": { channel.key("owner"): "", channel.key("expires_at"): "" } },
            )
            .await?;
        Ok(r.matched_count == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_five_minutes() {
        let secs: Vec<u64> = (0..=9).map(|a| retry_delay(a).as_secs()).collect();
        assert_eq!(secs, [10, 10, 20, 40, 80, 160, 300, 300, 300, 300]);
        assert_eq!(retry_delay(i64::MAX).as_secs(), 300);
    }
}
