//! The byte pump between one client socket and one server socket.
//!
//! One task owns both sockets. Each direction has an inbox (bytes read, not
//! yet framed) and an outbox (whole frames waiting to be written, as the
//! `Bytes` they were read as). A single poll function writes what is
//! pending and reads what has arrived, in both directions, so that a
//! blocked write in one direction never stops the other from draining: a
//! client streaming COPY data while the server sends notices cannot
//! deadlock. An outbox above the high-water mark stops reading from the
//! side that fills it, which is the back-pressure.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// Stop reading from a side while this much is queued for the other.
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// Spare room made before each read.
const READ_CHUNK: usize = 16 * 1024;
/// An empty inbox bigger than this (left by one huge message) is given
/// back, so that an idle session holds kilobytes, not the size of its
/// largest row.
const SHRINK_ABOVE: usize = 1024 * 1024;
/// Chunks handed to one vectored write.
const MAX_IOV: usize = 64;

/// What `poll_event` saw.
#[derive(Debug)]
pub enum Event {
    /// New bytes in the client inbox.
    ClientData,
    /// New bytes in the server inbox.
    ServerData,
    ClientClosed,
    ServerClosed,
    ClientError(io::Error),
    ServerError(io::Error),
}

/// Frames queued for one socket.
#[derive(Debug, Default)]
pub struct Outbox {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Outbox {
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes until empty (`Ready(Ok)`) or the socket is full (`Pending`).
    /// Cancel safe: what was written is accounted for before any await point.
    pub fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while let Some(front) = self.chunks.front() {
            // One chunk (the usual case: one read's worth of frames) goes
            // out with a plain send, which is cheaper in the kernel than
            // writev; several go out in one writev.
            let poll = if self.chunks.len() == 1 {
                Pin::new(&mut *writer).poll_write(cx, front)
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut count = 0;
                for chunk in self.chunks.iter().take(MAX_IOV) {
                    slices[count] = IoSlice::new(chunk);
                    count += 1;
                }
                Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..count])
            };
            let written = match poll {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => written,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            };
            self.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut written: usize) {
        self.len -= written;
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
}

/// Both sockets and their buffers.
#[derive(Debug)]
pub struct Relay<C, S> {
    pub client: C,
    pub server: S,
    pub from_client: BytesMut,
    pub from_server: BytesMut,
    pub to_client: Outbox,
    pub to_server: Outbox,
    /// Set once the client has sent Terminate or gone: nothing more is read
    /// from it.
    pub client_done: bool,
    /// Set while the client's next message must wait for answers in
    /// flight: nothing more is read from it meanwhile.
    pub hold_client: bool,
    /// Alternates which side is read first, so that a busy side cannot
    /// starve the other.
    server_first: bool,
}

impl<C, S> Relay<C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub fn new(client: C, server: S, from_server: BytesMut) -> Self {
        Relay {
            client,
            server,
            from_client: BytesMut::with_capacity(READ_CHUNK),
            from_server,
            to_client: Outbox::default(),
            to_server: Outbox::default(),
            client_done: false,
            hold_client: false,
            server_first: false,
        }
    }

    /// Flushes both outboxes as far as the sockets take, then reads from
    /// whichever side has data. Cancel safe: every step either completes
    /// or leaves the buffers untouched.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if let Poll::Ready(Err(err)) = self.to_server.poll_flush(&mut self.server, cx) {
            return Poll::Ready(Event::ServerError(err));
        }
        if let Poll::Ready(Err(err)) = self.to_client.poll_flush(&mut self.client, cx) {
            return Poll::Ready(Event::ClientError(err));
        }
        self.server_first = !self.server_first;
        if self.server_first {
            if let Poll::Ready(event) = self.poll_server_read(cx) {
                return Poll::Ready(event);
            }
            self.poll_client_read(cx)
        } else {
            if let Poll::Ready(event) = self.poll_client_read(cx) {
                return Poll::Ready(event);
            }
            self.poll_server_read(cx)
        }
    }

    fn poll_client_read(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self.client_done || self.hold_client || self.to_server.len() >= HIGH_WATER {
            return Poll::Pending;
        }
        reserve(&mut self.from_client);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.client), cx, &mut self.from_client) {
            Poll::Ready(Ok(0)) => Poll::Ready(Event::ClientClosed),
            Poll::Ready(Ok(_)) => Poll::Ready(Event::ClientData),
            Poll::Ready(Err(err)) => Poll::Ready(Event::ClientError(err)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_server_read(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self.to_client.len() >= HIGH_WATER {
            return Poll::Pending;
        }
        reserve(&mut self.from_server);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.server), cx, &mut self.from_server) {
            Poll::Ready(Ok(0)) => Poll::Ready(Event::ServerClosed),
            Poll::Ready(Ok(_)) => Poll::Ready(Event::ServerData),
            Poll::Ready(Err(err)) => Poll::Ready(Event::ServerError(err)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes whatever is queued for the client, for a goodbye.
    pub async fn flush_client(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.to_client.poll_flush(&mut self.client, cx)).await
    }

    /// Writes whatever is queued for the server.
    pub async fn flush_server(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.to_server.poll_flush(&mut self.server, cx)).await
    }
}

/// Makes room for a read. `BytesMut::reserve` reuses the buffer's
/// allocation once every frame split off it has been written, and grows
/// geometrically for a large frame, so the cost stays linear.
fn reserve(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
        *buf = BytesMut::with_capacity(READ_CHUNK);
    } else if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_without_deadlock() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (server, mut server_peer) = tokio::io::duplex(1024);
        let mut relay = Relay::new(client, server, BytesMut::new());
        // Both peers write more than the pipes hold before reading.
        let big = vec![7u8; 64 * 1024];
        let client_side = tokio::spawn({
            let big = big.clone();
            async move {
                client_peer.write_all(&big).await.expect("client write");
                let mut back = vec![0u8; big.len()];
                client_peer
                    .read_exact(&mut back)
                    .await
                    .expect("client read");
                back
            }
        });
        let server_side = tokio::spawn(async move {
            server_peer
                .write_all(&vec![9u8; 64 * 1024])
                .await
                .expect("server write");
            let mut got = vec![0u8; 64 * 1024];
            server_peer.read_exact(&mut got).await.expect("server read");
            got
        });
        let mut moved = (0, 0);
        while moved != (big.len(), big.len())
            || !relay.to_client.is_empty()
            || !relay.to_server.is_empty()
        {
            match std::future::poll_fn(|cx| relay.poll_event(cx)).await {
                Event::ClientData => {
                    moved.0 += relay.from_client.len();
                    let chunk = relay.from_client.split().freeze();
                    relay.to_server.push(chunk);
                }
                Event::ServerData => {
                    moved.1 += relay.from_server.len();
                    let chunk = relay.from_server.split().freeze();
                    relay.to_client.push(chunk);
                }
                // The client peer hangs up once it has read everything back.
                Event::ClientClosed
                    if moved == (big.len(), big.len()) && relay.to_client.is_empty() =>
                {
                    break
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        relay.flush_client().await.expect("flush");
        assert_eq!(client_side.await.expect("join"), vec![9u8; 64 * 1024]);
        assert_eq!(server_side.await.expect("join"), big);
    }

    #[test]
    fn outbox_advance_spans_chunks() {
        let mut outbox = Outbox::default();
        outbox.push(Bytes::from_static(b"abc"));
        outbox.push(Bytes::from_static(b"defg"));
        outbox.advance(5);
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.chunks.front().map(|c| &c[..]), Some(&b"fg"[..]));
    }
}
