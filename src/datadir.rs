//! The data directory and its lock file, which keeps two proxies from ever
//! sharing one directory (they would interleave their journals).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

pub const LOCK_FILE: &str = "reprise.lock";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data_dir {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open lock file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data_dir {path} is in use by another Reprise process{}", holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default())]
    InUse { path: PathBuf, holder: Option<u32> },
}

/// Held for the life of the proxy; the OS releases the lock if the process
/// dies, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, DataDirError> {
        std::fs::create_dir_all(data_dir).map_err(|source| DataDirError::Create {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| DataDirError::Open {
                path: path.clone(),
                source,
            })?;
        match FileExt::try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(DataDirError::InUse {
                    path: data_dir.to_owned(),
                    holder: text.trim().parse().ok(),
                });
            }
        }
        // The pid is for operators; the lock itself is what counts.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(DataDirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path()).expect("first lock");
        let err = DataDirLock::acquire(dir.path()).expect_err("second lock must fail");
        let message = err.to_string();
        assert!(message.contains("in use"), "{message}");
        assert!(
            message.contains(&std::process::id().to_string()),
            "{message}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).expect("lock is free again");
    }
}
