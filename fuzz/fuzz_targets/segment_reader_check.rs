// The checks of the `segment_reader` fuzz target, in a file of their
// own so that `cargo test` also runs them, over the seed corpus.

use reprise::journal::checkpoint::Checkpoint;
use reprise::journal::reader::scan_segment;
use reprise::journal::segment::{SegmentHeader, HEADER_LEN};

/// Reads `data` as a segment and as a checkpoint; panics on any broken
/// promise of the readers.
pub fn check(data: &[u8]) {
    // The sequence the header names, so that a whole header reads clean.
    let sequence = SegmentHeader::decode(data).map_or(1, |header| header.sequence);
    let scan = scan_segment(sequence, data);
    let mut covered = vec![false; data.len()];
    let mut previous_end = 0;
    for scanned in &scan.records {
        let start = scanned.position.offset as usize;
        let end = start + scanned.len as usize;
        assert!(start >= previous_end.max(HEADER_LEN), "records overlap or go back");
        let mut encoded = Vec::new();
        scanned.record.encode(&mut encoded);
        assert_eq!(&data[start..end], &encoded[..], "record differs from its bytes");
        covered[start..end].fill(true);
        previous_end = end;
    }
    for damage in &scan.damage {
        let start = damage.offset as usize;
        let end = start + damage.len as usize;
        assert!(end <= data.len(), "damage past the end");
        covered[start..end].fill(true);
    }
    let from = if scan.header.is_some() { HEADER_LEN } else { 0 };
    assert!(covered[from.min(data.len())..].iter().all(|c| *c), "bytes unaccounted for");
    assert!(scan.valid_end as usize <= data.len());

    if let Ok(checkpoint) = Checkpoint::decode(data) {
        assert_eq!(checkpoint.encode(), data, "checkpoint differs from its bytes");
    }
}
