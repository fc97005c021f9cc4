//! The per-session state tracker: what PostgreSQL holds for one session,
//! kept in step with the server.
//!
//! It is fed statement by statement, in the order the server runs them:
//! an effect is applied when the server confirms the statement
//! (CommandComplete), never when the client sends it, so that a failing
//! statement leaves state as the server leaves it. Transactions are
//! modelled as PostgreSQL runs them: GUC, role and LISTEN changes inside a
//! transaction (explicit, or the implicit one of a multi-statement query
//! or an extended-protocol batch) are undone when it rolls back, and
//! prepared statements and session advisory locks are not.
//!
//! ParameterStatus and ReadyForQuery are the server's word and win over
//! what the statement text implied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::classify::{classify, Class};
use super::effect::{effect_of, Discard, Effect, TransactionModes};
use super::lexer::{split_statements, LexOptions, Statements};
use super::resync::ServerTruth;
use crate::stats::Stats;
use crate::template::{
    fold_guc_name, state_hash, NonRecoverable, PreparedOrigin, PreparedStatement, Registry,
    ReplayState, StateHash, Template, TemplateId, TemplateRef, TransactionStatus,
};

/// Key of a SET LOCAL ROLE in [`ReplayState::local_settings`].
const LOCAL_ROLE: &[u8] = b"role";
/// Key of a SET LOCAL SESSION AUTHORIZATION.
const LOCAL_AUTHORIZATION: &[u8] = b"session_authorization";
/// Value of a local setting reset to its default (`SET LOCAL x TO
/// DEFAULT`); a NUL byte cannot occur in a real value.
pub const LOCAL_DEFAULT: &[u8] = b"\0default";

/// Reported parameters that describe the server or follow from other
/// state, never set by the session itself.
const SERVER_REPORTED: &[&[u8]] = &[
    b"server_version",
    b"server_encoding",
    b"integer_datetimes",
    b"in_hot_standby",
    b"is_superuser",
    b"session_authorization",
];

/// Which kinds of non-recoverable state a rollback takes back.
const TRANSACTIONAL: [NonRecoverable; 3] = [
    NonRecoverable::TempObjects,
    NonRecoverable::HoldCursors,
    NonRecoverable::SnapshotImport,
];

/// The tracked state of one session.
pub struct Tracker {
    registry: Arc<Registry>,
    stats: Arc<Stats>,
    /// The template the session started in.
    startup: TemplateRef,
    /// The registered template; stale while `dirty`.
    template: TemplateRef,
    /// Session-level state as of now, including changes made inside the
    /// open transaction.
    working: Template,
    dirty: bool,
    replay: ReplayState,
    hash: Option<StateHash>,
    tx: Option<Transaction>,
    held_cursors: BTreeSet<Bytes>,
    /// What EXECUTE of each SQL-prepared statement does.
    prepared_effects: HashMap<Bytes, Effect>,
    /// Values of reported parameters as the server last reported them.
    reported: HashMap<Bytes, Bytes>,
    /// … and as it reported them at login: the session defaults.
    login_reported: HashMap<Bytes, Bytes>,
    lex: LexOptions,
    /// A statement since the last safe point cannot be journaled or
    /// replayed (a credential); cleared at the next safe point.
    unreplayable: bool,
    /// Something happened that only reading the state back from the
    /// server can settle.
    probe_wanted: bool,
    /// Custom settings whose value only the server knows
    /// (`set_config('app.tenant', $1, false)`).
    probe_names: BTreeSet<Bytes>,
}

/// Non-recoverable kinds a probe of the server's state can settle.
const PROBED: [NonRecoverable; 4] = [
    NonRecoverable::Unclassified,
    NonRecoverable::TempObjects,
    NonRecoverable::HoldCursors,
    NonRecoverable::AdvisoryLocks,
];

/// The open transaction, explicit or implicit.
struct Transaction {
    explicit: bool,
    failed: bool,
    /// State at the start, taken before the first change.
    /// Boxed: most transactions change nothing, and the tracker moves its
    /// transaction at every end.
    start: Option<Box<Snapshot>>,
    /// LISTEN / UNLISTEN take effect at commit.
    pending_listen: Vec<ListenChange>,
    savepoints: Vec<Savepoint>,
    /// Characteristics it started with (AND CHAIN), which the server sets
    /// directly: an abort undoes only what BEGIN or SET TRANSACTION set
    /// on top of them.
    chained: TransactionModes,
}

struct Savepoint {
    name: Bytes,
    /// State when the savepoint was set, taken before the first change
    /// after it.
    state: Option<Snapshot>,
    pending_listen: usize,
}

#[derive(Clone)]
struct Snapshot {
    template: Template,
    local_settings: BTreeMap<Bytes, Bytes>,
    non_recoverable: crate::template::NonRecoverableSet,
    held_cursors: BTreeSet<Bytes>,
    /// SET TRANSACTION READ ONLY inside a savepoint is undone by ROLLBACK
    /// TO, like any SET LOCAL.
    modes: TransactionModes,
}

#[derive(Clone, Debug)]
enum ListenChange {
    Listen(Bytes),
    Unlisten(Bytes),
    UnlistenAll,
}

/// What the tracker knows at a ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    pub template: TemplateId,
    pub state_hash: StateHash,
    /// The template alone describes the session.
    pub safe: bool,
}

