//! Failover: carry a session whose server connection was lost over to a
//! new one, so that the client sees a pause instead of an error.
//!
//! The session first checks that its work can be redone exactly: nothing
//! non-recoverable since the last safe point, a replay log within its
//! bound, and no command in flight that could have committed. Then it
//! opens new server connections, with backoff, until one can be attached
//! (see [`crate::replay::attach`]) or the budget runs out. While it tries,
//! nothing is read from the client: its traffic waits in the socket.
//!
//! Every attempt ends in a journal record and a counter. A session that
//! cannot be carried over ends with SQLSTATE 08006 and a DETAIL naming the
//! cause, or 08007 when a command in flight may have committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::answer_digest::AnswerDigest;
use super::cancel::CancelTarget;
use super::flow::ServerStep;
use super::relay::Outbox;
use super::replay_log::Omission;
use super::Session;
use crate::backend::health::{self, Refusal, Role};
use crate::backend::{self, ConnectError, ServerConnection};
use crate::config::{Backend, Config};
use crate::journal::OutcomeKind;
use crate::replay::attach::{self, AttachError, Attached, Cause, Replay};
use crate::replay::outcome::{self, CommitMark, Verdict};
use crate::replay::risk;
use crate::wire::frame::{self, Next};
use crate::wire::reply::{self, sqlstate, Severity};

/// The first pause between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Whether a FATAL error with SQLSTATE `code` means the server connection
/// was lost rather than ended on purpose. 25P03 (idle in transaction
/// timeout), 57P05 (idle session timeout) and 57P04 (database dropped)
/// are on purpose; so is 08P01, which the server sends about what the
/// client sent and would send again after a replay.
pub(super) fn is_connection_loss(code: &str, replay_terminated: bool) -> bool {
    match code {
        "57P01" => replay_terminated,
        "57P02" | "57P03" => true,
        "08P01" => false,
        code => code.starts_with("08"),
    }
}

/// How the server connection was lost.
pub(super) struct Loss {
    pub reason: String,
    /// The server said so with a FATAL error: it sent nothing after it,
    /// so a request whose answer had not begun never ran.
    pub said_fatal: bool,
}

/// Why a session could not be carried over.
enum Failure {
    /// 08006 with the cause in DETAIL.
    Refused { cause: Cause, reason: String },
    /// 08007: a command in flight may have committed; why it is unknown.
    OutcomeUnknown(String),
}

impl Failure {
    fn refused(cause: Cause, reason: impl Into<String>) -> Failure {
        Failure::Refused {
            cause,
            reason: reason.into(),
        }
    }

    fn detail(&self) -> String {
        match self {
            Failure::Refused { cause, reason } => format!("{}: {reason}", cause.code()),
            Failure::OutcomeUnknown(reason) => format!("transaction-resolution-unknown: {reason}"),
        }
    }

    /// The error the client gets.
    fn client_error(&self, lost: &str) -> BytesMut {
        let mut out = BytesMut::new();
        match self {
            Failure::Refused { cause, reason } => reply::error(
                &mut out,
                Severity::Fatal,
                sqlstate::CONNECTION_FAILURE,
                &format!("server connection was lost ({lost}) and the session could not be carried over: {reason}"),
                Some(cause.code()),
            ),
            Failure::OutcomeUnknown(_) => reply::error(
                &mut out,
                Severity::Fatal,
                sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
                &format!(
                    "server connection was lost ({lost}) while a command that may have committed was in flight; whether it committed is unknown"
                ),
                Some("transaction-resolution-unknown"),
            ),
        }
        out
    }
}

