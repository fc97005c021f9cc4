//! The persistent session journal.
//!
//! Per session, the journal holds the commands issued since the session's
//! last safe point, with the state hash after each and a digest of what
//! the client received for it, so that the work a crash interrupted can be
//! found, reported and (by the tools) replayed. See
//! [`record`] for the format, [`writer`] for how records reach the disk and
//! [`recovery`] for how they are read back.
//!
//! The journal holds statements and bind values as the client sent them:
//! it is as sensitive as the data itself. Its files are created with mode
//! 0600 in a 0700 directory, and a command that carries a password or
//! another credential is written without its messages.

pub mod checkpoint;
pub mod reader;
pub mod record;
pub mod recovery;
pub mod report;
pub mod segment;
pub mod synthetic;
pub mod writer;

pub use reader::{Damage, DamageKind, ScannedRecord, SegmentScan};
pub use record::{Omitted, OutcomeKind, Record, RecordKind};
pub use recovery::{CorruptionPolicy, Mode, RecoveredSession, Recovery, RecoveryError};
pub use segment::Position;
pub use writer::{Appended, FsyncPolicy, Journal, JournalHandle, Retain, WriterSettings};

/// The journal's directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";
