//! Retention: `retention.days` after an import ended, its per-line data is
//! purged and its summary, totals and records stay.

use std::num::NonZeroU32;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, doc};
use importd::domain::collections;
use importd::write::befores;

use crate::helpers::{TestApp, get_i64, test_settings};

const LONG: Duration = Duration::from_secs(120);
const DAY_MS: i64 = 86_400_000;

fn days_ago(days: i64) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() - days * DAY_MS)
}

async fn wait_told(app: &TestApp, id: ObjectId) -> Document {
    app.wait_queue(id, LONG, "told", |q| {
        q.get_document("notify")
            .and_then(|n| n.get_str("state"))
            .is_ok_and(|s| s == "sent")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_imports_line_data_is_purged_and_its_summary_stays() {
    let mut settings = test_settings();
    settings.retention.days = NonZeroU32::new(30);
    let mut app = TestApp::with_settings(settings).await;
    let daemon = app.spawn_daemon();
    let mapping = [("Name", "name"), ("Value", "value")];
    // An import with failed lines (a report, quoted failures), then an
    // `update` import of the same names (before images).
    let csv = b"Name,Value\nAcme,5\nBeta,oops\nGamma,7\n";
    let old = app.enqueue_csv("old.csv", csv, &mapping).await;
    app.wait_completed(old, LONG).await;
    let updated = app
        .enqueue_with(
            "again.csv",
            b"Name,Value\nAcme,6\n",
            &mapping,
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } },
        )
        .await;
    app.wait_completed(updated, LONG).await;
    let recent = app.enqueue_csv("recent.csv", csv, &mapping).await;
    app.wait_completed(recent, LONG).await;
    let recent_update = app
        .enqueue_with(
            "recent-again.csv",
            b"Name,Value\nGamma,8\n",
            &mapping,
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } },
        )
        .await;
    app.wait_completed(recent_update, LONG).await;
    for id in [old, updated, recent, recent_update] {
        wait_told(&app, id).await;
    }
    for id in [updated, recent_update] {
        assert_eq!(
            app.count(befores::COLLECTION, doc! { "queue_id": id })
                .await,
            1
        );
    }
    let report_key = app
        .queue(old)
        .await
        .get_document("report")
        .unwrap()
        .get_str("key")
        .unwrap()
        .to_owned();
    app.services
        .storage
        .head(&report_key)
        .await
        .expect("report stored");

    // Two of them ended 31 days ago; one import from before retention
    // existed (no `retention` field) ended 40 days ago.
    for id in [old, updated] {
        app.queues()
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "completed_at": days_ago(31) } },
            )
            .await
            .unwrap();
    }
    let legacy = ObjectId::new();
    app.queues()
        .insert_one(doc! {
            "_id": legacy, "source": "deals", "status": "completed",
            "account_id": app.account_id, "completed_at": days_ago(40),
        })
        .await
        .unwrap();
    app.coll(collections::IMPORT_LINES)
        .insert_one(doc! { "queue_id": legacy, "first_line": 2_i64, "failed_count": 0_i64 })
        .await
        .unwrap();

    assert_eq!(daemon.sweep_retention().await.unwrap(), 3);
    assert_eq!(daemon.sweep_retention().await.unwrap(), 0, "done once");

    for id in [old, updated, legacy] {
        assert_eq!(
            app.count(collections::IMPORT_LINES, doc! { "queue_id": id })
                .await,
            0
        );
        let r = app
            .queue(id)
            .await
            .get_document("retention")
            .unwrap()
            .clone();
        assert_eq!(r.get_str("state"), Ok("purged"), "{r}");
        assert_eq!(get_i64(&r, "days"), 30);
        assert!(
            r.get("owner").is_none() && r.get("expires_at").is_none(),
            "{r}"
        );
    }
    assert_eq!(
        app.count(befores::COLLECTION, doc! { "queue_id": updated })
            .await,
        0
    );
    assert_eq!(
        app.count(befores::COLLECTION, doc! { "queue_id": recent_update })
            .await,
        1,
        "a recent import keeps its before images"
    );
    let summary = app.summary(old).await;
    assert_eq!(summary.get_array("logs").unwrap().len(), 0);
    assert_eq!(get_i64(&summary, "total_records_added"), 2, "totals stay");
    assert_eq!(get_i64(&summary, "total_errors"), 1);
    assert!(matches!(
        app.services.storage.head(&report_key).await,
        Err(importd::fetch::Error::NotFound)
    ));
    assert_eq!(
        app.queue(old)
            .await
            .get_document("report")
            .unwrap()
            .get_bool("deleted"),
        Ok(true)
    );
    // The records stay.
    assert_eq!(
        app.count(collections::DEALS, doc! { "import.queue_id": old })
            .await,
        2
    );
    // The recent import keeps everything.
    assert!(
        app.count(collections::IMPORT_LINES, doc! { "queue_id": recent })
            .await
            > 0
    );
    assert_eq!(
        app.summary(recent).await.get_array("logs").unwrap().len(),
        1
    );
    let r = app.queue(recent).await;
    assert_eq!(
        r.get_document("retention").unwrap().get_str("state"),
        Ok("kept")
    );

    // Support is told why the lines are gone.
    let (code, out, _) = app.cli(&["status", &old.to_hex()]);
    assert_eq!(code, 0);
    assert!(out.contains("purged:") && out.contains("30 days"), "{out}");
    let (code, _, err) = app.cli(&["logs", &old.to_hex()]);
    assert_eq!(code, 1);
    assert!(err.contains("were purged"), "{err}");
    let (code, _, err) = app.cli(&["logs", &old.to_hex(), "--line", "3"]);
    assert_eq!(code, 1);
    assert!(err.contains("were purged"), "{err}");
    // An undo has nothing left to put updates back from: refused.
    let (code, out, _) = app.cli(&["undo", &updated.to_hex()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused: its per-line records were purged"),
        "{out}"
    );
    assert_eq!(
        app.coll(collections::DEALS)
            .find_one(doc! { "name": "Acme", "import.queue_id": old })
            .await
            .unwrap()
            .unwrap()
            .get_f64("value"),
        Ok(6.0),
        "the update stays"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_whose_undo_or_email_is_under_way_is_not_purged() {
    let mut settings = test_settings();
    settings.retention.days = NonZeroU32::new(1);
    let app = TestApp::with_settings(settings).await;
    // No daemon runs: the states stay as written.
    let mut ids = Vec::new();
    let cases = [
        (doc! { "undo_requested": true }, "kept"),
        (doc! { "notify": { "state": "pending" } }, "kept"),
        (doc! { "notify": { "state": "sending" } }, "kept"),
        (doc! { "webhook": { "state": "pending" } }, "kept"),
        (
            doc! { "notify": { "state": "sent" }, "webhook": { "state": "sending" } },
            "kept",
        ),
        // Not final (made pending again): not touched.
        (doc! { "status": "pending" }, "kept"),
        // Another daemon purges it now.
        (
            doc! { "retention": { "state": "purging", "owner": "other", "expires_at": days_ago(-1) } },
            "purging",
        ),
        // An undo done, its flag set again since (no undo takes it): purged.
        (
            doc! { "undo_requested": true, "undo": { "state": "done", "finished_at": days_ago(1) } },
            "purged",
        ),
        // Nothing under way: purged.
        (doc! { "notify": { "state": "sent" } }, "purged"),
        // Its purger died (lease expired): purged.
        (
            doc! { "retention": { "state": "purging", "owner": "dead", "expires_at": days_ago(1) } },
            "purged",
        ),
        // Ended before retention existed (no `retention`): purged.
        (doc! { "retention": Bson::Null }, "purged"),
    ];
    for (extra, _) in &cases {
        let id = ObjectId::new();
        let mut q = doc! {
            "_id": id, "source": "deals", "status": "completed",
            "completed_at": days_ago(2), "retention": { "state": "kept" },
        };
        q.extend(extra.clone());
        if q.get("retention") == Some(&Bson::Null) {
            q.remove("retention");
        }
        app.queues().insert_one(q).await.unwrap();
        ids.push(id);
    }
    let claimer = importd::claim::Claimer::new(&app.db, "test-sweeper", Duration::from_secs(60));
    let purged = importd::retention::sweep(
        &app.db,
        &app.services.storage,
        &claimer,
        NonZeroU32::new(1).unwrap(),
        10,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(purged, 4, "only the imports with nothing under way");
    for (id, (extra, expected)) in ids.into_iter().zip(cases) {
        let q = app.queue(id).await;
        let r = q.get_document("retention").map(|r| r.get_str("state"));
        assert_eq!(r, Ok(Ok(expected)), "{extra}: {q}");
    }
    app.cleanup().await;
}

/// The daemon sweeps by itself: once at start, then every
/// `retention.sweep_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_daemon_purges_what_comes_due() {
    let mut settings = test_settings();
    settings.retention.days = NonZeroU32::new(7);
    settings.retention.sweep_interval = Duration::from_secs(1);
    let mut app = TestApp::with_settings(settings).await;
    let old = ObjectId::new();
    app.queues()
        .insert_one(doc! {
            "_id": old, "source": "deals", "status": "completed",
            "completed_at": days_ago(8), "notify": { "state": "sent" },
        })
        .await
        .unwrap();
    app.spawn_daemon();
    app.wait_queue(old, LONG, "purged at start", |q| {
        q.get_document("retention")
            .is_ok_and(|r| r.get_str("state") == Ok("purged"))
    })
    .await;
    // One that comes due while the daemon runs.
    let later = ObjectId::new();
    app.queues()
        .insert_one(doc! {
            "_id": later, "source": "deals", "status": "completed",
            "completed_at": days_ago(9), "retention": { "state": "kept" },
        })
        .await
        .unwrap();
    app.wait_queue(later, LONG, "purged by a later sweep", |q| {
        q.get_document("retention")
            .is_ok_and(|r| r.get_str("state") == Ok("purged"))
    })
    .await;
    app.cleanup().await;
}
