//! The outcome of a COMMIT whose answer was lost with the server
//! connection.
//!
//! Before a COMMIT of an explicit transaction, Reprise sends a query of
//! its own in the same write (no round trip is added): the transaction id
//! the transaction was given, if any, and, once per server connection,
//! which server that is (system identifier, timeline, postmaster start).
//! A transaction without an id wrote nothing and can simply run again.
//! After a failure the new connection asks `txid_status`: `committed` is
//! trusted only from the same system on the same timeline since the same
//! postmaster start, because a crash restart or a promotion can hand the
//! same id out again; `aborted` means the work is to be redone; `in
//! progress` means the old server process is still finishing, so it is
//! terminated and the question asked again. Anything else is unknown.

use std::time::Duration;

use crate::backend::stream::ServerStream;
use bytes::BytesMut;

use super::guard;
use crate::backend::query::{simple_query, QueryError, TextRow};

/// The query pipelined ahead of a COMMIT: the transaction id, if any;
/// with `assign`, one is assigned if the transaction has none yet (a
/// transaction that sent NOTIFY gets one only at COMMIT), unless it is
/// read-only; with `guard`, the commit-guard insert of that token (see
/// [`guard`]); with `identity`, the server's system identifier, timeline
/// and postmaster start. None of it can fail inside a transaction, so the
/// client's transaction is never disturbed.
pub fn xid_question(assign: bool, guard: Option<&str>, identity: bool) -> String {
    let mut sql = String::from("SELECT ");
    if assign {
        sql.push_str(
            "CASE WHEN pg_catalog.current_setting('transaction_read_only')::pg_catalog.bool \
             THEN pg_catalog.txid_current_if_assigned() ELSE pg_catalog.txid_current() END::pg_catalog.text",
        );
    } else {
        sql.push_str("pg_catalog.txid_current_if_assigned()::pg_catalog.text");
    }
    if let Some(token) = guard {
        sql.push_str(", ");
        sql.push_str(&guard::insert_expression(token));
    }
    if identity {
        sql.push_str(", ");
        sql.push_str(IDENTITY);
    }
    sql
}

/// The last columns of a question that names the server: system
/// identifier, timeline (NULL on a standby) and postmaster start.
const IDENTITY: &str = "s.system_identifier::pg_catalog.text, \
     CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
          ELSE pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) END, \
     pg_catalog.pg_postmaster_start_time()::pg_catalog.text \
     FROM pg_catalog.pg_control_system() s";

/// Which server, and which life of it, a connection talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    pub system: String,
    /// None on a standby.
    pub timeline: Option<String>,
    pub started: String,
}

impl ServerIdentity {
    /// From the last three columns of a row of [`xid_question`] with the
    /// identity.
    pub fn from_fields(fields: &[Option<&[u8]>]) -> Option<ServerIdentity> {
        let text =
            |field: &Option<&[u8]>| field.map(|value| String::from_utf8_lossy(value).into_owned());
        match fields {
            [system, timeline, started] => Some(ServerIdentity {
                system: text(system)?,
                timeline: text(timeline),
                started: text(started)?,
            }),
            _ => None,
        }
    }

    fn from_row(row: &[Option<String>]) -> Option<ServerIdentity> {
        match row {
            [system, timeline, started] => Some(ServerIdentity {
                system: system.clone()?,
                timeline: timeline.clone(),
                started: started.clone()?,
            }),
            _ => None,
        }
    }
}

/// What Reprise learnt before a COMMIT was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitMark {
    /// The replay-log command that holds the COMMIT.
    pub seq: u64,
    /// The transaction id; `None` when the transaction had none (it wrote
    /// nothing).
    pub xid: Option<u64>,
    /// The server that gave it out, when known.
    pub identity: Option<ServerIdentity>,
    /// The commit-guard token the transaction inserted, if it did.
    pub guard: Option<String>,
    /// The question's answer arrived and `xid` is what it said; otherwise
    /// the connection was cut before it, and only a token found in the
    /// guard table proves anything (that the COMMIT committed).
    pub answered: bool,
}

/// What became of the transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Committed,
    /// Not committed: the transaction can run again.
    Aborted,
    Unknown(String),
}

/// How often an old server process still running the transaction is
/// terminated and waited for before the outcome counts as unknown.
const IN_PROGRESS_ROUNDS: u32 = 3;
/// How long to wait for a terminated server process to go, per round.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);

