//! Client authentication, and the credentials Reprise logs in to servers
//! with on the client's behalf.

pub mod scram;
