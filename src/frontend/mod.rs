//! The client side: listeners, and the startup phase of each connection
//! (SSL/GSS negotiation, cancel requests, the StartupMessage,
//! authentication) up to the point where a session takes over.

pub mod listener;
pub mod stream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::auth::client::AuthError;
use crate::auth::hba::{self, AuthMethod, Peer};
use crate::auth::scram::Binding;
use crate::auth::{self, Credential};
use crate::config::{ClientTlsMode, Config};
use crate::proxy::{Shared, Tls};
use crate::session::{self, cancel::ClientKey};
use crate::wire::reply::{self, sqlstate};
use crate::wire::startup::{self, StartupError, StartupPacket, PROTOCOL_MINOR};
pub use stream::ClientStream;

/// Takes a freshly accepted connection through the startup phase and
/// authentication and, if it asks for a session, runs it. What happens is
/// logged in `span`.
pub async fn handle_connection(
    client: ClientStream,
    shared: Arc<Shared>,
    id: u64,
    span: tracing::Span,
) {
    let Some(admitted) = admit(client, &shared).instrument(span.clone()).await else {
        return;
    };
    let _slot = admitted.slot;
    session::run(
        admitted.client,
        admitted.startup,
        admitted.credential,
        shared,
        id,
        span,
    )
    .await;
}

/// A client through startup and authentication, ready for a session.
struct Admitted {
    client: ClientStream,
    startup: startup::StartupMessage,
    credential: Option<Credential>,
    /// Counts the client against `max_client_conn` while its session runs.
    slot: ClientSlot,
}

