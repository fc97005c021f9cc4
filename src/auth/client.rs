//! The server side of client authentication: Reprise checks the client
//! itself, so that it can later open server connections on the client's
//! behalf without asking again.
//!
//! Every refusal of a proof says the same thing, `password authentication
//! failed for user "…"` (28P01), whether the user exists or not; an
//! unknown user goes through an exchange of the same shape and cost, with
//! a salt derived from a per-process secret so that asking twice shows the
//! same salt.

use std::sync::{Arc, OnceLock};

use bytes::{Buf, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::hba::AuthMethod;
use super::scram::{self, Binding, ServerExchange, Verifier};
use super::Credential;
use crate::users::{Entry, Md5Hash, Password, Secret};
use crate::wire::frame;
use crate::wire::reply::sqlstate;

/// PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH.
const MAX_AUTH_MESSAGE: usize = 65535;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Protocol(String),
    /// The secret could not be looked up (`auth_query`).
    #[error("{0}")]
    Unavailable(String),
    #[error("client went away during authentication")]
    Closed,
    #[error("client connection failed during authentication: {0}")]
    Io(std::io::Error),
}

impl AuthError {
    pub fn sqlstate(&self) -> Option<&'static str> {
        match self {
            AuthError::Failed(_) => Some(sqlstate::INVALID_PASSWORD),
            AuthError::Rejected(_) => Some(sqlstate::INVALID_AUTHORIZATION),
            AuthError::Protocol(_) => Some(sqlstate::PROTOCOL_VIOLATION),
            AuthError::Unavailable(_) => Some(sqlstate::CLIENT_CANNOT_CONNECT),
            AuthError::Closed | AuthError::Io(_) => None,
        }
    }
}

impl From<std::io::Error> for AuthError {
    fn from(err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::UnexpectedEof {
            AuthError::Closed
        } else {
            AuthError::Io(err)
        }
    }
}

/// Asks `client` to prove it is `user` by `method`. Returns what the
/// proof taught about the user's secret (the password itself, or a SCRAM
/// client key), none for `trust`. Sends nothing on success: the session
/// says AuthenticationOk once its server connection is ready.
///
/// Under `md5` a user with a SCRAM verifier is asked for SCRAM, so an
/// unknown user must look like the users one is most likely to guess:
/// `unknown_as_scram` says whether that is a verifier user (PostgreSQL
/// decides the same by password_encryption).
pub async fn authenticate<S>(
    client: &mut S,
    method: AuthMethod,
    user: &str,
    entry: Option<Arc<Entry>>,
    binding: Binding,
    unknown_as_scram: bool,
) -> Result<Option<Credential>, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let secret = entry.as_deref().map(|entry| &entry.secret);
    match method {
        AuthMethod::Trust => Ok(None),
        AuthMethod::Reject => Err(AuthError::Rejected(format!(
            "connection for user \"{user}\" is rejected by an hba rule"
        ))),
        AuthMethod::Password => password(client, user, secret).await.map(Some),
        // As PostgreSQL: md5 for a user whose secret is a SCRAM verifier
        // means SCRAM.
        AuthMethod::Md5
            if !matches!(secret, Some(Secret::Scram(_)))
                && (secret.is_some() || !unknown_as_scram) =>
        {
            md5(client, user, secret).await.map(Some)
        }
        AuthMethod::Md5 | AuthMethod::ScramSha256 => {
            scram_sha_256(client, user, entry.as_deref(), binding)
                .await
                .map(Some)
        }
    }
}

async fn password<S>(
    client: &mut S,
    user: &str,
    secret: Option<&Secret>,
) -> Result<Credential, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_request(client, 3, &[]).await?;
    let body = read_response(client, "password").await?;
    let given = cstring(&body, "password message")?;
    let given = std::str::from_utf8(given)
        .map_err(|_| AuthError::Protocol("password is not valid UTF-8".to_owned()))?;
    let proven = match secret {
        Some(Secret::Password(password)) => {
            bool::from(password.expose().as_bytes().ct_eq(given.as_bytes()))
        }
        Some(Secret::Md5(hash)) => {
            let probe = Md5Hash::of_password(user, given);
            bool::from(
                probe
                    .salted([0; 4])
                    .as_bytes()
                    .ct_eq(hash.salted([0; 4]).as_bytes()),
            )
        }
        Some(Secret::Scram(verifier)) => verifier.matches_password(given),
        None => {
            // The same work as a user with a verifier, and a refusal.
            let _ = fake_verifier(user).matches_password(given);
            false
        }
    };
    if !proven {
        return Err(AuthError::Failed(user.to_owned()));
    }
    Ok(Credential::Password(Password::new(given)))
}

