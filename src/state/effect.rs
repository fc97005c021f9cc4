//! Second stage of classification: what exactly a candidate statement does
//! to session state.
//!
//! Statements whose arguments are names and constants (SET, RESET, LISTEN,
//! BEGIN …) are read from the [lexer](super::lexer)'s tokens, on bytes, so
//! that any client encoding and `standard_conforming_strings = off` work,
//! and so are the forms sqlparser's PostgreSQL dialect rejects (PREPARE
//! TRANSACTION, BEGIN … DEFERRABLE). Function calls inside a query
//! (`set_config`) are checked with sqlparser, which sees the whole
//! expression tree. Whatever is not understood exactly is
//! [`Effect::Unknown`]: the tracker then treats the session as changed in
//! unknown ways, and counts it.

use bytes::Bytes;
use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, SelectItem, SetExpr,
    Statement, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::classify::{classify, Class, Kind};
use super::lexer::{LexOptions, Lexeme, Lexer, TokenKind};
use crate::template::{quote_identifier, IsolationLevel, NonRecoverable};

/// PostgreSQL truncates identifiers to `NAMEDATALEN - 1` bytes.
const MAX_IDENTIFIER: usize = 63;
/// sqlparser recursion bound: a hostile statement must not exhaust the stack.
const PARSE_DEPTH: usize = 32;

/// What a statement does to tracked session state when it succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing the tracker follows.
    None,
    /// A GUC takes a value (`SET`, `set_config`). The name is folded.
    Set {
        name: Bytes,
        value: Bytes,
        local: bool,
    },
    /// A GUC goes back to its session default (`RESET name`, `SET name TO
    /// DEFAULT`).
    Reset {
        name: Bytes,
        local: bool,
    },
    ResetAll,
    /// `SET ROLE`; `None` for NONE and RESET ROLE.
    Role {
        role: Option<Bytes>,
        local: bool,
    },
    /// `SET SESSION AUTHORIZATION`; `None` for DEFAULT and RESET.
    SessionAuthorization {
        user: Option<Bytes>,
        local: bool,
    },
    /// `SET TRANSACTION …`.
    TransactionModes(TransactionModes),
    Begin(TransactionModes),
    Commit {
        chain: bool,
    },
    Rollback {
        chain: bool,
    },
    Savepoint(Bytes),
    Release(Bytes),
    RollbackTo(Bytes),
    /// `PREPARE TRANSACTION`: ends the transaction like COMMIT does for
    /// session state.
    PrepareTransaction,
    /// `PREPARE name AS body`: `statement` is the whole PREPARE, which
    /// re-creates it; `body` is what EXECUTE will do.
    Prepare {
        name: Bytes,
        statement: Bytes,
        body: Box<Effect>,
    },
    /// `DEALLOCATE name`; `None` for ALL.
    Deallocate(Option<Bytes>),
    /// `EXECUTE name`: the prepared body's effect.
    Execute(Bytes),
    Listen(Bytes),
    /// `UNLISTEN channel`; `None` for `*`.
    Unlisten(Option<Bytes>),
    Discard(Discard),
    /// `DECLARE name CURSOR WITH HOLD`.
    DeclareHold(Bytes),
    /// `CLOSE name`; `None` for ALL.
    Close(Option<Bytes>),
    /// State no template can hold.
    NonRecoverable(NonRecoverable),
    /// `set_config('app.x', $1, …)`: a custom setting whose value only
    /// the server knows.
    SetUnknown(Bytes),
    /// `DROP …`, which may drop the last temporary object.
    Drop,
    /// `pg_advisory_unlock_all()`.
    AdvisoryUnlockAll,
    /// Changes no session state but carries a credential: never journaled.
    Credential,
    /// A statement of Reprise's own (`SET reprise.…`, `RESET reprise.…`,
    /// `SHOW reprise.…`), answered by Reprise.
    Reprise(RepriseCommand),
    /// Several effects in order (`SELECT set_config(…), set_config(…)`).
    Several(Vec<Effect>),
    /// Could not be understood: anything may have changed.
    Unknown,
}

/// Characteristics given by BEGIN or SET TRANSACTION; `None` leaves one
/// as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransactionModes {
    pub isolation: Option<IsolationLevel>,
    pub read_only: Option<bool>,
    pub deferrable: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discard {
    All,
    Plans,
    Sequences,
    Temp,
}

/// A statement about Reprise itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepriseCommand {
    /// `SET reprise.template = 'name'`.
    SetTemplate(Bytes),
    /// `RESET reprise.template` or `SET reprise.template TO DEFAULT`.
    ResetTemplate,
    /// `SHOW reprise.name`; the name is folded.
    Show(Bytes),
    /// Any other `SET` or `RESET` of a `reprise.` name.
    Unsupported(Bytes),
}

