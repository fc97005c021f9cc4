//! Client messages of the steady state: which kinds exist and whether a
//! frame's body has the shape its kind requires.
//!
//! Validation works on raw bytes (no decoding into strings), so that it is
//! exact for any client encoding and costs a few comparisons. A body that
//! does not match its kind is how a lying length field shows up: the
//! declared length swallowed part of the next message or stopped short.
//!
//! Layouts: <https://www.postgresql.org/docs/current/protocol-message-formats.html>

/// The client message kinds PostgreSQL accepts after startup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendKind {
    /// `Q`: one NUL-terminated query string (possibly several statements).
    Query,
    /// `P`: statement name, query, parameter type OIDs.
    Parse,
    /// `B`: portal, statement, formats, values, result formats.
    Bind,
    /// `D`: `S` or `P` and a name.
    Describe,
    /// `E`: portal and a row limit (0 = all).
    Execute,
    /// `C`: `S` or `P` and a name.
    Close,
    /// `S`: ends an extended-query batch; the server answers ReadyForQuery.
    Sync,
    /// `H`: asks the server to send what it has buffered.
    Flush,
    /// `d`
    CopyData,
    /// `c`
    CopyDone,
    /// `f`: an error message that aborts COPY FROM STDIN.
    CopyFail,
    /// `F`: the legacy function-call sub-protocol; answered by ReadyForQuery.
    FunctionCall,
    /// `X`
    Terminate,
}

impl FrontendKind {
    /// Does the server answer this message with a ReadyForQuery?
    pub fn ends_request(self) -> bool {
        matches!(
            self,
            FrontendKind::Query | FrontendKind::Sync | FrontendKind::FunctionCall
        )
    }

    /// Is this part of an extended-query batch that only Sync completes?
    pub fn is_extended(self) -> bool {
        matches!(
            self,
            FrontendKind::Parse
                | FrontendKind::Bind
                | FrontendKind::Describe
                | FrontendKind::Execute
                | FrontendKind::Close
                | FrontendKind::Flush
        )
    }
}

/// Why a client frame was refused; the text goes to the client with
/// SQLSTATE 08P01 (protocol_violation).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("invalid frontend message type {0} ({1:?})")]
    UnknownType(u8, char),
    #[error("invalid {kind} message: {problem}")]
    Malformed {
        kind: &'static str,
        problem: &'static str,
    },
}

/// Checks a whole client frame (tag, length, body) and names its kind.
pub fn check(frame: &[u8]) -> Result<FrontendKind, MessageError> {
    let tag = frame[0];
    let body = &frame[super::frame::HEADER_LEN..];
    let (kind, name) = match tag {
        b'Q' => (FrontendKind::Query, "Query"),
        b'P' => (FrontendKind::Parse, "Parse"),
        b'B' => (FrontendKind::Bind, "Bind"),
        b'D' => (FrontendKind::Describe, "Describe"),
        b'E' => (FrontendKind::Execute, "Execute"),
        b'C' => (FrontendKind::Close, "Close"),
        b'S' => (FrontendKind::Sync, "Sync"),
        b'H' => (FrontendKind::Flush, "Flush"),
        b'd' => return Ok(FrontendKind::CopyData),
        b'c' => (FrontendKind::CopyDone, "CopyDone"),
        b'f' => (FrontendKind::CopyFail, "CopyFail"),
        b'F' => (FrontendKind::FunctionCall, "FunctionCall"),
        b'X' => (FrontendKind::Terminate, "Terminate"),
        other => return Err(MessageError::UnknownType(other, char::from(other))),
    };
    let mut reader = Reader { rest: body };
    let shape = match kind {
        FrontendKind::Query | FrontendKind::CopyFail => reader.cstr(),
        FrontendKind::Parse => check_parse(&mut reader),
        FrontendKind::Bind => check_bind(&mut reader),
        FrontendKind::Describe | FrontendKind::Close => {
            reader.target().and_then(|()| reader.cstr())
        }
        FrontendKind::Execute => reader.cstr().and_then(|()| reader.skip(4)),
        FrontendKind::FunctionCall => check_function_call(&mut reader),
        FrontendKind::Sync
        | FrontendKind::Flush
        | FrontendKind::CopyDone
        | FrontendKind::Terminate => Ok(()),
        FrontendKind::CopyData => Ok(()),
    };
    match shape.and_then(|()| reader.end()) {
        Ok(()) => Ok(kind),
        Err(problem) => Err(MessageError::Malformed {
            kind: name,
            problem,
        }),
    }
}

