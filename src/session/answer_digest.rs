//! The blake3 digest of what the client received for one command.
//!
//! Most answers are a few small messages that end at a safe point, where
//! nothing ever asks for their digest. So the answer's bytes are only
//! copied aside as they pass, and hashed in batches: when the copy grows
//! past a batch, when a digest is asked for, or not at all when the
//! command's answer is dropped unasked. Hashing in pieces gives the same
//! digest as hashing it all at once.

use crate::wire::frame::HEADER_LEN;

/// Answer bytes copied aside before they are hashed; a message this big
/// or bigger is hashed in place.
const BATCH: usize = 1024;

#[derive(Debug, Default)]
pub struct AnswerDigest {
    hasher: blake3::Hasher,
    /// Something went into `hasher` since it was last reset.
    hashed: bool,
    /// Answer bytes not yet in `hasher`, in order.
    pending: Vec<u8>,
}

impl AnswerDigest {
    /// Adds one message of a result: all of it, but of an error only its
    /// severity and SQLSTATE. Message texts are left out (they name
    /// process ids, differ with `lc_messages` and between server
    /// versions), and so is the server's source location.
    pub fn add(&mut self, tag: u8, message: &[u8]) {
        if tag != b'E' {
            self.push(message);
            return;
        }
        self.push(b"E");
        let mut rest = message.get(HEADER_LEN..).unwrap_or_default();
        while let Some((&field, tail)) = rest.split_first() {
            if field == 0 {
                break;
            }
            let end = memchr::memchr(0, tail).unwrap_or(tail.len());
            if matches!(field, b'V' | b'C') {
                self.push(&[field]);
                self.push(&tail[..end]);
                self.push(&[0]);
            }
            rest = tail.get(end + 1..).unwrap_or_default();
        }
    }

    /// Adds the end of the answer: ReadyForQuery's status.
    pub fn add_ready(&mut self, status: u8) {
        self.push(&[b'Z', status]);
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.pending.len() + bytes.len() > BATCH {
            self.hash_pending();
            if bytes.len() >= BATCH {
                self.hasher.update(bytes);
                self.hashed = true;
                return;
            }
        }
        self.pending.extend_from_slice(bytes);
    }

    fn hash_pending(&mut self) {
        if !self.pending.is_empty() {
            self.hasher.update(&self.pending);
            self.pending.clear();
            self.hashed = true;
        }
    }

    /// The digest of what was added so far; adding goes on.
    pub fn so_far(&self) -> [u8; 32] {
        let mut hasher = self.hasher.clone();
        hasher.update(&self.pending);
        *hasher.finalize().as_bytes()
    }

    /// The digest of what was added, which starts a new one.
    pub fn finish(&mut self) -> [u8; 32] {
        self.hash_pending();
        let digest = *self.hasher.finalize().as_bytes();
        self.hasher.reset();
        self.hashed = false;
        digest
    }

    /// Starts a new digest without computing this one.
    pub fn discard(&mut self) {
        self.pending.clear();
        if std::mem::take(&mut self.hashed) {
            self.hasher.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_give_the_digest_of_the_whole_answer() {
        let small = b"D\0\0\0\x0a\0\x01\0\0\0\x01x".to_vec();
        let big = vec![7u8; 3 * BATCH + 5];
        let mut whole = blake3::Hasher::new();
        let mut digest = AnswerDigest::default();
        for message in [&small, &big, &small, &small] {
            whole.update(message);
            digest.add(b'D', message);
        }
        for _ in 0..200 {
            whole.update(&small);
            digest.add(b'D', &small);
        }
        whole.update(b"ZI");
        digest.add_ready(b'I');
        assert_eq!(digest.so_far(), *whole.finalize().as_bytes());
        assert_eq!(digest.finish(), *whole.finalize().as_bytes());
        assert_eq!(
            digest.finish(),
            *blake3::hash(b"").as_bytes(),
            "finish starts anew"
        );
    }

    #[test]
    fn a_discarded_digest_leaves_nothing_behind() {
        let mut digest = AnswerDigest::default();
        digest.add(b'D', &vec![1u8; 2 * BATCH]);
        digest.add(b'C', b"C\0\0\0\x0dSELECT 1\0");
        digest.discard();
        digest.add(b'C', b"C\0\0\0\x0dSELECT 1\0");
        assert_eq!(
            digest.finish(),
            *blake3::hash(b"C\0\0\0\x0dSELECT 1\0").as_bytes()
        );
    }
}
