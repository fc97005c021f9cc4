//! Reprise: a PostgreSQL wire-protocol proxy that keeps database sessions
//! alive through backend failures.
//!
//! Data flows one way through the modules: [`frontend`] accepts a client
//! and reads its startup packet, [`session`] logs in to a server through
//! [`backend`] and relays frames, [`wire`] frames and checks the bytes.

#![deny(clippy::unwrap_used)]

#[cfg(all(feature = "fault-injection", not(debug_assertions)))]
compile_error!(
    "the fault-injection feature is for tests: it cannot be built without debug assertions"
);

pub mod auth;
pub mod backend;
pub mod config;
pub mod datadir;
pub mod frontend;
pub mod journal;
pub mod proxy;
pub mod replay;
pub mod session;
pub mod state;
pub mod stats;
mod stream_io;
pub mod template;
pub mod tls;
pub mod users;
pub mod wire;
pub mod workers;

pub use config::Config;
pub use proxy::{Proxy, ProxyHandle};
