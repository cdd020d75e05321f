//! Batch of mapped deals → one unordered bulk insert → one result per line.
//! Never touches `queues`.
//!
//! Idempotency: each deal's `_id` is `domain::deal_id(queue_id, line)`, so a
//! replay of any part of a file (a retried batch, a resumed import, a second
//! daemon after a lost lease) hits the `_id` index and creates nothing. A
//! duplicate-key error counts as "already imported" only after the stored
//! document is read back and proves to be this import's line; a chance clash
//! with an unrelated record is a failed line, never a silently lost row.
//!
//! A batch error never costs its good rows: the insert is unordered, so the
//! server writes every document it can, and per-document errors are pinned
//! to their lines by index. Transient errors (network, primary step-down)
//! retry the whole batch with backoff, which is safe for the same reason.

use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, doc};
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::error::{ErrorKind, InsertManyError};

use crate::domain::{ImportSpec, LineNo, deal_id};
use crate::map::MappedDeal;

mod dedupe;

pub use dedupe::{Match, NameIndex};

/// Errors of the write layer (per-line problems are not errors).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed for the whole batch.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// A line past the deterministic id's range.
    #[error("line {0} is beyond the largest supported line number")]
    LineOutOfRange(LineNo),
}

impl Error {
    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Mongo(e) => crate::db::is_transient(e),
            Self::LineOutOfRange(_) => false,
        }
    }
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What happened to one line's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineWrite {
    /// Inserted now.
    Created,
    /// Inserted by an earlier run of this import (replay).
    AlreadyImported,
    /// The database refused it.
    Rejected(String),
}

/// Builds and inserts deal documents for one import.
#[derive(Clone)]
pub struct DealWriter {
    coll: Collection<Document>,
    queue_id: ObjectId,
    account_id: ObjectId,
    pipeline_id: ObjectId,
    user_id: ObjectId,
    tags: Bson,
}

impl DealWriter {
    /// A writer for the import described by `spec`.
    pub fn new(coll: Collection<Document>, spec: &ImportSpec, pipeline_id: ObjectId) -> Self {
        Self {
            coll,
            queue_id: spec.queue_id,
            account_id: spec.account_id,
            pipeline_id,
            user_id: spec.user_id,
            tags: Bson::Array(spec.tags.iter().cloned().map(Bson::String).collect()),
        }
    }

