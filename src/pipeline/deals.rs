//! Writing a deals import: stages, duplicate strategy, contact links,
//! inserts and updates per batch, and the reuse of a batch an earlier run
//! recorded.

use std::collections::BTreeSet;
use std::time::Instant;

use backon::{BackoffBuilder, Retryable};
use bson::oid::ObjectId;
use bson::{RawDocumentBuf, doc};
use mongodb::Database;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, warn};

use crate::claim::Lease;
use crate::contacts::{ContactLinker, ContactRef, Linked};
use crate::domain::{DuplicateStrategy, FileError, ImportSpec, LineNo, collections};
use crate::map::{FailedRow, MappedDeal, Plan, RawCells};
use crate::outcomes::{BatchOutcome, LineOutcome, RecordedBatch};
use crate::parse::Start;
use crate::stages::StageCache;
use crate::telemetry::error_chain;
use crate::telemetry::metrics as m;
use crate::write::{self, DealWriter, LineWrite, Match, NameIndex};

use super::drive::{Batch, Done, Sink, Written};
use super::stop::Abort;
use super::{Services, delete_outcomes, record_outcome, recorded_batch, rejected_row, write_retry};

/// Writes a deals import: stages, duplicate strategy, contact links.
pub(super) struct DealSink {
    db: Database,
    queue_id: ObjectId,
    writer: DealWriter,
    pub(super) stages: StageCache,
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
    pub(super) async fn new(
        svc: &Services,
        lease: &Lease,
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
            queue_id: lease.queue_id,
            writer: DealWriter::new(svc.db.collection(collections::DEALS), spec, pipeline_id)
                .with_clock(lease.clock().clone()),
            stages,
            linker: plan.links_contacts().then(|| {
                ContactLinker::new(&svc.db, spec, svc.settings.import.contact_cache.get())
                    .with_clock(lease.clock().clone())
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
}

/// The names of the pipeline's deals, for `skip` / `update` matching.
pub(super) async fn deal_names(
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

/// Deletes the deals this import created and its per-line outcomes
/// (idempotent: a retry or a later attempt deletes what is left).
pub(super) async fn roll_back(db: &Database, queue_id: ObjectId) -> Result<(), Abort> {
    let deleted = (|| write::delete_created(db, queue_id))
        .retry(write_retry())
        .when(|e| e.is_transient())
        .await
        .map_err(|e| Abort::Transient(error_chain(&e)))?;
    delete_outcomes(db, queue_id).await?;
    warn!(deleted, "Import failed as a whole: its deals were removed");
    Ok(())
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
    let now = writer.now();
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
pub(super) async fn load_stages(
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
pub(super) async fn record_stages(lease: &Lease, stages: &StageCache) -> Result<(), Abort> {
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
pub(super) fn stage_limit_row(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcomes;

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
}
