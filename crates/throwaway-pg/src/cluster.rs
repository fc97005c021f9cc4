//! A running throwaway cluster.

use std::env;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::command::{self, Captured};
use crate::error::{Error, IoContext, OsContext};
use crate::install::Install;
use crate::options::{push_setting, Options};
use crate::port::{lease_port, PortLease};
use crate::procs;
use crate::template;
use crate::user::{chown_to_server_user, run_unprivileged, server_user, ServerUser};
use crate::workdir::{remove_abandoned_clusters, WorkDir};

/// The address every cluster listens on.
pub const HOST: &str = "127.0.0.1";

/// Environment variable that, when set, keeps each cluster's temporary
/// directory (data directory and server log) after the cluster is dropped,
/// for post-mortem inspection. Server processes are still killed.
pub const KEEP_ENV: &str = "THROWAWAY_PG_KEEP";

/// How long a server may take to accept connections, crash recovery included.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a standby may take to start streaming, or a promotion to finish.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(60);
/// `pg_ctl -t`, in seconds.
const PG_CTL_WAIT_SECS: &str = "60";
/// Deadline for pg_ctl itself, a little longer than its own wait.
const PG_CTL_TIMEOUT: Duration = Duration::from_secs(90);
/// Deadline for psql and pg_basebackup, so a wedged server fails a test
/// instead of hanging it forever.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Deadline for copying the template data directory.
const COPY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to keep SIGKILLing a cluster's processes before giving up.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How many server-log lines errors carry.
const ERROR_LOG_LINES: usize = 40;
/// At most this much of the end of the server log is read for a tail.
const LOG_TAIL_BYTES: u64 = 256 * 1024;
/// Tries at starting a new cluster when another program took its port
/// between the lease's bind check and the server's own bind.
const PORT_ATTEMPTS: u32 = 3;

/// A postmaster started by a [`Cluster`].
///
/// The postmaster leads its own process group (`process_group(0)`), and it
/// is not reaped until every process of the cluster is known to be dead.
/// An unreaped child keeps its pid, and therefore its process-group id,
/// reserved, so signalling the group can never hit an unrelated process
/// that happened to get a recycled id.
#[derive(Debug)]
struct Postmaster {
    child: Child,
    pid: Pid,
}

impl Postmaster {
    /// How the postmaster ended, or `None` while it runs. Uses `WNOWAIT` so
    /// the child stays unreaped (see the type's documentation).
    fn exit_status(&self) -> Option<String> {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        loop {
            return match waitid(Id::Pid(self.pid), flags) {
                Ok(WaitStatus::StillAlive) => None,
                Ok(WaitStatus::Exited(_, code)) => Some(format!("exit code {code}")),
                Ok(WaitStatus::Signaled(_, signal, _)) => Some(format!("killed by {signal}")),
                Ok(other) => Some(format!("{other:?}")),
                Err(Errno::EINTR) => continue,
                Err(e) => Some(format!("unknown ({e})")),
            };
        }
    }
}

/// The outcome of one start attempt.
enum LaunchError {
    /// Another program listens on the port; a new port may help.
    PortConflict(Error),
    Other(Error),
}

impl From<Error> for LaunchError {
    fn from(e: Error) -> Self {
        LaunchError::Other(e)
    }
}

impl LaunchError {
    fn into_error(self) -> Error {
        match self {
            LaunchError::PortConflict(e) | LaunchError::Other(e) => e,
        }
    }
}

