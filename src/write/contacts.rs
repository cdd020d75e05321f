//! A contacts import's batch of mapped contacts → one result per line.
//!
//! A contact is one email address of an account (unique index `(account_id,
//! email)`), so a contacts import never creates a contact twice: the first
//! line naming an email creates it (with the deterministic `_id` of its
//! `(queue_id, line)`, as a deal), and every later line naming it, in this
//! file or another, is a duplicate:
//! - `skip` (the default): the existing contact is left alone, the line is
//!   `skipped` with its id;
//! - `update`: the existing contact gets the line's non-empty mapped fields,
//!   lines applying in file order; identity, owner and provenance stay.
//!
//! Cost per batch: one unordered `insert_many` of the new contacts (rows of
//! one email merged first); only when the unique index refuses some, one
//! read of those emails and, under `update`, one `update` command by `_id`.
//! A file of new contacts costs what inserting them by hand costs.
//!
//! Idempotent: a replayed line finds the contact it created (its `_id` is
//! the line's) and counts as imported again, never as a duplicate of
//! itself; `$set` of the same values changes nothing. Batches of one import
//! must be written one after the other (the pipeline does), so "first line"
//! means first in the file.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use bson::oid::ObjectId;
use bson::{DateTime, Document, RawArrayBuf, RawDocumentBuf, doc};
use futures::TryStreamExt;
use mongodb::Collection;

use super::{
    Error, Result, UPDATE_COMMAND_BYTES, befores, insert_unordered, keeps_trail, superseded,
    update_by_id,
};
use crate::clock::Clock;
use crate::contacts::ContactBuilder;
use crate::domain::{DuplicateStrategy, ImportSpec, LineNo, contact_id};
use crate::map::MappedContact;

/// What happened to one line's contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContactWrite {
    /// Created now.
    Created,
    /// Created by an earlier run of this line (replay).
    AlreadyImported,
    /// An existing contact with this email was updated (`update`).
    Updated(ObjectId),
    /// Not applied now: a later line of this import already updated the
    /// contact (a batch written again after a crash before its outcomes
    /// were stored); its first run applied it (or, rarely, the database
    /// refused it then; the later line's values stand): it counts as
    /// updated.
    Superseded(ObjectId),
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
    /// Before images of the updates (`befores`).
    befores: Collection<RawDocumentBuf>,
    builder: ContactBuilder,
    queue_id: ObjectId,
    account_id: ObjectId,
    strategy: DuplicateStrategy,
    clock: Clock,
}

impl ContactWriter {
    /// A writer for the contacts import described by `spec`.
    pub fn new(coll: Collection<Document>, spec: &ImportSpec) -> Self {
        Self {
            coll: coll.clone_with_type(),
            befores: super::befores_of(&coll),
            builder: ContactBuilder::new(spec),
            queue_id: spec.queue_id,
            account_id: spec.account_id,
            strategy: spec.duplicate_strategy,
            clock: Clock::default(),
        }
    }

    /// Stamps contacts (`created_at`, `updated_at`) with `clock`'s time.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The id a line's new contact gets.
    fn id_of(&self, line: LineNo) -> Result<ObjectId> {
        contact_id(&self.queue_id, line).ok_or(Error::LineOutOfRange(line))
    }

