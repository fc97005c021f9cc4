//! `reprise demo`: Reprise in front of a throwaway PostgreSQL, with a short
//! real workload through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reprise::config::{Backend, Config};
use reprise::Proxy;
use tokio_postgres::{AsyncMessage, NoTls};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Use this server (HOST:PORT) instead of starting a throwaway one.
    #[arg(long)]
    backend: Option<String>,
    /// User to connect as (must be trusted by the server, or listed in --users-file).
    #[arg(long, default_value = "postgres")]
    user: String,
    /// Passwords for the server, as for `serve`.
    #[arg(long)]
    users_file: Option<std::path::PathBuf>,
    /// Concurrent sessions in the load phase.
    #[arg(long, default_value_t = 16)]
    sessions: usize,
    /// Transactions per session in the load phase.
    #[arg(long, default_value_t = 250)]
    transactions: usize,
    /// Also kill the primary (SIGKILL of its postmaster) in the middle of
    /// a transaction and promote a synchronous standby; only with the
    /// throwaway cluster.
    #[arg(long, conflicts_with = "backend")]
    promote: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);

    // Watch Ctrl-C from the start, so that one pressed while the cluster
    // is still starting is not fatal to the process before cleanup.
    let interrupted = crate::interrupt_token()?;

    // The cluster lives in this scope, so every exit path below (errors and
    // Ctrl-C included) drops it, which stops the server and deletes its files.
    let (cluster, backend) = match &args.backend {
        Some(address) => (
            None,
            Backend::parse_flag(&format!("given={address}")).map_err(anyhow::Error::msg)?,
        ),
        None => {
            println!("Starting a throwaway PostgreSQL cluster …");
            let cluster = tokio::task::spawn_blocking(throwaway_pg::Cluster::start)
                .await?
                .context("cannot start a throwaway PostgreSQL (are the PostgreSQL server binaries installed?)")?;
            println!(
                "  PostgreSQL {} on {}:{} (data in {})",
                cluster
                    .install()
                    .major_version()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                cluster.host(),
                cluster.port(),
                cluster.data_dir().display()
            );
            let backend = Backend {
                name: "throwaway".to_owned(),
                host: cluster.host().to_owned(),
                port: cluster.port(),
            };
            if interrupted.is_cancelled() {
                tokio::task::spawn_blocking(move || drop(cluster)).await?;
                println!("Interrupted: the throwaway PostgreSQL was stopped and removed.");
                return Ok(());
            }
            (Some(cluster), backend)
        }
    };

    let mut cluster = cluster;
    let standby = match (&cluster, args.promote) {
        (Some(primary), true) => {
            println!("Starting a streaming standby of it …");
            let standby = tokio::task::block_in_place(|| primary.standby())
                .context("cannot start a standby")?;
            println!("  standby on {}:{}", standby.host(), standby.port());
            Some(standby)
        }
        _ => None,
    };
    let mut backends = vec![backend.clone()];
    if let Some(standby) = &standby {
        backends.push(Backend {
            name: "standby".to_owned(),
            host: standby.host().to_owned(),
            port: standby.port(),
        });
    }

    let data_dir = tempfile::Builder::new().prefix("reprise-demo-").tempdir()?;
    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.path().to_owned(),
        users_file: args.users_file.clone(),
        backends,
        // A COMMIT lost when the primary dies is settled on the standby.
        commit_guard: args.promote,
        health_check_user: args.promote.then(|| args.user.clone()),
        ..Config::default()
    };
    config.validate()?;
    let proxy = Proxy::bind(config).await?;
    let address = proxy.local_addr();
    let handle = proxy.handle();
    let proxy_task = tokio::spawn(proxy.run());
    println!(
        "Reprise listens on {address}, in front of {} ({})",
        backend.name,
        backend.address()
    );

    let scenes = async {
        workload(&args, address).await?;
        failover(&args, address, &backend).await?;
        if let (Some(primary), Some(standby)) = (cluster.as_mut(), &standby) {
            promotion(&args, address, primary, standby).await?;
        }
        anyhow::Ok(())
    };
    let outcome = tokio::select! {
        outcome = scenes => outcome,
        () = interrupted.cancelled() => {
            println!("\nInterrupted: cleaning up.");
            Ok(())
        }
    };

    handle.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy_task).await;
    if outcome.is_ok() && !interrupted.is_cancelled() {
        report_journal(data_dir.path());
        println!("\nDone: every step above went through Reprise and matched what PostgreSQL itself would answer.");
    }
    if let Some(standby) = standby {
        tokio::task::spawn_blocking(move || drop(standby)).await?;
    }
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || drop(cluster)).await?;
        println!("Throwaway PostgreSQL stopped and removed.");
    }
    outcome
}