/// An attempt that did not attach.
enum Attempt {
    /// Worth another try: the server is away or restarting.
    Retry(String),
    Fail(Failure),
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    /// Replaces the lost server connection. `Ok` when the session goes on
    /// on a new one; otherwise the error for the client.
    pub(super) async fn fail_over(&mut self, loss: Loss) -> Result<(), BytesMut> {
        let lost = loss.reason.as_str();
        let stats = Arc::clone(&self.shared.stats);
        stats.failovers.inc();
        let started = Instant::now();
        tracing::info!(backend = %self.backend.name, reason = lost, "server connection lost; carrying the session over");
        match self.carry_over(started, loss.said_fatal).await {
            Ok((backend, attached)) => {
                self.backend = backend;
                let pause = started.elapsed();
                let replayed = attached.replayed;
                self.adopt(attached);
                self.warn_of_missed_notifications(pause);
                stats.failovers_recovered.inc();
                stats.commands_replayed.add(replayed as u64);
                self.outcome(
                    OutcomeKind::Recovered,
                    format!("replayed {replayed} commands in {pause:?} after: {lost}"),
                );
                tracing::info!(
                    backend = %self.backend.name,
                    server_pid = self.server_pid,
                    replayed,
                    pause_ms = pause.as_secs_f64() * 1000.0,
                    "session carried over to a new server connection"
                );
                Ok(())
            }
            Err(failure) => {
                stats.failovers_failed.inc();
                let detail = failure.detail();
                tracing::warn!(backend = %self.backend.name, reason = lost, cause = %detail, "session could not be carried over");
                self.outcome(OutcomeKind::Failed, detail);
                Err(failure.client_error(lost))
            }
        }
    }

