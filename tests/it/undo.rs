//! Undo of a finished import (`importd undo ID`, or `undo_requested: true`
//! from the dashboard): the records it created are removed, what changed
//! since or cannot be taken back is kept and counted; resumable.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{DateTime, Document, doc};
use importd::claim::Claimer;
use importd::domain::{collections, deal_id};

use crate::helpers::{SmtpCatcher, TestApp, get_i64, settings_with_smtp, test_settings};

const LONG: Duration = Duration::from_secs(120);

async fn wait_undone(app: &TestApp, id: ObjectId) -> Document {
    app.wait_queue(id, LONG, "undone", |q| {
        q.get_document("undo")
            .is_ok_and(|u| u.get_str("state") == Ok("done"))
    })
    .await
}

/// Leaves the undo of `id` as a holder that died would: running, its
/// lease expired, with the checkpoint and counts in `progress`.
async fn leave_dead_undo(app: &TestApp, id: ObjectId, progress: Document) {
    let mut undo = doc! {
        "state": "running", "owner": "a-dead-daemon", "attempts": 1_i64,
        "expires_at": DateTime::from_millis(0),
    };
    undo.extend(progress);
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "undo_requested": true, "undo": undo } },
        )
        .await
        .unwrap();
}

fn names(deals: &[Document]) -> Vec<&str> {
    let mut n: Vec<&str> = deals.iter().map(|d| d.get_str("name").unwrap()).collect();
    n.sort_unstable();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_removes_what_the_import_created_and_keeps_what_changed_since() {
    let smtp = SmtpCatcher::start().await;
    let mut app = TestApp::with_settings(settings_with_smtp(smtp.port)).await;
    // The CRM's own deals, which the import updates: Acme (twice) is put
    // back as it was; Stark, edited since, is not.
    let (acme, stark) = (ObjectId::new(), ObjectId::new());
    let acme_before = doc! {
        "_id": acme, "name": "Acme", "value": 1.0, "additional_info": { "note": "crm" },
        "account_id": app.account_id, "pipeline_id": app.pipeline_id,
    };
    app.coll(collections::DEALS)
        .insert_many([
            acme_before.clone(),
            doc! {
                "_id": stark, "name": "Stark", "value": 2.0,
                "account_id": app.account_id, "pipeline_id": app.pipeline_id,
            },
        ])
        .await
        .unwrap();
    app.spawn_daemon();
    // Line 7 updates the deal line 3 creates: gone with it, not counted as
    // an update that cannot be taken back.
    let csv = "Deal Name,Value,Stage\n\
               Acme,100,Won\n\
               Globex,200,Brand New\n\
               Initech,300,Won\n\
               Hooli,oops,Won\n\
               Umbrella,400,Won\n\
               globex,250,Brand New\n\
               Wayne,500,Won\n\
               Stark,600,Won\n\
               ACME,150,Won\n";
    let update = doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } };
    let id = app
        .enqueue_with(
            "undo.csv",
            csv.as_bytes(),
            &[
                ("Deal Name", "name"),
                ("Value", "value"),
                ("Stage", "stage_id"),
            ],
            update.clone(),
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 4, "{q}");
    assert_eq!(get_i64(&q, "progress.updated_rows"), 4, "{q}");
    let befores = app
        .find_all("import_befores", doc! { "queue_id": id })
        .await;
    assert_eq!(befores.len(), 4, "one before image per updated line");
    // While the import ran (a second after its insert, long before the
    // import ended), a user edited Wayne.
    let wayne = deal_id(&id, 8).unwrap();
    let inserted = app
        .coll(collections::DEALS)
        .find_one(doc! { "_id": wayne })
        .await
        .unwrap()
        .unwrap()
        .get_datetime("created_at")
        .unwrap()
        .timestamp_millis();
    app.coll(collections::DEALS)
        .update_one(
            doc! { "_id": wayne },
            doc! { "$set": { "value": 550.0, "updated_at": DateTime::from_millis(inserted + 1_000) } },
        )
        .await
        .unwrap();
    // Since the import: a user edits Umbrella and Stark, adds a deal in
    // "Won", and a second import updates Initech (at once: within the
    // clock slack).
    let later = DateTime::from_millis(DateTime::now().timestamp_millis() + 600_000);
    app.coll(collections::DEALS)
        .update_one(
            doc! { "_id": stark },
            doc! { "$set": { "value": 650.0, "updated_at": later } },
        )
        .await
        .unwrap();
    app.coll(collections::DEALS)
        .update_one(
            doc! { "_id": deal_id(&id, 6).unwrap() },
            doc! { "$set": { "value": 450.0, "updated_at": later } },
        )
        .await
        .unwrap();
    let won = app
        .coll(collections::PIPELINE_STAGES)
        .find_one(doc! { "pipeline_id": app.pipeline_id, "name": "won" })
        .await
        .unwrap()
        .unwrap();
    app.coll(collections::DEALS)
        .insert_one(doc! {
            "name": "Manual", "account_id": app.account_id, "pipeline_id": app.pipeline_id,
            "stage_id": won.get_object_id("_id").unwrap(),
        })
        .await
        .unwrap();
    let second = app
        .enqueue_with(
            "fix.csv",
            b"Deal Name,Value\nInitech,350\n",
            &[("Deal Name", "name"), ("Value", "value")],
            update,
        )
        .await;
    let q2 = app.wait_completed(second, LONG).await;
    assert_eq!(get_i64(&q2, "progress.updated_rows"), 1, "{q2}");

    let (code, out, err) = app.cli(&["undo", &id.to_hex()]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "removed: 1 deals the import created",
        "kept: 3 deals it created that changed since",
        "reverted: 2 updates of existing deals",
        "not reverted: 1 updates of existing deals (changed since)",
        "stages removed: Brand New",
        "stages kept (in use): Won",
    ] {
        assert!(out.contains(line), "no `{line}` in:\n{out}");
    }

    let deals = app.find_all(collections::DEALS, doc! {}).await;
    assert_eq!(
        names(&deals),
        ["Acme", "Initech", "Manual", "Stark", "Umbrella", "Wayne"]
    );
    let find = |id| {
        deals
            .iter()
            .find(|d| d.get_object_id("_id") == Ok(id))
            .unwrap()
    };
    // As the CRM had it before both of the import's lines: the fields they
    // set and the import's marks (stage, times, last_import) gone.
    assert_eq!(find(acme), &acme_before, "Acme put back");
    assert_eq!(find(stark).get_f64("value").unwrap(), 650.0, "Stark kept");
    let stages = app.find_all(collections::PIPELINE_STAGES, doc! {}).await;
    assert_eq!(stages.len(), 1);
    assert_eq!(stages[0].get_str("name").unwrap(), "won");

    let q = app.queue(id).await;
    assert_eq!(
        q.get_str("status").unwrap(),
        "completed",
        "the import's own state stays"
    );
    let u = q.get_document("undo").unwrap();
    assert_eq!(u.get_str("state").unwrap(), "done", "{q}");
    assert_eq!(get_i64(u, "removed"), 1);
    assert_eq!(get_i64(u, "kept_changed"), 3);
    assert_eq!(get_i64(u, "updates_not_reverted"), 1);
    assert_eq!(get_i64(u, "updates_reverted"), 2);
    assert!(u.get("owner").is_none() && u.get("expires_at").is_none());
    assert!(
        q.get("undo_requested").is_none(),
        "the answered request leaves the claim's index"
    );
    let summary = app.summary(id).await;
    assert_eq!(get_i64(&summary, "undo.removed"), 1, "{summary}");
    let (_, status, _) = app.cli(&["status", &id.to_hex()]);
    assert!(
        status.contains(
            "undo:     done: 1 removed, 3 kept (changed since), 2 updates reverted, 1 not"
        ),
        "{status}"
    );

    // The user is told, once (after the two imports' summaries).
    let mails = smtp.wait_for(3, LONG).await;
    let undone: Vec<_> = mails
        .iter()
        .filter(|m| m.subject.starts_with("Deal import undone"))
        .collect();
    assert_eq!(undone.len(), 1, "{mails:?}");
    assert_eq!(
        undone[0].subject,
        "Deal import undone: 1 deal removed (undo.csv)"
    );
    assert_eq!(undone[0].to, "Olive <owner@example.com>");
    assert!(
        undone[0]
            .text
            .contains("Kept: 3 deals the import created, changed since"),
        "{}",
        undone[0].text
    );
    assert_eq!(
        undone[0].message_id,
        format!("<import-undo.{}@importd>", id.to_hex())
    );
    let q = app
        .wait_queue(id, LONG, "told", |q| {
            q.get_document("undo_notify")
                .is_ok_and(|n| n.get_str("state") == Ok("sent"))
        })
        .await;
    assert!(
        q.get_document("undo_notify")
            .unwrap()
            .get("owner")
            .is_none()
    );

    // Again: the recorded result, nothing more removed.
    let (code, again, err) = app.cli(&["undo", &id.to_hex()]);
    assert_eq!(code, 0, "{err}");
    assert!(again.contains("removed: 1 deals"), "{again}");
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 6);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_request_is_undone_by_a_daemon() {
    let mut app = TestApp::new().await;
    let existing = ObjectId::new();
    app.coll(collections::CONTACTS)
        .insert_one(doc! { "_id": existing, "account_id": app.account_id, "email": "old@x.co" })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Email,Name\nold@x.co,Old\nann@x.co,Ann\nbob@x.co,Bob\nann@x.co,Ann again\n";
    let id = app
        .enqueue_with(
            "c.csv",
            csv.as_bytes(),
            &[("Email", "email"), ("Name", "name")],
            doc! { "source": "contacts" },
        )
        .await;
    app.wait_completed(id, LONG).await;
    assert_eq!(app.count(collections::CONTACTS, doc! {}).await, 3);
    // A deals import links Bob since: Bob stays.
    let deals = app
        .enqueue_with(
            "d.csv",
            b"Deal Name,Contact Email\nBig deal,bob@x.co\n",
            &[("Deal Name", "name"), ("Contact Email", "contact_email")],
            doc! { "additional_data": { "pipeline_id": app.pipeline_id } },
        )
        .await;
    app.wait_completed(deals, LONG).await;
    // A malformed request of another import (`undo: null`) is passed over
    // rather than failing every claim.
    app.queues()
        .insert_one(doc! {
            "source": "deals", "status": "completed", "undo_requested": true, "undo": null,
            "completed_at": DateTime::now(),
        })
        .await
        .unwrap();
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "undo_requested": true } },
        )
        .await
        .unwrap();
    let q = wait_undone(&app, id).await;
    let u = q.get_document("undo").unwrap();
    assert_eq!(get_i64(u, "removed"), 1, "{q}");
    assert_eq!(get_i64(u, "kept_linked"), 1, "{q}");
    let left = app.find_all(collections::CONTACTS, doc! {}).await;
    let mut emails: Vec<&str> = left.iter().map(|c| c.get_str("email").unwrap()).collect();
    emails.sort_unstable();
    assert_eq!(emails, ["bob@x.co", "old@x.co"]);
    assert!(left.iter().any(|c| c.get_object_id("_id") == Ok(existing)));
    app.cleanup().await;
}

