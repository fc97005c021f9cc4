//! One client session: log in to a server on the client's behalf, then
//! relay until either side ends.
//!
//! The session task owns both sockets (see [`relay`]). It checks the shape
//! of every client frame and hands each frame of either side to the
//! [`flow`], which tracks the session's state. Everything is forwarded as
//! the bytes that arrived, in batches; only Reprise's own statements are
//! answered here.

pub mod answer_digest;
pub mod cancel;
pub mod control;
mod failover;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod flow;
pub mod recorder;
pub mod relay;
pub mod replay_log;

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::Instrument;

use crate::auth::Credential;
use crate::backend::{self, ConnectError, ServerConnection};
use crate::config::Backend;
use crate::proxy::Shared;
use crate::state::Tracker;
use crate::wire::backend as server_msg;
use crate::wire::frame::{self, Next};
use crate::wire::frontend::{self, FrontendKind};
use crate::wire::reply::{self, sqlstate};
use crate::wire::startup::StartupMessage;
use cancel::{CancelHandle, CancelTarget, ClientKey};
use control::{ControlHandle, Order};
use flow::{ClientStep, Flow, ServerStep};
use recorder::{HandOverTimer, Recorder};
use relay::{Event, Relay};

/// How long a goodbye (a last error, a Terminate) may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// What woke the session.
enum Step {
    Io(Event),
    Drain,
    Terminate,
    /// Held journal records are due at the writer.
    HandOver,
}

/// Why a session ended, for the log.
#[derive(Debug)]
enum Ending {
    ClientTerminated,
    ClientGone,
    ClientError(std::io::Error),
    ClientViolation(String),
    ServerGone(Option<std::io::Error>),
    /// The server said it is ending the connection, for a reason that a
    /// new connection may not share (a shutdown, a terminated backend).
    ServerLost(String),
    /// The session could not be carried over to a new server connection;
    /// the client gets this error.
    FailoverFailed(BytesMut),
    ServerViolation(String),
    Shutdown,
}

/// Runs a session whose startup packet has been read. Returns when the
/// session is over; both sockets are closed by then. What the session logs
/// goes to `span`, which is entered only around the rare steps that log:
/// the per-message relay runs outside it.
pub async fn run<C>(
    mut client: C,
    mut startup: StartupMessage,
    credential: Option<Credential>,
    shared: Arc<Shared>,
    id: u64,
    span: tracing::Span,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    #[cfg(feature = "fault-injection")]
    let fault = fault::Fault::take(&mut startup);
    #[cfg(not(feature = "fault-injection"))]
    let _ = &mut startup;
    let config = shared.config();
    let Some(backend) = shared.health.preferred(&config.backends).into_iter().next() else {
        goodbye(
            &mut client,
            reply::fatal(sqlstate::CLIENT_CANNOT_CONNECT, "no backend is configured"),
        )
        .await;
        return;
    };
    let connected = backend::connect(
        &backend,
        &startup,
        credential.as_ref(),
        &shared.tls().server,
        config.connect_timeout.0,
        &config.tcp_keepalive,
        config.max_message_size(),
    )
    .await;
    let server = match connected {
        Ok(server) => server,
        Err(err) => {
            tracing::warn!(parent: &span, backend = %backend.name, error = %err, "could not open a server connection");
            let answer = match &err {
                ConnectError::Refused { frame, .. } => BytesMut::from(&frame[..]),
                ConnectError::NoPassword { .. } | ConnectError::WrongCredential { .. } => {
                    reply::fatal(sqlstate::INVALID_PASSWORD, &err.to_string())
                }
                ConnectError::UnsupportedAuth(_) => {
                    reply::fatal(sqlstate::FEATURE_NOT_SUPPORTED, &err.to_string())
                }
                _ => reply::fatal(sqlstate::CLIENT_CANNOT_CONNECT, &err.to_string()),
            };
            goodbye(&mut client, answer).await;
            return;
        }
    };
    tracing::debug!(parent: &span, backend = %backend.name, server_pid = server.process_id, "server connection ready");

    let registration = shared.cancel.register(
        ClientKey {
            process_id: server.process_id,
            secret_key: server.secret_key,
        },
        CancelTarget {
            backend: server.backend.clone(),
            process_id: server.process_id,
            secret_key: server.secret_key,
        },
    );
    // Inside the span, so that the flow takes it for its own warnings.
    #[allow(unused_mut)]
    let mut session = span.in_scope(|| {
        Session::new(
            client,
            Login {
                startup,
                credential,
            },
            backend,
            server,
            registration,
            shared,
            id,
        )
    });
    #[cfg(feature = "fault-injection")]
    {
        session.fault = fault;
    }
    session.run().await;
}

