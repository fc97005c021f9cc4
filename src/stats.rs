//! Reprise's counters, shown by `SHOW reprise.stats`: one row per counter.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Stripes per counter: sessions on different worker threads count on
/// different cache lines, so that counting on the hot path never moves a
/// line between cores.
const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

/// A monotonic counter; relaxed, since each is read on its own.
#[derive(Debug, Default)]
pub struct Counter([Stripe; STRIPES]);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0[stripe()].0.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn add(&self, amount: u64) {
        self.0[stripe()].0.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|stripe| stripe.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// This thread's stripe, handed out round-robin.
#[inline]
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|stripe| *stripe)
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters shared by every session.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[doc = $doc])* pub $name: Counter,)*
        }

        impl Stats {
            /// Every counter by name, in declaration order.
            pub fn rows(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.get()),)*]
            }
        }
    };
}

counters! {
    /// Sessions whose state was tracked.
    sessions_tracked,
    /// Statements the first stage found cannot change tracked state.
    statements_ordinary,
    /// Statements that went to the second stage.
    statements_candidate,
    /// Statements that could not be classified; each makes its session
    /// non-recoverable until its state is known again.
    statements_unclassified,
    /// Times a session took on state no template can hold.
    non_recoverable,
    /// Times the server's transaction status contradicted the tracker.
    tracker_mismatches,
    /// Statements carrying a credential (never journaled).
    credential_statements,
    /// Request boundaries: ReadyForQuery with nothing in flight.
    boundaries,
    /// Safe points: boundaries where the template alone is the state.
    safe_points,
    /// Sessions moved into another template (`SET reprise.template`,
    /// `RESET reprise.template`).
    template_switches,
    /// Template switches the server refused.
    template_switch_failures,
    /// Statements about Reprise itself answered by Reprise.
    reprise_statements,
    /// Times Reprise read a session's state back from the server.
    state_probes,
    /// State probes the server refused; the session's probes stop.
    state_probe_failures,
    /// Times a session's replay log outgrew `max_replay_log`; the session
    /// is non-recoverable until its next safe point.
    replay_log_overflows,
    /// Records written to the journal.
    journal_records,
    /// Records not written because a later record of the same write
    /// cycle made them moot (a command followed by its session's safe
    /// point).
    journal_records_superseded,
    /// Bytes written to the journal.
    journal_bytes,
    /// fsync calls on journal segments.
    journal_fsyncs,
    journal_segments_created,
    journal_segments_deleted,
    journal_checkpoints,
    /// Failed journal writes (the sessions go on; their records are lost).
    journal_write_errors,
    /// Records dropped because the writer's queue was full.
    journal_records_dropped,
    /// Server connections lost under a session that Reprise tried to
    /// carry over to a new one.
    failovers,
    /// Of those, sessions that went on on the new connection.
    failovers_recovered,
    /// Of those, sessions ended because replay could not be proven
    /// identical, or no server could be reached in time.
    failovers_failed,
    /// Commands replayed onto new server connections.
    commands_replayed,
    /// Autocommit writes run inside a transaction block of Reprise's own
    /// (`wrap_autocommit_writes`).
    autocommit_writes_wrapped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_every_thread_add_up() {
        let counter = std::sync::Arc::new(Counter::default());
        let threads: Vec<_> = (0..STRIPES * 2)
            .map(|_| {
                let counter = std::sync::Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.inc();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("counting thread");
        }
        assert_eq!(counter.get(), (STRIPES * 2 * 1000) as u64);
    }
}
