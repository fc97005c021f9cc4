//! The replay log: every client message a session sent to the server
//! since its last safe point, grouped into commands (one request each:
//! a Query, an extended-protocol batch up to its Sync, a FunctionCall,
//! with any COPY data that belongs to it), each with the state hash once
//! the server answered it and a digest of what the client received for
//! it.
//!
//! It is what a new server connection must be given, after the session's
//! template, to be where the old one was. It is bounded: past
//! `max_replay_log` bytes the session is non-recoverable until its next
//! safe point, and the log keeps only digests and state hashes.

use std::collections::VecDeque;

use bytes::Bytes;

use super::answer_digest::AnswerDigest;
use crate::replay::risk::{CommandRisk, StatementRisk};
use crate::template::{StateHash, TemplateId};
use crate::wire::frontend::FrontendKind;

/// The largest message buffer kept for reuse; a bigger one (a long COPY,
/// say) is given back.
const SPARE_CAPACITY: usize = 64 * 1024;

/// One request, as sent and as answered.
#[derive(Debug)]
pub struct Command {
    /// Numbers the session's commands from 1.
    pub seq: u64,
    /// The client messages, as sent (empty when `omitted`).
    pub messages: Vec<u8>,
    /// Size of the messages, also when they were not kept.
    pub message_len: u64,
    pub omitted: Omission,
    /// The request-ending message has been sent.
    ended: bool,
    /// The server is in COPY FROM STDIN mode for this request: the
    /// client's COPY data belongs to it.
    copy_in: bool,
    /// Whether running it again could repeat a commit.
    pub risk: CommandRisk,
}

/// Why a command's messages are not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Omission {
    None,
    /// It carries a password or another credential.
    Credential,
    /// The log was over its bound.
    OverBound,
}

/// A command the server has answered in full.
#[derive(Clone, Debug)]
pub struct Completed {
    pub seq: u64,
    pub messages: Bytes,
    pub message_len: u64,
    pub omitted: Omission,
    pub state_hash: StateHash,
    /// The digest of what the client received; `None` for a command that
    /// ended at a safe point outside a capture, which nothing compares.
    pub result_digest: Option<[u8; 32]>,
    /// Whether running it again could repeat a commit.
    pub risk: CommandRisk,
}

/// The commands of one session since its last safe point.
#[derive(Debug)]
pub struct ReplayLog {
    limit: usize,
    /// Answered in full since the last safe point, oldest first. Kept for
    /// replay after a failure; a safe point empties it.
    done: Vec<Completed>,
    /// Sent, not yet answered in full, oldest first; the last one may
    /// still be open (its request-ending message not yet sent).
    in_flight: VecDeque<Command>,
    /// Message bytes held, in `done` and `in_flight`.
    bytes: usize,
    /// Over the bound since the last safe point.
    over_bound: bool,
    /// The template and state hash of the last safe point.
    safe_point: Option<(TemplateId, StateHash)>,
    /// What the client received for the oldest command in flight: the
    /// server answers in order, so only that one is ever being answered.
    digest: AnswerDigest,
    /// Messages in `digest`.
    answered: u32,
    /// Notices the client received for the oldest command in flight.
    notices: u32,
    next_seq: u64,
    /// Whether a command completed at a safe point still hands its
    /// messages on (capture mode records every command); otherwise its
    /// buffer is kept for the next command.
    keep_at_safe_points: bool,
    /// A message buffer to reuse, so that a session in autocommit
    /// allocates nothing per command.
    spare: Vec<u8>,
}

impl ReplayLog {
    pub fn new(limit: usize) -> Self {
        ReplayLog {
            limit,
            done: Vec::new(),
            in_flight: VecDeque::new(),
            bytes: 0,
            over_bound: false,
            safe_point: None,
            digest: AnswerDigest::default(),
            answered: 0,
            notices: 0,
            next_seq: 1,
            keep_at_safe_points: true,
            spare: Vec::new(),
        }
    }

    /// Whether commands completed at a safe point keep their messages in
    /// [`Completed`]; nothing but a capture needs them.
    pub fn keep_messages_at_safe_points(&mut self, keep: bool) {
        self.keep_at_safe_points = keep;
    }

