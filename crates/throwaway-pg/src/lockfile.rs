//! Lock files in world-writable directories.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, IoContext};

/// Opens (creating if needed) a file used only for `flock`.
///
/// `O_NOFOLLOW` keeps another local user from redirecting the open through a
/// planted symlink in `/tmp`. A lock file created by a different user may
/// not be writable; `flock` works on read-only descriptors, so that case
/// falls back to opening it read-only.
pub(crate) fn open_lock_file(path: &Path) -> Result<File, Error> {
    let flags = nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC;
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .custom_flags(flags)
        .open(path);
    match rw {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
            .io_context(|| format!("could not open lock file {}", path.display())),
        Err(e) => Err(Error::Io {
            context: format!("could not open lock file {}", path.display()),
            source: e,
        }),
    }
}
