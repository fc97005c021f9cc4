//! The shared, initdb'ed template data directory that clusters are copied from.
//!
//! `initdb` takes most of a second and a good deal of CPU; copying its result
//! takes a fraction of that. So each machine runs `initdb` once per
//! installation major version, server user and superuser name, into
//! `/tmp/throwaway-pg-template-<major>-<uid>[-<superuser>]`, and every
//! cluster copies that directory.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fs4::fs_std::FileExt;

use crate::command;
use crate::error::{Error, IoContext};
use crate::install::Install;
use crate::lockfile::open_lock_file;
use crate::user::{run_unprivileged, ServerUser};
use crate::workdir::{WorkDir, PREFIX, TMP_ROOT};

const INITDB_TIMEOUT: Duration = Duration::from_secs(300);

/// The template directory, with a shared `flock` held on its lock file for
/// as long as this value lives. Copying happens under the shared lock, and
/// replacing a damaged template needs the exclusive one, so a copy never
/// reads a template that is being rebuilt.
#[derive(Debug)]
pub(crate) struct TemplateGuard {
    pub path: PathBuf,
    _lock: File,
}

/// Returns the template for this installation, server user and superuser,
/// creating it first if no valid one exists.
pub(crate) fn shared_template(
    install: &Install,
    user: &ServerUser,
    superuser: &str,
) -> Result<TemplateGuard, Error> {
    let major = install.major_version()?;
    let name = template_name(major, user.uid, superuser);
    let path = Path::new(TMP_ROOT).join(&name);
    let lock_path = Path::new(TMP_ROOT).join(format!("{name}.lock"));
    let lock = open_lock_file(&lock_path)?;
    let lock_context = || format!("could not lock {}", lock_path.display());

    FileExt::lock_shared(&lock).io_context(lock_context)?;
    if is_valid(&path, user.uid, major) {
        return Ok(TemplateGuard { path, _lock: lock });
    }
    // Converting a flock is not atomic: another process may build the
    // template in between, hence the second check.
    FileExt::lock_exclusive(&lock).io_context(lock_context)?;
    if !is_valid(&path, user.uid, major) {
        build(install, user, superuser, &path)?;
    }
    FileExt::lock_shared(&lock).io_context(lock_context)?;
    if is_valid(&path, user.uid, major) {
        Ok(TemplateGuard { path, _lock: lock })
    } else {
        Err(Error::Io {
            context: format!(
                "template {} vanished right after it was built",
                path.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }
}

/// `throwaway-pg-template-<major>-<uid>`, plus the superuser name unless it
/// is `postgres` (initdb bakes the bootstrap superuser's name into the
/// catalog, so each name needs its own template).
fn template_name(major: u32, uid: u32, superuser: &str) -> String {
    let mut name = format!("{PREFIX}template-{major}-{uid}");
    if superuser != "postgres" {
        name.push('-');
        name.push_str(superuser);
    }
    name
}

/// A template is valid when it is a real directory owned by the server user
/// whose `PG_VERSION` matches and whose control file exists. It is renamed
/// into place only after initdb succeeded, so existence implies completeness;
/// the other checks catch tampering, a `/tmp` cleaner, or a version upgrade.
fn is_valid(path: &Path, uid: u32, major: u32) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    meta.is_dir()
        && meta.uid() == uid
        && fs::read_to_string(path.join("PG_VERSION")).is_ok_and(|v| v.trim() == major.to_string())
        && path.join("global").join("pg_control").is_file()
}

fn build(install: &Install, user: &ServerUser, superuser: &str, path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            tracing::warn!(path = %path.display(), "replacing an invalid template data directory");
            fs::remove_dir_all(path)
                .io_context(|| format!("could not remove stale template {}", path.display()))?;
        }
        Ok(_) => fs::remove_file(path)
            .io_context(|| format!("could not remove stale template {}", path.display()))?,
        Err(_) => {}
    }

    let work = WorkDir::create(user)?;
    let data = work.path().join("data");
    let mut cmd = Command::new(install.bin("initdb"));
    cmd.arg("-D")
        .arg(&data)
        .args([
            "-A",
            "trust",
            "-U",
            superuser,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(work.path())
        .env("LC_ALL", "C");
    command::scrub_libpq_env(&mut cmd);
    run_unprivileged(&mut cmd)?;
    tracing::info!(template = %path.display(), "running initdb for the template data directory");
    command::run(&mut cmd, None, INITDB_TIMEOUT, None)?.check()?;
    fs::rename(&data, path)
        .io_context(|| format!("could not move {} to {}", data.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_include_the_superuser_only_when_unusual() {
        assert_eq!(
            template_name(15, 101, "postgres"),
            "throwaway-pg-template-15-101"
        );
        assert_eq!(
            template_name(15, 0, "admin"),
            "throwaway-pg-template-15-0-admin"
        );
    }
}