    /// Writes `rows` (in file order) by the import's strategy; one result
    /// per row, in order.
    ///
    /// Rows naming one email are one group: its first row creates the
    /// contact when the account has none (one unordered `insert_many` for
    /// the batch; under `update` the group's rows merged in file order).
    /// Only lines the unique index refused are read back: the contact this
    /// line created in an earlier run (a replay: imported), or an existing
    /// one (skipped, or, under `update`, one `update` command of the
    /// batch's merged rows by `_id`).
    pub async fn write(&self, rows: &[MappedContact]) -> Result<Vec<ContactWrite>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.clock.now();
        let update = self.strategy == DuplicateStrategy::Update;
        let groups = group_by_email(rows, update);
        let mut docs = Vec::with_capacity(groups.len());
        for g in &groups {
            docs.push(
                self.builder
                    .build_row(self.id_of(g.contact.line)?, &g.contact, now),
            );
        }
        let mut first = vec![ContactWrite::Created; groups.len()];
        let conflicts = self.insert(&docs, &mut first).await?;
        drop(docs);
        let emails: Vec<&str> = conflicts
            .iter()
            .map(|&k| groups[k].contact.email.as_str())
            .collect();
        let stored = if emails.is_empty() {
            HashMap::new()
        } else {
            self.ids_by_email(&emails).await?
        };
        let mut updates = Vec::new();
        if !conflicts.is_empty() {
            for &k in &conflicts {
                let c = &groups[k].contact;
                first[k] = match stored.get(c.email.as_str()) {
                    // Created by this line in an earlier run, from the same
                    // merged rows: nothing to apply again.
                    Some((id, _)) if *id == self.id_of(c.line)? => ContactWrite::AlreadyImported,
                    Some((id, last)) if update => {
                        // A replayed older line is not applied over a newer
                        // line of this import (it was applied before it).
                        if superseded(last.as_ref(), self.queue_id, groups[k].last_line) {
                            ContactWrite::Superseded(*id)
                        } else {
                            updates.push((k, *id, keeps_trail(last.as_ref()), last.as_ref()));
                            ContactWrite::Updated(*id)
                        }
                    }
                    Some((id, _)) => ContactWrite::Skipped(*id),
                    // No contact has the email: the line's own id is taken.
                    None => self.own_id_taken(c, now).await?,
                };
            }
        }
        if !updates.is_empty() {
            self.update(&groups, &updates, &mut first, now).await?;
        }
        let mut results = vec![ContactWrite::Created; rows.len()];
        for (g, r) in groups.iter().zip(first) {
            let head = g.rows[0];
            for &i in &g.rows[1..] {
                results[i] = match &r {
                    ContactWrite::Created | ContactWrite::AlreadyImported => {
                        let id = self.id_of(rows[head].line)?;
                        if update {
                            ContactWrite::Updated(id)
                        } else {
                            ContactWrite::Skipped(id)
                        }
                    }
                    ContactWrite::Skipped(id) => ContactWrite::Skipped(*id),
                    ContactWrite::Updated(id) => ContactWrite::Updated(*id),
                    ContactWrite::Superseded(id) => ContactWrite::Superseded(*id),
                    ContactWrite::Rejected(_) => ContactWrite::Rejected(format!(
                        "Not imported: it repeats the email of line {}, which failed.",
                        rows[head].line
                    )),
                };
            }
            results[head] = r;
        }
        Ok(results)
    }

    /// Inserts `docs` unordered; marks refused ones in `results` and
    /// returns the indexes the unique indexes refused.
    async fn insert(
        &self,
        docs: &[RawDocumentBuf],
        results: &mut [ContactWrite],
    ) -> Result<Vec<usize>> {
        let mut conflicts = Vec::new();
        for (index, code) in insert_unordered(&self.coll, docs).await? {
            let Some(slot) = results.get_mut(index) else {
                continue;
            };
            if code == 11000 {
                conflicts.push(index);
            } else {
                *slot = ContactWrite::Rejected(format!(
                    "The database refused the contact (code {code})."
                ));
            }
        }
        Ok(conflicts)
    }

    /// Applies the merged rows of `updates` (`(group, contact id)`) in
    /// `update` commands by `_id` (unordered: one statement per contact),
    /// cut at [`UPDATE_COMMAND_BYTES`]; refused or vanished contacts fail
    /// their group.
    async fn update(
        &self,
        groups: &[Group<'_>],
        updates: &[(usize, ObjectId, bool, Option<&Document>)],
        results: &mut [ContactWrite],
        now: DateTime,
    ) -> Result<()> {
        let statements: Vec<RawDocumentBuf> = updates
            .iter()
            .map(|&(k, id, trail, _)| {
                let g = &groups[k];
                self.builder
                    .update_statement(id, &g.contact, g.last_line, trail, now)
            })
            .collect();
        // What they overwrite, stored before they do (an undo puts it
        // back); one image for the group's merged lines.
        let mut images = Vec::with_capacity(updates.len());
        for (&(k, id, _, stored), statement) in updates.iter().zip(&statements) {
            let (Some(stored), Ok(set)) = (
                stored,
                statement
                    .get_document("u")
                    .and_then(|u| u.get_document("$set")),
            ) else {
                continue;
            };
            let g = &groups[k];
            if let Some(mut image) = befores::image(self.queue_id, g.last_line, id, stored, set) {
                image.insert("lines", g.rows.len() as i64);
                images.push(image);
            }
        }
        befores::store(&self.befores, &images).await?;
        let mut statements = statements.into_iter();
        let mut start = 0;
        while start < updates.len() {
            let mut chunk = RawArrayBuf::new();
            let mut bytes = 0;
            let mut end = start;
            while end < updates.len() && (end == start || bytes < UPDATE_COMMAND_BYTES) {
                let Some(statement) = statements.next() else {
                    break;
                };
                bytes += statement.as_bytes().len();
                chunk.push(statement);
                end += 1;
            }
            let ids: Vec<ObjectId> = updates[start..end].iter().map(|(_, id, ..)| *id).collect();
            let scope = doc! { "account_id": self.account_id };
            let failed = update_by_id(&self.coll, chunk, &ids, scope, "contact").await?;
            let mut refused = Vec::new();
            for (&(k, ..), f) in updates[start..end].iter().zip(failed) {
                if let Some(message) = f {
                    results[k] = ContactWrite::Rejected(message);
                    refused.push(groups[k].last_line);
                }
            }
            befores::mark_refused(&self.befores, self.queue_id, &refused).await?;
            start = end;
        }
        Ok(())
    }

    /// A line's insert was refused as a duplicate but no contact has its
    /// email: the contact this line created earlier has since been given
    /// another email (a replay), or an unrelated record holds the id. When
    /// nothing holds the id either, the contact that had the email was
    /// deleted since (or another unique index refused the line): one more
    /// insert says which.
    async fn own_id_taken(&self, c: &MappedContact, now: DateTime) -> Result<ContactWrite> {
        let id = self.id_of(c.line)?;
        let stored = self
            .coll
            .clone_with_type::<Document>()
            .find_one(doc! { "_id": id })
            .projection(doc! { "import": 1 })
            .await?;
        if stored.is_none() {
            let doc = self.builder.build_row(id, c, now);
            let refused = insert_unordered(&self.coll, std::slice::from_ref(&doc)).await?;
            return Ok(match refused.first() {
                None => ContactWrite::Created,
                Some(&(_, 11000)) => ContactWrite::Rejected(
                    "The database refused the contact as a duplicate of another record \
                     (a unique field other than the email); the line was not imported."
                        .into(),
                ),
                Some(&(_, code)) => ContactWrite::Rejected(format!(
                    "The database refused the contact (code {code})."
                )),
            });
        }
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

    /// `_id` and the updates by imports (`last_import`, `last_imports`) of
    /// the account's contacts with these emails.
    async fn ids_by_email(
        &self,
        emails: &[&str],
    ) -> Result<HashMap<String, (ObjectId, Option<Document>)>> {
        let coll = self.coll.clone_with_type::<Document>();
        let find = coll.find(crate::db::contacts_by_email(self.account_id, emails));
        // Under `update`, the whole contact: its before image is taken from
        // it (contacts are small).
        let mut cursor = if self.strategy == DuplicateStrategy::Update {
            find.await?
        } else {
            find.projection(doc! { "_id": 1, "email": 1, "last_import": 1, "last_imports": 1 })
                .await?
        };
        let mut found = HashMap::with_capacity(emails.len());
        while let Some(d) = cursor.try_next().await? {
            if let (Ok(id), Ok(email)) = (d.get_object_id("_id"), d.get_str("email")) {
                let email = email.to_owned();
                found.insert(email, (id, Some(d)));
            }
        }
        Ok(found)
    }
}

/// The rows of one batch naming one email.
#[derive(Debug)]
struct Group<'a> {
    /// Indexes of the rows, in file order.
    rows: Vec<usize>,
    /// What the group writes: its first row, or (`update`) all its rows
    /// applied in file order, each non-empty field overriding.
    contact: std::borrow::Cow<'a, MappedContact>,
    /// Line of its last row.
    last_line: LineNo,
}

