//! The journal writer: one thread that owns the segment files.
//!
//! Sessions hand it records through a queue and go on; the thread takes
//! everything queued at once, encodes it into one buffer and writes it
//! with one call (group commit). When the data is made durable depends on
//! the fsync policy: `off` never syncs, `batch` syncs at most every
//! `fsync_interval`, `always` syncs before it answers the sessions waiting
//! for their records. Under `off` and `batch` nobody wakes the thread per
//! record: it wakes every interval and finds the queue filled, so a
//! session's append costs a lock and a push. A writer with nothing
//! queued and nothing to sync sleeps until the next append wakes it.
//!
//! Under `batch` and `always` the writer fills the space ahead of its
//! writes with zeros, a chunk at a time, before it writes records there:
//! a sync then flushes data only, with no change to the file's size or
//! block map that the file system would have to commit to its own
//! journal. That commit is what would otherwise compete with
//! PostgreSQL's WAL syncs on the same disk. A segment is cut back to its
//! last record when it is closed; the zero tail a crash leaves in the
//! newest segment is the journal's end, and recovery cuts it off.
//!
//! The thread also rotates segments by size and age, keeps track of where
//! every live session's last safe point lies, writes checkpoints and
//! deletes the segments nobody needs any more.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashSet;
use tokio::sync::oneshot;

use super::checkpoint::{Checkpoint, LiveSession};
use super::record::{self, now_micros, Record, RecordKind};
use super::recovery::Recovery;
use super::segment::{self, Position, SegmentHeader, FORMAT_VERSION, HEADER_LEN};
use crate::stats::Stats;
use crate::template::TemplateId;

/// When records are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Never: the operating system writes the data when it likes. Survives
    /// a crash of Reprise, not of the machine.
    Off,
    /// At most every `fsync_interval`.
    #[default]
    Batch,
    /// Before the session goes on.
    Always,
}

/// What the journal keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Retain {
    /// What replay needs: commands since each session's last safe point.
    #[default]
    Replay,
    /// Every command (capture), until `retention_size` or
    /// `retention_age`.
    All,
}

/// The writer's settings.
#[derive(Clone, Debug)]
pub struct WriterSettings {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
    pub segment_size: u64,
    pub segment_age: Duration,
    pub checkpoint_interval: Duration,
    pub retain: Retain,
    pub retention_size: u64,
    pub retention_age: Duration,
    /// Past this, the oldest segments go even if a session still needs
    /// them (it is reported as truncated).
    pub max_size: u64,
    /// Records queued beyond this many bytes are dropped and counted.
    pub queue_limit: usize,
}

/// What an append led to.
#[derive(Debug)]
pub enum Appended {
    Queued,
    /// Resolved once the record is durable (fsync `always`); an error
    /// means the write failed and was reported.
    Durable(oneshot::Receiver<()>),
    /// The queue was full: the record was counted and dropped.
    Dropped,
}

/// What the writer needs to know of a queued record besides its bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    len: usize,
    kind: RecordKind,
    session: u64,
    at: u64,
    /// The template it defines or names (zero for none).
    template: TemplateId,
}

impl Entry {
    fn of(record: &Record, len: usize) -> Entry {
        let template = match record {
            Record::Template { id, .. } => *id,
            Record::SessionStart { template, .. } | Record::SafePoint { template, .. } => *template,
            _ => TemplateId::from_bytes([0; 32]),
        };
        Entry {
            len,
            kind: record.kind(),
            session: record.session().unwrap_or(0),
            at: record.at(),
            template,
        }
    }
}

/// Records handed over, already framed by the sessions that made them:
/// what crosses threads is plain bytes, never a value whose allocations
/// the writer would have to free.
#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    waiting: Vec<oneshot::Sender<()>>,
    stop: bool,
    /// The writer sleeps with nothing to write or sync: the next append
    /// wakes it, so that an idle journal does not poll.
    writer_idle: bool,
}

thread_local! {
    /// Where a session frames its record before taking the queue's lock.
    static FRAMED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Channel {
    queue: Mutex<Queue>,
    wake: Condvar,
    fsync: FsyncPolicy,
    queue_limit: usize,
    /// Wake the writer early once this much is queued.
    wake_above: usize,
    stats: Arc<Stats>,
    /// Templates already written; sessions skip encoding those.
    written: DashSet<TemplateId>,
    next_session: AtomicU64,
}

impl Channel {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sessions' way into the journal.
#[derive(Clone)]
pub struct JournalHandle {
    channel: Arc<Channel>,
}

impl std::fmt::Debug for JournalHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalHandle")
            .field("fsync", &self.channel.fsync)
            .finish()
    }
}

