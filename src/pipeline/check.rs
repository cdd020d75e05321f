//! A dry run: every line checked and its outcome recorded as a real run
//! would record it; no record, stage or contact written.

use backon::Retryable;
use bson::oid::ObjectId;
use mongodb::Database;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::domain::{DuplicateStrategy, ImportSpec, RecordKind, collections};
use crate::map::{Mapped, Plan};
use crate::outcomes::BatchOutcome;
use crate::stages::StageCache;
use crate::write::{Match, NameIndex};

use super::deals::{deal_names, load_stages, stage_limit_row};
use super::drive::{Batch, Sink, Written};
use super::stop::Abort;
use super::{Services, record_outcome, write_retry};

/// A dry run's sink: records each line's outcome as a real run would (a
/// valid row would create a record, or, under `skip` / `update`, meet an
/// existing one: in the database or created by an earlier row of the
/// file), writes nothing else.
pub(super) struct CheckSink {
    db: Database,
    queue_id: ObjectId,
    dupes: Option<CheckDupes>,
    /// Deals naming stages: the pipeline's, and those the import would
    /// create.
    pub(super) stages: Option<StageCache>,
}

/// Duplicate matching of a dry run (see [`CheckSink`]).
struct CheckDupes {
    strategy: DuplicateStrategy,
    /// Deals: the pipeline's names, read as a real run reads them;
    /// contacts: the emails met so far.
    names: NameIndex,
    /// Contacts: the account whose contacts each batch's emails are
    /// looked up in.
    contacts_of: Option<ObjectId>,
}

impl CheckSink {
    pub(super) async fn new(svc: &Services, spec: &ImportSpec, plan: &Plan) -> Result<Self, Abort> {
        let stages = match spec.pipeline_id {
            Some(pipeline_id) if plan.maps_stages() => {
                Some(load_stages(svc, spec, pipeline_id).await?)
            }
            _ => None,
        };
        let names = match (spec.kind, spec.duplicate_strategy, spec.pipeline_id) {
            (_, DuplicateStrategy::Create, _) => None,
            (RecordKind::Deals, _, Some(pipeline_id)) => {
                Some(deal_names(svc, spec, pipeline_id).await?)
            }
            _ => Some(NameIndex::empty(spec.queue_id)),
        };
        Ok(Self {
            db: svc.db.clone(),
            queue_id: spec.queue_id,
            dupes: names.map(|names| CheckDupes {
                strategy: spec.duplicate_strategy,
                names,
                contacts_of: (spec.kind == RecordKind::Contacts).then_some(spec.account_id),
            }),
            stages,
        })
    }

    /// Decides, in file order, what each valid row of a batch would do.
    async fn classify<R: Mapped>(
        &mut self,
        rows: &[R],
        outcome: &mut BatchOutcome,
    ) -> Result<(), Abort> {
        if let Some(d) = self.dupes.as_mut()
            && let Some(account_id) = d.contacts_of
        {
            let coll = self.db.collection(collections::CONTACTS);
            let emails: Vec<&str> = rows.iter().map(Mapped::match_key).collect();
            let found = (|| crate::contacts::contact_ids(&coll, account_id, &emails))
                .retry(write_retry())
                .when(crate::db::is_transient)
                .await?;
            for (email, id) in &found {
                d.names.remember(email, *id);
            }
        }
        let mut refused = false;
        for r in rows {
            // As a real run: the duplicate decision first (a row to skip
            // names no stage), then the stage of a row to create or update.
            let decided = match self.dupes.as_mut() {
                None => Match::Create,
                Some(d) => match (d.names.decide(r.line(), r.match_key()), d.strategy) {
                    (Match::Existing(id), DuplicateStrategy::Skip) => {
                        outcome.skipped.push((r.line(), id));
                        continue;
                    }
                    (decided, _) => decided,
                },
            };
            if let (Some(stages), Some(stage)) = (self.stages.as_mut(), r.stage())
                && let Err(crate::stages::Error::Limit(limit)) = stages.preview(stage)
            {
                // One new stage too many: the row fails, and creates no
                // deal later rows of its name could match.
                if let Some(d) = self.dupes.as_mut() {
                    d.names.forget(r.line(), r.match_key());
                }
                outcome
                    .failed
                    .push(stage_limit_row(r.line(), stage, r.cells(), limit));
                refused = true;
                continue;
            }
            match decided {
                Match::Create => outcome.imported.push(r.line()),
                Match::Existing(id) => outcome.updated.push((r.line(), id)),
            }
        }
        if refused {
            outcome.failed.sort_by_key(|f| f.error.line);
        }
        Ok(())
    }
}

impl<R: Mapped + Send + 'static> Sink<R> for CheckSink {
    async fn start(&mut self, batch: Batch<R>) -> Result<AbortOnDropHandle<Written>, Abort> {
        let (mut outcome, rows, mark) = batch.split();
        // Here, in file order, not in the spawned task.
        self.classify(&rows, &mut outcome).await?;
        drop(rows);
        let (db, queue_id) = (self.db.clone(), self.queue_id);
        Ok(AbortOnDropHandle::new(tokio::spawn(
            async move {
                record_outcome(&db, queue_id, &outcome).await?;
                Ok(mark.done(outcome))
            }
            .in_current_span(),
        )))
    }
}
