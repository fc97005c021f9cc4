//! Configuration: the TOML file, its defaults, command-line overrides and
//! validation.
//!
//! Key names are part of the interface (operators and scripts rely on them),
//! so they are spelled out here once and never renamed. Unknown keys are
//! refused, so a typo cannot silently fall back to a default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::auth::hba::{AuthMethod, HbaRule};
use crate::journal::{CorruptionPolicy, FsyncPolicy, Retain, WriterSettings};

/// Errors found while reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// A duration written with a unit, such as `"30s"`, `"5min"` or `"250ms"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|err| format!("invalid duration {text:?} ({err}); write it with a unit, such as \"30s\" or \"5min\""))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size written with a unit, such as `"64MiB"` or `"1 GiB"`; a bare number
/// is bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl FromStr for HumanSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        bytesize::ByteSize::from_str(text.trim())
            .map(|size| HumanSize(size.as_u64()))
            .map_err(|err| {
                format!("invalid size {text:?} ({err}); write it with a unit, such as \"64MiB\"")
            })
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(bytes) => Ok(HumanSize(bytes)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// TLS towards clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// SSLRequest is answered 'N'.
    Disable,
    /// Clients may use TLS or not.
    Allow,
    /// TCP clients must use TLS (Unix-socket clients need not).
    Require,
}

/// TLS towards servers, as libpq's sslmode of the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    /// TLS when the server offers it, unverified.
    Prefer,
    /// TLS or no connection, unverified.
    Require,
    /// TLS with the server's certificate checked against
    /// `server_tls_ca_file` and the backend's host name.
    VerifyFull,
}

impl ServerTlsMode {
    pub fn name(self) -> &'static str {
        match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// One PostgreSQL server Reprise may connect to.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    pub host: String,
    #[serde(default = "default_backend_port")]
    pub port: u16,
}

impl Backend {
    /// Parses the `--backend NAME=HOST:PORT` form.
    pub fn parse_flag(text: &str) -> Result<Backend, String> {
        let (name, address) = text
            .split_once('=')
            .ok_or_else(|| format!("--backend {text:?}: expected NAME=HOST:PORT"))?;
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("--backend {text:?}: expected NAME=HOST:PORT"))?;
        let port = port.parse().map_err(|_| {
            format!("--backend {text:?}: port {port:?} is not a number from 1 to 65535")
        })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Backend {
            name: name.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn default_backend_port() -> u16 {
    5432
}

/// TCP keepalive probes on both client and server sockets, so that a peer
/// that vanished without a FIN is noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keepalive {
    pub enabled: bool,
    pub idle: HumanDuration,
    pub interval: HumanDuration,
    pub count: u32,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before
    /// the connection counts as lost; zero leaves the system's default.
    pub user_timeout: HumanDuration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            enabled: true,
            idle: HumanDuration(Duration::from_secs(60)),
            interval: HumanDuration(Duration::from_secs(10)),
            count: 6,
            user_timeout: HumanDuration(Duration::ZERO),
        }
    }
}

/// The session journal (see README, "The journal").
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Off: nothing is written to disk; replay logs stay in memory.
    pub enabled: bool,
    pub fsync: FsyncPolicy,
    /// How often `batch` syncs (and `off` writes).
    pub fsync_interval: HumanDuration,
    pub segment_size: HumanSize,
    pub segment_age: HumanDuration,
    pub checkpoint_interval: HumanDuration,
    /// Damage other than a torn tail: `quarantine` or `tolerate-tail`.
    pub corruption: CorruptionPolicy,
    /// `replay` (what replay needs) or `all` (every command: capture).
    pub retain: Retain,
    /// With `retain = "all"`: keep segments until they take this much…
    pub retention_size: HumanSize,
    /// … or are this old.
    pub retention_age: HumanDuration,
    /// Hard limit on the journal's size, whatever live sessions need.
    pub max_size: HumanSize,
    /// Records waiting for the writer beyond this are dropped (counted).
    pub queue_limit: HumanSize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            fsync: FsyncPolicy::Batch,
            fsync_interval: HumanDuration(Duration::from_millis(10)),
            segment_size: HumanSize(64 * 1024 * 1024),
            segment_age: HumanDuration(Duration::from_secs(300)),
            checkpoint_interval: HumanDuration(Duration::from_secs(30)),
            corruption: CorruptionPolicy::Quarantine,
            retain: Retain::Replay,
            retention_size: HumanSize(8 * 1024 * 1024 * 1024),
            retention_age: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
            max_size: HumanSize(16 * 1024 * 1024 * 1024),
            queue_limit: HumanSize(64 * 1024 * 1024),
        }
    }
}

