//! After an import is final: the summary (pure), the downloadable error
//! report, the summary email (the only SMTP user) and the completion
//! webhook.

pub mod errors_csv;
pub mod notify;
pub mod summary;
pub mod webhook;

pub use summary::{Ending, ImportSummary};
