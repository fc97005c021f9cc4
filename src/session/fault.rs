//! Fault injection for the replay tests: a session breaks its own server
//! connection after a given number of messages forwarded to the client,
//! so that a test can cut a session at every message boundary and check
//! that failover hides the cut.
//!
//! Built only with the `fault-injection` feature, which refuses to build
//! without debug assertions: a release binary never carries it.

use std::io;

use crate::backend::stream::ServerStream;

use crate::wire::startup::StartupMessage;

/// The startup parameter that arms the fault; Reprise takes it out before
/// the server sees the startup message.
pub const PARAMETER: &str = "reprise.fault_after";

/// A cut still to come.
#[derive(Debug)]
pub struct Fault {
    /// Messages the client still gets before the cut.
    remaining: u64,
}

impl Fault {
    /// Takes the fault parameter out of `startup`. A value that is not a
    /// count arms nothing.
    pub fn take(startup: &mut StartupMessage) -> Option<Fault> {
        let at = startup
            .parameters
            .iter()
            .position(|(name, _)| name.as_ref() == PARAMETER.as_bytes())?;
        let (_, value) = startup.parameters.remove(at);
        let remaining = std::str::from_utf8(&value).ok()?.parse().ok()?;
        Some(Fault { remaining })
    }

    /// Whether the cut is due before the next message for the client.
    pub fn due(&self) -> bool {
        self.remaining == 0
    }

    /// One more message went to the client.
    pub fn forwarded(&mut self) {
        self.remaining = self.remaining.saturating_sub(1);
    }

    /// Breaks `server` as a network failure would: both directions shut,
    /// so that the server process sees the end of its input, and is reset
    /// by the kernel if it writes more.
    pub fn cut(server: &ServerStream) -> io::Error {
        let _ = socket2::SockRef::from(server.tcp()).shutdown(std::net::Shutdown::Both);
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            "server connection cut by fault injection",
        )
    }
}