/// A real PostgreSQL cluster in a temporary directory, listening on
/// 127.0.0.1 on a leased port, torn down on drop.
///
/// The server runs as the current user, or as the unprivileged OS user
/// `postgres` when the current process is root (see
/// [`run_unprivileged`](crate::run_unprivileged)). Authentication is `trust`
/// unless [`Options::hba`] says otherwise.
///
/// Dropping a cluster SIGKILLs every one of its processes: the postmaster,
/// its backends and auxiliary processes, and orphans left behind by
/// [`Cluster::kill9_postmaster`]; then it removes the temporary directory.
#[derive(Debug)]
pub struct Cluster {
    install: Install,
    options: Options,
    user: &'static ServerUser,
    /// The temporary directory (canonical path) holding everything else.
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    /// Postmasters started and not yet confirmed gone with all their
    /// processes; the last one is the current one.
    postmasters: Vec<Postmaster>,
    // Dropped after `Drop::drop` has killed every process: first the
    // directory goes, then the port is released.
    work: Option<WorkDir>,
    lease: PortLease,
}

impl Cluster {
    /// Starts a cluster with [`Options::default`].
    pub fn start() -> Result<Cluster, Error> {
        Cluster::start_with(Options::default())
    }

    /// Starts a cluster with the given options, using [`Install::find`].
    pub fn start_with(options: Options) -> Result<Cluster, Error> {
        Cluster::start_with_install(Install::find()?, options)
    }

    /// Starts a cluster of a specific installation.
    ///
    /// Copies the shared template data directory (running `initdb` for it
    /// first if this machine has none yet), writes the configuration, starts
    /// `postgres` directly and waits until it accepts TCP connections.
    pub fn start_with_install(install: Install, options: Options) -> Result<Cluster, Error> {
        options.validate()?;
        if let Err(e) = remove_abandoned_clusters() {
            tracing::warn!(error = %e, "could not clean up abandoned throwaway clusters");
        }
        let user = server_user()?;
        let mut cluster = Cluster::allocate(install, options, user)?;
        {
            let template =
                template::shared_template(&cluster.install, user, &cluster.options.superuser)?;
            cluster.copy_data_dir_from(&template.path)?;
        }
        fs::write(
            cluster.data_dir.join("pg_hba.conf"),
            cluster.options.hba_contents(),
        )
        .io_context(|| {
            format!(
                "could not write pg_hba.conf in {}",
                cluster.data_dir.display()
            )
        })?;
        cluster.write_data_files()?;
        let mut conf = cluster.network_conf();
        conf.push_str(&cluster.options.conf_lines());
        cluster.append_conf(&conf)?;
        cluster.launch_retrying_ports()?;
        tracing::info!(port = cluster.port(), data_dir = %cluster.data_dir.display(), "throwaway PostgreSQL cluster started");
        Ok(cluster)
    }

    /// Creates the temporary directory, socket directory and log file, and
    /// leases a port; no data directory yet, nothing running.
    fn allocate(
        install: Install,
        options: Options,
        user: &'static ServerUser,
    ) -> Result<Cluster, Error> {
        let work = WorkDir::create(user)?;
        let lease = lease_port()?;
        let root = work.path().to_path_buf();
        let socket_dir = root.join("sock");
        fs::create_dir(&socket_dir)
            .and_then(|()| fs::set_permissions(&socket_dir, Permissions::from_mode(0o700)))
            .io_context(|| format!("could not create {}", socket_dir.display()))?;
        chown_to_server_user(&socket_dir, user)?;
        let log_path = root.join("server.log");
        File::create(&log_path)
            .io_context(|| format!("could not create {}", log_path.display()))?;
        chown_to_server_user(&log_path, user)?;
        Ok(Cluster {
            install,
            options,
            user,
            data_dir: root.join("data"),
            root,
            socket_dir,
            log_path,
            postmasters: Vec::new(),
            work: Some(work),
            lease,
        })
    }

    /// Copies a data directory with `cp -a`, as the server user so that
    /// ownership is right without a recursive chown, then makes sure the
    /// copy has the 0700 mode the server insists on.
    fn copy_data_dir_from(&self, source: &Path) -> Result<(), Error> {
        let mut cmd = Command::new("cp");
        cmd.arg("-a")
            .arg(source)
            .arg(&self.data_dir)
            .current_dir(self.root());
        run_unprivileged(&mut cmd)?;
        command::run(&mut cmd, None, COPY_TIMEOUT, None)?.check()?;
        fs::set_permissions(&self.data_dir, Permissions::from_mode(0o700))
            .io_context(|| format!("could not chmod {}", self.data_dir.display()))
    }

