//! importd: imports CRM deals (and contacts) from CSV files in S3-compatible
//! storage into MongoDB.
//!
//! Modules in data-flow order: [`claim`] (atomic claims under a lease, the
//! only writer of queue state) → [`fetch`] (S3 object → bytes) → [`parse`]
//! (bytes → records) → [`map`] (records → deals or row errors, pure) →
//! [`stages`] (pipeline stages, created once) → [`contacts`] (the contacts
//! deals name, created once) → [`write`](mod@write) (idempotent bulk
//! inserts) → [`outcomes`] (per-line outcomes and the summary), wired by
//! [`pipeline`] and driven by [`daemon`]; [`http`] serves health, metrics
//! and an import's progress; [`undo`] takes a finished import back;
//! [`retention`] purges an import's per-line data once it is old.
//! [`domain`] holds the pure types
//! every module shares.

pub mod app;
pub mod claim;
pub mod cli;
pub mod clock;
pub mod config;
pub mod contacts;
pub mod daemon;
pub mod db;
pub mod domain;
pub mod fetch;
pub mod http;
pub mod map;
pub mod outcomes;
pub mod parse;
pub mod pipeline;
pub mod report;
pub mod retention;
pub mod stages;
pub mod telemetry;
pub mod undo;
pub mod write;
