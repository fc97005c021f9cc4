//! The commit guard: a COMMIT whose answer was lost in a crash restart,
//! where the transaction id alone proves nothing (the new server life may
//! have handed the same id out again), is settled by the token row the
//! transaction inserted just before its COMMIT; and a COMMIT whose
//! question was cut off by a network partition is settled by it too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::support::{eventually, reprise_stats, scalar, set_system, Harness};

/// Starts a COMMIT that becomes durable and then waits for a synchronous
/// standby that does not exist, crashes the server under it and starts
/// it again without the standby requirement. Returns what the client got
/// for the COMMIT, and the harness.
async fn commit_across_a_crash_restart(
    guard: bool,
) -> (Harness, Result<(), tokio_postgres::Error>) {
    let mut harness = Harness::start_with(Default::default(), |config| {
        config.commit_guard = guard;
    })
    .await;
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table paid (id int primary key)")
        .await
        .expect("table");
    observer
        .batch_execute("checkpoint")
        .await
        .expect("checkpoint");
    set_system(&observer, "synchronous_standby_names", "nobody").await;
    let (client, _) = harness.connect().await;
    if guard {
        // The first session sets the guard up in the background.
        eventually(Duration::from_secs(10), "the guard is set up", || async {
            scalar(
                &observer,
                "select count(*) from pg_proc where proname = 'guarded'",
            )
            .await
                == "1"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid: i32 = scalar(&client, "select pg_backend_pid()")
        .await
        .parse()
        .expect("pid");
    client
        .batch_execute("set synchronous_commit = on; begin; insert into paid values (1)")
        .await
        .expect("transaction");
    let committing = tokio::spawn(async move { client.batch_execute("commit").await });
    eventually(Duration::from_secs(10), "the COMMIT waits", || async {
        scalar(
            &observer,
            &format!(
                "select count(*) from pg_stat_activity where pid = {pid} and wait_event = 'SyncRep'"
            ),
        )
        .await
            == "1"
    })
    .await;
    drop(observer);
    tokio::task::block_in_place(|| {
        harness.cluster.stop_immediate().expect("stop -m immediate");
        let auto_conf = harness.cluster.data_dir().join("postgresql.auto.conf");
        let kept: String = std::fs::read_to_string(&auto_conf)
            .expect("auto.conf")
            .lines()
            .filter(|line| !line.contains("synchronous_standby_names"))
            .map(|line| format!("{line}\n"))
            .collect();
        std::fs::write(&auto_conf, kept).expect("auto.conf written");
        harness.cluster.restart().expect("start again");
    });
    let result = committing.await.expect("join");
    (harness, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_lost_in_a_crash_restart_is_settled_by_the_guard_row() {
    let (harness, result) = commit_across_a_crash_restart(true).await;
    result.expect("the client learns that its transaction committed");
    let (observer, _) = harness.connect_direct().await;
    assert_eq!(scalar(&observer, "select count(*) from paid").await, "1");
    assert_eq!(
        scalar(&observer, "select count(*) from reprise.commit_guard").await,
        "1",
        "the transaction inserted its token"
    );
    let (client, _) = harness.connect().await;
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
    assert_eq!(
        stats["commands_replayed"], 0,
        "nothing ran twice: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_guard_a_commit_lost_in_a_crash_restart_is_unknown() {
    let (harness, result) = commit_across_a_crash_restart(false).await;
    let error = result.expect_err("the outcome cannot be proven");
    assert_eq!(
        error.code(),
        Some(&SqlState::TRANSACTION_RESOLUTION_UNKNOWN),
        "{error:?}"
    );
    let (observer, _) = harness.connect_direct().await;
    assert_eq!(
        scalar(&observer, "select count(*) from paid").await,
        "1",
        "it did commit: only the answer was lost"
    );
    assert_eq!(
        scalar(
            &observer,
            "select count(*) from pg_namespace where nspname = 'reprise'"
        )
        .await,
        "0",
        "nothing of the guard exists when it is off"
    );
}

/// A TCP hop between Reprise and the server that can stop delivering the
/// server's answers on the connections open now (a network partition in
/// one direction), then close them; later connections pass.
struct Partition {
    generation: tokio::sync::watch::Sender<u64>,
    silenced: Arc<AtomicU64>,
}

impl Partition {
    /// Listens now (so that the proxy's config can name the port); call
    /// [`Partition::run`] once the server is up.
    fn bind() -> (std::net::TcpListener, u16) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        (listener, port)
    }

    fn run(listener: std::net::TcpListener, server: SocketAddr) -> Partition {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let silenced = Arc::new(AtomicU64::new(u64::MAX));
        let partition = Partition {
            generation: generation.clone(),
            silenced: Arc::clone(&silenced),
        };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(server).await else {
                    continue;
                };
                let born = *generation.borrow();
                let mut ended = generation.subscribe();
                let silenced = Arc::clone(&silenced);
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = upstream.into_split();
                    let requests = tokio::io::copy(&mut from_client, &mut to_server);
                    let answers = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let read = from_server.read(&mut buf).await.unwrap_or(0);
                            if read == 0 {
                                break;
                            }
                            if silenced.load(Ordering::SeqCst) != born {
                                to_client.write_all(&buf[..read]).await.ok()?;
                            }
                        }
                        Some(())
                    };
                    tokio::select! {
                        _ = requests => {}
                        _ = answers => {}
                        _ = ended.wait_for(|now| *now != born) => {}
                    }
                });
            }
        });
        partition
    }

    /// The server's answers on the connections open now are lost from
    /// here on.
    fn silence(&self) {
        self.silenced
            .store(*self.generation.borrow(), Ordering::SeqCst);
    }

    /// Closes the connections open now.
    fn cut(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// A session whose server connection goes through a [`Partition`], with
/// the commit guard on or off; `wrap` for `wrap_autocommit_writes`.
async fn partitioned(guard: bool, wrap: bool) -> (Harness, Partition, Client, Client) {
    let (listener, port) = Partition::bind();
    let mut server = None;
    let harness = Harness::start_with(Default::default(), |config| {
        config.commit_guard = guard;
        config.wrap_autocommit_writes = wrap;
        let backend = &mut config.backends[0];
        server = Some(SocketAddr::new(
            backend.host.parse().expect("an address"),
            backend.port,
        ));
        backend.port = port;
    })
    .await;
    let partition = Partition::run(listener, server.expect("a backend"));
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table paid (id int primary key)")
        .await
        .expect("table");
    let (client, _) = harness.connect().await;
    if guard {
        eventually(Duration::from_secs(10), "the guard is set up", || async {
            scalar(
                &observer,
                "select count(*) from pg_proc where proname = 'guarded'",
            )
            .await
                == "1"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (harness, partition, observer, client)
}

/// Sends `sql` into a partition: the server runs it, its answer (the
/// question's too) never arrives, then the connection closes.
async fn lost_in_a_partition(
    partition: &Partition,
    observer: &Client,
    client: Client,
    sql: &'static str,
) -> (Client, Result<(), tokio_postgres::Error>) {
    partition.silence();
    let running = tokio::spawn(async move {
        let result = client.batch_execute(sql).await;
        (client, result)
    });
    eventually(Duration::from_secs(10), "the row is committed", || async {
        scalar(observer, "select count(*) from paid").await == "1"
    })
    .await;
    partition.cut();
    running.await.expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_question_was_cut_off_is_settled_by_its_guard_row() {
    let (_harness, partition, observer, client) = partitioned(true, false).await;
    client
        .batch_execute("begin; insert into paid values (1)")
        .await
        .expect("transaction");
    let (client, result) = lost_in_a_partition(&partition, &observer, client, "commit").await;
    result.expect("the token proves the commit");
    assert_eq!(scalar(&observer, "select count(*) from paid").await, "1");
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
    assert_eq!(stats["commands_replayed"], 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_guard_a_commit_whose_question_was_cut_off_is_unknown() {
    let (_harness, partition, observer, client) = partitioned(false, false).await;
    client
        .batch_execute("begin; insert into paid values (1)")
        .await
        .expect("transaction");
    let (_, result) = lost_in_a_partition(&partition, &observer, client, "commit").await;
    let error = result.expect_err("nothing proves the outcome");
    assert_eq!(
        error.code(),
        Some(&SqlState::TRANSACTION_RESOLUTION_UNKNOWN),
        "{error:?}"
    );
    assert_eq!(scalar(&observer, "select count(*) from paid").await, "1");
}

/// A wrapped write the guard proves committed, whose own answer was lost
/// too: it cannot be given, and is not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_write_whose_answer_was_cut_off_is_never_run_twice() {
    let (_harness, partition, observer, client) = partitioned(true, true).await;
    let (_, result) =
        lost_in_a_partition(&partition, &observer, client, "insert into paid values (1)").await;
    let error = result.expect_err("the answer is gone");
    assert_eq!(
        error.code(),
        Some(&SqlState::CONNECTION_FAILURE),
        "{error:?}"
    );
    let detail = error
        .as_db_error()
        .and_then(|db| db.detail())
        .unwrap_or_default()
        .to_owned();
    assert!(detail.starts_with("non-recoverable-state"), "{detail}");
    assert_eq!(scalar(&observer, "select count(*) from paid").await, "1");
}
