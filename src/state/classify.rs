//! First stage of statement classification: can this statement change the
//! session state Reprise tracks?
//!
//! [`classify`] reads the leading keywords, then scans the remaining tokens
//! for calls of the functions that change session state (`set_config`, the
//! session advisory lock functions) and for `INTO TEMP`. Words inside
//! strings, quoted identifiers and comments never count, because the
//! [lexer](super::lexer) tokenizes like the server does. It allocates
//! nothing, so ordinary statements cost a few hundred nanoseconds; only
//! candidates go on to a full parse.
//!
//! What the text alone cannot show, the tracker checks against the server:
//! a user-defined function may call `set_config` or take an advisory lock,
//! and `CREATE TABLE t` makes a temporary table when `search_path` starts
//! with `pg_temp`.

use super::lexer::{Boundary, LexOptions, Lexeme, Lexer, Token, TokenKind};

/// What a statement can do to tracked session state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Cannot change tracked session state: plain SELECT, INSERT, UPDATE,
    /// DELETE, MERGE, WITH, VALUES, TABLE; EXPLAIN without ANALYZE; SHOW;
    /// DDL that creates nothing temporary; maintenance commands
    /// (CHECKPOINT, VACUUM, ANALYZE…). An empty statement is ordinary too.
    Ordinary,
    /// May change tracked state: needs the second stage (a full parse) or
    /// the handler for its kind.
    Candidate(Kind),
    /// Could not be classified (the text does not tokenize, the leading
    /// keyword is unknown or malformed, more than one statement was given,
    /// a byte >= 0x80 in an encoding that is not ASCII-safe…): anything may
    /// have changed.
    Unknown,
}

impl Class {
    pub fn is_ordinary(&self) -> bool {
        *self == Class::Ordinary
    }
}

/// Which kind of candidate a statement is. Where a statement is both (its
/// leading keywords name one kind and its body calls a state-changing
/// function), the kind is [`Kind::Multiple`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `SET [SESSION | LOCAL] name {TO | =} …` and the special forms that set
    /// one GUC (`SET TIME ZONE`, `SET NAMES`, `SET SCHEMA`, `SET XML
    /// OPTION`). The handler must look at the name: GUCs such as
    /// `transaction_isolation` are transaction-scoped.
    Set { local: bool },
    /// `RESET name`, `RESET ALL`, `RESET TIME ZONE`, `RESET TRANSACTION
    /// ISOLATION LEVEL`. RESET ALL leaves the role and the session
    /// authorization alone (they are `GUC_NO_RESET_ALL`).
    Reset,
    /// `SET [SESSION | LOCAL] ROLE …`, also spelled `SET role = …`.
    SetRole { local: bool },
    /// `RESET ROLE`.
    ResetRole,
    /// `SET [SESSION | LOCAL] SESSION AUTHORIZATION …`, also spelled `SET
    /// session_authorization = …`.
    SetSessionAuthorization { local: bool },
    /// `RESET SESSION AUTHORIZATION`.
    ResetSessionAuthorization,
    /// `SET [SESSION | LOCAL] TRANSACTION mode, …`: the current
    /// transaction's characteristics.
    SetTransaction,
    /// `SET TRANSACTION SNAPSHOT '…'`: imports another session's snapshot,
    /// which a replay cannot reproduce once that session has moved on.
    SetTransactionSnapshot,
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION …`: the defaults
    /// (`default_transaction_*` GUCs).
    SetSessionCharacteristics,
    /// `SET CONSTRAINTS …`: transaction-scoped.
    SetConstraints,
    /// A call of `set_config(name, value, is_local)`, which may also set
    /// `role` or `session_authorization`.
    SetConfigCall,
    /// `PREPARE name [(types)] AS statement`; the handler classifies the
    /// body, which runs at EXECUTE.
    Prepare,
    /// `DEALLOCATE [PREPARE] {name | ALL}`.
    Deallocate,
    /// `EXECUTE name [(args)]`, or `CREATE TABLE … AS EXECUTE name`: runs a
    /// prepared statement, whose own class the tracker knows.
    Execute,
    /// `LISTEN channel`.
    Listen,
    /// `UNLISTEN {channel | *}`.
    Unlisten,
    /// `DISCARD {ALL | PLANS | SEQUENCES | TEMP | TEMPORARY}`.
    Discard,
    /// `BEGIN …` or `START TRANSACTION …`.
    Begin,
    /// `COMMIT` or `END`, `[WORK | TRANSACTION]`; `chain` for `AND CHAIN`,
    /// which starts a new transaction with the same characteristics.
    Commit { chain: bool },
    /// `ROLLBACK` or `ABORT`, `[WORK | TRANSACTION]`, `[AND [NO] CHAIN]`.
    Rollback { chain: bool },
    /// `SAVEPOINT name`.
    Savepoint,
    /// `RELEASE [SAVEPOINT] name`.
    Release,
    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`.
    RollbackTo,
    /// `PREPARE TRANSACTION 'gid'`.
    PrepareTransaction,
    /// `COMMIT PREPARED 'gid'`.
    CommitPrepared,
    /// `ROLLBACK PREPARED 'gid'`.
    RollbackPrepared,
    /// Creates a temporary object: `CREATE [OR REPLACE] [GLOBAL | LOCAL]
    /// {TEMP | TEMPORARY} …`, a CREATE naming a `pg_temp` schema, `SELECT
    /// … INTO [LOCAL | GLOBAL] {TEMP | TEMPORARY} [TABLE] t` or `INTO
    /// pg_temp.t`.
    CreateTemp,
    /// `DECLARE name … CURSOR [WITH | WITHOUT HOLD] FOR query`. Without
    /// HOLD the cursor ends with its transaction.
    DeclareCursor { with_hold: bool },
    /// `CLOSE {name | ALL}`.
    CloseCursor,
    /// `FETCH` or `MOVE`: moves a cursor (and runs its query).
    FetchOrMove,
    /// A call of a session-level advisory lock function
    /// (`pg_advisory_lock`, `pg_try_advisory_lock`, `pg_advisory_unlock`,
    /// their `_shared` forms, `pg_advisory_unlock_all`). The `_xact_` forms
    /// end with the transaction and are not candidates.
    AdvisoryLock,
    /// `LOAD 'library'`.
    Load,
    /// The text carries a credential and must never be journaled: `CREATE |
    /// ALTER {ROLE | USER | GROUP} … PASSWORD`, `CREATE | ALTER USER
    /// MAPPING`, a `password` option of `CREATE | ALTER SERVER`, `CREATE
    /// SUBSCRIPTION`, `ALTER SUBSCRIPTION … CONNECTION`, `ALTER SYSTEM`
    /// (`primary_conninfo` may hold a password). Takes precedence over every
    /// other kind.
    Credential,
    /// `DROP …`: may drop a temporary object the session holds; the
    /// tracker can ignore it when the session has none.
    Drop,
    /// `DO`: an anonymous block that may change anything.
    Do,
    /// `CALL`: a procedure that may change anything, transactions included.
    Call,
    /// `COPY`: may switch the connection into the COPY sub-protocol.
    Copy,
    /// `SHOW reprise.…`: answered by Reprise itself.
    ShowReprise,
    /// Several of the above at once, e.g. a DECLARE whose query takes an
    /// advisory lock: only a full parse can tell the tracker everything.
    Multiple,
}

