//! Logging set-up: a `tracing` subscriber writing JSON (journald) or pretty
//! lines to stdout, filtered by `RUST_LOG` or `log.filter`.
//!
//! Rules for every log line in the crate: ids, counts, line numbers and error
//! codes only; never a cell value (customer PII) and never a secret.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Installs the global subscriber. Idempotent: later calls (tests) are no-ops.
pub fn init<W>(format: LogFormat, default_filter: &str, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// Routes panics to the log as one line naming where, not what: a panic's
/// message may quote the data it choked on (a cell value). For the binary
/// only (a test harness wants the messages of its assertions).
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(at, "Panic (its message is not logged: it may quote data)");
    }));
}

/// Writes an error and its whole source chain on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Prometheus metrics (`GET /metrics`). Names and labels are a contract
/// with dashboards and alerts: add, never rename.
pub mod metrics {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

    /// Counter: imports claimed by this daemon.
    pub const CLAIMED: &str = "importd_imports_claimed_total";
    /// Counter, label `end` (`completed`, `failed`, `cancelled`,
    /// `released`, `lease_lost`): how runs of an import ended.
    pub const RUNS: &str = "importd_import_runs_total";
    /// Gauge: imports running in this daemon.
    pub const RUNNING: &str = "importd_imports_running";
    /// Counter, label `outcome` (`imported`, `updated`, `skipped`,
    /// `failed`): rows with a committed outcome.
    pub const ROWS: &str = "importd_rows_total";
    /// Histogram: seconds to write one batch (deals and its outcomes).
    pub const BATCH_SECONDS: &str = "importd_batch_write_seconds";
    /// Counter: batches of a resumed run not written again, their outcomes
    /// recorded by an earlier run reused.
    pub const BATCHES_REUSED: &str = "importd_batches_reused_total";
    /// Counter: claim ticks that failed (MongoDB unreachable...).
    pub const TICK_ERRORS: &str = "importd_claim_tick_errors_total";
    /// Counter, labels `channel` (`email`, `webhook`) and `result`
    /// (`sent`, `skipped`, `failed`, `retry`): notification rounds.
    pub const NOTIFICATIONS: &str = "importd_notifications_total";
    /// Gauge: seconds the database server's clock is ahead of this host's
    /// (negative: behind), as last measured; leases use the server's.
    pub const CLOCK_OFFSET: &str = "importd_clock_offset_seconds";
    /// Counter: imports whose per-line data this daemon purged
    /// (`retention.days`).
    pub const PURGED: &str = "importd_imports_purged_total";
    /// Counter: purges that failed (tried again an hour later).
    pub const PURGE_FAILURES: &str = "importd_purge_failures_total";

    /// The process-wide recorder, installed on first use. Metrics recorded
    /// before (or without) it are dropped, which is harmless.
    pub fn handle() -> &'static PrometheusHandle {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        HANDLE.get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(BATCH_SECONDS.into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ],
                )
                .expect("the bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was set first; this handle then
            // renders an empty page rather than taking the process down.
            let _ = ::metrics::set_global_recorder(recorder);
            handle
        })
    }
}
