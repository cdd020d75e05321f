//! The write loop of a run: a producer task streams, maps and batches the
//! rows into a bounded channel; the loop starts up to `writers` batch
//! writes through a [`Sink`] and commits them in file order.

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, info};

use crate::claim::Lease;
use crate::domain::{FileError, LineNo};
use crate::map::{FailedRow, RawCells};
use crate::outcomes::BatchOutcome;
use crate::parse::{Records, Start};

use super::Services;
use super::progress::{Tracker, commit, save};
use super::stop::{Abort, Stop, unless_lost};

/// A batch of mapped rows (deals or contacts), cut by row count.
pub(super) struct Batch<R> {
    pub(super) rows: Vec<Result<R, Box<FailedRow>>>,
    pub(super) first_line: LineNo,
    pub(super) last_line: LineNo,
    /// Where reading resumes after this batch.
    pub(super) end: Start,
    /// Data records read through this batch.
    pub(super) records_end: u64,
    /// Bytes of its records' fields.
    pub(super) bytes: usize,
}

/// Where a batch ends in the file.
pub(super) struct Mark {
    end: Start,
    records_end: u64,
}

impl Mark {
    /// The batch written, with `outcome`.
    pub(super) fn done(self, outcome: BatchOutcome) -> Done {
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
    pub(super) fn split(self) -> (BatchOutcome, Vec<R>, Mark) {
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

/// Where the rows of a run come from.
pub(super) struct Source {
    pub(super) records: Records,
    pub(super) batch_size: usize,
    pub(super) max_rows: Option<u64>,
    /// Data records before the first one read (a resumed run's checkpoint).
    pub(super) records_before: u64,
    /// Records to read and drop first (a resumed transcoded file).
    pub(super) skip: u64,
}

/// What writes the batches of one kind of record.
pub(super) trait Sink<R> {
    /// Prepares `batch` and starts writing it in its own task.
    async fn start(&mut self, batch: Batch<R>) -> Result<AbortOnDropHandle<Written>, Abort>;
    /// Runs on each written batch, in file order, before it is committed.
    async fn settle(&mut self, _done: &mut Done) -> Result<(), Abort> {
        Ok(())
    }
}

/// The shared context of one run's write loop.
pub(super) struct Run<'a> {
    pub(super) svc: &'a Services,
    pub(super) lease: &'a Lease,
    pub(super) stop: &'a Stop,
    pub(super) channel: usize,
}

impl Run<'_> {
    /// Streams `source` through `map` into batches (a producer task), and
    /// writes them through `sink` with up to `writers` in flight,
    /// committing them in file order. Returns at the end of the file, or
    /// with the reason the run stopped.
    pub(super) async fn drive<R, M, S>(
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
                    unless_lost(stop, sink.settle(&mut done)).await?;
                    unless_lost(stop, commit(svc, lease, tracker, stop, &done)).await?;
                }
                save(lease, tracker, stop).await?;
                return Err(reason);
            }
            None => {}
        }
        // A file-level error of the producer (over the row limit, the
        // object replaced) comes after every batch it sent is committed.
        let total_records = producer
            .await
            .map_err(|e| Abort::Transient(format!("parser task failed: {e}")))??;
        tracker.progress.total_rows = Some(total_records);
        info!(rows = total_records, "All rows written");
        Ok(())
    }
}

/// A written batch.
pub(super) struct Done {
    pub(super) outcome: BatchOutcome,
    /// Where reading resumes after it.
    pub(super) end: Start,
    /// Data records read through it.
    pub(super) records_end: u64,
    /// Per `outcome.skipped`: the record, when it matched a deal an earlier
    /// row of this import was to create.
    pub(super) skipped_raws: Vec<Option<RawCells>>,
    /// Rows that were to create a deal and failed: `(line, name)`.
    pub(super) failed_creates: Vec<(LineNo, String)>,
}

pub(super) type Written = Result<Done, Abort>;

/// The result of a batch writer task (a panic is a transient failure: the
/// lease is released and the batch is written again by the next attempt).
fn joined(done: Result<Written, tokio::task::JoinError>) -> Written {
    done.map_err(|e| Abort::Transient(format!("batch writer task failed: {e}")))?
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
            // kept: see `pipeline::take_back`) like any others.
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
