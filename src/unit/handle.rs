//! The handle the registry keeps for each unit: its current definition, a status snapshot the
//! unit loop keeps up to date, the unit's cancellation token and its control mailbox.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};

use jiff::Timestamp;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::definition::UnitConfig;
use crate::error::{Error, Result};
use crate::names::named_enum;
use crate::run::{RunRecord, Trigger};

named_enum! {
    /// A unit's state as `list` shows it, derived from what its loop is doing.
    pub enum UnitState("a unit state") {
        /// Next fire time known, or idle until started.
        Waiting = "waiting",
        /// At least one run is active.
        Running = "running",
        /// Waiting to retry a failed run or restart a service.
        Backoff = "backoff",
        /// Paused by the user.
        Paused = "paused",
        /// A one-shot job finished and nothing is scheduled.
        Done = "done",
        /// A service hit its start limit; `start` resets it.
        Fatal = "fatal",
    }
}

/// What the unit loop publishes about itself.
#[derive(Debug, Clone)]
pub struct UnitStatus {
    /// Derived state.
    pub state: UnitState,
    /// When it fires next.
    pub next_fire: Option<Timestamp>,
    /// The newest run.
    pub last_run: Option<RunRecord>,
    /// Ids of active runs.
    pub active: Vec<i64>,
    /// Runs started, ever.
    pub runs_total: u64,
    /// Runs that did not succeed, ever.
    pub failures_total: u64,
    /// When the unit was added.
    pub created_at: Timestamp,
    /// When its definition last changed.
    pub updated_at: Timestamp,
    /// Paused by the user (whatever the state shows while a run is active).
    pub paused: bool,
    /// A service stopped by the user.
    pub stopped: bool,
}

/// What is done to a dispatch by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchOp {
    /// Stop its active runs; its waiting hosts end `cancelled`.
    Cancel,
    /// Its waiting hosts wait until it is resumed (active ones go on).
    Pause,
    /// Go on; failures so far no longer count against `tolerance`.
    Resume,
}

/// A request to a unit's loop.
pub enum Control {
    /// `TaskUnit.Start`.
    Start {
        /// Why.
        trigger: Trigger,
        /// The run started, queued, or already running.
        reply: oneshot::Sender<Result<RunRecord>>,
    },
    /// `TaskUnit.Stop`: stop every active run; a service stays down until `Start`.
    Stop {
        /// How many runs were stopped.
        reply: oneshot::Sender<Result<usize>>,
    },
    /// `TaskUnit.Pause` (true) / `TaskUnit.Resume` (false).
    Pause {
        /// Pause or resume.
        paused: bool,
        /// Done.
        reply: oneshot::Sender<Result<()>>,
    },
    /// `TaskUnit.Edit`: the new definition applies from the next run.
    Edit {
        /// The validated new definition.
        config: Arc<UnitConfig>,
        /// When the edit was recorded.
        at: Timestamp,
        /// Done.
        reply: oneshot::Sender<Result<()>>,
    },
    /// `Run.Cancel`.
    Cancel {
        /// The run.
        run: i64,
        /// The run as it ended.
        reply: oneshot::Sender<Result<RunRecord>>,
    },
    /// From a run's executor: its process started. Answers nothing.
    Started {
        /// The run.
        run: i64,
        /// Its process id (= process group id).
        pid: u32,
        /// When it started.
        at: Timestamp,
    },
    /// `Dispatch.Cancel`, `Dispatch.Pause`, `Dispatch.Resume`.
    Dispatch {
        /// The dispatch.
        id: i64,
        /// What to do.
        op: DispatchOp,
        /// The dispatch as it is then.
        reply: oneshot::Sender<Result<crate::store::DispatchRecord>>,
    },
    /// `Run.Redo`: run an ended host's run again, as a new attempt on the same host.
    Redo {
        /// The run to do again.
        run: i64,
        /// The new run.
        reply: oneshot::Sender<Result<RunRecord>>,
    },
    /// `Run.Ignore`: a host's run no longer counts against its dispatch.
    Ignore {
        /// The run.
        run: i64,
        /// Done.
        reply: oneshot::Sender<Result<()>>,
    },
    /// `TaskUnit.Delete`: stop every run, wait for them, and end the loop.
    Delete {
        /// Answered once every run has ended and been recorded.
        reply: oneshot::Sender<()>,
    },
}

/// A `TaskUnit.Start` waiting in a unit's mailbox: why, and who to answer.
pub(crate) type StartRequest = (Trigger, oneshot::Sender<Result<RunRecord>>);

/// The requests waiting for a unit's loop. A queue and a `Notify` rather than a channel: a
/// tokio channel allocates a block of slots up front, which at 100,000 idle units is most
/// of a unit's memory. How many requests can wait is bounded by the RPC limits (connections
/// times requests in flight).
#[derive(Default)]
pub(crate) struct Mailbox {
    queue: Mutex<MailboxQueue>,
    wake: Notify,
}