/// The effect of one statement that [`classify`] put in `class`.
pub fn effect_of(statement: &[u8], class: Class, options: &LexOptions) -> Effect {
    let kind = match class {
        Class::Ordinary => return Effect::None,
        Class::Unknown => return Effect::Unknown,
        Class::Candidate(kind) => kind,
    };
    let tokens = Tokens::new(statement, options);
    let parsed = match kind {
        Kind::Set { local } => tokens.set(local),
        Kind::Reset => tokens.reset(),
        Kind::SetRole { local } => tokens.set_role(local),
        Kind::ResetRole => Some(Effect::Role {
            role: None,
            local: false,
        }),
        Kind::SetSessionAuthorization { local } => tokens.set_session_authorization(local),
        Kind::ResetSessionAuthorization => Some(Effect::SessionAuthorization {
            user: None,
            local: false,
        }),
        Kind::SetTransaction => tokens.set_transaction(),
        Kind::SetTransactionSnapshot => {
            Some(Effect::NonRecoverable(NonRecoverable::SnapshotImport))
        }
        Kind::SetSessionCharacteristics => tokens.session_characteristics(),
        Kind::SetConstraints
        | Kind::CommitPrepared
        | Kind::RollbackPrepared
        | Kind::FetchOrMove
        | Kind::Copy => Some(Effect::None),
        Kind::Drop => Some(Effect::Drop),
        Kind::SetConfigCall | Kind::AdvisoryLock => function_calls(statement, options),
        Kind::Prepare => tokens.prepare(options),
        Kind::Deallocate => tokens.deallocate(),
        Kind::Execute => tokens.execute(),
        Kind::Listen => tokens
            .after(1)
            .and_then(|t| t.only_name())
            .map(Effect::Listen),
        Kind::Unlisten => tokens.unlisten(),
        Kind::Discard => tokens.discard(),
        Kind::Begin => tokens.begin(),
        Kind::Commit { chain } => Some(Effect::Commit { chain }),
        Kind::Rollback { chain } => Some(Effect::Rollback { chain }),
        Kind::Savepoint => tokens
            .after(1)
            .and_then(|t| t.only_name())
            .map(Effect::Savepoint),
        Kind::Release => tokens.release(),
        Kind::RollbackTo => tokens.rollback_to(),
        Kind::PrepareTransaction => Some(Effect::PrepareTransaction),
        Kind::CreateTemp => Some(Effect::NonRecoverable(NonRecoverable::TempObjects)),
        Kind::DeclareCursor { with_hold: false } => Some(Effect::None),
        Kind::DeclareCursor { with_hold: true } => tokens
            .after(1)
            .and_then(|t| t.first_name())
            .map(Effect::DeclareHold),
        Kind::CloseCursor => tokens.close(),
        Kind::Load => Some(Effect::NonRecoverable(NonRecoverable::Load)),
        Kind::Credential => Some(Effect::Credential),
        Kind::ShowReprise => tokens.show_reprise(),
        Kind::Do | Kind::Call | Kind::Multiple => None,
    };
    parsed.unwrap_or(Effect::Unknown)
}

/// GUCs whose list elements PostgreSQL quotes as identifiers when it
/// flattens `SET` arguments (`GUC_LIST_QUOTE`).
const LIST_QUOTE: &[&[u8]] = &[
    b"search_path",
    b"temp_tablespaces",
    b"session_preload_libraries",
    b"local_preload_libraries",
    b"shared_preload_libraries",
    b"unix_socket_directories",
];

/// The tokens of one statement, collected: candidates are rare, so an
/// allocation here costs nothing that matters.
struct Tokens<'a> {
    sql: &'a [u8],
    items: Vec<Lexeme<'a>>,
    standard_conforming_strings: bool,
}

impl<'a> Tokens<'a> {
    fn new(sql: &'a [u8], options: &LexOptions) -> Self {
        let items = Lexer::new(sql, options)
            .take_while(|t| t.kind != TokenKind::Semicolon)
            .map(|t| t.lexeme(sql))
            .collect();
        Tokens {
            sql,
            items,
            standard_conforming_strings: options.standard_conforming_strings,
        }
    }

    /// The tokens after the first `skip`, as a view.
    fn after(&self, skip: usize) -> Option<View<'_, 'a>> {
        (self.items.len() >= skip).then(|| View {
            items: &self.items[skip..],
            scs: self.standard_conforming_strings,
        })
    }

    fn view(&self) -> View<'_, 'a> {
        View {
            items: &self.items,
            scs: self.standard_conforming_strings,
        }
    }

    /// `SET [SESSION | LOCAL] …` for one GUC.
    fn set(&self, local: bool) -> Option<Effect> {
        let mut v = self.after(1)?;
        if v.keyword(b"session") || v.keyword(b"local") {
            v = v.skip(1);
        }
        if v.keyword(b"time") && v.skip(1).keyword(b"zone") {
            return v.skip(2).zone_value(local);
        }
        if v.keyword(b"names") {
            let rest = v.skip(1);
            return match rest.items {
                [] => Some(Effect::Reset {
                    name: Bytes::from_static(b"client_encoding"),
                    local,
                }),
                _ if rest.keyword(b"default") && rest.items.len() == 1 => Some(Effect::Reset {
                    name: Bytes::from_static(b"client_encoding"),
                    local,
                }),
                [value] => Some(Effect::Set {
                    name: Bytes::from_static(b"client_encoding"),
                    value: Bytes::from(string_value(value, self.standard_conforming_strings)?),
                    local,
                }),
                _ => None,
            };
        }
        if v.keyword(b"schema") {
            let [value] = v.skip(1).items else {
                return None;
            };
            let schema = string_value(value, self.standard_conforming_strings)?;
            return Some(Effect::Set {
                name: Bytes::from_static(b"search_path"),
                value: Bytes::from(quote_list_element(&schema)?),
                local,
            });
        }
        if v.keyword(b"xml") && v.skip(1).keyword(b"option") {
            let rest = v.skip(2);
            let value: &[u8] = match rest.items {
                [t] if t.is_keyword(b"document") => b"document",
                [t] if t.is_keyword(b"content") => b"content",
                _ => return None,
            };
            return Some(Effect::Set {
                name: Bytes::from_static(b"xmloption"),
                value: Bytes::from_static(value),
                local,
            });
        }
        let (name, rest) = v.guc_name()?;
        if name.starts_with(b"reprise.") {
            return Some(reprise_set(name, rest, self.standard_conforming_strings));
        }
        let rest = if rest.keyword(b"to") || rest.punct(b'=') {
            rest.skip(1)
        } else {
            return None;
        };
        if rest.keyword(b"default") && rest.items.len() == 1 {
            return Some(
                transaction_guc(&name, None, local).unwrap_or(Effect::Reset { name, local }),
            );
        }
        if rest.keyword(b"from") {
            // SET … FROM CURRENT: the value is whatever it is now.
            return None;
        }
        let value = flatten(
            rest,
            LIST_QUOTE.contains(&&name[..]),
            self.standard_conforming_strings,
        )?;
        if let Some(effect) = transaction_guc(&name, Some(&value), local) {
            return Some(effect);
        }
        Some(Effect::Set {
            name,
            value: Bytes::from(value),
            local,
        })
    }

