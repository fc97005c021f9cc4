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

use crate::template::{StateHash, TemplateId};
use crate::wire::frame::HEADER_LEN;
use crate::wire::frontend::FrontendKind;

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
    digest: blake3::Hasher,
    /// The request-ending message has been sent.
    ended: bool,
    /// The server is in COPY FROM STDIN mode for this request: the
    /// client's COPY data belongs to it.
    copy_in: bool,
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
    pub result_digest: [u8; 32],
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
    next_seq: u64,
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
            next_seq: 1,
        }
    }

    /// A client message sent to the server. `ends_request` for a Query,
    /// FunctionCall or a Sync the server will answer.
    pub fn client_message(
        &mut self,
        kind: FrontendKind,
        message: &[u8],
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

    /// The command that is still open, made if needed.
    fn open_command(&mut self) -> usize {
        if self.in_flight.back().is_none_or(|command| command.ended) {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.in_flight.push_back(Command {
                seq,
                messages: Vec::new(),
                message_len: 0,
                omitted: if self.over_bound {
                    Omission::OverBound
                } else {
                    Omission::None
                },
                digest: blake3::Hasher::new(),
                ended: false,
                copy_in: false,
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
    /// result; neither are the parts of an error that name the server's
    /// source file and line.
    pub fn server_message(&mut self, tag: u8, message: &[u8]) {
        if matches!(tag, b'A' | b'S' | b'N') {
            return;
        }
        let Some(command) = self.in_flight.front_mut() else {
            return;
        };
        if tag == b'E' {
            digest_error(&mut command.digest, message);
        } else {
            command.digest.update(message);
        }
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
        command.digest.update(&[b'Z', status]);
        let completed = Completed {
            seq: command.seq,
            message_len: command.message_len,
            omitted: command.omitted,
            messages: Bytes::from(command.messages),
            state_hash,
            result_digest: *command.digest.finalize().as_bytes(),
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
}

/// An error's identity without the server's source location (`F`, `L`,
/// `R`), which differ between server builds.
fn digest_error(digest: &mut blake3::Hasher, message: &[u8]) {
    digest.update(b"E");
    let mut rest = message.get(HEADER_LEN..).unwrap_or_default();
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = memchr::memchr(0, tail).unwrap_or(tail.len());
        if !matches!(field, b'F' | b'L' | b'R') {
            digest.update(&[field]);
            digest.update(&tail[..end]);
            digest.update(&[0]);
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
}