    /// Checks that the session can be replayed, then attaches new server
    /// connections until one takes or the budget is spent.
    async fn carry_over(
        &mut self,
        started: Instant,
        said_fatal: bool,
    ) -> Result<(Backend, Attached), Failure> {
        let mut unsettled = self.check_replayable(said_fatal)?;
        let config = self.shared.config();
        let budget = config.failover_budget.0;
        let deadline = started + budget;
        let old_process_id = self.server_pid;
        let mut backoff = FIRST_BACKOFF;
        let mut last_problem = String::from("no attempt finished");
        let mut attempts = 0u32;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::refused(
                    Cause::BudgetExhausted,
                    format!(
                        "no server connection could be attached within {budget:?} ({attempts} attempts; last: {last_problem})"
                    ),
                ));
            }
            attempts += 1;
            let attempt = self.attempt(&mut unsettled, old_process_id);
            match tokio::time::timeout(deadline - now, attempt).await {
                Ok(Ok(attached)) => return Ok(attached),
                Ok(Err(Attempt::Fail(failure))) => return Err(failure),
                Ok(Err(Attempt::Retry(problem))) => {
                    tracing::debug!(backend = %self.backend.name, attempt = attempts, problem = %problem, "failover attempt failed; retrying");
                    last_problem = problem;
                }
                Err(_) => last_problem = "the last attempt ran out of time".to_owned(),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One new server connection: settle a COMMIT in flight, then attach.
    async fn attempt(
        &mut self,
        unsettled: &mut Option<CommitMark>,
        old_process_id: i32,
    ) -> Result<(Backend, Attached), Attempt> {
        let config = self.shared.config();
        let max_message_size = config.max_message_size();
        let (chosen, mut server) = self.connect_writable(&config).await?;
        if let Some(mark) = unsettled.clone() {
            let verdict = outcome::settle(
                &mut server.stream,
                &mut server.pending,
                &mark,
                old_process_id,
                max_message_size,
            )
            .await
            .map_err(Attempt::Retry)?;
            tracing::info!(backend = %self.backend.name, xid = ?mark.xid, ?verdict, "outcome of the COMMIT in flight");
            match verdict {
                Verdict::Committed => self.answer_commit().map_err(Attempt::Fail)?,
                Verdict::Aborted => {}
                Verdict::Unknown(reason) => {
                    return Err(Attempt::Fail(Failure::OutcomeUnknown(reason)))
                }
            }
            *unsettled = None;
        }
        let (target, target_hash) = self.flow.restore_target().ok_or_else(|| {
            Attempt::Fail(Failure::refused(
                Cause::NonRecoverableState,
                "the template of the last safe point is no longer registered",
            ))
        })?;
        let mut in_flight = BytesMut::new();
        for command in self.flow.replay.in_flight() {
            in_flight.extend_from_slice(&command.messages);
        }
        let replay = Replay {
            startup: &self.startup.parameters,
            target,
            target_hash,
            done: self.flow.replay.done(),
            in_flight: in_flight.freeze(),
            answered: self.flow.replay.answer_so_far(),
            notices_seen: self.flow.replay.notices_so_far(),
            known_parameters: self.flow.tracker.reported(),
            client_process_id: self.cancel.key().process_id,
        };
        attach::attach(server, &self.shared, replay, max_message_size)
            .await
            .map(|attached| (chosen, attached))
            .map_err(|err| match err {
                AttachError::Refused { cause, reason } => {
                    Attempt::Fail(Failure::Refused { cause, reason })
                }
                AttachError::Connection(problem) => Attempt::Retry(problem),
            })
    }

    /// A connection to the server that takes writes now: tried in the
    /// order [`Health::preferred`] gives, skipping standbys and old
    /// primaries; two writable servers are a split brain.
    ///
    /// [`Health::preferred`]: crate::backend::health::Health::preferred
    async fn connect_writable(
        &self,
        config: &Config,
    ) -> Result<(Backend, ServerConnection), Attempt> {
        let health = &self.shared.health;
        let credential = self.credential.as_ref();
        let tls = self.shared.tls();
        let max_message_size = config.max_message_size();
        let mut problems = Vec::new();
        for candidate in health.preferred(&config.backends) {
            let connected = backend::connect(
                &candidate,
                &self.startup,
                credential,
                &tls.server,
                config.connect_timeout.0,
                &config.tcp_keepalive,
                max_message_size,
            )
            .await;
            let mut server = match connected.map_err(connect_problem) {
                Ok(server) => server,
                Err(Attempt::Retry(problem)) => {
                    health.record(&candidate.name, Err(problem.clone()));
                    problems.push(format!("\"{}\": {problem}", candidate.name));
                    continue;
                }
                Err(fail) => return Err(fail),
            };
            let role =
                match health::ask_role(&mut server.stream, &mut server.pending, max_message_size)
                    .await
                {
                    Ok(role) => role,
                    Err(err) => {
                        problems.push(format!("\"{}\": {err}", candidate.name));
                        continue;
                    }
                };
            health.record(&candidate.name, Ok(role.clone()));
            if !role.writable {
                problems.push(format!("\"{}\" is in recovery (a standby)", candidate.name));
                continue;
            }
            let others = self.other_roles(&candidate, config).await;
            match health.refusal(&candidate.name, &role, &others) {
                None => return Ok((candidate, server)),
                Some(refusal @ Refusal::SplitBrain { .. }) => {
                    return Err(Attempt::Fail(Failure::refused(
                        Cause::SplitBrain,
                        format!(
                            "server \"{}\" is writable and {refusal}; Reprise will not choose",
                            candidate.name
                        ),
                    )))
                }
                Some(refusal) => {
                    problems.push(format!("\"{}\": {refusal}", candidate.name));
                }
            }
        }
        Err(Attempt::Retry(if problems.is_empty() {
            "no backend is configured".to_owned()
        } else {
            problems.join("; ")
        }))
    }

    /// The roles of the backends other than `chosen`: as last observed
    /// when that is recent, else asked now with the session's login.
    async fn other_roles(&self, chosen: &Backend, config: &Config) -> Vec<(String, Option<Role>)> {
        let health = &self.shared.health;
        let fresh = (config.health_check_period.0 * 3).max(Duration::from_secs(2));
        let lookups = config
            .backends
            .iter()
            .filter(|other| other.name != chosen.name)
            .map(|other| async move {
                let role = match health.fresh_role(&other.name, fresh) {
                    Some(role) => role,
                    None => {
                        let asked = health::probe(
                            other,
                            &self.startup,
                            self.credential.as_ref(),
                            &self.shared.tls().server,
                            config,
                        )
                        .await;
                        health.record(&other.name, asked.clone());
                        asked.ok()
                    }
                };
                (other.name.clone(), role)
            });
        futures_util::future::join_all(lookups).await
    }

    /// The COMMIT in flight committed: the client gets the answer the old
    /// server connection could not give, and the session moves on from
    /// there, as if it had arrived.
    fn answer_commit(&mut self) -> Result<(), Failure> {
        // A wrapped autocommit write: the client has its answer but for
        // what the COMMIT held back.
        let wrapped = self.flow.take_wrapped_tail();
        let (mut answer, answered) = match wrapped {
            Some(Some(tail)) => (tail, 0),
            Some(None) => {
                return Err(Failure::refused(
                    Cause::NonRecoverableState,
                    "the write committed, but the rest of its answer was lost with the connection",
                ))
            }
            None => {
                let answer = self
                    .flow
                    .replay
                    .in_flight()
                    .next()
                    .and_then(|command| commit_answer(&command.messages))
                    .ok_or_else(|| {
                        Failure::refused(
                            Cause::NonRecoverableState,
                            "the committed request holds more than a COMMIT; its answer cannot be given",
                        )
                    })?;
                (answer, self.flow.replay.answer_so_far().0)
            }
        };
        let received = self.flow.replay.answer_so_far().1;
        let mut seen = AnswerDigest::default();
        let mut index = 0;
        while let Ok(Next::Frame { tag, len }) = frame::next(&answer, usize::MAX) {
            let message = answer.split_to(len);
            if index < answered {
                seen.add(tag, &message);
            } else {
                if index == answered && answered > 0 && seen.so_far() != received {
                    return Err(Failure::refused(
                        Cause::ReplayDiverged,
                        "the client received an answer to the COMMIT that a commit does not give",
                    ));
                }
                if self.flow.server_frame(tag, &message) == ServerStep::Forward {
                    self.relay.to_client.push(message.freeze());
                }
                self.push_flow_output();
            }
            index += 1;
        }
        self.flush_events();
        let replay = &self.flow.replay;
        let commands = replay
            .done()
            .iter()
            .map(|command| &command.risk)
            .chain(replay.in_flight().map(|command| &command.risk));
        if !risk::rerunnable(false, commands) {
            return Err(Failure::refused(
                Cause::NonRecoverableState,
                "the committed transaction left session state that only running it again could rebuild",
            ));
        }
        Ok(())
    }

    /// Whether the work since the last safe point can be redone exactly.
    /// A COMMIT in flight whose transaction id is known is returned: its
    /// outcome is asked of the new server connection. `said_fatal`: the
    /// server ended the connection with a FATAL error.
    fn check_replayable(&mut self, said_fatal: bool) -> Result<Option<CommitMark>, Failure> {
        let non_recoverable = self.flow.tracker.replay_state().non_recoverable;
        if !non_recoverable.is_empty() {
            let held: Vec<&str> = non_recoverable.iter().map(|kind| kind.describe()).collect();
            return Err(Failure::refused(
                Cause::NonRecoverableState,
                format!(
                    "the session holds {}, which no replay can rebuild",
                    held.join(", ")
                ),
            ));
        }
        if self.flow.tracker.unreplayable() {
            return Err(Failure::refused(
                Cause::NonRecoverableState,
                "a statement since the last safe point cannot be replayed as sent",
            ));
        }
        let replay = &self.flow.replay;
        if replay.over_bound() {
            return Err(Failure::refused(
                Cause::ReplayLogOverflow,
                "the commands since the last safe point outgrew max_replay_log",
            ));
        }
        let carries_credential = replay
            .done()
            .iter()
            .map(|command| command.omitted)
            .chain(replay.in_flight().map(|command| command.omitted))
            .any(|omitted| omitted == Omission::Credential);
        if carries_credential {
            return Err(Failure::refused(
                Cause::NonRecoverableState,
                "a command since the last safe point carries a credential, which Reprise does not keep",
            ));
        }
        // A commit the client saw completed, with no safe point after it:
        // the session held state no template restores when it committed
        // (a hold cursor, say), or the commit chained a new transaction.
        if !risk::rerunnable(false, replay.done().iter().map(|command| &command.risk)) {
            return Err(Failure::refused(
                Cause::NonRecoverableState,
                "a transaction committed since the last safe point, which a replay would commit again",
            ));
        }
        // Only the oldest command in flight can be a COMMIT worth settling:
        // answers come in order, so nothing after it was answered either.
        let oldest = replay.in_flight().next().map(|command| command.seq);
        let mark = oldest
            .and_then(|seq| self.flow.commit_mark(seq))
            .cloned()
            .or_else(|| {
                // Its question was cut off: the guard token may still tell.
                (!said_fatal)
                    .then(|| self.flow.unanswered_commit_mark())
                    .flatten()
                    .filter(|mark| Some(mark.seq) == oldest)
            });
        // The question ahead of a COMMIT was not answered before the
        // server's last word: the COMMIT never ran.
        let not_run = said_fatal
            .then(|| self.flow.unanswered_xid_question())
            .flatten();
        let settled_seq = not_run.or(mark.as_ref().map(|mark| mark.seq));
        let commands = || {
            replay
                .done()
                .iter()
                .map(|command| (&command.risk, false))
                .chain(
                    replay
                        .in_flight()
                        .map(|command| (&command.risk, settled_seq == Some(command.seq))),
                )
        };
        let question = if risk::rerunnable(false, commands().map(|(risk, _)| risk)) {
            None
        } else if settled_seq.is_some() && risk::rerunnable_settled(false, commands()) {
            if not_run.is_some() {
                None
            } else {
                mark
            }
        } else {
            tracing::debug!(
                in_flight = ?replay.in_flight().map(|command| command.seq).collect::<Vec<_>>(),
                done = replay.done().len(),
                ?settled_seq,
                said_fatal,
                "no proof of the outcome of the commands in flight"
            );
            return Err(Failure::OutcomeUnknown(
                "a command that may have committed was in flight".to_owned(),
            ));
        };
        self.flow
            .forget_own_requests()
            .map_err(|reason| Failure::refused(Cause::NonRecoverableState, reason))?;
        Ok(question)
    }

    /// Makes the attached connection the session's server connection.
    fn adopt(&mut self, attached: Attached) {
        // Owed only when the COMMIT was found committed; a re-run answers.
        self.flow.take_wrapped_tail();
        let relay = &mut self.relay;
        relay.server = attached.stream;
        relay.from_server = attached.inbox;
        // What was queued for the old server is in the replay log and went
        // to the new one during the attach.
        relay.to_server = Outbox::default();
        relay.to_client.push(attached.to_client.freeze());
        for (name, value) in &attached.changed_parameters {
            self.flow.tracker.parameter_status(name, value);
        }
        self.server_pid = attached.process_id;
        self.server_said_fatal = false;
        self.flow.server_changed();
        let config = self.shared.config();
        if config.failover && config.commit_guard {
            let slot = self.shared.guards.slot(
                &self.backend,
                &self.startup,
                &config,
                self.credential.as_ref(),
                &self.shared.tls(),
            );
            self.flow.use_guard(Some(slot));
        }
        self.cancel.retarget(CancelTarget {
            backend: self.backend.clone(),
            process_id: attached.process_id,
            secret_key: attached.secret_key,
        });
    }

    /// A listening session may have missed notifications while it had no
    /// server connection: PostgreSQL keeps none for a listener that is
    /// gone. The client is told, not left to assume it saw everything.
    fn warn_of_missed_notifications(&mut self, pause: Duration) {
        let listening = &self.flow.tracker.template().listening;
        if listening.is_empty() {
            return;
        }
        let channels: Vec<String> = listening
            .iter()
            .map(|channel| format!("\"{}\"", String::from_utf8_lossy(channel)))
            .collect();
        let mut notice = BytesMut::new();
        reply::warning(
            &mut notice,
            sqlstate::WARNING,
            "notifications may have been missed while Reprise replaced the server connection",
            &format!(
                "The session listens on {}; notifications sent during the {:.0} ms without a server connection were not delivered.",
                channels.join(", "),
                pause.as_secs_f64() * 1000.0
            ),
        );
        self.relay.to_client.push(notice.freeze());
    }

    fn outcome(&mut self, kind: OutcomeKind, detail: String) {
        if let Some(recorder) = &mut self.recorder {
            recorder.append_outcome(kind, detail);
        }
    }
}

