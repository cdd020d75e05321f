//! Contacts a deals import links to (SPEC.md: `contact_email` and
//! `contact_name` "link the deal to the account's contact with that email,
//! creating the contact if missing"). Writes no deals.
//!
//! Guarantees:
//! - One contact per `(account_id, email)`: the unique index on those keys
//!   makes two batches, two imports or two daemons racing on a new email
//!   create one contact; the loser's duplicate-key error is answered by
//!   reading the winner's contact.
//! - Existing contacts are linked, never modified.
//! - A contact created by an import has the deterministic id
//!   `contact_id(queue_id, line)` of the first line that named it (or, if
//!   that id is taken, `contact_fallback_id(queue_id, line)`), and
//!   `import: {queue_id, line}`. A replayed batch therefore recognises the
//!   contacts it created in an earlier run, so its count of contacts created
//!   is the same however often it runs, and support or an undo finds them
//!   by one `_id` range.
//! - Insert first, read only on conflict: an import of new contacts costs one
//!   round trip per batch; a bounded cache (`import.contact_cache`) saves
//!   the round trip for emails seen recently in the same import.
//!
//! Pure part: [`plan`] (which emails a batch must resolve, by which line)
//! and [`ContactBuilder`] (the document of a new contact, linked from a deal
//! or imported by a contacts import, and a contacts import's upsert),
//! unit-tested here. A contacts import's writes are `write::ContactWriter`.

use std::collections::HashMap;
use std::sync::Arc;

use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, RawArrayBuf, RawDocument, RawDocumentBuf, doc};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use quick_cache::sync::Cache;

use crate::clock::Clock;
use crate::domain::{ImportSpec, LineNo, collections, contact_fallback_id, contact_id};
use crate::map::MappedContact;
use crate::write::{InsertFailure, insert_unordered, raw_with_capacity};

/// Errors of the contacts layer (a contact refused for one line is not an
/// error: it fails that line).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB failed for the whole batch.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// The contacts were written but not acknowledged as asked.
    #[error("write concern error (code {0})")]
    WriteConcern(i32),
}

impl Error {
    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Mongo(e) => crate::db::is_transient(e),
            Self::WriteConcern(_) => true,
        }
    }
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A deal's contact as the CSV names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContactRef<'a> {
    /// The deal's line.
    pub line: LineNo,
    /// Lower-cased, validated email.
    pub email: &'a str,
    /// Full name, if the file has one.
    pub name: Option<&'a str>,
}

/// A contact to resolve: the first line of the batch that names `email`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted<'a> {
    /// First line naming it in the batch.
    pub line: LineNo,
    /// Email key.
    pub email: &'a str,
    /// Name from that line.
    pub name: Option<&'a str>,
}

/// The distinct emails of `refs` that `known` cannot answer, each with the
/// first line naming it, in order of first appearance. Pure.
pub fn plan<'a>(refs: &[ContactRef<'a>], known: impl Fn(&str) -> bool) -> Vec<Wanted<'a>> {
    let mut seen = std::collections::HashSet::with_capacity(refs.len());
    refs.iter()
        .filter(|r| !known(r.email) && seen.insert(r.email))
        .map(|r| Wanted {
            line: r.line,
            email: r.email,
            name: r.name,
        })
        .collect()
}

/// `(first_name, last_name)` of a full name: the first word, then the rest.
/// Pure.
pub fn split_name(full: &str) -> (&str, &str) {
    crate::map::split_full_name(full)
}

/// Starting size of a contact's BSON buffer.
const CONTACT_CAPACITY: usize = 320;

/// The empty BSON document.
const EMPTY_DOC: &[u8] = &[5, 0, 0, 0, 0];

/// Builds the documents of contacts one import creates. Pure.
#[derive(Clone, Debug)]
pub struct ContactBuilder {
    queue_id: ObjectId,
    account_id: ObjectId,
    user_id: ObjectId,
    tags: RawArrayBuf,
}

impl ContactBuilder {
    /// A builder for the import described by `spec`.
    pub fn new(spec: &ImportSpec) -> Self {
        Self {
            queue_id: spec.queue_id,
            account_id: spec.account_id,
            user_id: spec.user_id,
            tags: spec.tags.iter().map(String::as_str).collect(),
        }
    }

    /// The new contact `w` names, with the id `id`.
    pub fn build(&self, id: ObjectId, w: &Wanted<'_>, now: DateTime) -> RawDocumentBuf {
        let (first, last) = split_name(w.name.unwrap_or_default());
        // One buffer sized for a typical contact: no growth, no per-field
        // allocation (this runs once per new contact).
        let mut d = raw_with_capacity(CONTACT_CAPACITY);
        self.identity(id, w.line, w.email, &mut d, now);
        d.append_ref("first_name", first);
        d.append_ref("last_name", last);
        d.append_ref(
            "additional_info",
            RawDocument::from_bytes(EMPTY_DOC).expect("valid"),
        );
        d.append_ref("updated_at", now);
        d
    }
}