/// Who the session logs in to servers as.
struct Login {
    startup: StartupMessage,
    credential: Option<Credential>,
}

/// Writes a last message and closes; errors only mean the client is gone.
async fn goodbye<C: AsyncWrite + Unpin>(client: &mut C, message: BytesMut) {
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        client.write_all(&message).await?;
        client.shutdown().await
    })
    .await;
}

struct Session<C> {
    relay: Relay<C, crate::backend::stream::ServerStream>,
    max_message_size: usize,
    flow: Flow,
    /// The server sent a FATAL error: its connection is about to end and
    /// the client already knows why.
    server_said_fatal: bool,
    shared: Arc<Shared>,
    /// What the client logged in with, for new server connections.
    startup: StartupMessage,
    /// What new server connections log in with (see [`Credential`]).
    credential: Option<Credential>,
    backend: Backend,
    /// The process id of the current server connection; notifications it
    /// sends carry the client's instead.
    server_pid: i32,
    draining: bool,
    control: ControlHandle,
    /// Writes the session's records to the journal; none when the journal
    /// or tracking is off.
    recorder: Option<Recorder>,
    cancel: CancelHandle,
    /// Where the session logs (see [`run`]).
    span: tracing::Span,
    /// A cut of the server connection that a test asked for.
    #[cfg(feature = "fault-injection")]
    fault: Option<fault::Fault>,
}

