//! The journal on disk: crashes of a writing process, corruption of real
//! segment files, arbitrary mutations (property test), and golden files
//! that pin the format. No PostgreSQL needed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reprise::journal::checkpoint::{Checkpoint, LiveSession, CHECKPOINT_FILE};
use reprise::journal::reader::scan_segment;
use reprise::journal::record::{Omitted, OutcomeKind, Record};
use reprise::journal::recovery::{self, CorruptionPolicy, Mode, Recovery, RecoveryError};
use reprise::journal::segment::{
    list_segments, segment_name, Position, SegmentHeader, FORMAT_VERSION, HEADER_LEN,
};
use reprise::journal::{
    synthetic, Damage, FsyncPolicy, Journal, Retain, WriterSettings, JOURNAL_DIR,
};
use reprise::stats::Stats;
use reprise::template::{StateHash, TemplateId};

fn settings(dir: &Path, segment_size: u64) -> WriterSettings {
    WriterSettings {
        dir: dir.to_owned(),
        fsync: FsyncPolicy::Off,
        fsync_interval: Duration::from_millis(5),
        segment_size,
        segment_age: Duration::from_secs(3600),
        checkpoint_interval: Duration::from_secs(3600),
        retain: Retain::Replay,
        retention_size: u64::MAX,
        retention_age: Duration::from_secs(3600),
        max_size: u64::MAX,
        queue_limit: 64 * 1024 * 1024,
    }
}

fn read_only(dir: &Path) -> Recovery {
    recovery::scan(dir, Mode::ReadOnly, true, |_| {}, |_| {}).expect("read-only scan")
}

/// A record as it lies in a segment.
#[derive(Clone, Debug)]
struct Written {
    position: Position,
    len: u64,
    record: Record,
}

/// Several segments written by the real writer: sessions with commands of
/// varied sizes, safe points, outcomes and ends.
fn written_journal(dir: &Path) -> Vec<Written> {
    // Every record written as appended: nothing superseded in a batch.
    let mut every_record = settings(dir, 8 * 1024);
    every_record.retain = Retain::All;
    let journal = Journal::start(
        every_record,
        &Recovery::default(),
        Arc::new(Stats::default()),
    )
    .expect("start");
    let handle = journal.handle();
    let mut appended = vec![synthetic::template(1)];
    for session in 1..=4u64 {
        appended.push(synthetic::session_start(session, 2));
    }
    for seq in 1..=60u64 {
        for session in 1..=4u64 {
            let size = 128 + ((seq * 37 + session * 11) % 300) as usize;
            appended.push(synthetic::command(session, seq, 3 + seq, size));
        }
        if seq % 20 == 0 {
            appended.push(synthetic::safe_point(1, seq, 100 + seq));
        }
    }
    appended.push(Record::Outcome {
        session: 2,
        at: 500,
        kind: OutcomeKind::Recovered,
        detail: "replayed 3 commands".into(),
    });
    appended.push(Record::SessionEnd {
        session: 3,
        at: 501,
    });
    for record in &appended {
        handle.append(record.clone());
    }
    journal.stop();

    let mut written = Vec::new();
    for (sequence, path) in list_segments(dir).expect("list") {
        let data = std::fs::read(path).expect("read segment");
        let scan = scan_segment(sequence, &data);
        assert!(scan.damage.is_empty(), "clean journal: {:?}", scan.damage);
        written.extend(scan.records.into_iter().map(|r| Written {
            position: r.position,
            len: r.len,
            record: r.record,
        }));
    }
    let records: Vec<Record> = written.iter().map(|w| w.record.clone()).collect();
    assert_eq!(records, appended, "the writer wrote what was appended");
    assert!(list_segments(dir).expect("list").len() >= 4);
    written
}

/// The segments of a journal, by sequence.
/// A journal written by the writer, its segments' clean bytes and a
/// seeded random source, for the damage tests.
fn damage_fixture(
    seed: u64,
) -> (
    tempfile::TempDir,
    Vec<Written>,
    BTreeMap<u64, Vec<u8>>,
    StdRng,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let written = written_journal(dir.path());
    let segments = segments(dir.path());
    (dir, written, segments, StdRng::seed_from_u64(seed))
}

/// A segment chosen at random: its sequence number and clean bytes.
fn pick<'a>(rng: &mut StdRng, segments: &'a BTreeMap<u64, Vec<u8>>) -> (u64, &'a Vec<u8>) {
    let (sequence, clean) = segments
        .iter()
        .nth(rng.gen_range(0..segments.len()))
        .expect("segment");
    (*sequence, clean)
}

fn segments(dir: &Path) -> BTreeMap<u64, Vec<u8>> {
    list_segments(dir)
        .expect("list")
        .into_iter()
        .map(|(sequence, path)| (sequence, std::fs::read(path).expect("read")))
        .collect()
}

