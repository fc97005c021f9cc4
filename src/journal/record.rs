//! Journal records: what each kind holds, and the framing that lets a
//! reader accept a record only when it is whole.
//!
//! Framing (all integers little-endian):
//!
//! ```text
//! u32  payload length n
//! u32  START_MAGIC
//! u8   record kind
//! n    payload
//! u32  crc32c of (length, kind, payload)
//! u32  END_MAGIC
//! u32  payload length n, again
//! ```
//!
//! The leading length lets a reader walk forward, the trailing one lets it
//! walk backward from the end of a segment, and the start magic is what it
//! looks for to resynchronise after a damaged stretch. A record is accepted
//! only when both lengths agree, both magics hold and the checksum matches.
//!
//! Payloads hold bytes that clients chose (their statements), so a client
//! could send the bytes of a whole, valid record; were the record around
//! them torn or damaged, a reader resynchronising on the start magic would
//! find them and take them for a record nobody wrote. The stored payload is
//! therefore escaped: every byte `R` (0x52, the first byte of both magics)
//! is followed by 0x00, so neither magic ever appears inside a payload and
//! the length, checksum and magics are over the escaped bytes.
//!
//! Every payload starts with the session id (0 for none) and the time in
//! microseconds since the Unix epoch; the rest depends on the kind.

use std::fmt;

use bytes::Bytes;

use crate::template::{StateHash, TemplateId};

pub const START_MAGIC: u32 = u32::from_le_bytes(*b"RPJ<");
pub const END_MAGIC: u32 = u32::from_le_bytes(*b">RPJ");
/// Escaped in payloads: the first byte of both magics.
const ESCAPE: u8 = b'R';
/// Bytes a record takes besides its payload.
pub const FRAME_OVERHEAD: usize = 4 + 4 + 1 + 4 + 4 + 4;
/// Largest payload a reader accepts; a length above it is damage.
pub const MAX_PAYLOAD: usize = 1 << 30;

/// A byte-coded enum of the format, with the name tools print: the values
/// are stored, so they never change.
macro_rules! byte_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$doc:meta])* $variant:ident = $value:literal => $text:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$doc])* $variant = $value,)*
        }

        impl $name {
            pub const ALL: [$name; [$($value),*].len()] = [$($name::$variant),*];

            pub fn from_byte(byte: u8) -> Option<$name> {
                match byte {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }
    };
}

byte_enum! {
    /// The kinds of journal records, as stored.
    pub enum RecordKind {
        Template = 1 => "template",
        SessionStart = 2 => "session_start",
        Command = 3 => "command",
        SafePoint = 4 => "safe_point",
        Outcome = 5 => "outcome",
        SessionEnd = 6 => "session_end",
    }
}

byte_enum! {
    /// Why a command record carries no message bytes.
    pub enum Omitted {
        /// The bytes are there.
        No = 0 => "no",
        /// The command set a password or another credential: never written.
        Credential = 1 => "credential",
        /// The replay log was over its bound: the session is
        /// non-recoverable until its next safe point.
        OverBound = 2 => "over_bound",
    }
}