impl<C> Session<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    fn new(
        client: C,
        Login {
            startup,
            credential,
        }: Login,
        backend: Backend,
        server: ServerConnection,
        cancel: CancelHandle,
        shared: Arc<Shared>,
        id: u64,
    ) -> Self {
        let mut greeting = BytesMut::new();
        reply::authentication_ok(&mut greeting);
        greeting.extend_from_slice(&server.greeting);
        let key = cancel.key();
        reply::backend_key_data(&mut greeting, key.process_id, key.secret_key);
        greeting.extend_from_slice(&server.ready);
        let status = server_msg::ready_status(&server.ready).unwrap_or(b'I');
        let config = shared.config();
        let tracker = Tracker::new(
            Arc::clone(&shared.registry),
            Arc::clone(&shared.stats),
            startup
                .parameters
                .iter()
                .map(|(name, value)| (&name[..], &value[..])),
            greeting_parameters(&server.greeting),
        );
        let mut flow = Flow::new(
            tracker,
            Arc::clone(&shared),
            Arc::clone(&shared.stats),
            config.session_tracking,
            config.state_probe,
            status,
            config.max_replay_log(),
        );
        flow.learn_commit_xids(config.failover);
        flow.wrap_autocommit_writes(config.failover && config.wrap_autocommit_writes);
        if config.failover && config.commit_guard {
            flow.use_guard(Some(shared.guards.slot(
                &backend,
                &startup,
                &config,
                credential.as_ref(),
                &shared.tls(),
            )));
        }
        let recorder = match &shared.journal {
            Some(journal) if config.session_tracking => {
                let template_id = flow.tracker.template_id();
                Some(Recorder::start(
                    journal.clone(),
                    Arc::clone(&shared.registry),
                    id,
                    config.journal.retain,
                    config.journal.fsync_interval.0,
                    &startup.parameters,
                    flow.tracker.template(),
                    template_id,
                ))
            }
            _ => None,
        };
        // Only a capture records the commands that end at a safe point.
        flow.replay.keep_messages_at_safe_points(
            recorder.is_some() && config.journal.retain == crate::journal::Retain::All,
        );

        let mut relay = Relay::new(client, server.stream, server.pending);
        relay.to_client.push(greeting.freeze());
        let max_message_size = config.max_message_size();
        Session {
            relay,
            max_message_size,
            flow,
            server_said_fatal: false,
            control: shared.sessions.register(),
            shared,
            startup,
            credential,
            backend,
            server_pid: server.process_id,
            draining: false,
            recorder,
            cancel,
            span: tracing::Span::current(),
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }

    async fn run(mut self) {
        // Bytes that came with the server's greeting are steady-state
        // messages (a notification, say).
        let mut ending = if self.relay.from_server.is_empty() {
            None
        } else {
            self.on_server_data().err()
        };
        // Armed while the recorder holds commands for the journal.
        let mut hand_over = HandOverTimer::default();
        while ending.is_none() {
            if let Some(durable) = self.recorder.as_mut().and_then(Recorder::take_durable) {
                // fsync `always`: the client learns of nothing before its
                // record is on disk.
                let _ = durable.await;
            }
            let due = self.recorder.as_ref().and_then(Recorder::due);
            if hand_over.arm(due) {
                if let Some(recorder) = &mut self.recorder {
                    recorder.hand_over();
                }
                continue;
            }
            let step = std::future::poll_fn(|cx| match self.control.poll_order(cx) {
                Order::Terminate => Poll::Ready(Step::Terminate),
                Order::Drain if !self.draining => Poll::Ready(Step::Drain),
                _ => match self.relay.poll_event(cx) {
                    Poll::Ready(event) => Poll::Ready(Step::Io(event)),
                    Poll::Pending if due.is_some() => {
                        hand_over.poll_fired(cx).map(|()| Step::HandOver)
                    }
                    Poll::Pending => Poll::Pending,
                },
            })
            .await;
            let event = match step {
                Step::Io(event) => event,
                // `arm` sees whether the commands are due.
                Step::HandOver => continue,
                Step::Terminate => {
                    ending = Some(Ending::Shutdown);
                    break;
                }
                Step::Drain => {
                    self.draining = true;
                    if self.flow.idle() {
                        ending = Some(Ending::Shutdown);
                    }
                    continue;
                }
            };
            ending = self.on_event(event).err();
            if let Some(lost) = ending.as_ref().and_then(|ending| self.lost_server(ending)) {
                let span = self.span.clone();
                ending = match self.fail_over(lost).instrument(span).await {
                    // Answers that came with the attach go on to the client.
                    Ok(()) if self.relay.from_server.is_empty() => None,
                    Ok(()) => self.on_server_data().err(),
                    Err(message) => Some(Ending::FailoverFailed(message)),
                };
            }
        }
        let span = self.span.clone();
        self.finish(ending.unwrap_or(Ending::ClientGone))
            .instrument(span)
            .await;
    }

    /// Whether `ending` is a lost server connection the session should be
    /// carried over from, and how it was lost.
    fn lost_server(&self, ending: &Ending) -> Option<failover::Loss> {
        let config = self.shared.config();
        if !config.failover || !config.session_tracking || self.relay.client_done {
            return None;
        }
        match ending {
            Ending::ServerGone(_) if self.server_said_fatal => None,
            Ending::ServerGone(None) => Some(failover::Loss {
                reason: "the server closed the connection".to_owned(),
                said_fatal: false,
            }),
            Ending::ServerGone(Some(err)) => Some(failover::Loss {
                reason: err.to_string(),
                said_fatal: false,
            }),
            Ending::ServerLost(reason) => Some(failover::Loss {
                reason: reason.clone(),
                said_fatal: true,
            }),
            _ => None,
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), Ending> {
        match event {
            Event::ClientData => self.on_client_data(),
            Event::ServerData => self.on_server_data(),
            Event::ClientClosed => Err(Ending::ClientGone),
            Event::ClientError(err) => Err(Ending::ClientError(err)),
            Event::ServerClosed => Err(Ending::ServerGone(None)),
            Event::ServerError(err) => Err(Ending::ServerGone(Some(err))),
        }
    }

    /// Frames what the client sent, checks each frame and hands it to the
    /// flow; runs of forwarded frames go to the server as the bytes they
    /// arrived in.
    fn on_client_data(&mut self) -> Result<(), Ending> {
        // Bytes of `from_client` before `run_end` are checked frames to
        // forward.
        let mut run_end = 0;
        let mut violation = None;
        loop {
            let buf = &self.relay.from_client[run_end..];
            let (kind, len) = match frame::next(buf, self.max_message_size) {
                Ok(Next::Frame { len, .. }) => match frontend::check(&buf[..len]) {
                    Ok(kind) => (kind, len),
                    Err(err) => {
                        violation = Some(err.to_string());
                        break;
                    }
                },
                Ok(Next::Incomplete { .. }) => break,
                Err(err) => {
                    violation = Some(err.to_string());
                    break;
                }
            };
            let step = self.flow.client_frame(kind, &buf[..len]);
            match step {
                ClientStep::Forward => run_end += len,
                ClientStep::Precede => {
                    // Reprise's own request goes ahead of this frame.
                    self.forward_client_run(run_end);
                    run_end = len;
                }
                ClientStep::Drop => {
                    self.forward_client_run(run_end);
                    self.relay.from_client.advance(len);
                    run_end = 0;
                }
                ClientStep::Hold => {
                    self.relay.hold_client = true;
                    break;
                }
            }
            if !self.flow.follow.is_empty() {
                // Reprise's own requests go right after this frame.
                self.forward_client_run(run_end);
                run_end = 0;
                let chunk = self.flow.follow.split().freeze();
                self.relay.to_server.push(chunk);
            }
            if !self.flow.to_server.is_empty() || !self.flow.to_client.is_empty() {
                self.forward_client_run(run_end);
                run_end = 0;
            }
            if kind == FrontendKind::Terminate {
                self.relay.client_done = true;
                break;
            }
        }
        self.forward_client_run(run_end);
        match violation {
            Some(message) => Err(Ending::ClientViolation(message)),
            None if self.relay.client_done => Err(Ending::ClientTerminated),
            None => Ok(()),
        }
    }

    /// Sends the first `len` bytes of the client inbox to the server, then
    /// whatever the flow queued for either side after them.
    fn forward_client_run(&mut self, len: usize) {
        if len > 0 {
            let chunk = self.relay.from_client.split_to(len).freeze();
            self.relay.to_server.push(chunk);
        }
        self.push_flow_output();
    }

    fn push_flow_output(&mut self) {
        if !self.flow.to_server.is_empty() {
            let chunk = self.flow.to_server.split().freeze();
            self.relay.to_server.push(chunk);
        }
        if !self.flow.to_client.is_empty() {
            let chunk = self.flow.to_client.split().freeze();
            self.relay.to_client.push(chunk);
        }
    }

    /// Frames what the server sent, hands each frame to the flow and
    /// queues runs of forwarded frames for the client in one chunk each.
    fn on_server_data(&mut self) -> Result<(), Ending> {
        let mut run_end = 0;
        let mut violation = None;
        loop {
            let buf = &self.relay.from_server[run_end..];
            let (tag, len) = match frame::next(buf, self.max_message_size) {
                Ok(Next::Frame { tag, len }) => (tag, len),
                Ok(Next::Incomplete { .. }) => break,
                Err(err) => {
                    violation = Some(format!("server sent a message Reprise cannot relay: {err}"));
                    break;
                }
            };
            #[cfg(feature = "fault-injection")]
            if self.fault.as_ref().is_some_and(fault::Fault::due)
                && !self.flow.answering_own_request()
            {
                self.fault = None;
                self.forward_server_run(run_end);
                self.relay.from_server.clear();
                self.flush_events();
                return Err(Ending::ServerGone(Some(fault::Fault::cut(
                    &self.relay.server,
                ))));
            }
            if !server_msg::is_known_tag(tag) {
                violation = Some(format!(
                    "server sent an unknown message type {:?}",
                    char::from(tag)
                ));
                break;
            }
            if tag == b'E' {
                let summary = server_msg::error_summary(&buf[..len]);
                if summary.is_fatal() {
                    let config = self.shared.config();
                    if config.failover
                        && config.session_tracking
                        && failover::is_connection_loss(&summary.code, config.replay_terminated)
                    {
                        // The client must not see it: the session goes on.
                        self.forward_server_run(run_end);
                        self.relay.from_server.clear();
                        self.flush_events();
                        return Err(Ending::ServerLost(format!(
                            "{} ({})",
                            summary.message, summary.code
                        )));
                    }
                    self.server_said_fatal = true;
                }
            } else if tag == b'A' && self.server_pid != self.cancel.key().process_id {
                let end = run_end + len;
                server_msg::rewrite_notification_pid(
                    &mut self.relay.from_server[run_end..end],
                    self.server_pid,
                    self.cancel.key().process_id,
                );
            }
            let message = &self.relay.from_server[run_end..run_end + len];
            match self.flow.server_frame(tag, message) {
                ServerStep::Forward => {
                    run_end += len;
                    #[cfg(feature = "fault-injection")]
                    if let Some(fault) = &mut self.fault {
                        fault.forwarded();
                    }
                }
                ServerStep::Consume => {
                    self.forward_server_run(run_end);
                    self.relay.from_server.advance(len);
                    run_end = 0;
                }
            }
            if !self.flow.to_client.is_empty() || !self.flow.to_server.is_empty() {
                self.forward_server_run(run_end);
                run_end = 0;
            }
        }
        self.forward_server_run(run_end);
        self.flush_events();
        if let Some(message) = violation {
            return Err(Ending::ServerViolation(message));
        }
        if self.relay.hold_client && self.flow.at_boundary() {
            // What was held waited for nothing to be in flight.
            self.relay.hold_client = false;
            self.on_client_data()?;
        }
        if self.draining && self.flow.idle() {
            return Err(Ending::Shutdown);
        }
        Ok(())
    }

    fn flush_events(&mut self) {
        let span = &self.span;
        for event in self.flow.events.drain(..) {
            match &mut self.recorder {
                Some(recorder) => recorder.record(event),
                None => tracing::trace!(parent: span, ?event, "session state"),
            }
        }
    }

    fn forward_server_run(&mut self, len: usize) {
        if len > 0 {
            let chunk = self.relay.from_server.split_to(len).freeze();
            self.relay.to_client.push(chunk);
        }
        self.push_flow_output();
    }

    /// Says goodbye to both sides as the ending requires.
    async fn finish(mut self, ending: Ending) {
        if let Some(recorder) = &mut self.recorder {
            recorder.end();
        }
        match &ending {
            Ending::ClientTerminated | Ending::ClientGone => {
                tracing::debug!("session ended by the client")
            }
            Ending::ClientError(err) => tracing::debug!(error = %err, "client connection failed"),
            Ending::Shutdown => tracing::info!("closing session: Reprise is shutting down"),
            _ => tracing::info!(?ending, backend = %self.backend.name, "session ended"),
        }
        let client_message = match &ending {
            Ending::ClientViolation(message) => {
                Some(reply::fatal(sqlstate::PROTOCOL_VIOLATION, message))
            }
            Ending::ServerViolation(message) => {
                Some(reply::fatal(sqlstate::PROTOCOL_VIOLATION, message))
            }
            Ending::ServerGone(_) if self.server_said_fatal => None,
            Ending::FailoverFailed(message) => Some(message.clone()),
            Ending::ServerLost(reason) => Some(reply::fatal(
                sqlstate::CONNECTION_FAILURE,
                &format!(
                    "server connection to \"{}\" was lost: {reason}; the session cannot continue",
                    self.backend.name
                ),
            )),
            Ending::ServerGone(err) => {
                let reason = err
                    .as_ref()
                    .map(|err| format!(": {err}"))
                    .unwrap_or_default();
                Some(reply::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    &format!(
                        "server connection to \"{}\" was lost{reason}; the session cannot continue",
                        self.backend.name
                    ),
                ))
            }
            Ending::Shutdown => Some(reply::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection because Reprise is shutting down",
            )),
            _ => None,
        };
        let client_alive = matches!(
            ending,
            Ending::ClientViolation(_)
                | Ending::ServerGone(_)
                | Ending::ServerLost(_)
                | Ending::FailoverFailed(_)
                | Ending::ServerViolation(_)
                | Ending::Shutdown
        );
        let server_alive = !matches!(
            ending,
            Ending::ServerGone(_) | Ending::ServerLost(_) | Ending::FailoverFailed(_)
        );

        let relay = &mut self.relay;
        if server_alive {
            // Whatever the client sent before it left (Terminate included)
            // still reaches the server; a client that vanished gets a
            // Terminate sent on its behalf so the backend ends at once.
            if !matches!(ending, Ending::ClientTerminated) {
                let mut terminate = BytesMut::new();
                frame::write_frame(&mut terminate, Some(b'X'), |_| {});
                relay.to_server.push(terminate.freeze());
            }
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
                relay.flush_server().await?;
                relay.server.shutdown().await
            })
            .await;
        }
        if client_alive {
            if let Some(message) = client_message {
                relay.to_client.push(message.freeze());
            }
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
                relay.flush_client().await?;
                relay.client.shutdown().await
            })
            .await;
        }
    }
}

