//! Borrow hooks and Reprise's own statements: `SET reprise.template`,
//! `RESET reprise.template`, `SHOW reprise.*`, in the simple and the
//! extended protocol, with the server as the judge of the state they
//! produce.

use std::path::PathBuf;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::support::{self, frame, query, text_rows as rows, Harness, RawClient};

fn templates_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("templates")
}

async fn harness() -> Harness {
    let harness = Harness::start_with(Default::default(), |config| {
        config.templates_dir = Some(templates_dir());
    })
    .await;
    let (admin, _) = harness.connect_direct().await;
    admin
        .batch_execute(
            "CREATE TABLE jobs (id int, kind text, payload text, state text, run_at timestamptz);
             CREATE SCHEMA reporting;
             CREATE TABLE orders (id int, customer_id int, total numeric, placed_at timestamptz);",
        )
        .await
        .expect("schema");
    harness
}

async fn show(client: &Client, name: &str) -> String {
    support::scalar(client, &format!("SHOW reprise.{name}")).await
}

/// What the server says the session's borrowable state is.
#[derive(Debug, PartialEq, Eq)]
struct Truth {
    settings: Vec<Vec<String>>,
    channels: Vec<Vec<String>>,
    prepared: Vec<Vec<String>>,
}

async fn truth(client: &Client) -> Truth {
    Truth {
        settings: rows(
            client,
            "SELECT name, current_setting(name) FROM pg_settings WHERE source = 'session' ORDER BY name",
        )
        .await,
        channels: rows(client, "SELECT * FROM pg_listening_channels() ORDER BY 1").await,
        prepared: rows(
            client,
            "SELECT name, from_sql::text FROM pg_prepared_statements ORDER BY name",
        )
        .await,
    }
}

fn code(err: &tokio_postgres::Error) -> Option<&SqlState> {
    err.code()
}

#[tokio::test]
async fn a_named_template_is_taken_and_given_back() {
    let harness = harness().await;
    let (client, _) = harness.connect().await;
    let startup_template = show(&client, "template").await;
    assert_eq!(startup_template.len(), 64, "a hex TemplateId");
    let before = truth(&client).await;

    client
        .batch_execute("SET reprise.template = 'worker'")
        .await
        .expect("switch");
    let worker = truth(&client).await;
    let setting = |name: &str| {
        worker
            .settings
            .iter()
            .find(|row| row[0] == name)
            .map(|row| row[1].clone())
    };
    assert_eq!(setting("application_name").as_deref(), Some("queue-worker"));
    assert_eq!(setting("lock_timeout").as_deref(), Some("5s"));
    assert_eq!(
        setting("idle_in_transaction_session_timeout").as_deref(),
        Some("1min")
    );
    assert_eq!(
        worker.channels,
        vec![vec!["jobs".to_owned()], vec!["jobs_cancelled".to_owned()]]
    );
    assert_eq!(
        worker.prepared,
        vec![vec!["claim_jobs".to_owned(), "false".to_owned()]]
    );
    let worker_template = show(&client, "template").await;
    assert_ne!(worker_template, startup_template);
    // The statement the template prepared is usable as the client's own.
    client
        .batch_execute("BEGIN; EXECUTE claim_jobs(10); COMMIT")
        .await
        .expect("execute the template's statement");

    // A second session borrowing the same template shares it.
    let (other, _) = harness.connect().await;
    other
        .batch_execute("SET reprise.template = 'worker'")
        .await
        .expect("switch");
    assert_eq!(
        show(&other, "template").await,
        worker_template,
        "{:?} vs {:?}",
        rows(&other, "SHOW reprise.state").await,
        rows(&client, "SHOW reprise.state").await
    );
    assert_eq!(
        show(&other, "state_hash").await,
        show(&client, "state_hash").await
    );

    client
        .batch_execute("RESET reprise.template")
        .await
        .expect("reset");
    assert_eq!(truth(&client).await, before);
    assert_eq!(show(&client, "template").await, startup_template);

    // DISCARD ALL also goes back to the startup template.
    other.batch_execute("DISCARD ALL").await.expect("discard");
    assert_eq!(truth(&other).await, before);
    assert_eq!(show(&other, "template").await, startup_template);

    // From one named template straight to another.
    client
        .batch_execute("SET reprise.template = 'worker'; ")
        .await
        .expect("switch");
    client
        .batch_execute("SET reprise.template = 'reporting'")
        .await
        .expect("switch to reporting");
    let reporting = truth(&client).await;
    assert!(reporting.channels.is_empty(), "{reporting:?}");
    assert_eq!(
        reporting.prepared,
        vec![vec!["recent_orders".to_owned(), "false".to_owned()]]
    );
    assert_eq!(
        support::scalar(&client, "SHOW default_transaction_read_only").await,
        "on"
    );
    assert_eq!(
        support::scalar(&client, "SHOW search_path").await,
        "reporting, public"
    );
}

