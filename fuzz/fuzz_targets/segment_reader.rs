//! Arbitrary bytes as a journal segment and as a checkpoint: the readers
//! never panic, every record they return is exactly the bytes at its
//! position, and every byte past a whole header is either in a record or
//! in a reported damaged stretch.
//!
//! `cargo +nightly fuzz run segment_reader fixtures/journal/fuzz-corpus`
//! (from the repository root; the corpus holds valid and damaged
//! segments and a checkpoint).

#![no_main]

use libfuzzer_sys::fuzz_target;

include!("segment_reader_check.rs");

fuzz_target!(|data: &[u8]| check(data));
