//! Pure shared types: job states, the import specification read from a queue
//! document, field targets, file-level error codes, row codes and the
//! deterministic record id.
//!
//! No I/O, no async, no driver types (an `ObjectId` is a value, not a
//! driver). Every other module may depend on this one; it depends on none.

use bson::oid::ObjectId;

pub mod ids;
pub mod text;

pub use ids::{contact_fallback_id, contact_id, deal_id, deal_id_range, line_of_deal_id};

/// Collection names: the data contract of SPEC.md.
pub mod collections {
    /// One document per import, written by the dashboard and the daemon.
    pub const QUEUES: &str = "queues";
    /// Imported deals.
    pub const DEALS: &str = "deals";
    /// Stages of pipelines; unique per `(account_id, pipeline_id, name)`.
    pub const PIPELINE_STAGES: &str = "pipeline_stages";
    /// Contacts; unique per `(account_id, email)`. Deals imports create
    /// the contacts their rows name.
    pub const CONTACTS: &str = "contacts";
    /// Pipelines (read only).
    pub const PIPELINES: &str = "pipelines";
    /// Users (read only): the summary email's address.
    pub const USERS: &str = "users";
    /// One summary document per import: support's entry point.
    pub const CSV_IMPORTS: &str = "csv_imports";
    /// Per-line outcomes, one document per written batch of lines.
    pub const IMPORT_LINES: &str = "import_lines";
}

/// Physical line number in the CSV file, 1-based; the header is line 1.
pub type LineNo = u64;

/// State of a queue document. The strings are the dashboard's contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting to be claimed. Left by a claim (→ `processing`); entered from
    /// `processing` when a lease is released or rescued after expiry.
    Pending,
    /// Claimed under a live lease by one daemon, which alone moves it on.
    Processing,
    /// Final: every line has an outcome.
    Completed,
    /// Final: a file-level error (see [`FileError`]) stopped the import.
    Failed,
    /// Final: the dashboard asked for cancellation; what was written stays.
    Cancelled,
}

impl JobState {
    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether no daemon will touch the import again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// What an import creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Deals of one pipeline.
    Deals,
    /// Contacts of an account.
    Contacts,
}

impl RecordKind {
    /// One record of this kind, for messages ("deal", "contact").
    pub fn noun(self) -> &'static str {
        match self {
            Self::Deals => "deal",
            Self::Contacts => "contact",
        }
    }

    /// The kind a queue document's `source` names.
    pub fn from_source(source: &str) -> Option<Self> {
        match source {
            "deals" => Some(Self::Deals),
            "contacts" => Some(Self::Contacts),
            _ => None,
        }
    }

    /// The queue document's `source` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deals => "deals",
            Self::Contacts => "contacts",
        }
    }
}

/// `additional_data.duplicate_strategy`. Deals match by normalised name;
/// contacts by email, and a contact is never created twice (`create` is
/// refused for contacts, `skip` is their default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DuplicateStrategy {
    /// Always insert (default of deals).
    #[default]
    Create,
    /// Leave an existing record alone.
    Skip,
    /// Update an existing record.
    Update,
}

/// A standard deal field a mapping may target (SPEC.md, `deals`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DealField {
    /// Required.
    Name,
    /// Number.
    Value,
    /// A stage name in the CSV, stored as the stage's ObjectId.
    StageId,
    /// Normalised token.
    Status,
    /// Normalised token.
    ContractType,
    /// Date.
    ExpectedCloseDate,
    /// Free text.
    Description,
    /// Contact link by email.
    ContactEmail,
    /// Contact link by name.
    ContactName,
}

impl DealField {
    /// Every standard field.
    pub const ALL: [DealField; 9] = [
        Self::Name,
        Self::Value,
        Self::StageId,
        Self::Status,
        Self::ContractType,
        Self::ExpectedCloseDate,
        Self::Description,
        Self::ContactEmail,
        Self::ContactName,
    ];

