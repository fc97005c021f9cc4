//! `reprise bench`: pgbench (select-only, and TPC-B with `--workloads`),
//! direct to PostgreSQL, through Reprise and (when available) through
//! PgBouncer in session mode, all in one run and interleaved, so that the machine's drift hits every target
//! alike. Reports the median TPS per cell, the ratios (the median of the
//! ratios of runs made back to back) and what each proxy process spends in
//! CPU time per transaction, the measure of its own cost that the
//! machine's noise disturbs least.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Interleaved runs per target and cell; the median is reported.
    #[arg(long, default_value_t = 5)]
    pairs: usize,
    /// Client counts (pgbench -c).
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    clients: Vec<u32>,
    /// Query modes (pgbench -M).
    #[arg(long, value_delimiter = ',', default_value = "simple,prepared")]
    modes: Vec<String>,
    /// pgbench scale factor for the initial data.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// pgbench worker threads (-j).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Skip PgBouncer even when it is installed.
    #[arg(long)]
    no_pgbouncer: bool,
    /// Do not try to install PgBouncer with apt-get when it is missing.
    #[arg(long)]
    no_install: bool,
    /// Also run a second Reprise with `session_tracking = false`, to
    /// measure what state tracking costs (the tracked/untracked column).
    #[arg(long)]
    untracked: bool,
    /// Also run a second Reprise with the journal off, to measure what the
    /// journal costs (the journal/no-journal column).
    #[arg(long)]
    journal: bool,
    /// Also run one Reprise per worker count given here (`workers = N`),
    /// to compare thread counts in the same run (the wN/pgbouncer columns).
    #[arg(long, value_delimiter = ',', value_name = "COUNTS")]
    workers: Vec<usize>,
    /// pgbench workloads: `select` (-S) and `tpcb` (the built-in TPC-B
    /// like script).
    #[arg(long, value_delimiter = ',', default_value = "select")]
    workloads: Vec<Workload>,
    /// Instead of the pgbench matrix, measure the pause a client sees
    /// when its server process is terminated, over this many failures.
    #[arg(long, value_name = "FAILURES")]
    recovery: Option<usize>,
    /// Instead of the pgbench matrix, time refused logins of a known and
    /// an unknown user (and a successful one) under scram-sha-256 and md5,
    /// this many attempts each.
    #[arg(long, value_name = "ATTEMPTS")]
    auth: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Select,
    Tpcb,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Select => "select",
            Workload::Tpcb => "tpcb",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Direct,
    Reprise,
    PgBouncer,
    RepriseUntracked,
    RepriseNoJournal,
    RepriseWorkers(usize),
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Direct => "direct".to_owned(),
            Target::Reprise => "reprise".to_owned(),
            Target::PgBouncer => "pgbouncer".to_owned(),
            Target::RepriseUntracked => "untracked".to_owned(),
            Target::RepriseNoJournal => "nojournal".to_owned(),
            Target::RepriseWorkers(count) => format!("w{count}"),
        }
    }
}

/// A ratio column: `numerator / denominator`, both targets of the run.
#[derive(Clone, Debug)]
struct RatioColumn {
    header: String,
    numerator: usize,
    denominator: usize,
}