#[tokio::test]
async fn refusals_carry_their_sqlstate_and_change_nothing() {
    let harness = harness().await;
    let (client, _) = harness.connect().await;
    let template = show(&client, "template").await;

    let err = client
        .batch_execute("SET reprise.template = 'no_such_template'")
        .await
        .expect_err("unknown template");
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_OBJECT), "{err}");

    client.batch_execute("BEGIN").await.expect("begin");
    let err = client
        .batch_execute("SET reprise.template = 'worker'")
        .await
        .expect_err("inside a transaction block");
    assert_eq!(code(&err), Some(&SqlState::ACTIVE_SQL_TRANSACTION), "{err}");
    // The transaction goes on, as after PostgreSQL's own 25001 refusals.
    assert_eq!(support::scalar(&client, "SELECT 1").await, "1");
    client.batch_execute("COMMIT").await.expect("commit");

    let err = client
        .batch_execute("SET reprise.template = 'worker'; SELECT 1")
        .await
        .expect_err("in a multi-statement string");
    assert_eq!(code(&err), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{err}");

    let err = client
        .batch_execute("SHOW reprise.no_such_thing")
        .await
        .expect_err("unknown name");
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_OBJECT), "{err}");
    let err = client
        .batch_execute("SET reprise.state_hash = 'x'")
        .await
        .expect_err("read-only name");
    assert_eq!(
        code(&err),
        Some(&SqlState::CANT_CHANGE_RUNTIME_PARAM),
        "{err}"
    );

    assert_eq!(show(&client, "template").await, template);
    assert!(truth(&client).await.channels.is_empty());
}

#[tokio::test]
async fn extended_protocol_and_pipelining() {
    let harness = harness().await;
    let (client, _) = harness.connect().await;
    // tokio-postgres prepares a named statement, describes it, binds and
    // executes it.
    let rows = client
        .query("SHOW reprise.stats", &[])
        .await
        .expect("stats over the extended protocol");
    let names: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    for counter in [
        "sessions_tracked",
        "statements_ordinary",
        "statements_unclassified",
        "boundaries",
        "safe_points",
        "templates",
    ] {
        assert!(
            names.iter().any(|name| name == counter),
            "{counter} in {names:?}"
        );
    }
    let statement = client
        .prepare("SET reprise.template = 'worker'")
        .await
        .expect("prepare a Reprise statement");
    client.execute(&statement, &[]).await.expect("switch");
    assert_eq!(
        support::scalar(&client, "SHOW lock_timeout").await,
        "5s",
        "the switch happened"
    );
    drop(statement);

    // Pipelined simple queries: each SHOW is answered after the queries
    // sent before it, with the state they left; a SET reprise.template
    // waits for what is in flight, then runs before what follows it.
    let (mut raw, _) = RawClient::login(harness.proxy).await;
    let mut pipeline = Vec::new();
    for sql in [
        "SHOW reprise.state_hash",
        "SELECT set_config('myapp.x', '1', false)",
        "SHOW reprise.state_hash",
        "RESET myapp.x",
        "SHOW reprise.state_hash",
        "SELECT pg_sleep(0.2)",
        "SET reprise.template = 'worker'",
        "SHOW lock_timeout",
    ] {
        pipeline.extend(query(sql));
    }
    raw.send(&pipeline).await;
    let mut values = Vec::new();
    for _ in 0..8 {
        let messages = raw.until_ready().await;
        assert!(messages.iter().all(|m| m.tag != b'E'), "{messages:?}");
        values.push(messages.iter().find(|m| m.tag == b'D').map(|row| {
            // One column: count (2), length (4), value.
            String::from_utf8_lossy(&row.body[6..]).into_owned()
        }));
    }
    assert_ne!(values[2], values[0], "the SET is seen by the SHOW after it");
    assert_eq!(values[4], values[0], "and the RESET by the SHOW after that");
    assert_eq!(values[7].as_deref(), Some("5s"), "the switch ran in order");

    // A raw pipeline mixing server and Reprise statements in one batch.
    let mut batch = Vec::new();
    batch.extend(parse("", "SELECT 41 + 1"));
    batch.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(frame(b'E', b"\0\0\0\0\0"));
    batch.extend(parse("", "SHOW reprise.template"));
    batch.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(frame(b'D', b"P\0"));
    batch.extend(frame(b'E', b"\0\0\0\0\0"));
    batch.extend(frame(b'S', b""));
    raw.send(&batch).await;
    let tags: Vec<u8> = raw.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12DC12TDCZ".to_vec());

    // SET reprise.template after unsynced server work in the same batch
    // is refused, and the server abandons the batch as on its own error.
    let mut batch = Vec::new();
    batch.extend(parse("", "CREATE TABLE abandoned (a int)"));
    batch.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(frame(b'E', b"\0\0\0\0\0"));
    batch.extend(parse("", "SET reprise.template = 'worker'"));
    batch.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(frame(b'E', b"\0\0\0\0\0"));
    batch.extend(parse("", "SELECT 1"));
    batch.extend(frame(b'S', b""));
    raw.send(&batch).await;
    let messages = raw.until_ready().await;
    let tags: Vec<u8> = messages.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12C12EZ".to_vec(), "{messages:?}");
    let error = messages.iter().find(|m| m.tag == b'E').expect("error");
    assert_eq!(error.sqlstate().as_deref(), Some("0A000"));
    raw.send(&query(
        "SELECT count(*) FROM pg_class WHERE relname = 'abandoned'",
    ))
    .await;
    let messages = raw.until_ready().await;
    let row = messages.iter().find(|m| m.tag == b'D').expect("row");
    assert!(
        row.body.ends_with(b"0"),
        "the implicit transaction was rolled back"
    );
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    frame(b'P', &body)
}