/// The fields of a checked Parse frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseFields<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: Vec<u32>,
}

/// Field accessors for frames that [`check`] accepted; `None` only for a
/// frame it would have refused.
fn body(frame: &[u8]) -> Reader<'_> {
    Reader {
        rest: frame.get(super::frame::HEADER_LEN..).unwrap_or_default(),
    }
}

/// The query string of a Query frame.
pub fn query_text(frame: &[u8]) -> Option<&[u8]> {
    body(frame).take_cstr()
}

pub fn parse_fields(frame: &[u8]) -> Option<ParseFields<'_>> {
    let mut reader = body(frame);
    let name = reader.take_cstr()?;
    let query = reader.take_cstr()?;
    let count = reader.count().ok()?;
    let mut param_types = Vec::with_capacity(count);
    for _ in 0..count {
        param_types.push(reader.i32().ok()? as u32);
    }
    Some(ParseFields {
        name,
        query,
        param_types,
    })
}

/// Portal name, statement name and number of parameter values of a Bind.
pub fn bind_fields(frame: &[u8]) -> Option<(&[u8], &[u8], usize)> {
    let mut reader = body(frame);
    let portal = reader.take_cstr()?;
    let statement = reader.take_cstr()?;
    let formats = reader.count().ok()?;
    reader.skip(formats * 2).ok()?;
    let values = reader.count().ok()?;
    Some((portal, statement, values))
}

/// `S` or `P` and the name of a Describe or Close.
pub fn target_fields(frame: &[u8]) -> Option<(u8, &[u8])> {
    let mut reader = body(frame);
    let (&kind, rest) = reader.rest.split_first()?;
    reader.rest = rest;
    Some((kind, reader.take_cstr()?))
}

/// The portal of an Execute.
pub fn execute_portal(frame: &[u8]) -> Option<&[u8]> {
    body(frame).take_cstr()
}

/// The function OID of a FunctionCall.
pub fn function_oid(frame: &[u8]) -> Option<u32> {
    body(frame).i32().ok().map(|oid| oid as u32)
}

