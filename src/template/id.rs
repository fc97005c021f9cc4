//! Template ids and state hashes: 32-byte blake3 digests, shown as hex.

use std::fmt;
use std::str::FromStr;

use super::replay::ReplayState;

/// blake3 of a [`Template`](super::Template)'s canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct TemplateId([u8; 32]);

/// blake3 of a template id followed by the canonical encoding of the
/// replay-class state: the whole tracked state of a session in one value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct StateHash([u8; 32]);

impl TemplateId {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        TemplateId(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl StateHash {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        StateHash(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The state hash of a session whose template is `template`.
///
/// Computed after every command, so it feeds the encoding straight into the
/// hasher: no allocation, whatever the replay state holds. The id has a
/// fixed length, so the concatenation is unambiguous.
pub fn state_hash(template: TemplateId, replay: &ReplayState) -> StateHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&template.0);
    replay.encode(&mut hasher);
    StateHash(*hasher.finalize().as_bytes())
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8; 32]) -> fmt::Result {
    for byte in bytes {
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

impl fmt::Display for TemplateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for StateHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// A template id that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a template id is 64 hex digits")]
pub struct ParseTemplateIdError;

impl FromStr for TemplateId {
    type Err = ParseTemplateIdError;

    /// Accepts either case, as operators may paste ids from anywhere.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(ParseTemplateIdError);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Ok(TemplateId(out))
    }
}

fn hex_digit(c: u8) -> Result<u8, ParseTemplateIdError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(ParseTemplateIdError),
    }
}