    /// `RESET name | ALL | TIME ZONE | TRANSACTION ISOLATION LEVEL`.
    fn reset(&self) -> Option<Effect> {
        let v = self.after(1)?;
        if v.keyword(b"all") && v.items.len() == 1 {
            return Some(Effect::ResetAll);
        }
        if v.keyword(b"time") && v.skip(1).keyword(b"zone") && v.items.len() == 2 {
            return Some(Effect::Reset {
                name: Bytes::from_static(b"timezone"),
                local: false,
            });
        }
        if v.keyword(b"transaction") {
            // Only valid before the transaction's first query; it leaves the
            // isolation level at the session default.
            return Some(Effect::TransactionModes(TransactionModes::default()));
        }
        let (name, rest) = v.guc_name()?;
        if !rest.items.is_empty() {
            return None;
        }
        if name.starts_with(b"reprise.") {
            return Some(Effect::Reprise(if &name[..] == b"reprise.template" {
                RepriseCommand::ResetTemplate
            } else {
                RepriseCommand::Unsupported(name)
            }));
        }
        if transaction_guc(&name, None, false).is_some() {
            return Some(Effect::None);
        }
        Some(Effect::Reset { name, local: false })
    }

    /// `SET [SESSION | LOCAL] ROLE {name | NONE}` or `SET role {TO | =} …`.
    fn set_role(&self, local: bool) -> Option<Effect> {
        let mut v = self.after(1)?;
        if v.keyword(b"session") || v.keyword(b"local") {
            v = v.skip(1);
        }
        v = v.skip(1);
        let assigned = v.keyword(b"to") || v.punct(b'=');
        if assigned {
            v = v.skip(1);
        }
        let [value] = v.items else {
            return None;
        };
        let role = if value.is_keyword(b"none") || (assigned && value.is_keyword(b"default")) {
            None
        } else {
            Some(Bytes::from(role_name(
                value,
                self.standard_conforming_strings,
            )?))
        };
        Some(Effect::Role { role, local })
    }

    /// `SET [SESSION | LOCAL] SESSION AUTHORIZATION {user | DEFAULT}` or
    /// `SET session_authorization {TO | =} …`.
    fn set_session_authorization(&self, local: bool) -> Option<Effect> {
        let mut v = self.after(1)?;
        if v.keyword(b"local") || (v.keyword(b"session") && v.skip(1).keyword(b"session")) {
            v = v.skip(1);
        }
        v = if v.keyword(b"session") {
            v.skip(2)
        } else {
            let rest = v.skip(1);
            if !(rest.keyword(b"to") || rest.punct(b'=')) {
                return None;
            }
            rest.skip(1)
        };
        let [value] = v.items else {
            return None;
        };
        let user = if value.is_keyword(b"default") {
            None
        } else {
            Some(Bytes::from(role_name(
                value,
                self.standard_conforming_strings,
            )?))
        };
        Some(Effect::SessionAuthorization { user, local })
    }

    fn set_transaction(&self) -> Option<Effect> {
        let mut v = self.after(1)?;
        if v.keyword(b"session") || v.keyword(b"local") {
            v = v.skip(1);
        }
        transaction_modes(v.skip(1)).map(Effect::TransactionModes)
    }

    /// `SET SESSION CHARACTERISTICS AS TRANSACTION modes`: the
    /// `default_transaction_*` GUCs.
    fn session_characteristics(&self) -> Option<Effect> {
        let v = self.after(1)?;
        if !(v.keyword(b"session")
            && v.skip(1).keyword(b"characteristics")
            && v.skip(2).keyword(b"as")
            && v.skip(3).keyword(b"transaction"))
        {
            return None;
        }
        let modes = transaction_modes(v.skip(4))?;
        let mut effects = Vec::new();
        let mut set = |name: &'static [u8], value: &'static [u8]| {
            effects.push(Effect::Set {
                name: Bytes::from_static(name),
                value: Bytes::from_static(value),
                local: false,
            })
        };
        if let Some(level) = modes.isolation {
            set(b"default_transaction_isolation", isolation_name(level));
        }
        if let Some(read_only) = modes.read_only {
            set(b"default_transaction_read_only", on_off(read_only));
        }
        if let Some(deferrable) = modes.deferrable {
            set(b"default_transaction_deferrable", on_off(deferrable));
        }
        Some(Effect::Several(effects))
    }

    /// `PREPARE name [(type, …)] AS statement`.
    fn prepare(&self, options: &LexOptions) -> Option<Effect> {
        let v = self.after(1)?;
        let name = v.items.first().and_then(|t| identifier(t))?;
        let mut rest = v.skip(1);
        if rest.punct(b'(') {
            let close = rest.items.iter().position(|t| t.is_punct(b')'))?;
            rest = rest.skip(close + 1);
        }
        if !rest.keyword(b"as") {
            return None;
        }
        let first = rest.items.get(1)?;
        let start = first.text.as_ptr() as usize - self.sql.as_ptr() as usize;
        let body = &self.sql[start..];
        let body_effect = effect_of(body, classify(body, options), options);
        // From the first token to the last: the same text whether the
        // statement came alone, after a comment or inside a longer string.
        let begin = self.items.first()?.text.as_ptr() as usize - self.sql.as_ptr() as usize;
        let last = self.items.last()?;
        let end = last.text.as_ptr() as usize + last.text.len() - self.sql.as_ptr() as usize;
        Some(Effect::Prepare {
            name: Bytes::from(name),
            statement: Bytes::copy_from_slice(&self.sql[begin..end]),
            body: Box::new(body_effect),
        })
    }

    /// `DEALLOCATE [PREPARE] {name | ALL}`.
    fn deallocate(&self) -> Option<Effect> {
        let mut v = self.after(1)?;
        if v.keyword(b"prepare") && v.items.len() == 2 {
            v = v.skip(1);
        }
        v.name_or_all(|v| v.keyword(b"all")).map(Effect::Deallocate)
    }

    /// `EXECUTE name [(args)]` or `CREATE TABLE … AS EXECUTE name`.
    fn execute(&self) -> Option<Effect> {
        let view = self.view();
        let at = view.items.iter().rposition(|t| t.is_keyword(b"execute"))?;
        let name = view.items.get(at + 1).and_then(|t| identifier(t))?;
        if at != 0 {
            // CREATE TABLE … AS EXECUTE: a plain table, unless TEMP (which
            // the first stage reports as CreateTemp).
            return Some(Effect::None);
        }
        Some(Effect::Execute(Bytes::from(name)))
    }

