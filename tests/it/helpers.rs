//! The one way tests reach the stack: [`TestApp::new`] loads the real local
//! configuration, then gives the test its own database
//! (`importd_test_<pid>_<random>`), its own object key prefix, a one-second
//! tick and a short lease. A test that passes drops its database; one that
//! fails leaves it for inspection, and the next test run drops it (its
//! process is gone).

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{Document, doc};
use futures::TryStreamExt;
use importd::config::{Settings, Source};
use importd::daemon::Daemon;
use importd::domain::collections;
use importd::pipeline::Services;
use mongodb::Database;
use tokio_util::sync::CancellationToken;

/// One test's world: database, storage, settings, an account to import into.
pub struct TestApp {
    pub services: Services,
    pub db: Database,
    pub prefix: String,
    pub account_id: ObjectId,
    pub user_id: ObjectId,
    pub pipeline_id: ObjectId,
    daemons: Vec<CancellationToken>,
}

const TEST_DB_PREFIX: &str = "importd_test_";

/// Drops the databases of earlier test runs whose process is gone (failed
/// tests leave theirs behind); a concurrent run's databases are kept.
async fn sweep_stale_databases(client: &mongodb::Client) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let Ok(names) = client.list_database_names().await else {
                return;
            };
            for name in names {
                let Some(rest) = name.strip_prefix(TEST_DB_PREFIX) else {
                    continue;
                };
                let pid = rest
                    .split_once('_')
                    .and_then(|(p, _)| p.parse::<u32>().ok());
                let alive =
                    pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
                if !alive {
                    let _ = client.database(&name).drop().await;
                }
            }
        })
        .await;
}

pub fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

