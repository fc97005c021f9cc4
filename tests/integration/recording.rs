//! What sessions write to the journal: commands since the last safe point,
//! safe points, templates; never a credential; bounded replay logs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use reprise::journal::recovery::{self, Mode};
use reprise::journal::{Omitted, Record, Retain};
use reprise::template::Template;
use tokio_postgres::SimpleQueryMessage;

use crate::support::{reprise_stats, Harness};

/// Every record in the journal under `data_dir`, in order.
fn journal_records(data_dir: &Path) -> Vec<Record> {
    let mut records = Vec::new();
    recovery::scan(
        &data_dir.join("journal"),
        Mode::ReadOnly,
        true,
        |scanned| records.push(scanned.record.clone()),
        |_| {},
    )
    .expect("journal reads");
    records
}

/// Per session with unfinished work: its id and the SQL of its commands
/// since its last safe point.
fn unfinished(journal_dir: &Path) -> Vec<(u64, Vec<String>)> {
    let recovered =
        recovery::scan(journal_dir, Mode::ReadOnly, false, |_| {}, |_| {}).expect("recovery");
    recovered
        .unfinished()
        .map(|session| {
            let texts = session
                .commands
                .iter()
                .filter_map(|c| query_text(&c.record))
                .collect();
            (session.session, texts)
        })
        .collect()
}

/// The records of one session.
fn session_records(records: &[Record], session: u64) -> Vec<Record> {
    records
        .iter()
        .filter(|record| record.session() == Some(session))
        .cloned()
        .collect()
}

/// Sessions by id, from their start records, in start order.
fn sessions(records: &[Record]) -> Vec<u64> {
    records
        .iter()
        .filter_map(|record| match record {
            Record::SessionStart { session, .. } => Some(*session),
            _ => None,
        })
        .collect()
}

/// The SQL of a command that holds one simple Query.
fn query_text(record: &Record) -> Option<String> {
    match record {
        Record::Command { messages, .. } if messages.first() == Some(&b'Q') => {
            let body = &messages[5..messages.len() - 1];
            Some(String::from_utf8_lossy(body).into_owned())
        }
        _ => None,
    }
}

/// Message tags of a command, in order.
fn tags(record: &Record) -> Vec<char> {
    let Record::Command { messages, .. } = record else {
        return Vec::new();
    };
    let mut tags = Vec::new();
    let mut rest = &messages[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        tags.push(char::from(rest[0]));
        rest = &rest[1 + len..];
    }
    tags
}

async fn state(client: &tokio_postgres::Client) -> BTreeMap<(String, String), String> {
    let mut rows = BTreeMap::new();
    for message in client
        .simple_query("SHOW reprise.state")
        .await
        .expect("show state")
    {
        if let SimpleQueryMessage::Row(row) = message {
            rows.insert(
                (
                    row.get(0).unwrap_or_default().to_owned(),
                    row.get(1).unwrap_or_default().to_owned(),
                ),
                row.get(2).unwrap_or_default().to_owned(),
            );
        }
    }
    rows
}

/// A proxy whose journal syncs every record before the session goes on:
/// each record is written in a write cycle of its own, so that the
/// journal shows every command, none superseded by a later safe point in
/// the same cycle.
async fn harness_writing_every_record(tweak: impl FnOnce(&mut reprise::Config)) -> Harness {
    Harness::start_with(Default::default(), |config| {
        config.journal.fsync = reprise::journal::FsyncPolicy::Always;
        tweak(config);
    })
    .await
}

