//! Reading a journal directory back: at start-up, to learn which sessions
//! had unfinished work and which templates are already written, and for
//! the tools.
//!
//! Recovery starts from the newest checkpoint that reads whole and reads
//! forward from the earliest position any live session still needs. It
//! accepts only whole records (see [`reader`](super::reader)), truncates a
//! torn tail of the newest segment, and handles damage anywhere else as
//! the corruption policy says: `quarantine` copies the damaged bytes aside,
//! reports them and goes on with every whole record around them;
//! `tolerate-tail` refuses to start.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::checkpoint::{self, Checkpoint};
use super::reader::{scan_segment, Damage, ScannedRecord, SegmentScan};
use super::record::Record;
use super::segment::{self, Position, HEADER_LEN};
use crate::template::TemplateId;

/// Where damaged stretches are copied to, inside the journal directory.
pub const QUARANTINE_DIR: &str = "quarantine";
/// At most this much of one damaged stretch is copied aside.
const QUARANTINE_COPY_LIMIT: u64 = 16 * 1024 * 1024;

/// What to do about damage other than a torn tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CorruptionPolicy {
    /// Refuse to start.
    TolerateTail,
    /// Copy the damage aside, report it and go on.
    #[default]
    Quarantine,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("journal is damaged and corruption = \"tolerate-tail\" refuses to go on: {}", list(.0))]
    Damaged(Vec<Damage>),
}

fn list(damage: &[Damage]) -> String {
    damage
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A session that had not ended, as the journal left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredSession {
    pub session: u64,
    pub started_at: u64,
    pub startup: Vec<(Bytes, Bytes)>,
    /// Its template at its last safe point.
    pub template: TemplateId,
    pub safe_point: Position,
    /// Commands since its last safe point, oldest first.
    pub commands: Vec<ScannedRecord>,
    /// Some of its records were deleted to keep the journal within its
    /// size limit.
    pub truncated: bool,
}

/// What a scan of the journal found.
#[derive(Debug, Default)]
pub struct Recovery {
    pub checkpoint: Option<Checkpoint>,
    pub checkpoint_problems: Vec<String>,
    /// Segments read, oldest first (records dropped to save memory).
    pub segments: Vec<SegmentScan>,
    /// Every damaged stretch, the torn tail included.
    pub damage: Vec<Damage>,
    /// The torn tail of the newest segment, if any.
    pub torn_tail: Option<Damage>,
    /// The zeros the writer had put ahead of its last record in the newest
    /// segment (segment, offset, length): not damage, the journal's end.
    pub unwritten: Option<(u64, u64, u64)>,
    /// Template definitions and the segment each was last written in.
    pub templates: HashMap<TemplateId, (Bytes, u64)>,
    /// Sessions that had not ended.
    pub sessions: BTreeMap<u64, RecoveredSession>,
    pub next_session: u64,
    /// The newest segment's sequence number (0 if none).
    pub last_segment: u64,
    pub records: u64,
}

impl Recovery {
    /// Sessions that had commands since their last safe point: work the
    /// crash interrupted.
    pub fn unfinished(&self) -> impl Iterator<Item = &RecoveredSession> {
        self.sessions
            .values()
            .filter(|session| !session.commands.is_empty() || session.truncated)
    }

    /// Damage other than the torn tail.
    pub fn inner_damage(&self) -> impl Iterator<Item = &Damage> {
        self.damage
            .iter()
            .filter(move |damage| Some(*damage) != self.torn_tail.as_ref())
    }
}

/// How a scan may change the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// For tools: change nothing.
    ReadOnly,
    /// At start-up: truncate the torn tail, quarantine damage.
    Repair(CorruptionPolicy),
}