pub fn test_settings() -> Settings {
    let mut s = Settings::load(&Source {
        dir: config_dir(),
        env: "local".into(),
    })
    .expect("config/local.toml loads");
    let id = uuid::Uuid::new_v4().simple().to_string();
    s.mongodb.database = format!("{TEST_DB_PREFIX}{}_{}", std::process::id(), &id[..8]);
    s.scheduler.tick = "* * * * * *".into();
    // Long enough that a slow heartbeat on a loaded CI machine does not
    // lose it; no test waits for a lease to expire by itself.
    s.scheduler.lease = Duration::from_secs(15);
    s.scheduler.rescue_interval = Duration::from_secs(1);
    s.import.progress_interval = Duration::from_millis(100);
    s.notify.rescue_grace = Duration::from_secs(1);
    s
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with_settings(test_settings()).await
    }

    pub async fn with_settings(settings: Settings) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            importd::telemetry::init(
                importd::config::LogFormat::Pretty,
                "info,importd=debug",
                std::io::stderr,
            );
        }
        let services = importd::app::services(settings)
            .await
            .expect("clients build");
        sweep_stale_databases(services.db.client()).await;
        importd::db::ensure_indexes(&services.db)
            .await
            .expect("MongoDB answers: is the stack up? (scripts/stack.sh up)");
        let app = Self {
            db: services.db.clone(),
            prefix: format!("test/{}", services.settings.mongodb.database),
            services,
            account_id: ObjectId::new(),
            user_id: ObjectId::new(),
            pipeline_id: ObjectId::new(),
            daemons: Vec::new(),
        };
        app.db
            .collection::<Document>(collections::PIPELINES)
            .insert_one(
                doc! { "_id": app.pipeline_id, "account_id": app.account_id, "name": "Sales" },
            )
            .await
            .unwrap();
        app.db
            .collection::<Document>(collections::USERS)
            .insert_one(
                doc! { "_id": app.user_id, "email": "owner@example.com", "first_name": "Olive" },
            )
            .await
            .unwrap();
        app
    }

    pub fn settings(&self) -> &Settings {
        &self.services.settings
    }

    /// Starts a daemon on this test's database; stopped when the app drops.
    pub fn spawn_daemon(&mut self) -> Daemon {
        let daemon = Daemon::new(
            self.services.clone(),
            importd::claim::Claimer::default_owner(),
        )
        .expect("daemon builds");
        self.daemons.push(daemon.shutdown_token());
        let d = daemon.clone();
        tokio::spawn(async move { d.run().await.expect("scheduler runs") });
        daemon
    }

    /// Uploads `csv` and inserts a pending queue document for it.
    pub async fn enqueue_csv(&self, name: &str, csv: &[u8], mappings: &[(&str, &str)]) -> ObjectId {
        self.enqueue_with(name, csv, mappings, doc! {}).await
    }

    /// Like [`TestApp::enqueue_csv`], with extra queue fields merged in.
    pub async fn enqueue_with(
        &self,
        name: &str,
        csv: &[u8],
        mappings: &[(&str, &str)],
        extra: Document,
    ) -> ObjectId {
        let key = format!("{}/{}/{name}", self.prefix, uuid::Uuid::new_v4());
        self.services
            .storage
            .put_bytes(&key, csv, "text/csv")
            .await
            .expect("upload");
        let mut m = Document::new();
        for (h, t) in mappings {
            m.insert(*h, *t);
        }
        let id = ObjectId::new();
        let mut q = doc! {
            "_id": id,
            "source": "deals",
            "status": "pending",
            "in_progress": false,
            "user_id": self.user_id,
            "account_id": self.account_id,
            "parent_account": self.account_id,
            "client_id": self.account_id,
            "csv": [{ "key": key, "name": name }],
            "mappings": m,
            "additional_data": { "pipeline_id": self.pipeline_id, "tags": ["imported"] },
            "created_at": bson::DateTime::now(),
        };
        q.extend(extra);
        self.queues().insert_one(q).await.unwrap();
        id
    }

    /// The import spec of a queue document of this test's account (for
    /// tests driving a writer directly).
    pub fn spec(
        &self,
        kind: importd::domain::RecordKind,
        duplicate_strategy: importd::domain::DuplicateStrategy,
    ) -> importd::domain::ImportSpec {
        importd::domain::ImportSpec {
            queue_id: ObjectId::new(),
            kind,
            user_id: self.user_id,
            account_id: self.account_id,
            parent_account: None,
            client_id: None,
            csv_key: "k".into(),
            file_name: "f.csv".into(),
            mappings: Vec::new(),
            pipeline_id: (kind == importd::domain::RecordKind::Deals).then_some(self.pipeline_id),
            tags: Vec::new(),
            duplicate_strategy,
            dry_run: false,
        }
    }

    pub fn queues(&self) -> mongodb::Collection<Document> {
        self.db.collection(collections::QUEUES)
    }

    pub fn coll(&self, name: &str) -> mongodb::Collection<Document> {
        self.db.collection(name)
    }

    pub async fn queue(&self, id: ObjectId) -> Document {
        self.queues()
            .find_one(doc! { "_id": id })
            .await
            .unwrap()
            .expect("queue document")
    }

    /// Waits until the import is final and asserts it `completed`.
    pub async fn wait_completed(&self, id: ObjectId, timeout: Duration) -> Document {
        let q = self.wait_final(id, timeout).await;
        assert_eq!(q.get_str("status").unwrap(), "completed", "{q}");
        q
    }

    /// The `importd` binary with `args`, on the local configuration and
    /// this test's database, a one-second tick and an ephemeral HTTP port.
    pub fn binary(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_importd"));
        cmd.args(args)
            .env("IMPORTD_CONFIG_DIR", config_dir())
            .env("IMPORTD_ENV", "local")
            .env(
                "IMPORTD__MONGODB__DATABASE",
                &self.settings().mongodb.database,
            )
            .env("IMPORTD__SCHEDULER__TICK", "* * * * * *")
            .env("IMPORTD__HTTP__BIND", "127.0.0.1:0");
        cmd
    }

    /// Waits until the queue document reaches a final state.
    /// Runs the `importd` binary on this test's stack (errors-only log):
    /// exit code, stdout, stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = self
            .binary(args)
            .env("IMPORTD__LOG__FILTER", "error")
            .output()
            .expect("binary runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn wait_final(&self, id: ObjectId, timeout: Duration) -> Document {
        self.wait_queue(id, timeout, "final", |q| {
            matches!(
                q.get_str("status"),
                Ok("completed" | "failed" | "cancelled")
            )
        })
        .await
    }

    /// Polls the queue document until `done` holds; fails the test naming
    /// `what` after `timeout`.
    pub async fn wait_queue(
        &self,
        id: ObjectId,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Document) -> bool,
    ) -> Document {
        let start = Instant::now();
        loop {
            let q = self.queue(id).await;
            if done(&q) {
                return q;
            }
            assert!(
                start.elapsed() < timeout,
                "import {id} not {what} after {timeout:?}: {q}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes a finished import pending again with no checkpoint, as if
    /// its first run never ended: the next claim processes the whole file.
    pub async fn replay_from_start(&self, id: ObjectId) {
        self.queues()
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "status": "pending", "in_progress": false }, "$unset": { "checkpoint": "", "progress": "" } },
            )
            .await
            .unwrap();
    }

    /// The import's `csv_imports` summary.
    pub async fn summary(&self, id: ObjectId) -> Document {
        self.coll(collections::CSV_IMPORTS)
            .find_one(doc! { "queue_id": id })
            .await
            .unwrap()
            .expect("csv_imports summary")
    }

    pub async fn find_all(&self, coll: &str, filter: Document) -> Vec<Document> {
        self.coll(coll)
            .find(filter)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    /// A stage of the test pipeline, as the dashboard would have made it.
    pub async fn add_stage(&self, name: &str, label: &str) {
        self.coll(collections::PIPELINE_STAGES)
            .insert_one(doc! {
                "account_id": self.account_id, "pipeline_id": self.pipeline_id,
                "name": name, "label": label, "order": 1,
            })
            .await
            .unwrap();
    }

    pub async fn count(&self, coll: &str, filter: Document) -> u64 {
        self.coll(coll).count_documents(filter).await.unwrap()
    }

    /// Stops daemons and drops the test database.
    pub async fn cleanup(mut self) {
        for t in self.daemons.drain(..) {
            t.cancel();
        }
        let _ = self.db.drop().await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for t in &self.daemons {
            t.cancel();
        }
    }
}

