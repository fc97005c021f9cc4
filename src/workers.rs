//! Worker threads, each with a single-threaded runtime of its own.
//!
//! A session's task and both of its sockets stay on one worker for the
//! whole session: its socket events are read from that worker's own epoll
//! set and its task is woken on the thread that polls it. A work-stealing
//! runtime would move tasks between threads and wake idle threads to steal
//! them, which costs a futex call and a cache miss per request; the relay
//! is one short burst of work per request, so it does better without.
//! Connections are accepted once, by the listeners, and handed to the
//! workers in turn.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::frontend::{handle_connection, ClientStream};
use crate::proxy::Shared;

/// A connection handed to a worker, detached from the accepting runtime.
pub enum Accepted {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Accepted {
    /// Detaches an accepted stream from the runtime that accepted it.
    pub fn detach(stream: ClientStream) -> io::Result<Accepted> {
        Ok(match stream {
            ClientStream::Tcp(stream) => Accepted::Tcp(stream.into_std()?),
            ClientStream::Unix(stream) => Accepted::Unix(stream.into_std()?),
            ClientStream::Tls(_) => {
                return Err(io::Error::other(
                    "a TLS stream cannot move between runtimes",
                ))
            }
        })
    }

    /// Registers the stream with the current worker's runtime.
    fn attach(self) -> io::Result<ClientStream> {
        Ok(match self {
            Accepted::Tcp(stream) => ClientStream::Tcp(tokio::net::TcpStream::from_std(stream)?),
            Accepted::Unix(stream) => ClientStream::Unix(tokio::net::UnixStream::from_std(stream)?),
        })
    }
}

struct Handoff {
    stream: Accepted,
    id: u64,
    peer: String,
}

/// The worker threads and their inboxes.
pub struct Workers {
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
    next: AtomicUsize,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Workers {
    /// Starts `count` workers. Each runs the sessions handed to it and,
    /// once its inbox is closed (by [`close`](Self::close) or on drop),
    /// waits until every session of `sessions` has ended.
    pub fn start(
        count: usize,
        shared: &Arc<Shared>,
        sessions: &TaskTracker,
    ) -> io::Result<Workers> {
        let mut inboxes = Vec::new();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let (sender, mut inbox) = mpsc::unbounded_channel::<Handoff>();
            // Sockets and timers only: the signal and process drivers
            // would reap orphans on every park.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let shared = Arc::clone(shared);
            let sessions = sessions.clone();
            let thread = std::thread::Builder::new()
                .name(format!("reprise-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(handoff) = inbox.recv().await {
                            let span =
                                tracing::info_span!("session", id = handoff.id, peer = %handoff.peer);
                            let client = match handoff.stream.attach() {
                                Ok(client) => client,
                                Err(err) => {
                                    tracing::warn!(parent: &span, error = %err, "could not take over an accepted connection");
                                    continue;
                                }
                            };
                            sessions.spawn(handle_connection(
                                client,
                                Arc::clone(&shared),
                                handoff.id,
                                span,
                            ));
                        }
                        // No session comes after the inbox closed: the
                        // tracker may close (all workers agree on that).
                        sessions.close();
                        sessions.wait().await;
                    });
                })?;
            inboxes.push(sender);
            threads.push(thread);
        }
        Ok(Workers {
            inboxes,
            next: AtomicUsize::new(0),
            threads,
        })
    }

    /// Hands a connection to the next worker in turn.
    pub fn dispatch(&self, stream: ClientStream, id: u64) {
        if self.inboxes.is_empty() {
            return;
        }
        let peer = stream.peer();
        let stream = match Accepted::detach(stream) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, peer, "could not hand an accepted connection to a worker");
                return;
            }
        };
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.inboxes.len();
        if self.inboxes[at].send(Handoff { stream, id, peer }).is_err() {
            tracing::warn!(worker = at, "worker gone; connection dropped");
        }
    }

    /// Closes the inboxes: workers finish once every session has ended.
    pub fn close(&mut self) {
        self.inboxes.clear();
    }

    /// Waits for the worker threads to finish.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
