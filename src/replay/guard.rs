//! The commit guard: a row that proves a transaction committed where the
//! transaction id cannot.
//!
//! `txid_status` answers for a transaction id only on the server life
//! that handed it out: after a promotion or a crash restart the same id
//! may name another transaction. With `commit_guard` on, Reprise keeps a
//! small table in its own schema (`reprise.commit_guard`), created on
//! first use in each database. Just before the COMMIT of a transaction
//! that may have written, the question Reprise already pipelines ahead of
//! the COMMIT also inserts a unique token (no round trip is added); the
//! row commits or vanishes with the transaction. After a failover to
//! another server life, a token that is there means committed, one that is
//! not means the work is to be done again. Old tokens are deleted in the
//! background.
//!
//! The insert runs in a function with an exception block, so that nothing
//! about the guard can fail the client's transaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::stream::ServerStream;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::auth::Credential;
use crate::backend::query::{simple_query, QueryError};
use crate::backend::{self, ServerConnection};
use crate::config::{Backend, Config};
use crate::proxy::Tls;
use crate::tls::ServerTls;
use crate::wire::frame;
use crate::wire::startup::StartupMessage;

/// Creates the schema, the table and the functions; safe to run again.
const SETUP: &str = r#"
CREATE SCHEMA IF NOT EXISTS reprise;
CREATE TABLE IF NOT EXISTS reprise.commit_guard (
    token text PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE OR REPLACE FUNCTION reprise.guard(new_token text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $guard$
BEGIN
    IF pg_catalog.current_setting('transaction_read_only')::bool THEN
        RETURN NULL;
    END IF;
    INSERT INTO reprise.commit_guard (token) VALUES (new_token);
    RETURN new_token;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$guard$;
CREATE OR REPLACE FUNCTION reprise.guarded(token_asked text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $guarded$
    SELECT EXISTS (SELECT 1 FROM reprise.commit_guard WHERE token = token_asked)
$guarded$;
GRANT USAGE ON SCHEMA reprise TO PUBLIC;
GRANT EXECUTE ON FUNCTION reprise.guard(text), reprise.guarded(text) TO PUBLIC;
"#;

/// How long a token is kept: far longer than any failover budget asks
/// about it.
pub const RETENTION: Duration = Duration::from_secs(15 * 60);
/// How often old tokens are deleted.
const SWEEP_PERIOD: Duration = Duration::from_secs(60);
/// A setup that failed is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A fresh token: 128 random bits, hex.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The expression pipelined ahead of a COMMIT that inserts `token`.
pub fn insert_expression(token: &str) -> String {
    // The token is hex: nothing to quote.
    format!("reprise.guard('{token}')")
}

/// Whether the guard of one database on one backend can be used.
#[derive(Debug, Default)]
pub struct Slot {
    ready: AtomicBool,
}

impl Slot {
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    backend: Backend,
    /// The login the setup succeeded with; the sweeper uses it too.
    login: StartupMessage,
    credential: Option<Credential>,
    tls: Arc<Tls>,
    /// When a setup was last started.
    tried: Option<Instant>,
    running: bool,
}

/// The guard of every (backend, database) sessions have used.
#[derive(Debug, Default)]
pub struct Guards {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

impl Guards {
    /// The slot of `startup`'s database on `backend`, with a setup started
    /// in the background if it is not ready and none is running.
    pub fn slot(
        self: &Arc<Self>,
        backend: &Backend,
        startup: &StartupMessage,
        config: &Arc<Config>,
        credential: Option<&Credential>,
        tls: &Arc<Tls>,
    ) -> Arc<Slot> {
        let database = startup
            .get_lossy("database")
            .or_else(|| startup.get_lossy("user"))
            .unwrap_or_default();
        let key = (backend.name.clone(), database);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            slot: Arc::default(),
            backend: backend.clone(),
            login: startup.clone(),
            credential: credential.cloned(),
            tls: Arc::clone(tls),
            tried: None,
            running: false,
        });
        let due = entry.tried.is_none_or(|at| at.elapsed() >= RETRY_AFTER);
        if !entry.slot.ready() && !entry.running && due {
            entry.running = true;
            entry.tried = Some(Instant::now());
            entry.backend = backend.clone();
            entry.login = startup.clone();
            entry.credential = credential.cloned();
            entry.tls = Arc::clone(tls);
            let guards = Arc::clone(self);
            let (backend, login) = (entry.backend.clone(), entry.login.clone());
            let (config, credential) = (Arc::clone(config), entry.credential.clone());
            let tls = Arc::clone(tls);
            tokio::spawn(async move {
                let outcome = run_once(
                    &backend,
                    &login,
                    &config,
                    credential.as_ref(),
                    &tls.server,
                    SETUP,
                )
                .await;
                guards.set_up_done(&key, outcome);
            });
        }
        Arc::clone(&entry.slot)
    }

    fn set_up_done(&self, key: &(String, String), outcome: Result<(), String>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = entries.get_mut(key) else {
            return;
        };
        entry.running = false;
        match outcome {
            Ok(()) => {
                tracing::info!(backend = %key.0, database = %key.1, "commit guard ready");
                entry.slot.ready.store(true, Ordering::Relaxed);
            }
            Err(problem) => {
                tracing::warn!(backend = %key.0, database = %key.1, %problem, "commit guard could not be set up; COMMITs there are settled by transaction id alone");
            }
        }
    }

    /// Deletes tokens older than [`RETENTION`] wherever the guard is
    /// ready, every [`SWEEP_PERIOD`], until `stop`.
    pub async fn sweep_in_background(
        self: Arc<Self>,
        config: impl Fn() -> Arc<Config>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SWEEP_PERIOD) => {}
            }
            let ready: Vec<(Backend, StartupMessage, Option<Credential>, Arc<Tls>)> = {
                let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                entries
                    .values()
                    .filter(|entry| entry.slot.ready())
                    .map(|entry| {
                        (
                            entry.backend.clone(),
                            entry.login.clone(),
                            entry.credential.clone(),
                            Arc::clone(&entry.tls),
                        )
                    })
                    .collect()
            };
            let config = config();
            for (backend, login, credential, tls) in ready {
                let sql = format!(
                    "DELETE FROM reprise.commit_guard WHERE at < pg_catalog.now() - interval '{} seconds'",
                    RETENTION.as_secs()
                );
                if let Err(problem) = run_once(
                    &backend,
                    &login,
                    &config,
                    credential.as_ref(),
                    &tls.server,
                    &sql,
                )
                .await
                {
                    tracing::debug!(backend = %backend.name, %problem, "old commit guard tokens not deleted this time");
                }
            }
        }
    }
}

