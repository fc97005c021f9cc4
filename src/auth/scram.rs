//! SCRAM-SHA-256 (RFC 5802, RFC 7677) on both sides of Reprise.
//!
//! Towards clients Reprise is the SCRAM server; towards PostgreSQL it is
//! the client. Both are written here rather than taken from pgwire or
//! postgres-protocol because Reprise needs what those keep private: the
//! client key a successful client proof reveals (`ClientKey = ClientProof
//! XOR HMAC(StoredKey, AuthMessage)`). With it, and the server key of the
//! same verifier, Reprise can log in to a server that holds that verifier
//! as often as failover needs, without ever knowing the password.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel-binding type PostgreSQL implements.
pub const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 18;

pub type Key = [u8; KEY_LEN];

/// A SCRAM exchange that cannot go on; the text says why, without any
/// secret in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScramError(pub String);

/// What [`ServerExchange::client_final`] says when the proof is wrong (or
/// the user unknown), as opposed to a malformed exchange.
pub const WRONG_PROOF: &str = "password authentication failed";

impl ScramError {
    pub fn is_wrong_proof(&self) -> bool {
        self.0 == WRONG_PROOF
    }
}

fn fail<T>(problem: impl Into<String>) -> Result<T, ScramError> {
    Err(ScramError(problem.into()))
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

fn xor(a: &Key, b: &Key) -> Key {
    let mut out = [0u8; KEY_LEN];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = a[index] ^ b[index];
    }
    out
}

/// `Hi(Normalize(password), salt, i)`. SASLprep as PostgreSQL applies it:
/// a password it cannot prepare is used as it is.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> Key {
    let prepared = stringprep::saslprep(password);
    let bytes = match &prepared {
        Ok(text) => text.as_bytes(),
        Err(_) => password.as_bytes(),
    };
    let mut out = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(bytes, salt, iterations, &mut out);
    out
}

/// A client key: as good as the password towards any server that holds
/// the same verifier. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey(pub Key);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(***)")
    }
}