/// A contacts import under `update`: the existing contact two lines
/// updated is put back as it was; the one it created is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_puts_back_the_contacts_an_update_import_changed() {
    let mut app = TestApp::new().await;
    let before = doc! {
        "_id": ObjectId::new(), "account_id": app.account_id, "email": "old@x.co",
        "first_name": "Olga", "phone": "111",
    };
    app.coll(collections::CONTACTS)
        .insert_one(before.clone())
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Email,Name,Company\nold@x.co,Olivia,Acme\nnew@x.co,Ned,Initech\nOLD@x.co,,Globex\n";
    let id = app
        .enqueue_with(
            "c.csv",
            csv.as_bytes(),
            &[("Email", "email"), ("Name", "name"), ("Company", "company")],
            doc! { "source": "contacts", "additional_data": { "duplicate_strategy": "update" } },
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.updated_rows"), 2, "{q}");
    let changed = app
        .coll(collections::CONTACTS)
        .find_one(doc! { "email": "old@x.co" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.get_str("company").unwrap(), "Globex", "{changed}");
    let (code, out, err) = app.cli(&["undo", &id.to_hex()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed: 1 contacts"), "{out}");
    assert!(
        out.contains("reverted: 2 updates of existing contacts"),
        "{out}"
    );
    assert!(!out.contains("not reverted"), "{out}");
    let left = app.find_all(collections::CONTACTS, doc! {}).await;
    assert_eq!(left, [before], "put back exactly as it was");
    assert_eq!(
        app.count(importd::write::befores::COLLECTION, doc! { "queue_id": id })
            .await,
        0,
        "before images go once put back"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_left_by_a_dead_holder_resumes_with_exact_counts() {
    let mut settings = test_settings();
    settings.import.batch_size = NonZeroUsize::new(1_000).unwrap();
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    let mut csv = String::from("Name,Value\n");
    for i in 0..2_500 {
        writeln!(csv, "Deal {i},{i}").unwrap();
    }
    let id = app
        .enqueue_csv(
            "big.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Value", "value")],
        )
        .await;
    app.wait_completed(id, LONG).await;
    // A holder that removed the first batch (lines 2-1001), saved its
    // checkpoint, removed part of the second batch, and died.
    let first_batch =
        doc! { "_id": { "$gte": deal_id(&id, 2).unwrap(), "$lte": deal_id(&id, 1500).unwrap() } };
    app.coll(collections::DEALS)
        .delete_many(first_batch)
        .await
        .unwrap();
    leave_dead_undo(
        &app,
        id,
        doc! { "next_line": 1002_i64, "imported": 1000_i64, "kept_changed": 0_i64 },
    )
    .await;
    let q = wait_undone(&app, id).await;
    let u = q.get_document("undo").unwrap();
    assert_eq!(get_i64(u, "removed"), 2_500, "{q}");
    assert_eq!(get_i64(u, "kept_changed"), 0, "{q}");
    assert_eq!(get_i64(u, "attempts"), 2, "{q}");
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 0);
    app.cleanup().await;
}

/// An undo whose holder died while putting updates back: it had recorded
/// line 5's image, then put back lines 4, 3 and 2 (Acme twice) and
/// stopped. The next holder counts them (their records hold what they, or
/// a later image of the record, put back): every record as the import
/// found it, counts exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_stopped_while_putting_updates_back_resumes_exactly() {
    let mut app = TestApp::new().await;
    let crm = |name: &str, value: f64| {
        doc! {
            "_id": ObjectId::new(), "name": name, "value": value,
            "account_id": app.account_id, "pipeline_id": app.pipeline_id,
        }
    };
    let before = [crm("Acme", 1.0), crm("Bolt", 2.0), crm("Core", 3.0)];
    app.coll(collections::DEALS)
        .insert_many(before.clone())
        .await
        .unwrap();
    app.spawn_daemon();
    let id = app
        .enqueue_with(
            "u.csv",
            b"Deal Name,Value\nAcme,10\nBolt,20\nacme,11\nCore,30\n",
            &[("Deal Name", "name"), ("Value", "value")],
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } },
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.updated_rows"), 4, "{q}");
    let image = |line: u64| {
        let app = &app;
        async move {
            app.coll("import_befores")
                .find_one(doc! { "_id": deal_id(&id, line).unwrap() })
                .await
                .unwrap()
                .unwrap()
        }
    };
    // The dead holder's work: every line put back, only line 5 recorded.
    for line in [5, 4, 3, 2] {
        let img = image(line).await;
        let r = app
            .coll(collections::DEALS)
            .update_one(
                importd::write::befores::guard(&img).unwrap(),
                importd::write::befores::restore(&img),
            )
            .await
            .unwrap();
        assert_eq!(r.matched_count, 1, "line {line}");
    }
    leave_dead_undo(
        &app,
        id,
        doc! { "next_line": 6_i64, "imported": 0_i64, "kept_changed": 0_i64,
        "updates_not_reverted": 4_i64, "updates_reverted": 1_i64,
        "revert_below_line": 5_i64, },
    )
    .await;
    let q = wait_undone(&app, id).await;
    let u = q.get_document("undo").unwrap();
    assert_eq!(get_i64(u, "updates_reverted"), 4, "{q}");
    assert_eq!(get_i64(u, "updates_not_reverted"), 0, "{q}");
    let mut now = app.find_all(collections::DEALS, doc! {}).await;
    now.sort_by_key(|d| d.get_str("name").unwrap().to_owned());
    assert_eq!(now, before, "every record as the import found it");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_has_nothing_to_undo() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let id = app
        .enqueue_with(
            "dry.csv",
            b"Name\nAcme\n",
            &[("Name", "name")],
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "dry_run": true } },
        )
        .await;
    app.wait_completed(id, LONG).await;
    let (code, out, _) = app.cli(&["undo", &id.to_hex()]);
    assert_eq!(code, 1);
    assert!(out.contains("refused: a dry run writes nothing"), "{out}");
    let (code, _, err) = app.cli(&["undo", &ObjectId::new().to_hex()]);
    assert_eq!(code, 1);
    assert!(err.contains("no import"), "{err}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undoing_a_running_import_cancels_it_first_then_removes_everything_it_wrote() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let mut csv = String::from("Name,Value,Stage\n");
    for i in 0..300_000 {
        writeln!(csv, "Deal {i},{i},Stage {}", i % 4).unwrap();
    }
    let id = app
        .enqueue_csv(
            "running.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Value", "value"), ("Stage", "stage_id")],
        )
        .await;
    app.wait_queue(id, LONG, "progressing", |q| {
        q.get_document("progress")
            .is_ok_and(|p| p.get_i64("imported_rows").unwrap_or(0) >= 5_000)
    })
    .await;
    let (code, out, err) = app.cli(&["undo", &id.to_hex(), "--wait", "120"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("cancelling it first"), "{err}");
    let q = app.queue(id).await;
    assert_eq!(q.get_str("status").unwrap(), "cancelled", "{q}");
    let imported = get_i64(&q, "progress.imported_rows");
    assert!(imported > 0 && imported < 300_000, "{q}");
    assert_eq!(
        get_i64(q.get_document("undo").unwrap(), "removed"),
        imported,
        "{q}"
    );
    assert!(out.contains(&format!("removed: {imported} deals")), "{out}");
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 0);
    assert_eq!(app.count(collections::PIPELINE_STAGES, doc! {}).await, 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_given_back_after_an_error_pauses_before_the_next_claim() {
    let app = TestApp::new().await;
    let id = ObjectId::new();
    app.queues()
        .insert_one(doc! {
            "_id": id, "source": "deals", "status": "completed",
            "account_id": app.account_id, "undo_requested": true,
        })
        .await
        .unwrap();
    let claimer = Claimer::new(&app.db, "a", Duration::from_secs(60));
    let other = Claimer::new(&app.db, "b", Duration::from_secs(60));
    for (attempt, pause) in [(1, 5), (2, 10), (3, 20)] {
        // Each round ends its pause early by hand, as time would.
        app.queues()
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "undo.expires_at": DateTime::from_millis(0) } },
            )
            .await
            .unwrap();
        let lease = claimer.claim_undo(Some(id)).await.unwrap().unwrap();
        assert_eq!(lease.attempt, attempt);
        let before = DateTime::now().timestamp_millis();
        lease.release_after_error("a database error").await.unwrap();
        assert!(other.claim_undo(None).await.unwrap().is_none());
        let u = app.queue(id).await.get_document("undo").unwrap().clone();
        assert_eq!(u.get_str("state"), Ok("pending"));
        assert!(!u.contains_key("owner"), "{u}");
        let e = u.get_document("last_error").unwrap();
        assert_eq!(e.get_str("message"), Ok("a database error"));
        assert_eq!(get_i64(e, "attempt"), attempt);
        assert_eq!(get_i64(&u, "error_releases"), attempt);
        let until = u.get_datetime("expires_at").unwrap().timestamp_millis() - before;
        assert!(
            (pause * 1_000 - 500..=pause * 1_000 + 2_000).contains(&until),
            "attempt {attempt}: {until} ms"
        );
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_that_keeps_failing_gives_up_with_its_last_error() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let id = app
        .enqueue_csv("x.csv", b"Name\nAcme\n", &[("Name", "name")])
        .await;
    app.wait_completed(id, LONG).await;
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": {
                "undo_requested": true,
                "undo": {
                    // Shutdown releases besides: not counted.
                    "state": "pending", "attempts": importd::undo::MAX_ATTEMPTS + 3,
                    "error_releases": importd::undo::MAX_ATTEMPTS,
                    "last_error": { "message": "a database error", "attempt": 12_i64 },
                },
            } },
        )
        .await
        .unwrap();
    let q = app
        .wait_queue(id, LONG, "with the undo ended", |q| {
            q.get_document("undo")
                .is_ok_and(|u| u.get_datetime("finished_at").is_ok())
        })
        .await;
    let u = q.get_document("undo").unwrap();
    assert_eq!(u.get_str("state"), Ok("refused"), "{u}");
    let reason = u.get_str("reason").unwrap();
    assert!(
        reason.contains("10 attempts") && reason.contains("a database error"),
        "{reason}"
    );
    app.cleanup().await;
}

