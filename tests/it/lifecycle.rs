//! Stopping an import: SIGTERM on the real binary (exit 0, lease released,
//! another daemon resumes without re-importing a line), cancellation, and
//! the attempts cap.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bson::doc;
use importd::domain::collections;

use crate::helpers::{TestApp, get_i64};

fn csv(rows: usize) -> String {
    let mut s = String::with_capacity(rows * 40);
    s.push_str("Name,Value,Stage\n");
    for i in 0..rows {
        writeln!(s, "Deal {i},{},Stage {}", i * 3, i % 5).unwrap();
    }
    s
}

const MAPPING: [(&str, &str); 3] = [("Name", "name"), ("Value", "value"), ("Stage", "stage_id")];

async fn wait_progress(app: &TestApp, id: bson::oid::ObjectId, rows: i64) -> bson::Document {
    app.wait_queue(id, Duration::from_secs(120), "progressing", |q| {
        q.get_document("progress")
            .is_ok_and(|p| p.get_i64("processed_rows").unwrap_or(0) >= rows)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_releases_and_another_daemon_resumes_without_rewriting() {
    let mut app = TestApp::new().await;
    const ROWS: usize = 400_000;
    let id = app
        .enqueue_csv("long.csv", csv(ROWS).as_bytes(), &MAPPING)
        .await;
    let mut daemon = app
        .binary(&["run"])
        .env("IMPORTD__IMPORT__PROGRESS_INTERVAL_MS", "50")
        .env("IMPORTD__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .spawn()
        .expect("daemon starts");
    wait_progress(&app, id, 20_000).await;
    let sent = Instant::now();
    // SIGTERM, as systemd sends it on stop.
    assert!(
        Command::new("kill")
            .arg("-TERM")
            .arg(daemon.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(st) = daemon.try_wait().unwrap() {
            break st;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(25),
            "daemon still running after the grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let q = app.queue(id).await;
    assert_eq!(
        q.get_str("status").unwrap(),
        "pending",
        "released at once: {q}"
    );
    assert!(q.get("lease").is_none());
    let released = *q.get_datetime("released_at").unwrap();
    let checkpoint = get_i64(&q, "checkpoint.line");
    assert!(checkpoint > 2, "a checkpoint was saved: {q}");
    assert_eq!(get_i64(&q, "shutdown_releases"), 1, "{q}");
    let imported_at_stop = get_i64(&q, "progress.imported_rows");
    assert!((imported_at_stop as usize) < ROWS, "stopped mid-import");

    app.spawn_daemon();
    let q = app.wait_completed(id, Duration::from_secs(300)).await;
    assert_eq!(get_i64(&q, "attempts"), 2);
    assert_eq!(get_i64(&q, "progress.imported_rows") as usize, ROWS);
    assert_eq!(app.count(collections::DEALS, doc! {}).await as usize, ROWS);
    // Batches before the checkpoint were not written again by the resumer
    // (the ones in flight at the signal finished before the release).
    let rewritten = app
        .count(
            collections::IMPORT_LINES,
            doc! { "queue_id": id, "last_line": { "$lt": checkpoint }, "written_at": { "$gt": released } },
        )
        .await;
    assert_eq!(
        rewritten, 0,
        "no batch before the checkpoint was written again"
    );
    let summary = app.summary(id).await;
    assert_eq!(get_i64(&summary, "total_records_added") as usize, ROWS);
    let (code, out, _) = app.cli(&["status", &id.to_hex()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("attempts: 2 claims, 1 counted towards the limit"),
        "{out}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_at_the_next_batch_and_keeps_what_was_imported() {
    let mut settings = crate::helpers::test_settings();
    // A long lease: its heartbeat (every 20 s) is not what notices the
    // request; the next progress save after a batch is.
    settings.scheduler.lease = Duration::from_secs(60);
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    let id = app
        .enqueue_csv("cancel.csv", csv(300_000).as_bytes(), &MAPPING)
        .await;
    wait_progress(&app, id, 10_000).await;
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "cancel_requested": true } },
        )
        .await
        .unwrap();
    let q = app.wait_final(id, Duration::from_secs(10)).await;
    assert_eq!(q.get_str("status").unwrap(), "cancelled", "{q}");
    assert!(!q.get_bool("in_progress").unwrap());
    let imported = get_i64(&q, "progress.imported_rows");
    assert!(imported > 0 && imported < 300_000, "{q}");
    assert_eq!(
        app.count(collections::DEALS, doc! {}).await as i64,
        imported,
        "the report matches the deals"
    );
    let summary = app.summary(id).await;
    assert_eq!(summary.get_str("status").unwrap(), "cancelled");
    assert_eq!(get_i64(&summary, "total_records_added"), imported);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_cancelled_while_pending_writes_nothing_and_tells_the_user() {
    let mut app = TestApp::new().await;
    let id = app
        .enqueue_with(
            "cancelled.csv",
            b"Name\nA\nB\n",
            &[("Name", "name")],
            doc! { "cancel_requested": true },
        )
        .await;
    app.spawn_daemon();
    let q = app.wait_final(id, Duration::from_secs(30)).await;
    assert_eq!(q.get_str("status").unwrap(), "cancelled", "{q}");
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 0);
    assert_eq!(get_i64(&q, "progress.imported_rows"), 0);
    assert_eq!(
        app.summary(id).await.get_str("status").unwrap(),
        "cancelled"
    );
    let q = app
        .wait_queue(id, Duration::from_secs(30), "notified", |q| {
            q.get_document("notify")
                .is_ok_and(|n| n.get_str("state") == Ok("sent"))
        })
        .await;
    assert!(
        q.get_document("notify")
            .unwrap()
            .get_str("subject")
            .unwrap()
            .contains("cancelled"),
        "{q}"
    );
    app.cleanup().await;
}

/// A one-row import whose claims reached `scheduler.max_attempts`, with
/// `fields` set as those claims left them.
async fn claimed_max_times(app: &TestApp, mut fields: bson::Document) -> bson::oid::ObjectId {
    let id = app
        .enqueue_csv("x.csv", b"Name\nA\n", &[("Name", "name")])
        .await;
    fields.insert("attempts", i64::from(app.settings().scheduler.max_attempts));
    app.queues()
        .update_one(doc! { "_id": id }, doc! { "$set": fields })
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_claimed_too_often_fails_with_too_many_attempts() {
    let mut app = TestApp::new().await;
    let max = i64::from(app.settings().scheduler.max_attempts);
    // As the release after the last attempt's trouble left it.
    let last_error = doc! { "message": "object storage: HTTP 403", "attempt": max };
    let id = claimed_max_times(&app, doc! { "last_error": last_error }).await;
    app.spawn_daemon();
    let q = app.wait_final(id, Duration::from_secs(30)).await;
    assert_eq!(q.get_str("status").unwrap(), "failed");
    let e = q.get_document("error").unwrap();
    assert_eq!(e.get_str("code").unwrap(), "too_many_attempts");
    // Support sees the cause; the customer's message stays plain.
    assert_eq!(e.get_str("detail").unwrap(), "object storage: HTTP 403");
    assert!(!e.get_str("message").unwrap().contains("403"));
    let (code, out, _) = app.cli(&["status", &id.to_hex()]);
    assert_eq!(code, 0);
    assert!(out.contains("cause:    object storage: HTTP 403"), "{out}");
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_lease_is_taken_stops_writing_at_once() {
    let mut settings = crate::helpers::test_settings();
    // A long lease: not its heartbeat (every 20 s) but the next progress
    // save after a batch notices the loss.
    settings.scheduler.lease = Duration::from_secs(60);
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    let id = app
        .enqueue_csv("taken.csv", csv(300_000).as_bytes(), &MAPPING)
        .await;
    wait_progress(&app, id, 10_000).await;
    // Another daemon's claim, as a rescue after an expiry would allow it.
    let taken = app
        .queues()
        .update_one(
            doc! { "_id": id, "status": "processing" },
            doc! {
                "$set": { "lease.owner": "another-daemon" },
                "$inc": { "attempts": 1_i64 },
            },
        )
        .await
        .unwrap();
    assert_eq!(taken.modified_count, 1, "still processing when taken");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = app.count(collections::DEALS, doc! {}).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        app.count(collections::DEALS, doc! {}).await,
        before,
        "no write after the loss"
    );
    assert!(before < 300_000, "{before}");
    let q = app.queue(id).await;
    assert_eq!(q.get_str("status").unwrap(), "processing", "{q}");
    assert_eq!(
        q.get_document("lease").unwrap().get_str("owner").unwrap(),
        "another-daemon",
        "the old owner wrote no final state"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_attempts_and_progress_written_by_a_dashboard_stop_no_claim_or_rescue() {
    let mut app = TestApp::new().await;
    let mut ids = Vec::new();
    for name in ["null.csv", "text.csv", "double.csv", "scalar-progress.csv"] {
        ids.push(
            app.enqueue_csv(name, b"Name\nA\nB\n", &[("Name", "name")])
                .await,
        );
    }
    let set = |id, fields: bson::Document| {
        let queues = app.queues();
        async move {
            queues
                .update_one(doc! { "_id": id }, doc! { "$set": fields })
                .await
                .unwrap()
        }
    };
    // `$inc` refuses a non-number: the oldest of these would block every
    // claim of every daemon.
    set(ids[0], doc! { "attempts": bson::Bson::Null }).await;
    set(ids[1], doc! { "attempts": "0" }).await;
    // `$inc` on a double stays a double: still the lease's fencing token.
    set(ids[2], doc! { "attempts": 2.0 }).await;
    // A run whose daemon died, under a dashboard's scalar `progress`: the
    // rescue (one update of every expired lease) must not fail on it.
    let past = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 60_000);
    set(
        ids[3],
        doc! {
            "status": "processing", "in_progress": true, "attempts": 1_i64, "progress": 0_i32,
            "lease": { "owner": "a-dead-daemon", "expires_at": past, "heartbeat_at": past },
        },
    )
    .await;
    app.spawn_daemon();
    for (i, id) in ids.iter().enumerate() {
        let q = app.wait_final(*id, Duration::from_secs(60)).await;
        assert_eq!(q.get_str("status").unwrap(), "completed", "import {i}: {q}");
        assert_eq!(get_i64(&q, "progress.imported_rows"), 2, "import {i}: {q}");
    }
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 8);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_moved_on_before_its_lease_ran_out_is_not_counted() {
    let mut app = TestApp::new().await;
    let max = i64::from(app.settings().scheduler.max_attempts);
    // The last allowed claim saved progress, then lost its lease to an
    // outage (no release): the next claim is not one too many.
    let id = claimed_max_times(&app, doc! { "advanced_attempt": max }).await;
    app.spawn_daemon();
    let q = app.wait_final(id, Duration::from_secs(30)).await;
    assert_eq!(q.get_str("status").unwrap(), "completed", "{q}");
    assert_eq!(get_i64(&q, "progress_releases"), 1);
    assert_eq!(get_i64(&q, "released_attempt"), max);
    app.cleanup().await;
}
