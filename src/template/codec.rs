//! The canonical encoding shared by templates and replay state.
//!
//! Every value is written in exactly one way, so equal values give equal
//! bytes and, because every variable-length part carries its length in
//! front, different values give different bytes:
//!
//! ```text
//! length   u32 BE, or 0xFFFF_FFFF followed by a u64 BE for lengths that do
//!          not fit below 0xFFFF_FFFF (never reached by wire data, which is
//!          capped well below 4 GiB, but kept total instead of truncating)
//! bytes    length, then the bytes
//! map      length (entry count), then key bytes, value … in ascending
//!          byte order of the keys, each key once
//! option   0x00 for none, or 0x01 followed by the value
//! ```
//!
//! Encoding goes through [`Sink`], so the same code fills a `Vec` for the
//! journal and feeds a hasher directly when only the digest is needed.

use bytes::Bytes;

/// Where canonical bytes go.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);

    fn put_u8(&mut self, value: u8) {
        self.put(&[value]);
    }

    fn put_u16(&mut self, value: u16) {
        self.put(&value.to_be_bytes());
    }

    fn put_u32(&mut self, value: u32) {
        self.put(&value.to_be_bytes());
    }

    fn put_len(&mut self, len: usize) {
        match u32::try_from(len) {
            Ok(short) if short != LONG_LEN => self.put_u32(short),
            // usize is at most 64 bits on every target Rust supports.
            _ => {
                self.put_u32(LONG_LEN);
                self.put(&(len as u64).to_be_bytes());
            }
        }
    }

    fn put_bytes(&mut self, bytes: &[u8]) {
        self.put_len(bytes.len());
        self.put(bytes);
    }

    fn put_option(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.put_u8(0),
            Some(bytes) => {
                self.put_u8(1);
                self.put_bytes(bytes);
            }
        }
    }
}

/// Marks a length that follows as a u64.
const LONG_LEN: u32 = u32::MAX;

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for blake3::Hasher {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// Why bytes are not the canonical encoding of a template or replay state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported encoding version {0}")]
    Version(u8),
    #[error("expected section {expected:?}, found byte {found:#04x}")]
    Section { expected: char, found: u8 },
    #[error("encoding ends early")]
    Truncated,
    #[error("{0} trailing bytes after the encoding")]
    Trailing(usize),
    #[error("invalid {what} byte {value:#04x}")]
    InvalidByte { what: &'static str, value: u8 },
    #[error("unknown non-recoverable flags in {0:#06x}")]
    UnknownFlags(u16),
    #[error("length {0} written in the long form although it fits the short one")]
    NonCanonicalLength(u64),
    #[error("keys out of order or repeated")]
    Unsorted,
}

/// Reads the canonical encoding back, accepting only canonical input:
/// whatever it accepts re-encodes to the same bytes.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Self {
        Reader { input }
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.input.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.input.len()))
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.input.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take_array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take_array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take_array()?))
    }

    pub(crate) fn version(&mut self, expected: u8) -> Result<(), DecodeError> {
        match self.u8()? {
            v if v == expected => Ok(()),
            v => Err(DecodeError::Version(v)),
        }
    }

    pub(crate) fn section(&mut self, tag: u8) -> Result<(), DecodeError> {
        match self.u8()? {
            t if t == tag => Ok(()),
            found => Err(DecodeError::Section {
                expected: char::from(tag),
                found,
            }),
        }
    }

    /// A length or count. Every counted item takes at least one byte, so a
    /// length beyond the remaining input is rejected here, before anyone
    /// allocates for it.
    pub(crate) fn len(&mut self) -> Result<usize, DecodeError> {
        let len = match self.u32()? {
            LONG_LEN => {
                let long = u64::from_be_bytes(self.take_array()?);
                if long < u64::from(LONG_LEN) {
                    return Err(DecodeError::NonCanonicalLength(long));
                }
                usize::try_from(long).map_err(|_| DecodeError::Truncated)?
            }
            short => short as usize,
        };
        if len > self.input.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(len)
    }

    pub(crate) fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.len()?;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }

    pub(crate) fn option(&mut self) -> Result<Option<Bytes>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes()?)),
            value => Err(DecodeError::InvalidByte {
                what: "option",
                value,
            }),
        }
    }

    /// Reads `count` keyed items, checking that keys strictly ascend so that
    /// a map or set has exactly one encoding.
    pub(crate) fn sorted<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(Bytes, T), DecodeError>,
        mut insert: impl FnMut(Bytes, T),
    ) -> Result<(), DecodeError> {
        let count = self.len()?;
        let mut last: Option<Bytes> = None;
        for _ in 0..count {
            let (key, value) = item(self)?;
            if last.as_ref().is_some_and(|prev| *prev >= key) {
                return Err(DecodeError::Unsorted);
            }
            last = Some(key.clone());
            insert(key, value);
        }
        Ok(())
    }
}