    /// The field name on a deal document.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Value => "value",
            Self::StageId => "stage_id",
            Self::Status => "status",
            Self::ContractType => "contract_type",
            Self::ExpectedCloseDate => "expected_close_date",
            Self::Description => "description",
            Self::ContactEmail => "contact_email",
            Self::ContactName => "contact_name",
        }
    }

    /// Parses a mapping target.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// A standard contact field a mapping may target (SPEC.md, `contacts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContactField {
    /// Required; validated and lower-cased: the contact's key.
    Email,
    /// Free text.
    FirstName,
    /// Free text.
    LastName,
    /// A full name, split at its first space into first and last name
    /// (a mapped `first_name` / `last_name` wins).
    Name,
    /// Free text.
    Phone,
    /// Free text.
    Company,
}

impl ContactField {
    /// Every standard field.
    pub const ALL: [ContactField; 6] = [
        Self::Email,
        Self::FirstName,
        Self::LastName,
        Self::Name,
        Self::Phone,
        Self::Company,
    ];

    /// The field name in a mapping (and, but for `name`, on the contact).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::FirstName => "first_name",
            Self::LastName => "last_name",
            Self::Name => "name",
            Self::Phone => "phone",
            Self::Company => "company",
        }
    }

    /// Parses a mapping target.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// Where a mapped column's value goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldTarget {
    /// A standard deal field.
    Standard(DealField),
    /// A standard contact field.
    Contact(ContactField),
    /// A custom field: `additional_info.<24-hex id>`.
    Custom(String),
}

impl FieldTarget {
    /// The name used in row errors and reports.
    pub fn name(&self) -> &str {
        match self {
            Self::Standard(f) => f.as_str(),
            Self::Contact(f) => f.as_str(),
            Self::Custom(id) => id,
        }
    }

    /// A standard field of `kind` named `s`.
    pub fn standard(kind: RecordKind, s: &str) -> Option<Self> {
        match kind {
            RecordKind::Deals => DealField::parse(s).map(Self::Standard),
            RecordKind::Contacts => ContactField::parse(s).map(Self::Contact),
        }
    }
}

/// Everything the pipeline needs from a claimed queue document.
#[derive(Clone, Debug)]
pub struct ImportSpec {
    /// The queue document's `_id`.
    pub queue_id: ObjectId,
    /// `source`.
    pub kind: RecordKind,
    /// Importing user: owner and creator of every record.
    pub user_id: ObjectId,
    /// Owning account.
    pub account_id: ObjectId,
    /// White-label parent account (webhook token claim).
    pub parent_account: Option<ObjectId>,
    /// Client id (webhook token claim).
    pub client_id: Option<ObjectId>,
    /// Object key of the CSV (`csv[0].key`).
    pub csv_key: String,
    /// Original file name (`csv[0].name`).
    pub file_name: String,
    /// `mappings`, in document order: CSV header → target string.
    pub mappings: Vec<(String, String)>,
    /// `additional_data.pipeline_id` (deals).
    pub pipeline_id: Option<ObjectId>,
    /// `additional_data.tags`.
    pub tags: Vec<String>,
    /// `additional_data.duplicate_strategy`.
    pub duplicate_strategy: DuplicateStrategy,
    /// `additional_data.dry_run`: check every line, write no record.
    pub dry_run: bool,
}