impl JournalConfig {
    pub fn writer_settings(&self, data_dir: &Path) -> WriterSettings {
        WriterSettings {
            dir: data_dir.join(crate::journal::JOURNAL_DIR),
            fsync: self.fsync,
            fsync_interval: self.fsync_interval.0,
            segment_size: self.segment_size.0,
            segment_age: self.segment_age.0,
            checkpoint_interval: self.checkpoint_interval.0,
            retain: self.retain,
            retention_size: self.retention_size.0,
            retention_age: self.retention_age.0,
            max_size: self.max_size.0,
            queue_limit: usize::try_from(self.queue_limit.0).unwrap_or(usize::MAX),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let interval = self.fsync_interval.0;
        if interval < Duration::from_millis(1) || interval > Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "journal.fsync_interval",
                "must be from 1ms to 10s",
            ));
        }
        if !(64 * 1024..=4 * 1024 * 1024 * 1024).contains(&self.segment_size.0) {
            return Err(ConfigError::invalid(
                "journal.segment_size",
                "must be from 64KiB to 4GiB",
            ));
        }
        if self.segment_age.0 < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "journal.segment_age",
                "must be at least 1s",
            ));
        }
        if self.checkpoint_interval.0 < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "journal.checkpoint_interval",
                "must be at least 100ms",
            ));
        }
        if self.max_size.0 < 2 * self.segment_size.0 {
            return Err(ConfigError::invalid(
                "journal.max_size",
                "must be at least twice journal.segment_size",
            ));
        }
        if self.queue_limit.0 < 1024 * 1024 {
            return Err(ConfigError::invalid(
                "journal.queue_limit",
                "must be at least 1MiB",
            ));
        }
        Ok(())
    }
}