    /// A client message sent to the server, running `statements`.
    /// `ends_request` for a Query, FunctionCall or a Sync the server will
    /// answer.
    pub fn client_message(
        &mut self,
        kind: FrontendKind,
        message: &[u8],
        statements: &[StatementRisk],
        ends_request: bool,
    ) -> bool {
        let copy_data = matches!(
            kind,
            FrontendKind::CopyData | FrontendKind::CopyDone | FrontendKind::CopyFail
        );
        let index = match self.in_flight.iter().position(|command| command.copy_in) {
            Some(index) if copy_data => index,
            _ => self.open_command(),
        };
        let mut overflowed = false;
        if self.in_flight[index].omitted == Omission::None && !self.over_bound {
            if self.bytes + message.len() > self.limit {
                overflowed = true;
                self.overflow();
            } else {
                self.bytes += message.len();
            }
        }
        let command = &mut self.in_flight[index];
        for statement in statements {
            command.risk.then(*statement);
        }
        command.message_len += message.len() as u64;
        if command.omitted == Omission::None {
            command.messages.extend_from_slice(message);
        }
        if copy_data && kind != FrontendKind::CopyData {
            command.copy_in = false;
        }
        if ends_request {
            command.ended = true;
        }
        overflowed
    }

    /// The number of the command the next client message joins.
    pub fn next_command_seq(&self) -> u64 {
        match self.in_flight.back() {
            Some(command) if !command.ended => command.seq,
            _ => self.next_seq,
        }
    }

    /// The command that is still open, made if needed.
    fn open_command(&mut self) -> usize {
        if self.in_flight.back().is_none_or(|command| command.ended) {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.in_flight.push_back(Command {
                seq,
                messages: std::mem::take(&mut self.spare),
                message_len: 0,
                omitted: if self.over_bound {
                    Omission::OverBound
                } else {
                    Omission::None
                },
                ended: false,
                copy_in: false,
                risk: CommandRisk::default(),
            });
        }
        self.in_flight.len() - 1
    }

    /// Over the bound: nothing since the last safe point can be replayed,
    /// so nothing more is kept until the next one.
    fn overflow(&mut self) {
        self.over_bound = true;
        for command in &mut self.done {
            command.messages = Bytes::new();
            command.omitted = Omission::OverBound;
        }
        for command in &mut self.in_flight {
            command.messages = Vec::new();
            command.omitted = Omission::OverBound;
        }
        self.bytes = 0;
    }

    /// The open command carries a credential: its messages are never
    /// kept.
    pub fn mark_credential(&mut self) {
        let index = self.open_command();
        let command = &mut self.in_flight[index];
        self.bytes -= command.messages.len().min(self.bytes);
        command.messages = Vec::new();
        command.omitted = Omission::Credential;
    }

    /// A server message forwarded to the client, in answer to the oldest
    /// command not answered in full. Messages the server sends on its own
    /// (notifications, parameter changes, notices) are not part of a
    /// result; of an error, only the severity and SQLSTATE are.
    pub fn server_message(&mut self, tag: u8, message: &[u8]) {
        if self.in_flight.is_empty() {
            return;
        }
        if tag == b'N' {
            self.notices += 1;
            return;
        }
        if matches!(tag, b'A' | b'S') {
            return;
        }
        self.digest.add(tag, message);
        self.answered += 1;
    }

    /// How many messages of the oldest command's answer the client has
    /// received, and their digest so far.
    pub fn answer_so_far(&self) -> (u32, [u8; 32]) {
        (self.answered, self.digest.so_far())
    }

    /// How many notices the client has received for the oldest command in
    /// flight: a replay of it raises them again.
    pub fn notices_so_far(&self) -> u32 {
        self.notices
    }

    /// The server is in COPY FROM STDIN mode for the oldest command (a
    /// simple Query): the COPY data the client sends next belongs to it.
    pub fn copy_in_started(&mut self) {
        if let Some(command) = self.in_flight.front_mut() {
            command.copy_in = true;
        }
    }