/// A file-level problem: the import ends `failed` with [`FileError::code`].
///
/// Codes are stable, snake_case and never reused; the `Display` text is for
/// the customer (email, dashboard) and may change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The queue document lacks a field the daemon needs.
    #[error("The import request is incomplete: {0}. Please start the import again.")]
    InvalidQueueDocument(String),
    /// `csv` names several files (an import takes one).
    #[error(
        "The import names {count} files, and an import takes one file. Please start one import per file."
    )]
    MultipleFiles {
        /// Distinct object keys named.
        count: usize,
    },
    /// `source` is not one this daemon imports.
    #[error("Imports of type \"{0}\" are not supported.")]
    UnsupportedSource(String),
    /// The uploaded object is not in storage.
    #[error("The uploaded file could not be found. Please upload it again.")]
    ObjectNotFound,
    /// Zero bytes.
    #[error("The file is empty. Please upload a CSV file with a header row and data rows.")]
    EmptyFile,
    /// No header row.
    #[error("The file has no header row. The first line must name the columns.")]
    NoHeader,
    /// Binary content (images, spreadsheets, archives).
    #[error(
        "The file is not a CSV text file (it looks like binary data, e.g. an Excel workbook). Please export it as CSV and upload it again."
    )]
    NotCsv,
    /// The CSV structure cannot be read at all.
    #[error("The file could not be read as CSV near line {line}: {detail}.")]
    Malformed {
        /// Physical line.
        line: LineNo,
        /// Parser detail.
        detail: String,
    },
    /// Over `import.max_file_bytes`.
    #[error(
        "The file is {size} bytes, over the limit of {limit} bytes. Please split it into smaller files."
    )]
    FileTooLarge {
        /// Object size.
        size: u64,
        /// Configured limit.
        limit: u64,
    },
    /// Over `import.max_rows`.
    #[error(
        "The file has more than {limit} rows, so nothing was imported. Please split it into files of at most {limit} rows and import each."
    )]
    TooManyRows {
        /// Configured limit.
        limit: u64,
    },
    /// Over `import.max_rows`, when what the rows up to the limit wrote
    /// stays: a contacts import (other imports may use its contacts by
    /// then), or deals under `skip` / `update` (updates cannot be taken
    /// back; a re-import meets its deals by name).
    #[error(
        "The file has more than {limit} rows. Its first {limit} rows were processed (imported, updated, skipped or failed: see the summary); the rows after them were not. Please import those as a separate file of at most {limit} rows."
    )]
    TooManyRowsKept {
        /// Configured limit.
        limit: u64,
    },
    /// The object was replaced in storage (uploaded again under the same
    /// name) after the import began reading it; what it wrote was taken
    /// back.
    #[error(
        "The file was replaced in storage while it was being imported, so nothing was imported. Please start a new import with the new file."
    )]
    FileChanged,
    /// As [`FileError::FileChanged`], when what the import wrote stays (see
    /// [`FileError::TooManyRowsKept`] for when).
    #[error(
        "The file was replaced in storage while it was being imported, so the import stopped: the rows read before that were processed (see the summary), the rest were not. Please import the new file again."
    )]
    FileChangedKept,
    /// The mapping is unusable.
    #[error("The column mapping is invalid: {0}")]
    MappingInvalid(String),
    /// `pipeline_id` is not a pipeline of the account.
    #[error(
        "The selected pipeline does not exist in this account. Please choose another pipeline."
    )]
    PipelineNotFound,
    /// Claimed too many times without finishing.
    #[error(
        "The import was interrupted {attempts} times and has been stopped. Please contact support."
    )]
    TooManyAttempts {
        /// `scheduler.max_attempts`.
        attempts: u32,
        /// The trouble that ended the last attempt, if recorded (for
        /// support: stored as `error.detail`).
        last_error: Option<String>,
    },
}

