//! `importd undo ID`: asks for the undo of an import (as the dashboard does,
//! with `undo_requested: true`; a running import is cancelled first), then
//! does it here under the undo lease, or waits while a daemon does it.
//! Running it again prints the recorded result.

use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{DateTime, Document, doc};
use mongodb::Database;
use tokio_util::sync::CancellationToken;

use crate::claim::Claimer;
use crate::domain::{RecordKind, collections};
use crate::undo::{self, UndoCounts, UndoEnd};

/// Errors of `importd undo`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// The claim failed.
    #[error(transparent)]
    Claim(#[from] crate::claim::Error),
    /// The undo failed (a later run resumes it).
    #[error(transparent)]
    Undo(#[from] undo::Error),
}

/// How `importd undo` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (now or earlier); the text says what it did.
    Done(String),
    /// Nothing to undo, with the reason.
    Refused(String),
    /// No such import.
    NotFound,
    /// Not finished within the wait (it goes on in a daemon, or a later
    /// `importd undo` resumes it).
    Pending,
    /// Interrupted (Ctrl-C): released, resumable.
    Released,
}

/// What the recorded `undo` of queue document `q` says, if it finished.
fn recorded(q: &Document) -> Option<Outcome> {
    let u = q.get_document("undo").ok()?;
    u.get_datetime("finished_at").ok()?;
    Some(match u.get_str("state") {
        Ok("refused") => Outcome::Refused(u.get_str("reason").unwrap_or("refused").to_owned()),
        _ => Outcome::Done(UndoCounts::from_doc(u).describe(kind_of(q))),
    })
}

fn kind_of(q: &Document) -> RecordKind {
    q.get_str("source")
        .ok()
        .and_then(RecordKind::from_source)
        .unwrap_or(RecordKind::Deals)
}

fn is_dry_run(q: &Document) -> bool {
    q.get_document("additional_data")
        .ok()
        .and_then(|a| a.get_bool("dry_run").ok())
        == Some(true)
}

/// Requests and runs the undo of `id`, waiting up to `wait` for a running
/// import to stop or a daemon's undo to finish. `notes` receives progress
/// lines for the user.
pub async fn undo(
    db: &Database,
    claimer: &Claimer,
    id: ObjectId,
    wait: Duration,
    stop: &CancellationToken,
    notes: &mut impl FnMut(&str),
) -> Result<Outcome, Error> {
    let queues = db.collection::<Document>(collections::QUEUES);
    let Some(q) = queues.find_one(doc! { "_id": id }).await? else {
        return Ok(Outcome::NotFound);
    };
    if let Some(done) = recorded(&q) {
        return Ok(done);
    }
    if is_dry_run(&q) {
        return Ok(Outcome::Refused(
            "a dry run writes nothing, so there is nothing to undo".into(),
        ));
    }
    let mut request = doc! { "undo_requested": true, "undo_requested_at": DateTime::now() };
    let running = !matches!(
        q.get_str("status"),
        Ok("completed" | "failed" | "cancelled")
    );
    if running {
        notes("The import has not finished: cancelling it first.");
        request.insert("cancel_requested", true);
    }
    queues
        .update_one(
            doc! { "_id": id, "undo.finished_at": { "$exists": false } },
            doc! { "$set": request },
        )
        .await?;
    let start = Instant::now();
    let mut told = false;
    loop {
        if let Some(lease) = claimer.claim_undo(Some(id)).await? {
            notes("Undoing...");
            let ended = match undo::run(db, &lease, stop).await {
                Ok(ended) => ended,
                Err(e) => {
                    // Given back as the daemon does: recorded, counted
                    // towards the undo's attempts, resumed by a later claim.
                    let _ = lease
                        .release_after_error(&crate::telemetry::error_chain(&e))
                        .await;
                    return Err(e.into());
                }
            };
            return Ok(match ended {
                UndoEnd::Done(c) => Outcome::Done(c.describe(kind_of(&lease.doc))),
                UndoEnd::Refused(r) => Outcome::Refused(r),
                UndoEnd::Released => Outcome::Released,
            });
        }
        let q = queues
            .find_one(doc! { "_id": id })
            .await?
            .unwrap_or_default();
        if let Some(done) = recorded(&q) {
            return Ok(done);
        }
        if !told {
            notes("Waiting (the import is stopping, or a daemon is undoing it)...");
            told = true;
        }
        if start.elapsed() >= wait || stop.is_cancelled() {
            return Ok(Outcome::Pending);
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
