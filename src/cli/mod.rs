//! Library side of the command-line tools: each subcommand is one function
//! here; `main.rs` only parses arguments and prints.

pub mod demo;
pub mod enqueue;
pub mod logs;
pub mod status;
pub mod undo;
