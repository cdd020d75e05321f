//! Dry runs (`additional_data.dry_run: true`): every line checked and its
//! outcome recorded, the user told what would happen; no deal, stage or
//! contact written, no webhook.

use std::time::Duration;

use bson::doc;
use importd::domain::collections;
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
    app.cleanup().await;
}
