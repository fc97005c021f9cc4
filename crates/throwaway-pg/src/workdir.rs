//! Per-cluster temporary directories, and cleaning up after processes that
//! died without dropping their clusters.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fs4::fs_std::FileExt;
use tempfile::TempDir;

use crate::error::{Error, IoContext};
use crate::procs;
use crate::user::{chown_to_server_user, ServerUser};

/// Parent of every temporary directory. Fixed rather than `$TMPDIR`: the
/// server user must be able to reach it, and Unix socket paths must stay
/// short (108 bytes on Linux).
pub(crate) const TMP_ROOT: &str = "/tmp";

/// Prefix of every temporary directory this crate creates.
pub(crate) const PREFIX: &str = "throwaway-pg-";

/// Name of the lock file whose `flock` marks a temporary directory as in use.
const OWNER_LOCK: &str = "owner.lock";

/// How long to keep killing the processes of an abandoned cluster.
const ABANDONED_KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A temporary directory `/tmp/throwaway-pg-XXXXXX`, owned by the server
/// user, removed on drop.
///
/// It holds an exclusive `flock` on its `owner.lock` for its whole life.
/// The kernel drops that lock when the owning process dies, however it
/// dies, which is how [`remove_abandoned_clusters`] tells a directory whose
/// owner was killed (say, by a test runner's timeout) from one in use.
#[derive(Debug)]
pub(crate) struct WorkDir {
    // Field order matters: the directory is removed before the lock is
    // released, so nobody sees it unlocked while it still exists.
    dir: Option<TempDir>,
    path: PathBuf,
    _owner: File,
}

impl WorkDir {
    pub(crate) fn create(user: &ServerUser) -> Result<WorkDir, Error> {
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(TMP_ROOT)
            .io_context(|| format!("could not create a temporary directory in {TMP_ROOT}"))?;
        let path = fs::canonicalize(dir.path())
            .io_context(|| format!("could not resolve {}", dir.path().display()))?;
        // Lock under a temporary name, then rename: a directory only ever
        // shows an `owner.lock` that is already locked.
        let pending = path.join("owner.lock.new");
        let owner = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&pending)
            .io_context(|| format!("could not create {}", pending.display()))?;
        FileExt::lock_exclusive(&owner)
            .io_context(|| format!("could not lock {}", pending.display()))?;
        let final_path = path.join(OWNER_LOCK);
        fs::rename(&pending, &final_path)
            .io_context(|| format!("could not rename {}", pending.display()))?;
        chown_to_server_user(&path, user)?;
        Ok(WorkDir {
            dir: Some(dir),
            path,
            _owner: owner,
        })
    }

    /// The canonical path of the directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory on disk for inspection instead of removing it,
    /// and takes it out of [`remove_abandoned_clusters`]'s reach.
    pub(crate) fn keep(mut self) -> PathBuf {
        let _ = fs::remove_file(self.path.join(OWNER_LOCK));
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }
}

/// Removes the temporary directories of clusters whose owning process died
/// without dropping them, after SIGKILLing whatever server processes still
/// run there. Returns how many directories were removed.
///
/// A process killed by a test runner's timeout, or by SIGKILL, never runs
/// destructors, so its servers keep running and their directories stay. This
/// is called at the start of every cluster, so such leftovers live only
/// until the next test run. A directory counts as abandoned when its
/// `owner.lock` can be locked, which is only possible once its owner is gone.
/// Directories kept on purpose (`THROWAWAY_PG_KEEP`) have no lock file and
/// are left alone.
pub fn remove_abandoned_clusters() -> Result<usize, Error> {
    let entries = fs::read_dir(TMP_ROOT).io_context(|| format!("could not list {TMP_ROOT}"))?;
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let dir = entry.path();
        if remove_if_abandoned(&dir) {
            removed += 1;
        }
    }
    Ok(removed)
}

fn remove_if_abandoned(dir: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return false;
    };
    if !meta.is_dir() {
        return false;
    }
    let lock_path = dir.join(OWNER_LOCK);
    let Ok(lock) = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&lock_path)
    else {
        return false;
    };
    if !FileExt::try_lock_exclusive(&lock).unwrap_or(false) {
        return false;
    }
    let Ok(root) = fs::canonicalize(dir) else {
        return false;
    };
    tracing::info!(dir = %root.display(), "removing a throwaway cluster whose owner died");
    if let Err(survivors) =
        procs::kill_cluster_processes(&root, meta.uid(), &[], ABANDONED_KILL_TIMEOUT)
    {
        tracing::warn!(dir = %root.display(), ?survivors, "processes survived SIGKILL; leaving the directory");
        return false;
    }
    match fs::remove_dir_all(&root) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %root.display(), error = %e, "could not remove an abandoned cluster directory");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::{run_unprivileged, server_user};
    use std::process::Command;

    #[test]
    fn live_directories_are_left_alone_and_dead_ones_removed() {
        let user = server_user().unwrap();
        let live = WorkDir::create(user).unwrap();

        // Simulate an owner that died: a directory whose owner.lock nobody holds,
        // with a process still working in it.
        let dead = WorkDir::create(user).unwrap();
        let dead_path = dead.path().to_path_buf();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("60").current_dir(&dead_path);
        run_unprivileged(&mut sleeper).unwrap();
        let mut sleeper = sleeper.spawn().unwrap();
        let sleeper_pid = i32::try_from(sleeper.id()).unwrap();
        let dead = dead.keep();
        File::create(dead.join(OWNER_LOCK)).unwrap();

        remove_abandoned_clusters().unwrap();

        assert!(live.path().exists());
        assert!(!dead_path.exists());
        let status = sleeper.wait().unwrap();
        assert!(!status.success());
        assert!(!procs::is_process_live(sleeper_pid));
    }
}
