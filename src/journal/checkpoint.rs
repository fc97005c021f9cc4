//! The checkpoint: a small file beside the segments that holds the
//! template registry and, per live session, where its records start to
//! matter. Recovery starts from it instead of from the first segment, and
//! the writer deletes every segment that lies before all of it.
//!
//! The file is the segment header's magic and version followed by framed
//! entries (the journal's own framing, with kinds of their own): a head,
//! the templates, the sessions and an end entry that repeats the counts.
//! It is written to a temporary file, synced and renamed over the old one,
//! whose previous version is kept as `checkpoint.prev`: a crash at any
//! moment leaves at least one whole checkpoint.

use std::io::{self, Write};
use std::path::Path;

use bytes::Bytes;

use super::record::{self, Cursor};
use super::segment::{self, Position};
use crate::template::TemplateId;

pub const CHECKPOINT_FILE: &str = "checkpoint";
pub const PREVIOUS_FILE: &str = "checkpoint.prev";
const TEMPORARY_FILE: &str = "checkpoint.tmp";
const MAGIC: [u8; 8] = *b"REPRISEK";
const VERSION: u32 = 1;

const HEAD: u8 = 0x41;
const TEMPLATE: u8 = 0x42;
const SESSION: u8 = 0x43;
const END: u8 = 0x44;

/// A session that had not ended when the checkpoint was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSession {
    pub session: u64,
    /// Its template at its last safe point (or at its start).
    pub template: TemplateId,
    /// Its SessionStart record.
    pub start: Position,
    /// Its last SafePoint record, or its start if it had none.
    pub safe_point: Position,
    pub started_at: u64,
    /// Records it needed were deleted to keep the journal within its
    /// size limit.
    pub truncated: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub at: u64,
    /// Everything before this was written when the checkpoint was taken.
    pub written_to: Position,
    /// The next session id to hand out.
    pub next_session: u64,
    /// Template definitions and the segment each was last written in.
    pub templates: Vec<(TemplateId, Bytes, u64)>,
    pub sessions: Vec<LiveSession>,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        record::frame(HEAD, &mut out, |p| {
            p.extend_from_slice(&self.at.to_le_bytes());
            put_position(p, self.written_to);
            p.extend_from_slice(&self.next_session.to_le_bytes());
        });
        for (id, encoding, segment) in &self.templates {
            record::frame(TEMPLATE, &mut out, |p| {
                p.extend_from_slice(id.as_bytes());
                p.extend_from_slice(&segment.to_le_bytes());
                p.extend_from_slice(&(encoding.len() as u32).to_le_bytes());
                p.extend_from_slice(encoding);
            });
        }
        for session in &self.sessions {
            record::frame(SESSION, &mut out, |p| {
                p.extend_from_slice(&session.session.to_le_bytes());
                p.extend_from_slice(session.template.as_bytes());
                put_position(p, session.start);
                put_position(p, session.safe_point);
                p.extend_from_slice(&session.started_at.to_le_bytes());
                p.push(u8::from(session.truncated));
            });
        }
        record::frame(END, &mut out, |p| {
            p.extend_from_slice(&(self.templates.len() as u64).to_le_bytes());
            p.extend_from_slice(&(self.sessions.len() as u64).to_le_bytes());
        });
        out
    }

    pub fn decode(data: &[u8]) -> Result<Checkpoint, String> {
        if data.len() < 12 || data[..8] != MAGIC {
            return Err("not a Reprise checkpoint (bad magic)".into());
        }
        let version = record::read_u32(data, 8);
        if version != VERSION {
            return Err(format!("checkpoint format version {version} is unknown"));
        }
        let mut checkpoint = Checkpoint::default();
        let mut pos = 12;
        let mut head = false;
        loop {
            let frame = record::verify(&data[pos..])
                .map_err(|err| format!("entry at offset {pos}: {err}"))?;
            let payload = record::unescape(frame.payload)
                .map_err(|err| format!("entry at offset {pos}: {err}"))?;
            let mut r = Cursor(&payload);
            let malformed = || format!("entry at offset {pos} is malformed");
            match frame.kind {
                HEAD if !head => {
                    head = true;
                    checkpoint.at = r.u64().map_err(|_| malformed())?;
                    checkpoint.written_to = read_position(&mut r).ok_or_else(malformed)?;
                    checkpoint.next_session = r.u64().map_err(|_| malformed())?;
                }
                TEMPLATE if head => {
                    let id = TemplateId::from_bytes(r.array().map_err(|_| malformed())?);
                    let segment = r.u64().map_err(|_| malformed())?;
                    let encoding = Bytes::copy_from_slice(r.bytes().map_err(|_| malformed())?);
                    checkpoint.templates.push((id, encoding, segment));
                }
                SESSION if head => {
                    let session = r.u64().map_err(|_| malformed())?;
                    let template = TemplateId::from_bytes(r.array().map_err(|_| malformed())?);
                    let start = read_position(&mut r).ok_or_else(malformed)?;
                    let safe_point = read_position(&mut r).ok_or_else(malformed)?;
                    let started_at = r.u64().map_err(|_| malformed())?;
                    let truncated = match r.u8().map_err(|_| malformed())? {
                        0 => false,
                        1 => true,
                        _ => return Err(malformed()),
                    };
                    checkpoint.sessions.push(LiveSession {
                        session,
                        template,
                        start,
                        safe_point,
                        started_at,
                        truncated,
                    });
                }
                END if head => {
                    let templates = r.u64().map_err(|_| malformed())?;
                    let sessions = r.u64().map_err(|_| malformed())?;
                    // Strict like every other entry: a checkpoint that
                    // decodes is exactly what `encode` writes.
                    if !r.is_empty() {
                        return Err(malformed());
                    }
                    if templates != checkpoint.templates.len() as u64
                        || sessions != checkpoint.sessions.len() as u64
                    {
                        return Err("checkpoint entry counts do not match".into());
                    }
                    if pos + frame.len != data.len() {
                        return Err(format!(
                            "{} bytes after the checkpoint's end",
                            data.len() - pos - frame.len
                        ));
                    }
                    return Ok(checkpoint);
                }
                kind => return Err(format!("unexpected checkpoint entry {kind:#x} at {pos}")),
            }
            if !r.is_empty() {
                return Err(malformed());
            }
            pos += frame.len;
        }
    }

    /// Writes the checkpoint atomically: the old one becomes the previous.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let temporary = dir.join(TEMPORARY_FILE);
        let _ = std::fs::remove_file(&temporary);
        let mut file = segment::create_private(&temporary)?;
        file.write_all(&self.encode())?;
        file.sync_all()?;
        drop(file);
        let current = dir.join(CHECKPOINT_FILE);
        if current.exists() {
            std::fs::rename(&current, dir.join(PREVIOUS_FILE))?;
        }
        std::fs::rename(&temporary, &current)?;
        segment::sync_dir(dir)
    }
}

