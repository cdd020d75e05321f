//! Duplicate matching for `duplicate_strategy: skip | update`: an existing
//! deal of the same account and pipeline whose name has the same key
//! (`domain::text::name_key`: trimmed, whitespace collapsed, lower-case).
//!
//! The index of names is read once per import (names and ids only), so
//! matching costs no query per row and needs no extra index on `deals`,
//! whose every index slows every import. Its memory grows with the
//! pipeline's deal count, never with the file. Rows of the same file match
//! each other too: the first creates, later ones skip or update it.

use std::collections::HashMap;

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
    by_key: HashMap<String, ObjectId>,
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
            .await?;
        let mut by_key = HashMap::new();
        while let Some(d) = cursor.try_next().await? {
            if let (Ok(id), Ok(name)) = (d.get_object_id("_id"), d.get_str("name")) {
                // The oldest deal of a name wins (ObjectIds sort by time).
                by_key
                    .entry(name_key(name))
                    .and_modify(|e: &mut ObjectId| *e = (*e).min(id))
                    .or_insert(id);
            }
        }
        Ok(Self { queue_id, by_key })
    }

    /// Decides for the row on `line` named `name`, and remembers a deal it
    /// will create so later rows of the file match it.
    pub fn decide(&mut self, line: LineNo, name: &str) -> Match {
        let own = deal_id(&self.queue_id, line);
        match self.by_key.get(&name_key(name)) {
            Some(id) if Some(*id) != own => Match::Existing(*id),
            Some(_) => Match::Create,
            None => {
                if let Some(own) = own {
                    self.by_key.insert(name_key(name), own);
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
            by_key: HashMap::from([("acme deal".to_owned(), existing)]),
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
    }
}