/// Classifies one statement, as returned by
/// [`split_statements`](super::lexer::split_statements); a trailing `;` is
/// allowed, a second statement makes it [`Class::Unknown`].
pub fn classify(statement: &[u8], options: &LexOptions) -> Class {
    classify_with(statement, options, true)
}

/// [`classify`], with or without the shortcut for a plain rest (see
/// [`Cursor::rest_is_plain`]).
fn classify_with(statement: &[u8], options: &LexOptions, shortcut: bool) -> Class {
    let mut cursor = Cursor::new(statement, options);
    let Some(first) = cursor.next() else {
        return if cursor.finish() {
            Class::Ordinary
        } else {
            Class::Unknown
        };
    };
    let (kind, scan) = match lead(&mut cursor, first, false) {
        Lead::Unknown => return Class::Unknown,
        Lead::Ordinary(scan) => (None, scan),
        Lead::Kind(kind, scan) => (Some(kind), scan),
    };
    if shortcut && scan & !QUERY == 0 && cursor.rest_is_plain(scan) {
        return combine(kind, NOTHING);
    }
    let effects = scan_rest(&mut cursor, scan);
    if !cursor.finish() {
        return Class::Unknown;
    }
    combine(kind, effects)
}

/// What the leading keywords say, and what to look for in the rest.
enum Lead {
    Ordinary(Scan),
    Kind(Kind, Scan),
    Unknown,
}

/// What to look for in the tokens after the leading keywords (bit set).
type Scan = u8;
const NOTHING: Scan = 0;
/// Calls of `set_config` and of the session advisory lock functions.
const CALLS: Scan = 1;
/// `SELECT … INTO TEMP t`, `INTO pg_temp.t`.
const INTO: Scan = 1 << 1;
/// A name qualified by a `pg_temp` schema.
const PG_TEMP: Scan = 1 << 2;
/// `CREATE TABLE … AS EXECUTE`.
const EXECUTE: Scan = 1 << 3;
/// The role option keyword PASSWORD.
const PASSWORD: Scan = 1 << 4;
/// An option named `password`, quoted or not.
const PASSWORD_OPTION: Scan = 1 << 5;
/// The keyword CONNECTION of ALTER SUBSCRIPTION.
const CONNECTION: Scan = 1 << 6;
const QUERY: Scan = CALLS | INTO;

/// What the scan found (bit set).
type Effects = u8;
const SET_CONFIG: Effects = 1;
const ADVISORY: Effects = 1 << 1;
const TEMP: Effects = 1 << 2;
const EXECUTES: Effects = 1 << 3;
const CREDENTIAL: Effects = 1 << 4;
/// A call of a `U&"…"` name, which may spell anything.
const OPAQUE: Effects = 1 << 5;

const ADVISORY_FUNCTIONS: [&[u8]; 7] = [
    b"pg_advisory_lock",
    b"pg_advisory_lock_shared",
    b"pg_try_advisory_lock",
    b"pg_try_advisory_lock_shared",
    b"pg_advisory_unlock",
    b"pg_advisory_unlock_shared",
    b"pg_advisory_unlock_all",
];

fn combine(kind: Option<Kind>, effects: Effects) -> Class {
    if effects & OPAQUE != 0 {
        return Class::Unknown;
    }
    if effects & CREDENTIAL != 0 {
        return Class::Candidate(Kind::Credential);
    }
    let mut found = None;
    let mut several = false;
    for (bit, effect) in [
        (SET_CONFIG, Kind::SetConfigCall),
        (ADVISORY, Kind::AdvisoryLock),
        (TEMP, Kind::CreateTemp),
        (EXECUTES, Kind::Execute),
    ] {
        if effects & bit != 0 {
            several |= found.is_some();
            found = Some(effect);
        }
    }
    let kind = match (kind, found) {
        (None, None) => return Class::Ordinary,
        (Some(kind), None) => kind,
        // They may do anything anyway.
        (Some(kind @ (Kind::Do | Kind::Call)), Some(_)) => kind,
        _ if several => Kind::Multiple,
        (None, Some(effect)) => effect,
        (Some(kind), Some(effect)) if kind == effect => kind,
        (Some(_), Some(_)) => Kind::Multiple,
    };
    Class::Candidate(kind)
}

/// The tokens of the first statement, with one token of lookahead.
///
/// Tokens travel as [`Token`]s, which fit in registers, and become
/// [`Lexeme`]s only in the inlined `next` and `peek`: a `Lexeme` returned
/// through memory stalls on store forwarding.
struct Cursor<'a> {
    sql: &'a [u8],
    lexer: Lexer<'a>,
    boundary: Boundary,
    peeked: Option<Token>,
    /// The last token `next` returned.
    prev: Option<Token>,
    /// The statement has ended (separator, end of input or error).
    ended: bool,
    /// The text did not tokenize, or another statement followed.
    bad: bool,
}

