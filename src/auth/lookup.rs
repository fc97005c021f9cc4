//! `auth_query`: the secret of a user the users file does not list, read
//! from the server as `auth_user`, as PgBouncer does.
//!
//! Every lookup opens a connection of its own and asks afresh, so a known
//! and an unknown user cost the same and a changed password counts at once.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::backend::{self, query};
use crate::config::Config;
use crate::proxy::Shared;
use crate::users::{Entry, Secret};
use crate::wire::frame;
use crate::wire::startup::StartupMessage;

/// The secret `auth_query` finds for `user` in `database`; none for an
/// unknown user or one without a password.
pub async fn look_up(
    shared: &Shared,
    config: &Config,
    auth_user: &str,
    database: &str,
    user: &str,
) -> Result<Option<Arc<Entry>>, String> {
    let backend = shared
        .health
        .preferred(&config.backends)
        .into_iter()
        .next()
        .ok_or("no backend is configured")?;
    let login = StartupMessage {
        minor_version: 0,
        parameters: vec![
            (
                Bytes::from_static(b"user"),
                Bytes::from(auth_user.to_owned()),
            ),
            (
                Bytes::from_static(b"database"),
                Bytes::from(database.to_owned()),
            ),
            (
                Bytes::from_static(b"application_name"),
                Bytes::from_static(b"reprise auth_query"),
            ),
        ],
    };
    let credential = shared.users().login(auth_user);
    let max_message_size = config.max_message_size();
    let mut server = backend::connect(
        &backend,
        &login,
        credential.as_ref(),
        &shared.tls().server,
        config.connect_timeout.0,
        &config.tcp_keepalive,
        max_message_size,
    )
    .await
    .map_err(|err| format!("auth_query could not log in as \"{auth_user}\": {err}"))?;
    let rows = query::query_with_params(
        &mut server.stream,
        &mut server.pending,
        &config.auth_query,
        &[user],
        max_message_size,
    )
    .await
    .map_err(|err| format!("auth_query failed: {err}"))?;
    let mut terminate = BytesMut::new();
    frame::write_frame(&mut terminate, Some(b'X'), |_| {});
    let _ = server.stream.write_all(&terminate).await;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    match row.into_iter().nth(1).flatten() {
        None => Ok(None),
        Some(text) => Secret::parse(&text)
            .map(|secret| Some(Arc::new(Entry::new(secret))))
            .map_err(|problem| {
                format!("auth_query returned a secret Reprise cannot use: {problem}")
            }),
    }
}
