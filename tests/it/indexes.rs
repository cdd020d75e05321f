//! Start-up index creation against a database the CRM already uses.

use bson::oid::ObjectId;
use bson::{Document, doc};
use futures::TryStreamExt;
use importd::db::IndexError;
use importd::domain::collections;
use mongodb::IndexModel;

use crate::helpers::test_settings;

async fn fresh_db() -> mongodb::Database {
    importd::db::connect(&test_settings().mongodb)
        .await
        .expect("client")
}

async fn contact_indexes(db: &mongodb::Database) -> Vec<IndexModel> {
    db.collection::<Document>(collections::CONTACTS)
        .list_indexes()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// The CRM's own index on `contacts (account_id, email)`, named its way.
async fn crm_contacts_index(db: &mongodb::Database, unique: bool) {
    db.collection::<Document>(collections::CONTACTS)
        .create_index(
            IndexModel::builder()
                .keys(doc! { "account_id": 1, "email": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .name("crm_contacts_email".to_owned())
                        .unique(unique)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn indexes_are_idempotent_beside_a_crm_index_on_the_same_keys() {
    let db = fresh_db().await;
    // The CRM's own unique index on contacts, named its way.
    crm_contacts_index(&db, true).await;
    importd::db::ensure_indexes(&db).await.expect("first start");
    importd::db::ensure_indexes(&db)
        .await
        .expect("second start");
    db.drop().await.unwrap();
}

#[tokio::test]
async fn a_problem_retrying_cannot_fix_is_reported_not_retried() {
    // Existing duplicate contacts: the unique index cannot be built.
    let db = fresh_db().await;
    let account = ObjectId::new();
    db.collection::<Document>(collections::CONTACTS)
        .insert_many([
            doc! { "account_id": account, "email": "twice@x.co" },
            doc! { "account_id": account, "email": "twice@x.co" },
        ])
        .await
        .unwrap();
    let err = importd::db::ensure_indexes(&db)
        .await
        .expect_err("duplicates refuse a unique index");
    assert!(!err.is_transient(), "{err}");
    db.drop().await.unwrap();

    // A non-unique index on the keys that must be unique.
    let db = fresh_db().await;
    crm_contacts_index(&db, false).await;
    // Servers differ: MongoDB refuses a second index on the same keys
    // (which importd reports as a conflict), this local server builds it.
    // Either way importd never runs without the uniqueness it relies on.
    match importd::db::ensure_indexes(&db).await {
        Err(err) => {
            assert!(matches!(err, IndexError::Conflict { .. }), "{err}");
            assert!(!err.is_transient(), "{err}");
        }
        Ok(()) => {
            let indexes = contact_indexes(&db).await;
            assert!(
                indexes.iter().any(|i| {
                    i.keys == doc! { "account_id": 1, "email": 1 }
                        && i.options.as_ref().and_then(|o| o.unique) == Some(true)
                }),
                "{indexes:?}"
            );
        }
    }
    db.drop().await.unwrap();
}

#[tokio::test]
async fn contacts_without_an_email_neither_block_nor_break_the_unique_index() {
    // A CRM's account with contacts that have no email (missing, null,
    // empty): several of each, which a plain unique index would refuse.
    let db = fresh_db().await;
    let account = ObjectId::new();
    let contacts = db.collection::<Document>(collections::CONTACTS);
    contacts
        .insert_many([
            doc! { "account_id": account, "name": "a" },
            doc! { "account_id": account, "name": "b" },
            doc! { "account_id": account, "email": null },
            doc! { "account_id": account, "email": null },
            doc! { "account_id": account, "email": "" },
            doc! { "account_id": account, "email": "" },
            doc! { "account_id": account, "email": "one@x.co" },
        ])
        .await
        .unwrap();
    importd::db::ensure_indexes(&db)
        .await
        .expect("built over email-less contacts");
    // More of them may still be added; a second contact for an email not.
    contacts
        .insert_one(doc! { "account_id": account, "email": null })
        .await
        .expect("another contact without email");
    let dup = contacts
        .insert_one(doc! { "account_id": account, "email": "one@x.co" })
        .await
        .expect_err("one contact per email");
    assert!(dup.to_string().contains("E11000"), "{dup}");
    // The lookup importd makes finds exactly the emailed contact.
    let found: Vec<Document> = contacts
        .find(importd::db::contacts_by_email(account, &["one@x.co"]))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    // And so does the dashboard's lookup by email alone (the local server
    // answers it wrongly under some partial filters).
    assert_eq!(
        contacts
            .count_documents(doc! { "email": "one@x.co" })
            .await
            .unwrap(),
        1
    );
    db.drop().await.unwrap();
}

#[tokio::test]
async fn a_crm_unique_index_over_fewer_contacts_does_not_count_as_ours() {
    // Unique only among contacts not archived: two archived contacts of one
    // email would pass it, so it does not give importd's guarantee.
    let db = fresh_db().await;
    db.collection::<Document>(collections::CONTACTS)
        .create_index(
            IndexModel::builder()
                .keys(doc! { "account_id": 1, "email": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .name("crm_live_contacts".to_owned())
                        .unique(true)
                        .partial_filter_expression(doc! { "archived": false })
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    match importd::db::ensure_indexes(&db).await {
        // MongoDB: one index per key pattern and filter; importd's is
        // refused, and the CRM's is not taken for it.
        Err(err) => assert!(matches!(err, IndexError::Conflict { .. }), "{err}"),
        // The local server builds importd's beside it.
        Ok(()) => {
            let indexes = contact_indexes(&db).await;
            assert!(
                indexes
                    .iter()
                    .any(|i| i.options.as_ref().and_then(|o| o.name.as_deref())
                        == Some("account_email_unique")),
                "{indexes:?}"
            );
        }
    }
    db.drop().await.unwrap();
}
