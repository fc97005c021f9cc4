//! Leasing free TCP ports.

use std::fs::{self, File, Permissions};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fs4::fs_std::FileExt;
use rand::Rng;

use crate::error::{Error, IoContext};
use crate::lockfile::open_lock_file;

/// Where the per-port lock files live. Shared by every process and user on
/// the machine, hence world-writable with the sticky bit.
pub const PORT_LOCK_DIR: &str = "/tmp/throwaway-pg-ports";

/// The range ports are drawn from: below Linux's default ephemeral range
/// (32768..61000), so the kernel does not hand the same port out as the
/// local end of some outgoing connection while a server wants to listen on it.
pub const PORT_RANGE: std::ops::Range<u16> = 20000..30000;

const MAX_ATTEMPTS: u32 = 1000;

/// An exclusive claim on a TCP port of 127.0.0.1.
///
/// The claim is an exclusive `flock` on `/tmp/throwaway-pg-ports/<port>.lock`,
/// held for as long as the lease lives, so concurrent test threads and test
/// processes (cargo nextest runs each test in its own process) never pick
/// the same port, and a port stays reserved across a server restart. The
/// lock is released when the lease is dropped, or by the kernel when the
/// process dies, so a crashed test never leaks a reservation.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    _lock: File,
}

impl PortLease {
    /// The leased port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Leases a free TCP port on 127.0.0.1.
///
/// Picks a random port in [`PORT_RANGE`], takes an exclusive non-blocking
/// `flock` on its lock file, and checks that the port can be bound right
/// now; on any failure it tries another port. Lock files are never deleted:
/// unlinking a lock file that someone else is about to lock would let two
/// holders exist at once.
pub fn lease_port() -> Result<PortLease, Error> {
    let dir = Path::new(PORT_LOCK_DIR);
    ensure_lock_dir(dir)?;
    let mut rng = rand::thread_rng();
    for _ in 0..MAX_ATTEMPTS {
        let port = rng.gen_range(PORT_RANGE);
        let path = dir.join(format!("{port}.lock"));
        let lock = open_lock_file(&path)?;
        let locked = FileExt::try_lock_exclusive(&lock)
            .io_context(|| format!("could not lock {}", path.display()))?;
        if locked && is_bindable(port) {
            tracing::debug!(port, "leased port");
            return Ok(PortLease { port, _lock: lock });
        }
    }
    Err(Error::NoFreePort {
        first: PORT_RANGE.start,
        end: PORT_RANGE.end,
        attempts: MAX_ATTEMPTS,
    })
}

fn is_bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn ensure_lock_dir(dir: &Path) -> Result<(), Error> {
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, Permissions::from_mode(0o1777))
            .io_context(|| format!("could not make {} world-writable", dir.display())),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(dir)
                .io_context(|| format!("could not inspect {}", dir.display()))?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(Error::Io {
                    context: format!("{} exists but is not a directory", dir.display()),
                    source: std::io::Error::from(ErrorKind::AlreadyExists),
                })
            }
        }
        Err(e) => Err(Error::Io {
            context: format!("could not create {}", dir.display()),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn concurrent_leases_are_distinct_and_bindable() {
        let leases: Vec<PortLease> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16).map(|_| s.spawn(lease_port)).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        let ports: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(ports.len(), leases.len());
        for port in &ports {
            assert!(PORT_RANGE.contains(port));
            assert!(is_bindable(*port));
        }
    }

    #[test]
    fn a_held_lease_is_not_handed_out_again() {
        let held = lease_port().unwrap();
        let path = Path::new(PORT_LOCK_DIR).join(format!("{}.lock", held.port()));
        let other = open_lock_file(&path).unwrap();
        assert!(!FileExt::try_lock_exclusive(&other).unwrap());
        drop(held);
        assert!(FileExt::try_lock_exclusive(&other).unwrap());
    }
}
