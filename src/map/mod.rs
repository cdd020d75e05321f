//! Raw record → mapped deal or row error: the mapping plan, validation and
//! value parsing. PURE: no I/O, no async, no driver.
//!
//! [`Plan::new`] checks the mapping against the header row once, before any
//! write (`mapping_invalid`, naming the header). [`Plan::map_deal`] then turns
//! each record into a [`MappedDeal`] or a [`RowError`]; a bad row is data,
//! never an `Err` that ends the import.

use std::collections::HashMap;

use crate::config::{DateOrder, NumberLocale};
use crate::domain::text::{collapse_whitespace, decode_cell, header_key, stage_key, token};
use crate::domain::{DealField, FieldTarget, FileError, LineNo, RowCode, RowError, truncate_value};

mod values;

pub use values::{parse_date, parse_number, valid_email};

/// Targets that are never accepted, even though they are plain names: the
/// daemon owns them, and a CSV must not set them.
const DAEMON_OWNED: [&str; 12] = [
    "_id",
    "account_id",
    "pipeline_id",
    "owner",
    "created_by",
    "import",
    "source",
    "tags",
    "additional_info",
    "created_at",
    "updated_at",
    "parent_account",
];

/// Access to a record's raw fields (a csv `ByteRecord`, or a slice in tests).
pub trait Fields {
    /// Number of fields.
    fn count(&self) -> usize;
    /// Field `i`.
    fn field(&self, i: usize) -> Option<&[u8]>;
}

impl<S: AsRef<str>> Fields for [S] {
    fn count(&self) -> usize {
        self.len()
    }
    fn field(&self, i: usize) -> Option<&[u8]> {
        self.get(i).map(|s| s.as_ref().as_bytes())
    }
}

/// Validation settings of rows.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Longest accepted value, in characters.
    pub max_field_chars: usize,
    /// Decimal separator of numbers.
    pub number_locale: NumberLocale,
    /// Day/month order of numeric dates.
    pub date_order: DateOrder,
}

#[derive(Clone, Debug)]
struct Column {
    index: usize,
    header: String,
    target: FieldTarget,
}

/// The checked mapping of one file: which column goes where.
#[derive(Clone, Debug)]
pub struct Plan {
    columns: Vec<Column>,
    header_count: usize,
    rules: Rules,
}

/// A stage reference from a CSV cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageName {
    /// Normalised key (`pipeline_stages.name`).
    pub key: String,
    /// Spelling as first seen (`pipeline_stages.label` when created).
    pub label: String,
}

/// A valid deal row, ready for stage resolution and writing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MappedDeal {
    /// Physical line.
    pub line: LineNo,
    /// Required.
    pub name: String,
    /// Parsed number.
    pub value: Option<f64>,
    /// Stage to resolve.
    pub stage: Option<StageName>,
    /// Normalised token.
    pub status: Option<String>,
    /// Normalised token.
    pub contract_type: Option<String>,
    /// Milliseconds since the epoch (midnight UTC).
    pub expected_close_date: Option<i64>,
    /// Free text.
    pub description: Option<String>,
    /// Lower-cased email.
    pub contact_email: Option<String>,
    /// Free text.
    pub contact_name: Option<String>,
    /// Custom field values, `(field id, value)`.
    pub custom: Vec<(String, String)>,
    /// The record as read, kept until the deal is written so that a line
    /// the database refuses still reaches the error report whole.
    pub raw: RawCells,
}

/// A record's cells in one allocation (`u32` length, then bytes, per cell),
/// each cut near [`MAX_REPORT_CELL_CHARS`] characters as the report cuts
/// them anyway.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawCells(Box<[u8]>);

impl RawCells {
    /// Copies `fields`.
    pub fn copy<F: Fields + ?Sized>(fields: &F) -> Self {
        let kept = |i| kept_bytes(fields.field(i).unwrap_or_default());
        let len: usize = (0..fields.count()).map(|i| 4 + kept(i).len()).sum();
        let mut buf = Vec::with_capacity(len);
        for i in 0..fields.count() {
            let f = kept(i);
            buf.extend_from_slice(&(f.len() as u32).to_le_bytes());
            buf.extend_from_slice(f);
        }
        Self(buf.into_boxed_slice())
    }

    /// The cells as the error report shows them.
    pub fn to_cells(&self) -> Vec<String> {
        let mut rest = &self.0[..];
        let mut cells = Vec::new();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let (cell, tail) = tail.split_at((u32::from_le_bytes(*len) as usize).min(tail.len()));
            cells.push(report_cell(cell));
            rest = tail;
        }
        cells
    }
}

