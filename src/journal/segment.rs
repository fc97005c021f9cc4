//! Segment files: names, the fixed header, and positions in the journal.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The first bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"REPRISEJ";
/// Bumped when a reader of the previous version could not read the new
/// one. Readers accept every version up to their own.
pub const FORMAT_VERSION: u32 = 1;
/// magic (8), version (4), header length (4), sequence (8), created µs
/// (8), crc32c of the preceding 32 bytes (4), reserved (4).
pub const HEADER_LEN: usize = 40;
const SUFFIX: &str = ".seg";

/// Where a record starts: segment sequence number and byte offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// The decoded header of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u32,
    pub sequence: u64,
    pub created_micros: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        out[24..32].copy_from_slice(&self.created_micros.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(data: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if data.len() < HEADER_LEN {
            return Err(HeaderError::Short);
        }
        if data[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        let u32_at = |at: usize| super::record::read_u32(data, at);
        let u64_at = |at: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&data[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        if u32_at(32) != crc32c::crc32c(&data[0..32]) {
            return Err(HeaderError::Checksum);
        }
        let version = u32_at(8);
        if version == 0 || version > FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err(HeaderError::Checksum);
        }
        Ok(SegmentHeader {
            version,
            sequence: u64_at(16),
            created_micros: u64_at(24),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("segment header cut short")]
    Short,
    #[error("not a Reprise journal segment (bad magic)")]
    Magic,
    #[error("segment header checksum mismatch")]
    Checksum,
    #[error("segment format version {0} is newer than this Reprise reads ({FORMAT_VERSION})")]
    Version(u32),
}

pub fn segment_name(sequence: u64) -> String {
    format!("{sequence:016}{SUFFIX}")
}

pub fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(segment_name(sequence))
}

/// The segments in `dir`, by sequence number, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        if stem.len() == 16 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(sequence) = stem.parse() {
                segments.push((sequence, entry.path()));
            }
        }
    }
    segments.sort();
    Ok(segments)
}

/// Opens a new file that only the owner may read or write.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_catches_damage() {
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            sequence: 42,
            created_micros: 1_700_000_000_000_000,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        for at in 0..36 {
            let mut damaged = bytes;
            damaged[at] ^= 0x10;
            assert!(SegmentHeader::decode(&damaged).is_err(), "flip at {at}");
        }
        assert_eq!(SegmentHeader::decode(&bytes[..10]), Err(HeaderError::Short));
    }

    #[test]
    fn names_sort_by_sequence() {
        assert_eq!(segment_name(7), "0000000000000007.seg");
        assert!(segment_name(9) < segment_name(10));
    }
}
