//! The purge lease: an import's per-line data is purged `retention.days`
//! after it ended (see [`crate::retention`]), by one daemon at a time,
//! under the queue document's `retention` field:
//!
//! ```text
//! retention { state: "kept" | "purging" | "purged", owner, expires_at,
//!             purged_at, days }
//! ```
//!
//! `kept` is set with the final state ([`super::Lease::finish`]); a final
//! import without `retention` (it ended before retention existed, or under
//! an older daemon) counts as kept. A claim is one atomic
//! `findOneAndUpdate` (final; kept, or purging under an expired lease;
//! ended before the cutoff; no undo requested; no email or webhook round
//! still to send, which quote the summary and link the report) that makes
//! it `purging` for [`PURGE_LEASE`]; `purged` is written once the data is
//! gone. A purge that fails stays `purging`, claimable again after
//! [`PURGE_RETRY`]: never `kept` again, since part of its data may be gone.
//! An undo of a `purging` or `purged` import is refused (`crate::undo`),
//! and a purge never takes an import whose undo is requested and not
//! done, so the two never run on one import at once.

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use mongodb::options::ReturnDocument;

use super::{Claimer, Result, after};
use crate::domain::JobState;

/// How long one purge may take before another daemon may take it over
/// (deleting the before images of millions of updated lines takes a
/// while; a takeover repeats idempotent deletes).
pub const PURGE_LEASE: Duration = Duration::from_secs(15 * 60);

/// Pause before a purge that failed is tried again.
pub const PURGE_RETRY: Duration = Duration::from_secs(60 * 60);

/// `retention.state` of an import whose data is kept.
pub const KEPT: &str = "kept";
/// `retention.state` of an import whose data is being purged.
pub const PURGING: &str = "purging";
/// `retention.state` of an import whose data was purged.
pub const PURGED: &str = "purged";

/// The states whose data may be purged.
const FINAL: [JobState; 3] = [JobState::Completed, JobState::Failed, JobState::Cancelled];

/// Notification states with a round still to come or under way.
const UNSENT: [&str; 2] = ["pending", "sending"];

impl Claimer {
    /// Takes the purge of the import that ended longest before `cutoff`
    /// and is due, if any, for the lease's length.
    pub async fn claim_purge(&self, cutoff: bson::DateTime) -> Result<Option<Document>> {
        let now = self.clock.now();
        let claimed = self
            .queues
            .find_one_and_update(
                doc! {
                    // Null: no `retention` yet (ended before it existed).
                    "retention.state": { "$in": [Bson::Null, Bson::from(KEPT), Bson::from(PURGING)] },
                    "completed_at": { "$lt": cutoff },
                    "status": { "$in": FINAL.map(JobState::as_str).to_vec() },
                    "retention.expires_at": { "$not": { "$gt": now } },
                    // No undo to run: none requested, or the request
                    // answered (a flag set again after it is not one
                    // `claim_undo` takes).
                    "$nor": [{ "undo_requested": true, "undo.finished_at": { "$exists": false } }],
                    "notify.state": { "$nin": UNSENT.to_vec() },
                    "webhook.state": { "$nin": UNSENT.to_vec() },
                },
                doc! { "$set": {
                    "retention.state": PURGING,
                    "retention.owner": &self.owner,
                    "retention.expires_at": after(now, PURGE_LEASE),
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

    /// Gives back the purge of `queue_id` after `error` (never a cell
    /// value): still `purging`, claimable again after [`PURGE_RETRY`].
    pub async fn fail_purge(&self, queue_id: ObjectId, error: &str) -> Result<()> {
        let now = self.clock.now();
        self.queues
            .update_one(
                doc! { "_id": queue_id, "retention.state": PURGING, "retention.owner": &self.owner },
                doc! {
                    "$set": {
                        "retention.expires_at": after(now, PURGE_RETRY),
                        "retention.last_error": { "message": error, "at": now },
                    },
                    "$unset": { "retention.owner": "" },
                },
            )
            .await?;
        Ok(())
    }
}
