//! Retention: `retention.days` after an import ended, its per-line data is
//! purged: its line outcomes (`import_lines`), its before images
//! (`import_befores`), the failed lines its `csv_imports` summary quotes
//! (`logs`, emptied) and its error report in the bucket. What stays: the
//! queue document (with `retention {state: "purged", purged_at, days}`),
//! the summary's totals, and the records it imported. Such an import can
//! no longer be undone (its updates' before images are gone); support
//! tools say it was purged rather than "not processed".
//!
//! A sweep every `retention.sweep_interval` purges the imports that are
//! due, a few at a time, each under a purge lease ([`crate::claim`]), so
//! daemons on many hosts share the work and a crash mid-purge is resumed
//! by a later sweep (every step is idempotent).

use std::num::NonZeroU32;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Document, doc};
use mongodb::Database;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::claim::Claimer;
use crate::domain::collections;
use crate::fetch::Storage;
use crate::telemetry::error_chain;
use crate::telemetry::metrics as m;
use crate::write::befores;

/// Errors of a purge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] mongodb::error::Error),
    /// Claiming or recording a purge failed.
    #[error(transparent)]
    Claim(#[from] crate::claim::Error),
    /// Deleting the error report failed.
    #[error(transparent)]
    Storage(#[from] crate::fetch::Error),
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Most imports one sweep purges (the next sweep goes on).
pub const MAX_PER_SWEEP: usize = 100;

/// The end before which an import's data is due for purging, `days`
/// before `now` (pure).
pub fn cutoff(now: bson::DateTime, days: NonZeroU32) -> bson::DateTime {
    let keep = Duration::from_secs(u64::from(days.get()) * 86_400);
    bson::DateTime::from_millis(now.timestamp_millis() - keep.as_millis() as i64)
}

/// Purges the imports that ended more than `days` before now (the
/// claimer's clock, the database server's time), up to `max`. Returns how
/// many it purged. Stops between two imports once `stop` is cancelled.
/// A purge that fails is logged, given back for a later sweep and
/// skipped; only a failure to claim ends the sweep.
pub async fn sweep(
    db: &Database,
    storage: &Storage,
    claimer: &Claimer,
    days: NonZeroU32,
    max: usize,
    stop: &CancellationToken,
) -> Result<usize> {
    let cutoff = cutoff(claimer.clock().now(), days);
    let mut purged = 0;
    while purged < max && !stop.is_cancelled() {
        let Some(q) = claimer.claim_purge(cutoff).await? else {
            break;
        };
        let Ok(queue_id) = q.get_object_id("_id") else {
            continue;
        };
        let span = info_span!("purge", queue_id = %queue_id);
        let done = async {
            let fields = purge(db, storage, queue_id, &q).await?;
            Ok::<_, Error>(claimer.finish_purge(queue_id, days.get(), fields).await?)
        }
        .instrument(span.clone())
        .await;
        let _entered = span.enter();
        match done {
            Ok(true) => {
                purged += 1;
                info!(days = days.get(), "Import's per-line data purged");
            }
            Ok(false) => warn!("Purge took longer than its lease; another daemon finishes it"),
            Err(e) => {
                let e = error_chain(&e);
                metrics::counter!(m::PURGE_FAILURES).increment(1);
                warn!(error = %e, "Purge failed; it is tried again later");
                if let Err(e) = claimer.fail_purge(queue_id, &e).await {
                    warn!(error = %error_chain(&e), "Could not give the purge back; its lease will expire");
                }
            }
        }
    }
    Ok(purged)
}

/// Deletes the per-line data of import `queue_id` (its queue document
/// `q`); returns the queue fields that record it. Idempotent.
async fn purge(
    db: &Database,
    storage: &Storage,
    queue_id: ObjectId,
    q: &Document,
) -> Result<Document> {
    crate::outcomes::delete_batches(db, queue_id).await?;
    befores::delete_all(db, queue_id).await?;
    db.collection::<Document>(collections::CSV_IMPORTS)
        .update_one(
            doc! { "queue_id": queue_id },
            doc! { "$set": { "logs": [], "logs_purged": true } },
        )
        .await?;
    let mut fields = Document::new();
    if let Ok(report) = q.get_document("report") {
        if let Ok(key) = report.get_str("key") {
            storage.delete(key).await?;
        }
        fields.insert("report.deleted", true);
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_is_days_before_now() {
        let now = bson::DateTime::from_millis(10 * 86_400_000);
        let days = NonZeroU32::new(3).unwrap();
        assert_eq!(cutoff(now, days).timestamp_millis(), 7 * 86_400_000);
    }
}