impl Tracker {
    /// A tracker for a session that logged in with `startup` parameters;
    /// `reported` are the ParameterStatus values of the server's greeting.
    pub fn new<'p>(
        registry: Arc<Registry>,
        stats: Arc<Stats>,
        startup: impl IntoIterator<Item = (&'p [u8], &'p [u8])>,
        reported: impl IntoIterator<Item = (&'p [u8], &'p [u8])>,
    ) -> Self {
        let mut template = Template::default();
        for (name, value) in startup {
            template
                .startup
                .insert(Bytes::copy_from_slice(name), Bytes::copy_from_slice(value));
        }
        let reported: HashMap<Bytes, Bytes> = reported
            .into_iter()
            .map(|(name, value)| (fold_guc_name(name), Bytes::copy_from_slice(value)))
            .collect();
        let lex = lex_options(&reported);
        let startup = registry.acquire(template.clone());
        stats.sessions_tracked.inc();
        Tracker {
            template: startup.clone(),
            startup,
            registry,
            stats,
            working: template,
            dirty: false,
            replay: ReplayState::default(),
            hash: None,
            tx: None,
            held_cursors: BTreeSet::new(),
            prepared_effects: HashMap::new(),
            login_reported: reported.clone(),
            reported,
            lex,
            unreplayable: false,
            probe_wanted: false,
            probe_names: BTreeSet::new(),
        }
    }

    /// The session's current state, session-level part.
    pub fn template(&self) -> &Template {
        &self.working
    }

    pub fn startup_template(&self) -> &Arc<Template> {
        self.startup.template()
    }

    pub fn replay_state(&self) -> &ReplayState {
        &self.replay
    }

    pub fn lex_options(&self) -> &LexOptions {
        &self.lex
    }

    /// True between BEGIN and the end of its transaction (status 'T' or
    /// 'E'), as far as the tracker knows now.
    pub fn in_transaction_block(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.explicit)
            || self.replay.status != TransactionStatus::Idle
    }

    pub fn unreplayable(&self) -> bool {
        self.unreplayable
    }

    /// Something since the last safe point cannot be replayed as sent (a
    /// request of Reprise's own went to the server in its midst); cleared
    /// at the next safe point.
    pub fn mark_unreplayable(&mut self) {
        self.unreplayable = true;
    }

    /// The registered id of the current template.
    pub fn template_id(&mut self) -> TemplateId {
        self.register();
        self.template.id()
    }

    /// The current template as registered, to hold on to.
    pub fn registered(&mut self) -> (TemplateId, Arc<Template>) {
        self.register();
        (self.template.id(), Arc::clone(self.template.template()))
    }

    /// The last value the server reported for each parameter, by folded
    /// name.
    pub fn reported(&self) -> &HashMap<Bytes, Bytes> {
        &self.reported
    }

    /// blake3(TemplateId + replay state), recomputed only after a change.
    pub fn state_hash(&mut self) -> StateHash {
        self.register();
        if let Some(hash) = self.hash {
            return hash;
        }
        let hash = state_hash(self.template.id(), &self.replay);
        self.hash = Some(hash);
        hash
    }

    /// Registers the working template if it changed.
    fn register(&mut self) {
        if self.dirty {
            self.dirty = false;
            if *self.template.template().as_ref() != self.working {
                self.template = self.registry.acquire(self.working.clone());
                self.hash = None;
            }
        }
    }

    /// Classifies the statements of a simple Query, in order.
    pub fn query_effects(&self, sql: &[u8]) -> Vec<Effect> {
        // Most Query messages hold one ordinary statement, and the
        // classifier reports a second statement as unknown: one pass over
        // the text settles the common case.
        if classify(sql, &self.lex) == Class::Ordinary {
            self.stats.statements_ordinary.inc();
            return vec![Effect::None];
        }
        let mut effects = Vec::new();
        for range in Statements::new(sql, &self.lex) {
            effects.push(self.statement_effect(&sql[range]));
        }
        effects
    }

    /// Classifies one statement and counts the result.
    pub fn statement_effect(&self, statement: &[u8]) -> Effect {
        let class = classify(statement, &self.lex);
        match class {
            Class::Ordinary => {
                self.stats.statements_ordinary.inc();
                Effect::None
            }
            Class::Unknown => {
                self.stats.statements_unclassified.inc();
                Effect::Unknown
            }
            Class::Candidate(_) => {
                self.stats.statements_candidate.inc();
                let effect = effect_of(statement, class, &self.lex);
                if effect == Effect::Unknown {
                    self.stats.statements_unclassified.inc();
                }
                effect
            }
        }
    }

    /// The effect of a statement classified again (not counted).
    fn silent_effect(&self, statement: &[u8]) -> Effect {
        effect_of(statement, classify(statement, &self.lex), &self.lex)
    }

    /// The server completed a statement (CommandComplete or
    /// EmptyQueryResponse).
    pub fn statement_done(&mut self, effect: &Effect) {
        if self.tx.is_none() {
            self.tx = Some(Transaction::new(false));
        }
        self.apply(effect);
    }

    /// The server refused a statement or message (a non-FATAL
    /// ErrorResponse).
    pub fn statement_failed(&mut self) {
        match &mut self.tx {
            Some(tx) if tx.explicit => tx.failed = true,
            // The implicit transaction aborts at once.
            Some(_) => self.end_transaction(false),
            None => {}
        }
    }

    /// ReadyForQuery with `status`: the implicit transaction, if any, is
    /// over, and the server's status is the truth.
    pub fn ready(&mut self, status: u8) -> Ready {
        let status = TransactionStatus::from_byte(status).unwrap_or(TransactionStatus::Idle);
        match (&self.tx, status) {
            (Some(tx), TransactionStatus::Idle) => {
                let explicit = tx.explicit;
                let failed = tx.failed;
                if explicit && !failed {
                    // Ended by something the text did not show (a
                    // procedure's COMMIT, say): the outcome is unknown.
                    self.mark_mismatch();
                }
                self.end_transaction(!failed);
            }
            (Some(tx), TransactionStatus::Failed) if !tx.failed => {
                if let Some(tx) = &mut self.tx {
                    tx.failed = true;
                    tx.explicit = true;
                }
            }
            (Some(tx), TransactionStatus::InTransaction) if !tx.explicit || tx.failed => {
                self.mark_mismatch();
                if let Some(tx) = &mut self.tx {
                    tx.explicit = true;
                    tx.failed = false;
                }
            }
            (None, TransactionStatus::InTransaction | TransactionStatus::Failed) => {
                self.mark_mismatch();
                let mut tx = Transaction::new(true);
                tx.failed = status == TransactionStatus::Failed;
                self.tx = Some(tx);
            }
            _ => {}
        }
        self.take_reported_spelling();
        if self.replay.status != status {
            self.replay.status = status;
            self.hash = None;
        }
        self.readiness()
    }

    fn readiness(&mut self) -> Ready {
        let safe = self.replay.is_safe_point();
        if safe {
            self.unreplayable = false;
        }
        Ready {
            template: self.template_id(),
            state_hash: self.state_hash(),
            safe,
        }
    }

    /// The tracker cannot vouch for the session's state, and reading it
    /// back from the server (see [`super::resync`]) would settle it: asked
    /// at an idle boundary.
    pub fn wants_probe(&self) -> bool {
        self.probe_wanted
            && self.tx.is_none()
            && PROBED
                .iter()
                .any(|kind| self.replay.non_recoverable.contains(*kind))
    }

    /// Custom settings to ask the server about by name: pg_settings does
    /// not list placeholders such as `app.tenant`.
    pub fn probe_names(&self) -> impl Iterator<Item = &[u8]> {
        self.working
            .settings
            .keys()
            .filter(|name| name.contains(&b'.'))
            .chain(&self.probe_names)
            .map(|name| &name[..])
    }

    /// Takes the server's word for the session state, read back at an
    /// idle boundary. What the server's answer cannot vouch for (a
    /// SQL-prepared statement whose text cannot re-create it) keeps the
    /// session non-recoverable.
    pub fn resync(&mut self, truth: ServerTruth) -> Ready {
        if self.tx.is_some() {
            return self.readiness();
        }
        self.probe_wanted = false;
        self.probe_names.clear();
        let mut vouched = true;
        let mut target = Template {
            startup: self.working.startup.clone(),
            settings: truth.settings,
            role: truth.role,
            listening: truth.listening,
            ..Template::default()
        };
        for (name, value) in truth.custom {
            // A placeholder reads as '' once reset.
            match value {
                Some(value)
                    if !value.is_empty() || self.working.settings.get(&name) == Some(&value) =>
                {
                    target.settings.insert(name, value);
                }
                _ => {}
            }
        }
        if self.working.startup.get(&b"user"[..]) != Some(&truth.session_user) {
            target.session_authorization = Some(truth.session_user);
        }
        for (name, server) in truth.prepared {
            let known = self
                .working
                .prepared
                .get(&name)
                .filter(|known| same_statement(known, &server));
            let statement = match known {
                Some(known) => known.clone(),
                None if server.origin == PreparedOrigin::Protocol => server,
                None => match self.recreating_statement(&name, &server.query) {
                    Some(query) => PreparedStatement {
                        origin: PreparedOrigin::Sql,
                        query,
                        param_types: Vec::new(),
                    },
                    None => {
                        vouched = false;
                        continue;
                    }
                },
            };
            target.prepared.insert(name, statement);
        }
        self.held_cursors = truth.hold_cursors;
        let present = [
            (NonRecoverable::Unclassified, !vouched),
            (NonRecoverable::TempObjects, truth.temp_objects),
            (NonRecoverable::HoldCursors, !self.held_cursors.is_empty()),
            (NonRecoverable::AdvisoryLocks, truth.advisory_locks),
            (NonRecoverable::SnapshotImport, false),
        ];
        for (kind, present) in present {
            if present {
                self.non_recoverable(kind);
            } else {
                self.clear_non_recoverable(kind);
            }
        }
        if target != self.working {
            self.change(|working| *working = target);
            self.rebuild_prepared_effects();
        }
        self.readiness()
    }

    /// The single PREPARE statement in `text` (the server's record of a
    /// SQL-prepared statement), if it re-creates `name`.
    fn recreating_statement(&self, name: &[u8], text: &[u8]) -> Option<Bytes> {
        let [_] = split_statements(text, &self.lex)[..] else {
            return None;
        };
        match self.silent_effect(text) {
            Effect::Prepare {
                name: prepared,
                statement,
                ..
            } if prepared == name => Some(statement),
            _ => None,
        }
    }

    /// A ParameterStatus after the greeting.
    pub fn parameter_status(&mut self, name: &[u8], value: &[u8]) {
        let name = fold_guc_name(name);
        let value = Bytes::copy_from_slice(value);
        let changed = self.reported.get(&name) != Some(&value);
        self.reported.insert(name.clone(), value.clone());
        if matches!(
            &name[..],
            b"client_encoding" | b"standard_conforming_strings"
        ) {
            self.lex = lex_options(&self.reported);
        }
        if !changed || SERVER_REPORTED.contains(&&name[..]) {
            return;
        }
        // The server canonicalizes values (`iso` becomes `ISO, MDY`) and
        // functions can change reported GUCs: take its spelling.
        if let Some(local) = self.replay.local_settings.get_mut(&name) {
            // After SET LOCAL … TO DEFAULT the server reports the default:
            // the marker already says so.
            if *local != value && local.as_ref() != LOCAL_DEFAULT {
                *local = value;
                self.hash = None;
            }
            return;
        }
        let startup_value = self.startup_value(&name);
        match self.working.settings.get(&name) {
            Some(current) if *current == value => {}
            Some(_) => self.change(|working| {
                working.settings.insert(name, value);
            }),
            None if startup_value.as_ref() == Some(&value) => {}
            None => self.change(|working| {
                working.settings.insert(name, value);
            }),
        }
    }

    /// At ReadyForQuery the server has reported every change of a reported
    /// GUC, so the value in effect is the last one reported, in the
    /// server's spelling, even where a SET left it unchanged and nothing
    /// was reported (`SET TimeZone = 'europe/paris'` while it already is
    /// `Europe/Paris`).
    fn take_reported_spelling(&mut self) {
        let reported = |name: &Bytes, value: &Bytes| {
            if SERVER_REPORTED.contains(&&name[..]) {
                return None;
            }
            self.reported
                .get(name)
                .filter(|reported| *reported != value)
                .cloned()
        };
        let mut locals = Vec::new();
        for (name, value) in &self.replay.local_settings {
            if value.as_ref() != LOCAL_DEFAULT && !is_identity_key(name) {
                if let Some(spelling) = reported(name, value) {
                    locals.push((name.clone(), spelling));
                }
            }
        }
        let mut settings = Vec::new();
        for (name, value) in &self.working.settings {
            // Masked by a local value, the session value is not in effect.
            if !self.replay.local_settings.contains_key(name) {
                if let Some(spelling) = reported(name, value) {
                    settings.push((name.clone(), spelling));
                }
            }
        }
        for (name, value) in locals {
            self.set_local(name, value);
        }
        if !settings.is_empty() {
            self.change(|working| working.settings.extend(settings));
        }
    }

    /// The value a reported GUC had at login.
    fn startup_value(&self, name: &[u8]) -> Option<Bytes> {
        self.login_reported.get(name).cloned()
    }

    /// A named statement was created by protocol Parse.
    pub fn parsed(&mut self, name: Bytes, query: Bytes, param_types: Vec<u32>) {
        // SQL EXECUTE can run it too.
        let effect = self.silent_effect(&query);
        self.prepared_effects.insert(name.clone(), effect);
        let statement = PreparedStatement {
            origin: PreparedOrigin::Protocol,
            query,
            param_types,
        };
        self.change(|working| {
            working.prepared.insert(name, statement);
        });
    }

    /// A named statement was closed by protocol Close.
    pub fn closed_statement(&mut self, name: &[u8]) {
        if self.working.prepared.contains_key(name) {
            self.prepared_effects.remove(name);
            self.change(|working| {
                working.prepared.remove(name);
            });
        }
    }

    /// The body of SQL-prepared statement `name`: what EXECUTE runs, and
    /// its text (the PREPARE statement after its `AS`).
    pub fn prepared_body(&self, name: &[u8]) -> Option<(&Effect, &[u8])> {
        let effect = self.prepared_effects.get(name)?;
        let statement = self.working.prepared.get(name)?;
        if statement.origin != PreparedOrigin::Sql {
            return None;
        }
        let text = &statement.query[..];
        let mut lexer = crate::state::lexer::Lexer::new(text, &self.lex);
        let after_as = loop {
            let token = lexer.next()?;
            if token.lexeme(text).is_keyword(b"as") {
                break token.end();
            }
        };
        Some((effect, &text[after_as..]))
    }

    /// What EXECUTE of a SQL-prepared statement does.
    pub fn prepared_effect(&self, name: &[u8]) -> Option<&Effect> {
        self.prepared_effects.get(name)
    }

    /// Moves the session to `target` (a template switch that the server
    /// has carried out).
    pub fn switch_to(&mut self, target: Template) {
        self.change(|working| *working = target);
        self.rebuild_prepared_effects();
        self.stats.template_switches.inc();
    }

    /// What executing each prepared statement of the template does.
    fn rebuild_prepared_effects(&mut self) {
        let mut effects = HashMap::with_capacity(self.working.prepared.len());
        for (name, statement) in &self.working.prepared {
            let effect = match (statement.origin, self.silent_effect(&statement.query)) {
                (PreparedOrigin::Sql, Effect::Prepare { body, .. }) => *body,
                (PreparedOrigin::Sql, _) => Effect::Unknown,
                (PreparedOrigin::Protocol, effect) => effect,
            };
            effects.insert(name.clone(), effect);
        }
        self.prepared_effects = effects;
    }

    /// Marks the template as unknown: the server did something the
    /// tracker could not follow.
    pub fn mark_unknown(&mut self) {
        self.probe_wanted = true;
        self.non_recoverable(NonRecoverable::Unclassified);
    }

    fn mark_mismatch(&mut self) {
        self.stats.tracker_mismatches.inc();
        self.mark_unknown();
    }

    fn non_recoverable(&mut self, kind: NonRecoverable) {
        if !self.replay.non_recoverable.contains(kind) {
            self.before_change();
            self.replay.non_recoverable.insert(kind);
            self.hash = None;
            self.stats.non_recoverable.inc();
        }
    }

    fn clear_non_recoverable(&mut self, kind: NonRecoverable) {
        if self.replay.non_recoverable.contains(kind) {
            self.before_change();
            self.replay.non_recoverable.remove(kind);
            self.hash = None;
        }
    }

    /// Takes the snapshots a rollback would need, before the first change
    /// since the transaction or savepoint began.
    fn before_change(&mut self) {
        let Some(tx) = &mut self.tx else {
            return;
        };
        let needs_snapshot = tx.start.is_none()
            || tx
                .savepoints
                .iter()
                .any(|savepoint| savepoint.state.is_none());
        if !needs_snapshot {
            return;
        }
        let snapshot = Snapshot {
            template: self.working.clone(),
            local_settings: self.replay.local_settings.clone(),
            non_recoverable: self.replay.non_recoverable,
            held_cursors: self.held_cursors.clone(),
            modes: TransactionModes {
                isolation: self.replay.isolation,
                read_only: self.replay.read_only,
                deferrable: self.replay.deferrable,
            },
        };
        for savepoint in &mut tx.savepoints {
            if savepoint.state.is_none() {
                savepoint.state = Some(snapshot.clone());
            }
        }
        if tx.start.is_none() {
            tx.start = Some(Box::new(snapshot));
        }
    }

    /// Changes the session-level template.
    fn change(&mut self, edit: impl FnOnce(&mut Template)) {
        self.before_change();
        edit(&mut self.working);
        self.dirty = true;
        self.hash = None;
    }

    fn set_local(&mut self, name: Bytes, value: Bytes) {
        self.before_change();
        self.replay.local_settings.insert(name, value);
        self.hash = None;
    }

    fn remove_local(&mut self, name: &[u8]) {
        if self.replay.local_settings.contains_key(name) {
            self.before_change();
            self.replay.local_settings.remove(name);
            self.hash = None;
        }
    }

    /// Ends the open transaction: commit or rollback.
    fn end_transaction(&mut self, commit: bool) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        if commit {
            for change in tx.pending_listen {
                self.apply_listen(change);
            }
        } else if let Some(start) = tx.start {
            self.restore(*start);
        }
        if !self.replay.local_settings.is_empty() {
            self.replay.local_settings.clear();
            self.hash = None;
        }
        self.replay
            .non_recoverable
            .remove(NonRecoverable::SnapshotImport);
        if !self.replay.savepoints.is_empty()
            || self.replay.isolation.is_some()
            || self.replay.read_only.is_some()
            || self.replay.deferrable.is_some()
        {
            self.replay.savepoints.clear();
            self.replay.isolation = None;
            self.replay.read_only = None;
            self.replay.deferrable = None;
            self.hash = None;
        }
    }

    /// Goes back to a snapshot; prepared statements are not
    /// transactional, so they stay as they are.
    fn restore(&mut self, snapshot: Snapshot) {
        let prepared = std::mem::take(&mut self.working.prepared);
        self.working = snapshot.template;
        self.working.prepared = prepared;
        self.dirty = true;
        self.replay.local_settings = snapshot.local_settings;
        for kind in TRANSACTIONAL {
            if snapshot.non_recoverable.contains(kind) {
                self.replay.non_recoverable.insert(kind);
            } else {
                self.replay.non_recoverable.remove(kind);
            }
        }
        self.held_cursors = snapshot.held_cursors;
        self.replay.isolation = snapshot.modes.isolation;
        self.replay.read_only = snapshot.modes.read_only;
        self.replay.deferrable = snapshot.modes.deferrable;
        self.hash = None;
    }

    fn apply_listen(&mut self, change: ListenChange) {
        match change {
            ListenChange::Listen(channel) => {
                if !self.working.listening.contains(&channel) {
                    self.change(|working| {
                        working.listening.insert(channel);
                    })
                }
            }
            ListenChange::Unlisten(channel) => {
                if self.working.listening.contains(&channel) {
                    self.change(|working| {
                        working.listening.remove(&channel);
                    })
                }
            }
            ListenChange::UnlistenAll => {
                if !self.working.listening.is_empty() {
                    self.change(|working| working.listening.clear())
                }
            }
        }
    }

    fn queue_listen(&mut self, change: ListenChange) {
        match &mut self.tx {
            Some(tx) => tx.pending_listen.push(change),
            None => self.apply_listen(change),
        }
    }

    fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::None | Effect::Reprise(_) => {}
            Effect::Set { name, value, local } => self.set(name, value.clone(), *local),
            Effect::Reset { name, local: true } => {
                self.set_local(name.clone(), Bytes::from_static(LOCAL_DEFAULT))
            }
            Effect::Reset { name, local: false } => {
                self.remove_local(name);
                if self.working.settings.contains_key(name) {
                    self.change(|working| {
                        working.settings.remove(name);
                    });
                }
            }
            Effect::ResetAll => {
                // RESET ALL skips what is at its default already: after SET
                // LOCAL … TO DEFAULT the session value comes back at the end
                // of the transaction.
                let mut defaults = Vec::new();
                let mut locals = Vec::new();
                for (name, value) in &self.replay.local_settings {
                    if is_identity_key(name) {
                        continue;
                    }
                    if value.as_ref() == LOCAL_DEFAULT {
                        defaults.push(name.clone());
                    } else {
                        locals.push(name.clone());
                    }
                }
                for name in locals {
                    self.remove_local(&name);
                }
                if self
                    .working
                    .settings
                    .keys()
                    .any(|name| !defaults.contains(name))
                {
                    self.change(|working| {
                        working.settings.retain(|name, _| defaults.contains(name))
                    });
                }
            }
            Effect::Role { role, local: true } => self.set_local(
                Bytes::from_static(LOCAL_ROLE),
                role.clone().unwrap_or_else(|| Bytes::from_static(b"none")),
            ),
            Effect::Role { role, local: false } => {
                self.remove_local(LOCAL_ROLE);
                if self.working.role != *role {
                    self.change(|working| working.role = role.clone());
                }
            }
            Effect::SessionAuthorization { user, local: true } => {
                self.set_local(
                    Bytes::from_static(LOCAL_AUTHORIZATION),
                    user.clone()
                        .unwrap_or_else(|| Bytes::from_static(LOCAL_DEFAULT)),
                );
                self.set_local(Bytes::from_static(LOCAL_ROLE), Bytes::from_static(b"none"));
            }
            Effect::SessionAuthorization { user, local: false } => {
                self.remove_local(LOCAL_AUTHORIZATION);
                self.remove_local(LOCAL_ROLE);
                // Setting the session user also drops the role.
                let user = match user {
                    Some(user) if self.working.startup.get(&b"user"[..]) == Some(user) => None,
                    other => other.clone(),
                };
                if self.working.session_authorization != user || self.working.role.is_some() {
                    self.change(|working| {
                        working.session_authorization = user;
                        working.role = None;
                    });
                }
            }
            // Also in an implicit block, which a later BEGIN may take over
            // with these characteristics.
            Effect::TransactionModes(modes) => self.transaction_modes(*modes),
            Effect::Begin(modes) => {
                // BEGIN inside an implicit block takes over the statements
                // before it; inside an explicit one it only warns, but its
                // modes still apply.
                self.tx
                    .get_or_insert_with(|| Transaction::new(true))
                    .explicit = true;
                self.transaction_modes(*modes);
            }
            Effect::Commit { chain } => self.finish(true, *chain),
            Effect::Rollback { chain } => self.finish(false, *chain),
            Effect::PrepareTransaction => self.finish(true, false),
            Effect::Savepoint(name) => {
                if let Some(tx) = &mut self.tx {
                    tx.savepoints.push(Savepoint {
                        name: name.clone(),
                        state: None,
                        pending_listen: tx.pending_listen.len(),
                    });
                    self.replay.savepoints.push(name.clone());
                    self.hash = None;
                }
            }
            Effect::Release(name) => {
                if let Some(tx) = &mut self.tx {
                    if let Some(at) = tx.savepoints.iter().rposition(|s| s.name == *name) {
                        // Ending a subtransaction, even by commit, puts
                        // back the read-only mode it started with.
                        if let Some(state) = &tx.savepoints[at].state {
                            self.replay.read_only = state.modes.read_only;
                        }
                        tx.savepoints.truncate(at);
                        self.replay.savepoints.truncate(at);
                        self.hash = None;
                    }
                }
            }
            Effect::RollbackTo(name) => self.rollback_to(name),
            Effect::Prepare {
                name,
                statement,
                body,
            } => {
                self.prepared_effects.insert(name.clone(), (**body).clone());
                // Re-created from the whole statement text, as sent.
                let prepared = PreparedStatement {
                    origin: PreparedOrigin::Sql,
                    query: statement.clone(),
                    param_types: Vec::new(),
                };
                self.change(|working| {
                    working.prepared.insert(name.clone(), prepared);
                });
            }
            Effect::Deallocate(Some(name)) => self.closed_statement(name),
            Effect::Deallocate(None) => {
                self.prepared_effects.clear();
                if !self.working.prepared.is_empty() {
                    self.change(|working| working.prepared.clear());
                }
            }
            Effect::Execute(name) => match self.prepared_effects.get(name).cloned() {
                Some(Effect::None) => {}
                Some(Effect::Execute(_)) | None => self.mark_unknown(),
                Some(effect) => self.apply(&effect),
            },
            Effect::Listen(channel) => self.queue_listen(ListenChange::Listen(channel.clone())),
            Effect::Unlisten(Some(channel)) => {
                self.queue_listen(ListenChange::Unlisten(channel.clone()))
            }
            Effect::Unlisten(None) => self.queue_listen(ListenChange::UnlistenAll),
            Effect::Discard(Discard::All) => {
                self.discard_all();
                // It cannot run in a transaction block, and the server
                // commits it at once: a later error in the same
                // extended-protocol batch does not undo it.
                if self.tx.as_ref().is_some_and(|tx| !tx.explicit) {
                    self.end_transaction(true);
                }
            }
            Effect::Discard(Discard::Temp) => {
                self.clear_non_recoverable(NonRecoverable::TempObjects)
            }
            Effect::Discard(Discard::Plans | Discard::Sequences) => {}
            Effect::DeclareHold(name) => {
                self.before_change();
                self.held_cursors.insert(name.clone());
                self.non_recoverable(NonRecoverable::HoldCursors);
            }
            Effect::Close(name) => self.close_cursors(name.as_ref()),
            Effect::NonRecoverable(kind) => self.non_recoverable(*kind),
            Effect::SetUnknown(name) => {
                self.probe_names.insert(name.clone());
                self.mark_unknown();
            }
            Effect::Drop => {
                if self
                    .replay
                    .non_recoverable
                    .contains(NonRecoverable::TempObjects)
                {
                    self.probe_wanted = true;
                }
            }
            Effect::AdvisoryUnlockAll => self.clear_non_recoverable(NonRecoverable::AdvisoryLocks),
            Effect::Credential => {
                self.unreplayable = true;
                self.stats.credential_statements.inc();
            }
            Effect::Several(effects) => {
                for effect in effects {
                    self.apply(effect);
                }
            }
            Effect::Unknown => self.mark_unknown(),
        }
    }

    fn set(&mut self, name: &Bytes, value: Bytes, local: bool) {
        if local {
            self.set_local(name.clone(), value);
            return;
        }
        self.remove_local(name);
        if self.working.settings.get(name) != Some(&value) {
            self.change(|working| {
                working.settings.insert(name.clone(), value);
            });
        }
    }

    fn transaction_modes(&mut self, modes: TransactionModes) {
        self.before_change();
        let replay = &mut self.replay;
        if modes.isolation.is_some() {
            replay.isolation = modes.isolation;
        }
        if modes.read_only.is_some() {
            replay.read_only = modes.read_only;
        }
        if modes.deferrable.is_some() {
            replay.deferrable = modes.deferrable;
        }
        self.hash = None;
    }

    /// COMMIT / ROLLBACK, with AND CHAIN starting the next transaction
    /// with the same characteristics.
    fn finish(&mut self, commit: bool, chain: bool) {
        let failed = self.tx.as_ref().is_some_and(|tx| tx.failed);
        let current = TransactionModes {
            isolation: self.replay.isolation,
            read_only: self.replay.read_only,
            deferrable: self.replay.deferrable,
        };
        let modes = match &self.tx {
            // An error outside any savepoint aborted the transaction at
            // once, undoing the characteristics set in it: the chained
            // transaction starts from what was left.
            Some(tx) if tx.failed && tx.savepoints.is_empty() => tx.chained,
            // A rollback (COMMIT of a failed transaction is one) first
            // unwinds the open savepoints, each putting back the read-only
            // mode it started with.
            Some(tx) if !commit || tx.failed => match tx.savepoints.first() {
                Some(Savepoint {
                    state: Some(state), ..
                }) => TransactionModes {
                    read_only: state.modes.read_only,
                    ..current
                },
                _ => current,
            },
            _ => current,
        };
        self.end_transaction(commit && !failed);
        if chain {
            let mut tx = Transaction::new(true);
            tx.chained = modes;
            self.tx = Some(tx);
            self.transaction_modes(modes);
        }
    }

    fn rollback_to(&mut self, name: &[u8]) {
        let Some(tx) = &mut self.tx else {
            return;
        };
        let Some(at) = tx.savepoints.iter().rposition(|s| s.name == name) else {
            return;
        };
        tx.failed = false;
        tx.savepoints.truncate(at + 1);
        self.replay.savepoints.truncate(at + 1);
        let savepoint = &mut tx.savepoints[at];
        tx.pending_listen.truncate(savepoint.pending_listen);
        // The savepoint stays, so its snapshot is needed again.
        if let Some(state) = savepoint.state.clone() {
            self.restore(state);
        }
        self.hash = None;
    }

    /// CLOSE: a rollback does not bring a closed cursor back, so it leaves
    /// the snapshots too.
    fn close_cursors(&mut self, name: Option<&Bytes>) {
        let close = |cursors: &mut BTreeSet<Bytes>| match name {
            Some(name) => {
                cursors.remove(name);
            }
            None => cursors.clear(),
        };
        close(&mut self.held_cursors);
        if self.held_cursors.is_empty() {
            self.clear_non_recoverable(NonRecoverable::HoldCursors);
        }
        let Some(tx) = &mut self.tx else {
            return;
        };
        let savepoints = tx.savepoints.iter_mut().filter_map(|s| s.state.as_mut());
        for snapshot in tx
            .start
            .iter_mut()
            .map(|start| &mut **start)
            .chain(savepoints)
        {
            close(&mut snapshot.held_cursors);
            if snapshot.held_cursors.is_empty() {
                snapshot.non_recoverable.remove(NonRecoverable::HoldCursors);
            }
        }
    }

    /// DISCARD ALL: back to the startup template, nothing held.
    fn discard_all(&mut self) {
        let startup = self.startup.template().as_ref().clone();
        self.prepared_effects.clear();
        self.held_cursors.clear();
        // Whatever an unclassified statement changed, DISCARD ALL resets
        // too, but for a loaded library.
        for kind in [
            NonRecoverable::TempObjects,
            NonRecoverable::HoldCursors,
            NonRecoverable::AdvisoryLocks,
            NonRecoverable::Unclassified,
        ] {
            self.clear_non_recoverable(kind);
        }
        if self.replay.local_settings.is_empty() && self.working == startup {
            return;
        }
        self.replay.local_settings.clear();
        self.change(|working| *working = startup);
    }
}

