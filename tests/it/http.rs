//! The HTTP listener of the real binary (`http.enabled`): health, metrics,
//! and an import's progress only for its own account's token.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::oid::ObjectId;
use jsonwebtoken::{EncodingKey, Header};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::helpers::TestApp;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn token(app: &TestApp, account: ObjectId, kind: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &Header::default(),
        &json!({ "type": kind, "uid": app.user_id.to_hex(), "account_id": account.to_hex(),
                 "iat": now, "exp": now + 300 }),
        &EncodingKey::from_secret(app.settings().app_secret.expose_secret().as_bytes()),
    )
    .unwrap()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_health_metrics_and_progress_to_the_importing_account_only() {
    let app = TestApp::new().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _daemon = Killed(
        app.binary(&["run"])
            .env("IMPORTD__HTTP__ENABLED", "true")
            .env("IMPORTD__HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("IMPORTD__LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .spawn()
            .expect("daemon starts"),
    );
    let http = reqwest::Client::new();
    let start = Instant::now();
    // Until the listener answers and its MongoDB ping is through (a 503
    // while a loaded machine is slow to answer is not the test's point).
    let health = loop {
        match http.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status() == 200 => break r,
            other if start.elapsed() < Duration::from_secs(30) => {
                drop(other);
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(r) => panic!("never healthy: {}", r.status()),
            Err(e) => panic!("the listener never answered: {e}"),
        }
    };
    assert_eq!(health.json::<Value>().await.unwrap()["mongodb"], "ok");

    let id = app
        .enqueue_csv(
            "http.csv",
            b"Name,Value\nAcme,100\nGlobex,oops\nInitech,300\n",
            &[("Name", "name"), ("Value", "value")],
        )
        .await;
    app.wait_completed(id, Duration::from_secs(60)).await;

    let url = format!("{base}/imports/{}", id.to_hex());
    let own = token(&app, app.account_id, "access_token");
    let r = http.get(&url).bearer_auth(&own).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["file_name"], "http.csv");
    assert_eq!(v["progress"]["imported_rows"], 2);
    assert_eq!(v["progress"]["failed_rows"], 1);
    assert_eq!(v["in_progress"], false);
    assert!(
        v["completed_at"].as_str().is_some_and(|d| d.ends_with('Z')),
        "{v}"
    );

    // No token, a forged one, a refresh token: 401. Another account, or an
    // id that is no import of the caller's account: 403.
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = http
        .get(&url)
        .bearer_auth("abc.def.ghi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let refresh = token(&app, app.account_id, "refresh_token");
    let r = http.get(&url).bearer_auth(&refresh).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let other = token(&app, ObjectId::new(), "access_token");
    let r = http.get(&url).bearer_auth(&other).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let missing = format!("{base}/imports/{}", ObjectId::new().to_hex());
    let r = http.get(&missing).bearer_auth(&own).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .get(format!("{base}/imports/not-an-id"))
        .bearer_auth(&own)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // This daemon ran exactly this import. The run's counters move just
    // after its final write (which the test waited for): poll briefly.
    let expected = [
        "importd_imports_claimed_total 1",
        "importd_import_runs_total{end=\"completed\"} 1",
        "importd_rows_total{outcome=\"imported\"} 2",
        "importd_rows_total{outcome=\"failed\"} 1",
        "importd_imports_running 0",
    ];
    let start = Instant::now();
    let text = loop {
        let r = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = r.text().await.unwrap();
        let all = expected.iter().all(|e| text.lines().any(|l| l == *e))
            && text.contains("importd_clock_offset_seconds ");
        if all || start.elapsed() > Duration::from_secs(10) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for line in expected {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    assert!(
        text.contains("importd_batch_write_seconds_bucket"),
        "{text}"
    );
    // The daemon measured its clock against the server's (one host here).
    let offset: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("importd_clock_offset_seconds "))
        .unwrap_or_else(|| panic!("no clock offset in:\n{text}"))
        .parse()
        .unwrap();
    assert!(offset.abs() < 1.0, "{offset}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_mid_request_does_not_hold_the_daemon_at_sigterm() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::new().await;
    let port = free_port();
    let mut daemon = app
        .binary(&["run"])
        .env("IMPORTD__HTTP__ENABLED", "true")
        .env("IMPORTD__HTTP__BIND", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let start = Instant::now();
    let mut stalled = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the listener never answered: {e}"),
        }
    };
    // Half a request head, then nothing: the connection stays open.
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status();
    // Without a bounded drain the daemon would wait on this client for as
    // long as it stays connected (here: for ever).
    let exited = Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        if exited.elapsed() > Duration::from_secs(60) {
            let _ = daemon.kill();
            panic!("the daemon did not exit while a client stalled mid-request");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
    drop(stalled);
}
