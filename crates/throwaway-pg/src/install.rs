//! Locating the PostgreSQL server binaries.

use std::env;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::command;
use crate::error::Error;

/// Environment variable that, when set, names the directory holding the
/// server binaries and overrides every other way of finding them. It exists
/// for machines with several PostgreSQL versions installed side by side.
pub const BINDIR_ENV: &str = "THROWAWAY_PG_BINDIR";

/// Where Debian and Ubuntu install one directory per major version.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// A PostgreSQL installation: the directory holding `initdb`, `postgres`,
/// `pg_ctl`, `psql` and friends.
#[derive(Clone, Debug)]
pub struct Install {
    bindir: PathBuf,
    major: OnceLock<u32>,
}

impl Install {
    /// Finds the binaries.
    ///
    /// In order: the directory named by [`BINDIR_ENV`]; the directory of the
    /// first `initdb` on `PATH`, with symlinks resolved (distributions often
    /// link a single `initdb` into `/usr/local/bin` while the other server
    /// binaries stay in the versioned directory); the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn find() -> Result<Install, Error> {
        if let Some(dir) = env::var_os(BINDIR_ENV) {
            return Install::from_bindir(PathBuf::from(dir));
        }
        let mut searched = Vec::new();
        if let Some(path) = env::var_os("PATH") {
            searched.push(String::from("initdb on PATH"));
            for dir in env::split_paths(&path) {
                let candidate = dir.join("initdb");
                if !is_executable(&candidate) {
                    continue;
                }
                let Ok(real) = fs::canonicalize(&candidate) else {
                    continue;
                };
                if let Some(bindir) = real.parent() {
                    if is_server_bindir(bindir) {
                        return Ok(Install::new(bindir.to_path_buf()));
                    }
                }
            }
        }
        searched.push(format!("{DEBIAN_ROOT}/*/bin"));
        if let Some(bindir) = newest_debian_bindir() {
            return Ok(Install::new(bindir));
        }
        Err(Error::InstallNotFound {
            searched: searched.join(", "),
        })
    }

    /// Uses the binaries in `bindir`, which must contain `initdb` and `postgres`.
    pub fn from_bindir(bindir: impl Into<PathBuf>) -> Result<Install, Error> {
        let bindir = bindir.into();
        if is_server_bindir(&bindir) {
            Ok(Install::new(bindir))
        } else {
            Err(Error::InstallNotFound {
                searched: format!("{} (needs initdb and postgres)", bindir.display()),
            })
        }
    }

    fn new(bindir: PathBuf) -> Install {
        Install {
            bindir,
            major: OnceLock::new(),
        }
    }

    /// The directory holding the binaries.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The path of the binary `name` (e.g. `"pgbench"`) in this installation.
    /// Whether it exists is not checked.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// The major version (e.g. 15), from `postgres --version`. Computed once
    /// per process and directory, then cached: every cluster start asks.
    pub fn major_version(&self) -> Result<u32, Error> {
        static KNOWN: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());
        if let Some(major) = self.major.get() {
            return Ok(*major);
        }
        let cached = KNOWN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(dir, _)| *dir == self.bindir)
            .map(|(_, major)| *major);
        if let Some(major) = cached {
            return Ok(*self.major.get_or_init(|| major));
        }
        let mut cmd = Command::new(self.bin("postgres"));
        cmd.arg("--version");
        let out = command::run(&mut cmd, None, Duration::from_secs(30), None)?.check()?;
        let major = parse_major_version(&out.stdout).ok_or_else(|| Error::UnexpectedOutput {
            command: out.command.clone(),
            output: out.stdout.clone(),
        })?;
        KNOWN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((self.bindir.clone(), major));
        Ok(*self.major.get_or_init(|| major))
    }
}

/// Extracts the major version from `postgres --version` output such as
/// `postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)` or
/// `postgres (PostgreSQL) 17beta1`.
pub(crate) fn parse_major_version(output: &str) -> Option<u32> {
    let after = output.split_once(')').map_or(output, |(_, rest)| rest);
    let token = after
        .split_whitespace()
        .find(|t| t.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = token.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn newest_debian_bindir() -> Option<PathBuf> {
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in fs::read_dir(DEBIAN_ROOT).ok()?.flatten() {
        let name = entry.file_name();
        let Some(version) = parse_version_dir(&name.to_string_lossy()) else {
            continue;
        };
        let bindir = entry.path().join("bin");
        if !is_server_bindir(&bindir) {
            continue;
        }
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bindir));
        }
    }
    best.map(|(_, dir)| dir)
}

/// Parses directory names like `15` or `9.6` into comparable version tuples.
fn parse_version_dir(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_server_bindir(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_output() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17beta1"),
            Some(17)
        );
        assert_eq!(parse_major_version("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major_version("garbage"), None);
    }

    #[test]
    fn orders_version_dirs() {
        assert!(parse_version_dir("15") > parse_version_dir("9.6"));
        assert!(parse_version_dir("10") > parse_version_dir("9.6"));
        assert_eq!(parse_version_dir("common"), None);
    }

    #[test]
    fn finds_an_install_with_a_major_version() {
        let install = Install::find().unwrap();
        assert!(install.bin("postgres").exists());
        assert!(install.major_version().unwrap() >= 10);
    }
}
