//! The client's socket, TCP (plain or TLS) or Unix-domain, behind one
//! type so that the session code is written once.

use std::io;

use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl ClientStream {
    /// A printable peer address for logs.
    pub fn peer(&self) -> String {
        match self {
            ClientStream::Tcp(stream) => stream
                .peer_addr()
                .map(|addr| addr.to_string())
                .unwrap_or_else(|_| "tcp:unknown".to_owned()),
            ClientStream::Tls(stream) => stream
                .get_ref()
                .0
                .peer_addr()
                .map(|addr| format!("{addr} (TLS)"))
                .unwrap_or_else(|_| "tls:unknown".to_owned()),
            ClientStream::Unix(_) => "unix socket".to_owned(),
        }
    }

    /// The client's IP address; none on a Unix-domain socket.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            ClientStream::Tcp(stream) => stream.peer_addr().ok().map(|addr| addr.ip()),
            ClientStream::Tls(stream) => stream.get_ref().0.peer_addr().ok().map(|addr| addr.ip()),
            ClientStream::Unix(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    pub fn is_tcp(&self) -> bool {
        !matches!(self, ClientStream::Unix(_))
    }

    /// Runs the TLS handshake on a plain TCP stream; anything else is
    /// returned unchanged.
    pub async fn into_tls(self, acceptor: &tokio_rustls::TlsAcceptor) -> io::Result<ClientStream> {
        match self {
            ClientStream::Tcp(stream) => {
                Ok(ClientStream::Tls(Box::new(acceptor.accept(stream).await?)))
            }
            other => Ok(other),
        }
    }
}

crate::stream_io::delegate_async_io!(ClientStream { Tcp, Tls, Unix });
