//! The daemon loop: a tokio-cron-scheduler job on `scheduler.tick` claims
//! pending imports while a slot is free, and a second job rescues expired
//! leases every `scheduler.rescue_interval`.
//!
//! Guarantees:
//! - Ticks never overlap (a tick still claiming makes the next one a no-op),
//!   and a tick only claims and spawns: a slow import never delays the next
//!   tick.
//! - At most `scheduler.max_concurrent_imports` imports run at once: a tick
//!   takes a semaphore permit before each claim, so nothing is claimed that
//!   cannot start at once (a claimed import is never left waiting).
//! - Shutdown: stop claiming, let every running import finish its batches in
//!   flight, checkpoint and release its lease, within the grace period.
//! - A tick also starts one requested undo (`undo`) if none runs here.
//! - With `retention.days` set, a third job purges the per-line data of
//!   imports past it every `retention.sweep_interval` ([`crate::retention`]).
//! - MongoDB trouble never ends the daemon: a failed tick is logged and the
//!   next one tries again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::claim::{self, Claimer};
use crate::pipeline::{self, Services};
use crate::report::notify::{self, Notifier};
use crate::telemetry::error_chain;
use crate::telemetry::metrics as m;
use crate::undo;

/// An offset to the database server's clock worth a warning: NTP keeps
/// hosts within milliseconds.
const CLOCK_WARN_MS: i64 = 2_000;

struct Inner {
    services: Services,
    claimer: Claimer,
    notifier: Notifier,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    tick_lock: Mutex<()>,
    /// An undo runs in this daemon (one at a time: a rare operation).
    undoing: AtomicBool,
}

/// A running (or runnable) daemon; cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

