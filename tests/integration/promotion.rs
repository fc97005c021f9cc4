//! Failover across servers: the primary dies and a standby is promoted, an
//! old primary is passed over for the promoted standby, and two writable
//! servers are a split brain that Reprise refuses to choose from.

use std::time::Duration;

use reprise::config::Backend;
use throwaway_pg::Options;
use tokio_postgres::Client;

use crate::support::{
    eventually, reprise_stats, scalar, start_cluster, text_rows, Harness, RawClient,
};

/// Makes the primary wait for its standby at every commit, and waits until
/// the standby is synchronous.
pub async fn make_synchronous(primary: &Client) {
    for setting in [
        "synchronous_standby_names = '*'",
        "synchronous_commit = 'on'",
    ] {
        primary
            .batch_execute(&format!("alter system set {setting}"))
            .await
            .expect("synchronous replication");
    }
    scalar(primary, "select pg_reload_conf()").await;
    eventually(
        Duration::from_secs(20),
        "the standby is synchronous",
        || async {
            scalar(
                primary,
                "select count(*) from pg_stat_replication where sync_state = 'sync'",
            )
            .await
                == "1"
        },
    )
    .await;
}

/// After a promotion the new primary has no standby to wait for.
pub async fn stop_waiting_for_standbys(primary: &Client) {
    primary
        .batch_execute("alter system reset synchronous_standby_names")
        .await
        .expect("reset");
    scalar(primary, "select pg_reload_conf()").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_survives_sigkill_of_the_primary_and_a_promotion() {
    let (mut harness, standby) = Harness::start_with_standby(Options::default(), |_| {}).await;
    let (observer, _) = harness.connect_direct().await;
    make_synchronous(&observer).await;
    observer
        .batch_execute("create table moved (id int primary key)")
        .await
        .expect("table");
    let (client, _) = harness.connect().await;
    client
        .batch_execute("set application_name = 'moving'; begin; insert into moved values (1)")
        .await
        .expect("transaction");

    tokio::task::block_in_place(|| harness.cluster.kill9_postmaster()).expect("kill -9");
    // The session waits for a writable server meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| standby.promote()).expect("promote");
    let (promoted, _) = crate::support::connect(&standby.conn_str()).await;
    stop_waiting_for_standbys(&promoted).await;

    client
        .execute("insert into moved values (2)", &[])
        .await
        .expect("the transaction goes on on the promoted standby");
    client.batch_execute("commit").await.expect("commit");
    assert_eq!(
        text_rows(&promoted, "select id from moved order by id").await,
        vec![vec!["1".to_owned()], vec!["2".to_owned()]]
    );
    assert_eq!(scalar(&client, "show application_name").await, "moving");
    assert_eq!(
        scalar(&client, "select inet_server_port()").await,
        standby.port().to_string(),
        "the session is on the promoted standby"
    );
    let stats = reprise_stats(&client).await;
    assert_eq!(stats["failovers_recovered"], 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_is_passed_over_for_the_promoted_standby() {
    let (harness, standby) = Harness::start_with_standby(Options::default(), |_| {}).await;
    let (observer, _) = harness.connect_direct().await;
    let (client, _) = harness.connect().await;
    client
        .batch_execute("set work_mem = '5MB'")
        .await
        .expect("state");
    let pid = scalar(&client, "select pg_backend_pid()").await;
    // The standby is promoted while the old primary stays up on the old
    // timeline, as an old primary that came back would.
    tokio::task::block_in_place(|| standby.promote()).expect("promote");
    scalar(&observer, &format!("select pg_terminate_backend({pid})")).await;

    assert_eq!(scalar(&client, "show work_mem").await, "5MB");
    assert_eq!(
        scalar(&client, "select inet_server_port()").await,
        standby.port().to_string(),
        "the session moved to the newest timeline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writable_servers_are_a_split_brain() {
    let other = start_cluster(Options::default()).await;
    let other_backend = Backend {
        name: "other".to_owned(),
        host: other.host().to_owned(),
        port: other.port(),
    };
    let harness = Harness::start_with(Options::default(), |config| {
        config.backends.push(other_backend);
    })
    .await;
    let (observer, _) = harness.connect_direct().await;
    let (mut raw, greeting) = RawClient::login(harness.proxy).await;
    let pid = crate::support::backend_pid(&greeting);
    scalar(&observer, &format!("select pg_terminate_backend({pid})")).await;
    let error = crate::failover::ending_error(&mut raw, "select 1").await;
    assert_eq!(error.sqlstate().as_deref(), Some("08006"), "{error:?}");
    assert_eq!(
        error.field(b'D').as_deref(),
        Some("split-brain"),
        "{error:?}"
    );
    assert!(
        error
            .field(b'M')
            .is_some_and(|m| m.contains("\"other\" also claims to be writable")),
        "{error:?}"
    );
}
