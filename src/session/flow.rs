//! What the server owes the client: every request in flight, matched with
//! the server's answers message by message.
//!
//! The matching is what lets the [tracker](crate::state::Tracker) apply a
//! statement's effect when, and only if, the server completes it, what
//! finds request boundaries and safe points, and what lets Reprise answer
//! its own statements (`SHOW reprise.…`, `SET reprise.template`) at their
//! place in the stream, in the simple and the extended protocol, even when
//! the client pipelines.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::proxy::Shared;
use crate::replay::guard;
use crate::replay::outcome::{self, CommitMark, ServerIdentity};
use crate::replay::risk::{self, StatementRisk};
use crate::session::replay_log::{Completed, ReplayLog};
use crate::state::effect::{isolation_name, Discard};
use crate::state::lexer::LexOptions;
use crate::state::resync::{self, ServerTruth};
use crate::state::tracker::LOCAL_DEFAULT;
use crate::state::{Effect, RepriseCommand, Tracker};
use crate::stats::Stats;
use crate::template::{
    PreparedOrigin, RestorePlan, StateHash, Template, TemplateId, TransactionStatus,
};
use crate::wire::backend as server_msg;
use crate::wire::frame;
use crate::wire::frontend::{self, FrontendKind};
use crate::wire::reply::{self, sqlstate, Severity};

/// What to do with a client frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// Send it to the server.
    Forward,
    /// Do not send it: Reprise answers it, or it is skipped.
    Drop,
    /// Leave it, and everything after it, unread until nothing is in
    /// flight.
    Hold,
    /// Send what the flow queued for the server first, then this frame.
    Precede,
}

/// What to do with a server frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerStep {
    Forward,
    /// An answer to Reprise's own request: the client never sees it.
    Consume,
}

/// Commands, boundaries and safe points, for the journal.
#[derive(Clone, Debug)]
pub enum StateEvent {
    /// The server answered a command in full; `safe_point` names the
    /// template when the state after it is a safe point.
    Command {
        completed: Completed,
        safe_point: Option<TemplateId>,
    },
    /// ReadyForQuery with nothing in flight.
    Boundary { state_hash: StateHash },
    /// A boundary where the template alone is the session's state.
    SafePoint {
        template: TemplateId,
        state_hash: StateHash,
    },
}

/// One row of a `SHOW reprise.…` answer.
type Row = Vec<Vec<u8>>;

/// What a client-side name (statement or portal) stands for.
#[derive(Clone, Debug)]
enum Target {
    /// A server object; the effect its execution has, what running it
    /// again could do, and whether Reprise may run it inside a
    /// transaction block of its own (see [`risk::wrappable`]).
    Server(Effect, StatementRisk, bool),
    /// A statement of Reprise's own.
    Local(RepriseCommand),
}

/// Statement or portal names and what they stand for. The unnamed one,
/// which most drivers use for every portal, is kept apart from the map:
/// the hot path then touches no hash table for it. Named ones are looked
/// up on every Bind, with foldhash: much cheaper than SipHash on short
/// names, and still seeded at random, so a client cannot aim collisions.
#[derive(Debug, Default)]
struct Names {
    unnamed: Option<Target>,
    named: HashMap<Bytes, Target, foldhash::fast::RandomState>,
}

impl Names {
    fn get(&self, name: &[u8]) -> Option<&Target> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    fn contains(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    fn insert(&mut self, name: &[u8], target: Target) -> Option<Target> {
        if name.is_empty() {
            self.unnamed.replace(target)
        } else {
            self.named.insert(Bytes::copy_from_slice(name), target)
        }
    }

    fn remove(&mut self, name: &[u8]) -> Option<Target> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    /// Keeps the unnamed entry and the named ones `keep` accepts.
    fn retain_named(&mut self, keep: impl Fn(&Target) -> bool) {
        self.named.retain(|_, target| keep(target));
    }
}

/// One request in flight, in the order the server answers.
#[derive(Debug)]
enum Pending {
    /// A simple Query: one effect per statement, applied at each
    /// CommandComplete; ends with ReadyForQuery.
    Query(VecDeque<Effect>),
    Parse {
        name: Bytes,
        query: Bytes,
        param_types: Vec<u32>,
        /// What the name stood for before: a Parse the server refuses or
        /// skips leaves the name as it was.
        previous: Option<Box<Target>>,
    },
    Bind,
    Describe,
    Execute(Effect),
    Close {
        statement: Option<Bytes>,
    },
    Sync,
    /// FunctionCall: FunctionCallResponse, then ReadyForQuery.
    Function(Effect),
    /// Answered by Reprise when its turn comes.
    Local(Answer),
    /// Reprise's own request to move the session into another template.
    Switch(Box<Switch>),
    /// A request that fails on purpose, so that the server abandons the
    /// rest of an extended batch as PostgreSQL would after an error.
    Abort,
    /// Reprise's own question ahead of a COMMIT: the transaction id (see
    /// [`outcome`]).
    Xid(Box<XidQuestion>),
    /// Reprise's own BEGIN ahead of an autocommit write it wraps (see
    /// [`Wrap`]): answered by ReadyForQuery (simple protocol) or by the
    /// CloseComplete messages still to come (extended).
    WrapBegin {
        closes_left: u8,
    },
    /// Reprise's own COMMIT after the wrapped request: its ReadyForQuery
    /// is the one the client gets.
    WrapCommit,
    /// Reprise's own reading of the session state (see
    /// [`resync`](crate::state::resync)).
    Probe(Box<Probe>),
    /// The client ended COPY data (CopyDone or CopyFail) before the server
    /// had said it was in copy-in mode: the Syncs before this mark reach
    /// the server in copy-in mode, where it ignores them.
    CopyEnd,
}

#[derive(Debug)]
struct XidQuestion {
    /// The replay-log command of the COMMIT.
    seq: u64,
    /// The commit-guard token the question inserts, if it does.
    token: Option<String>,
    /// The transaction id, whether the guard row went in, and the server.
    answer: Option<(Option<u64>, bool, Option<ServerIdentity>)>,
    failed: bool,
    /// Asked in the extended protocol, inside the client's batch: the
    /// CloseComplete messages still to come (portal, then statement) end
    /// it, not a ReadyForQuery. Zero for a simple Query.
    closes_left: u8,
    /// Asked for an autocommit write Reprise wrapped.
    wrapped: bool,
}

/// An autocommit statement that may write, run inside a transaction
/// block of Reprise's own (`wrap_autocommit_writes`): BEGIN ahead of it,
/// the transaction-id question and COMMIT after it, all in the same
/// write. The client sees the answer autocommit gives: the request's
/// ReadyForQuery waits for the COMMIT's, and so does the CommandComplete
/// of a simple Query, which PostgreSQL sends only after the implicit
/// commit (an error at commit replaces it).
#[derive(Debug)]
struct Wrap {
    /// A simple Query; otherwise an extended batch, up to its Sync.
    simple: bool,
    /// The batch's Sync was sent, and the COMMIT after it.
    synced: bool,
    /// The server took the BEGIN.
    begun: bool,
    /// Something in the batch may have ended the block early (a
    /// transaction statement of the client's, a Query inside the batch):
    /// the question's answer proves nothing.
    void: bool,
    /// The CommandComplete of a simple Query, held for the COMMIT.
    held: Option<Bytes>,
    /// The client's request is answered up to its ReadyForQuery, whose
    /// status is this.
    answered: Option<u8>,
    /// The COMMIT failed; its error went to the client.
    commit_failed: bool,
}

#[derive(Debug, Default)]
struct Probe {
    truth: ServerTruth,
    failed: bool,
}

#[derive(Debug)]
struct Switch {
    readies_left: u32,
    target: Template,
    error: Option<Bytes>,
    /// Simple protocol: the answer ends with ReadyForQuery.
    with_ready: bool,
    /// The client asked for it and gets an answer; otherwise it is a
    /// restore of Reprise's own (see [`Flow::restore`]).
    answer: bool,
}

/// An answer Reprise composes when its turn comes, from the state at that
/// moment.
#[derive(Debug)]
enum Answer {
    Ready,
    Bytes(BytesMut),
    Show {
        name: Bytes,
        describe: bool,
        with_ready: bool,
    },
    /// Describe of a local statement (`statement`) or portal.
    Describe {
        command: RepriseCommand,
        statement: bool,
    },
}

/// Both directions of one session's protocol, with its tracked state.
pub struct Flow {
    pub tracker: Tracker,
    /// The session's span: the relay runs outside it (entering a span on
    /// every poll costs more than the rare warning that needs it).
    span: tracing::Span,
    shared: Arc<Shared>,
    /// Where this flow counts what it sees: the proxy's counters, or a
    /// scratch set for a replay that must not count twice.
    stats: Arc<Stats>,
    /// Off: a plain relay that only finds boundaries.
    tracking: bool,
    /// Read the state back from the server when the tracker cannot vouch
    /// for it; off after a probe fails.
    probes: bool,
    /// The server is in copy-in mode for an extended-protocol Execute and
    /// the client has not ended the data yet: a Sync now is ignored by the
    /// server, so it awaits no answer.
    copy_in: bool,
    queue: VecDeque<Pending>,
    /// What was sent since the last safe point.
    pub replay: ReplayLog,
    /// The message being handled carries a credential.
    credential: bool,
    /// What the statements the message being handled runs could do if
    /// run again.
    risks: Vec<StatementRisk>,
    /// Requests in flight when tracking is off.
    awaiting_ready: u32,
    status: u8,
    /// Extended-protocol messages sent to the server since the last Sync.
    unsynced: bool,
    /// Extended-protocol messages answered by Reprise since the last Sync.
    local_since_sync: bool,
    /// Reprise refused a message of an extended batch: the rest of it, up
    /// to Sync, is skipped.
    skip_to_sync: bool,
    statements: Names,
    portals: Names,
    /// Local answers ready to go to the client now, after what was
    /// forwarded before them.
    pub to_client: BytesMut,
    /// Requests of Reprise's own for the server, after what was forwarded
    /// before them.
    pub to_server: BytesMut,
    pub events: Vec<StateEvent>,
    /// Why the last [`restore`](Flow::restore) failed.
    pub restore_error: Option<String>,
    /// The template of the last safe point, held so that a restore can
    /// still find it after the session moved on.
    safe_template: Option<(TemplateId, Arc<Template>)>,
    /// Ask for the transaction id ahead of each COMMIT.
    learn_commit_xids: bool,
    /// The commit guard of the current server connection's database.
    guard: Option<Arc<guard::Slot>>,
    /// A statement that may write was sent since the session was last
    /// idle: its transaction may get its id only at COMMIT (NOTIFY does),
    /// so the question ahead of the COMMIT makes the server assign one.
    may_have_written: bool,
    /// The server of the current connection, once a COMMIT asked.
    server_identity: Option<ServerIdentity>,
    /// What the last question ahead of a COMMIT learnt.
    commit_mark: Option<CommitMark>,
    /// Wrap autocommit writes in a transaction block (see [`Wrap`]).
    wrap_writes: bool,
    wrap: Option<Wrap>,
    /// What the client is still owed for a wrapped request whose answer
    /// the lost server connection held back (see
    /// [`Flow::forget_own_requests`]).
    /// `Some(None)`: the rest of that answer was lost with the
    /// connection.
    wrapped_tail: Option<Option<BytesMut>>,
    /// An Execute went to the server since the last Sync.
    executed_since_sync: bool,
    /// Requests of Reprise's own for the server, after the client frame
    /// being handled.
    pub follow: BytesMut,
}

impl Flow {
    pub fn new(
        tracker: Tracker,
        shared: Arc<Shared>,
        stats: Arc<Stats>,
        tracking: bool,
        probes: bool,
        status: u8,
        max_replay_log: usize,
    ) -> Self {
        Flow {
            tracker,
            span: tracing::Span::current(),
            shared,
            stats,
            tracking,
            probes,
            copy_in: false,
            queue: VecDeque::new(),
            replay: ReplayLog::new(max_replay_log),
            credential: false,
            risks: Vec::new(),
            awaiting_ready: 0,
            status,
            unsynced: false,
            local_since_sync: false,
            skip_to_sync: false,
            statements: Names::default(),
            portals: Names::default(),
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
            events: Vec::new(),
            restore_error: None,
            safe_template: None,
            learn_commit_xids: false,
            guard: None,
            may_have_written: false,
            server_identity: None,
            commit_mark: None,
            wrap_writes: false,
            wrap: None,
            wrapped_tail: None,
            executed_since_sync: false,
            follow: BytesMut::new(),
        }
    }