#[derive(Default)]
struct MailboxQueue {
    items: VecDeque<Control>,
    closed: bool,
}

impl Mailbox {
    fn queue(&self) -> std::sync::MutexGuard<'_, MailboxQueue> {
        self.queue.lock().expect("unit mailbox lock")
    }

    /// Queues a request; gives it back if the loop is gone.
    fn send(&self, c: Control) -> std::result::Result<(), Control> {
        let mut q = self.queue();
        if q.closed {
            return Err(c);
        }
        q.items.push_back(c);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }
}

/// The loop's end of a unit's [`Mailbox`]. Dropping it (the loop ended, or panicked) closes
/// the mailbox and drops what waits in it, so every caller hears that the loop is gone.
pub(crate) struct Inbox(pub(crate) Arc<UnitShared>);

impl Inbox {
    /// The next request, waiting for one if needed. Cancel-safe: a request is taken out of
    /// the queue only when this returns it.
    pub(crate) async fn recv(&mut self) -> Option<Control> {
        loop {
            if let Some(c) = self.0.mailbox.queue().items.pop_front() {
                return Some(c);
            }
            // `notify_one` stores a permit when no one waits, so a request queued between
            // the look above and this wait is not missed.
            self.0.mailbox.wake.notified().await;
        }
    }

    /// Takes the `Start` requests at the front of the queue, up to `max`, without waiting, so
    /// that a burst of starts of one unit is recorded in one change. `Started` notices met
    /// on the way are taken too and returned apart (they only update records, so handling
    /// them after the starts changes nothing, and they would otherwise split the burst).
    /// Stops at the first other request: requests are still handled in the order they came.
    pub(crate) fn take_starts(&mut self, max: usize) -> (Vec<StartRequest>, Vec<Control>) {
        let mut q = self.0.mailbox.queue();
        let (mut starts, mut notices) = (Vec::new(), Vec::new());
        while starts.len() < max {
            match q.items.pop_front() {
                Some(Control::Start { trigger, reply }) => starts.push((trigger, reply)),
                Some(n @ Control::Started { .. }) => notices.push(n),
                Some(other) => {
                    q.items.push_front(other);
                    break;
                }
                None => break,
            }
        }
        (starts, notices)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let items = {
            let mut q = self.0.mailbox.queue();
            q.closed = true;
            std::mem::take(&mut q.items)
        };
        // Dropped outside the lock: each drop answers a caller with "gone".
        drop(items);
    }
}

pub(crate) struct UnitShared {
    pub(crate) name: String,
    pub(crate) config: RwLock<Arc<UnitConfig>>,
    pub(crate) status: Mutex<UnitStatus>,
    pub(crate) mailbox: Mailbox,
    pub(crate) token: CancellationToken,
    /// Serialises changes to this unit (edit, pause, delete) made by callers.
    pub(crate) op: tokio::sync::Mutex<()>,
}

/// A cheap-to-clone handle to one unit.
#[derive(Clone)]
pub struct UnitHandle(pub(crate) Arc<UnitShared>);

impl UnitHandle {
    /// The unit's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The current definition.
    pub fn config(&self) -> Arc<UnitConfig> {
        self.0.config.read().expect("unit config lock").clone()
    }

    /// A snapshot of the unit's status.
    pub fn status(&self) -> UnitStatus {
        self.0.status.lock().expect("unit status lock").clone()
    }

    /// The unit's state, without copying the rest of its status.
    pub fn state(&self) -> UnitState {
        self.0.status.lock().expect("unit status lock").state
    }

    /// `view` of the unit's status if it satisfies `keep`, both under one lock, so the view is
    /// of the status that was tested. Keep `view` short: the unit's loop waits for the lock.
    pub fn status_if<T>(
        &self,
        keep: impl FnOnce(&UnitStatus) -> bool,
        view: impl FnOnce(&UnitStatus) -> T,
    ) -> Option<T> {
        let st = self.0.status.lock().expect("unit status lock");
        keep(&st).then(|| view(&st))
    }

    /// Sends a request to the unit's loop and waits for the answer.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        // The loop is gone: the daemon is shutting down, or the unit was just deleted.
        let gone = || {
            if self.0.token.is_cancelled() {
                Error::ShuttingDown
            } else {
                Error::UnitNotFound(self.0.name.clone())
            }
        };
        self.0.mailbox.send(make(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Queues a notice that wants no answer; dropped if the loop is gone.
    pub(crate) fn tell(&self, c: Control) {
        let _ = self.0.mailbox.send(c);
    }

    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.op.lock().await
    }
}
