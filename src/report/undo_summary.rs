//! The email telling the importing user that an import was undone: what
//! was removed, what was kept and why. PURE: built from the undo's counts.

use askama::Template;

use super::summary::thousands;
use crate::domain::RecordKind;
use crate::undo::UndoCounts;

/// Everything the undo email says.
#[derive(Clone, Debug)]
pub struct UndoSummary {
    /// What the import wrote.
    pub kind: RecordKind,
    /// Recipient's first name, if known.
    pub first_name: Option<String>,
    /// Original file name.
    pub file_name: String,
    /// What the undo did.
    pub counts: UndoCounts,
}

/// `1 update`, `2 updates`, `1,234 contacts`.
fn counted(n: u64, noun: &str) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{} {noun}{s}", thousands(n))
}

#[derive(Template)]
#[template(path = "undo.txt")]
struct TextBody<'a> {
    s: &'a UndoSummary,
    lines: &'a [String],
}

#[derive(Template)]
#[template(path = "undo.html")]
struct HtmlBody<'a> {
    s: &'a UndoSummary,
    lines: &'a [String],
}

impl UndoSummary {
    /// E.g. `Deal import undone: 98,765 deals removed (deals-q4.csv)`.
    pub fn subject(&self) -> String {
        let what = match self.kind {
            RecordKind::Deals => "Deal import",
            RecordKind::Contacts => "Contact import",
        };
        format!(
            "{what} undone: {} removed ({})",
            self.records(self.counts.removed),
            self.file_name
        )
    }

    /// `1 deal`, `2 deals`, `1,234 contacts`.
    fn records(&self, n: u64) -> String {
        counted(n, self.kind.noun())
    }

    /// One sentence per thing done or kept, as both bodies list them.
    fn lines(&self) -> Vec<String> {
        let c = &self.counts;
        let noun = self.kind.noun();
        let mut out = vec![format!(
            "Removed: {} the import created.",
            self.records(c.removed)
        )];
        if c.kept_changed > 0 {
            out.push(format!(
                "Kept: {} the import created, changed since (by someone, or by another import).",
                self.records(c.kept_changed)
            ));
        }
        if c.kept_linked > 0 {
            out.push(format!(
                "Kept: {} the import created that deals are linked to.",
                counted(c.kept_linked, "contact")
            ));
        }
        if c.updates_reverted > 0 {
            out.push(format!(
                "Reverted: {} of {noun}s that existed before the import (put back as the import found them).",
                counted(c.updates_reverted, "update")
            ));
        }
        if c.updates_not_reverted > 0 {
            out.push(format!(
                "Not reverted: {} of {noun}s that existed before the import (changed since, or made before their earlier values were kept).",
                counted(c.updates_not_reverted, "update")
            ));
        }
        if c.contacts_kept > 0 {
            out.push(format!(
                "Kept: {} the import created for its deals.",
                counted(c.contacts_kept, "contact")
            ));
        }
        if !c.stages_removed.is_empty() {
            out.push(format!("Stages removed: {}.", c.stages_removed.join(", ")));
        }
        if !c.stages_kept.is_empty() {
            out.push(format!(
                "Stages kept (deals use them): {}.",
                c.stages_kept.join(", ")
            ));
        }
        out
    }

    /// The plain-text body.
    pub fn text(&self) -> askama::Result<String> {
        let lines = self.lines();
        TextBody {
            s: self,
            lines: &lines,
        }
        .render()
    }

    /// The HTML body (escaped).
    pub fn html(&self) -> askama::Result<String> {
        let lines = self.lines();
        HtmlBody {
            s: self,
            lines: &lines,
        }
        .render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> UndoSummary {
        UndoSummary {
            kind: RecordKind::Deals,
            first_name: Some("Olive".into()),
            file_name: "deals <q4>.csv".into(),
            counts: UndoCounts {
                removed: 98_765,
                kept_changed: 2,
                updates_not_reverted: 5,
                stages_removed: vec!["Brand New".into()],
                ..UndoCounts::default()
            },
        }
    }

    #[test]
    fn the_subject_counts_what_was_removed() {
        assert_eq!(
            summary().subject(),
            "Deal import undone: 98,765 deals removed (deals <q4>.csv)"
        );
        let mut s = summary();
        s.kind = RecordKind::Contacts;
        s.counts.removed = 1;
        assert_eq!(
            s.subject(),
            "Contact import undone: 1 contact removed (deals <q4>.csv)"
        );
    }

    #[test]
    fn bodies_say_what_was_kept_and_why_escaped_in_html() {
        let s = summary();
        let text = s.text().unwrap();
        for needle in [
            "Hello Olive",
            "Removed: 98,765 deals the import created.",
            "Kept: 2 deals the import created, changed since",
            "Not reverted: 5 updates of deals",
            "Stages removed: Brand New.",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        assert!(!text.contains("linked"), "{text}");
        let mut one = summary();
        one.counts.updates_not_reverted = 1;
        one.counts.kept_linked = 1;
        let text = one.text().unwrap();
        assert!(text.contains("Not reverted: 1 update of deals"), "{text}");
        assert!(
            text.contains("Kept: 1 contact the import created"),
            "{text}"
        );
        let html = s.html().unwrap();
        assert!(!html.contains("<q4>"), "{html}");
        assert!(html.contains("Removed: 98,765 deals"), "{html}");
    }
}
