//! `reprise bench --auth N`: how long a refused login takes for a user
//! that exists and for one that does not, so that the two can be compared
//! (they should not be told apart), beside a successful login.
//!
//! The cases run interleaved, one attempt of each per round in a random
//! order, against one
//! Reprise per method (scram-sha-256 and md5) in front of a throwaway
//! server that trusts Reprise.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::NoTls;

use crate::recovery_bench::percentile;

/// (label, user, password, expected to log in)
const CASES: &[(&str, &str, &str, bool)] = &[
    ("right password", "bencher", "bench-pw", true),
    ("wrong password, password known", "bencher", "wrong", false),
    ("wrong password, verifier known", "vera", "wrong", false),
    ("unknown user", "ghost", "wrong", false),
];

/// Creates the roles and writes the users file the proxies read: a
/// password for one role, the server's own verifier for the other.
pub fn prepare(cluster: &throwaway_pg::Cluster, users: &Path) -> anyhow::Result<()> {
    let verifier = cluster
        .psql(
            "CREATE ROLE bencher LOGIN PASSWORD 'bench-pw';
             CREATE ROLE vera LOGIN PASSWORD 'vera-pw';
             SELECT rolpassword FROM pg_authid WHERE rolname = 'vera';",
        )
        .context("cannot create the bench roles")?;
    std::fs::write(
        users,
        format!(
            "\"bencher\" \"bench-pw\"\n\"vera\" \"{}\"\n",
            verifier.trim()
        ),
    )?;
    Ok(())
}

pub fn run(attempts: usize, proxies: &[(&str, u16)]) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(attempts, proxies))
}

async fn measure(attempts: usize, proxies: &[(&str, u16)]) -> anyhow::Result<String> {
    let mut report = String::new();
    for (method, port) in proxies {
        let progress =
            indicatif::ProgressBar::new(attempts as u64).with_message(format!("{method}: rounds"));
        let mut times = vec![Vec::with_capacity(attempts); CASES.len()];
        for _ in 0..attempts {
            // A fresh order each round: a case run just after a successful
            // login would pay for that session's teardown.
            let mut order: Vec<usize> = (0..CASES.len()).collect();
            rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::thread_rng());
            for index in order {
                let (label, user, password, succeeds) = CASES[index];
                let conn = format!(
                    "host=127.0.0.1 port={port} user={user} password={password} dbname=postgres"
                );
                let started = Instant::now();
                let outcome = tokio_postgres::connect(&conn, NoTls).await;
                times[index].push(started.elapsed());
                match (outcome, succeeds) {
                    (Ok((client, connection)), true) => {
                        drop(client);
                        let _ = connection.await;
                    }
                    (Err(_), false) => {}
                    (Ok(_), false) => anyhow::bail!("{method}: \"{label}\" logged in"),
                    (Err(err), true) => anyhow::bail!("{method}: \"{label}\" refused: {err}"),
                }
            }
            progress.inc(1);
        }
        progress.finish_and_clear();
        report.push_str(&table(method, attempts, &mut times));
    }
    Ok(report)
}

fn table(method: &str, attempts: usize, times: &mut [Vec<Duration>]) -> String {
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let mut out = format!(
        "\nclient login, {method}, {attempts} attempts per case, interleaved:\n{:<34} {:>9} {:>9} {:>9}\n",
        "(ms)", "p50", "p90", "p99"
    );
    for (index, (label, ..)) in CASES.iter().enumerate() {
        times[index].sort();
        out.push_str(&format!(
            "{label:<34} {:>9.3} {:>9.3} {:>9.3}\n",
            ms(percentile(&times[index], 0.50)),
            ms(percentile(&times[index], 0.90)),
            ms(percentile(&times[index], 0.99)),
        ));
    }
    let known = ms(percentile(&times[1], 0.50));
    let unknown = ms(percentile(&times[3], 0.50));
    out.push_str(&format!(
        "unknown user / wrong password (p50): {:.3}\n",
        unknown / known
    ));
    out
}
