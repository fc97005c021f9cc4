//! Failover under load: pgbench's TPC-B through Reprise while every
//! server connection is terminated every two seconds, and while the
//! primary is killed and its synchronous standby promoted. pgbench must
//! not notice, and the bank must balance.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use throwaway_pg::Options;
use tokio_postgres::Client;

use crate::promotion::{make_synchronous, stop_waiting_for_standbys};
use crate::support::{reprise_stats, scalar, Harness};

const CLIENTS: &str = "8";
const SECONDS: u64 = 60;
const TERMINATE_EVERY: Duration = Duration::from_secs(2);

/// pgbench running TPC-B through the proxy.
struct Pgbench {
    child: Child,
}

impl Pgbench {
    /// Initialises the tables directly on the server at `host:port`.
    fn init(pgbench: &Path, host: &str, port: u16) {
        let init = Command::new(pgbench)
            .args(["-i", "-q", "-s", "1", "-h", host, "-p"])
            .arg(port.to_string())
            .args(["-U", "postgres", "postgres"])
            .output()
            .expect("pgbench -i");
        assert!(init.status.success(), "{init:?}");
    }

    fn start(pgbench: &Path, proxy_port: u16) -> Pgbench {
        Pgbench::start_with(pgbench, proxy_port, "simple", SECONDS, None)
    }

    /// With query mode `mode` (pgbench -M) for `seconds`, running
    /// `script` instead of the built-in TPC-B when given.
    fn start_with(
        pgbench: &Path,
        proxy_port: u16,
        mode: &str,
        seconds: u64,
        script: Option<&Path>,
    ) -> Pgbench {
        let mut command = Command::new(pgbench);
        if let Some(script) = script {
            command.arg("-f").arg(script);
        }
        let child = command
            .args(["-n", "-c", CLIENTS, "-j", "2", "-M", mode, "-T"])
            .arg(seconds.to_string())
            .args(["-h", "127.0.0.1", "-p"])
            .arg(proxy_port.to_string())
            .args(["-U", "postgres", "postgres"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgbench");
        Pgbench { child }
    }

    fn finished(&mut self) -> bool {
        self.child.try_wait().expect("pgbench status").is_some()
    }

    /// Waits for the end; checks that no transaction failed and no client
    /// aborted, and returns the transactions pgbench counted.
    fn finish(self) -> u64 {
        let output = self.child.wait_with_output().expect("pgbench output");
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
        let processed: u64 = stdout
            .lines()
            .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
            .and_then(|count| count.split('/').next())
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or_else(|| panic!("pgbench reports its transactions:\n{stdout}"));
        assert!(processed > 0);
        processed
    }
}

/// Every transaction pgbench counted is in the history once, and the
/// balances add up.
async fn check_the_bank(server: &Client, processed: u64) {
    let history = scalar(server, "select count(*) from pgbench_history").await;
    assert_eq!(
        history,
        processed.to_string(),
        "every transaction pgbench counted is in the history, once"
    );
    let balances = scalar(
        server,
        "select (select sum(abalance) from pgbench_accounts) = (select sum(delta) from pgbench_history) \
            and (select sum(tbalance) from pgbench_tellers) = (select sum(delta) from pgbench_history) \
            and (select sum(bbalance) from pgbench_branches) = (select sum(delta) from pgbench_history)",
    )
    .await;
    assert_eq!(
        balances, "t",
        "accounts, tellers and branches balance the history"
    );
}

/// TPC-B's statements without its BEGIN and END: each one an autocommit
/// write (or read) of its own.
const AUTOCOMMIT_TPCB: &str = "\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_survives_terminations_every_two_seconds() {
    terminations_every_two_seconds("simple", SECONDS, false).await;
}

/// The same with prepared statements: every statement, END included,
/// goes through the extended protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_prepared_survives_terminations_every_two_seconds() {
    terminations_every_two_seconds("prepared", SECONDS / 2, false).await;
}

