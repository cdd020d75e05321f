//! The purge lease: an import's per-line data is purged `retention.days`
//! after it ended (see [`crate::retention`]), by one daemon at a time,
//! under the queue document's `retention` field:
//!
//! ```text
//! retention { state: "kept" | "purging" | "purged", owner, expires_at,
//!             purged_at, days }
//! ```
//!
//! `kept` is set with the final state ([`super::Lease::finish`]). A claim is
//! one atomic `findOneAndUpdate` (kept, or purging under an expired lease;
//! ended before the cutoff; no undo requested; no email or webhook round
//! still to send, which quote the summary and link the report) that makes
//! it `purging`; `purged` is written once the data is gone. An undo is never
//! requested of a `purging` or `purged` import to any effect: it is refused
//! (`crate::undo`), and a purge never takes an import whose undo is
//! requested, so the two never run on one import at once.

use bson::oid::ObjectId;
use bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::{Claimer, Result, after};
use crate::domain::JobState;

/// `retention.state` of an import whose data is kept.
pub const KEPT: &str = "kept";
/// `retention.state` of an import whose data is being purged.
pub const PURGING: &str = "purging";
/// `retention.state` of an import whose data was purged.
pub const PURGED: &str = "purged";

/// Notification states with a round still to come or under way.
const UNSENT: [&str; 2] = ["pending", "sending"];

impl Claimer {
    /// Marks the final imports that no daemon marked (they ended before
    /// retention was known) as kept, so that they are purged too. One
    /// pass over the queue collection: run once per daemon start.
    pub async fn adopt_unmarked(&self) -> Result<u64> {
        let finals = [JobState::Completed, JobState::Failed, JobState::Cancelled];
        let r = self
            .queues
            .update_many(
                doc! {
                    "status": { "$in": finals.map(JobState::as_str).to_vec() },
                    "completed_at": { "$type": "date" },
                    "retention": { "$exists": false },
                },
                doc! { "$set": { "retention.state": KEPT } },
            )
            .await?;
        Ok(r.modified_count)
    }

    /// Takes the purge of the import that ended longest before `cutoff`
    /// and is due, if any, for the lease's length.
    pub async fn claim_purge(&self, cutoff: bson::DateTime) -> Result<Option<Document>> {
        let now = self.clock.now();
        let claimed = self
            .queues
            .find_one_and_update(
                doc! {
                    "retention.state": { "$in": [KEPT, PURGING] },
                    "completed_at": { "$lt": cutoff },
                    "retention.expires_at": { "$not": { "$gt": now } },
                    "undo_requested": { "$ne": true },
                    "notify.state": { "$nin": UNSENT.to_vec() },
                    "webhook.state": { "$nin": UNSENT.to_vec() },
                },
                doc! { "$set": {
                    "retention.state": PURGING,
                    "retention.owner": &self.owner,
                    "retention.expires_at": after(now, self.lease),
                } },
            )
            .sort(doc! { "retention.state": 1, "completed_at": 1 })
            .return_document(ReturnDocument::After)
            .await?;
        Ok(claimed)
    }

    /// Records the purge of `queue_id` done (`retention.days` after its
    /// end), if this daemon still holds it; `fields` are set beside.
    /// Returns whether it did.
    pub async fn finish_purge(
        &self,
        queue_id: ObjectId,
        days: u32,
        mut fields: Document,
    ) -> Result<bool> {
        fields.insert("retention.state", PURGED);
        fields.insert("retention.purged_at", self.clock.now());
        fields.insert("retention.days", i64::from(days));
        let r = self
            .queues
            .update_one(
                doc! { "_id": queue_id, "retention.state": PURGING, "retention.owner": &self.owner },
                doc! {
                    "$set": fields,
                    "$unset": { "retention.owner": "", "retention.expires_at": "" },
                },
            )
            .await?;
        Ok(r.matched_count == 1)
    }
}