    fn unlisten(&self) -> Option<Effect> {
        self.after(1)?
            .name_or_all(|v| v.punct(b'*'))
            .map(Effect::Unlisten)
    }

    fn discard(&self) -> Option<Effect> {
        let v = self.after(1)?;
        let [what] = v.items else {
            return None;
        };
        let discard = match () {
            _ if what.is_keyword(b"all") => Discard::All,
            _ if what.is_keyword(b"plans") => Discard::Plans,
            _ if what.is_keyword(b"sequences") => Discard::Sequences,
            _ if what.is_keyword(b"temp") || what.is_keyword(b"temporary") => Discard::Temp,
            _ => return None,
        };
        Some(Effect::Discard(discard))
    }

    /// `BEGIN [WORK | TRANSACTION] [modes]` or `START TRANSACTION [modes]`.
    fn begin(&self) -> Option<Effect> {
        let view = self.view();
        let mut v = view.skip(1);
        if view.keyword(b"start") || v.keyword(b"work") || v.keyword(b"transaction") {
            v = v.skip(1);
        }
        transaction_modes(v).map(Effect::Begin)
    }

    /// `RELEASE [SAVEPOINT] name`.
    fn release(&self) -> Option<Effect> {
        let mut v = self.after(1)?;
        if v.keyword(b"savepoint") && v.items.len() == 2 {
            v = v.skip(1);
        }
        v.only_name().map(Effect::Release)
    }

    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`.
    fn rollback_to(&self) -> Option<Effect> {
        let view = self.view();
        let at = view.items.iter().position(|t| t.is_keyword(b"to"))?;
        let mut v = view.skip(at + 1);
        if v.keyword(b"savepoint") && v.items.len() == 2 {
            v = v.skip(1);
        }
        v.only_name().map(Effect::RollbackTo)
    }

    /// `CLOSE {name | ALL}`.
    fn close(&self) -> Option<Effect> {
        self.after(1)?
            .name_or_all(|v| v.keyword(b"all"))
            .map(Effect::Close)
    }

    /// `SHOW reprise.name`.
    fn show_reprise(&self) -> Option<Effect> {
        let (name, rest) = self.after(1)?.guc_name()?;
        if !rest.items.is_empty() || !name.starts_with(b"reprise.") {
            return None;
        }
        Some(Effect::Reprise(RepriseCommand::Show(name)))
    }
}

/// `SET reprise.name …`.
fn reprise_set(name: Bytes, rest: View, scs: bool) -> Effect {
    if &name[..] != b"reprise.template" {
        return Effect::Reprise(RepriseCommand::Unsupported(name));
    }
    if !(rest.keyword(b"to") || rest.punct(b'=')) {
        return Effect::Reprise(RepriseCommand::Unsupported(name));
    }
    let value = rest.skip(1);
    match value.items {
        [t] if t.is_keyword(b"default") => Effect::Reprise(RepriseCommand::ResetTemplate),
        [t] => match string_value(t, scs) {
            Some(template) => Effect::Reprise(RepriseCommand::SetTemplate(Bytes::from(template))),
            None => Effect::Reprise(RepriseCommand::Unsupported(name)),
        },
        _ => Effect::Reprise(RepriseCommand::Unsupported(name)),
    }
}

/// `SET transaction_isolation = …` and friends act on the current
/// transaction, like SET TRANSACTION.
fn transaction_guc(name: &[u8], value: Option<&[u8]>, _local: bool) -> Option<Effect> {
    let mut modes = TransactionModes::default();
    match name {
        b"transaction_isolation" => {
            modes.isolation = match value {
                None => None,
                Some(value) => Some(parse_isolation(value)?),
            }
        }
        b"transaction_read_only" => modes.read_only = value.map(parse_bool).unwrap_or(None),
        b"transaction_deferrable" => modes.deferrable = value.map(parse_bool).unwrap_or(None),
        _ => return None,
    }
    Some(Effect::TransactionModes(modes))
}

fn parse_isolation(value: &[u8]) -> Option<IsolationLevel> {
    Some(match value.to_ascii_lowercase().as_slice() {
        b"serializable" => IsolationLevel::Serializable,
        b"repeatable read" => IsolationLevel::RepeatableRead,
        b"read committed" => IsolationLevel::ReadCommitted,
        b"read uncommitted" => IsolationLevel::ReadUncommitted,
        _ => return None,
    })
}

/// PostgreSQL's boolean spellings (`parse_bool`), unambiguous prefixes
/// included.
fn parse_bool(value: &[u8]) -> Option<bool> {
    let value = value.to_ascii_lowercase();
    let prefix_of = |word: &[u8]| !value.is_empty() && word.starts_with(&value);
    match value.as_slice() {
        b"1" | b"on" => Some(true),
        b"0" | b"of" | b"off" => Some(false),
        _ if prefix_of(b"true") || prefix_of(b"yes") => Some(true),
        _ if prefix_of(b"false") || prefix_of(b"no") => Some(false),
        _ => None,
    }
}

pub fn isolation_name(level: IsolationLevel) -> &'static [u8] {
    match level {
        IsolationLevel::Serializable => b"serializable",
        IsolationLevel::RepeatableRead => b"repeatable read",
        IsolationLevel::ReadCommitted => b"read committed",
        IsolationLevel::ReadUncommitted => b"read uncommitted",
    }
}

fn on_off(value: bool) -> &'static [u8] {
    if value {
        b"on"
    } else {
        b"off"
    }
}

/// Transaction modes, separated by commas or spaces.
fn transaction_modes(mut v: View) -> Option<TransactionModes> {
    let mut modes = TransactionModes::default();
    while !v.items.is_empty() {
        if v.punct(b',') {
            v = v.skip(1);
            continue;
        }
        if v.keyword(b"isolation") && v.skip(1).keyword(b"level") {
            let level = v.skip(2);
            let (isolation, used) = if level.keyword(b"serializable") {
                (IsolationLevel::Serializable, 1)
            } else if level.keyword(b"repeatable") && level.skip(1).keyword(b"read") {
                (IsolationLevel::RepeatableRead, 2)
            } else if level.keyword(b"read") && level.skip(1).keyword(b"committed") {
                (IsolationLevel::ReadCommitted, 2)
            } else if level.keyword(b"read") && level.skip(1).keyword(b"uncommitted") {
                (IsolationLevel::ReadUncommitted, 2)
            } else {
                return None;
            };
            modes.isolation = Some(isolation);
            v = level.skip(used);
        } else if v.keyword(b"read") && v.skip(1).keyword(b"only") {
            modes.read_only = Some(true);
            v = v.skip(2);
        } else if v.keyword(b"read") && v.skip(1).keyword(b"write") {
            modes.read_only = Some(false);
            v = v.skip(2);
        } else if v.keyword(b"deferrable") {
            modes.deferrable = Some(true);
            v = v.skip(1);
        } else if v.keyword(b"not") && v.skip(1).keyword(b"deferrable") {
            modes.deferrable = Some(false);
            v = v.skip(2);
        } else {
            return None;
        }
    }
    Some(modes)
}

/// A slice of a statement's tokens.
#[derive(Clone, Copy)]
struct View<'t, 'a> {
    items: &'t [Lexeme<'a>],
    scs: bool,
}

impl<'t, 'a> View<'t, 'a> {
    fn skip(self, n: usize) -> Self {
        View {
            items: self.items.get(n..).unwrap_or_default(),
            scs: self.scs,
        }
    }

    fn keyword(&self, lowercase: &[u8]) -> bool {
        self.items.first().is_some_and(|t| t.is_keyword(lowercase))
    }

    fn punct(&self, byte: u8) -> bool {
        self.items.first().is_some_and(|t| t.is_punct(byte))
    }

    /// The view holds exactly one name.
    fn only_name(self) -> Option<Bytes> {
        match self.items {
            [one] => identifier(one).map(Bytes::from),
            _ => None,
        }
    }

    /// One name (`Some`), or the one token that means "all" (`None`).
    fn name_or_all(self, is_all: impl Fn(&Self) -> bool) -> Option<Option<Bytes>> {
        if self.items.len() == 1 && is_all(&self) {
            return Some(None);
        }
        self.only_name().map(Some)
    }

    fn first_name(self) -> Option<Bytes> {
        self.items
            .first()
            .and_then(|t| identifier(t))
            .map(Bytes::from)
    }

    /// A GUC name, `part[.part…]`, folded, and the tokens after it.
    fn guc_name(self) -> Option<(Bytes, Self)> {
        let mut name = identifier(self.items.first()?)?;
        let mut rest = self.skip(1);
        while rest.punct(b'.') {
            name.push(b'.');
            name.extend(identifier(rest.items.get(1)?)?);
            rest = rest.skip(2);
        }
        name.make_ascii_lowercase();
        Some((Bytes::from(name), rest))
    }

    /// `SET TIME ZONE …`.
    fn zone_value(self, local: bool) -> Option<Effect> {
        let name = Bytes::from_static(b"timezone");
        if (self.keyword(b"local") || self.keyword(b"default")) && self.items.len() == 1 {
            return Some(Effect::Reset { name, local });
        }
        if self.keyword(b"interval") {
            return None;
        }
        let value = flatten(self, false, self.scs)?;
        Some(Effect::Set {
            name,
            value: Bytes::from(value),
            local,
        })
    }
}

/// The value PostgreSQL stores for `SET name TO args` (what
/// `flatten_set_variable_args` builds): constants as written, words folded,
/// list elements joined by `", "` and, for list-quoting GUCs, quoted as
/// identifiers where needed.
fn flatten(v: View, list_quote: bool, scs: bool) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut items = v.items;
    loop {
        let (element, rest) = match items {
            [sign, number, rest @ ..]
                if (sign.is_punct(b'-') || sign.is_punct(b'+'))
                    && number.kind == TokenKind::Number =>
            {
                (number_value(number.text, sign.is_punct(b'-'))?, rest)
            }
            [number, rest @ ..] if number.kind == TokenKind::Number => {
                (number_value(number.text, false)?, rest)
            }
            [token, rest @ ..] => {
                let text = match token.kind {
                    TokenKind::Word => token.text.to_ascii_lowercase(),
                    TokenKind::QuotedIdent => identifier(token)?,
                    TokenKind::String | TokenKind::DollarString => string_value(token, scs)?,
                    _ => return None,
                };
                let text = if list_quote {
                    quote_list_element(&text)?
                } else {
                    text
                };
                (text, rest)
            }
            [] => return None,
        };
        out.extend(element);
        match rest {
            [] => return Some(out),
            [comma, more @ ..] if comma.is_punct(b',') => {
                out.extend_from_slice(b", ");
                items = more;
            }
            _ => return None,
        }
    }
}

/// An integer as PostgreSQL prints it back (leading zeros dropped), a
/// float as written.
fn number_value(text: &[u8], negative: bool) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?;
    if text.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(value) = text.parse::<i32>() {
            let value = if negative {
                -i64::from(value)
            } else {
                i64::from(value)
            };
            return Some(value.to_string().into_bytes());
        }
    }
    if text.contains(['x', 'X', 'o', 'O', 'b', 'B', '_']) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() + 1);
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(text.as_bytes());
    Some(out)
}

/// PostgreSQL's `quote_identifier` for a list element: quoted unless it is
/// a plain lower-case identifier. (PostgreSQL also quotes reserved words;
/// the server reads both spellings as the same name.) `None` for a NUL.
fn quote_list_element(element: &[u8]) -> Option<Vec<u8>> {
    let plain = element
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || *b == b'_')
        && element
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if plain {
        return Some(element.to_vec());
    }
    quote_identifier(element).ok().map(|quoted| quoted.to_vec())
}

/// A role name: an identifier or a string constant.
fn role_name(token: &Lexeme, scs: bool) -> Option<Vec<u8>> {
    match token.kind {
        TokenKind::String | TokenKind::DollarString => string_value(token, scs),
        _ => identifier(token),
    }
}

/// The name an identifier token stands for: a word folded to lower case,
/// a quoted identifier with `""` undoubled, both truncated as PostgreSQL
/// truncates names.
pub fn identifier(token: &Lexeme) -> Option<Vec<u8>> {
    let (raw, quoted) = token.name()?;
    let mut name = if quoted {
        let mut out = Vec::with_capacity(raw.len());
        let mut bytes = raw.iter();
        while let Some(&b) = bytes.next() {
            out.push(b);
            if b == b'"' {
                bytes.next();
            }
        }
        out
    } else {
        raw.to_ascii_lowercase()
    };
    truncate_identifier(&mut name);
    Some(name)
}

fn truncate_identifier(name: &mut Vec<u8>) {
    if name.len() <= MAX_IDENTIFIER {
        return;
    }
    let mut cut = MAX_IDENTIFIER;
    if std::str::from_utf8(name).is_ok() {
        while cut > 0 && (name[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
    }
    name.truncate(cut);
}

/// The value of a string constant: `'…'`, `E'…'`, `N'…'` (continuation
/// lines joined) or `$tag$…$tag$`. `None` for bit strings, `U&'…'` and
/// escapes that need the server encoding.
pub fn string_value(token: &Lexeme, scs: bool) -> Option<Vec<u8>> {
    let text = token.text;
    if token.kind == TokenKind::DollarString {
        let tag_end = text[1..].iter().position(|&b| b == b'$')? + 2;
        return text.get(tag_end..text.len() - tag_end).map(<[u8]>::to_vec);
    }
    if token.kind != TokenKind::String {
        return None;
    }
    let (escapes, body) = match text.first()? {
        b'\'' => (!scs, text),
        b'e' | b'E' => (true, &text[1..]),
        b'n' | b'N' => (!scs, &text[1..]),
        _ => return None,
    };
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    // Segments: '…' separated by whitespace with a newline.
    while i < body.len() {
        if body[i] != b'\'' {
            i += 1;
            continue;
        }
        i += 1;
        loop {
            let b = *body.get(i)?;
            match b {
                b'\'' if body.get(i + 1) == Some(&b'\'') => {
                    out.push(b'\'');
                    i += 2;
                }
                b'\'' => {
                    i += 1;
                    break;
                }
                b'\\' if escapes => {
                    let (decoded, used) = unescape(&body[i + 1..])?;
                    out.push(decoded);
                    i += 1 + used;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
    }
    Some(out)
}

/// One backslash escape (the text after the backslash): the byte and how
/// many bytes it used. Unicode escapes need the server encoding: `None`.
fn unescape(rest: &[u8]) -> Option<(u8, usize)> {
    let first = *rest.first()?;
    Some(match first {
        b'b' => (8, 1),
        b'f' => (12, 1),
        b'n' => (b'\n', 1),
        b'r' => (b'\r', 1),
        b't' => (b'\t', 1),
        b'u' | b'U' => return None,
        b'0'..=b'7' => {
            let digits = rest
                .iter()
                .take(3)
                .take_while(|b| (b'0'..=b'7').contains(*b))
                .count();
            let value = rest[..digits]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            ((value & 0xff) as u8, digits)
        }
        b'x' if rest.get(1).is_some_and(u8::is_ascii_hexdigit) => {
            let digits = rest[1..]
                .iter()
                .take(2)
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            let text = std::str::from_utf8(&rest[1..1 + digits]).ok()?;
            (u8::from_str_radix(text, 16).ok()?, 1 + digits)
        }
        other => (other, 1),
    })
}

/// A query that calls state functions: exact only for `SELECT f(…), …`
/// with constant arguments and nothing else (no FROM, WHERE, GROUP BY …),
/// where every call runs exactly once.
fn function_calls(statement: &[u8], options: &LexOptions) -> Option<Effect> {
    let text = std::str::from_utf8(statement).ok()?;
    if !options.standard_conforming_strings && text.contains('\\') {
        return None;
    }
    let mut parser = Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(PARSE_DEPTH)
        .try_with_sql(text)
        .ok()?;
    let statements = parser.parse_statements().ok()?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return None;
    };
    if query.with.is_some()
        || query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
        || !query.locks.is_empty()
    {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let plain = select.distinct.is_none()
        && select.into.is_none()
        && select.from.is_empty()
        && select.selection.is_none()
        && matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
        && select.having.is_none()
        && select.qualify.is_none();
    if !plain {
        return None;
    }
    let mut effects = Vec::new();
    for item in &select.projection {
        let expr = match item {
            SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => expr,
            _ => return None,
        };
        effects.push(call_effect(expr)?);
    }
    Some(match effects.len() {
        1 => effects.pop()?,
        _ => Effect::Several(effects),
    })
}

/// The effect of one projected expression: a state function call with
/// constant arguments, or an expression that calls none.
fn call_effect(expr: &Expr) -> Option<Effect> {
    let Expr::Function(function) = expr else {
        return None;
    };
    let parts: Vec<String> = function
        .name
        .0
        .iter()
        .map(|part| {
            part.as_ident()
                .map(|ident| ident.value.to_ascii_lowercase())
        })
        .collect::<Option<_>>()?;
    let name = match parts.as_slice() {
        [name] => name.as_str(),
        [schema, name] if schema == "pg_catalog" => name.as_str(),
        _ => return None,
    };
    if function.filter.is_some() || function.over.is_some() || !function.within_group.is_empty() {
        return None;
    }
    let FunctionArguments::List(list) = &function.args else {
        return None;
    };
    if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
        return None;
    }
    // Constant arguments; `None` for any other expression.
    let constants: Vec<Option<&Value>> = list
        .args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(value))) => Some(&value.value),
            _ => None,
        })
        .collect();
    if name == "set_config" {
        let [Some(name), value, local] = constants.as_slice() else {
            return None;
        };
        let name = literal_string(name)?.to_ascii_lowercase();
        return match (value.and_then(literal_string), local) {
            (Some(value), Some(Value::Boolean(local))) => {
                set_config_effect(name.into_bytes(), value.as_bytes(), *local)
            }
            // A value bound at run time (`$1`): only the server knows it,
            // and only a custom setting must be asked for by name.
            _ if name.contains('.') && !name.starts_with("reprise.") => {
                Some(Effect::SetUnknown(Bytes::from(name)))
            }
            _ => None,
        };
    }
    let args: Vec<&Value> = constants.into_iter().collect::<Option<_>>()?;
    match name {
        "pg_advisory_unlock_all" if args.is_empty() => Some(Effect::AdvisoryUnlockAll),
        "pg_advisory_lock"
        | "pg_advisory_lock_shared"
        | "pg_try_advisory_lock"
        | "pg_try_advisory_lock_shared" => {
            Some(Effect::NonRecoverable(NonRecoverable::AdvisoryLocks))
        }
        // Releasing one lock may or may not release the last one.
        _ => None,
    }
}

fn literal_string(value: &Value) -> Option<&str> {
    match value {
        Value::SingleQuotedString(text) | Value::EscapedStringLiteral(text) => Some(text),
        Value::DollarQuotedString(dollar) => Some(&dollar.value),
        _ => None,
    }
}

/// `set_config(name, value, is_local)`, which may also name `role` or
/// `session_authorization`.
fn set_config_effect(name: Vec<u8>, value: &[u8], local: bool) -> Option<Effect> {
    if name.starts_with(b"reprise.") {
        return None;
    }
    let value = Bytes::copy_from_slice(value);
    Some(match name.as_slice() {
        b"role" => Effect::Role {
            role: (!value.eq_ignore_ascii_case(b"none")).then_some(value),
            local,
        },
        b"session_authorization" => Effect::SessionAuthorization {
            user: Some(value),
            local,
        },
        _ => transaction_guc(&name, Some(&value), local).unwrap_or(Effect::Set {
            name: Bytes::from(name),
            value,
            local,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effect(sql: &str) -> Effect {
        let options = LexOptions::default();
        effect_of(sql.as_bytes(), classify(sql.as_bytes(), &options), &options)
    }

    fn set(name: &str, value: &str, local: bool) -> Effect {
        Effect::Set {
            name: Bytes::copy_from_slice(name.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            local,
        }
    }

    fn bytes(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn set_values_are_flattened_like_the_server() {
        assert_eq!(
            effect("SET work_mem = '64MB'"),
            set("work_mem", "64MB", false)
        );
        assert_eq!(
            effect("SET LOCAL Work_Mem TO 4096"),
            set("work_mem", "4096", true)
        );
        assert_eq!(effect("set session x.y = 007"), set("x.y", "7", false));
        assert_eq!(
            effect("SET extra_float_digits = -3"),
            set("extra_float_digits", "-3", false)
        );
        assert_eq!(
            effect("SET seq_page_cost = 1.50"),
            set("seq_page_cost", "1.50", false)
        );
        assert_eq!(
            effect("SET enable_seqscan = OFF"),
            set("enable_seqscan", "off", false)
        );
        assert_eq!(
            effect("SET search_path TO \"My Schema\", public, '$user'"),
            set("search_path", "\"My Schema\", public, \"$user\"", false)
        );
        assert_eq!(
            effect("SET DateStyle = ISO, DMY"),
            set("datestyle", "iso, dmy", false)
        );
        assert_eq!(
            effect("SET TIME ZONE 'Europe/Paris'"),
            set("timezone", "Europe/Paris", false)
        );
        assert_eq!(
            effect("SET NAMES 'LATIN1'"),
            set("client_encoding", "LATIN1", false)
        );
        assert_eq!(
            effect("SET SCHEMA 'Sales'"),
            set("search_path", "\"Sales\"", false)
        );
        assert_eq!(
            effect("SET XML OPTION document"),
            set("xmloption", "document", false)
        );
        assert_eq!(
            effect("SET application_name = E'a\\'b'"),
            set("application_name", "a'b", false)
        );
        assert_eq!(
            effect("SET application_name = $$x$$"),
            set("application_name", "x", false)
        );
        assert_eq!(
            effect("SET statement_timeout TO DEFAULT"),
            Effect::Reset {
                name: bytes("statement_timeout"),
                local: false
            }
        );
        assert_eq!(
            effect("SET TIME ZONE LOCAL"),
            Effect::Reset {
                name: bytes("timezone"),
                local: false
            }
        );
        assert_eq!(
            effect("SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE"),
            Effect::Unknown
        );
    }

    #[test]
    fn backslashes_follow_standard_conforming_strings() {
        let off = LexOptions {
            standard_conforming_strings: false,
            ascii_safe: true,
        };
        let sql = b"SET application_name = 'a\\'b'";
        assert_eq!(
            effect_of(sql, classify(sql, &off), &off),
            set("application_name", "a'b", false)
        );
        assert_eq!(
            effect("SET application_name = 'a\\b'"),
            set("application_name", "a\\b", false)
        );
    }

    #[test]
    fn roles_and_authorization() {
        assert_eq!(
            effect("SET ROLE Admin"),
            Effect::Role {
                role: Some(bytes("admin")),
                local: false
            }
        );
        assert_eq!(
            effect("SET LOCAL ROLE 'Mixed'"),
            Effect::Role {
                role: Some(bytes("Mixed")),
                local: true
            }
        );
        assert_eq!(
            effect("SET ROLE NONE"),
            Effect::Role {
                role: None,
                local: false
            }
        );
        assert_eq!(
            effect("RESET ROLE"),
            Effect::Role {
                role: None,
                local: false
            }
        );
        assert_eq!(
            effect("SET SESSION AUTHORIZATION bob"),
            Effect::SessionAuthorization {
                user: Some(bytes("bob")),
                local: false
            }
        );
        assert_eq!(
            effect("SET SESSION AUTHORIZATION DEFAULT"),
            Effect::SessionAuthorization {
                user: None,
                local: false
            }
        );
        assert_eq!(
            effect("SELECT set_config('role', 'x', false)"),
            Effect::Role {
                role: Some(bytes("x")),
                local: false
            }
        );
    }

    #[test]
    fn set_config_needs_constant_arguments_and_no_filters() {
        assert_eq!(
            effect("SELECT set_config('Search_Path', 'a, b', false)"),
            set("search_path", "a, b", false)
        );
        assert_eq!(
            effect("select pg_catalog.set_config('x.a', '1', true), set_config('x.b', '2', false)"),
            Effect::Several(vec![set("x.a", "1", true), set("x.b", "2", false)])
        );
        assert_eq!(
            effect("SELECT set_config('x.a', $1, false)"),
            Effect::SetUnknown(bytes("x.a"))
        );
        assert_eq!(
            effect("SELECT set_config('work_mem', $1, false)"),
            Effect::Unknown
        );
        assert_eq!(
            effect("SELECT set_config('x.a', 'b', false) FROM t"),
            Effect::Unknown
        );
        assert_eq!(
            effect("SELECT set_config('x.a', 'b', false) WHERE false"),
            Effect::Unknown
        );
        assert_eq!(
            effect("SELECT pg_advisory_lock(1)"),
            Effect::NonRecoverable(NonRecoverable::AdvisoryLocks)
        );
        assert_eq!(
            effect("SELECT pg_advisory_unlock_all()"),
            Effect::AdvisoryUnlockAll
        );
        assert_eq!(effect("SELECT pg_advisory_unlock(1)"), Effect::Unknown);
        assert_eq!(
            effect("SELECT set_config('App.Tenant', $1, false)"),
            Effect::SetUnknown(bytes("app.tenant"))
        );
        assert_eq!(
            effect("SELECT pg_catalog.set_config('app.tenant', $1::text, $2)"),
            Effect::SetUnknown(bytes("app.tenant"))
        );
        assert_eq!(effect("SELECT set_config($1, 'x', false)"), Effect::Unknown);
        assert_eq!(effect("DROP TABLE pg_temp.t"), Effect::Drop);
    }

    #[test]
    fn transactions() {
        assert_eq!(effect("BEGIN"), Effect::Begin(TransactionModes::default()));
        assert_eq!(
            effect("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY DEFERRABLE"),
            Effect::Begin(TransactionModes {
                isolation: Some(IsolationLevel::RepeatableRead),
                read_only: Some(true),
                deferrable: Some(true),
            })
        );
        assert_eq!(
            effect("SET TRANSACTION READ WRITE NOT DEFERRABLE"),
            Effect::TransactionModes(TransactionModes {
                isolation: None,
                read_only: Some(false),
                deferrable: Some(false),
            })
        );
        assert_eq!(
            effect("SET transaction_isolation = 'serializable'"),
            Effect::TransactionModes(TransactionModes {
                isolation: Some(IsolationLevel::Serializable),
                ..TransactionModes::default()
            })
        );
        assert_eq!(effect("SAVEPOINT \"A b\""), Effect::Savepoint(bytes("A b")));
        assert_eq!(effect("RELEASE SAVEPOINT a"), Effect::Release(bytes("a")));
        assert_eq!(
            effect("ROLLBACK TO SAVEPOINT A"),
            Effect::RollbackTo(bytes("a"))
        );
        assert_eq!(effect("ROLLBACK WORK TO b"), Effect::RollbackTo(bytes("b")));
        assert_eq!(effect("COMMIT AND CHAIN"), Effect::Commit { chain: true });
        assert_eq!(
            effect("PREPARE TRANSACTION 'g'"),
            Effect::PrepareTransaction
        );
        assert_eq!(
            effect("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Effect::Several(vec![set("default_transaction_read_only", "on", false)])
        );
    }

    #[test]
    fn prepared_statements_channels_and_cursors() {
        assert_eq!(
            effect("PREPARE q(int) AS SELECT $1"),
            Effect::Prepare {
                name: bytes("q"),
                statement: bytes("PREPARE q(int) AS SELECT $1"),
                body: Box::new(Effect::None)
            }
        );
        assert_eq!(
            effect("PREPARE s AS SELECT set_config('a.b', 'c', false);"),
            Effect::Prepare {
                name: bytes("s"),
                statement: bytes("PREPARE s AS SELECT set_config('a.b', 'c', false)"),
                body: Box::new(set("a.b", "c", false))
            }
        );
        assert_eq!(
            effect("-- why\n /* how */ PREPARE q AS SELECT 1; -- done"),
            Effect::Prepare {
                name: bytes("q"),
                statement: bytes("PREPARE q AS SELECT 1"),
                body: Box::new(Effect::None)
            }
        );
        assert_eq!(
            effect("DEALLOCATE PREPARE q"),
            Effect::Deallocate(Some(bytes("q")))
        );
        assert_eq!(effect("DEALLOCATE ALL"), Effect::Deallocate(None));
        assert_eq!(effect("EXECUTE Q(1)"), Effect::Execute(bytes("q")));
        assert_eq!(effect("LISTEN \"Jobs\""), Effect::Listen(bytes("Jobs")));
        assert_eq!(effect("UNLISTEN *"), Effect::Unlisten(None));
        assert_eq!(effect("DISCARD TEMPORARY"), Effect::Discard(Discard::Temp));
        assert_eq!(
            effect("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            Effect::DeclareHold(bytes("c"))
        );
        assert_eq!(effect("DECLARE c CURSOR FOR SELECT 1"), Effect::None);
        assert_eq!(effect("CLOSE ALL"), Effect::Close(None));
        assert_eq!(
            effect("CREATE TEMP TABLE t (a int)"),
            Effect::NonRecoverable(NonRecoverable::TempObjects)
        );
        assert_eq!(effect("ALTER ROLE a PASSWORD 'x'"), Effect::Credential);
        let long = "a".repeat(70);
        assert_eq!(
            effect(&format!("LISTEN {long}")),
            Effect::Listen(bytes(&long[..63]))
        );
    }

    #[test]
    fn reprise_statements() {
        assert_eq!(
            effect("SET reprise.template = 'reporting'"),
            Effect::Reprise(RepriseCommand::SetTemplate(bytes("reporting")))
        );
        assert_eq!(
            effect("RESET Reprise.Template"),
            Effect::Reprise(RepriseCommand::ResetTemplate)
        );
        assert_eq!(
            effect("SHOW reprise.STATS"),
            Effect::Reprise(RepriseCommand::Show(bytes("reprise.stats")))
        );
        assert_eq!(
            effect("SET reprise.other = 1"),
            Effect::Reprise(RepriseCommand::Unsupported(bytes("reprise.other")))
        );
    }
}
