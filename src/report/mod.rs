//! After an import is final: the summary (pure), the downloadable error
//! report, the summary email (the only SMTP user) and the completion
//! webhook; after an undo, its email.

pub mod errors_csv;
pub mod notify;
pub mod summary;
pub mod undo_summary;
pub mod webhook;

pub use summary::{Ending, ImportSummary};