impl JournalHandle {
    /// Queues a record. Never blocks on disk.
    pub fn append(&self, record: Record) -> Appended {
        FRAMED.with(|framed| {
            let mut framed = framed.borrow_mut();
            framed.clear();
            record.encode(&mut framed);
            let entry = Entry::of(&record, framed.len());
            self.queue(entry, &framed)
        })
    }

    fn queue(&self, entry: Entry, framed: &[u8]) -> Appended {
        let wait = self.channel.fsync == FsyncPolicy::Always;
        let mut queue = self.channel.lock();
        if queue.bytes.len() + framed.len() > self.channel.queue_limit && !queue.entries.is_empty()
        {
            drop(queue);
            self.channel.stats.journal_records_dropped.inc();
            return Appended::Dropped;
        }
        queue.bytes.extend_from_slice(framed);
        queue.entries.push(entry);
        let appended = if wait {
            let (sender, receiver) = oneshot::channel();
            queue.waiting.push(sender);
            Appended::Durable(receiver)
        } else {
            Appended::Queued
        };
        let wake = wait || queue.writer_idle || queue.bytes.len() > self.channel.wake_above;
        queue.writer_idle = false;
        drop(queue);
        if wake {
            self.channel.wake.notify_one();
        }
        appended
    }

    /// Records a session dropped before handing them over, because a
    /// later safe point made them moot.
    pub fn count_superseded(&self, records: u64) {
        if records > 0 {
            self.channel.stats.journal_records_superseded.add(records);
        }
    }

    /// Whether `template` still has to be written before a record names
    /// it.
    pub fn needs_template(&self, template: TemplateId) -> bool {
        !self.channel.written.contains(&template)
    }

