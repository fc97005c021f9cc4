//! Opening a server connection and logging in as the client's user.
//!
//! Reprise answers the server's authentication request itself, with the
//! session's credential: a password (cleartext, MD5 or SCRAM-SHA-256), an
//! MD5 hash, or a SCRAM client key recovered from the client's own proof.
//! A refusal by the server is
//! kept as the server's own ErrorResponse frame, so that the client gets
//! exactly what PostgreSQL said.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::ServerStream;
use crate::auth::scram::{self, Binding, ClientExchange, ScramSecret};
use crate::auth::Credential;
use crate::config::{Backend, Keepalive, ServerTlsMode};
use crate::tls::ServerTls;
use crate::wire::frame::{self, Next};
use crate::wire::startup::StartupMessage;
use crate::wire::{backend as server_msg, startup};

/// A logged-in server connection, positioned after its first ReadyForQuery.
#[derive(Debug)]
pub struct ServerConnection {
    pub stream: ServerStream,
    /// The configured backend this connection goes to.
    pub backend: Backend,
    pub process_id: i32,
    pub secret_key: i32,
    /// ParameterStatus and NoticeResponse frames of the handshake, in the
    /// order the server sent them, for the client.
    pub greeting: BytesMut,
    /// The ReadyForQuery frame that ended the handshake.
    pub ready: Bytes,
    /// Bytes the server sent after ReadyForQuery in the same read (a
    /// notification, say); they belong to the steady state.
    pub pending: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to server \"{backend}\" at {address}: {source}")]
    Unreachable {
        backend: String,
        address: String,
        source: std::io::Error,
    },
    #[error("timed out after {after:?} connecting to server \"{backend}\" at {address}")]
    Timeout {
        backend: String,
        address: String,
        after: Duration,
    },
    /// The server said no; the frame is its ErrorResponse, verbatim.
    #[error("server refused the connection: {}", .summary.message)]
    Refused {
        frame: Bytes,
        summary: server_msg::ErrorSummary,
    },
    #[error("server asks for a password for user \"{user}\" ({method}), but the users file has none for that user")]
    NoPassword { user: String, method: &'static str },
    #[error(
        "server asks for {method} for user \"{user}\", but Reprise only has {have} for that user"
    )]
    WrongCredential {
        user: String,
        method: &'static str,
        have: &'static str,
    },
    #[error("server asks for an authentication method Reprise does not support ({0})")]
    UnsupportedAuth(&'static str),
    #[error("SCRAM authentication with the server failed: {0}")]
    Scram(scram::ScramError),
    #[error(
        "server \"{backend}\" does not accept TLS connections, and server_tls = {mode} requires it"
    )]
    TlsRefused { backend: String, mode: &'static str },
    #[error("TLS with server \"{backend}\" failed: {problem}")]
    Tls { backend: String, problem: String },
    #[error("server broke the protocol during startup: {0}")]
    Protocol(String),
    #[error("server connection lost during startup: {0}")]
    Lost(std::io::Error),
}

/// Connects and logs in, all within `timeout`. Cancel safe in the sense
/// that dropping the future drops the half-open connection and nothing else.
pub async fn connect(
    backend: &Backend,
    startup: &StartupMessage,
    credential: Option<&Credential>,
    tls: &ServerTls,
    timeout: Duration,
    keepalive: &Keepalive,
    max_message_size: usize,
) -> Result<ServerConnection, ConnectError> {
    let address = backend.address();
    let attempt = async {
        let stream = TcpStream::connect((backend.host.as_str(), backend.port))
            .await
            .map_err(|source| ConnectError::Unreachable {
                backend: backend.name.clone(),
                address: address.clone(),
                source,
            })?;
        super::socket::tune(&stream, keepalive);
        let stream = negotiate_tls(stream, backend, tls).await?;
        handshake(stream, backend, startup, credential, max_message_size).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            backend: backend.name.clone(),
            address,
            after: timeout,
        }),
    }
}

/// Asks for TLS per `server_tls` and runs the handshake when the server
/// agrees.
async fn negotiate_tls(
    mut stream: TcpStream,
    backend: &Backend,
    tls: &ServerTls,
) -> Result<ServerStream, ConnectError> {
    let Some(connector) = &tls.connector else {
        return Ok(ServerStream::Plain(stream));
    };
    let failed = |problem: String| ConnectError::Tls {
        backend: backend.name.clone(),
        problem,
    };
    let mut request = BytesMut::new();
    frame::write_frame(&mut request, None, |out| {
        out.extend_from_slice(&startup::SSL_REQUEST_CODE.to_be_bytes());
    });
    stream
        .write_all(&request)
        .await
        .map_err(ConnectError::Lost)?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(ConnectError::Lost)?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == ServerTlsMode::Prefer => return Ok(ServerStream::Plain(stream)),
        b'N' => {
            return Err(ConnectError::TlsRefused {
                backend: backend.name.clone(),
                mode: tls.mode.name(),
            })
        }
        other => {
            return Err(ConnectError::Protocol(format!(
                "unexpected answer {:?} to SSLRequest",
                char::from(other)
            )))
        }
    }
    let name = ServerTls::server_name(&backend.host).map_err(failed)?;
    let stream = connector
        .connect(name, stream)
        .await
        .map_err(|err| failed(err.to_string()))?;
    Ok(ServerStream::Tls(Box::new(stream)))
}

