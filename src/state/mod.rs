//! Session state as PostgreSQL holds it: classification of statements and
//! the per-session tracker.

pub mod classify;
pub mod lexer;

pub use classify::{classify, Class, Kind};
pub use lexer::{split_statements, LexOptions};
