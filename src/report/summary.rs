//! The summary of a finished import, as the user reads it: subject line and
//! the text and HTML bodies of the email. PURE: built from outcome counts
//! and the queue document's facts; never reads the CSV again.

use askama::Template;

use crate::domain::RecordKind;
use crate::outcomes::{RowErrorDoc, Totals};

/// How the import ended, for the wording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Completed.
    Completed,
    /// Cancelled on request.
    Cancelled,
    /// A file-level problem.
    Failed {
        /// Stable code.
        code: String,
        /// Customer message.
        message: String,
    },
}

/// Everything the summary email says.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    /// What the import wrote.
    pub kind: RecordKind,
    /// A dry run: lines checked, nothing written.
    pub dry_run: bool,
    /// Recipient's first name, if known.
    pub first_name: Option<String>,
    /// Original file name.
    pub file_name: String,
    /// How it ended.
    pub ending: Ending,
    /// Counts.
    pub totals: Totals,
    /// Wall time from start to the final state.
    pub duration_secs: u64,
    /// Target pipeline's name.
    pub pipeline_name: Option<String>,
    /// Stages the import created.
    pub stages_created: Vec<String>,
    /// The first failed lines (at most 10).
    pub first_failures: Vec<RowErrorDoc>,
    /// Presigned link to the error report.
    pub report_url: Option<String>,
    /// Rows failed but the error report could not be made (storage down
    /// through every round).
    pub report_unavailable: bool,
    /// Days the link stays valid.
    pub report_link_days: u64,
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `3725` → `1 h 2 min 5 s`.
pub fn duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s} s"),
        (0, _) => format!("{m} min {s} s"),
        _ => format!("{h} h {m} min {s} s"),
    }
}

struct Row {
    line: u64,
    field: String,
    message: String,
}

/// What both bodies show, computed once.
struct View {
    headline: String,
    counts: Vec<(&'static str, String)>,
    failures: Vec<Row>,
    more_failures: bool,
    duration: String,
}

#[derive(Template)]
#[template(path = "summary.txt")]
struct TextBody<'a> {
    s: &'a ImportSummary,
    v: &'a View,
}

#[derive(Template)]
#[template(path = "summary.html")]
struct HtmlBody<'a> {
    s: &'a ImportSummary,
    v: &'a View,
}

impl ImportSummary {
    /// The subject line, e.g. `Deal import finished: 98,765 imported, 1,235
    /// failed (deals-q4.csv)`.
    pub fn subject(&self) -> String {
        let t = &self.totals;
        let what = match (self.kind, self.dry_run) {
            (RecordKind::Deals, false) => "Deal import",
            (RecordKind::Contacts, false) => "Contact import",
            (RecordKind::Deals, true) => "Deal import check",
            (RecordKind::Contacts, true) => "Contact import check",
        };
        let [imported, updated, skipped] = if self.dry_run {
            ["ready", "to update", "to skip"]
        } else {
            ["imported", "updated", "skipped"]
        };
        match &self.ending {
            Ending::Completed => {
                let mut parts = vec![format!("{} {imported}", thousands(t.imported))];
                if t.updated > 0 {
                    parts.push(format!("{} {updated}", thousands(t.updated)));
                }
                if t.skipped > 0 {
                    parts.push(format!("{} {skipped}", thousands(t.skipped)));
                }
                parts.push(format!("{} failed", thousands(t.failed)));
                format!("{what} finished: {} ({})", parts.join(", "), self.file_name)
            }
            Ending::Cancelled if self.dry_run => format!(
                "{what} cancelled: {} checked before it stopped ({})",
                thousands(t.rows),
                self.file_name
            ),
            Ending::Cancelled => format!(
                "{what} cancelled: {} imported before it stopped ({})",
                thousands(t.imported),
                self.file_name
            ),
            Ending::Failed { .. } => format!("{what} failed: {}", self.file_name),
        }
    }

    fn headline(&self) -> String {
        match &self.ending {
            Ending::Completed if self.dry_run => format!(
                "Your file {} was checked line by line; nothing was imported. Rows counted as imported below are ready to import; fix the failed ones and import the file.",
                self.file_name
            ),
            Ending::Completed => format!("Your import of {} has finished.", self.file_name),
            Ending::Cancelled if self.dry_run => format!(
                "The check of {} was cancelled; nothing was imported.",
                self.file_name
            ),
            Ending::Cancelled => format!(
                "Your import of {} was cancelled. The rows imported before it stopped are kept.",
                self.file_name
            ),
            Ending::Failed { message, .. } => {
                format!(
                    "Your import of {} could not be processed. {message}",
                    self.file_name
                )
            }
        }
    }

