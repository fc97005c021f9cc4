//! Server connections: opening them, logging in on the client's behalf,
//! sending cancel requests, and Reprise's own queries on them.

pub mod connect;
pub mod health;
pub mod query;
pub mod socket;
pub mod stream;

pub use connect::{connect, send_cancel, ConnectError, ServerConnection};
