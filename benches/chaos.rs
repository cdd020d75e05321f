//! Chaos run against the local stack (`scripts/chaos.sh`): 3 daemons, 5
//! imports of `CHAOS_ROWS` rows (default 200,000, ~1 % bad; four of deals
//! naming 20,000 shared contacts, one contacts import of the same emails
//! under `update`), `kill -9` of a
//! random daemon at random moments (at least `CHAOS_KILLS`, default 10),
//! each restarted at once. With `CHAOS_INFRA=1` it then also kills and
//! restarts MongoDB and stops the S3 server for 20 s during a further import.
//!
//! Checks at the end, printing each: every import completed; deals per
//! import = valid rows; no `(queue_id, line)` twice; per-line outcomes
//! complete (imported + failed = rows, failed = the planted lines); the
//! contacts import's lines all accounted for and its created contacts
//! counted once; one contact per email, each counted as created by exactly
//! one import; exactly one summary email per import. Exit code 1 if any
//! check fails.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{Document, doc};
use futures::TryStreamExt;
use importd::config::{Settings, Source};
use importd::domain::{collections, deal_id_range};
use rand::Rng;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Distinct contact emails of the files: every import names contacts the
/// others name too, so imports race on creating them.
const CONTACTS: usize = 20_000;

/// Writes a file; returns the number of bad rows (every 97th). Adds the
/// contact of each valid row to `contacts`.
fn generate(path: &Path, rows: usize, contacts: &mut HashSet<usize>) -> u64 {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(w, "Name,Value,Stage,Notes,Contact").unwrap();
    let mut bad = 0;
    let mut line = String::new();
    for i in 0..rows {
        line.clear();
        if i % 97 == 13 {
            bad += 1;
            let _ = writeln!(
                line,
                "Deal {i},not-a-number,Stage {},\"two\nlines\",c{}@chaos.example",
                i % 6,
                i % CONTACTS
            );
        } else {
            contacts.insert(i % CONTACTS);
            let _ = writeln!(
                line,
                "Deal {i},{},Stage {},plain,C{}@Chaos.example",
                i * 7,
                i % 6,
                i % CONTACTS
            );
        }
        w.write_all(line.as_bytes()).unwrap();
    }
    w.flush().unwrap();
    bad
}

/// Writes a contacts file naming the same emails as the deals files (every
/// 97th row an invalid email); returns the number of bad rows.
fn generate_contacts(path: &Path, rows: usize, contacts: &mut HashSet<usize>) -> u64 {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(w, "Email,Full Name,Phone").unwrap();
    let mut bad = 0;
    for i in 0..rows {
        if i % 97 == 13 {
            bad += 1;
            writeln!(w, "not-an-email-{i},Bad {i},{i}").unwrap();
        } else {
            contacts.insert(i % CONTACTS);
            writeln!(w, "c{}@chaos.example,First{i} Last,{i}", i % CONTACTS).unwrap();
        }
    }
    w.flush().unwrap();
    bad
}

/// A contacts import (`update`: rows naming one email apply in file order).
fn contacts_request(
    file: PathBuf,
    demo: &importd::cli::demo::DemoAccount,
) -> importd::cli::enqueue::Request {
    importd::cli::enqueue::Request {
        kind: importd::domain::RecordKind::Contacts,
        pipeline_id: None,
        mappings: Some(
            [
                ("Email", "email"),
                ("Full Name", "name"),
                ("Phone", "phone"),
            ]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        ),
        duplicate_strategy: Some("update".into()),
        ..request(file, demo)
    }
}

fn request(
    file: PathBuf,
    demo: &importd::cli::demo::DemoAccount,
) -> importd::cli::enqueue::Request {
    importd::cli::enqueue::Request {
        file,
        kind: importd::domain::RecordKind::Deals,
        pipeline_id: Some(demo.pipeline_id),
        account_id: demo.account_id,
        user_id: demo.user_id,
        parent_account: None,
        client_id: None,
        mappings: Some(
            [
                ("Name", "name"),
                ("Value", "value"),
                ("Stage", "stage_id"),
                ("Notes", "description"),
                ("Contact", "contact_email"),
            ]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        ),
        tags: vec!["chaos".into()],
        duplicate_strategy: None,
        dry_run: false,
    }
}

