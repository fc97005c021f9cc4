//! `reprise journal …`: read a journal (stats, inspect) and write a
//! synthetic load through the real writer (load, bench).
//!
//! The readers never change the directory: they scan with
//! [`Mode::ReadOnly`] from the first segment on, whatever the checkpoint
//! says.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reprise::journal::checkpoint;
use reprise::journal::record::{now_micros, Record};
use reprise::journal::recovery::{self, CorruptionPolicy, Mode, Recovery};
use reprise::journal::report::{summarize_messages, Collector, DamageReport};
use reprise::journal::segment;
use reprise::journal::synthetic;
use reprise::journal::{
    Appended, FsyncPolicy, Journal, Retain, ScannedRecord, WriterSettings, JOURNAL_DIR,
};
use reprise::stats::Stats;

#[derive(Args, Debug)]
pub struct JournalArgs {
    #[command(subcommand)]
    command: JournalCommand,
}

#[derive(Subcommand, Debug)]
enum JournalCommand {
    /// Segments, records per kind, sessions, commands, template dedup,
    /// safe-point intervals, replay-log sizes and damage.
    Stats(StatsArgs),
    /// One line per record.
    Inspect(InspectArgs),
    /// Append synthetic sessions and commands through the journal writer
    /// and report the throughput.
    Load(LoadArgs),
    /// Append throughput under each fsync policy, in one table.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct StatsArgs {
    /// The data directory or the journal directory itself.
    dir: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The data directory or the journal directory itself.
    dir: PathBuf,
    /// Only this session's records.
    #[arg(long)]
    session: Option<u64>,
    /// JSON Lines: one object per record, full ids, raw messages.
    #[arg(long)]
    json: bool,
    /// Show every message of a command and its whole SQL, not the first
    /// few messages and 120 characters.
    #[arg(long)]
    all: bool,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// The data directory or the journal directory itself; created if
    /// missing (as DIR/journal).
    dir: PathBuf,
    #[arg(long, value_enum)]
    fsync: FsyncPolicy,
    #[command(flatten)]
    load: LoadOptions,
    /// Commands to append, over all sessions.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Under `always`: print `durable SESSION SEQ` for every command once
    /// it is on disk.
    #[arg(long)]
    print_durable: bool,
}

#[derive(Args, Debug, Clone)]
struct LoadOptions {
    /// Size of each command record on disk, framing included.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Sessions, each appending from its own thread.
    #[arg(long, default_value_t = 8)]
    sessions: u64,
    /// A safe point after every this many commands of a session (0:
    /// never, so that every command stays needed).
    #[arg(long, default_value_t = 0)]
    safe_every: u64,
    /// The `batch` policy's interval.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    fsync_interval: Duration,
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    segment_size: u64,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Seconds of appending per fsync policy.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Where to create the temporary journals (default: the system's
    /// temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    load: LoadOptions,
}

pub fn run(args: JournalArgs) -> anyhow::Result<()> {
    match args.command {
        JournalCommand::Stats(args) => stats(args),
        JournalCommand::Inspect(args) => inspect(args),
        JournalCommand::Load(args) => load(args),
        JournalCommand::Bench(args) => bench(args),
    }
}

/// The journal directory `dir` names: `dir/journal` if there is one,
/// else `dir` itself if it holds segments or a checkpoint.
fn find_journal(dir: &Path) -> anyhow::Result<PathBuf> {
    let nested = dir.join(JOURNAL_DIR);
    if nested.is_dir() {
        return Ok(nested);
    }
    if is_journal(dir) {
        return Ok(dir.to_owned());
    }
    bail!(
        "no journal in {}: neither {} nor segment files or a checkpoint there",
        dir.display(),
        nested.display()
    )
}

fn is_journal(dir: &Path) -> bool {
    checkpoint::exists(dir)
        || segment::list_segments(dir).is_ok_and(|segments| !segments.is_empty())
}

/// A bar on stderr for journals big enough to take a while, and only for
/// a person watching.
fn progress_bar(dir: &Path) -> ProgressBar {
    let total: u64 = segment::list_segments(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, path)| std::fs::metadata(path).ok())
        .map(|meta| meta.len())
        .sum();
    if total < 4 * 1024 * 1024 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)")
    {
        bar.set_style(style);
    }
    bar
}

