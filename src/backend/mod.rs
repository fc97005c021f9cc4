//! Server connections: opening them, logging in on the client's behalf,
//! and sending cancel requests.

pub mod connect;
pub mod socket;

pub use connect::{connect, send_cancel, ConnectError, ServerConnection};