/// The ratio columns this run can fill: Reprise against direct and
/// PgBouncer, each variant against the Reprise it differs from, and each
/// worker count against PgBouncer.
fn ratio_columns(targets: &[Target]) -> (Vec<RatioColumn>, Vec<RatioColumn>) {
    let at = |wanted: Target| targets.iter().position(|target| *target == wanted);
    let column = |header: &str, numerator: Option<usize>, denominator: Option<usize>| {
        Some(RatioColumn {
            header: header.to_owned(),
            numerator: numerator?,
            denominator: denominator?,
        })
    };
    let reprise = at(Target::Reprise);
    let pgbouncer = at(Target::PgBouncer);
    let mut tps = vec![
        column("reprise/direct", reprise, at(Target::Direct)),
        column("reprise/pgbouncer", reprise, pgbouncer),
    ];
    let mut cpu = vec![column("reprise/pgbouncer", reprise, pgbouncer)];
    let variants = [
        column("tracked/untracked", reprise, at(Target::RepriseUntracked)),
        column("journal/nojournal", reprise, at(Target::RepriseNoJournal)),
    ];
    tps.extend(variants.iter().cloned());
    cpu.extend(variants);
    for (index, target) in targets.iter().enumerate() {
        if let Target::RepriseWorkers(count) = target {
            let header = format!("w{count}/pgbouncer");
            tps.push(column(&header, Some(index), pgbouncer));
            cpu.push(column(&header, Some(index), pgbouncer));
        }
    }
    (
        tps.into_iter().flatten().collect(),
        cpu.into_iter().flatten().collect(),
    )
}

/// A child process killed on drop, so that an error or Ctrl-C never leaves
/// a proxy running.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // The bench checks this between pgbench runs and unwinds normally, so
    // that the cluster and the proxies it started are stopped on Ctrl-C.
    let interrupted = crate::interrupt_token()?;
    tokio::task::spawn_blocking(move || bench(&args, &interrupted)).await?
}

