//! Which configured server is the writable one, and on which timeline.
//!
//! A session that lost its server connection must attach to the server
//! that now takes writes: not a standby (it waits for a promotion, within
//! its budget), not an old primary that came back after a standby was
//! promoted (its timeline is older than one Reprise has seen for the same
//! system), and not either of two servers that both claim to be writable
//! (split brain: Reprise refuses to choose). What is learnt about each
//! server, by the background checks or by a session's own connection
//! attempts, is kept here so that the choice is quick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::stream::ServerStream;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::query::{simple_query, QueryError};
use crate::auth::Credential;
use crate::config::{Backend, Config};
use crate::proxy::Tls;
use crate::tls::ServerTls;
use crate::users::Users;
use crate::wire::frame;
use crate::wire::startup::StartupMessage;

/// Whether the server is in recovery, its system identifier and, when it
/// takes writes, the timeline it writes on (hex, as in WAL file names).
const ROLE_QUERY: &str = "SELECT pg_catalog.pg_is_in_recovery()::pg_catalog.text, \
     s.system_identifier::pg_catalog.text, \
     CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
          ELSE pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) END \
     FROM pg_catalog.pg_control_system() s";

/// What a server said it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub writable: bool,
    pub system: String,
    /// The timeline it writes on; none on a standby.
    pub timeline: Option<u32>,
}

/// Asks a logged-in server connection what it is.
pub async fn ask_role(
    stream: &mut ServerStream,
    inbox: &mut BytesMut,
    max_message_size: usize,
) -> Result<Role, QueryError> {
    let rows = simple_query(stream, inbox, ROLE_QUERY, max_message_size).await?;
    let not_understood =
        || QueryError::Lost("the server's answer about its role was not understood".to_owned());
    match rows.first().map(Vec::as_slice) {
        Some([Some(in_recovery), Some(system), timeline]) => Ok(Role {
            writable: in_recovery == "false",
            system: system.clone(),
            timeline: match timeline {
                Some(hex) => Some(u32::from_str_radix(hex, 16).map_err(|_| not_understood())?),
                None => None,
            },
        }),
        _ => Err(not_understood()),
    }
}

#[derive(Clone, Debug)]
struct Observation {
    role: Result<Role, String>,
    at: Instant,
}

/// Why a writable server is not the one to attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It writes on an older timeline than one seen for its system: an old
    /// primary back after a promotion.
    OldTimeline { timeline: u32, newest: u32 },
    /// Another server claims to be writable too, and is not an old primary
    /// of the same system: the same timeline, or another system.
    SplitBrain { other: String },
}

/// What Reprise knows about every configured server.
#[derive(Debug, Default)]
pub struct Health {
    observations: Mutex<HashMap<String, Observation>>,
    /// The newest timeline seen written on, per system identifier.
    newest_timeline: Mutex<HashMap<String, u32>>,
}

impl Health {
    /// Notes what `backend` said (or why it could not be asked).
    pub fn record(&self, backend: &str, role: Result<Role, String>) {
        if let Ok(Role {
            writable: true,
            system,
            timeline: Some(timeline),
        }) = &role
        {
            let mut newest = self
                .newest_timeline
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let seen = newest.entry(system.clone()).or_insert(*timeline);
            *seen = (*seen).max(*timeline);
        }
        let mut observations = self.observations.lock().unwrap_or_else(|p| p.into_inner());
        observations.insert(
            backend.to_owned(),
            Observation {
                role,
                at: Instant::now(),
            },
        );
    }

    /// `backends` in the order to try them: the last one seen writable
    /// first, then those not seen in recovery, then the rest, each group
    /// in configured order.
    pub fn preferred(&self, backends: &[Backend]) -> Vec<Backend> {
        let observations = self.observations.lock().unwrap_or_else(|p| p.into_inner());
        let rank = |backend: &Backend| match observations.get(&backend.name).map(|o| &o.role) {
            Some(Ok(role)) if role.writable => 0,
            None => 1,
            Some(Err(_)) => 2,
            Some(Ok(_)) => 3,
        };
        let mut ordered = backends.to_vec();
        ordered.sort_by_key(rank);
        ordered
    }

    /// Whether `role`, just learnt from `backend`, may take sessions, given
    /// what the `others` are now (`None`: could not be asked).
    pub fn refusal(
        &self,
        backend: &str,
        role: &Role,
        others: &[(String, Option<Role>)],
    ) -> Option<Refusal> {
        if let Some(timeline) = role.timeline {
            let newest = self
                .newest_timeline
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(&newest) = newest.get(&role.system) {
                if timeline < newest {
                    return Some(Refusal::OldTimeline { timeline, newest });
                }
            }
        }
        others
            .iter()
            .find(|(name, other)| {
                name != backend
                    && other
                        .as_ref()
                        .is_some_and(|other| other.writable && !self.is_old_primary(other))
            })
            .map(|(name, _)| Refusal::SplitBrain {
                other: name.clone(),
            })
    }

    fn is_old_primary(&self, role: &Role) -> bool {
        let newest = self
            .newest_timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match (role.timeline, newest.get(&role.system)) {
            (Some(timeline), Some(&newest)) => timeline < newest,
            _ => false,
        }
    }