async fn md5<S>(
    client: &mut S,
    user: &str,
    secret: Option<&Secret>,
) -> Result<Credential, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let salt: [u8; 4] = rand::random();
    send_request(client, 5, &salt).await?;
    let body = read_response(client, "password").await?;
    let given = cstring(&body, "password message")?;
    let (hash, credential) = match secret {
        Some(Secret::Password(password)) => (
            Md5Hash::of_password(user, password.expose()),
            Some(Credential::Password(password.clone())),
        ),
        Some(Secret::Md5(hash)) => (hash.clone(), Some(Credential::Md5(hash.clone()))),
        // Unknown (and, never reached, SCRAM): a hash nobody can match.
        _ => (
            Md5Hash::of_password(user, &base64_key(&fake_key(user, b"md5"))),
            None,
        ),
    };
    let expected = hash.salted(salt);
    let proven = bool::from(expected.as_bytes().ct_eq(given));
    match credential {
        Some(credential) if proven => Ok(credential),
        _ => Err(AuthError::Failed(user.to_owned())),
    }
}

async fn scram_sha_256<S>(
    client: &mut S,
    user: &str,
    entry: Option<&Entry>,
    binding: Binding,
) -> Result<Credential, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let known = entry.and_then(|entry| entry.verifier().map(|verifier| (entry, verifier)));
    let verifier = match known {
        Some((_, verifier)) => verifier.clone(),
        // Unknown, or only an MD5 hash: PostgreSQL too goes through a
        // mock exchange and refuses at the proof.
        None => fake_verifier(user),
    };
    let mut mechanisms = Vec::new();
    for mechanism in ServerExchange::mechanisms(&binding) {
        mechanisms.extend_from_slice(mechanism.as_bytes());
        mechanisms.push(0);
    }
    mechanisms.push(0);
    let mut exchange = ServerExchange::new(verifier, binding, known.is_none());
    send_request(client, 10, &mechanisms).await?;

    let body = read_response(client, "SASL").await?;
    let mechanism = cstring(&body, "SASLInitialResponse")?;
    let mut rest = &body[mechanism.len() + 1..];
    if rest.len() < 4 {
        return Err(AuthError::Protocol(
            "malformed SASLInitialResponse: no data length".to_owned(),
        ));
    }
    let declared = rest.get_i32();
    if usize::try_from(declared).ok() != Some(rest.len()) {
        return Err(AuthError::Protocol(format!(
            "malformed SASLInitialResponse: data length {declared} but {} bytes follow",
            rest.len()
        )));
    }
    let mechanism = std::str::from_utf8(mechanism).unwrap_or("?");
    let server_first = exchange
        .client_first(mechanism, rest)
        .map_err(|err| scram_failure(err, user))?;
    send_request(client, 11, server_first.as_bytes()).await?;

    let body = read_response(client, "SASL").await?;
    let done = exchange
        .client_final(&body)
        .map_err(|err| scram_failure(err, user))?;
    send_request(client, 12, done.message.as_bytes()).await?;
    let (entry, verifier) = known.expect("a doomed exchange never gets here");
    Ok(match &entry.secret {
        // A known password serves any server method; a key only SCRAM
        // against the same verifier.
        Secret::Password(password) => Credential::Password(password.clone()),
        _ => Credential::ScramKey {
            key: done.client_key,
            verifier: verifier.clone(),
        },
    })
}

fn scram_failure(err: scram::ScramError, user: &str) -> AuthError {
    if err.is_wrong_proof() {
        AuthError::Failed(user.to_owned())
    } else {
        AuthError::Protocol(format!("malformed SCRAM message: {err}"))
    }
}

/// Writes an Authentication request of `kind` with `data`.
async fn send_request<S: AsyncWrite + Unpin>(
    client: &mut S,
    kind: i32,
    data: &[u8],
) -> Result<(), AuthError> {
    let mut out = BytesMut::new();
    frame::write_frame(&mut out, Some(b'R'), |out| {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(data);
    });
    client.write_all(&out).await?;
    client.flush().await?;
    Ok(())
}

/// Reads one 'p' message's body exactly, so that nothing after it is
/// taken from the stream.
async fn read_response<S: AsyncRead + Unpin>(
    client: &mut S,
    what: &str,
) -> Result<Vec<u8>, AuthError> {
    let mut header = [0u8; 5];
    client.read_exact(&mut header).await?;
    let tag = header[0];
    if tag == b'X' {
        return Err(AuthError::Closed);
    }
    if tag != b'p' {
        return Err(AuthError::Protocol(format!(
            "expected {what} response, got message type {:?}",
            char::from(tag)
        )));
    }
    let declared = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let body_len = usize::try_from(declared)
        .ok()
        .and_then(|len| len.checked_sub(4))
        .ok_or_else(|| AuthError::Protocol(format!("invalid message length {declared}")))?;
    if body_len > MAX_AUTH_MESSAGE {
        return Err(AuthError::Protocol(format!(
            "{what} response too long ({body_len} bytes, at most {MAX_AUTH_MESSAGE})"
        )));
    }
    let mut body = vec![0u8; body_len];
    client.read_exact(&mut body).await?;
    Ok(body)
}

/// The NUL-terminated string at the start of `body`.
fn cstring<'a>(body: &'a [u8], what: &str) -> Result<&'a [u8], AuthError> {
    let end = memchr::memchr(0, body)
        .ok_or_else(|| AuthError::Protocol(format!("malformed {what}: missing terminator")))?;
    Ok(&body[..end])
}

