//! Builds the clients from [`Settings`] and runs the daemon until SIGTERM or
//! SIGINT. The only place that wires configuration to I/O.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Settings;
use crate::daemon::Daemon;
use crate::pipeline::Services;
use crate::telemetry::error_chain;
use crate::{db, fetch};

/// Errors while starting or running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// MongoDB client set-up.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// S3 client set-up.
    #[error(transparent)]
    Storage(#[from] fetch::Error),
    /// The scheduler could not start.
    #[error("scheduler: {0}")]
    Scheduler(#[from] tokio_cron_scheduler::JobSchedulerError),
    /// Indexes could not be created (and retrying would not help).
    #[error("indexes: {0}")]
    Indexes(#[from] db::IndexError),
    /// Mail set-up.
    #[error(transparent)]
    Notify(#[from] crate::report::notify::Error),
    /// Signal handler installation.
    #[error("signals: {0}")]
    Signal(#[from] std::io::Error),
    /// The HTTP listener could not bind `http.bind`.
    #[error("http.bind: cannot listen on {addr}: {source}")]
    HttpBind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Builds the MongoDB and S3 clients (no request is made yet).
pub async fn services(settings: Settings) -> Result<Services, Error> {
    let db = db::connect(&settings.mongodb).await?;
    let storage = fetch::Storage::new(&settings.s3)?;
    Ok(Services {
        db,
        storage,
        settings: Arc::new(settings),
    })
}

/// Creates indexes, retrying with backoff until MongoDB answers or the
/// daemon is asked to stop: a database that is down at start-up delays the
/// daemon, it does not kill it. A problem retrying cannot fix (an index
/// that conflicts, duplicates under a unique index, no permission) stops
/// start-up with an error that says so.
async fn ensure_indexes(services: &Services, daemon: &Daemon) -> Result<(), Error> {
    let shutdown = daemon.shutdown_token();
    let mut delay = Duration::from_millis(500);
    loop {
        match db::ensure_indexes(&services.db).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                warn!(error = %error_chain(&e), "Creating indexes failed; retrying");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// `importd run`: the daemon, until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let services = services(settings).await?;
    let daemon = Daemon::new(services.clone(), crate::claim::Claimer::default_owner())?;
    let shutdown = daemon.shutdown_token();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        shutdown.cancel();
    });
    let http = match services.settings.http.enabled {
        true => Some(start_http(&services, daemon.shutdown_token()).await?),
        false => None,
    };
    ensure_indexes(&services, &daemon).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    daemon.run().await?;
    if let Some(http) = http {
        let _ = http.await;
    }
    // Not waiting on cursors of tasks the grace period gave up on.
    services
        .db
        .client()
        .clone()
        .shutdown()
        .immediate(true)
        .await;
    info!("Stopped");
    Ok(())
}

/// Binds `http.bind` (a failure stops start-up, naming the key) and serves
/// until shutdown.
async fn start_http(
    services: &Services,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let addr = services.settings.http.bind;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::HttpBind { addr, source })?;
    let state = crate::http::HttpState {
        db: services.db.clone(),
        app_secret: services.settings.app_secret.clone(),
        metrics: crate::telemetry::metrics::handle().clone(),
    };
    Ok(tokio::spawn(async move {
        if let Err(e) = crate::http::serve(listener, state, shutdown).await {
            warn!(error = %e, "HTTP listener stopped");
        }
    }))
}