/// Opens a connection, runs `sql`, closes it.
async fn run_once(
    backend: &Backend,
    login: &StartupMessage,
    config: &Config,
    credential: Option<&Credential>,
    tls: &ServerTls,
    sql: &str,
) -> Result<(), String> {
    let max_message_size = config.max_message_size();
    let ServerConnection {
        mut stream,
        mut pending,
        ..
    } = backend::connect(
        backend,
        login,
        credential,
        tls,
        config.connect_timeout.0,
        &config.tcp_keepalive,
        max_message_size,
    )
    .await
    .map_err(|err| err.to_string())?;
    let ran = tokio::time::timeout(
        config.connect_timeout.0,
        simple_query(&mut stream, &mut pending, sql, max_message_size),
    )
    .await
    .map_err(|_| "the server did not answer in time".to_owned())
    .and_then(|ran| ran.map_err(|err| err.to_string()));
    let mut terminate = BytesMut::new();
    frame::write_frame(&mut terminate, Some(b'X'), |_| {});
    let _ = stream.write_all(&terminate).await;
    ran.map(|_| ())
}

/// Asks a new server connection whether `token` committed.
pub async fn committed(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    token: &str,
    max_message_size: usize,
) -> Result<Result<bool, String>, String> {
    let sql = format!("SELECT reprise.guarded('{token}')::pg_catalog.text");
    match simple_query(stream, inbox, &sql, max_message_size).await {
        Ok(rows) => match rows.first().map(Vec::as_slice) {
            Some([Some(answer)]) => Ok(Ok(answer == "true")),
            _ => Ok(Err(
                "the answer about the commit guard was not understood".to_owned()
            )),
        },
        Err(QueryError::Lost(problem)) => Err(problem),
        Err(QueryError::Refused(summary)) => Ok(Err(format!(
            "the commit guard could not be read: {} ({})",
            summary.message, summary.code
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_hex() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_eq!(insert_expression(&a), format!("reprise.guard('{a}')"));
    }
}