/// What a scan of damaged `data` (segment `sequence`) must show, given
/// that the bytes in `changed` differ from the clean segment: exactly one
/// damaged stretch, from the start of the first record touched to the end
/// of the last, and every other record back as written.
fn assert_one_stretch(
    sequence: u64,
    data: &[u8],
    written: &[Written],
    changed: std::ops::Range<u64>,
    what: &str,
) {
    let scan = scan_segment(sequence, data);
    let in_segment: Vec<&Written> = written
        .iter()
        .filter(|w| w.position.segment == sequence)
        .collect();
    let touched: Vec<&&Written> = in_segment
        .iter()
        .filter(|w| w.position.offset < changed.end && changed.start < w.position.offset + w.len)
        .collect();
    let returned: Vec<(u64, &Record)> = scan
        .records
        .iter()
        .map(|r| (r.position.offset, &r.record))
        .collect();
    let expected: Vec<(u64, &Record)> = in_segment
        .iter()
        .filter(|w| !touched.iter().any(|t| t.position == w.position))
        .map(|w| (w.position.offset, &w.record))
        .collect();
    assert_eq!(returned, expected, "{what}: records outside the damage");
    assert_eq!(scan.damage.len(), 1, "{what}: {:?}", scan.damage);
    let damage = &scan.damage[0];
    assert_eq!(damage.segment, sequence, "{what}");
    if changed.start < HEADER_LEN as u64 {
        assert_eq!(
            (damage.offset, damage.len),
            (0, HEADER_LEN as u64),
            "{what}"
        );
        return;
    }
    let first = touched.first().expect("a record was touched");
    let last = touched.last().expect("a record was touched");
    let end = last.position.offset + last.len;
    assert_eq!(damage.offset, first.position.offset, "{what}: {damage}");
    assert_eq!(damage.len, end - first.position.offset, "{what}: {damage}");
    assert_eq!(damage.tail, end == data.len() as u64, "{what}: {damage}");
}

#[test]
fn single_byte_flips_are_found_exactly() {
    let (_dir, written, segments, mut rng) = damage_fixture(0x0f11);
    for trial in 0..2000 {
        let (sequence, clean) = pick(&mut rng, &segments);
        // The header's last 4 bytes are reserved and not checked.
        let at = loop {
            let at = rng.gen_range(0..clean.len());
            if !(36..HEADER_LEN).contains(&at) {
                break at;
            }
        };
        let mut data = clean.clone();
        data[at] ^= rng.gen_range(1..=255u8);
        let at = at as u64;
        assert_one_stretch(
            sequence,
            &data,
            &written,
            at..at + 1,
            &format!("trial {trial}: flip at {sequence}:{at}"),
        );
    }
}

#[test]
fn zeroed_ranges_are_bounded_exactly() {
    let (_dir, written, segments, mut rng) = damage_fixture(0x2e10);
    let mut trials = 0;
    while trials < 500 {
        let (sequence, clean) = pick(&mut rng, &segments);
        let from = rng.gen_range(HEADER_LEN..clean.len());
        let to = (from + rng.gen_range(1..1500)).min(clean.len());
        let mut data = clean.clone();
        data[from..to].fill(0);
        // Zeroing zeros changes nothing: the damage is what changed.
        let changed: Vec<usize> = (from..to).filter(|i| clean[*i] != 0).collect();
        let (Some(first), Some(last)) = (changed.first(), changed.last()) else {
            continue;
        };
        trials += 1;
        assert_one_stretch(
            sequence,
            &data,
            &written,
            *first as u64..*last as u64 + 1,
            &format!("zeroed {sequence}:{from}..{to}"),
        );
    }
}

#[test]
fn truncation_and_appended_garbage_are_tail_damage() {
    let (_dir, written, segments, mut rng) = damage_fixture(0x7a11);
    for _ in 0..500 {
        let (sequence, clean) = pick(&mut rng, &segments);
        let len = rng.gen_range(0..clean.len());
        let data = &clean[..len];
        let scan = scan_segment(sequence, data);
        let whole: Vec<&Written> = written
            .iter()
            .filter(|w| w.position.segment == sequence && w.position.offset + w.len <= len as u64)
            .collect();
        let returned: Vec<(u64, &Record)> = scan
            .records
            .iter()
            .map(|r| (r.position.offset, &r.record))
            .collect();
        let expected: Vec<(u64, &Record)> = whole
            .iter()
            .map(|w| (w.position.offset, &w.record))
            .collect();
        assert_eq!(returned, expected, "cut at {sequence}:{len}");
        let valid_end = whole
            .last()
            .map_or(HEADER_LEN as u64, |w| w.position.offset + w.len);
        if len < HEADER_LEN {
            assert_eq!(scan.damage.len(), 1);
            assert!(scan.damage[0].tail && scan.damage[0].offset == 0);
        } else if valid_end == len as u64 {
            assert!(scan.damage.is_empty(), "cut at a record boundary");
        } else {
            assert_eq!(scan.damage.len(), 1, "{:?}", scan.damage);
            let tail = scan.tail_damage().expect("tail damage");
            assert_eq!(tail.offset, valid_end, "cut at {sequence}:{len}");
            assert_eq!(tail.len, len as u64 - valid_end);
        }
        assert_eq!(scan.valid_end, valid_end.min(len as u64));

        let mut garbage = clean.clone();
        let extra: Vec<u8> = (0..rng.gen_range(1..600)).map(|_| rng.gen()).collect();
        garbage.extend_from_slice(&extra);
        let scan = scan_segment(sequence, &garbage);
        assert_eq!(
            scan.records.len(),
            written
                .iter()
                .filter(|w| w.position.segment == sequence)
                .count()
        );
        let tail = scan.tail_damage().expect("garbage is tail damage");
        assert_eq!(scan.damage.len(), 1);
        assert_eq!(
            (tail.offset, tail.len),
            (clean.len() as u64, extra.len() as u64)
        );
    }
}