    /// Writes [`Options::data_files`] into the data directory.
    fn write_data_files(&self) -> Result<(), Error> {
        for (name, contents) in &self.options.data_files {
            let path = self.data_dir.join(name);
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .io_context(|| format!("could not create {}", path.display()))?;
            file.write_all(contents)
                .io_context(|| format!("could not write {}", path.display()))?;
            fs::set_permissions(&path, Permissions::from_mode(0o600))
                .io_context(|| format!("could not chmod {}", path.display()))?;
            chown_to_server_user(&path, self.user)?;
        }
        Ok(())
    }

    /// Settings tying the server to this cluster's address, port and socket
    /// directory. Also passed on the command line; having them in the file
    /// too keeps the data directory self-describing.
    fn network_conf(&self) -> String {
        let mut out = String::new();
        push_setting(&mut out, "listen_addresses", HOST);
        push_setting(&mut out, "port", &self.port().to_string());
        push_setting(
            &mut out,
            "unix_socket_directories",
            &self.socket_dir.to_string_lossy(),
        );
        out
    }

    /// Appends lines to `postgresql.conf`. Appending (rather than editing)
    /// relies on later lines overriding earlier ones, and keeps ownership and
    /// mode of the file as the server created them.
    fn append_conf(&self, lines: &str) -> Result<(), Error> {
        let path = self.data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .io_context(|| format!("could not open {}", path.display()))?;
        write!(file, "\n# ---- throwaway-pg ----\n{lines}")
            .io_context(|| format!("could not write {}", path.display()))
    }

    /// Starts the postmaster, moving to a fresh port if another program
    /// grabbed the leased one.
    fn launch_retrying_ports(&mut self) -> Result<String, Error> {
        let mut attempt = 1;
        loop {
            match self.launch() {
                Ok(status) => return Ok(status),
                Err(LaunchError::PortConflict(e)) if attempt < PORT_ATTEMPTS => {
                    tracing::warn!(port = self.port(), error = %e, "port taken by another program; retrying on another port");
                    self.teardown()?;
                    self.lease = lease_port()?;
                    self.append_conf(&self.network_conf())?;
                    attempt += 1;
                }
                Err(e) => return Err(e.into_error()),
            }
        }
    }

