//! Messages Reprise itself sends to clients, encoded with pgwire.
//!
//! Everything else a client receives is forwarded from a server byte for
//! byte; these are the only frames the proxy writes of its own.

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{
    DataRow, FieldDescription, NoData, ParameterDescription, RowDescription, FORMAT_CODE_TEXT,
};
use pgwire::messages::extendedquery::{BindComplete, CloseComplete, ParseComplete};
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey,
};
use pgwire::messages::Message;

/// SQLSTATE codes the proxy reports on its own behalf.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
    pub const CLIENT_CANNOT_CONNECT: &str = "08001";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const CANT_CHANGE_RUNTIME_PARAM: &str = "55P02";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const WARNING: &str = "01000";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

fn encode(message: &impl Message, out: &mut BytesMut) {
    // pgwire only fails to encode a message above its own size limits; the
    // messages built here are a few hundred bytes at most.
    if let Err(err) = message.encode(out) {
        tracing::error!(%err, "could not encode a message for a client");
    }
}

/// An ErrorResponse with both the localised (`S`) and non-localised (`V`)
/// severity, as PostgreSQL sends since 9.6.
pub fn error(
    out: &mut BytesMut,
    severity: Severity,
    code: &str,
    message: &str,
    detail: Option<&str>,
) {
    let mut fields = vec![
        (b'S', severity.as_str().to_owned()),
        (b'V', severity.as_str().to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ];
    if let Some(detail) = detail {
        fields.push((b'D', detail.to_owned()));
    }
    encode(&ErrorResponse::new(fields), out);
}

/// A NoticeResponse with severity WARNING.
pub fn warning(out: &mut BytesMut, code: &str, message: &str, detail: &str) {
    let fields = vec![
        (b'S', "WARNING".to_owned()),
        (b'V', "WARNING".to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
        (b'D', detail.to_owned()),
    ];
    encode(&NoticeResponse::new(fields), out);
}

pub fn fatal(code: &str, message: &str) -> BytesMut {
    let mut out = BytesMut::new();
    error(&mut out, Severity::Fatal, code, message, None);
    out
}

pub fn authentication_ok(out: &mut BytesMut) {
    encode(&Authentication::Ok, out);
}

pub fn backend_key_data(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    encode(
        &BackendKeyData::new(process_id, SecretKey::I32(secret_key)),
        out,
    );
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(&ReadyForQuery::new(status), out);
}

/// Type OID of `text`, the type of every column Reprise answers with.
const TEXT_OID: u32 = 25;

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    encode(&CommandComplete::new(tag.to_owned()), out);
}

/// A RowDescription of text columns in text format.
pub fn row_description(out: &mut BytesMut, columns: &[&str]) {
    let fields = columns
        .iter()
        .map(|name| {
            FieldDescription::new((*name).to_owned(), 0, 0, TEXT_OID, -1, -1, FORMAT_CODE_TEXT)
        })
        .collect();
    encode(&RowDescription::new(fields), out);
}

pub fn data_row(out: &mut BytesMut, values: &[&[u8]]) {
    let mut data = BytesMut::new();
    for value in values {
        data.put_i32(i32::try_from(value.len()).unwrap_or(i32::MAX));
        data.extend_from_slice(value);
    }
    let count = i16::try_from(values.len()).unwrap_or(i16::MAX);
    encode(&DataRow::new(data, count), out);
}

pub fn parse_complete(out: &mut BytesMut) {
    encode(&ParseComplete::new(), out);
}

pub fn bind_complete(out: &mut BytesMut) {
    encode(&BindComplete::new(), out);
}

pub fn close_complete(out: &mut BytesMut) {
    encode(&CloseComplete::new(), out);
}

pub fn no_data(out: &mut BytesMut) {
    encode(&NoData::new(), out);
}

/// ParameterDescription for a statement without parameters.
pub fn no_parameters(out: &mut BytesMut) {
    encode(&ParameterDescription::new(Vec::new()), out);
}

/// Tells a client that asked for protocol 3.`minor` or for `_pq_.` options
/// that the session will speak 3.0 without those options.
pub fn negotiate_protocol_version(
    out: &mut BytesMut,
    newest_minor: i32,
    unsupported_options: Vec<String>,
) {
    encode(
        &NegotiateProtocolVersion::new(newest_minor, unsupported_options),
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::backend::error_summary;

    #[test]
    fn error_round_trips() {
        let frame = fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "invalid frontend message type 122",
        );
        let summary = error_summary(&frame);
        assert_eq!(summary.code, "08P01");
        assert_eq!(summary.severity, "FATAL");
        assert_eq!(summary.message, "invalid frontend message type 122");
        let declared = i32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(declared + 1, frame.len());
    }

    #[test]
    fn fixed_messages() {
        let mut out = BytesMut::new();
        authentication_ok(&mut out);
        backend_key_data(&mut out, 42, -7);
        ready_for_query(&mut out, b'I');
        assert_eq!(
            &out[..],
            b"R\0\0\0\x08\0\0\0\0K\0\0\0\x0c\0\0\0\x2a\xff\xff\xff\xf9Z\0\0\0\x05I"
        );
    }
}
