//! Finding and killing every process that belongs to a cluster.
//!
//! Killing the postmaster's process group is not enough: each PostgreSQL
//! child process (backends, checkpointer, walwriter, walreceiver, …) calls
//! `setsid()` right after fork, so it leads a session and process group of
//! its own. Once the postmaster is gone, those orphans are reparented to
//! init and keep their ports' connections, shared memory and CPU. What they
//! all keep is their working directory: every server process `chdir`s into
//! the data directory. So a cluster's processes are found by scanning
//! `/proc` for live processes of the server user whose working directory
//! lies inside the cluster's temporary directory, plus any live member of
//! the process groups the cluster started.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// One line of `/proc` we care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcEntry {
    pid: i32,
    state: char,
    pgrp: i32,
    uid: u32,
}

/// Parses the state and process group from the contents of `/proc/<pid>/stat`.
/// The command name (field 2) may contain spaces and parentheses, so fields
/// are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether a process in `state` still runs (zombies and dead tasks hold no
/// resources but their pid).
fn is_live(state: char) -> bool {
    !matches!(state, 'Z' | 'X' | 'x')
}

fn list_processes() -> Vec<ProcEntry> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let uid = entry.metadata().ok()?.uid();
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            let (state, pgrp) = parse_stat(&stat)?;
            Some(ProcEntry {
                pid,
                state,
                pgrp,
                uid,
            })
        })
        .collect()
}

fn cwd_of(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// Live processes that belong to the cluster rooted at `root`: members of
/// one of `groups`, or processes of `uid` working inside `root`. `root` must
/// be canonical, as `/proc/<pid>/cwd` is.
pub(crate) fn cluster_processes(root: &Path, uid: u32, groups: &[i32]) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    list_processes()
        .into_iter()
        .filter(|p| p.pid != me && is_live(p.state))
        .filter(|p| {
            groups.contains(&p.pgrp)
                || (p.uid == uid && cwd_of(p.pid).is_some_and(|cwd| cwd.starts_with(root)))
        })
        .map(|p| p.pid)
        .collect()
}

/// SIGKILLs every process of the cluster rooted at `root` until none is
/// left, or returns the survivors once `timeout` has passed.
pub(crate) fn kill_cluster_processes(
    root: &Path,
    uid: u32,
    groups: &[i32],
    timeout: Duration,
) -> Result<(), Vec<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        let victims = cluster_processes(root, uid, groups);
        if victims.is_empty() {
            return Ok(());
        }
        for pid in &victims {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if Instant::now() >= deadline {
            return Err(victims);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `pid` is a live (non-zombie) process.
#[cfg(test)]
pub(crate) fn is_process_live(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_stat(&stat))
        .is_some_and(|(state, _)| is_live(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat = "1234 (postgres: walwriter (x)) S 1200 1234 1234 0 -1 4194560 ...";
        assert_eq!(parse_stat(stat), Some(('S', 1234)));
        assert_eq!(parse_stat("12 (a b) Z 1 7 7"), Some(('Z', 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn sees_itself_as_live() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(is_process_live(me));
        assert!(!is_live('Z'));
    }
}