/// What the server answers to `request`, the client messages of a
/// request that only commits (a Query, or Parse, Bind, Describe, Execute,
/// Close and Sync of a COMMIT), when the commit succeeds. `None` for a
/// message a commit does not answer that way.
fn commit_answer(request: &[u8]) -> Option<BytesMut> {
    let messages: Vec<(u8, &[u8])> = frames(request)?;
    // A Describe answered here must be of the portal the COMMIT runs in.
    let executed: Vec<&[u8]> = messages
        .iter()
        .filter(|(tag, _)| *tag == b'E')
        .map(|(_, message)| cstr_at(message, 5))
        .collect();
    let mut answer = BytesMut::new();
    for (tag, message) in messages {
        match tag {
            b'Q' => {
                reply::command_complete(&mut answer, "COMMIT");
                reply::ready_for_query(&mut answer, b'I');
            }
            b'P' => reply::parse_complete(&mut answer),
            b'B' => reply::bind_complete(&mut answer),
            b'D' if message.get(5) == Some(&b'P') && executed.contains(&cstr_at(message, 6)) => {
                reply::no_data(&mut answer)
            }
            b'E' => reply::command_complete(&mut answer, "COMMIT"),
            b'C' => reply::close_complete(&mut answer),
            b'S' => reply::ready_for_query(&mut answer, b'I'),
            b'H' => {}
            _ => return None,
        }
    }
    Some(answer)
}

