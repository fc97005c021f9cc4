//! The client's socket, TCP (plain or TLS) or Unix-domain, behind one
//! type so that the session code is written once.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            ClientStream::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            ClientStream::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
            ClientStream::Unix(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            ClientStream::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            ClientStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            ClientStream::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