/// The startup phase and authentication; `None` when the connection
/// ends there (refused, a cancel request, gone).
async fn admit(mut client: ClientStream, shared: &Arc<Shared>) -> Option<Admitted> {
    let config = shared.config();
    let Some(unauthenticated) = Unauthenticated::take(shared, config.max_unauthenticated) else {
        refuse(
            &mut client,
            sqlstate::TOO_MANY_CONNECTIONS,
            &format!(
                "sorry, too many connections are authenticating (max_unauthenticated = {})",
                config.max_unauthenticated
            ),
        )
        .await;
        return None;
    };
    // One deadline for the startup packets and the authentication, as
    // PostgreSQL's authentication_timeout.
    let deadline = tokio::time::Instant::now() + config.auth_timeout.0;
    let tls = shared.tls();
    let startup = loop {
        match tokio::time::timeout_at(deadline, negotiate(&mut client, shared, &tls)).await {
            Ok(Ok(Negotiated::Startup(startup))) => break startup,
            Ok(Ok(Negotiated::Done)) => return None,
            Ok(Ok(Negotiated::StartTls(acceptor))) => {
                match tokio::time::timeout_at(deadline, client.into_tls(&acceptor)).await {
                    Ok(Ok(upgraded)) => client = upgraded,
                    Ok(Err(err)) => {
                        tracing::info!(error = %err, "TLS handshake with a client failed");
                        return None;
                    }
                    Err(_) => return None,
                }
            }
            Ok(Err(err)) => {
                if !matches!(err, StartupError::Closed) {
                    tracing::info!(error = %err, "refused a connection during startup");
                    refuse(&mut client, err.sqlstate(), &err.to_string()).await;
                }
                return None;
            }
            Err(_) => {
                refuse(
                    &mut client,
                    sqlstate::PROTOCOL_VIOLATION,
                    "startup packet not received in time",
                )
                .await;
                return None;
            }
        }
    };

    if startup.get("user").is_none_or(<[u8]>::is_empty) {
        refuse(
            &mut client,
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return None;
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
        return None;
    }
    if config.client_tls == ClientTlsMode::Require && client.is_tcp() && !client.is_tls() {
        refuse(
            &mut client,
            sqlstate::INVALID_AUTHORIZATION,
            "Reprise requires TLS for TCP connections (client_tls = require)",
        )
        .await;
        return None;
    }
    if shared.draining.is_cancelled() {
        refuse(
            &mut client,
            sqlstate::CANNOT_CONNECT_NOW,
            "Reprise is shutting down",
        )
        .await;
        return None;
    }
    let Some(slot) = ClientSlot::take(shared) else {
        let limit = config.max_client_conn;
        refuse(
            &mut client,
            sqlstate::TOO_MANY_CONNECTIONS,
            &format!("sorry, too many clients already (max_client_conn = {limit})"),
        )
        .await;
        return None;
    };

    let protocol_options = startup.protocol_options();
    if startup.minor_version > PROTOCOL_MINOR || !protocol_options.is_empty() {
        let mut out = BytesMut::new();
        reply::negotiate_protocol_version(&mut out, i32::from(PROTOCOL_MINOR), protocol_options);
        if client.write_all(&out).await.is_err() {
            return None;
        }
    }
    let proven = tokio::time::timeout_at(
        deadline,
        authenticate(&mut client, &startup, &config, shared, &tls),
    )
    .await;
    let credential = match proven {
        Ok(Ok(credential)) => credential,
        Ok(Err(err)) => {
            let user = startup.get_lossy("user").unwrap_or_default();
            tracing::info!(%user, error = %err, "client authentication failed");
            if let Some(code) = err.sqlstate() {
                refuse(&mut client, code, &err.to_string()).await;
            }
            return None;
        }
        Err(_) => {
            refuse(
                &mut client,
                sqlstate::INVALID_AUTHORIZATION,
                &format!(
                    "authentication not completed within auth_timeout ({})",
                    config.auth_timeout
                ),
            )
            .await;
            return None;
        }
    };
    drop(unauthenticated);
    Some(Admitted {
        client,
        startup,
        credential,
        slot,
    })
}

/// Chooses the method for this connection, runs it, and returns what new
/// server connections will log in with.
async fn authenticate(
    client: &mut ClientStream,
    startup: &startup::StartupMessage,
    config: &Config,
    shared: &Shared,
    tls: &Tls,
) -> Result<Option<Credential>, AuthError> {
    let user = startup.get_lossy("user").unwrap_or_default();
    let database = startup
        .get_lossy("database")
        .unwrap_or_else(|| user.clone());
    let peer = Peer {
        address: client.peer_ip(),
        tls: client.is_tls(),
        user: &user,
        database: &database,
    };
    let method = hba::choose(&config.hba, config.auth_type, &peer).ok_or_else(|| {
        AuthError::Rejected(format!(
            "no hba rule for host \"{}\", user \"{user}\", database \"{database}\", {}",
            peer.address
                .map_or_else(|| "[local]".to_owned(), |ip| ip.to_string()),
            if peer.tls { "TLS on" } else { "TLS off" },
        ))
    })?;
    if method == AuthMethod::Password && client.is_tcp() && !client.is_tls() {
        return Err(AuthError::Rejected(format!(
            "password authentication for user \"{user}\" is only offered over TLS; connect with sslmode=require"
        )));
    }
    let users = shared.users();
    let entry = match (users.entry(&user), &config.auth_user) {
        (Some(entry), _) => Some(Arc::clone(entry)),
        // Nothing to look up for a method that asks for no secret.
        (None, Some(auth_user)) if method != AuthMethod::Trust => {
            auth::lookup::look_up(shared, config, auth_user, &database, &user)
                .await
                .map_err(AuthError::Unavailable)?
        }
        (None, _) => None,
    };
    let binding = match &tls.client {
        Some(client_tls) if client.is_tls() => Binding::EndPoint(client_tls.end_point.clone()),
        _ => Binding::Unsupported,
    };
    let unknown_as_scram = config.auth_user.is_some() || users.mostly_verifiers();
    let learned =
        auth::client::authenticate(client, method, &user, entry, binding, unknown_as_scram).await?;
    Ok(learned.or_else(|| users.login(&user)))
}

enum Negotiated {
    Startup(startup::StartupMessage),
    /// 'S' was sent: the TLS handshake comes next.
    StartTls(tokio_rustls::TlsAcceptor),
    /// A cancel request, served.
    Done,
}

/// Answers SSL and GSS requests until a StartupMessage or CancelRequest
/// arrives: 'S' to an SSLRequest on plain TCP when client TLS is on, 'N'
/// otherwise.
async fn negotiate(
    client: &mut ClientStream,
    shared: &Shared,
    tls: &Tls,
) -> Result<Negotiated, StartupError> {
    loop {
        match startup::read_packet(client).await? {
            StartupPacket::SslRequest => match &tls.client {
                Some(client_tls) if client.is_tcp() && !client.is_tls() => {
                    client.write_all(b"S").await?;
                    return Ok(Negotiated::StartTls(client_tls.acceptor.clone()));
                }
                _ => client.write_all(b"N").await?,
            },
            StartupPacket::GssEncRequest => client.write_all(b"N").await?,
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
                return Ok(Negotiated::Done);
            }
            StartupPacket::CancelUnknownKeyFormat => return Ok(Negotiated::Done),
            StartupPacket::Startup(message) => return Ok(Negotiated::Startup(message)),
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

/// One of `max_unauthenticated` places, given back on drop.
struct Unauthenticated {
    shared: Arc<Shared>,
}

impl Unauthenticated {
    fn take(shared: &Arc<Shared>, limit: usize) -> Option<Self> {
        take_place(&shared.unauthenticated, limit).then(|| Unauthenticated {
            shared: Arc::clone(shared),
        })
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.shared.unauthenticated.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one more in `counter` unless it is at `limit`.
fn take_place(counter: &AtomicUsize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
            (active < limit).then_some(active + 1)
        })
        .is_ok()
}

/// One of `max_client_conn` places, given back on drop.
struct ClientSlot {
    shared: Arc<Shared>,
}

impl ClientSlot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        take_place(&shared.clients, shared.config().max_client_conn).then(|| ClientSlot {
            shared: Arc::clone(shared),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
