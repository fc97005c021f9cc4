//! Session templates: the restorable part of a session's state, hashed and
//! shared by every session that has the same state.
//!
//! A [`Template`] holds what a restore plan can give a fresh server
//! connection (startup parameters, GUCs, role, prepared statements, LISTEN
//! channels). Its [`TemplateId`] is blake3 of its canonical encoding, and the
//! [`Registry`] keeps one copy per id for all sessions. What only replay can
//! rebuild (transaction status and characteristics, SET LOCAL, savepoints,
//! non-recoverable state) is the [`ReplayState`]; the [`StateHash`] of a
//! session covers both and is recorded after every command.

mod attributes;
mod codec;
mod id;
mod named;
mod plan;
pub use plan::{quote_identifier, quote_literal, ParseStep, PlanError, RestorePlan, RestoreStep};
mod registry;
mod replay;

pub use attributes::{fold_guc_name, PreparedOrigin, PreparedStatement, Template};
pub use codec::DecodeError;
pub use id::{state_hash, ParseTemplateIdError, StateHash, TemplateId};
pub use named::{load_named_templates, NamedTemplate, NamedTemplateError, NamedTemplates};
pub use registry::{Registry, RegistryStats, TemplateRef};
pub use replay::{
    IsolationLevel, NonRecoverable, NonRecoverableSet, ReplayState, TransactionStatus,
};

#[cfg(test)]
mod tests;
