//! The replay tests: every scenario in `replay-tests/` runs once without a
//! fault to record what the client receives, then again with the server
//! connection cut at each message boundary (sampled on long answers). A
//! cut must be invisible: the same transcript, byte for byte; or, where
//! the scenario declares that replay cannot be proven at that point, the
//! declared error and a closed connection.
//!
//! The cut is made by the `fault-injection` hook: the proxy shuts the
//! server socket after the given number of messages forwarded to the
//! client, and forgets whatever the server sent after it.

mod scenario;
#[allow(dead_code)]
#[path = "../integration/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use scenario::{Point, Scenario};
use support::{Harness, Message, RawClient};
use tokio_postgres::NoTls;

/// Scenarios run side by side.
const PARALLEL: usize = 3;
/// Boundaries tried inside one step's answer when it is long: the first
/// and last few, and this many evenly between.
const SAMPLED_BETWEEN: usize = 4;
const EDGE: usize = 3;
/// Longest a run may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// What the client received, each message with the step it answered.
type Transcript = Vec<(usize, Message)>;

/// A message as compared: step, tag, body.
type Compared = (usize, u8, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_survives_a_cut_at_every_boundary() {
    let harness = Arc::new(
        Harness::start_with(Default::default(), |config| {
            config.failover_budget = reprise::config::HumanDuration(Duration::from_secs(10));
        })
        .await,
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("replay-tests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("replay-tests/ exists")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "scenario"))
        .collect();
    files.sort();
    // REPLAY_ONLY=substring runs the matching scenarios alone.
    let only = std::env::var("REPLAY_ONLY").ok();
    if let Some(only) = &only {
        files.retain(|path| path.to_string_lossy().contains(only.as_str()));
    }
    assert!(
        only.is_some() || files.len() >= 40,
        "replay-tests/ holds {} scenarios; at least 40 are expected",
        files.len()
    );
    let scenarios: Vec<Scenario> = files
        .iter()
        .map(|path| {
            let name = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(path).expect("scenario readable");
            scenario::parse(&name, &text).unwrap_or_else(|err| panic!("{name}: {err}"))
        })
        .collect();

    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = Vec::new();
    for (index, scenario) in scenarios.into_iter().enumerate() {
        let harness = Arc::clone(&harness);
        let limit = Arc::clone(&limit);
        tasks.push(tokio::spawn(async move {
            let _slot = limit.acquire_owned().await.expect("semaphore");
            let database = format!("replay_{index}");
            run_scenario(&harness, &scenario, &database).await
        }));
    }
    let mut failures = Vec::new();
    let mut cuts = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(report)) => {
                cuts += report.cuts;
                refused += report.refused;
            }
            Ok(Err(failure)) => failures.push(failure),
            Err(panic) => failures.push(format!("a scenario panicked: {panic}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} scenarios failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    // Every cut was a real failover, and exactly the declared ones failed.
    let (client, connection) = tokio_postgres::connect(&harness.proxy_conn_str(), NoTls)
        .await
        .expect("connect for stats");
    tokio::spawn(connection);
    let stats = support::reprise_stats(&client).await;
    assert_eq!(stats["failovers"], cuts, "one failover per cut");
    assert_eq!(
        stats["failovers_failed"], refused,
        "failed failovers are the declared errors"
    );
    assert_eq!(stats["failovers_recovered"], cuts - refused);
}

struct Report {
    cuts: u64,
    refused: u64,
}

async fn run_scenario(
    harness: &Harness,
    scenario: &Scenario,
    database: &str,
) -> Result<Report, String> {
    let name = &scenario.name;
    let admin = direct(harness, "postgres").await;
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .map_err(|err| format!("{name}: CREATE DATABASE: {err}"))?;
    let schema = direct(harness, database).await;
    for statement in &scenario.schema {
        schema
            .batch_execute(statement)
            .await
            .map_err(|err| format!("{name}: schema {statement:?}: {err}"))?;
    }
    drop(schema);

    let reference = run(harness, scenario, database, None).await?;
    if let Some((_, last)) = reference.last() {
        if last.tag != b'Z' {
            return Err(format!(
                "{name}: the run without a fault did not end at ReadyForQuery"
            ));
        }
    }
    let lengths = step_lengths(scenario, &reference);
    let mut cuts = 0;
    let mut refused = 0;
    let mut problems = Vec::new();
    for (before, point) in boundaries(&lengths) {
        let got = run(harness, scenario, database, Some(before)).await?;
        cuts += 1;
        let verdict = match scenario.expected_error(point) {
            Some(expected) => {
                refused += 1;
                check_error(scenario, &reference[..before], &got, expected)
            }
            None => check_same(scenario, &reference, &got),
        };
        if let Err(problem) = verdict {
            problems.push(format!(
                "  cut at {point} (after {before} messages): {problem}"
            ));
        }
    }
    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await
        .map_err(|err| format!("{name}: DROP DATABASE: {err}"))?;
    if problems.is_empty() {
        Ok(Report { cuts, refused })
    } else {
        let steps: Vec<String> = scenario
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| {
                format!("  step {} (line {}): {}", index + 1, step.line, step.label)
            })
            .collect();
        Err(format!(
            "{name}: {} of {cuts} cuts went wrong\n{}\nsteps:\n{}",
            problems.len(),
            problems.join("\n"),
            steps.join("\n")
        ))
    }
}

async fn direct(harness: &Harness, database: &str) -> tokio_postgres::Client {
    let conn_str = format!(
        "host={} port={} user=postgres dbname={database}",
        harness.cluster.host(),
        harness.cluster.port()
    );
    let (client, mut connection) = tokio_postgres::connect(&conn_str, NoTls)
        .await
        .expect("direct connection");
    tokio::spawn(async move {
        // Notices of the setup are of no interest.
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(_)) = messages.next().await {}
    });
    client
}

/// Resets the scenario's database and runs its steps through the proxy,
/// cut after `cut_after` messages when given.
async fn run(
    harness: &Harness,
    scenario: &Scenario,
    database: &str,
    cut_after: Option<usize>,
) -> Result<Transcript, String> {
    let name = &scenario.name;
    let setup = direct(harness, database).await;
    // What a cut left running in the old server process is gone first.
    setup
        .batch_execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await
        .map_err(|err| format!("{name}: clearing old sessions: {err}"))?;
    for statement in &scenario.setup {
        setup
            .batch_execute(statement)
            .await
            .map_err(|err| format!("{name}: setup {statement:?}: {err}"))?;
    }
    drop(setup);

    let cut = cut_after.map(|count| count.to_string());
    let mut params = vec![("user", "postgres"), ("database", database)];
    if let Some(cut) = &cut {
        params.push(("reprise.fault_after", cut));
    }
    let session = async {
        let (mut client, greeting) = RawClient::login_with(harness.proxy, &params).await;
        let own_pid = support::backend_pid(&greeting);
        let mut transcript = Transcript::new();
        'steps: for (index, step) in scenario.steps.iter().enumerate() {
            client.send_lenient(&step.send).await;
            let mut readies = 0;
            while readies < step.readies {
                let Some(message) = client.message().await else {
                    break 'steps;
                };
                if message.tag == b'Z' {
                    readies += 1;
                }
                transcript.push((index + 1, own_notification(message, own_pid)));
            }
        }
        client.send_lenient(&support::frame(b'X', b"")).await;
        // The session is over before the next run clears the database.
        while let Some(message) = client.message().await {
            transcript.push((scenario.steps.len() + 1, message));
        }
        transcript
    };
    tokio::time::timeout(RUN_LIMIT, session).await.map_err(|_| {
        format!("{name}: a run cut after {cut_after:?} messages took over {RUN_LIMIT:?}")
    })
}

/// A notification the session sent itself carries the process id the
/// client knows, which differs from run to run: it is replaced by zero so
/// that runs compare. Any other process id stays and fails the comparison.
fn own_notification(message: Message, own_pid: i32) -> Message {
    if message.tag != b'A' || message.body.len() < 4 || message.body[..4] != own_pid.to_be_bytes() {
        return message;
    }
    let mut body = message.body.to_vec();
    body[..4].copy_from_slice(&0i32.to_be_bytes());
    Message {
        tag: b'A',
        body: body.into(),
    }
}

/// How many messages answered each step.
fn step_lengths(scenario: &Scenario, transcript: &Transcript) -> Vec<usize> {
    let mut lengths = vec![0; scenario.steps.len()];
    for (step, _) in transcript {
        if let Some(length) = lengths.get_mut(step - 1) {
            *length += 1;
        }
    }
    lengths
}

/// The cuts to make: (messages before the cut, boundary), every boundary
/// of short answers and a sample of long ones.
fn boundaries(lengths: &[usize]) -> Vec<(usize, Point)> {
    let mut cuts = Vec::new();
    let mut before = 0;
    for (index, &len) in lengths.iter().enumerate() {
        let mut chosen = BTreeSet::new();
        if len <= 2 * EDGE + SAMPLED_BETWEEN {
            chosen.extend(0..len);
        } else {
            chosen.extend(0..EDGE);
            chosen.extend(len - EDGE..len);
            let span = len - 2 * EDGE;
            for k in 1..=SAMPLED_BETWEEN {
                chosen.insert(EDGE + span * k / (SAMPLED_BETWEEN + 1));
            }
        }
        for messages in chosen {
            cuts.push((
                before + messages,
                Point {
                    step: index + 1,
                    messages,
                },
            ));
        }
        before += len;
    }
    cuts
}

/// The message as compared: notices that a failover may have cost
/// notifications are Reprise's own and not compared; data rows of a
/// volatile step are compared by their presence only.
fn comparable(scenario: &Scenario, transcript: &[(usize, Message)]) -> Vec<Compared> {
    transcript
        .iter()
        .filter(|(_, message)| !is_failover_notice(message))
        .map(|(step, message)| {
            let body = if message.tag == b'D' && scenario.volatile.contains(step) {
                Vec::new()
            } else {
                message.body.to_vec()
            };
            (*step, message.tag, body)
        })
        .collect()
}

fn is_failover_notice(message: &Message) -> bool {
    message.tag == b'N'
        && message.sqlstate().as_deref() == Some("01000")
        && message
            .field(b'M')
            .is_some_and(|text| text.starts_with("notifications may have been missed"))
}

fn check_same(scenario: &Scenario, reference: &Transcript, got: &Transcript) -> Result<(), String> {
    let mut want = comparable(scenario, reference);
    let mut have = comparable(scenario, got);
    if want == have {
        return Ok(());
    }
    if got.iter().any(|(_, message)| is_failover_notice(message)) {
        // The client was told that notifications may have been missed:
        // those it got must be ones it was due, in order, none twice.
        let notifications = |list: &[Compared]| -> Vec<Compared> {
            list.iter().filter(|m| m.1 == b'A').cloned().collect()
        };
        let (due, delivered) = (notifications(&want), notifications(&have));
        let mut due_left = due.iter();
        if !delivered.iter().all(|n| due_left.any(|d| d == n)) {
            return Err("notifications arrived that were not due, or twice".to_owned());
        }
        want.retain(|m| m.1 != b'A');
        have.retain(|m| m.1 != b'A');
        if want == have {
            return Ok(());
        }
    }
    let at = want
        .iter()
        .zip(&have)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(have.len()));
    Err(format!(
        "the transcript differs at message {at}: expected {}, got {}",
        describe(want.get(at)),
        describe(have.get(at))
    ))
}