/// TPC-B's statements in autocommit mode, with `wrap_autocommit_writes`:
/// a write whose answer a termination took is settled, never run twice,
/// never failed. (Without the setting pgbench's clients abort with
/// 08007.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_autocommit_writes_survive_terminations_every_two_seconds() {
    terminations_every_two_seconds("simple", SECONDS / 2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_autocommit_writes_survive_terminations_every_two_seconds() {
    terminations_every_two_seconds("prepared", SECONDS / 3, true).await;
}

/// pgbench in query mode `mode` for `seconds` while its server processes
/// are terminated every two seconds: TPC-B, or with `autocommit` its
/// statements as autocommit writes with `wrap_autocommit_writes` on.
async fn terminations_every_two_seconds(mode: &str, seconds: u64, autocommit: bool) {
    let harness = Harness::start_with(Options::default(), |config| {
        config.wrap_autocommit_writes = autocommit;
    })
    .await;
    let (observer, _) = harness.connect_direct().await;
    let pgbench = harness.cluster.install().bin("pgbench");
    Pgbench::init(&pgbench, harness.cluster.host(), harness.cluster.port());
    let script_dir = tempfile::tempdir().expect("tempdir");
    let script = script_dir.path().join("autocommit-tpcb.sql");
    std::fs::write(&script, AUTOCOMMIT_TPCB).expect("script");
    let mut run = Pgbench::start_with(
        &pgbench,
        harness.proxy.port(),
        mode,
        seconds,
        autocommit.then_some(script.as_path()),
    );
    let mut rounds = 0u32;
    let mut terminated = 0u64;
    loop {
        tokio::time::sleep(TERMINATE_EVERY).await;
        if run.finished() {
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
    let processed = run.finish();
    let expected_rounds = seconds / TERMINATE_EVERY.as_secs() - 2;
    assert!(
        u64::from(rounds) >= expected_rounds,
        "terminations ran all along ({rounds} rounds)"
    );
    assert!(
        terminated >= u64::from(rounds),
        "server connections were terminated ({terminated} in {rounds} rounds)"
    );
    check_the_bank(&observer, processed).await;
    let (client, _) = harness.connect().await;
    let stats = reprise_stats(&client).await;
    assert!(
        stats["failovers_recovered"] >= u64::from(rounds),
        "sessions were carried over: {stats:?}"
    );
    assert_eq!(stats["failovers_failed"], 0, "{stats:?}");
    if autocommit {
        assert!(
            stats["autocommit_writes_wrapped"] >= processed * 4,
            "every write was wrapped: {stats:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_survives_sigkill_of_the_primary_and_a_promotion() {
    let (mut harness, standby) = Harness::start_with_standby(Options::default(), |config| {
        // A COMMIT in flight when the primary dies is settled on the
        // promoted standby, where transaction ids prove nothing.
        config.commit_guard = true;
        config.health_check_user = Some("postgres".to_owned());
        config.health_check_period = reprise::config::HumanDuration(Duration::from_millis(200));
    })
    .await;
    let pgbench = harness.cluster.install().bin("pgbench");
    Pgbench::init(&pgbench, harness.cluster.host(), harness.cluster.port());
    {
        let (primary, _) = harness.connect_direct().await;
        make_synchronous(&primary).await;
    }
    let mut run = Pgbench::start(&pgbench, harness.proxy.port());
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(SECONDS / 3)).await;
    assert!(!run.finished(), "pgbench runs until the primary dies");
    tokio::task::block_in_place(|| harness.cluster.kill9_postmaster()).expect("kill -9");
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| standby.promote()).expect("promote");
    let (promoted, _) = crate::support::connect(&standby.conn_str()).await;
    stop_waiting_for_standbys(&promoted).await;
    while !run.finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let processed = run.finish();
    assert!(started.elapsed() >= Duration::from_secs(SECONDS));
    check_the_bank(&promoted, processed).await;
    assert_ne!(
        scalar(
            &promoted,
            "select count(*) from pgbench_history where mtime > now() - interval '20 seconds'"
        )
        .await,
        "0",
        "the load went on on the promoted standby"
    );
    let (client, _) = harness.connect().await;
    let stats = reprise_stats(&client).await;
    assert!(
        stats["failovers_recovered"] >= 8,
        "every pgbench session was carried over: {stats:?}"
    );
    assert_eq!(stats["failovers_failed"], 0, "{stats:?}");
}
