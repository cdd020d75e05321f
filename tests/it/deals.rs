//! The deal pipeline end to end.