    /// Run autocommit writes inside a transaction block of Reprise's own,
    /// so that a lost answer to one is settled like a COMMIT's. Needs
    /// [`learn_commit_xids`](Flow::learn_commit_xids).
    pub fn wrap_autocommit_writes(&mut self, on: bool) {
        self.wrap_writes = on;
    }

    /// Ask for the transaction id ahead of every COMMIT of an explicit
    /// transaction, so that a lost answer to it can be settled.
    pub fn learn_commit_xids(&mut self, on: bool) {
        self.learn_commit_xids = on;
    }

    /// Inserts commit-guard rows ahead of COMMITs while `slot` is ready
    /// (none: never).
    pub fn use_guard(&mut self, slot: Option<Arc<guard::Slot>>) {
        self.guard = slot;
    }

    /// What was learnt before the COMMIT of replay-log command `seq`, if
    /// that COMMIT went to the current server connection.
    pub fn commit_mark(&self, seq: u64) -> Option<&CommitMark> {
        self.commit_mark.as_ref().filter(|mark| mark.seq == seq)
    }

    /// The replay-log command whose COMMIT waits behind a question for
    /// its transaction id that the server has not answered yet.
    pub fn unanswered_xid_question(&self) -> Option<u64> {
        self.queue.iter().find_map(|pending| match pending {
            Pending::Xid(question) => Some(question.seq),
            _ => None,
        })
    }

    /// What is known of the COMMIT behind a question the lost connection
    /// left unanswered, when the question inserts a guard token: the
    /// token (found in the guard table, it proves the commit), and the
    /// server when an earlier question learnt it.
    pub fn unanswered_commit_mark(&self) -> Option<CommitMark> {
        let question = self.queue.iter().find_map(|pending| match pending {
            Pending::Xid(question) => Some(question),
            _ => None,
        })?;
        // A wrap the client's own statements may have ended early proves
        // nothing; an unanswered BEGIN did not fail (it would have said
        // so), so either all of it ran or none.
        if question.wrapped && self.wrap.as_ref().is_none_or(|wrap| wrap.void) {
            return None;
        }
        Some(CommitMark {
            seq: question.seq,
            xid: None,
            identity: self.server_identity.clone(),
            guard: Some(question.token.clone()?),
            answered: false,
        })
    }

    /// The session moved to another server connection: what was learnt
    /// about the old one no longer holds.
    pub fn server_changed(&mut self) {
        self.server_identity = None;
        self.commit_mark = None;
    }

    /// The template and state hash a new server connection must be brought
    /// to before the replay log runs on it: those of the last safe point,
    /// or the startup template (hash unknown) before the first.
    pub fn restore_target(&self) -> Option<(Arc<Template>, Option<StateHash>)> {
        match self.replay.last_safe_point() {
            None => Some((Arc::clone(self.tracker.startup_template()), None)),
            Some((id, hash)) => match &self.safe_template {
                Some((held, template)) if *held == id => Some((Arc::clone(template), Some(hash))),
                _ => None,
            },
        }
    }

    /// Keeps the template of the last safe point registered.
    fn hold_safe_template(&mut self) {
        let Some((id, _)) = self.replay.last_safe_point() else {
            return;
        };
        if self
            .safe_template
            .as_ref()
            .is_some_and(|(held, _)| *held == id)
        {
            return;
        }
        let (current, template) = self.tracker.registered();
        if current == id {
            self.safe_template = Some((id, template));
        }
    }

    /// Why the requests in flight cannot be sent again as they are:
    /// requests of Reprise's own whose answers the session was waiting
    /// for. State probes are dropped (the next boundary asks again).
    ///
    /// A wrapped autocommit write becomes what the client sent: the
    /// request alone, as a new connection runs it again. When the client's
    /// request was answered but for what the COMMIT held back, that rest
    /// is kept for [`take_wrapped_tail`](Flow::take_wrapped_tail).
    pub fn forget_own_requests(&mut self) -> Result<(), &'static str> {
        self.queue.retain(|pending| {
            !matches!(
                pending,
                Pending::Probe(_) | Pending::Xid(_) | Pending::WrapBegin { .. }
            )
        });
        self.wrapped_tail = None;
        let wrap = self.wrap.take();
        if let Some(at) = self
            .queue
            .iter()
            .position(|pending| matches!(pending, Pending::WrapCommit))
        {
            match wrap {
                Some(wrap) if wrap.answered.is_some() => {
                    // The request's own ReadyForQuery (and CommandComplete)
                    // is still to come, from the tail or from a re-run.
                    self.queue[at] = if wrap.simple {
                        Pending::Query(VecDeque::new())
                    } else {
                        Pending::Sync
                    };
                    let mut tail = BytesMut::new();
                    if let Some(held) = wrap.held.filter(|_| !wrap.commit_failed) {
                        tail.extend_from_slice(&held);
                    }
                    reply::ready_for_query(&mut tail, b'I');
                    self.wrapped_tail = Some(Some(tail));
                }
                _ => {
                    self.queue.remove(at);
                    self.wrapped_tail = Some(None);
                }
            }
        }
        if self
            .queue
            .iter()
            .any(|pending| matches!(pending, Pending::Switch(_) | Pending::Abort))
        {
            return Err("a template switch of Reprise's own was in flight");
        }
        Ok(())
    }

