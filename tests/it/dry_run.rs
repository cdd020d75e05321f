//! Dry runs (`additional_data.dry_run: true`): every line checked and its
//! outcome recorded, the user told what would happen; no deal, stage or
//! contact written, no webhook.

use std::time::Duration;

use bson::doc;
use bson::oid::ObjectId;
use importd::domain::{collections, contact_id, deal_id};
use importd::outcomes::{self, LineOutcome};

use crate::helpers::{SmtpCatcher, TestApp, get_i64, settings_with_smtp};

const CSV: &str = "Deal Name,Value,Stage,Contact Email\n\
                   Acme,5000,Brand New Stage,ann@x.co\n\
                   Broken,lots,qualified,bob@x.co\n\
                   \"Multi\nLine\",7,qualified,\n\
                   ,1,qualified,cy@x.co\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_checks_every_line_and_writes_no_record() {
    let smtp = SmtpCatcher::start().await;
    let mut app = TestApp::with_settings(settings_with_smtp(smtp.port)).await;
    app.spawn_daemon();
    let mapping = [
        ("Deal Name", "name"),
        ("Value", "value"),
        ("Stage", "stage_id"),
        ("Contact Email", "contact_email"),
    ];
    let id = app
        .enqueue_with(
            "check.csv",
            CSV.as_bytes(),
            &mapping,
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "dry_run": true } },
        )
        .await;
    let q = app.wait_completed(id, Duration::from_secs(60)).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 2, "{q}");
    assert_eq!(get_i64(&q, "progress.failed_rows"), 2, "{q}");
    for coll in [
        collections::DEALS,
        collections::PIPELINE_STAGES,
        collections::CONTACTS,
    ] {
        assert_eq!(app.count(coll, doc! {}).await, 0, "{coll}");
    }
    assert!(app.summary(id).await.get_bool("dry_run").unwrap());
    // Outcomes as a real import would record them, line by line.
    match outcomes::line_outcome(&app.db, id, 3).await.unwrap() {
        Some(LineOutcome::Failed(f)) => assert_eq!(f.code, "invalid_number"),
        other => panic!("line 3: {other:?}"),
    }
    assert!(matches!(
        outcomes::line_outcome(&app.db, id, 4).await.unwrap(),
        Some(LineOutcome::Imported { .. })
    ));
    match outcomes::line_outcome(&app.db, id, 6).await.unwrap() {
        Some(LineOutcome::Failed(f)) => assert_eq!(f.code, "required"),
        other => panic!("line 6: {other:?}"),
    }
    let mails = smtp.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(
        mails[0].subject,
        "Deal import check finished: 2 ready, 2 failed (check.csv)"
    );
    assert!(
        mails[0].text.contains("Ready to import: 2"),
        "{}",
        mails[0].text
    );
    assert!(mails[0].text.contains("errors.csv"), "{}", mails[0].text);
    // The stages it would create (line 3's failed, so line 4 is the first
    // to name "qualified"), none created.
    let stages: Vec<&str> = q
        .get_array("stages_created")
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .collect();
    assert_eq!(stages, ["Brand New Stage", "qualified"]);
    assert!(
        mails[0]
            .text
            .contains("Stages it would create: Brand New Stage, qualified"),
        "{}",
        mails[0].text
    );
    app.cleanup().await;
}

/// A check applies the limit of new stages per import as a real run does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_fails_the_rows_past_the_new_stage_limit() {
    let mut settings = crate::helpers::test_settings();
    settings.import.max_new_stages = 1;
    let mut app = TestApp::with_settings(settings).await;
    app.add_stage("won", "Won").await;
    app.spawn_daemon();
    let id = app
        .enqueue_with(
            "stages.csv",
            b"Name,Stage\nA,Lead\nB,Demo\nC,lead\nD,WON\n",
            &[("Name", "name"), ("Stage", "stage_id")],
            doc! { "additional_data": { "pipeline_id": app.pipeline_id, "dry_run": true } },
        )
        .await;
    let q = app.wait_completed(id, Duration::from_secs(60)).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 3, "{q}");
    assert_eq!(get_i64(&q, "progress.failed_rows"), 1, "{q}");
    match outcomes::line_outcome(&app.db, id, 3).await.unwrap() {
        Some(LineOutcome::Failed(f)) => assert_eq!(f.code, "too_many_stages"),
        other => panic!("line 3: {other:?}"),
    }
    assert_eq!(
        app.count(collections::PIPELINE_STAGES, doc! {}).await,
        1,
        "nothing created"
    );
    // Under `skip`, a row matching an existing deal names no stage (a real
    // run resolves none for it), so the next row's new stage still fits.
    app.coll(collections::DEALS)
        .insert_one(doc! {
            "name": "Acme", "account_id": app.account_id, "pipeline_id": app.pipeline_id,
        })
        .await
        .unwrap();
    let id = app
        .enqueue_with(
            "skip.csv",
            b"Name,Stage\nacme,First\nBeta,Second\n",
            &[("Name", "name"), ("Stage", "stage_id")],
            doc! { "additional_data": {
                "pipeline_id": app.pipeline_id, "dry_run": true, "duplicate_strategy": "skip",
            } },
        )
        .await;
    let q = app.wait_completed(id, Duration::from_secs(60)).await;
    assert_eq!(get_i64(&q, "progress.skipped_rows"), 1, "{q}");
    assert_eq!(get_i64(&q, "progress.imported_rows"), 1, "{q}");
    assert_eq!(get_i64(&q, "progress.failed_rows"), 0, "{q}");
    let stages: Vec<&str> = q
        .get_array("stages_created")
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .collect();
    assert_eq!(stages, ["Second"]);
    app.cleanup().await;
}