pub fn get_i64(d: &Document, path: &str) -> i64 {
    let mut cur = d;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .get_document(p)
            .unwrap_or_else(|_| panic!("{path} in {d}"));
    }
    let last = parts[parts.len() - 1];
    match cur.get(last) {
        Some(bson::Bson::Int64(v)) => *v,
        Some(bson::Bson::Int32(v)) => i64::from(*v),
        Some(bson::Bson::Double(v)) => *v as i64,
        other => panic!("{path} is {other:?} in {d}"),
    }
}

/// A real SMTP server (aiosmtpd, Maildir handler) on a free port, owned by
/// one test, so a test can stop and restart it without touching others.
pub struct SmtpCatcher {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

/// One received message, parsed by Python's `email` module.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub text: String,
    pub html: String,
}

impl SmtpCatcher {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        c.restart().await;
        c
    }

    pub async fn restart(&mut self) {
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{}", self.port),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(self.dir.path().join("mail"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("aiosmtpd (scripts/stack.sh installs it)");
        self.child = Some(child);
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "aiosmtpd did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn messages(&self) -> Vec<Mail> {
        let dir = self.dir.path().join("mail").join("new");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            // The default policy unfolds and decodes headers as a mail
            // client shows them.
            let script = "import email,email.policy,sys,json\n\
                m=email.message_from_binary_file(open(sys.argv[1],'rb'),policy=email.policy.default)\n\
                parts={p.get_content_type():p.get_payload(decode=True).decode() for p in m.walk() if not p.is_multipart()}\n\
                h=lambda k:'' if m[k] is None else str(m[k])\n\
                print(json.dumps({'to':h('To'),'subject':h('Subject'),'message_id':h('Message-ID'),'text':parts.get('text/plain',''),'html':parts.get('text/html','')}))";
            let o = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(e.path())
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("parsable message");
            out.push(Mail {
                to: v["to"].as_str().unwrap_or_default().to_owned(),
                subject: v["subject"].as_str().unwrap_or_default().to_owned(),
                message_id: v["message_id"].as_str().unwrap_or_default().to_owned(),
                text: v["text"].as_str().unwrap_or_default().to_owned(),
                html: v["html"].as_str().unwrap_or_default().to_owned(),
            });
        }
        out
    }

    /// Waits until `n` messages arrived, then a little longer to catch extras.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let start = Instant::now();
        while self.messages().len() < n {
            assert!(
                start.elapsed() < timeout,
                "{} of {n} messages after {timeout:?}",
                self.messages().len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.messages()
    }
}

impl Drop for SmtpCatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Settings pointing at a test's own SMTP server, with fast mail retries.
pub fn settings_with_smtp(port: u16) -> Settings {
    let mut s = test_settings();
    s.smtp.port = port;
    s.smtp.host = "127.0.0.1".into();
    s.smtp.tls = importd::config::SmtpTls::None;
    s.notify.retry_attempts = 3;
    s.notify.retry_min_delay = Duration::from_millis(300);
    s.notify.retry_max_delay = Duration::from_millis(600);
    s.notify.redeliver_after = Duration::from_secs(1);
    s
}