#[test]
fn several_flips_never_yield_a_corrupt_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let written = written_journal(dir.path());
    let segments = segments(dir.path());
    let by_position: BTreeMap<Position, &Written> =
        written.iter().map(|w| (w.position, w)).collect();
    let mut rng = StdRng::seed_from_u64(0x3f11);
    for _ in 0..500 {
        let (sequence, clean) = pick(&mut rng, &segments);
        let mut data = clean.clone();
        let flips: Vec<usize> = (0..rng.gen_range(2..12))
            .map(|_| rng.gen_range(HEADER_LEN..clean.len()))
            .collect();
        for at in &flips {
            data[*at] ^= rng.gen_range(1..=255u8);
        }
        let scan = scan_segment(sequence, &data);
        for record in &scan.records {
            let original = by_position
                .get(&record.position)
                .expect("returned records start where records were written");
            assert_eq!(record.record, original.record);
            assert!(
                !flips.iter().any(|at| (*at as u64) >= record.position.offset
                    && (*at as u64) < record.position.offset + record.len)
            );
        }
        // Every flipped byte lies in a reported stretch unless flipping
        // twice restored it; every untouched record is back.
        for at in flips.iter().filter(|at| data[**at] != clean[**at]) {
            assert!(
                scan.damage
                    .iter()
                    .any(|d| (*at as u64) >= d.offset && (*at as u64) < d.offset + d.len),
                "flip at {at} not reported: {:?}",
                scan.damage
            );
        }
        for w in written.iter().filter(|w| w.position.segment == sequence) {
            let hit = flips.iter().any(|at| {
                (*at as u64) >= w.position.offset && (*at as u64) < w.position.offset + w.len
            });
            if !hit {
                assert!(
                    scan.records.iter().any(|r| r.position == w.position),
                    "untouched record at {} lost",
                    w.position
                );
            }
        }
    }
}

fn copy_journal(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.path().join(entry.file_name())).expect("copy");
        }
    }
    to
}

fn damage_file(dir: &Path, sequence: u64, damage: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(segment_name(sequence));
    let mut data = std::fs::read(&path).expect("read");
    damage(&mut data);
    std::fs::write(&path, data).expect("write");
}

#[test]
fn tolerate_tail_refuses_inner_damage_and_truncates_a_torn_tail() {
    let clean = tempfile::tempdir().expect("tempdir");
    let written = written_journal(clean.path());
    let sequences: Vec<u64> = segments(clean.path()).into_keys().collect();
    let newest = *sequences.last().expect("segments");
    let policy = Mode::Repair(CorruptionPolicy::TolerateTail);

    // A flipped byte in an older segment, and in the middle of the newest.
    let in_newest = written
        .iter()
        .find(|w| w.position.segment == newest)
        .expect("a record in the newest segment");
    for (sequence, at) in [
        (sequences[1], 600usize),
        (newest, in_newest.position.offset as usize + 10),
    ] {
        let dir = copy_journal(clean.path());
        damage_file(dir.path(), sequence, |data| data[at] ^= 0x40);
        let before = segments(dir.path());
        match recovery::scan(dir.path(), policy, true, |_| {}, |_| {}) {
            Err(RecoveryError::Damaged(damage)) => {
                assert_eq!(damage.len(), 1, "{damage:?}");
                assert_eq!(damage[0].segment, sequence);
                assert!(damage[0].offset <= at as u64);
                assert!(at as u64 - damage[0].offset < damage[0].len);
            }
            other => panic!("tolerate-tail accepted damage at {sequence}:{at}: {other:?}"),
        }
        assert_eq!(segments(dir.path()), before, "a refusal changes nothing");
    }

    // The tail of an older segment is damage like any other.
    let dir = copy_journal(clean.path());
    damage_file(dir.path(), sequences[0], |data| {
        data.truncate(data.len() - 5)
    });
    assert!(matches!(
        recovery::scan(dir.path(), policy, true, |_| {}, |_| {}),
        Err(RecoveryError::Damaged(_))
    ));

    // A torn tail of the newest segment is cut back to the last record.
    let dir = copy_journal(clean.path());
    let full = segments(dir.path())[&newest].len();
    damage_file(dir.path(), newest, |data| data.truncate(full - 7));
    let recovered = recovery::scan(dir.path(), policy, true, |_| {}, |_| {}).expect("tolerated");
    let tail = recovered.torn_tail.expect("torn tail reported");
    let last = written.last().expect("records");
    assert_eq!((tail.segment, tail.offset), (newest, last.position.offset));
    let data = &segments(dir.path())[&newest];
    assert_eq!(data.len() as u64, last.position.offset, "truncated");
    let again = read_only(dir.path());
    assert!(again.damage.is_empty(), "{:?}", again.damage);
    assert_eq!(again.records, written.len() as u64 - 1);
}