/// A check under `update` says which rows would update which deal: an
/// existing one of the pipeline, or the one an earlier row would create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_tells_which_rows_would_update_or_skip() {
    let smtp = SmtpCatcher::start().await;
    let mut app = TestApp::with_settings(settings_with_smtp(smtp.port)).await;
    let existing = ObjectId::new();
    app.coll(collections::DEALS)
        .insert_one(doc! {
            "_id": existing, "name": "Acme Deal", "value": 1.0,
            "account_id": app.account_id, "pipeline_id": app.pipeline_id,
        })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Deal Name,Value\n ACME  deal,5\nNew One,6\nnew one,7\nOther,8\n";
    let id = app
        .enqueue_with(
            "upd.csv",
            csv.as_bytes(),
            &[("Deal Name", "name"), ("Value", "value")],
            doc! { "additional_data": {
                "pipeline_id": app.pipeline_id, "duplicate_strategy": "update", "dry_run": true,
            } },
        )
        .await;
    let q = app.wait_completed(id, Duration::from_secs(60)).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 2, "{q}");
    assert_eq!(get_i64(&q, "progress.updated_rows"), 2, "{q}");
    assert_eq!(get_i64(&q, "progress.failed_rows"), 0, "{q}");
    // Nothing written: the existing deal is as it was, and alone.
    let deals = app.find_all(collections::DEALS, doc! {}).await;
    assert_eq!(deals.len(), 1);
    assert_eq!(deals[0].get_f64("value").unwrap(), 1.0);
    for (line, deal) in [(2, existing), (4, deal_id(&id, 3).unwrap())] {
        match outcomes::line_outcome(&app.db, id, line).await.unwrap() {
            Some(LineOutcome::Updated { id }) => assert_eq!(id, deal, "line {line}"),
            other => panic!("line {line}: {other:?}"),
        }
    }
    let mails = smtp.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(
        mails[0].subject,
        "Deal import check finished: 2 ready, 2 to update, 0 failed (upd.csv)"
    );
    assert!(
        mails[0].text.contains("Would update: 2"),
        "{}",
        mails[0].text
    );
    // Support reads the same.
    let out = app
        .binary(&["logs", &id.to_hex(), "--line", "4"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("would update\tthe deal line 3 would create"),
        "{out}"
    );
    // No failed line: nothing to print, not an error; a wrong id is one.
    let none_failed = app
        .binary(&["logs", &id.to_hex(), "--failed"])
        .output()
        .unwrap();
    assert!(none_failed.status.success() && none_failed.stdout.is_empty());
    let unknown = app
        .binary(&["logs", &ObjectId::new().to_hex(), "--failed"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no import"));
    app.cleanup().await;
}

/// A contacts check (default `skip`): an existing contact and a repeated
/// email of the file would both be skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contacts_dry_run_finds_existing_and_repeated_emails() {
    let mut app = TestApp::new().await;
    let existing = ObjectId::new();
    app.coll(collections::CONTACTS)
        .insert_one(doc! { "_id": existing, "account_id": app.account_id, "email": "ann@x.co" })
        .await
        .unwrap();
    app.spawn_daemon();
    let csv = "Email,Name\nANN@x.co,Ann\nbob@x.co,Bob\nBob@X.co,Bobby\nnot-an-email,Cy\n";
    let id = app
        .enqueue_with(
            "c.csv",
            csv.as_bytes(),
            &[("Email", "email"), ("Name", "name")],
            doc! { "source": "contacts", "additional_data": { "dry_run": true } },
        )
        .await;
    let q = app.wait_completed(id, Duration::from_secs(60)).await;
    for (key, n) in [("imported", 1), ("skipped", 2), ("failed", 1)] {
        assert_eq!(
            get_i64(&q, &format!("progress.{key}_rows")),
            n,
            "{key}: {q}"
        );
    }
    assert_eq!(app.count(collections::CONTACTS, doc! {}).await, 1);
    for (line, contact) in [(2, existing), (4, contact_id(&id, 3).unwrap())] {
        match outcomes::line_outcome(&app.db, id, line).await.unwrap() {
            Some(LineOutcome::Skipped { id }) => assert_eq!(id, contact, "line {line}"),
            other => panic!("line {line}: {other:?}"),
        }
    }
    app.cleanup().await;
}

/// An interrupted check under `skip` starts over: resumed past line 3 it
/// would not know that line 4 repeats line 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_matching_check_starts_over() {
    let mut app = TestApp::new().await;
    let id = app
        .enqueue_with(
            "again.csv",
            b"Name\nAcme\nGlobex\nACME\n",
            &[("Name", "name")],
            doc! { "additional_data": {
                "pipeline_id": app.pipeline_id, "duplicate_strategy": "skip", "dry_run": true,
            } },
        )
        .await;
    // As an earlier attempt would have left it: lines 2-3 checked.
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": {
                "checkpoint": { "line": 4_i64, "byte": 17_i64, "records": 2_i64, "batch_size": 1_i64 },
                "progress.processed_rows": 2_i64, "progress.imported_rows": 2_i64,
            } },
        )
        .await
        .unwrap();
    app.spawn_daemon();
    let q = app.wait_completed(id, Duration::from_secs(60)).await;
    assert_eq!(get_i64(&q, "progress.imported_rows"), 2, "{q}");
    assert_eq!(get_i64(&q, "progress.skipped_rows"), 1, "{q}");
    match outcomes::line_outcome(&app.db, id, 4).await.unwrap() {
        Some(LineOutcome::Skipped { id: dup }) => assert_eq!(dup, deal_id(&id, 2).unwrap()),
        other => panic!("line 4: {other:?}"),
    }
    app.cleanup().await;
}
