//! Reads one segment back: every whole record, and a precise account of
//! every stretch that is not one.
//!
//! The reader walks forward from the header, record by record. Where a
//! record does not verify, it looks for the next place where one does —
//! the next start magic whose whole frame verifies, or the earliest record
//! found by walking backward from the end of the segment along the
//! trailing lengths — and reports the bytes in between as one damaged
//! stretch. A stretch that runs to the end of the segment is its tail: in
//! the newest segment that is a torn write, elsewhere it is damage like
//! any other. A record is returned only if its frame verified and its
//! payload decoded; nothing from a damaged stretch is ever returned.

use std::fmt;

use super::record::{self, FrameError, PayloadError, Record, START_MAGIC};
use super::segment::{HeaderError, Position, SegmentHeader, HEADER_LEN};

/// A record read back, with where it lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    pub position: Position,
    /// Framed length.
    pub len: u64,
    pub record: Record,
}

/// What was wrong with a damaged stretch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    Header(HeaderError),
    /// The header is whole but names another segment.
    WrongSequence(u64),
    Frame(FrameError),
    /// The frame verified but its payload does not read as its kind.
    Payload(PayloadError),
}

impl fmt::Display for DamageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DamageKind::Header(err) => write!(f, "{err}"),
            DamageKind::WrongSequence(sequence) => {
                write!(f, "segment header names segment {sequence}")
            }
            DamageKind::Frame(err) => write!(f, "{err}"),
            DamageKind::Payload(err) => write!(f, "{err}"),
        }
    }
}

/// A stretch of a segment that holds no whole record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    /// What the first unreadable record looked like.
    pub kind: DamageKind,
    /// Only zero bytes: typically space a file system allocated but the
    /// write never reached.
    pub zeros: bool,
    /// The stretch runs to the end of the segment.
    pub tail: bool,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "segment {} offset {}: {} damaged byte{}{} ({}){}",
            self.segment,
            self.offset,
            self.len,
            if self.len == 1 { "" } else { "s" },
            if self.zeros { ", all zero" } else { "" },
            self.kind,
            if self.tail {
                ", up to the end of the segment"
            } else {
                ""
            }
        )
    }
}

/// Everything read from one segment.
#[derive(Clone, Debug, Default)]
pub struct SegmentScan {
    pub sequence: u64,
    pub header: Option<SegmentHeader>,
    pub records: Vec<ScannedRecord>,
    pub damage: Vec<Damage>,
    /// End of the last whole record (the header's end if none).
    pub valid_end: u64,
    pub len: u64,
}

impl SegmentScan {
    /// The damage that ends the segment, if any.
    pub fn tail_damage(&self) -> Option<&Damage> {
        self.damage.last().filter(|damage| damage.tail)
    }

    /// Damage other than at the tail.
    pub fn inner_damage(&self) -> impl Iterator<Item = &Damage> {
        self.damage.iter().filter(|damage| !damage.tail)
    }
}

/// Reads segment `sequence` from its bytes.
pub fn scan_segment(sequence: u64, data: &[u8]) -> SegmentScan {
    let mut scan = SegmentScan {
        sequence,
        len: data.len() as u64,
        valid_end: HEADER_LEN.min(data.len()) as u64,
        ..SegmentScan::default()
    };
    let header_end = HEADER_LEN.min(data.len());
    match SegmentHeader::decode(data) {
        Ok(header) if header.sequence == sequence => scan.header = Some(header),
        Ok(header) => scan.damage.push(stretch(
            sequence,
            data,
            0,
            header_end,
            DamageKind::WrongSequence(header.sequence),
        )),
        Err(err) => scan.damage.push(stretch(
            sequence,
            data,
            0,
            header_end,
            DamageKind::Header(err),
        )),
    }
    if data.len() <= HEADER_LEN {
        if let Some(last) = scan.damage.last_mut() {
            last.tail = true;
        }
        return scan;
    }
    let from_tail = backward_starts(data);
    let mut pos = HEADER_LEN;
    while pos < data.len() {
        match read_at(data, pos) {
            Ok((record, len)) => {
                scan.records.push(ScannedRecord {
                    position: Position {
                        segment: sequence,
                        offset: pos as u64,
                    },
                    len: len as u64,
                    record,
                });
                pos += len;
                scan.valid_end = pos as u64;
            }
            Err((kind, Some(len))) => {
                // A whole frame whose payload is not readable: only it is
                // damaged.
                scan.damage
                    .push(stretch(sequence, data, pos, pos + len, kind));
                pos += len;
            }
            Err((kind, None)) => {
                let next = resync(data, pos, &from_tail);
                let end = next.unwrap_or(data.len());
                let mut damage = stretch(sequence, data, pos, end, kind);
                damage.tail = next.is_none();
                scan.damage.push(damage);
                pos = end;
            }
        }
    }
    scan
}

/// A record at `pos`, or what is wrong there; `Some(len)` when the frame
/// verified (so the reader can step over it).
fn read_at(data: &[u8], pos: usize) -> Result<(Record, usize), (DamageKind, Option<usize>)> {
    let frame = record::verify(&data[pos..]).map_err(|err| (DamageKind::Frame(err), None))?;
    Record::decode(frame.kind, frame.payload)
        .map(|record| (record, frame.len))
        .map_err(|err| (DamageKind::Payload(err), Some(frame.len)))
}