/// Scans `dir` read-only from its first segment.
fn read(dir: &Path, visit: impl FnMut(&ScannedRecord)) -> anyhow::Result<Recovery> {
    let bar = progress_bar(dir);
    let recovery = recovery::scan(dir, Mode::ReadOnly, true, visit, |read| {
        bar.set_position(read)
    })
    .with_context(|| format!("cannot read the journal in {}", dir.display()))?;
    bar.finish_and_clear();
    Ok(recovery)
}

fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let dir = find_journal(&args.dir)?;
    let mut collector = Collector::default();
    let recovery = read(&dir, |scanned| collector.record(scanned))?;
    let report = collector.finish(&recovery);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(out, "journal {}", dir.display())?;
        write!(out, "{report}")?;
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let dir = find_journal(&args.dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut failed = None;
    let recovery = read(&dir, |scanned| {
        if failed.is_some()
            || args
                .session
                .is_some_and(|s| scanned.record.session() != Some(s))
        {
            return;
        }
        let written = if args.json {
            serde_json::to_writer(&mut out, &record_json(scanned))
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
        } else {
            writeln!(out, "{}", record_line(scanned, args.all))
        };
        // A closed pipe (`| head`) ends the output, not the scan's
        // bookkeeping; the error is reported once at the end.
        if let Err(err) = written {
            failed = Some(err);
        }
    })?;
    if let Some(err) = failed {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(err.into());
    }
    for damage in &recovery.damage {
        let report = DamageReport::new(damage, recovery.torn_tail.as_ref());
        if args.json {
            let line = serde_json::json!({ "kind": "damage", "damage": report });
            writeln!(out, "{line}")?;
        } else {
            let torn = if report.torn_tail { " [torn tail]" } else { "" };
            eprintln!("damage {damage}{torn}");
        }
    }
    for problem in &recovery.checkpoint_problems {
        if args.json {
            let line = serde_json::json!({ "kind": "checkpoint_problem", "problem": problem });
            writeln!(out, "{line}")?;
        } else {
            eprintln!("checkpoint {problem}");
        }
    }
    out.flush()?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// The first 6 bytes, as ids are shown in logs.
fn short(bytes: &[u8]) -> String {
    hex(&bytes[..bytes.len().min(6)])
}

fn rfc3339(micros: u64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_micros(micros);
    humantime::format_rfc3339_micros(time).to_string()
}

const SQL_SHOWN: usize = 120;
const MESSAGES_SHOWN: usize = 8;

fn record_line(scanned: &ScannedRecord, all: bool) -> String {
    let record = &scanned.record;
    let session = record
        .session()
        .map_or_else(|| "-".to_owned(), |s| s.to_string());
    let head = format!(
        "{:<16} {:<13} {:>6} {}",
        scanned.position.to_string(),
        record.kind().name(),
        session,
        rfc3339(record.at())
    );
    let fields = match record {
        Record::Template { id, encoding, .. } => {
            format!("id={} encoding={}B", short(id.as_bytes()), encoding.len())
        }
        Record::SessionStart {
            template, startup, ..
        } => {
            let params: Vec<String> = startup
                .iter()
                .map(|(name, value)| {
                    format!(
                        "{}={}",
                        String::from_utf8_lossy(name),
                        String::from_utf8_lossy(value)
                    )
                })
                .collect();
            format!(
                "template={} startup={:?}",
                short(template.as_bytes()),
                params.join(" ")
            )
        }
        Record::Command {
            seq,
            state_hash,
            omitted,
            message_len,
            messages,
            ..
        } => {
            let mut line = format!(
                "seq={seq} state={} bytes={message_len}",
                short(state_hash.as_bytes())
            );
            if *omitted != reprise::journal::Omitted::No {
                line.push_str(&format!(" omitted={}", omitted.name()));
            }
            let summary = summarize_messages(messages);
            let shown = if all { summary.len() } else { MESSAGES_SHOWN };
            for message in summary.iter().take(shown) {
                line.push(' ');
                line.push_str(&message.tag);
                if let Some(text) = &message.text {
                    let keep = if all { usize::MAX } else { SQL_SHOWN };
                    let truncated: String = text.chars().take(keep).collect();
                    let more = if truncated.len() < text.len() {
                        "…"
                    } else {
                        ""
                    };
                    line.push_str(&format!(" {truncated:?}{more}"));
                }
            }
            if summary.len() > shown {
                line.push_str(&format!(" … {} more", summary.len() - shown));
            }
            line
        }
        Record::SafePoint {
            template,
            state_hash,
            ..
        } => format!(
            "template={} state={}",
            short(template.as_bytes()),
            short(state_hash.as_bytes())
        ),
        Record::Outcome { kind, detail, .. } => format!("{} {detail:?}", kind.name()),
        Record::SessionEnd { .. } => String::new(),
    };
    format!("{head} {fields}").trim_end().to_owned()
}

fn record_json(scanned: &ScannedRecord) -> serde_json::Value {
    let record = &scanned.record;
    let mut value = serde_json::json!({
        "segment": scanned.position.segment,
        "offset": scanned.position.offset,
        "len": scanned.len,
        "kind": record.kind().name(),
        "session": record.session(),
        "at": record.at(),
        "time": rfc3339(record.at()),
    });
    let fields = match record {
        Record::Template { id, encoding, .. } => serde_json::json!({
            "id": hex(id.as_bytes()),
            "encoding": base64::engine::general_purpose::STANDARD.encode(encoding),
        }),
        Record::SessionStart {
            template, startup, ..
        } => serde_json::json!({
            "template": hex(template.as_bytes()),
            "startup": startup
                .iter()
                .map(|(name, value)| {
                    [
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    ]
                })
                .collect::<Vec<_>>(),
        }),
        Record::Command {
            seq,
            state_hash,
            result_digest,
            omitted,
            message_len,
            messages,
            ..
        } => serde_json::json!({
            "seq": seq,
            "state_hash": hex(state_hash.as_bytes()),
            "result_digest": hex(result_digest),
            "omitted": omitted.name(),
            "message_len": message_len,
            "messages": summarize_messages(messages),
            "messages_base64": base64::engine::general_purpose::STANDARD.encode(messages),
        }),
        Record::SafePoint {
            template,
            state_hash,
            ..
        } => serde_json::json!({
            "template": hex(template.as_bytes()),
            "state_hash": hex(state_hash.as_bytes()),
        }),
        Record::Outcome { kind, detail, .. } => serde_json::json!({
            "outcome": kind.name(),
            "detail": detail,
        }),
        Record::SessionEnd { .. } => serde_json::json!({}),
    };
    if let (Some(value), serde_json::Value::Object(fields)) = (value.as_object_mut(), fields) {
        value.extend(fields);
    }
    value
}

/// What one load run did.
struct Throughput {
    records: u64,
    bytes: u64,
    elapsed: Duration,
    fsyncs: u64,
}

impl Throughput {
    fn records_per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Where `load` writes: like [`find_journal`], but a directory without a
/// journal gets one, as `dir/journal`.
fn load_dir(dir: &Path) -> PathBuf {
    find_journal(dir).unwrap_or_else(|_| dir.join(JOURNAL_DIR))
}

fn load(args: LoadArgs) -> anyhow::Result<()> {
    if args.print_durable && args.fsync != FsyncPolicy::Always {
        bail!("--print-durable needs --fsync always: only then is a record known to be durable");
    }
    let dir = load_dir(&args.dir);
    let limit = Limit::Records(args.records);
    let result = run_load(&dir, args.fsync, &args.load, limit, args.print_durable)?;
    eprintln!(
        "{} records, {} bytes in {:.2?}: {:.0} records/s, {:.1} MB/s, {} fsyncs (fsync {})",
        result.records,
        result.bytes,
        result.elapsed,
        result.records_per_second(),
        result.megabytes_per_second(),
        result.fsyncs,
        policy_name(args.fsync)
    );
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut rows = Vec::new();
    for policy in [FsyncPolicy::Off, FsyncPolicy::Batch, FsyncPolicy::Always] {
        let temp = tempfile::Builder::new()
            .prefix("reprise-journal-bench-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let result = run_load(
            temp.path(),
            policy,
            &args.load,
            Limit::Until(deadline),
            false,
        )?;
        rows.push((policy, result));
    }
    println!(
        "{}-byte command records, {} sessions, {} s per policy, journal in {}",
        args.load.size.max(synthetic::MIN_COMMAND_SIZE),
        args.load.sessions,
        args.seconds,
        parent.display()
    );
    println!(
        "{:<8} {:>12} {:>12} {:>10} {:>10} {:>14}",
        "fsync", "records", "records/s", "MB/s", "fsyncs", "records/fsync"
    );
    for (policy, result) in rows {
        let per_fsync = if result.fsyncs == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}", result.records as f64 / result.fsyncs as f64)
        };
        println!(
            "{:<8} {:>12} {:>12.0} {:>10.1} {:>10} {:>14}",
            policy_name(policy),
            result.records,
            result.records_per_second(),
            result.megabytes_per_second(),
            result.fsyncs,
            per_fsync
        );
    }
    Ok(())
}