fn bench(args: &BenchArgs, interrupted: &CancellationToken) -> anyhow::Result<()> {
    if let Some(attempts) = args.auth {
        return auth_bench(attempts);
    }
    let max_clients = args.clients.iter().copied().max().unwrap_or(32);
    let cluster = throwaway_pg::Cluster::start_with(throwaway_pg::Options {
        max_connections: max_clients * 2 + 20,
        ..throwaway_pg::Options::default()
    })
    .context("cannot start a throwaway PostgreSQL")?;
    let pgbench = cluster.install().bin("pgbench");
    let work = tempfile::Builder::new()
        .prefix("reprise-bench-")
        .tempdir()?;
    if let Some(failures) = args.recovery {
        let reprise_port = throwaway_pg::lease_port()?;
        let _reprise = start_reprise(
            &work.path().join("tracked"),
            reprise_port.port(),
            cluster.port(),
            "",
        )?;
        wait_for_port(reprise_port.port()).context("reprise does not accept connections")?;
        println!(
            "PostgreSQL on port {}; {failures} failures …",
            cluster.port()
        );
        let report = crate::recovery_bench::run(failures, &cluster, reprise_port.port())?;
        print!("{report}");
        return Ok(());
    }
    println!(
        "PostgreSQL on port {}; initializing pgbench scale {} …",
        cluster.port(),
        args.scale
    );
    let init = Command::new(&pgbench)
        .args(["-i", "-q", "-s", &args.scale.to_string()])
        .args(connection_args(cluster.host(), cluster.port()))
        .output()
        .context("cannot run pgbench -i")?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }

    let reprise_port = throwaway_pg::lease_port()?;
    let reprise = start_reprise(
        &work.path().join("tracked"),
        reprise_port.port(),
        cluster.port(),
        "",
    )?;

    let mut targets = vec![
        (Target::Direct, cluster.port(), None),
        (Target::Reprise, reprise_port.port(), Some(reprise.0.id())),
    ];
    let mut _pgbouncer = None;
    let pgbouncer_port = throwaway_pg::lease_port()?;
    if !args.no_pgbouncer {
        match find_pgbouncer(!args.no_install) {
            Some(binary) => {
                let child = start_pgbouncer(
                    &binary,
                    work.path(),
                    pgbouncer_port.port(),
                    &cluster,
                    max_clients,
                )?;
                targets.push((Target::PgBouncer, pgbouncer_port.port(), Some(child.0.id())));
                _pgbouncer = Some(child);
            }
            None => println!(
                "PgBouncer is not installed and could not be installed: comparing with direct only"
            ),
        }
    }
    let untracked_port = throwaway_pg::lease_port()?;
    let _untracked = if args.untracked {
        let child = start_reprise(
            &work.path().join("untracked"),
            untracked_port.port(),
            cluster.port(),
            "session_tracking = false\n",
        )?;
        targets.push((
            Target::RepriseUntracked,
            untracked_port.port(),
            Some(child.0.id()),
        ));
        Some(child)
    } else {
        None
    };
    let no_journal_port = throwaway_pg::lease_port()?;
    let _no_journal = if args.journal {
        let child = start_reprise(
            &work.path().join("nojournal"),
            no_journal_port.port(),
            cluster.port(),
            "[journal]\nenabled = false\n",
        )?;
        targets.push((
            Target::RepriseNoJournal,
            no_journal_port.port(),
            Some(child.0.id()),
        ));
        Some(child)
    } else {
        None
    };
    let mut _by_workers = Vec::new();
    let mut worker_ports = Vec::new();
    for &count in &args.workers {
        let port = throwaway_pg::lease_port()?;
        let child = start_reprise(
            &work.path().join(format!("workers-{count}")),
            port.port(),
            cluster.port(),
            &format!("workers = {count}\n"),
        )?;
        targets.push((
            Target::RepriseWorkers(count),
            port.port(),
            Some(child.0.id()),
        ));
        _by_workers.push(child);
        worker_ports.push(port);
    }
    for (target, port, _) in &targets {
        wait_for_port(*port)
            .with_context(|| format!("{} does not accept connections", target.name()))?;
    }
    let _reprise = reprise;

    let mut report = String::new();
    writeln!(
        report,
        "\npgbench, {}s runs, {} interleaved rounds, -j {}: median TPS per target; \
         each ratio is the median of the ratios within a round",
        args.seconds, args.pairs, args.threads
    )?;
    write!(report, "{:<17} {:>7}", "workload/mode", "clients")?;
    for (target, _, _) in &targets {
        write!(report, " {:>13}", format!("{} tps", target.name()))?;
    }
    let (tps_columns, cpu_columns) = ratio_columns(
        &targets
            .iter()
            .map(|(target, _, _)| *target)
            .collect::<Vec<_>>(),
    );
    for column in &tps_columns {
        write!(report, " {:>18}", column.header)?;
    }
    writeln!(report)?;
    let mut cpu_report = String::new();
    writeln!(
        cpu_report,
        "\nproxy CPU time per transaction (user + system, µs, median)"
    )?;
    write!(cpu_report, "{:<17} {:>7}", "workload/mode", "clients")?;
    for (target, _, pid) in &targets {
        if pid.is_some() {
            write!(cpu_report, " {:>13}", target.name())?;
        }
    }
    for column in &cpu_columns {
        write!(cpu_report, " {:>18}", column.header)?;
    }
    writeln!(cpu_report)?;
    let mut all_samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    let cells: Vec<(Workload, &String)> = args
        .workloads
        .iter()
        .flat_map(|workload| args.modes.iter().map(move |mode| (*workload, mode)))
        .collect();
    for &(workload, mode) in &cells {
        for &clients in &args.clients {
            let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
            for pair in 0..args.pairs {
                for index in round_order(pair, targets.len()) {
                    if interrupted.is_cancelled() {
                        bail!("interrupted: stopped the proxies and the throwaway PostgreSQL");
                    }
                    let (target, port, pid) = targets[index];
                    let cpu_before = pid.map(process_cpu).transpose()?;
                    let run = run_pgbench(
                        &pgbench,
                        workload,
                        mode,
                        clients,
                        args.threads,
                        args.seconds,
                        port,
                    )
                    .with_context(|| format!("pgbench against {}", target.name()))?;
                    let cpu_per_transaction = match (pid, cpu_before) {
                        (Some(pid), Some(before)) => {
                            let spent = process_cpu(pid)? - before;
                            Some(spent.as_secs_f64() * 1e6 / run.transactions.max(1) as f64)
                        }
                        _ => None,
                    };
                    println!(
                        "  {:<6} {mode:<8} c={clients:<3} run {} {:<9} {:>10.0} tps{}",
                        workload.name(),
                        pair + 1,
                        target.name(),
                        run.tps,
                        cpu_per_transaction
                            .map(|cpu| format!(" {cpu:>7.1} µs CPU/tx"))
                            .unwrap_or_default()
                    );
                    samples[index].push(Sample {
                        tps: run.tps,
                        cpu_per_transaction,
                    });
                }
            }
            write_rows(
                &mut report,
                &mut cpu_report,
                &format!("{:<17} {clients:>7}", format!("{}/{mode}", workload.name())),
                &samples,
                &tps_columns,
                &cpu_columns,
            )?;
            for (all, runs) in all_samples.iter_mut().zip(samples) {
                all.extend(runs);
            }
        }
    }
    if cells.len() * args.clients.len() > 1 {
        // Every round of every cell: the most samples for each ratio.
        write_rows(
            &mut report,
            &mut cpu_report,
            &format!("{:<25}", "all rounds"),
            &all_samples,
            &tps_columns,
            &cpu_columns,
        )?;
    }
    println!("{report}{cpu_report}");
    Ok(())
}

