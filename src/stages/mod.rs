//! Pipeline stages referenced by an import: resolve each normalised name to
//! a stage id, creating missing stages exactly once. Writes no deals.
//!
//! Guarantees:
//! - Existing stages match case- and space-insensitively (their stored
//!   `name` is normalised with `domain::text::stage_key` before comparing,
//!   so stages the dashboard created with any spelling are found).
//! - A missing stage is inserted with `name` = key and `label` = first-seen
//!   spelling. The unique index on `(account_id, pipeline_id, name)` makes a
//!   race between two imports (or two daemons) create one stage: the loser
//!   gets a duplicate-key error and reads the winner's stage.
//! - One cache per import: each name costs at most one round trip.

use std::collections::HashMap;

use bson::oid::ObjectId;
use bson::{DateTime, Document, doc};
use futures::TryStreamExt;
use mongodb::{Collection, Database};

use crate::domain::collections;
use crate::domain::text::stage_key;
use crate::map::StageName;

/// Errors of the stages layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// A stage vanished between a duplicate-key error and the re-read (its
    /// name is a CSV value: kept out of the message, which is logged).
    #[error("a stage could be neither created nor found")]
    Vanished,
    /// The import created as many stages as it may.
    #[error("the import created {0} stages, as many as one import may")]
    Limit(usize),
}

impl Error {
    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Mongo(e) => crate::db::is_transient(e),
            Self::Vanished => true,
            Self::Limit(_) => false,
        }
    }
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stages of one pipeline, as seen by one import.
pub struct StageCache {
    coll: Collection<Document>,
    account_id: ObjectId,
    pipeline_id: ObjectId,
    user_id: ObjectId,
    queue_id: ObjectId,
    by_key: HashMap<String, ObjectId>,
    next_order: i64,
    created: Vec<String>,
    limit: usize,
}

/// Whether the stage document `d` was created by import `queue_id`.
pub fn created_by(d: &Document, queue_id: ObjectId) -> bool {
    d.get_document("import")
        .and_then(|i| i.get_object_id("queue_id"))
        .is_ok_and(|q| q == queue_id)
}

impl StageCache {
    /// Loads the pipeline's existing stages, for import `queue_id` of
    /// `user_id`, which may create up to `limit` (stages an earlier run of
    /// the same import created count as created by it).
    pub async fn load(
        db: &Database,
        account_id: ObjectId,
        pipeline_id: ObjectId,
        user_id: ObjectId,
        queue_id: ObjectId,
        limit: usize,
    ) -> Result<Self> {
        let coll = db.collection::<Document>(collections::PIPELINE_STAGES);
        let mut cursor = coll
            .find(doc! { "account_id": account_id, "pipeline_id": pipeline_id })
            .projection(doc! { "name": 1, "label": 1, "order": 1, "import.queue_id": 1 })
            .await?;
        let mut by_key = HashMap::new();
        let mut created = Vec::new();
        let mut max_order = 0;
        while let Some(d) = cursor.try_next().await? {
            let (Ok(id), Ok(name)) = (d.get_object_id("_id"), d.get_str("name")) else {
                continue;
            };
            if created_by(&d, queue_id) {
                created.push(d.get_str("label").unwrap_or(name).to_owned());
            }
            // First one wins if the dashboard stored two spellings.
            by_key.entry(stage_key(name)).or_insert(id);
            if let Some(o) = d
                .get("order")
                .and_then(|o| o.as_i64().or(o.as_i32().map(i64::from)))
            {
                max_order = max_order.max(o);
            }
        }
        Ok(Self {
            coll,
            account_id,
            pipeline_id,
            user_id,
            queue_id,
            by_key,
            next_order: max_order + 1,
            created,
            limit,
        })
    }

    /// Labels of the stages this import created (in any of its runs), or
    /// would create (a dry run, see [`StageCache::preview`]).
    pub fn created(&self) -> &[String] {
        &self.created
    }

    /// A dry run's [`StageCache::resolve`]: decides as a real run would,
    /// creating nothing (a stage it would create is remembered by name, so
    /// later rows of that name do not count it twice).
    pub fn preview(&mut self, stage: &StageName) -> Result<()> {
        if self.by_key.contains_key(&stage.key) {
            return Ok(());
        }
        if self.created.len() >= self.limit {
            return Err(Error::Limit(self.limit));
        }
        self.by_key.insert(stage.key.clone(), ObjectId::new());
        self.created.push(stage.label.clone());
        Ok(())
    }

    /// The id of the stage `stage`, creating it if the pipeline lacks it
    /// (and the import has not created `limit` stages yet: the same rows
    /// reach the limit in every run, each run counting what earlier ones
    /// created).
    pub async fn resolve(&mut self, stage: &StageName) -> Result<ObjectId> {
        if let Some(id) = self.by_key.get(&stage.key) {
            return Ok(*id);
        }
        if self.created.len() >= self.limit {
            return Err(Error::Limit(self.limit));
        }
        let new_id = ObjectId::new();
        let insert = self
            .coll
            .insert_one(doc! {
                "_id": new_id,
                "account_id": self.account_id,
                "pipeline_id": self.pipeline_id,
                "name": &stage.key,
                "label": &stage.label,
                "order": self.next_order,
                "created_by": self.user_id,
                "created_at": DateTime::now(),
                "source": "csv",
                // Which import made it: an undo removes it if no deal uses it.
                "import": { "queue_id": self.queue_id },
            })
            .await;
        let id = match insert {
            Ok(_) => {
                self.next_order += 1;
                self.created.push(stage.label.clone());
                new_id
            }
            Err(e) if crate::db::is_duplicate_key(&e) => self
                .coll
                .find_one(doc! {
                    "account_id": self.account_id,
                    "pipeline_id": self.pipeline_id,
                    "name": &stage.key,
                })
                .projection(doc! { "_id": 1 })
                .await?
                .and_then(|d| d.get_object_id("_id").ok())
                .ok_or(Error::Vanished)?,
            Err(e) => return Err(e.into()),
        };
        self.by_key.insert(stage.key.clone(), id);
        Ok(id)
    }
}
