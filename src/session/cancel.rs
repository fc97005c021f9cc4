//! Cancel keys: the BackendKeyData a client holds, mapped to whatever
//! server connection its session uses now.
//!
//! A client keeps the key of its first server connection for its whole life
//! (clients compare the process id with pg_backend_pid() and with the pid
//! in notifications). The key the server knows may change later (a new
//! server connection after a failover), so a CancelRequest is never
//! forwarded as is: it is looked up here and re-issued with the key of the
//! session's current server connection.

use std::sync::{Arc, Mutex};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::config::Backend;

/// A (process id, secret key) pair as the client knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub process_id: i32,
    pub secret_key: i32,
}

/// Where a cancel for a session must go right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    pub backend: Backend,
    pub process_id: i32,
    pub secret_key: i32,
}

#[derive(Debug, Default)]
pub struct CancelRegistry {
    sessions: DashMap<ClientKey, Arc<Mutex<CancelTarget>>>,
}

impl CancelRegistry {
    /// Registers a session under the key of its first server connection,
    /// or under a fresh key when that one is taken by a live session (two
    /// servers can hand out the same pid and, rarely, the same secret).
    pub fn register(self: &Arc<Self>, wanted: ClientKey, target: CancelTarget) -> CancelHandle {
        let target = Arc::new(Mutex::new(target));
        let mut key = wanted;
        loop {
            match self.sessions.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(Arc::clone(&target));
                    return CancelHandle {
                        registry: Arc::clone(self),
                        key,
                        target,
                    };
                }
                Entry::Occupied(_) => {
                    // Keep the pid the client will see in pg_backend_pid()
                    // when only the secret needs to change.
                    key = if key.process_id == wanted.process_id
                        && key.secret_key == wanted.secret_key
                    {
                        ClientKey {
                            process_id: wanted.process_id,
                            secret_key: rand::random(),
                        }
                    } else {
                        ClientKey {
                            process_id: rand::random::<i32>().abs().max(1),
                            secret_key: rand::random(),
                        }
                    };
                }
            }
        }
    }

    /// The current target for a key, if a live session holds it.
    pub fn lookup(&self, key: ClientKey) -> Option<CancelTarget> {
        let target = self.sessions.get(&key)?;
        let current = target.lock().map(|target| target.clone()).ok();
        current
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// A session's registration; dropping it forgets the key.
#[derive(Debug)]
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    key: ClientKey,
    target: Arc<Mutex<CancelTarget>>,
}

impl CancelHandle {
    /// The key the client receives in BackendKeyData.
    pub fn key(&self) -> ClientKey {
        self.key
    }

    /// Points the key at a new server connection.
    pub fn retarget(&self, target: CancelTarget) {
        if let Ok(mut current) = self.target.lock() {
            *current = target;
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.sessions.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(process_id: i32) -> CancelTarget {
        CancelTarget {
            backend: Backend {
                name: "b".to_owned(),
                host: "h".to_owned(),
                port: 1,
            },
            process_id,
            secret_key: 5,
        }
    }

    #[test]
    fn collisions_get_a_fresh_key_and_drop_forgets() {
        let registry = Arc::new(CancelRegistry::default());
        let wanted = ClientKey {
            process_id: 100,
            secret_key: 5,
        };
        let first = registry.register(wanted, target(100));
        let second = registry.register(wanted, target(200));
        assert_eq!(first.key(), wanted);
        assert_ne!(second.key(), wanted);
        assert_eq!(
            second.key().process_id,
            100,
            "the pid stays when only the secret must change"
        );
        assert_eq!(
            registry.lookup(second.key()).map(|t| t.process_id),
            Some(200)
        );
        second.retarget(target(300));
        assert_eq!(
            registry.lookup(second.key()).map(|t| t.process_id),
            Some(300)
        );
        drop(first);
        assert!(registry.lookup(wanted).is_none());
        assert_eq!(registry.len(), 1);
    }
}