/// The ParameterStatus values of a server's greeting.
pub(crate) fn greeting_parameters(greeting: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut parameters = Vec::new();
    let mut rest = greeting;
    while let Ok(Next::Frame { tag, len }) = frame::next(rest, usize::MAX) {
        if tag == b'S' {
            if let Some(parameter) = server_msg::parameter_status(&rest[..len]) {
                parameters.push(parameter);
            }
        }
        rest = &rest[len..];
    }
    parameters
}

/// Handles a CancelRequest: re-issues it with the key of the session's
/// current server connection. An unknown key is dropped without a word, as
/// PostgreSQL does.
pub async fn cancel(shared: &Shared, key: ClientKey) {
    let Some(target) = shared.cancel.lookup(key) else {
        tracing::debug!(
            process_id = key.process_id,
            "cancel request for an unknown key dropped"
        );
        return;
    };
    let timeout = shared.config().connect_timeout.0;
    match backend::send_cancel(
        &target.backend,
        target.process_id,
        target.secret_key,
        timeout,
    )
    .await
    {
        Ok(()) => tracing::debug!(server_pid = target.process_id, "cancel request forwarded"),
        Err(err) => {
            tracing::warn!(error = %err, backend = %target.backend.name, "could not forward a cancel request")
        }
    }
}