/// A secret made once per process; fake salts are derived from it, so they
/// are stable for a user yet reveal nothing.
fn process_secret() -> &'static [u8; 32] {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    SECRET.get_or_init(rand::random)
}

fn fake_key(user: &str, purpose: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(process_secret())
        .expect("HMAC takes any key length");
    mac.update(purpose);
    mac.update(&[0]);
    mac.update(user.as_bytes());
    mac.finalize().into_bytes().into()
}

fn base64_key(key: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A verifier for a user who has none: salt and keys derived from the
/// process secret, the default iteration count.
fn fake_verifier(user: &str) -> Verifier {
    let salt = fake_key(user, b"salt");
    Verifier {
        iterations: scram::DEFAULT_ITERATIONS,
        salt: salt[..16].to_vec(),
        stored_key: fake_key(user, b"stored"),
        server_key: fake_key(user, b"server"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{ClientExchange, ScramSecret};

    async fn read(client: &mut tokio::io::DuplexStream) -> Option<Vec<u8>> {
        let mut header = [0u8; 5];
        client.read_exact(&mut header).await.ok()?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let mut body = vec![0u8; len as usize - 4];
        client.read_exact(&mut body).await.ok()?;
        Some(body)
    }

    /// Runs `authenticate` against a scripted client on an in-memory pipe.
    async fn run_scram(
        entry: Option<Arc<Entry>>,
        password: &str,
    ) -> Result<Option<Credential>, AuthError> {
        let (mut server, mut client) = tokio::io::duplex(64 * 1024);
        let password = password.to_owned();
        let client_task = tokio::spawn(async move {
            let (mut exchange, mechanism, first) =
                ClientExchange::start(ScramSecret::Password(password), Binding::Unsupported);
            let _mechanisms = read(&mut client).await?;
            let mut out = BytesMut::new();
            frame::write_frame(&mut out, Some(b'p'), |out| {
                out.extend_from_slice(mechanism.as_bytes());
                out.extend_from_slice(&[0]);
                out.extend_from_slice(&(first.len() as i32).to_be_bytes());
                out.extend_from_slice(first.as_bytes());
            });
            client.write_all(&out).await.ok()?;
            let server_first = read(&mut client).await?;
            let last = exchange.server_first(&server_first[4..]).ok()?;
            let mut out = BytesMut::new();
            frame::write_frame(&mut out, Some(b'p'), |out| {
                out.extend_from_slice(last.as_bytes())
            });
            client.write_all(&out).await.ok()?;
            let server_final = read(&mut client).await?;
            exchange.server_final(&server_final[4..]).ok()
        });
        let result = authenticate(
            &mut server,
            AuthMethod::ScramSha256,
            "alice",
            entry,
            Binding::Unsupported,
            false,
        )
        .await;
        drop(server);
        let _ = client_task.await;
        result
    }

    /// The kind of the first Authentication request `method` sends for an
    /// unknown user.
    async fn first_request(method: AuthMethod, unknown_as_scram: bool) -> i32 {
        let (mut server, mut client) = tokio::io::duplex(64 * 1024);
        let asking = tokio::spawn(async move {
            authenticate(
                &mut server,
                method,
                "ghost",
                None,
                Binding::Unsupported,
                unknown_as_scram,
            )
            .await
        });
        let request = read(&mut client).await.expect("a request");
        drop(client);
        let _ = asking.await;
        i32::from_be_bytes([request[0], request[1], request[2], request[3]])
    }

    #[tokio::test]
    async fn an_unknown_user_under_md5_looks_like_the_likely_user() {
        assert_eq!(first_request(AuthMethod::Md5, false).await, 5);
        assert_eq!(first_request(AuthMethod::Md5, true).await, 10);
        assert_eq!(first_request(AuthMethod::ScramSha256, false).await, 10);
        assert_eq!(first_request(AuthMethod::Password, false).await, 3);
    }

    fn verifier_entry(password: &str) -> Arc<Entry> {
        Arc::new(Entry::new(Secret::Scram(Verifier::from_password(
            password,
            b"0123456789abcdef",
            4096,
        ))))
    }

    #[tokio::test]
    async fn scram_recovers_the_client_key() {
        match run_scram(Some(verifier_entry("pw")), "pw").await {
            Ok(Some(Credential::ScramKey { verifier, .. })) => {
                assert!(verifier.matches_password("pw"))
            }
            other => panic!("expected a client key, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn wrong_password_and_unknown_user_are_refused_alike() {
        let wrong = run_scram(Some(verifier_entry("pw")), "nope")
            .await
            .expect_err("wrong");
        let unknown = run_scram(None, "pw").await.expect_err("unknown");
        assert_eq!(wrong.to_string(), unknown.to_string());
        assert_eq!(wrong.sqlstate(), Some(sqlstate::INVALID_PASSWORD));
        assert_eq!(fake_verifier("bob").salt, fake_verifier("bob").salt);
        assert_ne!(fake_verifier("bob").salt, fake_verifier("carol").salt);
    }
}
