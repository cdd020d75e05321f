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
use bson::{Bson, DateTime, Document, RawArrayBuf, RawDocumentBuf, doc};
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::error::{ErrorKind, InsertManyError};

use crate::clock::Clock;
use crate::domain::{ImportSpec, LineNo, deal_id};
use crate::map::MappedDeal;

pub mod befores;
mod contacts;
mod dedupe;

pub use contacts::{ContactWrite, ContactWriter};
pub use dedupe::{Match, NameIndex};

/// Largest `update` command sent (`duplicate_strategy: update`), well
/// under the server's 16 MB message limit.
pub const UPDATE_COMMAND_BYTES: usize = 4 * 1024 * 1024;

/// Errors of the write layer (per-line problems are not errors).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed for the whole batch.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// A document could not be read back from its BSON bytes.
    #[error(transparent)]
    Bson(#[from] bson::raw::Error),
    /// A document could not be turned into BSON.
    #[error(transparent)]
    BsonSer(#[from] bson::ser::Error),
    /// The write was applied but not acknowledged as asked.
    #[error("write concern error: {0}")]
    WriteConcern(String),
    /// A line past the deterministic id's range.
    #[error("line {0} is beyond the largest supported line number")]
    LineOutOfRange(LineNo),
    /// The database refused to store what an update overwrites.
    #[error("the database refused a before image (code {0})")]
    ImageRefused(i32),
}

impl Error {
    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Mongo(e) => crate::db::is_transient(e),
            Self::WriteConcern(_) => true,
            Self::LineOutOfRange(_) | Self::Bson(_) | Self::BsonSer(_) | Self::ImageRefused(_) => {
                false
            }
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
    /// An existing record updated (`duplicate_strategy: update`).
    Updated,
    /// Not applied now: a later line of this import already updated the
    /// record (a batch written again after a crash before its outcomes
    /// were stored). Its first run applied it, or the database refused it
    /// then (rare; the later line's values stand either way): it counts as
    /// updated.
    Superseded,
    /// The database refused it.
    Rejected(String),
}

/// Deletes the deals import `queue_id` created: its `_id` range (one index
/// range scan), double-checked on `import.queue_id`. Returns how many.
pub async fn delete_created(db: &mongodb::Database, queue_id: ObjectId) -> Result<u64> {
    let (lo, hi) = crate::domain::deal_id_range(&queue_id);
    let r = db
        .collection::<Document>(crate::domain::collections::DEALS)
        .delete_many(doc! { "_id": { "$gte": lo, "$lte": hi }, "import.queue_id": queue_id })
        .await?;
    Ok(r.deleted_count)
}

/// Sends one `update` command of `statements` (`ordered`: stopping at the
/// first refused statement) to `coll`'s
/// collection, with the collection's write concern, and returns the reply. A write-concern
/// error is an error of the whole command (retried), carrying only its code.
pub(crate) async fn update_command(
    coll: &Collection<RawDocumentBuf>,
    statements: RawArrayBuf,
    ordered: bool,
) -> Result<Document> {
    let ns = coll.namespace();
    let mut command = RawDocumentBuf::new();
    command.append("update", ns.coll.as_str());
    command.append("updates", statements);
    command.append("ordered", ordered);
    if let Some(wc) = coll.write_concern() {
        command.append(
            "writeConcern",
            RawDocumentBuf::from_document(&bson::to_document(wc)?)?,
        );
    }
    let reply = coll
        .client()
        .database(&ns.db)
        .run_raw_command(command)
        .await?;
    if let Ok(wce) = reply.get_document("writeConcernError") {
        return Err(Error::WriteConcern(format!(
            "code {}",
            wce.get_i32("code").unwrap_or_default()
        )));
    }
    Ok(reply)
}

/// Sends one unordered `update` command of `statements`, statement `i`
/// updating the record `ids[i]` (within `scope`: its account, ...). Returns
/// per statement `None` (applied, or not needed: a newer line of the import
/// already updated it) or why it failed: refused, or the record is gone.
/// The reply counts matches without saying which statement matched, so
/// only when some did not are the records read back.
pub(crate) async fn update_by_id(
    coll: &Collection<RawDocumentBuf>,
    statements: RawArrayBuf,
    ids: &[ObjectId],
    mut scope: Document,
    noun: &str,
) -> Result<Vec<Option<String>>> {
    let reply = update_command(coll, statements, false).await?;
    let mut failed: Vec<Option<String>> = vec![None; ids.len()];
    let mut refused = 0;
    if let Ok(errors) = reply.get_array("writeErrors") {
        for e in errors.iter().filter_map(Bson::as_document) {
            if let Some(slot) = write_error_index(e).and_then(|i| failed.get_mut(i)) {
                *slot = Some(format!(
                    "The database refused the update (code {}).",
                    e.get_i32("code").unwrap_or_default()
                ));
                refused += 1;
            }
        }
    }
    let matched = reply
        .get("n")
        .and_then(|n| n.as_i64().or_else(|| n.as_i32().map(i64::from)))
        .unwrap_or_default();
    if matched + refused < ids.len() as i64 {
        scope.insert("_id", doc! { "$in": ids });
        let mut cursor = coll
            .clone_with_type::<Document>()
            .find(scope)
            .projection(doc! { "_id": 1 })
            .await?;
        let mut present = std::collections::HashSet::new();
        while let Some(d) = cursor.try_next().await? {
            if let Ok(id) = d.get_object_id("_id") {
                present.insert(id);
            }
        }
        for (slot, id) in failed.iter_mut().zip(ids) {
            if slot.is_none() && !present.contains(id) {
                *slot = Some(format!(
                    "The existing {noun} to update was deleted meanwhile."
                ));
            }
        }
    }
    Ok(failed)
}

/// The `index` of a `writeErrors` entry.
pub(crate) fn write_error_index(d: &Document) -> Option<usize> {
    match d.get("index")? {
        Bson::Int32(i) => usize::try_from(*i).ok(),
        Bson::Int64(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

/// Why an unordered insert failed as a whole.
#[derive(Debug)]
pub(crate) enum InsertFailure {
    /// Written but not acknowledged as asked (retried as a whole); only
    /// the code travels on, the server's messages may quote values.
    WriteConcern(i32),
    /// The call failed.
    Mongo(mongodb::error::Error),
}

/// Inserts `docs` unordered (the server writes every document it can);
/// returns the refused ones as `(index, code)`.
pub(crate) async fn insert_unordered(
    coll: &Collection<RawDocumentBuf>,
    docs: &[RawDocumentBuf],
) -> std::result::Result<Vec<(usize, i32)>, InsertFailure> {
    if docs.is_empty() {
        return Ok(Vec::new());
    }
    let Err(err) = coll.insert_many(docs).ordered(false).await else {
        return Ok(Vec::new());
    };
    match err.kind.as_ref() {
        ErrorKind::InsertMany(InsertManyError {
            write_errors: Some(w),
            write_concern_error: None,
            ..
        }) => Ok(w.iter().map(|w| (w.index, w.code)).collect()),
        ErrorKind::InsertMany(InsertManyError {
            write_concern_error: Some(wce),
            ..
        }) => Err(InsertFailure::WriteConcern(wce.code)),
        _ => Err(InsertFailure::Mongo(err)),
    }
}

impl From<InsertFailure> for Error {
    fn from(f: InsertFailure) -> Self {
        match f {
            InsertFailure::WriteConcern(code) => Self::WriteConcern(format!("code {code}")),
            InsertFailure::Mongo(e) => Self::Mongo(e),
        }
    }
}

/// The before images' collection, in the database of `coll`.
pub(crate) fn befores_of<T: Send + Sync>(coll: &Collection<T>) -> Collection<RawDocumentBuf> {
    coll.client()
        .database(&coll.namespace().db)
        .collection(befores::COLLECTION)
}

/// Updates by imports a record remembers (`last_imports`, oldest first).
pub const KEPT_UPDATES: i32 = 8;

/// The `$push` of an update of a record by line `line` of import
/// `queue_id` onto its `last_imports` (the last [`KEPT_UPDATES`] kept).
pub(crate) fn push_last_import(queue_id: ObjectId, line: LineNo) -> RawDocumentBuf {
    let mut entry = raw_with_capacity(48);
    entry.append_ref("queue_id", queue_id);
    entry.append_ref("line", line as i64);
    let mut each = RawArrayBuf::new();
    each.push(entry);
    let mut spec = raw_with_capacity(80);
    spec.append_ref("$each", &each);
    spec.append_ref("$slice", -KEPT_UPDATES);
    let mut push = raw_with_capacity(96);
    push.append_ref("last_imports", &spec);
    push
}

/// Whether an update may push onto the record's `last_imports` (`record`:
/// as read, if it was): a record with a field of that name that is not a
/// list is updated without it (the push would fail the update).
pub(crate) fn keeps_trail(record: Option<&Document>) -> bool {
    record.is_none_or(|r| matches!(r.get("last_imports"), None | Some(Bson::Array(_))))
}

/// Whether import `queue_id` already applied its line `line`, or a later
/// one, to a record (`record`: its `last_import` and `last_imports`): then
/// line `line` (of a batch a resumed import writes again) must not be
/// applied over it. The record remembers its last [`KEPT_UPDATES`] updates,
/// so this holds even when another import updated it since.
pub(crate) fn superseded(record: Option<&Document>, queue_id: ObjectId, line: LineNo) -> bool {
    let applied = |l: &Document| {
        l.get_object_id("queue_id").ok() == Some(queue_id)
            && l.get_i64("line").is_ok_and(|at| at >= line as i64)
    };
    record.is_some_and(|r| {
        r.get_document("last_import").is_ok_and(applied)
            || r.get_array("last_imports")
                .into_iter()
                .flatten()
                .filter_map(Bson::as_document)
                .any(applied)
    })
}

/// The line of an update's `$set` (its `last_import.line`).
fn set_line(set: &RawDocumentBuf) -> Option<LineNo> {
    set.get_document("last_import")
        .ok()
        .and_then(|l| l.get_i64("line").ok())
        .and_then(|l| LineNo::try_from(l).ok())
}

/// Starting size of a deal's BSON buffer: a typical deal fits, so building
/// one costs a single allocation.
const DEAL_CAPACITY: usize = 512;

/// An empty BSON document whose buffer holds `capacity` bytes.
pub(crate) fn raw_with_capacity(capacity: usize) -> RawDocumentBuf {
    let mut bytes = Vec::with_capacity(capacity.max(5));
    bytes.extend_from_slice(&5_i32.to_le_bytes());
    bytes.push(0);
    RawDocumentBuf::from_bytes(bytes).expect("the empty document is valid BSON")
}

/// Builds the deal documents of one import (pure: no I/O).
#[derive(Clone, Debug)]
pub struct DealBuilder {
    queue_id: ObjectId,
    account_id: ObjectId,
    pipeline_id: ObjectId,
    user_id: ObjectId,
    tags: RawArrayBuf,
}

/// Where a run of update statements (`(id, bytes)` each, in file order) is
/// cut into commands: before a second statement on one id (an unordered
/// command may apply its statements in any order, so a later line of the
/// file must come in a later command), and after the statement that brings
/// a command to `limit` bytes. Consecutive ranges covering every statement.
/// Pure.
fn command_cuts(statements: &[(ObjectId, usize)], limit: usize) -> Vec<std::ops::Range<usize>> {
    let mut cuts = Vec::new();
    let (mut first, mut bytes) = (0, 0);
    let mut ids = std::collections::HashSet::new();
    for (i, (id, size)) in statements.iter().enumerate() {
        if !ids.insert(*id) {
            cuts.push(first..i);
            (first, bytes) = (i, 0);
            ids.clear();
            ids.insert(*id);
        }
        bytes += size;
        if bytes >= limit {
            cuts.push(first..i + 1);
            (first, bytes) = (i + 1, 0);
            ids.clear();
        }
    }
    if first < statements.len() {
        cuts.push(first..statements.len());
    }
    cuts
}

/// Inserts and updates deal documents for one import.
#[derive(Clone)]
pub struct DealWriter {
    coll: Collection<RawDocumentBuf>,
    /// Before images of the updates (`befores`).
    befores: Collection<RawDocumentBuf>,
    builder: DealBuilder,
    clock: Clock,
}

impl DealBuilder {
    /// A builder for the import described by `spec`, into `pipeline_id`.
    pub fn new(spec: &ImportSpec, pipeline_id: ObjectId) -> Self {
        Self {
            queue_id: spec.queue_id,
            account_id: spec.account_id,
            pipeline_id,
            user_id: spec.user_id,
            tags: spec.tags.iter().map(String::as_str).collect(),
        }
    }

    /// The fields a row sets on a deal (new or updated), appended straight
    /// into BSON bytes: no per-field key or value allocation (the import
    /// profile showed building a `Document` per row as the largest cost).
    /// Values from the CSV only ever land in field values, never in keys or
    /// operators: custom field ids were checked to be 24-hex by `map::Plan`.
    fn row_fields(
        deal: &MappedDeal,
        stage_id: Option<ObjectId>,
        into: &mut RawDocumentBuf,
        custom_prefix: &str,
    ) {
        into.append_ref("name", deal.name.as_str());
        if let Some(v) = deal.value {
            into.append_ref("value", v);
        }
        if let Some(s) = stage_id {
            into.append_ref("stage_id", s);
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
                into.append_ref(k, v.as_str());
            }
        }
        if let Some(ms) = deal.expected_close_date {
            into.append_ref("expected_close_date", DateTime::from_millis(ms));
        }
        if custom_prefix.is_empty() {
            let mut info = raw_with_capacity(64 + 48 * deal.custom.len());
            for (k, v) in &deal.custom {
                info.append_ref(k.as_str(), v.as_str());
            }
            into.append_ref("additional_info", &info);
        } else {
            for (k, v) in &deal.custom {
                into.append_ref(format!("{custom_prefix}{k}"), v.as_str());
            }
        }
    }

    /// The new deal document of one mapped row.
    pub fn build(
        &self,
        deal: &MappedDeal,
        stage_id: Option<ObjectId>,
        now: DateTime,
    ) -> Result<RawDocumentBuf> {
        let id = deal_id(&self.queue_id, deal.line).ok_or(Error::LineOutOfRange(deal.line))?;
        let mut d = raw_with_capacity(DEAL_CAPACITY);
        d.append_ref("_id", id);
        Self::row_fields(deal, stage_id, &mut d, "");
        d.append_ref("account_id", self.account_id);
        d.append_ref("pipeline_id", self.pipeline_id);
        d.append_ref("owner", self.user_id);
        d.append_ref("created_by", self.user_id);
        d.append_ref("source", "csv");
        d.append_ref("tags", &self.tags);
        let mut import = raw_with_capacity(48);
        import.append_ref("queue_id", self.queue_id);
        import.append_ref("line", deal.line as i64);
        d.append_ref("import", &import);
        d.append_ref("created_at", now);
        d.append_ref("updated_at", now);
        Ok(d)
    }

    /// The `$set` of an existing deal updated by a row (`duplicate_strategy:
    /// update`): the mapped fields only; account, pipeline, owner and
    /// creation stay as they are. (The statement adds the line to the
    /// deal's `last_imports`.)
    pub fn update_fields(
        &self,
        deal: &MappedDeal,
        stage_id: Option<ObjectId>,
        now: DateTime,
    ) -> RawDocumentBuf {
        let mut set = raw_with_capacity(DEAL_CAPACITY);
        Self::row_fields(deal, stage_id, &mut set, "additional_info.");
        set.append_ref("updated_at", now);
        let mut last_import = raw_with_capacity(48);
        last_import.append_ref("queue_id", self.queue_id);
        last_import.append_ref("line", deal.line as i64);
        set.append_ref("last_import", &last_import);
        set
    }
}

impl DealWriter {
    /// A writer for the import described by `spec`.
    pub fn new(coll: Collection<Document>, spec: &ImportSpec, pipeline_id: ObjectId) -> Self {
        Self {
            coll: coll.clone_with_type(),
            befores: befores_of(&coll),
            builder: DealBuilder::new(spec, pipeline_id),
            clock: Clock::default(),
        }
    }

    /// Stamps records (`created_at`, `updated_at`) with `clock`'s time.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The time to stamp records with.
    pub fn now(&self) -> DateTime {
        self.clock.now()
    }

    /// Builds this import's documents.
    pub fn builder(&self) -> &DealBuilder {
        &self.builder
    }

    /// Applies updates to existing deals of this account and pipeline, in
    /// `update` commands of many statements (unordered; any MongoDB version
    /// runs them) cut at [`UPDATE_COMMAND_BYTES`]; results are in the order
    /// of `updates`. `$set` of the same values is idempotent, so replays are
    /// harmless.
    pub async fn update(&self, updates: &[(ObjectId, &RawDocumentBuf)]) -> Result<Vec<LineWrite>> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        // A replayed older line is not applied over a newer one (its first
        // run applied it before the newer line, or the database refused it).
        let records = self.records(updates).await?;
        let superseded: Vec<bool> = updates
            .iter()
            .map(|(id, set)| {
                set_line(set)
                    .is_some_and(|line| superseded(records.get(id), self.builder.queue_id, line))
            })
            .collect();
        let due: Vec<(ObjectId, &RawDocumentBuf, bool)> = updates
            .iter()
            .zip(&superseded)
            .filter(|(_, s)| !**s)
            .map(|((id, set), _)| (*id, *set, keeps_trail(records.get(id))))
            .collect();
        // What they overwrite, stored before they do (an undo puts it back);
        // a record two lines update is imaged as the first leaves it.
        let mut records = records;
        let mut images = Vec::with_capacity(due.len());
        for (id, set, trail) in &due {
            let (Some(line), Some(record)) = (set_line(set), records.get_mut(id)) else {
                continue;
            };
            let queue_id = self.builder.queue_id;
            images.extend(befores::image(queue_id, line, *id, record, set));
            let pushed = trail.then(|| doc! { "queue_id": queue_id, "line": line as i64 });
            befores::apply(record, set, pushed, KEPT_UPDATES as usize);
        }
        befores::store(&self.befores, &images).await?;
        let applied = self.update_all(&due).await?;
        let refused: Vec<LineNo> = due
            .iter()
            .zip(&applied)
            .filter(|(_, r)| matches!(r, LineWrite::Rejected(_)))
            .filter_map(|((_, set, _), _)| set_line(set))
            .collect();
        befores::mark_refused(&self.befores, self.builder.queue_id, &refused).await?;
        let mut applied = applied.into_iter();
        Ok(superseded
            .iter()
            .map(|s| {
                if *s {
                    LineWrite::Superseded
                } else {
                    applied.next().unwrap_or(LineWrite::Updated)
                }
            })
            .collect())
    }

    /// `updates` of `(deal, $set, whether to push onto its last_imports)`.
    async fn update_all(
        &self,
        updates: &[(ObjectId, &RawDocumentBuf, bool)],
    ) -> Result<Vec<LineWrite>> {
        let statements: Vec<RawDocumentBuf> = updates
            .iter()
            .map(|(id, set, trail)| {
                let mut statement = RawDocumentBuf::new();
                statement.append("q", self.deal_filter(*id));
                let mut u = raw_with_capacity(set.as_bytes().len() + 112);
                u.append_ref("$set", &**set);
                if let Some(line) = set_line(set).filter(|_| *trail) {
                    u.append_ref("$push", &push_last_import(self.builder.queue_id, line));
                }
                statement.append("u", u);
                statement
            })
            .collect();
        let sizes: Vec<(ObjectId, usize)> = updates
            .iter()
            .zip(&statements)
            .map(|((id, ..), s)| (*id, s.as_bytes().len()))
            .collect();
        let mut results = Vec::with_capacity(updates.len());
        let mut statements = statements.into_iter();
        for range in command_cuts(&sizes, UPDATE_COMMAND_BYTES) {
            let mut sent = RawArrayBuf::new();
            for statement in statements.by_ref().take(range.len()) {
                sent.push(statement);
            }
            results.extend(self.update_chunk(&updates[range], sent).await?);
        }
        Ok(results)
    }

    fn deal_filter(&self, id: ObjectId) -> RawDocumentBuf {
        let mut q = RawDocumentBuf::new();
        q.append("_id", id);
        q.append("account_id", self.builder.account_id);
        q.append("pipeline_id", self.builder.pipeline_id);
        q
    }

    /// The updates by imports (`last_import`, `last_imports`) of the deals
    /// `updates` name, read in one query by `_id`.
    async fn records(
        &self,
        updates: &[(ObjectId, &RawDocumentBuf)],
    ) -> Result<std::collections::HashMap<ObjectId, Document>> {
        let ids: Vec<ObjectId> = updates.iter().map(|(id, _)| *id).collect();
        // What the updates tell apart (`last_import`, `last_imports`) and
        // what they overwrite (their before images).
        let mut fields = std::collections::BTreeSet::from(["last_import".to_owned()]);
        for (_, set) in updates {
            fields.extend(befores::changed_fields(set));
        }
        let projection: Document = fields.into_iter().map(|f| (f, Bson::Int32(1))).collect();
        let mut cursor = self
            .coll
            .clone_with_type::<Document>()
            .find(doc! {
                "_id": { "$in": &ids },
                "account_id": self.builder.account_id,
                "pipeline_id": self.builder.pipeline_id,
            })
            .projection(projection)
            .await?;
        let mut records = std::collections::HashMap::with_capacity(ids.len());
        while let Some(d) = cursor.try_next().await? {
            if let Ok(id) = d.get_object_id("_id") {
                records.insert(id, d);
            }
        }
        Ok(records)
    }

    /// One `update` command; see [`update_by_id`].
    async fn update_chunk(
        &self,
        chunk: &[(ObjectId, &RawDocumentBuf, bool)],
        statements: RawArrayBuf,
    ) -> Result<Vec<LineWrite>> {
        let ids: Vec<ObjectId> = chunk.iter().map(|(id, ..)| *id).collect();
        let scope = doc! {
            "account_id": self.builder.account_id,
            "pipeline_id": self.builder.pipeline_id,
        };
        let failed = update_by_id(&self.coll, statements, &ids, scope, "deal").await?;
        Ok(failed
            .into_iter()
            .map(|f| f.map_or(LineWrite::Updated, LineWrite::Rejected))
            .collect())
    }

    /// Inserts `docs` (built by [`DealBuilder::build`], for `lines` in the
    /// same order) and returns each line's result.
    pub async fn insert(
        &self,
        docs: &[RawDocumentBuf],
        lines: &[LineNo],
    ) -> Result<Vec<LineWrite>> {
        let mut results = vec![LineWrite::Created; docs.len()];
        let mut duplicates = Vec::new();
        for (index, code) in insert_unordered(&self.coll, docs).await? {
            let Some(slot) = results.get_mut(index) else {
                continue;
            };
            if code == 11000 {
                duplicates.push(index);
            } else {
                *slot =
                    LineWrite::Rejected(format!("The database refused the record (code {code})."));
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
        docs: &[RawDocumentBuf],
        lines: &[LineNo],
        duplicates: &[usize],
        results: &mut [LineWrite],
    ) -> Result<()> {
        let ids: Vec<Bson> = duplicates
            .iter()
            .filter_map(|&i| docs[i].get_object_id("_id").ok().map(Bson::ObjectId))
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
            if import.get_object_id("queue_id").ok() == Some(self.builder.queue_id)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_cut_before_a_repeated_deal_and_at_the_size_limit() {
        let (a, b, c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        let cuts = command_cuts(&[(a, 10), (b, 10), (a, 10), (c, 10)], 100);
        assert_eq!(cuts, [0..2, 2..4]);
        let cuts = command_cuts(&[(a, 60), (b, 60), (c, 10), (a, 10)], 100);
        assert_eq!(cuts, [0..2, 2..4]);
        assert_eq!(
            command_cuts(&[(a, 1), (a, 1), (a, 1)], 100),
            [0..1, 1..2, 2..3]
        );
        assert!(command_cuts(&[], 100).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn command_cuts_cover_every_statement_once_with_no_repeat_inside(
            picks in proptest::collection::vec((0usize..5, 1usize..50), 0..60),
        ) {
            let ids: Vec<ObjectId> = (0..5).map(|_| ObjectId::new()).collect();
            let statements: Vec<(ObjectId, usize)> =
                picks.iter().map(|&(k, n)| (ids[k], n)).collect();
            let cuts = command_cuts(&statements, 100);
            let mut next = 0;
            for r in &cuts {
                proptest::prop_assert_eq!(r.start, next);
                proptest::prop_assert!(!r.is_empty());
                let mut seen = std::collections::HashSet::new();
                proptest::prop_assert!(statements[r.clone()].iter().all(|(id, _)| seen.insert(*id)));
                let bytes: usize = statements[r.clone()].iter().map(|s| s.1).sum();
                let without_last = bytes - statements[r.end - 1].1;
                proptest::prop_assert!(without_last < 100);
                next = r.end;
            }
            proptest::prop_assert_eq!(next, statements.len());
        }
    }

    #[test]
    fn only_a_newer_line_of_the_same_import_supersedes() {
        let q = ObjectId::new();
        let last = doc! { "last_import": { "queue_id": q, "line": 1_500_i64 } };
        assert!(superseded(Some(&last), q, 3));
        assert!(superseded(Some(&last), q, 1_500));
        assert!(!superseded(Some(&last), q, 1_501));
        assert!(!superseded(Some(&last), ObjectId::new(), 3));
        assert!(!superseded(None, q, 3));
        // Another import updated the record since: the record's trail
        // still knows this import's line.
        let other = ObjectId::new();
        let since = doc! {
            "last_import": { "queue_id": other, "line": 2_i64 },
            "last_imports": [
                { "queue_id": q, "line": 1_500_i64 },
                { "queue_id": other, "line": 2_i64 },
            ],
        };
        assert!(superseded(Some(&since), q, 1_500));
        assert!(!superseded(Some(&since), q, 1_501));
    }

    #[test]
    fn a_field_of_that_name_that_is_no_list_keeps_no_trail() {
        assert!(keeps_trail(None));
        assert!(keeps_trail(Some(&doc! {})));
        assert!(keeps_trail(Some(&doc! { "last_imports": [] })));
        assert!(!keeps_trail(Some(
            &doc! { "last_imports": "the CRM's own" }
        )));
    }

    #[test]
    fn an_update_pushes_its_line_onto_the_kept_trail() {
        let q = ObjectId::new();
        let push = push_last_import(q, 42).to_document().unwrap();
        assert_eq!(
            push,
            doc! { "last_imports": { "$each": [{ "queue_id": q, "line": 42_i64 }], "$slice": -KEPT_UPDATES } }
        );
    }
    use crate::domain::{DuplicateStrategy, RecordKind};

    const CUSTOM: &str = "64b7f0c2a1b2c3d4e5f60718";

    fn spec() -> ImportSpec {
        ImportSpec {
            queue_id: ObjectId::new(),
            kind: RecordKind::Deals,
            user_id: ObjectId::new(),
            account_id: ObjectId::new(),
            parent_account: None,
            client_id: None,
            csv_key: "imports/a/b/deals.csv".into(),
            file_name: "deals.csv".into(),
            mappings: Vec::new(),
            pipeline_id: None,
            tags: vec!["q4".into(), "fair".into()],
            duplicate_strategy: DuplicateStrategy::Create,
            dry_run: false,
        }
    }

    fn deal() -> MappedDeal {
        MappedDeal {
            line: 7,
            name: "Acme \u{0} \"renewal\" $set".into(),
            value: Some(5000.5),
            stage: None,
            status: Some("closed_won".into()),
            contract_type: None,
            expected_close_date: Some(1_700_000_000_000),
            description: Some("multi\nline".into()),
            contact_email: Some("a@b.co".into()),
            contact_name: None,
            custom: vec![(CUSTOM.into(), "EMEA".into())],
            raw: Default::default(),
        }
    }

    #[test]
    fn a_new_deal_document_has_every_field_of_the_contract() {
        let spec = spec();
        let pipeline = ObjectId::new();
        let stage = ObjectId::new();
        let now = DateTime::from_millis(1_800_000_000_000);
        let raw = DealBuilder::new(&spec, pipeline)
            .build(&deal(), Some(stage), now)
            .unwrap();
        let expected = doc! {
            "_id": deal_id(&spec.queue_id, 7).unwrap(),
            "name": "Acme \u{0} \"renewal\" $set",
            "value": 5000.5,
            "stage_id": stage,
            "status": "closed_won",
            "description": "multi\nline",
            "contact_email": "a@b.co",
            "expected_close_date": DateTime::from_millis(1_700_000_000_000),
            "additional_info": { CUSTOM: "EMEA" },
            "account_id": spec.account_id,
            "pipeline_id": pipeline,
            "owner": spec.user_id,
            "created_by": spec.user_id,
            "source": "csv",
            "tags": ["q4", "fair"],
            "import": { "queue_id": spec.queue_id, "line": 7_i64 },
            "created_at": now,
            "updated_at": now,
        };
        assert_eq!(raw.to_document().unwrap(), expected);
    }

    #[test]
    fn an_update_sets_only_the_mapped_fields_and_custom_fields_by_path() {
        let spec = spec();
        let now = DateTime::from_millis(1_800_000_000_000);
        let mut d = deal();
        d.expected_close_date = None;
        d.description = None;
        d.contact_email = None;
        d.value = None;
        let set = DealBuilder::new(&spec, ObjectId::new())
            .update_fields(&d, None, now)
            .to_document()
            .unwrap();
        let expected = doc! {
            "name": "Acme \u{0} \"renewal\" $set",
            "status": "closed_won",
            format!("additional_info.{CUSTOM}"): "EMEA",
            "updated_at": now,
            "last_import": { "queue_id": spec.queue_id, "line": 7_i64 },
        };
        assert_eq!(set, expected);
    }
}
