//! Client authentication, and the credentials Reprise logs in to servers
//! with on the client's behalf.

pub mod client;
pub mod hba;
pub mod lookup;
pub mod scram;

use crate::config::Config;
use crate::users::{Md5Hash, Password, Secret, Users};
use hba::AuthMethod;

/// What Reprise logs in to a server with as one user, kept by the session
/// for every new server connection. Never logged: each part redacts
/// itself in debug output.
#[derive(Clone, Debug)]
pub enum Credential {
    /// Serves every server method.
    Password(Password),
    /// Serves a server that asks for MD5 and holds the same hash.
    Md5(Md5Hash),
    /// A client key recovered from the client's SCRAM proof: serves a
    /// server that asks for SCRAM with this verifier's salt and iteration
    /// count.
    ScramKey {
        key: scram::ClientKey,
        verifier: scram::Verifier,
    },
}

impl Credential {
    /// The credential a users-file secret gives by itself; a verifier
    /// alone logs in nowhere.
    pub fn from_secret(secret: &Secret) -> Option<Credential> {
        match secret {
            Secret::Password(password) => Some(Credential::Password(password.clone())),
            Secret::Md5(hash) => Some(Credential::Md5(hash.clone())),
            Secret::Scram(_) => None,
        }
    }
}

/// Refuses a configuration under which Reprise could not open a new
/// server connection for a user after a failure: a user whose only secret
/// is a SCRAM verifier yields a client key only when the client proves
/// itself by SCRAM (or its password, by `password`), so `trust` leaves
/// nothing to log in with. The same holds for users `auth_query` looks
/// up. Users in `failover_exempt_users` (or `"all"`) are let through.
pub fn check_reconnection(config: &Config, users: &Users) -> Result<(), String> {
    let exempt = |user: &str| {
        config
            .failover_exempt_users
            .iter()
            .any(|name| name == "all" || name == user)
    };
    let keyless = |user: &str| {
        hba::methods_for(&config.hba, config.auth_type, user).contains(&AuthMethod::Trust)
    };
    let mut names: Vec<&str> = users
        .names()
        .filter(|user| matches!(users.secret(user), Some(Secret::Scram(_))))
        .collect();
    names.sort_unstable();
    for user in names {
        if keyless(user) && !exempt(user) {
            return Err(format!(
                "user \"{user}\" has only a SCRAM verifier in the users file, and clients may log in as it with trust: Reprise would have nothing to open a new server connection with after a failure. Use scram-sha-256 (or md5) for that user, give its password instead, or list it in failover_exempt_users"
            ));
        }
    }
    // A user that only auth_query knows: any rule for "all" users applies.
    let lookup_user = "\0any user auth_query finds";
    if config.auth_user.is_some() && keyless(lookup_user) && !exempt(lookup_user) {
        return Err("auth_query yields verifiers, and clients may log in with trust: Reprise would have nothing to open a new server connection with after a failure. Use scram-sha-256 (or md5), or set failover_exempt_users = [\"all\"]".to_owned());
    }
    Ok(())
}
