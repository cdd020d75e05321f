//! Reading a queue document (SPEC.md, `queues`) into an [`ImportSpec`].
//!
//! The dashboard writes these documents; a missing or mistyped field makes
//! the import fail with `invalid_queue_document`, naming the field, rather
//! than crash or guess.

use bson::oid::ObjectId;
use bson::{Bson, Document};

use crate::domain::{DuplicateStrategy, FileError, ImportSpec, RecordKind};

fn oid(doc: &Document, key: &str) -> Result<ObjectId, FileError> {
    match doc.get(key) {
        Some(Bson::ObjectId(id)) => Ok(*id),
        Some(Bson::String(s)) => s
            .parse()
            .map_err(|_| FileError::InvalidQueueDocument(format!("`{key}` is not an ObjectId"))),
        _ => Err(FileError::InvalidQueueDocument(format!(
            "`{key}` is missing"
        ))),
    }
}

fn opt_oid(doc: &Document, key: &str) -> Option<ObjectId> {
    oid(doc, key).ok()
}

/// Reads the import specification out of a claimed queue document.
pub fn spec_from_doc(doc: &Document) -> Result<ImportSpec, FileError> {
    let queue_id = oid(doc, "_id")?;
    let kind = match doc.get_str("source") {
        Ok(source) => RecordKind::from_source(source)
            .ok_or_else(|| FileError::UnsupportedSource(source.to_owned()))?,
        Err(_) => {
            return Err(FileError::InvalidQueueDocument(
                "`source` is missing".to_owned(),
            ));
        }
    };
    let files = doc.get_array("csv").map(Vec::as_slice).unwrap_or_default();
    let csv = files
        .first()
        .and_then(Bson::as_document)
        .ok_or_else(|| FileError::InvalidQueueDocument("`csv[0]` is missing".to_owned()))?;
    // One file per import (a line is `(queue_id, line)`): a request naming
    // several is refused whole rather than imported in part.
    let keys: std::collections::BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.as_document()?.get_str("key").ok())
        .collect();
    if keys.len() > 1 {
        return Err(FileError::MultipleFiles { count: keys.len() });
    }
    let csv_key = csv
        .get_str("key")
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| FileError::InvalidQueueDocument("`csv[0].key` is missing".to_owned()))?
        .to_owned();
    let file_name = csv
        .get_str("name")
        .ok()
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| csv_key.rsplit('/').next().unwrap_or(&csv_key).to_owned());
    let mappings = match doc.get("mappings") {
        Some(Bson::Document(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Bson::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(FileError::MappingInvalid(format!(
                    "the target of column \"{k}\" is not a field name"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(FileError::InvalidQueueDocument(
                "`mappings` is missing".to_owned(),
            ));
        }
    };
    let additional = doc.get_document("additional_data").ok();
    let pipeline_id = additional.and_then(|a| opt_oid(a, "pipeline_id"));
    if kind == RecordKind::Deals && pipeline_id.is_none() {
        return Err(FileError::InvalidQueueDocument(
            "`additional_data.pipeline_id` is missing".to_owned(),
        ));
    }
    let tags = additional
        .and_then(|a| a.get_array("tags").ok())
        .map(|a| {
            a.iter()
                .filter_map(Bson::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let duplicate_strategy = match additional.and_then(|a| a.get_str("duplicate_strategy").ok()) {
        // An email is one contact: contacts are never created twice.
        None if kind == RecordKind::Contacts => DuplicateStrategy::Skip,
        Some("create") if kind == RecordKind::Contacts => {
            return Err(FileError::InvalidQueueDocument(
                "`additional_data.duplicate_strategy` \"create\" is not available for contacts (an email address is one contact); choose skip or update".to_owned(),
            ));
        }
        None | Some("create") => DuplicateStrategy::Create,
        Some("skip") => DuplicateStrategy::Skip,
        Some("update") => DuplicateStrategy::Update,
        Some(other) => {
            return Err(FileError::InvalidQueueDocument(format!(
                "`additional_data.duplicate_strategy` \"{other}\" is not one of create, skip, update"
            )));
        }
    };
    // A safety flag fails closed: a value that is not a boolean is refused,
    // never read as "import for real".
    let dry_run = match additional.and_then(|a| a.get("dry_run")) {
        None | Some(Bson::Null) => false,
        Some(Bson::Boolean(b)) => *b,
        Some(_) => {
            return Err(FileError::InvalidQueueDocument(
                "`additional_data.dry_run` is not true or false".to_owned(),
            ));
        }
    };
    Ok(ImportSpec {
        queue_id,
        kind,
        user_id: oid(doc, "user_id")?,
        account_id: oid(doc, "account_id")?,
        parent_account: opt_oid(doc, "parent_account"),
        client_id: opt_oid(doc, "client_id"),
        csv_key,
        file_name,
        mappings,
        pipeline_id,
        tags,
        duplicate_strategy,
        dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn base() -> Document {
        doc! {
            "_id": ObjectId::new(),
            "source": "deals",
            "user_id": ObjectId::new(),
            "account_id": ObjectId::new(),
            "csv": [{ "key": "imports/a/b/deals.csv", "name": "deals.csv" }],
            "mappings": { "Deal Name": "name", "Value": "value" },
            "additional_data": { "pipeline_id": ObjectId::new(), "tags": ["q4"] },
        }
    }

    #[test]
    fn reads_a_dashboard_document() {
        let spec = spec_from_doc(&base()).unwrap();
        assert_eq!(spec.file_name, "deals.csv");
        assert_eq!(spec.mappings[0], ("Deal Name".into(), "name".into()));
        assert_eq!(spec.tags, vec!["q4".to_owned()]);
        assert_eq!(spec.duplicate_strategy, DuplicateStrategy::Create);
    }

    #[test]
    fn contacts_skip_by_default_and_refuse_create() {
        let mut d = base();
        d.insert("source", "contacts");
        d.insert("additional_data", doc! {});
        let spec = spec_from_doc(&d).unwrap();
        assert_eq!(spec.kind, RecordKind::Contacts);
        assert_eq!(spec.pipeline_id, None);
        assert_eq!(spec.duplicate_strategy, DuplicateStrategy::Skip);
        d.insert("additional_data", doc! { "duplicate_strategy": "update" });
        assert_eq!(
            spec_from_doc(&d).unwrap().duplicate_strategy,
            DuplicateStrategy::Update
        );
        d.insert("additional_data", doc! { "duplicate_strategy": "create" });
        let e = spec_from_doc(&d).unwrap_err();
        assert_eq!(e.code(), "invalid_queue_document");
        assert!(e.to_string().contains("not available for contacts"));
    }

    #[test]
    fn dry_run_must_be_a_boolean() {
        let mut d = base();
        let mut a = d.get_document("additional_data").unwrap().clone();
        a.insert("dry_run", true);
        d.insert("additional_data", a.clone());
        assert!(spec_from_doc(&d).unwrap().dry_run);
        a.insert("dry_run", "true");
        d.insert("additional_data", a);
        assert_eq!(
            spec_from_doc(&d).unwrap_err().code(),
            "invalid_queue_document"
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let mut d = base();
        d.insert(
            "csv",
            vec![
                Bson::from(doc! { "key": "imports/a/b/one.csv", "name": "one.csv" }),
                Bson::from(doc! { "key": "imports/a/b/two.csv", "name": "two.csv" }),
            ],
        );
        let e = spec_from_doc(&d).unwrap_err();
        assert_eq!(e.code(), "multiple_files");
        assert!(e.to_string().contains("names 2 files"), "{e}");
        // The same file named twice is one file.
        d.insert(
            "csv",
            vec![
                Bson::from(doc! { "key": "imports/a/b/one.csv", "name": "one.csv" }),
                Bson::from(doc! { "key": "imports/a/b/one.csv" }),
            ],
        );
        assert_eq!(spec_from_doc(&d).unwrap().csv_key, "imports/a/b/one.csv");
        d.remove("csv");
        let e = spec_from_doc(&d).unwrap_err();
        assert_eq!(e.code(), "invalid_queue_document");
        assert!(e.to_string().contains("csv[0]"));
        let mut d = base();
        d.insert("additional_data", doc! {});
        assert!(
            spec_from_doc(&d)
                .unwrap_err()
                .to_string()
                .contains("pipeline_id")
        );
    }
}