    /// The server entered COPY FROM STDIN mode for an extended-protocol
    /// Execute and ignored `syncs` Syncs sent after it: the commands those
    /// Syncs ended belong to the oldest one.
    pub fn syncs_ignored(&mut self, syncs: usize) {
        let Some(mut merged) = self.in_flight.pop_front() else {
            return;
        };
        let mut ended = false;
        for _ in 0..syncs {
            match self.in_flight.pop_front() {
                Some(next) => {
                    merged.message_len += next.message_len;
                    if merged.omitted == Omission::None {
                        merged.messages.extend_from_slice(&next.messages);
                    }
                    if next.omitted != Omission::None && merged.omitted == Omission::None {
                        self.bytes -= merged.messages.len().min(self.bytes);
                        merged.omitted = next.omitted;
                        merged.messages = Vec::new();
                    }
                    ended = next.ended;
                }
                None => {
                    ended = false;
                    break;
                }
            }
        }
        merged.ended = ended;
        self.in_flight.push_front(merged);
    }

    /// ReadyForQuery answered the oldest command with `status`; the state
    /// after it is `state_hash`. A `safe` state is a safe point: what came
    /// before is no longer needed.
    pub fn completed(
        &mut self,
        status: u8,
        state_hash: StateHash,
        safe_point: Option<TemplateId>,
    ) -> Option<Completed> {
        let mut command = self.in_flight.pop_front()?;
        let moot = safe_point.is_some() && !self.keep_at_safe_points;
        let result_digest = if moot {
            self.digest.discard();
            None
        } else {
            self.digest.add_ready(status);
            Some(self.digest.finish())
        };
        self.answered = 0;
        self.notices = 0;
        let messages = if moot {
            // Nothing keeps them: the buffer serves the next command.
            self.bytes -= command.messages.len().min(self.bytes);
            command.messages.clear();
            if command.messages.capacity() <= SPARE_CAPACITY {
                self.spare = std::mem::take(&mut command.messages);
            }
            Bytes::new()
        } else {
            Bytes::from(command.messages)
        };
        let completed = Completed {
            seq: command.seq,
            message_len: command.message_len,
            omitted: command.omitted,
            messages,
            state_hash,
            result_digest,
            risk: command.risk,
        };
        match safe_point {
            Some(template) => {
                self.bytes -= completed.messages.len().min(self.bytes);
                self.safe_point(template, state_hash);
            }
            None => self.done.push(completed.clone()),
        }
        Some(completed)
    }

    /// A safe point reached without a command (a state probe, a template
    /// switch).
    pub fn safe_point(&mut self, template: TemplateId, state_hash: StateHash) {
        self.clear_done();
        self.safe_point = Some((template, state_hash));
        // Commands sent after the safe point while over the bound stay
        // unreplayable.
        self.over_bound = self
            .in_flight
            .iter()
            .any(|command| command.omitted == Omission::OverBound);
    }

    fn clear_done(&mut self) {
        for command in self.done.drain(..) {
            self.bytes -= command.messages.len().min(self.bytes);
        }
    }