struct Daemons {
    db: String,
    children: Vec<Child>,
    starts: usize,
}

impl Daemons {
    fn spawn(&mut self, slot: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root().join(format!("bench/results/chaos-daemon-{slot}.log")))
            .unwrap();
        let child = Command::new(root().join("target/release/importd"))
            .arg("run")
            .env("IMPORTD_CONFIG_DIR", root().join("config"))
            .env("IMPORTD__MONGODB__DATABASE", &self.db)
            .env("IMPORTD__SCHEDULER__TICK", "* * * * * *")
            .env("IMPORTD__SCHEDULER__LEASE_SECONDS", "6")
            .env("IMPORTD__SCHEDULER__RESCUE_INTERVAL_SECONDS", "1")
            .env("IMPORTD__SCHEDULER__MAX_ATTEMPTS", "100")
            .env("IMPORTD__IMPORT__PROGRESS_INTERVAL_MS", "200")
            .env("IMPORTD__NOTIFY__REDELIVER_AFTER_SECONDS", "2")
            .env("IMPORTD__LOG__FORMAT", "json")
            .env("IMPORTD__HTTP__ENABLED", "false")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("target/release/importd");
        self.starts += 1;
        if slot < self.children.len() {
            self.children[slot] = child;
        } else {
            self.children.push(child);
        }
    }

    fn kill9(&mut self, slot: usize) {
        let c = &mut self.children[slot];
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }
}

async fn states(db: &mongodb::Database, ids: &[ObjectId]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let d = db
            .collection::<Document>(collections::QUEUES)
            .find_one(doc! { "_id": id })
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        out.push(d.get_str("status").unwrap_or("?").to_owned());
    }
    out
}

fn stack(cmd: &[&str]) {
    let ok = Command::new("bash")
        .args(cmd)
        .current_dir(root())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{cmd:?} failed");
}