/// A stage is removed, then checked again: one that an import resolved
/// meanwhile (its deal is written now) is put back as it was, same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_resolved_while_it_was_removed_is_put_back() {
    let app = TestApp::new().await;
    let queue_id = ObjectId::new();
    let stage = ObjectId::new();
    let stage_doc = doc! {
        "_id": stage, "account_id": app.account_id, "pipeline_id": app.pipeline_id,
        "name": "brand new", "label": "Brand New", "order": 1,
        "import": { "queue_id": queue_id },
    };
    let stages = app.coll(collections::PIPELINE_STAGES);
    stages.insert_one(&stage_doc).await.unwrap();
    app.coll(collections::DEALS)
        .insert_one(doc! {
            "name": "Raced", "account_id": app.account_id, "pipeline_id": app.pipeline_id,
            "stage_id": stage,
        })
        .await
        .unwrap();
    let gone =
        importd::undo::remove_stage(&app.db, app.account_id, app.pipeline_id, stage, queue_id)
            .await
            .unwrap();
    assert!(!gone);
    assert_eq!(
        stages.find_one(doc! { "_id": stage }).await.unwrap(),
        Some(stage_doc)
    );
    // Unused: removed.
    app.coll(collections::DEALS)
        .delete_many(doc! {})
        .await
        .unwrap();
    let gone =
        importd::undo::remove_stage(&app.db, app.account_id, app.pipeline_id, stage, queue_id)
            .await
            .unwrap();
    assert!(gone);
    assert_eq!(stages.count_documents(doc! {}).await.unwrap(), 0);
    app.cleanup().await;
}

