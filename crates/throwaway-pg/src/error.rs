//! The crate's error type.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything that can go wrong while finding, starting, driving or stopping
/// a throwaway cluster.
///
/// Variants carry enough context to diagnose a failure from a CI log alone:
/// which command ran, how it ended, what it printed on stderr, and where it
/// matters the tail of the server log, because "postgres failed to start"
/// without the server's own complaint is useless to whoever reads the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No directory holding both `initdb` and `postgres` was found.
    #[error("no usable PostgreSQL installation found (looked at: {searched})")]
    InstallNotFound {
        /// The places that were looked at, for the error message.
        searched: String,
    },

    /// [`Options`](crate::Options) that cannot be turned into a valid configuration.
    #[error("invalid options: {0}")]
    InvalidOptions(String),

    /// A file-system or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path or command involved.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A system call made through `nix` (signals, user lookup) failed.
    #[error("{context}: {source}")]
    Os {
        /// What was being done.
        context: String,
        /// The underlying errno.
        #[source]
        source: nix::errno::Errno,
    },

    /// The unprivileged OS user that runs the server could not be used or created.
    #[error("cannot run the server as OS user `{user}`: {reason}")]
    ServerUser {
        /// The user name.
        user: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A command ran to completion but reported failure.
    #[error("`{command}` failed ({status}){}", details(.stderr, .log_tail))]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// What it printed on stdout.
        stdout: String,
        /// What it printed on stderr.
        stderr: String,
        /// The tail of the server log, when a server was involved.
        log_tail: Option<String>,
    },

    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed{}", details(.stderr, .log_tail))]
    CommandTimedOut {
        /// The command line.
        command: String,
        /// How long it was given.
        timeout: Duration,
        /// What it had printed on stderr before it was killed.
        stderr: String,
        /// The tail of the server log, when a server was involved.
        log_tail: Option<String>,
    },

    /// A command succeeded but printed something that could not be understood.
    #[error("unexpected output from `{command}`: {output:?}")]
    UnexpectedOutput {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },

    /// Every candidate port was locked by another lease or bound by another process.
    #[error("no free TCP port on 127.0.0.1 in {first}..{end} after {attempts} attempts")]
    NoFreePort {
        /// First port of the range tried.
        first: u16,
        /// End (exclusive) of the range tried.
        end: u16,
        /// How many candidates were tried.
        attempts: u32,
    },

    /// The postmaster exited before it became ready.
    #[error("PostgreSQL server for {} exited during startup ({status}){}", .data_dir.display(), log_section(.log_tail))]
    ServerExited {
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// How the postmaster ended.
        status: String,
        /// The tail of the server log.
        log_tail: String,
    },

    /// Something the cluster was waiting for did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what} (data directory {}){}", .data_dir.display(), log_section(.log_tail))]
    Timeout {
        /// What was awaited.
        what: String,
        /// The cluster's data directory.
        data_dir: PathBuf,
        /// How long it was awaited.
        timeout: Duration,
        /// The tail of the server log.
        log_tail: String,
    },

    /// An operation that needs a running postmaster found none.
    #[error("PostgreSQL server for {} is not running", .data_dir.display())]
    NotRunning {
        /// The cluster's data directory.
        data_dir: PathBuf,
    },

    /// Processes of a cluster were still alive after being sent SIGKILL.
    #[error("processes of the cluster in {} survived SIGKILL: {pids:?}", .dir.display())]
    ProcessesSurvived {
        /// The cluster's temporary directory.
        dir: PathBuf,
        /// The survivors.
        pids: Vec<i32>,
    },
}

impl Error {
    /// Attaches the tail of a server log to a command error, so that a failed
    /// `pg_ctl` or `psql` is reported together with what the server said.
    pub(crate) fn with_log_tail(self, tail: String) -> Error {
        match self {
            Error::CommandFailed {
                command,
                status,
                stdout,
                stderr,
                ..
            } => Error::CommandFailed {
                command,
                status,
                stdout,
                stderr,
                log_tail: Some(tail),
            },
            Error::CommandTimedOut {
                command,
                timeout,
                stderr,
                ..
            } => Error::CommandTimedOut {
                command,
                timeout,
                stderr,
                log_tail: Some(tail),
            },
            other => other,
        }
    }
}

fn details(stderr: &str, log_tail: &Option<String>) -> String {
    let mut out = String::new();
    let stderr = stderr.trim_end();
    if !stderr.is_empty() {
        out.push_str("\n--- stderr ---\n");
        out.push_str(stderr);
    }
    if let Some(tail) = log_tail {
        out.push_str(&log_section(tail));
    }
    out
}

fn log_section(tail: &str) -> String {
    let tail = tail.trim_end();
    if tail.is_empty() {
        String::from("\n--- server log is empty ---")
    } else {
        format!("\n--- server log (tail) ---\n{tail}")
    }
}

/// Adds context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Wraps the error into [`Error::Io`] with a description built lazily.
    fn io_context<F: FnOnce() -> String>(self, context: F) -> Result<T, Error>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context<F: FnOnce() -> String>(self, context: F) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

/// Adds context to `nix::Result`s.
pub(crate) trait OsContext<T> {
    /// Wraps the error into [`Error::Os`] with a description built lazily.
    fn os_context<F: FnOnce() -> String>(self, context: F) -> Result<T, Error>;
}

impl<T> OsContext<T> for nix::Result<T> {
    fn os_context<F: FnOnce() -> String>(self, context: F) -> Result<T, Error> {
        self.map_err(|source| Error::Os {
            context: context(),
            source,
        })
    }
}
