//! `importd enqueue`: upload a CSV and insert a queue document shaped exactly
//! as the dashboard's (SPEC.md, `queues`), as scripts and tests need.

use std::path::{Path, PathBuf};

use bson::oid::ObjectId;
use bson::{DateTime, Document, doc};
use mongodb::Database;

use crate::domain::text::header_key;
use crate::domain::{ContactField, DealField, RecordKind, collections};
use crate::fetch::{self, Storage};

/// Errors of `enqueue`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CSV or mapping file cannot be read.
    #[error("{path}: {message}")]
    Input {
        /// File.
        path: PathBuf,
        /// Problem.
        message: String,
    },
    /// Upload failed.
    #[error(transparent)]
    Storage(#[from] fetch::Error),
    /// Insert failed.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

/// What to enqueue.
#[derive(Clone, Debug)]
pub struct Request {
    /// Local CSV file.
    pub file: PathBuf,
    /// Deals or contacts.
    pub kind: RecordKind,
    /// Target pipeline (deals).
    pub pipeline_id: Option<ObjectId>,
    /// Owning account.
    pub account_id: ObjectId,
    /// Importing user.
    pub user_id: ObjectId,
    /// Parent account (defaults to the account).
    pub parent_account: Option<ObjectId>,
    /// Client id (defaults to the account).
    pub client_id: Option<ObjectId>,
    /// CSV header → target; `None` = match headers to fields by name.
    pub mappings: Option<Vec<(String, String)>>,
    /// Tags of every record.
    pub tags: Vec<String>,
    /// `create` | `skip` | `update`.
    pub duplicate_strategy: Option<String>,
    /// Check only (`additional_data.dry_run`).
    pub dry_run: bool,
}

/// Reads a mapping file: a JSON object `{ "CSV header": "target" }`, in order.
pub fn read_mapping(path: &Path) -> Result<Vec<(String, String)>, Error> {
    let input = |message: String| Error::Input {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| input(e.to_string()))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| input(format!("not a JSON object: {e}")))?;
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(input(format!("target of \"{k}\" is {other}, not a string"))),
        })
        .collect()
}

/// The mapping a user would get by accepting the wizard's suggestions for
/// an import of `kind`: headers whose name is a standard field's (ignoring
/// case, spaces and underscores), plus the usual synonyms.
pub fn suggest_mapping(kind: RecordKind, headers: &[String]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|h| {
            let key = header_key(h).replace(['_', '-'], " ");
            let field = match kind {
                RecordKind::Deals => suggest_deal_field(&key).map(DealField::as_str),
                RecordKind::Contacts => suggest_contact_field(&key).map(ContactField::as_str),
            };
            field.map(|f| (h.clone(), f.to_owned()))
        })
        .collect()
}

fn suggest_deal_field(key: &str) -> Option<DealField> {
    match key {
        "name" | "deal name" | "deal" | "title" => Some(DealField::Name),
        "stage" | "stage id" | "deal stage" => Some(DealField::StageId),
        "value" | "amount" | "deal value" => Some(DealField::Value),
        "close date" | "expected close date" => Some(DealField::ExpectedCloseDate),
        "contact email" | "email" => Some(DealField::ContactEmail),
        "contact name" | "contact" => Some(DealField::ContactName),
        other => DealField::ALL
            .into_iter()
            .find(|f| f.as_str().replace('_', " ") == other),
    }
}

fn suggest_contact_field(key: &str) -> Option<ContactField> {
    match key {
        "email" | "e mail" | "email address" | "mail" => Some(ContactField::Email),
        "first name" | "firstname" | "given name" => Some(ContactField::FirstName),
        "last name" | "lastname" | "surname" | "family name" => Some(ContactField::LastName),
        "name" | "full name" | "contact name" | "contact" => Some(ContactField::Name),
        "phone" | "phone number" | "telephone" | "mobile" => Some(ContactField::Phone),
        "company" | "organization" | "organisation" | "company name" => Some(ContactField::Company),
        _ => None,
    }
}

/// The header row of a local CSV, read by the importer's own parser (so
/// encodings, delimiters, quotes and leading blank lines are handled as
/// the daemon will handle them).
async fn read_headers(path: &Path) -> Result<Vec<String>, Error> {
    let input = |message: String| Error::Input {
        path: path.to_owned(),
        message,
    };
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| input(e.to_string()))?;
    let (headers, _) = crate::parse::open(file)
        .await
        .map_err(|e| input(e.to_string()))?;
    Ok(headers)
}

/// Uploads the file to `imports/<account>/<uuid>/<file name>` and inserts
/// the queue document. Returns its id.
pub async fn enqueue(db: &Database, storage: &Storage, req: &Request) -> Result<ObjectId, Error> {
    let file_name = req
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Input {
            path: req.file.clone(),
            message: "not a file".into(),
        })?;
    let mappings = match &req.mappings {
        Some(m) => m.clone(),
        None => suggest_mapping(req.kind, &read_headers(&req.file).await?),
    };
    let key = format!(
        "imports/{}/{}/{}",
        req.account_id.to_hex(),
        uuid::Uuid::new_v4(),
        file_name
    );
    storage.put_file(&key, &req.file).await?;
    let mut mapping_doc = Document::new();
    for (h, t) in &mappings {
        mapping_doc.insert(h.as_str(), t.as_str());
    }
    let mut additional = doc! { "tags": &req.tags };
    if let Some(p) = req.pipeline_id {
        additional.insert("pipeline_id", p);
    }
    if let Some(s) = &req.duplicate_strategy {
        additional.insert("duplicate_strategy", s.as_str());
    }
    if req.dry_run {
        additional.insert("dry_run", true);
    }
    let id = ObjectId::new();
    db.collection::<Document>(collections::QUEUES)
        .insert_one(doc! {
            "_id": id,
            "source": req.kind.as_str(),
            "status": "pending",
            "in_progress": false,
            "user_id": req.user_id,
            "account_id": req.account_id,
            "parent_account": req.parent_account.unwrap_or(req.account_id),
            "client_id": req.client_id.unwrap_or(req.account_id),
            "csv": [{ "key": &key, "name": &file_name }],
            "mappings": mapping_doc,
            "additional_data": additional,
            "created_at": DateTime::now(),
        })
        .await?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_match_seed_headers() {
        let h: Vec<String> = [
            "Deal Name",
            "Value",
            "Stage",
            "Status",
            "Contact Email",
            "Notes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = suggest_mapping(RecordKind::Deals, &h);
        let targets: Vec<&str> = m.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            targets,
            ["name", "value", "stage_id", "status", "contact_email"]
        );
    }

    #[test]
    fn contact_suggestions_use_contact_fields() {
        let h: Vec<String> = [
            "E-mail",
            "First Name",
            "Surname",
            "Mobile",
            "Organisation",
            "Notes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = suggest_mapping(RecordKind::Contacts, &h);
        let targets: Vec<&str> = m.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(
            targets,
            ["email", "first_name", "last_name", "phone", "company"]
        );
    }

    #[tokio::test]
    async fn headers_are_read_as_the_daemon_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("semi.csv");
        std::fs::write(&path, "\r\n\u{feff}\"Deal Name\";Value\r\nA;1\r\n").unwrap();
        assert_eq!(read_headers(&path).await.unwrap(), ["Deal Name", "Value"]);
    }
}