/// Scans the journal in `dir`, calling `visit` for every whole record
/// from the recovery start on (or from the first segment, with `all`),
/// and `progress` with the bytes read so far.
pub fn scan(
    dir: &Path,
    mode: Mode,
    all: bool,
    mut visit: impl FnMut(&ScannedRecord),
    mut progress: impl FnMut(u64),
) -> Result<Recovery, RecoveryError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| RecoveryError::Io { path, source }
    };
    if matches!(mode, Mode::Repair(_)) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        checkpoint::remove_leftovers(dir);
    }
    let mut recovery = Recovery::default();
    let (checkpoint, problems) = checkpoint::read_latest(dir);
    recovery.checkpoint_problems = problems;
    let segments = segment::list_segments(dir).map_err(io_err(dir))?;
    recovery.last_segment = segments.last().map_or(0, |(sequence, _)| *sequence);

    let mut start = Position::default();
    if let Some(checkpoint) = &checkpoint {
        recovery.next_session = checkpoint.next_session;
        start = checkpoint.written_to;
        for (id, encoding, segment) in &checkpoint.templates {
            recovery.templates.insert(*id, (encoding.clone(), *segment));
        }
        for live in &checkpoint.sessions {
            start = start.min(live.safe_point);
            recovery.sessions.insert(
                live.session,
                RecoveredSession {
                    session: live.session,
                    started_at: live.started_at,
                    startup: Vec::new(),
                    template: live.template,
                    safe_point: live.safe_point,
                    commands: Vec::new(),
                    truncated: live.truncated,
                },
            );
        }
    }
    if all {
        start = Position::default();
    }
    recovery.checkpoint = checkpoint;

    let mut read = 0u64;
    for (sequence, path) in &segments {
        if *sequence < start.segment {
            continue;
        }
        let data = std::fs::read(path).map_err(io_err(path))?;
        read += data.len() as u64;
        let mut scan = scan_segment(*sequence, &data);
        for scanned in &scan.records {
            if scanned.position < start {
                continue;
            }
            recovery.records += 1;
            apply(&mut recovery, scanned);
            visit(scanned);
        }
        scan.records = Vec::new();
        progress(read);
        let newest = *sequence == recovery.last_segment;
        if newest {
            let durable = durable_end(recovery.checkpoint.as_ref(), *sequence);
            if let Some(tail) = scan
                .damage
                .last()
                .filter(|tail| is_unwritten(tail, durable))
            {
                recovery.unwritten = Some((*sequence, tail.offset, tail.len));
                if matches!(mode, Mode::Repair(_)) {
                    truncate_tail(path, tail).map_err(io_err(path))?;
                }
                scan.damage.pop();
            }
        }
        if let Some(tail) = scan.tail_damage() {
            if newest {
                recovery.torn_tail = Some(tail.clone());
            }
        }
        recovery.damage.extend(scan.damage.iter().cloned());
        if let Mode::Repair(policy) = mode {
            let inner: Vec<Damage> = scan
                .damage
                .iter()
                .filter(|damage| !(newest && damage.tail))
                .cloned()
                .collect();
            if !inner.is_empty() {
                if policy == CorruptionPolicy::TolerateTail {
                    return Err(RecoveryError::Damaged(inner));
                }
                for damage in &inner {
                    quarantine(dir, &data, damage).map_err(io_err(dir))?;
                }
            }
            if newest {
                if let Some(tail) = scan.tail_damage() {
                    truncate_tail(path, tail).map_err(io_err(path))?;
                }
            }
        }
        recovery.segments.push(scan);
    }
    let highest = recovery.sessions.keys().next_back().copied().unwrap_or(0);
    recovery.next_session = recovery.next_session.max(highest + 1).max(1);
    Ok(recovery)
}

/// How far the newest checkpoint says segment `sequence` was durably
/// written: records before that offset were acknowledged, so zeros there
/// are damage.
fn durable_end(checkpoint: Option<&Checkpoint>, sequence: u64) -> u64 {
    match checkpoint {
        Some(checkpoint) if checkpoint.written_to.segment == sequence => {
            checkpoint.written_to.offset
        }
        Some(checkpoint) if checkpoint.written_to.segment > sequence => u64::MAX,
        _ => 0,
    }
}

/// A tail of zeros past every record the checkpoint counts as written:
/// space the writer filled ahead of its writes (see
/// [`writer`](super::writer)) and had not used yet.
fn is_unwritten(tail: &Damage, durable_end: u64) -> bool {
    tail.tail && tail.zeros && tail.offset >= HEADER_LEN as u64 && tail.offset >= durable_end
}

fn apply(recovery: &mut Recovery, scanned: &ScannedRecord) {
    let position = scanned.position;
    match &scanned.record {
        Record::Template { id, encoding, .. } => {
            recovery
                .templates
                .insert(*id, (encoding.clone(), position.segment));
        }
        Record::SessionStart {
            session,
            at,
            template,
            startup,
        } => {
            recovery.next_session = recovery.next_session.max(session + 1);
            recovery.sessions.insert(
                *session,
                RecoveredSession {
                    session: *session,
                    started_at: *at,
                    startup: startup.clone(),
                    template: *template,
                    safe_point: position,
                    commands: Vec::new(),
                    truncated: false,
                },
            );
        }
        Record::Command { session, .. } => {
            if let Some(live) = recovery.sessions.get_mut(session) {
                if position > live.safe_point {
                    live.commands.push(scanned.clone());
                }
            }
        }
        Record::SafePoint {
            session, template, ..
        } => {
            if let Some(live) = recovery.sessions.get_mut(session) {
                if position > live.safe_point {
                    live.commands.clear();
                    live.template = *template;
                    live.safe_point = position;
                    live.truncated = false;
                }
            }
        }
        Record::Outcome { .. } => {}
        Record::SessionEnd { session, .. } => {
            recovery.sessions.remove(session);
        }
    }
}

/// Copies a damaged stretch aside (once) and notes it in the report file.
fn quarantine(dir: &Path, data: &[u8], damage: &Damage) -> io::Result<()> {
    let quarantine = dir.join(QUARANTINE_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&quarantine)?;
    let copy = quarantine.join(format!("{:016}-{:012}.bad", damage.segment, damage.offset));
    if copy.exists() {
        return Ok(());
    }
    let from = damage.offset as usize;
    let to = (damage.offset + damage.len.min(QUARANTINE_COPY_LIMIT)) as usize;
    let mut file = segment::create_private(&copy)?;
    file.write_all(&data[from..to.min(data.len())])?;
    file.sync_all()?;
    let mut report = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(quarantine.join("REPORT"))?;
    writeln!(report, "{damage}")?;
    report.sync_all()
}

/// Cuts the newest segment back to its last whole record; a segment
/// without even a whole header is removed.
fn truncate_tail(path: &Path, tail: &Damage) -> io::Result<()> {
    if tail.offset < HEADER_LEN as u64 {
        return std::fs::remove_file(path);
    }
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(tail.offset)?;
    file.sync_all()
}