/// What a SCRAM server stores for a user (pg_authid's
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`).
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Verifier(***)")
    }
}

impl Verifier {
    /// The verifier PostgreSQL would store for `password` with this salt.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = salted_password(password, salt, iterations);
        Verifier::from_salted(&salted, salt, iterations)
    }

    fn from_salted(salted: &Key, salt: &[u8], iterations: u32) -> Verifier {
        let client_key = hmac(salted, &[b"Client Key"]);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(salted, &[b"Server Key"]),
        }
    }

    /// Parses pg_authid's text form; the error says what is wrong, never
    /// echoing the value.
    pub fn parse(text: &str) -> Result<Verifier, ScramError> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or_else(|| ScramError("not a SCRAM-SHA-256 verifier".to_owned()))?;
        let (params, keys) = rest.split_once('$').ok_or_else(|| {
            ScramError("expected <iterations>:<salt>$<StoredKey>:<ServerKey>".to_owned())
        })?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or_else(|| ScramError("expected <iterations>:<salt>".to_owned()))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|count| *count > 0)
            .ok_or_else(|| ScramError("iteration count is not a positive number".to_owned()))?;
        let salt = BASE64
            .decode(salt)
            .map_err(|_| ScramError("salt is not base64".to_owned()))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or_else(|| ScramError("expected <StoredKey>:<ServerKey>".to_owned()))?;
        let key = |text: &str, name: &str| -> Result<Key, ScramError> {
            BASE64
                .decode(text)
                .ok()
                .and_then(|bytes| Key::try_from(bytes.as_slice()).ok())
                .ok_or_else(|| ScramError(format!("{name} is not 32 bytes of base64")))
        };
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key(stored, "StoredKey")?,
            server_key: key(server, "ServerKey")?,
        })
    }

    /// Whether `password` is the one this verifier was made from.
    pub fn matches_password(&self, password: &str) -> bool {
        let candidate = Verifier::from_password(password, &self.salt, self.iterations);
        bool::from(candidate.stored_key.ct_eq(&self.stored_key))
    }

    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

/// What Reprise can log in to a server with by SCRAM: a password (any
/// salt will do), or a client key with the verifier it belongs to (only a
/// server that holds that same verifier will do).
#[derive(Clone, Debug)]
pub enum ScramSecret {
    Password(String),
    ClientKey { key: ClientKey, verifier: Verifier },
}

/// Channel binding of one side of an exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// No TLS: neither side can bind.
    Unsupported,
    /// TLS, but this side does not use binding ("y" flag for a client).
    NotUsed,
    /// tls-server-end-point: the hash of the server's certificate.
    EndPoint(Vec<u8>),
}

fn nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    BASE64.encode(bytes)
}

/// Splits `k=value` attributes; SCRAM values never contain a comma.
fn attribute(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    let part = part.ok_or_else(|| ScramError(format!("missing attribute '{name}'")))?;
    let mut chars = part.chars();
    if chars.next() != Some(name) || chars.next() != Some('=') {
        return fail(format!(
            "expected attribute '{name}', got {:?}",
            truncate(part)
        ));
    }
    Ok(&part[2..])
}

fn truncate(text: &str) -> String {
    text.chars().take(20).collect()
}

fn printable(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// The server side, as PostgreSQL's auth-scram.c: one exchange per
/// connection attempt.
#[derive(Debug)]
pub struct ServerExchange {
    verifier: Verifier,
    /// An unknown user: go through the motions, then refuse.
    doomed: bool,
    binding: Binding,
    state: ServerState,
}

#[derive(Debug)]
enum ServerState {
    Initial,
    SentFirst {
        client_first_bare: String,
        server_first: String,
        nonce: String,
        /// The gs2 header the client sent, which `c=` must repeat.
        gs2_header: String,
        bound: bool,
    },
    Done,
}

/// A finished server exchange: what to send, and the client key the proof
/// revealed.
#[derive(Debug)]
pub struct ServerFinal {
    pub message: String,
    pub client_key: ClientKey,
}

impl ServerExchange {
    /// `binding` is `EndPoint(hash of Reprise's certificate)` over TLS,
    /// else `Unsupported`. `doomed` exchanges fail at the proof.
    pub fn new(verifier: Verifier, binding: Binding, doomed: bool) -> Self {
        ServerExchange {
            verifier,
            doomed,
            binding,
            state: ServerState::Initial,
        }
    }

    /// Mechanisms to offer, strongest first.
    pub fn mechanisms(binding: &Binding) -> &'static [&'static str] {
        match binding {
            Binding::EndPoint(_) => &[MECHANISM_PLUS, MECHANISM],
            _ => &[MECHANISM],
        }
    }

    /// Takes the client-first-message, answers with server-first-message.
    pub fn client_first(&mut self, mechanism: &str, message: &[u8]) -> Result<String, ScramError> {
        self.client_first_with_nonce(mechanism, message, &nonce())
    }

    fn client_first_with_nonce(
        &mut self,
        mechanism: &str,
        message: &[u8],
        server_nonce: &str,
    ) -> Result<String, ScramError> {
        if !matches!(self.state, ServerState::Initial) {
            return fail("client-first-message out of order");
        }
        let plus = match mechanism {
            MECHANISM => false,
            MECHANISM_PLUS if matches!(self.binding, Binding::EndPoint(_)) => true,
            MECHANISM_PLUS => return fail("SCRAM-SHA-256-PLUS needs an SSL connection"),
            other => {
                return fail(format!(
                    "client selected an invalid SASL authentication mechanism {:?}",
                    truncate(other)
                ))
            }
        };
        let message = std::str::from_utf8(message)
            .map_err(|_| ScramError("client-first-message is not UTF-8".to_owned()))?;
        let mut parts = message.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let bound = match flag {
            "n" if plus => {
                return fail("client selected SCRAM-SHA-256-PLUS but did not send channel binding")
            }
            "n" => false,
            // The client could bind but believes we cannot: over TLS we
            // offered PLUS, so someone stripped it (RFC 5802 §6).
            "y" if matches!(self.binding, Binding::EndPoint(_)) => {
                return fail("client believes the server does not support channel binding, but it does (possible downgrade)")
            }
            "y" => false,
            _ if flag.starts_with("p=") => {
                if !plus {
                    return fail("client requested channel binding but did not select SCRAM-SHA-256-PLUS");
                }
                if &flag[2..] != CHANNEL_BINDING_TYPE {
                    return fail(format!(
                        "unsupported channel binding type {:?}",
                        truncate(&flag[2..])
                    ));
                }
                true
            }
            _ => return fail("malformed gs2 header in client-first-message"),
        };
        let authzid = parts
            .next()
            .ok_or_else(|| ScramError("client-first-message is truncated".to_owned()))?;
        if !authzid.is_empty() {
            return fail("client uses an authorization identity, which is not supported");
        }
        let bare = parts
            .next()
            .ok_or_else(|| ScramError("client-first-message is truncated".to_owned()))?;
        if bare.starts_with("m=") {
            return fail("client requires an unsupported SCRAM extension");
        }
        let mut fields = bare.split(',');
        // PostgreSQL takes the user from the startup packet; libpq sends
        // "n=" here.
        attribute(fields.next(), 'n')?;
        let client_nonce = attribute(fields.next(), 'r')?;
        if !printable(client_nonce) {
            return fail("client nonce is empty or not printable");
        }
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        let gs2_header = format!("{flag},,");
        self.state = ServerState::SentFirst {
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
            gs2_header,
            bound,
        };
        Ok(server_first)
    }

    /// Takes the client-final-message, checks the binding, nonce and
    /// proof, and answers with server-final-message.
    pub fn client_final(&mut self, message: &[u8]) -> Result<ServerFinal, ScramError> {
        let ServerState::SentFirst {
            client_first_bare,
            server_first,
            nonce,
            gs2_header,
            bound,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return fail("client-final-message out of order");
        };
        let message = std::str::from_utf8(message)
            .map_err(|_| ScramError("client-final-message is not UTF-8".to_owned()))?;
        let (without_proof, proof) = message
            .rsplit_once(",p=")
            .ok_or_else(|| ScramError("client-final-message has no proof".to_owned()))?;
        let mut fields = without_proof.split(',');
        let channel = BASE64
            .decode(attribute(fields.next(), 'c')?)
            .map_err(|_| ScramError("channel binding data is not base64".to_owned()))?;
        let mut expected = gs2_header.into_bytes();
        if bound {
            if let Binding::EndPoint(hash) = &self.binding {
                expected.extend_from_slice(hash);
            }
        }
        if !bool::from(channel.ct_eq(&expected)) {
            return fail("SCRAM channel binding check failed");
        }
        if attribute(fields.next(), 'r')? != nonce {
            return fail("SCRAM nonce does not match");
        }
        let proof: Key = BASE64
            .decode(proof)
            .ok()
            .and_then(|bytes| Key::try_from(bytes.as_slice()).ok())
            .ok_or_else(|| ScramError("client proof is not 32 bytes of base64".to_owned()))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &signature);
        let proven = sha256(&client_key).ct_eq(&self.verifier.stored_key);
        if !bool::from(proven) || self.doomed {
            return fail(WRONG_PROOF);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(ServerFinal {
            message: format!("v={}", BASE64.encode(server_signature)),
            client_key: ClientKey(client_key),
        })
    }
}