/// Groups rows by email, in the order of each email's first row. Pure.
fn group_by_email(rows: &[MappedContact], merge: bool) -> Vec<Group<'_>> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    let mut groups: Vec<Group<'_>> = Vec::with_capacity(rows.len());
    for (i, c) in rows.iter().enumerate() {
        match index.entry(c.email.as_str()) {
            Entry::Vacant(e) => {
                e.insert(groups.len());
                groups.push(Group {
                    rows: vec![i],
                    contact: std::borrow::Cow::Borrowed(c),
                    last_line: c.line,
                });
            }
            Entry::Occupied(e) => {
                let g = &mut groups[*e.get()];
                g.rows.push(i);
                g.last_line = c.line;
                if merge {
                    overlay(g.contact.to_mut(), c);
                }
            }
        }
    }
    groups
}

/// Applies a later row's non-empty fields over `into`.
fn overlay(into: &mut MappedContact, later: &MappedContact) {
    for (slot, v) in [
        (&mut into.first_name, &later.first_name),
        (&mut into.last_name, &later.last_name),
        (&mut into.phone, &later.phone),
        (&mut into.company, &later.company),
    ] {
        if v.is_some() {
            slot.clone_from(v);
        }
    }
    for (k, v) in &later.custom {
        match into.custom.iter_mut().find(|(id, _)| id == k) {
            Some(slot) => slot.1.clone_from(v),
            None => into.custom.push((k.clone(), v.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: LineNo, email: &str, first: Option<&str>, phone: Option<&str>) -> MappedContact {
        MappedContact {
            line,
            email: email.into(),
            first_name: first.map(Into::into),
            phone: phone.map(Into::into),
            ..MappedContact::default()
        }
    }

    #[test]
    fn rows_of_one_email_group_in_file_order_and_merge_later_fields() {
        let mut rows = vec![
            row(2, "a@x.co", Some("A"), Some("1")),
            row(3, "b@x.co", Some("B"), None),
            row(4, "a@x.co", Some("A2"), None),
            row(5, "a@x.co", None, Some("3")),
        ];
        rows[3].custom = vec![("64b7f0c2a1b2c3d4e5f60718".into(), "gold".into())];
        let merged = group_by_email(&rows, true);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].rows, vec![0, 2, 3]);
        assert_eq!(merged[0].last_line, 5);
        let a = &merged[0].contact;
        assert_eq!(
            (a.line, a.first_name.as_deref(), a.phone.as_deref()),
            (2, Some("A2"), Some("3"))
        );
        assert_eq!(a.custom.len(), 1);
        assert_eq!(merged[1].rows, vec![1]);
        // `skip` writes the first row as it is.
        let first = group_by_email(&rows, false);
        assert_eq!(first[0].contact.first_name.as_deref(), Some("A"));
        assert_eq!(first[0].contact.phone.as_deref(), Some("1"));
    }
}
