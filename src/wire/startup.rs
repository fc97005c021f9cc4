//! The startup codec: the packets a client may send before the steady
//! state. They have no type byte:
//!
//! ```text
//! length: i32 (counts itself) | code: i32 | payload
//! ```
//!
//! where `code` is a protocol version (`major << 16 | minor`) for a
//! StartupMessage, or one of the request codes below. PostgreSQL caps these
//! packets at 10000 bytes (`MAX_STARTUP_PACKET_LENGTH`), and so does Reprise:
//! this is the phase in which nobody is authenticated yet.
//!
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-STARTUPMESSAGE>

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// The only protocol version Reprise speaks: 3.0.
pub const PROTOCOL_MAJOR: u16 = 3;
pub const PROTOCOL_MINOR: u16 = 0;

/// One packet of the startup phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        process_id: i32,
        secret_key: i32,
    },
    /// A CancelRequest whose key is not the 4-byte key of protocol 3.0; it
    /// cannot name any session, so it is dropped like an unknown key.
    CancelUnknownKeyFormat,
    Startup(StartupMessage),
}

/// A StartupMessage: the requested minor version and the parameters in the
/// order the client sent them, as raw bytes (any client encoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartupMessage {
    pub minor_version: u16,
    pub parameters: Vec<(Bytes, Bytes)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.parameters
            .iter()
            .find(|(key, _)| key.as_ref() == name.as_bytes())
            .map(|(_, value)| value.as_ref())
    }

    pub fn get_lossy(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|value| String::from_utf8_lossy(value).into_owned())
    }

    /// `_pq_.` protocol options: Reprise knows none of them, so each one is
    /// reported back as unsupported and never forwarded.
    pub fn protocol_options(&self) -> Vec<String> {
        self.parameters
            .iter()
            .filter(|(key, _)| key.starts_with(b"_pq_."))
            .map(|(key, _)| String::from_utf8_lossy(key).into_owned())
            .collect()
    }

    /// The parameters a server should receive: everything but `_pq_.`
    /// options.
    pub fn server_parameters(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.parameters
            .iter()
            .filter(|(key, _)| !key.starts_with(b"_pq_."))
            .map(|(key, value)| (key.as_ref(), value.as_ref()))
    }

    /// Encodes the message for a server, always asking for protocol 3.0.
    pub fn encode_for_server(&self, out: &mut BytesMut) {
        super::frame::write_frame(out, None, |out| {
            out.extend_from_slice(
                &(i32::from(PROTOCOL_MAJOR) << 16 | i32::from(PROTOCOL_MINOR)).to_be_bytes(),
            );
            for (key, value) in self.server_parameters() {
                out.extend_from_slice(key);
                out.extend_from_slice(&[0]);
                out.extend_from_slice(value);
                out.extend_from_slice(&[0]);
            }
            out.extend_from_slice(&[0]);
        });
    }
}

/// Why a startup packet was refused. Each answer goes to the client as a
/// FATAL ErrorResponse (see [`StartupError::sqlstate`]).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("connection closed before a startup packet arrived")]
    Closed,
    #[error("i/o error while reading a startup packet: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "invalid length of startup packet: {0} bytes (this does not look like a PostgreSQL client)"
    )]
    BadLength(i64),
    #[error("unsupported frontend protocol {major}.{minor}: Reprise supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

impl StartupError {
    /// PostgreSQL answers an old protocol version with feature_not_supported;
    /// everything else here is a protocol violation.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::UnsupportedProtocol { major: 1 | 2, .. } => {
                super::reply::sqlstate::FEATURE_NOT_SUPPORTED
            }
            _ => super::reply::sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// Reads one startup-phase packet. Not cancel safe: a partial packet is lost
/// if the future is dropped, which only happens when the connection is
/// abandoned anyway.
pub async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<StartupPacket, StartupError> {
    let mut length = [0u8; 4];
    match reader.read_exact(&mut length).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StartupError::Closed)
        }
        Err(err) => return Err(err.into()),
    }
    let declared = i32::from_be_bytes(length);
    if declared < 8 || declared as usize > MAX_STARTUP_PACKET_LEN {
        return Err(StartupError::BadLength(i64::from(declared)));
    }
    let mut body = vec![0u8; declared as usize - 4];
    reader.read_exact(&mut body).await?;
    parse_packet(Bytes::from(body))
}