    /// The answer a wrapped autocommit write still owes the client when
    /// its COMMIT is found committed: its CommandComplete (simple Query)
    /// and ReadyForQuery; `Some(None)` when the server's answer to the
    /// write itself was cut off. `None`: no wrapped write was in flight.
    pub fn take_wrapped_tail(&mut self) -> Option<Option<BytesMut>> {
        self.wrapped_tail.take()
    }

    /// Whether the next server frames answer a request of Reprise's own
    /// (a state probe, a transaction-id question, a template switch, the
    /// BEGIN and COMMIT around a wrapped write): the client sees none of
    /// them.
    pub fn answering_own_request(&self) -> bool {
        matches!(
            self.queue.front(),
            Some(
                Pending::Probe(_)
                    | Pending::Xid(_)
                    | Pending::Switch(_)
                    | Pending::Abort
                    | Pending::WrapBegin { .. }
                    | Pending::WrapCommit
            )
        )
    }

    /// Nothing in flight and nothing half-sent.
    pub fn at_boundary(&self) -> bool {
        self.queue.is_empty() && self.awaiting_ready == 0 && !self.unsynced
    }

    /// At a boundary outside any transaction.
    pub fn idle(&self) -> bool {
        self.at_boundary() && self.status == b'I'
    }

    /// Handles a checked client frame.
    pub fn client_frame(&mut self, kind: FrontendKind, message: &[u8]) -> ClientStep {
        if !self.tracking {
            if kind.ends_request() {
                self.awaiting_ready += 1;
            }
            match kind {
                FrontendKind::Sync => self.unsynced = false,
                kind if kind.is_extended() => self.unsynced = true,
                _ => {}
            }
            return ClientStep::Forward;
        }
        // A Sync the server ignores in copy-in mode ends no request.
        let ends_request = match kind {
            FrontendKind::Query | FrontendKind::FunctionCall => true,
            FrontendKind::Sync => !self.copy_in,
            _ => false,
        };
        self.risks.clear();
        let step = self.tracked_client_frame(kind, message);
        if matches!(step, ClientStep::Forward | ClientStep::Precede) {
            if self.risks.contains(&StatementRisk::Write) {
                self.may_have_written = true;
            }
            if std::mem::take(&mut self.credential) {
                self.replay.mark_credential();
            }
            if self
                .replay
                .client_message(kind, message, &self.risks, ends_request)
            {
                self.stats.replay_log_overflows.inc();
            }
        }
        step
    }

    fn tracked_client_frame(&mut self, kind: FrontendKind, message: &[u8]) -> ClientStep {
        if self.copy_in && kind == FrontendKind::Sync {
            return ClientStep::Forward;
        }
        if self.skip_to_sync && kind.is_extended() {
            return ClientStep::Drop;
        }
        match kind {
            FrontendKind::Query => self.query(message),
            FrontendKind::Parse => self.parse(message),
            FrontendKind::Bind => self.bind(message),
            FrontendKind::Describe => self.describe(message),
            FrontendKind::Execute => self.execute(message),
            FrontendKind::Close => self.close(message),
            FrontendKind::Sync => self.sync(),
            FrontendKind::FunctionCall => {
                self.risks.push(StatementRisk::Write);
                let effect = function_effect(frontend::function_oid(message));
                self.queue.push_back(Pending::Function(effect));
                ClientStep::Forward
            }
            FrontendKind::CopyDone | FrontendKind::CopyFail => {
                if self.copy_in {
                    self.copy_in = false;
                } else if self
                    .queue
                    .iter()
                    .any(|pending| matches!(pending, Pending::Execute(_)))
                {
                    self.queue.push_back(Pending::CopyEnd);
                }
                ClientStep::Forward
            }
            FrontendKind::Flush | FrontendKind::CopyData | FrontendKind::Terminate => {
                ClientStep::Forward
            }
        }
    }

