//! The undo lease. `undo_requested: true` on a final import (set by the
//! dashboard or `importd undo`) makes its undo claimable, by one daemon or
//! CLI at a time, under the queue document's `undo` field:
//!
//! ```text
//! undo { state: "running" | "done" | "refused", owner, expires_at, attempts,
//!        next_line, ... counts ..., finished_at }
//! ```
//!
//! As for imports: a claim is one atomic `findOneAndUpdate` (requested,
//! final, not finished, no live undo lease) that `$inc`s `undo.attempts`,
//! the fencing token of every later write; an expired lease makes the undo
//! claimable again, and the next holder resumes at `undo.next_line`. The
//! import's own `status` never changes: the undo is recorded beside it.

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use mongodb::Collection;
use mongodb::options::ReturnDocument;

use super::{Claimer, Error, Result, after};
use crate::clock::Clock;
use crate::domain::JobState;

/// The final states an undo may follow.
const FINAL: [JobState; 3] = [JobState::Completed, JobState::Cancelled, JobState::Failed];

/// Fenced handle on the undo of one import.
#[derive(Clone, Debug)]
pub struct UndoLease {
    queues: Collection<Document>,
    /// Queue document id.
    pub queue_id: ObjectId,
    /// Fencing token: `undo.attempts` as our claim set it.
    pub attempt: i64,
    owner: String,
    duration: Duration,
    clock: Clock,
    /// The queue document as the claim returned it.
    pub doc: Document,
}

impl Claimer {
    /// Takes the undo of `queue_id` (or of any import whose undo is due).
    pub async fn claim_undo(&self, queue_id: Option<ObjectId>) -> Result<Option<UndoLease>> {
        let now = self.clock.now();
        let mut filter = doc! {
            "undo_requested": true,
            "status": { "$in": FINAL.map(JobState::as_str).to_vec() },
            "undo.finished_at": { "$exists": false },
            // `undo` absent or a document: a dashboard's `undo: null` (or
            // any other value) cannot take `undo.state`, and would fail
            // every claim if it were matched.
            "undo": { "$not": { "$type": ["null", "string", "bool", "array", "int", "long", "double", "date", "objectId", "decimal"] } },
            "undo.expires_at": { "$not": { "$gt": now } },
        };
        if let Some(id) = queue_id {
            filter.insert("_id", id);
        }
        let claimed = self
            .queues
            .find_one_and_update(
                filter,
                doc! {
                    "$set": {
                        "undo.state": "running",
                        "undo.owner": &self.owner,
                        "undo.expires_at": after(now, self.lease),
                    },
                    "$min": { "undo.started_at": now },
                    "$inc": { "undo.attempts": 1_i64 },
                },
            )
            .return_document(ReturnDocument::After)
            .await?;
        Ok(claimed.map(|doc| {
            let attempt = doc
                .get_document("undo")
                .ok()
                .and_then(|u| match u.get("attempts") {
                    Some(Bson::Int64(n)) => Some(*n),
                    Some(Bson::Int32(n)) => Some(i64::from(*n)),
                    _ => None,
                })
                .unwrap_or(1);
            UndoLease {
                queues: self.queues.clone(),
                clock: self.clock.clone(),
                queue_id: doc.get_object_id("_id").unwrap_or_default(),
                attempt,
                owner: self.owner.clone(),
                duration: self.lease,
                doc,
            }
        }))
    }
}

impl UndoLease {
    fn guard(&self) -> Document {
        doc! {
            "_id": self.queue_id,
            "undo.state": "running",
            "undo.owner": &self.owner,
            "undo.attempts": self.attempt,
        }
    }

    fn lost(&self) -> Error {
        Error::LeaseLost {
            queue_id: self.queue_id,
            attempt: self.attempt,
        }
    }

    /// How long the lease runs from each renewal.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Sets `undo.<key>` for each of `fields` (a checkpoint and its counts,
    /// in one atomic update) and renews the lease.
    pub async fn save(&self, fields: Document) -> Result<()> {
        let mut set = doc! { "undo.expires_at": after(self.clock.now(), self.duration) };
        for (k, v) in fields {
            set.insert(format!("undo.{k}"), v);
        }
        let r = self
            .queues
            .update_one(self.guard(), doc! { "$set": set })
            .await?;
        if r.matched_count == 0 {
            return Err(self.lost());
        }
        Ok(())
    }

    /// Ends the undo: `state` is `done` or `refused`; `fields` are set
    /// under `undo` too. A done undo makes its email due in the same
    /// update, so no crash can lose it.
    pub async fn finish(&self, state: &str, fields: Document) -> Result<()> {
        let mut set = doc! { "undo.state": state, "undo.finished_at": self.clock.now() };
        for (k, v) in fields {
            set.insert(format!("undo.{k}"), v);
        }
        if state == "done" {
            set.insert("undo_notify.state", "pending");
        }
        let r = self
            .queues
            .update_one(
                self.guard(),
                // The request is answered: its flag leaves the claim's
                // index, which thus holds only undos still to do.
                doc! {
                    "$set": set,
                    "$unset": { "undo.owner": "", "undo.expires_at": "", "undo_requested": "" },
                },
            )
            .await?;
        if r.matched_count == 0 {
            return Err(self.lost());
        }
        Ok(())
    }

    /// Gives the undo back unfinished (shutdown): claimable again at once,
    /// resuming at its saved `next_line`.
    pub async fn release(&self) -> Result<()> {
        self.give_back(doc! {
            "$set": { "undo.state": "pending" },
            "$unset": { "undo.owner": "", "undo.expires_at": "" },
        })
        .await
    }

    /// Gives the undo back after an error: claimable again after a pause
    /// that doubles with each attempt (5 s, 10 s, ... up to the lease), so
    /// an undo that keeps failing does not come back on every tick.
    /// `error` (never a cell value) is kept as `undo.last_error`.
    pub async fn release_after_error(&self, error: &str) -> Result<()> {
        let doublings = self.attempt.saturating_sub(1).clamp(0, 16) as u32;
        let pause = (Duration::from_secs(5) * 2_u32.pow(doublings)).min(self.duration);
        self.give_back(doc! {
            "$set": {
                "undo.state": "pending",
                "undo.expires_at": after(self.clock.now(), pause),
                "undo.last_error": { "message": error, "attempt": self.attempt },
            },
            "$unset": { "undo.owner": "" },
            "$inc": { "undo.error_releases": 1_i64 },
        })
        .await
    }

    async fn give_back(&self, update: Document) -> Result<()> {
        self.queues.update_one(self.guard(), update).await?;
        Ok(())
    }
}
