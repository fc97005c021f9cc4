//! Running helper commands (initdb, cp, pg_ctl, psql, …) with captured output
//! and a deadline.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::{Error, IoContext};

/// libpq environment variables that would silently change where or how a
/// client connects. Every client command here names its target explicitly,
/// and a stray `PGOPTIONS` or `PGSERVICE` from a developer's shell must not
/// change what the tests see.
const LIBPQ_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGREQUIRESSL",
    "PGSSLNEGOTIATION",
    "PGGSSENCMODE",
    "PGCHANNELBINDING",
    "PGTARGETSESSIONATTRS",
    "PGLOADBALANCEHOSTS",
    "PGDATA",
];

/// Removes the libpq environment variables listed in [`LIBPQ_ENV`].
pub(crate) fn scrub_libpq_env(cmd: &mut Command) {
    for name in LIBPQ_ENV {
        cmd.env_remove(name);
    }
}

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub(crate) struct Captured {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// Turns a non-zero exit into [`Error::CommandFailed`].
    pub(crate) fn check(self) -> Result<Captured, Error> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(Error::CommandFailed {
                command: self.command,
                status: self.status,
                stdout: self.stdout,
                stderr: self.stderr,
                log_tail: None,
            })
        }
    }
}

/// A readable one-line rendering of a command for logs and errors.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut out = quote(cmd.get_program());
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&quote(arg));
    }
    out
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` to completion, feeding it `input` on stdin and capturing its
/// stdout and stderr, and kills it (with its whole process group) if it runs
/// longer than `timeout`.
///
/// The command is put in a process group of its own so that a timeout also
/// takes down whatever it forked (pg_basebackup forks a WAL streamer). The
/// group is signalled only while its leader is known not to have been reaped,
/// so the group id cannot have been reused by an unrelated process.
///
/// `label` replaces the rendered command line in errors when given; psql uses
/// it to show the SQL it was fed.
pub(crate) fn run(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
    label: Option<String>,
) -> Result<Captured, Error> {
    let command = label.unwrap_or_else(|| describe(cmd));
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    tracing::debug!(%command, "running");
    let mut child = cmd
        .spawn()
        .io_context(|| format!("could not start `{command}`"))?;

    let stdout = spawn_reader(child.stdout.take());
    let stderr = spawn_reader(child.stderr.take());
    let writer = match (child.stdin.take(), input) {
        (Some(mut stdin), Some(bytes)) => {
            let bytes = bytes.to_vec();
            // A child that exits without reading all of its input makes this
            // write fail with EPIPE; its exit status tells the real story.
            Some(thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            }))
        }
        _ => None,
    };

    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(source) => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(Error::Io {
                    context: format!("could not wait for `{command}`"),
                    source,
                });
            }
        }
        if Instant::now() >= deadline {
            kill_group(child.id());
            let _ = child.wait();
            break None;
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(20));
    };

    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let stdout = join_reader(stdout);
    let stderr = join_reader(stderr);
    match status {
        Some(status) => Ok(Captured {
            command,
            status,
            stdout,
            stderr,
        }),
        None => Err(Error::CommandTimedOut {
            command,
            timeout,
            stderr,
            log_tail: None,
        }),
    }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn spawn_reader<R: Read + Send + 'static>(pipe: Option<R>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error only truncates what is reported; keep what arrived.
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    })
}

fn join_reader(handle: Option<JoinHandle<Vec<u8>>>) -> String {
    handle
        .and_then(|h| h.join().ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_when_needed() {
        let mut cmd = Command::new("/usr/bin/psql");
        cmd.args(["-p", "5432", "-c", "select 'x'"]);
        assert_eq!(
            describe(&cmd),
            r"/usr/bin/psql -p 5432 -c 'select '\''x'\'''"
        );
    }

    #[test]
    fn run_captures_output_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat; echo oops >&2; exit 3"]);
        let out = run(&mut cmd, Some(b"hello"), Duration::from_secs(10), None).unwrap();
        assert_eq!(out.stdout, "hello");
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(out.status.code(), Some(3));
        let err = out.check().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("failed"), "{text}");
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn run_kills_on_timeout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let started = Instant::now();
        let err = run(&mut cmd, None, Duration::from_millis(200), None).unwrap_err();
        assert!(matches!(err, Error::CommandTimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
