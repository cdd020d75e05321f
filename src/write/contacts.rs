//! A contacts import's batch of mapped contacts → one result per line.
//!
//! A contact is one email address of an account (unique index `(account_id,
//! email)`), so a contacts import never creates a contact twice: the first
//! line naming an email creates it (with the deterministic `_id` of its
//! `(queue_id, line)`, as a deal), and every later line naming it, in this
//! file or another, is a duplicate:
//! - `skip` (the default): the existing contact is left alone, the line is
//!   `skipped` with its id; new contacts go out as one unordered
//!   `insert_many`, and only the lines the unique index refused are read
//!   back;
//! - `update`: one ordered `update` command of upserts, so rows naming the
//!   same email apply in file order: `$set` of the mapped fields, the
//!   identity (`_id`, owner, import, ...) only on insert.
//!
//! Idempotent: a replayed line finds the contact it created (its `_id` is
//! the line's) and counts as imported again, never as a duplicate of
//! itself; `$set` of the same values changes nothing. Batches of one import
//! must be written one after the other (the pipeline does), so "first line"
//! means first in the file.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, RawArrayBuf, RawDocumentBuf, doc};
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::error::{ErrorKind, InsertManyError};

use super::{Error, Result, UPDATE_COMMAND_BYTES, update_command};
use crate::contacts::ContactBuilder;
use crate::domain::{DuplicateStrategy, ImportSpec, LineNo, contact_id};
use crate::map::MappedContact;

/// Times an upsert that lost a race on the unique email index is sent
/// again (it then matches the contact that won).
const UPSERT_RACE_RETRIES: usize = 3;

/// What happened to one line's contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContactWrite {
    /// Created now.
    Created,
    /// Created by an earlier run of this line (replay).
    AlreadyImported,
    /// An existing contact with this email was updated (`update`).
    Updated(ObjectId),
    /// An existing contact with this email was left alone (`skip`).
    Skipped(ObjectId),
    /// The database refused it, or the line repeats the email of a line
    /// of this batch that was refused.
    Rejected(String),
}

/// Writes the contacts of one contacts import.
#[derive(Clone)]
pub struct ContactWriter {
    coll: Collection<RawDocumentBuf>,
    builder: ContactBuilder,
    queue_id: ObjectId,
    account_id: ObjectId,
    strategy: DuplicateStrategy,
}

impl ContactWriter {
    /// A writer for the contacts import described by `spec`.
    pub fn new(coll: Collection<Document>, spec: &ImportSpec) -> Self {
        Self {
            coll: coll.clone_with_type(),
            builder: ContactBuilder::new(spec),
            queue_id: spec.queue_id,
            account_id: spec.account_id,
            strategy: spec.duplicate_strategy,
        }
    }

    /// The id a line's new contact gets.
    fn id_of(&self, line: LineNo) -> Result<ObjectId> {
        contact_id(&self.queue_id, line).ok_or(Error::LineOutOfRange(line))
    }

