//! `wrap_autocommit_writes`: an autocommit statement that may write runs
//! inside a transaction block of Reprise's own, so that a lost answer to
//! it is settled like a COMMIT's. The client must see exactly what
//! autocommit gives.

use std::net::SocketAddr;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::failover::{server_pid, terminate, wait_until_active};
use crate::support::{
    bind_message, execute_message, parse_message, query, reprise_stats, scalar, sync_message,
    Harness, Message, RawClient,
};

async fn wrapping_harness() -> Harness {
    Harness::start_with(Default::default(), |config| {
        config.wrap_autocommit_writes = true;
    })
    .await
}

/// A readable line per message: what a client can tell apart (tags,
/// rows, SQLSTATEs, statuses), not texts that name process ids.
fn describe(message: &Message) -> String {
    let tag = char::from(message.tag);
    match message.tag {
        b'C' => format!(
            "C {}",
            String::from_utf8_lossy(&message.body).trim_end_matches('\0')
        ),
        b'E' | b'N' => format!("{tag} {}", message.sqlstate().unwrap_or_default()),
        b'Z' => format!("Z {}", char::from(message.ready_status().unwrap_or(b'?'))),
        b'D' => format!("D {:?}", message.data_row()),
        _ => tag.to_string(),
    }
}

/// Sends each request and reads its answer up to ReadyForQuery.
async fn transcript(address: SocketAddr, database: &str, requests: &[Vec<u8>]) -> Vec<String> {
    let (mut client, _) =
        RawClient::login_with(address, &[("user", "postgres"), ("database", database)]).await;
    let mut lines = Vec::new();
    for request in requests {
        client.send(request).await;
        let expected = request
            .iter()
            .enumerate()
            .filter(|(at, _)| is_request_end(request, *at))
            .count();
        for _ in 0..expected {
            lines.extend(client.until_ready().await.iter().map(describe));
        }
    }
    lines
}

/// Whether a frame starts at `at` in `bytes` and is a Query or a Sync.
fn is_request_end(bytes: &[u8], at: usize) -> bool {
    let mut offset = 0;
    while offset < bytes.len() {
        if offset == at {
            return matches!(bytes[offset], b'Q' | b'S');
        }
        let len = u32::from_be_bytes([
            bytes[offset + 1],
            bytes[offset + 2],
            bytes[offset + 3],
            bytes[offset + 4],
        ]) as usize;
        offset += 1 + len;
    }
    false
}

fn extended(sql: &str, params: &[&str]) -> Vec<u8> {
    let mut request = parse_message("", sql, &[]);
    request.extend(bind_message("", "", params));
    request.extend(execute_message("", 0));
    request.extend(sync_message());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_writes_answer_as_autocommit_does() {
    let harness = wrapping_harness().await;
    let (admin, _) = harness.connect_direct().await;
    for database in ["direct", "proxied"] {
        admin
            .batch_execute(&format!("create database {database}"))
            .await
            .expect("database");
        let (client, _) = crate::support::connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            harness.cluster.port()
        ))
        .await;
        client
            .batch_execute(
                "create table t (id int primary key, v text); \
                 create table parent (id int primary key); \
                 create table child (p int references parent (id) deferrable initially deferred)",
            )
            .await
            .expect("schema");
    }
    let mut pipelined = query("insert into t values (5, 'p')");
    pipelined.extend(query("insert into t values (6, 'q')"));
    let requests = vec![
        query("insert into t values (1, 'a') returning id, v"),
        // A failing statement, then the session is idle again.
        query("insert into t values (1, 'b')"),
        query("update t set v = 'c' where id = 1"),
        // The deferred check fails at commit: an error and no
        // CommandComplete, as PostgreSQL reports an implicit commit.
        query("insert into child values (42)"),
        query("vacuum t"),
        query("create table u (n int)"),
        query("drop table u"),
        query("notify somewhere"),
        query("with gone as (delete from t where id = 1 returning id) select count(*) from gone"),
        extended("insert into t values ($1, 'x')", &["2"]),
        extended("insert into t values ($1, 'x')", &["2"]),
        extended("insert into child values ($1)", &["43"]),
        pipelined,
        query("select id, v from t order by id"),
        query("select count(*) from child"),
    ];
    let direct = transcript(harness.cluster_addr(), "direct", &requests).await;
    let proxied = transcript(harness.proxy, "proxied", &requests).await;
    assert_eq!(proxied, direct);
    assert!(
        direct.contains(&"E 23503".to_owned()) && direct.contains(&"E 23505".to_owned()),
        "the transcript holds the errors it is about: {direct:?}"
    );
    let (client, _) = harness.connect().await;
    let stats = reprise_stats(&client).await;
    // Not VACUUM, not the reads, not the second statement of the pipeline.
    assert_eq!(stats["autocommit_writes_wrapped"], 12, "{stats:?}");
}

