//! The proxy as a whole: its listeners, the state every session shares,
//! reload and graceful shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::health::{self, Health};
use crate::config::Config;
use crate::datadir::{DataDirError, DataDirLock};
use crate::frontend::listener::Listener;
use crate::journal::recovery::{self, Mode, Recovery, RecoveryError};
use crate::journal::{Journal, JournalHandle};
use crate::replay::guard::Guards;
use crate::session::cancel::CancelRegistry;
use crate::session::control::{Order, Sessions};
use crate::stats::Stats;
use crate::template::{load_named_templates, NamedTemplateError, NamedTemplates, Registry};
use crate::tls::{ClientTls, ServerTls, TlsError};
use crate::users::{Users, UsersFileError};
use crate::workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Users(#[from] UsersFileError),
    #[error(transparent)]
    Templates(#[from] NamedTemplateError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A user for whom no new server connection could be opened after a
    /// failure, not listed in `failover_exempt_users`.
    #[error("{0}")]
    Unrecoverable(String),
    #[error(transparent)]
    Journal(#[from] RecoveryError),
    #[error("cannot start the journal writer in {dir}: {source}")]
    JournalWriter { dir: String, source: std::io::Error },
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
}

/// What all sessions share. Nothing here is touched on the per-message
/// path; sessions read the configuration once, when they start.
#[derive(Debug)]
pub struct Shared {
    config: RwLock<Arc<Config>>,
    users: RwLock<Arc<Users>>,
    tls: RwLock<Arc<Tls>>,
    /// Connections not yet authenticated (counted against
    /// max_unauthenticated).
    pub(crate) unauthenticated: AtomicUsize,
    templates: RwLock<NamedTemplates>,
    /// Session templates of all sessions, one copy each.
    pub(crate) registry: Arc<Registry>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) cancel: Arc<CancelRegistry>,
    /// Sessions past their startup packet (counted against max_client_conn).
    pub(crate) clients: AtomicUsize,
    /// Stop accepting; close sessions as they become idle.
    pub(crate) draining: CancellationToken,
    /// Orders to running sessions.
    pub(crate) sessions: Arc<Sessions>,
    /// The journal writer's queue; none when the journal is off.
    pub(crate) journal: Option<JournalHandle>,
    /// What is known about each backend's role.
    pub(crate) health: Arc<Health>,
    /// The commit guard of each database sessions used.
    pub(crate) guards: Arc<Guards>,
    session_ids: AtomicU64,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(config) => Arc::clone(&config),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn users(&self) -> Arc<Users> {
        match self.users.read() {
            Ok(users) => Arc::clone(&users),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// TLS towards clients and servers, as last (re)loaded.
    pub fn tls(&self) -> Arc<Tls> {
        match self.tls.read() {
            Ok(tls) => Arc::clone(&tls),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The named templates of `templates_dir`, as last (re)loaded.
    pub fn named_templates(&self) -> NamedTemplates {
        match self.templates.read() {
            Ok(templates) => templates.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Certificates and keys loaded from the files the config names.
#[derive(Debug)]
pub struct Tls {
    /// None when `client_tls = disable`.
    pub client: Option<ClientTls>,
    pub server: ServerTls,
}

fn load_tls(config: &Config) -> Result<Tls, TlsError> {
    Ok(Tls {
        client: ClientTls::from_config(config)?,
        server: ServerTls::from_config(config)?,
    })
}

/// Reads the users file and checks that every user can be carried over
/// to a new server connection (or is exempt).
fn load_users(config: &Config) -> Result<Users, ProxyError> {
    let users = match &config.users_file {
        Some(path) => Users::load(path)?,
        None => Users::default(),
    };
    if config.failover {
        crate::auth::check_reconnection(config, &users).map_err(ProxyError::Unrecoverable)?;
    }
    Ok(users)
}

/// A bound, not yet running proxy.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    local_addr: SocketAddr,
    journal: Option<Journal>,
    workers: Workers,
    sessions: TaskTracker,
    _lock: DataDirLock,
}

impl Proxy {
    /// Locks the data directory, reads the users file, raises the open-file
    /// limit and binds the listeners. Must run inside a tokio runtime.
    pub async fn bind(config: Config) -> Result<Proxy, ProxyError> {
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let users = load_users(&config)?;
        let tls = load_tls(&config)?;
        let templates = load_named_templates(&config)?;
        raise_open_file_limit(config.max_open_files, config.max_client_conn);

        let tcp = Listener::bind_tcp(config.listen)
            .await
            .map_err(|source| ProxyError::Listen {
                address: config.listen.to_string(),
                source,
            })?;
        let local_addr = match &tcp {
            Listener::Tcp(listener) => listener.local_addr().unwrap_or(config.listen),
            Listener::Unix { .. } => config.listen,
        };
        let mut listeners = vec![tcp];
        if let Some(dir) = &config.unix_socket_dir {
            let unix = Listener::bind_unix(dir, local_addr.port()).map_err(|source| {
                ProxyError::Listen {
                    address: dir
                        .join(format!(".s.PGSQL.{}", local_addr.port()))
                        .display()
                        .to_string(),
                    source,
                }
            })?;
            listeners.push(unix);
        }
        let workers = config.workers;
        let stats = Arc::new(Stats::default());
        let (journal, next_session) = open_journal(&config, &stats)?;
        let shared = Arc::new(Shared {
            config: RwLock::new(Arc::new(config)),
            users: RwLock::new(Arc::new(users)),
            tls: RwLock::new(Arc::new(tls)),
            unauthenticated: AtomicUsize::new(0),
            templates: RwLock::new(templates),
            registry: Arc::new(Registry::new()),
            stats,
            cancel: Arc::new(CancelRegistry::default()),
            clients: AtomicUsize::new(0),
            draining: CancellationToken::new(),
            sessions: Arc::new(Sessions::default()),
            journal: journal.as_ref().map(Journal::handle),
            health: Arc::new(Health::default()),
            guards: Arc::new(Guards::default()),
            session_ids: AtomicU64::new(next_session.saturating_sub(1)),
        });
        let sessions = TaskTracker::new();
        let workers = Workers::start(workers, &shared, &sessions).map_err(ProxyError::Workers)?;
        Ok(Proxy {
            shared,
            listeners,
            local_addr,
            journal,
            workers,
            sessions,
            _lock: lock,
        })
    }

    /// The TCP address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves until shutdown: then stops accepting, lets sessions end as
    /// they become idle, and closes the rest after `shutdown_timeout`.
    pub async fn run(self) {
        let sessions = self.sessions;
        let workers = Arc::new(self.workers);
        let checks = {
            let shared = Arc::clone(&self.shared);
            let users = Arc::clone(&self.shared);
            let tls = Arc::clone(&self.shared);
            tokio::spawn(health::check_in_background(
                Arc::clone(&self.shared.health),
                move || shared.config(),
                move || users.users(),
                move || tls.tls(),
                self.shared.draining.clone(),
            ))
        };
        let sweeps = {
            let shared = Arc::clone(&self.shared);
            tokio::spawn(
                Arc::clone(&self.shared.guards)
                    .sweep_in_background(move || shared.config(), self.shared.draining.clone()),
            )
        };
        let mut accepting = Vec::new();
        for listener in self.listeners {
            tracing::info!(listener = %listener.describe(), "accepting connections");
            accepting.push(tokio::spawn(
                listener.serve(Arc::clone(&self.shared), Arc::clone(&workers)),
            ));
        }
        self.shared.draining.cancelled().await;
        for task in accepting {
            let _ = task.await;
        }
        let _ = checks.await;
        let _ = sweeps.await;
        let mut workers = Arc::try_unwrap(workers).ok();
        if let Some(workers) = &mut workers {
            workers.close();
        }
        sessions.close();
        let timeout = self.shared.config().shutdown_timeout.0;
        tracing::info!(
            sessions = self.shared.clients.load(Ordering::Relaxed),
            ?timeout,
            "shutting down: waiting for sessions to end"
        );
        if tokio::time::timeout(timeout, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = self.shared.clients.load(Ordering::Relaxed),
                "shutdown_timeout reached: closing the remaining sessions"
            );
            self.shared.sessions.broadcast(Order::Terminate);
            sessions.wait().await;
        }
        tracing::info!("all sessions closed");
        if let Some(workers) = workers {
            let _ = tokio::task::spawn_blocking(move || workers.join()).await;
        }
        if let Some(journal) = self.journal {
            // Writes what is queued, syncs and leaves a last checkpoint.
            let _ = tokio::task::spawn_blocking(move || journal.stop()).await;
        }
    }
}

/// Reads the journal back (reporting what a crash left unfinished) and
/// starts its writer. Returns the first session id to hand out.
fn open_journal(config: &Config, stats: &Arc<Stats>) -> Result<(Option<Journal>, u64), ProxyError> {
    if !config.journal.enabled {
        return Ok((None, 1));
    }
    let settings = config.journal.writer_settings(&config.data_dir);
    let recovered = recovery::scan(
        &settings.dir,
        Mode::Repair(config.journal.corruption),
        false,
        |_| {},
        |_| {},
    )?;
    report_recovery(&recovered);
    let journal =
        Journal::start(settings.clone(), &recovered, Arc::clone(stats)).map_err(|source| {
            ProxyError::JournalWriter {
                dir: settings.dir.display().to_string(),
                source,
            }
        })?;
    Ok((Some(journal), recovered.next_session))
}

fn report_recovery(recovered: &Recovery) {
    for problem in &recovered.checkpoint_problems {
        tracing::warn!(problem = %problem, "journal checkpoint unreadable; an older one or a full scan is used");
    }
    if let Some(tail) = &recovered.torn_tail {
        tracing::info!(damage = %tail, "journal: torn tail of the newest segment truncated");
    }
    for damage in recovered.inner_damage() {
        tracing::error!(damage = %damage, "journal damage quarantined; the records around it were recovered");
    }
    let mut unfinished = 0;
    for session in recovered.unfinished() {
        unfinished += 1;
        tracing::warn!(
            session = session.session,
            commands = session.commands.len(),
            template = %session.template,
            safe_point = %session.safe_point,
            truncated = session.truncated,
            "journal: session had unfinished work when Reprise stopped"
        );
    }
    tracing::info!(
        segments = recovered.segments.len(),
        records = recovered.records,
        templates = recovered.templates.len(),
        open_sessions = recovered.sessions.len(),
        unfinished,
        "journal recovered"
    );
}

/// Controls a running proxy from elsewhere (signal handlers, tests).
#[derive(Clone, Debug)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.shared.draining.cancel();
        self.shared.sessions.broadcast(Order::Drain);
    }

    /// Closes every session at once.
    pub fn terminate(&self) {
        self.shared.draining.cancel();
        self.shared.sessions.broadcast(Order::Terminate);
    }

    pub fn active_sessions(&self) -> usize {
        self.shared.clients.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.config()
    }

    /// Applies a new configuration to sessions that start from now on and
    /// re-reads the users file and the named templates. Returns the keys
    /// whose change needs a restart (they keep their old values). On error
    /// nothing changes.
    pub fn reload(&self, new: Config) -> Result<Vec<&'static str>, ProxyError> {
        let users = load_users(&new)?;
        let tls = load_tls(&new)?;
        let templates = load_named_templates(&new)?;
        let current = self.shared.config();
        let restart_only = current.restart_only_changes(&new);
        let mut applied = new;
        applied.listen = current.listen;
        applied.unix_socket_dir.clone_from(&current.unix_socket_dir);
        applied.data_dir.clone_from(&current.data_dir);
        applied.log_format = current.log_format;
        applied.max_open_files = current.max_open_files;
        if let Ok(mut config) = self.shared.config.write() {
            *config = Arc::new(applied);
        }
        if let Ok(mut slot) = self.shared.users.write() {
            *slot = Arc::new(users);
        }
        if let Ok(mut slot) = self.shared.tls.write() {
            *slot = Arc::new(tls);
        }
        if let Ok(mut slot) = self.shared.templates.write() {
            *slot = templates;
        }
        Ok(restart_only)
    }
}

/// Asks for `wanted` open files (capped by the hard limit): each session
/// holds two sockets, and the default soft limit of 1024 would cap a proxy
/// at about 500 sessions.
fn raise_open_file_limit(wanted: u64, max_client_conn: usize) {
    let needed = 2 * max_client_conn as u64 + 64;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(granted) if granted < needed => tracing::warn!(
            granted,
            needed,
            "the open-file limit (capped by the hard limit) is too low for max_client_conn sessions"
        ),
        Ok(granted) => tracing::debug!(granted, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "could not raise the open-file limit"),
    }
}