    /// The fields a row sets on a deal (new or updated). Values from the CSV
    /// only ever land in field values, never in keys or operators: custom
    /// field ids were checked to be 24-hex by `map::Plan`.
    fn row_fields(
        deal: &MappedDeal,
        stage_id: Option<ObjectId>,
        into: &mut Document,
        custom_prefix: &str,
    ) {
        into.insert("name", deal.name.as_str());
        if let Some(v) = deal.value {
            into.insert("value", v);
        }
        if let Some(s) = stage_id {
            into.insert("stage_id", s);
        }
        let strings = [
            ("status", &deal.status),
            ("contract_type", &deal.contract_type),
            ("description", &deal.description),
            ("contact_email", &deal.contact_email),
            ("contact_name", &deal.contact_name),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                into.insert(k, v.as_str());
            }
        }
        if let Some(ms) = deal.expected_close_date {
            into.insert("expected_close_date", DateTime::from_millis(ms));
        }
        if custom_prefix.is_empty() {
            let mut info = Document::new();
            for (k, v) in &deal.custom {
                info.insert(k.as_str(), v.as_str());
            }
            into.insert("additional_info", info);
        } else {
            for (k, v) in &deal.custom {
                into.insert(format!("{custom_prefix}{k}"), v.as_str());
            }
        }
    }

    /// The new deal document of one mapped row.
    pub fn build(
        &self,
        deal: &MappedDeal,
        stage_id: Option<ObjectId>,
        now: DateTime,
    ) -> Result<Document> {
        let id = deal_id(&self.queue_id, deal.line).ok_or(Error::LineOutOfRange(deal.line))?;
        let mut d = Document::new();
        d.insert("_id", id);
        Self::row_fields(deal, stage_id, &mut d, "");
        d.insert("account_id", self.account_id);
        d.insert("pipeline_id", self.pipeline_id);
        d.insert("owner", self.user_id);
        d.insert("created_by", self.user_id);
        d.insert("source", "csv");
        d.insert("tags", self.tags.clone());
        d.insert(
            "import",
            doc! { "queue_id": self.queue_id, "line": deal.line as i64 },
        );
        d.insert("created_at", now);
        d.insert("updated_at", now);
        Ok(d)
    }

    /// The `$set` of an existing deal updated by a row (`duplicate_strategy:
    /// update`): the mapped fields only; account, pipeline, owner and
    /// creation stay as they are.
    pub fn update_fields(
        &self,
        deal: &MappedDeal,
        stage_id: Option<ObjectId>,
        now: DateTime,
    ) -> Document {
        let mut set = Document::new();
        Self::row_fields(deal, stage_id, &mut set, "additional_info.");
        set.insert("updated_at", now);
        set.insert(
            "last_import",
            doc! { "queue_id": self.queue_id, "line": deal.line as i64 },
        );
        set
    }

    /// Applies updates to existing deals of this account and pipeline.
    /// `$set` of the same values is idempotent, so replays are harmless.
    pub async fn update(&self, updates: &[(ObjectId, Document)]) -> Result<Vec<LineWrite>> {
        let mut results = Vec::with_capacity(updates.len());
        for (id, set) in updates {
            let r = self
                .coll
                .update_one(
                    doc! { "_id": id, "account_id": self.account_id, "pipeline_id": self.pipeline_id },
                    doc! { "$set": set.clone() },
                )
                .await?;
            results.push(if r.matched_count == 1 {
                LineWrite::Created
            } else {
                LineWrite::Rejected("The existing deal to update was deleted meanwhile.".into())
            });
        }
        Ok(results)
    }

    /// Inserts `docs` (built by [`DealWriter::build`], for `lines` in the
    /// same order) and returns each line's result.
    pub async fn insert(&self, docs: &[Document], lines: &[LineNo]) -> Result<Vec<LineWrite>> {
        let mut results = vec![LineWrite::Created; docs.len()];
        if docs.is_empty() {
            return Ok(results);
        }
        let err = match self.coll.insert_many(docs).ordered(false).await {
            Ok(_) => return Ok(results),
            Err(e) => e,
        };
        let write_errors = match err.kind.as_ref() {
            ErrorKind::InsertMany(InsertManyError {
                write_errors: Some(w),
                write_concern_error: None,
                ..
            }) => w.clone(),
            _ => return Err(err.into()),
        };
        let mut duplicates = Vec::new();
        for w in write_errors {
            let Some(slot) = results.get_mut(w.index) else {
                continue;
            };
            if w.code == 11000 {
                duplicates.push(w.index);
            } else {
                *slot = LineWrite::Rejected(format!(
                    "The database refused the record (code {}).",
                    w.code
                ));
            }
        }
        if !duplicates.is_empty() {
            self.verify_duplicates(docs, lines, &duplicates, &mut results)
                .await?;
        }
        Ok(results)
    }

    /// A duplicate `_id` is "already imported" only if the stored record is
    /// this import's line.
    async fn verify_duplicates(
        &self,
        docs: &[Document],
        lines: &[LineNo],
        duplicates: &[usize],
        results: &mut [LineWrite],
    ) -> Result<()> {
        let ids: Vec<Bson> = duplicates
            .iter()
            .filter_map(|&i| docs[i].get("_id").cloned())
            .collect();
        let mut cursor = self
            .coll
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "import": 1 })
            .await?;
        let mut ours = std::collections::HashSet::new();
        while let Some(d) = cursor.try_next().await? {
            let Ok(import) = d.get_document("import") else {
                continue;
            };
            if import.get_object_id("queue_id").ok() == Some(self.queue_id)
                && let Ok(id) = d.get_object_id("_id")
            {
                ours.insert((id, import.get_i64("line").ok()));
            }
        }
        for &i in duplicates {
            let id = docs[i].get_object_id("_id").ok();
            let line = lines[i] as i64;
            results[i] = if id.is_some_and(|id| ours.contains(&(id, Some(line)))) {
                LineWrite::AlreadyImported
            } else {
                LineWrite::Rejected(
                    "Another record already uses this record's id; the line was not imported."
                        .into(),
                )
            };
        }
        Ok(())
    }
}
