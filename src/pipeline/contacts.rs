//! Writing a contacts import, one batch at a time (the first line of an
//! email in the file creates its contact).

use std::collections::BTreeSet;
use std::time::Instant;

use backon::Retryable;
use bson::oid::ObjectId;
use mongodb::Database;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, warn};

use crate::domain::LineNo;
use crate::map::MappedContact;
use crate::outcomes::{BatchOutcome, LineOutcome, RecordedBatch};
use crate::telemetry::error_chain;
use crate::telemetry::metrics as m;
use crate::write::{ContactWrite, ContactWriter};

use super::drive::{Batch, Sink, Written};
use super::stop::Abort;
use super::{record_outcome, recorded_batch, rejected_row, write_retry};

/// Writes a contacts import.
pub(super) struct ContactSink {
    pub(super) db: Database,
    pub(super) writer: ContactWriter,
    pub(super) queue_id: ObjectId,
    /// First lines of the batches an earlier run recorded.
    pub(super) replayed: BTreeSet<LineNo>,
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