async fn handshake(
    mut stream: ServerStream,
    backend: &Backend,
    startup: &StartupMessage,
    credential: Option<&Credential>,
    max_message_size: usize,
) -> Result<ServerConnection, ConnectError> {
    let user = startup.get_lossy("user").unwrap_or_default();
    let mut out = BytesMut::new();
    startup.encode_for_server(&mut out);
    stream.write_all(&out).await.map_err(ConnectError::Lost)?;

    let mut reader = FrameReader::new(max_message_size);
    let mut greeting = BytesMut::new();
    let mut key = None;
    let mut scram: Option<ClientExchange> = None;
    let end_point = stream.end_point();
    loop {
        let frame = reader.next(&mut stream).await?;
        match frame[0] {
            b'R' => {
                let reply =
                    authenticate(&frame, &user, credential, end_point.as_deref(), &mut scram)?;
                if let Some(reply) = reply {
                    stream.write_all(&reply).await.map_err(ConnectError::Lost)?;
                }
            }
            b'E' => {
                let summary = server_msg::error_summary(&frame);
                return Err(ConnectError::Refused { frame, summary });
            }
            b'S' | b'N' => greeting.extend_from_slice(&frame),
            b'K' => {
                key =
                    Some(server_msg::backend_key(&frame).ok_or_else(|| {
                        ConnectError::Protocol("malformed BackendKeyData".to_owned())
                    })?)
            }
            // The server may tell us it does not know a minor version or
            // option; Reprise always asks for plain 3.0, so there is nothing
            // to adjust.
            b'v' => {}
            b'Z' => {
                let (process_id, secret_key) = key.ok_or_else(|| {
                    ConnectError::Protocol("ReadyForQuery before BackendKeyData".to_owned())
                })?;
                return Ok(ServerConnection {
                    stream,
                    backend: backend.clone(),
                    process_id,
                    secret_key,
                    greeting,
                    ready: frame,
                    pending: reader.into_rest(),
                });
            }
            other => {
                return Err(ConnectError::Protocol(format!(
                    "unexpected message type {:?} during startup",
                    char::from(other)
                )))
            }
        }
    }
}

