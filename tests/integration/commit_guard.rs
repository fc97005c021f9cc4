//! The commit guard: a COMMIT whose answer was lost in a crash restart,
//! where the transaction id alone proves nothing (the new server life may
//! have handed the same id out again), is settled by the token row the
//! transaction inserted just before its COMMIT.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::support::{eventually, reprise_stats, scalar, Harness};

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
    observer
        .batch_execute("alter system set synchronous_standby_names = 'nobody'")
        .await
        .expect("synchronous standby");
    scalar(&observer, "select pg_reload_conf()").await;
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