/// The frames of `messages` as (tag, whole frame); `None` if one is cut.
fn frames(messages: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut list = Vec::new();
    let mut rest = messages;
    while !rest.is_empty() {
        let Ok(Next::Frame { tag, len }) = frame::next(rest, usize::MAX) else {
            return None;
        };
        list.push((tag, &rest[..len]));
        rest = &rest[len..];
    }
    Some(list)
}

/// The NUL-terminated string of `frame` starting at `at`.
fn cstr_at(frame: &[u8], at: usize) -> &[u8] {
    let tail = frame.get(at..).unwrap_or_default();
    &tail[..tail
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(tail.len())]
}

/// Sorts a failed connection attempt: a server that is away, starting,
/// shutting down or full may take the session later; one that refuses it
/// (authentication, a missing database) will not.
fn connect_problem(err: ConnectError) -> Attempt {
    match &err {
        ConnectError::Unreachable { .. } | ConnectError::Timeout { .. } | ConnectError::Lost(_) => {
            Attempt::Retry(err.to_string())
        }
        ConnectError::Refused { summary, .. }
            if summary.code.starts_with("08")
                || summary.code.starts_with("57P")
                || summary.code == sqlstate::TOO_MANY_CONNECTIONS =>
        {
            Attempt::Retry(err.to_string())
        }
        _ => Attempt::Fail(Failure::refused(Cause::NoWritableServer, err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn tags(answer: &[u8]) -> Vec<u8> {
        frames(answer)
            .expect("whole frames")
            .into_iter()
            .map(|(tag, _)| tag)
            .collect()
    }

    #[test]
    fn a_simple_commit_is_answered_as_the_server_would() {
        let answer = commit_answer(&message(b'Q', b"COMMIT\0")).expect("answer");
        assert_eq!(tags(&answer), b"CZ");
        assert_eq!(&answer[5..12], b"COMMIT\0");
        assert_eq!(answer[answer.len() - 1], b'I');
    }

    #[test]
    fn an_extended_commit_is_answered_message_by_message() {
        let mut request = message(b'B', b"\0end\0\0\0\0\0\0\0");
        request.extend(message(b'D', b"P\0"));
        request.extend(message(b'E', b"\0\0\0\0\0"));
        request.extend(message(b'S', b""));
        let answer = commit_answer(&request).expect("answer");
        assert_eq!(tags(&answer), b"2nCZ");
    }

    #[test]
    fn a_describe_of_another_portal_cannot_be_answered() {
        let mut request = message(b'D', b"Pother\0");
        request.extend(message(b'E', b"\0\0\0\0\0"));
        request.extend(message(b'S', b""));
        assert!(commit_answer(&request).is_none());
        let statement = message(b'D', b"Sname\0");
        assert!(commit_answer(&statement).is_none());
    }
}