    /// Spawns `postgres` and waits until it is ready; returns the status word
    /// from `postmaster.pid` ("ready", or "standby" for a standby that does
    /// not accept connections).
    fn launch(&mut self) -> Result<String, LaunchError> {
        let mut log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .io_context(|| format!("could not open {}", self.log_path.display()))?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(
            log,
            "---- throwaway-pg: starting postgres on port {} ----",
            self.port()
        );
        let log_err = log
            .try_clone()
            .io_context(|| format!("could not duplicate {}", self.log_path.display()))?;

        let mut cmd = Command::new(self.install.bin("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port().to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .arg("-c")
            .arg(format!("listen_addresses={HOST}"))
            .current_dir(self.root())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        command::scrub_libpq_env(&mut cmd);
        run_unprivileged(&mut cmd)?;
        let description = command::describe(&cmd);
        tracing::debug!(command = %description, "starting postgres");
        let child = cmd
            .spawn()
            .io_context(|| format!("could not start `{description}`"))?;
        let pid = i32::try_from(child.id()).map_err(|_| {
            LaunchError::Other(Error::Io {
                context: format!("pid {} of `{description}` out of range", child.id()),
                source: std::io::Error::from(ErrorKind::InvalidData),
            })
        })?;
        let pid = Pid::from_raw(pid);
        self.postmasters.push(Postmaster { child, pid });

        match self.wait_ready(pid) {
            Ok(status) => Ok(status),
            Err(e @ Error::ServerExited { .. }) => {
                let log_since = read_from(&self.log_path, log_offset);
                if log_since.contains("Address already in use") {
                    Err(LaunchError::PortConflict(e))
                } else {
                    Err(LaunchError::Other(e))
                }
            }
            Err(e) => Err(LaunchError::Other(e)),
        }
    }

    /// Waits until `postmaster.pid` names this postmaster and reports
    /// "ready" (or "standby") and the port accepts TCP connections.
    ///
    /// The pid check matters after a crash: the file left by a killed
    /// postmaster still says "ready". Line 8 of the file is the status; a
    /// hot standby writes "ready" once it accepts read-only connections,
    /// "standby" only appears with `hot_standby = off`.
    fn wait_ready(&self, pid: Pid) -> Result<String, Error> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut delay = Duration::from_millis(2);
        loop {
            if let Some(status) = self.current().and_then(Postmaster::exit_status) {
                return Err(Error::ServerExited {
                    data_dir: self.data_dir.clone(),
                    status,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            if let Some(status) = pm_status(&self.data_dir, pid) {
                if (status == "ready" || status == "standby") && self.accepts_tcp() {
                    return Ok(status);
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error("the server to accept connections", STARTUP_TIMEOUT));
            }
            thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    fn accepts_tcp(&self) -> bool {
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port()));
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }

    fn timeout_error(&self, what: &str, timeout: Duration) -> Error {
        Error::Timeout {
            what: what.to_string(),
            data_dir: self.data_dir.clone(),
            timeout,
            log_tail: self.log_tail(ERROR_LOG_LINES),
        }
    }

    fn current(&self) -> Option<&Postmaster> {
        self.postmasters.last()
    }

    /// The cluster's temporary directory (canonical path).
    fn root(&self) -> &Path {
        &self.root
    }

    /// Kills every process of the cluster and reaps the postmasters.
    ///
    /// Order matters. First every remembered postmaster group gets SIGKILL
    /// (safe, as those leaders are unreaped). Then, once each postmaster is
    /// dead and so can fork no more, `/proc` is swept for the cluster's
    /// processes, which catches backends that `setsid()`'d into groups of
    /// their own and orphans of an earlier crash. Only when nothing is left
    /// are the postmasters reaped.
    fn teardown(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        for pm in &self.postmasters {
            let _ = killpg(pm.pid, Signal::SIGKILL);
        }
        for pm in &self.postmasters {
            while pm.exit_status().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
        }
        let groups: Vec<i32> = self.postmasters.iter().map(|pm| pm.pid.as_raw()).collect();
        let remaining = deadline.saturating_duration_since(Instant::now());
        procs::kill_cluster_processes(self.root(), self.user.uid, &groups, remaining).map_err(
            |pids| Error::ProcessesSurvived {
                dir: self.root().to_path_buf(),
                pids,
            },
        )?;
        for mut pm in self.postmasters.drain(..) {
            let _ = pm.child.wait();
        }
        Ok(())
    }

    /// Waits until the current postmaster has exited (without reaping it).
    fn wait_for_exit(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        while self.current().is_some_and(|pm| pm.exit_status().is_none()) {
            if Instant::now() >= deadline {
                return Err(self.timeout_error("the postmaster to exit", timeout));
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Runs `pg_ctl <args> -D <data>` as the server user.
    fn pg_ctl(&self, args: &[&str]) -> Result<Captured, Error> {
        let mut cmd = Command::new(self.install.bin("pg_ctl"));
        cmd.args(args)
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-t", PG_CTL_WAIT_SECS])
            .current_dir(self.root());
        command::scrub_libpq_env(&mut cmd);
        run_unprivileged(&mut cmd)?;
        command::run(&mut cmd, None, PG_CTL_TIMEOUT, None)
            .and_then(Captured::check)
            .map_err(|e| e.with_log_tail(self.log_tail(ERROR_LOG_LINES)))
    }

    fn stop(&mut self, mode: &str) -> Result<(), Error> {
        if self.is_running() {
            self.pg_ctl(&["stop", "-m", mode, "-w"])?;
            self.wait_for_exit(TEARDOWN_TIMEOUT)?;
        }
        self.teardown()
    }

    /// Polls `sql` on this cluster until it prints `expected`.
    fn wait_for_query(
        &self,
        sql: &str,
        expected: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.psql(sql);
            if last.as_deref().is_ok_and(|out| out == expected) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut err = self.timeout_error(what, timeout);
                if let (Error::Timeout { what, .. }, Err(e)) = (&mut err, last) {
                    what.push_str(&format!("; last attempt: {e}"));
                }
                return Err(err);
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The public surface.
impl Cluster {
    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port the server listens on. It stays the same across
    /// [`Cluster::restart`].
    pub fn port(&self) -> u16 {
        self.lease.port()
    }

    /// The directory holding the server's Unix socket, inside the temporary
    /// directory. It is accessible to the server user (and root) only.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The cluster's temporary directory, which holds the data directory,
    /// the socket directory and the server log, and is removed on drop.
    pub fn temp_dir(&self) -> &Path {
        &self.root
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (the postmaster's stdout and stderr, across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The name of the bootstrap superuser.
    pub fn superuser(&self) -> &str {
        &self.options.superuser
    }

    /// The options the cluster was created with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The installation the cluster runs.
    pub fn install(&self) -> &Install {
        &self.install
    }

    /// A libpq key/value connection string for the superuser and the
    /// `postgres` database, also accepted by tokio-postgres:
    /// `host=127.0.0.1 port=N user=postgres dbname=postgres`.
    pub fn conn_str(&self) -> String {
        format!(
            "host={HOST} port={} user={} dbname=postgres",
            self.port(),
            self.superuser()
        )
    }

    /// The same as [`Cluster::conn_str`], as a URL:
    /// `postgresql://postgres@127.0.0.1:N/postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{}@{HOST}:{}/postgres",
            self.superuser(),
            self.port()
        )
    }

    /// Runs SQL through psql as the superuser in database `postgres` and
    /// returns its trimmed output: unaligned, tuples only, one row per line,
    /// columns separated by `|`.
    ///
    /// The SQL is fed on stdin, so it may hold several statements, each run
    /// in its own transaction unless it says otherwise; psql stops at the
    /// first error (`ON_ERROR_STOP`), and the error carries psql's stderr.
    pub fn psql(&self, sql: &str) -> Result<String, Error> {
        self.psql_in("postgres", sql)
    }

    /// [`Cluster::psql`] in another database.
    pub fn psql_in(&self, dbname: &str, sql: &str) -> Result<String, Error> {
        let mut cmd = Command::new(self.install.bin("psql"));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST])
            .arg("-p")
            .arg(self.port().to_string())
            .arg("-U")
            .arg(self.superuser())
            .arg("-d")
            .arg(dbname)
            .args(["-f", "-"]);
        command::scrub_libpq_env(&mut cmd);
        cmd.env("PGCONNECT_TIMEOUT", "10");
        let label = format!("{} <<< {:?}", command::describe(&cmd), preview(sql));
        let out = command::run(&mut cmd, Some(sql.as_bytes()), CLIENT_TIMEOUT, Some(label))
            .and_then(Captured::check)
            .map_err(|e| e.with_log_tail(self.log_tail(10)))?;
        Ok(out.stdout.trim().to_string())
    }

    /// The pid of the current postmaster, while it runs. It is also the id
    /// of the postmaster's process group.
    pub fn postmaster_pid(&self) -> Option<i32> {
        self.current()
            .filter(|pm| pm.exit_status().is_none())
            .map(|pm| pm.pid.as_raw())
    }

    /// Whether the current postmaster runs. (It may still be starting up or
    /// shutting down.)
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// Every live process of the cluster: the postmaster, its children, and
    /// orphans a killed postmaster left behind.
    pub fn process_ids(&self) -> Vec<i32> {
        let groups: Vec<i32> = self.postmasters.iter().map(|pm| pm.pid.as_raw()).collect();
        procs::cluster_processes(self.root(), self.user.uid, &groups)
    }

    /// Stops the server with `pg_ctl stop -m fast -w`: sessions are
    /// disconnected, a shutdown checkpoint is written. Does nothing if the
    /// server is not running, apart from killing orphans of an earlier
    /// [`Cluster::kill9_postmaster`].
    pub fn stop_fast(&mut self) -> Result<(), Error> {
        self.stop("fast")
    }

    /// Stops the server with `pg_ctl stop -m immediate -w`: everything quits
    /// at once and the next start runs crash recovery. Otherwise like
    /// [`Cluster::stop_fast`].
    pub fn stop_immediate(&mut self) -> Result<(), Error> {
        self.stop("immediate")
    }

    /// SIGKILLs the postmaster and only the postmaster, the way the OOM
    /// killer would. Its children are left running as orphans on purpose:
    /// that is the situation a proxy must survive (orphaned backends keep
    /// their client connections open until they notice). They are killed by
    /// [`Cluster::restart`], by the stop methods and on drop.
    ///
    /// Returns once the postmaster is dead; fails with
    /// [`Error::NotRunning`] if it was not running.
    pub fn kill9_postmaster(&mut self) -> Result<(), Error> {
        let pid = self.postmaster_pid().ok_or_else(|| Error::NotRunning {
            data_dir: self.data_dir.clone(),
        })?;
        kill(Pid::from_raw(pid), Signal::SIGKILL)
            .os_context(|| format!("could not SIGKILL postmaster {pid}"))?;
        self.wait_for_exit(TEARDOWN_TIMEOUT)
    }

    /// Starts the server again on the same port and data directory, and
    /// waits until it accepts connections.
    ///
    /// Whatever state the cluster is in: a running server is stopped first
    /// (fast); the orphans of a SIGKILLed postmaster are killed (they would
    /// otherwise keep the old shared memory attached, and the new postmaster
    /// would refuse to start); a stale `postmaster.pid` and socket lock file
    /// are removed, since their pid may have been recycled by an unrelated
    /// process by now.
    pub fn restart(&mut self) -> Result<(), Error> {
        if self.is_running() {
            self.stop_fast()?;
        } else {
            self.teardown()?;
        }
        let socket_lock = self
            .socket_dir
            .join(format!(".s.PGSQL.{}.lock", self.port()));
        for stale in [self.data_dir.join("postmaster.pid"), socket_lock] {
            match fs::remove_file(&stale) {
                Ok(()) => tracing::debug!(file = %stale.display(), "removed stale lock file"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("could not remove {}", stale.display()),
                        source: e,
                    })
                }
            }
        }
        self.launch().map_err(LaunchError::into_error)?;
        Ok(())
    }

    /// Creates a streaming-replication standby of this cluster: a new
    /// cluster with its own temporary directory and port, made with
    /// `pg_basebackup -R -X stream`, started, and streaming by the time this
    /// returns. It has the same options as this one.
    ///
    /// Needs a `pg_hba.conf` that lets the superuser make replication
    /// connections over 127.0.0.1, as the default one does.
    pub fn standby(&self) -> Result<Cluster, Error> {
        let mut standby = Cluster::allocate(self.install.clone(), self.options.clone(), self.user)?;
        let mut cmd = Command::new(self.install.bin("pg_basebackup"));
        cmd.args(["-h", HOST])
            .arg("-p")
            .arg(self.port().to_string())
            .arg("-U")
            .arg(self.superuser())
            .arg("-D")
            .arg(&standby.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .current_dir(standby.root());
        command::scrub_libpq_env(&mut cmd);
        run_unprivileged(&mut cmd)?;
        command::run(&mut cmd, None, CLIENT_TIMEOUT, None)
            .and_then(Captured::check)
            .map_err(|e| e.with_log_tail(self.log_tail(ERROR_LOG_LINES)))?;
        fs::set_permissions(&standby.data_dir, Permissions::from_mode(0o700))
            .io_context(|| format!("could not chmod {}", standby.data_dir.display()))?;
        standby.append_conf(&standby.network_conf())?;
        let status = standby.launch_retrying_ports()?;
        // With hot_standby = off nothing can be queried; being up is all
        // there is to wait for.
        if status == "ready" {
            standby.wait_for_query(
                "select count(*) from pg_stat_wal_receiver where status = 'streaming'",
                "1",
                "the standby to stream from its primary",
                REPLICATION_TIMEOUT,
            )?;
        }
        tracing::info!(
            port = standby.port(),
            primary_port = self.port(),
            "throwaway PostgreSQL standby started"
        );
        Ok(standby)
    }

    /// Promotes this standby with `pg_ctl promote -w`, and returns once it
    /// accepts writes (`pg_ctl` returns when the control file says "in
    /// production", which can be a moment before sessions see the end of
    /// recovery).
    pub fn promote(&self) -> Result<(), Error> {
        self.pg_ctl(&["promote", "-w"])?;
        self.wait_for_query(
            "select pg_is_in_recovery()",
            "f",
            "the promoted standby to leave recovery",
            REPLICATION_TIMEOUT,
        )
    }

    /// The last `lines` lines of the server log. Never fails: an unreadable
    /// log yields a description of the problem instead, since this mostly
    /// feeds error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        read_tail(&self.log_path, lines)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(error = %e, "could not stop every process of a throwaway cluster");
        }
        if let Some(work) = self.work.take() {
            if env::var_os(KEEP_ENV).is_some() {
                let path = work.keep();
                tracing::info!(dir = %path.display(), "kept the throwaway cluster directory ({KEEP_ENV} is set)");
            }
        }
    }
}

/// Reads the status word (line 8) of `postmaster.pid` if line 1 names `pid`.
fn pm_status(data_dir: &Path, pid: Pid) -> Option<String> {
    let contents = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    parse_pm_status(&contents, pid.as_raw())
}

fn parse_pm_status(contents: &str, pid: i32) -> Option<String> {
    let lines: Vec<&str> = contents.lines().collect();
    let file_pid: i32 = lines.first()?.trim().parse().ok()?;
    if file_pid != pid {
        return None;
    }
    Some(lines.get(7)?.trim().to_string())
}

/// The last `lines` lines of the file, reading at most [`LOG_TAIL_BYTES`].
fn read_tail(path: &Path, lines: usize) -> String {
    let result = (|| -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })();
    match result {
        Ok(text) => last_lines(&text, lines),
        Err(e) => format!("(could not read server log {}: {e})", path.display()),
    }
}

fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The part of the file from `offset` on, or empty.
fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    let ok = File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.read_to_end(&mut buf)
        })
        .is_ok();
    if ok {
        String::from_utf8_lossy(&buf).into_owned()
    } else {
        String::new()
    }
}

/// A short form of a SQL text for error messages.
fn preview(sql: &str) -> String {
    const MAX: usize = 200;
    let sql = sql.trim();
    match sql.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &sql[..cut]),
        None => sql.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm_status_requires_matching_pid() {
        let file = "4242\n/tmp/x/data\n1700000000\n25432\n/tmp/x/sock\n127.0.0.1\n  1234  5678\nready   \n";
        assert_eq!(parse_pm_status(file, 4242).as_deref(), Some("ready"));
        assert_eq!(parse_pm_status(file, 4243), None);
        assert_eq!(parse_pm_status("4242\n/tmp/x/data\n", 4242), None);
    }

    #[test]
    fn tails() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a\nb\nc", 10), "a\nb\nc");
        assert_eq!(last_lines("", 3), "");
        assert!(read_tail(Path::new("/nonexistent/log"), 3).contains("could not read"));
    }

    #[test]
    fn previews_are_bounded() {
        assert_eq!(preview(" select 1 "), "select 1");
        let long = "x".repeat(500);
        assert_eq!(preview(&long).chars().count(), 201);
    }
}