fn pid_of(name: &str) -> Option<String> {
    std::fs::read_to_string(root().join(format!(".stack/pids/{name}.pid")))
        .ok()
        .map(|s| s.trim().to_owned())
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("CHAOS_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let min_kills: usize = std::env::var("CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let infra = std::env::var_os("CHAOS_INFRA").is_some();
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let mut settings = Settings::load(&Source {
        dir: root().join("config"),
        env: "local".into(),
    })
    .unwrap();
    settings.mongodb.database = format!("importd_chaos_{stamp}");
    std::fs::create_dir_all(root().join("bench/results")).unwrap();
    let svc = importd::app::services(settings.clone()).await.unwrap();
    let db = svc.db.clone();
    importd::db::ensure_indexes(&db).await.unwrap();
    let demo = importd::cli::demo::DemoAccount::default();
    let email = format!("chaos-{stamp}@example.com");
    importd::cli::demo::seed(&db, &demo, &email).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let imports = if infra { 6 } else { 5 };
    let mut ids = Vec::new();
    let mut planted = HashMap::new();
    let mut contacts = HashSet::new();
    // The last import of the daemon phase is a contacts import of the same
    // emails, racing the deals imports' contact creation.
    let contacts_import = if infra { imports - 2 } else { imports - 1 };
    for n in 0..imports {
        let path = dir.path().join(format!("chaos-{stamp}-{n}.csv"));
        let req = if n == contacts_import {
            let bad = generate_contacts(&path, rows, &mut contacts);
            planted.insert(n, bad);
            contacts_request(path, &demo)
        } else {
            let bad = generate(&path, rows, &mut contacts);
            planted.insert(n, bad);
            request(path, &demo)
        };
        let id = importd::cli::enqueue::enqueue(&db, &svc.storage, &req)
            .await
            .unwrap();
        ids.push(id);
        if infra && n == imports - 2 {
            break; // the last one is enqueued for the infra phase
        }
    }

    let mut daemons = Daemons {
        db: settings.mongodb.database.clone(),
        children: Vec::new(),
        starts: 0,
    };
    for slot in 0..3 {
        daemons.spawn(slot);
    }
    let started = Instant::now();
    let mut kills = 0;
    let mut rng = rand::rng();
    loop {
        let s = states(&db, &ids).await;
        let done = s.iter().all(|s| s == "completed" || s == "failed");
        if done && kills >= min_kills {
            break;
        }
        if done {
            eprintln!(
                "all imports final after {kills} kills; fewer than {min_kills}: use more rows"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "chaos run did not finish: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
        let slot = rng.random_range(0..3);
        daemons.kill9(slot);
        kills += 1;
        let progress: Vec<String> = s.iter().map(|x| x.chars().take(4).collect()).collect();
        eprintln!(
            "[{:>5.1}s] kill -9 daemon {slot} (kill #{kills}); states {progress:?}",
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        daemons.spawn(slot);
    }
    let daemon_phase = started.elapsed();

    if infra {
        let n = imports - 1;
        let path = dir.path().join(format!("chaos-{stamp}-{n}.csv"));
        let bad = generate(&path, rows * 2, &mut contacts);
        planted.insert(n, bad);
        let req = request(path, &demo);
        let id = importd::cli::enqueue::enqueue(&db, &svc.storage, &req)
            .await
            .unwrap();
        ids.push(id);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mongo = pid_of("mongodb").expect("MongoDB started by this checkout's stack");
        eprintln!("kill -9 MongoDB (pid {mongo}); restarting");
        let _ = Command::new("kill").args(["-9", &mongo]).status();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stack(&["scripts/stack.sh", "up"]);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let s3 = pid_of("s3").expect("Garage started by this checkout's stack");
        eprintln!("stopping S3 (pid {s3}) for 20 s");
        let _ = Command::new("kill").args(["-STOP", &s3]).status();
        tokio::time::sleep(Duration::from_secs(20)).await;
        let _ = Command::new("kill").args(["-CONT", &s3]).status();
        eprintln!("S3 back");
        let t = Instant::now();
        while states(&db, &ids)
            .await
            .iter()
            .any(|s| s != "completed" && s != "failed")
        {
            assert!(
                t.elapsed() < Duration::from_secs(900),
                "infra phase did not finish"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut alive = 0;
        for c in &mut daemons.children {
            if matches!(c.try_wait(), Ok(None)) {
                alive += 1;
            }
        }
        println!("infra phase: daemons alive after MongoDB kill and S3 stop: {alive} of 3");
    }

    // Exactly-once email: wait until every notification left `pending`.
    let t = Instant::now();
    loop {
        let pending = db
            .collection::<Document>(collections::QUEUES)
            .count_documents(
                doc! { "_id": { "$in": &ids }, "notify.state": { "$in": ["pending", "sending"] } },
            )
            .await
            .unwrap();
        if pending == 0 || t.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for slot in 0..daemons.children.len() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(daemons.children[slot].id().to_string())
            .status();
        let _ = daemons.children[slot].wait();
    }

    let mut ok = true;
    let mut check = |name: String, pass: bool| {
        println!("{} {name}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
    };
    let mut contacts_created = 0;
    let maildir = std::env::var_os("IMPORTD_STACK_MAILDIR")
        .map_or_else(|| root().join(".stack/mail"), PathBuf::from)
        .join("new");
    let mails: Vec<String> = std::fs::read_dir(&maildir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    for (n, id) in ids.iter().enumerate() {
        let q = db
            .collection::<Document>(collections::QUEUES)
            .find_one(doc! { "_id": id })
            .await
            .unwrap()
            .unwrap();
        let rows_here = if infra && n == ids.len() - 1 {
            rows * 2
        } else {
            rows
        } as u64;
        let bad = planted[&n];
        check(
            format!(
                "import {n}: completed (attempts {})",
                q.get_i64("attempts").unwrap_or(0)
            ),
            q.get_str("status") == Ok("completed"),
        );
        let file = format!("chaos-{stamp}-{n}.csv");
        let count = mails
            .iter()
            .filter(|m| m.contains(&format!("({file})")))
            .count();
        let message_id = format!("<import-summary.{}@importd>", id.to_hex());
        let same_id = mails.iter().filter(|m| m.contains(&message_id)).count();
        check(
            format!(
                "import {n}: summary emails to {email}: {count} (with its Message-ID: {same_id})"
            ),
            count == 1,
        );
        if n == contacts_import {
            let t = importd::outcomes::totals(&db, *id).await.unwrap();
            contacts_created += t.contacts_created;
            let created = db
                .collection::<Document>(collections::CONTACTS)
                .count_documents(doc! { "import.queue_id": id })
                .await
                .unwrap();
            check(
                format!(
                    "import {n} (contacts): imported {} + updated {} + skipped {} + failed {} = rows {rows_here}, failed = planted {bad}, contacts created {created} = imported",
                    t.imported, t.updated, t.skipped, t.failed
                ),
                t.imported + t.updated + t.skipped + t.failed == rows_here
                    && t.failed == bad
                    && t.skipped == 0
                    && created == t.imported
                    && t.contacts_created == t.imported,
            );
            continue;
        }
        let (lo, hi) = deal_id_range(id);
        let deals = db
            .collection::<Document>(collections::DEALS)
            .count_documents(doc! { "_id": { "$gte": lo, "$lte": hi } })
            .await
            .unwrap();
        check(
            format!("import {n}: deals {deals} = valid rows {}", rows_here - bad),
            deals == rows_here - bad,
        );
        let distinct: Vec<Document> = db
            .collection::<Document>(collections::DEALS)
            .aggregate([
                doc! { "$match": { "_id": { "$gte": lo, "$lte": hi } } },
                doc! { "$group": { "_id": "$import.line" } },
                doc! { "$count": "n" },
            ])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let distinct = distinct
            .first()
            .and_then(|d| d.get_i32("n").ok().map(i64::from).or(d.get_i64("n").ok()))
            .unwrap_or(0);
        check(
            format!("import {n}: no (queue_id, line) twice ({distinct} distinct lines)"),
            distinct as u64 == deals,
        );
        let t = importd::outcomes::totals(&db, *id).await.unwrap();
        contacts_created += t.contacts_created;
        let linked = db
            .collection::<Document>(collections::DEALS)
            .count_documents(
                doc! { "_id": { "$gte": lo, "$lte": hi }, "contact_id": { "$exists": true } },
            )
            .await
            .unwrap();
        check(
            format!("import {n}: every deal linked to its contact ({linked})"),
            linked == deals,
        );
        check(
            format!(
                "import {n}: outcomes imported {} + failed {} = rows {rows_here}, failed = planted {bad}",
                t.imported, t.failed
            ),
            t.imported + t.failed == rows_here && t.failed == bad && t.imported == deals,
        );
    }
    let stored = db
        .collection::<Document>(collections::CONTACTS)
        .count_documents(doc! { "account_id": demo.account_id })
        .await
        .unwrap();
    let emails = db
        .collection::<Document>(collections::CONTACTS)
        .distinct("email", doc! { "account_id": demo.account_id })
        .await
        .unwrap()
        .len() as u64;
    check(
        format!(
            "contacts: {stored} stored, {emails} distinct emails, {} named by valid rows, {contacts_created} counted as created",
            contacts.len()
        ),
        stored == contacts.len() as u64 && emails == stored && contacts_created == stored,
    );
    println!(
        "\n{} imports of {rows} rows, 3 daemons, {kills} kill -9 ({} daemon starts), daemon phase {:.1?}",
        ids.len(),
        daemons.starts,
        daemon_phase
    );
    std::process::exit(if ok { 0 } else { 1 });
}
