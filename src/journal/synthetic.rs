//! Synthetic records for `reprise journal load` and for tests.
//!
//! Every byte of a synthetic command follows from its session, its
//! sequence number and its size, so whoever reads the journal back can
//! check that each record is exactly the one that was appended.

use bytes::{BufMut, Bytes, BytesMut};

use super::record::{Omitted, Record, FRAME_OVERHEAD};
use crate::template::{StateHash, TemplateId};

/// The one template every synthetic session uses.
pub const TEMPLATE_ENCODING: &[u8] = b"\x01reprise journal load";

/// Framed size of a command record besides its message bytes: the frame,
/// session and time, seq, state hash, result digest, omitted, message
/// length and the length prefix of the messages.
pub const COMMAND_OVERHEAD: usize = FRAME_OVERHEAD + 16 + 8 + 32 + 32 + 1 + 8 + 4;

/// The smallest command a Query message fits in (tag, length, NUL).
pub const MIN_COMMAND_SIZE: usize = COMMAND_OVERHEAD + 6;

pub fn template_id() -> TemplateId {
    TemplateId::from_bytes(*blake3::hash(TEMPLATE_ENCODING).as_bytes())
}

pub fn template(at: u64) -> Record {
    Record::Template {
        at,
        id: template_id(),
        encoding: Bytes::from_static(TEMPLATE_ENCODING),
    }
}

pub fn session_start(session: u64, at: u64) -> Record {
    Record::SessionStart {
        session,
        at,
        template: template_id(),
        startup: vec![
            (Bytes::from_static(b"user"), Bytes::from_static(b"load")),
            (Bytes::from_static(b"database"), Bytes::from_static(b"load")),
        ],
    }
}

pub fn safe_point(session: u64, seq: u64, at: u64) -> Record {
    Record::SafePoint {
        session,
        at,
        template: template_id(),
        state_hash: state_hash(session, seq),
    }
}

/// Command `seq` of `session`, `size` bytes once framed, before escaping
/// (at least [`MIN_COMMAND_SIZE`]).
pub fn command(session: u64, seq: u64, at: u64, size: usize) -> Record {
    let messages = messages(session, seq, size.max(MIN_COMMAND_SIZE) - COMMAND_OVERHEAD);
    Record::Command {
        session,
        at,
        seq,
        state_hash: state_hash(session, seq),
        result_digest: result_digest(session, seq),
        omitted: Omitted::No,
        message_len: messages.len() as u64,
        messages,
    }
}

/// One Query message of `len` bytes (at least 6) whose text names the
/// session and the command, padded with spaces.
pub fn messages(session: u64, seq: u64, len: usize) -> Bytes {
    let len = len.max(6);
    let mut out = BytesMut::with_capacity(len);
    out.put_u8(b'Q');
    // The length counts itself but not the tag.
    out.put_u32(u32::try_from(len - 1).unwrap_or(u32::MAX));
    let text = format!("SELECT {session}, {seq}");
    let room = len - 6;
    let text = &text.as_bytes()[..text.len().min(room)];
    out.put_slice(text);
    out.put_bytes(b' ', room - text.len());
    out.put_u8(0);
    out.freeze()
}

pub fn state_hash(session: u64, seq: u64) -> StateHash {
    StateHash::from_bytes(digest(b's', session, seq))
}

pub fn result_digest(session: u64, seq: u64) -> [u8; 32] {
    digest(b'r', session, seq)
}

fn digest(domain: u8, session: u64, seq: u64) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[domain]);
    hasher.update(&session.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_take_the_size_asked_for() {
        for size in [0, MIN_COMMAND_SIZE, 200, 4096] {
            let mut out = Vec::new();
            command(7, 42, 1, size).encode(&mut out);
            assert_eq!(out.len(), size.max(MIN_COMMAND_SIZE), "size {size}");
        }
        let query = messages(7, 42, 40);
        assert_eq!(&query[..1], b"Q");
        assert_eq!(
            u32::from_be_bytes([query[1], query[2], query[3], query[4]]),
            39
        );
        assert!(query.starts_with(b"Q\0\0\0\x27SELECT 7, 42 "));
        assert_eq!(query.last(), Some(&0));
    }
}