    /// Session ids are unique across restarts of the proxy.
    pub fn next_session_id(&self) -> u64 {
        self.channel.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn fsync(&self) -> FsyncPolicy {
        self.channel.fsync
    }
}

/// The running writer; stopping it writes what is queued, syncs and
/// writes a last checkpoint.
pub struct Journal {
    channel: Arc<Channel>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// Starts the writer on a directory that `recovery` has just read.
    pub fn start(
        settings: WriterSettings,
        recovery: &Recovery,
        stats: Arc<Stats>,
    ) -> io::Result<Journal> {
        let channel = Arc::new(Channel {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            fsync: settings.fsync,
            queue_limit: settings.queue_limit.max(64 * 1024),
            wake_above: (settings.queue_limit / 8).clamp(64 * 1024, 1024 * 1024),
            stats: Arc::clone(&stats),
            written: DashSet::new(),
            next_session: AtomicU64::new(recovery.next_session.max(1)),
        });
        let mut templates = HashMap::new();
        for (id, (encoding, segment)) in &recovery.templates {
            channel.written.insert(*id);
            templates.insert(*id, (encoding.clone(), *segment));
        }
        let mut segments = BTreeMap::new();
        for scan in &recovery.segments {
            segments.insert(
                scan.sequence,
                SegmentInfo {
                    size: scan.valid_end.max(HEADER_LEN as u64),
                    created_micros: scan.header.map_or(0, |header| header.created_micros),
                },
            );
        }
        // Segments before the recovery start were not read but still count.
        for (sequence, path) in segment::list_segments(&settings.dir)? {
            segments.entry(sequence).or_insert_with(|| SegmentInfo {
                size: std::fs::metadata(&path).map_or(0, |meta| meta.len()),
                created_micros: 0,
            });
        }
        let live = recovery
            .sessions
            .values()
            .map(|session| {
                (
                    session.session,
                    LiveSession {
                        session: session.session,
                        template: session.template,
                        start: session.safe_point,
                        safe_point: session.safe_point,
                        started_at: session.started_at,
                        truncated: session.truncated,
                    },
                )
            })
            .collect();
        let writer = Writer {
            next_sequence: recovery.last_segment + 1,
            settings,
            channel: Arc::clone(&channel),
            current: None,
            buffer: Vec::with_capacity(1024 * 1024),
            unsynced: false,
            last_sync: Instant::now(),
            last_checkpoint: Instant::now(),
            checkpoint_due: true,
            live,
            templates,
            segments,
            pending: recovery
                .sessions
                .values()
                .filter(|session| !session.commands.is_empty())
                .map(|session| session.session)
                .collect(),
            superseded: Vec::new(),
            closed: std::collections::HashSet::new(),
            failing: false,
        };
        let thread = std::thread::Builder::new()
            .name("reprise-journal".into())
            .spawn(move || writer.run())?;
        Ok(Journal {
            channel,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn handle(&self) -> JournalHandle {
        JournalHandle {
            channel: Arc::clone(&self.channel),
        }
    }

    /// Writes everything queued, syncs, checkpoints and stops the thread.
    pub fn stop(&self) {
        self.channel.lock().stop = true;
        self.channel.wake.notify_one();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop();
    }
}

struct SegmentInfo {
    size: u64,
    created_micros: u64,
}

struct Current {
    file: File,
    sequence: u64,
    /// End of the last record written.
    size: u64,
    /// End of the file: `size` plus the zeros written ahead of it.
    allocated: u64,
    opened: Instant,
}

/// How much zeroed space the writer adds ahead of its writes at a time.
const PREALLOCATE_CHUNK: u64 = 1024 * 1024;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl Current {
    /// Makes sure the file has written space up to `end`: zeros, a chunk
    /// at a time, never beyond `limit` unless one record needs it.
    fn preallocate(&mut self, end: u64, limit: u64) -> io::Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let target = end
            .div_ceil(PREALLOCATE_CHUNK)
            .saturating_mul(PREALLOCATE_CHUNK)
            .min(limit)
            .max(end);
        let mut at = self.allocated;
        while at < target {
            let len = (target - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..len], at)?;
            at += len as u64;
        }
        self.allocated = target;
        Ok(())
    }

    /// Cuts the zeros ahead of the last record and makes the segment
    /// durable as it stands.
    fn seal(&self, sync: bool) -> io::Result<()> {
        if self.allocated > self.size {
            self.file.set_len(self.size)?;
        }
        if sync {
            self.file.sync_all()?;
        }
        Ok(())
    }
}

struct Writer {
    settings: WriterSettings,
    channel: Arc<Channel>,
    current: Option<Current>,
    next_sequence: u64,
    buffer: Vec<u8>,
    unsynced: bool,
    last_sync: Instant,
    last_checkpoint: Instant,
    checkpoint_due: bool,
    live: HashMap<u64, LiveSession>,
    templates: HashMap<TemplateId, (Bytes, u64)>,
    segments: BTreeMap<u64, SegmentInfo>,
    /// Live sessions with commands since their last safe point: only
    /// these need the segments from that safe point on. A session idle at
    /// its safe point needs only its template, which the checkpoint holds.
    pending: std::collections::HashSet<u64>,
    /// Per record of the batch being written: made moot by a later one.
    superseded: Vec<bool>,
    /// Sessions with a safe point or an end later in the batch.
    closed: std::collections::HashSet<u64>,
    /// The last write failed: the next success is logged.
    failing: bool,
}

/// How often the writer looks at rotation and checkpoints when nothing
/// else wakes it.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

impl Writer {
    fn run(mut self) {
        let wait = match self.settings.fsync {
            FsyncPolicy::Always => HOUSEKEEPING,
            _ => self
                .settings
                .fsync_interval
                .clamp(Duration::from_millis(1), HOUSEKEEPING),
        };
        let idle_wait = HOUSEKEEPING
            .min(self.settings.checkpoint_interval)
            .max(wait);
        // The queue's buffers go back and forth, so that neither side
        // grows new ones every cycle.
        let mut spare = Queue::default();
        loop {
            let stop = {
                let mut queue = self.channel.lock();
                if queue.entries.is_empty() && !queue.stop {
                    // Records queued from now on find the writer asleep
                    // and wake it; until then only housekeeping is due.
                    let idle = !self.unsynced || self.settings.fsync == FsyncPolicy::Off;
                    queue.writer_idle = idle;
                    queue = self
                        .channel
                        .wake
                        .wait_timeout(queue, if idle { idle_wait } else { wait })
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                    queue.writer_idle = false;
                }
                std::mem::swap(&mut queue.bytes, &mut spare.bytes);
                std::mem::swap(&mut queue.entries, &mut spare.entries);
                std::mem::swap(&mut queue.waiting, &mut spare.waiting);
                queue.stop
            };
            let written =
                spare.entries.is_empty() || self.write_batch(&spare.bytes, &spare.entries);
            spare.bytes.clear();
            spare.entries.clear();
            let waiting: Vec<oneshot::Sender<()>> = spare.waiting.drain(..).collect();
            let sync_now = match self.settings.fsync {
                FsyncPolicy::Off => false,
                FsyncPolicy::Batch => {
                    stop || self.last_sync.elapsed() >= self.settings.fsync_interval
                }
                FsyncPolicy::Always => true,
            };
            if sync_now && self.unsynced {
                self.sync();
            }
            // Waiting sessions learn the outcome: a dropped sender is an
            // error on their side.
            if written && !self.failing {
                for done in waiting {
                    let _ = done.send(());
                }
            }
            self.housekeeping(stop);
            if stop {
                self.seal_current();
                break;
            }
        }
    }