    fn query(&mut self, message: &[u8]) -> ClientStep {
        let sql = frontend::query_text(message).unwrap_or_default();
        let effects = self.tracker.query_effects(sql);
        let command = effects.iter().find_map(|effect| match effect {
            Effect::Reprise(command) => Some(command.clone()),
            _ => None,
        });
        let Some(command) = command else {
            self.credential = effects.contains(&Effect::Credential);
            self.note_query_risks(sql, &effects);
            // A Query drops the unnamed statement and portal.
            self.statements.unnamed = None;
            self.portals.unnamed = None;
            let ask_xid = self.learn_commit_xids
                && !self.unsynced
                && matches!(effects.as_slice(), [Effect::Commit { chain: false }])
                && (self.status == b'T' || self.requests_in_flight());
            if ask_xid {
                self.ask_xid();
            }
            if self.wrap.as_ref().is_some_and(|wrap| !wrap.synced) {
                // A Query amid a wrapped batch ends Reprise's block early.
                self.void_wrap();
            }
            let wrap = !ask_xid && self.wraps_query(sql, &effects);
            if wrap {
                self.begin_wrap(true);
            }
            self.queue.push_back(Pending::Query(effects.into()));
            if wrap {
                self.end_wrap();
            }
            return if ask_xid || wrap {
                ClientStep::Precede
            } else {
                ClientStep::Forward
            };
        };
        let switches = matches!(
            command,
            RepriseCommand::SetTemplate(_) | RepriseCommand::ResetTemplate
        );
        if switches && effects.len() == 1 && !self.queue.is_empty() && !self.unsynced {
            return ClientStep::Hold;
        }
        self.stats.reprise_statements.inc();
        if effects.len() > 1 {
            self.local_error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "Reprise statements cannot be combined with other statements in one query string",
                true,
            );
            return ClientStep::Drop;
        }
        match command {
            RepriseCommand::Show(name) => self.answer(Answer::Show {
                name,
                describe: true,
                with_ready: true,
            }),
            RepriseCommand::Unsupported(name) => {
                self.unsupported(&name, true);
            }
            _ if self.unsynced => self.local_error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "SET reprise.template cannot follow extended-query messages that await a Sync",
                true,
            ),
            command => self.switch(&command, true),
        }
        ClientStep::Drop
    }

    /// What each statement of a Query could do if run again.
    fn note_query_risks(&mut self, sql: &[u8], effects: &[Effect]) {
        let options = *self.tracker.lex_options();
        if let [effect] = effects {
            let risk = self.statement_risk(effect, sql, &options);
            self.risks.push(risk);
            return;
        }
        let ranges = crate::state::lexer::Statements::new(sql, &options);
        for (range, effect) in ranges.zip(effects) {
            let risk = self.statement_risk(effect, &sql[range], &options);
            self.risks.push(risk);
        }
    }

    /// The risk of one statement; EXECUTE of a SQL-prepared statement has
    /// the risk of the statement it runs.
    fn statement_risk(&self, effect: &Effect, sql: &[u8], options: &LexOptions) -> StatementRisk {
        match effect {
            Effect::Execute(name) => match self.tracker.prepared_body(name) {
                Some((body, text)) => StatementRisk::of(body, text, options),
                None => StatementRisk::Write,
            },
            effect => StatementRisk::of(effect, sql, options),
        }
    }

    /// Whether a Query is an autocommit write Reprise wraps: one
    /// statement that may write and runs alike inside a block, sent with
    /// nothing in flight outside a transaction.
    fn wraps_query(&self, sql: &[u8], effects: &[Effect]) -> bool {
        let [effect] = effects else {
            return false;
        };
        self.may_wrap()
            && !self.unsynced
            && !self.requests_in_flight()
            && self.risks == [StatementRisk::Write]
            && self.wrappable(effect, sql)
    }

    /// Wrapping is on, no wrap is under way, and the client's last
    /// ReadyForQuery said idle.
    fn may_wrap(&self) -> bool {
        self.wrap_writes
            && self.learn_commit_xids
            && self.wrap.is_none()
            && self.status == b'I'
            && !self.skip_to_sync
    }

    /// [`risk::wrappable`], for EXECUTE of the statement it runs.
    fn wrappable(&self, effect: &Effect, sql: &[u8]) -> bool {
        let options = self.tracker.lex_options();
        match effect {
            Effect::Execute(name) => self
                .tracker
                .prepared_body(name)
                .is_some_and(|(_, text)| risk::wrappable(text, options)),
            _ => risk::wrappable(sql, options),
        }
    }

    /// Queues Reprise's BEGIN ahead of the client frame being handled.
    fn begin_wrap(&mut self, simple: bool) {
        if simple {
            frame::write_frame(&mut self.to_server, Some(b'Q'), |body| {
                body.extend_from_slice(b"BEGIN\0");
            });
        } else {
            self.own_extended("BEGIN");
        }
        self.stats.autocommit_writes_wrapped.inc();
        self.queue.push_back(Pending::WrapBegin {
            closes_left: if simple { 0 } else { 2 },
        });
        self.wrap = Some(Wrap {
            simple,
            synced: false,
            begun: false,
            void: false,
            held: None,
            answered: None,
            commit_failed: false,
        });
    }

    /// Queues the transaction-id question and Reprise's COMMIT right after
    /// the client frame that ends the wrapped request.
    fn end_wrap(&mut self) {
        let (sql, token) = self.xid_question(true);
        for text in [sql.as_str(), "COMMIT"] {
            frame::write_frame(&mut self.follow, Some(b'Q'), |body| {
                body.extend_from_slice(text.as_bytes());
                body.extend_from_slice(&[0]);
            });
        }
        self.queue.push_back(Pending::Xid(Box::new(XidQuestion {
            seq: self.replay.next_command_seq(),
            token,
            answer: None,
            failed: false,
            closes_left: 0,
            wrapped: true,
        })));
        self.queue.push_back(Pending::WrapCommit);
        if let Some(wrap) = &mut self.wrap {
            wrap.synced = true;
        }
    }

    /// The wrap under way can no longer vouch for the outcome.
    fn void_wrap(&mut self) {
        if let Some(wrap) = &mut self.wrap {
            wrap.void = true;
        }
    }

    fn parse(&mut self, message: &[u8]) -> ClientStep {
        let Some(fields) = frontend::parse_fields(message) else {
            return ClientStep::Forward;
        };
        let effect = self.tracker.statement_effect(fields.query);
        let name = Bytes::copy_from_slice(fields.name);
        if let Effect::Reprise(command) = effect {
            self.stats.reprise_statements.inc();
            if fields.param_types.iter().any(|oid| *oid != 0) {
                self.statements.remove(&name);
                self.local_error(
                    sqlstate::PROTOCOL_VIOLATION,
                    "Reprise statements take no parameters",
                    false,
                );
                return ClientStep::Drop;
            }
            self.statements.insert(&name, Target::Local(command));
            let mut out = BytesMut::new();
            reply::parse_complete(&mut out);
            self.local_since_sync = true;
            self.answer(Answer::Bytes(out));
            return ClientStep::Drop;
        }
        self.credential = effect == Effect::Credential;
        let options = self.tracker.lex_options();
        let risk = StatementRisk::of(&effect, fields.query, options);
        let wrappable = risk::wrappable(fields.query, options);
        let previous = self
            .statements
            .insert(&name, Target::Server(effect.clone(), risk, wrappable));
        self.unsynced = true;
        self.queue.push_back(Pending::Parse {
            name,
            query: Bytes::copy_from_slice(fields.query),
            param_types: fields.param_types,
            previous: previous.map(Box::new),
        });
        ClientStep::Forward
    }

    fn bind(&mut self, message: &[u8]) -> ClientStep {
        let Some((portal, statement, values)) = frontend::bind_fields(message) else {
            return ClientStep::Forward;
        };
        match self.statements.get(statement).cloned() {
            Some(Target::Local(command)) => {
                if values > 0 {
                    self.local_error(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!(
                            "bind message supplies {values} parameters, but prepared statement \"{}\" requires 0",
                            String::from_utf8_lossy(statement)
                        ),
                        false,
                    );
                    return ClientStep::Drop;
                }
                self.portals.insert(portal, Target::Local(command));
                let mut out = BytesMut::new();
                reply::bind_complete(&mut out);
                self.local_since_sync = true;
                self.answer(Answer::Bytes(out));
                ClientStep::Drop
            }
            target => {
                // Not parsed in this session's protocol stream: a statement
                // from SQL PREPARE, perhaps earlier in this very batch. Its
                // effect is looked up when the Execute completes, as for
                // SQL EXECUTE.
                let target = target.unwrap_or_else(|| {
                    Target::Server(
                        Effect::Execute(Bytes::copy_from_slice(statement)),
                        StatementRisk::Write,
                        false,
                    )
                });
                self.portals.insert(portal, target);
                self.unsynced = true;
                self.queue.push_back(Pending::Bind);
                ClientStep::Forward
            }
        }
    }

    fn describe(&mut self, message: &[u8]) -> ClientStep {
        let Some((kind, name)) = frontend::target_fields(message) else {
            return ClientStep::Forward;
        };
        let map = if kind == b'S' {
            &self.statements
        } else {
            &self.portals
        };
        if let Some(Target::Local(command)) = map.get(name) {
            let command = command.clone();
            self.local_since_sync = true;
            self.answer(Answer::Describe {
                command,
                statement: kind == b'S',
            });
            return ClientStep::Drop;
        }
        self.unsynced = true;
        self.queue.push_back(Pending::Describe);
        ClientStep::Forward
    }

    fn execute(&mut self, message: &[u8]) -> ClientStep {
        let portal = frontend::execute_portal(message).unwrap_or_default();
        match self.portals.get(portal) {
            Some(Target::Local(command)) => {
                let command = command.clone();
                self.local_since_sync = true;
                match command {
                    RepriseCommand::Show(name) => self.answer(Answer::Show {
                        name,
                        describe: false,
                        with_ready: false,
                    }),
                    RepriseCommand::Unsupported(name) => self.unsupported(&name, false),
                    command => {
                        if self.unsynced {
                            self.abort_batch(
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "SET reprise.template cannot share an extended-query batch with other statements",
                            );
                            return ClientStep::Drop;
                        }
                        if !self.queue.is_empty() {
                            return ClientStep::Hold;
                        }
                        self.switch(&command, false);
                    }
                }
                ClientStep::Drop
            }
            target => {
                let (effect, risk, wrappable) = match target {
                    Some(Target::Server(effect, risk, wrappable)) => {
                        (effect.clone(), *risk, *wrappable)
                    }
                    _ => (Effect::Unknown, StatementRisk::Write, false),
                };
                self.risks.push(risk);
                self.unsynced = true;
                let first_execute = !std::mem::replace(&mut self.executed_since_sync, true);
                if self.wrap.as_ref().is_some_and(|wrap| !wrap.synced)
                    && !matches!(risk, StatementRisk::Write | StatementRisk::Harmless)
                {
                    // The client's own transaction statement would end or
                    // nest in Reprise's block.
                    self.void_wrap();
                }
                // Only where the transaction is known to be open and
                // healthy: nothing of the question can fail then, which
                // would make the server skip the client's Execute.
                let ask_xid = self.learn_commit_xids
                    && effect == (Effect::Commit { chain: false })
                    && self.status == b'T'
                    && !self.skip_to_sync
                    && self.queue.iter().all(|pending| {
                        matches!(
                            pending,
                            Pending::Parse { .. }
                                | Pending::Bind
                                | Pending::Describe
                                | Pending::Close { .. }
                        )
                    });
                // The first Execute of a batch sent when idle: the batch's
                // implicit transaction becomes Reprise's block, committed
                // after the batch's Sync.
                let wrap = !ask_xid
                    && wrappable
                    && risk == StatementRisk::Write
                    && first_execute
                    && self.may_wrap()
                    && self.queue.iter().all(|pending| {
                        matches!(
                            pending,
                            Pending::Parse { .. }
                                | Pending::Bind
                                | Pending::Describe
                                | Pending::Close { .. }
                        )
                    });
                if ask_xid {
                    self.ask_xid_extended();
                }
                if wrap {
                    self.begin_wrap(false);
                }
                self.queue.push_back(Pending::Execute(effect));
                if ask_xid || wrap {
                    ClientStep::Precede
                } else {
                    ClientStep::Forward
                }
            }
        }
    }

    fn close(&mut self, message: &[u8]) -> ClientStep {
        let Some((kind, name)) = frontend::target_fields(message) else {
            return ClientStep::Forward;
        };
        let map = if kind == b'S' {
            &mut self.statements
        } else {
            &mut self.portals
        };
        if let Some(Target::Local(_)) = map.get(name) {
            map.remove(name);
            let mut out = BytesMut::new();
            reply::close_complete(&mut out);
            self.local_since_sync = true;
            self.answer(Answer::Bytes(out));
            return ClientStep::Drop;
        }
        map.remove(name);
        self.unsynced = true;
        self.queue.push_back(Pending::Close {
            statement: (kind == b'S').then(|| Bytes::copy_from_slice(name)),
        });
        ClientStep::Forward
    }

    fn sync(&mut self) -> ClientStep {
        self.skip_to_sync = false;
        self.executed_since_sync = false;
        let local_only = self.local_since_sync && !self.unsynced;
        self.local_since_sync = false;
        self.unsynced = false;
        if local_only {
            self.answer(Answer::Ready);
            return ClientStep::Drop;
        }
        self.queue.push_back(Pending::Sync);
        if self.wrap.as_ref().is_some_and(|wrap| !wrap.synced) {
            self.end_wrap();
        }
        ClientStep::Forward
    }

    /// Queues an answer of Reprise's own, and sends what is due.
    fn answer(&mut self, answer: Answer) {
        self.queue.push_back(Pending::Local(answer));
        self.drain_local();
    }

    fn local_error(&mut self, code: &str, message: &str, with_ready: bool) {
        let mut out = BytesMut::new();
        reply::error(&mut out, Severity::Error, code, message, None);
        if with_ready {
            self.answer(Answer::Bytes(out));
            self.answer(Answer::Ready);
        } else {
            self.skip_to_sync = true;
            self.local_since_sync = true;
            self.answer(Answer::Bytes(out));
        }
    }

    fn unsupported(&mut self, name: &[u8], with_ready: bool) {
        let name = String::from_utf8_lossy(name);
        let (code, message) = match &*name {
            "reprise.state_hash" | "reprise.stats" | "reprise.state" => (
                sqlstate::CANT_CHANGE_RUNTIME_PARAM,
                format!("parameter \"{name}\" cannot be changed"),
            ),
            _ => (
                sqlstate::UNDEFINED_OBJECT,
                format!("unrecognized configuration parameter \"{name}\""),
            ),
        };
        self.local_error(code, &message, with_ready);
    }

    /// Refuses a message in the middle of an extended batch whose earlier
    /// messages the server has: a failing request makes the server abandon
    /// the batch (its implicit transaction included), as it would have on
    /// an error of its own.
    fn abort_batch(&mut self, code: &str, message: &str) {
        // The server sees a request of Reprise's own amid the client's.
        self.tracker.mark_unreplayable();
        let mut out = BytesMut::new();
        reply::error(&mut out, Severity::Error, code, message, None);
        self.queue.push_back(Pending::Local(Answer::Bytes(out)));
        let name = self.unused_statement_name(b"reprise.abort");
        frame::write_frame(&mut self.to_server, Some(b'D'), |body| {
            body.extend_from_slice(b"S");
            body.extend_from_slice(&name);
            body.extend_from_slice(&[0]);
        });
        self.queue.push_back(Pending::Abort);
        self.skip_to_sync = true;
        self.drain_local();
    }

    /// Requests of the client or of Reprise are waiting for the server.
    fn requests_in_flight(&self) -> bool {
        self.queue
            .iter()
            .any(|pending| !matches!(pending, Pending::Local(_)))
    }

    /// Queues the question for the transaction id ahead of the COMMIT the
    /// client is sending.
    fn ask_xid(&mut self) {
        let (sql, token) = self.xid_question(false);
        frame::write_frame(&mut self.to_server, Some(b'Q'), |body| {
            body.extend_from_slice(sql.as_bytes());
            body.extend_from_slice(&[0]);
        });
        self.queue.push_back(Pending::Xid(Box::new(XidQuestion {
            seq: self.replay.next_command_seq(),
            token,
            answer: None,
            failed: false,
            closes_left: 0,
            wrapped: false,
        })));
    }

    /// The text of the question, and the commit-guard token it inserts;
    /// `writes`: the transaction holds a statement that may write.
    fn xid_question(&mut self, writes: bool) -> (String, Option<String>) {
        let assign = std::mem::take(&mut self.may_have_written) || writes;
        // Only a transaction that may have written needs the guard row.
        let token =
            (assign && self.guard.as_ref().is_some_and(|slot| slot.ready())).then(guard::new_token);
        let sql = outcome::xid_question(assign, token.as_deref(), self.server_identity.is_none());
        (sql, token)
    }

    /// The same question for a COMMIT executed in the extended protocol:
    /// Parse, Bind, Execute and Close of a statement and portal of
    /// Reprise's own, placed in the client's batch just before its
    /// Execute, so that no round trip is added and the client's unnamed
    /// statement and portal stay as they are.
    fn ask_xid_extended(&mut self) {
        let (sql, token) = self.xid_question(false);
        self.own_extended(&sql);
        self.queue.push_back(Pending::Xid(Box::new(XidQuestion {
            seq: self.replay.next_command_seq(),
            token,
            answer: None,
            failed: false,
            closes_left: 2,
            wrapped: false,
        })));
    }

    /// Parse, Bind, Execute and Close of `sql` as a statement and portal
    /// of Reprise's own, for the server ahead of the client frame being
    /// handled. Answered by ParseComplete, BindComplete, the statement's
    /// own answer and two CloseComplete.
    fn own_extended(&mut self, sql: &str) {
        let statement = self.unused_statement_name(b"reprise_own");
        let mut portal = b"reprise_own".to_vec();
        while self.portals.contains(&portal) {
            portal.push(b'_');
        }
        let out = &mut self.to_server;
        frame::write_frame(out, Some(b'P'), |body| {
            body.extend_from_slice(&statement);
            body.extend_from_slice(&[0]);
            body.extend_from_slice(sql.as_bytes());
            body.extend_from_slice(&[0, 0, 0]);
        });
        frame::write_frame(out, Some(b'B'), |body| {
            body.extend_from_slice(&portal);
            body.extend_from_slice(&[0]);
            body.extend_from_slice(&statement);
            // No parameter formats, no parameters, no result formats.
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        });
        frame::write_frame(out, Some(b'E'), |body| {
            body.extend_from_slice(&portal);
            body.extend_from_slice(&[0, 0, 0, 0, 0]);
        });
        for (kind, name) in [(b'P', &portal), (b'S', &statement)] {
            frame::write_frame(out, Some(b'C'), |body| {
                body.extend_from_slice(&[kind]);
                body.extend_from_slice(name);
                body.extend_from_slice(&[0]);
            });
        }
    }

    /// Answers to the question for the transaction id: consumed, except
    /// what the server sends on its own.
    fn xid_frame(&mut self, tag: u8, message: &[u8]) -> ServerStep {
        let Some(Pending::Xid(question)) = self.queue.front_mut() else {
            return ServerStep::Forward;
        };
        match tag {
            b'E' if server_msg::error_summary(message).is_fatal() => return ServerStep::Forward,
            b'E' if question.closes_left > 0 => {
                // The server now skips the rest of the batch, the
                // question's answers and the client's Execute included.
                self.queue.pop_front();
                self.commit_mark = None;
                return self.error();
            }
            b'E' => question.failed = true,
            b'3' if question.closes_left > 0 => {
                question.closes_left -= 1;
                if question.closes_left == 0 {
                    self.xid_answered();
                }
            }
            b'D' => match server_msg::data_row_fields(message).as_deref() {
                Some([xid, rest @ ..]) => {
                    // With a token, the guard's answer comes next: the
                    // token when its row went in, NULL when it did not.
                    let (guarded, identity) = match (&question.token, rest) {
                        (Some(_), [guarded, identity @ ..]) => (guarded.is_some(), identity),
                        _ => (false, rest),
                    };
                    let xid = match xid {
                        None => Some(None),
                        Some(text) => std::str::from_utf8(text)
                            .ok()
                            .and_then(|text| text.parse().ok())
                            .map(Some),
                    };
                    match xid {
                        Some(xid) => {
                            question.answer =
                                Some((xid, guarded, ServerIdentity::from_fields(identity)))
                        }
                        None => question.failed = true,
                    }
                }
                _ => question.failed = true,
            },
            b'A' | b'N' => return ServerStep::Forward,
            b'Z' => {
                self.xid_answered();
                self.drain_local();
            }
            _ => {}
        }
        ServerStep::Consume
    }

    /// The question for the transaction id is answered in full: what it
    /// learnt is kept for the COMMIT behind it.
    fn xid_answered(&mut self) {
        let Some(Pending::Xid(question)) = self.queue.pop_front() else {
            return;
        };
        self.commit_mark = None;
        if question.wrapped {
            match &self.wrap {
                Some(wrap) if wrap.begun && !wrap.void => {
                    if wrap.answered == Some(b'E') {
                        // The wrapped statement failed: the block can only
                        // roll back, and the question failed with it.
                        self.commit_mark = Some(CommitMark {
                            seq: question.seq,
                            xid: None,
                            identity: self.server_identity.clone(),
                            guard: None,
                            answered: true,
                        });
                        return;
                    }
                }
                _ => return,
            }
        }
        if let (Some((xid, guarded, identity)), false) = (question.answer, question.failed) {
            if identity.is_some() {
                self.server_identity = identity;
            }
            self.commit_mark = Some(CommitMark {
                seq: question.seq,
                xid,
                identity: self.server_identity.clone(),
                guard: question.token.filter(|_| guarded),
                answered: true,
            });
        }
    }

    /// A statement name the session does not use, for Reprise's own.
    fn unused_statement_name(&self, base: &[u8]) -> Vec<u8> {
        let mut name = base.to_vec();
        while self.statements.contains(&name)
            || self.tracker.template().prepared.contains_key(&name[..])
        {
            name.push(b'_');
        }
        name
    }

    /// Sends a probe of the session state if the tracker wants one and
    /// the session is idle with nothing in flight.
    fn maybe_probe(&mut self) {
        let in_flight = self.requests_in_flight();
        if !self.probes
            || in_flight
            || self.unsynced
            || self.status != b'I'
            || !self.tracker.wants_probe()
        {
            return;
        }
        let name = self.unused_statement_name(b"reprise.probe");
        resync::write_probe(&mut self.to_server, &name, self.tracker.probe_names());
        self.queue.push_back(Pending::Probe(Box::default()));
        self.stats.state_probes.inc();
    }

    /// Answers to a probe: consumed, except what the server sends on its
    /// own (notifications, notices, parameter changes).
    fn probe_frame(&mut self, tag: u8, message: &[u8]) -> ServerStep {
        let span = &self.span;
        let Some(Pending::Probe(probe)) = self.queue.front_mut() else {
            return ServerStep::Forward;
        };
        match tag {
            b'E' if server_msg::error_summary(message).is_fatal() => return ServerStep::Forward,
            b'E' => {
                tracing::warn!(
                    parent: span,
                    error = ?server_msg::error_summary(message),
                    "the server refused Reprise's reading of the session state"
                );
                probe.failed = true;
            }
            b'D' if probe.truth.add_row(message).is_none() => probe.failed = true,
            b'A' | b'N' => return ServerStep::Forward,
            b'Z' => {
                if let Some(Pending::Probe(probe)) = self.queue.pop_front() {
                    self.finish_probe(*probe);
                }
            }
            _ => {}
        }
        ServerStep::Consume
    }

    fn finish_probe(&mut self, probe: Probe) {
        if probe.failed {
            // The session stays non-recoverable until DISCARD ALL.
            self.probes = false;
            self.stats.state_probe_failures.inc();
        } else {
            let before = self.tracker.template().clone();
            let ready = self.tracker.resync(probe.truth);
            self.follow_prepared(&before);
            if ready.safe {
                // The server's state now is its state at the last
                // boundary: whatever the client sent since runs after.
                self.stats.safe_points.inc();
                self.replay.safe_point(ready.template, ready.state_hash);
                self.hold_safe_template();
                self.events.push(StateEvent::SafePoint {
                    template: ready.template,
                    state_hash: ready.state_hash,
                });
            }
        }
        self.drain_local();
    }

    /// Points protocol statement names at what the tracker's template now
    /// holds, after it moved from `before`.
    fn follow_prepared(&mut self, before: &Template) {
        let now = self.tracker.template();
        for (name, statement) in &before.prepared {
            if statement.origin == PreparedOrigin::Protocol && !now.prepared.contains_key(name) {
                self.statements.remove(name);
            }
        }
        for (name, statement) in &now.prepared {
            if statement.origin == PreparedOrigin::Protocol {
                let effect = self
                    .tracker
                    .prepared_effect(name)
                    .cloned()
                    .unwrap_or(Effect::Unknown);
                let options = self.tracker.lex_options();
                let risk = StatementRisk::of(&effect, &statement.query, options);
                let wrappable = risk::wrappable(&statement.query, options);
                self.statements
                    .insert(name, Target::Server(effect, risk, wrappable));
            }
        }
    }

    /// `SET reprise.template` / `RESET reprise.template`, with nothing in
    /// flight: sends the restore plan, or answers at once.
    fn switch(&mut self, command: &RepriseCommand, with_ready: bool) {
        if self.tracker.in_transaction_block() {
            self.local_error(
                sqlstate::ACTIVE_SQL_TRANSACTION,
                "SET reprise.template cannot run inside a transaction block",
                with_ready,
            );
            return;
        }
        let startup = self.tracker.startup_template().as_ref().clone();
        let target = match command {
            RepriseCommand::SetTemplate(name) => {
                let name = String::from_utf8_lossy(name);
                match self.shared.named_templates().get(&name) {
                    Some(named) => named.apply_to(&startup),
                    None => {
                        self.local_error(
                            sqlstate::UNDEFINED_OBJECT,
                            &format!("template \"{name}\" does not exist"),
                            with_ready,
                        );
                        return;
                    }
                }
            }
            _ => startup,
        };
        self.move_to(target, with_ready, true);
    }

    /// Brings a session on a fresh server connection (at its startup
    /// template) to `target`, answering nobody: the plan's answers are
    /// consumed, and a failure is left in `restore_error`.
    pub fn restore(&mut self, target: Template) {
        self.move_to(target, true, false);
    }

    /// Sends the restore plan from the current template to `target`.
    fn move_to(&mut self, target: Template, with_ready: bool, answer: bool) {
        let plan = match RestorePlan::between(self.tracker.template(), &target) {
            Ok(plan) => plan,
            Err(err) if answer => {
                self.local_error(
                    sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                    &format!("cannot move the session into that template: {err}"),
                    with_ready,
                );
                return;
            }
            Err(err) => {
                self.restore_error = Some(err.to_string());
                return;
            }
        };
        if plan.steps.is_empty() {
            self.finish_switch(target, with_ready, answer);
            return;
        }
        let mut readies = 0;
        let batch = plan.sql_batch();
        if !batch.is_empty() {
            frame::write_frame(&mut self.to_server, Some(b'Q'), |body| {
                body.extend_from_slice(&batch);
                body.extend_from_slice(&[0]);
            });
            readies += 1;
        }
        let mut parses = false;
        for step in plan.parse_steps() {
            write_parse(&mut self.to_server, step.name, step.query, step.param_types);
            parses = true;
        }
        if parses {
            frame::write_frame(&mut self.to_server, Some(b'S'), |_| {});
            readies += 1;
        }
        self.queue.push_back(Pending::Switch(Box::new(Switch {
            readies_left: readies,
            target,
            error: None,
            with_ready,
            answer,
        })));
    }

    fn finish_switch(&mut self, target: Template, with_ready: bool, answer: bool) {
        let before = self.tracker.template().clone();
        self.tracker.switch_to(target);
        self.follow_prepared(&before);
        // Switched at an idle boundary: the new template is the state.
        let template = self.tracker.template_id();
        let state_hash = self.tracker.state_hash();
        self.replay.safe_point(template, state_hash);
        self.hold_safe_template();
        self.events.push(StateEvent::SafePoint {
            template,
            state_hash,
        });
        if !answer {
            return;
        }
        let mut out = BytesMut::new();
        reply::command_complete(&mut out, "SET");
        self.queue.push_front(Pending::Local(Answer::Bytes(out)));
        if with_ready {
            self.queue.insert(1, Pending::Local(Answer::Ready));
        }
        self.drain_local();
    }

    /// Sends the local answers at the head of the queue.
    fn drain_local(&mut self) {
        while let Some(Pending::Local(_)) = self.queue.front() {
            let Some(Pending::Local(answer)) = self.queue.pop_front() else {
                break;
            };
            self.compose(answer);
        }
    }

    fn compose(&mut self, answer: Answer) {
        match answer {
            Answer::Ready => {
                let status = self.tracker.replay_state().status.as_byte();
                reply::ready_for_query(&mut self.to_client, status);
            }
            Answer::Bytes(bytes) => self.to_client.extend_from_slice(&bytes),
            Answer::Show {
                name,
                describe,
                with_ready,
            } => {
                match self.show_rows(&name) {
                    Some((columns, rows)) => {
                        if describe {
                            reply::row_description(&mut self.to_client, &columns);
                        }
                        for row in &rows {
                            let values: Vec<&[u8]> = row.iter().map(Vec::as_slice).collect();
                            reply::data_row(&mut self.to_client, &values);
                        }
                        reply::command_complete(&mut self.to_client, "SHOW");
                    }
                    None => {
                        let message = format!(
                            "unrecognized configuration parameter \"{}\"",
                            String::from_utf8_lossy(&name)
                        );
                        reply::error(
                            &mut self.to_client,
                            Severity::Error,
                            sqlstate::UNDEFINED_OBJECT,
                            &message,
                            None,
                        );
                        if !with_ready {
                            self.skip_to_sync = true;
                        }
                    }
                }
                if with_ready {
                    let status = self.tracker.replay_state().status.as_byte();
                    reply::ready_for_query(&mut self.to_client, status);
                }
            }
            Answer::Describe { command, statement } => {
                if statement {
                    reply::no_parameters(&mut self.to_client);
                }
                match command {
                    RepriseCommand::Show(name) => match show_columns(&name) {
                        Some(columns) => reply::row_description(&mut self.to_client, &columns),
                        None => reply::no_data(&mut self.to_client),
                    },
                    _ => reply::no_data(&mut self.to_client),
                }
            }
        }
    }

    /// The columns and rows of `SHOW reprise.<name>`.
    fn show_rows(&mut self, name: &[u8]) -> Option<(Vec<&'static str>, Vec<Row>)> {
        let columns = show_columns(name)?;
        let rows = match name {
            b"reprise.template" => {
                vec![vec![self.tracker.template_id().to_string().into_bytes()]]
            }
            b"reprise.state_hash" => {
                vec![vec![self.tracker.state_hash().to_string().into_bytes()]]
            }
            b"reprise.stats" => self.stats_rows(),
            b"reprise.state" => self.state_rows(),
            _ => return None,
        };
        Some((columns, rows))
    }

    fn stats_rows(&self) -> Vec<Row> {
        let registry = self.shared.registry.stats();
        let mut rows: Vec<(&str, u64)> = vec![
            (
                "sessions_active",
                self.shared
                    .clients
                    .load(std::sync::atomic::Ordering::Relaxed) as u64,
            ),
            ("templates", registry.templates as u64),
            ("template_references", registry.references as u64),
            ("template_acquisitions", registry.acquisitions),
            ("template_dedup_hits", registry.dedup_hits),
        ];
        rows.extend(self.shared.stats.rows());
        rows.into_iter()
            .map(|(name, value)| vec![name.as_bytes().to_vec(), value.to_string().into_bytes()])
            .collect()
    }

    /// The tracked state, one row per item: what the tests compare with
    /// the server, and what an operator reads when a session will not
    /// reach a safe point.
    fn state_rows(&mut self) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut row = |kind: &str, name: &[u8], value: &[u8]| {
            rows.push(vec![
                kind.as_bytes().to_vec(),
                name.to_vec(),
                value.to_vec(),
            ])
        };
        let template_id = self.tracker.template_id().to_string();
        let state_hash = self.tracker.state_hash().to_string();
        row("template", b"", template_id.as_bytes());
        row("state_hash", b"", state_hash.as_bytes());
        let template = self.tracker.template();
        for (name, value) in &template.startup {
            row("startup", name, value);
        }
        for (name, value) in &template.settings {
            row("setting", name, value);
        }
        if let Some(role) = &template.role {
            row("role", b"", role);
        }
        if let Some(user) = &template.session_authorization {
            row("session_authorization", b"", user);
        }
        for (name, statement) in &template.prepared {
            let origin: &[u8] = match statement.origin {
                PreparedOrigin::Sql => b"prepared_sql",
                PreparedOrigin::Protocol => b"prepared_protocol",
            };
            row(
                std::str::from_utf8(origin).unwrap_or("prepared"),
                name,
                &statement.query,
            );
            if !statement.param_types.is_empty() {
                let types: Vec<String> = statement
                    .param_types
                    .iter()
                    .map(|oid| oid.to_string())
                    .collect();
                row("param_types", name, types.join(",").as_bytes());
            }
        }
        for channel in &template.listening {
            row("listen", channel, b"");
        }
        let replay = self.tracker.replay_state();
        row("status", b"", &[replay.status.as_byte()]);
        if let Some(level) = replay.isolation {
            row("isolation", b"", isolation_name(level));
        }
        if let Some(read_only) = replay.read_only {
            row("read_only", b"", if read_only { b"on" } else { b"off" });
        }
        if let Some(deferrable) = replay.deferrable {
            row("deferrable", b"", if deferrable { b"on" } else { b"off" });
        }
        for (name, value) in &replay.local_settings {
            let value: &[u8] = if value.as_ref() == LOCAL_DEFAULT {
                b"DEFAULT"
            } else {
                value
            };
            row("local", name, value);
        }
        for savepoint in &replay.savepoints {
            row("savepoint", savepoint, b"");
        }
        for kind in replay.non_recoverable.iter() {
            row("non_recoverable", format!("{kind:?}").as_bytes(), b"");
        }
        if self.tracker.unreplayable() {
            row("non_recoverable", b"Unreplayable", b"");
        }
        let commands = self.replay.len().to_string();
        let bytes = self.replay.bytes().to_string();
        row("replay_log", b"commands", commands.as_bytes());
        row("replay_log", b"bytes", bytes.as_bytes());
        if self.replay.over_bound() {
            row("replay_log", b"over_bound", b"");
        }
        rows
    }

    /// Handles a server frame. FATAL errors are the session's business;
    /// this sees them too, and forwards them.
    pub fn server_frame(&mut self, tag: u8, message: &[u8]) -> ServerStep {
        let step = self.relayed_server_frame(tag, message);
        // ReadyForQuery goes into the digest when it completes a command.
        if self.tracking && step == ServerStep::Forward && tag != b'Z' {
            self.replay.server_message(tag, message);
        }
        step
    }

    fn relayed_server_frame(&mut self, tag: u8, message: &[u8]) -> ServerStep {
        if !self.tracking {
            if tag == b'Z' {
                self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
                self.status = server_msg::ready_status(message).unwrap_or(b'I');
            }
            return ServerStep::Forward;
        }
        if tag == b'S' {
            if let Some((name, value)) = server_msg::parameter_status(message) {
                self.tracker.parameter_status(name, value);
            }
            return ServerStep::Forward;
        }
        while let Some(Pending::CopyEnd) = self.queue.front() {
            // A COPY that never started: nothing answers the mark.
            self.queue.pop_front();
        }
        match self.queue.front() {
            Some(Pending::Switch(_)) => return self.switch_frame(tag, message),
            Some(Pending::Probe(_)) => return self.probe_frame(tag, message),
            Some(Pending::Xid(_)) => return self.xid_frame(tag, message),
            Some(Pending::WrapBegin { .. } | Pending::WrapCommit) => {
                return self.wrap_frame(tag, message)
            }
            _ => {}
        }
        if let Some(step) = self.held_for_wrap(tag, message) {
            return step;
        }
        match tag {
            b'Z' => {
                self.status = server_msg::ready_status(message).unwrap_or(b'I');
                match self.queue.pop_front() {
                    Some(Pending::Query(_) | Pending::Sync | Pending::Function(_)) => {}
                    other => self.out_of_step(other),
                }
                self.ready();
            }
            b'E' => {
                if server_msg::error_summary(message).is_fatal() {
                    return ServerStep::Forward;
                }
                return self.error();
            }
            b'C' | b'I' => match self.queue.front_mut() {
                Some(Pending::Query(effects)) => {
                    let effect = effects.pop_front().unwrap_or(Effect::None);
                    self.tracker.statement_done(&effect);
                    self.forget_statements(&effect);
                }
                Some(Pending::Execute(_)) => {
                    if let Some(Pending::Execute(effect)) = self.queue.pop_front() {
                        self.tracker.statement_done(&effect);
                        self.forget_statements(&effect);
                    }
                }
                _ => {
                    let other = self.queue.pop_front();
                    self.out_of_step(other);
                }
            },
            b's' => self.expect(|p| matches!(p, Pending::Execute(_))),
            b'G' if matches!(self.queue.front(), Some(Pending::Execute(_))) => {
                self.copy_in_started()
            }
            b'G' if matches!(self.queue.front(), Some(Pending::Query(_))) => {
                self.replay.copy_in_started()
            }
            b'V' => {
                if let Some(Pending::Function(effect)) = self.queue.front_mut() {
                    let effect = std::mem::replace(effect, Effect::None);
                    self.tracker.statement_done(&effect);
                }
            }
            b'1' => match self.queue.pop_front() {
                Some(Pending::Parse {
                    name,
                    query,
                    param_types,
                    ..
                }) => {
                    if !name.is_empty() {
                        self.tracker.parsed(name, query, param_types);
                    }
                }
                other => self.out_of_step(other),
            },
            b'2' => self.expect(|p| matches!(p, Pending::Bind)),
            b'3' => match self.queue.pop_front() {
                Some(Pending::Close { statement }) => {
                    if let Some(name) = statement {
                        self.tracker.closed_statement(&name);
                    }
                }
                other => self.out_of_step(other),
            },
            b'T' | b'n' if matches!(self.queue.front(), Some(Pending::Describe)) => {
                self.queue.pop_front();
            }
            _ => {}
        }
        self.drain_local();
        ServerStep::Forward
    }

    /// The end of a wrapped request's answer, which waits for the COMMIT:
    /// the CommandComplete of a simple Query and the ReadyForQuery.
    fn held_for_wrap(&mut self, tag: u8, message: &[u8]) -> Option<ServerStep> {
        let wrap = self.wrap.as_ref()?;
        if wrap.answered.is_some() {
            return None;
        }
        let simple = wrap.simple;
        match (tag, self.queue.front_mut()?) {
            (b'C', Pending::Query(effects)) if simple => {
                let effect = effects.pop_front().unwrap_or(Effect::None);
                self.tracker.statement_done(&effect);
                self.forget_statements(&effect);
                if let Some(wrap) = &mut self.wrap {
                    wrap.held = Some(Bytes::copy_from_slice(message));
                }
            }
            (b'Z', Pending::Query(_) | Pending::Sync) => {
                self.queue.pop_front();
                if let Some(wrap) = &mut self.wrap {
                    wrap.answered = Some(server_msg::ready_status(message).unwrap_or(b'I'));
                }
                self.drain_local();
            }
            _ => return None,
        }
        Some(ServerStep::Consume)
    }

    /// Answers to Reprise's BEGIN and COMMIT around a wrapped request:
    /// consumed, except what the server sends on its own and an error of
    /// the COMMIT, which is the client's (autocommit would have given
    /// it). The COMMIT's ReadyForQuery ends the client's request.
    fn wrap_frame(&mut self, tag: u8, message: &[u8]) -> ServerStep {
        if tag == b'E' && server_msg::error_summary(message).is_fatal() {
            return ServerStep::Forward;
        }
        let begun = self.wrap.as_ref().is_some_and(|wrap| wrap.begun);
        match self.queue.front_mut() {
            Some(Pending::WrapBegin { closes_left }) => match tag {
                b'E' if *closes_left > 0 => {
                    // The server now skips the rest of the batch, the
                    // client's Execute included.
                    self.queue.pop_front();
                    self.void_wrap();
                    return self.error();
                }
                b'E' => self.void_wrap(),
                b'A' | b'N' => return ServerStep::Forward,
                b'C' => {
                    if let Some(wrap) = &mut self.wrap {
                        wrap.begun = true;
                    }
                }
                b'3' if *closes_left > 0 => {
                    *closes_left -= 1;
                    if *closes_left == 0 {
                        self.queue.pop_front();
                    }
                }
                b'Z' => {
                    self.queue.pop_front();
                    self.drain_local();
                }
                _ => {}
            },
            Some(Pending::WrapCommit) => match tag {
                b'E' => {
                    if let Some(wrap) = &mut self.wrap {
                        wrap.commit_failed = true;
                    }
                    return ServerStep::Forward;
                }
                // Without a block, the COMMIT only warns that there is none.
                b'A' => return ServerStep::Forward,
                b'N' if begun => return ServerStep::Forward,
                b'Z' => {
                    self.queue.pop_front();
                    self.finish_wrap(server_msg::ready_status(message).unwrap_or(b'I'));
                }
                _ => {}
            },
            _ => return ServerStep::Forward,
        }
        ServerStep::Consume
    }

    /// The wrapped request is over: the client gets what was held back
    /// and the COMMIT's ReadyForQuery.
    fn finish_wrap(&mut self, status: u8) {
        let Some(wrap) = self.wrap.take() else {
            return;
        };
        self.status = status;
        if let Some(held) = wrap.held.filter(|_| !wrap.commit_failed) {
            self.replay.server_message(b'C', &held);
            self.to_client.extend_from_slice(&held);
        }
        reply::ready_for_query(&mut self.to_client, status);
        self.ready();
        self.drain_local();
    }

    /// CopyInResponse to an extended-protocol Execute: the Syncs the client
    /// sent after it and before the end of the COPY data reach the server
    /// in copy-in mode, which ignores them (tokio-postgres sends one right
    /// after the Execute).
    fn copy_in_started(&mut self) {
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut ended = false;
        let mut ignored = 0;
        for (at, pending) in self.queue.drain(..).enumerate() {
            match pending {
                Pending::Sync if at > 0 && !ended => ignored += 1,
                Pending::CopyEnd if !ended => ended = true,
                other => kept.push_back(other),
            }
        }
        self.queue = kept;
        self.copy_in = !ended;
        self.replay.syncs_ignored(ignored);
    }

    /// SQL PREPARE, DEALLOCATE and DISCARD ALL act on the namespace that
    /// protocol Parse shares: a name they touch no longer stands for what
    /// an earlier Parse made it, and a Bind of it asks the tracker instead.
    fn forget_statements(&mut self, effect: &Effect) {
        match effect {
            Effect::Prepare { name, .. } | Effect::Deallocate(Some(name)) => {
                if let Some(Target::Server(..)) = self.statements.get(name) {
                    self.statements.remove(name);
                }
            }
            Effect::Deallocate(None) | Effect::Discard(Discard::All) => self
                .statements
                .retain_named(|target| matches!(target, Target::Local(_))),
            _ => {}
        }
    }

    /// An ErrorResponse: the request at the head failed, and in the
    /// extended protocol the server skips the rest of the batch.
    fn error(&mut self) -> ServerStep {
        self.tracker.statement_failed();
        let step = match self.queue.front() {
            Some(Pending::Query(_) | Pending::Function(_)) => {
                if let Some(Pending::Query(effects)) = self.queue.front_mut() {
                    effects.clear();
                }
                return ServerStep::Forward;
            }
            Some(Pending::Abort) => ServerStep::Consume,
            _ => ServerStep::Forward,
        };
        let mut refused = Vec::new();
        while let Some(front) = self.queue.front() {
            if matches!(
                front,
                Pending::Sync | Pending::Query(_) | Pending::Function(_)
            ) {
                break;
            }
            if let Some(Pending::Parse { name, previous, .. }) = self.queue.pop_front() {
                refused.push((name, previous));
            }
        }
        // Latest first, so that a name parsed twice gets its first value.
        for (name, previous) in refused.into_iter().rev() {
            match previous {
                Some(target) => self.statements.insert(&name, *target),
                None => self.statements.remove(&name),
            };
        }
        step
    }

    /// Answers to Reprise's own template switch: consumed, and the outcome
    /// goes to the client as the answer to its SET.
    fn switch_frame(&mut self, tag: u8, message: &[u8]) -> ServerStep {
        let Some(Pending::Switch(switch)) = self.queue.front_mut() else {
            return ServerStep::Forward;
        };
        match tag {
            b'E' if server_msg::error_summary(message).is_fatal() => return ServerStep::Forward,
            b'E' if switch.error.is_none() => {
                switch.error = Some(Bytes::copy_from_slice(message));
            }
            b'Z' => {
                switch.readies_left = switch.readies_left.saturating_sub(1);
                if switch.readies_left == 0 {
                    let Some(Pending::Switch(switch)) = self.queue.pop_front() else {
                        return ServerStep::Consume;
                    };
                    match switch.error {
                        None => self.finish_switch(switch.target, switch.with_ready, switch.answer),
                        Some(error) if !switch.answer => {
                            self.tracker.mark_unknown();
                            let summary = server_msg::error_summary(&error);
                            self.restore_error = Some(format!(
                                "the server refused the restore plan: {} ({})",
                                summary.message, summary.code
                            ));
                        }
                        Some(error) => {
                            // Part of the plan may have run: the state is
                            // known again once read back from the server.
                            self.tracker.mark_unknown();
                            self.stats.template_switch_failures.inc();
                            let mut out = BytesMut::from(&error[..]);
                            if switch.with_ready {
                                reply::ready_for_query(&mut out, b'I');
                            } else {
                                self.skip_to_sync = true;
                            }
                            self.queue.push_front(Pending::Local(Answer::Bytes(out)));
                            self.drain_local();
                            self.maybe_probe();
                        }
                    }
                }
            }
            _ => {}
        }
        ServerStep::Consume
    }

    fn expect(&mut self, is: impl FnOnce(&Pending) -> bool) {
        if self.queue.front().is_some_and(is) {
            self.queue.pop_front();
        } else {
            let other = self.queue.pop_front();
            self.out_of_step(other);
        }
    }

    /// The server answered something that was not asked: the tracker can
    /// no longer vouch for the state.
    fn out_of_step(&mut self, popped: Option<Pending>) {
        tracing::warn!(
            parent: &self.span,
            ?popped,
            "server answer out of step with the requests in flight"
        );
        self.stats.tracker_mismatches.inc();
        self.tracker.mark_unknown();
    }

    fn ready(&mut self) {
        if self.status == b'I' && self.replay.in_flight().count() <= 1 {
            self.may_have_written = false;
        }
        let ready = self.tracker.ready(self.status);
        let safe_point = ready.safe.then_some(ready.template);
        if let Some(completed) = self
            .replay
            .completed(self.status, ready.state_hash, safe_point)
        {
            self.events.push(StateEvent::Command {
                completed,
                safe_point,
            });
            if safe_point.is_some() {
                self.hold_safe_template();
            }
        }
        let in_flight = self.requests_in_flight();
        if in_flight || self.unsynced {
            return;
        }
        self.stats.boundaries.inc();
        self.events.push(StateEvent::Boundary {
            state_hash: ready.state_hash,
        });
        if ready.safe {
            self.stats.safe_points.inc();
            self.events.push(StateEvent::SafePoint {
                template: ready.template,
                state_hash: ready.state_hash,
            });
        }
        self.maybe_probe();
    }

    /// The transaction status as the client last learnt it.
    pub fn status(&self) -> TransactionStatus {
        TransactionStatus::from_byte(self.status).unwrap_or_default()
    }
}

