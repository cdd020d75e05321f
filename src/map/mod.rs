//! Raw record → mapped deal or row error: the mapping plan, validation and
//! value parsing. PURE: no I/O, no async, no driver.
//!
//! [`Plan::new`] checks the mapping against the header row once, before any
//! write (`mapping_invalid`, naming the header). [`Plan::map_deal`] (or
//! [`Plan::map_contact`]) then turns each record into a [`MappedDeal`] (a
//! [`MappedContact`]) or a [`RowError`]; a bad row is data,
//! never an `Err` that ends the import.

use std::collections::HashMap;

use crate::config::{DateOrder, NumberLocale};
use crate::domain::text::{collapse_whitespace, decode_cell, header_key, stage_key, token};
use crate::domain::{
    ContactField, DealField, FieldTarget, FileError, LineNo, RecordKind, RowCode, RowError,
    truncate_value,
};

mod values;

pub use values::{nfkc_email, normalise_email, parse_date, parse_number, valid_email};

/// Targets that are never accepted, even though they are plain names: the
/// daemon owns them, and a CSV must not set them.
const DAEMON_OWNED: [&str; 15] = [
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
    "last_import",
    "last_imports",
    "contact_id",
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

/// A valid row of either kind.
pub trait Mapped {
    /// Physical line where its record starts.
    fn line(&self) -> LineNo;
    /// What `duplicate_strategy` matches it on: a deal's name, a contact's
    /// email.
    fn match_key(&self) -> &str;
    /// The pipeline stage it names (deals).
    fn stage(&self) -> Option<&StageName> {
        None
    }
    /// Its cells, for the error report of a line that fails after mapping.
    fn cells(&self) -> Vec<String>;
}

impl Mapped for MappedDeal {
    fn line(&self) -> LineNo {
        self.line
    }
    fn match_key(&self) -> &str {
        &self.name
    }
    fn stage(&self) -> Option<&StageName> {
        self.stage.as_ref()
    }
    fn cells(&self) -> Vec<String> {
        self.raw.to_cells()
    }
}

impl Mapped for MappedContact {
    fn line(&self) -> LineNo {
        self.line
    }
    fn match_key(&self) -> &str {
        &self.email
    }
    fn cells(&self) -> Vec<String> {
        self.raw.to_cells()
    }
}

/// A valid contact row, ready for writing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MappedContact {
    /// Physical line.
    pub line: LineNo,
    /// Required, lower-cased: the contact's key within the account.
    pub email: String,
    /// Free text (from `first_name`, or the first word of `name`).
    pub first_name: Option<String>,
    /// Free text (from `last_name`, or the rest of `name`).
    pub last_name: Option<String>,
    /// Free text.
    pub phone: Option<String>,
    /// Free text.
    pub company: Option<String>,
    /// Custom field values, `(field id, value)`.
    pub custom: Vec<(String, String)>,
    /// The record as read (see [`MappedDeal::raw`]).
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

/// Most bytes of mapped values one row may carry: its record (plus field
/// names and the daemon's fields) stays far below MongoDB's 16 MB.
pub const MAX_RECORD_VALUE_BYTES: usize = 8 << 20;

/// Longest cell kept for the error report.
pub const MAX_REPORT_CELL_CHARS: usize = 1000;

fn is_custom_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Cells a failed row keeps beyond the header's: enough to see what went
/// wrong, never a copy of a runaway row of thousands of empty fields.
const EXTRA_REPORT_CELLS: usize = 16;

impl Plan {
    /// A failed row with its cells (at most the header's plus
    /// [`EXTRA_REPORT_CELLS`]), from a record's raw fields.
    fn failed_row<F: Fields + ?Sized>(
        &self,
        line: LineNo,
        fields: &F,
        code: RowCode,
        field: Option<&str>,
        value: Option<&str>,
        message: String,
    ) -> Box<FailedRow> {
        let cells = fields.count().min(self.header_count + EXTRA_REPORT_CELLS);
        failed_row(line, fields, cells, code, field, value, message)
    }
}

/// A failed row with the first `cells` cells of a record's raw fields.
fn failed_row<F: Fields + ?Sized>(
    line: LineNo,
    fields: &F,
    cells: usize,
    code: RowCode,
    field: Option<&str>,
    value: Option<&str>,
    message: String,
) -> Box<FailedRow> {
    Box::new(FailedRow {
        error: RowError {
            line,
            code,
            field: field.map(str::to_owned),
            value: value.map(truncate_value),
            message,
        },
        cells: (0..cells)
            .map(|i| report_cell(fields.field(i).unwrap_or_default()))
            .collect(),
    })
}

/// Why a cell is refused: code and message (the field and value are the
/// cell's).
type CellError = (RowCode, String);

impl Plan {
    /// Checks `mappings` (CSV header → target) of an import of `kind`
    /// against `headers`.
    ///
    /// Headers match exactly first, then case/space-insensitively with the
    /// BOM stripped. Every target must be a standard field of `kind` or a
    /// 24-hex custom field id; operator-like (`$…`), dotted or daemon-owned
    /// targets are refused. The key field (a deal's `name`, a contact's
    /// `email`) must be mapped. Unmapped columns are ignored.
    pub fn new(
        kind: RecordKind,
        headers: &[String],
        mappings: &[(String, String)],
        rules: Rules,
    ) -> Result<Self, FileError> {
        // Headers and targets come from the file and the dashboard, of any
        // length: the message (stored on the queue document) is cut short.
        let invalid = |m: String| Err(FileError::MappingInvalid(truncate_value(&m)));
        // Per loose key: the first column, and how many share the key.
        let mut by_key: HashMap<String, (usize, usize)> = HashMap::new();
        for (i, h) in headers.iter().enumerate() {
            by_key.entry(header_key(h)).or_insert((i, 0)).1 += 1;
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
            let target = if let Some(t) = FieldTarget::standard(kind, target_trim) {
                t
            } else if is_custom_id(target_trim) {
                FieldTarget::Custom(target_trim.to_ascii_lowercase())
            } else if DAEMON_OWNED.contains(&target_trim) {
                return invalid(format!(
                    "column \"{header}\" maps to \"{target_trim}\", which is set by the import itself"
                ));
            } else {
                return invalid(format!(
                    "column \"{header}\" maps to \"{target_trim}\", which is neither a {} field nor a custom field id",
                    kind.noun()
                ));
            };
            if let Some(other) = seen_targets.insert(target.name().to_owned(), header) {
                return invalid(format!(
                    "columns \"{other}\" and \"{header}\" both map to \"{}\"",
                    target.name()
                ));
            }
            // Exact match first, then case/space-insensitive; a mapped
            // header that names two columns either way cannot be told apart.
            let exact: Vec<usize> = (0..headers.len())
                .filter(|&i| headers[i] == *header)
                .collect();
            let (index, count) = match exact.as_slice() {
                [] => match by_key.get(&header_key(header)) {
                    Some(&(index, count)) => (index, count),
                    None => return invalid(format!("the file has no column \"{header}\"")),
                },
                [index, ..] => (*index, exact.len()),
            };
            if count > 1 {
                return invalid(format!(
                    "the file has {count} columns named \"{header}\" (or spelled alike), so the \
                     mapping cannot tell which to import; rename them apart"
                ));
            }
            columns.push(Column {
                index,
                // Quoted in row messages, of which a batch holds up to
                // 10,000: cut short like a value.
                header: truncate_value(&headers[index]),
                target,
            });
        }
        let plan = Self {
            columns,
            header_count: headers.len(),
            rules,
        };
        let key = plan.key_target(kind);
        if plan.header_of(&key).is_none() {
            return invalid(match kind {
                RecordKind::Deals => {
                    "no column is mapped to the deal name (\"name\"), which is required".into()
                }
                RecordKind::Contacts => {
                    "no column is mapped to the contact's email (\"email\"), which is required"
                        .into()
                }
            });
        }
        Ok(plan)
    }

    /// The field every record of `kind` needs.
    fn key_target(&self, kind: RecordKind) -> FieldTarget {
        match kind {
            RecordKind::Deals => FieldTarget::Standard(DealField::Name),
            RecordKind::Contacts => FieldTarget::Contact(ContactField::Email),
        }
    }

    /// The header of the column mapped to `target`.
    fn header_of(&self, target: &FieldTarget) -> Option<&str> {
        self.columns
            .iter()
            .find(|c| &c.target == target)
            .map(|c| c.header.as_str())
    }

    /// Custom field ids the plan writes.
    pub fn custom_ids(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().filter_map(|c| match &c.target {
            FieldTarget::Custom(id) => Some(id.as_str()),
            _ => None,
        })
    }

    /// Whether deals of this plan name a pipeline stage.
    pub fn maps_stages(&self) -> bool {
        self.columns
            .iter()
            .any(|c| c.target == FieldTarget::Standard(DealField::StageId))
    }

    /// Whether deals of this plan name contacts (a `contact_email` column).
    pub fn links_contacts(&self) -> bool {
        self.columns
            .iter()
            .any(|c| c.target == FieldTarget::Standard(DealField::ContactEmail))
    }

    /// Walks the mapped, non-empty cells of a record: checks the field
    /// count and the length limit, then hands each trimmed value to
    /// `apply`, which fills `rec` or refuses the cell.
    fn map_row<F: Fields + ?Sized, T>(
        &self,
        line: LineNo,
        fields: &F,
        mut rec: T,
        mut apply: impl FnMut(&mut T, &Column, &str) -> Result<(), CellError>,
    ) -> Result<T, Box<FailedRow>> {
        if fields.count() != self.header_count {
            return Err(self.failed_row(
                line,
                fields,
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
        let mut mapped_bytes = 0;
        for col in &self.columns {
            let raw = decode_cell(fields.field(col.index).unwrap_or_default());
            let value = raw.trim();
            if value.is_empty() {
                continue;
            }
            mapped_bytes += value.len();
            if mapped_bytes > MAX_RECORD_VALUE_BYTES {
                // Its record could not be stored (MongoDB's 16 MB), and
                // would take its whole batch down with it.
                return Err(self.failed_row(
                    line,
                    fields,
                    RowCode::TooLong,
                    None,
                    None,
                    format!(
                        "The row's values add up to more than {} MiB, too large for one record.",
                        MAX_RECORD_VALUE_BYTES >> 20
                    ),
                ));
            }
            let refused = if value.chars().count() > self.rules.max_field_chars {
                Err((
                    RowCode::TooLong,
                    format!(
                        "\"{}\" is longer than {} characters.",
                        col.header, self.rules.max_field_chars
                    ),
                ))
            } else {
                apply(&mut rec, col, value)
            };
            if let Err((code, message)) = refused {
                let field = col.target.name();
                return Err(self.failed_row(line, fields, code, Some(field), Some(value), message));
            }
        }
        Ok(rec)
    }

    /// The row error of an empty key field.
    fn required<F: Fields + ?Sized>(
        &self,
        kind: RecordKind,
        line: LineNo,
        fields: &F,
    ) -> Box<FailedRow> {
        let target = self.key_target(kind);
        let header = self.header_of(&target).unwrap_or(target.name());
        let message = match kind {
            RecordKind::Deals => {
                format!("\"{header}\" (the deal name) is empty; every deal needs a name.")
            }
            RecordKind::Contacts => format!(
                "\"{header}\" (the contact's email) is empty; every contact needs an email address."
            ),
        };
        self.failed_row(
            line,
            fields,
            RowCode::Required,
            Some(target.name()),
            None,
            message,
        )
    }

    /// Maps one record to a deal, or says why it cannot be imported.
    pub fn map_deal<F: Fields + ?Sized>(
        &self,
        line: LineNo,
        fields: &F,
    ) -> Result<MappedDeal, Box<FailedRow>> {
        self.shielded(line, fields, || self.deal_of(line, fields))
    }

    /// Maps one record to a contact, or says why it cannot be imported.
    pub fn map_contact<F: Fields + ?Sized>(
        &self,
        line: LineNo,
        fields: &F,
    ) -> Result<MappedContact, Box<FailedRow>> {
        self.shielded(line, fields, || self.contact_of(line, fields))
    }

    /// Runs `map` on one record; should it panic (a fault of importd on
    /// input nobody foresaw), the line fails with `internal` instead of the
    /// whole import failing after `max_attempts` runs that each die on it.
    fn shielded<T, F: Fields + ?Sized>(
        &self,
        line: LineNo,
        fields: &F,
        map: impl FnOnce() -> Result<T, Box<FailedRow>>,
    ) -> Result<T, Box<FailedRow>> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(map)).unwrap_or_else(|_| {
            tracing::error!(
                line,
                "Mapping a line panicked; the line is recorded as failed"
            );
            Err(self.failed_row(
                line,
                fields,
                RowCode::Internal,
                None,
                None,
                "importd could not read this line because of a fault of its own (reported \
                 to support); the rest of the file was imported."
                    .into(),
            ))
        })
    }

    fn deal_of<F: Fields + ?Sized>(
        &self,
        line: LineNo,
        fields: &F,
    ) -> Result<MappedDeal, Box<FailedRow>> {
        let rules = self.rules;
        let init = MappedDeal {
            line,
            ..MappedDeal::default()
        };
        let mut deal = self.map_row(line, fields, init, |deal, col, value| {
            let f = match &col.target {
                FieldTarget::Custom(id) => {
                    deal.custom.push((id.clone(), value.to_owned()));
                    return Ok(());
                }
                FieldTarget::Standard(f) => *f,
                FieldTarget::Contact(_) => return Ok(()),
            };
            match f {
                DealField::Name => deal.name = collapse_whitespace(value),
                DealField::Value => {
                    deal.value =
                        Some(parse_number(value, rules.number_locale).ok_or_else(|| {
                            (
                                RowCode::InvalidNumber,
                                format!(
                                    "\"{}\" is not a number like 5000, 5,000.50 or $5,000.",
                                    col.header
                                ),
                            )
                        })?);
                }
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
                    deal.expected_close_date =
                        Some(parse_date(value, rules.date_order).ok_or_else(|| {
                            (
                                RowCode::InvalidDate,
                                format!(
                                    "\"{}\" is not a date like 2025-12-31 or {}.",
                                    col.header,
                                    rules.date_order.example()
                                ),
                            )
                        })?);
                }
                DealField::Description => deal.description = Some(value.to_owned()),
                DealField::ContactEmail => deal.contact_email = Some(checked_email(col, value)?),
                DealField::ContactName => deal.contact_name = Some(collapse_whitespace(value)),
            }
            Ok(())
        })?;
        if deal.name.is_empty() {
            return Err(self.required(RecordKind::Deals, line, fields));
        }
        deal.raw = RawCells::copy(fields);
        Ok(deal)
    }

    fn contact_of<F: Fields + ?Sized>(
        &self,
        line: LineNo,
        fields: &F,
    ) -> Result<MappedContact, Box<FailedRow>> {
        let init = MappedContact {
            line,
            ..MappedContact::default()
        };
        let mut full_name = None;
        let mut contact = self.map_row(line, fields, init, |c, col, value| {
            let f = match &col.target {
                FieldTarget::Custom(id) => {
                    c.custom.push((id.clone(), value.to_owned()));
                    return Ok(());
                }
                FieldTarget::Contact(f) => *f,
                FieldTarget::Standard(_) => return Ok(()),
            };
            match f {
                ContactField::Email => c.email = checked_email(col, value)?,
                ContactField::FirstName => c.first_name = Some(collapse_whitespace(value)),
                ContactField::LastName => c.last_name = Some(collapse_whitespace(value)),
                ContactField::Name => full_name = Some(collapse_whitespace(value)),
                ContactField::Phone => c.phone = Some(collapse_whitespace(value)),
                ContactField::Company => c.company = Some(collapse_whitespace(value)),
            }
            Ok(())
        })?;
        if contact.email.is_empty() {
            return Err(self.required(RecordKind::Contacts, line, fields));
        }
        if let Some(full) = full_name {
            let (first, last) = split_full_name(&full);
            if contact.first_name.is_none() && !first.is_empty() {
                contact.first_name = Some(first.to_owned());
            }
            if contact.last_name.is_none() && !last.is_empty() {
                contact.last_name = Some(last.to_owned());
            }
        }
        contact.raw = RawCells::copy(fields);
        Ok(contact)
    }
}

/// An email cell, validated and lower-cased.
fn checked_email(col: &Column, value: &str) -> Result<String, CellError> {
    let email = nfkc_email(value);
    if valid_email(&email) {
        Ok(email.to_lowercase())
    } else {
        Err((
            RowCode::InvalidEmail,
            format!("\"{}\" is not an email address.", col.header),
        ))
    }
}

/// A full name split at its first whitespace: first name, then the rest.
pub fn split_full_name(full: &str) -> (&str, &str) {
    let full = full.trim();
    match full.split_once(char::is_whitespace) {
        Some((first, rest)) => (first, rest.trim_start()),
        None => (full, ""),
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
            RecordKind::Deals,
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
            "last_imports",
            "nonsense",
        ] {
            let e = Plan::new(
                RecordKind::Deals,
                &h,
                &mapping(&[("A", "name"), ("B", target)]),
                rules(),
            )
            .unwrap_err();
            assert_eq!(e.code(), "mapping_invalid", "{target}");
            assert!(e.to_string().contains("\"B\""), "{e}");
        }
    }

    #[test]
    fn a_row_too_large_for_one_record_fails_alone() {
        let h: Vec<String> = (0..1_000).map(|i| format!("c{i}")).collect();
        let mut m = vec![("c0".to_owned(), "name".to_owned())];
        m.extend((1..1_000).map(|i| (format!("c{i}"), format!("{i:024x}"))));
        let mut r = rules();
        r.max_field_chars = 10_000;
        let p = Plan::new(RecordKind::Deals, &h, &m, r).unwrap();
        let big = "x".repeat(9_000);
        let cells: Vec<&str> = (0..1_000).map(|_| big.as_str()).collect();
        let f = p.map_deal(2, &cells[..]).unwrap_err();
        assert_eq!(f.error.code, RowCode::TooLong);
        assert!(f.error.message.contains("8 MiB"), "{}", f.error.message);
        let small: Vec<&str> = (0..1_000).map(|_| "x").collect();
        assert!(p.map_deal(3, &small[..]).is_ok());
    }

    #[test]
    fn messages_quote_long_headers_cut_short() {
        let long = "H".repeat(20_000);
        let p = Plan::new(
            RecordKind::Deals,
            &headers(&["Name", &long]),
            &mapping(&[("Name", "name"), (&long, "value")]),
            rules(),
        )
        .unwrap();
        let f = p.map_deal(2, &["A", "lots"][..]).unwrap_err();
        assert!(f.error.message.len() < 1_000, "{}", f.error.message.len());
        let e = Plan::new(
            RecordKind::Deals,
            &headers(&["Name"]),
            &mapping(&[("Name", "name"), (&long, "value")]),
            rules(),
        )
        .unwrap_err();
        assert!(e.to_string().len() < 1_000);
    }

    #[test]
    fn a_mapped_header_naming_two_columns_is_refused() {
        let plan = |h: &[&str], m: &str| {
            Plan::new(
                RecordKind::Deals,
                &headers(h),
                &mapping(&[(m, "name")]),
                rules(),
            )
        };
        let e = plan(&["Name", "Email", "Name"], "Name").unwrap_err();
        assert_eq!(e.code(), "mapping_invalid");
        assert!(e.to_string().contains("2 columns named \"Name\""), "{e}");
        assert!(plan(&["name", "NAME"], "Name").is_err());
        // An exact match decides; duplicates nobody maps do not matter.
        let p = plan(&["Name", "NAME", "x", "x"], "NAME").unwrap();
        assert_eq!(p.map_deal(2, &["a", "b", "", ""][..]).unwrap().name, "b");
    }

    #[test]
    fn missing_header_and_missing_name_are_refused() {
        let h = headers(&["A"]);
        let e = Plan::new(
            RecordKind::Deals,
            &h,
            &mapping(&[("A", "name"), ("Missing", "value")]),
            rules(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"Missing\""));
        let e = Plan::new(RecordKind::Deals, &h, &mapping(&[("A", "value")]), rules()).unwrap_err();
        assert_eq!(e.code(), "mapping_invalid");
        let e = Plan::new(
            RecordKind::Deals,
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
        let p = Plan::new(
            RecordKind::Deals,
            &h,
            &mapping(&[("Name", "name")]),
            rules(),
        )
        .unwrap();
        let d = p.map_deal(2, &["lower", "Upper"][..]).unwrap();
        assert_eq!(d.name, "Upper");
    }

    fn contact_plan(mapping_pairs: &[(&str, &str)]) -> Result<Plan, FileError> {
        Plan::new(
            RecordKind::Contacts,
            &headers(&["Email", "Full Name", "First", "Phone", "Company", CUSTOM]),
            &mapping(mapping_pairs),
            rules(),
        )
    }

    #[test]
    fn contacts_need_an_email_column_and_refuse_deal_fields() {
        let e = contact_plan(&[("Full Name", "name")]).unwrap_err();
        assert!(e.to_string().contains("\"email\""), "{e}");
        let e = contact_plan(&[("Email", "email"), ("Phone", "value")]).unwrap_err();
        assert!(e.to_string().contains("contact field"), "{e}");
        let e = contact_plan(&[("Email", "email"), ("Phone", "owner")]).unwrap_err();
        assert!(e.to_string().contains("set by the import"), "{e}");
    }

    #[test]
    fn contacts_map_split_names_and_custom_fields() {
        let p = contact_plan(&[
            ("Email", "email"),
            ("Full Name", "name"),
            ("First", "first_name"),
            ("Phone", "phone"),
            ("Company", "company"),
            (CUSTOM, CUSTOM),
        ])
        .unwrap();
        let c = p
            .map_contact(
                7,
                &[
                    " Ana@Example.COM ",
                    "Ana  Maria Lopez",
                    "",
                    "+1 555",
                    "ACME",
                    "gold",
                ][..],
            )
            .unwrap();
        assert_eq!(c.line, 7);
        assert_eq!(c.email, "ana@example.com");
        assert_eq!(c.first_name.as_deref(), Some("Ana"));
        assert_eq!(c.last_name.as_deref(), Some("Maria Lopez"));
        assert_eq!(c.phone.as_deref(), Some("+1 555"));
        assert_eq!(c.company.as_deref(), Some("ACME"));
        assert_eq!(c.custom, vec![(CUSTOM.to_owned(), "gold".to_owned())]);
        // A mapped first name wins over the split one.
        let c = p
            .map_contact(8, &["b@x.io", "Bob Smith", "Robert", "", "", ""][..])
            .unwrap();
        assert_eq!(c.first_name.as_deref(), Some("Robert"));
        assert_eq!(c.last_name.as_deref(), Some("Smith"));
    }

    #[test]
    fn contact_rows_fail_on_missing_or_invalid_email() {
        let p = contact_plan(&[("Email", "email"), ("Full Name", "name")]).unwrap();
        let f = p
            .map_contact(3, &["", "No Mail", "", "", "", ""][..])
            .unwrap_err();
        assert_eq!(f.error.code, RowCode::Required);
        assert_eq!(f.error.field.as_deref(), Some("email"));
        assert_eq!(f.cells[1], "No Mail");
        let f = p
            .map_contact(4, &["not-an-email", "X", "", "", "", ""][..])
            .unwrap_err();
        assert_eq!(f.error.code, RowCode::InvalidEmail);
        assert_eq!(f.error.value.as_deref(), Some("not-an-email"));
        let f = p.map_contact(5, &["a@b.co"][..]).unwrap_err();
        assert_eq!(f.error.code, RowCode::FieldCount);
    }

    #[test]
    fn a_runaway_row_keeps_a_bounded_number_of_cells() {
        let p = plan();
        let wide: Vec<String> = (0..5_000).map(|i| format!("c{i}")).collect();
        let f = p.map_deal(2, &wide[..]).unwrap_err();
        assert_eq!(f.error.code, RowCode::FieldCount);
        assert_eq!(f.cells.len(), 6 + EXTRA_REPORT_CELLS);
        assert_eq!(f.cells[0], "c0");
    }

    #[test]
    fn a_panic_on_a_line_fails_that_line_only() {
        let p = plan();
        let cells = ["Acme", "1", "", "", "", ""];
        let f = p
            .shielded(7, &cells[..], || -> Result<(), _> { panic!("a bug") })
            .unwrap_err();
        assert_eq!(f.error.line, 7);
        assert_eq!(f.error.code, RowCode::Internal);
        assert_eq!(f.cells[0], "Acme");
        // The plan is still usable.
        assert_eq!(p.map_deal(8, &cells[..]).unwrap().name, "Acme");
    }
}
