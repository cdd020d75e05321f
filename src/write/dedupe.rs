//! Duplicate matching for `duplicate_strategy: skip | update`: an existing
//! deal of the same account and pipeline whose name has the same key
//! (`domain::text::name_key`: trimmed, whitespace collapsed, lower-case).
//!
//! The index of names is read once per import (names and ids only), so
//! matching costs no query per row and needs no extra index on `deals`,
//! whose every index slows every import. Rows of the same file match each
//! other too: the first creates, later ones skip or update it. So the index
//! holds one entry per distinct name of the pipeline and the file; an entry
//! is a 128-bit digest of the name key and a deal id (~40 bytes with the
//! table's overhead, whatever the name's length), not the name itself.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use bson::oid::ObjectId;
use bson::{Document, doc};
use futures::TryStreamExt;
use mongodb::Collection;

use crate::domain::text::name_key;
use crate::domain::{LineNo, deal_id};

/// What a row with a given name should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// No deal has this name: create one (also when the only match is the
    /// deal this very line created in an earlier run of the import).
    Create,
    /// This existing deal has the name.
    Existing(ObjectId),
}

/// Names of a pipeline's deals.
pub struct NameIndex {
    queue_id: ObjectId,
    by_key: HashMap<u128, ObjectId>,
}

/// A 128-bit digest of a name's key: two SipHash passes with different
/// prefixes (fixed keys, so stable within the process). A chance collision
/// of two different names needs ~2^64 names.
fn digest(name: &str) -> u128 {
    let key = name_key(name);
    let half = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        key.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

impl NameIndex {
    /// Reads the names of the pipeline's deals.
    pub async fn load(
        coll: &Collection<Document>,
        queue_id: ObjectId,
        account_id: ObjectId,
        pipeline_id: ObjectId,
    ) -> mongodb::error::Result<Self> {
        let mut cursor = coll
            .find(doc! { "account_id": account_id, "pipeline_id": pipeline_id })
            .projection(doc! { "name": 1 })
            // Small batches: the server would otherwise send up to 16 MB
            // at a time, all of it held by the cursor at once.
            .batch_size(2_000)
            .await?;
        let mut by_key = HashMap::new();
        while let Some(d) = cursor.try_next().await? {
            if let (Ok(id), Ok(name)) = (d.get_object_id("_id"), d.get_str("name")) {
                // The oldest deal of a name wins (ObjectIds sort by time).
                by_key
                    .entry(digest(name))
                    .and_modify(|e: &mut ObjectId| *e = (*e).min(id))
                    .or_insert(id);
            }
        }
        Ok(Self { queue_id, by_key })
    }

    /// An index of no names yet, for a dry run of a contacts import: the
    /// rows' emails are looked up batch by batch ([`NameIndex::remember`])
    /// and the file's new ones kept as the run goes.
    pub fn empty(queue_id: ObjectId) -> Self {
        Self {
            queue_id,
            by_key: HashMap::new(),
        }
    }

    /// Notes an existing record `id` under `name` (kept if the name is
    /// known already).
    pub fn remember(&mut self, name: &str, id: ObjectId) {
        self.by_key.entry(digest(name)).or_insert(id);
    }

    /// Whether `id` is a deal this import creates (matched by a later row
    /// of the file, not found in the database at the start).
    pub fn is_own(&self, id: &ObjectId) -> bool {
        crate::domain::line_of_deal_id(&self.queue_id, id).is_some()
    }

    /// Forgets the deal the row on `line` named `name` was to create (its
    /// write failed): later rows of that name no longer match it. Returns
    /// whether the row had registered its name.
    pub fn forget(&mut self, line: LineNo, name: &str) -> bool {
        let key = digest(name);
        let own = deal_id(&self.queue_id, line);
        if own.is_some() && self.by_key.get(&key) == own.as_ref() {
            self.by_key.remove(&key);
            true
        } else {
            false
        }
    }

    /// Decides for the row on `line` named `name`, and remembers a deal it
    /// will create so later rows of the file match it.
    pub fn decide(&mut self, line: LineNo, name: &str) -> Match {
        let own = deal_id(&self.queue_id, line);
        let key = digest(name);
        match self.by_key.get(&key) {
            Some(id) if Some(*id) != own => Match::Existing(*id),
            Some(_) => Match::Create,
            None => {
                if let Some(own) = own {
                    self.by_key.insert(key, own);
                }
                Match::Create
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_match_existing_deals_their_own_earlier_rows_but_not_themselves() {
        let q = ObjectId::new();
        let existing = ObjectId::new();
        let mut idx = NameIndex {
            queue_id: q,
            by_key: HashMap::from([(digest("Acme Deal"), existing)]),
        };
        assert_eq!(idx.decide(2, " ACME  deal"), Match::Existing(existing));
        assert_eq!(idx.decide(3, "New One"), Match::Create);
        assert_eq!(
            idx.decide(4, "new one"),
            Match::Existing(deal_id(&q, 3).unwrap())
        );
        // A replay of line 3 finds the deal line 3 created: create again
        // (the insert is then absorbed as already imported).
        assert_eq!(idx.decide(3, "New One"), Match::Create);
        assert!(idx.is_own(&deal_id(&q, 3).unwrap()) && !idx.is_own(&existing));
        // Line 3's write failed: the name is free again, for line 5.
        assert!(!idx.forget(4, "new one"), "line 4 registered nothing");
        assert!(idx.forget(3, "NEW one"));
        assert_eq!(idx.decide(5, "new one"), Match::Create);
        assert_eq!(
            idx.decide(6, "New One"),
            Match::Existing(deal_id(&q, 5).unwrap())
        );
    }

    #[test]
    fn digests_follow_the_name_key() {
        assert_eq!(digest(" ACME  deal"), digest("acme deal"));
        assert_ne!(digest("acme deal"), digest("acme deals"));
        assert_ne!(digest(""), digest(" x"));
    }
}