/// A window of updates goes back in one command; when the database
/// refuses one restore (here a unique index created since, which the old
/// value would now break), the rest of the window still goes back, one by
/// one, and the counts say which did not: the refused image, and the
/// older image of the same record, which applies only after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_restore_leaves_one_record_and_the_window_goes_back() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let mapping = [("Name", "name"), ("Value", "value")];
    let first = app
        .enqueue_csv("first.csv", b"Name,Value\nA,1\nB,2\nC,3\n", &mapping)
        .await;
    app.wait_completed(first, LONG).await;
    let update = app
        .enqueue_with(
            "update.csv",
            b"Name,Value\nA,10\nB,20\nB,25\nC,30\n",
            &mapping,
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } },
        )
        .await;
    let q = app.wait_completed(update, LONG).await;
    assert_eq!(get_i64(&q, "progress.updated_rows"), 4, "{q}");
    // Since: a unique index on `value`, and another deal holding 20.
    let deals = app.coll(collections::DEALS);
    deals
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "value": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    deals
        .insert_one(doc! { "name": "Z", "value": 20.0, "account_id": app.account_id })
        .await
        .unwrap();
    let (code, out, err) = app.cli(&["undo", &update.to_hex()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("reverted: 2 updates of existing deals"),
        "{out}"
    );
    assert!(out.contains("not reverted: 2 updates"), "{out}");
    let value = |name: &'static str| {
        let deals = deals.clone();
        let id = first;
        async move {
            deals
                .find_one(doc! { "name": name, "import.queue_id": id })
                .await
                .unwrap()
                .unwrap()
                .get_f64("value")
                .unwrap()
        }
    };
    assert_eq!(value("A").await, 1.0);
    assert_eq!(
        value("B").await,
        25.0,
        "refused: left as the import left it"
    );
    assert_eq!(value("C").await, 3.0);
    app.cleanup().await;
}
