//! The proxy's life: configuration, the data-directory lock, reload on
//! SIGHUP, graceful shutdown, Unix sockets and logging in to servers that
//! ask for passwords.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::support::{self, query, Harness, RawClient};

const REPRISE: &str = env!("CARGO_BIN_EXE_reprise");

pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn serve(config: &Path) -> Running {
    Running(
        Command::new(REPRISE)
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start reprise"),
    )
}

pub(crate) fn write_config(
    dir: &Path,
    port: u16,
    server_port: u16,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("reprise.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n{extra}\n[[backend]]\nname = \"main\"\nhost = \"127.0.0.1\"\nport = {server_port}\n",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    path
}

pub(crate) async fn wait_for_port(port: u16) {
    support::eventually(Duration::from_secs(20), "reprise listens", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
}

fn refused_config(text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let output = Command::new(REPRISE)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run reprise");
    assert!(
        !output.status.success(),
        "a bad config must be refused: {text}"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_configs_are_refused_with_the_key_named() {
    let backend = "[[backend]]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 5432\n";
    let stderr = refused_config(&format!("listne = \"127.0.0.1:1\"\n{backend}"));
    assert!(stderr.contains("unknown field `listne`"), "{stderr}");
    let stderr = refused_config(&format!("connect_timeout = \"ten seconds\"\n{backend}"));
    assert!(
        stderr.contains("connect_timeout") && stderr.contains("invalid duration"),
        "{stderr}"
    );
    let stderr = refused_config(&format!("max_message_size = \"12 parsecs\"\n{backend}"));
    assert!(
        stderr.contains("max_message_size") && stderr.contains("invalid size"),
        "{stderr}"
    );
    let stderr = refused_config("listen = \"127.0.0.1:1\"\n");
    assert!(stderr.contains("config key `backend`"), "{stderr}");
    let stderr = refused_config(&format!("log_format = \"xml\"\n{backend}"));
    assert!(
        stderr.contains("log_format") || stderr.contains("xml"),
        "{stderr}"
    );
    let stderr = refused_config(&format!("listen = \"nowhere\"\n{backend}"));
    assert!(stderr.contains("listen"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_lock_reload_and_signals() {
    let cluster = support::start_cluster(throwaway_pg::Options::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = throwaway_pg::lease_port().expect("port");
    let config = write_config(
        dir.path(),
        port.port(),
        cluster.port(),
        "max_client_conn = 10",
    );
    let mut first = serve(&config);
    wait_for_port(port.port()).await;

    // A second proxy on the same data_dir is refused, naming the holder.
    let other_port = throwaway_pg::lease_port().expect("port");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_config = other_dir.path().join("reprise.toml");
    std::fs::write(
        &other_config,
        std::fs::read_to_string(&config).expect("read").replace(
            &format!("127.0.0.1:{}", port.port()),
            &format!("127.0.0.1:{}", other_port.port()),
        ),
    )
    .expect("write");
    let output = Command::new(REPRISE)
        .args(["serve", "--config"])
        .arg(&other_config)
        .output()
        .expect("second reprise");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by another Reprise process")
            && stderr.contains(&first.0.id().to_string()),
        "{stderr}"
    );

    let conn_str = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        port.port()
    );
    let (a, _) = support::connect(&conn_str).await;
    let (b, _) = support::connect(&conn_str).await;

    // SIGHUP applies a lower max_client_conn to new sessions.
    write_config(
        dir.path(),
        port.port(),
        cluster.port(),
        "max_client_conn = 2",
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("sighup");
    support::eventually(
        Duration::from_secs(10),
        "the reload takes effect",
        || async {
            matches!(
                tokio_postgres::connect(&conn_str, NoTls).await,
                Err(err) if err.code() == Some(&SqlState::TOO_MANY_CONNECTIONS)
            )
        },
    )
    .await;

    // A broken file on SIGHUP is reported and the running config stays.
    std::fs::write(&config, "this is not toml = = =").expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("sighup");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        support::scalar(&a, "select 'still serving'").await,
        "still serving"
    );
    drop(b);
    support::eventually(
        Duration::from_secs(10),
        "a slot frees up under the old limit",
        || async { tokio_postgres::connect(&conn_str, NoTls).await.is_ok() },
    )
    .await;

    // SIGTERM: idle sessions are closed, the process exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sigterm");
    let status = tokio::task::spawn_blocking(move || {
        let status = first.0.wait();
        std::mem::forget(first);
        status
    })
    .await
    .expect("join")
    .expect("wait");
    assert!(
        status.success(),
        "reprise exits 0 after SIGTERM: {status:?}"
    );
    assert!(a.simple_query("select 1").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_transactions_finish() {
    let mut harness = Harness::start().await;
    let (mut idle, _) = RawClient::login(harness.proxy).await;
    let (mut busy, _) = RawClient::login(harness.proxy).await;
    busy.send(&query("begin; select 1")).await;
    busy.until_ready().await;

    harness.handle.shutdown();
    // The idle session is closed at once with 57P01.
    let goodbye = idle.until_closed().await;
    assert_eq!(
        goodbye.last().and_then(|m| m.sqlstate()).as_deref(),
        Some("57P01")
    );
    // New connections are turned away.
    support::eventually(Duration::from_secs(5), "the listener closes", || async {
        tokio_postgres::connect(&harness.proxy_conn_str(), NoTls)
            .await
            .is_err()
    })
    .await;
    // The transaction goes on and commits; then its session is closed.
    busy.send(&query("select 2")).await;
    let reply = busy.until_ready().await;
    assert!(reply.iter().any(|m| m.tag == b'D'));
    busy.send(&query("commit")).await;
    let rest = busy.until_closed().await;
    assert!(
        rest.iter().any(|m| m.tag == b'C'),
        "the commit completed: {rest:?}"
    );
    assert_eq!(
        rest.last().and_then(|m| m.sqlstate()).as_deref(),
        Some("57P01")
    );
    harness.shutdown().await;
    assert_eq!(harness.handle.active_sessions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_closes_what_is_left() {
    let mut harness = Harness::start_with(throwaway_pg::Options::default(), |config| {
        config.shutdown_timeout = reprise::config::HumanDuration(Duration::from_millis(500));
    })
    .await;
    let (mut stuck, _) = RawClient::login(harness.proxy).await;
    stuck.send(&query("begin")).await;
    stuck.until_ready().await;
    let started = std::time::Instant::now();
    harness.shutdown().await;
    let rest = stuck.until_closed().await;
    assert_eq!(
        rest.last().and_then(|m| m.sqlstate()).as_deref(),
        Some("57P01")
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener() {
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let dir = socket_dir.path().to_owned();
    let harness = Harness::start_with(throwaway_pg::Options::default(), move |config| {
        config.unix_socket_dir = Some(dir);
    })
    .await;
    let conn_str = format!(
        "host={} port={} user=postgres dbname=postgres",
        socket_dir.path().display(),
        harness.proxy.port()
    );
    let (client, _) = support::connect(&conn_str).await;
    assert_eq!(
        support::scalar(&client, "select 'over a unix socket'").await,
        "over a unix socket"
    );
    assert!(socket_dir
        .path()
        .join(format!(".s.PGSQL.{}", harness.proxy.port()))
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_to_servers_that_ask_for_passwords() {
    let hba = "local all all trust\n\
               host all postgres 127.0.0.1/32 trust\n\
               host all bob 127.0.0.1/32 md5\n\
               host all carol 127.0.0.1/32 password\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    let users = tempfile::NamedTempFile::new().expect("users file");
    std::fs::write(
        users.path(),
        "\"alice\" \"alice pw\"\n\"bob\" \"bob\"\"pw\"\n\"carol\" \"carolpw\"\n\"dave\" \"not dave's\"\n",
    )
    .expect("write users");
    let users_path = users.path().to_owned();
    let harness = Harness::start_with(
        throwaway_pg::Options {
            hba: Some(hba.to_owned()),
            ..throwaway_pg::Options::default()
        },
        move |config| config.users_file = Some(users_path),
    )
    .await;
    harness
        .cluster
        .psql(
            "create role alice login password 'alice pw';
             set password_encryption = 'md5'; create role bob login password 'bob\"pw';
             reset password_encryption; create role carol login password 'carolpw';
             create role dave login password 'davepw'; create role eve login password 'evepw';",
        )
        .expect("create roles");

    let through = |user: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            harness.proxy.port()
        )
    };
    for user in ["alice", "bob", "carol"] {
        let (client, _) = support::connect(&through(user)).await;
        assert_eq!(support::scalar(&client, "select current_user").await, user);
    }
    // A wrong password: the client gets the server's own refusal.
    let (code, text) = support::refusal(&through("dave")).await;
    assert_eq!(code, Some(SqlState::INVALID_PASSWORD));
    assert_eq!(text, "password authentication failed for user \"dave\"");
    // No password at all for that user.
    let (code, text) = support::refusal(&through("eve")).await;
    assert_eq!(code, Some(SqlState::INVALID_PASSWORD));
    assert!(text.contains("users file has none"), "{text}");
}