byte_enum! {
    /// What happened when a session's server connection was replaced.
    pub enum OutcomeKind {
        /// The session went on, on a new server connection.
        Recovered = 1 => "recovered",
        /// Replay could not be proven identical; the session was ended.
        Failed = 2 => "failed",
    }
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A template's canonical encoding, written once before the first
    /// record that names it.
    Template {
        at: u64,
        id: TemplateId,
        encoding: Bytes,
    },
    SessionStart {
        session: u64,
        at: u64,
        template: TemplateId,
        /// The startup packet's parameters, in the order sent.
        startup: Vec<(Bytes, Bytes)>,
    },
    /// One request: the client messages sent to the server for it, the
    /// state hash once the server answered it, and a digest of what the
    /// client received for it.
    Command {
        session: u64,
        at: u64,
        /// Numbers the session's commands from 1.
        seq: u64,
        state_hash: StateHash,
        result_digest: [u8; 32],
        omitted: Omitted,
        /// Size of the messages, also when they are omitted.
        message_len: u64,
        messages: Bytes,
    },
    SafePoint {
        session: u64,
        at: u64,
        template: TemplateId,
        state_hash: StateHash,
    },
    Outcome {
        session: u64,
        at: u64,
        kind: OutcomeKind,
        detail: String,
    },
    SessionEnd {
        session: u64,
        at: u64,
    },
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Template { .. } => RecordKind::Template,
            Record::SessionStart { .. } => RecordKind::SessionStart,
            Record::Command { .. } => RecordKind::Command,
            Record::SafePoint { .. } => RecordKind::SafePoint,
            Record::Outcome { .. } => RecordKind::Outcome,
            Record::SessionEnd { .. } => RecordKind::SessionEnd,
        }
    }

    /// The session it belongs to; none for a template definition.
    pub fn session(&self) -> Option<u64> {
        match self {
            Record::Template { .. } => None,
            Record::SessionStart { session, .. }
            | Record::Command { session, .. }
            | Record::SafePoint { session, .. }
            | Record::Outcome { session, .. }
            | Record::SessionEnd { session, .. } => Some(*session),
        }
    }

    /// Microseconds since the Unix epoch.
    pub fn at(&self) -> u64 {
        match self {
            Record::Template { at, .. }
            | Record::SessionStart { at, .. }
            | Record::Command { at, .. }
            | Record::SafePoint { at, .. }
            | Record::Outcome { at, .. }
            | Record::SessionEnd { at, .. } => *at,
        }
    }

    /// About what the framed record will take, for queue accounting
    /// (escaping adds a byte per `R`, not counted).
    pub fn size_hint(&self) -> usize {
        FRAME_OVERHEAD
            + 16
            + match self {
                Record::Template { encoding, .. } => 36 + encoding.len(),
                Record::SessionStart { startup, .. } => {
                    36 + startup
                        .iter()
                        .map(|(name, value)| 8 + name.len() + value.len())
                        .sum::<usize>()
                }
                Record::Command { messages, .. } => 85 + 4 + messages.len(),
                Record::SafePoint { .. } => 64,
                Record::Outcome { detail, .. } => 5 + detail.len(),
                Record::SessionEnd { .. } => 0,
            }
    }

    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        frame(self.kind() as u8, out, |payload| {
            self.encode_payload(payload)
        });
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session().unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.at().to_le_bytes());
        match self {
            Record::Template { id, encoding, .. } => {
                out.extend_from_slice(id.as_bytes());
                put_bytes(out, encoding);
            }
            Record::SessionStart {
                template, startup, ..
            } => {
                out.extend_from_slice(template.as_bytes());
                put_u32(out, startup.len());
                for (name, value) in startup {
                    put_bytes(out, name);
                    put_bytes(out, value);
                }
            }
            Record::Command {
                seq,
                state_hash,
                result_digest,
                omitted,
                message_len,
                messages,
                ..
            } => {
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(state_hash.as_bytes());
                out.extend_from_slice(result_digest);
                out.push(*omitted as u8);
                out.extend_from_slice(&message_len.to_le_bytes());
                put_bytes(out, messages);
            }
            Record::SafePoint {
                template,
                state_hash,
                ..
            } => {
                out.extend_from_slice(template.as_bytes());
                out.extend_from_slice(state_hash.as_bytes());
            }
            Record::Outcome { kind, detail, .. } => {
                out.push(*kind as u8);
                put_bytes(out, detail.as_bytes());
            }
            Record::SessionEnd { .. } => {}
        }
    }

    /// Reads a stored (escaped) payload whose frame verified.
    pub fn decode(kind: u8, stored: &[u8]) -> Result<Record, PayloadError> {
        let kind = RecordKind::from_byte(kind).ok_or(PayloadError::UnknownKind(kind))?;
        let payload = unescape(stored)?;
        let mut r = Cursor(&payload);
        let session = r.u64()?;
        let at = r.u64()?;
        let record = match kind {
            RecordKind::Template => {
                let id = TemplateId::from_bytes(r.array()?);
                let encoding = Bytes::copy_from_slice(r.bytes()?);
                Record::Template { at, id, encoding }
            }
            RecordKind::SessionStart => {
                let template = TemplateId::from_bytes(r.array()?);
                let count = r.u32()?;
                let mut startup = Vec::new();
                for _ in 0..count {
                    let name = Bytes::copy_from_slice(r.bytes()?);
                    let value = Bytes::copy_from_slice(r.bytes()?);
                    startup.push((name, value));
                }
                Record::SessionStart {
                    session,
                    at,
                    template,
                    startup,
                }
            }
            RecordKind::Command => {
                let seq = r.u64()?;
                let state_hash = StateHash::from_bytes(r.array()?);
                let result_digest = r.array()?;
                let omitted = Omitted::from_byte(r.u8()?).ok_or(PayloadError::Malformed)?;
                let message_len = r.u64()?;
                let messages = Bytes::copy_from_slice(r.bytes()?);
                if omitted == Omitted::No && messages.len() as u64 != message_len {
                    return Err(PayloadError::Malformed);
                }
                Record::Command {
                    session,
                    at,
                    seq,
                    state_hash,
                    result_digest,
                    omitted,
                    message_len,
                    messages,
                }
            }
            RecordKind::SafePoint => Record::SafePoint {
                session,
                at,
                template: TemplateId::from_bytes(r.array()?),
                state_hash: StateHash::from_bytes(r.array()?),
            },
            RecordKind::Outcome => {
                let kind = OutcomeKind::from_byte(r.u8()?).ok_or(PayloadError::Malformed)?;
                let detail =
                    String::from_utf8(r.bytes()?.to_vec()).map_err(|_| PayloadError::Malformed)?;
                Record::Outcome {
                    session,
                    at,
                    kind,
                    detail,
                }
            }
            RecordKind::SessionEnd => Record::SessionEnd { session, at },
        };
        if !r.0.is_empty() {
            return Err(PayloadError::Malformed);
        }
        Ok(record)
    }
}