    /// What `backend` was observed to be within `fresh` (inside, `None`
    /// when it could not be asked); `None` when there is no such
    /// observation.
    pub fn fresh_role(&self, backend: &str, fresh: Duration) -> Option<Option<Role>> {
        let observations = self.observations.lock().unwrap_or_else(|p| p.into_inner());
        observations
            .get(backend)
            .filter(|observation| observation.at.elapsed() <= fresh)
            .map(|observation| observation.role.as_ref().ok().cloned())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OldTimeline { timeline, newest } => write!(
                f,
                "it writes on timeline {timeline}, older than timeline {newest} seen for the same system: an old primary after a promotion"
            ),
            Refusal::SplitBrain { other } => {
                write!(f, "server \"{other}\" also claims to be writable")
            }
        }
    }
}

/// Logs in to `backend` as `user` and asks its role.
pub async fn probe(
    backend: &Backend,
    startup: &StartupMessage,
    credential: Option<&Credential>,
    tls: &ServerTls,
    config: &Config,
) -> Result<Role, String> {
    let max_message_size = config.max_message_size();
    let mut server = super::connect(
        backend,
        startup,
        credential,
        tls,
        config.connect_timeout.0,
        &config.tcp_keepalive,
        max_message_size,
    )
    .await
    .map_err(|err| err.to_string())?;
    let role = tokio::time::timeout(
        config.connect_timeout.0,
        ask_role(&mut server.stream, &mut server.pending, max_message_size),
    )
    .await
    .map_err(|_| "the server did not say what it is in time".to_owned())?
    .map_err(|err| err.to_string());
    let mut terminate = BytesMut::new();
    frame::write_frame(&mut terminate, Some(b'X'), |_| {});
    let _ = server.stream.write_all(&terminate).await;
    role
}

/// Checks every backend each `health_check_period`, as
/// `health_check_user`, until `stop` is cancelled.
pub async fn check_in_background(
    health: Arc<Health>,
    config: impl Fn() -> Arc<Config>,
    users: impl Fn() -> Arc<Users>,
    tls: impl Fn() -> Arc<Tls>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let current = config();
        let period = current.health_check_period.0;
        let Some(user) = current
            .health_check_user
            .clone()
            .filter(|_| !period.is_zero())
        else {
            // Off for now; a reload may turn it on.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        };
        let startup = StartupMessage {
            minor_version: 0,
            parameters: vec![
                (Bytes::from_static(b"user"), Bytes::from(user.clone())),
                (
                    Bytes::from_static(b"database"),
                    Bytes::from(current.health_check_database.clone()),
                ),
                (
                    Bytes::from_static(b"application_name"),
                    Bytes::from_static(b"reprise health check"),
                ),
            ],
        };
        let credential = users().login(&user);
        let tls = tls();
        let checks = current.backends.iter().map(|backend| {
            let startup = &startup;
            let credential = credential.as_ref();
            let tls = &tls.server;
            let current = &current;
            let health = &health;
            async move {
                let role = probe(backend, startup, credential, tls, current).await;
                if let Err(problem) = &role {
                    tracing::debug!(backend = %backend.name, %problem, "health check failed");
                }
                health.record(&backend.name, role);
            }
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = futures_util::future::join_all(checks) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writable(system: &str, timeline: u32) -> Role {
        Role {
            writable: true,
            system: system.to_owned(),
            timeline: Some(timeline),
        }
    }

    fn backend(name: &str) -> Backend {
        Backend {
            name: name.to_owned(),
            host: "127.0.0.1".to_owned(),
            port: 5432,
        }
    }

    #[test]
    fn an_old_primary_is_refused_once_a_newer_timeline_was_seen() {
        let health = Health::default();
        health.record("new", Ok(writable("7", 2)));
        let old = writable("7", 1);
        health.record("old", Ok(old.clone()));
        assert_eq!(
            health.refusal("old", &old, &[("new".to_owned(), Some(writable("7", 2)))]),
            Some(Refusal::OldTimeline {
                timeline: 1,
                newest: 2
            })
        );
        // The promoted one is not in a split brain with the old primary.
        assert_eq!(
            health.refusal("new", &writable("7", 2), &[("old".to_owned(), Some(old))]),
            None
        );
    }

    #[test]
    fn two_writable_servers_on_one_timeline_or_two_systems_are_a_split_brain() {
        let health = Health::default();
        let split =
            |other: Role| health.refusal("a", &writable("7", 2), &[("b".to_owned(), Some(other))]);
        let expected = Some(Refusal::SplitBrain {
            other: "b".to_owned(),
        });
        assert_eq!(split(writable("7", 2)), expected);
        assert_eq!(split(writable("8", 1)), expected);
        let standby = Role {
            writable: false,
            system: "7".to_owned(),
            timeline: None,
        };
        assert_eq!(split(standby), None);
        assert_eq!(
            health.refusal("a", &writable("7", 2), &[("b".to_owned(), None)]),
            None
        );
    }

    #[test]
    fn the_backend_last_seen_writable_is_tried_first() {
        let health = Health::default();
        let backends = [backend("a"), backend("b"), backend("c")];
        health.record("a", Err("refused".to_owned()));
        health.record(
            "c",
            Ok(Role {
                writable: false,
                system: "7".to_owned(),
                timeline: None,
            }),
        );
        let order = |health: &Health| {
            health
                .preferred(&backends)
                .into_iter()
                .map(|backend| backend.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&health), ["b", "a", "c"]);
        health.record("c", Ok(writable("7", 3)));
        assert_eq!(order(&health), ["c", "b", "a"]);
        assert!(health.fresh_role("c", Duration::from_secs(5)).is_some());
        assert!(health.fresh_role("b", Duration::from_secs(5)).is_none());
    }
}
