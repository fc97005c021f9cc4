//! Session state as PostgreSQL holds it: classification of statements and
//! the per-session tracker.

pub mod classify;
pub mod effect;
pub mod lexer;
pub mod resync;
pub mod tracker;

pub use classify::{classify, Class, Kind};
pub use effect::{effect_of, Effect, RepriseCommand};
pub use lexer::{split_statements, LexOptions};
pub use tracker::{Ready, Tracker};