impl FileError {
    /// What support needs beyond the customer's message, stored as
    /// `error.detail`.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::TooManyAttempts { last_error, .. } => last_error.as_deref(),
            _ => None,
        }
    }

    /// Whether the import's writes are to be taken back, where they can
    /// be: the file as a whole was refused after rows of it were written.
    pub fn takes_back(&self) -> bool {
        matches!(self, Self::TooManyRows { .. } | Self::FileChanged)
    }

    /// The same failure when what the import wrote stays (it could not be
    /// taken back).
    pub fn kept(self) -> Self {
        match self {
            Self::TooManyRows { limit } => Self::TooManyRowsKept { limit },
            Self::FileChanged => Self::FileChangedKept,
            other => other,
        }
    }

    /// Stable machine-readable code, stored as `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidQueueDocument(_) => "invalid_queue_document",
            Self::UnsupportedSource(_) => "unsupported_source",
            Self::MultipleFiles { .. } => "multiple_files",
            Self::ObjectNotFound => "object_not_found",
            Self::EmptyFile => "empty_file",
            Self::NoHeader => "no_header",
            Self::NotCsv => "not_csv",
            Self::Malformed { .. } => "malformed_csv",
            Self::FileTooLarge { .. } => "file_too_large",
            Self::TooManyRows { .. } | Self::TooManyRowsKept { .. } => "too_many_rows",
            Self::FileChanged | Self::FileChangedKept => "file_changed",
            Self::MappingInvalid(_) => "mapping_invalid",
            Self::PipelineNotFound => "pipeline_not_found",
            Self::TooManyAttempts { .. } => "too_many_attempts",
        }
    }
}

/// Why one row was not imported. Stored on the line's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowCode {
    /// A required field is empty.
    Required,
    /// Not a number.
    InvalidNumber,
    /// Not a date.
    InvalidDate,
    /// Not an email address.
    InvalidEmail,
    /// Over `import.max_field_chars`.
    TooLong,
    /// The row has a different number of fields than the header.
    FieldCount,
    /// The database refused the record.
    WriteRejected,
    /// importd failed on the line (a bug, reported in its log).
    Internal,
    /// The row's stage would be new past `import.max_new_stages`.
    TooManyStages,
}

impl RowCode {
    /// Every code.
    pub const ALL: [RowCode; 9] = [
        Self::Required,
        Self::InvalidNumber,
        Self::InvalidDate,
        Self::InvalidEmail,
        Self::TooLong,
        Self::FieldCount,
        Self::WriteRejected,
        Self::Internal,
        Self::TooManyStages,
    ];

    /// Parses a stored code.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::InvalidNumber => "invalid_number",
            Self::InvalidDate => "invalid_date",
            Self::InvalidEmail => "invalid_email",
            Self::TooLong => "too_long",
            Self::FieldCount => "field_count",
            Self::WriteRejected => "write_rejected",
            Self::Internal => "internal",
            Self::TooManyStages => "too_many_stages",
        }
    }
}

/// One failed row: what support and the error report show.
#[derive(Clone, Debug, PartialEq)]
pub struct RowError {
    /// Physical line where the record starts.
    pub line: LineNo,
    /// Why.
    pub code: RowCode,
    /// Target field (or header) concerned, if one.
    pub field: Option<String>,
    /// The offending value, truncated for storage.
    pub value: Option<String>,
    /// Human explanation.
    pub message: String,
}

/// Longest value kept in a row error: enough to recognise it, small enough
/// that a batch of failures stays far below MongoDB's 16 MB limit.
pub const MAX_ERROR_VALUE_CHARS: usize = 200;

/// Cuts `s` to at most [`MAX_ERROR_VALUE_CHARS`] characters.
pub fn truncate_value(s: &str) -> String {
    match s.char_indices().nth(MAX_ERROR_VALUE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deal_fields_round_trip() {
        for f in DealField::ALL {
            assert_eq!(DealField::parse(f.as_str()), Some(f));
        }
        assert_eq!(DealField::parse("_id"), None);
    }

    #[test]
    fn contact_fields_round_trip() {
        for f in ContactField::ALL {
            assert_eq!(ContactField::parse(f.as_str()), Some(f));
            assert_eq!(
                FieldTarget::standard(RecordKind::Contacts, f.as_str()),
                Some(FieldTarget::Contact(f))
            );
        }
        assert_eq!(FieldTarget::standard(RecordKind::Contacts, "value"), None);
        assert_eq!(FieldTarget::standard(RecordKind::Deals, "email"), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(300);
        let t = truncate_value(&s);
        assert_eq!(t.chars().count(), MAX_ERROR_VALUE_CHARS + 1);
        assert_eq!(truncate_value("short"), "short");
    }
}