#[tokio::test]
async fn counters_and_unreplayable_statements() {
    let harness = harness().await;
    let (client, _) = harness.connect().await;
    let before = support::reprise_stats(&client).await;
    client
        .batch_execute("DO $$ BEGIN PERFORM 1; END $$")
        .await
        .expect("do");
    // Unclassified, then read back from the server before the SHOW.
    let state = rows(&client, "SHOW reprise.state").await;
    assert!(
        !state.iter().any(|row| row[0] == "non_recoverable"),
        "{state:?}"
    );
    client
        .batch_execute("ALTER ROLE postgres PASSWORD 'not-journaled'")
        .await
        .expect("alter role");
    client.batch_execute("DISCARD ALL").await.expect("discard");
    let after = support::reprise_stats(&client).await;
    assert!(after["statements_unclassified"] > before["statements_unclassified"]);
    assert!(after["state_probes"] > before["state_probes"]);
    assert!(after["credential_statements"] > before["credential_statements"]);
    // Three boundaries (DO, ALTER ROLE, DISCARD ALL); the DO's is not a
    // safe point, the probe after it makes one.
    assert_eq!(after["boundaries"] - before["boundaries"], 3);
    assert_eq!(after["safe_points"] - before["safe_points"], 3);
    assert!(after["templates"] >= 1);
    let state = rows(&client, "SHOW reprise.state").await;
    assert!(
        !state.iter().any(|row| row[0] == "non_recoverable"),
        "DISCARD ALL leaves nothing non-recoverable: {state:?}"
    );
}

#[tokio::test]
async fn without_tracking_reprise_statements_reach_the_server() {
    let harness = Harness::start_with(Default::default(), |config| {
        config.session_tracking = false;
    })
    .await;
    let (client, _) = harness.connect().await;
    let err = client
        .batch_execute("SHOW reprise.stats")
        .await
        .expect_err("the server does not know it");
    assert_eq!(code(&err), Some(&SqlState::UNDEFINED_OBJECT), "{err}");
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("reprise.stats"), "{message}");
}

#[tokio::test]
async fn a_bad_template_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("broken.toml"),
        "[settings]\nwork_mem = [1]\n",
    )
    .expect("write");
    let cluster = support::start_cluster(Default::default()).await;
    let config = reprise::config::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("data"),
        templates_dir: Some(dir.path().to_owned()),
        backends: vec![reprise::config::Backend {
            name: "primary".to_owned(),
            host: cluster.host().to_owned(),
            port: cluster.port(),
        }],
        ..Default::default()
    };
    let err = reprise::Proxy::bind(config)
        .await
        .expect_err("a bad template file stops the start");
    let message = err.to_string();
    assert!(message.contains("broken.toml"), "{message}");
    assert!(message.contains("work_mem"), "{message}");
}
