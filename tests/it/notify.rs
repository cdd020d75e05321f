//! The summary email, the error report and the completion webhook, against
//! real SMTP (aiosmtpd, one per test) and S3 servers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{DateTime, doc};
use importd::claim::Claimer;
use importd::domain::collections;
use importd::report::notify::Notifier;
use importd::report::webhook::Claims;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{SmtpCatcher, TestApp, settings_with_smtp};

const MAPPING: [(&str, &str); 3] = [
    ("Name", "name"),
    ("Value", "value"),
    ("Note", "description"),
];

fn planted_csv() -> (String, Vec<u64>) {
    let mut s = String::from("Name,Value,Note\n");
    let mut planted = Vec::new();
    for i in 0..200u64 {
        let line = i + 2;
        if i % 40 == 5 {
            planted.push(line);
            s.push_str(&format!(
                "Deal {i},not a number,=HYPERLINK(\"http://evil\")\n"
            ));
        } else {
            s.push_str(&format!("Deal {i},{},ok\n", i * 10));
        }
    }
    (s, planted)
}

fn report_link(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("http://") && l.contains("errors.csv"))
        .unwrap_or_else(|| panic!("no report link in:\n{text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_summary_email_with_counts_and_a_report_of_exactly_the_failed_lines() {
    let smtp = SmtpCatcher::start().await;
    let mut app = TestApp::with_settings(settings_with_smtp(smtp.port)).await;
    app.spawn_daemon();
    let (csv, planted) = planted_csv();
    let id = app
        .enqueue_csv("deals-q4.csv", csv.as_bytes(), &MAPPING)
        .await;
    app.wait_completed(id, Duration::from_secs(60)).await;
    let mails = smtp.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(mails.len(), 1, "{mails:?}");
    let m = &mails[0];
    assert!(m.to.contains("owner@example.com"), "{}", m.to);
    assert_eq!(
        m.subject,
        "Deal import finished: 195 imported, 5 failed (deals-q4.csv)"
    );
    // One Message-ID per import, whichever round sends it.
    assert_eq!(
        m.message_id,
        format!("<import-summary.{}@importd>", id.to_hex())
    );
    assert!(
        m.text.contains("Failed: 5") && m.text.contains("Imported: 195"),
        "{}",
        m.text
    );
    assert!(
        m.text.contains(&format!("line {}", planted[0])),
        "{}",
        m.text
    );
    assert!(m.html.contains("<table"), "{}", m.html);

    let body = reqwest::get(report_link(&m.text)).await.unwrap();
    assert!(body.status().is_success(), "{}", body.status());
    let body = body.text().await.unwrap();
    let mut rdr = csv::ReaderBuilder::new().from_reader(body.as_bytes());
    assert_eq!(
        rdr.headers().unwrap().iter().collect::<Vec<_>>(),
        ["Name", "Value", "Note", "line", "error"]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    let lines: Vec<u64> = rows.iter().map(|r| r[3].parse().unwrap()).collect();
    assert_eq!(lines, planted);
    assert!(
        rows.iter().all(|r| r[2].starts_with("'=")),
        "formula cells neutralised: {rows:?}"
    );
    assert_eq!(&rows[0][1], "not a number");

    let q = app.queue(id).await;
    let n = q.get_document("notify").unwrap();
    assert_eq!(n.get_str("state").unwrap(), "sent");
    assert!(
        q.get_document("report")
            .unwrap()
            .get_str("key")
            .unwrap()
            .ends_with("/errors.csv")
    );
    app.cleanup().await;
}

/// A line the database refuses (here: its deterministic id is taken by a
/// document of another import) is a failed line whose report row carries
/// the original columns, like any other failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_the_database_refuses_reaches_the_report_with_its_columns() {
    let mut app = TestApp::new().await;
    let csv =
        "Name,Value,Note\nAlpha,10,first\nBravo,20,\"second, with a comma\"\nCharlie,30,third\n";
    let id = app
        .enqueue_csv("refused.csv", csv.as_bytes(), &MAPPING)
        .await;
    let taken = importd::domain::deal_id(&id, 3).unwrap();
    app.coll(collections::DEALS)
        .insert_one(doc! { "_id": taken, "name": "someone else's", "import": { "queue_id": ObjectId::new(), "line": 3_i64 } })
        .await
        .unwrap();
    app.spawn_daemon();
    app.wait_completed(id, Duration::from_secs(60)).await;

    let summary = app.summary(id).await;
    assert_eq!(crate::helpers::get_i64(&summary, "total_records_added"), 2);
    assert_eq!(crate::helpers::get_i64(&summary, "total_errors"), 1);
    let log = summary.get_array("logs").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(crate::helpers::get_i64(&log, "line"), 3);
    let q = app
        .wait_queue(id, Duration::from_secs(30), "reported", |q| {
            q.get_document("report").is_ok()
        })
        .await;
    let key = q.get_document("report").unwrap().get_str("key").unwrap();
    let url = app
        .services
        .storage
        .presign_get(key, Duration::from_secs(60))
        .await
        .unwrap();
    let body = reqwest::get(url).await.unwrap().text().await.unwrap();
    let mut rdr = csv::ReaderBuilder::new().from_reader(body.as_bytes());
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(
        rows[0].iter().take(4).collect::<Vec<_>>(),
        ["Bravo", "20", "second, with a comma", "3"]
    );
    assert!(
        rows[0][4].contains("already uses this record's id"),
        "{body}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_down_at_completion_still_gets_exactly_one_email_later() {
    let mut smtp = SmtpCatcher::start().await;
    smtp.stop();
    let mut app = TestApp::with_settings(settings_with_smtp(smtp.port)).await;
    app.spawn_daemon();
    let id = app
        .enqueue_csv("later.csv", b"Name,Value,Note\nA,1,x\n", &MAPPING)
        .await;
    app.wait_completed(id, Duration::from_secs(30)).await;
    // Wait until a round has failed and been recorded, then bring SMTP back.
    app.wait_queue(id, Duration::from_secs(30), "with a failed round", |q| {
        q.get_document("notify")
            .is_ok_and(|n| n.get_str("error").is_ok())
    })
    .await;
    smtp.restart().await;
    let mails = smtp.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(mails.len(), 1);
    let q = app.queue(id).await;
    assert_eq!(
        q.get_str("status").unwrap(),
        "completed",
        "mail never changes the import"
    );
    assert_eq!(
        q.get_document("notify").unwrap().get_str("state").unwrap(),
        "sent"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(smtp.messages().len(), 1, "no second email");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_completing_the_same_import_send_one_email() {
    let smtp = SmtpCatcher::start().await;
    let app = TestApp::with_settings(settings_with_smtp(smtp.port)).await;
    let id = ObjectId::new();
    app.queues()
        .insert_one(doc! {
            "_id": id, "source": "deals", "status": "completed", "in_progress": false,
            "user_id": app.user_id, "account_id": app.account_id,
            "csv": [{ "key": "k", "name": "twice.csv" }],
            "started_at": DateTime::now(), "completed_at": DateTime::now(),
            "notify": { "state": "pending" },
        })
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let claimer = Claimer::new(&app.db, format!("daemon-{i}"), Duration::from_secs(60));
        let n = Notifier::new(app.services.clone(), claimer).unwrap();
        tasks.push(tokio::spawn(async move {
            n.deliver(id).await;
            n.deliver_due().await;
            n.deliver(id).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mails = smtp.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(
        mails[0].subject,
        "Deal import finished: 0 imported, 0 failed (twice.csv)"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_email_gets_a_warning_not_a_failed_import() {
    let smtp = SmtpCatcher::start().await;
    let mut app = TestApp::with_settings(settings_with_smtp(smtp.port)).await;
    app.coll(collections::USERS)
        .update_one(
            doc! { "_id": app.user_id },
            doc! { "$unset": { "email": "" } },
        )
        .await
        .unwrap();
    app.spawn_daemon();
    let id = app
        .enqueue_csv("x.csv", b"Name,Value,Note\nA,1,x\n", &MAPPING)
        .await;
    app.wait_completed(id, Duration::from_secs(30)).await;
    let q = app
        .wait_queue(id, Duration::from_secs(20), "skipped", |q| {
            q.get_document("notify")
                .is_ok_and(|n| n.get_str("state") == Ok("skipped"))
        })
        .await;
    let n = q.get_document("notify").unwrap();
    assert!(n.get_str("warning").unwrap().contains("email"));
    assert_eq!(app.queue(id).await.get_str("status").unwrap(), "completed");
    assert!(smtp.messages().is_empty());
    app.cleanup().await;
}

/// A one-shot HTTP listener: records each request's Authorization header,
/// body and arrival time, and answers 200.
async fn listener() -> (String, Arc<Mutex<Vec<(String, serde_json::Value, u64)>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/import", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, body) = loop {
                let n = sock.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..p]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < p + 4 + len {
                        let n = sock.read(&mut chunk).await.unwrap();
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break (head, buf[p + 4..p + 4 + len].to_vec());
                }
            };
            let auth = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("authorization: ")
                        .or_else(|| l.strip_prefix("Authorization: "))
                })
                .unwrap_or_default()
                .to_owned();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            s.lock()
                .unwrap()
                .push((auth, serde_json::from_slice(&body).unwrap(), now));
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_carries_a_fresh_token_signed_with_the_app_secret() {
    let smtp = SmtpCatcher::start().await;
    let (url, seen) = listener().await;
    let mut settings = settings_with_smtp(smtp.port);
    settings.crm.webhook_url = Some(url);
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    let id = app
        .enqueue_csv("hook.csv", b"Name,Value,Note\nA,1,x\nB,oops,y\n", &MAPPING)
        .await;
    app.wait_completed(id, Duration::from_secs(30)).await;
    let start = Instant::now();
    while seen.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "no webhook call");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (auth, body, at) = seen.lock().unwrap()[0].clone();
    let token = auth.strip_prefix("Bearer ").expect("bearer token");
    let secret = secrecy::ExposeSecret::expose_secret(&app.settings().app_secret).to_owned();
    let claims = jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .expect("the token verifies with app_secret")
    .claims;
    assert_eq!(claims.kind, "access_token");
    assert_eq!(claims.uid, app.user_id.to_hex());
    assert_eq!(claims.account_id, app.account_id.to_hex());
    assert_eq!(claims.parent_account, app.account_id.to_hex());
    assert_eq!(claims.client_id, app.account_id.to_hex());
    assert!(claims.scope.contains("contacts"));
    assert!(
        claims.iat <= at + 1 && claims.iat + 5 >= at,
        "minted at the call"
    );
    assert!(
        claims.exp > at && claims.exp <= at + 300,
        "expires within 5 minutes of the call"
    );
    assert_eq!(body["queue_id"], id.to_hex());
    assert_eq!(body["totals"]["imported"], 1);
    assert_eq!(body["totals"]["failed"], 1);
    assert!(
        jsonwebtoken::decode::<Claims>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(b"wrong"),
            &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256)
        )
        .is_err()
    );
    app.wait_queue(id, Duration::from_secs(10), "with the webhook sent", |q| {
        q.get_document("webhook")
            .is_ok_and(|w| w.get_str("state") == Ok("sent"))
    })
    .await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_stack_smtp_server_delivers_into_its_maildir() {
    // The server scripts/stack.sh starts (what the demo and chaos runs use).
    let settings = crate::helpers::test_settings();
    let mailer = importd::report::notify::Mailer::new(&settings.smtp).unwrap();
    let to = format!("probe-{}@example.com", ObjectId::new().to_hex());
    mailer
        .send(
            to.parse().unwrap(),
            &format!("probe.{}@importd", ObjectId::new().to_hex()),
            "stack probe",
            "text".into(),
            "<p>html</p>".into(),
        )
        .await
        .expect("the stack's SMTP server accepts mail");
    let dir = std::env::var_os("IMPORTD_STACK_MAILDIR")
        .map_or_else(
            || crate::helpers::config_dir().join("../.stack/mail"),
            std::path::PathBuf::from,
        )
        .join("new");
    let start = Instant::now();
    loop {
        let found = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|m| m.contains(&to)))
            })
            .unwrap_or(false);
        if found {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no message for {to} in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_left_by_a_dead_daemon_is_posted_once_by_another() {
    let smtp = SmtpCatcher::start().await;
    let (url, seen) = listener().await;
    let mut settings = settings_with_smtp(smtp.port);
    settings.crm.webhook_url = Some(url);
    let mut app = TestApp::with_settings(settings).await;
    // A final import whose email went out, and whose webhook round was
    // taken by a daemon that died (its round lease has expired).
    let id = ObjectId::new();
    let past = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 60_000);
    app.queues()
        .insert_one(doc! {
            "_id": id, "source": "deals", "status": "completed", "in_progress": false,
            "user_id": app.user_id, "account_id": app.account_id,
            "parent_account": app.account_id, "client_id": app.account_id,
            "csv": [{ "key": "k", "name": "orphan.csv" }],
            "notify": { "state": "sent", "rounds": 1_i64 },
            "webhook": { "state": "sending", "owner": "a-dead-daemon", "expires_at": past, "rounds": 1_i64 },
        })
        .await
        .unwrap();
    app.spawn_daemon();
    app.wait_queue(id, Duration::from_secs(30), "with the webhook sent", |q| {
        q.get_document("webhook")
            .is_ok_and(|w| w.get_str("state") == Ok("sent"))
    })
    .await;
    // Several rescue ticks later, still one call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].1["queue_id"], id.to_hex());
    assert_eq!(calls[0].1["status"], "completed");
    assert!(smtp.messages().is_empty(), "no second email");
    app.cleanup().await;
}

/// A real SMTP server (aiosmtpd) that refuses every recipient with a
/// permanent 550, logging each refusal to `refusals`.
fn refusing_smtp(dir: &std::path::Path) -> (u16, std::process::Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("refuse.py"),
        format!(
            "class Refuse:\n    async def handle_RCPT(self, server, session, envelope, address, options):\n        with open({:?}, 'a') as f:\n            f.write(address + '\\n')\n        return '550 5.1.1 No such user'\n",
            dir.join("refusals").display().to_string()
        ),
    )
    .unwrap();
    let child = std::process::Command::new("python3")
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
        .args(["-c", "refuse.Refuse"])
        .env("PYTHONPATH", dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("aiosmtpd (scripts/stack.sh installs it)");
    (port, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_smtp_refusal_is_tried_once_per_round_and_then_recorded_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mut server) = refusing_smtp(dir.path());
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "aiosmtpd did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut settings = settings_with_smtp(port);
    settings.notify.max_rounds = 2;
    let mut app = TestApp::with_settings(settings).await;
    app.spawn_daemon();
    let id = app
        .enqueue_csv("refused.csv", b"Name,Value,Note\nA,1,x\n", &MAPPING)
        .await;
    app.wait_completed(id, Duration::from_secs(30)).await;
    let q = app
        .wait_queue(id, Duration::from_secs(60), "with the email failed", |q| {
            q.get_document("notify")
                .is_ok_and(|n| n.get_str("state") == Ok("failed"))
        })
        .await;
    let _ = server.kill();
    let _ = server.wait();
    let n = q.get_document("notify").unwrap();
    assert!(n.get_str("error").unwrap().contains("550"), "{n}");
    assert_eq!(q.get_str("status").unwrap(), "completed");
    // One try per round (no retries within a round on a 5xx), two rounds.
    let refusals = std::fs::read_to_string(dir.path().join("refusals")).unwrap();
    assert_eq!(refusals.lines().count(), 2, "{refusals}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_round_gone_quiet_ends_failed_without_a_send_and_makes_the_webhook_due() {
    let smtp = SmtpCatcher::start().await;
    let (url, seen) = listener().await;
    let mut settings = settings_with_smtp(smtp.port);
    settings.crm.webhook_url = Some(url);
    let max_rounds = settings.notify.max_rounds;
    let mut app = TestApp::with_settings(settings).await;
    // The last email round's sender stopped before recording its result.
    let id = ObjectId::new();
    app.queues()
        .insert_one(doc! {
            "_id": id, "source": "deals", "status": "completed", "in_progress": false,
            "user_id": app.user_id, "account_id": app.account_id,
            "parent_account": app.account_id, "client_id": app.account_id,
            "csv": [{ "key": "k", "name": "quiet.csv" }],
            "notify": {
                "state": "sending", "owner": "a-dead-daemon",
                "expires_at": DateTime::from_millis(0), "rounds": i64::from(max_rounds),
            },
        })
        .await
        .unwrap();
    app.spawn_daemon();
    let q = app
        .wait_queue(id, Duration::from_secs(30), "with the webhook sent", |q| {
            q.get_document("webhook")
                .is_ok_and(|w| w.get_str("state") == Ok("sent"))
        })
        .await;
    let n = q.get_document("notify").unwrap();
    assert_eq!(n.get_str("state"), Ok("failed"), "{n}");
    assert!(
        n.get_str("error").unwrap().contains("no rounds are left"),
        "{n}"
    );
    assert_eq!(n.get_i64("rounds").unwrap(), i64::from(max_rounds) + 1);
    assert_eq!(n.get_bool("gave_up"), Ok(true), "{n}");
    assert!(
        smtp.messages().is_empty(),
        "nothing sent past the last round"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_through_every_round_still_sends_the_summary_without_its_report() {
    let smtp = SmtpCatcher::start().await;
    let mut settings = settings_with_smtp(smtp.port);
    settings.notify.max_rounds = 2;
    let mut app = TestApp::with_settings(settings.clone()).await;
    let daemon = app.spawn_daemon();
    let (csv, _) = planted_csv();
    let id = app.enqueue_csv("q4.csv", csv.as_bytes(), &MAPPING).await;
    app.wait_completed(id, Duration::from_secs(60)).await;
    assert_eq!(smtp.wait_for(1, Duration::from_secs(30)).await.len(), 1);
    daemon.shutdown_token().cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The same import's summary again, now with a storage that refuses
    // every write (a bucket that does not exist).
    app.queues()
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "notify": { "state": "pending" } }, "$unset": { "report": "" } },
        )
        .await
        .unwrap();
    settings.s3.bucket = "no-such-bucket".into();
    let broken = importd::app::services(settings).await.unwrap();
    let claimer = Claimer::new(&app.db, "storage-down", Duration::from_secs(60));
    let n = Notifier::new(broken, claimer).unwrap();
    // Round 1 of 2: no report, so no email yet; a later round tries again.
    n.deliver(id).await;
    let q = app.queue(id).await;
    let notify = q.get_document("notify").unwrap();
    assert_eq!(notify.get_str("state").unwrap(), "pending", "{q}");
    assert_eq!(smtp.messages().len(), 1);
    // The last round sends without the link rather than not at all.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    n.deliver(id).await;
    let q = app
        .wait_queue(id, Duration::from_secs(20), "sent", |q| {
            q.get_document("notify")
                .is_ok_and(|n| n.get_str("state") == Ok("sent"))
        })
        .await;
    let notify = q.get_document("notify").unwrap();
    assert!(notify.get_str("report_error").is_ok(), "{q}");
    assert!(q.get_document("report").is_err(), "no report recorded: {q}");
    let mails = smtp.wait_for(2, Duration::from_secs(20)).await;
    assert_eq!(mails.len(), 2);
    let without: Vec<_> = mails
        .iter()
        .filter(|m| !m.text.contains("errors.csv"))
        .collect();
    assert_eq!(without.len(), 1, "{mails:?}");
    assert!(
        without[0].text.contains("could not be made"),
        "{}",
        without[0].text
    );
    assert!(without[0].text.contains("Failed: 5"), "{}", without[0].text);
    app.cleanup().await;
}
