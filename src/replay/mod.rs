//! Carrying a session over to a new server connection: what may be run
//! again ([`risk`]), and the one operation that gives a session a server
//! connection and brings it to the session's state ([`attach`]).

pub mod attach;
pub mod guard;
pub mod outcome;
pub mod risk;
