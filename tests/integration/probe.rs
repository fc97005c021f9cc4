//! Reading a session's state back from the server: state that statement
//! text does not show (server-side code, bound values, the last temporary
//! table or advisory lock going away) is learnt at the next idle boundary,
//! without the client seeing anything of it.

use tokio_postgres::Client;

use crate::support::{self, query, state_row, text_rows, Harness, RawClient};

/// `SHOW reprise.state` rows of one kind, as (name, value).
async fn state(client: &Client, kind: &str) -> Vec<(String, String)> {
    text_rows(client, "SHOW reprise.state")
        .await
        .into_iter()
        .filter(|row| row[0] == kind)
        .map(|row| (row[1].clone(), row[2].clone()))
        .collect()
}

async fn non_recoverable(client: &Client) -> Vec<String> {
    state(client, "non_recoverable")
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

async fn template(client: &Client) -> String {
    support::scalar(client, "SHOW reprise.template").await
}

#[tokio::test]
async fn settings_changed_by_server_code_and_bound_values_are_read_back() {
    let harness = Harness::start().await;
    let (client, _) = harness.connect().await;
    let before = support::reprise_stats(&client).await;
    client
        .batch_execute("DO $$ BEGIN PERFORM set_config('work_mem', '7MB', false); END $$")
        .await
        .expect("do");
    client
        .query(
            "SELECT set_config('app.tenant', $1, false)",
            &[&"tenant 42"],
        )
        .await
        .expect("set_config with a bound value");
    let settings = state(&client, "setting").await;
    assert!(
        settings.contains(&("work_mem".into(), "7MB".into())),
        "{settings:?}"
    );
    assert!(
        settings.contains(&("app.tenant".into(), "tenant 42".into())),
        "{settings:?}"
    );
    assert_eq!(non_recoverable(&client).await, Vec::<String>::new());
    let after = support::reprise_stats(&client).await;
    assert!(after["state_probes"] >= before["state_probes"] + 2);
    assert_eq!(
        after["state_probe_failures"],
        before["state_probe_failures"]
    );

    // The same state reached by plain statements is the same template.
    let (plain, _) = harness.connect().await;
    plain
        .batch_execute("SET work_mem = '7MB'; SET app.tenant = 'tenant 42'")
        .await
        .expect("set");
    assert_eq!(template(&client).await, template(&plain).await);

    // A later change by bound value to a setting the tracker knows is
    // read back too.
    client
        .query("SELECT set_config('app.tenant', $1, false)", &[&"7"])
        .await
        .expect("set_config again");
    assert_eq!(
        support::scalar(&client, "SELECT current_setting('app.tenant')").await,
        "7"
    );
    assert!(state(&client, "setting")
        .await
        .contains(&("app.tenant".into(), "7".into())));
}

#[tokio::test]
async fn the_last_temporary_table_and_advisory_lock_bring_safe_points_back() {
    let harness = Harness::start().await;
    let (client, _) = harness.connect().await;
    client
        .batch_execute("CREATE TEMP TABLE scratch (id int); CREATE TEMP TABLE other (id int)")
        .await
        .expect("temp tables");
    assert_eq!(non_recoverable(&client).await, ["TempObjects"]);
    client
        .batch_execute("DROP TABLE scratch")
        .await
        .expect("drop");
    assert_eq!(non_recoverable(&client).await, ["TempObjects"]);
    client
        .batch_execute("DROP TABLE other")
        .await
        .expect("drop");
    assert_eq!(non_recoverable(&client).await, Vec::<String>::new());

    client
        .batch_execute("SELECT pg_advisory_lock(7); SELECT pg_advisory_lock(7)")
        .await
        .expect("lock twice");
    client
        .batch_execute("SELECT pg_advisory_unlock(7)")
        .await
        .expect("unlock");
    assert_eq!(non_recoverable(&client).await, ["AdvisoryLocks"]);
    client
        .batch_execute("SELECT pg_advisory_unlock(7)")
        .await
        .expect("unlock");
    assert_eq!(non_recoverable(&client).await, Vec::<String>::new());
}

#[tokio::test]
async fn statements_prepared_by_server_code_join_the_template() {
    let harness = Harness::start().await;
    let (client, _) = harness.connect().await;
    client
        .batch_execute(
            "DO $$ BEGIN EXECUTE 'PREPARE next_id(int) AS SELECT $1 + 1'; \
             EXECUTE 'LISTEN jobs'; END $$",
        )
        .await
        .expect("do");
    assert_eq!(
        state(&client, "prepared_sql").await,
        [(
            "next_id".to_owned(),
            "PREPARE next_id(int) AS SELECT $1 + 1".to_owned()
        )]
    );
    assert_eq!(state(&client, "listen").await, [("jobs".into(), "".into())]);
    assert_eq!(non_recoverable(&client).await, Vec::<String>::new());
    // The tracker knows what EXECUTE of it does.
    assert_eq!(support::scalar(&client, "EXECUTE next_id(41)").await, "42");
    assert_eq!(non_recoverable(&client).await, Vec::<String>::new());

    let (plain, _) = harness.connect().await;
    plain
        .batch_execute("PREPARE next_id(int) AS SELECT $1 + 1; LISTEN jobs")
        .await
        .expect("prepare");
    assert_eq!(template(&client).await, template(&plain).await);
}

#[tokio::test]
async fn pipelined_requests_wait_for_the_probe_and_see_nothing_of_it() {
    let harness = Harness::start().await;
    let (mut raw, _) = RawClient::login(harness.proxy).await;
    let mut pipeline = query("DO $$ BEGIN PERFORM set_config('work_mem', '3MB', false); END $$");
    pipeline.extend(query("SHOW work_mem"));
    pipeline.extend(query("SHOW reprise.state"));
    raw.send(&pipeline).await;

    let first = raw.until_ready().await;
    let tags: Vec<u8> = first.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"CZ".to_vec());

    let second = raw.until_ready().await;
    let tags: Vec<u8> = second.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"TDCZ".to_vec());
    assert_eq!(support::data_rows(&second), [[Some("3MB".to_owned())]]);

    // Answered in its place, before the pipeline ran dry: the probe had
    // not run yet.
    let third = raw.until_ready().await;
    assert!(
        support::data_rows(&third).contains(&vec![
            Some("non_recoverable".to_owned()),
            Some("Unclassified".to_owned()),
            Some(String::new())
        ]),
        "{third:?}"
    );
    let state = raw.reprise_state().await;
    assert!(
        state.contains(&state_row("setting", "work_mem", "3MB")),
        "{state:?}"
    );
    assert!(
        !state.iter().any(|row| row.0 == "non_recoverable"),
        "{state:?}"
    );

    // A probe after an extended batch leaves the client's unnamed
    // statement alone.
    let mut batch = support::parse_message("", "SELECT set_config('app.x', $1, false)", &[]);
    batch.extend(support::bind_message("", "", &["1"]));
    batch.extend(support::execute_message("", 0));
    batch.extend(support::sync_message());
    raw.send(&batch).await;
    let tags: Vec<u8> = raw.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12DCZ".to_vec());
    let mut again = support::bind_message("", "", &["2"]);
    again.extend(support::execute_message("", 0));
    again.extend(support::sync_message());
    raw.send(&again).await;
    let messages = raw.until_ready().await;
    let tags: Vec<u8> = messages.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"2DCZ".to_vec());
    assert_eq!(support::data_rows(&messages), [[Some("2".to_owned())]]);
    let state = raw.reprise_state().await;
    assert!(
        state.contains(&state_row("setting", "app.x", "2")),
        "{state:?}"
    );
}