fn check_parse(reader: &mut Reader<'_>) -> Result<(), &'static str> {
    reader.cstr()?;
    reader.cstr()?;
    let types = reader.count()?;
    reader.skip(types * 4)
}

fn check_bind(reader: &mut Reader<'_>) -> Result<(), &'static str> {
    reader.cstr()?;
    reader.cstr()?;
    let formats = reader.count()?;
    reader.formats(formats)?;
    let values = reader.count()?;
    for _ in 0..values {
        reader.value()?;
    }
    let result_formats = reader.count()?;
    reader.formats(result_formats)
}

fn check_function_call(reader: &mut Reader<'_>) -> Result<(), &'static str> {
    reader.skip(4)?;
    let formats = reader.count()?;
    reader.formats(formats)?;
    let arguments = reader.count()?;
    for _ in 0..arguments {
        reader.value()?;
    }
    reader.formats(1)
}

/// A cursor over a body that reports what ran out, never panics.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take_cstr(&mut self) -> Option<&'a [u8]> {
        let nul = memchr::memchr(0, self.rest)?;
        let value = &self.rest[..nul];
        self.rest = &self.rest[nul + 1..];
        Some(value)
    }

    fn cstr(&mut self) -> Result<(), &'static str> {
        let nul = memchr::memchr(0, self.rest)
            .ok_or("string is not NUL-terminated within the message length")?;
        self.rest = &self.rest[nul + 1..];
        Ok(())
    }

    fn skip(&mut self, len: usize) -> Result<(), &'static str> {
        if self.rest.len() < len {
            return Err("insufficient data left in message");
        }
        self.rest = &self.rest[len..];
        Ok(())
    }

    fn i16(&mut self) -> Result<i16, &'static str> {
        let bytes = self
            .rest
            .get(..2)
            .ok_or("insufficient data left in message")?;
        let value = i16::from_be_bytes([bytes[0], bytes[1]]);
        self.rest = &self.rest[2..];
        Ok(value)
    }

    fn i32(&mut self) -> Result<i32, &'static str> {
        let bytes = self
            .rest
            .get(..4)
            .ok_or("insufficient data left in message")?;
        let value = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        self.rest = &self.rest[4..];
        Ok(value)
    }

    fn count(&mut self) -> Result<usize, &'static str> {
        usize::try_from(self.i16()?).map_err(|_| "negative count")
    }

    fn formats(&mut self, count: usize) -> Result<(), &'static str> {
        for _ in 0..count {
            if !matches!(self.i16()?, 0 | 1) {
                return Err("format code is neither 0 (text) nor 1 (binary)");
            }
        }
        Ok(())
    }

    /// A length-prefixed value; -1 is NULL.
    fn value(&mut self) -> Result<(), &'static str> {
        match self.i32()? {
            -1 => Ok(()),
            len if len < 0 => Err("invalid value length"),
            len => self.skip(len as usize),
        }
    }

    fn target(&mut self) -> Result<(), &'static str> {
        match self.rest.first() {
            Some(b'S' | b'P') => self.skip(1),
            Some(_) => Err("target is neither 'S' (statement) nor 'P' (portal)"),
            None => Err("insufficient data left in message"),
        }
    }

    fn end(&self) -> Result<(), &'static str> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err("message is longer than its contents: the length field is wrong")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::write_frame;
    use bytes::BytesMut;

    fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        write_frame(&mut out, Some(tag), |out| out.extend_from_slice(body));
        out
    }

    #[test]
    fn accepts_what_clients_send() {
        assert_eq!(
            check(&frame(b'Q', b"select 1; select 2\0")),
            Ok(FrontendKind::Query)
        );
        assert_eq!(
            check(&frame(b'P', b"s1\0select $1\0\0\x01\0\0\0\x17")),
            Ok(FrontendKind::Parse)
        );
        let bind = b"\0s1\0\0\x01\0\x01\0\x02\0\0\0\x04abcd\xff\xff\xff\xff\0\x01\0\0";
        assert_eq!(check(&frame(b'B', bind)), Ok(FrontendKind::Bind));
        assert_eq!(
            check(&frame(b'D', b"Pportal\0")),
            Ok(FrontendKind::Describe)
        );
        assert_eq!(
            check(&frame(b'E', b"\0\0\0\0\x0a")),
            Ok(FrontendKind::Execute)
        );
        assert_eq!(check(&frame(b'S', b"")), Ok(FrontendKind::Sync));
        assert_eq!(
            check(&frame(b'd', b"anything\x00\xff")),
            Ok(FrontendKind::CopyData)
        );
        assert_eq!(
            check(&frame(b'F', b"\0\0\0\x01\0\0\0\x01\0\0\0\x01x\0\0")),
            Ok(FrontendKind::FunctionCall)
        );
    }

    #[test]
    fn refuses_unknown_types_and_bad_shapes() {
        assert_eq!(
            check(&frame(b'z', b"")),
            Err(MessageError::UnknownType(b'z', 'z'))
        );
        assert_eq!(
            check(&frame(b'p', b"pw\0")),
            Err(MessageError::UnknownType(b'p', 'p'))
        );
        assert!(matches!(
            check(&frame(b'Q', b"select 1")),
            Err(MessageError::Malformed { kind: "Query", .. })
        ));
        assert!(matches!(
            check(&frame(b'Q', b"select 1\0S")),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            check(&frame(b'S', b"\0")),
            Err(MessageError::Malformed { kind: "Sync", .. })
        ));
        // A Bind that promises a 100-byte value but carries 4.
        let short = b"\0s1\0\0\0\0\x01\0\0\0\x64abcd\0\0";
        assert!(matches!(
            check(&frame(b'B', short)),
            Err(MessageError::Malformed { kind: "Bind", .. })
        ));
        assert!(matches!(
            check(&frame(b'B', b"\0\0\0\x01\0\x07\0\0\0\0")),
            Err(MessageError::Malformed { .. })
        ));
        assert!(matches!(
            check(&frame(b'C', b"Xname\0")),
            Err(MessageError::Malformed { kind: "Close", .. })
        ));
    }
}
