//! A server connection's socket, plain TCP or TLS over it, behind one type
//! so that the relay and Reprise's own queries are written once.

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Debug)]
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ServerStream {
    /// The TCP socket underneath, for socket options.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ServerStream::Plain(stream) => stream,
            ServerStream::Tls(stream) => stream.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    /// tls-server-end-point data of the server's certificate, for SCRAM
    /// channel binding; none without TLS.
    pub fn end_point(&self) -> Option<Vec<u8>> {
        match self {
            ServerStream::Plain(_) => None,
            ServerStream::Tls(stream) => stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| crate::tls::end_point_hash(cert)),
        }
    }
}

crate::stream_io::delegate_async_io!(ServerStream { Plain, Tls });
