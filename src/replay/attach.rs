//! `attach`: bring a fresh server connection to where a session's lost one
//! was.
//!
//! The connection starts at the session's startup template. Attach applies
//! the restore plan to the template of the session's last safe point and
//! checks the state hash it reaches, then replays every command answered
//! since that safe point and checks, command by command, that the state
//! hash and the digest of the result equal the recorded ones. Nothing the
//! replay produces reaches the client. The commands that were in flight
//! are sent again after them; the part of the oldest one's answer the
//! client already received is read, checked against its digest and
//! dropped, and the session relays the rest.
//!
//! The replay runs through a flow of its own (the same state tracking that
//! recorded the commands), so the hashes it compares are computed the same
//! way as the recorded ones. Both the replayed commands and the in-flight
//! ones go out in one write: the pause is one round trip plus the server's
//! work.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use crate::backend::stream::ServerStream;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::ServerConnection;
use crate::proxy::Shared;
use crate::session::answer_digest::AnswerDigest;
use crate::session::flow::{ClientStep, Flow, StateEvent};
use crate::session::replay_log::Completed;
use crate::state::Tracker;
use crate::stats::Stats;
use crate::template::{fold_guc_name, StateHash, Template};
use crate::wire::backend as server_msg;
use crate::wire::frame::{self, Next};
use crate::wire::frontend;

/// Why a session could not be carried over: the fixed list of causes a
/// client finds in the DETAIL of its 08006 error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A replayed command's result or state differed from the recorded one.
    ReplayDiverged,
    /// The session holds state no replay can rebuild (temporary tables,
    /// WITH HOLD cursors, session advisory locks, unclassified statements).
    NonRecoverableState,
    /// The replay log outgrew `max_replay_log` since the last safe point.
    ReplayLogOverflow,
    /// No server connection could be opened within `failover_budget`.
    BudgetExhausted,
    /// The servers that answered would not take the session.
    NoWritableServer,
    /// Two servers claim to be writable.
    SplitBrain,
}

impl Cause {
    /// The name clients see in the DETAIL field.
    pub fn code(self) -> &'static str {
        match self {
            Cause::ReplayDiverged => "replay-diverged",
            Cause::NonRecoverableState => "non-recoverable-state",
            Cause::ReplayLogOverflow => "replay-log-overflow",
            Cause::BudgetExhausted => "budget-exhausted",
            Cause::NoWritableServer => "no-writable-server",
            Cause::SplitBrain => "split-brain",
        }
    }
}

/// Why attach stopped.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The session cannot go on: replay is not provably identical.
    #[error("{reason}")]
    Refused { cause: Cause, reason: String },
    /// The new connection failed too; another one may do.
    #[error("the new server connection failed during the restore: {0}")]
    Connection(String),
}

impl AttachError {
    fn diverged(reason: String) -> Self {
        AttachError::Refused {
            cause: Cause::ReplayDiverged,
            reason,
        }
    }
}

impl From<io::Error> for AttachError {
    fn from(err: io::Error) -> Self {
        AttachError::Connection(err.to_string())
    }
}

/// What the session gives attach.
pub struct Replay<'a> {
    pub startup: &'a [(Bytes, Bytes)],
    /// The template of the last safe point and, when known, its state hash.
    pub target: Arc<Template>,
    pub target_hash: Option<StateHash>,
    /// Commands answered since the last safe point, in order.
    pub done: &'a [Completed],
    /// The client messages of the commands in flight, in order.
    pub in_flight: Bytes,
    /// Messages of the oldest in-flight command's answer the client has
    /// received, and their digest.
    pub answered: (u32, [u8; 32]),
    /// Notices the client received for that command.
    pub notices_seen: u32,
    /// Parameter values the client knows, by folded name.
    pub known_parameters: &'a HashMap<Bytes, Bytes>,
    /// The process id the client knows the session by.
    pub client_process_id: i32,
}

/// A connection brought to the session's state.
pub struct Attached {
    pub stream: ServerStream,
    pub process_id: i32,
    pub secret_key: i32,
    /// Bytes read past what attach consumed: the rest of the in-flight
    /// answers, for the session to relay.
    pub inbox: BytesMut,
    /// For the client, before anything else: notifications that arrived
    /// meanwhile and ParameterStatus for values that changed.
    pub to_client: BytesMut,
    /// ParameterStatus values that changed, for the session's tracker.
    pub changed_parameters: Vec<(Bytes, Bytes)>,
    pub replayed: usize,
}