    /// Writes a batch of framed records; false if a write failed.
    fn write_batch(&mut self, bytes: &[u8], entries: &[Entry]) -> bool {
        self.buffer.clear();
        self.find_superseded(entries);
        let mut records = 0u64;
        let mut superseded = 0u64;
        let mut offset = 0;
        for (index, entry) in entries.iter().enumerate() {
            let framed = &bytes[offset..offset + entry.len];
            offset += entry.len;
            if entry.kind == RecordKind::Template && self.templates.contains_key(&entry.template) {
                continue;
            }
            if self.superseded.get(index).copied().unwrap_or(false) {
                superseded += 1;
                continue;
            }
            let len = entry.len as u64;
            let needs_rotation = self.current.as_ref().is_some_and(|current| {
                let end = current.size + self.buffer.len() as u64;
                end + len > self.settings.segment_size && end > HEADER_LEN as u64
            });
            if needs_rotation || self.current.is_none() {
                // What precedes this record goes into the old segment.
                if !self.flush_buffer() || !self.rotate() {
                    return false;
                }
            }
            let Some(current) = &self.current else {
                return false;
            };
            let position = Position {
                segment: current.sequence,
                offset: current.size + self.buffer.len() as u64,
            };
            self.buffer.extend_from_slice(framed);
            self.note(entry, framed, position);
            records += 1;
        }
        if !self.flush_buffer() {
            return false;
        }
        self.channel.stats.journal_records.add(records);
        self.channel
            .stats
            .journal_records_superseded
            .add(superseded);
        true
    }

    /// Marks the records of this batch that a later record of the same
    /// session makes moot: with `retain = "replay"` a command matters only
    /// until its session's next safe point, and a safe point only until
    /// the next one. A transaction that began and ended within one write
    /// cycle then costs nothing on disk. Under fsync `always` nothing
    /// follows a record before it is durable, so nothing is dropped that
    /// a session waited for.
    fn find_superseded(&mut self, entries: &[Entry]) {
        self.superseded.clear();
        self.superseded.resize(entries.len(), false);
        if self.settings.retain == Retain::All {
            return;
        }
        self.closed.clear();
        for (index, entry) in entries.iter().enumerate().rev() {
            match entry.kind {
                RecordKind::Command | RecordKind::SafePoint
                    if self.closed.contains(&entry.session) =>
                {
                    self.superseded[index] = true;
                }
                RecordKind::SafePoint | RecordKind::SessionEnd => {
                    self.closed.insert(entry.session);
                }
                _ => {}
            }
        }
    }

    /// Writes the buffer at the end of the current segment.
    fn flush_buffer(&mut self) -> bool {
        if self.buffer.is_empty() {
            return true;
        }
        let Some(current) = &mut self.current else {
            return true;
        };
        let end = current.size + self.buffer.len() as u64;
        let written = if self.settings.fsync == FsyncPolicy::Off {
            Ok(())
        } else {
            current.preallocate(end, self.settings.segment_size)
        }
        .and_then(|()| current.file.write_all_at(&self.buffer, current.size));
        match written {
            Ok(()) => {
                current.size += self.buffer.len() as u64;
                if let Some(info) = self.segments.get_mut(&current.sequence) {
                    info.size = current.size;
                }
                self.channel
                    .stats
                    .journal_bytes
                    .add(self.buffer.len() as u64);
                self.buffer.clear();
                self.unsynced = true;
                if self.failing {
                    self.failing = false;
                    tracing::info!("journal writes succeed again");
                }
                true
            }
            Err(err) => {
                self.write_failed(&err);
                // A partial write leaves a torn record: start afresh in a
                // new segment rather than append after it.
                self.current = None;
                self.buffer.clear();
                false
            }
        }
    }