    /// Message bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Commands since the last safe point, answered or not.
    pub fn len(&self) -> usize {
        self.done.len() + self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn over_bound(&self) -> bool {
        self.over_bound
    }

    pub fn last_safe_point(&self) -> Option<(TemplateId, StateHash)> {
        self.safe_point
    }

    /// The commands answered since the last safe point, oldest first.
    pub fn done(&self) -> &[Completed] {
        &self.done
    }

    /// The commands sent and not answered in full, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &Command> {
        self.in_flight.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn hash(n: u8) -> StateHash {
        StateHash::from_bytes([n; 32])
    }

    #[test]
    fn pipelined_requests_are_separate_commands_answered_in_order() {
        let mut log = ReplayLog::new(1024);
        let parse = frame(b'P', b"\0SELECT 1\0\0\0");
        let sync = frame(b'S', b"");
        log.client_message(FrontendKind::Parse, &parse, &[], false);
        log.client_message(FrontendKind::Sync, &sync, &[], true);
        log.client_message(FrontendKind::Query, &frame(b'Q', b"BEGIN\0"), &[], true);
        assert_eq!(log.len(), 2);
        log.server_message(b'1', &frame(b'1', b""));
        // Notices and parameter changes are not part of a result.
        log.server_message(b'N', &frame(b'N', b"SNOTICE\0\0"));
        let first = log.completed(b'I', hash(1), None).expect("first");
        assert_eq!(first.seq, 1);
        assert_eq!(first.messages.len(), parse.len() + sync.len());
        let mut expected = blake3::Hasher::new();
        expected.update(&frame(b'1', b""));
        expected.update(b"ZI");
        assert_eq!(first.result_digest, Some(*expected.finalize().as_bytes()));
        let second = log.completed(b'T', hash(2), None).expect("second");
        assert_eq!(second.seq, 2);
        assert_eq!(log.done().len(), 2);
        assert!(log.completed(b'I', hash(3), None).is_none());
    }

    #[test]
    fn a_command_ending_at_a_safe_point_lends_its_buffer_to_the_next() {
        let template = TemplateId::from_bytes([5; 32]);
        let select = frame(b'Q', b"SELECT 1\0");
        let mut log = ReplayLog::new(1024);
        log.keep_messages_at_safe_points(false);
        log.client_message(FrontendKind::Query, &select, &[], true);
        let done = log.completed(b'I', hash(1), Some(template)).expect("done");
        assert!(done.messages.is_empty());
        assert_eq!(done.result_digest, None, "nothing compares it");
        assert_eq!(done.message_len, select.len() as u64);
        assert_eq!(log.bytes(), 0);
        assert!(log.spare.capacity() >= select.len(), "the buffer is kept");
        log.client_message(FrontendKind::Query, &select, &[], true);
        assert_eq!(log.spare.capacity(), 0, "the next command took it");
        log.client_message(FrontendKind::Query, &frame(b'Q', b"BEGIN\0"), &[], true);
        let first = log.completed(b'I', hash(1), Some(template)).expect("first");
        assert!(first.messages.is_empty());
        let begin = log.completed(b'T', hash(2), None).expect("begin");
        assert_eq!(
            &begin.messages[..],
            &frame(b'Q', b"BEGIN\0")[..],
            "kept for replay"
        );

        let mut capture = ReplayLog::new(1024);
        capture.client_message(FrontendKind::Query, &select, &[], true);
        let done = capture
            .completed(b'I', hash(1), Some(template))
            .expect("done");
        assert_eq!(&done.messages[..], &select[..]);
        assert!(done.result_digest.is_some(), "a capture keeps it");
    }

    #[test]
    fn a_safe_point_empties_what_came_before() {
        let mut log = ReplayLog::new(1024);
        let template = TemplateId::from_bytes([5; 32]);
        log.client_message(FrontendKind::Query, &frame(b'Q', b"BEGIN\0"), &[], true);
        log.completed(b'T', hash(1), None);
        log.client_message(FrontendKind::Query, &frame(b'Q', b"COMMIT\0"), &[], true);
        log.client_message(FrontendKind::Query, &frame(b'Q', b"SELECT\0"), &[], true);
        assert!(log.bytes() > 0);
        log.completed(b'I', hash(2), Some(template));
        assert_eq!(log.done().len(), 0);
        assert_eq!(log.len(), 1, "the pipelined SELECT is still in flight");
        assert_eq!(log.last_safe_point(), Some((template, hash(2))));
        log.completed(b'I', hash(2), Some(template));
        assert!(log.is_empty());
        assert_eq!(log.bytes(), 0);
    }

    #[test]
    fn copy_data_joins_the_command_in_copy_mode() {
        let mut log = ReplayLog::new(1024);
        log.client_message(
            FrontendKind::Query,
            &frame(b'Q', b"COPY t FROM STDIN\0"),
            &[],
            true,
        );
        log.copy_in_started();
        log.client_message(FrontendKind::CopyData, &frame(b'd', b"1\n"), &[], false);
        log.client_message(FrontendKind::CopyDone, &frame(b'c', b""), &[], false);
        log.client_message(FrontendKind::Query, &frame(b'Q', b"SELECT\0"), &[], true);
        let copy = log.completed(b'I', hash(1), None).expect("copy");
        assert_eq!(&copy.messages[copy.messages.len() - 5..], b"c\0\0\0\x04");
        let select = log.completed(b'I', hash(1), None).expect("select");
        assert_eq!(select.messages[0], b'Q');
    }

    #[test]
    fn syncs_ignored_in_copy_mode_end_nothing() {
        let mut log = ReplayLog::new(1024);
        log.client_message(
            FrontendKind::Bind,
            &frame(b'B', b"\0\0\0\0\0\0\0\0"),
            &[],
            false,
        );
        log.client_message(
            FrontendKind::Execute,
            &frame(b'E', b"\0\0\0\0\0"),
            &[],
            false,
        );
        log.client_message(FrontendKind::Sync, &frame(b'S', b""), &[], true);
        log.syncs_ignored(1);
        assert_eq!(log.len(), 1);
        log.client_message(FrontendKind::CopyData, &frame(b'd', b"x"), &[], false);
        log.client_message(FrontendKind::CopyDone, &frame(b'c', b""), &[], false);
        log.client_message(FrontendKind::Sync, &frame(b'S', b""), &[], true);
        let command = log.completed(b'I', hash(1), None).expect("command");
        assert_eq!(command.message_len, 13 + 10 + 5 + 6 + 5 + 5);
        assert_eq!(log.len(), log.done().len(), "nothing left in flight");
    }

    #[test]
    fn past_the_bound_nothing_is_kept_until_the_next_safe_point() {
        let mut log = ReplayLog::new(64);
        let template = TemplateId::from_bytes([5; 32]);
        log.client_message(FrontendKind::Query, &frame(b'Q', b"BEGIN\0"), &[], true);
        log.completed(b'T', hash(1), None);
        let big = frame(b'Q', &[b'x'; 100]);
        assert!(log.client_message(FrontendKind::Query, &big, &[], true));
        assert!(log.over_bound());
        assert_eq!(log.bytes(), 0);
        assert!(log.done().iter().all(|c| c.omitted == Omission::OverBound));
        let over = log.completed(b'T', hash(1), None).expect("over");
        assert_eq!(over.omitted, Omission::OverBound);
        assert!(over.messages.is_empty());
        assert_eq!(over.message_len, big.len() as u64);
        log.client_message(FrontendKind::Query, &frame(b'Q', b"COMMIT\0"), &[], true);
        log.completed(b'I', hash(2), Some(template));
        assert!(!log.over_bound());
        log.client_message(FrontendKind::Query, &frame(b'Q', b"BEGIN\0"), &[], true);
        assert_eq!(log.bytes(), 11);
    }

    #[test]
    fn credentials_are_never_kept() {
        let mut log = ReplayLog::new(1024);
        log.client_message(
            FrontendKind::Parse,
            &frame(b'P', b"\0SELECT\0\0\0"),
            &[],
            false,
        );
        log.mark_credential();
        log.client_message(FrontendKind::Sync, &frame(b'S', b""), &[], true);
        let command = log.completed(b'I', hash(1), None).expect("command");
        assert_eq!(command.omitted, Omission::Credential);
        assert!(command.messages.is_empty());
        assert_eq!(log.bytes(), 0);
    }

    #[test]
    fn errors_are_digested_by_severity_and_sqlstate_only() {
        let error = |code: &[u8], text: &[u8], file: &[u8]| {
            let mut body = b"SERROR\0VERROR\0C".to_vec();
            body.extend_from_slice(code);
            body.extend_from_slice(b"\0M");
            body.extend_from_slice(text);
            body.extend_from_slice(b"\0F");
            body.extend_from_slice(file);
            body.extend_from_slice(b"\0L12\0RparserOpenTable\0\0");
            frame(b'E', &body)
        };
        let digest_of = |message: Vec<u8>| {
            let mut log = ReplayLog::new(1024);
            log.client_message(FrontendKind::Query, &frame(b'Q', b"SELECT\0"), &[], true);
            log.server_message(b'E', &message);
            log.completed(b'I', hash(1), None)
                .expect("done")
                .result_digest
        };
        let first = digest_of(error(b"42P01", b"no such table", b"parse_relation.c"));
        let reworded = digest_of(error(b"42P01", b"relation missing", b"elsewhere.c"));
        let other_code = digest_of(error(b"42703", b"no such table", b"parse_relation.c"));
        assert_eq!(first, reworded);
        assert_ne!(first, other_code);
    }
}
