//! Splitting a byte stream into steady-state protocol frames.
//!
//! After startup every message in either direction is
//!
//! ```text
//! tag: u8 | length: i32 (counts itself and the body, not the tag) | body
//! ```
//!
//! The framer only reads headers: it never allocates for a frame and checks
//! the declared length against the cap before anybody reserves memory for
//! it. "Need more bytes" is a value, not an error.

/// Size of `tag + length`.
pub const HEADER_LEN: usize = 5;

/// What the start of a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole frame of `len` bytes (tag and length included) is there.
    Frame { tag: u8, len: usize },
    /// The buffer holds only the start of a frame; `total` is its full size
    /// once known (0 while even the header is incomplete).
    Incomplete { total: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("invalid message length {declared} for message type {tag:?}: the length counts itself, so it is at least 4")]
    TooShort { tag: char, declared: i32 },
    #[error("message of type {tag:?} is {declared} bytes long, which exceeds the maximum message size of {max} bytes")]
    TooLong {
        tag: char,
        declared: usize,
        max: usize,
    },
}

/// Looks at the frame at the start of `buf`, refusing lengths below 4 or
/// above `max_len` before any byte of the body is needed.
#[inline]
pub fn next(buf: &[u8], max_len: usize) -> Result<Next, FramingError> {
    if buf.len() < HEADER_LEN {
        return Ok(Next::Incomplete { total: 0 });
    }
    let tag = buf[0];
    let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if declared < 4 {
        return Err(FramingError::TooShort {
            tag: char::from(tag),
            declared,
        });
    }
    // `declared` is positive, so the cast is lossless.
    let body_and_length = declared as usize;
    if body_and_length > max_len {
        return Err(FramingError::TooLong {
            tag: char::from(tag),
            declared: body_and_length,
            max: max_len,
        });
    }
    let total = body_and_length + 1;
    if buf.len() < total {
        return Ok(Next::Incomplete { total });
    }
    Ok(Next::Frame { tag, len: total })
}

/// Writes a frame whose length is filled in after `body` has written it, so
/// that no caller ever computes a length by hand.
pub fn write_frame(
    out: &mut bytes::BytesMut,
    tag: Option<u8>,
    body: impl FnOnce(&mut bytes::BytesMut),
) {
    if let Some(tag) = tag {
        out.extend_from_slice(&[tag]);
    }
    let length_at = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let length = out.len() - length_at;
    // Frames built here are small and bounded by the caller; a length that
    // does not fit an i32 would be a bug, so it is clamped rather than wrapped.
    let length = i32::try_from(length).unwrap_or(i32::MAX);
    out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn header_only_then_whole() {
        assert_eq!(next(b"Q\0\0", 100), Ok(Next::Incomplete { total: 0 }));
        assert_eq!(
            next(b"Q\0\0\0\x09abc", 100),
            Ok(Next::Incomplete { total: 10 })
        );
        assert_eq!(
            next(b"Q\0\0\0\x09abcd\0S", 100),
            Ok(Next::Frame { tag: b'Q', len: 10 })
        );
        assert_eq!(
            next(b"S\0\0\0\x04", 100),
            Ok(Next::Frame { tag: b'S', len: 5 })
        );
    }

    #[test]
    fn lengths_are_checked_before_the_body() {
        assert!(matches!(
            next(b"Q\0\0\0\x03", 100),
            Err(FramingError::TooShort { declared: 3, .. })
        ));
        assert!(matches!(
            next(b"Q\xff\xff\xff\xff", 100),
            Err(FramingError::TooShort { .. })
        ));
        assert!(matches!(
            next(b"d\x10\0\0\0", 1 << 20),
            Err(FramingError::TooLong {
                declared: 0x1000_0000,
                ..
            })
        ));
    }

    #[test]
    fn write_frame_fills_the_length() {
        let mut out = BytesMut::new();
        write_frame(&mut out, Some(b'Q'), |out| {
            out.extend_from_slice(b"select 1\0")
        });
        assert_eq!(&out[..], b"Q\0\0\0\x0dselect 1\0");
        let mut startup = BytesMut::new();
        write_frame(&mut startup, None, |out| {
            out.extend_from_slice(&[0, 3, 0, 0, 0])
        });
        assert_eq!(&startup[..], &[0, 0, 0, 9, 0, 3, 0, 0, 0]);
    }
}