    fn write_failed(&mut self, err: &io::Error) {
        self.channel.stats.journal_write_errors.inc();
        if !self.failing {
            tracing::error!(error = %err, dir = %self.settings.dir.display(), "journal write failed; sessions go on, their records are lost until writes succeed again");
        }
        self.failing = true;
    }

    /// Closes the current segment (synced) and opens the next one.
    fn rotate(&mut self) -> bool {
        self.seal_current();
        let sequence = self.next_sequence;
        let path = segment::segment_path(&self.settings.dir, sequence);
        let created_micros = now_micros();
        let opened = segment::create_private(&path).and_then(|mut file| {
            let header = SegmentHeader {
                version: FORMAT_VERSION,
                sequence,
                created_micros,
            };
            file.write_all(&header.encode())?;
            if self.settings.fsync != FsyncPolicy::Off {
                file.sync_all()?;
                segment::sync_dir(&self.settings.dir)?;
            }
            Ok(file)
        });
        match opened {
            Ok(file) => {
                self.next_sequence += 1;
                self.current = Some(Current {
                    file,
                    sequence,
                    size: HEADER_LEN as u64,
                    allocated: HEADER_LEN as u64,
                    opened: Instant::now(),
                });
                self.segments.insert(
                    sequence,
                    SegmentInfo {
                        size: HEADER_LEN as u64,
                        created_micros,
                    },
                );
                self.channel.stats.journal_segments_created.inc();
                self.checkpoint_due = true;
                true
            }
            Err(err) => {
                // Never reuse a name whose file may hold something.
                self.next_sequence += 1;
                self.write_failed(&err);
                false
            }
        }
    }

    /// Closes the current segment, cut back to its last record.
    fn seal_current(&mut self) {
        if let Some(current) = self.current.take() {
            if let Err(err) = current.seal(self.settings.fsync != FsyncPolicy::Off) {
                self.write_failed(&err);
            }
        }
    }

    fn sync(&mut self) {
        if let Some(current) = &self.current {
            match current.file.sync_data() {
                Ok(()) => {
                    self.channel.stats.journal_fsyncs.inc();
                    self.unsynced = false;
                    self.last_sync = Instant::now();
                }
                Err(err) => self.write_failed(&err),
            }
        }
    }

    /// Keeps the writer's picture of sessions and templates current.
    fn note(&mut self, entry: &Entry, framed: &[u8], position: Position) {
        let session = entry.session;
        match entry.kind {
            RecordKind::Template => {
                // Rare (once per template): read the definition back.
                let decoded = record::verify(framed)
                    .ok()
                    .and_then(|frame| Record::decode(frame.kind, frame.payload).ok());
                if let Some(Record::Template { id, encoding, .. }) = decoded {
                    self.templates.insert(id, (encoding, position.segment));
                    self.channel.written.insert(id);
                }
            }
            RecordKind::SessionStart => {
                self.live.insert(
                    session,
                    LiveSession {
                        session,
                        template: entry.template,
                        start: position,
                        safe_point: position,
                        started_at: entry.at,
                        truncated: false,
                    },
                );
            }
            RecordKind::SafePoint => {
                if let Some(live) = self.live.get_mut(&session) {
                    live.template = entry.template;
                    live.safe_point = position;
                    live.truncated = false;
                }
                self.pending.remove(&session);
            }
            RecordKind::SessionEnd => {
                self.live.remove(&session);
                self.pending.remove(&session);
            }
            RecordKind::Command => {
                if self.live.contains_key(&session) {
                    self.pending.insert(session);
                }
            }
            RecordKind::Outcome => {}
        }
    }

    fn housekeeping(&mut self, stop: bool) {
        let aged = self.current.as_ref().is_some_and(|current| {
            current.size > HEADER_LEN as u64
                && current.opened.elapsed() >= self.settings.segment_age
        });
        if aged {
            self.rotate();
        }
        let due = stop
            || self.checkpoint_due
            || self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval;
        if !due {
            return;
        }
        if self.unsynced && self.settings.fsync != FsyncPolicy::Off {
            // A checkpoint never points past what is durable.
            self.sync();
        }
        self.checkpoint_due = false;
        self.last_checkpoint = Instant::now();
        if let Err(err) = self.checkpoint().write(&self.settings.dir) {
            self.write_failed(&err);
            return;
        }
        self.channel.stats.journal_checkpoints.inc();
        self.delete_old_segments();
    }

