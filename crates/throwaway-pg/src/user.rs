//! The OS user that runs server-side commands.
//!
//! `initdb` and `postgres` refuse to run as root. Test runners and CI
//! containers often do run as root, so in that case every server-side
//! command is run as the unprivileged user [`SERVER_USER_NAME`], created on
//! first use if it does not exist. When not root, everything runs as the
//! current user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use fs4::fs_std::FileExt;
use nix::unistd::{getegid, geteuid, Group, User};

use crate::command;
use crate::error::{Error, IoContext};
use crate::lockfile::open_lock_file;

/// The OS user that runs the server when the current process is root.
pub const SERVER_USER_NAME: &str = "postgres";

/// Serializes user creation across processes; `useradd` locks `/etc/passwd`
/// itself, but two racing callers would otherwise see spurious
/// "user already exists" failures.
const USERADD_LOCK: &str = "/tmp/throwaway-pg-useradd.lock";

/// Who runs the server-side commands.
#[derive(Clone, Debug)]
pub(crate) struct ServerUser {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: Option<PathBuf>,
    /// Whether commands must switch to this user (we are root).
    pub switch: bool,
}

static SERVER_USER: OnceLock<ServerUser> = OnceLock::new();
static RESOLVE: Mutex<()> = Mutex::new(());

/// The user that runs server-side commands, resolved (and created if needed)
/// once per process.
pub(crate) fn server_user() -> Result<&'static ServerUser, Error> {
    if let Some(user) = SERVER_USER.get() {
        return Ok(user);
    }
    let _guard = RESOLVE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(user) = SERVER_USER.get() {
        return Ok(user);
    }
    let user = resolve()?;
    Ok(SERVER_USER.get_or_init(|| user))
}

fn resolve() -> Result<ServerUser, Error> {
    let euid = geteuid();
    if !euid.is_root() {
        let passwd = User::from_uid(euid).ok().flatten();
        return Ok(ServerUser {
            uid: euid.as_raw(),
            gid: getegid().as_raw(),
            name: passwd
                .as_ref()
                .map_or_else(|| euid.to_string(), |u| u.name.clone()),
            home: passwd.map(|u| u.dir),
            switch: false,
        });
    }
    let user = match lookup()? {
        Some(user) => user,
        None => {
            create_user()?;
            lookup()?.ok_or_else(|| Error::ServerUser {
                user: SERVER_USER_NAME.into(),
                reason: "still missing after useradd succeeded".into(),
            })?
        }
    };
    if user.uid.is_root() {
        return Err(Error::ServerUser {
            user: SERVER_USER_NAME.into(),
            reason: "it has uid 0, and PostgreSQL refuses to run as root".into(),
        });
    }
    Ok(ServerUser {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        name: user.name,
        home: Some(user.dir),
        switch: true,
    })
}

fn lookup() -> Result<Option<User>, Error> {
    User::from_name(SERVER_USER_NAME).map_err(|e| Error::ServerUser {
        user: SERVER_USER_NAME.into(),
        reason: format!("user lookup failed: {e}"),
    })
}

fn create_user() -> Result<(), Error> {
    let lock = open_lock_file(Path::new(USERADD_LOCK))?;
    FileExt::lock_exclusive(&lock).io_context(|| format!("could not lock {USERADD_LOCK}"))?;
    if lookup()?.is_some() {
        return Ok(());
    }
    let group_exists = Group::from_name(SERVER_USER_NAME).ok().flatten().is_some();
    let shell = ["/usr/sbin/nologin", "/sbin/nologin", "/bin/false"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/bin/false");
    // A minimal PATH may lack /usr/sbin even for root.
    let useradd = ["/usr/sbin/useradd", "/sbin/useradd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("useradd");
    let mut cmd = Command::new(useradd);
    cmd.args(["--system", "--no-create-home", "--shell", shell]);
    if group_exists {
        cmd.args(["--gid", SERVER_USER_NAME]);
    } else {
        cmd.arg("--user-group");
    }
    cmd.arg(SERVER_USER_NAME);
    tracing::info!(
        user = SERVER_USER_NAME,
        "creating the OS user that runs throwaway PostgreSQL servers"
    );
    command::run(&mut cmd, None, Duration::from_secs(60), None)
        .and_then(command::Captured::check)
        .map_err(|e| Error::ServerUser {
            user: SERVER_USER_NAME.into(),
            reason: format!("could not create it: {e}"),
        })?;
    Ok(())
}

/// Prepares `cmd` to run as the unprivileged server user.
///
/// When the current process is root this sets the command's uid and gid to
/// those of [`SERVER_USER_NAME`] (creating that user if needed; the child
/// also drops root's supplementary groups), sets `USER`, `LOGNAME` and
/// `HOME` accordingly, and, if no working directory was set, uses `/` so the
/// child does not start in a directory it cannot read. Callers that know
/// better (the cluster's own temporary directory) should set `current_dir`
/// themselves. When not root this changes nothing.
pub fn run_unprivileged(cmd: &mut Command) -> Result<(), Error> {
    let user = server_user()?;
    if !user.switch {
        return Ok(());
    }
    cmd.uid(user.uid).gid(user.gid);
    cmd.env("USER", &user.name).env("LOGNAME", &user.name);
    match &user.home {
        Some(home) if home.is_dir() => cmd.env("HOME", home),
        _ => cmd.env("HOME", "/"),
    };
    if cmd.get_current_dir().is_none() {
        cmd.current_dir("/");
    }
    Ok(())
}

/// Gives `path` (not recursively) to the server user when running as root,
/// so that a program started with [`run_unprivileged`] can use what this
/// process created. When not root this changes nothing.
pub fn give_to_server_user(path: &Path) -> Result<(), Error> {
    chown_to_server_user(path, server_user()?)
}

/// Gives `path` to the server user when running as root, so that the server
/// can use what this process created.
pub(crate) fn chown_to_server_user(path: &Path, user: &ServerUser) -> Result<(), Error> {
    if user.switch {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .io_context(|| format!("could not give {} to user {}", path.display(), user.name))?;
    }
    Ok(())
}
