//! Real client programs through the proxy: psql and pgbench.

use std::path::Path;
use std::process::Command;

use crate::support::Harness;

fn psql(harness: &Harness, port: u16, script: &Path) -> (String, String) {
    let output = Command::new(harness.cluster.install().bin("psql"))
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .arg("-f")
        .arg(script)
        .env("PGAPPNAME", "psql-test")
        .env_remove("PGOPTIONS")
        .output()
        .expect("run psql");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_output_through_the_proxy_equals_direct() {
    let harness = Harness::start().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/workloads/psql-session.sql");
    let (proxied_out, proxied_err) = psql(&harness, harness.proxy.port(), &script);
    let (direct_out, direct_err) = psql(&harness, harness.cluster.port(), &script);
    assert!(
        direct_out.contains("done"),
        "the script ran to its end:\n{direct_out}\n{direct_err}"
    );
    assert!(
        direct_err.contains("division by zero"),
        "the script exercises errors:\n{direct_err}"
    );
    assert!(direct_out.contains("value of a: 1"));
    assert_eq!(proxied_out, direct_out);
    assert_eq!(proxied_err, direct_err);
}

fn pgbench(harness: &Harness, args: &[&str]) -> String {
    let output = Command::new(harness.cluster.install().bin("pgbench"))
        .args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &harness.proxy.port().to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "pgbench {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_proxy() {
    let harness = Harness::start().await;
    pgbench(&harness, &["-i", "-q", "-s", "1"]);
    for mode in ["simple", "extended", "prepared"] {
        let output = pgbench(
            &harness,
            &["-M", mode, "-c", "4", "-j", "2", "-t", "200", "-n"],
        );
        assert!(
            output.contains("number of transactions actually processed: 800/800"),
            "pgbench -M {mode}:\n{output}"
        );
        assert!(
            output.contains("number of failed transactions: 0"),
            "pgbench -M {mode}:\n{output}"
        );
    }
    let (client, _) = harness.connect_direct().await;
    let history = crate::support::scalar(&client, "select count(*) from pgbench_history").await;
    assert_eq!(
        history, "2400",
        "every write reached the server exactly once"
    );
}
