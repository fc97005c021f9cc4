//! What one session writes to the journal.
//!
//! By default only what replay needs: a command is written when the state
//! after it is not a safe point, and a safe-point record follows once the
//! session is back at one (or has moved to another template). A session
//! in autocommit mode whose statements leave its template alone writes
//! nothing after its start. With `retain = "all"` every command is
//! written.
//!
//! Under fsync `batch` and `off` a command waits in the session for up
//! to `fsync_interval` before it is handed to the writer: a transaction
//! that ends sooner needs nothing on disk (its safe point makes it moot),
//! so it is never framed at all. A crash may then lose up to about twice
//! the interval's records instead of one interval's.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::flow::StateEvent;
use super::replay_log::{Completed, Omission};
use crate::journal::record::now_micros;
use crate::journal::{Appended, JournalHandle, Omitted, OutcomeKind, Record, Retain};
use crate::state::{classify, Class, Kind, LexOptions};
use crate::template::{Registry, StateHash, Template, TemplateId};

pub struct Recorder {
    journal: JournalHandle,
    registry: Arc<Registry>,
    session: u64,
    retain_all: bool,
    /// Commands were written since the last safe-point record.
    since_safe_point: bool,
    /// The template of the last safe-point (or start) record.
    template: Option<TemplateId>,
    /// Under fsync `always`: resolved once the last record is durable.
    durable: Option<oneshot::Receiver<()>>,
    /// How long a command may wait in `held`; `None` hands every record
    /// over at once (fsync `always`, `retain = "all"`).
    hold: Option<Duration>,
    /// Commands since the last safe point not yet handed over.
    held: Vec<Record>,
    /// When `held` must go to the writer.
    due: Option<Instant>,
    /// A command since the last safe point reached the writer: the next
    /// safe point must be written too.
    handed_over: bool,
}

impl Recorder {
    /// Writes the session's start record (and its template's definition
    /// if the journal lacks it).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        journal: JournalHandle,
        registry: Arc<Registry>,
        session: u64,
        retain: Retain,
        hold: Duration,
        startup: &[(Bytes, Bytes)],
        template: &Template,
        template_id: TemplateId,
    ) -> Recorder {
        let hand_over_at_once = retain == Retain::All
            || journal.fsync() == crate::journal::FsyncPolicy::Always
            || hold.is_zero();
        let mut recorder = Recorder {
            journal,
            registry,
            session,
            retain_all: retain == Retain::All,
            since_safe_point: false,
            template: Some(template_id),
            durable: None,
            hold: (!hand_over_at_once).then_some(hold),
            held: Vec::new(),
            due: None,
            handed_over: false,
        };
        recorder.define(template_id, Some(template));
        recorder.append(Record::SessionStart {
            session,
            at: now_micros(),
            template: template_id,
            startup: startup.to_vec(),
        });
        recorder
    }

    pub fn record(&mut self, event: StateEvent) {
        match event {
            StateEvent::Command {
                completed,
                safe_point,
            } => {
                let state_hash = completed.state_hash;
                if self.retain_all || safe_point.is_none() {
                    self.command(completed);
                }
                if let Some(template) = safe_point {
                    self.safe_point(template, state_hash);
                }
            }
            StateEvent::SafePoint {
                template,
                state_hash,
            } => self.safe_point(template, state_hash),
            StateEvent::Boundary { .. } => {}
        }
    }

    fn command(&mut self, completed: Completed) {
        let omitted = match completed.omitted {
            Omission::None => Omitted::No,
            Omission::Credential => Omitted::Credential,
            Omission::OverBound => Omitted::OverBound,
        };
        self.since_safe_point = true;
        debug_assert!(completed.result_digest.is_some());
        let record = Record::Command {
            session: self.session,
            at: now_micros(),
            seq: completed.seq,
            state_hash: completed.state_hash,
            // Always known here: only a safe point leaves it out, and
            // safe-point commands are written only by a capture, which
            // keeps it.
            result_digest: completed.result_digest.unwrap_or_default(),
            omitted,
            message_len: completed.message_len,
            messages: completed.messages,
        };
        match self.hold {
            Some(hold) => {
                self.held.push(record);
                self.due.get_or_insert_with(|| Instant::now() + hold);
            }
            None => {
                self.handed_over = true;
                self.append(record);
            }
        }
    }

    fn safe_point(&mut self, template: TemplateId, state_hash: StateHash) {
        if !self.since_safe_point && self.template == Some(template) {
            return;
        }
        // A safe point makes every command before it moot.
        self.drop_held();
        if !self.handed_over && self.template == Some(template) {
            // Back where the journal last saw the session, and none of
            // the commands since got there: nothing needs writing.
            self.since_safe_point = false;
            return;
        }
        self.define(template, None);
        self.append(Record::SafePoint {
            session: self.session,
            at: now_micros(),
            template,
            state_hash,
        });
        self.since_safe_point = false;
        self.handed_over = false;
        self.template = Some(template);
    }

    /// Writes a template's definition unless the journal has it.
    fn define(&mut self, id: TemplateId, template: Option<&Template>) {
        if !self.journal.needs_template(id) {
            return;
        }
        let registered;
        let template = match template {
            Some(template) => template,
            None => match self.registry.get(id) {
                Some(template) => {
                    registered = template;
                    &*registered
                }
                None => return,
            },
        };
        let encoding = match without_credentials(template) {
            Some(redacted) => redacted.canonical_encoding(),
            None => template.canonical_encoding(),
        };
        self.append(Record::Template {
            at: now_micros(),
            id,
            encoding: Bytes::from(encoding),
        });
    }

    fn drop_held(&mut self) {
        self.journal.count_superseded(self.held.len() as u64);
        self.held.clear();
        self.due = None;
    }

    /// When the held commands are due at the writer.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Hands the held commands to the writer.
    pub fn hand_over(&mut self) {
        self.due = None;
        if self.held.is_empty() {
            return;
        }
        self.handed_over = true;
        for record in std::mem::take(&mut self.held) {
            self.submit(record);
        }
    }

    /// Queues `record` after whatever is held, so that the journal keeps
    /// the session's order.
    fn append(&mut self, record: Record) {
        self.hand_over();
        self.submit(record);
    }

    fn submit(&mut self, record: Record) {
        if let Appended::Durable(done) = self.journal.append(record) {
            // Records become durable in order: the last one stands for all.
            self.durable = Some(done);
        }
    }

    /// The wait for the last record to be durable, if one is due.
    pub fn take_durable(&mut self) -> Option<oneshot::Receiver<()>> {
        self.durable.take()
    }

    /// How an attempt to carry the session over to a new server
    /// connection ended.
    pub fn append_outcome(&mut self, kind: OutcomeKind, detail: String) {
        self.append(Record::Outcome {
            session: self.session,
            at: now_micros(),
            kind,
            detail,
        });
    }

    pub fn end(&mut self) {
        // The session's end makes its unfinished commands moot.
        self.drop_held();
        self.append(Record::SessionEnd {
            session: self.session,
            at: now_micros(),
        });
    }
}