    fn checkpoint(&self) -> Checkpoint {
        let written_to = match &self.current {
            Some(current) => Position {
                segment: current.sequence,
                offset: current.size,
            },
            None => Position {
                segment: self.next_sequence,
                offset: HEADER_LEN as u64,
            },
        };
        let mut sessions: Vec<LiveSession> = self.live.values().cloned().collect();
        sessions.sort_by_key(|session| session.session);
        let mut templates: Vec<(TemplateId, Bytes, u64)> = self
            .templates
            .iter()
            .map(|(id, (encoding, segment))| (*id, encoding.clone(), *segment))
            .collect();
        templates.sort_by_key(|(id, _, _)| *id);
        Checkpoint {
            at: now_micros(),
            written_to,
            next_session: self.channel.next_session.load(Ordering::Relaxed),
            templates,
            sessions,
        }
    }

    /// Deletes segments before every live session's last safe point (and,
    /// with `retain = "all"`, beyond the retention), never the current one.
    fn delete_old_segments(&mut self) {
        let current = self
            .current
            .as_ref()
            .map_or(self.next_sequence, |current| current.sequence);
        let needed = self
            .pending
            .iter()
            .filter_map(|session| self.live.get(session))
            .map(|live| live.safe_point.segment)
            .min()
            .unwrap_or(current)
            .min(current);
        let mut total: u64 = self.segments.values().map(|info| info.size).sum();
        let now = now_micros();
        let mut deleted_below = None;
        let candidates: Vec<u64> = self
            .segments
            .range(..current)
            .map(|(seq, _)| *seq)
            .collect();
        for sequence in candidates {
            let Some(info) = self.segments.get(&sequence) else {
                continue;
            };
            let old = now.saturating_sub(info.created_micros)
                > u64::try_from(self.settings.retention_age.as_micros()).unwrap_or(u64::MAX);
            let unneeded = sequence < needed
                && match self.settings.retain {
                    Retain::Replay => true,
                    Retain::All => total > self.settings.retention_size || old,
                };
            let over_limit = total > self.settings.max_size;
            if !unneeded && !over_limit {
                break;
            }
            let path = segment::segment_path(&self.settings.dir, sequence);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    self.write_failed(&err);
                    break;
                }
            }
            total -= info.size;
            self.segments.remove(&sequence);
            self.channel.stats.journal_segments_deleted.inc();
            deleted_below = Some(sequence + 1);
            if !unneeded {
                tracing::warn!(
                    segment = sequence,
                    max_size = self.settings.max_size,
                    "journal over max_size: deleted a segment that live sessions still needed"
                );
                for live in self.live.values_mut() {
                    if live.safe_point.segment <= sequence && self.pending.contains(&live.session) {
                        live.truncated = true;
                        live.safe_point = Position {
                            segment: sequence + 1,
                            offset: HEADER_LEN as u64,
                        };
                    }
                }
            }
        }
        if let Some(below) = deleted_below {
            // Definitions only in deleted segments go, unless a live
            // session still names them; the next use writes them again.
            let in_use: std::collections::HashSet<TemplateId> =
                self.live.values().map(|live| live.template).collect();
            let written = &self.channel.written;
            self.templates.retain(|id, (_, segment)| {
                let keep = *segment >= below || in_use.contains(id);
                if !keep {
                    written.remove(id);
                }
                keep
            });
            self.checkpoint_due = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::recovery::{self, Mode};
    use crate::journal::Omitted;
    use crate::template::StateHash;

    fn settings(dir: &std::path::Path, fsync: FsyncPolicy) -> WriterSettings {
        WriterSettings {
            dir: dir.to_owned(),
            fsync,
            fsync_interval: Duration::from_millis(5),
            segment_size: 4096,
            segment_age: Duration::from_secs(300),
            checkpoint_interval: Duration::from_millis(20),
            retain: Retain::Replay,
            retention_size: u64::MAX,
            retention_age: Duration::from_secs(3600),
            max_size: u64::MAX,
            queue_limit: 64 * 1024 * 1024,
        }
    }

    fn command(session: u64, seq: u64, size: usize) -> Record {
        Record::Command {
            session,
            at: seq,
            seq,
            state_hash: StateHash::from_bytes([seq as u8; 32]),
            result_digest: [0; 32],
            omitted: Omitted::No,
            message_len: size as u64,
            messages: Bytes::from(vec![b'x'; size]),
        }
    }

    fn start(session: u64, template: TemplateId) -> Record {
        Record::SessionStart {
            session,
            at: 0,
            template,
            startup: vec![],
        }
    }

    fn safe_point(session: u64, template: TemplateId) -> Record {
        Record::SafePoint {
            session,
            at: 0,
            template,
            state_hash: StateHash::from_bytes([0; 32]),
        }
    }

    fn recover(dir: &std::path::Path) -> Recovery {
        recovery::scan(dir, Mode::ReadOnly, false, |_| {}, |_| {}).expect("recovery")
    }

    #[test]
    fn unfinished_sessions_come_back_and_unneeded_segments_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(Stats::default());
        let template = TemplateId::from_bytes([9; 32]);
        let journal = Journal::start(
            settings(dir.path(), FsyncPolicy::Batch),
            &Recovery::default(),
            Arc::clone(&stats),
        )
        .expect("start");
        let handle = journal.handle();
        assert!(handle.needs_template(template));
        handle.append(Record::Template {
            at: 0,
            id: template,
            encoding: Bytes::from_static(b"t"),
        });
        for session in 1..=2 {
            handle.append(start(session, template));
        }
        // Session 1 works through many segments and reaches a safe point;
        // session 2 stays in its transaction with two commands.
        handle.append(command(2, 1, 100));
        handle.append(command(2, 2, 100));
        for seq in 1..=200 {
            handle.append(command(1, seq, 200));
            if seq % 50 == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        handle.append(safe_point(1, template));
        handle.append(Record::SessionEnd { session: 1, at: 0 });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!handle.needs_template(template));
        journal.stop();
        assert!(stats.journal_segments_created.get() > 5);
        // Session 2 pins its first segment, so nothing can go yet.
        assert_eq!(stats.journal_segments_deleted.get(), 0);

        let recovered = recover(dir.path());
        assert_eq!(recovered.sessions.len(), 1);
        let session = &recovered.sessions[&2];
        let seqs: Vec<u64> = session
            .commands
            .iter()
            .map(|c| match c.record {
                Record::Command { seq, .. } => seq,
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        assert!(recovered.templates.contains_key(&template));
        assert!(recovered.damage.is_empty());
        assert_eq!(recovered.next_session, 3);

        // Once session 2 ends, a restarted writer deletes what is unneeded.
        let recovered = recover(dir.path());
        let journal = Journal::start(
            settings(dir.path(), FsyncPolicy::Batch),
            &recovered,
            Arc::clone(&stats),
        )
        .expect("restart");
        let handle = journal.handle();
        assert!(!handle.needs_template(template));
        assert_eq!(handle.next_session_id(), 3);
        handle.append(safe_point(2, template));
        std::thread::sleep(Duration::from_millis(60));
        handle.append(Record::SessionEnd { session: 2, at: 0 });
        journal.stop();
        assert!(stats.journal_segments_deleted.get() > 5);
        let left = segment::list_segments(dir.path()).expect("list");
        assert!(left.len() <= 2, "{left:?}");
        let recovered = recover(dir.path());
        assert!(recovered.sessions.is_empty());
    }

    #[test]
    fn synced_segments_are_filled_ahead_and_cut_back_when_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let crash = tempfile::tempdir().expect("tempdir");
        let mut synced = settings(dir.path(), FsyncPolicy::Batch);
        synced.segment_size = 3 * PREALLOCATE_CHUNK;
        let journal = Journal::start(synced, &Recovery::default(), Arc::new(Stats::default()))
            .expect("start");
        let handle = journal.handle();
        handle.append(start(1, TemplateId::from_bytes([1; 32])));
        for seq in 1..=10 {
            handle.append(command(1, seq, 200));
        }
        std::thread::sleep(Duration::from_millis(100));
        let file_len = |path: &std::path::Path| std::fs::metadata(path).expect("stat").len();
        let segments = segment::list_segments(dir.path()).expect("list");
        let (sequence, live) = segments.last().expect("a segment");
        assert_eq!(
            file_len(live),
            PREALLOCATE_CHUNK,
            "zeros ahead of the writes"
        );
        // What a crash now would leave: the zeros are the end, not damage.
        for entry in std::fs::read_dir(dir.path()).expect("read_dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), crash.path().join(entry.file_name())).expect("copy");
        }
        let recovered = recover(crash.path());
        assert!(recovered.damage.is_empty(), "{:?}", recovered.damage);
        assert_eq!(recovered.sessions[&1].commands.len(), 10);
        let (segment, offset, len) = recovered.unwritten.expect("unwritten tail");
        assert_eq!((segment, offset + len), (*sequence, PREALLOCATE_CHUNK));
        let repaired = recovery::scan(
            crash.path(),
            Mode::Repair(recovery::CorruptionPolicy::TolerateTail),
            false,
            |_| {},
            |_| {},
        )
        .expect("repair");
        assert!(repaired.torn_tail.is_none());
        assert_eq!(
            file_len(&segment::segment_path(crash.path(), *sequence)),
            offset
        );

        // Past a chunk the file grows by another; a closed segment ends
        // with its last record.
        for seq in 11..=20_000 {
            handle.append(command(1, seq, 200));
        }
        journal.stop();
        let segments = segment::list_segments(dir.path()).expect("list");
        assert!(segments.len() >= 2, "{segments:?}");
        for (sequence, path) in &segments {
            let data = std::fs::read(path).expect("read");
            let scan = crate::journal::reader::scan_segment(*sequence, &data);
            assert!(
                scan.damage.is_empty(),
                "segment {sequence}: {:?}",
                scan.damage
            );
            assert_eq!(scan.valid_end, data.len() as u64);
        }
        let recovered = recover(dir.path());
        assert!(recovered.unwritten.is_none());
        assert_eq!(recovered.sessions[&1].commands.len(), 20_000);
    }

    #[test]
    fn always_resolves_after_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(Stats::default());
        let journal = Journal::start(
            settings(dir.path(), FsyncPolicy::Always),
            &Recovery::default(),
            Arc::clone(&stats),
        )
        .expect("start");
        let handle = journal.handle();
        handle.append(start(1, TemplateId::from_bytes([1; 32])));
        let Appended::Durable(done) = handle.append(command(1, 1, 10)) else {
            panic!("always waits");
        };
        done.blocking_recv().expect("durable");
        assert!(stats.journal_fsyncs.get() >= 1);
        let recovered = recover(dir.path());
        assert_eq!(recovered.sessions[&1].commands.len(), 1);
    }