/// Answers one Authentication message; `None` when no reply is due.
fn authenticate(
    frame: &[u8],
    user: &str,
    credential: Option<&Credential>,
    end_point: Option<&[u8]>,
    scram: &mut Option<ClientExchange>,
) -> Result<Option<BytesMut>, ConnectError> {
    let mut buf = BytesMut::from(frame);
    let message = backend::Message::parse(&mut buf)
        .map_err(|err| ConnectError::Protocol(format!("malformed authentication request: {err}")))?
        .ok_or_else(|| ConnectError::Protocol("truncated authentication request".to_owned()))?;
    let credential_for = |method| {
        credential.ok_or_else(|| ConnectError::NoPassword {
            user: user.to_owned(),
            method,
        })
    };
    let wrong = |method, have| ConnectError::WrongCredential {
        user: user.to_owned(),
        method,
        have,
    };
    let mut reply = BytesMut::new();
    let sent = |result: std::io::Result<()>| {
        result.map_err(|err| ConnectError::Protocol(format!("cannot encode a reply: {err}")))
    };
    match message {
        backend::Message::AuthenticationOk => return Ok(None),
        backend::Message::AuthenticationCleartextPassword => {
            let password = match credential_for("password")? {
                Credential::Password(password) => password,
                Credential::Md5(_) => return Err(wrong("a clear-text password", "an MD5 hash")),
                Credential::ScramKey { .. } => {
                    return Err(wrong("a clear-text password", "a SCRAM client key"))
                }
            };
            sent(frontend::password_message(
                password.expose().as_bytes(),
                &mut reply,
            ))?;
        }
        backend::Message::AuthenticationMd5Password(body) => {
            let hash = match credential_for("md5")? {
                Credential::Password(password) => {
                    md5_hash(user.as_bytes(), password.expose().as_bytes(), body.salt())
                }
                Credential::Md5(hash) => hash.salted(body.salt()),
                Credential::ScramKey { .. } => return Err(wrong("md5", "a SCRAM client key")),
            };
            sent(frontend::password_message(hash.as_bytes(), &mut reply))?;
        }
        backend::Message::AuthenticationSasl(body) => {
            let secret = match credential_for("scram-sha-256")? {
                Credential::Password(password) => {
                    ScramSecret::Password(password.expose().to_owned())
                }
                Credential::ScramKey { key, verifier } => ScramSecret::ClientKey {
                    key: key.clone(),
                    verifier: verifier.clone(),
                },
                Credential::Md5(_) => return Err(wrong("scram-sha-256", "an MD5 hash")),
            };
            let mut mechanisms = body.mechanisms();
            let (mut offers_scram, mut offers_plus) = (false, false);
            while let Some(mechanism) = fallible_iterator::FallibleIterator::next(&mut mechanisms)
                .map_err(|err| {
                ConnectError::Protocol(format!("malformed SASL mechanism list: {err}"))
            })? {
                offers_scram |= mechanism == scram::MECHANISM;
                offers_plus |= mechanism == scram::MECHANISM_PLUS;
            }
            if !offers_scram {
                return Err(ConnectError::UnsupportedAuth(
                    "a SASL mechanism other than SCRAM-SHA-256",
                ));
            }
            // Bind to the server's certificate whenever TLS allows it, so
            // that a man in the middle cannot relay the exchange.
            let binding = match end_point {
                Some(hash) if offers_plus => Binding::EndPoint(hash.to_vec()),
                Some(_) => Binding::NotUsed,
                None => Binding::Unsupported,
            };
            let (client, mechanism, first) = ClientExchange::start(secret, binding);
            sent(frontend::sasl_initial_response(
                mechanism,
                first.as_bytes(),
                &mut reply,
            ))?;
            *scram = Some(client);
        }
        backend::Message::AuthenticationSaslContinue(body) => {
            let client = scram.as_mut().ok_or_else(|| {
                ConnectError::Protocol("SASL continue without a SASL exchange".to_owned())
            })?;
            let last = client
                .server_first(body.data())
                .map_err(ConnectError::Scram)?;
            sent(frontend::sasl_response(last.as_bytes(), &mut reply))?;
        }
        backend::Message::AuthenticationSaslFinal(body) => {
            let client = scram.as_mut().ok_or_else(|| {
                ConnectError::Protocol("SASL final without a SASL exchange".to_owned())
            })?;
            client
                .server_final(body.data())
                .map_err(ConnectError::Scram)?;
            return Ok(None);
        }
        backend::Message::AuthenticationKerberosV5 => {
            return Err(ConnectError::UnsupportedAuth("Kerberos V5"))
        }
        backend::Message::AuthenticationScmCredential => {
            return Err(ConnectError::UnsupportedAuth("SCM credentials"))
        }
        backend::Message::AuthenticationGss | backend::Message::AuthenticationGssContinue(_) => {
            return Err(ConnectError::UnsupportedAuth("GSSAPI"))
        }
        backend::Message::AuthenticationSspi => return Err(ConnectError::UnsupportedAuth("SSPI")),
        _ => {
            return Err(ConnectError::Protocol(
                "unknown authentication request".to_owned(),
            ))
        }
    }
    Ok(Some(reply))
}

/// Sends a CancelRequest for `process_id`/`secret_key` to a server, on a
/// connection of its own, as the protocol requires.
pub async fn send_cancel(
    backend: &Backend,
    process_id: i32,
    secret_key: i32,
    timeout: Duration,
) -> std::io::Result<()> {
    let attempt = async {
        let mut stream = TcpStream::connect((backend.host.as_str(), backend.port)).await?;
        let mut out = BytesMut::new();
        frame::write_frame(&mut out, None, |out| {
            out.extend_from_slice(&startup::CANCEL_REQUEST_CODE.to_be_bytes());
            out.extend_from_slice(&process_id.to_be_bytes());
            out.extend_from_slice(&secret_key.to_be_bytes());
        });
        stream.write_all(&out).await?;
        // The server closes the connection once it has read the request;
        // waiting for that keeps the cancel from racing our close.
        let mut sink = [0u8; 1];
        let _ = stream.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "cancel request timed out",
            ))
        })
}

/// Reads whole frames during the handshake.
struct FrameReader {
    buf: BytesMut,
    max_message_size: usize,
}

impl FrameReader {
    fn new(max_message_size: usize) -> Self {
        FrameReader {
            buf: BytesMut::with_capacity(8 * 1024),
            max_message_size,
        }
    }

    async fn next(&mut self, stream: &mut ServerStream) -> Result<Bytes, ConnectError> {
        loop {
            match frame::next(&self.buf, self.max_message_size) {
                Ok(Next::Frame { tag, len }) => {
                    if !server_msg::is_known_tag(tag) {
                        return Err(ConnectError::Protocol(format!(
                            "unknown message type {:?}",
                            char::from(tag)
                        )));
                    }
                    return Ok(self.buf.split_to(len).freeze());
                }
                Ok(Next::Incomplete { .. }) => {
                    self.buf.reserve(8 * 1024);
                    let read = stream
                        .read_buf(&mut self.buf)
                        .await
                        .map_err(ConnectError::Lost)?;
                    if read == 0 {
                        return Err(ConnectError::Lost(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                Err(err) => return Err(ConnectError::Protocol(err.to_string())),
            }
        }
    }

    fn into_rest(self) -> BytesMut {
        self.buf
    }
}
