//! Server messages: which kinds exist and the few fields the proxy reads.
//!
//! Only ReadyForQuery, ParameterStatus, ErrorResponse and BackendKeyData are
//! looked into; everything else is forwarded as the bytes it arrived as.

use super::frame::HEADER_LEN;

/// Is `tag` a message PostgreSQL sends after authentication?
pub fn is_known_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'1' | b'2'
            | b'3'
            | b'A'
            | b'C'
            | b'c'
            | b'd'
            | b'D'
            | b'E'
            | b'G'
            | b'H'
            | b'I'
            | b'K'
            | b'n'
            | b'N'
            | b'R'
            | b's'
            | b'S'
            | b't'
            | b'T'
            | b'V'
            | b'v'
            | b'W'
            | b'Z'
    )
}

/// Transaction status of a ReadyForQuery frame: `I` idle, `T` in a
/// transaction, `E` in a failed transaction.
pub fn ready_status(frame: &[u8]) -> Option<u8> {
    match frame {
        [b'Z', _, _, _, _, status] => Some(*status),
        _ => None,
    }
}

/// Name and value of a ParameterStatus frame, as raw bytes.
pub fn parameter_status(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let body = frame.get(HEADER_LEN..)?;
    let name_end = memchr::memchr(0, body)?;
    let rest = &body[name_end + 1..];
    let value_end = memchr::memchr(0, rest)?;
    Some((&body[..name_end], &rest[..value_end]))
}

/// Makes a NotificationResponse from the server process `from` say it
/// came from `to`, in place: after a failover the client knows the
/// session by the first server process's id.
pub fn rewrite_notification_pid(frame: &mut [u8], from: i32, to: i32) {
    if let Some(pid) = frame.get_mut(HEADER_LEN..HEADER_LEN + 4) {
        if *pid == from.to_be_bytes() {
            pid.copy_from_slice(&to.to_be_bytes());
        }
    }
}

/// Process id and secret key of a BackendKeyData frame.
pub fn backend_key(frame: &[u8]) -> Option<(i32, i32)> {
    match frame {
        [b'K', _, _, _, _, p0, p1, p2, p3, s0, s1, s2, s3] => Some((
            i32::from_be_bytes([*p0, *p1, *p2, *p3]),
            i32::from_be_bytes([*s0, *s1, *s2, *s3]),
        )),
        _ => None,
    }
}

/// The fields of an ErrorResponse or NoticeResponse the proxy acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorSummary {
    /// Non-localised severity (`V`), or the localised one (`S`) from servers
    /// older than 9.6.
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorSummary {
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }
}

/// Reads severity, SQLSTATE and message of an `E` or `N` frame.
pub fn error_summary(frame: &[u8]) -> ErrorSummary {
    let mut summary = ErrorSummary::default();
    let mut localized_severity = String::new();
    let mut rest = frame.get(HEADER_LEN..).unwrap_or_default();
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some(end) = memchr::memchr(0, tail) else {
            break;
        };
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'V' => summary.severity = value,
            b'S' => localized_severity = value,
            b'C' => summary.code = value,
            b'M' => summary.message = value,
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    if summary.severity.is_empty() {
        summary.severity = localized_severity;
    }
    summary
}

/// The fields of a DataRow frame; `None` inside for SQL NULL.
pub fn data_row_fields(message: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut rest = message.get(HEADER_LEN..)?;
    let count = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
    rest = &rest[2..];
    let mut fields = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            fields.push(None);
        } else {
            let len = usize::try_from(len).ok()?;
            fields.push(Some(rest.get(..len)?));
            rest = &rest[len..];
        }
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields() {
        assert_eq!(ready_status(b"Z\0\0\0\x05T"), Some(b'T'));
        assert_eq!(ready_status(b"Z\0\0\0\x06TT"), None);
        assert_eq!(
            parameter_status(b"S\0\0\0\x16client_encoding\0UTF8\0"),
            Some((&b"client_encoding"[..], &b"UTF8"[..]))
        );
        assert_eq!(
            backend_key(b"K\0\0\0\x0c\0\0\x01\0\0\0\0\x07"),
            Some((256, 7))
        );
        let error = error_summary(b"E\0\0\0\0SFATAL\0VFATAL\0C57P01\0Mterminating\0\0");
        assert_eq!(error.code, "57P01");
        assert!(error.is_fatal());
        assert_eq!(error.message, "terminating");
    }
}
