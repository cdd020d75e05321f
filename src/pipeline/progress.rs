//! A run's progress and checkpoint: counted as batches commit, saved on
//! the queue document at most every `import.progress_interval`, with the
//! time left told from the pace of this run.

use std::time::{Duration, Instant};

use bson::Document;
use tracing::{info, warn};

use crate::claim::{self, Checkpoint, Final, Lease, Progress};
use crate::domain::LineNo;
use crate::fetch::ObjectInfo;
use crate::outcomes::Totals;
use crate::telemetry::error_chain;
use crate::telemetry::metrics as m;

use super::Services;
use super::drive::Done;
use super::stop::{Abort, STOP_CANCELLED, Stop};

/// Progress of a run: in-memory counters and the committed checkpoint.
pub(super) struct Tracker {
    pub(super) progress: Progress,
    pub(super) checkpoint: Checkpoint,
    /// The checkpoint's line when this run began.
    pub(super) start_line: LineNo,
    /// The checkpoint's byte when this run began, and when it began.
    pub(super) start_byte: u64,
    pub(super) started: Instant,
    /// Whether byte offsets are the file's (not a transcoded file's): the
    /// time left is told from them.
    pub(super) exact_offsets: bool,
    /// Bytes of a transcoded file read so far (its record offsets count
    /// decoded bytes, not the file's): the percent is told from it.
    pub(super) file_bytes_read: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    pub(super) size: u64,
    /// The object an earlier run read, if one did: a resumed run reads
    /// the same version or none.
    pub(super) object: Option<ObjectInfo>,
    pub(super) last_save: Instant,
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

pub(super) fn progress_from_totals(t: Totals, before: Progress, outcome: &Final) -> Progress {
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

pub(super) fn progress_from_doc(doc: &Document) -> Progress {
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

/// Counts a committed batch and saves progress at most every interval.
pub(super) async fn commit(
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
        let at = match &tracker.file_bytes_read {
            Some(read) => read.load(std::sync::atomic::Ordering::Relaxed),
            None => end.byte,
        };
        p.percent = (at as f64 / tracker.size as f64 * 100.0).min(99.9);
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

pub(super) async fn save(lease: &Lease, tracker: &mut Tracker, stop: &Stop) -> Result<(), Abort> {
    // Bounded like a heartbeat: a database that does not answer must not
    // hold the run (and its writers) past the point its lease is lost.
    let saved = tokio::time::timeout(
        lease.duration() / 3,
        lease.save_progress(
            tracker.progress,
            tracker.checkpoint,
            tracker.checkpoint.line > tracker.start_line,
        ),
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
}
