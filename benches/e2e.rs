//! End-to-end benchmark against the local stack (`scripts/bench.sh`).
//!
//! In one run: (a) generates a deals CSV of `BENCH_ROWS` rows (default
//! 1,000,000) and uploads it; (b) measures the raw limit, `insert_many` of
//! the same number of equivalent deal documents straight through the driver
//! (batches of 1,000, unordered, two in flight like importd), each batch
//! after the contacts its deals link to (every row names a new contact, as
//! in the file: the worst case for importd's contact step); (c) measures
//! importd end to end (enqueue → completed) with the daemon as a separate
//! release process; (d) records the daemon's peak RSS (VmHWM) for 10,000
//! rows and for N, and claim latency (enqueue → processing); (e) measures
//! head-of-line blocking: a 100-row import enqueued while the big one runs.
//! Prints the figures and writes them as JSON under `bench/results/`.
//!
//! Not a test: it asserts nothing; the targets live in the README.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{DateTime, Document, doc};
use futures::StreamExt;
use importd::config::{Settings, Source};
use importd::domain::collections;

const STAGES: [&str; 8] = [
    "Lead",
    "Qualified",
    "Discovery",
    "Proposal",
    "Negotiation",
    "Contract Sent",
    "Closed Won",
    "Closed Lost",
];
const CUSTOM_A: &str = "65b000000000000000000a01";
const CUSTOM_B: &str = "65b000000000000000000a02";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes the file; returns its size and the checkpoint `(line, byte,
/// records)` just before the row at 90 %.
fn generate(path: &Path, rows: usize) -> std::io::Result<(u64, (u64, u64, u64))> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let header = "Deal Name,Value,Stage,Status,Contract Type,Close Date,Contact Email,Region,Source Campaign,Notes\n";
    w.write_all(header.as_bytes())?;
    let mut written = header.len() as u64;
    let mut at90 = (0, 0, 0);
    let mut line = String::with_capacity(256);
    for i in 0..rows {
        if i == rows * 9 / 10 {
            at90 = (i as u64 + 2, written, i as u64);
        }
        line.clear();
        let _ = writeln!(
            line,
            "Deal {i} for Customer {},\"{},{:03}.{:02}\",{},{},{},2026-{:02}-{:02},buyer{i}@example{}.com,{},campaign-{},Imported from the legacy CRM",
            i % 9973,
            1 + i % 97,
            i % 1000,
            i % 100,
            STAGES[i % 8],
            if i.is_multiple_of(3) {
                "Open"
            } else {
                "closed - won"
            },
            if i.is_multiple_of(2) {
                "Monthly"
            } else {
                "One Time"
            },
            1 + i % 12,
            1 + i % 28,
            i % 50,
            ["EMEA", "APAC", "AMER"][i % 3],
            i % 40,
        );
        w.write_all(line.as_bytes())?;
        written += line.len() as u64;
    }
    w.flush()?;
    Ok((std::fs::metadata(path)?.len(), at90))
}

