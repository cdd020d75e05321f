//! MongoDB connection and the indexes importd relies on.
//!
//! Indexes are created at start-up and are idempotent (creating an existing
//! index with the same keys and options is a no-op). Every index on a
//! collection written per row costs insert throughput, so `deals` gets none:
//! its idempotency key is its `_id` (see `domain::ids`).

use std::time::Duration;

use bson::{Document, doc};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Database, IndexModel};
use secrecy::ExposeSecret;

use crate::config::MongoSettings;
use crate::domain::collections;

/// Connects (lazily: the driver dials on first use) to the configured database.
pub async fn connect(settings: &MongoSettings) -> mongodb::error::Result<Database> {
    let mut options = ClientOptions::parse(settings.uri.expose_secret()).await?;
    options.app_name.get_or_insert_with(|| "importd".to_owned());
    options
        .server_selection_timeout
        .get_or_insert(Duration::from_secs(10));
    options
        .connect_timeout
        .get_or_insert(Duration::from_secs(5));
    let client = Client::with_options(options)?;
    Ok(client.database(&settings.database))
}

fn index(keys: Document, name: &str, unique: bool, partial: Option<Document>) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            IndexOptions::builder()
                .name(name.to_owned())
                .unique(unique.then_some(true))
                .partial_filter_expression(partial)
                .build(),
        )
        .build()
}

/// The contacts the unique `(account_id, email)` index covers: those with a
/// non-empty email. A CRM keeps contacts without one (missing, `null` or
/// `""`); a plain unique index would count them as duplicates of each
/// other and could not even be built over such an account.
///
/// `$type` with `$gt` rather than `$gt` alone: the local server answers a
/// find on `email` alone with nothing when the partial filter is only a
/// range (a wrong result of that server, noted in the README); real MongoDB
/// treats both alike.
fn contacts_with_email() -> Document {
    doc! { "email": { "$type": "string", "$gt": "" } }
}

/// Filter for an account's contacts with any of `emails` (lower-cased,
/// non-empty). It repeats the unique index's partial filter so that the
/// query planner of any MongoDB can use that index.
pub fn contacts_by_email(account_id: bson::oid::ObjectId, emails: &[&str]) -> Document {
    doc! { "account_id": account_id, "email": { "$in": emails, "$type": "string", "$gt": "" } }
}

/// Errors of index set-up.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// MongoDB failed.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// An index on the same keys exists but does not give the guarantee
    /// importd relies on (e.g. not unique).
    #[error(
        "{collection}: an index on {keys} exists without the options importd needs ({detail}); drop or fix it"
    )]
    Conflict {
        /// Collection.
        collection: &'static str,
        /// Key pattern.
        keys: Document,
        /// What differs.
        detail: String,
    },
}

impl IndexError {
    /// Whether retrying may succeed (a server that is down or electing);
    /// anything else (existing duplicates under a new unique index, a
    /// conflicting index, no permission) needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Mongo(e) => is_transient(e),
            Self::Conflict { .. } => false,
        }
    }
}