/// The client side, towards PostgreSQL.
#[derive(Debug)]
pub struct ClientExchange {
    secret: ScramSecret,
    binding: Binding,
    client_first_bare: String,
    state: ClientState,
}

#[derive(Debug)]
enum ClientState {
    SentFirst,
    SentFinal {
        server_key: Key,
        auth_message: String,
    },
    Done,
}

impl ClientExchange {
    /// Starts an exchange: the mechanism to select and the
    /// client-first-message. `binding` is `EndPoint(hash)` only when the
    /// server offered PLUS over TLS, `NotUsed` over TLS without it.
    pub fn start(secret: ScramSecret, binding: Binding) -> (Self, &'static str, String) {
        let client_first_bare = format!("n=,r={}", nonce());
        let (mechanism, header) = match &binding {
            Binding::EndPoint(_) => (MECHANISM_PLUS, format!("p={CHANNEL_BINDING_TYPE},,")),
            Binding::NotUsed => (MECHANISM, "y,,".to_owned()),
            Binding::Unsupported => (MECHANISM, "n,,".to_owned()),
        };
        let first = format!("{header}{client_first_bare}");
        let exchange = ClientExchange {
            secret,
            binding,
            client_first_bare,
            state: ClientState::SentFirst,
        };
        (exchange, mechanism, first)
    }

    fn gs2_header(&self) -> Vec<u8> {
        match &self.binding {
            Binding::EndPoint(hash) => {
                let mut header = format!("p={CHANNEL_BINDING_TYPE},,").into_bytes();
                header.extend_from_slice(hash);
                header
            }
            Binding::NotUsed => b"y,,".to_vec(),
            Binding::Unsupported => b"n,,".to_vec(),
        }
    }