/// The order of the targets in round `round`: rotated each round so that
/// no target always runs first or last, and reversed every other round so
/// that no target always follows the same one (a run is slower right
/// after the direct run has warmed PostgreSQL up, say).
fn round_order(round: usize, targets: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..targets)
        .map(|offset| (round / 2 + offset) % targets)
        .collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// One row of each table: median TPS and CPU per transaction per target,
/// then the ratio columns.
fn write_rows(
    report: &mut String,
    cpu_report: &mut String,
    label: &str,
    samples: &[Vec<Sample>],
    tps_columns: &[RatioColumn],
    cpu_columns: &[RatioColumn],
) -> std::fmt::Result {
    let ratio = |column: &RatioColumn, value: &dyn Fn(&Sample) -> Option<f64>| {
        paired_median(
            &samples[column.numerator],
            &samples[column.denominator],
            value,
        )
    };
    let cpu = |s: &Sample| s.cpu_per_transaction;
    write!(report, "{label}")?;
    write!(cpu_report, "{label}")?;
    for runs in samples {
        let mut values: Vec<f64> = runs.iter().map(|s| s.tps).collect();
        write!(report, " {:>13.0}", median(&mut values))?;
        let mut values: Vec<f64> = runs.iter().filter_map(cpu).collect();
        if !values.is_empty() {
            write!(cpu_report, " {:>13.1}", median(&mut values))?;
        }
    }
    for column in tps_columns {
        write!(
            report,
            " {:>18.3}",
            ratio(column, &|s: &Sample| Some(s.tps))
        )?;
    }
    writeln!(report)?;
    for column in cpu_columns {
        write!(cpu_report, " {:>18.3}", ratio(column, &cpu))?;
    }
    writeln!(cpu_report)
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    tps: f64,
    cpu_per_transaction: Option<f64>,
}

/// The median of `a[i] / b[i]` over rounds: runs of one round follow each
/// other, so the machine's slow drift cancels out of each ratio.
fn paired_median(a: &[Sample], b: &[Sample], value: impl Fn(&Sample) -> Option<f64>) -> f64 {
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(a, b)| Some(value(a)? / value(b)?))
        .collect();
    median(&mut ratios)
}

/// CPU time (user + system, all threads) a process has used so far.
fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read the CPU time of process {pid}"))?;
    cpu_from_stat(&stat, clock_ticks_per_second())
        .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100)
}

/// utime and stime, fields 14 and 15 of /proc/PID/stat; the command name
/// (field 2) is in parentheses and may contain spaces.
fn cpu_from_stat(stat: &str, ticks_per_second: u64) -> Option<Duration> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    let ticks = user + system;
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / ticks_per_second,
    ))
}

fn connection_args(host: &str, port: u16) -> Vec<String> {
    vec![
        "-h".to_owned(),
        host.to_owned(),
        "-p".to_owned(),
        port.to_string(),
        "-U".to_owned(),
        "postgres".to_owned(),
        "postgres".to_owned(),
    ]
}