#[test]
fn zeros_past_the_checkpoint_end_the_newest_segment_and_zeros_elsewhere_are_damage() {
    let clean = tempfile::tempdir().expect("tempdir");
    let written = written_journal(clean.path());
    let sequences: Vec<u64> = segments(clean.path()).into_keys().collect();
    let newest = *sequences.last().expect("segments");
    let full = segments(clean.path())[&newest].len();
    let policy = Mode::Repair(CorruptionPolicy::TolerateTail);

    // Zeros a writer put ahead of its records: the end of the journal.
    let dir = copy_journal(clean.path());
    damage_file(dir.path(), newest, |data| data.resize(full + 8192, 0));
    let recovered = read_only(dir.path());
    assert!(recovered.damage.is_empty(), "{:?}", recovered.damage);
    assert_eq!(recovered.unwritten, Some((newest, full as u64, 8192)));
    assert_eq!(recovered.records, written.len() as u64);
    let repaired = recovery::scan(dir.path(), policy, true, |_| {}, |_| {}).expect("repair");
    assert!(repaired.torn_tail.is_none());
    assert_eq!(segments(dir.path())[&newest].len(), full, "cut back");

    // Zeros over a record the checkpoint counts as written are damage.
    let last = written.last().expect("records");
    let dir = copy_journal(clean.path());
    damage_file(dir.path(), newest, |data| {
        data[last.position.offset as usize..].fill(0)
    });
    let recovered = read_only(dir.path());
    assert!(recovered.unwritten.is_none());
    let tail = recovered.torn_tail.expect("zeroed record reported");
    assert!(tail.zeros);
    assert_eq!((tail.segment, tail.offset), (newest, last.position.offset));
    assert_eq!(recovered.records, written.len() as u64 - 1);

    // An older segment was closed at its last record: zeros after it are
    // damage.
    let dir = copy_journal(clean.path());
    let older = segments(dir.path())[&sequences[0]].len();
    damage_file(dir.path(), sequences[0], |data| {
        data.resize(older + 4096, 0)
    });
    let recovered = read_only(dir.path());
    assert!(recovered.unwritten.is_none());
    let inner: Vec<&Damage> = recovered.inner_damage().collect();
    assert_eq!(inner.len(), 1, "{inner:?}");
    assert_eq!(
        (inner[0].segment, inner[0].offset),
        (sequences[0], older as u64)
    );
    assert!(matches!(
        recovery::scan(dir.path(), policy, true, |_| {}, |_| {}),
        Err(RecoveryError::Damaged(_))
    ));
}

#[test]
fn quarantine_copies_the_damaged_bytes_aside_and_goes_on() {
    let clean = tempfile::tempdir().expect("tempdir");
    let written = written_journal(clean.path());
    let dir = copy_journal(clean.path());
    let victim = written
        .iter()
        .find(|w| w.position.segment == 2 && w.position.offset > HEADER_LEN as u64)
        .expect("a record in segment 2");
    let original = segments(dir.path())[&2].clone();
    let from = victim.position.offset as usize;
    let stretch = from..from + victim.len as usize;
    damage_file(dir.path(), 2, |data| data[from + 20] ^= 0xff);
    let recovered = recovery::scan(
        dir.path(),
        Mode::Repair(CorruptionPolicy::Quarantine),
        true,
        |_| {},
        |_| {},
    )
    .expect("quarantine goes on");
    let inner: Vec<&Damage> = recovered.inner_damage().collect();
    assert_eq!(inner.len(), 1);
    assert_eq!((inner[0].segment, inner[0].offset), (2, from as u64));
    assert_eq!(recovered.records, written.len() as u64 - 1);
    let quarantine = dir.path().join(recovery::QUARANTINE_DIR);
    let copy = std::fs::read(quarantine.join(format!("{:016}-{:012}.bad", 2, from)))
        .expect("quarantined copy");
    let mut expected = original[stretch].to_vec();
    expected[20] ^= 0xff;
    assert_eq!(copy, expected);
    let report = std::fs::read_to_string(quarantine.join("REPORT")).expect("report");
    assert!(report.contains(&inner[0].to_string()), "{report}");
}