    /// Takes server-first-message, answers with client-final-message.
    pub fn server_first(&mut self, message: &[u8]) -> Result<String, ScramError> {
        if !matches!(self.state, ClientState::SentFirst) {
            return fail("server-first-message out of order");
        }
        let message = std::str::from_utf8(message)
            .map_err(|_| ScramError("server-first-message is not UTF-8".to_owned()))?;
        let mut fields = message.split(',');
        let nonce = attribute(fields.next(), 'r')?;
        let my_nonce = self.client_first_bare.trim_start_matches("n=,r=");
        if !nonce.starts_with(my_nonce) || nonce.len() == my_nonce.len() {
            return fail("server nonce does not extend the client's");
        }
        let salt = BASE64
            .decode(attribute(fields.next(), 's')?)
            .map_err(|_| ScramError("server salt is not base64".to_owned()))?;
        let iterations: u32 = attribute(fields.next(), 'i')?
            .parse()
            .ok()
            .filter(|count| *count > 0)
            .ok_or_else(|| {
                ScramError("server iteration count is not a positive number".to_owned())
            })?;
        let (client_key, stored_key, server_key) = match &self.secret {
            ScramSecret::Password(password) => {
                let salted = salted_password(password, &salt, iterations);
                let client_key = hmac(&salted, &[b"Client Key"]);
                (
                    client_key,
                    sha256(&client_key),
                    hmac(&salted, &[b"Server Key"]),
                )
            }
            ScramSecret::ClientKey { key, verifier } => {
                if verifier.salt != salt || verifier.iterations != iterations {
                    return fail("the server's SCRAM verifier for this user has another salt or iteration count than the one the client authenticated against (was the password changed?)");
                }
                (key.0, verifier.stored_key, verifier.server_key)
            }
        };
        let without_proof = format!("c={},r={nonce}", BASE64.encode(self.gs2_header()));
        let auth_message = format!("{},{message},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&client_key, &signature);
        self.state = ClientState::SentFinal {
            server_key,
            auth_message,
        };
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks server-final-message: the server proves it knows the
    /// verifier too.
    pub fn server_final(&mut self, message: &[u8]) -> Result<(), ScramError> {
        let ClientState::SentFinal {
            server_key,
            auth_message,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return fail("server-final-message out of order");
        };
        let message = std::str::from_utf8(message)
            .map_err(|_| ScramError("server-final-message is not UTF-8".to_owned()))?;
        if let Some(error) = message.strip_prefix("e=") {
            return fail(format!("server refused: {}", truncate(error)));
        }
        let signature = BASE64
            .decode(attribute(Some(message), 'v')?)
            .map_err(|_| ScramError("server signature is not base64".to_owned()))?;
        let expected = hmac(&server_key, &[auth_message.as_bytes()]);
        if !bool::from(signature.as_slice().ct_eq(&expected)) {
            return fail(
                "server signature does not verify: the server does not know this user's verifier",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        Verifier::from_password("pencil", b"0123456789abcdef", 4096)
    }

    /// Runs a full exchange between our client and our server.
    fn exchange(
        secret: ScramSecret,
        server_binding: Binding,
        client_binding: Binding,
    ) -> Result<ClientKey, ScramError> {
        let mut server = ServerExchange::new(verifier(), server_binding, false);
        let (mut client, mechanism, first) = ClientExchange::start(secret, client_binding);
        let server_first = server.client_first(mechanism, first.as_bytes())?;
        let client_final = client.server_first(server_first.as_bytes())?;
        let done = server.client_final(client_final.as_bytes())?;
        client.server_final(done.message.as_bytes())?;
        Ok(done.client_key)
    }

    #[test]
    fn verifier_round_trips_and_hides() {
        let verifier = verifier();
        let parsed = Verifier::parse(&verifier.encode()).expect("parses");
        assert_eq!(parsed, verifier);
        assert!(verifier.matches_password("pencil"));
        assert!(!verifier.matches_password("pencil2"));
        assert_eq!(format!("{verifier:?}"), "Verifier(***)");
        for bad in [
            "md5abc",
            "SCRAM-SHA-256$x:c2FsdA==$a:b",
            "SCRAM-SHA-256$4096:c2FsdA==$YQ==:YQ==",
            "SCRAM-SHA-256$4096:c2FsdA==",
        ] {
            assert!(Verifier::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil".
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("b64");
        let verifier = Verifier::from_password("pencil", &salt, 4096);
        let mut server = ServerExchange::new(verifier, Binding::Unsupported, false);
        let first = server
            .client_first_with_nonce(
                MECHANISM,
                b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            )
            .expect("first");
        assert_eq!(
            first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let done = server
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .expect("proof verifies");
        assert_eq!(
            done.message,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn password_and_recovered_key_both_log_in() {
        let key = exchange(
            ScramSecret::Password("pencil".to_owned()),
            Binding::Unsupported,
            Binding::Unsupported,
        )
        .expect("password works");
        assert_eq!(sha256(&key.0), verifier().stored_key);
        let again = exchange(
            ScramSecret::ClientKey {
                key,
                verifier: verifier(),
            },
            Binding::Unsupported,
            Binding::Unsupported,
        );
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn wrong_password_and_other_salt_fail() {
        let wrong = exchange(
            ScramSecret::Password("crayon".to_owned()),
            Binding::Unsupported,
            Binding::Unsupported,
        );
        assert_eq!(
            wrong.expect_err("refused").0,
            "password authentication failed"
        );
        let other = Verifier::from_password("pencil", b"another salt", 4096);
        let key = ClientKey(hmac(
            &salted_password("pencil", b"another salt", 4096),
            &[b"Client Key"],
        ));
        let mismatch = exchange(
            ScramSecret::ClientKey {
                key,
                verifier: other,
            },
            Binding::Unsupported,
            Binding::Unsupported,
        );
        assert!(mismatch.expect_err("refused").0.contains("salt"));
    }

    #[test]
    fn channel_binding() {
        let hash = vec![7u8; 32];
        assert!(exchange(
            ScramSecret::Password("pencil".to_owned()),
            Binding::EndPoint(hash.clone()),
            Binding::EndPoint(hash.clone()),
        )
        .is_ok());
        let other = exchange(
            ScramSecret::Password("pencil".to_owned()),
            Binding::EndPoint(hash.clone()),
            Binding::EndPoint(vec![8u8; 32]),
        );
        assert!(other.expect_err("refused").0.contains("channel binding"));
        let downgrade = exchange(
            ScramSecret::Password("pencil".to_owned()),
            Binding::EndPoint(hash),
            Binding::NotUsed,
        );
        assert!(downgrade.expect_err("refused").0.contains("downgrade"));
        let no_tls = exchange(
            ScramSecret::Password("pencil".to_owned()),
            Binding::Unsupported,
            Binding::EndPoint(vec![1u8; 32]),
        );
        assert!(no_tls.expect_err("refused").0.contains("SSL"));
    }

    #[test]
    fn garbage_is_refused_precisely() {
        let mut server = ServerExchange::new(verifier(), Binding::Unsupported, false);
        assert!(server.client_first(MECHANISM, b"\xff\xfe").is_err());
        let mut server = ServerExchange::new(verifier(), Binding::Unsupported, false);
        assert!(server.client_first(MECHANISM, b"n,,").is_err());
        let mut server = ServerExchange::new(verifier(), Binding::Unsupported, false);
        assert!(server.client_first("DIGEST-MD5", b"n,,n=,r=abc").is_err());
        let mut server = ServerExchange::new(verifier(), Binding::Unsupported, false);
        server
            .client_first(MECHANISM, b"n,,n=,r=abc")
            .expect("first");
        let bad_nonce = server
            .client_final(format!("c=biws,r=abcXYZ,p={}", BASE64.encode([0u8; 32])).as_bytes())
            .expect_err("nonce");
        assert_eq!(bad_nonce.0, "SCRAM nonce does not match");
        let mut server = ServerExchange::new(verifier(), Binding::Unsupported, false);
        assert!(server.client_final(b"c=biws").is_err());
    }

    #[test]
    fn doomed_exchange_fails_like_a_wrong_password() {
        let mut server = ServerExchange::new(verifier(), Binding::Unsupported, true);
        let (mut client, mechanism, first) = ClientExchange::start(
            ScramSecret::Password("pencil".to_owned()),
            Binding::Unsupported,
        );
        let server_first = server
            .client_first(mechanism, first.as_bytes())
            .expect("first");
        let client_final = client.server_first(server_first.as_bytes()).expect("final");
        let refused = server
            .client_final(client_final.as_bytes())
            .expect_err("doomed");
        assert_eq!(refused.0, "password authentication failed");
    }
}