/// Parses the packet body after the length word.
pub fn parse_packet(body: Bytes) -> Result<StartupPacket, StartupError> {
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let payload = body.slice(4..);
    match code {
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => match payload.as_ref() {
            [p0, p1, p2, p3, s0, s1, s2, s3] => Ok(StartupPacket::Cancel {
                process_id: i32::from_be_bytes([*p0, *p1, *p2, *p3]),
                secret_key: i32::from_be_bytes([*s0, *s1, *s2, *s3]),
            }),
            _ => Ok(StartupPacket::CancelUnknownKeyFormat),
        },
        version => {
            let major = (version >> 16) as u16;
            let minor = (version & 0xffff) as u16;
            if major != PROTOCOL_MAJOR {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            Ok(StartupPacket::Startup(StartupMessage {
                minor_version: minor,
                parameters: parse_parameters(&payload)?,
            }))
        }
    }
}

/// Name/value pairs, each NUL-terminated, ended by an empty name.
fn parse_parameters(payload: &Bytes) -> Result<Vec<(Bytes, Bytes)>, StartupError> {
    let mut parameters = Vec::new();
    let mut at = 0;
    loop {
        let rest = &payload[at..];
        let Some(name_len) = memchr::memchr(0, rest) else {
            return Err(StartupError::Malformed("missing the terminating NUL"));
        };
        if name_len == 0 {
            if at + 1 != payload.len() {
                return Err(StartupError::Malformed("data after the terminating NUL"));
            }
            return Ok(parameters);
        }
        let value_at = at + name_len + 1;
        let Some(value_len) = memchr::memchr(0, &payload[value_at..]) else {
            return Err(StartupError::Malformed(
                "parameter has no NUL-terminated value",
            ));
        };
        let name = payload.slice(at..at + name_len);
        let value = payload.slice(value_at..value_at + value_len);
        if parameters.iter().any(|(existing, _)| *existing == name) {
            return Err(StartupError::Malformed("a parameter appears twice"));
        }
        parameters.push((name, value));
        at = value_at + value_len + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(bytes: &[u8]) -> Result<StartupPacket, StartupError> {
        parse_packet(Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn requests() {
        assert_eq!(
            packet(&SSL_REQUEST_CODE.to_be_bytes()).ok(),
            Some(StartupPacket::SslRequest)
        );
        assert_eq!(
            packet(&GSSENC_REQUEST_CODE.to_be_bytes()).ok(),
            Some(StartupPacket::GssEncRequest)
        );
        let mut cancel = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        cancel.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 10]);
        assert_eq!(
            packet(&cancel).ok(),
            Some(StartupPacket::Cancel {
                process_id: 9,
                secret_key: 10
            })
        );
    }

    #[test]
    fn startup_message() {
        let body = b"\0\x03\0\x02user\0alice\0_pq_.x\0y\0database\0db\0\0";
        let Ok(StartupPacket::Startup(message)) = packet(body) else {
            panic!("not a startup message")
        };
        assert_eq!(message.minor_version, 2);
        assert_eq!(message.get("user"), Some(&b"alice"[..]));
        assert_eq!(message.protocol_options(), vec!["_pq_.x".to_owned()]);
        let mut out = BytesMut::new();
        message.encode_for_server(&mut out);
        assert_eq!(
            &out[..],
            b"\0\0\0\x20\0\x03\0\0user\0alice\0database\0db\0\0"
        );
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            packet(b"\0\x02\0\0user\0a\0\0"),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        assert!(matches!(
            packet(b"\0\x03\0\0user\0a\0"),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            packet(b"\0\x03\0\0user\0"),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            packet(b"\0\x03\0\0user\0a\0\0x"),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            packet(b"\0\x03\0\0a\0b\0a\0c\0\0"),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            packet(b"GET / HTTP/1.1\r\n"),
            Err(StartupError::UnsupportedProtocol { .. })
        ));
    }
}
