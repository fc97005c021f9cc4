//! Relaying with tokio-postgres: every protocol feature a driver uses,
//! compared with what the server answers directly.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use crate::support::{self, backend_pid, query, Harness, RawClient};

fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_match_direct() {
    let harness = Harness::start().await;
    let (proxied, _) = harness.connect().await;
    let (direct, _) = harness.connect_direct().await;

    let multi = "select 1 as a, 'x' as b; select generate_series(1, 3); create temp table t(i int); insert into t values (1), (2); select * from t";
    let through = proxied
        .simple_query(multi)
        .await
        .expect("multi-statement through proxy");
    let straight = direct
        .simple_query(multi)
        .await
        .expect("multi-statement direct");
    assert_eq!(simple_rows(&through), simple_rows(&straight));
    assert_eq!(through.len(), straight.len());

    // Binary formats: typed parameters and results go through Bind/DataRow
    // in binary.
    let sql = "select $1::int8 + 1, $2::text || '!', $3::float8 * 2, $4::bytea, $5::bool, now() is not null";
    let blob = vec![0u8, 1, 2, 255];
    let row = proxied
        .query_one(sql, &[&41_i64, &"hi", &1.25_f64, &blob, &true])
        .await
        .expect("binary query");
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    assert_eq!(row.get::<_, f64>(2), 2.5);
    assert_eq!(row.get::<_, Vec<u8>>(3), blob);
    assert!(row.get::<_, bool>(4));

    // Named prepared statement reused many times.
    let statement = proxied
        .prepare("select $1::int * 2")
        .await
        .expect("prepare");
    for i in 0..50 {
        let row = proxied
            .query_one(&statement, &[&i])
            .await
            .expect("execute prepared");
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }

    // Errors come back with the server's SQLSTATE and the session goes on.
    let err = proxied
        .simple_query("selec 1")
        .await
        .expect_err("syntax error");
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR));
    let err = proxied
        .query("select 1/0", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(
        support::scalar(&proxied, "select 'still alive'").await,
        "still alive"
    );

    // An empty query gets EmptyQueryResponse.
    let empty = proxied.simple_query("").await.expect("empty query");
    assert!(simple_rows(&empty).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_with_row_limits_and_pipelining() {
    let harness = Harness::start().await;
    let (mut client, _) = harness.connect().await;

    let transaction = client.transaction().await.expect("begin");
    let statement = transaction
        .prepare("select generate_series(1, 25)")
        .await
        .expect("prepare");
    let portal = transaction
        .bind(&statement, &[])
        .await
        .expect("bind to a named portal");
    let mut seen = Vec::new();
    loop {
        // Execute with a row limit: the server answers PortalSuspended
        // until the portal is exhausted.
        let rows = transaction
            .query_portal(&portal, 10)
            .await
            .expect("execute portal");
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|row| row.get::<_, i32>(0)));
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    transaction.commit().await.expect("commit");

    // Many requests in one flight: tokio-postgres pipelines concurrent
    // queries on one connection, each ending in its own Sync.
    let statement = client
        .prepare("select $1::int + 1000")
        .await
        .expect("prepare");
    let futures = (0..200).map(|i| {
        let client = &client;
        let statement = &statement;
        async move {
            client
                .query_one(statement, &[&i])
                .await
                .map(|row| row.get::<_, i32>(0))
        }
    });
    let results = futures_util::future::try_join_all(futures)
        .await
        .expect("pipelined queries");
    assert_eq!(results, (1000..1200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_out_and_fail() {
    let harness = Harness::start().await;
    let (client, _) = harness.connect().await;
    client
        .batch_execute("create table copied (id int, name text)")
        .await
        .expect("create");

    let sink = client
        .copy_in("copy copied from stdin")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\tname {i}\n"));
    }
    sink.send(Bytes::from(data.clone()))
        .await
        .expect("send copy data");
    assert_eq!(sink.finish().await.expect("copy done"), 10_000);

    let out = client
        .copy_out("copy copied to stdout")
        .await
        .expect("copy out");
    let chunks: Vec<Bytes> = out.try_collect().await.expect("copy out data");
    let text: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(text).expect("utf8"), data);

    // Dropping the sink without finishing sends CopyFail: the COPY is
    // rolled back and the session goes on.
    {
        let sink = client
            .copy_in("copy copied from stdin")
            .await
            .expect("copy in");
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from_static(b"99999\tnever\n"))
            .await
            .expect("send");
    }
    assert_eq!(
        support::scalar(&client, "select count(*) from copied").await,
        "10000"
    );

    // The server ignores a Sync sent during COPY FROM STDIN (tokio-postgres
    // sends one right after Execute): Reprise still knows which answer
    // belongs to which request.
    client
        .batch_execute("set work_mem = '5MB'")
        .await
        .expect("set");
    let state = support::text_rows(&client, "SHOW reprise.state").await;
    assert!(
        state
            .iter()
            .any(|row| row[0] == "setting" && row[1] == "work_mem" && row[2] == "5MB"),
        "{state:?}"
    );
    assert!(
        !state.iter().any(|row| row[0] == "non_recoverable"),
        "{state:?}"
    );
    assert_eq!(
        support::reprise_stats(&client).await["tracker_mismatches"],
        0
    );
}

#[tokio::test]
async fn a_pipelined_copy_in_keeps_requests_and_answers_in_step() {
    let harness = Harness::start().await;
    let (admin, _) = harness.connect_direct().await;
    admin
        .batch_execute("create table copied (id int)")
        .await
        .expect("create");
    let (mut raw, _) = support::RawClient::login(harness.proxy).await;
    // Everything in one write: the first Sync arrives in copy-in mode and
    // is ignored by the server, the second ends the batch.
    let mut batch = support::parse_message("", "copy copied from stdin", &[]);
    batch.extend(support::bind_message("", "", &[]));
    batch.extend(support::execute_message("", 0));
    batch.extend(support::sync_message());
    batch.extend(support::frame(b'd', b"1\n2\n"));
    batch.extend(support::frame(b'c', b""));
    batch.extend(support::sync_message());
    batch.extend(support::query("SET work_mem = '6MB'"));
    raw.send(&batch).await;
    let tags: Vec<u8> = raw.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12GCZ".to_vec());
    let tags: Vec<u8> = raw.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"CZ".to_vec());
    let state = raw.reprise_state().await;
    assert!(
        state.contains(&support::state_row("setting", "work_mem", "6MB")),
        "{state:?}"
    );
    assert!(
        !state.iter().any(|row| row.0 == "non_recoverable"),
        "{state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_notices_arrive_while_idle() {
    let harness = Harness::start().await;
    let (listener, mut messages) = harness.connect().await;
    let (notifier, _) = harness.connect().await;
    listener.batch_execute("listen chan").await.expect("listen");
    let listener_pid: i32 = listener
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let notifier_pid: i32 = notifier
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    notifier
        .batch_execute("notify chan, 'payload 1'")
        .await
        .expect("notify");
    let notification = support::next_async(&mut messages, support::notification).await;
    assert_eq!(notification.channel(), "chan");
    assert_eq!(notification.payload(), "payload 1");
    assert_eq!(notification.process_id(), notifier_pid);

    // The session's own notification carries the pid the client knows.
    listener
        .batch_execute("notify chan, 'self'")
        .await
        .expect("notify self");
    let own = support::next_async(&mut messages, support::notification).await;
    assert_eq!(own.process_id(), listener_pid);

    // A notice raised by the server reaches the client.
    listener
        .batch_execute("do $$ begin raise notice 'hello notice'; end $$")
        .await
        .expect("notice");
    let notice = support::next_async(&mut messages, |message| match message {
        AsyncMessage::Notice(notice) => Some(notice),
        _ => None,
    })
    .await;
    assert_eq!(notice.message(), "hello notice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_server() {
    let harness = Harness::start().await;
    let (client, _) = harness.connect().await;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    });
    let started = std::time::Instant::now();
    let err = client
        .simple_query("select pg_sleep(60)")
        .await
        .expect_err("cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    assert!(started.elapsed() < Duration::from_secs(30));
    canceller.await.expect("join").expect("cancel request sent");
    assert_eq!(
        support::scalar(&client, "select 'after cancel'").await,
        "after cancel"
    );

    // A cancel with a key nobody holds is dropped silently.
    let mut stray = RawClient::connect(harness.proxy).await;
    let mut packet = 16_i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102_i32.to_be_bytes());
    packet.extend_from_slice(&1_i32.to_be_bytes());
    packet.extend_from_slice(&2_i32.to_be_bytes());
    stray.send(&packet).await;
    assert!(
        stray.message().await.is_none(),
        "no answer to an unknown cancel key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_and_parameter_status_are_the_servers() {
    let harness = Harness::start().await;
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    let (mut direct_raw, direct_greeting) = RawClient::login(harness.cluster_addr()).await;

    // ParameterStatus frames byte for byte, in the server's order.
    let statuses = |messages: &[support::Message]| {
        messages
            .iter()
            .filter(|m| m.tag == b'S')
            .map(|m| m.body.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(statuses(&greeting), statuses(&direct_greeting));
    assert_eq!(greeting.first().map(|m| m.tag), Some(b'R'));

    let pid = backend_pid(&greeting);
    raw.send(&query("select pg_backend_pid()")).await;
    let reply = raw.until_ready().await;
    let row = reply.iter().find(|m| m.tag == b'D').expect("row");
    let text = String::from_utf8_lossy(&row.body[6..]).into_owned();
    assert_eq!(text.parse::<i32>().expect("pid"), pid);

    // A client that vanishes without Terminate has its server process
    // ended at once.
    let (observer, _) = harness.connect_direct().await;
    drop(raw);
    support::eventually(
        Duration::from_secs(10),
        "the server process of a vanished client ends",
        || {
            let observer = &observer;
            async move {
                support::scalar(
                    observer,
                    &format!("select count(*) from pg_stat_activity where pid = {pid}"),
                )
                .await
                    == "0"
            }
        },
    )
    .await;
    direct_raw.send(&support::frame(b'X', b"")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_and_row_of_fifty_megabytes() {
    let harness = Harness::start().await;
    // FunctionCall (legacy sub-protocol): int4abs(-7), OID 1397.
    let call = |arg: i32| {
        let mut body = 1397_i32.to_be_bytes().to_vec();
        body.extend_from_slice(&1_i16.to_be_bytes());
        body.extend_from_slice(&1_i16.to_be_bytes());
        body.extend_from_slice(&1_i16.to_be_bytes());
        body.extend_from_slice(&4_i32.to_be_bytes());
        body.extend_from_slice(&arg.to_be_bytes());
        body.extend_from_slice(&1_i16.to_be_bytes());
        support::frame(b'F', &body)
    };
    let (mut raw, _) = RawClient::login(harness.proxy).await;
    raw.send(&call(-7)).await;
    let reply = raw.until_ready().await;
    let (mut direct, _) = RawClient::login(harness.cluster_addr()).await;
    direct.send(&call(-7)).await;
    let direct_reply = direct.until_ready().await;
    assert_eq!(reply, direct_reply);
    assert_eq!(reply[0].tag, b'V');
    assert_eq!(&reply[0].body[..], &[0, 0, 0, 4, 0, 0, 0, 7]);

    let (client, _) = harness.connect().await;
    let row = client
        .query_one("select repeat('x', 50 * 1024 * 1024)", &[])
        .await
        .expect("a 50 MB row");
    let value: &str = row.get(0);
    assert_eq!(value.len(), 50 * 1024 * 1024);
    assert!(value.bytes().all(|b| b == b'x'));
    // And the other way: a 50 MB parameter.
    let big = "y".repeat(50 * 1024 * 1024);
    let length: i32 = client
        .query_one("select length($1::text)", &[&big])
        .await
        .expect("a 50 MB parameter")
        .get(0);
    assert_eq!(length as usize, big.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_loss_reaches_the_client_when_failover_is_off() {
    let harness = Harness::start_with(throwaway_pg::Options::default(), |config| {
        config.failover = false;
    })
    .await;
    let (observer, _) = harness.connect_direct().await;

    // Terminated by an administrator: the client gets the server's own
    // FATAL (57P01).
    let (client, _) = harness.connect().await;
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    observer
        .simple_query(&format!("select pg_terminate_backend({pid})"))
        .await
        .expect("terminate");
    let err = client
        .simple_query("select 1")
        .await
        .expect_err("session is gone");
    let code = err.code().cloned();
    assert!(
        code == Some(SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "unexpected error after pg_terminate_backend: {err:?}"
    );

    // The server process killed outright: no goodbye from the server, so
    // Reprise reports the loss with 08006.
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    let pid = backend_pid(&greeting);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let messages = raw.until_closed().await;
    let error = messages
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(
        error.sqlstate().as_deref(),
        Some("08006"),
        "{:?}",
        error.field(b'M')
    );
    assert_eq!(error.field(b'V').as_deref(), Some("FATAL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions() {
    let harness = Harness::start_with(
        throwaway_pg::Options {
            max_connections: 1100,
            ..throwaway_pg::Options::default()
        },
        |_| {},
    )
    .await;
    let address = harness.proxy_conn_str();
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1000);
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    for i in 0..1000 {
        let address = address.clone();
        let ready_tx = ready_tx.clone();
        let release = std::sync::Arc::clone(&release);
        tasks.push(tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&address, NoTls).await?;
            tokio::spawn(connection);
            let row = client.query_one("select $1::int", &[&i]).await?;
            assert_eq!(row.get::<_, i32>(0), i);
            let _ = ready_tx.send(()).await;
            // Hold every session open until all 1000 are up at once.
            release.notified().await;
            let row = client.query_one("select $1::int + 1", &[&i]).await?;
            Ok::<_, tokio_postgres::Error>(row.get::<_, i32>(0))
        }));
    }
    drop(ready_tx);
    for _ in 0..1000 {
        tokio::time::timeout(Duration::from_secs(120), ready_rx.recv())
            .await
            .expect("all sessions up in time")
            .expect("a session failed before it was ready");
    }
    assert_eq!(harness.handle.active_sessions(), 1000);
    let (observer, _) = harness.connect_direct().await;
    let server_side = support::scalar(
        &observer,
        "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()",
    )
    .await;
    assert_eq!(server_side, "1000");
    release.notify_waiters();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.expect("join").expect("session"), i as i32 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_stream_survives_pipelined_load() {
    // Notifications interleaved with a busy pipelined connection arrive
    // whole: frames are never split or merged across the relay.
    let harness = Harness::start().await;
    let (listener, mut messages) = harness.connect().await;
    let (notifier, _) = harness.connect().await;
    listener.batch_execute("listen busy").await.expect("listen");
    let sender = tokio::spawn(async move {
        for i in 0..200 {
            notifier
                .batch_execute(&format!("notify busy, '{i}'"))
                .await
                .expect("notify");
        }
    });
    let work = (0..200).map(|i| {
        let listener = &listener;
        async move {
            listener
                .query_one("select $1::int", &[&i])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    });
    let results = futures_util::future::try_join_all(work)
        .await
        .expect("work");
    assert_eq!(results.len(), 200);
    sender.await.expect("sender");
    let mut payloads = Vec::new();
    while payloads.len() < 200 {
        match tokio::time::timeout(Duration::from_secs(10), messages.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => payloads.push(n.payload().to_owned()),
            Ok(Some(_)) => {}
            _ => {
                // Idle connections only read when polled; a query drains.
                listener.simple_query("select 1").await.expect("poll");
            }
        }
    }
    assert_eq!(
        payloads,
        (0..200).map(|i| i.to_string()).collect::<Vec<_>>()
    );
}