fn mapping() -> Vec<(String, String)> {
    [
        ("Deal Name", "name"),
        ("Value", "value"),
        ("Stage", "stage_id"),
        ("Status", "status"),
        ("Contract Type", "contract_type"),
        ("Close Date", "expected_close_date"),
        ("Contact Email", "contact_email"),
        ("Region", CUSTOM_A),
        ("Source Campaign", CUSTOM_B),
        ("Notes", "description"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

/// The raw limit: the same documents importd writes, straight through the driver.
/// Returns rows/s and the CPU seconds of (server, this client) meanwhile.
/// `concurrency` batches in flight, as importd's `import.writers`.
async fn raw_insert(db: &mongodb::Database, rows: usize, concurrency: usize) -> (f64, f64, f64) {
    let coll = db.collection::<Document>("raw_deals");
    // Every row names a new contact, as in the generated file: the raw
    // loader inserts the contacts (under the same unique index importd
    // keeps), then the deals that link to them.
    let contacts = db.collection::<Document>("raw_contacts");
    contacts
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "account_id": 1, "email": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .expect("contacts index");
    let (account, pipeline, user, queue) = (
        ObjectId::new(),
        ObjectId::new(),
        ObjectId::new(),
        ObjectId::new(),
    );
    let stages: Vec<ObjectId> = (0..8).map(|_| ObjectId::new()).collect();
    let now = DateTime::now();
    let contact = move |i: usize| {
        doc! {
            "_id": importd::domain::contact_id(&queue, i as u64 + 2).unwrap(),
            "account_id": account, "email": format!("buyer{i}@example{}.com", i % 50),
            "first_name": "", "last_name": "", "owner": user, "created_by": user,
            "source": "csv", "tags": ["bench"], "additional_info": {},
            "import": { "queue_id": queue, "line": (i + 2) as i64 },
            "created_at": now, "updated_at": now,
        }
    };
    let make = move |i: usize| {
        let region = ["EMEA", "APAC", "AMER"][i % 3];
        doc! {
            "_id": importd::domain::deal_id(&queue, i as u64 + 2).unwrap(),
            "name": format!("Deal {i} for Customer {}", i % 9973),
            "value": (1 + i % 97) as f64 * 1000.0 + (i % 1000) as f64 + (i % 100) as f64 / 100.0,
            "stage_id": stages[i % 8],
            "status": if i.is_multiple_of(3) { "open" } else { "closed_won" },
            "contract_type": if i.is_multiple_of(2) { "monthly" } else { "one_time" },
            "expected_close_date": now,
            "description": "Imported from the legacy CRM",
            "contact_email": format!("buyer{i}@example{}.com", i % 50),
            "contact_id": importd::domain::contact_id(&queue, i as u64 + 2).unwrap(),
            "account_id": account, "pipeline_id": pipeline, "owner": user, "created_by": user,
            "source": "csv", "tags": ["bench"],
            "additional_info": { CUSTOM_A: region, CUSTOM_B: format!("campaign-{}", i % 40) },
            "import": { "queue_id": queue, "line": (i + 2) as i64 },
            "created_at": now, "updated_at": now,
        }
    };
    let (server0, client0) = (server_cpu(), cpu_seconds(std::process::id()).unwrap_or(0.0));
    let start = Instant::now();
    futures::stream::iter((0..rows).step_by(1000))
        .map(|from| {
            let (coll, contacts) = (coll.clone(), contacts.clone());
            let people: Vec<Document> = (from..(from + 1000).min(rows)).map(contact).collect();
            let docs: Vec<Document> = (from..(from + 1000).min(rows)).map(&make).collect();
            async move {
                contacts
                    .insert_many(people)
                    .ordered(false)
                    .await
                    .expect("raw contacts insert");
                coll.insert_many(docs)
                    .ordered(false)
                    .await
                    .expect("raw insert")
            }
        })
        .buffered(concurrency)
        .for_each(|_| async {})
        .await;
    (
        rows as f64 / start.elapsed().as_secs_f64(),
        server_cpu() - server0,
        cpu_seconds(std::process::id()).unwrap_or(0.0) - client0,
    )
}

/// User + system CPU seconds of a process (`/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Waits until the database server is quiet (under 5 % of a core for a
/// second, at most 90 s), so that no measurement pays for the background
/// work (checkpoints, eviction, dropped files) of the one before it.
async fn settle(client: &mongodb::Client) {
    let _ = client
        .database("admin")
        .run_command(bson::doc! { "fsync": 1 })
        .await;
    let start = Instant::now();
    let mut quiet = 0;
    while start.elapsed() < Duration::from_secs(90) && quiet < 2 {
        let before = server_cpu();
        tokio::time::sleep(Duration::from_secs(1)).await;
        quiet = if server_cpu() - before < 0.05 {
            quiet + 1
        } else {
            0
        };
    }
    eprintln!("server quiet after {:.1?}", start.elapsed());
}

/// CPU seconds used so far by the stack's MongoDB server (0 if unknown).
fn server_cpu() -> f64 {
    std::fs::read_to_string(root().join(".stack/pids/mongodb.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .and_then(cpu_seconds)
        .unwrap_or(0.0)
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn start_daemon(db: &str, log: &Path) -> Child {
    Command::new(root().join("target/release/importd"))
        .arg("run")
        .env("IMPORTD_CONFIG_DIR", root().join("config"))
        .env("IMPORTD__MONGODB__DATABASE", db)
        .env("IMPORTD__LOG__FORMAT", "json")
        .env("IMPORTD__HTTP__ENABLED", "false")
        .stdout(std::fs::File::create(log).expect("log file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("target/release/importd (scripts/bench.sh builds it)")
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

struct Run {
    claim_latency: Duration,
    /// CPU seconds of the database server, claim → completed.
    server_cpu: f64,
    /// CPU seconds of the daemon, start → completed.
    daemon_cpu: f64,
    /// Claim → completed.
    processing: Duration,
    total: Duration,
    rss_kb: u64,
    small_total: Option<Duration>,
}

async fn state(db: &mongodb::Database, id: ObjectId) -> String {
    db.collection::<Document>(collections::QUEUES)
        .find_one(doc! { "_id": id })
        .projection(doc! { "status": 1 })
        .await
        .unwrap()
        .and_then(|d| d.get_str("status").ok().map(str::to_owned))
        .unwrap_or_default()
}

/// One import in a fresh database and daemon process. `resume_at` sets a
/// checkpoint before the daemon starts, as if an earlier attempt had
/// committed everything before it.
async fn import_run(
    settings: &Settings,
    csv: &Path,
    with_small: Option<&Path>,
    resume_at: Option<(u64, u64, u64)>,
    tag: &str,
) -> Run {
    let db_name = format!("{}_{tag}", settings.mongodb.database);
    let mut s = settings.clone();
    s.mongodb.database = db_name.clone();
    let svc = importd::app::services(s).await.unwrap();
    let db = svc.db.clone();
    settle(db.client()).await;
    let demo = importd::cli::demo::DemoAccount::default();
    importd::cli::demo::seed(&db, &demo, "bench@example.com")
        .await
        .unwrap();
    importd::db::ensure_indexes(&db).await.unwrap();
    let req = |file: &Path| importd::cli::enqueue::Request {
        file: file.to_owned(),
        kind: importd::domain::RecordKind::Deals,
        pipeline_id: Some(demo.pipeline_id),
        account_id: demo.account_id,
        user_id: demo.user_id,
        parent_account: None,
        client_id: None,
        mappings: Some(mapping()),
        tags: vec!["bench".into()],
        duplicate_strategy: None,
        dry_run: false,
    };
    let log = root().join(format!("bench/results/daemon-{tag}.log"));
    let (daemon, id) = match resume_at {
        Some((line, byte, records)) => {
            let id = importd::cli::enqueue::enqueue(&db, &svc.storage, &req(csv))
                .await
                .unwrap();
            let checkpoint =
                doc! { "line": line as i64, "byte": byte as i64, "records": records as i64 };
            db.collection::<Document>(collections::QUEUES)
                .update_one(
                    doc! { "_id": id },
                    doc! { "$set": { "checkpoint": checkpoint } },
                )
                .await
                .unwrap();
            (start_daemon(&db_name, &log), id)
        }
        None => {
            let daemon = start_daemon(&db_name, &log);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let id = importd::cli::enqueue::enqueue(&db, &svc.storage, &req(csv))
                .await
                .unwrap();
            (daemon, id)
        }
    };
    let enqueued = Instant::now();
    while state(&db, id).await == "pending" {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let claim_latency = enqueued.elapsed();
    let claimed = Instant::now();
    let server_cpu_before = server_cpu();
    let mut small_total = None;
    if let Some(small) = with_small {
        // Head-of-line: once the big import is well under way.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let sid = importd::cli::enqueue::enqueue(&db, &svc.storage, &req(small))
            .await
            .unwrap();
        let t = Instant::now();
        while !matches!(state(&db, sid).await.as_str(), "completed" | "failed") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        small_total = Some(t.elapsed());
    }
    loop {
        match state(&db, id).await.as_str() {
            "completed" => break,
            "failed" | "cancelled" => panic!("bench import ended {}", state(&db, id).await),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let (total, processing) = (enqueued.elapsed(), claimed.elapsed());
    let rss_kb = vm_hwm_kb(daemon.id()).unwrap_or(0);
    let daemon_cpu = cpu_seconds(daemon.id()).unwrap_or(0.0);
    let server_cpu = server_cpu() - server_cpu_before;
    stop(daemon);
    // Each measurement starts from the same store: drop this run's database
    // (BENCH_KEEP=1 keeps them for inspection).
    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = db.drop().await;
    }
    Run {
        claim_latency,
        server_cpu,
        daemon_cpu,
        processing,
        total,
        rss_kb,
        small_total,
    }
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut settings = Settings::load(&Source {
        dir: root().join("config"),
        env: "local".into(),
    })
    .expect("config loads");
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    settings.mongodb.database = format!("importd_bench_{stamp}");
    std::fs::create_dir_all(root().join("bench/results")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (big, small, tenk) = (
        dir.path().join("deals-big.csv"),
        dir.path().join("deals-100.csv"),
        dir.path().join("deals-10k.csv"),
    );
    let t = Instant::now();
    let (bytes, at90) = generate(&big, rows).unwrap();
    generate(&small, 100).unwrap();
    generate(&tenk, 10_000).unwrap();
    eprintln!(
        "generated {rows} rows ({:.1} MB) in {:.1?}",
        bytes as f64 / 1e6,
        t.elapsed()
    );

    let raw_db = importd::db::connect(&settings.mongodb)
        .await
        .unwrap()
        .client()
        .database(&format!("{}_raw", settings.mongodb.database));
    // The raw limit is measured before and after importd's runs, and their
    // mean is the bar: this shared machine drifts by ±10 % over minutes.
    let raw_run = || async {
        settle(raw_db.client()).await;
        let r = raw_insert(&raw_db, rows, settings.import.writers.get()).await;
        eprintln!("raw insert_many: {:.0} rows/s", r.0);
        let _ = raw_db.drop().await;
        r
    };
    let (raw_before, raw_server_cpu, raw_client_cpu) = raw_run().await;

    let r10k = import_run(&settings, &tenk, None, None, "10k").await;
    eprintln!(
        "importd 10k: {:.2?}, peak RSS {} kB",
        r10k.total, r10k.rss_kb
    );
    let big_run = import_run(&settings, &big, Some(&small), None, "big").await;
    let resumed = import_run(&settings, &big, None, Some(at90), "resume90").await;
    eprintln!(
        "resumed at 90 %: {:.2?} (fresh: {:.2?})",
        resumed.processing, big_run.processing
    );
    let (raw_after, _, _) = raw_run().await;
    let raw = (raw_before + raw_after) / 2.0;
    let e2e = rows as f64 / big_run.total.as_secs_f64();
    let processing_rate = rows as f64 / big_run.processing.as_secs_f64();
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_owned())
            )
            .unwrap_or_default()
    );
    let result = serde_json::json!({
        "when": stamp,
        "machine": machine,
        "rows": rows,
        "batches_in_flight": settings.import.writers.get(),
        "file_bytes": bytes,
        "raw_insert_rows_per_s": raw.round(),
        "raw_insert_before_after_rows_per_s": [raw_before.round(), raw_after.round()],
        "importd_claim_to_completed_rows_per_s": processing_rate.round(),
        "importd_rows_per_s": e2e.round(),
        "ratio_importd_to_raw": (e2e / raw * 1000.0).round() / 1000.0,
        "importd_seconds": big_run.total.as_secs_f64(),
        "peak_rss_kb_10k": r10k.rss_kb,
        "peak_rss_kb_n": big_run.rss_kb,
        "rss_ratio_n_to_10k": (big_run.rss_kb as f64 / r10k.rss_kb.max(1) as f64 * 100.0).round() / 100.0,
        "claim_latency_ms": big_run.claim_latency.as_millis(),
        "claim_latency_10k_ms": r10k.claim_latency.as_millis(),
        "small_import_during_big_ms": big_run.small_total.map(|d| d.as_millis()),
        "fresh_processing_ms": big_run.processing.as_millis(),
        "resumed_at_90_percent_processing_ms": resumed.processing.as_millis(),
        "cpu_seconds": {
            "raw_server": raw_server_cpu,
            "raw_client": raw_client_cpu,
            "importd_server": big_run.server_cpu,
            "importd_daemon": big_run.daemon_cpu,
        },
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    println!(
        "\nraw insert_many      {raw:>10.0} rows/s   (mean of {raw_before:.0} before and {raw_after:.0} after)\nimportd end to end   {e2e:>10.0} rows/s   ratio {:.2}   (claim → completed: {processing_rate:.0} rows/s)\npeak RSS             {:>7} kB at 10k, {} kB at {rows}\nclaim latency        {:>7} ms\ncpu seconds          raw: server {raw_server_cpu:.1} + client {raw_client_cpu:.1}; importd: server {:.1} + daemon {:.1}\n100-row import while the big one runs: {:?}",
        e2e / raw,
        r10k.rss_kb,
        big_run.rss_kb,
        big_run.claim_latency.as_millis(),
        big_run.server_cpu,
        big_run.daemon_cpu,
        big_run.small_total
    );
    let path = root().join(format!("bench/results/{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    eprintln!("written {}", path.display());
}