fn show_columns(name: &[u8]) -> Option<Vec<&'static str>> {
    Some(match name {
        b"reprise.template" => vec!["reprise.template"],
        b"reprise.state_hash" => vec!["reprise.state_hash"],
        b"reprise.stats" => vec!["name", "value"],
        b"reprise.state" => vec!["kind", "name", "value"],
        _ => return None,
    })
}

/// Large-object functions change no session state; any other function
/// called through the legacy protocol may (set_config has an OID too).
fn function_effect(oid: Option<u32>) -> Effect {
    const LARGE_OBJECT_FUNCTIONS: &[u32] = &[
        715, 952, 953, 954, 955, 956, 957, 958, 964, 1004, 3170, 3171, 3172,
    ];
    match oid {
        Some(oid) if LARGE_OBJECT_FUNCTIONS.contains(&oid) => Effect::None,
        _ => Effect::Unknown,
    }
}

fn write_parse(out: &mut BytesMut, name: &[u8], query: &[u8], param_types: &[u32]) {
    frame::write_frame(out, Some(b'P'), |body| {
        body.extend_from_slice(name);
        body.extend_from_slice(&[0]);
        body.extend_from_slice(query);
        body.extend_from_slice(&[0]);
        let count = u16::try_from(param_types.len()).unwrap_or(u16::MAX);
        body.extend_from_slice(&count.to_be_bytes());
        for oid in param_types.iter().take(usize::from(count)) {
            body.extend_from_slice(&oid.to_be_bytes());
        }
    });
}