impl<'a> Cursor<'a> {
    fn new(statement: &'a [u8], options: &LexOptions) -> Self {
        Self {
            sql: statement,
            lexer: Lexer::new(statement, options),
            boundary: Boundary::default(),
            peeked: None,
            prev: None,
            ended: false,
            bad: false,
        }
    }

    #[inline(always)]
    fn next(&mut self) -> Option<Lexeme<'a>> {
        let token = match self.peeked.take() {
            Some(token) => token,
            None => self.pull()?,
        };
        self.prev = Some(token);
        Some(token.lexeme(self.sql))
    }

    #[inline]
    fn peek(&mut self) -> Option<Lexeme<'a>> {
        if self.peeked.is_none() {
            self.peeked = self.pull();
        }
        Some(self.peeked?.lexeme(self.sql))
    }

    /// The token `next` returned last.
    fn prev(&self) -> Option<Lexeme<'a>> {
        Some(self.prev?.lexeme(self.sql))
    }

    #[inline(always)]
    fn pull(&mut self) -> Option<Token> {
        if self.ended {
            return None;
        }
        let Some(token) = self.lexer.next() else {
            self.ended = true;
            return None;
        };
        if token.kind == TokenKind::Error {
            self.ended = true;
            self.bad = true;
            return None;
        }
        if self.boundary.feed(&token.lexeme(self.sql)) {
            self.ended = true;
            // Only empty statements may follow.
            self.bad = self.lexer.any(|rest| rest.kind != TokenKind::Semicolon);
            return None;
        }
        Some(token)
    }

    /// Whether the untouched rest of the statement is so plain that a
    /// scan for `scan` (at most [`QUERY`]) must find nothing and
    /// [`finish`](Cursor::finish) must succeed: only words, numbers,
    /// whitespace and operators that start no comment, no call and no
    /// string, no INTO, then at most the `;` that ends the statement.
    /// Most statements of an application are like that, and one pass over
    /// the bytes is much cheaper than lexing them.
    fn rest_is_plain(&self, scan: Scan) -> bool {
        // An open parenthesis would keep the `;` inside the statement.
        if self.ended || self.bad || self.peeked.is_some() || self.boundary.is_open() {
            return false;
        }
        let rest = &self.sql[self.lexer.position()..];
        let body_len = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
        let (body, tail) = rest.split_at(body_len);
        let into = scan & INTO != 0;
        let plain_body = body.iter().enumerate().all(|(at, &byte)| {
            let plain = matches!(
                byte,
                b'a'..=b'z'
                    | b'A'..=b'Z'
                    | b'0'..=b'9'
                    | b'_'
                    | b' '
                    | b'\t'
                    | b'\n'
                    | b'\r'
                    | b','
                    | b'.'
                    | b'='
                    | b'<'
                    | b'>'
                    | b'+'
                    | b'*'
            );
            // Any `into`, even inside a word: a false alarm only costs the
            // full scan.
            plain
                && !(into
                    && byte.eq_ignore_ascii_case(&b'i')
                    && body
                        .get(at + 1..at + 4)
                        .is_some_and(|next| next.eq_ignore_ascii_case(b"nto")))
        });
        plain_body
            && tail
                .iter()
                .all(|&byte| matches!(byte, b';' | b' ' | b'\t' | b'\n' | b'\r'))
    }

    /// Reads the rest of the statement; false if it must be unknown.
    fn finish(mut self) -> bool {
        while self.pull().is_some() {}
        !self.bad && !self.boundary.unbalanced()
    }
}

fn kw(token: Option<Lexeme>, lowercase: &[u8]) -> bool {
    token.is_some_and(|token| token.is_keyword(lowercase))
}

/// A word folded to ASCII lowercase on the stack, to `match` keywords.
struct Folded {
    buf: [u8; 16],
    len: usize,
}