async fn sleeping_insert_is_terminated(harness: &Harness, extended: bool) -> (Client, u64) {
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table maybe (x int)")
        .await
        .expect("table");
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    let running = tokio::spawn(async move {
        let result = if extended {
            client
                .execute(
                    "insert into maybe select $1::int from pg_sleep(1.5)",
                    &[&1i32],
                )
                .await
        } else {
            client
                .simple_query("insert into maybe select 1 from pg_sleep(1.5)")
                .await
                .map(|messages| {
                    messages
                        .iter()
                        .find_map(|message| match message {
                            SimpleQueryMessage::CommandComplete(rows) => Some(*rows),
                            _ => None,
                        })
                        .expect("a CommandComplete")
                })
        };
        (client, result)
    });
    wait_until_active(&observer, pid, Some("PgSleep")).await;
    terminate(&observer, pid).await;
    let (client, result) = running.await.expect("join");
    let rows = result.expect("the write is run again on the new server connection");
    assert_eq!(
        scalar(&observer, "select count(*) from maybe").await,
        "1",
        "inserted exactly once"
    );
    (client, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_write_that_never_committed_is_run_again() {
    let harness = wrapping_harness().await;
    let (client, rows) = sleeping_insert_is_terminated(&harness, false).await;
    assert_eq!(rows, 1);
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
    assert_eq!(stats["failovers_failed"], 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_extended_protocol_write_that_never_committed_is_run_again() {
    let harness = wrapping_harness().await;
    let (client, rows) = sleeping_insert_is_terminated(&harness, true).await;
    assert_eq!(rows, 1);
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
}

/// The COMMIT of the wrapped write is durable, then waits for a standby
/// that does not exist: terminating it loses the answer, not the commit.
async fn committed_write_loses_its_answer(extended: bool) {
    let harness = wrapping_harness().await;
    let (observer, _) = harness.connect_direct().await;
    observer
        .batch_execute("create table paid (id int primary key)")
        .await
        .expect("table");
    observer
        .batch_execute("alter system set synchronous_standby_names = 'nobody'")
        .await
        .expect("synchronous standby");
    scalar(&observer, "select pg_reload_conf()").await;
    let (client, _) = harness.connect().await;
    let pid = server_pid(&client).await;
    client
        .batch_execute("set synchronous_commit = on")
        .await
        .expect("set");
    let committing = tokio::spawn(async move {
        let ids: Result<Vec<String>, _> = if extended {
            client
                .query("insert into paid values ($1) returning id", &[&7i32])
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|row| row.get::<_, i32>(0).to_string())
                        .collect()
                })
        } else {
            client
                .simple_query("insert into paid values (7) returning id")
                .await
                .map(|messages| {
                    messages
                        .iter()
                        .filter_map(|message| match message {
                            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                            _ => None,
                        })
                        .collect()
                })
        };
        (client, ids)
    });
    wait_until_active(&observer, pid, Some("SyncRep")).await;
    terminate(&observer, pid).await;
    let (client, ids) = committing.await.expect("join");
    assert_eq!(
        ids.expect("the client learns that its write committed"),
        vec!["7".to_owned()],
        "the returned row arrives once"
    );
    observer
        .batch_execute("alter system reset synchronous_standby_names")
        .await
        .expect("reset");
    scalar(&observer, "select pg_reload_conf()").await;
    assert_eq!(scalar(&client, "select count(*) from paid").await, "1");
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
    assert_eq!(
        stats["commands_replayed"], 0,
        "nothing ran twice: {stats:?}"
    );
    client
        .batch_execute("insert into paid values (8)")
        .await
        .expect("the session goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_write_that_committed_before_its_answer_was_lost_is_answered_once() {
    committed_write_loses_its_answer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_extended_protocol_write_that_committed_is_answered_once() {
    committed_write_loses_its_answer(true).await;
}