/// Creates every index importd needs. Safe to run on every start.
pub async fn ensure_indexes(db: &Database) -> Result<(), IndexError> {
    let specs: [(&str, Document, &str, bool, Option<Document>); 15] = [
        // Notifications due (final imports whose email is not sent yet).
        (
            collections::QUEUES,
            doc! { "notify.state": 1, "notify.next_attempt_at": 1 },
            "notify_state",
            false,
            None,
        ),
        // Expired notification leases.
        (
            collections::QUEUES,
            doc! { "notify.state": 1, "notify.expires_at": 1 },
            "notify_expiry",
            false,
            None,
        ),
        // Webhooks due, and expired webhook rounds (as for the email).
        (
            collections::QUEUES,
            doc! { "webhook.state": 1, "webhook.next_attempt_at": 1 },
            "webhook_state",
            false,
            None,
        ),
        (
            collections::QUEUES,
            doc! { "webhook.state": 1, "webhook.expires_at": 1 },
            "webhook_expiry",
            false,
            None,
        ),
        // Undo emails due, and expired undo email rounds.
        (
            collections::QUEUES,
            doc! { "undo_notify.state": 1, "undo_notify.next_attempt_at": 1 },
            "undo_notify_state",
            false,
            None,
        ),
        (
            collections::QUEUES,
            doc! { "undo_notify.state": 1, "undo_notify.expires_at": 1 },
            "undo_notify_expiry",
            false,
            None,
        ),
        // The claim: equality on status over the few pending imports, oldest first.
        (
            collections::QUEUES,
            doc! { "status": 1, "claim_order": 1 },
            "status_claim_order",
            false,
            None,
        ),
        // Undos requested (the few imports with `undo_requested: true`),
        // and expired undo leases among them.
        (
            collections::QUEUES,
            doc! { "undo_requested": 1, "undo.expires_at": 1 },
            "undo_requested",
            false,
            None,
        ),
        // Retention: the imports to purge that ended longest ago (the
        // state, kept, purging or none yet, then a range over the few that
        // are due).
        (
            collections::QUEUES,
            doc! { "retention.state": 1, "completed_at": 1 },
            "retention_due",
            false,
            None,
        ),
        // The rescue: processing imports whose lease expired.
        (
            collections::QUEUES,
            doc! { "status": 1, "lease.expires_at": 1 },
            "status_lease_expiry",
            false,
            None,
        ),
        // One stage per normalised name: two daemons racing make one.
        (
            collections::PIPELINE_STAGES,
            doc! { "account_id": 1, "pipeline_id": 1, "name": 1 },
            "account_pipeline_name_unique",
            true,
            None,
        ),
        // One contact per email of an account (SPEC.md): deals naming a new
        // contact create it once, whoever races. Contacts without an email
        // are left out (see `contacts_with_email`).
        (
            collections::CONTACTS,
            doc! { "account_id": 1, "email": 1 },
            "account_email_unique",
            true,
            Some(contacts_with_email()),
        ),
        // One summary per import.
        (
            collections::CSV_IMPORTS,
            doc! { "queue_id": 1 },
            "queue_id_unique",
            true,
            None,
        ),
        // Support: "what happened to line N of import X" and "all failed
        // lines of X". One entry per batch of lines, so it costs nothing
        // measurable on the write path.
        (
            collections::IMPORT_LINES,
            doc! { "queue_id": 1, "first_line": 1 },
            "queue_first_line",
            false,
            None,
        ),
        (
            collections::IMPORT_LINES,
            doc! { "queue_id": 1, "failed_count": 1 },
            "queue_failed",
            false,
            None,
        ),
    ];
    for (coll, keys, name, unique, partial) in specs {
        let collection = db.collection::<Document>(coll);
        let created = collection
            .create_index(index(keys.clone(), name, unique, partial.clone()))
            .await;
        match created {
            Ok(_) => {}
            // The CRM's own index on the same keys, under another name:
            // it serves as well if it is unique where ours would be.
            Err(e) if index_exists_otherwise(&e) => {
                let existing = existing_unique(&collection, &keys, partial.as_ref()).await?;
                match existing {
                    Some(u) if u || !unique => tracing::info!(
                        collection = coll,
                        index = name,
                        "An equivalent index exists; kept"
                    ),
                    Some(_) => {
                        return Err(IndexError::Conflict {
                            collection: coll,
                            keys,
                            detail:
                                "it is not unique, or unique over other documents than importd's"
                                    .into(),
                        });
                    }
                    None => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether two key patterns name the same fields in the same order and
/// directions (`1`, `1.0` and `1_i64` alike, as shells store them).
fn same_keys(a: &Document, b: &Document) -> bool {
    let num = |v: &bson::Bson| match v {
        bson::Bson::Int32(n) => Some(f64::from(*n)),
        bson::Bson::Int64(n) => Some(*n as f64),
        bson::Bson::Double(n) => Some(*n),
        _ => None,
    };
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((ka, va), (kb, vb))| {
            ka == kb
                && match (num(va), num(vb)) {
                    (Some(x), Some(y)) => x == y,
                    _ => va == vb,
                }
        })
}

/// Whether the collection has an index on exactly `keys`, and if so
/// whether it is unique over the documents importd's would be: every
/// document, or those of exactly the same partial filter as `partial`
/// (compared as stored: a filter written otherwise, even a broader one, is
/// reported as a conflict for an operator to look at, never taken on
/// trust). A unique index over fewer documents does not give importd's
/// guarantee.
async fn existing_unique(
    collection: &mongodb::Collection<Document>,
    keys: &Document,
    partial: Option<&Document>,
) -> mongodb::error::Result<Option<bool>> {
    use futures::TryStreamExt;
    let mut cursor = collection.list_indexes().await?;
    let mut found = None;
    while let Some(model) = cursor.try_next().await? {
        if same_keys(&model.keys, keys) {
            let unique = unique_over(&model.options.unwrap_or_default(), partial);
            // Servers that allow several indexes on one key pattern: any
            // one that gives the guarantee will do.
            found = Some(found.unwrap_or(false) || unique);
        }
    }
    Ok(found)
}

/// Whether an index with `options` is unique over every document a unique
/// index with the partial filter `partial` (none: all) would cover: no
/// filter, or the same one. Pure.
fn unique_over(options: &IndexOptions, partial: Option<&Document>) -> bool {
    let covers = match &options.partial_filter_expression {
        None => true,
        Some(theirs) => Some(theirs) == partial,
    };
    options.unique.unwrap_or(false) && covers
}

/// `IndexOptionsConflict` / `IndexKeySpecsConflict`: an index on these keys
/// exists under another name or with other options.
fn index_exists_otherwise(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if c.code == 85 || c.code == 86)
}

/// The server's error code of a failed command or single write, if any.
pub fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

/// Whether a single write failed on a unique index (E11000).
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

/// Whether a MongoDB error is worth retrying: network trouble, timeouts,
/// server selection, a primary stepping down. Anything else is a bug or bad
/// data and retrying would only repeat it.
pub fn is_transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    if e.contains_label("RetryableWriteError")
        || e.contains_label("TransientTransactionError")
        || e.contains_label("ResetPool")
    {
        return true;
    }
    match e.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => true,
        ErrorKind::Command(c) => matches!(
            c.code,
            // HostUnreachable, HostNotFound, NetworkTimeout, ShutdownInProgress,
            // PrimarySteppedDown, ExceededTimeLimit, SocketException,
            // NotWritablePrimary, InterruptedAtShutdown,
            // InterruptedDueToReplStateChange, NotPrimaryNoSecondaryOk,
            // NotPrimaryOrSecondary, NetworkInterfaceExceededTimeLimit
            6 | 7 | 89 | 91 | 189 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436 | 202
        ),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(_)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_unique_index_over_at_least_our_documents_gives_our_guarantee() {
        let ours = contacts_with_email();
        let with = |unique: Option<bool>, partial: Option<Document>| {
            IndexOptions::builder()
                .unique(unique)
                .partial_filter_expression(partial)
                .build()
        };
        assert!(unique_over(&with(Some(true), None), Some(&ours)));
        assert!(unique_over(
            &with(Some(true), Some(ours.clone())),
            Some(&ours)
        ));
        assert!(unique_over(&with(Some(true), None), None));
        assert!(!unique_over(&with(None, None), Some(&ours)));
        assert!(!unique_over(&with(Some(false), None), None));
        let narrower = doc! { "archived": false };
        assert!(!unique_over(
            &with(Some(true), Some(narrower.clone())),
            Some(&ours)
        ));
        assert!(!unique_over(&with(Some(true), Some(narrower)), None));
    }

    #[test]
    fn key_patterns_compare_by_field_order_and_numeric_direction() {
        let ours = doc! { "account_id": 1, "email": 1 };
        assert!(same_keys(
            &ours,
            &doc! { "account_id": 1.0, "email": 1_i64 }
        ));
        assert!(!same_keys(&ours, &doc! { "email": 1, "account_id": 1 }));
        assert!(!same_keys(&ours, &doc! { "account_id": 1, "email": -1 }));
        assert!(!same_keys(&ours, &doc! { "account_id": 1 }));
        assert!(!same_keys(
            &ours,
            &doc! { "account_id": 1, "email": "text" }
        ));
    }
}