/// Records reach the disk within the writer's interval.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn the_journal_holds_what_replay_needs_and_nothing_more() {
    let mut harness = harness_writing_every_record(|_| {}).await;
    let (direct, _) = harness.connect_direct().await;
    direct
        .batch_execute("CREATE TABLE journaled (id int, v text)")
        .await
        .expect("create");
    let (client, _) = harness.connect().await;
    for _ in 0..20 {
        client.simple_query("SELECT 1").await.expect("select");
    }
    client
        .simple_query("SET application_name = 'journaled'")
        .await
        .expect("set");
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO journaled VALUES (1, 'a')")
        .await
        .expect("insert");
    client
        .simple_query("UPDATE journaled SET v = 'b'")
        .await
        .expect("update");
    let in_transaction = state(&client).await;
    assert_eq!(
        in_transaction.get(&("replay_log".into(), "commands".into())),
        Some(&"3".to_owned()),
        "{in_transaction:?}"
    );
    client.simple_query("COMMIT").await.expect("commit");
    let after = state(&client).await;
    assert_eq!(
        after.get(&("replay_log".into(), "commands".into())),
        Some(&"0".to_owned())
    );

    // A second session leaves its transaction open.
    let (open, _) = harness.connect().await;
    open.simple_query("BEGIN").await.expect("begin");
    open.simple_query("INSERT INTO journaled VALUES (2, 'open')")
        .await
        .expect("insert");
    settle().await;

    let records = journal_records(harness.data_dir());
    let ids = sessions(&records);
    assert_eq!(ids.len(), 2, "{records:#?}");
    let first = session_records(&records, ids[0]);
    // Start, the safe point after SET (a new template), three commands of
    // the transaction, the safe point after COMMIT; no SELECT, no COMMIT.
    let kinds: Vec<&str> = first.iter().map(|r| r.kind().name()).collect();
    assert_eq!(
        kinds,
        [
            "session_start",
            "safe_point",
            "command",
            "command",
            "command",
            "safe_point"
        ],
        "{first:#?}"
    );
    let texts: Vec<String> = first.iter().filter_map(query_text).collect();
    assert_eq!(
        texts,
        [
            "BEGIN",
            "INSERT INTO journaled VALUES (1, 'a')",
            "UPDATE journaled SET v = 'b'"
        ]
    );
    let Record::SafePoint { template, .. } = &first[1] else {
        panic!("safe point expected");
    };
    let definition = records
        .iter()
        .find_map(|record| match record {
            Record::Template { id, encoding, .. } if id == template => Some(encoding.clone()),
            _ => None,
        })
        .expect("template defined before use");
    let decoded = Template::decode(&definition).expect("template decodes");
    assert_eq!(decoded.id(), *template);
    assert_eq!(
        decoded
            .settings
            .get(&b"application_name"[..])
            .map(|v| &v[..]),
        Some(&b"journaled"[..])
    );
    // Each command's state hash is the one the session reported then.
    let hashes: Vec<_> = first
        .iter()
        .filter_map(|record| match record {
            Record::Command { state_hash, .. } => Some(*state_hash),
            _ => None,
        })
        .collect();
    assert_eq!(hashes.len(), 3);
    // Inside the transaction nothing but the status changed.
    assert!(hashes.iter().all(|hash| *hash == hashes[0]));
    let Record::SafePoint { state_hash, .. } = &first[5] else {
        panic!("safe point expected");
    };
    assert_ne!(*state_hash, hashes[0]);

    assert_eq!(
        unfinished(&harness.data_dir().join("journal")),
        [(
            ids[1],
            vec![
                "BEGIN".to_owned(),
                "INSERT INTO journaled VALUES (2, 'open')".to_owned()
            ]
        )]
    );

    let journal_dir = harness.data_dir().join("journal");
    let mode = std::fs::metadata(&journal_dir)
        .expect("dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    for entry in std::fs::read_dir(&journal_dir).expect("list") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            let mode = entry.metadata().expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{:?}", entry.path());
        }
    }

    drop(open);
    drop(client);
    harness.shutdown().await;
    let recovered =
        recovery::scan(&journal_dir, Mode::ReadOnly, false, |_| {}, |_| {}).expect("recovery");
    assert!(recovered.sessions.is_empty(), "{:?}", recovered.sessions);
    assert!(unfinished(&journal_dir).is_empty());
}