#[tokio::test]
async fn a_refused_probe_turns_probing_off_and_loses_nothing() {
    let harness = Harness::start().await;
    let (admin, _) = harness.connect_direct().await;
    admin
        .batch_execute("CREATE ROLE app LOGIN; REVOKE SELECT ON pg_catalog.pg_settings FROM PUBLIC")
        .await
        .expect("setup");
    let conn_str = harness
        .proxy_conn_str()
        .replace("user=postgres", "user=app");
    let (client, _) = support::connect(&conn_str).await;
    let before = support::reprise_stats(&client).await;
    client
        .batch_execute("DO $$ BEGIN PERFORM 1; END $$")
        .await
        .expect("the client sees no error");
    assert_eq!(support::scalar(&client, "SELECT 1 + 1").await, "2");
    assert_eq!(non_recoverable(&client).await, ["Unclassified"]);
    let after = support::reprise_stats(&client).await;
    assert_eq!(after["state_probes"], before["state_probes"] + 1);
    assert_eq!(
        after["state_probe_failures"],
        before["state_probe_failures"] + 1
    );

    // No second try in this session; DISCARD ALL still clears.
    client
        .batch_execute("DO $$ BEGIN PERFORM 2; END $$")
        .await
        .expect("do");
    assert_eq!(
        support::reprise_stats(&client).await["state_probes"],
        after["state_probes"]
    );
    client.batch_execute("DISCARD ALL").await.expect("discard");
    assert_eq!(non_recoverable(&client).await, Vec::<String>::new());
}
