//! Deals naming contacts (`contact_email`, `contact_name`): linked to the
//! account's contact with that email, which is created once if missing,
//! whoever races and however often a file is replayed.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Document, doc};
use importd::domain::{collections, contact_id};

use crate::helpers::{TestApp, get_i64, test_settings};

const LONG: Duration = Duration::from_secs(120);

const MAPPING: [(&str, &str); 3] = [
    ("Deal Name", "name"),
    ("Contact Name", "contact_name"),
    ("Contact Email", "contact_email"),
];

fn deal_by_name(deals: &[Document], name: &str) -> Document {
    deals
        .iter()
        .find(|d| d.get_str("name") == Ok(name))
        .unwrap_or_else(|| panic!("deal {name}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deals_link_to_existing_contacts_and_create_missing_ones_once() {
    let mut app = TestApp::new().await;
    let contacts = app.coll(collections::CONTACTS);
    let existing = ObjectId::new();
    contacts
        .insert_one(doc! {
            "_id": existing, "account_id": app.account_id, "email": "bob@x.co",
            "first_name": "Robert", "last_name": "Existing",
        })
        .await
        .unwrap();
    // Another account's contact with a wanted email is not theirs to link.
    let foreign = ObjectId::new();
    contacts
        .insert_one(doc! { "_id": foreign, "account_id": ObjectId::new(), "email": "ann@x.co" })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Deal Name,Contact Name,Contact Email\n\
               One,Ann Lee,ann@x.co\n\
               Two,Bob B,BOB@X.CO\n\
               Three,Someone Else, Ann@x.co \n\
               Four,Name Only,\n\
               Five,,not-an-email\n\
               Six,,cy@x.co\n";
    let id = app
        .enqueue_csv("contacts.csv", csv.as_bytes(), &MAPPING)
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 5);
    assert_eq!(get_i64(&q, "progress.failed_rows"), 1);
    assert_eq!(get_i64(&q, "contacts_created"), 2);
    assert_eq!(get_i64(&app.summary(id).await, "total_contacts_created"), 2);

    let mine = app
        .find_all(collections::CONTACTS, doc! { "account_id": app.account_id })
        .await;
    let by_email: HashMap<&str, &Document> = mine
        .iter()
        .map(|c| (c.get_str("email").unwrap(), c))
        .collect();
    assert_eq!(
        by_email.keys().copied().collect::<HashSet<_>>(),
        HashSet::from(["ann@x.co", "bob@x.co", "cy@x.co"])
    );
    let ann = by_email["ann@x.co"];
    assert_eq!(
        ann.get_object_id("_id").unwrap(),
        contact_id(&id, 2).unwrap()
    );
    assert_eq!(ann.get_str("first_name").unwrap(), "Ann");
    assert_eq!(ann.get_str("last_name").unwrap(), "Lee");
    assert_eq!(ann.get_object_id("owner").unwrap(), app.user_id);
    assert_eq!(ann.get_str("source").unwrap(), "csv");
    assert_eq!(
        ann.get_document("import").unwrap().get_i64("line").unwrap(),
        2
    );
    // The existing contact is linked, not rewritten.
    let bob = by_email["bob@x.co"];
    assert_eq!(bob.get_str("first_name").unwrap(), "Robert");
    assert!(bob.get("import").is_none());

    let deals = app.find_all(collections::DEALS, doc! {}).await;
    let link = |name: &str| deal_by_name(&deals, name).get_object_id("contact_id").ok();
    assert_eq!(link("One"), Some(ann.get_object_id("_id").unwrap()));
    assert_eq!(link("Three"), link("One"), "one contact per email");
    assert_eq!(link("Two"), Some(existing));
    assert_eq!(
        link("Six"),
        Some(by_email["cy@x.co"].get_object_id("_id").unwrap())
    );
    assert_eq!(link("Four"), None);
    assert_eq!(
        deal_by_name(&deals, "Four")
            .get_str("contact_name")
            .unwrap(),
        "Name Only",
        "a name without an email stays on the deal"
    );
    assert_ne!(link("One"), Some(foreign));
    let failed = importd::outcomes::line_outcome(&app.db, id, 6)
        .await
        .unwrap()
        .expect("line 6 has an outcome");
    assert!(
        format!("{failed:?}").contains("contact_email"),
        "{failed:?}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_imports_and_a_replay_create_each_contact_once() {
    let mut settings = test_settings();
    // Many small batches, two in flight: batches of one import race too.
    settings.import.batch_size = NonZeroUsize::new(25).unwrap();
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    app.spawn_daemon();
    let mut csv = String::from("Deal Name,Contact Name,Contact Email\n");
    for i in 0..600 {
        writeln!(csv, "Deal {i},Person {},p{}@race.co", i % 120, i % 120).unwrap();
    }
    let a = app.enqueue_csv("a.csv", csv.as_bytes(), &MAPPING).await;
    let b = app.enqueue_csv("b.csv", csv.as_bytes(), &MAPPING).await;
    let mut created = 0;
    for id in [a, b] {
        let q = app.wait_completed(id, LONG).await;
        assert_eq!(get_i64(&q, "progress.imported_rows"), 600);
        created += get_i64(&q, "contacts_created");
    }
    assert_eq!(app.count(collections::CONTACTS, doc! {}).await, 120);
    assert_eq!(
        created, 120,
        "each contact counted by the import that made it"
    );
    // Every deal links to the contact of its email.
    let contacts: HashMap<String, ObjectId> = app
        .find_all(collections::CONTACTS, doc! {})
        .await
        .into_iter()
        .map(|c| {
            (
                c.get_str("email").unwrap().to_owned(),
                c.get_object_id("_id").unwrap(),
            )
        })
        .collect();
    for d in app.find_all(collections::DEALS, doc! {}).await {
        let n: usize = d.get_str("name").unwrap()[5..].parse().unwrap();
        assert_eq!(
            d.get_object_id("contact_id").ok(),
            contacts.get(&format!("p{}@race.co", n % 120)).copied()
        );
    }

    // Import `a` again from the start: nothing new, the same count.
    let before = get_i64(&app.queue(a).await, "contacts_created");
    app.replay_from_start(a).await;
    app.wait_queue(a, LONG, "completed again", |q| {
        get_i64(q, "attempts") == 2 && q.get_str("status") == Ok("completed")
    })
    .await;
    assert_eq!(get_i64(&app.queue(a).await, "contacts_created"), before);
    assert_eq!(app.count(collections::CONTACTS, doc! {}).await, 120);
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 1200);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updated_deal_is_linked_to_the_contact_its_row_names() {
    let mut app = TestApp::new().await;
    let existing = ObjectId::new();
    app.coll(collections::DEALS)
        .insert_one(doc! {
            "_id": existing, "name": "Acme deal", "account_id": app.account_id,
            "pipeline_id": app.pipeline_id,
        })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Deal Name,Contact Name,Contact Email\nACME Deal,Dana Scully,dana@fbi.gov\n";
    let id = app
        .enqueue_with(
            "update.csv",
            csv.as_bytes(),
            &MAPPING,
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } },
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.updated_rows"), 1);
    assert_eq!(get_i64(&q, "contacts_created"), 1);
    let contact = app
        .coll(collections::CONTACTS)
        .find_one(doc! { "email": "dana@fbi.gov" })
        .await
        .unwrap()
        .expect("contact created");
    let deal = app
        .coll(collections::DEALS)
        .find_one(doc! { "_id": existing })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        deal.get_object_id("contact_id").unwrap(),
        contact.get_object_id("_id").unwrap()
    );
    assert_eq!(contact.get_str("last_name").unwrap(), "Scully");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_whose_id_is_taken_gets_a_stable_second_id() {
    let mut app = TestApp::new().await;
    let csv = "Deal Name,Contact Name,Contact Email\nOne,Ann Lee,ann@x.co\n";
    let id = app.enqueue_csv("taken.csv", csv.as_bytes(), &MAPPING).await;
    // The contact line 2 would create exists under another email (as if
    // an earlier run created it and a user then changed its email).
    app.coll(collections::CONTACTS)
        .insert_one(doc! {
            "_id": contact_id(&id, 2).unwrap(), "account_id": app.account_id,
            "email": "renamed@x.co",
        })
        .await
        .unwrap();
    app.spawn_daemon();
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "contacts_created"), 1);
    let fallback = importd::domain::contact_fallback_id(&id, 2).unwrap();
    let deal = app
        .coll(collections::DEALS)
        .find_one(doc! { "name": "One" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(deal.get_object_id("contact_id").unwrap(), fallback);
    // A replay from the start counts it as this import's again.
    app.replay_from_start(id).await;
    let q = app
        .wait_queue(id, LONG, "completed again", |q| {
            get_i64(q, "attempts") == 2 && q.get_str("status") == Ok("completed")
        })
        .await;
    assert_eq!(get_i64(&q, "contacts_created"), 1);
    assert_eq!(app.count(collections::CONTACTS, doc! {}).await, 2);
    app.cleanup().await;
}