fn run_pgbench(
    pgbench: &Path,
    workload: Workload,
    mode: &str,
    clients: u32,
    threads: u32,
    seconds: u32,
    port: u16,
) -> anyhow::Result<PgbenchRun> {
    let mut command = Command::new(pgbench);
    if workload == Workload::Select {
        command.arg("-S");
    }
    let output = command
        .args(["-n", "-M", mode])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &threads.min(clients).to_string(),
        ])
        .args(["-T", &seconds.to_string()])
        .args(connection_args("127.0.0.1", port))
        .output()
        .context("cannot run pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tps =
        parse_tps(&stdout).with_context(|| format!("no tps line in pgbench output:\n{stdout}"))?;
    let transactions = parse_transactions(&stdout)
        .with_context(|| format!("no transaction count in pgbench output:\n{stdout}"))?;
    Ok(PgbenchRun { tps, transactions })
}

struct PgbenchRun {
    tps: f64,
    transactions: u64,
}

/// Reads `number of transactions actually processed: 12345`.
fn parse_transactions(output: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|value| value.parse().ok())
}

/// Reads `tps = 12345.678 (without initial connection time)`.
fn parse_tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|line| line.starts_with("tps = ") && line.contains("without initial connection time"))
        .and_then(|line| line.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// A Reprise with `settings` (TOML) on top of the defaults.
/// `--auth`: a server that asks every user but its superuser for
/// SCRAM, one Reprise per client method in front of it, and the server
/// itself for reference.
fn auth_bench(attempts: usize) -> anyhow::Result<()> {
    let cluster = throwaway_pg::Cluster::start_with(throwaway_pg::Options {
        hba: Some(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
                .to_owned(),
        ),
        ..throwaway_pg::Options::default()
    })
    .context("cannot start a throwaway PostgreSQL")?;
    let work = tempfile::Builder::new()
        .prefix("reprise-bench-")
        .tempdir()?;
    let users = work.path().join("users.txt");
    crate::auth_bench::prepare(&cluster, &users)?;
    let mut targets = vec![("PostgreSQL directly, scram-sha-256", cluster.port())];
    let mut leases = Vec::new();
    let mut running = Vec::new();
    for method in ["scram-sha-256", "md5"] {
        let port = throwaway_pg::lease_port()?;
        running.push(start_reprise(
            &work.path().join(method),
            port.port(),
            cluster.port(),
            &format!(
                "auth_type = \"{method}\"\nusers_file = \"{}\"\n",
                users.display()
            ),
        )?);
        wait_for_port(port.port()).context("reprise does not accept connections")?;
        targets.push((
            if method == "md5" {
                "Reprise, auth_type = md5"
            } else {
                "Reprise, auth_type = scram-sha-256"
            },
            port.port(),
        ));
        leases.push(port);
    }
    println!(
        "PostgreSQL on port {}; {attempts} attempts per case …",
        cluster.port()
    );
    let report = crate::auth_bench::run(attempts, &targets)?;
    print!("{report}");
    Ok(())
}

fn start_reprise(
    work: &Path,
    port: u16,
    server_port: u16,
    settings: &str,
) -> anyhow::Result<Guarded> {
    let exe = std::env::current_exe().context("cannot find the reprise executable")?;
    std::fs::create_dir_all(work)?;
    let config = work.join("reprise.toml");
    std::fs::write(&config, format!("log_level = \"warn\"\n{settings}"))?;
    let child = Command::new(exe)
        .args(["serve", "--config", &config.display().to_string()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--backend", &format!("bench=127.0.0.1:{server_port}")])
        .args(["--data-dir", &work.join("data").display().to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start reprise serve")?;
    Ok(Guarded(child))
}

fn find_pgbouncer(install: bool) -> Option<PathBuf> {
    let candidates = [
        "/usr/sbin/pgbouncer",
        "/usr/bin/pgbouncer",
        "/usr/local/bin/pgbouncer",
    ];
    let found = || {
        candidates
            .iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
    };
    if let Some(path) = found() {
        return Some(path);
    }
    if !install || !nix::unistd::geteuid().is_root() {
        return None;
    }
    println!("Installing PgBouncer with apt-get …");
    let quiet = |cmd: &mut Command| {
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    };
    if !quiet(Command::new("apt-get").args(["install", "-y", "-q", "pgbouncer"])) {
        quiet(Command::new("apt-get").args(["update", "-q"]));
        quiet(Command::new("apt-get").args(["install", "-y", "-q", "pgbouncer"]));
    }
    // The Debian package starts its own service on the default port; this
    // run uses a private instance, so stop that one if it came up.
    quiet(Command::new("service").args(["pgbouncer", "stop"]));
    found()
}

fn start_pgbouncer(
    binary: &Path,
    work: &Path,
    port: u16,
    cluster: &throwaway_pg::Cluster,
    max_clients: u32,
) -> anyhow::Result<Guarded> {
    let dir = work.join("pgbouncer");
    std::fs::create_dir_all(&dir)?;
    let auth_file = dir.join("users.txt");
    std::fs::write(&auth_file, "\"postgres\" \"\"\n")?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={server}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {auth}\npool_mode = session\nmax_client_conn = {clients}\n\
             default_pool_size = {clients}\nlogfile = {log}\npidfile = {pid}\n",
            server = cluster.port(),
            auth = auth_file.display(),
            clients = max_clients + 10,
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        ),
    )?;
    // PgBouncer refuses to run as root: hand its files to the server user.
    throwaway_pg::give_to_server_user(work)?;
    throwaway_pg::give_to_server_user(&dir)?;
    for file in ["users.txt", "pgbouncer.ini"] {
        throwaway_pg::give_to_server_user(&dir.join(file))?;
    }
    let mut command = Command::new(binary);
    command
        .arg(&ini)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    throwaway_pg::run_unprivileged(&mut command)?;
    Ok(Guarded(command.spawn().context("cannot start pgbouncer")?))
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("port {port} did not open within 20s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_output() {
        let output = "number of transactions actually processed: 1000\nlatency average = 0.1 ms\n\
                      initial connection time = 3.2 ms\ntps = 41234.567890 (without initial connection time)\n";
        assert_eq!(parse_tps(output), Some(41234.56789));
        assert_eq!(parse_tps("nothing"), None);
        assert_eq!(parse_transactions(output), Some(1000));
        assert_eq!(
            parse_transactions("number of transactions actually processed: 990/1000\n"),
            Some(990)
        );
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn rounds_vary_position_and_neighbour() {
        let rounds: Vec<Vec<usize>> = (0..4).map(|round| round_order(round, 4)).collect();
        assert_eq!(rounds[0], [0, 1, 2, 3]);
        assert_eq!(rounds[1], [3, 2, 1, 0]);
        assert_eq!(rounds[2], [1, 2, 3, 0]);
        for round in &rounds {
            let mut sorted = round.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
        }
    }

    #[test]
    fn reads_cpu_time_and_pairs_rounds() {
        let stat = "4242 (re prise) S 1 4242 4242 0 -1 4194560 1 0 0 0 150 50 0 0 20 0 9 0 1 2 3";
        assert_eq!(cpu_from_stat(stat, 100), Some(Duration::from_secs(2)));
        assert_eq!(cpu_from_stat("garbage", 100), None);
        let sample = |tps| Sample {
            tps,
            cpu_per_transaction: None,
        };
        let a = [sample(90.0), sample(200.0), sample(50.0)];
        let b = [sample(100.0), sample(100.0), sample(100.0)];
        assert_eq!(paired_median(&a, &b, |s| Some(s.tps)), 0.9);
        assert!(paired_median(&a, &b, |s| s.cpu_per_transaction).is_nan());
    }
}