    /// Writes `rows` (in file order) by the import's strategy; one result
    /// per row, in order.
    pub async fn write(&self, rows: &[MappedContact]) -> Result<Vec<ContactWrite>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        match self.strategy {
            DuplicateStrategy::Update => self.upsert(rows).await,
            _ => self.insert_new(rows).await,
        }
    }

    /// `skip`: inserts the first row of each email; classifies the rest.
    async fn insert_new(&self, rows: &[MappedContact]) -> Result<Vec<ContactWrite>> {
        let now = DateTime::now();
        // Within the batch, the first row of an email is the one written;
        // the later ones share its result.
        // `first_of`: email → its first row's place in `firsts`.
        let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
        let mut firsts = Vec::with_capacity(rows.len());
        let mut docs = Vec::with_capacity(rows.len());
        for (i, c) in rows.iter().enumerate() {
            if let Entry::Vacant(e) = first_of.entry(c.email.as_str()) {
                e.insert(firsts.len());
                firsts.push(i);
                let id = self.id_of(c.line)?;
                docs.push(self.builder.build_row(id, c, now));
            }
        }
        let mut first_results = vec![ContactWrite::Created; docs.len()];
        let mut conflicts = Vec::new();
        if let Err(err) = self.coll.insert_many(&docs).ordered(false).await {
            let write_errors = match err.kind.as_ref() {
                ErrorKind::InsertMany(InsertManyError {
                    write_errors: Some(w),
                    write_concern_error: None,
                    ..
                }) => w.clone(),
                ErrorKind::InsertMany(InsertManyError {
                    write_concern_error: Some(wce),
                    ..
                }) => return Err(Error::WriteConcern(format!("code {}", wce.code))),
                _ => return Err(err.into()),
            };
            for w in write_errors {
                let Some(slot) = first_results.get_mut(w.index) else {
                    continue;
                };
                if w.code == 11000 {
                    conflicts.push(w.index);
                } else {
                    *slot = ContactWrite::Rejected(format!(
                        "The database refused the contact (code {}).",
                        w.code
                    ));
                }
            }
        }
        if !conflicts.is_empty() {
            let emails: Vec<&str> = conflicts
                .iter()
                .map(|&k| rows[firsts[k]].email.as_str())
                .collect();
            let stored = self.ids_by_email(&emails).await?;
            for &k in &conflicts {
                let c = &rows[firsts[k]];
                first_results[k] = match stored.get(c.email.as_str()) {
                    Some(&id) if id == self.id_of(c.line)? => ContactWrite::AlreadyImported,
                    Some(&id) => ContactWrite::Skipped(id),
                    // No contact has the email: the line's own id is taken.
                    None => self.own_id_taken(c).await?,
                };
            }
        }
        let mut results = Vec::with_capacity(rows.len());
        for (i, c) in rows.iter().enumerate() {
            let first = first_of[c.email.as_str()];
            let k = firsts[first];
            let r = &first_results[first];
            results.push(if k == i {
                r.clone()
            } else {
                match r {
                    ContactWrite::Created | ContactWrite::AlreadyImported => {
                        ContactWrite::Skipped(self.id_of(rows[k].line)?)
                    }
                    ContactWrite::Skipped(id) | ContactWrite::Updated(id) => {
                        ContactWrite::Skipped(*id)
                    }
                    ContactWrite::Rejected(_) => ContactWrite::Rejected(format!(
                        "Not imported: it repeats the email of line {}, which failed.",
                        rows[k].line
                    )),
                }
            });
        }
        Ok(results)
    }

    /// A line's insert hit its own `_id` but no contact has its email: the
    /// contact this line created earlier has since been given another
    /// email (a replay), or an unrelated record holds the id.
    async fn own_id_taken(&self, c: &MappedContact) -> Result<ContactWrite> {
        let id = self.id_of(c.line)?;
        let stored = self
            .coll
            .clone_with_type::<Document>()
            .find_one(doc! { "_id": id })
            .projection(doc! { "import": 1 })
            .await?;
        let ours = stored
            .as_ref()
            .and_then(|d| d.get_document("import").ok())
            .is_some_and(|i| {
                i.get_object_id("queue_id").ok() == Some(self.queue_id)
                    && i.get_i64("line").ok() == Some(c.line as i64)
            });
        Ok(if ours {
            ContactWrite::AlreadyImported
        } else {
            ContactWrite::Rejected(
                "Another record already uses this contact's id; the line was not imported.".into(),
            )
        })
    }

    /// `_id` of the account's contacts with these emails.
    async fn ids_by_email(&self, emails: &[&str]) -> Result<HashMap<String, ObjectId>> {
        let mut cursor = self
            .coll
            .clone_with_type::<Document>()
            .find(doc! { "account_id": self.account_id, "email": { "$in": emails } })
            .projection(doc! { "_id": 1, "email": 1 })
            .await?;
        let mut found = HashMap::with_capacity(emails.len());
        while let Some(d) = cursor.try_next().await? {
            if let (Ok(id), Ok(email)) = (d.get_object_id("_id"), d.get_str("email")) {
                found.insert(email.to_owned(), id);
            }
        }
        Ok(found)
    }

    /// `update`: upserts in file order, cut into commands at
    /// [`UPDATE_COMMAND_BYTES`].
    async fn upsert(&self, rows: &[MappedContact]) -> Result<Vec<ContactWrite>> {
        let now = DateTime::now();
        let mut statements = Vec::with_capacity(rows.len());
        for c in rows {
            let id = self.id_of(c.line)?;
            statements.push(self.builder.upsert_statement(id, c, now));
        }
        // `None`: matched an existing contact (classified below).
        let mut upserted: Vec<Option<ContactWrite>> = vec![None; rows.len()];
        let mut start = 0;
        let mut races = 0;
        while start < rows.len() {
            let mut end = start;
            let mut bytes = 0;
            let mut chunk = RawArrayBuf::new();
            while end < rows.len() && (end == start || bytes < UPDATE_COMMAND_BYTES) {
                bytes += statements[end].as_bytes().len();
                chunk.push(statements[end].clone());
                end += 1;
            }
            let reply = update_command(&self.coll, chunk, true).await?;
            if let Ok(ups) = reply.get_array("upserted") {
                for u in ups.iter().filter_map(Bson::as_document) {
                    if let Some(i) = index_of(u).map(|i| start + i)
                        && i < end
                    {
                        upserted[i] = Some(ContactWrite::Created);
                    }
                }
            }
            // Ordered: the command stopped at its first error, if any.
            let error = reply
                .get_array("writeErrors")
                .ok()
                .and_then(|e| e.iter().filter_map(Bson::as_document).next())
                .and_then(|e| Some((start + index_of(e)?, e.get_i32("code").unwrap_or_default())));
            match error {
                None => start = end,
                // Another import created this email between our match and
                // insert: send it again, it now matches.
                Some((i, 11000)) if races < UPSERT_RACE_RETRIES => {
                    races += 1;
                    start = i;
                }
                Some((i, code)) => {
                    upserted[i] = Some(ContactWrite::Rejected(format!(
                        "The database refused the contact (code {code})."
                    )));
                    start = i + 1;
                }
            }
        }
        let matched: Vec<&str> = rows
            .iter()
            .zip(&upserted)
            .filter(|(_, u)| u.is_none())
            .map(|(c, _)| c.email.as_str())
            .collect();
        let stored = if matched.is_empty() {
            HashMap::new()
        } else {
            self.ids_by_email(&matched).await?
        };
        let mut results = Vec::with_capacity(rows.len());
        for (c, u) in rows.iter().zip(upserted) {
            results.push(match u {
                Some(r) => r,
                None => match stored.get(c.email.as_str()) {
                    Some(&id) if id == self.id_of(c.line)? => ContactWrite::AlreadyImported,
                    Some(&id) => ContactWrite::Updated(id),
                    None => ContactWrite::Rejected(
                        "The contact to update was deleted meanwhile.".into(),
                    ),
                },
            });
        }
        Ok(results)
    }
}

/// The `index` of an `upserted` or `writeErrors` entry.
fn index_of(d: &Document) -> Option<usize> {
    match d.get("index")? {
        Bson::Int32(i) => usize::try_from(*i).ok(),
        Bson::Int64(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}
