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

    /// The deal document of one mapped row. Values from the CSV only ever
    /// land in field values, never in keys or operators: custom field ids
    /// were checked to be 24-hex by `map::Plan`.
    pub fn build(
        &self,
        deal: &MappedDeal,
        stage_id: Option<ObjectId>,
        now: DateTime,
    ) -> Result<Document> {
        let id = deal_id(&self.queue_id, deal.line).ok_or(Error::LineOutOfRange(deal.line))?;
        let mut d = Document::new();
        d.insert("_id", id);
        d.insert("name", deal.name.as_str());
        if let Some(v) = deal.value {
            d.insert("value", v);
        }
        if let Some(s) = stage_id {
            d.insert("stage_id", s);
        }
        if let Some(s) = &deal.status {
            d.insert("status", s.as_str());
        }
        if let Some(s) = &deal.contract_type {
            d.insert("contract_type", s.as_str());
        }
        if let Some(ms) = deal.expected_close_date {
            d.insert("expected_close_date", DateTime::from_millis(ms));
        }
        if let Some(s) = &deal.description {
            d.insert("description", s.as_str());
        }
        if let Some(s) = &deal.contact_email {
            d.insert("contact_email", s.as_str());
        }
        if let Some(s) = &deal.contact_name {
            d.insert("contact_name", s.as_str());
        }
        d.insert("account_id", self.account_id);
        d.insert("pipeline_id", self.pipeline_id);
        d.insert("owner", self.user_id);
        d.insert("created_by", self.user_id);
        d.insert("source", "csv");
        d.insert("tags", self.tags.clone());
        let mut info = Document::new();
        for (k, v) in &deal.custom {
            info.insert(k.as_str(), v.as_str());
        }
        d.insert("additional_info", info);
        d.insert(
            "import",
            doc! { "queue_id": self.queue_id, "line": deal.line as i64 },
        );
        d.insert("created_at", now);
        d.insert("updated_at", now);
        Ok(d)
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