    #[test]
    fn retain_all_keeps_segments_until_the_retention_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(Stats::default());
        let mut all = settings(dir.path(), FsyncPolicy::Off);
        all.retain = Retain::All;
        all.retention_size = 5 * 4096;
        let journal = Journal::start(all, &Recovery::default(), Arc::clone(&stats)).expect("start");
        let handle = journal.handle();
        let template = TemplateId::from_bytes([3; 32]);
        for seq in 1..=200 {
            handle.append(start(seq, template));
            handle.append(command(seq, 1, 200));
            handle.append(Record::SessionEnd {
                session: seq,
                at: 0,
            });
            if seq % 20 == 0 {
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        journal.stop();
        let left = segment::list_segments(dir.path()).expect("list");
        let size: u64 = left
            .iter()
            .map(|(_, path)| std::fs::metadata(path).expect("meta").len())
            .sum();
        // Kept up to the retention size (plus the segment being written),
        // far less than was written.
        assert!(stats.journal_segments_deleted.get() > 10);
        assert!(size <= 6 * 4096, "{size}");
        assert!(left.len() >= 4, "{left:?}");
        // What is kept is every command, not only unfinished ones.
        let mut commands = 0;
        recovery::scan(
            dir.path(),
            Mode::ReadOnly,
            true,
            |r| {
                commands += u64::from(matches!(r.record, Record::Command { .. }));
            },
            |_| {},
        )
        .expect("scan");
        assert!(commands > 20, "{commands}");
    }

    #[test]
    fn segments_rotate_by_age_and_max_size_wins_over_a_stuck_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = Arc::new(Stats::default());
        let mut aged = settings(dir.path(), FsyncPolicy::Batch);
        aged.segment_age = Duration::from_millis(1);
        aged.max_size = 3 * 4096;
        let journal =
            Journal::start(aged, &Recovery::default(), Arc::clone(&stats)).expect("start");
        let handle = journal.handle();
        let template = TemplateId::from_bytes([4; 32]);
        // Session 1 never reaches a safe point: it pins its segment until
        // max_size forces it out.
        handle.append(start(1, template));
        for seq in 1..=60 {
            handle.append(command(1, seq, 300));
            std::thread::sleep(Duration::from_millis(3));
        }
        std::thread::sleep(Duration::from_millis(60));
        journal.stop();
        assert!(stats.journal_segments_created.get() >= 5);
        assert!(stats.journal_segments_deleted.get() >= 1);
        let recovered = recover(dir.path());
        let session = &recovered.sessions[&1];
        assert!(session.truncated, "{session:?}");
    }
}