/// Attaches `server` to the session that `replay` describes.
pub async fn attach(
    server: ServerConnection,
    shared: &Arc<Shared>,
    replay: Replay<'_>,
    max_message_size: usize,
) -> Result<Attached, AttachError> {
    let ServerConnection {
        mut stream,
        process_id,
        secret_key,
        greeting,
        ready,
        pending,
        ..
    } = server;
    let mut link = Link {
        inbox: pending,
        to_client: BytesMut::new(),
        statuses: HashMap::new(),
        max_message_size,
        rewrite: (process_id, replay.client_process_id),
    };
    let greeting_parameters = crate::session::greeting_parameters(&greeting);
    for (name, value) in &greeting_parameters {
        link.note_status(name, value);
    }
    // Counted apart: the replayed commands are not new traffic.
    let scratch = Arc::new(Stats::default());
    let tracker = Tracker::new(
        Arc::clone(&shared.registry),
        Arc::clone(&scratch),
        replay
            .startup
            .iter()
            .map(|(name, value)| (&name[..], &value[..])),
        greeting_parameters.iter().copied(),
    );
    let mut flow = Flow::new(
        tracker,
        Arc::clone(shared),
        scratch,
        true,
        false,
        server_msg::ready_status(&ready).unwrap_or(b'I'),
        usize::MAX,
    );

    // The template.
    flow.restore(replay.target.as_ref().clone());
    if !flow.to_server.is_empty() {
        let plan = flow.to_server.split();
        stream.write_all(&plan).await?;
        while !flow.at_boundary() {
            let (tag, message) = link.next(&mut stream).await?;
            if let Some(message) = link.own_server_frame(tag, message)? {
                flow.server_frame(tag, &message);
            }
        }
    }
    if let Some(error) = flow.restore_error.take() {
        return Err(AttachError::diverged(error));
    }
    flow.to_client.clear();
    flow.events.clear();
    if let Some(expected) = replay.target_hash {
        let reached = flow.tracker.state_hash();
        if reached != expected {
            return Err(AttachError::diverged(
                "the restored template does not have the state hash of the last safe point"
                    .to_owned(),
            ));
        }
    }

    // The replay log, then what was in flight: one write.
    let mut out = BytesMut::new();
    for command in replay.done {
        feed_client(&mut flow, command)?;
        out.extend_from_slice(&command.messages);
    }
    out.extend_from_slice(&replay.in_flight);
    if !out.is_empty() {
        stream.write_all(&out).await?;
    }
    let mut verified = 0;
    // The first error of the command being verified, for the reason.
    let mut replay_error: Option<String> = None;
    while verified < replay.done.len() {
        let (tag, message) = link.next(&mut stream).await?;
        if tag == b'E' && replay_error.is_none() {
            let summary = server_msg::error_summary(&message);
            replay_error = Some(format!("{} ({})", summary.message, summary.code));
        }
        if let Some(message) = link.own_server_frame(tag, message)? {
            flow.server_frame(tag, &message);
        }
        flow.to_client.clear();
        for event in flow.events.drain(..) {
            let StateEvent::Command { completed, .. } = event else {
                continue;
            };
            let original = &replay.done[verified];
            if completed.result_digest != original.result_digest {
                let got = replay_error
                    .map(|error| format!(": this time it failed with {error}"))
                    .unwrap_or_default();
                return Err(AttachError::diverged(format!(
                    "replayed command {} returned a different result{got}",
                    original.seq
                )));
            }
            replay_error = None;
            if completed.state_hash != original.state_hash {
                return Err(AttachError::diverged(format!(
                    "replayed command {} left the session in a different state",
                    original.seq
                )));
            }
            verified += 1;
        }
    }

    // What the client already has of the oldest in-flight answer.
    let (answered, expected) = replay.answered;
    let mut notices_left = replay.notices_seen;
    if answered > 0 || notices_left > 0 {
        let mut digest = AnswerDigest::default();
        let mut seen = 0;
        while seen < answered {
            let (tag, message) = link.next(&mut stream).await?;
            match tag {
                b'A' | b'N' | b'S' => {
                    if tag == b'N' {
                        notices_left = notices_left.saturating_sub(1);
                    }
                    link.own_server_frame(tag, message)?;
                }
                b'Z' => {
                    return Err(AttachError::diverged(
                        "the command in flight ended sooner on the new server connection"
                            .to_owned(),
                    ))
                }
                _ => {
                    link.check_fatal(tag, &message)?;
                    digest.add(tag, &message);
                    seen += 1;
                }
            }
        }
        if digest.finish() != expected {
            return Err(AttachError::diverged(
                "the command in flight returned a different result on the new server connection"
                    .to_owned(),
            ));
        }
        // A ParameterStatus right after the part the client has may have
        // reached it too; it is taken here and reported below only if the
        // client's value differs. Notices the client has are not repeated.
        loop {
            match link.peek_tag(&mut stream).await? {
                b'S' => {}
                b'N' if notices_left > 0 => notices_left -= 1,
                _ => break,
            }
            let (tag, message) = link.next(&mut stream).await?;
            link.own_server_frame(tag, message)?;
        }
    }

    // Parameters the client knows with another value now.
    let mut changed_parameters = Vec::new();
    for (folded, (name, value)) in &link.statuses {
        if replay.known_parameters.get(folded) != Some(value) {
            frame::write_frame(&mut link.to_client, Some(b'S'), |body| {
                body.extend_from_slice(name);
                body.extend_from_slice(&[0]);
                body.extend_from_slice(value);
                body.extend_from_slice(&[0]);
            });
            changed_parameters.push((name.clone(), value.clone()));
        }
    }
    Ok(Attached {
        stream,
        process_id,
        secret_key,
        inbox: link.inbox,
        to_client: link.to_client,
        changed_parameters,
        replayed: replay.done.len(),
    })
}

