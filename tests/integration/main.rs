//! Integration tests: real PostgreSQL servers, started by the tests, with
//! Reprise in front of them and real clients (tokio-postgres, psql,
//! pgbench, raw sockets for what no driver sends).

mod auth;
mod bad_input;
mod clients;
mod commit_guard;
mod failover;
mod failover_load;
mod hooks;
mod journal;
mod lifecycle;
mod probe;
mod promotion;
mod recording;
mod relay;
mod restore_plan;
mod state_truth;
mod support;
mod wrapped_writes;