/// The crash test's child: `reprise journal load` appending until killed.
fn spawn_load(data_dir: &Path, size: usize) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_reprise"))
        .args(["journal", "load"])
        .arg(data_dir)
        .args(["--fsync", "always", "--print-durable", "--sessions", "8"])
        .args(["--records", "100000000", "--size", &size.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn reprise journal load")
}

/// Per session, the commands a scan from the first segment found, with
/// their framed sizes.
fn commands_by_session(dir: &Path) -> (Recovery, BTreeMap<u64, Vec<(Record, u64)>>) {
    let mut commands: BTreeMap<u64, Vec<(Record, u64)>> = BTreeMap::new();
    let recovery = recovery::scan(
        dir,
        Mode::ReadOnly,
        true,
        |scanned| {
            if let Record::Command {
                session,
                message_len,
                ..
            } = &scanned.record
            {
                // The size before escaping, as the generator counts it.
                let size = message_len + synthetic::COMMAND_OVERHEAD as u64;
                commands
                    .entry(*session)
                    .or_default()
                    .push((scanned.record.clone(), size));
            }
        },
        |_| {},
    )
    .expect("scan");
    (recovery, commands)
}

#[test]
fn killed_writer_loses_only_a_suffix_and_never_a_durable_record() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let journal_dir = data_dir.path().join(JOURNAL_DIR);
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    let mut durable_total = 0;
    let mut torn_tails = 0;
    for round in 0..20 {
        // Large records give the kill a chance to cut a write short: a
        // torn tail.
        let size = if round % 2 == 0 { 200 } else { 256 * 1024 };
        let mut child = spawn_load(data_dir.path(), size);
        let stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            // Only whole lines: the last may be cut by the kill.
            while stdout.read_line(&mut line).unwrap_or(0) > 0 {
                if line.ends_with('\n') {
                    lines.push(std::mem::take(&mut line));
                }
                line.clear();
            }
            lines
        });
        let delay = rng.gen_range(20..300);
        std::thread::sleep(Duration::from_millis(delay));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
        child.wait().expect("wait");
        let lines = reader.join().expect("reader");

        let (recovery, commands) = commands_by_session(&journal_dir);
        let inner: Vec<&Damage> = recovery.inner_damage().collect();
        assert!(inner.is_empty(), "round {round}: damage {inner:?}");
        for (session, records) in &commands {
            for (i, (record, len)) in records.iter().enumerate() {
                let Record::Command { seq, at, .. } = record else {
                    unreachable!()
                };
                assert_eq!(
                    *seq,
                    i as u64 + 1,
                    "round {round}: session {session} has a gap"
                );
                assert_eq!(
                    record,
                    &synthetic::command(*session, *seq, *at, *len as usize),
                    "round {round}: session {session} command {seq} differs"
                );
            }
        }
        for line in &lines {
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some("durable"), "{line}");
            let session: u64 = words.next().and_then(|w| w.parse().ok()).expect("session");
            let seq: u64 = words.next().and_then(|w| w.parse().ok()).expect("seq");
            let found = commands.get(&session).map_or(0, Vec::len) as u64;
            assert!(
                found >= seq,
                "round {round}: session {session} command {seq} was durable but is gone"
            );
        }
        durable_total += lines.len();
        torn_tails += usize::from(recovery.torn_tail.is_some());
    }
    eprintln!("{durable_total} durable acknowledgements, {torn_tails} torn tails in 20 rounds");
    assert!(durable_total > 0, "the children acknowledged nothing");

    // A writer started on what the crashes left appends as usual.
    let recovered = recovery::scan(
        &journal_dir,
        Mode::Repair(CorruptionPolicy::TolerateTail),
        false,
        |_| {},
        |_| {},
    )
    .expect("repair");
    let journal = Journal::start(
        settings(&journal_dir, 64 * 1024 * 1024),
        &recovered,
        Arc::new(Stats::default()),
    )
    .expect("restart");
    let handle = journal.handle();
    let session = handle.next_session_id();
    assert!(!recovered.sessions.contains_key(&session));
    handle.append(synthetic::session_start(session, 1));
    for seq in 1..=10 {
        handle.append(synthetic::command(session, seq, 2, 300));
    }
    journal.stop();
    let (recovery, commands) = commands_by_session(&journal_dir);
    assert!(recovery.damage.is_empty(), "{:?}", recovery.damage);
    assert_eq!(commands[&session].len(), 10);
    assert_eq!(recovery.sessions[&session].commands.len(), 10);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

// Property test: arbitrary records, arbitrary mutations.

fn arb_record() -> impl Strategy<Value = Record> {
    (
        0u8..6,
        0u64..5,
        any::<u64>(),
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(kind, session, at, byte, bytes)| {
            let id = TemplateId::from_bytes([byte; 32]);
            let bytes = Bytes::from(bytes);
            match kind {
                0 => Record::Template {
                    at,
                    id,
                    encoding: bytes,
                },
                1 => Record::SessionStart {
                    session,
                    at,
                    template: id,
                    startup: vec![(Bytes::from_static(b"user"), bytes)],
                },
                2 => Record::Command {
                    session,
                    at,
                    seq: at / 3,
                    state_hash: StateHash::from_bytes([byte ^ 1; 32]),
                    result_digest: [byte ^ 2; 32],
                    omitted: Omitted::No,
                    message_len: bytes.len() as u64,
                    messages: bytes,
                },
                3 => Record::SafePoint {
                    session,
                    at,
                    template: id,
                    state_hash: StateHash::from_bytes([byte; 32]),
                },
                4 => Record::Outcome {
                    session,
                    at,
                    kind: OutcomeKind::Failed,
                    detail: String::from_utf8_lossy(&bytes).into_owned(),
                },
                _ => Record::SessionEnd { session, at },
            }
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Zero(prop::sample::Index, usize),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..80)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), 1usize..400).prop_map(|(i, n)| Mutation::Zero(i, n)),
    ]
}

