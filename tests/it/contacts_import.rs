//! Contacts imports (`source: "contacts"`): one contact per email of an
//! account, duplicates skipped (default) or updated in file order, every
//! line accounted for, replays harmless, racing imports still one contact.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Document, doc};
use importd::domain::{collections, contact_id};
use importd::map::MappedContact;
use importd::outcomes::{self, LineOutcome};
use importd::write::{ContactWrite, ContactWriter, befores};

use crate::helpers::{SmtpCatcher, TestApp, get_i64, settings_with_smtp, test_settings};

const LONG: Duration = Duration::from_secs(120);
const TIER: &str = "64b7f0c2a1b2c3d4e5f60718";

/// Queue fields of a contacts import with `strategy` (none: the default).
fn contacts(strategy: Option<&str>) -> Document {
    let mut additional = doc! { "tags": ["fair-2026"] };
    if let Some(s) = strategy {
        additional.insert("duplicate_strategy", s);
    }
    doc! { "source": "contacts", "additional_data": additional }
}

async fn contact(app: &TestApp, email: &str) -> Document {
    app.coll(collections::CONTACTS)
        .find_one(doc! { "account_id": app.account_id, "email": email })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("contact {email}"))
}

fn counts(q: &Document) -> [i64; 4] {
    ["imported", "updated", "skipped", "failed"].map(|k| get_i64(q, &format!("progress.{k}_rows")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contacts_import_creates_skips_duplicates_and_fails_bad_lines() {
    let mut app = TestApp::new().await;
    let existing = ObjectId::new();
    app.coll(collections::CONTACTS)
        .insert_one(doc! {
            "_id": existing, "account_id": app.account_id, "email": "old@x.co",
            "first_name": "Old", "phone": "1",
        })
        .await
        .unwrap();
    // Another account's contact is not a duplicate of this account's.
    app.coll(collections::CONTACTS)
        .insert_one(doc! { "account_id": ObjectId::new(), "email": "ann@x.co" })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Email,Name,Phone,Tier\n\
         ann@x.co,Ann  Lee,+1 555,gold\n\
         OLD@x.co,Changed Name,2,\n\
         bad-email,X,,\n\
         ,No Mail,,\n\
         \" Ann@X.co \",Ann Again,9,\n\
         cy@x.co,\"Cy\nMulti\",,\n\
         dee@x.co,Dee,,silver\n";
    let mapping = [
        ("Email", "email"),
        ("Name", "name"),
        ("Phone", "phone"),
        ("Tier", TIER),
    ];
    let id = app
        .enqueue_with("people.csv", csv.as_bytes(), &mapping, contacts(None))
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(counts(&q), [3, 0, 2, 2], "{q}");
    assert_eq!(get_i64(&q, "contacts_created"), 3);
    let summary = app.summary(id).await;
    assert_eq!(get_i64(&summary, "total_records_added"), 3);
    assert_eq!(get_i64(&summary, "total_skipped"), 2);
    assert_eq!(get_i64(&summary, "total_errors"), 2);
    assert_eq!(summary.get_str("source").unwrap(), "contacts");

    let ann = contact(&app, "ann@x.co").await;
    assert_eq!(
        ann.get_object_id("_id").unwrap(),
        contact_id(&id, 2).unwrap()
    );
    assert_eq!(ann.get_str("first_name").unwrap(), "Ann");
    assert_eq!(ann.get_str("last_name").unwrap(), "Lee");
    assert_eq!(ann.get_str("phone").unwrap(), "+1 555");
    assert_eq!(
        ann.get_document("additional_info")
            .unwrap()
            .get_str(TIER)
            .unwrap(),
        "gold"
    );
    assert_eq!(ann.get_array("tags").unwrap().len(), 1);
    assert_eq!(ann.get_str("source").unwrap(), "csv");
    assert_eq!(ann.get_object_id("owner").unwrap(), app.user_id);
    assert_eq!(get_i64(&ann, "import.line"), 2);
    // The existing contact is left alone under `skip`.
    let old = contact(&app, "old@x.co").await;
    assert_eq!(old.get_str("first_name").unwrap(), "Old");
    assert_eq!(old.get_str("phone").unwrap(), "1");
    // A quoted name over two lines: the record starts on line 7.
    let cy = contact(&app, "cy@x.co").await;
    assert_eq!(get_i64(&cy, "import.line"), 7);
    assert_eq!(cy.get_str("last_name").unwrap(), "Multi");
    assert_eq!(get_i64(&contact(&app, "dee@x.co").await, "import.line"), 9);

    let line = |n| outcomes::line_outcome(&app.db, id, n);
    assert_eq!(
        line(3).await.unwrap(),
        Some(LineOutcome::Skipped { id: existing })
    );
    assert_eq!(
        line(6).await.unwrap(),
        Some(LineOutcome::Skipped {
            id: contact_id(&id, 2).unwrap()
        })
    );
    match line(4).await.unwrap() {
        Some(LineOutcome::Failed(f)) => assert_eq!(f.code, "invalid_email"),
        other => panic!("line 4: {other:?}"),
    }
    match line(5).await.unwrap() {
        Some(LineOutcome::Failed(f)) => {
            assert_eq!(
                (f.code.as_str(), f.field.as_deref()),
                ("required", Some("email"))
            );
        }
        other => panic!("line 5: {other:?}"),
    }
    let before = app.count(collections::CONTACTS, doc! {}).await;

    // The whole file again, as after a crash before any checkpoint: the
    // same outcomes, not one contact more.
    app.replay_from_start(id).await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(counts(&q), [3, 0, 2, 2], "{q}");
    assert_eq!(get_i64(&q, "contacts_created"), 3);
    assert_eq!(app.count(collections::CONTACTS, doc! {}).await, before);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_applies_rows_in_file_order_and_mails_a_contact_summary() {
    let smtp = SmtpCatcher::start().await;
    let mut settings = settings_with_smtp(smtp.port);
    // Batches of lines 2-4 and 5-6: rows naming one email within a batch
    // (3, 4) and across batches (6).
    settings.import.batch_size = NonZeroUsize::new(3).unwrap();
    let mut app = TestApp::with_settings(settings).await;
    let existing = ObjectId::new();
    app.coll(collections::CONTACTS)
        .insert_one(doc! {
            "_id": existing, "account_id": app.account_id, "email": "old@x.co",
            "first_name": "Old", "phone": "1", "company": "Keep",
            "additional_info": { "other": "kept" },
        })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Email,First,Phone,Tier\n\
               old@x.co,New,2,gold\n\
               new@x.co,A,3,\n\
               NEW@x.co,B,,\n\
               nope,C,4,\n\
               new@x.co,Last,,bronze\n";
    let mapping = [
        ("Email", "email"),
        ("First", "first_name"),
        ("Phone", "phone"),
        ("Tier", TIER),
    ];
    let id = app
        .enqueue_with(
            "crm.csv",
            csv.as_bytes(),
            &mapping,
            contacts(Some("update")),
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(counts(&q), [1, 3, 0, 1], "{q}");
    let old = contact(&app, "old@x.co").await;
    assert_eq!(old.get_object_id("_id").unwrap(), existing);
    assert_eq!(old.get_str("first_name").unwrap(), "New");
    assert_eq!(old.get_str("phone").unwrap(), "2");
    // Unmapped fields and other custom fields stay.
    assert_eq!(old.get_str("company").unwrap(), "Keep");
    let info = old.get_document("additional_info").unwrap();
    assert_eq!(info.get_str("other").unwrap(), "kept");
    assert_eq!(info.get_str(TIER).unwrap(), "gold");
    assert!(old.get("owner").is_none(), "identity is set on insert only");
    // Created by line 3, then updated by lines 4 and 6, in that order;
    // an empty cell leaves its field as it was.
    let new = contact(&app, "new@x.co").await;
    assert_eq!(
        new.get_object_id("_id").unwrap(),
        contact_id(&id, 3).unwrap()
    );
    assert_eq!(get_i64(&new, "import.line"), 3);
    assert_eq!(new.get_str("first_name").unwrap(), "Last");
    assert_eq!(new.get_str("phone").unwrap(), "3");
    assert_eq!(
        new.get_document("additional_info")
            .unwrap()
            .get_str(TIER)
            .unwrap(),
        "bronze"
    );
    assert_eq!(
        outcomes::line_outcome(&app.db, id, 4).await.unwrap(),
        Some(LineOutcome::Updated {
            id: contact_id(&id, 3).unwrap()
        })
    );
    assert_eq!(
        outcomes::line_outcome(&app.db, id, 3).await.unwrap(),
        Some(LineOutcome::Imported {
            id: contact_id(&id, 3).unwrap()
        })
    );
    let mails = smtp.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(
        mails[0].subject,
        "Contact import finished: 1 imported, 3 updated, 1 failed (crm.csv)"
    );
    assert!(!mails[0].text.contains("Pipeline:"), "{}", mails[0].text);

    // A replay from the start: the line that created a contact is still
    // its creator, not an update of itself. First with the outcomes the
    // first run stored (reused), then without them (written again).
    for forget in [false, true] {
        if forget {
            app.coll(collections::IMPORT_LINES)
                .delete_many(doc! { "queue_id": id })
                .await
                .unwrap();
        }
        app.replay_from_start(id).await;
        let q = app.wait_completed(id, LONG).await;
        assert_eq!(counts(&q), [1, 3, 0, 1], "forget {forget}: {q}");
        assert_eq!(get_i64(&q, "contacts_created"), 1, "forget {forget}: {q}");
        assert_eq!(
            app.count(collections::CONTACTS, doc! { "account_id": app.account_id })
                .await,
            2
        );
    }
    let new = contact(&app, "new@x.co").await;
    assert_eq!(new.get_str("first_name").unwrap(), "Last", "{new}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_contacts_imports_make_one_contact_per_email() {
    let mut settings = test_settings();
    settings.import.batch_size = NonZeroUsize::new(100).unwrap();
    let mut app = TestApp::with_settings(settings).await;
    let mut csv = String::from("Email,First\n");
    for i in 0..2_000 {
        writeln!(csv, "p{i}@x.co,N{i}").unwrap();
    }
    let mapping = [("Email", "email"), ("First", "first_name")];
    let mut ids = Vec::new();
    for (i, strategy) in ["update", "skip", "update"].into_iter().enumerate() {
        ids.push(
            app.enqueue_with(
                &format!("c{i}.csv"),
                csv.as_bytes(),
                &mapping,
                contacts(Some(strategy)),
            )
            .await,
        );
    }
    // Two daemons, each running imports side by side.
    app.spawn_daemon();
    app.spawn_daemon();
    let mut created = 0;
    for id in &ids {
        let q = app.wait_completed(*id, LONG).await;
        let [imported, updated, skipped, failed] = counts(&q);
        assert_eq!(imported + updated + skipped, 2_000, "{q}");
        assert_eq!(failed, 0, "{q}");
        created += get_i64(&q, "contacts_created");
    }
    assert_eq!(created, 2_000);
    assert_eq!(
        app.count(collections::CONTACTS, doc! { "account_id": app.account_id })
            .await,
        2_000
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_imports_refuse_create_a_missing_email_column_too_many_rows_and_unknown_sources() {
    let mut settings = test_settings();
    settings.import.max_rows = Some(5);
    settings.import.batch_size = NonZeroUsize::new(2).unwrap();
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    let create = app
        .enqueue_with(
            "a.csv",
            b"Email\na@x.co\n",
            &[("Email", "email")],
            contacts(Some("create")),
        )
        .await;
    let no_email = app
        .enqueue_with(
            "b.csv",
            b"Email,Name\na@x.co,A\n",
            &[("Name", "name")],
            contacts(None),
        )
        .await;
    let mut csv = String::from("Email\n");
    for i in 0..8 {
        writeln!(csv, "r{i}@x.co").unwrap();
    }
    let too_many = app
        .enqueue_with(
            "c.csv",
            csv.as_bytes(),
            &[("Email", "email")],
            contacts(None),
        )
        .await;
    let leads = app
        .enqueue_with(
            "d.csv",
            b"Email\na@x.co\n",
            &[("Email", "email")],
            doc! { "source": "leads" },
        )
        .await;
    for (id, code, words) in [
        (leads, "unsupported_source", "\"leads\""),
        (
            create,
            "invalid_queue_document",
            "not available for contacts",
        ),
        (no_email, "mapping_invalid", "\"email\""),
        (too_many, "too_many_rows", "first 5 rows were processed"),
    ] {
        let q = app.wait_final(id, LONG).await;
        assert_eq!(q.get_str("status").unwrap(), "failed", "{q}");
        let e = q.get_document("error").unwrap();
        assert_eq!(e.get_str("code").unwrap(), code, "{q}");
        assert!(e.get_str("message").unwrap().contains(words), "{q}");
    }
    // The rows up to the limit were written and stay (other imports may
    // use their contacts by then), each with its outcome; none after.
    assert_eq!(app.count(collections::CONTACTS, doc! {}).await, 5);
    assert_eq!(
        app.count(collections::CONTACTS, doc! { "email": "r5@x.co" })
            .await,
        0
    );
    let q = app.queue(too_many).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 5, "{q}");
    app.cleanup().await;
}

/// A resumed `update` import does not write again a batch whose outcomes
/// its earlier run stored: another import's later update of the contact
/// stays, and the line's outcome is the first run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_update_import_keeps_what_another_import_changed_since() {
    let mut app = TestApp::new().await;
    let existing = ObjectId::new();
    app.coll(collections::CONTACTS)
        .insert_one(doc! { "_id": existing, "account_id": app.account_id, "email": "old@x.co", "phone": "0" })
        .await
        .unwrap();
    app.spawn_daemon();
    let mapping = [("Email", "email"), ("Phone", "phone")];
    let first = app
        .enqueue_with(
            "a.csv",
            b"Email,Phone\nold@x.co,111\n",
            &mapping,
            contacts(Some("update")),
        )
        .await;
    app.wait_completed(first, LONG).await;
    let second = app
        .enqueue_with(
            "b.csv",
            b"Email,Phone\nOLD@x.co,222\n",
            &mapping,
            contacts(Some("update")),
        )
        .await;
    app.wait_completed(second, LONG).await;
    app.replay_from_start(first).await;
    let q = app.wait_completed(first, LONG).await;
    assert_eq!(counts(&q), [0, 1, 0, 0], "{q}");
    assert_eq!(
        contact(&app, "old@x.co").await.get_str("phone").unwrap(),
        "222"
    );
    assert_eq!(
        outcomes::line_outcome(&app.db, first, 2).await.unwrap(),
        Some(LineOutcome::Updated { id: existing })
    );
    app.cleanup().await;
}

/// A resumed `update` import replays the batches after its checkpoint:
/// neither the line that created a contact nor an older update may write
/// over what a newer line of the import set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_update_batch_never_writes_an_older_line_over_a_newer_one() {
    let app = TestApp::new().await;
    let spec = app.spec(
        importd::domain::RecordKind::Contacts,
        importd::domain::DuplicateStrategy::Update,
    );
    let existing = ObjectId::new();
    app.coll(collections::CONTACTS)
        .insert_one(doc! { "_id": existing, "account_id": app.account_id, "email": "old@x.co" })
        .await
        .unwrap();
    let writer = ContactWriter::new(app.coll(collections::CONTACTS), &spec);
    let row = |line, email: &str, phone: &str| MappedContact {
        line,
        email: email.into(),
        phone: Some(phone.into()),
        ..MappedContact::default()
    };
    let first = [row(2, "new@x.co", "111"), row(3, "old@x.co", "111")];
    let second = [row(1500, "new@x.co", "222"), row(1501, "old@x.co", "222")];
    let created = contact_id(&spec.queue_id, 2).unwrap();
    assert_eq!(
        writer.write(&first).await.unwrap(),
        [ContactWrite::Created, ContactWrite::Updated(existing)]
    );
    writer.write(&second).await.unwrap();
    // The first batch again, as after a crash before its checkpoint.
    assert_eq!(
        writer.write(&first).await.unwrap(),
        [
            ContactWrite::AlreadyImported,
            ContactWrite::Superseded(existing)
        ]
    );
    for email in ["new@x.co", "old@x.co"] {
        let c = contact(&app, email).await;
        assert_eq!(c.get_str("phone").unwrap(), "222", "{c}");
    }
    // Another import updates the contact since: the first batch written
    // again still knows its lines were applied (the contact keeps its last
    // updates), and the other import's values stay.
    let other = ContactWriter::new(
        app.coll(collections::CONTACTS),
        &app.spec(
            importd::domain::RecordKind::Contacts,
            importd::domain::DuplicateStrategy::Update,
        ),
    );
    other.write(&[row(2, "old@x.co", "333")]).await.unwrap();
    assert_eq!(
        writer.write(&second).await.unwrap(),
        [
            ContactWrite::Superseded(created),
            ContactWrite::Superseded(existing)
        ]
    );
    let c = contact(&app, "old@x.co").await;
    assert_eq!(c.get_str("phone").unwrap(), "333", "{c}");
    assert_eq!(
        contact(&app, "new@x.co")
            .await
            .get_object_id("_id")
            .unwrap(),
        created
    );
    app.cleanup().await;
}

/// A batch written again after its images were stored but before its
/// update applied (a failed command, a crash): the first image stands, and
/// takes the time the update now stamps, so an undo still finds the
/// record as the line left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_again_keeps_the_first_image_with_the_time_it_stamps() {
    let app = TestApp::new().await;
    let spec = app.spec(
        importd::domain::RecordKind::Contacts,
        importd::domain::DuplicateStrategy::Update,
    );
    let existing = ObjectId::new();
    app.coll(collections::CONTACTS)
        .insert_one(doc! { "_id": existing, "account_id": app.account_id, "email": "old@x.co", "phone": "000" })
        .await
        .unwrap();
    // The first attempt's image, stored before its update failed.
    let mut set = bson::RawDocumentBuf::new();
    set.append("phone", "111");
    set.append("updated_at", bson::DateTime::from_millis(1_000));
    let record = doc! { "_id": existing, "phone": "000" };
    let mut first = befores::image(spec.queue_id, 2, existing, &record, &set).unwrap();
    first.insert("refused", true);
    let images = app.db.collection(befores::COLLECTION);
    befores::store(&images, &[first]).await.unwrap();
    let writer = ContactWriter::new(app.coll(collections::CONTACTS), &spec);
    let row = MappedContact {
        line: 2,
        email: "old@x.co".into(),
        phone: Some("111".into()),
        ..MappedContact::default()
    };
    assert_eq!(
        writer.write(&[row]).await.unwrap(),
        [ContactWrite::Updated(existing)]
    );
    let c = contact(&app, "old@x.co").await;
    let stored = app
        .coll(befores::COLLECTION)
        .find_one(doc! { "record_id": existing })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.get_datetime("written_at").unwrap(),
        c.get_datetime("updated_at").unwrap()
    );
    assert!(stored.get("refused").is_none(), "{stored}");
    let guard = befores::guard(&stored).unwrap();
    assert_eq!(app.count(collections::CONTACTS, guard).await, 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_another_unique_index_refuses_fails_naming_the_reason() {
    let mut app = TestApp::new().await;
    // The CRM's own unique index on phone numbers, beside importd's on
    // emails: the insert is refused, yet no contact has the line's email.
    app.db
        .run_command(doc! {
            "createIndexes": collections::CONTACTS,
            "indexes": [{
                "key": { "account_id": 1, "phone": 1 }, "name": "crm_phone", "unique": true,
                "partialFilterExpression": { "phone": { "$type": "string" } },
            }],
        })
        .await
        .unwrap();
    app.coll(collections::CONTACTS)
        .insert_one(doc! { "account_id": app.account_id, "email": "pat@x.co", "phone": "555" })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Email,Phone\nnew@x.co,555\nok@x.co,556\n";
    let id = app
        .enqueue_with(
            "people.csv",
            csv.as_bytes(),
            &[("Email", "email"), ("Phone", "phone")],
            contacts(None),
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(counts(&q), [1, 0, 0, 1], "{q}");
    match outcomes::line_outcome(&app.db, id, 2).await.unwrap() {
        Some(LineOutcome::Failed(f)) => {
            assert!(
                f.message.contains("unique field other than the email"),
                "{f:?}"
            )
        }
        other => panic!("line 2: {other:?}"),
    }
    assert_eq!(get_i64(&contact(&app, "ok@x.co").await, "import.line"), 3);
    app.cleanup().await;
}
