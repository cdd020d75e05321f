//! `importd demo`: seeds a demo account (user and pipeline) into the
//! configured database if missing and enqueues a CSV for it, as the
//! dashboard would. For local use and the README's quick start.

use bson::oid::ObjectId;
use bson::{DateTime, Document, doc};
use mongodb::Database;

use crate::domain::collections;

/// Fixed ids of the demo account, so repeated demos share it.
pub struct DemoAccount {
    /// Account.
    pub account_id: ObjectId,
    /// User (owner of the imported deals; the summary email goes to them).
    pub user_id: ObjectId,
    /// Pipeline the deals go to.
    pub pipeline_id: ObjectId,
}

impl Default for DemoAccount {
    fn default() -> Self {
        let id = |s: &str| s.parse().expect("constant ObjectId");
        Self {
            account_id: id("6564000000000000000000a1"),
            user_id: id("6564000000000000000000b1"),
            pipeline_id: id("6564000000000000000000c1"),
        }
    }
}

/// Inserts the demo user and pipeline unless they exist.
pub async fn seed(db: &Database, demo: &DemoAccount, email: &str) -> mongodb::error::Result<()> {
    let upsert = |coll: &str, id: ObjectId, fields: Document| {
        let coll = db.collection::<Document>(coll);
        async move {
            coll.update_one(doc! { "_id": id }, doc! { "$setOnInsert": fields })
                .upsert(true)
                .await
        }
    };
    upsert(
        collections::USERS,
        demo.user_id,
        doc! { "email": email, "first_name": "Demo", "account_id": demo.account_id, "created_at": DateTime::now() },
    )
    .await?;
    upsert(
        collections::PIPELINES,
        demo.pipeline_id,
        doc! { "account_id": demo.account_id, "name": "Sales", "created_at": DateTime::now() },
    )
    .await?;
    Ok(())
}