/// A cell's first bytes, enough for [`MAX_REPORT_CELL_CHARS`] characters,
/// cut before a UTF-8 continuation byte.
fn kept_bytes(cell: &[u8]) -> &[u8] {
    let max = MAX_REPORT_CELL_CHARS * 4;
    if cell.len() <= max {
        return cell;
    }
    let cut = (0..=max)
        .rev()
        .find(|&i| cell[i] & 0xC0 != 0x80)
        .unwrap_or(max);
    &cell[..cut]
}

/// A cell decoded and cut to [`MAX_REPORT_CELL_CHARS`] characters.
fn report_cell(cell: &[u8]) -> String {
    let s = decode_cell(cell);
    match s.char_indices().nth(MAX_REPORT_CELL_CHARS) {
        Some((cut, _)) => s[..cut].to_owned(),
        None => s.into_owned(),
    }
}

/// A failed row with its original cells (for the error report).
#[derive(Clone, Debug, PartialEq)]
pub struct FailedRow {
    /// What failed.
    pub error: RowError,
    /// The row's cells as read, each cut to a bounded length.
    pub cells: Vec<String>,
}

/// Longest cell kept for the error report.
pub const MAX_REPORT_CELL_CHARS: usize = 1000;

fn is_custom_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Plan {
    /// Checks `mappings` (CSV header → target) against `headers`.
    ///
    /// Headers match exactly first, then case/space-insensitively with the
    /// BOM stripped. Every target must be a standard deal field or a 24-hex
    /// custom field id; operator-like (`$…`), dotted or daemon-owned targets
    /// are refused. `name` must be mapped. Unmapped columns are ignored.
    pub fn new(
        headers: &[String],
        mappings: &[(String, String)],
        rules: Rules,
    ) -> Result<Self, FileError> {
        let invalid = |m: String| Err(FileError::MappingInvalid(m));
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for (i, h) in headers.iter().enumerate() {
            by_key.entry(header_key(h)).or_insert(i);
        }
        let mut columns = Vec::with_capacity(mappings.len());
        let mut seen_targets: HashMap<String, &str> = HashMap::new();
        for (header, target) in mappings {
            let target_trim = target.trim();
            if target_trim.is_empty() {
                // The wizard's "do not import" choice.
                continue;
            }
            if target_trim.starts_with('$')
                || target_trim.contains('.')
                || target_trim.contains('\0')
            {
                return invalid(format!(
                    "column \"{header}\" maps to \"{target_trim}\", which is not a field name"
                ));
            }
            let target = if let Some(f) = DealField::parse(target_trim) {
                FieldTarget::Standard(f)
            } else if is_custom_id(target_trim) {
                FieldTarget::Custom(target_trim.to_ascii_lowercase())
            } else if DAEMON_OWNED.contains(&target_trim) {
                return invalid(format!(
                    "column \"{header}\" maps to \"{target_trim}\", which is set by the import itself"
                ));
            } else {
                return invalid(format!(
                    "column \"{header}\" maps to \"{target_trim}\", which is neither a deal field nor a custom field id"
                ));
            };
            if let Some(other) = seen_targets.insert(target.name().to_owned(), header) {
                return invalid(format!(
                    "columns \"{other}\" and \"{header}\" both map to \"{}\"",
                    target.name()
                ));
            }
            let index = headers
                .iter()
                .position(|h| h == header)
                .or_else(|| by_key.get(&header_key(header)).copied());
            let Some(index) = index else {
                return invalid(format!("the file has no column \"{header}\""));
            };
            columns.push(Column {
                index,
                header: headers[index].clone(),
                target,
            });
        }
        if !columns
            .iter()
            .any(|c| c.target == FieldTarget::Standard(DealField::Name))
        {
            return invalid(
                "no column is mapped to the deal name (\"name\"), which is required".into(),
            );
        }
        Ok(Self {
            columns,
            header_count: headers.len(),
            rules,
        })
    }

    /// Custom field ids the plan writes.
    pub fn custom_ids(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().filter_map(|c| match &c.target {
            FieldTarget::Custom(id) => Some(id.as_str()),
            FieldTarget::Standard(_) => None,
        })
    }

    /// Whether deals of this plan name contacts (a `contact_email` column).
    pub fn links_contacts(&self) -> bool {
        self.columns
            .iter()
            .any(|c| c.target == FieldTarget::Standard(DealField::ContactEmail))
    }

    /// Maps one record to a deal, or says why it cannot be imported.
    pub fn map_deal<F: Fields + ?Sized>(
        &self,
        line: LineNo,
        fields: &F,
    ) -> Result<MappedDeal, Box<FailedRow>> {
        let fail = |code: RowCode, field: Option<&str>, value: Option<&str>, message: String| {
            Box::new(FailedRow {
                error: RowError {
                    line,
                    code,
                    field: field.map(str::to_owned),
                    value: value.map(truncate_value),
                    message,
                },
                cells: (0..fields.count())
                    .map(|i| report_cell(fields.field(i).unwrap_or_default()))
                    .collect(),
            })
        };
        if fields.count() != self.header_count {
            return Err(fail(
                RowCode::FieldCount,
                None,
                None,
                format!(
                    "The row has {} fields but the header has {}; check for a missing or extra delimiter or an unclosed quote.",
                    fields.count(),
                    self.header_count
                ),
            ));
        }
        let mut deal = MappedDeal {
            line,
            ..MappedDeal::default()
        };
        for col in &self.columns {
            let raw = decode_cell(fields.field(col.index).unwrap_or_default());
            let value = raw.trim();
            let field_name = col.target.name();
            if value.is_empty() {
                continue;
            }
            if value.chars().count() > self.rules.max_field_chars {
                return Err(fail(
                    RowCode::TooLong,
                    Some(field_name),
                    Some(value),
                    format!(
                        "\"{}\" is longer than {} characters.",
                        col.header, self.rules.max_field_chars
                    ),
                ));
            }
            match &col.target {
                FieldTarget::Custom(id) => deal.custom.push((id.clone(), value.to_owned())),
                FieldTarget::Standard(f) => match f {
                    DealField::Name => deal.name = collapse_whitespace(value),
                    DealField::Value => match parse_number(value, self.rules.number_locale) {
                        Some(n) => deal.value = Some(n),
                        None => {
                            return Err(fail(
                                RowCode::InvalidNumber,
                                Some(field_name),
                                Some(value),
                                format!(
                                    "\"{}\" is not a number like 5000, 5,000.50 or $5,000.",
                                    col.header
                                ),
                            ));
                        }
                    },
                    DealField::StageId => {
                        deal.stage = Some(StageName {
                            key: stage_key(value),
                            label: collapse_whitespace(value),
                        });
                    }
                    DealField::Status => deal.status = Some(token(value)).filter(|t| !t.is_empty()),
                    DealField::ContractType => {
                        deal.contract_type = Some(token(value)).filter(|t| !t.is_empty());
                    }
                    DealField::ExpectedCloseDate => {
                        match parse_date(value, self.rules.date_order) {
                            Some(ms) => deal.expected_close_date = Some(ms),
                            None => {
                                return Err(fail(
                                    RowCode::InvalidDate,
                                    Some(field_name),
                                    Some(value),
                                    format!("\"{}\" is not a date like 2025-12-31.", col.header),
                                ));
                            }
                        }
                    }
                    DealField::Description => deal.description = Some(value.to_owned()),
                    DealField::ContactEmail => {
                        if !valid_email(value) {
                            return Err(fail(
                                RowCode::InvalidEmail,
                                Some(field_name),
                                Some(value),
                                format!("\"{}\" is not an email address.", col.header),
                            ));
                        }
                        deal.contact_email = Some(value.to_lowercase());
                    }
                    DealField::ContactName => deal.contact_name = Some(collapse_whitespace(value)),
                },
            }
        }
        if deal.name.is_empty() {
            let header = self
                .columns
                .iter()
                .find(|c| c.target == FieldTarget::Standard(DealField::Name))
                .map_or("name", |c| c.header.as_str());
            return Err(fail(
                RowCode::Required,
                Some("name"),
                None,
                format!("\"{header}\" (the deal name) is empty; every deal needs a name."),
            ));
        }
        deal.raw = RawCells::copy(fields);
        Ok(deal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            max_field_chars: 50,
            number_locale: NumberLocale::Dot,
            date_order: DateOrder::Mdy,
        }
    }

    fn headers(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    fn mapping(m: &[(&str, &str)]) -> Vec<(String, String)> {
        m.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    const CUSTOM: &str = "64b7f0c2a1b2c3d4e5f60718";

    fn plan() -> Plan {
        Plan::new(
            &headers(&[
                "\u{feff}Deal Name",
                "Value",
                "Stage",
                "Status",
                "Budget Code",
                "Ignored",
            ]),
            &mapping(&[
                ("Deal Name", "name"),
                ("value", "value"),
                ("Stage", "stage_id"),
                ("Status", "status"),
                ("Budget  Code", CUSTOM),
            ]),
            rules(),
        )
        .unwrap()
    }

    #[test]
    fn raw_cells_round_trip_and_are_cut_like_the_report() {
        let long = "é".repeat(MAX_REPORT_CELL_CHARS * 3);
        let cells: [&[u8]; 5] = [b"Acme", b"", b"Caf\xE9", long.as_bytes(), b"a,\"b\"\nc"];
        struct Bytes<'a>(&'a [&'a [u8]]);
        impl Fields for Bytes<'_> {
            fn count(&self) -> usize {
                self.0.len()
            }
            fn field(&self, i: usize) -> Option<&[u8]> {
                self.0.get(i).copied()
            }
        }
        let got = RawCells::copy(&Bytes(&cells)).to_cells();
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], "Acme");
        assert_eq!(got[1], "");
        assert_eq!(got[2], "Café");
        assert_eq!(got[3], "é".repeat(MAX_REPORT_CELL_CHARS));
        assert_eq!(got[4], "a,\"b\"\nc");
        assert!(RawCells::default().to_cells().is_empty());
    }

    #[test]
    fn a_valid_row_keeps_its_cells() {
        let cells = ["Acme Deal", "5", "Won", "open", "B-7", "x"];
        let d = plan().map_deal(2, &cells[..]).unwrap();
        assert_eq!(d.raw.to_cells(), cells);
    }

    #[test]
    fn maps_a_row() {
        let d = plan()
            .map_deal(
                2,
                &[
                    "Acme Deal",
                    "$5,000.50",
                    " Qualified ",
                    "Closed - Won",
                    "B-7",
                    "x",
                ][..],
            )
            .unwrap();
        assert_eq!(d.name, "Acme Deal");
        assert_eq!(d.value, Some(5000.5));
        assert_eq!(
            d.stage,
            Some(StageName {
                key: "qualified".into(),
                label: "Qualified".into()
            })
        );
        assert_eq!(d.status.as_deref(), Some("closed_won"));
        assert_eq!(d.custom, vec![(CUSTOM.to_owned(), "B-7".to_owned())]);
    }

    #[test]
    fn row_errors_name_field_and_line() {
        let p = plan();
        let e = p
            .map_deal(9, &["A", "lots", "", "", "", ""][..])
            .unwrap_err();
        assert_eq!((e.error.line, e.error.code), (9, RowCode::InvalidNumber));
        assert_eq!(e.error.field.as_deref(), Some("value"));
        assert_eq!(e.error.value.as_deref(), Some("lots"));
        assert_eq!(e.cells[1], "lots");
        let e = p.map_deal(3, &[" ", "1", "", "", "", ""][..]).unwrap_err();
        assert_eq!(e.error.code, RowCode::Required);
        let e = p.map_deal(4, &["A", "1"][..]).unwrap_err();
        assert_eq!(e.error.code, RowCode::FieldCount);
        let long = "x".repeat(51);
        let e = p
            .map_deal(5, &[long.as_str(), "1", "", "", "", ""][..])
            .unwrap_err();
        assert_eq!(e.error.code, RowCode::TooLong);
    }

    #[test]
    fn hostile_and_unknown_targets_are_refused() {
        let h = headers(&["A", "B"]);
        for target in [
            "$set",
            "a.b",
            "_id",
            "account_id",
            "owner",
            "import",
            "nonsense",
        ] {
            let e = Plan::new(&h, &mapping(&[("A", "name"), ("B", target)]), rules()).unwrap_err();
            assert_eq!(e.code(), "mapping_invalid", "{target}");
            assert!(e.to_string().contains("\"B\""), "{e}");
        }
    }

    #[test]
    fn missing_header_and_missing_name_are_refused() {
        let h = headers(&["A"]);
        let e = Plan::new(
            &h,
            &mapping(&[("A", "name"), ("Missing", "value")]),
            rules(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"Missing\""));
        let e = Plan::new(&h, &mapping(&[("A", "value")]), rules()).unwrap_err();
        assert_eq!(e.code(), "mapping_invalid");
        let e = Plan::new(
            &headers(&["A", "B"]),
            &mapping(&[("A", "name"), ("B", "name")]),
            rules(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("both map"));
    }

    #[test]
    fn exact_header_match_wins_over_loose_match() {
        let h = headers(&["name", "Name"]);
        let p = Plan::new(&h, &mapping(&[("Name", "name")]), rules()).unwrap();
        let d = p.map_deal(2, &["lower", "Upper"][..]).unwrap();
        assert_eq!(d.name, "Upper");
    }
}
