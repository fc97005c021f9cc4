//! The client side: listeners, and the startup phase of each connection
//! (SSL/GSS negotiation, cancel requests, the StartupMessage) up to the
//! point where a session takes over.

pub mod listener;
pub mod stream;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::proxy::Shared;
use crate::session::{self, cancel::ClientKey};
use crate::wire::reply::{self, sqlstate};
use crate::wire::startup::{self, StartupError, StartupPacket, PROTOCOL_MINOR};
pub use stream::ClientStream;

/// A client must finish its startup packets within this time, as with
/// PostgreSQL's authentication_timeout default.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Takes a freshly accepted connection through the startup phase and, if it
/// asks for a session, runs it.
pub async fn handle_connection(mut client: ClientStream, shared: Arc<Shared>, id: u64) {
    let startup = match tokio::time::timeout(STARTUP_TIMEOUT, negotiate(&mut client, &shared)).await
    {
        Ok(Ok(Some(startup))) => startup,
        Ok(Ok(None)) => return,
        Ok(Err(err)) => {
            if !matches!(err, StartupError::Closed) {
                tracing::info!(error = %err, "refused a connection during startup");
                refuse(&mut client, err.sqlstate(), &err.to_string()).await;
            }
            return;
        }
        Err(_) => {
            refuse(
                &mut client,
                sqlstate::PROTOCOL_VIOLATION,
                "startup packet not received in time",
            )
            .await;
            return;
        }
    };

    if startup.get("user").is_none_or(<[u8]>::is_empty) {
        refuse(
            &mut client,
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return;
    }
    if startup
        .get("replication")
        .is_some_and(|value| value != b"false" && value != b"0" && value != b"off")
    {
        refuse(
            &mut client,
            sqlstate::FEATURE_NOT_SUPPORTED,
            "Reprise does not relay replication connections; connect to the server directly",
        )
        .await;
        return;
    }
    if shared.draining.is_cancelled() {
        refuse(
            &mut client,
            sqlstate::CANNOT_CONNECT_NOW,
            "Reprise is shutting down",
        )
        .await;
        return;
    }
    let Some(_slot) = ClientSlot::take(&shared) else {
        let limit = shared.config().max_client_conn;
        refuse(
            &mut client,
            sqlstate::TOO_MANY_CONNECTIONS,
            &format!("sorry, too many clients already (max_client_conn = {limit})"),
        )
        .await;
        return;
    };

    let protocol_options = startup.protocol_options();
    if startup.minor_version > PROTOCOL_MINOR || !protocol_options.is_empty() {
        let mut out = BytesMut::new();
        reply::negotiate_protocol_version(&mut out, i32::from(PROTOCOL_MINOR), protocol_options);
        if client.write_all(&out).await.is_err() {
            return;
        }
    }
    session::run(client, startup, shared, id).await;
}

/// Answers SSL and GSS requests with 'N' (no encryption on this
/// connection) until a StartupMessage or CancelRequest arrives. `None`
/// means the connection was a cancel request and is done.
async fn negotiate(
    client: &mut ClientStream,
    shared: &Shared,
) -> Result<Option<startup::StartupMessage>, StartupError> {
    loop {
        match startup::read_packet(client).await? {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                client.write_all(b"N").await?
            }
            StartupPacket::Cancel {
                process_id,
                secret_key,
            } => {
                session::cancel(
                    shared,
                    ClientKey {
                        process_id,
                        secret_key,
                    },
                )
                .await;
                return Ok(None);
            }
            StartupPacket::CancelUnknownKeyFormat => return Ok(None),
            StartupPacket::Startup(message) => return Ok(Some(message)),
        }
    }
}

async fn refuse(client: &mut ClientStream, code: &str, message: &str) {
    let frame = reply::fatal(code, message);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        client.write_all(&frame).await?;
        client.shutdown().await
    })
    .await;
}

/// One of `max_client_conn` places, given back on drop.
struct ClientSlot {
    shared: Arc<Shared>,
}

impl ClientSlot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        let limit = shared.config().max_client_conn;
        shared
            .clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                (active < limit).then_some(active + 1)
            })
            .ok()
            .map(|_| ClientSlot {
                shared: Arc::clone(shared),
            })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