fn policy_name(policy: FsyncPolicy) -> &'static str {
    match policy {
        FsyncPolicy::Off => "off",
        FsyncPolicy::Batch => "batch",
        FsyncPolicy::Always => "always",
    }
}

#[derive(Clone, Copy)]
enum Limit {
    /// Commands over all sessions.
    Records(u64),
    Until(Instant),
}

/// Recovers `dir` as the proxy would at start-up, starts the writer and
/// has `options.sessions` threads append commands until `limit`. Under
/// `always` every thread waits for each of its records, as a session
/// does, so that concurrent sessions share fsyncs (group commit).
fn run_load(
    dir: &Path,
    fsync: FsyncPolicy,
    options: &LoadOptions,
    limit: Limit,
    print_durable: bool,
) -> anyhow::Result<Throughput> {
    let recovered = recovery::scan(
        dir,
        Mode::Repair(CorruptionPolicy::Quarantine),
        false,
        |_| {},
        |_| {},
    )
    .with_context(|| format!("cannot recover the journal in {}", dir.display()))?;
    for damage in recovered.inner_damage() {
        eprintln!("quarantined: {damage}");
    }
    let stats = Arc::new(Stats::default());
    let settings = WriterSettings {
        dir: dir.to_owned(),
        fsync,
        fsync_interval: options.fsync_interval,
        segment_size: options.segment_size,
        segment_age: Duration::from_secs(3600),
        checkpoint_interval: Duration::from_secs(10),
        retain: Retain::Replay,
        retention_size: u64::MAX,
        retention_age: Duration::from_secs(24 * 3600),
        max_size: u64::MAX,
        queue_limit: 64 * 1024 * 1024,
    };
    let journal = Journal::start(settings, &recovered, Arc::clone(&stats))
        .with_context(|| format!("cannot start the journal writer in {}", dir.display()))?;
    drop(recovered);
    let handle = journal.handle();
    let sessions = options.sessions.max(1);
    let started = Instant::now();
    if handle.needs_template(synthetic::template_id()) {
        append(&handle, synthetic::template(now_micros()), false)?;
    }
    let threads: Vec<_> = (0..sessions)
        .map(|index| {
            let handle = handle.clone();
            let options = options.clone();
            let quota = match limit {
                Limit::Records(total) => total / sessions + u64::from(index < total % sessions),
                Limit::Until(_) => u64::MAX,
            };
            std::thread::spawn(move || -> anyhow::Result<()> {
                let session = handle.next_session_id();
                let wait = fsync == FsyncPolicy::Always;
                append(
                    &handle,
                    synthetic::session_start(session, now_micros()),
                    wait,
                )?;
                let mut seq = 0;
                while seq < quota {
                    if let Limit::Until(deadline) = limit {
                        // Checking the clock every command would cost more
                        // than the append.
                        if seq % 256 == 0 && Instant::now() >= deadline {
                            break;
                        }
                    }
                    seq += 1;
                    let command = synthetic::command(session, seq, now_micros(), options.size);
                    append(&handle, command, wait)?;
                    if print_durable {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "durable {session} {seq}")?;
                        out.flush()?;
                    }
                    if options.safe_every > 0 && seq % options.safe_every == 0 {
                        append(
                            &handle,
                            synthetic::safe_point(session, seq, now_micros()),
                            wait,
                        )?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    let mut outcome = Ok(());
    for thread in threads {
        let result = thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a load thread panicked")));
        if outcome.is_ok() {
            outcome = result;
        }
    }
    // Stopping writes what is queued and syncs: part of the cost.
    journal.stop();
    let elapsed = started.elapsed();
    outcome?;
    if stats.journal_write_errors.get() > 0 {
        bail!(
            "{} journal writes failed in {}",
            stats.journal_write_errors.get(),
            dir.display()
        );
    }
    Ok(Throughput {
        records: stats.journal_records.get(),
        bytes: stats.journal_bytes.get(),
        elapsed,
        fsyncs: stats.journal_fsyncs.get(),
    })
}

/// Appends `record`, waiting while the queue is full (the load measures
/// what the writer sustains, not how much it drops), and under `always`
/// until the record is durable when `wait`.
fn append(
    handle: &reprise::journal::JournalHandle,
    record: Record,
    wait: bool,
) -> anyhow::Result<()> {
    loop {
        match handle.append(record.clone()) {
            Appended::Queued => return Ok(()),
            Appended::Durable(done) => {
                if wait {
                    done.blocking_recv()
                        .context("the journal writer failed to make a record durable")?;
                }
                return Ok(());
            }
            Appended::Dropped => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use reprise::journal::segment::Position;

    #[test]
    fn command_lines_show_the_sql() {
        let scanned = ScannedRecord {
            position: Position {
                segment: 2,
                offset: 40,
            },
            len: 200,
            record: synthetic::command(7, 3, 1_700_000_000_000_000, 200),
        };
        let line = record_line(&scanned, false);
        assert!(line.starts_with("2:40 "), "{line}");
        assert!(line.contains("command"), "{line}");
        assert!(line.contains("2023-11-14T22:13:20.000000Z"), "{line}");
        assert!(line.contains("seq=3"), "{line}");
        assert!(line.contains("Q \"SELECT 7, 3"), "{line}");
        let json = record_json(&scanned);
        assert_eq!(json["seq"], 3);
        assert_eq!(json["messages"][0]["tag"], "Q");
        assert_eq!(json["state_hash"].as_str().map(str::len), Some(64));
        let Record::Command { messages, .. } = &scanned.record else {
            unreachable!()
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(json["messages_base64"].as_str().unwrap_or_default())
            .expect("base64");
        assert_eq!(Bytes::from(raw), messages);
    }

    #[test]
    fn long_sql_is_cut() {
        let sql = "x".repeat(500);
        let mut messages = vec![b'Q'];
        messages.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
        messages.extend_from_slice(sql.as_bytes());
        messages.push(0);
        let scanned = ScannedRecord {
            position: Position::default(),
            len: 0,
            record: Record::Command {
                session: 1,
                at: 0,
                seq: 1,
                state_hash: reprise::template::StateHash::from_bytes([0; 32]),
                result_digest: [0; 32],
                omitted: reprise::journal::Omitted::No,
                message_len: messages.len() as u64,
                messages: Bytes::from(messages),
            },
        };
        let line = record_line(&scanned, false);
        assert!(
            line.contains(&format!("{:?}…", "x".repeat(SQL_SHOWN))),
            "{line}"
        );
    }
}