#[tokio::test]
async fn credentials_never_reach_the_journal() {
    let harness = harness_writing_every_record(|_| {}).await;
    let (client, _) = harness.connect().await;
    client
        .batch_execute("BEGIN; CREATE ROLE journal_secret_role")
        .await
        .expect("begin");
    client
        .simple_query("ALTER ROLE journal_secret_role PASSWORD 'sekrit-pw-9731'")
        .await
        .expect("alter role");
    let statement = client
        .prepare("ALTER ROLE journal_secret_role PASSWORD 'prepared-pw-5526'")
        .await
        .expect("prepare");
    client.execute(&statement, &[]).await.expect("execute");
    client.simple_query("ROLLBACK").await.expect("rollback");
    settle().await;

    let mut files = vec![harness.data_dir().to_owned()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("list") {
                files.push(entry.expect("entry").path());
            }
        } else {
            let bytes = std::fs::read(&path).expect("read");
            for secret in [&b"sekrit-pw-9731"[..], b"prepared-pw-5526"] {
                assert!(
                    memchr::memmem::find(&bytes, secret).is_none(),
                    "{path:?} holds a password"
                );
            }
        }
    }
    let records = journal_records(harness.data_dir());
    let omitted: Vec<u64> = records
        .iter()
        .filter_map(|record| match record {
            Record::Command {
                omitted: Omitted::Credential,
                message_len,
                messages,
                ..
            } => {
                assert!(messages.is_empty());
                Some(*message_len)
            }
            _ => None,
        })
        .collect();
    assert_eq!(omitted.len(), 2, "{records:#?}");
    assert!(omitted.iter().all(|len| *len > 40));
}

#[tokio::test]
async fn a_replay_log_past_its_bound_is_marked_until_the_next_safe_point() {
    let harness = harness_writing_every_record(|config| {
        config.max_replay_log = reprise::config::HumanSize(4096);
    })
    .await;
    let (client, _) = harness.connect().await;
    client.simple_query("BEGIN").await.expect("begin");
    let big = format!("SELECT '{}'", "x".repeat(8000));
    client.simple_query(&big).await.expect("big");
    client.simple_query("SELECT 2").await.expect("small");
    let during = state(&client).await;
    assert!(during.contains_key(&("replay_log".into(), "over_bound".into())));
    assert_eq!(
        during.get(&("replay_log".into(), "bytes".into())),
        Some(&"0".to_owned())
    );
    assert_eq!(reprise_stats(&client).await["replay_log_overflows"], 1);
    client.simple_query("COMMIT").await.expect("commit");
    let after = state(&client).await;
    assert!(!after.contains_key(&("replay_log".into(), "over_bound".into())));
    client.simple_query("BEGIN").await.expect("begin");
    client.simple_query("SELECT 3").await.expect("select");
    let again = state(&client).await;
    assert!(!again.contains_key(&("replay_log".into(), "over_bound".into())));
    client.simple_query("COMMIT").await.expect("commit");
    settle().await;

    let records = journal_records(harness.data_dir());
    let commands: Vec<(Omitted, Option<String>)> = records
        .iter()
        .filter_map(|record| match record {
            Record::Command { omitted, .. } => Some((*omitted, query_text(record))),
            _ => None,
        })
        .collect();
    assert_eq!(
        commands,
        [
            // Written before the bound was passed.
            (Omitted::No, Some("BEGIN".into())),
            (Omitted::OverBound, None),
            (Omitted::OverBound, None),
            (Omitted::No, Some("BEGIN".into())),
            (Omitted::No, Some("SELECT 3".into())),
        ]
    );
}

#[tokio::test]
async fn copy_data_and_extended_batches_are_whole_commands() {
    let harness = harness_writing_every_record(|_| {}).await;
    let (direct, _) = harness.connect_direct().await;
    direct
        .batch_execute("CREATE TABLE copied (id int, v text)")
        .await
        .expect("create");
    let (client, _) = harness.connect().await;
    client.simple_query("BEGIN").await.expect("begin");
    let sink = client
        .copy_in("COPY copied FROM STDIN")
        .await
        .expect("copy in");
    let data = bytes::Bytes::from_static(b"1\tone\n2\ttwo\n");
    futures_util::pin_mut!(sink);
    futures_util::SinkExt::send(&mut sink, data)
        .await
        .expect("send");
    let copied = sink.finish().await.expect("finish");
    assert_eq!(copied, 2);
    let select = client
        .prepare("SELECT v FROM copied WHERE id = $1")
        .await
        .expect("prepare");
    let row = client.query_one(&select, &[&2i32]).await.expect("query");
    assert_eq!(row.get::<_, String>(0), "two");
    client.simple_query("COMMIT").await.expect("commit");
    settle().await;

    let records = journal_records(harness.data_dir());
    let commands: Vec<Vec<char>> = records
        .iter()
        .filter(|record| matches!(record, Record::Command { .. }))
        .map(tags)
        .collect();
    assert_eq!(
        commands,
        [
            vec!['Q'],
            // COPY: prepared, then Bind, Execute and the Sync the server
            // ignores in copy mode, the data, CopyDone and the Sync that
            // ends the request; then the statement is closed.
            vec!['P', 'D', 'S'],
            vec!['B', 'E', 'S', 'd', 'c', 'S'],
            vec!['C', 'S'],
            vec!['P', 'D', 'S'],
            vec!['B', 'E', 'S'],
        ],
        "{records:#?}"
    );
}