/// A payload that verified but does not read as its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("payload does not match its record kind")]
    Malformed,
}

/// Frames a record of `kind` whose payload `write` appends to `out`.
pub fn frame(kind: u8, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&START_MAGIC.to_le_bytes());
    out.push(kind);
    write(out);
    escape_tail(out, start + 9);
    let payload_len = out.len() - start - 9;
    let len = u32::try_from(payload_len).expect("journal payloads stay below 4 GiB");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let checksum = checksum(&out[start..start + 4], kind, &out[start + 9..]);
    out.extend_from_slice(&checksum.to_le_bytes());
    out.extend_from_slice(&END_MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Escapes `out[from..]` in place: each `R` gets a 0x00 after it.
fn escape_tail(out: &mut Vec<u8>, from: usize) {
    let count = memchr::memchr_iter(ESCAPE, &out[from..]).count();
    if count == 0 {
        return;
    }
    let mut end = out.len();
    out.resize(end + count, 0);
    // From the back, so that nothing is overwritten before it moved: each
    // run after an `R` moves up by the escapes still to come before it.
    let mut write = out.len();
    while let Some(at) = memchr::memrchr(ESCAPE, &out[from..end]).map(|at| from + at) {
        let run = end - (at + 1);
        out.copy_within(at + 1..end, write - run);
        write -= run + 2;
        out[write] = ESCAPE;
        out[write + 1] = 0;
        end = at;
    }
}

/// The payload as written, from its stored (escaped) form.
pub fn unescape(stored: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, PayloadError> {
    if memchr::memchr(ESCAPE, stored).is_none() {
        return Ok(std::borrow::Cow::Borrowed(stored));
    }
    let mut raw = Vec::with_capacity(stored.len());
    let mut rest = stored;
    while let Some(at) = memchr::memchr(ESCAPE, rest) {
        if rest.get(at + 1) != Some(&0) {
            return Err(PayloadError::Malformed);
        }
        raw.extend_from_slice(&rest[..=at]);
        rest = &rest[at + 2..];
    }
    raw.extend_from_slice(rest);
    Ok(std::borrow::Cow::Owned(raw))
}

fn checksum(len: &[u8], kind: u8, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(len);
    let crc = crc32c::crc32c_append(crc, &[kind]);
    crc32c::crc32c_append(crc, payload)
}

/// Why bytes at an offset are not a whole record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes left than a record needs.
    Truncated,
    BadStartMagic,
    /// The length runs past the end of the data or above the maximum.
    BadLength,
    BadEndMagic,
    /// The trailing length differs from the leading one.
    LengthMismatch,
    BadChecksum,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::Truncated => "record cut short",
            FrameError::BadStartMagic => "no record start magic",
            FrameError::BadLength => "record length runs past the end of the segment",
            FrameError::BadEndMagic => "record end magic missing",
            FrameError::LengthMismatch => "leading and trailing lengths differ",
            FrameError::BadChecksum => "checksum mismatch",
        })
    }
}

