//! The first-stage classifier on pgbench's statements (which must take the
//! fast "ordinary" path) and on a corpus of state-changing statements.
//!
//! Run with `cargo bench --bench classify`.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use reprise::state::{classify, LexOptions, Tracker};
use reprise::stats::Stats;
use reprise::template::Registry;

/// The statements pgbench's built-in scripts send.
const PGBENCH: &[&str] = &[
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;",
    "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
    "END;",
];

/// Statements that change tracked session state, as applications and
/// pools send them.
const STATEFUL: &[&str] = &[
    "SET search_path TO app, public",
    "SET LOCAL statement_timeout = '5s'",
    "RESET ALL",
    "SET ROLE reporting",
    "SET SESSION AUTHORIZATION DEFAULT",
    "select set_config('app.tenant', '42', false)",
    "PREPARE get_user(int) AS SELECT * FROM users WHERE id = $1",
    "DEALLOCATE ALL",
    "LISTEN orders_changed",
    "UNLISTEN *",
    "DISCARD ALL",
    "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
    "SAVEPOINT before_update",
    "ROLLBACK TO SAVEPOINT before_update",
    "COMMIT AND CHAIN",
    "CREATE TEMP TABLE scratch (id int) ON COMMIT DROP",
    "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM big",
    "SELECT pg_advisory_lock(hashtext('job-7'))",
    "/* pool */ -- reset\n  SET application_name = 'worker 3'",
    "PREPARE TRANSACTION 'tx-1'",
];

fn bench(c: &mut Criterion) {
    let options = LexOptions::default();
    let mut group = c.benchmark_group("classify");
    group.throughput(Throughput::Elements(PGBENCH.len() as u64));
    group.bench_function("pgbench statements", |b| {
        b.iter(|| {
            for statement in PGBENCH {
                black_box(classify(black_box(statement.as_bytes()), &options));
            }
        })
    });
    group.throughput(Throughput::Elements(STATEFUL.len() as u64));
    group.bench_function("state-changing statements", |b| {
        b.iter(|| {
            for statement in STATEFUL {
                black_box(classify(black_box(statement.as_bytes()), &options));
            }
        })
    });
    group.finish();

    // What the tracker does for one `pgbench -S` transaction in the simple
    // protocol: classify the query, apply it at CommandComplete, find the
    // boundary and safe point at ReadyForQuery.
    let mut tracker = Tracker::new(
        Arc::new(Registry::new()),
        Arc::new(Stats::default()),
        [(&b"user"[..], &b"app"[..]), (b"database", b"db")],
        [(&b"client_encoding"[..], &b"UTF8"[..])],
    );
    let mut group = c.benchmark_group("tracker");
    group.throughput(Throughput::Elements(1));
    group.bench_function("pgbench -S transaction", |b| {
        let sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = 85411;";
        b.iter(|| {
            for effect in tracker.query_effects(black_box(sql)) {
                tracker.statement_done(&effect);
            }
            black_box(tracker.ready(b'I'));
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