/// Hands a recorded command's messages to the replay flow, which must
/// forward every one of them as it did when they were recorded.
fn feed_client(flow: &mut Flow, command: &Completed) -> Result<(), AttachError> {
    let mut rest = &command.messages[..];
    while !rest.is_empty() {
        let len = match frame::next(rest, usize::MAX) {
            Ok(Next::Frame { len, .. }) => len,
            _ => {
                return Err(AttachError::diverged(format!(
                    "recorded command {} is not a whole message sequence",
                    command.seq
                )))
            }
        };
        let kind = frontend::check(&rest[..len]).map_err(|err| {
            AttachError::diverged(format!("recorded command {}: {err}", command.seq))
        })?;
        if flow.client_frame(kind, &rest[..len]) != ClientStep::Forward {
            return Err(AttachError::diverged(format!(
                "recorded command {} is no longer sent as it was",
                command.seq
            )));
        }
        flow.to_server.clear();
        rest = &rest[len..];
    }
    Ok(())
}

/// The new connection's read side during attach.
struct Link {
    inbox: BytesMut,
    to_client: BytesMut,
    /// The last ParameterStatus per folded name: the server's spelling and
    /// value.
    statuses: HashMap<Bytes, (Bytes, Bytes)>,
    max_message_size: usize,
    /// Notifications from the new server process carry the process id the
    /// client knows.
    rewrite: (i32, i32),
}

impl Link {
    /// The next whole frame.
    async fn next(&mut self, stream: &mut ServerStream) -> Result<(u8, BytesMut), AttachError> {
        loop {
            match frame::next(&self.inbox, self.max_message_size) {
                Ok(Next::Frame { tag, len }) => {
                    if !server_msg::is_known_tag(tag) {
                        return Err(AttachError::Connection(format!(
                            "server sent an unknown message type {:?}",
                            char::from(tag)
                        )));
                    }
                    return Ok((tag, self.inbox.split_to(len)));
                }
                Ok(Next::Incomplete { .. }) => {}
                Err(err) => return Err(AttachError::Connection(err.to_string())),
            }
            self.inbox.reserve(16 * 1024);
            if stream.read_buf(&mut self.inbox).await? == 0 {
                return Err(AttachError::Connection(
                    "the server closed the connection".to_owned(),
                ));
            }
        }
    }

    /// The tag of the next frame, which stays in the inbox.
    async fn peek_tag(&mut self, stream: &mut ServerStream) -> Result<u8, AttachError> {
        while self.inbox.is_empty() {
            self.inbox.reserve(16 * 1024);
            if stream.read_buf(&mut self.inbox).await? == 0 {
                return Err(AttachError::Connection(
                    "the server closed the connection".to_owned(),
                ));
            }
        }
        Ok(self.inbox[0])
    }

    fn note_status(&mut self, name: &[u8], value: &[u8]) {
        self.statuses.insert(
            fold_guc_name(name),
            (Bytes::copy_from_slice(name), Bytes::copy_from_slice(value)),
        );
    }

    /// Takes what is not part of a result: notifications go to the
    /// client, notices are dropped (the client saw them the first time),
    /// ParameterStatus is noted. Returns the frame for the flow otherwise,
    /// ParameterStatus included.
    fn own_server_frame(
        &mut self,
        tag: u8,
        mut message: BytesMut,
    ) -> Result<Option<BytesMut>, AttachError> {
        match tag {
            b'A' => {
                server_msg::rewrite_notification_pid(&mut message, self.rewrite.0, self.rewrite.1);
                self.to_client.extend_from_slice(&message);
                Ok(None)
            }
            b'N' => Ok(None),
            b'S' => {
                if let Some((name, value)) = server_msg::parameter_status(&message) {
                    self.note_status(name, value);
                }
                Ok(Some(message))
            }
            _ => {
                self.check_fatal(tag, &message)?;
                Ok(Some(message))
            }
        }
    }

    fn check_fatal(&self, tag: u8, message: &[u8]) -> Result<(), AttachError> {
        if tag == b'E' {
            let summary = server_msg::error_summary(message);
            if summary.is_fatal() {
                return Err(AttachError::Connection(format!(
                    "{} ({})",
                    summary.message, summary.code
                )));
            }
        }
        Ok(())
    }
}
