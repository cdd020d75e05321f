//! The `importd` binary: parse the command line, load configuration, set up
//! logging, dispatch. The only home of `anyhow` and of exit codes
//! (0 ok, 1 nothing found / import not completed, 2 error).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bson::oid::ObjectId;
use clap::{Parser, Subcommand, ValueEnum};
use importd::cli::{demo, enqueue, logs, status, undo};
use importd::config::{Settings, Source};
use importd::domain::RecordKind;
use importd::{app, db, fetch, telemetry};

#[derive(Parser)]
#[command(
    name = "importd",
    version,
    about = "Imports CRM deals and contacts from CSV files in S3 into MongoDB"
)]
struct Cli {
    /// Directory of default.toml and the environment files
    /// (default: $IMPORTD_CONFIG_DIR or ./config).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum SourceArg {
    Deals,
    Contacts,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: claim and import pending imports until SIGTERM.
    Run,
    /// Print the effective configuration (secrets masked) and check it.
    CheckConfig,
    /// Upload a CSV and enqueue an import, as the dashboard does.
    Enqueue {
        /// The CSV file.
        file: PathBuf,
        #[arg(long, value_enum, default_value = "deals")]
        source: SourceArg,
        /// Target pipeline id (deals).
        #[arg(long)]
        pipeline: Option<ObjectId>,
        /// Account id.
        #[arg(long)]
        account: ObjectId,
        /// Importing user id.
        #[arg(long)]
        user: ObjectId,
        /// JSON object {"CSV header": "field or custom field id"};
        /// default: match headers to field names.
        #[arg(long)]
        mapping: Option<PathBuf>,
        /// Comma-separated tags for every record.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// create | skip | update
        #[arg(long)]
        duplicate_strategy: Option<String>,
        /// Check every line and report, import nothing.
        #[arg(long)]
        dry_run: bool,
        /// Wait until the import is final and print its status.
        #[arg(long)]
        wait: bool,
    },
    /// Show an import's status, progress and first failed lines.
    Status {
        /// Queue document id.
        id: ObjectId,
    },
    /// What happened to an import's lines: per batch counts and failed
    /// lines, only the failed lines, or one line.
    Logs {
        /// Queue document id.
        id: ObjectId,
        /// Only the failed lines (all of them).
        #[arg(long, conflicts_with = "line")]
        failed: bool,
        /// One physical line of the file (the header is line 1).
        #[arg(long)]
        line: Option<u64>,
    },
    /// Undo a finished import: remove the records it created (those
    /// changed since are kept), and the stages it created that no deal
    /// uses; a running import is cancelled first. Prints what was done.
    Undo {
        /// Queue document id.
        id: ObjectId,
        /// Seconds to wait for a running import to stop, or for a daemon
        /// already undoing it.
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// Seed a demo account and import a CSV into it (local use).
    Demo {
        /// The CSV file.
        #[arg(default_value = "samples/deals.csv")]
        file: PathBuf,
        /// What the file holds.
        #[arg(long, value_enum, default_value = "deals")]
        source: SourceArg,
        /// Mapping JSON (default: samples/deals.mapping.json if it exists).
        #[arg(long)]
        mapping: Option<PathBuf>,
        /// Address of the demo user (the summary email's recipient).
        #[arg(long, default_value = "demo@example.com")]
        email: String,
        /// Seconds to wait for the import to finish.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = match &cli.config {
        Some(dir) => Source::with_dir(dir),
        None => Source::from_env(),
    };
    let settings = match Settings::load(&source) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("importd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::CheckConfig = cli.command {
        print!("{}", settings.masked());
        return ExitCode::SUCCESS;
    }
    // The daemon logs to stdout (the journal); one-shot commands to stderr,
    // so that what they print (a queue id, an import's lines) stays clean.
    match cli.command {
        Command::Run => telemetry::init(settings.log.format, &settings.log.filter, std::io::stdout),
        _ => telemetry::init(settings.log.format, &settings.log.filter, std::io::stderr),
    }
    telemetry::log_panics();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("importd: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("importd: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    if let Command::Run = command {
        app::run(settings).await.context("daemon")?;
        return Ok(ExitCode::SUCCESS);
    }
    let db = db::connect(&settings.mongodb).await?;
    let code = support(command, &settings, &db).await;
    // Close the driver (it ends its sessions) while the runtime still runs:
    // a client dropped at exit races the runtime's shutdown and can panic.
    db.client().clone().shutdown().await;
    code
}

/// The one-shot commands, on one connection.
async fn support(
    command: Command,
    settings: &Settings,
    db: &mongodb::Database,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig | Command::Run => unreachable!("handled before"),
        Command::Enqueue {
            file,
            source,
            pipeline,
            account,
            user,
            mapping,
            tags,
            duplicate_strategy,
            dry_run,
            wait,
        } => {
            let kind = match source {
                SourceArg::Deals => RecordKind::Deals,
                SourceArg::Contacts => RecordKind::Contacts,
            };
            if kind == RecordKind::Deals && pipeline.is_none() {
                bail!("--pipeline is required for deals");
            }
            let storage = fetch::Storage::new(&settings.s3)?;
            let mappings = mapping.as_deref().map(enqueue::read_mapping).transpose()?;
            let req = enqueue::Request {
                file,
                kind,
                pipeline_id: pipeline,
                account_id: account,
                user_id: user,
                parent_account: None,
                client_id: None,
                mappings,
                tags,
                duplicate_strategy,
                dry_run,
            };
            let id = enqueue::enqueue(db, &storage, &req)
                .await
                .context("enqueue")?;
            println!("{}", id.to_hex());
            if wait {
                return print_final(db, id, Duration::from_secs(3600)).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Undo { id, wait } => {
            let claimer = importd::claim::Claimer::new(
                db,
                format!("{}:undo", importd::claim::Claimer::default_owner()),
                settings.scheduler.lease,
            );
            // Its lease is written in the database server's time, as the
            // daemons' are (best effort: the host's clock otherwise).
            let _ = claimer.clock().sync(db).await;
            // Ctrl-C or SIGTERM stops after the batch under way and gives
            // the undo back, to be resumed.
            let stop = tokio_util::sync::CancellationToken::new();
            let on_signal = stop.clone();
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                on_signal.cancel();
            });
            let outcome = undo::undo(
                db,
                &claimer,
                id,
                Duration::from_secs(wait),
                &stop,
                &mut |n| eprintln!("{n}"),
            )
            .await
            .context("undo")?;
            Ok(match outcome {
                undo::Outcome::Done(text) => {
                    println!("undo of import {}: done", id.to_hex());
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                undo::Outcome::Refused(reason) => {
                    println!("undo of import {}: refused: {reason}", id.to_hex());
                    ExitCode::from(1)
                }
                undo::Outcome::NotFound => {
                    eprintln!("no import {id}");
                    ExitCode::from(1)
                }
                undo::Outcome::Pending => {
                    println!(
                        "undo of import {}: requested, not finished yet (run again to follow it)",
                        id.to_hex()
                    );
                    ExitCode::from(1)
                }
                undo::Outcome::Released => {
                    println!(
                        "undo of import {}: interrupted; run again to resume",
                        id.to_hex()
                    );
                    ExitCode::from(1)
                }
            })
        }
        Command::Status { id } => match status::status(db, id).await? {
            Some(s) => {
                print!("{}", s.render());
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("no import {id}");
                Ok(ExitCode::from(1))
            }
        },
        Command::Logs { id, failed, line } => {
            if let Some(line) = line {
                return Ok(match importd::outcomes::line_outcome(db, id, line).await? {
                    Some(o) => {
                        let (kind, dry_run) = logs::record_kind(db, id).await?;
                        if dry_run {
                            println!("{}", logs::format_checked(&id, line, &o, kind));
                        } else {
                            println!("{}", logs::format_outcome(line, &o, kind));
                        }
                        ExitCode::SUCCESS
                    }
                    None => {
                        match status::status(db, id).await?.and_then(|s| s.purged()) {
                            Some(purged) => {
                                eprintln!("no outcome for line {line} of import {id}: {purged}")
                            }
                            None => eprintln!(
                                "no outcome for line {line} of import {id} (not a record's first line, or not processed yet)"
                            ),
                        }
                        ExitCode::from(1)
                    }
                });
            }
            let filter = if failed {
                logs::Filter::Failed
            } else {
                logs::Filter::All
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let batches = match logs::write_logs(db, id, filter, &mut out).await {
                // `importd logs ID | head`: the reader has what it wanted.
                Err(logs::Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS);
                }
                batches => batches?,
            };
            if batches == 0
                && let Some(purged) = status::status(db, id).await?.and_then(|s| s.purged())
            {
                eprintln!("no outcomes for import {id}: {purged}");
                return Ok(ExitCode::from(1));
            }
            if batches == 0 && !failed {
                eprintln!("no outcomes for import {id} (no such import, or nothing processed yet)");
                return Ok(ExitCode::from(1));
            }
            if batches == 0 && status::status(db, id).await?.is_none() {
                // No failed line: fine for an import, not for a wrong id.
                eprintln!("no import {id}");
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            file,
            source,
            mapping,
            email,
            timeout,
        } => {
            let storage = fetch::Storage::new(&settings.s3)?;
            let account = demo::DemoAccount::default();
            demo::seed(db, &account, &email)
                .await
                .context("seeding the demo account")?;
            let mapping = mapping.or_else(|| {
                let p = file.with_extension("mapping.json");
                p.is_file().then_some(p)
            });
            let mappings = mapping.as_deref().map(enqueue::read_mapping).transpose()?;
            let kind = match source {
                SourceArg::Deals => RecordKind::Deals,
                SourceArg::Contacts => RecordKind::Contacts,
            };
            let req = enqueue::Request {
                file: file.clone(),
                kind,
                pipeline_id: (kind == RecordKind::Deals).then_some(account.pipeline_id),
                account_id: account.account_id,
                user_id: account.user_id,
                parent_account: None,
                client_id: None,
                mappings,
                tags: vec!["demo".into()],
                duplicate_strategy: None,
                dry_run: false,
            };
            let id = enqueue::enqueue(db, &storage, &req)
                .await
                .context("enqueue")?;
            println!(
                "Enqueued {} as import {}; waiting for the daemon…",
                file.display(),
                id.to_hex()
            );
            let code = print_final(db, id, Duration::from_secs(timeout)).await?;
            let dbname = &settings.mongodb.database;
            let records = match kind {
                RecordKind::Deals => {
                    "deals {'import.queue_id': …}, contacts {'import.queue_id': …} (created) and deals' contact_id"
                }
                RecordKind::Contacts => {
                    "contacts {'import.queue_id': …} (created) and {'last_import.queue_id': …} (updated)"
                }
            };
            println!(
                "\nWhere to look:\n  importd status {id}\n  importd logs {id}\n  importd undo {id}   (takes the import back: removes what it created)\n  MongoDB {dbname}: queues {{_id: ObjectId('{id}')}}, csv_imports {{queue_id: …}}, import_lines {{queue_id: …}}, {records}"
            );
            Ok(code)
        }
    }
}

async fn print_final(
    db: &mongodb::Database,
    id: ObjectId,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let s = status::wait_final(db, id, timeout)
        .await?
        .context("the queue document vanished")?;
    print!("{}", s.render());
    if s.state() == "completed" {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}