impl Daemon {
    /// A daemon for `services`, claiming as `owner`.
    pub fn new(services: Services, owner: String) -> Result<Self, notify::Error> {
        let settings = services.settings.clone();
        let claimer = Claimer::new(&services.db, owner, settings.scheduler.lease);
        let shutdown = CancellationToken::new();
        let notifier =
            Notifier::new(services.clone(), claimer.clone())?.stopping_on(shutdown.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                notifier,
                slots: Arc::new(Semaphore::new(
                    settings.scheduler.max_concurrent_imports.get(),
                )),
                services,
                claimer,
                tasks: TaskTracker::new(),
                shutdown,
                tick_lock: Mutex::new(()),
                undoing: AtomicBool::new(false),
            }),
        })
    }

    /// Token that stops the daemon when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// This daemon's lease owner id.
    pub fn owner(&self) -> &str {
        self.inner.claimer.owner()
    }

    /// One tick: claims imports while slots are free and starts them.
    /// Returns how many were claimed.
    pub async fn tick(&self) -> claim::Result<usize> {
        let inner = &self.inner;
        let Ok(_guard) = inner.tick_lock.try_lock() else {
            return Ok(0);
        };
        if inner.shutdown.is_cancelled() {
            return Ok(0);
        }
        // An undo claim that fails must not stop imports being claimed.
        if let Err(e) = self.start_undo().await {
            warn!(error = %error_chain(&e), "Undo claim failed; the next tick retries");
        }
        if inner.slots.available_permits() == 0 {
            return Ok(0);
        }
        inner.claimer.stamp_claim_order().await?;
        let mut claimed = 0;
        while !inner.shutdown.is_cancelled() {
            let Ok(permit) = inner.slots.clone().try_acquire_owned() else {
                break;
            };
            let Some(job) = inner.claimer.claim_next().await? else {
                break;
            };
            claimed += 1;
            metrics::counter!(m::CLAIMED).increment(1);
            let span = info_span!(
                "import",
                queue_id = %job.lease.queue_id,
                attempt = job.lease.attempt,
            );
            let services = inner.services.clone();
            let shutdown = inner.shutdown.clone();
            let notifier = inner.notifier.clone();
            inner.tasks.spawn(
                async move {
                    info!("Claimed import");
                    let queue_id = job.lease.queue_id;
                    let running = metrics::gauge!(m::RUNNING);
                    running.increment(1);
                    let end = pipeline::run(&services, job, shutdown).await;
                    running.decrement(1);
                    drop(permit);
                    let label = match &end {
                        pipeline::RunEnd::Finished(state) => state.as_str(),
                        pipeline::RunEnd::Released => "released",
                        pipeline::RunEnd::LeaseLost => "lease_lost",
                    };
                    metrics::counter!(m::RUNS, "end" => label).increment(1);
                    if let pipeline::RunEnd::Finished(_) = end {
                        notifier.deliver(queue_id).await;
                    }
                }
                .instrument(span),
            );
        }
        Ok(claimed)
    }

    /// Claims and starts one requested undo, unless one runs here already.
    async fn start_undo(&self) -> claim::Result<()> {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() || inner.undoing.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let lease = match inner.claimer.claim_undo(None).await {
            Ok(Some(lease)) => lease,
            other => {
                inner.undoing.store(false, Ordering::SeqCst);
                return other.map(|_| ());
            }
        };
        let span = info_span!("undo", queue_id = %lease.queue_id, attempt = lease.attempt);
        let d = self.clone();
        inner.tasks.spawn(
            async move {
                let inner = &d.inner;
                // Cleared however the task ends, a panic included.
                let slot = scopeguard::guard((), |()| inner.undoing.store(false, Ordering::SeqCst));
                let ended = undo::run(&inner.services.db, &lease, &inner.shutdown).await;
                // Free for the next undo before the email (which may wait
                // on a slow SMTP server).
                drop(slot);
                match ended {
                    Ok(undo::UndoEnd::Done(_)) => inner.notifier.deliver_undo(lease.queue_id).await,
                    Ok(_) => {}
                    // Given back so that a later tick resumes it soon (if
                    // MongoDB is still away, the lease expires instead).
                    Err(e) => {
                        let e = error_chain(&e);
                        warn!(error = %e, "Undo stopped; a later claim resumes it");
                        if let Err(e) = lease.release_after_error(&e).await {
                            warn!(error = %error_chain(&e), "Releasing the undo failed; its lease expires");
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn tick_logged(&self) {
        if let Err(e) = self.tick().await {
            metrics::counter!(m::TICK_ERRORS).increment(1);
            warn!(error = %error_chain(&e), "Claim tick failed; the next tick retries");
        }
    }

    /// Measures this host's clock against the database server's, whose
    /// time every lease is written and compared in (see [`crate::clock`]).
    async fn sync_clock(&self) {
        let clock = self.inner.claimer.clock();
        let before = clock.offset_ms();
        match clock.sync(&self.inner.services.db).await {
            Ok(Some(offset)) => {
                metrics::gauge!(m::CLOCK_OFFSET).set(offset as f64 / 1000.0);
                // Said when it becomes large (at once, or drifting there),
                // not at every tick.
                if offset.abs() >= CLOCK_WARN_MS && before.abs() < CLOCK_WARN_MS {
                    warn!(
                        offset_ms = offset,
                        "This host's clock is off the database server's; leases use the server's"
                    );
                }
            }
            Ok(None) => warn!(
                offset_ms = before,
                "Could not measure the database server's clock precisely (slow answer); keeping the last offset"
            ),
            Err(e) => warn!(error = %error_chain(&e), "Could not read the database server's clock"),
        }
    }

    async fn rescue_logged(&self) {
        let grace = self.inner.services.settings.notify.rescue_grace;
        self.sync_clock().await;
        match self.inner.claimer.rescue_expired(grace).await {
            Ok(0) => {}
            Ok(n) => info!(imports = n, "Rescued imports whose lease expired"),
            Err(e) => warn!(error = %error_chain(&e), "Lease rescue failed"),
        }
        // Notifications of imports finished elsewhere, before a restart, or
        // whose earlier round failed.
        if !self.inner.shutdown.is_cancelled() {
            // Tracked: a shutdown waits for a round under way (and claims
            // no new one).
            self.inner
                .tasks
                .track_future(self.inner.notifier.deliver_due())
                .await;
        }
    }

    /// Purges the per-line data of the imports past `retention.days`.
    pub async fn sweep_retention(&self) -> crate::retention::Result<usize> {
        let inner = &self.inner;
        let Some(days) = inner.services.settings.retention.days else {
            return Ok(0);
        };
        let svc = &inner.services;
        let purged = crate::retention::sweep(
            &svc.db,
            &svc.storage,
            &inner.claimer,
            days,
            crate::retention::MAX_PER_SWEEP,
            &inner.shutdown,
        )
        .await?;
        metrics::counter!(m::PURGED).increment(purged as u64);
        Ok(purged)
    }

    async fn sweep_logged(&self) {
        if self.inner.shutdown.is_cancelled() {
            return;
        }
        let swept = self.inner.tasks.track_future(self.sweep_retention()).await;
        if let Err(e) = swept {
            warn!(error = %error_chain(&e), "Retention sweep failed; the next one retries");
        }
    }

    /// Runs the scheduler until the shutdown token is cancelled, then drains
    /// running imports within `grace`.
    pub async fn run(&self) -> Result<(), JobSchedulerError> {
        let settings = self.inner.services.settings.clone();
        let mut sched = JobScheduler::new().await?;
        let d = self.clone();
        sched
            .add(Job::new_async(
                settings.scheduler.tick.as_str(),
                move |_, _| {
                    let d = d.clone();
                    Box::pin(async move { d.tick_logged().await })
                },
            )?)
            .await?;
        let d = self.clone();
        sched
            .add(Job::new_repeated_async(
                settings.scheduler.rescue_interval,
                move |_, _| {
                    let d = d.clone();
                    Box::pin(async move { d.rescue_logged().await })
                },
            )?)
            .await?;
        // Before the first claim or sweep: leases (and the retention
        // cutoff) are in the server's time.
        self.sync_clock().await;
        if settings.retention.days.is_some() {
            // A first sweep now, not an interval after the start.
            let d = self.clone();
            tokio::spawn(async move { d.sweep_logged().await });
            let d = self.clone();
            sched
                .add(Job::new_repeated_async(
                    settings.retention.sweep_interval,
                    move |_, _| {
                        let d = d.clone();
                        Box::pin(async move { d.sweep_logged().await })
                    },
                )?)
                .await?;
        }
        sched.start().await?;
        info!(owner = self.owner(), tick = %settings.scheduler.tick, "Scheduler started");
        self.inner.shutdown.cancelled().await;
        info!("Shutting down: no more claims; finishing batches in flight");
        // The imports in flight are drained whatever the scheduler says.
        let stopped = sched.shutdown().await;
        self.drain(settings.scheduler.shutdown_grace).await;
        stopped?;
        Ok(())
    }

    /// Waits for running imports to checkpoint and release, up to `grace`.
    pub async fn drain(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        let inner = &self.inner;
        let drained = tokio::time::timeout(grace, async {
            // A tick under way finishes spawning what it claimed (those
            // imports see the shutdown and release at once) before the wait.
            drop(inner.tick_lock.lock().await);
            inner.tasks.close();
            inner.tasks.wait().await;
        })
        .await;
        if drained.is_err() {
            error!(
                grace_seconds = grace.as_secs(),
                "Imports did not stop within the grace period; their leases will expire"
            );
        }
    }
}
