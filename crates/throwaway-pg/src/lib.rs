//! Real, throwaway PostgreSQL clusters for integration tests, demos and
//! benchmarks.
//!
//! [`Cluster::start`] copies a shared template data directory (running
//! `initdb` once per machine for it), starts `postgres` on a free port of
//! 127.0.0.1 in a temporary directory, and waits until it accepts
//! connections. Dropping the [`Cluster`] kills every one of its processes and
//! removes the directory. Failure scenarios a proxy has to survive are one
//! call away: [`Cluster::stop_fast`], [`Cluster::stop_immediate`],
//! [`Cluster::kill9_postmaster`], [`Cluster::restart`], and streaming
//! replication with [`Cluster::standby`] and [`Cluster::promote`].
//!
//! ```no_run
//! # fn main() -> Result<(), throwaway_pg::Error> {
//! let cluster = throwaway_pg::Cluster::start()?;
//! assert_eq!(cluster.psql("select 1")?, "1");
//! // e.g. tokio_postgres::connect(&cluster.conn_str(), NoTls)
//! # Ok(()) }
//! ```
//!
//! Everything is synchronous and safe to use from parallel tests, whether
//! they run as threads of one process (`cargo test`) or as separate
//! processes (`cargo nextest`): ports are leased under file locks, and the
//! template is created under one.
//!
//! # Environment
//!
//! - The binaries are found as described at [`Install::find`];
//!   `THROWAWAY_PG_BINDIR` overrides the search.
//! - When the process runs as root, servers run as the OS user `postgres`,
//!   created if missing, because PostgreSQL refuses to run as root.
//! - `THROWAWAY_PG_KEEP=1` keeps each cluster's directory after drop.
//! - Everything lives under `/tmp`: `throwaway-pg-XXXXXX` per cluster,
//!   `throwaway-pg-template-*` for templates, `throwaway-pg-ports` for
//!   port locks. Directories of clusters whose process died without
//!   dropping them are cleaned up by the next cluster start (see
//!   [`remove_abandoned_clusters`]).
//!
//! Linux only: finding a cluster's processes relies on `/proc`.

mod cluster;
mod command;
mod error;
mod install;
mod lockfile;
mod options;
mod port;
mod procs;
mod template;
mod user;
mod workdir;

pub use cluster::{Cluster, HOST, KEEP_ENV};
pub use error::Error;
pub use install::{Install, BINDIR_ENV};
pub use options::{Options, DEFAULT_HBA};
pub use port::{lease_port, PortLease, PORT_LOCK_DIR, PORT_RANGE};
pub use user::{give_to_server_user, run_unprivileged, SERVER_USER_NAME};
pub use workdir::remove_abandoned_clusters;

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_thread_safe() {
        assert_send_sync::<crate::Cluster>();
        assert_send_sync::<crate::Install>();
        assert_send_sync::<crate::PortLease>();
        assert_send_sync::<crate::Options>();
        assert_send_sync::<crate::Error>();
    }
}