/// Asks a new server connection what became of `mark`'s transaction.
/// `Err` when the connection failed and another may answer.
pub async fn settle(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    mark: &CommitMark,
    old_process_id: i32,
    max_message_size: usize,
) -> Result<Verdict, String> {
    let verdict = settle_by_id(stream, inbox, mark, old_process_id, max_message_size).await?;
    let (Verdict::Unknown(reason), Some(token)) = (&verdict, &mark.guard) else {
        return Ok(verdict);
    };
    if reason.starts_with(STILL_RUNNING) {
        // The guard row is no proof while the transaction may still end.
        return Ok(verdict);
    }
    match guard::committed(stream, inbox, token, max_message_size).await? {
        Ok(true) => Ok(Verdict::Committed),
        // The guard swallows its own errors: a token whose insert was not
        // confirmed proves something only by being there.
        Ok(false) if !mark.answered => Ok(Verdict::Unknown(format!(
            "{reason}, and the commit-guard row is absent, which does not prove that the transaction did not commit"
        ))),
        Ok(false) => Ok(Verdict::Aborted),
        Err(problem) => Ok(Verdict::Unknown(format!("{reason}; {problem}"))),
    }
}

/// What `txid_status` on the new server connection proves.
async fn settle_by_id(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    mark: &CommitMark,
    old_process_id: i32,
    max_message_size: usize,
) -> Result<Verdict, String> {
    if !mark.answered {
        return Ok(Verdict::Unknown(
            "the answer to the question for the transaction id was cut off with the connection"
                .to_owned(),
        ));
    }
    let Some(xid) = mark.xid else {
        return Ok(Verdict::Aborted);
    };
    let question = format!("SELECT pg_catalog.txid_status({xid})::pg_catalog.text, {IDENTITY}");
    for _ in 0..IN_PROGRESS_ROUNDS {
        let rows = match simple_query(stream, inbox, &question, max_message_size).await {
            Ok(rows) => rows,
            Err(QueryError::Lost(problem)) => return Err(problem),
            Err(QueryError::Refused(summary)) => {
                return Ok(Verdict::Unknown(format!(
                    "the server could not tell the status of transaction {xid}: {} ({})",
                    summary.message, summary.code
                )))
            }
        };
        let Some((status, identity)) = rows.first().and_then(split_row) else {
            return Ok(Verdict::Unknown(
                "the server's answer about the transaction was not understood".to_owned(),
            ));
        };
        let same_server = mark.identity.as_ref() == Some(&identity) && identity.timeline.is_some();
        match status.as_deref() {
            Some("aborted") => return Ok(Verdict::Aborted),
            Some("committed") if same_server => return Ok(Verdict::Committed),
            Some("in progress") if same_server => {
                terminate(stream, inbox, old_process_id, max_message_size).await?;
            }
            Some(other) => {
                return Ok(Verdict::Unknown(format!(
                    "transaction {xid} is {other:?} on a server that may not be the one that ran it"
                )))
            }
            None => {
                return Ok(Verdict::Unknown(format!(
                    "the server no longer knows transaction {xid}"
                )))
            }
        }
    }
    Ok(Verdict::Unknown(format!(
        "{STILL_RUNNING}: transaction {xid} was still in progress after its server process was terminated"
    )))
}

/// How an outcome unknown because the old server process would not end
/// begins.
const STILL_RUNNING: &str = "still running";

fn split_row(row: &TextRow) -> Option<(Option<String>, ServerIdentity)> {
    let (status, identity) = row.split_first()?;
    Some((status.clone(), ServerIdentity::from_row(identity)?))
}

/// Ends the old server process that still holds the transaction, and
/// waits for it to go.
async fn terminate(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    process_id: i32,
    max_message_size: usize,
) -> Result<(), String> {
    let wait_ms = TERMINATE_WAIT.as_millis();
    let sql = format!("SELECT pg_catalog.pg_terminate_backend({process_id}, {wait_ms})");
    match simple_query(stream, inbox, &sql, max_message_size).await {
        Ok(_) => Ok(()),
        Err(QueryError::Lost(problem)) => Err(problem),
        Err(QueryError::Refused(summary)) => {
            tracing::warn!(process_id, error = %summary.message, "could not terminate the server process that ran the transaction");
            Ok(())
        }
    }
}