/// The newest checkpoint in `dir` that reads whole, and what was wrong
/// with any that did not.
pub fn read_latest(dir: &Path) -> (Option<Checkpoint>, Vec<String>) {
    let mut problems = Vec::new();
    for name in [CHECKPOINT_FILE, PREVIOUS_FILE] {
        let path = dir.join(name);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                problems.push(format!("{}: {err}", path.display()));
                continue;
            }
        };
        match Checkpoint::decode(&data) {
            Ok(checkpoint) => return (Some(checkpoint), problems),
            Err(err) => problems.push(format!("{}: {err}", path.display())),
        }
    }
    (None, problems)
}

/// Removes a leftover temporary file from a write that did not finish.
pub fn remove_leftovers(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(TEMPORARY_FILE));
}

fn put_position(out: &mut Vec<u8>, position: Position) {
    out.extend_from_slice(&position.segment.to_le_bytes());
    out.extend_from_slice(&position.offset.to_le_bytes());
}

fn read_position(r: &mut Cursor<'_>) -> Option<Position> {
    Some(Position {
        segment: r.u64().ok()?,
        offset: r.u64().ok()?,
    })
}

/// Opens a checkpoint file for reading, for tools.
pub fn exists(dir: &Path) -> bool {
    dir.join(CHECKPOINT_FILE).exists() || dir.join(PREVIOUS_FILE).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            at: 99,
            written_to: Position {
                segment: 3,
                offset: 4096,
            },
            next_session: 12,
            templates: vec![(TemplateId::from_bytes([1; 32]), Bytes::from_static(b"t"), 2)],
            sessions: vec![LiveSession {
                session: 11,
                template: TemplateId::from_bytes([1; 32]),
                start: Position {
                    segment: 2,
                    offset: 40,
                },
                safe_point: Position {
                    segment: 3,
                    offset: 100,
                },
                started_at: 5,
                truncated: false,
            }],
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let checkpoint = sample();
        let bytes = checkpoint.encode();
        assert_eq!(Checkpoint::decode(&bytes), Ok(checkpoint));
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x01;
            assert!(Checkpoint::decode(&damaged).is_err(), "flip at {at}");
        }
        assert!(Checkpoint::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn refuses_entries_longer_or_other_than_written() {
        let bytes = sample().encode();
        // Rebuild the end entry with a stray byte after the counts, and a
        // session entry whose flag is neither 0 nor 1: both checksum-valid.
        let end = bytes.len() - (record::FRAME_OVERHEAD + 16);
        let mut longer = bytes[..end].to_vec();
        record::frame(END, &mut longer, |p| {
            p.extend_from_slice(&1u64.to_le_bytes());
            p.extend_from_slice(&1u64.to_le_bytes());
            p.push(0);
        });
        assert!(Checkpoint::decode(&longer).is_err());

        let mut odd = sample();
        odd.sessions[0].truncated = true;
        let mut bytes = odd.encode();
        let flag = bytes.len() - (record::FRAME_OVERHEAD + 16) - 13;
        assert_eq!(bytes[flag], 1);
        bytes[flag] = 2;
        let entry = flag + 1 - (8 + 32 + 16 + 16 + 8 + 1) - 9;
        let payload = bytes[entry + 9..flag + 1].to_vec();
        let mut rebuilt = bytes[..entry].to_vec();
        record::frame(SESSION, &mut rebuilt, |p| p.extend_from_slice(&payload));
        rebuilt.extend_from_slice(&bytes[flag + 13..]);
        assert_eq!(rebuilt.len(), bytes.len());
        assert!(Checkpoint::decode(&rebuilt).is_err());
        assert_eq!(Checkpoint::decode(&odd.encode()), Ok(odd));
    }

    #[test]
    fn falls_back_to_the_previous_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut first = sample();
        first.next_session = 1;
        first.write(dir.path()).expect("write");
        let second = sample();
        second.write(dir.path()).expect("write");
        assert_eq!(read_latest(dir.path()).0, Some(second));
        let current = dir.path().join(CHECKPOINT_FILE);
        let mut bytes = std::fs::read(&current).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&current, bytes).expect("damage");
        let (found, problems) = read_latest(dir.path());
        assert_eq!(found, Some(first));
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
