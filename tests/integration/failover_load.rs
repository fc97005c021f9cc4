//! Failover under load: pgbench's TPC-B through Reprise while every
//! server connection is terminated every two seconds. pgbench must not
//! notice, and the bank must balance.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{reprise_stats, scalar, Harness};

const CLIENTS: &str = "8";
const SECONDS: u64 = 60;
const TERMINATE_EVERY: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_survives_terminations_every_two_seconds() {
    let harness = Harness::start().await;
    let (observer, _) = harness.connect_direct().await;
    let pgbench = harness.cluster.install().bin("pgbench");
    let init = Command::new(&pgbench)
        .args(["-i", "-q", "-s", "1"])
        .args(["-h", harness.cluster.host(), "-p"])
        .arg(harness.cluster.port().to_string())
        .args(["-U", "postgres", "postgres"])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{init:?}");

    let run = Command::new(&pgbench)
        .args(["-n", "-c", CLIENTS, "-j", "2", "-T"])
        .arg(SECONDS.to_string())
        .args(["-h", "127.0.0.1", "-p"])
        .arg(harness.proxy.port().to_string())
        .args(["-U", "postgres", "postgres"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench");
    let run = std::sync::Arc::new(std::sync::Mutex::new(Some(run)));
    let mut rounds = 0u32;
    let mut terminated = 0u64;
    loop {
        tokio::time::sleep(TERMINATE_EVERY).await;
        let finished = run
            .lock()
            .expect("lock")
            .as_mut()
            .expect("child")
            .try_wait()
            .expect("pgbench status")
            .is_some();
        if finished {
            break;
        }
        let count = scalar(
            &observer,
            "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity \
             where application_name = 'pgbench' and pid <> pg_backend_pid()",
        )
        .await;
        terminated += count.parse::<u64>().expect("count");
        rounds += 1;
    }
    let output = run
        .lock()
        .expect("lock")
        .take()
        .expect("child")
        .wait_with_output()
        .expect("pgbench output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pgbench failed:\n{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains("aborted") && !stdout.contains("aborted"),
        "no client aborted:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "no transaction failed:\n{stdout}"
    );
    let expected_rounds = SECONDS / TERMINATE_EVERY.as_secs() - 2;
    assert!(
        u64::from(rounds) >= expected_rounds,
        "terminations ran all along ({rounds} rounds)"
    );
    assert!(
        terminated >= u64::from(rounds),
        "server connections were terminated ({terminated} in {rounds} rounds)"
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|count| count.split('/').next())
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("pgbench reports its transactions:\n{stdout}"));
    assert!(processed > 0);

    let history = scalar(&observer, "select count(*) from pgbench_history").await;
    assert_eq!(
        history,
        processed.to_string(),
        "every transaction pgbench counted is in the history, once"
    );
    let balances = scalar(
        &observer,
        "select (select sum(abalance) from pgbench_accounts) = (select sum(delta) from pgbench_history) \
            and (select sum(tbalance) from pgbench_tellers) = (select sum(delta) from pgbench_history) \
            and (select sum(bbalance) from pgbench_branches) = (select sum(delta) from pgbench_history)",
    )
    .await;
    assert_eq!(
        balances, "t",
        "accounts, tellers and branches balance the history"
    );
    let (client, _) = harness.connect().await;
    let stats = reprise_stats(&client).await;
    assert!(
        stats["failovers_recovered"] >= u64::from(rounds),
        "sessions were carried over: {stats:?}"
    );
    assert_eq!(stats["failovers_failed"], 0, "{stats:?}");
}