/// Wakes a session when its held commands are due at the writer.
///
/// A transaction usually ends long before its commands are due, and the
/// next one sets a later due time. Resetting a timer per transaction and
/// registering with it at every poll would cost more than the journal
/// saves, so the timer is left to fire at an earlier due time, re-armed
/// then, and registered with once per arming: the session task's waker
/// does not change.
#[derive(Default)]
pub struct HandOverTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The sleep was polled since it was last armed.
    registered: bool,
    /// The due time the timer was last armed or checked for.
    seen: Option<Instant>,
    /// The sleep fired since `seen` was checked.
    fired: bool,
}

impl HandOverTimer {
    /// Arms the timer for `due` unless it will fire by then anyway.
    /// Returns true when `due` has come.
    pub fn arm(&mut self, due: Option<Instant>) -> bool {
        if due == self.seen && !self.fired {
            // Nothing changed since the last turn: the usual case.
            return false;
        }
        self.seen = due;
        self.fired = false;
        let Some(due) = due else {
            return false;
        };
        match &mut self.sleep {
            None => {
                self.sleep = Some(Box::pin(tokio::time::sleep_until(due)));
                self.registered = false;
            }
            Some(sleep) if sleep.is_elapsed() || sleep.deadline() > due => {
                if due <= Instant::now() {
                    return true;
                }
                sleep.as_mut().reset(due);
                self.registered = false;
            }
            Some(_) => {}
        }
        false
    }

    /// Ready when the timer fired; the due time may still lie ahead
    /// (see [`HandOverTimer::arm`]).
    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(sleep) = &mut self.sleep else {
            return Poll::Pending;
        };
        let fired = if self.registered {
            sleep.is_elapsed()
        } else {
            self.registered = true;
            sleep.as_mut().poll(cx).is_ready()
        };
        if fired {
            self.fired = true;
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A copy of `template` whose prepared statements that carry a credential
/// (`PREPARE p AS ALTER ROLE … PASSWORD …`, or the same by protocol Parse)
/// have an empty text: the journal never holds a password. The copy's id
/// differs from the one the records name, which marks the definition as
/// redacted. `None` when nothing needs redacting.
fn without_credentials(template: &Template) -> Option<Template> {
    let options = LexOptions::default();
    let carries = |query: &[u8]| classify(query, &options) == Class::Candidate(Kind::Credential);
    if !template
        .prepared
        .values()
        .any(|statement| carries(&statement.query))
    {
        return None;
    }
    let mut redacted = template.clone();
    for statement in redacted.prepared.values_mut() {
        if carries(&statement.query) {
            statement.query = Bytes::new();
        }
    }
    Some(redacted)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fired(timer: &mut HandOverTimer) {
        std::future::poll_fn(|cx| timer.poll_fired(cx)).await;
    }

    #[tokio::test]
    async fn the_hand_over_timer_fires_at_an_earlier_due_time_and_is_armed_again() {
        let mut timer = HandOverTimer::default();
        let start = Instant::now();
        let first = start + Duration::from_millis(20);
        let second = start + Duration::from_millis(600);
        assert!(!timer.arm(Some(first)));
        // A later due time (the next transaction's) leaves it alone.
        assert!(!timer.arm(Some(second)));
        fired(&mut timer).await;
        assert!(Instant::now() >= first);
        assert!(!timer.arm(Some(second)), "armed again for the later time");
        fired(&mut timer).await;
        assert!(Instant::now() >= second);
        assert!(timer.arm(Some(second)), "the commands are due");
        assert!(!timer.arm(None));
    }

    #[tokio::test]
    async fn the_hand_over_timer_moves_to_an_earlier_due_time() {
        let mut timer = HandOverTimer::default();
        let start = Instant::now();
        let late = start + Duration::from_secs(60);
        let early = start + Duration::from_millis(20);
        assert!(!timer.arm(Some(late)));
        assert!(!timer.arm(Some(early)));
        tokio::time::timeout(Duration::from_secs(10), fired(&mut timer))
            .await
            .expect("the timer fires at the earlier time");
        assert!(timer.arm(Some(early)));
    }
}