impl ContactBuilder {
    /// The fields a contacts-import row sets, new contact or `$set`;
    /// `prefix` is empty for a whole document, `additional_info.` for a
    /// `$set`. Values from the CSV only land in values (custom ids were
    /// checked 24-hex by `map::Plan`).
    fn row_fields(c: &MappedContact, into: &mut RawDocumentBuf, prefix: &str) {
        let strings = [
            ("first_name", &c.first_name),
            ("last_name", &c.last_name),
            ("phone", &c.phone),
            ("company", &c.company),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                into.append_ref(k, v.as_str());
            }
        }
        if prefix.is_empty() {
            let mut info = raw_with_capacity(64 + 48 * c.custom.len());
            for (k, v) in &c.custom {
                info.append_ref(k.as_str(), v.as_str());
            }
            into.append_ref("additional_info", &info);
        } else {
            for (k, v) in &c.custom {
                into.append_ref(format!("{prefix}{k}"), v.as_str());
            }
        }
    }

    /// What only a new contact gets: id, account, email, owner, provenance.
    fn identity(
        &self,
        id: ObjectId,
        line: LineNo,
        email: &str,
        into: &mut RawDocumentBuf,
        now: DateTime,
    ) {
        into.append_ref("_id", id);
        into.append_ref("account_id", self.account_id);
        into.append_ref("email", email);
        into.append_ref("owner", self.user_id);
        into.append_ref("created_by", self.user_id);
        into.append_ref("source", "csv");
        into.append_ref("tags", &self.tags);
        let mut import = raw_with_capacity(48);
        import.append_ref("queue_id", self.queue_id);
        import.append_ref("line", line as i64);
        into.append_ref("import", &import);
        into.append_ref("created_at", now);
    }

    /// The new contact of a contacts-import row, with the id `id`.
    pub fn build_row(&self, id: ObjectId, c: &MappedContact, now: DateTime) -> RawDocumentBuf {
        let mut d = raw_with_capacity(CONTACT_CAPACITY);
        self.identity(id, c.line, &c.email, &mut d, now);
        Self::row_fields(c, &mut d, "");
        d.append_ref("updated_at", now);
        d
    }

    /// The `update` statement of an existing contact `id` under
    /// `duplicate_strategy: update`: `$set` of the mapped fields of `c`
    /// (rows of one email merged in file order), `updated_at` and
    /// `last_import {queue_id, line}` of the last row (also pushed onto
    /// `last_imports` if `trail`); its identity, owner, provenance and
    /// unmapped fields stay.
    pub fn update_statement(
        &self,
        id: ObjectId,
        c: &MappedContact,
        last_line: LineNo,
        trail: bool,
        now: DateTime,
    ) -> RawDocumentBuf {
        let mut q = raw_with_capacity(64);
        q.append_ref("_id", id);
        q.append_ref("account_id", self.account_id);
        let mut set = raw_with_capacity(CONTACT_CAPACITY);
        Self::row_fields(c, &mut set, "additional_info.");
        set.append_ref("updated_at", now);
        let mut last_import = raw_with_capacity(48);
        last_import.append_ref("queue_id", self.queue_id);
        last_import.append_ref("line", last_line as i64);
        set.append_ref("last_import", &last_import);
        let mut u = raw_with_capacity(set.as_bytes().len() + 112);
        u.append_ref("$set", &set);
        if trail {
            u.append_ref(
                "$push",
                &crate::write::push_last_import(self.queue_id, last_line),
            );
        }
        let mut statement = raw_with_capacity(q.as_bytes().len() + u.as_bytes().len() + 32);
        statement.append_ref("q", &q);
        statement.append_ref("u", &u);
        statement
    }
}

/// How one deal's contact was resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Linked {
    /// The contact's id.
    Contact(ObjectId),
    /// The contact could be neither created nor found: the line fails.
    Refused(String),
}

/// The contacts of one batch, resolved.
#[derive(Debug, Default)]
pub struct BatchLinks {
    /// One entry per input [`ContactRef`], in order.
    pub links: Vec<Linked>,
    /// Contacts this batch created (counted the same on a replay).
    pub created: u64,
}

/// Resolves and creates the contacts of one import. Cheap to clone: batch
/// tasks share its cache.
#[derive(Clone)]
pub struct ContactLinker {
    coll: Collection<RawDocumentBuf>,
    builder: ContactBuilder,
    cache: Arc<Cache<Box<str>, ObjectId>>,
    clock: Clock,
}