/// A written record and where it lies after the mutations so far.
struct Tracked {
    record: Record,
    start: usize,
    end: usize,
    intact: bool,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_segments_yield_only_written_records(
        records in proptest::collection::vec(arb_record(), 0..24),
        mutations in proptest::collection::vec(arb_mutation(), 0..4),
    ) {
        let mut data = SegmentHeader { version: FORMAT_VERSION, sequence: 9, created_micros: 1 }
            .encode()
            .to_vec();
        let mut tracked = Vec::new();
        for record in records {
            let start = data.len();
            record.encode(&mut data);
            tracked.push(Tracked { record, start, end: data.len(), intact: true });
        }
        for mutation in &mutations {
            let overlaps = |t: &Tracked, from: usize, to: usize| t.start < to && from < t.end;
            match mutation {
                Mutation::Flip(index, xor) if !data.is_empty() => {
                    let at = index.index(data.len());
                    data[at] ^= xor;
                    tracked.iter_mut().filter(|t| overlaps(t, at, at + 1)).for_each(|t| t.intact = false);
                }
                Mutation::Truncate(index) if !data.is_empty() => {
                    let at = index.index(data.len());
                    data.truncate(at);
                    tracked.iter_mut().filter(|t| t.end > at).for_each(|t| t.intact = false);
                }
                Mutation::Insert(index, bytes) => {
                    let at = index.index(data.len() + 1);
                    data.splice(at..at, bytes.iter().copied());
                    for t in &mut tracked {
                        if t.start < at && at < t.end {
                            t.intact = false;
                        }
                        if t.start >= at {
                            t.start += bytes.len();
                        }
                        if t.end > at {
                            t.end += bytes.len();
                        }
                    }
                }
                Mutation::Zero(index, len) if !data.is_empty() => {
                    let from = index.index(data.len());
                    let to = (from + len).min(data.len());
                    data[from..to].fill(0);
                    tracked.iter_mut().filter(|t| overlaps(t, from, to)).for_each(|t| t.intact = false);
                }
                _ => {}
            }
        }
        let scan = scan_segment(9, &data);
        let mut previous = None;
        for record in &scan.records {
            let offset = record.position.offset as usize;
            prop_assert!(previous < Some(offset), "records out of order");
            previous = Some(offset);
            // A written record, whose bytes stand whole at that offset: an
            // insertion inside a record whose last bytes repeat the
            // record's first ones leaves a true copy of it, which is read.
            prop_assert!(
                tracked.iter().any(|t| t.record == record.record
                    && (!t.intact || (t.start == offset && t.end - t.start == record.len as usize))),
                "returned a record that was not written: {:?}", record
            );
            let mut encoded = Vec::new();
            record.record.encode(&mut encoded);
            prop_assert_eq!(&data[offset..offset + record.len as usize], encoded.as_slice());
        }
        for t in tracked.iter().filter(|t| t.intact && t.start >= HEADER_LEN) {
            prop_assert!(
                scan.records.iter().any(|r| r.position.offset as usize == t.start && r.record == t.record),
                "lost an untouched record at {}", t.start
            );
        }
        // Every byte not in a returned record (past the header) is in a
        // reported stretch: nothing is skipped silently.
        let mut covered = vec![false; data.len()];
        for r in &scan.records {
            let from = r.position.offset as usize;
            covered[from..from + r.len as usize].fill(true);
        }
        for d in &scan.damage {
            covered[d.offset as usize..(d.offset + d.len) as usize].fill(true);
        }
        let header = if scan.header.is_some() { HEADER_LEN.min(data.len()) } else { 0 };
        prop_assert!(covered[header..].iter().all(|c| *c), "unaccounted bytes");
    }
}

// Golden files: a segment and a checkpoint written once, read back
// exactly. A change of the format must be a new version, not an edit of
// these files.

const GOLDEN_TIME: u64 = 1_700_000_000_000_000;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/journal")
}

fn golden_header() -> SegmentHeader {
    SegmentHeader {
        version: 1,
        sequence: 1,
        created_micros: GOLDEN_TIME,
    }
}