/// The whole configuration, as read from TOML with defaults filled in.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// TCP address clients connect to.
    pub listen: SocketAddr,
    /// Directory for a Unix socket `.s.PGSQL.<port>`; none when unset.
    pub unix_socket_dir: Option<PathBuf>,
    /// Reprise's own files: the lock file, later the journal.
    pub data_dir: PathBuf,
    /// `"user" "password"` lines, as PgBouncer's auth_file.
    pub users_file: Option<PathBuf>,
    /// Named session templates, one `<name>.toml` per template (see
    /// templates/README.md); none when unset.
    pub templates_dir: Option<PathBuf>,
    pub log_format: LogFormat,
    /// A tracing filter directive, such as `info` or `reprise=debug`.
    pub log_level: String,
    pub max_client_conn: usize,
    /// Threads that run sessions (each session stays on one); defaults to
    /// the number of CPUs.
    pub workers: usize,
    pub connect_timeout: HumanDuration,
    pub shutdown_timeout: HumanDuration,
    /// Largest protocol message accepted from either side.
    pub max_message_size: HumanSize,
    pub tcp_keepalive: Keepalive,
    /// Soft limit for open files to ask for at start (capped by the hard
    /// limit); each session holds two sockets.
    pub max_open_files: u64,
    /// Track every session's state (templates, safe points, `SET
    /// reprise.template`); off makes Reprise a plain relay. Applies to
    /// sessions that start after a reload.
    pub session_tracking: bool,
    /// Read a session's state back from the server (one query of
    /// Reprise's own at an idle boundary) when the tracker cannot vouch
    /// for it, instead of leaving the session non-recoverable until DISCARD
    /// ALL.
    pub state_probe: bool,
    /// Per session: message bytes kept since the last safe point for
    /// replay; past it the session is non-recoverable until its next safe
    /// point.
    pub max_replay_log: HumanSize,
    /// Replace a lost server connection and replay the session onto it;
    /// off ends the session with 08006 as a plain proxy would.
    pub failover: bool,
    /// How long a session may spend getting a new server connection after
    /// losing one, retries with backoff included.
    pub failover_budget: HumanDuration,
    /// Carry a session over when its server process was ended by
    /// pg_terminate_backend (or a fast shutdown: both say 57P01); off
    /// passes that FATAL error to the client.
    pub replay_terminated: bool,
    /// Insert a token row (table `reprise.commit_guard`, created on first
    /// use) in every writing transaction just before its COMMIT, so that
    /// a COMMIT whose answer was lost across a promotion or a crash
    /// restart can still be settled. Applies to sessions that start after
    /// a reload.
    pub commit_guard: bool,
    /// Run an autocommit statement that may write (INSERT, UPDATE, DDL …)
    /// inside a transaction block of Reprise's own, so that its outcome
    /// can be settled like a COMMIT's when its answer is lost; without
    /// it such a statement gets 08007. Applies to sessions that start
    /// after a reload.
    pub wrap_autocommit_writes: bool,
    /// How often every backend is asked whether it is writable and on
    /// which timeline, so that a failover chooses at once; zero turns the
    /// background checks off (sessions then ask during a failover).
    pub health_check_period: HumanDuration,
    /// The user the background checks log in as (its password from the
    /// users file); unset, there are no background checks.
    pub health_check_user: Option<String>,
    pub health_check_database: String,
    /// How clients prove who they are, where no `[[hba]]` rule says
    /// otherwise.
    pub auth_type: AuthMethod,
    /// Rules tried in order, first match wins; with any rule present a
    /// connection no rule matches is refused.
    pub hba: Vec<HbaRule>,
    /// Fetches a user's verifier from the server, run as `auth_user`, for
    /// users the users file does not list; `$1` is the user name.
    pub auth_query: String,
    /// The user `auth_query` runs as (its password from the users file);
    /// unset, there is no lookup.
    pub auth_user: Option<String>,
    /// Users for whom Reprise may be unable to open a new server
    /// connection after a failure (their session then ends with 08006);
    /// `"all"` for every user. Anyone else with such a configuration is
    /// refused at start.
    pub failover_exempt_users: Vec<String>,
    pub client_tls: ClientTlsMode,
    /// PEM certificate chain and private key presented to clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub server_tls: ServerTlsMode,
    /// PEM CA certificates that `server_tls = "verify-full"` trusts.
    pub server_tls_ca_file: Option<PathBuf>,
    /// A client must have sent its startup packet and proved its identity
    /// within this time.
    pub auth_timeout: HumanDuration,
    /// Connections still in startup or authentication at once; more are
    /// refused with 53300.
    pub max_unauthenticated: usize,
    pub journal: JournalConfig,
    #[serde(rename = "backend")]
    pub backends: Vec<Backend>,
}

/// PgBouncer's default auth_query.
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = $1";

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            unix_socket_dir: None,
            data_dir: PathBuf::from("./reprise-data"),
            users_file: None,
            templates_dir: None,
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            max_client_conn: 10_000,
            workers: default_workers(),
            connect_timeout: HumanDuration(Duration::from_secs(10)),
            shutdown_timeout: HumanDuration(Duration::from_secs(30)),
            max_message_size: HumanSize(256 * 1024 * 1024),
            tcp_keepalive: Keepalive::default(),
            max_open_files: 65_536,
            session_tracking: true,
            state_probe: true,
            max_replay_log: HumanSize(1024 * 1024),
            failover: true,
            failover_budget: HumanDuration(Duration::from_secs(30)),
            replay_terminated: true,
            commit_guard: false,
            wrap_autocommit_writes: false,
            health_check_period: HumanDuration(Duration::from_secs(1)),
            health_check_user: None,
            health_check_database: "postgres".to_owned(),
            auth_type: AuthMethod::Trust,
            hba: Vec::new(),
            auth_query: DEFAULT_AUTH_QUERY.to_owned(),
            auth_user: None,
            failover_exempt_users: Vec::new(),
            client_tls: ClientTlsMode::Disable,
            tls_cert_file: None,
            tls_key_file: None,
            server_tls: ServerTlsMode::Disable,
            server_tls_ca_file: None,
            auth_timeout: HumanDuration(Duration::from_secs(60)),
            max_unauthenticated: 1000,
            journal: JournalConfig::default(),
            backends: Vec::new(),
        }
    }
}