/// What the sessions left in the journal, read back as recovery would.
fn report_journal(data_dir: &std::path::Path) {
    use reprise::journal::recovery::{self, Mode};
    use reprise::journal::RecordKind;
    let mut counts = std::collections::BTreeMap::new();
    let scanned = recovery::scan(
        &data_dir.join(reprise::journal::JOURNAL_DIR),
        Mode::ReadOnly,
        true,
        |record| *counts.entry(record.record.kind()).or_insert(0u64) += 1,
        |_| {},
    );
    let count = |kind| counts.get(&kind).copied().unwrap_or(0);
    match scanned {
        Ok(recovered) => println!(
            "Journal: {} sessions, {} commands inside transactions, {} safe points, {} templates, \
             {} failover outcomes; {} sessions left unfinished work, {} damaged stretches",
            count(RecordKind::SessionStart),
            count(RecordKind::Command),
            count(RecordKind::SafePoint),
            count(RecordKind::Template),
            count(RecordKind::Outcome),
            recovered.unfinished().count(),
            recovered.damage.len()
        ),
        Err(err) => println!("Journal could not be read: {err}"),
    }
}

fn conn_string(user: &str, address: std::net::SocketAddr) -> String {
    format!(
        "host={} port={} user={user} dbname=postgres application_name=reprise-demo",
        address.ip(),
        address.port()
    )
}

async fn connect(
    user: &str,
    address: std::net::SocketAddr,
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
)> {
    let (client, mut connection) = tokio_postgres::connect(&conn_string(user, address), NoTls)
        .await
        .context("cannot connect through Reprise")?;
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            let _ = sender.send(message);
        }
    });
    Ok((client, receiver))
}

