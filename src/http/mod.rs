//! The daemon's one small HTTP listener (`http.enabled`, `http.bind`):
//! - `GET /healthz`: 200 when MongoDB answers a ping, else 503;
//! - `GET /metrics`: Prometheus text ([`crate::telemetry::metrics`]);
//! - `GET /imports/{queue_id}`: the import's state and progress, for a
//!   caller whose dashboard token names the import's account. 401 without a
//!   valid token; 403 for another account's import *or one that does not
//!   exist* (no oracle for other accounts' ids); 404 only for a malformed id.
//!
//! Read only: nothing here changes a queue document.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use metrics_exporter_prometheus::PrometheusHandle;
use mongodb::Database;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::domain::collections;
use crate::telemetry::error_chain;

pub mod auth;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// The daemon's database.
    pub db: Database,
    /// Verifies dashboard tokens.
    pub app_secret: SecretString,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// The routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/imports/{queue_id}", get(import_status))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "HTTP listener started");
    }
    // Histograms are folded into their buckets periodically, not only on
    // scrape, so memory stays flat between scrapes.
    let upkeep = {
        let handle = state.metrics.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => handle.run_upkeep(),
                }
            }
        })
    };
    accept(listener, router(state), shutdown).await;
    upkeep.abort();
    Ok(())
}

/// Most connections served at once; past it, accepting waits, so a flood
/// of idle clients cannot take the file descriptors MongoDB and S3 need.
const MAX_CONNECTIONS: usize = 256;
/// A request's head must arrive within this: a client that stalls
/// mid-header is dropped instead of holding a connection for ever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight before the daemon goes
/// on stopping without them.
const DRAIN: Duration = Duration::from_secs(5);

/// The accept loop: HTTP/1 connections under [`MAX_CONNECTIONS`] and
/// [`HEADER_READ_TIMEOUT`], drained for at most [`DRAIN`] on shutdown.
async fn accept(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let conn =
            http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("HTTP connections still open after the drain period; not waiting for them");
    }
}

async fn healthz(State(s): State<HttpState>) -> Response {
    let ping =
        tokio::time::timeout(Duration::from_secs(2), s.db.run_command(doc! { "ping": 1 })).await;
    match ping {
        Ok(Ok(_)) => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "mongodb": "ok" })),
        )
            .into_response(),
        Ok(Err(e)) => {
            warn!(error = %error_chain(&e), "Health check: MongoDB ping failed");
            unhealthy()
        }
        Err(_) => unhealthy(),
    }
}