/// A frame that verified: its kind, payload and total length.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
    pub len: usize,
}

/// Verifies the frame that starts at the beginning of `data`.
pub fn verify(data: &[u8]) -> Result<Frame<'_>, FrameError> {
    if data.len() < FRAME_OVERHEAD {
        return Err(FrameError::Truncated);
    }
    let len = read_u32(data, 0) as usize;
    if read_u32(data, 4) != START_MAGIC {
        return Err(FrameError::BadStartMagic);
    }
    if len > MAX_PAYLOAD || len > data.len() - FRAME_OVERHEAD {
        return Err(FrameError::BadLength);
    }
    let kind = data[8];
    let payload = &data[9..9 + len];
    let tail = 9 + len;
    if read_u32(data, tail + 4) != END_MAGIC {
        return Err(FrameError::BadEndMagic);
    }
    if read_u32(data, tail + 8) as usize != len {
        return Err(FrameError::LengthMismatch);
    }
    if read_u32(data, tail) != checksum(&data[0..4], kind, payload) {
        return Err(FrameError::BadChecksum);
    }
    Ok(Frame {
        kind,
        payload,
        len: len + FRAME_OVERHEAD,
    })
}

/// The start of the frame that ends exactly at `end`, read from its
/// trailing length; `None` when the bytes there cannot be a frame's end.
pub fn start_before(data: &[u8], end: usize) -> Option<usize> {
    if end < FRAME_OVERHEAD || end > data.len() {
        return None;
    }
    if read_u32(data, end - 8) != END_MAGIC {
        return None;
    }
    let len = read_u32(data, end - 4) as usize;
    end.checked_sub(len.checked_add(FRAME_OVERHEAD)?)
}

pub(crate) fn read_u32(data: &[u8], at: usize) -> u32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&data[at..at + 4]);
    u32::from_le_bytes(bytes)
}