fn check_error(
    scenario: &Scenario,
    prefix: &[(usize, Message)],
    got: &Transcript,
    expected: &scenario::Expectation,
) -> Result<(), String> {
    let want = comparable(scenario, prefix);
    let have = comparable(scenario, got);
    let Some((last, head)) = have.split_last() else {
        return Err(format!(
            "expected {} {}, got nothing",
            expected.sqlstate, expected.cause
        ));
    };
    if head != want.as_slice() {
        return Err(format!(
            "expected {} {} after the first {} messages, got {}",
            expected.sqlstate,
            expected.cause,
            want.len(),
            describe(Some(last))
        ));
    }
    let error = Message {
        tag: last.1,
        body: last.2.clone().into(),
    };
    let detail = error.field(b'D').unwrap_or_default();
    if error.tag != b'E'
        || error.sqlstate().as_deref() != Some(&expected.sqlstate)
        || !detail.starts_with(&expected.cause)
    {
        return Err(format!(
            "expected {} {}, got {}",
            expected.sqlstate,
            expected.cause,
            describe(Some(last))
        ));
    }
    Ok(())
}

fn describe(compared: Option<&Compared>) -> String {
    let Some((step, tag, body)) = compared else {
        return "the end of the session".to_owned();
    };
    let message = Message {
        tag: *tag,
        body: body.clone().into(),
    };
    match (step, &message) {
        (step, message) if message.tag == b'E' || message.tag == b'N' => format!(
            "{} {} {:?} (DETAIL {:?}) in step {step}",
            char::from(message.tag),
            message.sqlstate().unwrap_or_default(),
            message.field(b'M').unwrap_or_default(),
            message.field(b'D').unwrap_or_default()
        ),
        (step, message) => {
            let body = String::from_utf8_lossy(&message.body);
            let body: String = body.chars().take(60).collect();
            format!("{} {body:?} in step {step}", char::from(message.tag))
        }
    }
}