impl ContactLinker {
    /// A linker for the import `spec`, caching up to `cache_entries` emails.
    pub fn new(db: &Database, spec: &ImportSpec, cache_entries: usize) -> Self {
        Self {
            coll: db.collection(collections::CONTACTS),
            builder: ContactBuilder::new(spec),
            cache: Arc::new(Cache::new(cache_entries.max(1))),
            clock: Clock::default(),
        }
    }

    /// Stamps the contacts it creates with `clock`'s time.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Resolves each ref to its contact, creating the missing ones.
    pub async fn link(&self, refs: &[ContactRef<'_>]) -> Result<BatchLinks> {
        // Cached ids are taken now: a later insert may evict them.
        let mut resolved: HashMap<&str, Linked> = HashMap::with_capacity(refs.len());
        for r in refs {
            if let Some(id) = self.cache.get(r.email) {
                resolved.insert(r.email, Linked::Contact(id));
            }
        }
        let wanted = plan(refs, |e| resolved.contains_key(e));
        let mut created = 0;
        if !wanted.is_empty() {
            let now = self.clock.now();
            // Deterministic ids first (a replay recognises its own
            // contacts); a line past their range gets a fresh id.
            let ids: Vec<ObjectId> = wanted
                .iter()
                .map(|w| {
                    // Past the deterministic range: a fresh id (default).
                    contact_id(&self.builder.queue_id, w.line).unwrap_or_default()
                })
                .collect();
            let docs: Vec<RawDocumentBuf> = wanted
                .iter()
                .zip(&ids)
                .map(|(w, id)| self.builder.build(*id, w, now))
                .collect();
            let (inserted, conflicts, refused) = self.insert(&docs).await?;
            for i in inserted {
                resolved.insert(wanted[i].email, Linked::Contact(ids[i]));
                created += 1;
            }
            for (i, message) in refused {
                resolved.insert(wanted[i].email, Linked::Refused(message));
            }
            if !conflicts.is_empty() {
                let emails: Vec<&str> = conflicts.iter().map(|&i| wanted[i].email).collect();
                let found = self.find(&emails).await?;
                let mut retry = Vec::new();
                for &i in &conflicts {
                    let w = &wanted[i];
                    match found.get(w.email) {
                        Some(id) => {
                            // Ours from an earlier run of this batch: still
                            // created by this import, at this line.
                            if *id == ids[i]
                                || Some(*id) == contact_fallback_id(&self.builder.queue_id, w.line)
                            {
                                created += 1;
                            }
                            resolved.insert(w.email, Linked::Contact(*id));
                        }
                        // The id clashed but the email is free (the contact
                        // this line created was since given another email):
                        // create it under a fresh id.
                        None => retry.push(i),
                    }
                }
                if !retry.is_empty() {
                    self.create_fresh(&wanted, &retry, now, &mut resolved, &mut created)
                        .await?;
                }
            }
            for (email, link) in &resolved {
                if let Linked::Contact(id) = link {
                    self.cache.insert((*email).into(), *id);
                }
            }
        }
        let links =
            refs.iter()
                .map(|r| {
                    resolved.get(r.email).cloned().unwrap_or_else(|| {
                        Linked::Refused("The contact could not be resolved.".into())
                    })
                })
                .collect();
        Ok(BatchLinks { links, created })
    }

    /// Second chance for emails whose deterministic id was taken.
    async fn create_fresh<'a>(
        &self,
        wanted: &[Wanted<'a>],
        which: &[usize],
        now: DateTime,
        resolved: &mut HashMap<&'a str, Linked>,
        created: &mut u64,
    ) -> Result<()> {
        let ids: Vec<ObjectId> = which
            .iter()
            .map(|&i| {
                contact_fallback_id(&self.builder.queue_id, wanted[i].line).unwrap_or_default()
            })
            .collect();
        let docs: Vec<RawDocumentBuf> = which
            .iter()
            .zip(&ids)
            .map(|(&i, id)| self.builder.build(*id, &wanted[i], now))
            .collect();
        let (inserted, conflicts, refused) = self.insert(&docs).await?;
        for k in inserted {
            resolved.insert(wanted[which[k]].email, Linked::Contact(ids[k]));
            *created += 1;
        }
        for (k, message) in refused {
            resolved.insert(wanted[which[k]].email, Linked::Refused(message));
        }
        if !conflicts.is_empty() {
            let emails: Vec<&str> = conflicts.iter().map(|&k| wanted[which[k]].email).collect();
            let found = self.find(&emails).await?;
            for k in conflicts {
                let email = wanted[which[k]].email;
                let link = match found.get(email) {
                    Some(id) => {
                        if *id == ids[k] {
                            *created += 1;
                        }
                        Linked::Contact(*id)
                    }
                    None => {
                        Linked::Refused("The contact could be neither created nor found.".into())
                    }
                };
                resolved.insert(email, link);
            }
        }
        Ok(())
    }

    /// Unordered insert: `(inserted, duplicate-key conflicts, refused)`, as
    /// indexes into `docs`.
    async fn insert(
        &self,
        docs: &[RawDocumentBuf],
    ) -> Result<(Vec<usize>, Vec<usize>, Vec<(usize, String)>)> {
        // Not acknowledged as asked: retried as a whole, with only the
        // code (the server's messages quote emails).
        let write_errors = insert_unordered(&self.coll, docs)
            .await
            .map_err(|f| match f {
                InsertFailure::WriteConcern(code) => Error::WriteConcern(code),
                InsertFailure::Mongo(e) => Error::Mongo(e),
            })?;
        let mut failed = vec![None; docs.len()];
        for (index, code) in write_errors {
            if let Some(slot) = failed.get_mut(index) {
                *slot = Some(code);
            }
        }
        let (mut inserted, mut conflicts, mut refused) = (Vec::new(), Vec::new(), Vec::new());
        for (i, code) in failed.into_iter().enumerate() {
            match code {
                None => inserted.push(i),
                Some(11000) => conflicts.push(i),
                Some(code) => refused.push((
                    i,
                    format!("The database refused the deal's contact (code {code})."),
                )),
            }
        }
        Ok((inserted, conflicts, refused))
    }

    /// The account's contacts with these emails, by email.
    async fn find(&self, emails: &[&str]) -> Result<HashMap<String, ObjectId>> {
        Ok(contact_ids(
            &self.coll.clone_with_type(),
            self.builder.account_id,
            emails,
        )
        .await?)
    }
}

/// The ids of `account_id`'s contacts with these emails (lower-cased), by
/// email. One indexed query.
pub async fn contact_ids(
    coll: &Collection<Document>,
    account_id: ObjectId,
    emails: &[&str],
) -> mongodb::error::Result<HashMap<String, ObjectId>> {
    let mut cursor = coll
        .find(crate::db::contacts_by_email(account_id, emails))
        .projection(doc! { "_id": 1, "email": 1 })
        .await?;
    let mut found = HashMap::with_capacity(emails.len());
    while let Some(d) = cursor.try_next().await? {
        if let (Ok(id), Some(Bson::String(email))) = (d.get_object_id("_id"), d.get("email")) {
            found.insert(email.clone(), id);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(line: LineNo, email: &'static str) -> ContactRef<'static> {
        ContactRef {
            line,
            email,
            name: None,
        }
    }

    #[test]
    fn plan_keeps_first_line_per_email_and_skips_known() {
        let refs = [
            r(2, "a@x.co"),
            r(3, "b@x.co"),
            r(4, "a@x.co"),
            r(5, "c@x.co"),
        ];
        let w = plan(&refs, |e| e == "b@x.co");
        let got: Vec<(LineNo, &str)> = w.iter().map(|w| (w.line, w.email)).collect();
        assert_eq!(got, [(2, "a@x.co"), (5, "c@x.co")]);
    }

    #[test]
    fn names_split_at_the_first_word() {
        assert_eq!(split_name("Jane Q. Doe"), ("Jane", "Q. Doe"));
        assert_eq!(split_name("  Cher "), ("Cher", ""));
        assert_eq!(split_name(""), ("", ""));
        assert_eq!(split_name("Ana\tMaria  Lopez"), ("Ana", "Maria  Lopez"));
    }

    #[test]
    fn a_new_contact_carries_the_import_and_never_the_csv_in_keys() {
        let spec_queue = ObjectId::new();
        let b = ContactBuilder {
            queue_id: spec_queue,
            account_id: ObjectId::new(),
            user_id: ObjectId::new(),
            tags: ["q4"].into_iter().collect(),
        };
        let w = Wanted {
            line: 7,
            email: "$set@x.co",
            name: Some("Jane Doe"),
        };
        let id = contact_id(&spec_queue, 7).unwrap();
        let d = b.build(id, &w, DateTime::from_millis(0));
        let d = d.to_document().unwrap();
        assert_eq!(d.get_object_id("_id").unwrap(), id);
        assert_eq!(d.get_str("email").unwrap(), "$set@x.co");
        assert_eq!(d.get_str("first_name").unwrap(), "Jane");
        assert_eq!(d.get_str("last_name").unwrap(), "Doe");
        assert_eq!(d.get_str("source").unwrap(), "csv");
        let import = d.get_document("import").unwrap();
        assert_eq!(import.get_object_id("queue_id").unwrap(), spec_queue);
        assert_eq!(import.get_i64("line").unwrap(), 7);
        assert!(d.keys().all(|k| !k.starts_with('$')));
    }
}
