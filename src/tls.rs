//! TLS on both sides (rustls with the ring provider, TLS 1.2 and 1.3).
//!
//! Towards clients Reprise presents the certificate of `tls_cert_file`;
//! towards servers it verifies per `server_tls`. Every file problem is
//! reported with the file's path, at start or reload, never later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::config::{Config, ServerTlsMode};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {key} {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path}: {problem}")]
    Bad {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("tls_cert_file {cert} and tls_key_file {key}: {problem}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
    #[error("config key `{0}`: must be set when client TLS is enabled")]
    Missing(&'static str),
}

/// ring, as the build prefers; it has no post-quantum key exchange, which
/// is why rustls marks it deprecated.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Bad {
            key,
            path: path.to_owned(),
            problem: format!("not a PEM certificate file ({err})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Bad {
            key,
            path: path.to_owned(),
            problem: "holds no PEM certificate".to_owned(),
        });
    }
    Ok(certs)
}

/// What clients are offered: the acceptor and the channel-binding hash of
/// the certificate.
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// tls-server-end-point data for SCRAM-SHA-256-PLUS.
    pub end_point: Vec<u8>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ClientTls, TlsError> {
        let certs = certificates("tls_cert_file", cert_path)?;
        let key_pem = read("tls_key_file", key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::Bad {
            key: "tls_key_file",
            path: key_path.to_owned(),
            problem: format!("holds no usable PEM private key ({err})"),
        })?;
        let end_point = end_point_hash(&certs[0]);
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|err| TlsError::Mismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
                problem: err.to_string(),
            })?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|err| TlsError::Mismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
                problem: format!("the key does not fit the certificate ({err})"),
            })?;
        Ok(ClientTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            end_point,
        })
    }

    /// The client-side TLS of `config`, none when `client_tls = disable`.
    pub fn from_config(config: &Config) -> Result<Option<ClientTls>, TlsError> {
        if config.client_tls == crate::config::ClientTlsMode::Disable {
            return Ok(None);
        }
        let cert = config
            .tls_cert_file
            .as_deref()
            .ok_or(TlsError::Missing("tls_cert_file"))?;
        let key = config
            .tls_key_file
            .as_deref()
            .ok_or(TlsError::Missing("tls_key_file"))?;
        ClientTls::load(cert, key).map(Some)
    }
}

/// How Reprise talks TLS to servers.
#[derive(Clone)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    /// None when `mode` is `disable`.
    pub connector: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({:?})", self.mode)
    }
}

impl Default for ServerTls {
    fn default() -> Self {
        ServerTls {
            mode: ServerTlsMode::Disable,
            connector: None,
        }
    }
}

impl ServerTls {
    pub fn from_config(config: &Config) -> Result<ServerTls, TlsError> {
        let mode = config.server_tls;
        let builder = || {
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(VERSIONS)
                .expect("ring supports TLS 1.2 and 1.3")
        };
        let client_config = match mode {
            ServerTlsMode::Disable => return Ok(ServerTls::default()),
            ServerTlsMode::Prefer | ServerTlsMode::Require => builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(
                    provider().signature_verification_algorithms,
                )))
                .with_no_client_auth(),
            ServerTlsMode::VerifyFull => {
                let path = config
                    .server_tls_ca_file
                    .as_deref()
                    .ok_or(TlsError::Missing("server_tls_ca_file"))?;
                let mut roots = RootCertStore::empty();
                for cert in certificates("server_tls_ca_file", path)? {
                    roots.add(cert).map_err(|err| TlsError::Bad {
                        key: "server_tls_ca_file",
                        path: path.to_owned(),
                        problem: format!("not a usable CA certificate ({err})"),
                    })?;
                }
                builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth()
            }
        };
        Ok(ServerTls {
            mode,
            connector: Some(tokio_rustls::TlsConnector::from(Arc::new(client_config))),
        })
    }

    /// The name a server's certificate must carry.
    pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
        ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a valid DNS name or IP address"))
    }
}

/// `prefer` and `require`: encryption without authentication of the
/// server, as libpq's sslmode of the same names without a root
/// certificate. Signatures are still checked, so the session keys are
/// the certificate holder's.
#[derive(Debug)]
struct Unverified(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// RFC 5929 tls-server-end-point: the certificate hashed with the hash of
/// its signature algorithm, SHA-256 for MD5 and SHA-1 (and for anything
/// not recognised, as PostgreSQL does for the common algorithms).
pub fn end_point_hash(cert: &[u8]) -> Vec<u8> {
    match signature_hash(cert) {
        Some(SignatureHash::Sha384) => Sha384::digest(cert).to_vec(),
        Some(SignatureHash::Sha512) => Sha512::digest(cert).to_vec(),
        _ => Sha256::digest(cert).to_vec(),
    }
}

enum SignatureHash {
    Sha256,
    Sha384,
    Sha512,
}

/// The hash of a certificate's outer signatureAlgorithm, read from its DER
/// (Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, … }).
fn signature_hash(cert: &[u8]) -> Option<SignatureHash> {
    let (_, certificate, _) = der_element(cert)?;
    let (_, _, after_tbs) = der_element(certificate)?;
    let (_, algorithm, _) = der_element(after_tbs)?;
    let (tag, oid, _) = der_element(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    // sha384WithRSAEncryption 1.2.840.113549.1.1.12, ecdsa-with-SHA384
    // 1.2.840.10045.4.3.3, and their SHA-512 siblings (…1.13, …4.3.4).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    match oid {
        [prefix @ .., 12] if prefix == RSA => Some(SignatureHash::Sha384),
        [prefix @ .., 13] if prefix == RSA => Some(SignatureHash::Sha512),
        [prefix @ .., 3] if prefix == ECDSA => Some(SignatureHash::Sha384),
        [prefix @ .., 4] if prefix == ECDSA => Some(SignatureHash::Sha512),
        _ => Some(SignatureHash::Sha256),
    }
}

/// One DER element: (tag, contents, the bytes after it).
fn der_element(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |len, byte| (len << 8) | usize::from(*byte));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}
