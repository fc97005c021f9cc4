//! Orders from the proxy to its running sessions (drain, terminate),
//! delivered without touching any shared lock on the per-message path.
//!
//! Each session polls its own [`SessionControl`]: an atomic and an
//! `AtomicWaker`. The handle remembers which waker it left there, so while
//! no order stands and the task's waker is unchanged, checking costs one
//! load of a line shared read-only by every session, and no write. The proxy broadcasts
//! an order by walking the registry, which only happens at shutdown.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};

use dashmap::DashMap;
use futures_util::task::AtomicWaker;

/// What a session is asked to do; orders only ever escalate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Order {
    Run = 0,
    /// End at the next moment the session is idle.
    Drain = 1,
    /// End now.
    Terminate = 2,
}

impl Order {
    fn from_u8(value: u8) -> Order {
        match value {
            0 => Order::Run,
            1 => Order::Drain,
            _ => Order::Terminate,
        }
    }
}

#[derive(Debug, Default)]
pub struct SessionControl {
    order: AtomicU8,
    waker: AtomicWaker,
}

impl SessionControl {
    /// The current order; the task is woken when it changes.
    pub fn poll_order(&self, cx: &mut Context<'_>) -> Order {
        // Register first, then read: an order given in between still wakes
        // the task.
        self.waker.register(cx.waker());
        Order::from_u8(self.order.load(Ordering::Acquire))
    }

    fn give(&self, order: Order) {
        if self.order.fetch_max(order as u8, Ordering::AcqRel) < order as u8 {
            self.waker.wake();
        }
    }
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Standing(AtomicU8);

/// Every running session's control.
#[derive(Debug, Default)]
pub struct Sessions {
    controls: DashMap<u64, Arc<SessionControl>>,
    /// The strongest order given so far; sessions registering later get it
    /// too. On a line of its own, away from `next_id`.
    standing: Standing,
    next_id: AtomicU64,
}

impl Sessions {
    pub fn register(self: &Arc<Self>) -> ControlHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(SessionControl::default());
        self.controls.insert(id, Arc::clone(&control));
        // Read after inserting: a broadcast that missed the map entry has
        // already raised `standing`.
        control.give(Order::from_u8(self.standing.0.load(Ordering::Acquire)));
        ControlHandle {
            sessions: Arc::clone(self),
            id,
            control,
            registered: None,
        }
    }

    /// Gives `order` to every session, present and future.
    pub fn broadcast(&self, order: Order) {
        self.standing.0.fetch_max(order as u8, Ordering::AcqRel);
        for entry in &self.controls {
            entry.value().give(order);
        }
    }

    pub fn len(&self) -> usize {
        self.controls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.controls.is_empty()
    }
}

/// A session's registration; dropping it removes the session.
#[derive(Debug)]
pub struct ControlHandle {
    sessions: Arc<Sessions>,
    id: u64,
    control: Arc<SessionControl>,
    /// The waker left in `control` by the last poll that saw no order. It
    /// stays there until an order takes it; while an order stands, every
    /// poll registers again.
    registered: Option<Waker>,
}

impl ControlHandle {
    /// The current order; the task is woken when it changes.
    pub fn poll_order(&mut self, cx: &mut Context<'_>) -> Order {
        let waker = cx.waker();
        // Orders come only as broadcasts, which raise `standing` first: a
        // line every session reads and nothing writes until shutdown, so
        // this check stays in the cache.
        if self.sessions.standing.0.load(Ordering::Acquire) == Order::Run as u8
            && self
                .registered
                .as_ref()
                .is_some_and(|registered| registered.will_wake(waker))
        {
            return Order::Run;
        }
        let order = self.control.poll_order(cx);
        self.registered = (order == Order::Run).then(|| waker.clone());
        order
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.sessions.controls.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::task::Poll;

    #[tokio::test]
    async fn orders_reach_present_and_future_sessions() {
        let sessions = Arc::new(Sessions::default());
        let mut early = sessions.register();
        let waiter = tokio::spawn(async move {
            poll_fn(|cx| match early.poll_order(cx) {
                Order::Run => Poll::Pending,
                order => Poll::Ready(order),
            })
            .await
        });
        tokio::task::yield_now().await;
        sessions.broadcast(Order::Drain);
        assert_eq!(waiter.await.expect("join"), Order::Drain);
        let mut late = sessions.register();
        let order = poll_fn(|cx| Poll::Ready(late.poll_order(cx))).await;
        assert_eq!(order, Order::Drain);
        sessions.broadcast(Order::Run);
        assert_eq!(
            poll_fn(|cx| Poll::Ready(late.poll_order(cx))).await,
            Order::Drain,
            "orders never weaken"
        );
        assert_eq!(
            sessions.len(),
            1,
            "the waiter's handle was dropped with its task"
        );
    }

    #[tokio::test]
    async fn a_stronger_order_wakes_a_session_that_saw_a_weaker_one() {
        let sessions = Arc::new(Sessions::default());
        let mut handle = sessions.register();
        let (seen, mut orders) = tokio::sync::mpsc::unbounded_channel();
        let waiter = tokio::spawn(async move {
            poll_fn(|cx| {
                let order = handle.poll_order(cx);
                seen.send(order).expect("test alive");
                match order {
                    Order::Terminate => Poll::Ready(order),
                    _ => Poll::Pending,
                }
            })
            .await
        });
        assert_eq!(orders.recv().await, Some(Order::Run));
        sessions.broadcast(Order::Drain);
        assert_eq!(orders.recv().await, Some(Order::Drain));
        sessions.broadcast(Order::Terminate);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("the terminate order woke the session")
            .expect("join");
        assert_eq!(ended, Order::Terminate);
    }
}
