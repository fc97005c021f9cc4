//! Listening sockets: TCP, and optionally a Unix socket named as libpq
//! expects (`<dir>/.s.PGSQL.<port>`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::ClientStream;
use crate::proxy::Shared;
use crate::workers::Workers;
use tokio::net::{TcpListener, UnixListener};

#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    pub async fn bind_tcp(address: SocketAddr) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(address).await?))
    }

    /// Binds `<dir>/.s.PGSQL.<port>`, replacing a socket file left behind by
    /// a process that is gone (nobody accepts on it any more).
    pub fn bind_unix(dir: &Path, port: u16) -> io::Result<Listener> {
        let path = dir.join(format!(".s.PGSQL.{port}"));
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        Ok(Listener::Unix { listener, path })
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map(|addr| addr.to_string())
                .unwrap_or_else(|_| "tcp".to_owned()),
            Listener::Unix { path, .. } => path.display().to_string(),
        }
    }

    async fn accept(&self, shared: &Shared) -> io::Result<ClientStream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                crate::backend::socket::tune(&stream, &shared.config().tcp_keepalive);
                Ok(ClientStream::Tcp(stream))
            }
            Listener::Unix { listener, .. } => Ok(ClientStream::Unix(listener.accept().await?.0)),
        }
    }

    /// Accepts until the proxy starts draining; each connection goes to a
    /// worker.
    pub async fn serve(self, shared: Arc<Shared>, workers: Arc<Workers>) {
        let draining = shared.draining.clone();
        loop {
            let accepted = tokio::select! {
                () = draining.cancelled() => break,
                accepted = self.accept(&shared) => accepted,
            };
            match accepted {
                Ok(client) => workers.dispatch(client, shared.next_session_id()),
                Err(err) => {
                    // Out of file descriptors or a connection reset before
                    // accept: back off briefly instead of spinning.
                    tracing::warn!(error = %err, listener = %self.describe(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if let Listener::Unix { path, .. } = &self {
            let _ = std::fs::remove_file(path);
        }
    }
}