    fn counts(&self) -> Vec<(&'static str, String)> {
        let t = &self.totals;
        let [imported, updated, skipped] = if self.dry_run {
            ["Ready to import", "Would update", "Would skip"]
        } else {
            ["Imported", "Updated", "Skipped"]
        };
        let mut counts = vec![
            ("Rows", thousands(t.rows)),
            (imported, thousands(t.imported)),
            (updated, thousands(t.updated)),
            (skipped, thousands(t.skipped)),
            ("Failed", thousands(t.failed)),
        ];
        // A contacts import's "Imported" are the contacts it created.
        if t.contacts_created > 0 && self.kind == RecordKind::Deals {
            counts.push(("Contacts created", thousands(t.contacts_created)));
        }
        counts
    }

    fn rows(&self) -> Vec<Row> {
        self.first_failures
            .iter()
            .take(10)
            .map(|f| Row {
                line: f.line,
                field: f.field.clone().unwrap_or_else(|| "-".into()),
                message: f.message.clone(),
            })
            .collect()
    }

    /// Plain-text body.
    pub fn text(&self) -> Result<String, askama::Error> {
        let v = self.view();
        TextBody { s: self, v: &v }.render()
    }

    /// HTML body (values escaped by the template engine).
    pub fn html(&self) -> Result<String, askama::Error> {
        let v = self.view();
        HtmlBody { s: self, v: &v }.render()
    }

    fn view(&self) -> View {
        View {
            headline: self.headline(),
            counts: self.counts(),
            failures: self.rows(),
            more_failures: self.totals.failed > self.first_failures.len().min(10) as u64,
            duration: duration(self.duration_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> ImportSummary {
        ImportSummary {
            kind: RecordKind::Deals,
            dry_run: false,
            first_name: Some("Olive".into()),
            file_name: "deals-q4.csv".into(),
            ending: Ending::Completed,
            totals: Totals {
                rows: 100_000,
                imported: 98_765,
                updated: 0,
                skipped: 0,
                failed: 1_235,
                contacts_created: 4_321,
            },
            duration_secs: 125,
            pipeline_name: Some("Sales <EU>".into()),
            stages_created: vec!["Qualified".into()],
            first_failures: vec![RowErrorDoc {
                line: 7,
                code: "invalid_number".into(),
                field: Some("value".into()),
                value: Some("<b>lots</b>".into()),
                message: "\"Value\" is not a number.".into(),
            }],
            report_url: Some("https://s3.example/reports/x?sig=1&b=2".into()),
            report_unavailable: false,
            report_link_days: 7,
        }
    }

    #[test]
    fn subject_has_counts_and_file() {
        assert_eq!(
            summary().subject(),
            "Deal import finished: 98,765 imported, 1,235 failed (deals-q4.csv)"
        );
        let mut s = summary();
        s.ending = Ending::Failed {
            code: "no_header".into(),
            message: "No header.".into(),
        };
        assert_eq!(s.subject(), "Deal import failed: deals-q4.csv");
        let mut s = summary();
        s.kind = RecordKind::Contacts;
        s.totals.skipped = 12;
        assert_eq!(
            s.subject(),
            "Contact import finished: 98,765 imported, 12 skipped, 1,235 failed (deals-q4.csv)"
        );
        assert!(!s.text().unwrap().contains("Contacts created"));
        s.dry_run = true;
        assert_eq!(
            s.subject(),
            "Contact import check finished: 98,765 ready, 12 to skip, 1,235 failed (deals-q4.csv)"
        );
        let text = s.text().unwrap();
        assert!(text.contains("nothing was imported"), "{text}");
        assert!(text.contains("Would skip: 12"), "{text}");
        s.ending = Ending::Cancelled;
        assert_eq!(
            s.subject(),
            "Contact import check cancelled: 100,000 checked before it stopped (deals-q4.csv)"
        );
    }

    #[test]
    fn bodies_carry_counts_failures_and_link_escaped_in_html() {
        let s = summary();
        let text = s.text().unwrap();
        for needle in [
            "98,765",
            "1,235",
            "line 7",
            "value",
            "2 min 5 s",
            "Sales <EU>",
            "Qualified",
            "sig=1&b=2",
            "Contacts created: 4,321",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        let html = s.html().unwrap();
        assert!(
            html.contains("Sales &#60;EU&#62;") || html.contains("Sales &lt;EU&gt;"),
            "{html}"
        );
        assert!(!html.contains("<EU>"));
    }

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(duration(5), "5 s");
        assert_eq!(duration(3725), "1 h 2 min 5 s");
    }
}