#[tokio::test]
async fn a_transaction_over_within_one_write_cycle_costs_nothing_on_disk() {
    let harness = Harness::start_with(Default::default(), |config| {
        config.journal.fsync_interval = reprise::config::HumanDuration(Duration::from_millis(500));
    })
    .await;
    let (client, _) = harness.connect().await;
    // Let the session's start reach the disk in a cycle of its own.
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.simple_query("BEGIN").await.expect("begin");
    client.simple_query("SELECT 1").await.expect("select");
    client.simple_query("COMMIT").await.expect("commit");
    // A second transaction stays open across the cycle: its commands are
    // written.
    client.simple_query("BEGIN").await.expect("begin");
    client.simple_query("SELECT 2").await.expect("select");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let texts: Vec<String> = journal_records(harness.data_dir())
        .iter()
        .filter_map(query_text)
        .collect();
    assert!(!texts.contains(&"SELECT 1".to_owned()), "{texts:?}");
    assert_eq!(&texts[texts.len() - 2..], ["BEGIN", "SELECT 2"]);
    assert!(reprise_stats(&client).await["journal_records_superseded"] >= 2);
}

#[tokio::test]
async fn retain_all_keeps_every_command() {
    let harness = Harness::start_with(Default::default(), |config| {
        config.journal.retain = Retain::All;
    })
    .await;
    let (client, _) = harness.connect().await;
    for n in 0..5 {
        client
            .simple_query(&format!("SELECT {n}"))
            .await
            .expect("select");
    }
    settle().await;
    let records = journal_records(harness.data_dir());
    let texts: Vec<String> = records.iter().filter_map(query_text).collect();
    assert_eq!(
        texts,
        ["SELECT 0", "SELECT 1", "SELECT 2", "SELECT 3", "SELECT 4"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_reports_unfinished_sessions_when_it_starts_again() {
    use std::io::BufRead;

    let cluster = crate::support::start_cluster(throwaway_pg::Options::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = throwaway_pg::lease_port().expect("port");
    let config = crate::lifecycle::write_config(dir.path(), port.port(), cluster.port(), "");
    let mut first = crate::lifecycle::serve(&config);
    crate::lifecycle::wait_for_port(port.port()).await;
    let conn_str = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        port.port()
    );
    let (client, _) = crate::support::connect(&conn_str).await;
    client
        .batch_execute("CREATE TABLE crash_victim (id int)")
        .await
        .expect("create");
    client.simple_query("BEGIN").await.expect("begin");
    client
        .simple_query("INSERT INTO crash_victim VALUES (1)")
        .await
        .expect("insert");
    let (idle, _) = crate::support::connect(&conn_str).await;
    idle.simple_query("SELECT 1").await.expect("select");
    settle().await;
    first.0.kill().expect("SIGKILL");
    first.0.wait().expect("reap");
    drop(client);
    drop(idle);

    let mut second = crate::lifecycle::serve(&config);
    let stderr = second.0.stderr.take().expect("stderr");
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.expect("line");
            let done = line.contains("journal recovered");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    })
    .await
    .expect("join");
    let report: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("session had unfinished work"))
        .collect();
    assert_eq!(report.len(), 1, "{lines:#?}");
    assert!(report[0].contains("commands=2"), "{}", report[0]);
    let summary = lines.last().expect("summary");
    assert!(
        summary.contains("open_sessions=2") && summary.contains("unfinished=1"),
        "{summary}"
    );
    drop(second);

    let unfinished = unfinished(&dir.path().join("data/journal"));
    assert_eq!(unfinished.len(), 1, "{unfinished:?}");
    assert_eq!(
        unfinished[0].1,
        ["BEGIN", "INSERT INTO crash_victim VALUES (1)"]
    );
}