/// Record starts found by walking backward from the end of the segment,
/// ascending.
fn backward_starts(data: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut end = data.len();
    while let Some(start) = record::start_before(data, end) {
        if start < HEADER_LEN {
            break;
        }
        match record::verify(&data[start..end]) {
            Ok(frame) if frame.len == end - start => {
                starts.push(start);
                end = start;
            }
            _ => break,
        }
    }
    starts.reverse();
    starts
}

/// The first offset after `pos` where a whole record starts.
fn resync(data: &[u8], pos: usize, from_tail: &[usize]) -> Option<usize> {
    let tail_start = from_tail.iter().copied().find(|start| *start > pos);
    let limit = tail_start.unwrap_or(data.len());
    let magic = START_MAGIC.to_le_bytes();
    let finder = memchr::memmem::Finder::new(&magic);
    // The magic sits 4 bytes into a record.
    let mut search = pos + 5;
    while search + 4 <= limit.min(data.len()) {
        let Some(found) = finder.find(&data[search..limit.min(data.len())]) else {
            break;
        };
        let start = search + found - 4;
        if read_at(data, start).is_ok() {
            return Some(start);
        }
        search += found + 1;
    }
    tail_start
}

fn stretch(sequence: u64, data: &[u8], from: usize, to: usize, kind: DamageKind) -> Damage {
    Damage {
        segment: sequence,
        offset: from as u64,
        len: (to - from) as u64,
        kind,
        zeros: data[from..to].iter().all(|byte| *byte == 0),
        tail: to == data.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::tests::samples;
    use crate::journal::segment::FORMAT_VERSION;

    fn segment(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut data = SegmentHeader {
            version: FORMAT_VERSION,
            sequence: 5,
            created_micros: 1,
        }
        .encode()
        .to_vec();
        let mut starts = Vec::new();
        for record in records {
            starts.push(data.len());
            record.encode(&mut data);
        }
        (data, starts)
    }

    fn records_of(scan: &SegmentScan) -> Vec<Record> {
        scan.records.iter().map(|r| r.record.clone()).collect()
    }

    #[test]
    fn clean_segment_reads_whole() {
        let records = samples();
        let (data, starts) = segment(&records);
        let scan = scan_segment(5, &data);
        assert!(scan.damage.is_empty(), "{:?}", scan.damage);
        assert_eq!(records_of(&scan), records);
        let offsets: Vec<usize> = scan
            .records
            .iter()
            .map(|r| r.position.offset as usize)
            .collect();
        assert_eq!(offsets, starts);
        assert_eq!(scan.valid_end, data.len() as u64);
        assert_eq!(backward_starts(&data), starts);
    }

    #[test]
    fn damage_in_the_middle_loses_only_that_record() {
        let records = samples();
        let (mut data, starts) = segment(&records);
        // Flip a payload byte of the third record.
        data[starts[2] + 12] ^= 0xff;
        let scan = scan_segment(5, &data);
        let mut expected = records.clone();
        expected.remove(2);
        assert_eq!(records_of(&scan), expected);
        assert_eq!(scan.damage.len(), 1);
        let damage = &scan.damage[0];
        assert_eq!(damage.offset as usize, starts[2]);
        assert_eq!(damage.len as usize, starts[3] - starts[2]);
        assert_eq!(damage.kind, DamageKind::Frame(FrameError::BadChecksum));
        assert!(!damage.tail);
    }

    #[test]
    fn torn_tail_and_appended_garbage_are_tail_damage() {
        let records = samples();
        let (data, starts) = segment(&records);
        let torn = &data[..data.len() - 3];
        let scan = scan_segment(5, torn);
        assert_eq!(records_of(&scan), records[..records.len() - 1].to_vec());
        let tail = scan.tail_damage().expect("tail");
        assert_eq!(tail.offset as usize, *starts.last().expect("last"));
        assert_eq!(scan.valid_end as usize, *starts.last().expect("last"));

        let mut garbage = data.clone();
        garbage.extend_from_slice(b"not a record at all, just bytes");
        let scan = scan_segment(5, &garbage);
        assert_eq!(records_of(&scan), records);
        let tail = scan.tail_damage().expect("tail");
        assert_eq!(tail.offset as usize, data.len());
        assert_eq!(tail.len, 31);

        let mut zeros = data.clone();
        zeros.extend_from_slice(&[0; 4096]);
        let scan = scan_segment(5, &zeros);
        assert_eq!(records_of(&scan), records);
        let tail = scan.tail_damage().expect("tail");
        assert!(tail.zeros && tail.tail);
    }

    #[test]
    fn zeroed_stretch_spanning_records_is_bounded() {
        let records = samples();
        let (mut data, starts) = segment(&records);
        for byte in &mut data[starts[1] + 3..starts[3] + 2] {
            *byte = 0;
        }
        let scan = scan_segment(5, &data);
        let mut expected = records.clone();
        expected.drain(1..4);
        assert_eq!(records_of(&scan), expected);
        assert_eq!(scan.damage.len(), 1);
        assert_eq!(scan.damage[0].offset as usize, starts[1]);
        assert_eq!(scan.damage[0].len as usize, starts[4] - starts[1]);
    }

    #[test]
    fn bad_header_is_reported_and_records_still_read() {
        let records = samples();
        let (mut data, _) = segment(&records);
        data[3] = b'x';
        let scan = scan_segment(5, &data);
        assert_eq!(records_of(&scan), records);
        assert_eq!(scan.damage[0].kind, DamageKind::Header(HeaderError::Magic));
        let (data, _) = segment(&records);
        let scan = scan_segment(6, &data);
        assert_eq!(scan.damage[0].kind, DamageKind::WrongSequence(5));
    }
}