fn unhealthy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": "unavailable", "mongodb": "unreachable" })),
    )
        .into_response()
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn import_status(
    State(s): State<HttpState>,
    Path(queue_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let account = match auth::account_of(auth, &s.app_secret) {
        Ok(a) => a,
        Err(e) => {
            let mut r = error(StatusCode::UNAUTHORIZED, &e.to_string());
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    };
    let Ok(queue_id) = ObjectId::parse_str(&queue_id) else {
        return error(StatusCode::NOT_FOUND, "no such import");
    };
    let found =
        s.db.collection::<Document>(collections::QUEUES)
            .find_one(doc! { "_id": queue_id, "account_id": account })
            .projection(doc! {
                "source": 1, "status": 1, "in_progress": 1, "csv.name": 1, "progress": 1,
                "error": 1, "attempts": 1, "cancel_requested": 1, "log_id": 1, "warnings": 1,
                "created_at": 1, "createdAt": 1, "started_at": 1, "completed_at": 1,
                "undo_requested": 1, "undo": 1,
            })
            .await;
    match found {
        Ok(Some(q)) => (StatusCode::OK, Json(view(&q))).into_response(),
        Ok(None) => error(
            StatusCode::FORBIDDEN,
            "no import of your account has this id",
        ),
        Err(e) => {
            warn!(error = %error_chain(&e), "Import status lookup failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "try again shortly")
        }
    }
}

fn date(q: &Document, key: &str) -> Value {
    q.get_datetime(key)
        .ok()
        .and_then(|d| d.try_to_rfc3339_string().ok())
        .map_or(Value::Null, Value::String)
}

fn number(d: &Document, key: &str) -> Value {
    match d.get(key) {
        Some(Bson::Int32(n)) => json!(n),
        Some(Bson::Int64(n)) => json!(n),
        Some(Bson::Double(n)) => json!(n),
        _ => Value::Null,
    }
}

/// The dashboard's view of a queue document: plain JSON, dates as RFC 3339.
fn view(q: &Document) -> Value {
    let progress = q.get_document("progress").ok().map_or(Value::Null, |p| {
        let mut out = serde_json::Map::new();
        for k in [
            "total_rows",
            "processed_rows",
            "imported_rows",
            "updated_rows",
            "skipped_rows",
            "failed_rows",
            "percent",
            "eta_seconds",
        ] {
            out.insert(k.into(), number(p, k));
        }
        // Time left only while a daemon runs it.
        if q.get_str("status") != Ok("processing") {
            out.insert("eta_seconds".into(), Value::Null);
        }
        Value::Object(out)
    });
    let error = q.get_document("error").ok().map_or(
        Value::Null,
        |e| json!({ "code": e.get_str("code").ok(), "message": e.get_str("message").ok() }),
    );
    let file_name = q
        .get_array("csv")
        .ok()
        .and_then(|a| a.first())
        .and_then(Bson::as_document)
        .and_then(|c| c.get_str("name").ok());
    let created = match date(q, "created_at") {
        Value::Null => date(q, "createdAt"),
        d => d,
    };
    // The undo, once requested: its state and, when done, what it did.
    let undo = match (q.get_bool("undo_requested"), q.get_document("undo")) {
        (_, Ok(u)) => {
            let c = crate::undo::UndoCounts::from_doc(u);
            json!({
                "state": u.get_str("state").unwrap_or("pending"),
                "reason": u.get_str("reason").ok(),
                "removed": c.removed,
                "kept_changed": c.kept_changed,
                "updates_not_reverted": c.updates_not_reverted,
                "stages_removed": c.stages_removed,
                "stages_kept": c.stages_kept,
                "finished_at": date(u, "finished_at"),
            })
        }
        (Ok(true), Err(_)) => json!({ "state": "pending" }),
        _ => Value::Null,
    };
    json!({
        "undo": undo,
        "queue_id": q.get_object_id("_id").map(|i| i.to_hex()).ok(),
        "source": q.get_str("source").ok(),
        "status": q.get_str("status").ok(),
        "in_progress": q.get_bool("in_progress").unwrap_or(false),
        "cancel_requested": q.get_bool("cancel_requested").unwrap_or(false),
        "file_name": file_name,
        "progress": progress,
        "error": error,
        "attempts": number(q, "attempts"),
        "log_id": q.get_object_id("log_id").map(|i| i.to_hex()).ok(),
        "created_at": created,
        "started_at": date(q, "started_at"),
        "completed_at": date(q, "completed_at"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_is_plain_json_with_rfc3339_dates() {
        let id = ObjectId::new();
        let q = doc! {
            "_id": id, "source": "deals", "status": "completed", "in_progress": false,
            "csv": [{ "key": "imports/a/b/q4.csv", "name": "q4.csv" }],
            "progress": { "total_rows": 10_i64, "processed_rows": 10_i64, "imported_rows": 9_i64,
                          "updated_rows": 0_i64, "skipped_rows": 0_i64, "failed_rows": 1_i64, "percent": 100.0,
                          "eta_seconds": 12_i64 },
            "attempts": 2_i32,
            "createdAt": bson::DateTime::from_millis(0),
            "completed_at": bson::DateTime::from_millis(1_000),
        };
        let v = view(&q);
        assert_eq!(v["queue_id"], json!(id.to_hex()));
        assert_eq!(v["file_name"], json!("q4.csv"));
        assert_eq!(v["progress"]["failed_rows"], json!(1));
        assert_eq!(v["progress"]["percent"], json!(100.0));
        // A time left only while it runs.
        assert_eq!(v["progress"]["eta_seconds"], Value::Null);
        let mut running = q.clone();
        running.insert("status", "processing");
        assert_eq!(view(&running)["progress"]["eta_seconds"], json!(12));
        assert_eq!(v["attempts"], json!(2));
        assert_eq!(v["created_at"], json!("1970-01-01T00:00:00Z"));
        assert_eq!(v["completed_at"], json!("1970-01-01T00:00:01Z"));
        assert_eq!(v["started_at"], Value::Null);
        assert_eq!(v["error"], Value::Null);
        // Storage keys are not part of the view.
        assert!(!v.to_string().contains("imports/a/b"));
        assert_eq!(v["undo"], Value::Null);
    }

    #[test]
    fn the_view_shows_an_undo_from_request_to_result() {
        let mut q = doc! { "_id": ObjectId::new(), "status": "completed", "undo_requested": true };
        assert_eq!(view(&q)["undo"], json!({ "state": "pending" }));
        q.insert(
            "undo",
            doc! {
                "state": "done", "removed": 98_i64, "kept_changed": 2_i64,
                "stages_removed": ["Brand New"], "owner": "host:1:x",
                "finished_at": bson::DateTime::from_millis(1_000),
            },
        );
        let v = view(&q);
        assert_eq!(v["undo"]["state"], json!("done"));
        assert_eq!(v["undo"]["removed"], json!(98));
        assert_eq!(v["undo"]["stages_removed"], json!(["Brand New"]));
        assert_eq!(v["undo"]["finished_at"], json!("1970-01-01T00:00:01Z"));
        assert!(!v.to_string().contains("host:1:x"), "owners stay inside");
    }
}
