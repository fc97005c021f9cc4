//! The PostgreSQL v3 wire protocol, as far as a proxy needs it: framing,
//! the startup codec, validation of client messages, the few server fields
//! the proxy reads, and the messages it writes itself.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod reply;
pub mod startup;
