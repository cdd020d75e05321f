//! `importd status ID`: an import's state, progress and error, read from
//! its queue document and summary. Read only.

use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{Bson, Document, doc};
use mongodb::Database;

use crate::domain::collections;
use crate::domain::text::printable;

/// An import as support sees it.
#[derive(Clone, Debug)]
pub struct ImportStatus {
    /// The queue document.
    pub queue: Document,
    /// Its `csv_imports` summary, once created.
    pub summary: Option<Document>,
}

impl ImportStatus {
    /// `status` of the queue document.
    pub fn state(&self) -> &str {
        self.queue.get_str("status").unwrap_or("unknown")
    }

    /// Whether no daemon will touch it again.
    pub fn is_final(&self) -> bool {
        matches!(self.state(), "completed" | "failed" | "cancelled")
    }

    /// When the import's per-line data was purged (`retention.days`), if
    /// it was: one line for support.
    pub fn purged(&self) -> Option<String> {
        let r = self.queue.get_document("retention").ok()?;
        if r.get_str("state") != Ok(crate::claim::retention::PURGED) {
            return None;
        }
        let at = r
            .get_datetime("purged_at")
            .map_or_else(|_| "-".into(), |t| t.to_string());
        let days = r.get("days").map_or_else(|| "-".into(), |d| d.to_string());
        Some(format!(
            "its line outcomes, failed lines and error report were purged on {at}, {days} days after it ended (retention.days)"
        ))
    }

    /// Human summary, several lines.
    pub fn render(&self) -> String {
        let q = &self.queue;
        let mut out = format!(
            "import {}\n  status:   {}\n",
            q.get_object_id("_id")
                .map(|i| i.to_hex())
                .unwrap_or_default(),
            self.state()
        );
        if let Ok(csv) = q.get_array("csv")
            && let Some(Bson::Document(c)) = csv.first()
        {
            out.push_str(&format!(
                "  file:     {}\n",
                printable(c.get_str("name").unwrap_or("?"))
            ));
        }
        if q.get_document("additional_data")
            .and_then(|a| a.get_bool("dry_run"))
            == Ok(true)
        {
            out.push_str("  dry run:  every line checked, nothing written\n");
        }
        if let Ok(p) = q.get_document("progress") {
            let n = |k: &str| {
                p.get(k)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into())
            };
            out.push_str(&format!(
                "  rows:     {} processed, {} imported, {} updated, {} skipped, {} failed ({}%)\n",
                n("processed_rows"),
                n("imported_rows"),
                n("updated_rows"),
                n("skipped_rows"),
                n("failed_rows"),
                n("percent")
            ));
            if self.state() == "processing"
                && let Some(eta) = p.get("eta_seconds").and_then(Bson::as_i64)
            {
                let eta = crate::report::summary::duration(eta.max(0) as u64);
                out.push_str(&format!("  eta:      about {eta} to go\n"));
            }
        }
        if let Ok(e) = q.get_document("error") {
            out.push_str(&format!(
                "  error:    {}: {}\n",
                e.get_str("code").unwrap_or("?"),
                printable(e.get_str("message").unwrap_or("?"))
            ));
            if let Ok(detail) = e.get_str("detail") {
                out.push_str(&format!("  cause:    {}\n", printable(detail)));
            }
        } else if q.get_str("status") == Ok("pending")
            && let Some(attempts) = crate::claim::whole_number(q, "attempts")
            && let Some(e) = crate::pipeline::last_error(q, attempts)
        {
            // Waiting for its next attempt after trouble.
            out.push_str(&format!(
                "  retrying: after {} (attempt {attempts} ended: {})\n",
                q.get_datetime("retry_at")
                    .map_or_else(|_| "-".into(), |t| t.to_string()),
                printable(&e),
            ));
        }
        match (q.get_bool("undo_requested"), q.get_document("undo")) {
            (_, Ok(u)) if u.get_datetime("finished_at").is_ok() => {
                let c = crate::undo::UndoCounts::from_doc(u);
                match u.get_str("state") {
                    Ok("refused") => out.push_str(&format!(
                        "  undo:     refused: {}\n",
                        printable(u.get_str("reason").unwrap_or("-"))
                    )),
                    _ => out.push_str(&format!(
                        "  undo:     done: {} removed, {} kept (changed since), {} updates reverted, {} not\n",
                        c.removed, c.kept_changed, c.updates_reverted, c.updates_not_reverted
                    )),
                }
            }
            (_, Ok(u)) => out.push_str(&format!(
                "  undo:     {} (next line {})\n",
                u.get_str("state").unwrap_or("pending"),
                u.get("next_line")
                    .map_or_else(|| "-".into(), |v| v.to_string())
            )),
            (Ok(true), Err(_)) => out.push_str("  undo:     requested\n"),
            _ => {}
        }
        if let Some(a) = crate::claim::whole_number(q, "attempts") {
            // Releases on shutdown, and claims that moved the import on
            // before a release or a lost lease, are not counted towards
            // `scheduler.max_attempts` (the last such loss is accounted
            // for by the next claim).
            let pending_loss = q.get_str("status") == Ok("pending")
                && crate::pipeline::advanced_then_lost(q, a + 1);
            let counted = crate::pipeline::counted_attempts(q, a) - i64::from(pending_loss);
            if counted == a {
                out.push_str(&format!("  attempts: {a}\n"));
            } else {
                out.push_str(&format!(
                    "  attempts: {a} claims, {counted} counted towards the limit\n"
                ));
            }
        }
        if let Some(purged) = self.purged() {
            out.push_str(&format!("  purged:   {purged}\n"));
        }
        if let Some(s) = &self.summary
            && let Ok(logs) = s.get_array("logs")
        {
            for l in logs.iter().filter_map(Bson::as_document).take(10) {
                out.push_str(&format!(
                    "  line {}: {} ({})\n",
                    l.get_i64("line").unwrap_or(0),
                    printable(l.get_str("message").unwrap_or("")),
                    printable(l.get_str("field").unwrap_or("-")),
                ));
            }
        }
        out
    }
}

/// Reads an import's status; `None` if there is no such queue document.
pub async fn status(db: &Database, id: ObjectId) -> mongodb::error::Result<Option<ImportStatus>> {
    let Some(queue) = db
        .collection::<Document>(collections::QUEUES)
        .find_one(doc! { "_id": id })
        .await?
    else {
        return Ok(None);
    };
    let summary = db
        .collection::<Document>(collections::CSV_IMPORTS)
        .find_one(doc! { "queue_id": id })
        .projection(doc! { "logs": { "$slice": 10 } })
        .await?;
    Ok(Some(ImportStatus { queue, summary }))
}

/// Polls until the import is final or `timeout` passes.
pub async fn wait_final(
    db: &Database,
    id: ObjectId,
    timeout: Duration,
) -> mongodb::error::Result<Option<ImportStatus>> {
    let start = Instant::now();
    loop {
        let s = status(db, id).await?;
        if s.as_ref().is_none_or(ImportStatus::is_final) || start.elapsed() >= timeout {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_import_shows_how_long_it_still_needs() {
        let status = |state: &str| {
            ImportStatus {
            queue: doc! {
                "_id": ObjectId::new(), "status": state,
                "progress": { "processed_rows": 10_i64, "percent": 25.0, "eta_seconds": 90_i64 },
            },
            summary: None,
        }
        .render()
        };
        assert!(status("processing").contains("  eta:      about 1 min 30 s to go\n"));
        assert!(!status("completed").contains("eta"));
    }
}