/// The server's record of a prepared statement is the one the tracker
/// knows: the same Parse text, or a record of the same PREPARE (the server
/// keeps the statement with its terminator and comments).
fn same_statement(known: &PreparedStatement, server: &PreparedStatement) -> bool {
    known.origin == server.origin
        && match known.origin {
            PreparedOrigin::Protocol => known.query == server.query,
            PreparedOrigin::Sql => server
                .query
                .windows(known.query.len().max(1))
                .any(|window| window == known.query),
        }
}

/// Local-setting keys that hold identity, which RESET ALL leaves alone.
fn is_identity_key(name: &[u8]) -> bool {
    name == LOCAL_ROLE || name == LOCAL_AUTHORIZATION
}

fn lex_options(reported: &HashMap<Bytes, Bytes>) -> LexOptions {
    let scs = reported
        .get(&b"standard_conforming_strings"[..])
        .is_none_or(|value| value.eq_ignore_ascii_case(b"on"));
    let encoding = reported
        .get(&b"client_encoding"[..])
        .map(|value| String::from_utf8_lossy(value).into_owned())
        .unwrap_or_default();
    LexOptions::for_session(scs, &encoding)
}

impl Transaction {
    fn new(explicit: bool) -> Self {
        Transaction {
            explicit,
            failed: false,
            start: None,
            pending_listen: Vec::new(),
            savepoints: Vec::new(),
            chained: TransactionModes::default(),
        }
    }
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("template", &self.template.id())
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Tracker {
        Tracker::new(
            Arc::new(Registry::new()),
            Arc::new(Stats::default()),
            [(&b"user"[..], &b"app"[..]), (b"database", b"db")],
            [
                (&b"DateStyle"[..], &b"ISO, MDY"[..]),
                (b"client_encoding", b"UTF8"),
            ],
        )
    }

