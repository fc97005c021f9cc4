//! Socket options shared by client and server sockets.

use tokio::net::TcpStream;

use crate::config::Keepalive;

/// Turns off Nagle (the protocol is request/response; every write is a
/// whole batch) and sets keepalive probes and the user timeout so that a
/// peer that vanished without closing is noticed.
pub fn tune(stream: &TcpStream, keepalive: &Keepalive) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "could not set TCP_NODELAY");
    }
    let user_timeout = keepalive.user_timeout.0;
    if !user_timeout.is_zero() {
        if let Err(err) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(user_timeout)) {
            tracing::debug!(%err, "could not set TCP_USER_TIMEOUT");
        }
    }
    if !keepalive.enabled {
        return;
    }
    let probes = socket2::TcpKeepalive::new()
        .with_time(keepalive.idle.0)
        .with_interval(keepalive.interval.0)
        .with_retries(keepalive.count);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(%err, "could not set TCP keepalive");
    }
}