fn put_u32(out: &mut Vec<u8>, value: usize) {
    let value = u32::try_from(value).expect("journal fields stay below 4 GiB");
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Reads a payload front to back; every read checks what is left.
pub(crate) struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        if self.0.len() < n {
            return Err(PayloadError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, PayloadError> {
        Ok(read_u32(self.take(4)?, 0))
    }

    pub fn u64(&mut self) -> Result<u64, PayloadError> {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(bytes))
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], PayloadError> {
        let mut bytes = [0; N];
        bytes.copy_from_slice(self.take(N)?);
        Ok(bytes)
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], PayloadError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn samples() -> Vec<Record> {
        let id = TemplateId::from_bytes([7; 32]);
        vec![
            Record::Template {
                at: 1,
                id,
                encoding: Bytes::from_static(b"\x01template"),
            },
            Record::SessionStart {
                session: 3,
                at: 2,
                template: id,
                startup: vec![(Bytes::from_static(b"user"), Bytes::from_static(b"alice"))],
            },
            Record::Command {
                session: 3,
                at: 3,
                seq: 1,
                state_hash: StateHash::from_bytes([1; 32]),
                result_digest: [2; 32],
                omitted: Omitted::No,
                message_len: 9,
                messages: Bytes::from_static(b"Q\0\0\0\x09ok\0\0"),
            },
            Record::Command {
                session: 3,
                at: 4,
                seq: 2,
                state_hash: StateHash::from_bytes([1; 32]),
                result_digest: [2; 32],
                omitted: Omitted::Credential,
                message_len: 40,
                messages: Bytes::new(),
            },
            Record::SafePoint {
                session: 3,
                at: 5,
                template: id,
                state_hash: StateHash::from_bytes([4; 32]),
            },
            Record::Outcome {
                session: 3,
                at: 6,
                kind: OutcomeKind::Recovered,
                detail: "replayed 2 commands".into(),
            },
            Record::SessionEnd { session: 3, at: 7 },
        ]
    }

    #[test]
    fn records_round_trip() {
        for record in samples() {
            let mut out = Vec::new();
            record.encode(&mut out);
            let frame = verify(&out).expect("verifies");
            assert_eq!(frame.len, out.len());
            assert_eq!(start_before(&out, out.len()), Some(0));
            let back = Record::decode(frame.kind, frame.payload).expect("decodes");
            assert_eq!(back, record);
            assert!(
                record.size_hint() >= out.len() - memchr::memchr_iter(ESCAPE, &out).count(),
                "{record:?}"
            );
        }
    }

    #[test]
    fn escaping_round_trips() {
        for raw in [
            &b""[..],
            b"R",
            b"RR",
            b"aRb",
            b"RaR",
            b"abc",
            b"RPJ<>RPJ",
            b"xxRRxxR",
        ] {
            let mut out = b"head".to_vec();
            out.extend_from_slice(raw);
            escape_tail(&mut out, 4);
            assert_eq!(&out[..4], b"head");
            let stored = &out[4..];
            assert_eq!(
                stored.len(),
                raw.len() + raw.iter().filter(|b| **b == ESCAPE).count()
            );
            assert_eq!(unescape(stored).as_deref(), Ok(raw), "{raw:?}");
        }
    }

    #[test]
    fn payloads_never_hold_a_magic() {
        let forged = {
            let mut out = Vec::new();
            Record::SessionEnd { session: 7, at: 1 }.encode(&mut out);
            out
        };
        let record = Record::Command {
            session: 1,
            at: 0x5252_5252,
            seq: 1,
            state_hash: StateHash::from_bytes([b'R'; 32]),
            result_digest: [0; 32],
            omitted: Omitted::No,
            message_len: forged.len() as u64 + 2,
            messages: Bytes::from([&forged[..], b"RR"].concat()),
        };
        let mut out = Vec::new();
        record.encode(&mut out);
        let frame = verify(&out).expect("verifies");
        for magic in [START_MAGIC, END_MAGIC] {
            assert!(memchr::memmem::find(frame.payload, &magic.to_le_bytes()).is_none());
        }
        assert_eq!(Record::decode(frame.kind, frame.payload), Ok(record));
        assert_eq!(unescape(b"R"), Err(PayloadError::Malformed));
        assert_eq!(unescape(b"RX\0"), Err(PayloadError::Malformed));
        assert_eq!(unescape(b"aR\0b").as_deref(), Ok(&b"aRb"[..]));
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let mut out = Vec::new();
        samples()[2].encode(&mut out);
        for at in 0..out.len() {
            for bit in 0..8 {
                let mut damaged = out.clone();
                damaged[at] ^= 1 << bit;
                assert!(verify(&damaged).is_err(), "flip at {at} bit {bit}");
            }
        }
    }
}
