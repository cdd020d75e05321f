//! Support's command line on a real import: `importd logs` and
//! `importd status`.

use std::time::Duration;

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_show_batches_failed_lines_and_single_lines() {
    let mut app = TestApp::new().await;
    app.spawn_daemon();
    // Line 1 header; line 3 fails (value); line 4 starts a two-line quoted
    // cell; line 7 fails (no name).
    let csv = "Name,Value\nAcme,100\nGlobex,abc\n\"Initech\nEast\",300\nUmbrella,5\n,7\n";
    let id = app
        .enqueue_csv(
            "support.csv",
            csv.as_bytes(),
            &[("Name", "name"), ("Value", "value")],
        )
        .await;
    app.wait_completed(id, Duration::from_secs(60)).await;
    let hex = id.to_hex();

    let (code, out, err) = app.cli(&["logs", &hex, "--failed"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("line 3\tfailed\tinvalid_number\tvalue\t"),
        "{out}"
    );
    assert!(lines[1].starts_with("line 7\tfailed\t"), "{out}");
    assert!(lines[1].contains("\tname\t"), "{out}");

    let (code, out, _) = app.cli(&["logs", &hex]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("lines 2-7\t3 imported, 0 updated, 0 skipped, 2 failed\n"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("  line ")).count(),
        2,
        "{out}"
    );

    let (code, out, _) = app.cli(&["logs", &hex, "--line", "4"]);
    assert_eq!(code, 0);
    let deal = importd::domain::deal_id(&id, 4).unwrap();
    assert_eq!(out.trim_end(), format!("line 4\timported\tdeal {deal}"));
    // Line 5 is inside the quoted cell that starts on line 4.
    let (code, _, err) = app.cli(&["logs", &hex, "--line", "5"]);
    assert_eq!(code, 1, "{err}");

    let (code, out, _) = app.cli(&["status", &hex]);
    assert_eq!(code, 0);
    assert!(out.contains("status:   completed"), "{out}");

    let (code, _, err) = app.cli(&["logs", &bson::oid::ObjectId::new().to_hex()]);
    assert_eq!(code, 1);
    assert!(err.contains("no outcomes"), "{err}");
    app.cleanup().await;
}
