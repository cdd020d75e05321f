//! Why and how a run stops: the reasons (`Abort`), the shared stop signal,
//! and the heartbeat that renews the lease and watches for cancellation
//! and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::claim::{self, Lease};
use crate::domain::FileError;
use crate::fetch::{self};
use crate::parse::{self};
use crate::telemetry::error_chain;

/// Why a run stopped before the end of the file.
#[derive(Debug)]
pub(super) enum Abort {
    File(FileError),
    Transient(String),
    LeaseLost,
    Shutdown,
    Cancelled,
}

impl From<claim::Error> for Abort {
    fn from(e: claim::Error) -> Self {
        match e {
            claim::Error::LeaseLost { .. } => Self::LeaseLost,
            e => Self::Transient(error_chain(&e)),
        }
    }
}

impl From<mongodb::error::Error> for Abort {
    fn from(e: mongodb::error::Error) -> Self {
        // A non-transient database error is retried too: the lease is
        // released and the attempt cap ends a truly stuck import.
        Self::Transient(error_chain(&e))
    }
}

impl From<crate::stages::Error> for Abort {
    fn from(e: crate::stages::Error) -> Self {
        Self::Transient(error_chain(&e))
    }
}

impl From<fetch::Error> for Abort {
    fn from(e: fetch::Error) -> Self {
        match e {
            fetch::Error::NotFound => Self::File(FileError::ObjectNotFound),
            fetch::Error::Changed => Self::File(FileError::FileChanged),
            e => Self::Transient(error_chain(&e)),
        }
    }
}

impl From<parse::Error> for Abort {
    fn from(e: parse::Error) -> Self {
        match e {
            parse::Error::File(f) => Self::File(f),
            parse::Error::Io { source, .. } if fetch::is_changed(&source) => {
                Self::File(FileError::FileChanged)
            }
            e => Self::Transient(error_chain(&e)),
        }
    }
}

pub(super) const STOP_NONE: u8 = 0;
pub(super) const STOP_LEASE_LOST: u8 = 1;
pub(super) const STOP_CANCELLED: u8 = 2;
pub(super) const STOP_SHUTDOWN: u8 = 3;

/// Shared stop signal with its first reason.
#[derive(Clone)]
pub(super) struct Stop {
    /// Any reason to stop.
    pub(super) token: CancellationToken,
    /// The lease is lost (also after another reason): stop writing at once,
    /// even the batches a cancellation or shutdown lets finish.
    pub(super) lost: CancellationToken,
    reason: Arc<AtomicU8>,
}

impl Stop {
    pub(super) fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            lost: CancellationToken::new(),
            reason: Arc::new(AtomicU8::new(STOP_NONE)),
        }
    }
    pub(super) fn trigger(&self, reason: u8) {
        let _ = self
            .reason
            .compare_exchange(STOP_NONE, reason, Ordering::SeqCst, Ordering::SeqCst);
        if reason == STOP_LEASE_LOST {
            self.lost.cancel();
        }
        self.token.cancel();
    }
    pub(super) fn abort(&self) -> Abort {
        match self.reason.load(Ordering::SeqCst) {
            STOP_LEASE_LOST => Abort::LeaseLost,
            STOP_CANCELLED => Abort::Cancelled,
            _ => Abort::Shutdown,
        }
    }
}

/// Renews the lease every third of it until aborted (after the run's final
/// write), through cancellation and shutdown too, so the batches those let
/// finish are still written under a live lease. Watches cancellation and
/// shutdown; a lost lease, or one unrenewed for two thirds of it, stops
/// every write.
pub(super) async fn heartbeat(lease: Lease, stop: Stop, shutdown: CancellationToken) {
    // Renew at a third of the lease so one missed heartbeat does not lose it.
    let period = lease.duration() / 3;
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    // When the last successful renewal was sent: the lease runs from then
    // at the latest.
    let mut renewed = Instant::now();
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                stop.trigger(STOP_SHUTDOWN);
                continue;
            }
            _ = ticker.tick() => {}
        }
        // One renewal, retried soon after a failure; every try bounded (a
        // hanging call cannot outlive the lease unnoticed) and none running
        // past two thirds of the lease since the last renewal: then writing
        // stops, a third of the lease before another daemon may claim.
        let cutoff = lease.duration() * 2 / 3;
        loop {
            if shutdown.is_cancelled() && !shutting_down {
                shutting_down = true;
                stop.trigger(STOP_SHUTDOWN);
            }
            let left = cutoff.saturating_sub(renewed.elapsed());
            if left.is_zero() {
                warn!("Lease not renewed for two thirds of it; stopping");
                stop.trigger(STOP_LEASE_LOST);
                return;
            }
            let sent = Instant::now();
            let beat = tokio::time::timeout((period / 2).min(left), lease.heartbeat())
                .await
                .unwrap_or_else(|_| Err(claim::Error::Timeout));
            match beat {
                Ok(hb) => {
                    renewed = sent;
                    if hb.cancel_requested && !stop.token.is_cancelled() {
                        info!("Cancellation requested");
                        stop.trigger(STOP_CANCELLED);
                    }
                    break;
                }
                Err(claim::Error::LeaseLost { .. }) => {
                    stop.trigger(STOP_LEASE_LOST);
                    return;
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "Heartbeat failed; retrying");
                    let pause = (period / 10).min(cutoff.saturating_sub(renewed.elapsed()));
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// Runs one step of the write loop (preparing a batch, which may retry its
/// stage lookups for a minute; settling or committing one) unless the
/// lease is lost first: then the run stops at once, and returning drops
/// the writes in flight, which aborts them.
pub(super) async fn unless_lost<T>(
    stop: &Stop,
    step: impl std::future::Future<Output = Result<T, Abort>>,
) -> Result<T, Abort> {
    tokio::select! {
        biased;
        () = stop.lost.cancelled() => Err(Abort::LeaseLost),
        done = step => done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_of_a_replaced_object_fails_the_file_not_the_attempt() {
        let changed = parse::Error::Io {
            line: 7,
            source: std::io::Error::other(fetch::Error::Changed),
        };
        assert!(matches!(
            Abort::from(changed),
            Abort::File(FileError::FileChanged)
        ));
        assert!(matches!(
            Abort::from(fetch::Error::Changed),
            Abort::File(FileError::FileChanged)
        ));
        let broken = parse::Error::Io {
            line: 7,
            source: std::io::Error::other("connection reset"),
        };
        assert!(matches!(Abort::from(broken), Abort::Transient(_)));
    }
}
