//! Integration tests against the real local stack (`scripts/stack.sh up`):
//! one binary, one file per behaviour, every test in its own database.

mod claim;
mod config_cli;
mod contacts;
mod contacts_import;
mod deals;
mod dry_run;
mod helpers;
mod http;
mod indexes;
mod lifecycle;
mod notify;
mod retention;
mod storage;
mod support_cli;
mod undo;