fn golden_records() -> Vec<Record> {
    let template = TemplateId::from_bytes([0x11; 32]);
    // Parse, Bind (one text parameter "2"), Execute, Sync.
    let extended: &[u8] = b"P\0\0\0\x1a\0SELECT $1::int + 1\0\0\0\
        B\0\0\0\x11\0\0\0\0\0\x01\0\0\0\x012\0\0\
        E\0\0\0\x09\0\0\0\0\0\
        S\0\0\0\x04";
    vec![
        Record::Template {
            at: GOLDEN_TIME,
            id: template,
            encoding: Bytes::from_static(b"\x01{\"search_path\":\"public\"}"),
        },
        Record::SessionStart {
            session: 1,
            at: GOLDEN_TIME + 1,
            template,
            startup: vec![
                (Bytes::from_static(b"user"), Bytes::from_static(b"alice")),
                (Bytes::from_static(b"database"), Bytes::from_static(b"shop")),
            ],
        },
        Record::Command {
            session: 1,
            at: GOLDEN_TIME + 2,
            seq: 1,
            state_hash: StateHash::from_bytes([0x21; 32]),
            result_digest: [0x31; 32],
            omitted: Omitted::No,
            message_len: 12,
            messages: Bytes::from_static(b"Q\0\0\0\x0bBEGIN;\0"),
        },
        Record::Command {
            session: 1,
            at: GOLDEN_TIME + 3,
            seq: 2,
            state_hash: StateHash::from_bytes([0x22; 32]),
            result_digest: [0x32; 32],
            omitted: Omitted::No,
            message_len: extended.len() as u64,
            messages: Bytes::from_static(extended),
        },
        Record::Command {
            session: 1,
            at: GOLDEN_TIME + 4,
            seq: 3,
            state_hash: StateHash::from_bytes([0x22; 32]),
            result_digest: [0x33; 32],
            omitted: Omitted::Credential,
            message_len: 42,
            messages: Bytes::new(),
        },
        Record::SafePoint {
            session: 1,
            at: GOLDEN_TIME + 5,
            template,
            state_hash: StateHash::from_bytes([0x23; 32]),
        },
        Record::Outcome {
            session: 1,
            at: GOLDEN_TIME + 6,
            kind: OutcomeKind::Recovered,
            detail: "replayed 2 commands on db2".into(),
        },
        Record::SessionEnd {
            session: 1,
            at: GOLDEN_TIME + 7,
        },
        Record::SessionStart {
            session: 2,
            at: GOLDEN_TIME + 8,
            template,
            startup: vec![(Bytes::from_static(b"user"), Bytes::from_static(b"bob"))],
        },
        Record::Command {
            session: 2,
            at: GOLDEN_TIME + 9,
            seq: 1,
            state_hash: StateHash::from_bytes([0x24; 32]),
            result_digest: [0x34; 32],
            omitted: Omitted::No,
            message_len: 16,
            messages: Bytes::from_static(b"Q\0\0\0\x0fSET x = 1;\0"),
        },
    ]
}

fn golden_segment() -> Vec<u8> {
    let mut data = golden_header().encode().to_vec();
    for record in golden_records() {
        record.encode(&mut data);
    }
    data
}

fn golden_checkpoint(segment_len: u64) -> Checkpoint {
    let template = TemplateId::from_bytes([0x11; 32]);
    let records = golden_records();
    // Session 2's start: the ninth record.
    let mut offset = HEADER_LEN as u64;
    for record in &records[..8] {
        let mut out = Vec::new();
        record.encode(&mut out);
        offset += out.len() as u64;
    }
    let start = Position { segment: 1, offset };
    Checkpoint {
        at: GOLDEN_TIME + 10,
        written_to: Position {
            segment: 1,
            offset: segment_len,
        },
        next_session: 3,
        templates: vec![(
            template,
            Bytes::from_static(b"\x01{\"search_path\":\"public\"}"),
            1,
        )],
        sessions: vec![LiveSession {
            session: 2,
            template,
            start,
            safe_point: start,
            started_at: GOLDEN_TIME + 8,
            truncated: false,
        }],
    }
}

/// Regenerates the golden files and the fuzz seed corpus:
/// `cargo test --test integration journal::regenerate -- --ignored`.
#[test]
#[ignore = "rewrites fixtures/journal; run by hand after a deliberate format change"]
fn regenerate_golden_files_and_fuzz_corpus() {
    let golden = fixtures().join("golden");
    std::fs::create_dir_all(&golden).expect("mkdir");
    let segment = golden_segment();
    std::fs::write(golden.join(segment_name(1)), &segment).expect("write");
    let checkpoint = golden_checkpoint(segment.len() as u64).encode();
    std::fs::write(golden.join(CHECKPOINT_FILE), &checkpoint).expect("write");

    let corpus = fixtures().join("fuzz-corpus");
    std::fs::create_dir_all(&corpus).expect("mkdir");
    let mut flipped = segment.clone();
    flipped[300] ^= 0x08;
    let mut zeroed = segment.clone();
    zeroed[200..420].fill(0);
    let mut garbage = segment.clone();
    garbage.extend_from_slice(b"RPJ<\x10\0\0\0not a record");
    let header_only = golden_header().encode().to_vec();
    let torn = &segment[..segment.len() - 9];
    for (name, bytes) in [
        ("valid.seg", &segment[..]),
        ("flipped.seg", &flipped),
        ("zeroed.seg", &zeroed),
        ("garbage.seg", &garbage),
        ("torn.seg", torn),
        ("header-only.seg", &header_only),
        ("checkpoint", &checkpoint),
    ] {
        std::fs::write(corpus.join(name), bytes).expect("write");
    }
}

