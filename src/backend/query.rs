//! Reprise's own queries on a server connection that no client is using
//! yet (the commit-outcome check after a failover, `auth_query`).

use crate::backend::stream::ServerStream;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::wire::backend as server_msg;
use crate::wire::frame::{self, Next};

/// A row of text values; `None` for SQL NULL.
pub type TextRow = Vec<Option<String>>;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The connection failed; another may do.
    #[error("{0}")]
    Lost(String),
    /// The server refused the query.
    #[error("{} ({})", .0.message, .0.code)]
    Refused(server_msg::ErrorSummary),
}

/// Runs `sql` as a simple Query and returns its rows, once the server is
/// ready again. Bytes the server sends after its ReadyForQuery stay in
/// `inbox`.
pub async fn simple_query(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    sql: &str,
    max_message_size: usize,
) -> Result<Vec<TextRow>, QueryError> {
    let mut out = BytesMut::new();
    frame::write_frame(&mut out, Some(b'Q'), |body| {
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0]);
    });
    run(stream, inbox, &out, max_message_size).await
}

/// Runs `sql` with text parameters `$1`, `$2` … through the extended
/// protocol (unnamed statement and portal), so that no value is ever
/// quoted into SQL.
pub async fn query_with_params(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    sql: &str,
    params: &[&str],
    max_message_size: usize,
) -> Result<Vec<TextRow>, QueryError> {
    let count = i16::try_from(params.len()).expect("a handful of parameters");
    let mut out = BytesMut::new();
    frame::write_frame(&mut out, Some(b'P'), |body| {
        body.extend_from_slice(&[0]);
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0]);
        body.extend_from_slice(&0i16.to_be_bytes());
    });
    frame::write_frame(&mut out, Some(b'B'), |body| {
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&count.to_be_bytes());
        for param in params {
            let len = i32::try_from(param.len()).expect("a short parameter");
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(param.as_bytes());
        }
        body.extend_from_slice(&0i16.to_be_bytes());
    });
    frame::write_frame(&mut out, Some(b'E'), |body| {
        body.extend_from_slice(&[0]);
        body.extend_from_slice(&0i32.to_be_bytes());
    });
    frame::write_frame(&mut out, Some(b'S'), |_| {});
    run(stream, inbox, &out, max_message_size).await
}

/// Sends `request` and collects the rows up to ReadyForQuery.
async fn run(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    request: &[u8],
    max_message_size: usize,
) -> Result<Vec<TextRow>, QueryError> {
    stream
        .write_all(request)
        .await
        .map_err(|err| QueryError::Lost(err.to_string()))?;
    let mut rows = Vec::new();
    let mut refused = None;
    loop {
        let message = next_frame(stream, inbox, max_message_size).await?;
        match message[0] {
            b'D' => {
                let fields = server_msg::data_row_fields(&message)
                    .ok_or_else(|| QueryError::Lost("malformed DataRow".to_owned()))?;
                rows.push(
                    fields
                        .into_iter()
                        .map(|field| field.map(|value| String::from_utf8_lossy(value).into_owned()))
                        .collect(),
                );
            }
            b'E' => {
                let summary = server_msg::error_summary(&message);
                if summary.is_fatal() {
                    return Err(QueryError::Lost(format!(
                        "{} ({})",
                        summary.message, summary.code
                    )));
                }
                refused.get_or_insert(summary);
            }
            b'Z' => {
                return match refused {
                    Some(summary) => Err(QueryError::Refused(summary)),
                    None => Ok(rows),
                }
            }
            _ => {}
        }
    }
}

async fn next_frame(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    max_message_size: usize,
) -> Result<BytesMut, QueryError> {
    loop {
        match frame::next(inbox, max_message_size) {
            Ok(Next::Frame { len, .. }) => return Ok(inbox.split_to(len)),
            Ok(Next::Incomplete { .. }) => {}
            Err(err) => return Err(QueryError::Lost(err.to_string())),
        }
        inbox.reserve(8 * 1024);
        match stream.read_buf(inbox).await {
            Ok(0) => {
                return Err(QueryError::Lost(
                    "the server closed the connection".to_owned(),
                ))
            }
            Ok(_) => {}
            Err(err) => return Err(QueryError::Lost(err.to_string())),
        }
    }
}