impl Folded {
    /// Empty for anything but a word of at most 16 bytes, which matches no
    /// keyword.
    #[inline]
    fn of(token: &Lexeme) -> Self {
        let mut folded = Folded {
            buf: [0; 16],
            len: 0,
        };
        if token.kind == TokenKind::Word && token.text.len() <= folded.buf.len() {
            for (to, from) in folded.buf.iter_mut().zip(token.text) {
                *to = from.to_ascii_lowercase();
            }
            folded.len = token.text.len();
        }
        folded
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Reads the leading keywords of a statement whose first token is
/// `first`. `explained` is set for the statement inside EXPLAIN ANALYZE.
fn lead(c: &mut Cursor, first: Lexeme, explained: bool) -> Lead {
    if first.is_punct(b'(') {
        // A parenthesized SELECT.
        return Lead::Ordinary(QUERY);
    }
    let kind = |kind| Lead::Kind(kind, NOTHING);
    match Folded::of(&first).as_bytes() {
        b"select" | b"with" | b"values" | b"table" | b"insert" | b"update" | b"delete"
        | b"merge" => Lead::Ordinary(QUERY),
        b"show" if c.peek().is_some_and(|t| t.names(b"reprise")) => kind(Kind::ShowReprise),
        b"show" | b"checkpoint" | b"vacuum" | b"analyze" | b"analyse" | b"cluster" | b"reindex"
        | b"refresh" | b"truncate" | b"lock" | b"comment" | b"grant" | b"revoke" | b"security"
        | b"import" | b"notify" | b"reassign" => Lead::Ordinary(NOTHING),
        b"explain" if !explained => explain(c),
        b"set" => set(c),
        b"reset" => reset(c),
        b"begin" => kind(Kind::Begin),
        b"start" if kw(c.next(), b"transaction") => kind(Kind::Begin),
        b"commit" => end_transaction(c, true),
        b"end" => end_transaction(c, false),
        b"rollback" => rollback(c, true),
        b"abort" => rollback(c, false),
        b"savepoint" => kind(Kind::Savepoint),
        b"release" => kind(Kind::Release),
        b"prepare" => prepare(c),
        b"execute" => Lead::Kind(Kind::Execute, CALLS),
        b"deallocate" => kind(Kind::Deallocate),
        b"listen" => kind(Kind::Listen),
        b"unlisten" => kind(Kind::Unlisten),
        b"discard" => kind(Kind::Discard),
        b"declare" => declare(c),
        b"close" => kind(Kind::CloseCursor),
        b"fetch" | b"move" => kind(Kind::FetchOrMove),
        b"copy" => Lead::Kind(Kind::Copy, CALLS),
        b"do" => kind(Kind::Do),
        b"call" => kind(Kind::Call),
        b"load" => kind(Kind::Load),
        b"create" => create(c),
        b"alter" => alter(c),
        b"drop" => kind(Kind::Drop),
        _ => Lead::Unknown,
    }
}

fn is_analyze(token: &Lexeme) -> bool {
    token.is_keyword(b"analyze") || token.is_keyword(b"analyse")
}

/// `EXPLAIN [ANALYZE] [VERBOSE] statement` or `EXPLAIN (option [value], …)
/// statement`: with ANALYZE the statement runs, so it is classified.
fn explain(c: &mut Cursor) -> Lead {
    let mut analyze = false;
    let mut next = c.next();
    if next.is_some_and(|t| t.is_punct(b'(')) {
        let mut depth = 1u32;
        let mut option_start = true;
        loop {
            let Some(token) = c.next() else {
                return Lead::Unknown;
            };
            if token.is_punct(b'(') {
                depth += 1;
            } else if token.is_punct(b')') {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            } else if depth == 1 && option_start && is_analyze(&token) {
                // On unless its value plainly says off.
                let off = c.peek().is_some_and(|value| {
                    value.is_keyword(b"false")
                        || value.is_keyword(b"off")
                        || (value.kind == TokenKind::Number && value.text == b"0")
                });
                analyze |= !off;
            }
            option_start = depth == 1 && token.is_punct(b',');
        }
        next = c.next();
    } else if next.is_some_and(|t| is_analyze(&t)) {
        analyze = true;
        next = c.next();
        if kw(next, b"verbose") {
            next = c.next();
        }
    } else if kw(next, b"verbose") {
        next = c.next();
    }
    match next {
        None => Lead::Unknown,
        Some(_) if !analyze => Lead::Ordinary(NOTHING),
        Some(inner) => lead(c, inner, true),
    }
}

/// Everything after SET.
fn set(c: &mut Cursor) -> Lead {
    let Some(mut token) = c.next() else {
        return Lead::Unknown;
    };
    let mut local = false;
    let mut scoped = false;
    if token.is_keyword(b"local")
        || (token.is_keyword(b"session")
            && !c.peek().is_some_and(|t| {
                t.is_keyword(b"authorization") || t.is_keyword(b"characteristics")
            }))
    {
        local = token.is_keyword(b"local");
        scoped = true;
        let Some(next) = c.next() else {
            return Lead::Unknown;
        };
        token = next;
    }
    let kind = match Folded::of(&token).as_bytes() {
        b"transaction" if kw(c.peek(), b"snapshot") => Kind::SetTransactionSnapshot,
        b"transaction" => Kind::SetTransaction,
        b"session" => match c.next() {
            Some(t) if t.is_keyword(b"authorization") => Kind::SetSessionAuthorization { local },
            Some(t) if t.is_keyword(b"characteristics") => Kind::SetSessionCharacteristics,
            _ => return Lead::Unknown,
        },
        b"constraints" if !scoped => Kind::SetConstraints,
        _ if token.names(b"role") => Kind::SetRole { local },
        _ if token.names(b"session_authorization") => Kind::SetSessionAuthorization { local },
        _ if token.name().is_some() => Kind::Set { local },
        _ => return Lead::Unknown,
    };
    Lead::Kind(kind, NOTHING)
}

/// Everything after RESET.
fn reset(c: &mut Cursor) -> Lead {
    let Some(token) = c.next() else {
        return Lead::Unknown;
    };
    let kind = if token.names(b"role") {
        Kind::ResetRole
    } else if (token.is_keyword(b"session") && kw(c.peek(), b"authorization"))
        || token.names(b"session_authorization")
    {
        Kind::ResetSessionAuthorization
    } else if token.name().is_some() {
        Kind::Reset
    } else {
        return Lead::Unknown;
    };
    Lead::Kind(kind, NOTHING)
}

/// `[AND [NO] CHAIN]` at the end of COMMIT, END, ROLLBACK or ABORT, whose
/// first token is `token`: whether it chains, or `None` if it is not that.
fn chain(c: &mut Cursor, token: Option<Lexeme>) -> Option<bool> {
    match token {
        None => Some(false),
        Some(and) if and.is_keyword(b"and") => {
            let mut next = c.next();
            let no = kw(next, b"no");
            if no {
                next = c.next();
            }
            (kw(next, b"chain") && c.peek().is_none()).then_some(!no)
        }
        Some(_) => None,
    }
}

/// After COMMIT (`commit`) or END.
fn end_transaction(c: &mut Cursor, commit: bool) -> Lead {
    let mut token = c.next();
    if commit && kw(token, b"prepared") {
        return Lead::Kind(Kind::CommitPrepared, NOTHING);
    }
    if kw(token, b"work") || kw(token, b"transaction") {
        token = c.next();
    }
    match chain(c, token) {
        Some(chain) => Lead::Kind(Kind::Commit { chain }, NOTHING),
        None => Lead::Unknown,
    }
}

/// After ROLLBACK (`rollback`) or ABORT.
fn rollback(c: &mut Cursor, rollback: bool) -> Lead {
    let mut token = c.next();
    if rollback && kw(token, b"prepared") {
        return Lead::Kind(Kind::RollbackPrepared, NOTHING);
    }
    if kw(token, b"work") || kw(token, b"transaction") {
        token = c.next();
    }
    if rollback && kw(token, b"to") {
        return Lead::Kind(Kind::RollbackTo, NOTHING);
    }
    match chain(c, token) {
        Some(chain) => Lead::Kind(Kind::Rollback { chain }, NOTHING),
        None => Lead::Unknown,
    }
}

/// `PREPARE TRANSACTION 'gid'`, or `PREPARE name …` (a statement may well
/// be named `transaction`).
fn prepare(c: &mut Cursor) -> Lead {
    let Some(token) = c.next() else {
        return Lead::Unknown;
    };
    let gid_follows = c
        .peek()
        .is_some_and(|t| matches!(t.kind, TokenKind::String | TokenKind::DollarString));
    if token.is_keyword(b"transaction") && gid_follows {
        Lead::Kind(Kind::PrepareTransaction, NOTHING)
    } else {
        // The body runs at EXECUTE, not now.
        Lead::Kind(Kind::Prepare, NOTHING)
    }
}

/// `DECLARE name [BINARY] [ASENSITIVE | INSENSITIVE] [[NO] SCROLL] CURSOR
/// [{WITH | WITHOUT} HOLD] FOR query`.
fn declare(c: &mut Cursor) -> Lead {
    if c.next().and_then(|name| name.name()).is_none() {
        return Lead::Unknown;
    }
    loop {
        match c.next() {
            Some(t) if t.is_keyword(b"cursor") => break,
            Some(t)
                if matches!(
                    Folded::of(&t).as_bytes(),
                    b"binary" | b"asensitive" | b"insensitive" | b"no" | b"scroll"
                ) => {}
            _ => return Lead::Unknown,
        }
    }
    let mut token = c.next();
    let with_hold = kw(token, b"with");
    if with_hold || kw(token, b"without") {
        if !kw(c.next(), b"hold") {
            return Lead::Unknown;
        }
        token = c.next();
    }
    if !kw(token, b"for") {
        return Lead::Unknown;
    }
    Lead::Kind(Kind::DeclareCursor { with_hold }, QUERY)
}

/// Everything after CREATE.
fn create(c: &mut Cursor) -> Lead {
    let Some(mut token) = c.next() else {
        return Lead::Unknown;
    };
    if token.is_keyword(b"or") {
        match (c.next(), c.next()) {
            (Some(replace), Some(next)) if replace.is_keyword(b"replace") => token = next,
            _ => return Lead::Unknown,
        }
    }
    let temp = |t: Option<Lexeme>| kw(t, b"temp") || kw(t, b"temporary");
    match Folded::of(&token).as_bytes() {
        b"temp" | b"temporary" => Lead::Kind(Kind::CreateTemp, CALLS | EXECUTE),
        b"global" | b"local" if temp(c.peek()) => Lead::Kind(Kind::CreateTemp, CALLS | EXECUTE),
        b"user" if kw(c.peek(), b"mapping") => Lead::Kind(Kind::Credential, NOTHING),
        b"role" | b"user" | b"group" => Lead::Ordinary(PASSWORD),
        b"server" => Lead::Ordinary(PASSWORD_OPTION),
        b"subscription" => Lead::Kind(Kind::Credential, NOTHING),
        // Their bodies do not run now; a trigger's EXECUTE FUNCTION is no
        // EXECUTE of a prepared statement.
        b"function" | b"procedure" | b"view" | b"recursive" | b"rule" | b"trigger"
        | b"constraint" | b"event" => Lead::Ordinary(PG_TEMP),
        _ => Lead::Ordinary(CALLS | PG_TEMP | EXECUTE),
    }
}

/// Everything after ALTER. A volatile column default runs over every row,
/// so calls count.
fn alter(c: &mut Cursor) -> Lead {
    let Some(token) = c.next() else {
        return Lead::Unknown;
    };
    match Folded::of(&token).as_bytes() {
        b"user" if kw(c.peek(), b"mapping") => Lead::Kind(Kind::Credential, NOTHING),
        b"role" | b"user" | b"group" => Lead::Ordinary(PASSWORD),
        b"server" => Lead::Ordinary(PASSWORD_OPTION),
        b"subscription" => Lead::Ordinary(CONNECTION),
        b"system" => Lead::Kind(Kind::Credential, NOTHING),
        _ => Lead::Ordinary(CALLS),
    }
}

/// The effect of calling the function this name token stands for.
#[inline]
fn call_effect(token: &Lexeme) -> Effects {
    let Some((name, quoted)) = token.name() else {
        return if token.kind == TokenKind::QuotedIdent {
            OPAQUE
        } else {
            0
        };
    };
    if name.len() < 10 || !matches!(name[0], b's' | b'S' | b'p' | b'P') {
        return 0;
    }
    let is = |function: &[u8]| {
        if quoted {
            name == function
        } else {
            name.eq_ignore_ascii_case(function)
        }
    };
    if is(b"set_config") {
        SET_CONFIG
    } else if ADVISORY_FUNCTIONS.iter().any(|function| is(function)) {
        ADVISORY
    } else {
        0
    }
}

/// `pg_temp` or `pg_temp_<n>`, the session's temporary schema.
fn is_pg_temp(token: &Lexeme) -> bool {
    let Some((name, quoted)) = token.name() else {
        return false;
    };
    if name.len() < 7 {
        return false;
    }
    let (head, tail) = name.split_at(7);
    let head_matches = if quoted {
        head == b"pg_temp"
    } else {
        head.eq_ignore_ascii_case(b"pg_temp")
    };
    head_matches
        && match tail {
            [] => true,
            [b'_', digits @ ..] => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
            _ => false,
        }
}

/// Scans the rest of the statement for what `scan` asks.
fn scan_rest(c: &mut Cursor, scan: Scan) -> Effects {
    let mut effects = 0;
    if scan == NOTHING {
        return effects;
    }
    // Effects that hold if the next token is `(` (a call) or `.` (a name
    // qualified by pg_temp).
    let mut if_call = 0;
    let mut if_dot = 0;
    let mut after_into = false;
    // INTO right after INSERT or MERGE names a target, not a new table.
    let mut after_insert = c
        .prev()
        .is_some_and(|t| t.is_keyword(b"insert") || t.is_keyword(b"merge"));
    while let Some(token) = c.next() {
        if token.kind == TokenKind::Operator {
            if token.text == b"(" {
                effects |= if_call;
            } else if token.text == b"." {
                effects |= if_dot;
            }
        }
        if_call = 0;
        if_dot = 0;
        if after_into {
            // INTO [LOCAL | GLOBAL] {TEMP | TEMPORARY} [TABLE] t,
            // INTO [TABLE] pg_temp.t
            after_into = false;
            if token.is_keyword(b"temp") || token.is_keyword(b"temporary") {
                effects |= TEMP;
            } else if token.is_keyword(b"local")
                || token.is_keyword(b"global")
                || token.is_keyword(b"table")
            {
                after_into = true;
            } else if is_pg_temp(&token) {
                if_dot = TEMP;
            }
        }
        if matches!(token.kind, TokenKind::Word | TokenKind::QuotedIdent) {
            if scan & CALLS != 0 {
                if_call = call_effect(&token);
            }
            if scan & INTO != 0 && !after_insert && token.is_keyword(b"into") {
                after_into = true;
            }
            if scan & PG_TEMP != 0 && is_pg_temp(&token) {
                if_dot = TEMP;
            }
            if scan & EXECUTE != 0 && token.is_keyword(b"execute") {
                effects |= EXECUTES;
            }
            if (scan & PASSWORD != 0 && token.is_keyword(b"password"))
                || (scan & CONNECTION != 0 && token.is_keyword(b"connection"))
            {
                effects |= CREDENTIAL;
            }
            if scan & PASSWORD_OPTION != 0 {
                // A `U&"…"` name may spell password.
                let named_password = match token.name() {
                    Some((name, _)) => name.eq_ignore_ascii_case(b"password"),
                    None => true,
                };
                if named_password {
                    effects |= CREDENTIAL;
                }
            }
        }
        after_insert = token.is_keyword(b"insert") || token.is_keyword(b"merge");
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::Class::{Candidate as C, Ordinary as O, Unknown as U};
    use super::Kind::*;
    use super::*;
    use crate::state::lexer::split_statements;

    const SCS_OFF: LexOptions = LexOptions {
        standard_conforming_strings: false,
        ascii_safe: true,
    };

    #[rustfmt::skip]
    const TABLE: &[(&str, Class)] = &[
        // pgbench
        ("SELECT abalance FROM pgbench_accounts WHERE aid = $1;", O),
        ("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;", O),
        ("UPDATE pgbench_tellers SET tbalance = tbalance + 42 WHERE tid = 7;", O),
        ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);", O),
        ("BEGIN;", C(Begin)),
        ("END;", C(Commit { chain: false })),
        // Ordinary statements
        ("select 1", O),
        ("VALUES (1), (2)", O),
        ("TABLE t", O),
        ("(SELECT 1) UNION (SELECT 2)", O),
        ("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a", O),
        ("MERGE INTO t USING u ON t.a = u.a WHEN MATCHED THEN DELETE", O),
        ("DELETE FROM t WHERE x IN (SELECT y FROM u)", O),
        ("SHOW search_path", O),
        ("CHECKPOINT", O),
        ("VACUUM (ANALYZE) t", O),
        ("ANALYZE t", O),
        ("TRUNCATE t", O),
        ("NOTIFY c, 'x'", O),
        ("LOCK TABLE t IN SHARE MODE", O),
        ("GRANT SELECT ON t TO u", O),
        ("CREATE TABLE t (x int)", O),
        ("CREATE UNLOGGED TABLE t (x int)", O),
        ("CREATE INDEX ON t (x)", O),
        ("CREATE ROLE r LOGIN", O),
        ("ALTER USER u SET search_path = x", O),
        ("ALTER TABLE t ADD COLUMN password text", O),
        ("select set_config from t", O),
        ("select pg_advisory_xact_lock(1)", O),
        ("SELECT * INTO t FROM u", O),
        ("SELECT * INTO unlogged t FROM u", O),
        ("INSERT INTO temp VALUES (1)", O),
        ("SELECT * FROM pg_temp.t", O),
        ("EXPLAIN SELECT set_config('a', 'b', false)", O),
        ("EXPLAIN VERBOSE SELECT pg_advisory_lock(1)", O),
        ("EXPLAIN (ANALYZE false, COSTS) SELECT pg_advisory_lock(1)", O),
        ("", O),
        ("  ;  ", O),
        ("-- nothing at all", O),
        // Comments, strings and quoted identifiers hide keywords.
        ("  -- SET x = 1\n /* SET x = 1 */ SELECT 1", O),
        ("/* a /* nested */ still a comment */ SET search_path = x", C(Set { local: false })),
        ("/* a /* nested */ SET x = 1 */ select 1", O),
        ("select $$ set_config('a', 'b', false) $$", O),
        ("select $f$ pg_advisory_lock(1) $f$, 1", O),
        ("select 'pg_advisory_lock(1)'", O),
        ("select E'it\\'s set_config(''x'')'", O),
        ("SELECT E'\\\\', set_config('a', 'b', false)", C(SetConfigCall)),
        ("select \"set_config\" from t", O),
        ("select \"set_config\"('a', 'b', false)", C(SetConfigCall)),
        ("select \"SET_CONFIG\"('a', 'b', false)", O),
        ("select \"x set_config( y\" from t", O),
        ("select $1 || 'x' -- set_config(\n", O),
        ("SELECT U&\"\\0073et_config\"('a', 'b', false)", U),
        // State-changing calls
        ("SeLeCt SET_CONFIG('search_path', 'x', false)", C(SetConfigCall)),
        ("select pg_catalog.set_config('a', 'b', true)", C(SetConfigCall)),
        ("WITH x AS (SELECT 1) SELECT set_config('a', 'b', false) FROM x", C(SetConfigCall)),
        ("UPDATE t SET x = set_config('a', 'b', false)", C(SetConfigCall)),
        ("select set_config /* why not */ ('a', 'b', false)", C(SetConfigCall)),
        ("select pg_advisory_lock(1)", C(AdvisoryLock)),
        ("SELECT PG_TRY_ADVISORY_LOCK_SHARED(1, 2)", C(AdvisoryLock)),
        ("select pg_advisory_unlock_all()", C(AdvisoryLock)),
        ("select pg_advisory_lock(1), set_config('a', 'b', false)", C(Multiple)),
        ("EXPLAIN ANALYZE SELECT set_config('a', 'b', false)", C(SetConfigCall)),
        ("EXPLAIN (ANALYZE, BUFFERS) SELECT pg_advisory_lock(1)", C(AdvisoryLock)),
        ("explain analyse verbose create temp table t as select 1", C(CreateTemp)),
        ("EXPLAIN ANALYZE EXECUTE p", C(Execute)),
        ("EXPLAIN ANALYZE EXPLAIN ANALYZE SELECT 1", U),
        // GUCs and roles
        ("SET search_path TO public", C(Set { local: false })),
        ("SET SESSION statement_timeout = 0", C(Set { local: false })),
        ("SET LOCAL work_mem = '64MB'", C(Set { local: true })),
        ("set time zone 'UTC'", C(Set { local: false })),
        ("SET \"my.var\" = 1", C(Set { local: false })),
        ("RESET ALL", C(Reset)),
        ("RESET work_mem", C(Reset)),
        ("SET ROLE admin", C(SetRole { local: false })),
        ("SET LOCAL ROLE admin", C(SetRole { local: true })),
        ("set role = 'x'", C(SetRole { local: false })),
        ("RESET ROLE", C(ResetRole)),
        ("SET SESSION AUTHORIZATION DEFAULT", C(SetSessionAuthorization { local: false })),
        ("SET SESSION SESSION AUTHORIZATION u", C(SetSessionAuthorization { local: false })),
        ("SET session_authorization = 'u'", C(SetSessionAuthorization { local: false })),
        ("RESET SESSION AUTHORIZATION", C(ResetSessionAuthorization)),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", C(SetTransaction)),
        ("SET LOCAL TRANSACTION READ ONLY", C(SetTransaction)),
        ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", C(SetTransactionSnapshot)),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", C(SetSessionCharacteristics)),
        ("SET CONSTRAINTS ALL DEFERRED", C(SetConstraints)),
        ("SET", U),
        ("SET LOCAL", U),
        ("RESET", U),
        // Transactions
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", C(Begin)),
        ("begin work", C(Begin)),
        ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", C(Begin)),
        ("START foo", U),
        ("COMMIT", C(Commit { chain: false })),
        ("commit work and chain", C(Commit { chain: true })),
        ("COMMIT AND NO CHAIN", C(Commit { chain: false })),
        ("END TRANSACTION", C(Commit { chain: false })),
        ("COMMIT AND", U),
        ("COMMIT foo", U),
        ("ROLLBACK", C(Rollback { chain: false })),
        ("ROLLBACK AND CHAIN", C(Rollback { chain: true })),
        ("ABORT WORK", C(Rollback { chain: false })),
        ("ABORT TO s", U),
        ("ROLLBACK TO SAVEPOINT s", C(RollbackTo)),
        ("rollback work to s", C(RollbackTo)),
        ("SAVEPOINT s", C(Savepoint)),
        ("RELEASE SAVEPOINT s", C(Release)),
        ("release s", C(Release)),
        ("PREPARE TRANSACTION 'x'", C(PrepareTransaction)),
        ("COMMIT PREPARED 'x'", C(CommitPrepared)),
        ("ROLLBACK PREPARED 'x'", C(RollbackPrepared)),
        // Prepared statements, cursors, notifications
        ("PREPARE p AS select 1", C(Prepare)),
        ("PREPARE transaction AS select 1", C(Prepare)),
        ("PREPARE p(int) AS select set_config('a', 'b', false)", C(Prepare)),
        ("EXECUTE p(1)", C(Execute)),
        ("EXECUTE p(set_config('a', 'b', false))", C(Multiple)),
        ("DEALLOCATE ALL", C(Deallocate)),
        ("DEALLOCATE PREPARE p", C(Deallocate)),
        ("DECLARE c CURSOR WITH HOLD FOR select 1", C(DeclareCursor { with_hold: true })),
        ("DECLARE c BINARY NO SCROLL CURSOR WITHOUT HOLD FOR select 1", C(DeclareCursor { with_hold: false })),
        ("declare cursor cursor for select 1", C(DeclareCursor { with_hold: false })),
        ("DECLARE c CURSOR WITH HOLD FOR select pg_advisory_lock(1)", C(Multiple)),
        ("DECLARE c FOR select 1", U),
        ("CLOSE c", C(CloseCursor)),
        ("CLOSE ALL", C(CloseCursor)),
        ("FETCH 10 FROM c", C(FetchOrMove)),
        ("MOVE LAST IN c", C(FetchOrMove)),
        ("LISTEN chan", C(Listen)),
        ("UNLISTEN *", C(Unlisten)),
        ("DISCARD ALL", C(Discard)),
        ("DISCARD TEMP", C(Discard)),
        ("DISCARD PLANS", C(Discard)),
        // Temporary objects
        ("CREATE TEMP TABLE t (x int)", C(CreateTemp)),
        ("CREATE TEMPORARY VIEW v AS SELECT 1", C(CreateTemp)),
        ("CREATE TEMPORARY SEQUENCE s", C(CreateTemp)),
        ("CREATE GLOBAL TEMPORARY TABLE t (x int)", C(CreateTemp)),
        ("create local temp table t (x int) on commit drop", C(CreateTemp)),
        ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", C(CreateTemp)),
        ("CREATE TABLE pg_temp.t (x int)", C(CreateTemp)),
        ("CREATE TABLE \"pg_temp_3\".t (x int)", C(CreateTemp)),
        ("CREATE FUNCTION pg_temp.f() RETURNS int AS 'select 1' LANGUAGE sql", C(CreateTemp)),
        ("CREATE TEMP TABLE t AS SELECT set_config('a', 'b', false)", C(Multiple)),
        ("SELECT * INTO TEMP t FROM u", C(CreateTemp)),
        ("select 1 into temporary table t", C(CreateTemp)),
        ("select 1 into local temp t", C(CreateTemp)),
        ("select 1into temp t", C(CreateTemp)),
        ("SELECT * INTO pg_temp.t FROM u", C(CreateTemp)),
        ("CREATE TABLE t AS EXECUTE p", C(Execute)),
        ("CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC SELECT set_config('a', 'b', false); END", O),
        ("CREATE TRIGGER tr AFTER INSERT ON t EXECUTE FUNCTION f()", O),
        ("DROP TABLE t", C(Drop)),
        // Credentials
        ("ALTER ROLE x PASSWORD 'y'", C(Credential)),
        ("CREATE USER u WITH ENCRYPTED PASSWORD 'p'", C(Credential)),
        ("CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'x', password 'y')", C(Credential)),
        ("ALTER SERVER s OPTIONS (ADD \"password\" 'x')", C(Credential)),
        ("ALTER SUBSCRIPTION s CONNECTION 'password=x'", C(Credential)),
        ("ALTER SYSTEM SET primary_conninfo = 'password=x'", C(Credential)),
        // Anything may happen.
        ("LOAD 'auto_explain'", C(Load)),
        ("DO $$ BEGIN PERFORM set_config('a', 'b', false); END $$", C(Do)),
        ("CALL p(1)", C(Call)),
        ("COPY t FROM STDIN", C(Copy)),
        ("COPY (select pg_advisory_lock(1)) TO STDOUT", C(Multiple)),
        // Unknown
        ("select 'abc", U),
        ("select 1 /* abc", U),
        ("select 1; select 2", U),
        ("select (1; select 2", U),
        ("frobnicate the database", U),
        ("\"select\" 1", U),
        ("EXPLAIN", U),
    ];

    #[test]
    fn classifies_the_table() {
        assert!(TABLE.len() >= 80);
        let mut failures = Vec::new();
        for &(sql, expected) in TABLE {
            let got = classify(sql.as_bytes(), &LexOptions::default());
            if got != expected {
                failures.push(format!("{sql:?}: expected {expected:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn standard_conforming_strings_off() {
        // 'a\' set_config(1)' is one string when backslash escapes…
        let sql = b"select 'a\\' set_config(1)'";
        assert_eq!(classify(sql, &SCS_OFF), O);
        // …and an unterminated one after `set_config(1)` when it does not.
        assert_eq!(classify(sql, &LexOptions::default()), U);
        let sql = b"select 'a\\'', set_config('a', 'b', false)";
        assert_eq!(classify(sql, &SCS_OFF), C(SetConfigCall));
        assert_eq!(classify(sql, &LexOptions::default()), U);
    }

    #[test]
    fn high_bytes() {
        let latin1 = LexOptions::for_session(true, "LATIN1");
        let sjis = LexOptions::for_session(true, "SJIS");
        let sql = b"select '\xe9t\xe9' from caf\xe9";
        assert_eq!(classify(sql, &latin1), O);
        assert_eq!(classify(sql, &sjis), U);
        assert_eq!(
            classify(b"select '\xe9', set_config('a', 'b', false)", &latin1),
            C(SetConfigCall)
        );
        assert_eq!(
            classify(b"SET client_encoding = 'SJIS'", &sjis),
            C(Set { local: false })
        );
    }

    #[test]
    fn classifies_each_split_statement() {
        let script = "BEGIN; UPDATE t SET set_config = 1 WHERE x = ';'; \
                      CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; \
                      SELECT pg_advisory_lock(1); END";
        let classes: Vec<_> = split_statements(script.as_bytes(), &LexOptions::default())
            .into_iter()
            .map(|range| classify(&script.as_bytes()[range], &LexOptions::default()))
            .collect();
        assert_eq!(
            classes,
            [C(Begin), O, O, C(AdvisoryLock), C(Commit { chain: false })]
        );
    }

    #[test]
    fn the_plain_rest_shortcut_agrees_with_the_full_scan() {
        let cases: &[&[u8]] = &[
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            b"select 1;  ;\n",
            b"select 1; select 2",
            b"select a into temp t from u",
            b"select a INTO t from u",
            b"select a from pointo",
            b"insert into t values (1)",
            b"update t set a = a + 1 where b = 2",
            b"delete from t where a >= 3 and b <> 4",
            b"select e from t",
            b"select * from t;x",
            b"show search_path",
            b"table t",
            b"select 1e5, 1..2, a.b from t",
            b"notify x",
            b"( ;",
            b"(select 1; select 2",
        ];
        for sql in cases {
            for options in [LexOptions::default(), SCS_OFF] {
                assert_eq!(
                    classify_with(sql, &options, true),
                    classify_with(sql, &options, false),
                    "{}",
                    String::from_utf8_lossy(sql)
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn the_shortcut_never_changes_a_class(
            lead in proptest::sample::select(vec![
                "select", "SELECT", "with", "values", "table", "insert", "update",
                "delete", "merge", "show", "notify", "(", "execute", "copy",
                "declare c cursor for select", "alter table",
            ]),
            rest in proptest::collection::vec(proptest::sample::select(vec![
                " ", "a", "x", "into", "INTO", "temp", "set_config", "1", ".", ",", "=",
                "(", ")", ";", "'", "\"", "--", "/*", "*/", "$1", "$$", "e'", "U&", "\n",
                "pg_temp", "begin", "atomic", "end", "\u{e9}", "*", "+",
            ]), 0..12),
        ) {
            let sql = format!("{lead} {}", rest.concat());
            for options in [LexOptions::default(), SCS_OFF] {
                proptest::prop_assert_eq!(
                    classify_with(sql.as_bytes(), &options, true),
                    classify_with(sql.as_bytes(), &options, false),
                    "{}", sql
                );
            }
        }
    }
}
