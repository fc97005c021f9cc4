//! Restore plans against a real server: the plan's SQL must give a fresh
//! connection exactly the target state, hostile names and values included,
//! and a second plan must take all of it back.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use reprise::template::{
    quote_identifier, PreparedOrigin, PreparedStatement, RestorePlan, Template,
};
use tokio_postgres::Client;

use crate::support::{self, Harness};

const SEARCH_PATH: &str = "\"$user\", public, \"odd schema\"";
const APPLICATION_NAME: &str = "it's a \\ test";
const CHANNEL: &str = "my \"chan's";
const SQL_STATEMENT: &str = "p 1";
const PROTOCOL_STATEMENT: &str = "proto \"q\"";

fn b(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn target() -> Template {
    let mut t = Template::default();
    t.set_setting(b"search_path", b(SEARCH_PATH));
    t.set_setting(b"application_name", b(APPLICATION_NAME));
    t.set_setting(b"statement_timeout", b("5s"));
    t.role = Some(b("plan_role"));
    t.listening.insert(b(CHANNEL));
    t.prepared.insert(
        b(SQL_STATEMENT),
        PreparedStatement {
            origin: PreparedOrigin::Sql,
            query: b("PREPARE \"p 1\"(int) AS select $1 + 1"),
            param_types: vec![],
        },
    );
    t.prepared.insert(
        b(PROTOCOL_STATEMENT),
        PreparedStatement {
            origin: PreparedOrigin::Protocol,
            query: b("select $1 || 'x'"),
            param_types: vec![25],
        },
    );
    t
}

/// Runs a plan: its SQL batch, then each Parse step as the equivalent
/// PREPARE (tokio-postgres cannot send a Parse with a chosen name), which
/// still checks that the name survives quoting.
async fn apply(client: &Client, plan: &RestorePlan) {
    let batch = plan.sql_batch();
    let batch = std::str::from_utf8(&batch).expect("utf-8 batch");
    if !batch.is_empty() {
        client
            .simple_query(batch)
            .await
            .unwrap_or_else(|err| panic!("batch {batch:?}: {err}"));
    }
    for step in plan.parse_steps() {
        let (name, query, param_types) = (step.name, step.query, step.param_types);
        let types: Vec<&str> = param_types
            .iter()
            .map(|oid| match oid {
                25 => "text",
                23 => "int4",
                other => panic!("no test mapping for type {other}"),
            })
            .collect();
        let sql = format!(
            "PREPARE {}({}) AS {}",
            std::str::from_utf8(&quote_identifier(name).expect("quote")).expect("utf-8"),
            types.join(", "),
            std::str::from_utf8(query).expect("utf-8"),
        );
        client
            .simple_query(&sql)
            .await
            .unwrap_or_else(|err| panic!("{sql:?}: {err}"));
    }
}

/// Rows of a simple query as column-0/column-1 strings.
async fn rows(client: &Client, sql: &str) -> Vec<(String, String)> {
    support::text_rows(client, sql)
        .await
        .into_iter()
        .map(|row| {
            let mut columns = row.into_iter();
            let first = columns.next().unwrap_or_default();
            (first, columns.next().unwrap_or_default())
        })
        .collect()
}

/// GUCs the session itself set, without the role fields.
async fn session_settings(client: &Client) -> BTreeMap<String, String> {
    rows(
        client,
        "select name, setting from pg_settings where source = 'session' \
         and name not in ('role', 'session_authorization')",
    )
    .await
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_gives_a_fresh_connection_the_target_state_and_takes_it_back() {
    let harness = Harness::start().await;
    let (admin, _admin_messages) = harness.connect_direct().await;
    admin
        .batch_execute("create role plan_role; grant plan_role to session_user")
        .await
        .expect("create role");

    let (client, _messages) = harness.connect_direct().await;
    let target = target();
    let forward = RestorePlan::between(&Template::default(), &target).expect("plan");
    apply(&client, &forward).await;

    let settings = session_settings(&client).await;
    assert_eq!(
        settings,
        BTreeMap::from([
            ("application_name".to_owned(), APPLICATION_NAME.to_owned()),
            ("search_path".to_owned(), SEARCH_PATH.to_owned()),
            // pg_settings shows milliseconds.
            ("statement_timeout".to_owned(), "5000".to_owned()),
        ])
    );
    let users = rows(&client, "select current_user::text, session_user::text").await;
    assert_eq!(users[0].0, "plan_role");
    let login_user = users[0].1.clone();

    let prepared: BTreeMap<String, String> = rows(
        &client,
        "select name, statement from pg_prepared_statements",
    )
    .await
    .into_iter()
    .collect();
    assert_eq!(
        prepared.keys().map(String::as_str).collect::<Vec<_>>(),
        [SQL_STATEMENT, PROTOCOL_STATEMENT]
    );
    assert!(prepared[SQL_STATEMENT].contains("select $1 + 1"));
    assert!(prepared[PROTOCOL_STATEMENT].contains("select $1 || 'x'"));
    let result = rows(&client, "execute \"p 1\"(41)").await;
    assert_eq!(result[0].0, "42");

    let channels: BTreeSet<String> = rows(&client, "select pg_listening_channels(), ''")
        .await
        .into_iter()
        .map(|(channel, _)| channel)
        .collect();
    assert_eq!(channels, BTreeSet::from([CHANNEL.to_owned()]));

    // Back to a bare connection.
    let back = RestorePlan::between(&target, &Template::default()).expect("plan back");
    apply(&client, &back).await;
    assert_eq!(session_settings(&client).await, BTreeMap::new());
    let users = rows(&client, "select current_user::text, session_user::text").await;
    assert_eq!(users[0], (login_user.clone(), login_user));
    assert_eq!(
        rows(
            &client,
            "select name, statement from pg_prepared_statements"
        )
        .await,
        []
    );
    assert_eq!(
        rows(&client, "select pg_listening_channels(), ''").await,
        []
    );
}