/// One per CPU: a single thread costs less CPU per request (it takes
/// several sockets' events per wake-up) but caps throughput at one core.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Command-line values that replace the file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub backends: Vec<Backend>,
    pub data_dir: Option<PathBuf>,
    pub users_file: Option<PathBuf>,
    pub templates_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub auth_type: Option<AuthMethod>,
    pub auth_query: Option<String>,
    pub auth_user: Option<String>,
    pub client_tls: Option<ClientTlsMode>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub server_tls: Option<ServerTlsMode>,
    pub server_tls_ca_file: Option<PathBuf>,
    pub auth_timeout: Option<HumanDuration>,
    pub max_unauthenticated: Option<usize>,
}

/// Smallest accepted `max_message_size`: below this even a startup reply or
/// an ordinary error message would not fit.
const MIN_MESSAGE_SIZE: u64 = 64 * 1024;
/// PostgreSQL never sends or accepts a message above 1 GiB.
const MAX_MESSAGE_SIZE: u64 = 1024 * 1024 * 1024;

impl Config {
    /// Reads a TOML file; a missing path means all defaults.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                })?
            }
            None => Config::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_owned())
    }

    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(listen) = overrides.listen {
            self.listen = listen;
        }
        if !overrides.backends.is_empty() {
            self.backends = overrides.backends.clone();
        }
        if let Some(dir) = &overrides.data_dir {
            self.data_dir = dir.clone();
        }
        if let Some(file) = &overrides.users_file {
            self.users_file = Some(file.clone());
        }
        if let Some(dir) = &overrides.templates_dir {
            self.templates_dir = Some(dir.clone());
        }
        if let Some(format) = overrides.log_format {
            self.log_format = format;
        }
        if let Some(method) = overrides.auth_type {
            self.auth_type = method;
        }
        if let Some(query) = &overrides.auth_query {
            self.auth_query = query.clone();
        }
        if let Some(user) = &overrides.auth_user {
            self.auth_user = Some(user.clone());
        }
        if let Some(mode) = overrides.client_tls {
            self.client_tls = mode;
        }
        if let Some(file) = &overrides.tls_cert_file {
            self.tls_cert_file = Some(file.clone());
        }
        if let Some(file) = &overrides.tls_key_file {
            self.tls_key_file = Some(file.clone());
        }
        if let Some(mode) = overrides.server_tls {
            self.server_tls = mode;
        }
        if let Some(file) = &overrides.server_tls_ca_file {
            self.server_tls_ca_file = Some(file.clone());
        }
        if let Some(timeout) = overrides.auth_timeout {
            self.auth_timeout = timeout;
        }
        if let Some(limit) = overrides.max_unauthenticated {
            self.max_unauthenticated = limit;
        }
    }

    /// Checks what serde cannot: ranges, required entries, consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backends.is_empty() {
            return Err(ConfigError::invalid(
                "backend",
                "no backend configured: add a [[backend]] table with name, host and port, or pass --backend NAME=HOST:PORT",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (index, backend) in self.backends.iter().enumerate() {
            if backend.name.is_empty() {
                return Err(ConfigError::invalid(
                    format!("backend[{index}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(&backend.name) {
                return Err(ConfigError::invalid(
                    format!("backend[{index}].name"),
                    format!("backend name {:?} is used twice", backend.name),
                ));
            }
            if backend.host.is_empty() {
                return Err(ConfigError::invalid(
                    format!("backend[{index}].host"),
                    "must not be empty",
                ));
            }
            if backend.port == 0 {
                return Err(ConfigError::invalid(
                    format!("backend[{index}].port"),
                    "must be from 1 to 65535",
                ));
            }
        }
        if self.max_client_conn == 0 {
            return Err(ConfigError::invalid(
                "max_client_conn",
                "must be at least 1",
            ));
        }
        if !(1..=1024).contains(&self.workers) {
            return Err(ConfigError::invalid("workers", "must be from 1 to 1024"));
        }
        if self.failover_budget.0.is_zero() {
            return Err(ConfigError::invalid(
                "failover_budget",
                "must be longer than zero (set failover = false to end sessions instead)",
            ));
        }
        if self.connect_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                "connect_timeout",
                "must be longer than zero",
            ));
        }
        if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&self.max_message_size.0) {
            return Err(ConfigError::invalid(
                "max_message_size",
                format!(
                    "must be from 64KiB to 1GiB, got {} bytes",
                    self.max_message_size.0
                ),
            ));
        }
        if self.tcp_keepalive.enabled {
            if self.tcp_keepalive.idle.0 < Duration::from_secs(1) {
                return Err(ConfigError::invalid(
                    "tcp_keepalive.idle",
                    "must be at least 1s",
                ));
            }
            if self.tcp_keepalive.interval.0 < Duration::from_secs(1) {
                return Err(ConfigError::invalid(
                    "tcp_keepalive.interval",
                    "must be at least 1s",
                ));
            }
            if self.tcp_keepalive.count == 0 {
                return Err(ConfigError::invalid(
                    "tcp_keepalive.count",
                    "must be at least 1",
                ));
            }
        }
        if self
            .health_check_user
            .as_ref()
            .is_some_and(|user| user.is_empty())
        {
            return Err(ConfigError::invalid(
                "health_check_user",
                "must not be empty; leave the key out for no background checks",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "must not be empty"));
        }
        if self
            .templates_dir
            .as_ref()
            .is_some_and(|dir| dir.as_os_str().is_empty())
        {
            return Err(ConfigError::invalid(
                "templates_dir",
                "must not be empty; leave the key out for no templates",
            ));
        }
        if !(4 * 1024..=MAX_MESSAGE_SIZE).contains(&self.max_replay_log.0) {
            return Err(ConfigError::invalid(
                "max_replay_log",
                "must be from 4KiB to 1GiB",
            ));
        }
        self.validate_auth()?;
        self.journal.validate()?;
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(ConfigError::invalid(
                "log_level",
                format!("{:?} is not a valid filter: {err}", self.log_level),
            ));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        for (index, rule) in self.hba.iter().enumerate() {
            rule.validate().map_err(|(field, problem)| {
                ConfigError::invalid(format!("hba[{index}].{field}"), problem)
            })?;
        }
        if self.auth_user.as_ref().is_some_and(String::is_empty) {
            return Err(ConfigError::invalid(
                "auth_user",
                "must not be empty; leave the key out for no auth_query",
            ));
        }
        if self.auth_user.is_some() && !self.auth_query.contains("$1") {
            return Err(ConfigError::invalid(
                "auth_query",
                "must take the user name as $1",
            ));
        }
        if self.auth_timeout.0 < Duration::from_secs(1) {
            return Err(ConfigError::invalid("auth_timeout", "must be at least 1s"));
        }
        if self.max_unauthenticated == 0 {
            return Err(ConfigError::invalid(
                "max_unauthenticated",
                "must be at least 1",
            ));
        }
        if self.client_tls != ClientTlsMode::Disable {
            for (key, file) in [
                ("tls_cert_file", &self.tls_cert_file),
                ("tls_key_file", &self.tls_key_file),
            ] {
                if file.is_none() {
                    return Err(ConfigError::invalid(
                        key,
                        format!("must be set when client_tls is {:?}", self.client_tls)
                            .to_lowercase(),
                    ));
                }
            }
        }
        if self.server_tls == ServerTlsMode::VerifyFull && self.server_tls_ca_file.is_none() {
            return Err(ConfigError::invalid(
                "server_tls_ca_file",
                "must be set when server_tls is verify-full",
            ));
        }
        let plain_only = self.client_tls == ClientTlsMode::Disable;
        let uses_password = self.auth_type == AuthMethod::Password
            || self
                .hba
                .iter()
                .any(|rule| rule.method == AuthMethod::Password);
        if plain_only && uses_password {
            return Err(ConfigError::invalid(
                "auth_type",
                "method \"password\" sends the password in clear text and is only offered over TLS; enable client_tls",
            ));
        }
        Ok(())
    }

    pub fn max_replay_log(&self) -> usize {
        usize::try_from(self.max_replay_log.0).unwrap_or(usize::MAX)
    }

    pub fn max_message_size(&self) -> usize {
        usize::try_from(self.max_message_size.0).unwrap_or(usize::MAX)
    }

    /// Names the keys whose new values only a restart applies.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.listen != new.listen {
            keys.push("listen");
        }
        if self.unix_socket_dir != new.unix_socket_dir {
            keys.push("unix_socket_dir");
        }
        if self.data_dir != new.data_dir {
            keys.push("data_dir");
        }
        if self.log_format != new.log_format {
            keys.push("log_format");
        }
        if self.max_open_files != new.max_open_files {
            keys.push("max_open_files");
        }
        if self.workers != new.workers {
            keys.push("workers");
        }
        if self.journal != new.journal {
            keys.push("journal");
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let config = Config::from_toml(text)?;
        config.validate().map_err(|err| err.to_string())?;
        Ok(config)
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../fixtures/reprise.toml");
        let config = parse(text).expect("example config is valid");
        assert_eq!(config.backends[0].name, "primary");
        assert_eq!(config.connect_timeout.0, Duration::from_secs(10));
        assert_eq!(config.max_message_size.0, 256 * 1024 * 1024);
    }

    #[test]
    fn defaults() {
        let config = parse("[[backend]]\nname = \"a\"\nhost = \"localhost\"\n").expect("valid");
        assert_eq!(config.listen, "127.0.0.1:6432".parse().expect("addr"));
        assert_eq!(config.data_dir, PathBuf::from("./reprise-data"));
        assert_eq!(config.backends[0].port, 5432);
        assert_eq!(config.templates_dir, None);
    }

    #[test]
    fn templates_dir() {
        let backend = "[[backend]]\nname = \"a\"\nhost = \"h\"\n";
        let config = parse(&format!("templates_dir = \"templates\"\n{backend}")).expect("valid");
        assert_eq!(config.templates_dir, Some(PathBuf::from("templates")));
        let empty = parse(&format!("templates_dir = \"\"\n{backend}")).expect_err("empty");
        assert!(empty.contains("templates_dir"), "{empty}");
        let mut config = config;
        config.apply(&Overrides {
            templates_dir: Some(PathBuf::from("/etc/reprise/templates")),
            ..Overrides::default()
        });
        assert_eq!(
            config.templates_dir,
            Some(PathBuf::from("/etc/reprise/templates"))
        );
    }

    #[test]
    fn journal_settings() {
        let backend = "[[backend]]\nname = \"a\"\nhost = \"h\"\n";
        let config = parse(&format!(
            "[journal]\nfsync = \"always\"\ncorruption = \"tolerate-tail\"\nretain = \"all\"\nsegment_size = \"1MiB\"\n{backend}"
        ))
        .expect("valid");
        assert_eq!(config.journal.fsync, FsyncPolicy::Always);
        assert_eq!(config.journal.corruption, CorruptionPolicy::TolerateTail);
        assert_eq!(config.journal.retain, Retain::All);
        assert_eq!(config.max_replay_log.0, 1024 * 1024);
        let bad = parse(&format!("[journal]\nfsync = \"sometimes\"\n{backend}")).expect_err("bad");
        assert!(bad.contains("fsync"), "{bad}");
        let small =
            parse(&format!("[journal]\nsegment_size = \"1KiB\"\n{backend}")).expect_err("small");
        assert!(small.contains("journal.segment_size"), "{small}");
    }

    #[test]
    fn auth_settings() {
        let backend = "[[backend]]\nname = \"a\"\nhost = \"h\"\n";
        let config = parse(&format!(
            "auth_type = \"scram-sha-256\"\nclient_tls = \"require\"\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\nserver_tls = \"verify-full\"\nserver_tls_ca_file = \"ca.pem\"\nauth_timeout = \"5s\"\n[[hba]]\ntype = \"hostssl\"\nusers = [\"app\"]\naddress = \"10.0.0.0/8\"\nmethod = \"password\"\n{backend}"
        ))
        .expect("valid");
        assert_eq!(config.auth_type, AuthMethod::ScramSha256);
        assert_eq!(config.server_tls, ServerTlsMode::VerifyFull);
        assert_eq!(config.hba[0].method, AuthMethod::Password);
        assert_eq!(config.auth_timeout.0, Duration::from_secs(5));
        let no_key = parse(&format!(
            "client_tls = \"allow\"\ntls_cert_file = \"c\"\n{backend}"
        ))
        .expect_err("no key file");
        assert!(no_key.contains("tls_key_file"), "{no_key}");
        let no_ca = parse(&format!("server_tls = \"verify-full\"\n{backend}")).expect_err("no ca");
        assert!(no_ca.contains("server_tls_ca_file"), "{no_ca}");
        let bad_rule = parse(&format!(
            "[[hba]]\naddress = \"10.0.0.0/99\"\nmethod = \"md5\"\n{backend}"
        ))
        .expect_err("bad cidr");
        assert!(bad_rule.contains("hba[0].address"), "{bad_rule}");
        let bad_method =
            parse(&format!("auth_type = \"kerberos\"\n{backend}")).expect_err("method");
        assert!(bad_method.contains("auth_type"), "{bad_method}");
        let clear = parse(&format!("auth_type = \"password\"\n{backend}")).expect_err("clear text");
        assert!(clear.contains("TLS"), "{clear}");
    }

    #[test]
    fn units() {
        assert_eq!(
            "5min".parse::<HumanDuration>().expect("ok").0,
            Duration::from_secs(300)
        );
        assert_eq!(
            "64MiB".parse::<HumanSize>().expect("ok").0,
            64 * 1024 * 1024
        );
        assert!("12".parse::<HumanDuration>().is_err());
        assert!("lots".parse::<HumanSize>().is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = parse("lisen = \"127.0.0.1:1\"\n").expect_err("unknown key");
        assert!(unknown.contains("lisen"), "{unknown}");
        let duration =
            parse("connect_timeout = \"3 parsecs\"\n[[backend]]\nname=\"a\"\nhost=\"h\"\n")
                .expect_err("bad unit");
        assert!(
            duration.contains("connect_timeout") && duration.contains("invalid duration"),
            "{duration}"
        );
        let no_backend = parse("").expect_err("no backend");
        assert!(no_backend.contains("`backend`"), "{no_backend}");
        let dup =
            parse("[[backend]]\nname=\"a\"\nhost=\"h\"\n[[backend]]\nname=\"a\"\nhost=\"h\"\n")
                .expect_err("dup");
        assert!(dup.contains("backend[1].name"), "{dup}");
        let size = parse("max_message_size = \"1KiB\"\n[[backend]]\nname=\"a\"\nhost=\"h\"\n")
            .expect_err("small");
        assert!(size.contains("max_message_size"), "{size}");
    }

    #[test]
    fn backend_flag() {
        let backend = Backend::parse_flag("main=db.example:5433").expect("ok");
        assert_eq!(
            (backend.name.as_str(), backend.host.as_str(), backend.port),
            ("main", "db.example", 5433)
        );
        let v6 = Backend::parse_flag("v6=[::1]:5432").expect("ok");
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.address(), "[::1]:5432");
        assert!(Backend::parse_flag("nohost").is_err());
        assert!(Backend::parse_flag("a=h:notaport").is_err());
    }
}