async fn workload(args: &DemoArgs, address: std::net::SocketAddr) -> anyhow::Result<()> {
    let (client, mut messages) = connect(&args.user, address).await?;
    let row = client
        .query_one("select version(), pg_backend_pid(), current_user", &[])
        .await?;
    let version: String = row.get(0);
    let pid: i32 = row.get(1);
    println!(
        "\n1. Connected through Reprise as {}: {version}",
        row.get::<_, String>(2)
    );
    println!("   backend pid {pid}: the client sees the server's own process id");

    client
        .batch_execute(
            "drop table if exists reprise_demo;
             create table reprise_demo (id int primary key, balance bigint not null, note text)",
        )
        .await?;
    let insert = client
        .prepare("insert into reprise_demo values ($1, $2, $3)")
        .await?;
    for id in 0..100 {
        client
            .execute(&insert, &[&id, &1000_i64, &format!("account {id}")])
            .await?;
    }
    println!(
        "2. Created a table and inserted 100 rows with a prepared statement (extended protocol)"
    );

    let sink = client
        .copy_in("copy reprise_demo (id, balance, note) from stdin")
        .await?;
    let mut copy_data = String::new();
    for id in 100..1100 {
        copy_data.push_str(&format!("{id}\t500\tcopied {id}\n"));
    }
    futures_util::pin_mut!(sink);
    futures_util::SinkExt::send(&mut sink, bytes::Bytes::from(copy_data)).await?;
    let copied = sink.finish().await?;
    let out = client.copy_out("copy reprise_demo to stdout").await?;
    futures_util::pin_mut!(out);
    let mut copied_out = 0;
    while let Some(chunk) = out.next().await {
        copied_out += chunk?.len();
    }
    println!("3. COPY FROM STDIN loaded {copied} rows; COPY TO STDOUT returned {copied_out} bytes");

    client.batch_execute("listen reprise_demo_channel").await?;
    let (notifier, _) = connect(&args.user, address).await?;
    notifier
        .batch_execute("notify reprise_demo_channel, 'hello through the proxy'")
        .await?;
    let notification = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(message) = messages.recv().await {
            if let AsyncMessage::Notification(notification) = message {
                return Some(notification);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .context("the notification did not arrive")?;
    println!(
        "4. LISTEN/NOTIFY: received {:?} from pid {} while idle",
        notification.payload(),
        notification.process_id()
    );

    let cancel = client.cancel_token();
    let sleeper = tokio::spawn({
        let started = Instant::now();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = cancel.cancel_query(NoTls).await;
            started
        }
    });
    let cancelled = client.simple_query("select pg_sleep(30)").await;
    let started = sleeper.await?;
    match cancelled {
        Err(err) if err.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
            println!(
                "5. Cancelled a pg_sleep(30) after {:.1}s through the proxy's cancel-key map",
                started.elapsed().as_secs_f64()
            )
        }
        Err(err) => bail!("the cancelled query failed differently: {err}"),
        Ok(_) => bail!("the cancel request did not reach the server"),
    }

    let total = (args.sessions * args.transactions) as u64;
    println!(
        "6. Load: {} sessions × {} transactions (begin, select, update, commit)",
        args.sessions, args.transactions
    );
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "   [{elapsed_precise}] {bar:40} {pos}/{len} transactions ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..args.sessions {
        let (session, _) = connect(&args.user, address).await?;
        let bar = bar.clone();
        let done = Arc::clone(&done);
        let transactions = args.transactions;
        workers.push(tokio::spawn(async move {
            let select = session
                .prepare("select balance from reprise_demo where id = $1")
                .await?;
            let update = session
                .prepare("update reprise_demo set balance = balance + $2 where id = $1")
                .await?;
            for step in 0..transactions {
                let id = ((worker * 7919 + step * 31) % 1100) as i32;
                session.batch_execute("begin").await?;
                let _balance: i64 = session.query_one(&select, &[&id]).await?.get(0);
                session.execute(&update, &[&id, &1_i64]).await?;
                session.batch_execute("commit").await?;
                done.fetch_add(1, Ordering::Relaxed);
                bar.inc(1);
            }
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let sum: i64 = client
        .query_one("select sum(balance)::bigint from reprise_demo", &[])
        .await?
        .get(0);
    let expected = 100 * 1000 + 1000 * 500 + total as i64;
    println!(
        "   {} transactions in {:.2}s ({:.0}/s); total balance {sum} (expected {expected})",
        done.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    if sum != expected {
        bail!("the balances do not add up: {sum} != {expected}");
    }
    client.batch_execute("drop table reprise_demo").await?;
    Ok(())
}

/// The counters of `SHOW reprise.stats`.
async fn stats(client: &tokio_postgres::Client) -> anyhow::Result<HashMap<String, u64>> {
    let mut counters = HashMap::new();
    for message in client.simple_query("show reprise.stats").await? {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            if let (Some(name), Some(value)) = (row.get(0), row.get(1)) {
                counters.insert(name.to_owned(), value.parse().unwrap_or(0));
            }
        }
    }
    Ok(counters)
}

/// A transfer half done when the server connection goes: it opens a
/// transaction, sets a local setting, moves money out of one account, and
/// is interrupted by `interrupt`; then it goes on as if nothing happened.
/// Prints the pause, the commands replayed and the check.
async fn interrupted_transfer<F, Fut, R>(
    args: &DemoArgs,
    address: std::net::SocketAddr,
    interrupt: F,
    repair: R,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
    R: std::future::Future<Output = anyhow::Result<()>>,
{
    let (client, _) = connect(&args.user, address).await?;
    client
        .batch_execute(
            "set application_name = 'reprise-demo-transfer';
             create table if not exists reprise_demo_accounts (id int primary key, balance bigint not null);
             truncate reprise_demo_accounts;
             insert into reprise_demo_accounts values (1, 100), (2, 100)",
        )
        .await?;
    let before = stats(&client).await?;
    for statement in [
        "begin",
        "set local lock_timeout = '5s'",
        "update reprise_demo_accounts set balance = balance - 30 where id = 1",
    ] {
        client.batch_execute(statement).await?;
    }
    println!("   the client: BEGIN; SET LOCAL lock_timeout; UPDATE (−30 from account 1) …");
    interrupt().await?;
    let started = Instant::now();
    // The client goes on at once; whatever repairs the servers runs
    // meanwhile.
    let (repaired, pause) = tokio::join!(repair, async {
        client
            .batch_execute("update reprise_demo_accounts set balance = balance + 30 where id = 2")
            .await
            .context("the transaction did not survive")?;
        anyhow::Ok(started.elapsed())
    });
    repaired?;
    let pause = pause?;
    let lock_timeout: String = client.query_one("show lock_timeout", &[]).await?.get(0);
    client.batch_execute("commit").await?;
    println!(
        "   … UPDATE (+30 to account 2); SHOW lock_timeout = {lock_timeout}; COMMIT: all fine"
    );
    let balances: Vec<i64> = client
        .query("select balance from reprise_demo_accounts order by id", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let after = stats(&client).await?;
    let delta =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    println!(
        "   pause {:.1} ms; {} commands replayed; {} failover recovered, {} failed \
         (every replayed command's state hash and result digest matched); balances {balances:?}",
        pause.as_secs_f64() * 1000.0,
        delta("commands_replayed"),
        delta("failovers_recovered"),
        delta("failovers_failed"),
    );
    if balances != [70, 130] || delta("failovers_recovered") != 1 {
        bail!("the failover did not go as it should: balances {balances:?}");
    }
    client
        .batch_execute("drop table reprise_demo_accounts")
        .await?;
    Ok(())
}

/// The server process of a session in the middle of a transaction is
/// terminated.
async fn failover(
    args: &DemoArgs,
    address: std::net::SocketAddr,
    backend: &Backend,
) -> anyhow::Result<()> {
    println!(
        "7. Failover: the server process of a session in the middle of a transaction is terminated"
    );
    let observer_conn = format!(
        "host={} port={} user={} dbname=postgres",
        backend.host, backend.port, args.user
    );
    let (observer, connection) = tokio_postgres::connect(&observer_conn, NoTls)
        .await
        .context("cannot connect to the server directly")?;
    tokio::spawn(connection);
    interrupted_transfer(args, address, || async {
        let row = observer
            .query_one(
                "select count(*) filter (where pg_terminate_backend(pid, 5000)) from pg_stat_activity \
                 where application_name = 'reprise-demo-transfer'",
                &[],
            )
            .await?;
        let terminated: i64 = row.get(0);
        println!("   pg_terminate_backend() of its server process ({terminated} terminated)");
        Ok(())
    }, async { Ok(()) })
    .await
}

/// The primary dies (SIGKILL of its postmaster) and its synchronous
/// standby is promoted.
async fn promotion(
    args: &DemoArgs,
    address: std::net::SocketAddr,
    primary: &mut throwaway_pg::Cluster,
    standby: &throwaway_pg::Cluster,
) -> anyhow::Result<()> {
    println!("8. Promotion: the primary is killed in the middle of a transaction and its standby promoted");
    let primary_conn = format!(
        "host={} port={} user={} dbname=postgres",
        primary.host(),
        primary.port(),
        args.user
    );
    let (observer, connection) = tokio_postgres::connect(&primary_conn, NoTls).await?;
    tokio::spawn(connection);
    // The throwaway cluster does not wait for WAL flushes at commit; a
    // synchronous standby needs it to.
    for setting in ["synchronous_standby_names = '*'", "synchronous_commit = on"] {
        observer
            .batch_execute(&format!("alter system set {setting}"))
            .await?;
    }
    observer.batch_execute("select pg_reload_conf()").await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = observer
            .query_one(
                "select count(*) from pg_stat_replication where sync_state = 'sync'",
                &[],
            )
            .await?;
        if row.get::<_, i64>(0) == 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the standby did not become synchronous");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(observer);
    println!("   the standby replicates synchronously");
    let standby_conn = format!(
        "host={} port={} user={} dbname=postgres",
        standby.host(),
        standby.port(),
        args.user
    );
    interrupted_transfer(
        args,
        address,
        || async {
            tokio::task::block_in_place(|| primary.kill9_postmaster())
                .context("cannot kill the primary")?;
            println!("   kill -9 of the primary's postmaster; the client goes on and waits");
            Ok(())
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::task::block_in_place(|| standby.promote())
                .context("cannot promote the standby")?;
            let (promoted, connection) = tokio_postgres::connect(&standby_conn, NoTls).await?;
            tokio::spawn(connection);
            // The promoted standby has no standby of its own to wait for.
            promoted
                .batch_execute("alter system reset synchronous_standby_names")
                .await?;
            promoted.batch_execute("select pg_reload_conf()").await?;
            println!("   standby promoted: it takes writes now");
            Ok(())
        },
    )
    .await
}
