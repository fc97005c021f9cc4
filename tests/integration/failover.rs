//! Failover: a session whose server connection is lost goes on on a new
//! one when its work can be redone exactly, and ends with the documented
//! error when it cannot.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::support::{
    backend_pid, data_rows, eventually, query, reprise_stats, scalar, set_system, text_rows,
    Harness, RawClient,
};

/// Terminates server process `pid` and waits until it is gone.
pub async fn terminate(observer: &Client, pid: i32) {
    let terminated = scalar(observer, &format!("select pg_terminate_backend({pid})")).await;
    assert_eq!(terminated, "t", "server process {pid} exists");
    eventually(
        Duration::from_secs(10),
        "the server process exits",
        || async {
            scalar(
                observer,
                &format!("select count(*) from pg_stat_activity where pid = {pid}"),
            )
            .await
                == "0"
        },
    )
    .await;
}

pub async fn server_pid(client: &Client) -> i32 {
    scalar(client, "select pg_backend_pid()")
        .await
        .parse()
        .expect("pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_keeps_its_state_across_a_terminated_backend() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    let (client, _) = harness.connect().await;
    client
        .batch_execute(
            "set application_name = 'carried'; set search_path = pg_catalog, public; \
             prepare doubled(int) as select $1 * 2",
        )
        .await
        .expect("session state");
    let statement = client
        .prepare("select $1::int + 1")
        .await
        .expect("protocol prepared statement");
    let before = server_pid(&client).await;

    terminate(&observer, before).await;

    assert_eq!(scalar(&client, "show application_name").await, "carried");
    assert_eq!(
        scalar(&client, "show search_path").await,
        "pg_catalog, public"
    );
    assert_eq!(scalar(&client, "execute doubled(21)").await, "42");
    let row = client
        .query_one(&statement, &[&41i32])
        .await
        .expect("the protocol prepared statement still exists");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_ne!(
        server_pid(&client).await,
        before,
        "a new server process serves the session"
    );
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers"], 1);
    assert_eq!(stats["failovers_recovered"], 1);
    assert_eq!(stats["failovers_failed"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transaction_is_replayed_onto_a_new_server_connection() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table carried (id int primary key, note text)")
        .await
        .expect("table");
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    client
        .batch_execute(
            "begin; set local work_mem = '7MB'; insert into carried values (1, 'before'); \
             savepoint s; insert into carried values (2, 'undone'); rollback to s",
        )
        .await
        .expect("transaction so far");

    terminate(&observer, pid).await;

    assert_eq!(scalar(&client, "show work_mem").await, "7MB");
    client
        .execute("insert into carried values (3, 'after')", &[])
        .await
        .expect("insert after the failover");
    client.batch_execute("commit").await.expect("commit");
    let rows = text_rows(&observer, "select id, note from carried order by id").await;
    assert_eq!(
        rows,
        vec![
            vec!["1".to_owned(), "before".to_owned()],
            vec!["3".to_owned(), "after".to_owned()],
        ]
    );
    let stats = reprise_stats(&client).await;
    assert!(
        stats["commands_replayed"] >= 1,
        "the transaction's commands were replayed: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_in_flight_gets_its_answer_from_the_new_server_connection() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    let running = tokio::spawn(async move {
        let row = client
            .query_one("select 42 as answer, pg_sleep(1.5)::text", &[])
            .await;
        (client, row)
    });
    eventually(Duration::from_secs(10), "the query is running", || async {
        scalar(
            &observer,
            &format!(
                "select count(*) from pg_stat_activity where pid = {pid} and state = 'active'"
            ),
        )
        .await
            == "1"
    })
    .await;
    terminate(&observer, pid).await;
    let (client, row) = running.await.expect("join");
    let row = row.expect("the query in flight completes");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(scalar(&client, "select 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_broken_mid_stream_reaches_the_client_whole() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    let pid = backend_pid(&greeting);
    const ROWS: usize = 300_000;
    raw.send(&query(&format!(
        "select g, repeat('x', 100) from generate_series(1, {ROWS}) g"
    )))
    .await;
    // Take a little of the result, then break the connection while the
    // server still has most of it to send.
    let mut received = Vec::new();
    while received.len() < 1000 {
        let message = raw.message().await.expect("result");
        if message.tag == b'D' {
            received.push(message);
        }
    }
    terminate(&observer, pid).await;
    let rest = raw.until_ready().await;
    let error = rest.iter().find(|m| m.tag == b'E');
    assert!(error.is_none(), "no error reaches the client: {error:?}");
    received.extend(rest.into_iter().filter(|m| m.tag == b'D'));
    let rows = data_rows(&received);
    assert_eq!(rows.len(), ROWS, "every row arrives exactly once");
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(
            row[0].as_deref(),
            Some((index + 1).to_string().as_str()),
            "rows arrive in order, none twice"
        );
    }
    raw.send(&query("select 7")).await;
    assert_eq!(
        data_rows(&raw.until_ready().await),
        vec![vec![Some("7".to_owned())]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_survives_an_immediate_server_restart() {
    let mut harness = Harness::start().await;
    {
        let (observer, _) = harness.connect_direct().await;
        observer
            // The test cluster does not wait for WAL flushes on commit: a
            // checkpoint makes the table survive the crash.
            .batch_execute("create table restarted (id int)")
            .await
            .expect("table");
        observer
            .batch_execute("checkpoint")
            .await
            .expect("checkpoint");
    }
    let (client, _) = harness.connect().await;
    client
        .batch_execute("begin; insert into restarted values (1)")
        .await
        .expect("first insert");
    tokio::task::block_in_place(|| {
        harness.cluster.stop_immediate().expect("stop -m immediate");
        harness.cluster.restart().expect("start again");
    });
    client
        .batch_execute("insert into restarted values (2); commit")
        .await
        .expect("the transaction goes on after the restart");
    let (observer, _) = harness.connect_direct().await;
    assert_eq!(
        text_rows(&observer, "select id from restarted order by id").await,
        vec![vec!["1".to_owned()], vec!["2".to_owned()]]
    );
}

/// Sends `sql`, then reads to the end of the stream and returns the
/// FATAL error the session ended with.
pub async fn ending_error(raw: &mut RawClient, sql: &str) -> crate::support::Message {
    raw.send_lenient(&query(sql)).await;
    let messages = raw.until_closed().await;
    let errors: Vec<_> = messages.into_iter().filter(|m| m.tag == b'E').collect();
    assert_eq!(errors.len(), 1, "one error ends the session: {errors:?}");
    let error = errors.into_iter().next().expect("an error");
    assert_eq!(error.field(b'V').as_deref(), Some("FATAL"));
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_value_the_client_saw_cannot_be_replayed() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create sequence handed_out")
        .await
        .expect("sequence");
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    raw.send(&query("begin; select nextval('handed_out')"))
        .await;
    assert_eq!(
        data_rows(&raw.until_ready().await),
        vec![vec![Some("1".to_owned())]]
    );
    terminate(&observer, backend_pid(&greeting)).await;
    let error = ending_error(&mut raw, "select 1").await;
    assert_eq!(error.sqlstate().as_deref(), Some("08006"));
    assert_eq!(error.field(b'D').as_deref(), Some("replay-diverged"));
    let (other, _) = harness.connect().await;
    let stats = reprise_stats(&other).await;
    assert_eq!(stats["failovers_failed"], 1);
    assert_eq!(stats["failovers_recovered"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_table_makes_the_session_non_recoverable() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    raw.send(&query("create temp table scratch (x int)")).await;
    raw.until_ready().await;
    terminate(&observer, backend_pid(&greeting)).await;
    let error = ending_error(&mut raw, "select 1").await;
    assert_eq!(error.sqlstate().as_deref(), Some("08006"));
    assert_eq!(error.field(b'D').as_deref(), Some("non-recoverable-state"));
    let message = error.field(b'M').unwrap_or_default();
    assert!(
        message.contains("temporary objects"),
        "the message names what cannot be rebuilt: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stays_away_exhausts_the_budget() {
    let mut harness = Harness::start_with(throwaway_pg::Options::default(), |config| {
        config.failover_budget = reprise::config::HumanDuration(Duration::from_millis(800));
    })
    .await;
    let (mut raw, _) = RawClient::login(harness.proxy).await;
    raw.send(&query("select 1")).await;
    raw.until_ready().await;
    let started = std::time::Instant::now();
    tokio::task::block_in_place(|| harness.cluster.stop_fast().expect("stop"));
    let error = ending_error(&mut raw, "select 1").await;
    assert_eq!(error.sqlstate().as_deref(), Some("08006"));
    assert_eq!(error.field(b'D').as_deref(), Some("budget-exhausted"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the budget bounds the wait"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autocommit_write_in_flight_has_an_unknown_outcome() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table maybe (x int)")
        .await
        .expect("table");
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    let running = tokio::spawn(async move {
        client
            .simple_query("insert into maybe select 1 from pg_sleep(1.5)")
            .await
    });
    eventually(Duration::from_secs(10), "the insert is running", || async {
        scalar(
            &observer,
            &format!(
                "select count(*) from pg_stat_activity where pid = {pid} and state = 'active'"
            ),
        )
        .await
            == "1"
    })
    .await;
    terminate(&observer, pid).await;
    let err = running
        .await
        .expect("join")
        .expect_err("the outcome cannot be known");
    assert_eq!(
        err.code(),
        Some(&SqlState::TRANSACTION_RESOLUTION_UNKNOWN),
        "{err:?}"
    );
    assert_eq!(scalar(&observer, "select count(*) from maybe").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_survives_and_notifications_carry_the_pid_the_client_knows() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    let known_pid = backend_pid(&greeting);
    raw.send(&query("listen carried")).await;
    raw.until_ready().await;
    terminate(&observer, known_pid).await;

    // The session's own notification: PostgreSQL delivers it with the
    // sender's process id, which must be the one the client knows.
    raw.send(&query("notify carried, 'self'")).await;
    let answer = raw.until_ready().await;
    let warning = answer
        .iter()
        .find(|m| m.tag == b'N')
        .expect("a notice that notifications may have been missed");
    assert_eq!(warning.sqlstate().as_deref(), Some("01000"));
    assert!(
        warning
            .field(b'D')
            .is_some_and(|detail| detail.contains("\"carried\"")),
        "{:?}",
        warning.field(b'D')
    );
    let own = answer
        .iter()
        .find(|m| m.tag == b'A')
        .expect("the session's own notification");
    assert_eq!(
        i32::from_be_bytes([own.body[0], own.body[1], own.body[2], own.body[3]]),
        known_pid
    );
    raw.send(&query("select pg_backend_pid()")).await;
    let new_pid = data_rows(&raw.until_ready().await)[0][0]
        .clone()
        .expect("pid");
    assert_ne!(new_pid, known_pid.to_string());

    // Another session's notification reaches the restored LISTEN.
    observer
        .batch_execute("notify carried, 'other'")
        .await
        .expect("notify");
    let other = loop {
        let message = raw.message().await.expect("notification");
        if message.tag == b'A' {
            break message;
        }
    };
    assert!(other.body.ends_with(b"carried\0other\0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_new_server_connection() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    terminate(&observer, pid).await;
    assert_eq!(scalar(&client, "select 1").await, "1");
    let token = client.cancel_token();
    let running = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request sent");
    let err = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the cancel takes effect")
        .expect("join")
        .expect_err("cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_off_ends_the_session_with_the_servers_error() {
    let harness = Harness::start_with(throwaway_pg::Options::default(), |config| {
        config.failover = false;
    })
    .await;
    let (observer, _) = harness.connect_direct().await;
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    terminate(&observer, pid).await;
    let err = client
        .simple_query("select 1")
        .await
        .expect_err("the session is gone");
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_terminated_off_passes_pg_terminate_backend_through() {
    let harness = Harness::start_with(throwaway_pg::Options::default(), |config| {
        config.replay_terminated = false;
    })
    .await;
    let (observer, _) = harness.connect_direct().await;
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    terminate(&observer, backend_pid(&greeting)).await;
    let messages = raw.until_closed().await;
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .expect("the server's FATAL reaches the client");
    assert_eq!(error.sqlstate().as_deref(), Some("57P01"));
}

/// Waits until server process `pid` is running a statement and waits on
/// `wait_event` (any wait when `None`).
pub async fn wait_until_active(observer: &Client, pid: i32, wait_event: Option<&str>) {
    let condition = match wait_event {
        Some(event) => format!("and wait_event = '{event}'"),
        None => String::new(),
    };
    eventually(Duration::from_secs(10), "the statement is running", || async {
        scalar(
            observer,
            &format!(
                "select count(*) from pg_stat_activity where pid = {pid} and state = 'active' {condition}"
            ),
        )
        .await
            == "1"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_committed_before_its_answer_was_lost_is_not_run_again() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table paid (id int primary key)")
        .await
        .expect("table");
    // The COMMIT is durable on the server, then waits for a standby that
    // does not exist: terminating it then loses the answer, not the commit.
    set_system(&observer, "synchronous_standby_names", "nobody").await;
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    client
        .batch_execute("set synchronous_commit = on; begin; insert into paid values (1)")
        .await
        .expect("transaction");
    let committing = tokio::spawn(async move {
        let result = client.batch_execute("commit").await;
        (client, result)
    });
    wait_until_active(&observer, pid, Some("SyncRep")).await;
    terminate(&observer, pid).await;
    let (client, result) = committing.await.expect("join");
    result.expect("the client learns that its transaction committed");
    observer
        .batch_execute("alter system reset synchronous_standby_names")
        .await
        .expect("reset");
    scalar(&observer, "select pg_reload_conf()").await;
    assert_eq!(scalar(&client, "select count(*) from paid").await, "1");
    assert_eq!(
        scalar(&client, "show transaction_isolation").await,
        "read committed",
        "the session is outside any transaction"
    );
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
    assert_eq!(
        stats["commands_replayed"], 0,
        "nothing ran twice: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_did_not_commit_before_the_loss_is_run_again() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    // A deferred trigger makes the COMMIT itself take a while, before the
    // transaction commits.
    observer
        .batch_execute(
            "create table booked (id int primary key); \
             create function slow_commit() returns trigger language plpgsql as \
               $$ begin perform pg_sleep(1); return null; end $$; \
             create constraint trigger at_commit after insert on booked \
               deferrable initially deferred for each row execute function slow_commit()",
        )
        .await
        .expect("schema");
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    client
        .batch_execute("begin; insert into booked values (7)")
        .await
        .expect("transaction");
    let committing = tokio::spawn(async move {
        let result = client.batch_execute("commit").await;
        (client, result)
    });
    wait_until_active(&observer, pid, None).await;
    terminate(&observer, pid).await;
    let (client, result) = committing.await.expect("join");
    result.expect("the transaction is run again and commits");
    assert_eq!(
        text_rows(&observer, "select id from booked").await,
        vec![vec!["7".to_owned()]]
    );
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
    assert!(stats["commands_replayed"] >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_survives_sigkill_of_another_server_process() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table crashed (id int)")
        .await
        .expect("table");
    // The test cluster does not flush WAL at commit: the checkpoint makes
    // the table survive the crash.
    observer
        .batch_execute("checkpoint")
        .await
        .expect("checkpoint");
    let (client, _) = harness.connect().await;
    client
        .batch_execute("set application_name = 'survivor'; begin; insert into crashed values (1)")
        .await
        .expect("first insert");
    // SIGKILL of any server process makes the postmaster end all others
    // (57P02, crash of another server process) and recover.
    let victim = server_pid(&observer).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 of a server process");
    // The crash recovery is over once the server takes connections again;
    // the session's own server process was ended on the way.
    eventually(Duration::from_secs(20), "the server recovered", || async {
        match tokio_postgres::connect(&harness.direct_conn_str(), tokio_postgres::NoTls).await {
            Ok((fresh, connection)) => {
                tokio::spawn(connection);
                fresh.simple_query("select 1").await.is_ok()
            }
            Err(_) => false,
        }
    })
    .await;
    client
        .batch_execute("insert into crashed values (2); commit")
        .await
        .expect("the transaction goes on after the crash recovery");
    assert_eq!(scalar(&client, "show application_name").await, "survivor");
    assert_eq!(
        text_rows(&client, "select id from crashed order by id").await,
        vec![vec!["1".to_owned()], vec!["2".to_owned()]]
    );
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
}
