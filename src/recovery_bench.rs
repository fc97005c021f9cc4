//! `reprise bench --recovery N`: how long a client waits when its server
//! process is terminated on a live server, over many failures.
//!
//! A session through Reprise opens a transaction and runs a few commands
//! (so that each failover replays them), then its server process is
//! terminated by another connection. The moment `pg_terminate_backend`
//! returns (the signal is sent) the client sends its next query; the
//! pause is the time until that query's answer arrives — loss detection,
//! reconnection, template restore, replay and verification included, and
//! one round trip more than the failover itself. The same query's round
//! trip without a failure is reported beside it. Direct connections and
//! PgBouncer have nothing to measure: their client gets an error.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::NoTls;

/// Commands each failover replays (BEGIN and two INSERTs).
const REPLAYED: usize = 3;

pub fn run(
    failures: usize,
    cluster: &throwaway_pg::Cluster,
    reprise_port: u16,
) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(failures, cluster, reprise_port))
}

async fn measure(
    failures: usize,
    cluster: &throwaway_pg::Cluster,
    reprise_port: u16,
) -> anyhow::Result<String> {
    let direct = format!(
        "host={} port={} user={} dbname=postgres",
        cluster.host(),
        cluster.port(),
        cluster.superuser()
    );
    let through = format!(
        "host=127.0.0.1 port={reprise_port} user={} dbname=postgres application_name=reprise-recovery-bench",
        cluster.superuser()
    );
    let observer = connect(&direct).await.context("observer connection")?;
    observer
        .batch_execute("DROP TABLE IF EXISTS recovery_bench; CREATE TABLE recovery_bench (n int)")
        .await?;
    let client = connect(&through)
        .await
        .context("connection through Reprise")?;
    let progress = indicatif::ProgressBar::new(failures as u64).with_message("failures");
    let mut pauses = Vec::with_capacity(failures);
    let mut round_trips = Vec::with_capacity(failures);
    for round in 0..failures {
        client
            .batch_execute(&format!(
                "BEGIN; INSERT INTO recovery_bench VALUES ({round}); INSERT INTO recovery_bench VALUES ({round})"
            ))
            .await?;
        let started = Instant::now();
        client.simple_query("SELECT 1").await?;
        round_trips.push(started.elapsed());
        // Found by name: pg_backend_pid() would be replayed to another
        // value, and the client's process id is not the server's after a
        // failover.
        let terminated = observer
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'reprise-recovery-bench'",
                &[],
            )
            .await?;
        anyhow::ensure!(
            terminated == 1,
            "the session's server process was not found"
        );
        let lost = Instant::now();
        client
            .simple_query("SELECT 1")
            .await
            .with_context(|| format!("failure {round}: the session did not survive"))?;
        pauses.push(lost.elapsed());
        client.batch_execute("COMMIT").await?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let rows: i64 = observer
        .query_one("SELECT count(*) FROM recovery_bench", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        rows == 2 * failures as i64,
        "{rows} rows after {failures} transactions of two"
    );
    observer.batch_execute("DROP TABLE recovery_bench").await?;
    Ok(report(failures, &mut pauses, &mut round_trips))
}

async fn connect(conn_str: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conn_str, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn report(failures: usize, pauses: &mut [Duration], round_trips: &mut [Duration]) -> String {
    pauses.sort();
    round_trips.sort();
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let mean = pauses.iter().map(|pause| ms(*pause)).sum::<f64>() / pauses.len().max(1) as f64;
    format!(
        "\nrecovery pause, server process terminated on a live server, {failures} failures, \
         {REPLAYED} commands replayed each:\n\
         {:<28} {:>9} {:>9} {:>9} {:>9}\n\
         {:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n\
         {:<28} {:>9.2} {:>9.2} {:>9.2} {:>9}\n\
         direct and pgbouncer: the client gets an error; there is no pause to measure\n",
        "(ms)",
        "p50",
        "p99",
        "max",
        "mean",
        "pause until the answer",
        ms(percentile(pauses, 0.50)),
        ms(percentile(pauses, 0.99)),
        ms(pauses.last().copied().unwrap_or_default()),
        mean,
        "same query, no failure",
        ms(percentile(round_trips, 0.50)),
        ms(percentile(round_trips, 0.99)),
        ms(round_trips.last().copied().unwrap_or_default()),
        "",
    )
}

/// The nearest-rank percentile of sorted `values`.
pub(crate) fn percentile(values: &[Duration], fraction: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((fraction * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&values[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