#[test]
fn golden_files_read_back_exactly() {
    let golden = fixtures().join("golden");
    let segment = std::fs::read(golden.join(segment_name(1))).expect("golden segment");
    assert_eq!(SegmentHeader::decode(&segment), Ok(golden_header()));
    let scan = scan_segment(1, &segment);
    assert!(scan.damage.is_empty(), "{:?}", scan.damage);
    let records: Vec<Record> = scan.records.iter().map(|r| r.record.clone()).collect();
    assert_eq!(records, golden_records());
    // And this version still writes the very same bytes.
    assert_eq!(segment, golden_segment(), "the segment encoding changed");

    let checkpoint = std::fs::read(golden.join(CHECKPOINT_FILE)).expect("golden checkpoint");
    let expected = golden_checkpoint(segment.len() as u64);
    assert_eq!(Checkpoint::decode(&checkpoint), Ok(expected.clone()));
    assert_eq!(
        checkpoint,
        expected.encode(),
        "the checkpoint encoding changed"
    );

    // Recovery from the checkpoint finds session 2's unfinished command.
    let recovered =
        recovery::scan(&golden, Mode::ReadOnly, false, |_| {}, |_| {}).expect("recovery");
    assert!(recovered.damage.is_empty());
    assert_eq!(recovered.next_session, 3);
    let unfinished: Vec<u64> = recovered.unfinished().map(|s| s.session).collect();
    assert_eq!(unfinished, [2]);
    assert_eq!(
        recovered.sessions[&2].commands[0].record,
        golden_records()[9]
    );
}

mod fuzz_checks {
    include!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/fuzz_targets/segment_reader_check.rs"
    ));
}

/// The fuzz target's checks over its seed corpus and over random
/// mutations of it: what `cargo fuzz` does, in small, on stable.
#[test]
fn fuzz_corpus_passes_the_fuzz_target_checks() {
    let mut rng = StdRng::seed_from_u64(0xf022);
    let mut seeds = Vec::new();
    for entry in std::fs::read_dir(fixtures().join("fuzz-corpus")).expect("corpus") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read");
        fuzz_checks::check(&data);
        seeds.push(data);
    }
    assert!(seeds.len() >= 5);
    for _ in 0..3000 {
        let mut data = seeds[rng.gen_range(0..seeds.len())].clone();
        for _ in 0..rng.gen_range(1..4) {
            if data.is_empty() {
                break;
            }
            let at = rng.gen_range(0..data.len());
            match rng.gen_range(0..3) {
                0 => data[at] ^= rng.gen_range(1..=255u8),
                1 => data.truncate(at),
                _ => data.insert(at, rng.gen()),
            }
        }
        fuzz_checks::check(&data);
    }
}

fn reprise(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reprise"))
        .arg("journal")
        .args(args)
        .arg(dir)
        .output()
        .expect("run reprise journal")
}

#[test]
fn tools_read_the_golden_journal() {
    let golden = fixtures().join("golden");
    let out = reprise(&["stats", "--json"], &golden);
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(stats["records"]["command"]["records"], 4);
    assert_eq!(stats["sessions"]["started"], 2);
    assert_eq!(stats["sessions"]["ended"], 1);
    assert_eq!(stats["sessions"]["unfinished"], 1);
    assert_eq!(stats["commands"]["omitted"]["credential"], 1);
    assert_eq!(stats["templates"]["dedup_ratio"], 3.0);
    assert_eq!(stats["commands_between_safe_points"]["max"], 3);
    assert_eq!(stats["damage"].as_array().map(Vec::len), Some(0));

    let out = reprise(&["inspect", "--json"], &golden);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), golden_records().len());
    assert_eq!(lines[3]["time"], "2023-11-14T22:13:20.000003Z");
    let tags: Vec<&str> = lines[3]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["tag"].as_str())
        .collect();
    assert_eq!(tags, ["P", "B", "E", "S"]);
    assert_eq!(lines[3]["messages"][0]["text"], "SELECT $1::int + 1");

    let out = reprise(&["inspect", "--session", "2"], &golden);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("Q \"SET x = 1;\""), "{text}");
}

#[test]
fn tools_report_damage_and_refuse_a_directory_without_journal() {
    let dir = copy_journal(&fixtures().join("golden"));
    damage_file(dir.path(), 1, |data| data[300] ^= 0x08);
    let out = reprise(&["stats"], dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("segment 1 offset"), "{text}");
    let out = reprise(&["inspect"], dir.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damage segment 1 offset"));

    let empty = tempfile::tempdir().expect("tempdir");
    let out = reprise(&["stats"], empty.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no journal in"));
}

/// A client may send bytes that form a whole journal record (a query
/// holding them as a literal). Payloads are escaped so that no magic
/// appears inside one: once the command's own frame is torn, the reader
/// finds no record in it, and never one that was not written as one.
#[test]
fn embedded_frame_in_a_damaged_record_is_not_returned() {
    let mut forged = Vec::new();
    Record::SessionEnd { session: 7, at: 1 }.encode(&mut forged);
    let mut data = golden_header().encode().to_vec();
    let carrier = synthetic::command(8, 1, 1, 200);
    let Record::Command { mut messages, .. } = carrier else {
        unreachable!()
    };
    let mut with_forgery = messages.to_vec();
    with_forgery.extend_from_slice(&forged);
    messages = Bytes::from(with_forgery);
    Record::Command {
        session: 8,
        at: 1,
        seq: 1,
        state_hash: synthetic::state_hash(8, 1),
        result_digest: [0; 32],
        omitted: Omitted::No,
        message_len: messages.len() as u64,
        messages,
    }
    .encode(&mut data);
    // The command is torn just after the forged bytes.
    data.truncate(data.len() - 12);
    let scan = scan_segment(1, &data);
    assert!(
        scan.records.is_empty(),
        "returned a record nobody wrote: {:?}",
        scan.records
    );
}
