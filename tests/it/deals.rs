//! The deal pipeline end to end against the real stack: mapping, values,
//! stages, per-line outcomes, totals, idempotent replays, file-level errors.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use importd::domain::{collections, deal_id};
use importd::map::StageName;
use importd::outcomes::{self, LineOutcome};
use importd::stages::StageCache;

use crate::helpers::{TestApp, get_i64};

const CUSTOM: &str = "65a1b2c3d4e5f60718293a4b";

const SEED_CSV: &str = "Deal Name,Value,Stage,Status,Contact Name,Contact Email,Region\n\
Acme Corp Deal,5000,qualified,open,John Doe,john@acme.com,EMEA\n\
TechStart Deal,12000,proposal,open,Jane Smith,jane@techstart.com,APAC\n\
Global Inc Deal,25000,negotiation,open,Bob Johnson,bob@global.com,AMER\n";

const SEED_MAPPING: [(&str, &str); 5] = [
    ("Deal Name", "name"),
    ("Value", "value"),
    ("Stage", "stage_id"),
    ("Status", "status"),
    ("Region", CUSTOM),
];

const LONG: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_sample_imports_three_deals_with_stages_custom_fields_and_totals() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let id = app
        .enqueue_csv("deals.csv", SEED_CSV.as_bytes(), &SEED_MAPPING)
        .await;
    let q = app.wait_completed(id, Duration::from_secs(30)).await;
    assert!(!q.get_bool("in_progress").unwrap());
    assert_eq!(get_i64(&q, "progress.imported_rows"), 3);
    assert_eq!(get_i64(&q, "progress.failed_rows"), 0);
    assert_eq!(get_i64(&q, "progress.total_rows"), 3);
    assert_eq!(
        q.get_document("progress")
            .unwrap()
            .get_f64("percent")
            .unwrap(),
        100.0
    );
    // Nothing left to wait for.
    assert_eq!(
        q.get_document("progress").unwrap().get("eta_seconds"),
        Some(&Bson::Null)
    );
    assert!(q.get_datetime("completed_at").is_ok());

    let stages = app
        .find_all(
            collections::PIPELINE_STAGES,
            doc! { "pipeline_id": app.pipeline_id },
        )
        .await;
    let names: HashSet<&str> = stages.iter().map(|s| s.get_str("name").unwrap()).collect();
    assert_eq!(
        names,
        HashSet::from(["qualified", "proposal", "negotiation"])
    );

    let deals = app
        .find_all(collections::DEALS, doc! { "import.queue_id": id })
        .await;
    assert_eq!(deals.len(), 3);
    let acme = deals
        .iter()
        .find(|d| d.get_str("name") == Ok("Acme Corp Deal"))
        .unwrap();
    assert_eq!(acme.get_f64("value").unwrap(), 5000.0);
    assert_eq!(acme.get_str("status").unwrap(), "open");
    assert_eq!(
        acme.get_document("additional_info")
            .unwrap()
            .get_str(CUSTOM)
            .unwrap(),
        "EMEA"
    );
    assert_eq!(acme.get_object_id("account_id").unwrap(), app.account_id);
    assert_eq!(acme.get_object_id("pipeline_id").unwrap(), app.pipeline_id);
    assert_eq!(acme.get_object_id("owner").unwrap(), app.user_id);
    assert_eq!(acme.get_object_id("created_by").unwrap(), app.user_id);
    assert_eq!(acme.get_str("source").unwrap(), "csv");
    assert_eq!(
        acme.get_array("tags").unwrap(),
        &vec![Bson::String("imported".into())]
    );
    assert_eq!(get_i64(acme, "import.line"), 2);
    assert_eq!(acme.get_object_id("_id").unwrap(), deal_id(&id, 2).unwrap());
    let qualified = stages
        .iter()
        .find(|s| s.get_str("name") == Ok("qualified"))
        .unwrap();
    assert_eq!(
        acme.get_object_id("stage_id").unwrap(),
        qualified.get_object_id("_id").unwrap()
    );

    let summary = app.summary(id).await;
    assert_eq!(get_i64(&summary, "total_rows"), 3);
    assert_eq!(get_i64(&summary, "total_records_added"), 3);
    assert_eq!(get_i64(&summary, "total_errors"), 0);
    assert_eq!(summary.get_str("status").unwrap(), "completed");
    assert_eq!(
        q.get_object_id("log_id").unwrap(),
        summary.get_object_id("_id").unwrap()
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_spellings_share_one_stage_and_statuses_normalise() {
    let mut app = TestApp::new().await;
    // The dashboard already made "Proposal Sent" with its own spelling.
    app.coll(collections::PIPELINE_STAGES)
        .insert_one(doc! { "account_id": app.account_id, "pipeline_id": app.pipeline_id, "name": "Proposal  Sent", "order": 1 })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Name,Stage,Status,Type\n\
        A,Qualified,Closed - Won,Monthly - Recurring\n\
        B, qualified ,closed-won,monthly_recurring\n\
        C,QUALIFIED,CLOSED_WON,MONTHLY RECURRING\n\
        D,proposal sent,open,\n";
    let mapping = [
        ("Name", "name"),
        ("Stage", "stage_id"),
        ("Status", "status"),
        ("Type", "contract_type"),
    ];
    let id = app.enqueue_csv("s.csv", csv.as_bytes(), &mapping).await;
    let q = app.wait_completed(id, Duration::from_secs(30)).await;
    let stages = app
        .find_all(
            collections::PIPELINE_STAGES,
            doc! { "pipeline_id": app.pipeline_id },
        )
        .await;
    assert_eq!(stages.len(), 2, "{stages:?}");
    let created = stages
        .iter()
        .find(|s| s.get_str("name") == Ok("qualified"))
        .unwrap();
    assert_eq!(
        created.get_str("label").unwrap(),
        "Qualified",
        "first-seen spelling"
    );
    let deals = app
        .find_all(collections::DEALS, doc! { "import.queue_id": id })
        .await;
    assert_eq!(deals.len(), 4);
    for d in &deals[..3] {
        assert_eq!(
            d.get_object_id("stage_id").unwrap(),
            created.get_object_id("_id").unwrap()
        );
        assert_eq!(d.get_str("status").unwrap(), "closed_won");
        assert_eq!(d.get_str("contract_type").unwrap(), "monthly_recurring");
    }
    assert_ne!(
        deals[3].get_object_id("stage_id").unwrap(),
        created.get_object_id("_id").unwrap()
    );
    assert_eq!(
        q.get_array("stages_created").unwrap(),
        &vec![Bson::String("Qualified".into())]
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_on_one_new_stage_creates_it_once() {
    let mut app = TestApp::new().await;
    // Many stage caches at once (as many imports on many daemons would).
    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = importd::db::connect(&app.settings().mongodb).await.unwrap();
        let (a, p, u) = (app.account_id, app.pipeline_id, app.user_id);
        tasks.push(tokio::spawn(async move {
            let mut cache = StageCache::load(&db, a, p, u, ObjectId::new(), 100)
                .await
                .unwrap();
            let label = if i % 2 == 0 {
                "Brand New"
            } else {
                " brand  NEW "
            };
            cache
                .resolve(&StageName {
                    key: "brand new".into(),
                    label: label.into(),
                })
                .await
                .unwrap()
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(
        app.count(collections::PIPELINE_STAGES, doc! { "name": "brand new" })
            .await,
        1
    );

    // And two whole imports racing on another new stage, on two daemons.
    app.spawn_daemon();
    app.spawn_daemon();
    let mapping = [("Name", "name"), ("Stage", "stage_id")];
    let mut body = String::from("Name,Stage\n");
    for i in 0..500 {
        writeln!(
            body,
            "Deal {i},{}",
            if i % 2 == 0 { "Won Later" } else { "won later" }
        )
        .unwrap();
    }
    let a = app.enqueue_csv("a.csv", body.as_bytes(), &mapping).await;
    let b = app.enqueue_csv("b.csv", body.as_bytes(), &mapping).await;
    for id in [a, b] {
        app.wait_completed(id, Duration::from_secs(60)).await;
    }
    assert_eq!(
        app.count(collections::PIPELINE_STAGES, doc! { "name": "won later" })
            .await,
        1
    );
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 1000);
    app.cleanup().await;
}

/// A file of `rows` data rows where the rows in `bad` fail (empty name or
/// an unparsable value) and every 97th row has a two-line quoted note.
/// Returns the text and the physical lines of the failing rows.
fn generated(rows: usize, bad: impl Fn(usize) -> bool) -> (String, Vec<u64>) {
    let mut text = String::with_capacity(rows * 64);
    text.push_str("Deal Name,Value,Stage,Status,Notes\n");
    let mut line = 2u64;
    let mut planted = Vec::new();
    for i in 0..rows {
        let notes = if i % 97 == 0 {
            "\"first line\nsecond line\""
        } else {
            "plain"
        };
        let (name, value) = if bad(i) {
            planted.push(line);
            if i % 2 == 0 {
                (String::new(), "100".to_owned())
            } else {
                (format!("Deal {i}"), "n/a".to_owned())
            }
        } else {
            (format!("Deal {i}"), format!("{}", i * 10))
        };
        writeln!(text, "{name},{value},Stage {},open,{notes}", i % 8).unwrap();
        line += 1 + u64::from(i % 97 == 0);
    }
    (text, planted)
}

const GEN_MAPPING: [(&str, &str); 5] = [
    ("Deal Name", "name"),
    ("Value", "value"),
    ("Stage", "stage_id"),
    ("Status", "status"),
    ("Notes", "description"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_rows_with_planted_failures_account_for_every_line() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    // About 1 %: every 100th row, plus the rows right after each multi-line one.
    let (csv, planted) = generated(100_000, |i| i % 100 == 7 || i % 97 == 1);
    let id = app
        .enqueue_csv("big.csv", csv.as_bytes(), &GEN_MAPPING)
        .await;
    let q = app.wait_completed(id, LONG).await;
    let imported = get_i64(&q, "progress.imported_rows") as u64;
    let failed = get_i64(&q, "progress.failed_rows") as u64;
    assert_eq!(imported + failed, 100_000);
    assert_eq!(failed, planted.len() as u64);
    assert_eq!(
        app.count(collections::DEALS, doc! { "import.queue_id": id })
            .await,
        imported
    );

    // The failed lines are exactly the planted ones, from the outcomes.
    let mut failed_lines = Vec::new();
    for d in app
        .find_all(
            collections::IMPORT_LINES,
            doc! { "queue_id": id, "failed_count": { "$gt": 0 } },
        )
        .await
    {
        for f in d.get_array("failed").unwrap() {
            failed_lines.push(f.as_document().unwrap().get_i64("line").unwrap() as u64);
        }
    }
    failed_lines.sort_unstable();
    assert_eq!(failed_lines, planted);

    // Support's one-query lookup, for a failed line and an imported one.
    let bad = planted[planted.len() / 2];
    match outcomes::line_outcome(&app.db, id, bad).await.unwrap() {
        Some(LineOutcome::Failed(f)) => assert_eq!(f.line, bad),
        other => panic!("line {bad}: {other:?}"),
    }
    // Row 0 spans lines 2-3 (a quoted note on two lines), row 1 (line 4)
    // is planted, row 2 starts on line 5.
    match outcomes::line_outcome(&app.db, id, 5).await.unwrap() {
        Some(LineOutcome::Imported { id: d }) => {
            assert_eq!(d, deal_id(&id, 5).unwrap());
            let deal = app
                .coll(collections::DEALS)
                .find_one(doc! { "_id": d })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(get_i64(&deal, "import.line"), 5);
            assert_eq!(deal.get_str("name").unwrap(), "Deal 2");
        }
        other => panic!("line 5: {other:?}"),
    }
    assert_eq!(
        outcomes::line_outcome(&app.db, id, 3).await.unwrap(),
        None,
        "no record starts on line 3"
    );
    let summary = app.summary(id).await;
    assert_eq!(get_i64(&summary, "total_errors") as u64, failed);
    let logs = summary.get_array("logs").unwrap();
    assert_eq!(logs.len(), planted.len().min(1000));
    assert_eq!(
        logs[0].as_document().unwrap().get_i64("line").unwrap() as u64,
        planted[0]
    );
    app.cleanup().await;
}

fn bson_size(d: &Document) -> usize {
    bson::to_vec(d).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_failing_rows_keep_every_document_small() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let (csv, planted) = generated(200_000, |_| true);
    let id = app
        .enqueue_csv("all-bad.csv", csv.as_bytes(), &GEN_MAPPING)
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.failed_rows"), 200_000);
    assert_eq!(planted.len(), 200_000);
    let mut largest = bson_size(&q);
    for coll in [collections::IMPORT_LINES, collections::CSV_IMPORTS] {
        for d in app.find_all(coll, doc! { "queue_id": id }).await {
            largest = largest.max(bson_size(&d));
        }
    }
    println!("largest document written: {largest} bytes");
    assert!(largest < 1024 * 1024, "largest document is {largest} bytes");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_a_queue_document_twice_creates_no_second_deal() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let (csv, planted) = generated(5_000, |i| i % 50 == 3);
    let id = app
        .enqueue_csv("twice.csv", csv.as_bytes(), &GEN_MAPPING)
        .await;
    let first = app.wait_final(id, LONG).await;
    assert_eq!(first.get_str("status").unwrap(), "completed");
    let deals_before = app.count(collections::DEALS, doc! {}).await;
    assert_eq!(deals_before, 5_000 - planted.len() as u64);

    // From the start again: no checkpoint, as if the first run never ended.
    app.replay_from_start(id).await;
    let second = app.wait_final(id, LONG).await;
    assert_eq!(second.get_str("status").unwrap(), "completed");
    assert_eq!(get_i64(&second, "attempts"), 2);
    assert_eq!(
        app.count(collections::DEALS, doc! {}).await,
        deals_before,
        "no line got a second deal"
    );
    assert_eq!(
        get_i64(&second, "progress.imported_rows") as u64,
        deals_before
    );
    assert_eq!(
        get_i64(&second, "progress.failed_rows") as usize,
        planted.len()
    );
    let summary = app.summary(id).await;
    assert_eq!(
        get_i64(&summary, "total_records_added") as u64,
        deals_before
    );
    assert_eq!(get_i64(&summary, "total_rows"), 5_000);
    assert_eq!(app.count(collections::CSV_IMPORTS, doc! {}).await, 1);

    // Those runs reused the outcomes the first one stored. Again with every
    // other batch's outcomes gone, as after a crash while writing them:
    // those batches are written again, absorbed as already imported.
    let mut batches = app
        .find_all(collections::IMPORT_LINES, doc! { "queue_id": id })
        .await;
    batches.sort_by_key(|b| b.get_i64("first_line").unwrap());
    assert_eq!(batches.len(), 5);
    for b in batches.iter().step_by(2) {
        app.coll(collections::IMPORT_LINES)
            .delete_one(doc! { "_id": b.get_object_id("_id").unwrap() })
            .await
            .unwrap();
    }
    app.replay_from_start(id).await;
    let third = app.wait_final(id, LONG).await;
    assert_eq!(get_i64(&third, "attempts"), 3);
    assert_eq!(app.count(collections::DEALS, doc! {}).await, deals_before);
    assert_eq!(
        get_i64(&third, "progress.imported_rows") as u64,
        deals_before
    );
    assert_eq!(
        get_i64(&third, "progress.failed_rows") as usize,
        planted.len()
    );
    assert_eq!(
        app.count(collections::IMPORT_LINES, doc! { "queue_id": id })
            .await,
        5
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_level_problems_fail_the_import_with_a_code_before_any_write() {
    let mut app = TestApp::new().await;
    let ok_mapping = [("Name", "name")];
    let mut cases = vec![
        (
            app.enqueue_csv("empty.csv", b"", &ok_mapping).await,
            "empty_file",
        ),
        (
            app.enqueue_csv("blank.csv", b"\n\n", &ok_mapping).await,
            "no_header",
        ),
        (
            app.enqueue_csv("x.xlsx", b"PK\x03\x04\x14\x00binary", &ok_mapping)
                .await,
            "not_csv",
        ),
        (
            app.enqueue_csv(
                "m.csv",
                b"Name\nA\n",
                &[("Name", "name"), ("Missing", "value")],
            )
            .await,
            "mapping_invalid",
        ),
        (
            app.enqueue_csv(
                "h.csv",
                b"Name,X\nA,1\n",
                &[("Name", "name"), ("X", "$set")],
            )
            .await,
            "mapping_invalid",
        ),
        (
            app.enqueue_csv(
                "o.csv",
                b"Name,X\nA,1\n",
                &[("Name", "name"), ("X", "account_id")],
            )
            .await,
            "mapping_invalid",
        ),
    ];
    let other_account_pipeline = ObjectId::new();
    app.coll(collections::PIPELINES)
        .insert_one(
            doc! { "_id": other_account_pipeline, "account_id": ObjectId::new(), "name": "Theirs" },
        )
        .await
        .unwrap();
    cases.push((
        app.enqueue_with(
            "p.csv",
            b"Name\nA\n",
            &ok_mapping,
            doc! { "additional_data": { "pipeline_id": other_account_pipeline } },
        )
        .await,
        "pipeline_not_found",
    ));
    let missing = app.enqueue_csv("gone.csv", b"Name\nA\n", &ok_mapping).await;
    let key = app.queue(missing).await.get_array("csv").unwrap()[0]
        .as_document()
        .unwrap()
        .get_str("key")
        .unwrap()
        .to_owned();
    app.services.storage.delete(&key).await.unwrap();
    cases.push((missing, "object_not_found"));

    // Only now: a daemon running earlier could claim `gone.csv` between
    // its upload and the delete.
    app.spawn_daemon();
    for (id, code) in cases {
        let q = app.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(q.get_str("status").unwrap(), "failed", "{q}");
        let e = q.get_document("error").unwrap();
        assert_eq!(e.get_str("code").unwrap(), code, "{q}");
        assert!(!e.get_str("message").unwrap().is_empty());
    }
    assert_eq!(
        app.count(collections::DEALS, doc! {}).await,
        0,
        "no deal written"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messy_rows_fail_alone_with_field_value_and_line() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let csv = "\u{feff}Deal Name;Value;Close;Email\r\n\
        Good;\"5,000.50\";2025-12-31;a@b.com\r\n\
        Ragged;1\r\n\
        Bad Date;1;someday;a@b.com\r\n\
        Bad Mail;1;;not-an-email\r\n\
        \r\n\
        Also Good;$7;12/31/2025;\r\n";
    let mapping = [
        ("deal name", "name"),
        ("Value", "value"),
        ("Close", "expected_close_date"),
        ("Email", "contact_email"),
    ];
    let id = app.enqueue_csv("messy.csv", csv.as_bytes(), &mapping).await;
    app.wait_completed(id, Duration::from_secs(30)).await;
    let summary = app.summary(id).await;
    let logs: Vec<(i64, String)> = summary
        .get_array("logs")
        .unwrap()
        .iter()
        .map(|l| {
            let l = l.as_document().unwrap();
            (
                l.get_i64("line").unwrap(),
                l.get_str("field").unwrap_or("-").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        logs,
        vec![
            (3, "-".into()),
            (4, "expected_close_date".into()),
            (5, "contact_email".into())
        ]
    );
    let deals = app.find_all(collections::DEALS, doc! {}).await;
    assert_eq!(deals.len(), 2);
    assert_eq!(deals[0].get_f64("value").unwrap(), 5000.5);
    assert_eq!(get_i64(&deals[1], "import.line"), 7);
    assert_eq!(deals[1].get_f64("value").unwrap(), 7.0);
    assert!(deals[1].get_datetime("expected_close_date").is_ok());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_strategies_skip_or_update_deals_of_the_same_name() {
    for strategy in ["skip", "update"] {
        let mut app = TestApp::new().await;
        let existing = ObjectId::new();
        app.coll(collections::DEALS)
            .insert_one(doc! {
                "_id": existing, "name": "ACME  deal", "value": 10.0,
                "account_id": app.account_id, "pipeline_id": app.pipeline_id,
            })
            .await
            .unwrap();
        // Same name in another pipeline: never matched.
        app.coll(collections::DEALS)
            .insert_one(doc! { "name": "New Deal", "account_id": app.account_id, "pipeline_id": ObjectId::new() })
            .await
            .unwrap();
        app.spawn_daemon();
        let csv = "Name,Value\nAcme Deal,1\nNew Deal,2\n new  deal ,3\n";
        let id = app
            .enqueue_with(
                "dup.csv",
                csv.as_bytes(),
                &[("Name", "name"), ("Value", "value")],
                doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": strategy } },
            )
            .await;
        let q = app.wait_completed(id, Duration::from_secs(30)).await;
        let in_pipeline = app
            .find_all(collections::DEALS, doc! { "pipeline_id": app.pipeline_id })
            .await;
        assert_eq!(
            in_pipeline.len(),
            2,
            "{strategy}: one new deal, the existing one kept"
        );
        let acme = app
            .coll(collections::DEALS)
            .find_one(doc! { "_id": existing })
            .await
            .unwrap()
            .unwrap();
        let created = deal_id(&id, 3).unwrap();
        let new = app
            .coll(collections::DEALS)
            .find_one(doc! { "_id": created })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(get_i64(&q, "progress.imported_rows"), 1, "{strategy}");
        if strategy == "skip" {
            assert_eq!(get_i64(&q, "progress.skipped_rows"), 2);
            assert_eq!(acme.get_f64("value").unwrap(), 10.0);
            assert_eq!(new.get_f64("value").unwrap(), 2.0);
            assert_eq!(
                outcomes::line_outcome(&app.db, id, 2).await.unwrap(),
                Some(LineOutcome::Skipped { id: existing })
            );
        } else {
            assert_eq!(get_i64(&q, "progress.updated_rows"), 2);
            assert_eq!(acme.get_f64("value").unwrap(), 1.0);
            assert_eq!(acme.get_str("name").unwrap(), "Acme Deal");
            assert_eq!(new.get_f64("value").unwrap(), 3.0);
            assert_eq!(
                outcomes::line_outcome(&app.db, id, 4).await.unwrap(),
                Some(LineOutcome::Updated { id: created })
            );
        }
        let summary = app.summary(id).await;
        assert_eq!(get_i64(&summary, "total_rows"), 3);
        app.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_the_row_limit_fails_and_leaves_nothing_behind() {
    let mut settings = crate::helpers::test_settings();
    settings.import.max_rows = Some(2_500);
    settings.import.batch_size = std::num::NonZeroUsize::new(500).unwrap();
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    let mut csv = String::from("Name,Value\n");
    for i in 0..3_000 {
        writeln!(csv, "Deal {i},{i}").unwrap();
    }
    let id = app
        .enqueue_csv(
            "big.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Value", "value")],
        )
        .await;
    let q = app.wait_final(id, Duration::from_secs(60)).await;
    assert_eq!(q.get_str("status").unwrap(), "failed", "{q}");
    let error = q.get_document("error").unwrap();
    assert_eq!(error.get_str("code").unwrap(), "too_many_rows");
    assert!(
        error
            .get_str("message")
            .unwrap()
            .contains("nothing was imported")
    );
    // Batches were written before the limit was met; all were taken back.
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 0);
    assert_eq!(app.count(collections::IMPORT_LINES, doc! {}).await, 0);
    assert_eq!(get_i64(&q, "progress.imported_rows"), 0);
    let summary = app.summary(id).await;
    assert_eq!(get_i64(&summary, "total_records_added"), 0);
    app.cleanup().await;
}

/// A file replaced in storage (uploaded again under the same key, same
/// size) after a run read it is not read again as if it were the same
/// lines: the next run fails `file_changed`, takes back what the import
/// created where it can (`create`), and says what stays where it cannot
/// (`skip`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_between_runs_fails_and_is_not_mixed_with_the_first() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let rows = |word: &str| {
        let mut csv = String::from("Name\n");
        for i in 0..10 {
            writeln!(csv, "{word} {i}").unwrap();
        }
        csv
    };
    let strategies = ["create", "skip"];
    let mut ids = Vec::new();
    for strategy in strategies {
        let id = app
            .enqueue_with(
                &format!("{strategy}.csv"),
                rows(&format!("{strategy} Deal")).as_bytes(),
                &[("Name", "name")],
                doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": strategy } },
            )
            .await;
        let q = app.wait_completed(id, LONG).await;
        assert!(
            q.get_str("file_etag").is_ok(),
            "the version read is kept: {q}"
        );
        ids.push(id);
    }
    assert_eq!(app.count(collections::DEALS, doc! {}).await, 20);
    for (&id, strategy) in ids.iter().zip(strategies) {
        let key = app.queue(id).await.get_array("csv").unwrap()[0]
            .as_document()
            .unwrap()
            .get_str("key")
            .unwrap()
            .to_owned();
        // Same size, other rows: only the version tells them apart.
        let second = rows(&format!("{strategy} Lead"));
        app.services
            .storage
            .put_bytes(&key, second.as_bytes(), "text/csv")
            .await
            .unwrap();
        app.replay_from_start(id).await;
    }
    for (&id, taken_back) in ids.iter().zip([true, false]) {
        let q = app.wait_final(id, LONG).await;
        assert_eq!(q.get_str("status").unwrap(), "failed", "{q}");
        let error = q.get_document("error").unwrap();
        assert_eq!(error.get_str("code").unwrap(), "file_changed");
        let message = error.get_str("message").unwrap();
        assert_eq!(
            message.contains("nothing was imported"),
            taken_back,
            "{message}"
        );
        let summary = app.summary(id).await;
        assert_eq!(
            get_i64(&summary, "total_records_added"),
            if taken_back { 0 } else { 10 },
            "{summary}"
        );
    }
    let deals = app.find_all(collections::DEALS, doc! {}).await;
    assert_eq!(deals.len(), 10, "the `skip` import's deals stay");
    assert!(deals.iter().all(|d| {
        d.get_str("name").unwrap().starts_with("skip Deal ")
            && d.get_document("import")
                .unwrap()
                .get_object_id("queue_id")
                .unwrap()
                == ids[1]
    }));
    app.cleanup().await;
}

/// Updates go out as `update` commands of many statements, cut by size;
/// each line still gets its own result, and a deal gone meanwhile (or one
/// of another pipeline) is a failed line, not a silent success.
/// The stored deal `id`.
async fn stored(deals: &mongodb::Collection<Document>, id: ObjectId) -> Document {
    deals
        .find_one(doc! { "_id": id })
        .await
        .unwrap()
        .expect("the deal is stored")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_updates_report_each_line() {
    let app = TestApp::new().await;
    let spec = app.spec(
        importd::domain::RecordKind::Deals,
        importd::domain::DuplicateStrategy::Update,
    );
    let deals = app.coll(collections::DEALS);
    let ids: Vec<ObjectId> = (0..1_200).map(|_| ObjectId::new()).collect();
    let existing: Vec<Document> = ids
        .iter()
        .map(|id| doc! { "_id": id, "name": "old", "account_id": app.account_id, "pipeline_id": app.pipeline_id })
        .collect();
    deals.insert_many(existing).await.unwrap();
    deals.delete_one(doc! { "_id": ids[7] }).await.unwrap();
    deals
        .update_one(
            doc! { "_id": ids[900] },
            doc! { "$set": { "pipeline_id": ObjectId::new() } },
        )
        .await
        .unwrap();
    // 1,200 × 5 KB: more than one command's worth.
    let note = "n".repeat(5_000);
    let sets: Vec<bson::RawDocumentBuf> = (0..ids.len())
        .map(|i| {
            bson::RawDocumentBuf::from_document(
                &doc! { "name": format!("new {i}"), "description": &note },
            )
            .unwrap()
        })
        .collect();
    let updates: Vec<(ObjectId, &bson::RawDocumentBuf)> = ids.iter().copied().zip(&sets).collect();
    let writer = importd::write::DealWriter::new(deals.clone(), &spec, app.pipeline_id);
    let results = writer.update(&updates).await.unwrap();
    assert_eq!(results.len(), ids.len());
    for (i, r) in results.iter().enumerate() {
        let refused = matches!(r, importd::write::LineWrite::Rejected(_));
        assert_eq!(refused, i == 7 || i == 900, "line {i}: {r:?}");
    }
    let updated = app
        .count(
            collections::DEALS,
            doc! { "name": { "$regex": "^new " }, "description": &note },
        )
        .await;
    assert_eq!(updated, 1_198);
    let d = stored(&deals, ids[1_199]).await;
    assert_eq!(d.get_str("name").unwrap(), "new 1199");
    // A replay changes nothing and reports the same.
    assert_eq!(writer.update(&updates).await.unwrap(), results);

    // A replayed older line never writes over a newer line of the import
    // (a resume re-reads batches the newer line's batch came after).
    let by_line = |line: i64, name: &str| {
        bson::RawDocumentBuf::from_document(&doc! {
            "name": name,
            "last_import": { "queue_id": spec.queue_id, "line": line },
        })
        .unwrap()
    };
    let (newer, older) = (by_line(1_500, "line 1500"), by_line(3, "line 3"));
    let target = ids[0];
    let r = writer.update(&[(target, &newer)]).await.unwrap();
    assert_eq!(r, [importd::write::LineWrite::Updated]);
    let r = writer.update(&[(target, &older)]).await.unwrap();
    assert_eq!(r, [importd::write::LineWrite::Superseded]);
    let d = stored(&deals, target).await;
    assert_eq!(d.get_str("name").unwrap(), "line 1500");

    // Another import updates the deal since: written again, line 1500
    // still counts as applied (the deal keeps its last updates), and the
    // other import's values stay.
    let spec_b = app.spec(
        importd::domain::RecordKind::Deals,
        importd::domain::DuplicateStrategy::Update,
    );
    let writer_b = importd::write::DealWriter::new(deals.clone(), &spec_b, app.pipeline_id);
    let theirs = bson::RawDocumentBuf::from_document(&doc! {
        "name": "theirs",
        "last_import": { "queue_id": spec_b.queue_id, "line": 2_i64 },
    })
    .unwrap();
    let r = writer_b.update(&[(target, &theirs)]).await.unwrap();
    assert_eq!(r, [importd::write::LineWrite::Updated]);
    let r = writer.update(&[(target, &newer)]).await.unwrap();
    assert_eq!(r, [importd::write::LineWrite::Superseded]);
    let d = stored(&deals, target).await;
    assert_eq!(d.get_str("name").unwrap(), "theirs");
    // A deal with a `last_imports` of its own that is no list is updated
    // all the same, its field left as it is.
    deals
        .update_one(
            doc! { "_id": ids[3] },
            doc! { "$set": { "last_imports": "the CRM's own" } },
        )
        .await
        .unwrap();
    let r = writer_b.update(&[(ids[3], &theirs)]).await.unwrap();
    assert_eq!(r, [importd::write::LineWrite::Updated]);
    let d3 = stored(&deals, ids[3]).await;
    assert_eq!(d3.get_str("name").unwrap(), "theirs");
    assert_eq!(d3.get_str("last_imports").unwrap(), "the CRM's own");
    let trail = d.get_array("last_imports").unwrap();
    assert_eq!(
        trail[trail.len() - 2..],
        [
            bson::Bson::Document(doc! { "queue_id": spec.queue_id, "line": 1_500_i64 }),
            bson::Bson::Document(doc! { "queue_id": spec_b.queue_id, "line": 2_i64 }),
        ]
    );

    // Lines updating one deal twice in a batch apply in file order. (A
    // single server applies an unordered command in order anyway; on a
    // sharded one only the cut before the repeated deal, which the
    // `command_cuts` property test covers, guarantees it.)
    let (first, second) = (by_line(2_000, "first"), by_line(2_001, "second"));
    let other = by_line(2_000, "other");
    let r = writer
        .update(&[(ids[1], &first), (ids[2], &other), (ids[1], &second)])
        .await
        .unwrap();
    assert_eq!(r, vec![importd::write::LineWrite::Updated; 3]);
    let d = stored(&deals, ids[1]).await;
    assert_eq!(d.get_str("name").unwrap(), "second");
    app.cleanup().await;
}

/// Old Mac exports end lines with a lone `\r`: rows, blank lines and line
/// numbers come out as an editor shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_lone_cr_line_endings_imports_line_by_line() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let csv = "Name,Value\rAlpha,1\r\rBravo,oops\rCharlie,\"3\"\r";
    let id = app
        .enqueue_csv(
            "mac.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Value", "value")],
        )
        .await;
    app.wait_completed(id, Duration::from_secs(30)).await;
    let summary = app.summary(id).await;
    assert_eq!(get_i64(&summary, "total_records_added"), 2);
    assert_eq!(get_i64(&summary, "total_errors"), 1);
    let log = summary.get_array("logs").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(get_i64(&log, "line"), 4);
    let deals = app
        .find_all(collections::DEALS, doc! { "import.queue_id": id })
        .await;
    let mut lines: Vec<i64> = deals.iter().map(|d| get_i64(d, "import.line")).collect();
    lines.sort_unstable();
    assert_eq!(lines, [2, 5]);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_utf16_file_with_blank_lines_continues_at_its_checkpoint() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    // UTF-16 has no byte mapping: a resume reads from the start and skips
    // the checkpoint's count of data records. Whitespace-only lines are no
    // records and must not be counted while skipping.
    let mut text = String::from("Name\r\n");
    let mut line = 1;
    let mut line_of_row = Vec::new();
    for i in 0..40 {
        if i % 5 == 0 {
            text.push_str("   \r\n");
            line += 1;
        }
        line += 1;
        line_of_row.push(line);
        writeln!(text, "Deal {i}\r").unwrap();
    }
    let mut bytes = vec![0xFF, 0xFE];
    for u in text.encode_utf16() {
        bytes.extend(u.to_le_bytes());
    }
    let id = app
        .enqueue_with(
            "utf16.csv",
            &bytes,
            &[("Name", "name")],
            doc! { "checkpoint": { "line": line_of_row[20] as i64, "byte": 0_i64, "records": 20_i64 } },
        )
        .await;
    app.wait_completed(id, LONG).await;
    let deals = app.find_all(collections::DEALS, doc! {}).await;
    let mut lines: Vec<i64> = deals
        .iter()
        .map(|d| d.get_document("import").unwrap().get_i64("line").unwrap())
        .collect();
    lines.sort_unstable();
    let expected: Vec<i64> = line_of_row[20..].iter().map(|&l| l as i64).collect();
    assert_eq!(lines, expected, "rows from the checkpoint on, each once");
    let names: HashSet<&str> = deals.iter().map(|d| d.get_str("name").unwrap()).collect();
    assert!(names.contains("Deal 20") && !names.contains("Deal 19"));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_import_cuts_batches_as_its_first_run_did() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    let header = "Name\n";
    let mut csv = String::from(header);
    for i in 0..20 {
        writeln!(csv, "Deal {i}").unwrap();
    }
    // A checkpoint at the first row, written by a run whose batches held 7
    // rows (this daemon's own are 1,000).
    let id = app
        .enqueue_with(
            "batches.csv",
            csv.as_bytes(),
            &[("Name", "name")],
            doc! { "checkpoint": { "line": 2_i64, "byte": header.len() as i64, "records": 0_i64, "batch_size": 7_i64 } },
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 20);
    let firsts: Vec<i64> = app
        .find_all(collections::IMPORT_LINES, doc! { "queue_id": id })
        .await
        .iter()
        .map(|d| d.get_i64("first_line").unwrap())
        .collect();
    let mut firsts = firsts;
    firsts.sort_unstable();
    assert_eq!(firsts, [2, 9, 16]);
    app.cleanup().await;
}

/// A resumed `update` import does not write again the batches whose
/// outcomes its earlier run stored: another import's later update of the
/// same deal stays, and the line's outcome is the first run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_update_import_keeps_what_another_import_changed_since() {
    // The process's metrics recorder, installed before the runs.
    let metrics = importd::telemetry::metrics::handle();
    let mut app = TestApp::new().await;
    let existing = ObjectId::new();
    app.coll(collections::DEALS)
        .insert_one(doc! {
            "_id": existing, "name": "Acme", "value": 10.0,
            "account_id": app.account_id, "pipeline_id": app.pipeline_id,
        })
        .await
        .unwrap();
    app.spawn_daemon();
    let update = doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } };
    let mapping = [("Name", "name"), ("Value", "value")];
    let first = app
        .enqueue_with("a.csv", b"Name,Value\nAcme,100\n", &mapping, update.clone())
        .await;
    app.wait_completed(first, LONG).await;
    let second = app
        .enqueue_with("b.csv", b"Name,Value\nacme,555\n", &mapping, update)
        .await;
    app.wait_completed(second, LONG).await;
    // The first import again from the start, as after a crash before its
    // checkpoint: its batch was written and recorded.
    let reused = |m: &metrics_exporter_prometheus::PrometheusHandle| {
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix("importd_batches_reused_total "))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let reused_before = reused(metrics);
    app.replay_from_start(first).await;
    let q = app.wait_completed(first, LONG).await;
    let acme = app
        .coll(collections::DEALS)
        .find_one(doc! { "_id": existing })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acme.get_f64("value").unwrap(), 555.0, "{acme}");
    assert_eq!(
        acme.get_document("last_import")
            .unwrap()
            .get_object_id("queue_id")
            .unwrap(),
        second
    );
    assert_eq!(get_i64(&q, "progress.updated_rows"), 1);
    assert_eq!(
        outcomes::line_outcome(&app.db, first, 2).await.unwrap(),
        Some(LineOutcome::Updated { id: existing })
    );
    assert!(reused(metrics) > reused_before, "{}", metrics.render());
    app.cleanup().await;
}

/// A line whose deal the database refused stays failed when its batch is
/// resumed, though a later line of the same name has created that deal
/// since: it does not update it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_refused_line_does_not_update_the_deal_a_later_line_created() {
    let mut settings = crate::helpers::test_settings();
    settings.import.batch_size = std::num::NonZeroUsize::new(1).unwrap();
    let mut app = TestApp::with_settings(settings).await;
    let id = app
        .enqueue_with(
            "refused.csv",
            b"Name,Value\nZed,1\nzed,2\n",
            &[("Name", "name"), ("Value", "value")],
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "update" } },
        )
        .await;
    // Line 2's id is taken by another account's record: refused.
    app.coll(collections::DEALS)
        .insert_one(doc! { "_id": deal_id(&id, 2).unwrap(), "name": "someone else's", "account_id": ObjectId::new() })
        .await
        .unwrap();
    app.spawn_daemon();
    let check = |q: &Document| {
        assert_eq!(
            [
                get_i64(q, "progress.imported_rows"),
                get_i64(q, "progress.updated_rows"),
                get_i64(q, "progress.failed_rows")
            ],
            [1, 0, 1],
            "{q}"
        );
    };
    check(&app.wait_completed(id, LONG).await);
    app.replay_from_start(id).await;
    check(&app.wait_completed(id, LONG).await);
    let created = app
        .coll(collections::DEALS)
        .find_one(doc! { "_id": deal_id(&id, 3).unwrap() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(created.get_f64("value").unwrap(), 2.0, "{created}");
    assert!(matches!(
        outcomes::line_outcome(&app.db, id, 2).await.unwrap(),
        Some(LineOutcome::Failed(_))
    ));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_skipped_as_a_repeat_of_a_failed_row_is_failed_not_lost() {
    let mut app = TestApp::new().await;
    let csv = "Name,Value\nAcme,1\nacme ,2\nOther,3\n";
    let id = app
        .enqueue_with(
            "repeat.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Value", "value")],
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "skip" } },
        )
        .await;
    // Line 2's deal cannot be written (its id is taken by another record),
    // so line 3, a repeat of its name, has nothing to be a duplicate of.
    app.coll(collections::DEALS)
        .insert_one(doc! { "_id": deal_id(&id, 2).unwrap(), "name": "someone else's" })
        .await
        .unwrap();
    app.spawn_daemon();
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.skipped_rows"), 0, "{q}");
    assert_eq!(get_i64(&q, "progress.failed_rows"), 2, "{q}");
    assert_eq!(get_i64(&q, "progress.imported_rows"), 1, "{q}");
    match outcomes::line_outcome(&app.db, id, 3).await.unwrap() {
        Some(LineOutcome::Failed(e)) => assert!(e.message.contains("line 2"), "{e:?}"),
        other => panic!("line 3: {other:?}"),
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_empty_cells_are_not_rows_and_huge_rows_cut_batches_early() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    // Spreadsheet exports pad the data with rows of empty cells.
    let big = "x".repeat(3 * 1024 * 1024);
    let mut csv = String::from("Name,Notes\n");
    for i in 0..4 {
        writeln!(csv, "Deal {i},{big}").unwrap();
    }
    csv.push_str(",\n , \n\n\"\",\"\"\n");
    let id = app
        .enqueue_csv(
            "padded.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Notes", "description")],
        )
        .await;
    let q = app.wait_final(id, LONG).await;
    assert_eq!(q.get_str("status").unwrap(), "completed", "{q}");
    assert_eq!(get_i64(&q, "progress.total_rows"), 4, "{q}");
    assert_eq!(
        get_i64(&q, "progress.imported_rows") + get_i64(&q, "progress.failed_rows"),
        4
    );
    // 12 MB of rows: the first batch is cut after 9 MB, not after 1,000 rows.
    assert_eq!(
        app.count(collections::IMPORT_LINES, doc! { "queue_id": id })
            .await,
        2
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_past_the_new_stage_limit_fail_and_name_the_limit() {
    let mut settings = crate::helpers::test_settings();
    settings.import.max_new_stages = 2;
    let mut app = TestApp::with_settings(settings).await;
    app.add_stage("won", "Won").await;
    app.spawn_daemon();
    // Under `skip`, a row repeating the name of a row that failed on its
    // stage creates the deal (nothing was created to be a duplicate of).
    let csv = "Name,Stage\nA,Lead\nB,Demo\nC,Trial\nD,lead\nE,Won\nC,Lead\nF,Other\n";
    let id = app
        .enqueue_with(
            "stages.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Stage", "stage_id")],
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "duplicate_strategy": "skip" } },
        )
        .await;
    let q = app.wait_completed(id, LONG).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 5, "{q}");
    assert_eq!(get_i64(&q, "progress.failed_rows"), 2, "{q}");
    assert_eq!(
        q.get_array("stages_created").unwrap(),
        &vec![Bson::String("Lead".into()), Bson::String("Demo".into())]
    );
    for line in [4, 8] {
        match outcomes::line_outcome(&app.db, id, line).await.unwrap() {
            Some(LineOutcome::Failed(e)) => {
                assert_eq!(e.code.as_str(), "too_many_stages", "{e:?}");
                assert!(e.message.contains("already has 2 new stages"), "{e:?}");
            }
            other => panic!("line {line}: {other:?}"),
        }
    }
    let stages = app
        .count(
            collections::PIPELINE_STAGES,
            doc! { "pipeline_id": app.pipeline_id },
        )
        .await;
    assert_eq!(stages, 3);
    app.cleanup().await;
}
