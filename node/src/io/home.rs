//! Cross-shard wake-ups that can never block a shard.
//!
//! A task on shard A often waits on something shard B completes (a produce
//! answer, a long poll, a group join). Waking it from B's thread makes the
//! runtime push A's task onto a bounded cross-thread queue; when that queue
//! is full, the waking thread spins until A drains it. If A is at that moment
//! spinning on B's full queue, both shards stop for good.
//!
//! The fix is structural: every task a shard spawns is wrapped in [`Homed`],
//! whose waker, when woken from another thread, hands the task's real waker
//! to its home shard's relay (an unbounded channel) instead of scheduling it
//! directly. Only the relay task itself, one per shard, is ever woken from
//! another thread, so the runtime's queue can never fill, and each task is
//! queued on the relay at most once between two polls.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, ThreadId};

use futures_channel::mpsc;
use futures_util::StreamExt;

/// A shard's relay: where other threads leave the wakers of its tasks.
#[derive(Clone)]
struct Relay {
    thread: ThreadId,
    wakers: mpsc::UnboundedSender<Arc<HomeWaker>>,
}

thread_local! {
    static RELAY: RefCell<Option<Relay>> = const { RefCell::new(None) };
}

/// Starts this thread's relay task. Call once, inside the shard's runtime,
/// before spawning anything else; tasks spawned with [`spawn`] afterwards are
/// woken through it.
pub fn install_relay() {
    let (wakers, mut arrivals) = mpsc::unbounded::<Arc<HomeWaker>>();
    compio::runtime::spawn(async move {
        while let Some(waker) = arrivals.next().await {
            waker.queued.store(false, Ordering::Release);
            waker.inner.wake_by_ref();
        }
    })
    .detach();
    RELAY.with(|relay| {
        *relay.borrow_mut() = Some(Relay {
            thread: thread::current().id(),
            wakers,
        });
    });
}

/// Spawns `future` on this thread's runtime, homed on this thread's relay
/// when there is one (a shard), plainly otherwise (a client, a tool).
pub fn spawn<F: Future + 'static>(future: F) -> compio::runtime::JoinHandle<F::Output> {
    compio::runtime::spawn(homed(future))
}

/// `future`, woken through this thread's relay when woken from elsewhere.
pub fn homed<F: Future>(future: F) -> Homed<F> {
    Homed {
        future,
        relay: RELAY.with(|relay| relay.borrow().clone()),
        waker: None,
    }
}

pin_project_lite::pin_project! {
    /// A future whose cross-thread wake-ups go through its home shard's relay.
    pub struct Homed<F> {
        #[pin]
        future: F,
        relay: Option<Relay>,
        // The waker handed to the inner future, rebuilt only when the task's
        // own waker changes.
        waker: Option<(Arc<HomeWaker>, Waker)>,
    }
}

struct HomeWaker {
    inner: Waker,
    thread: ThreadId,
    wakers: mpsc::UnboundedSender<Arc<HomeWaker>>,
    /// Set while this waker sits in the relay's channel: a task woken many
    /// times from afar is queued once.
    queued: AtomicBool,
}

impl Wake for HomeWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if thread::current().id() == self.thread {
            self.inner.wake_by_ref();
        } else if !self.queued.swap(true, Ordering::AcqRel)
            && self.wakers.unbounded_send(Arc::clone(self)).is_err()
        {
            // The shard is gone; waking directly is all that is left.
            self.inner.wake_by_ref();
        }
    }
}

impl<F: Future> Future for Homed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(relay) = this.relay.as_ref() else {
            return this.future.poll(cx);
        };
        let current = match this.waker.as_ref() {
            Some((home, waker)) if home.inner.will_wake(cx.waker()) => waker.clone(),
            _ => {
                let home = Arc::new(HomeWaker {
                    inner: cx.waker().clone(),
                    thread: relay.thread,
                    wakers: relay.wakers.clone(),
                    queued: AtomicBool::new(false),
                });
                let waker = Waker::from(Arc::clone(&home));
                *this.waker = Some((home, waker.clone()));
                waker
            }
        };
        this.future.poll(&mut Context::from_waker(&current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_channel::oneshot;

    #[test]
    fn a_task_woken_from_another_thread_runs_through_the_relay() {
        let runtime = compio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            install_relay();
            let mut senders = Vec::new();
            let mut tasks = Vec::new();
            // Far more tasks than the runtime's cross-thread queue holds.
            for index in 0..500u32 {
                let (sender, receiver) = oneshot::channel::<u32>();
                senders.push(sender);
                tasks.push(spawn(
                    async move { receiver.await.map(|value| value + index) },
                ));
            }
            let waker_thread = thread::spawn(move || {
                for sender in senders {
                    let _ = sender.send(1);
                }
            });
            for (index, task) in tasks.into_iter().enumerate() {
                let value = task.await.expect("task").expect("answer");
                assert_eq!(value, index as u32 + 1);
            }
            waker_thread.join().expect("waker thread");
        });
    }

    #[test]
    fn without_a_relay_futures_run_plainly() {
        let runtime = compio::runtime::Runtime::new().expect("runtime");
        let value = runtime.block_on(async { spawn(async { 7 }).await.expect("task") });
        assert_eq!(value, 7);
    }
}