    /// Runs a simple query whose statements all succeed.
    fn run(tracker: &mut Tracker, sql: &str, status: u8) {
        for effect in tracker.query_effects(sql.as_bytes()) {
            tracker.statement_done(&effect);
        }
        tracker.ready(status);
    }

    fn setting(tracker: &Tracker, name: &str) -> Option<String> {
        tracker
            .template()
            .settings
            .get(name.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn session_settings_persist_and_rollback_undoes_them() {
        let mut t = tracker();
        run(&mut t, "SET work_mem = '8MB'", b'I');
        assert_eq!(setting(&t, "work_mem").as_deref(), Some("8MB"));
        run(&mut t, "BEGIN; SET work_mem = '16MB'", b'T');
        assert_eq!(setting(&t, "work_mem").as_deref(), Some("16MB"));
        run(&mut t, "ROLLBACK", b'I');
        assert_eq!(setting(&t, "work_mem").as_deref(), Some("8MB"));
        let ready = t.ready(b'I');
        assert!(ready.safe);
    }

    #[test]
    fn an_error_in_an_implicit_block_undoes_the_whole_string() {
        let mut t = tracker();
        let effects = t.query_effects(b"SET a.x = 1; SELECT 1/0");
        t.statement_done(&effects[0]);
        t.statement_failed();
        t.ready(b'I');
        assert_eq!(setting(&t, "a.x"), None);
    }

    #[test]
    fn set_local_ends_with_the_transaction() {
        let mut t = tracker();
        run(&mut t, "BEGIN; SET LOCAL a.x = 1", b'T');
        assert!(!t.ready(b'T').safe);
        run(&mut t, "COMMIT", b'I');
        assert!(t.replay_state().local_settings.is_empty());
        assert!(t.ready(b'I').safe);
    }

    #[test]
    fn savepoints_restore_their_state() {
        let mut t = tracker();
        run(
            &mut t,
            "BEGIN; SET a.x = 1; SAVEPOINT s; SET a.x = 2; LISTEN c",
            b'T',
        );
        run(&mut t, "ROLLBACK TO s", b'T');
        assert_eq!(setting(&t, "a.x").as_deref(), Some("1"));
        run(&mut t, "COMMIT", b'I');
        assert_eq!(setting(&t, "a.x").as_deref(), Some("1"));
        assert!(t.template().listening.is_empty());
    }

    #[test]
    fn listen_applies_at_commit_and_prepared_survive_rollback() {
        let mut t = tracker();
        run(&mut t, "BEGIN; LISTEN a; PREPARE p AS SELECT 1", b'T');
        assert!(t.template().listening.is_empty());
        run(&mut t, "ROLLBACK", b'I');
        assert!(t.template().listening.is_empty());
        assert!(t.prepared_effect(b"p").is_some());
        run(&mut t, "LISTEN a", b'I');
        assert!(t.template().listening.contains(&b"a"[..]));
    }

    #[test]
    fn parameter_status_canonicalizes_and_equal_states_share_a_template() {
        // As the server answers: CommandComplete, ParameterStatus,
        // ReadyForQuery.
        let set_and_report = |t: &mut Tracker, sql: &str| {
            for effect in t.query_effects(sql.as_bytes()) {
                t.statement_done(&effect);
            }
            t.parameter_status(b"DateStyle", b"German, DMY");
            t.ready(b'I');
        };
        let mut a = tracker();
        set_and_report(&mut a, "SET DateStyle = german");
        assert_eq!(setting(&a, "datestyle").as_deref(), Some("German, DMY"));
        let mut b = tracker();
        set_and_report(&mut b, "SET datestyle = 'German, DMY'");
        assert_eq!(a.template_id(), b.template_id());
        assert_eq!(a.state_hash(), b.state_hash());
    }

    #[test]
    fn non_recoverable_state_blocks_safe_points_until_cleared() {
        let mut t = tracker();
        run(&mut t, "CREATE TEMP TABLE t (a int)", b'I');
        assert!(!t.ready(b'I').safe);
        run(&mut t, "DISCARD TEMP", b'I');
        assert!(t.ready(b'I').safe);
        run(&mut t, "SELECT pg_advisory_lock(1)", b'I');
        assert!(!t.ready(b'I').safe);
        run(&mut t, "DISCARD ALL", b'I');
        assert!(t.ready(b'I').safe);
        run(&mut t, "DO $$ BEGIN END $$", b'I');
        assert!(!t.ready(b'I').safe);
    }

    #[test]
    fn chaining_after_an_abort_starts_from_the_defaults() {
        let mut t = tracker();
        let fail = |t: &mut Tracker| {
            t.statement_failed();
            t.ready(b'E');
        };
        run(
            &mut t,
            "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY",
            b'T',
        );
        fail(&mut t);
        run(&mut t, "ROLLBACK AND CHAIN", b'T');
        assert_eq!(t.replay_state().isolation, None);
        assert_eq!(t.replay_state().read_only, None);
        // Inside a savepoint only the subtransaction aborts.
        run(&mut t, "ROLLBACK; BEGIN READ ONLY; SAVEPOINT a", b'T');
        fail(&mut t);
        run(&mut t, "COMMIT AND CHAIN", b'T');
        assert_eq!(t.replay_state().read_only, Some(true));
        // What the chain gave, an abort leaves.
        fail(&mut t);
        run(&mut t, "ROLLBACK AND CHAIN", b'T');
        assert_eq!(t.replay_state().read_only, Some(true));
        // A rollback unwinds the savepoints down to the outermost.
        let sql = "ROLLBACK; BEGIN; SAVEPOINT b; SET TRANSACTION READ ONLY; SAVEPOINT c";
        run(&mut t, sql, b'T');
        fail(&mut t);
        run(&mut t, "ROLLBACK AND CHAIN", b'T');
        assert_eq!(t.replay_state().read_only, None);
        // COMMIT keeps what the savepoints set.
        run(&mut t, "SAVEPOINT b; SET TRANSACTION READ ONLY", b'T');
        run(&mut t, "COMMIT AND CHAIN", b'T');
        assert_eq!(t.replay_state().read_only, Some(true));
    }

    #[test]
    fn transaction_modes_follow_savepoints_and_nested_begins() {
        let mut t = tracker();
        run(
            &mut t,
            "BEGIN; SAVEPOINT a; SET TRANSACTION READ ONLY",
            b'T',
        );
        assert_eq!(t.replay_state().read_only, Some(true));
        run(&mut t, "ROLLBACK TO a", b'T');
        assert_eq!(t.replay_state().read_only, None);
        run(&mut t, "BEGIN READ ONLY", b'T');
        assert_eq!(t.replay_state().read_only, Some(true));
        run(&mut t, "ROLLBACK", b'I');
        run(
            &mut t,
            "BEGIN; SAVEPOINT a; SET TRANSACTION READ ONLY",
            b'T',
        );
        run(&mut t, "RELEASE a", b'T');
        assert_eq!(t.replay_state().read_only, None);
        run(&mut t, "ROLLBACK", b'I');
        run(
            &mut t,
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN",
            b'T',
        );
        assert_eq!(
            t.replay_state().isolation,
            Some(crate::template::IsolationLevel::Serializable)
        );
    }

    #[test]
    fn a_reported_default_keeps_the_local_default_marker() {
        let mut t = tracker();
        run(&mut t, "BEGIN; SET LOCAL DateStyle TO DEFAULT", b'T');
        t.parameter_status(b"DateStyle", b"ISO, MDY");
        assert_eq!(
            t.replay_state().local_settings.get(&b"datestyle"[..]),
            Some(&Bytes::from_static(LOCAL_DEFAULT))
        );
    }

    #[test]
    fn reported_gucs_take_the_server_spelling_without_a_report() {
        let mut t = tracker();
        run(&mut t, "SET DateStyle = 'German, DMY'", b'I');
        t.parameter_status(b"DateStyle", b"German, DMY");
        // Unchanged, so not reported again.
        run(&mut t, "SET datestyle = german", b'I');
        assert_eq!(setting(&t, "datestyle").as_deref(), Some("German, DMY"));
        run(&mut t, "BEGIN; SET LOCAL datestyle = german", b'T');
        assert_eq!(
            t.replay_state().local_settings.get(&b"datestyle"[..]),
            Some(&Bytes::from_static(b"German, DMY"))
        );
    }

    #[test]
    fn discard_all_commits_at_once_in_a_batch() {
        let mut t = tracker();
        run(&mut t, "SET a.x = 1", b'I');
        // Execute DISCARD ALL, Execute SET, Execute failing, Sync.
        for sql in ["DISCARD ALL", "SET a.y = 2"] {
            let effect = t.statement_effect(sql.as_bytes());
            t.statement_done(&effect);
        }
        t.statement_failed();
        t.ready(b'I');
        assert_eq!(t.template(), t.startup_template().as_ref());
    }

    #[test]
    fn a_rollback_does_not_reopen_a_closed_cursor() {
        let mut t = tracker();
        run(&mut t, "DECLARE c CURSOR WITH HOLD FOR SELECT 1", b'I');
        assert!(!t.ready(b'I').safe);
        run(&mut t, "BEGIN; SAVEPOINT a; CLOSE c", b'T');
        run(&mut t, "ROLLBACK TO a", b'T');
        run(&mut t, "ROLLBACK", b'I');
        assert!(t.ready(b'I').safe);
        // A cursor declared in a rolled-back transaction is gone too.
        run(
            &mut t,
            "BEGIN; DECLARE d CURSOR WITH HOLD FOR SELECT 1",
            b'T',
        );
        run(&mut t, "ROLLBACK", b'I');
        assert!(t.ready(b'I').safe);
    }

    #[test]
    fn reset_all_skips_what_set_local_put_back_to_its_default() {
        let mut t = tracker();
        run(&mut t, "SET a.x = 1; SET a.y = 2", b'I');
        run(
            &mut t,
            "BEGIN; SET LOCAL a.x TO DEFAULT; SET LOCAL a.y = 3",
            b'T',
        );
        run(&mut t, "RESET ALL", b'T');
        run(&mut t, "COMMIT", b'I');
        assert_eq!(setting(&t, "a.x").as_deref(), Some("1"));
        assert_eq!(setting(&t, "a.y"), None);
    }

    #[test]
    fn session_authorization_drops_the_role() {
        let mut t = tracker();
        run(&mut t, "SET ROLE r", b'I');
        assert_eq!(t.template().role.as_deref(), Some(&b"r"[..]));
        run(&mut t, "SET SESSION AUTHORIZATION other", b'I');
        assert_eq!(t.template().role, None);
        assert_eq!(
            t.template().session_authorization.as_deref(),
            Some(&b"other"[..])
        );
        run(&mut t, "RESET SESSION AUTHORIZATION", b'I');
        assert_eq!(t.template(), t.startup_template().as_ref());
    }

    fn server_prepared(origin: PreparedOrigin, query: &str) -> PreparedStatement {
        PreparedStatement {
            origin,
            query: Bytes::copy_from_slice(query.as_bytes()),
            param_types: Vec::new(),
        }
    }

    #[test]
    fn a_probe_vouches_only_for_what_it_can_recreate() {
        let mut t = tracker();
        run(
            &mut t,
            "PREPARE known AS SELECT 1; DO $$ BEGIN END $$",
            b'I',
        );
        assert!(t.wants_probe());
        let mut truth = ServerTruth {
            session_user: Bytes::from_static(b"app"),
            ..ServerTruth::default()
        };
        truth.prepared.insert(
            Bytes::from_static(b"known"),
            server_prepared(PreparedOrigin::Sql, "PREPARE known AS SELECT 1;"),
        );
        let ready = t.resync(truth.clone());
        assert!(ready.safe);
        assert!(!t.wants_probe());
        // The tracker's own text, not the server's record with its `;`.
        assert_eq!(
            t.template().prepared[&b"known"[..]].query.as_ref(),
            b"PREPARE known AS SELECT 1"
        );

        // A record that is not one PREPARE of that name cannot re-create
        // the statement.
        run(&mut t, "DO $$ BEGIN END $$", b'I');
        truth.prepared.insert(
            Bytes::from_static(b"other"),
            server_prepared(PreparedOrigin::Sql, "PREPARE other AS SELECT 1; SELECT 2"),
        );
        assert!(!t.resync(truth).safe);
        assert!(t
            .replay_state()
            .non_recoverable
            .contains(NonRecoverable::Unclassified));
        assert!(!t.template().prepared.contains_key(&b"other"[..]));
    }

    #[test]
    fn a_probe_takes_the_session_user_role_and_custom_settings() {
        let mut t = tracker();
        run(&mut t, "SET app.kept = ''; DO $$ BEGIN END $$", b'I');
        let mut truth = ServerTruth {
            session_user: Bytes::from_static(b"admin"),
            role: Some(Bytes::from_static(b"reader")),
            ..ServerTruth::default()
        };
        truth
            .custom
            .insert(Bytes::from_static(b"app.kept"), Some(Bytes::new()));
        // A placeholder once reset reads as '' too: not a setting.
        truth
            .custom
            .insert(Bytes::from_static(b"app.reset"), Some(Bytes::new()));
        truth.custom.insert(Bytes::from_static(b"app.gone"), None);
        assert!(t.resync(truth).safe);
        let template = t.template();
        assert_eq!(
            template.session_authorization.as_deref(),
            Some(&b"admin"[..])
        );
        assert_eq!(template.role.as_deref(), Some(&b"reader"[..]));
        assert_eq!(setting(&t, "app.kept").as_deref(), Some(""));
        assert_eq!(setting(&t, "app.reset"), None);
        assert_eq!(setting(&t, "app.gone"), None);
    }
}
