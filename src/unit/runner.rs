//! The per-unit loop: one tokio task per unit that owns everything that happens to it.
//! It turns schedule fires, manual starts, retries and service restarts into runs, applies
//! the overlap policy, stops runs on request, and publishes a status snapshot.
//!
//! Each run is its own task (in the loop's `JoinSet`) with a child cancellation token: the
//! executor ([`crate::executor`]) runs it to its end and hands the record back, and the loop
//! records the outcome through the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::definition::{CatchUp, Overlap, Restart, UnitConfig};
use super::dispatch::Progress;
use super::handle::{
    Control, DispatchOp, Inbox, StartRequest, UnitHandle, UnitShared, UnitState, UnitStatus,
};
use crate::error::{Error, Result};
use crate::executor::{LocalExecutor, OnStart, StopCause};
use crate::fleet::remote::RemoteExecutor;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::run::{RunRecord, RunState, StopReason, Trigger};
use crate::store::{DispatchRecord, DispatchState, EventKind, Store};

/// What every unit loop needs from the daemon.
#[derive(Clone)]
pub struct RunnerEnv {
    /// The store.
    pub store: Store,
    /// Runs kept per unit unless the unit says otherwise.
    pub keep_runs: u32,
    /// Where runs on this host execute.
    pub executor: Arc<LocalExecutor>,
    /// Where runs on agents execute.
    pub remote: Arc<RemoteExecutor>,
    /// Where runs started and ended are counted.
    pub metrics: Metrics,
    /// Sends the units' webhooks.
    pub notifier: Notifier,
}

/// How a unit loop starts.
pub struct InitialState {
    /// Paused by the user.
    pub paused: bool,
    /// A service stopped by the user.
    pub stopped: bool,
    /// Last fire time handled.
    pub last_fire: Option<Timestamp>,
    /// Counters.
    pub runs_total: u64,
    /// Counters.
    pub failures_total: u64,
    /// The newest run.
    pub last_run: Option<RunRecord>,
    /// When added.
    pub created_at: Timestamp,
    /// When last edited.
    pub updated_at: Timestamp,
    /// Where `every` schedules count from.
    pub anchor: Timestamp,
    /// Just added (`add` trigger) rather than loaded at daemon start.
    pub fresh: bool,
    /// Start nothing on its own (a unit brought back after a failed delete).
    pub quiet: bool,
    /// Its dispatches a previous daemon left unfinished, with their runs: taken over.
    pub dispatches: Vec<(DispatchRecord, Vec<RunRecord>)>,
}

/// Spawns the loop of a unit and returns its handle, and a receiver that resolves once the
/// loop has started what it starts on its own (the `add` run, a service).
pub fn spawn(
    env: Arc<RunnerEnv>,
    config: Arc<UnitConfig>,
    init: InitialState,
    parent: &CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> (UnitHandle, oneshot::Receiver<()>) {
    let (ready_tx, ready_rx) = oneshot::channel();
    let token = parent.child_token();
    let shared = Arc::new(UnitShared {
        name: config.name.clone(),
        config: std::sync::RwLock::new(config.clone()),
        status: Mutex::new(UnitStatus {
            state: UnitState::Waiting,
            next_fire: None,
            last_run: init.last_run.clone(),
            active: Vec::new(),
            runs_total: init.runs_total,
            failures_total: init.failures_total,
            created_at: init.created_at,
            updated_at: init.updated_at,
            paused: init.paused,
            stopped: init.stopped,
        }),
        mailbox: Default::default(),
        token: token.clone(),
        op: tokio::sync::Mutex::new(()),
    });
    let handle = UnitHandle(shared.clone());
    let inbox = Inbox(shared.clone());
    let l = Loop {
        env,
        shared,
        cfg: config,
        runs: JoinSet::new(),
        tasks: HashMap::new(),
        active: HashMap::new(),
        queued: None,
        dispatches: HashMap::new(),
        queued_fire: None,
        next_fire: None,
        fired: init.last_fire,
        anchor: init.anchor,
        pending: None,
        failures_in_row: 0,
        starts: VecDeque::new(),
        paused: init.paused,
        stopped: init.stopped,
        fatal: false,
        deleting: None,
        runs_total: init.runs_total,
        failures_total: init.failures_total,
        last_run: init.last_run,
    };
    // Boxed: the task's future then holds a pointer to the loop's state, not a copy of it.
    let taken_over = init.dispatches;
    tracker.spawn(Box::new(l).run(
        inbox,
        token,
        (init.fresh, init.quiet, init.last_fire, taken_over),
        ready_tx,
    ));
    (handle, ready_rx)
}

struct ActiveRun {
    token: CancellationToken,
    why: StopCause,
    record: RunRecord,
    waiters: Vec<oneshot::Sender<Result<RunRecord>>>,
}

/// At most this many `Start`s waiting together are recorded in one change.
const STARTS_TOGETHER: usize = 256;

/// A retry or restart waiting for its back-off delay.
struct Pending {
    at: Instant,
    trigger: Trigger,
    attempt: u32,
}

struct Loop {
    env: Arc<RunnerEnv>,
    shared: Arc<UnitShared>,
    cfg: Arc<UnitConfig>,
    runs: JoinSet<RunRecord>,
    /// Which run each task in `runs` executes, to account for a task that panicked.
    tasks: HashMap<tokio::task::Id, i64>,
    /// Boxed: a map allocates room for several entries, and most units have one run at most.
    active: HashMap<i64, Box<ActiveRun>>,
    /// One run waiting for the active one (`overlap: queue`, or a replace in progress).
    queued: Option<RunRecord>,
    /// Dispatches in flight, by id.
    dispatches: HashMap<i64, Box<Progress>>,
    /// A fire waiting for the dispatches in flight to end (`overlap: queue` or `replace` of a
    /// unit on agents): its trigger and fire time.
    queued_fire: Option<(Trigger, Option<Timestamp>)>,
    next_fire: Option<Timestamp>,
    /// The newest fire time handled: the next fire is after it, so that one made ahead of its
    /// time ([`FIRE_LEAD`]) is not due again when the next fire is worked out anew before that
    /// time (a restart, a resume, a new schedule).
    fired: Option<Timestamp>,
    anchor: Timestamp,
    pending: Option<Pending>,
    failures_in_row: u32,
    starts: VecDeque<Instant>,
    paused: bool,
    stopped: bool,
    fatal: bool,
    deleting: Option<oneshot::Sender<()>>,
    runs_total: u64,
    failures_total: u64,
    last_run: Option<RunRecord>,
}

/// How far ahead of its time a fire on agents is made: recorded (a commit, which waits its
/// turn in the store's group under load) and sent, its agent starts it at its time
/// ([`crate::proto::Assignment::start_at_us`]). So its lateness is the agent's, not the
/// server's. A pause or edit of the unit within this lead is too late for that fire, as one
/// just after its time would be; a stop cancels it unstarted; a manual start within it finds
/// it in flight.
pub const FIRE_LEAD: Duration = Duration::from_millis(500);
const _: () = assert!(FIRE_LEAD.as_millis() < crate::proto::START_WAIT_MAX.as_millis());

/// A scheduled run on an agent, `active` as the loop knew it, started `at` (if it did): its
/// fire's lateness, measured there, after the run was dispatched ahead of its time. Once: the
/// loop's record has a pid from then on (a run taken over had one already).
fn agent_started(metrics: &Metrics, active: &RunRecord, at: Option<Timestamp>) {
    if !active.is_local()
        && active.pid.is_none()
        && let (Some(scheduled), Some(at)) = (active.scheduled_at, at)
    {
        metrics.fire_started(scheduled, at);
    }
}

/// How a loop starts: fresh, quiet, the last fire handled, dispatches to take over.
type StartUp = (bool, bool, Option<Timestamp>, Vec<(DispatchRecord, Vec<RunRecord>)>);

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The tokio instant at which wall-clock time `t` arrives.
fn instant_of(t: Timestamp) -> Instant {
    let now = Timestamp::now();
    let d = t.duration_since(now);
    if d.is_negative() {
        Instant::now()
    } else {
        Instant::now() + Duration::try_from(d).unwrap_or(Duration::ZERO)
    }
}

impl Loop {
    async fn run(
        mut self: Box<Self>,
        mut rx: Inbox,
        token: CancellationToken,
        init: StartUp,
        ready: oneshot::Sender<()>,
    ) {
        // Every handler below is boxed: the loop's own future stays small (it is most of an
        // idle unit's memory), and a handler's state exists only while it runs.
        let (fresh, quiet, last_fire, taken_over) = init;
        if !taken_over.is_empty() {
            Box::pin(self.take_over(taken_over)).await;
        }
        Box::pin(self.start_up(fresh, quiet, last_fire)).await;
        self.answer(ready, ());
        loop {
            self.publish();
            let fire_at = if self.paused || self.deleting.is_some() {
                None
            } else {
                let lead = if self.fires_ahead() { FIRE_LEAD } else { Duration::ZERO };
                self.next_fire.map(|t| instant_of(t).checked_sub(lead).unwrap_or_else(Instant::now))
            };
            let pending_at =
                if self.deleting.is_some() { None } else { self.pending.as_ref().map(|p| p.at) };
            let retry_at = self.dispatches.values().filter_map(|p| p.next_retry()).min();
            tokio::select! {
                ctl = rx.recv() => match ctl {
                    // Starts that each make a new run: take the others waiting behind this
                    // one and record them all in one change.
                    Some(Control::Start { trigger, reply }) if self.starts_together() => {
                        let mut starts = vec![(trigger, reply)];
                        let (more, notices) = rx.take_starts(STARTS_TOGETHER - 1);
                        starts.extend(more);
                        Box::pin(self.manual_starts(starts)).await;
                        for n in notices {
                            Box::pin(self.control(n)).await;
                        }
                    }
                    Some(c) => {
                        if Box::pin(self.control(c)).await {
                            break;
                        }
                    }
                    None => break,
                },
                Some(done) = self.runs.join_next_with_id(), if !self.runs.is_empty() => {
                    // Runs of a unit that starts them together also end together: the ends
                    // already there are recorded in one change.
                    let mut ended = Vec::new();
                    let mut next = Some(done);
                    while let Some(done) = next {
                        match done {
                            Ok((task, rec)) => {
                                self.tasks.remove(&task);
                                ended.push(rec);
                            }
                            Err(e) => Box::pin(self.crashed(e)).await,
                        }
                        // Ends of a dispatch's runs too: a thousand hosts' results come
                        // in together.
                        next = if self.starts_together() || self.cfg.is_remote() {
                            self.runs.try_join_next_with_id()
                        } else {
                            None
                        };
                    }
                    if !ended.is_empty() {
                        Box::pin(self.finished(ended)).await;
                    }
                    if self.deleting.is_some() && self.active.is_empty() {
                        break;
                    }
                }
                _ = sleep_until_opt(fire_at) => Box::pin(self.fire()).await,
                _ = sleep_until_opt(retry_at) => Box::pin(self.dispatch_retries()).await,
                _ = sleep_until_opt(pending_at) => {
                    // A retry or restart never runs alongside another run of the unit.
                    if let Some(p) = self.pending.take()
                        && self.active.is_empty()
                    {
                        Box::pin(self.start_run(p.trigger, p.attempt)).await;
                    }
                }
                _ = token.cancelled(), if self.deleting.is_none() => {
                    self.stop_all(StopReason::Shutdown);
                    Box::pin(async {
                        self.cancel_queued(StopReason::Shutdown).await;
                        self.drain().await;
                    })
                    .await;
                    break;
                }
            }
        }
        if let Some(reply) = self.deleting.take() {
            self.answer(reply, ());
        }
    }

    async fn start_up(&mut self, fresh: bool, quiet: bool, last_fire: Option<Timestamp>) {
        let now = Timestamp::now();
        if quiet {
            self.next_fire = self.next_fire_after(now);
            return;
        }
        if let Some(s) = self.cfg.schedule.clone() {
            // Fire times before the anchor (the last edit) belong to an older definition.
            let since = last_fire.map_or(self.anchor, |l| l.max(self.anchor));
            if !fresh
                && !self.paused
                && self.cfg.catch_up == CatchUp::Once
                && let Some(missed) = s.latest_missed(since, now, self.anchor)
            {
                self.env.store.set_last_fire(&self.cfg.name, now);
                // For the newest fire missed: a store that records fires (a cluster's) makes
                // it once, whoever holds the lease.
                let _ = self.try_start_run(Trigger::CatchUp, 1, Some(missed)).await;
            }
            self.next_fire = self.next_fire_after(now);
            return;
        }
        if self.paused {
            return;
        }
        let continuous = self.cfg.service || self.cfg.is_tick();
        if continuous && !self.stopped {
            let trigger = if fresh { Trigger::Add } else { Trigger::Restart };
            self.start_run(trigger, 1).await;
        } else if !continuous && fresh {
            self.start_run(Trigger::Add, 1).await;
        } else if !continuous && self.last_run.is_none() && self.runs_total == 0 {
            // Added, acknowledged, but the daemon stopped before its first run started.
            self.start_run(Trigger::Add, 1).await;
        }
    }

    fn derive_state(&self) -> UnitState {
        if self.fatal {
            UnitState::Fatal
        } else if !self.active.is_empty() {
            UnitState::Running
        } else if self.paused {
            UnitState::Paused
        } else if self.pending.is_some() || self.queued.is_some() {
            UnitState::Backoff
        } else if self.next_fire.is_some() {
            UnitState::Waiting
        } else if self.cfg.service || self.cfg.is_tick() {
            if self.stopped || self.last_run.is_none() {
                UnitState::Waiting
            } else {
                UnitState::Done
            }
        } else if self.last_run.is_some() {
            UnitState::Done
        } else {
            UnitState::Waiting
        }
    }

    /// Publishes the status, then answers: a caller never sees a snapshot older than its
    /// own change.
    fn answer<T>(&self, reply: oneshot::Sender<T>, value: T) {
        self.publish();
        let _ = reply.send(value);
    }

    fn publish(&self) {
        let mut st = self.shared.status.lock().expect("unit status lock");
        st.state = self.derive_state();
        // The next time something starts on its own: a fire, or a retry/restart after back-off.
        let pending = self.pending.as_ref().map(|p| {
            let wait = p.at.saturating_duration_since(Instant::now());
            Timestamp::now() + jiff::SignedDuration::try_from(wait).unwrap_or_default()
        });
        st.next_fire = match (self.paused, pending, self.next_fire) {
            (true, _, _) => None,
            (false, Some(p), Some(f)) => Some(p.min(f)),
            (false, p, f) => p.or(f),
        };
        st.last_run = self.last_run.clone();
        st.active = self.active.keys().copied().collect();
        st.active.sort_unstable();
        st.runs_total = self.runs_total;
        st.failures_total = self.failures_total;
        st.paused = self.paused;
        st.stopped = self.stopped;
    }

    /// Handles one request; returns true when the loop should end (deleted, nothing active).
    async fn control(&mut self, c: Control) -> bool {
        match c {
            Control::Start { trigger, reply } => {
                let r = self.manual_start(trigger).await;
                self.answer(reply, r);
            }
            Control::Stop { reply } => self.stop(reply).await,
            Control::Pause { paused, reply } => self.pause(paused, reply).await,
            Control::Edit { config, at, reply } => self.edit(config, at, reply).await,
            Control::Cancel { run, reply } => self.cancel(run, reply).await,
            Control::Started { run, pid, at } => self.started(run, pid, at),
            Control::Dispatch { id, op, reply } => {
                let r = Box::pin(self.dispatch_op(id, op)).await;
                self.answer(reply, r);
            }
            Control::Redo { run, reply } => {
                let r = Box::pin(self.redo(run)).await;
                self.answer(reply, r);
            }
            Control::Ignore { run, reply } => {
                let r = Box::pin(self.ignore(run)).await;
                self.answer(reply, r);
            }
            Control::Delete { reply } => return self.delete(reply).await,
        }
        false
    }

    /// `TaskUnit.Stop`: every run stopped, and a service kept down until started.
    async fn stop(&mut self, reply: oneshot::Sender<Result<usize>>) {
        let n = self.stop_all(StopReason::Stopped);
        self.queued_fire = None;
        let q = self.cancel_queued(StopReason::Stopped).await
            + Box::pin(self.cancel_dispatches(StopReason::Stopped)).await;
        self.pending = None;
        if self.cfg.service || self.cfg.is_tick() {
            self.stopped = true;
        }
        let r = self
            .env
            .store
            .set_flags(&self.cfg.name, self.paused, self.stopped, EventKind::UnitStopped)
            .await
            .map(|_| n + q)
            .map_err(|e| {
                Error::NotRecorded(format!(
                    "{} run(s) stopped, but the stop was not recorded ({e}): a daemon \
                         restart would start the unit again",
                    n + q
                ))
            });
        self.answer(reply, r);
    }

    /// `TaskUnit.Pause` and `Resume`.
    async fn pause(&mut self, paused: bool, reply: oneshot::Sender<Result<()>>) {
        if paused == self.paused {
            // Already so: nothing to record, nothing to start.
            self.answer(reply, Ok(()));
            return;
        }
        let kind = if paused { EventKind::UnitPaused } else { EventKind::UnitResumed };
        let r = self.env.store.set_flags(&self.cfg.name, paused, self.stopped, kind).await;
        if r.is_ok() {
            self.paused = paused;
            if !paused {
                // Resuming is a fresh start: a fatal service gets its starts back.
                self.fatal = false;
                self.starts.clear();
                self.failures_in_row = 0;
                let now = Timestamp::now();
                let idle = self.active.is_empty() && self.pending.is_none();
                if self.cfg.schedule.is_some() {
                    self.next_fire = self.next_fire_after(now);
                } else if (self.cfg.service || self.cfg.is_tick()) && !self.stopped && idle {
                    self.start_run(Trigger::Manual, 1).await;
                } else if idle && self.last_run.is_none() && self.runs_total == 0 {
                    // A one-shot job added paused runs when it is resumed.
                    self.start_run(Trigger::Add, 1).await;
                }
            } else {
                self.pending = None;
            }
        }
        self.answer(reply, r);
    }

    /// `TaskUnit.Edit`: the new definition applies from the next run.
    async fn edit(
        &mut self,
        config: Arc<UnitConfig>,
        at: Timestamp,
        reply: oneshot::Sender<Result<()>>,
    ) {
        let was_continuous = self.cfg.service || self.cfg.is_tick();
        let old = &self.cfg.def;
        let rescheduled = (&old.every, &old.cron, &old.tz)
            != (&config.def.every, &config.def.cron, &config.def.tz);
        *self.shared.config.write().expect("unit config lock") = config.clone();
        self.cfg = config;
        self.shared.status.lock().expect("unit status lock").updated_at = at;
        // Only a new schedule moves the next fire; other edits leave it due.
        if rescheduled {
            self.anchor = at;
            self.next_fire = self.next_fire_after(Timestamp::now());
        }
        let continuous = self.cfg.service || self.cfg.is_tick();
        if continuous != was_continuous {
            // A pending retry (job) or restart (service) belongs to the old kind.
            self.pending = None;
        }
        if continuous && !was_continuous && !self.paused && self.active.is_empty() {
            self.stopped = false;
            self.start_run(Trigger::Manual, 1).await;
        }
        if !continuous {
            self.fatal = false;
        }
        self.answer(reply, Ok(()));
    }

    /// `Run.Cancel`: answered once the run has ended (a queued one, at once).
    async fn cancel(&mut self, run: i64, reply: oneshot::Sender<Result<RunRecord>>) {
        if let Some(a) = self.active.get_mut(&run) {
            // A stop already under way (a timeout, say) keeps its reason.
            a.why.set(StopReason::Cancelled);
            a.token.cancel();
            a.waiters.push(reply);
        } else if self.queued.as_ref().is_some_and(|q| q.id == run) {
            let r = self.cancel_queued(StopReason::Cancelled).await;
            let rec = self.last_run.clone().filter(|_| r > 0);
            self.answer(reply, rec.ok_or(Error::RunNotFound(run)));
        } else if let Some((id, mut q)) =
            self.dispatches.iter_mut().find_map(|(id, p)| p.take_waiting_run(run).map(|q| (*id, q)))
        {
            // A host waiting for its turn in a dispatch.
            q = q.cancelled(StopReason::Cancelled.as_str());
            let r =
                self.env.store.finish_run(q.clone(), self.keep_runs()).await.map(|()| q.clone());
            if let Some(p) = self.dispatches.get_mut(&id) {
                p.ended(&q);
            }
            self.advance(id).await;
            self.answer(reply, r);
        } else {
            self.answer(reply, Err(Error::Conflict(format!("run {run} is not active"))));
        }
    }

    /// The executor says run `run`'s process started.
    fn started(&mut self, run: i64, pid: u32, at: Timestamp) {
        // A run that has ended meanwhile was recorded with these already.
        if let Some(a) = self.active.get_mut(&run) {
            agent_started(&self.env.metrics, &a.record, Some(at));
            a.record.pid = Some(pid);
            a.record.started_at = Some(at);
            if self.last_run.as_ref().is_some_and(|l| l.id == run) {
                self.last_run = Some(a.record.clone());
            }
        }
    }

    /// `TaskUnit.Delete`: every run stopped; true when the loop can end now (nothing active).
    async fn delete(&mut self, reply: oneshot::Sender<()>) -> bool {
        self.stop_all(StopReason::Deleted);
        self.cancel_queued(StopReason::Deleted).await;
        self.queued_fire = None;
        Box::pin(self.cancel_dispatches(StopReason::Deleted)).await;
        self.pending = None;
        self.next_fire = None;
        self.deleting = Some(reply);
        if self.active.is_empty() {
            self.drain().await;
            return true;
        }
        false
    }

    async fn manual_start(&mut self, trigger: Trigger) -> Result<RunRecord> {
        if self.deleting.is_some() {
            return Err(Error::UnitNotFound(self.cfg.name.clone()));
        }
        self.fatal = false;
        self.failures_in_row = 0;
        self.starts.clear();
        if self.stopped {
            self.stopped = false;
            self.env
                .store
                .set_flags(&self.cfg.name, self.paused, false, EventKind::UnitStarted)
                .await?;
        }
        if self.cfg.is_remote() && !self.dispatches.is_empty() {
            return Box::pin(self.overlap_dispatch(trigger, None)).await;
        }
        let continuous = self.cfg.service || self.cfg.is_tick();
        if let Some(a) = self.active.values().next() {
            if continuous {
                return Ok(a.record.clone());
            }
            match self.cfg.overlap {
                Overlap::Skip => return Ok(a.record.clone()),
                Overlap::Queue => return self.enqueue(trigger, None).await,
                Overlap::Allow => {}
                Overlap::Replace => {
                    self.stop_all(StopReason::Replaced);
                    return self.enqueue(trigger, None).await;
                }
            }
        }
        self.pending = None;
        self.try_start_run(trigger, 1, None).await
    }

    /// Whether every `Start` makes a new run at once: a job with `overlap: allow`, so that
    /// starts waiting together can be recorded together ([`Loop::manual_starts`]).
    fn starts_together(&self) -> bool {
        self.cfg.overlap == Overlap::Allow
            && !self.cfg.service
            && !self.cfg.is_tick()
            && !self.cfg.is_remote()
            && self.deleting.is_none()
    }

    /// Several `Start`s of a unit for which each is a new run ([`Loop::starts_together`]),
    /// recorded in one change (one commit), then launched and answered in order.
    async fn manual_starts(&mut self, starts: Vec<StartRequest>) {
        // What `manual_start` does before starting; `stopped` only concerns continuous units.
        self.fatal = false;
        self.failures_in_row = 0;
        self.starts.clear();
        self.pending = None;
        let (triggers, replies): (Vec<_>, Vec<_>) = starts.into_iter().unzip();
        if self.shared.token.is_cancelled() {
            for reply in replies {
                self.answer(reply, Err(Error::ShuttingDown));
            }
            return;
        }
        match self.env.store.create_runs(&self.cfg.name, triggers).await {
            Ok(recs) => {
                for (rec, reply) in recs.into_iter().zip(replies) {
                    self.launch(rec.clone());
                    self.answer(reply, Ok(rec));
                }
            }
            Err(e) => {
                tracing::error!(unit = %self.cfg.name, error = %e, "cannot record new runs");
                let msg = e.to_string();
                for reply in replies {
                    self.answer(reply, Err(Error::Storage(msg.clone())));
                }
            }
        }
    }

    /// Queues a run behind the active one; `scheduled` is the fire time it is for, if any.
    async fn enqueue(
        &mut self,
        trigger: Trigger,
        scheduled: Option<Timestamp>,
    ) -> Result<RunRecord> {
        if let Some(q) = &self.queued {
            return Ok(q.clone());
        }
        let rec = self
            .env
            .store
            .create_run(&self.cfg.name, RunState::Queued, trigger, 1, scheduled)
            .await?;
        self.queued = Some(rec.clone());
        Ok(rec)
    }

    /// The schedule's first fire after `now` and after the newest fire handled.
    fn next_fire_after(&self, now: Timestamp) -> Option<Timestamp> {
        let after = self.fired.map_or(now, |f| f.max(now));
        self.cfg.schedule.as_ref().and_then(|s| s.next_after(after, self.anchor))
    }

    /// Whether the next fire makes a dispatch, sent ahead of its time: a unit on agents with
    /// no dispatch in flight, or whose overlap allows one. Any other fire is decided at its
    /// time (whether a run is still active is not known before).
    fn fires_ahead(&self) -> bool {
        self.cfg.is_remote() && (self.dispatches.is_empty() || self.cfg.overlap == Overlap::Allow)
    }

    async fn fire(&mut self) {
        if self.cfg.schedule.is_none() {
            self.next_fire = None;
            return;
        }
        let fired_at = self.next_fire.unwrap_or_else(Timestamp::now);
        self.fired = Some(self.fired.map_or(fired_at, |f| f.max(fired_at)));
        self.next_fire = self.next_fire_after(Timestamp::now());
        // A fire that makes a dispatch is recorded as the unit's last fire with it (one change
        // of the unit's row instead of two side by side); any other fire, or one whose
        // dispatch could not be made, apart.
        let with_dispatch = self.fires_ahead();
        if !with_dispatch {
            self.env.store.set_last_fire(&self.cfg.name, fired_at);
        }
        if self.cfg.is_remote() && !self.dispatches.is_empty() {
            if let Err(e) = Box::pin(self.overlap_dispatch(Trigger::Schedule, Some(fired_at))).await
            {
                tracing::info!(unit = %self.cfg.name, error = %e, "fire not started");
                if with_dispatch {
                    self.env.store.set_last_fire(&self.cfg.name, fired_at);
                }
            }
            return;
        }
        if !self.active.is_empty() {
            match self.cfg.overlap {
                Overlap::Skip => {
                    tracing::info!(unit = %self.cfg.name, "fire skipped: a run is still active");
                    return;
                }
                Overlap::Queue => {
                    if let Err(e) = self.enqueue(Trigger::Schedule, Some(fired_at)).await {
                        tracing::error!(unit = %self.cfg.name, error = %e, "cannot queue a run");
                    }
                    return;
                }
                Overlap::Allow => {}
                Overlap::Replace => {
                    self.stop_all(StopReason::Replaced);
                    if let Err(e) = self.enqueue(Trigger::Schedule, Some(fired_at)).await {
                        tracing::error!(unit = %self.cfg.name, error = %e, "cannot queue a run");
                    }
                    return;
                }
            }
        }
        // One that cannot be recorded is logged; the next fire tries again.
        let started = self.try_start_run(Trigger::Schedule, 1, Some(fired_at)).await;
        if with_dispatch && started.is_err() {
            self.env.store.set_last_fire(&self.cfg.name, fired_at);
        }
    }

    /// Signals every active run to stop with `reason`; returns how many.
    fn stop_all(&mut self, reason: StopReason) -> usize {
        for a in self.active.values() {
            a.why.set(reason);
            a.token.cancel();
        }
        self.active.len()
    }

    /// Cancels the queued run, if any; returns how many (0 or 1).
    async fn cancel_queued(&mut self, reason: StopReason) -> usize {
        let Some(q) = self.queued.take() else { return 0 };
        let q = q.cancelled(reason.as_str());
        if let Err(e) = self.env.store.finish_run(q.clone(), self.keep_runs()).await {
            tracing::error!(unit = %self.cfg.name, error = %e, "cannot record a cancelled run");
        }
        self.last_run = Some(q);
        1
    }

    async fn drain(&mut self) {
        while let Some(done) = self.runs.join_next_with_id().await {
            match done {
                Ok((task, rec)) => {
                    self.tasks.remove(&task);
                    self.record_end(rec).await;
                }
                Err(e) => self.crashed(e).await,
            }
        }
        self.publish();
    }

    fn keep_runs(&self) -> u32 {
        self.cfg.keep_runs.unwrap_or(self.env.keep_runs)
    }

    /// Starts a run now; `None` if it could not even be recorded (the error is logged).
    async fn start_run(&mut self, trigger: Trigger, attempt: u32) -> Option<RunRecord> {
        self.try_start_run(trigger, attempt, None).await.ok()
    }

    /// Starts a run now, for the fire time `scheduled` if a schedule started it, or says why
    /// it could not be recorded.
    async fn try_start_run(
        &mut self,
        trigger: Trigger,
        attempt: u32,
        scheduled: Option<Timestamp>,
    ) -> Result<RunRecord> {
        if self.shared.token.is_cancelled() {
            // Shutting down: a fire or retry that raced the cancellation starts nothing.
            return Err(Error::ShuttingDown);
        }
        if self.cfg.is_remote() {
            if !self.dispatches.is_empty() && self.cfg.overlap != Overlap::Allow {
                return Box::pin(self.overlap_dispatch(trigger, scheduled)).await;
            }
            return Box::pin(self.start_dispatch(trigger, scheduled)).await;
        }
        let rec = self
            .env
            .store
            .create_run(&self.cfg.name, RunState::Running, trigger, attempt, scheduled)
            .await
            .inspect_err(|e| {
                tracing::error!(unit = %self.cfg.name, error = %e, "cannot record a new run");
            })?;
        self.launch(rec.clone());
        Ok(rec)
    }

    fn launch(&mut self, rec: RunRecord) {
        self.runs_total += 1;
        self.env.metrics.run_started(&rec);
        if self.cfg.service || self.cfg.is_tick() {
            // Only restarts of continuous units count against the start limit.
            self.starts.push_back(Instant::now());
        }
        let token = self.shared.token.child_token();
        let why = StopCause::default();
        self.active.insert(
            rec.id,
            Box::new(ActiveRun {
                token: token.clone(),
                why: why.clone(),
                record: rec.clone(),
                waiters: Vec::new(),
            }),
        );
        self.last_run = Some(rec.clone());
        let id = rec.id;
        let unit = UnitHandle(self.shared.clone());
        let started: OnStart =
            Box::new(move |pid, at| unit.tell(Control::Started { run: id, pid, at }));
        if let Some(d) = rec.dispatch
            && let Some(p) = self.dispatches.get_mut(&d)
        {
            p.launched(&rec);
        }
        let cfg = self.cfg.clone();
        let task = if rec.is_local() {
            self.runs.spawn(self.env.executor.clone().execute(cfg, rec, token, why, started))
        } else {
            self.runs.spawn(self.env.remote.clone().execute(cfg, rec, token, why, started))
        };
        self.tasks.insert(task.id(), id);
    }

    /// A run task panicked: close its log and record its run `failed`, so that nothing stays
    /// `running` and followers end; then carry on as after any other end.
    async fn crashed(&mut self, e: tokio::task::JoinError) {
        tracing::error!(unit = %self.cfg.name, error = %e, "a run task failed");
        let Some(id) = self.tasks.remove(&e.id()) else { return };
        let Some(a) = self.active.get(&id) else { return };
        let mut rec = a.record.clone();
        let summary = self.env.store.logs().finish(id).await;
        rec.state = RunState::Failed;
        rec.ended_at = Some(Timestamp::now());
        rec.stdout_bytes = summary.stdout_bytes;
        rec.stderr_bytes = summary.stderr_bytes;
        rec.truncated = summary.truncated;
        rec.reason = Some("internal error: the run's task failed; see the daemon's log".into());
        self.finished(vec![rec]).await;
    }

    /// Records a run's end in the store, then forgets it as active. The loop does the commit
    /// (not the run's task) so that once a client can see the end, the loop has seen it too:
    /// a `Start` right after never finds the ended run still "active".
    async fn record_end(&mut self, rec: RunRecord) {
        if !rec.state.is_final() {
            self.leave(rec);
            return;
        }
        let recorded = self.env.store.finish_run(rec.clone(), self.keep_runs()).await;
        if let Err(e) = &recorded {
            tracing::error!(run = rec.id, error = %e, "cannot record the end of a run");
        }
        self.acknowledge(&rec, recorded.is_ok());
        self.forget(rec);
    }

    /// A remote run handed back still running (the daemon is shutting down): not recorded,
    /// left to its agent and the next daemon.
    fn leave(&mut self, rec: RunRecord) {
        self.env.remote.fleet().recorded(rec.id, false);
        self.active.remove(&rec.id);
    }

    /// A remote run's end is recorded (`recorded`), and its agent may forget it; or it is
    /// not yet (the store keeps retrying), and the agent is not answered: it sends its
    /// result again until the store has it.
    fn acknowledge(&self, rec: &RunRecord, recorded: bool) {
        if !rec.is_local() {
            self.env.remote.fleet().recorded(rec.id, recorded);
        }
    }

    /// Forgets a run whose end is recorded: answers who waited for it, counts it.
    fn forget(&mut self, rec: RunRecord) {
        self.env.metrics.run_finished(&rec);
        if !self.cfg.notify.is_empty() {
            self.env.notifier.run_ended(&self.cfg.name, &self.cfg.notify, &rec);
        }
        // Stopping a run on purpose is not a failure; losing it is.
        if matches!(rec.state, RunState::Failed | RunState::TimedOut | RunState::Lost) {
            self.failures_total += 1;
        }
        if let Some(mut a) = self.active.remove(&rec.id) {
            // Its end came first, or it has no process (a file).
            agent_started(&self.env.metrics, &a.record, rec.started_at);
            for w in a.waiters.drain(..) {
                let _ = w.send(Ok(rec.clone()));
            }
        }
        if self.last_run.as_ref().is_none_or(|l| l.id <= rec.id) {
            self.last_run = Some(rec);
        }
    }

    /// Records the ends of runs (in one change), then does what each end calls for.
    async fn finished(&mut self, recs: Vec<RunRecord>) {
        let (recs, left): (Vec<_>, Vec<_>) = recs.into_iter().partition(|r| r.state.is_final());
        for rec in left {
            self.leave(rec);
        }
        if recs.is_empty() {
            return;
        }
        let recorded = self.env.store.finish_runs(recs.clone(), self.keep_runs()).await;
        if let Err(e) = &recorded {
            tracing::error!(unit = %self.cfg.name, error = %e, "cannot record the end of a run");
        }
        for rec in recs {
            self.acknowledge(&rec, recorded.is_ok());
            self.forget(rec.clone());
            self.after_end(rec).await;
        }
    }

    /// What the end of a recorded run calls for: the queued run, a retry, a restart.
    async fn after_end(&mut self, rec: RunRecord) {
        let lived = rec.duration(Timestamp::now()).and_then(|d| Duration::try_from(d).ok());
        let state = rec.state;
        let attempt = rec.attempt;
        let continuous = self.cfg.service || self.cfg.is_tick();
        // `Run.Cancel` of a service's (or tick unit's) run restarts it as after a crash; to
        // keep it down there is `TaskUnit.Stop`. Every other stop is final.
        let cancel_only = rec.stop_reason() == Some(StopReason::Cancelled);
        let stopped_by_us = state == RunState::Cancelled && !(continuous && cancel_only);
        if rec.dispatch.is_some() {
            Box::pin(self.dispatch_run_ended(rec)).await;
            return;
        }
        if self.deleting.is_some() {
            return;
        }
        // A queued run (`overlap: queue`, or a replace) waits for the active ones to end.
        if self.active.is_empty()
            && let Some(q) = self.queued.take()
        {
            match self.env.store.start_queued(q.id).await {
                Ok(r) => {
                    self.launch(r);
                    return;
                }
                Err(e) => {
                    tracing::error!(unit = %self.cfg.name, error = %e, "cannot start a queued run");
                    let q = q.cancelled(format!("could not start: {e}"));
                    let _ = self.env.store.finish_run(q, self.keep_runs()).await;
                }
            }
        }
        if stopped_by_us || self.paused {
            return;
        }
        if continuous {
            let restart = match self.cfg.restart {
                _ if self.cfg.is_tick() => true,
                Restart::Always => true,
                Restart::OnFailure => state != RunState::Succeeded,
                Restart::Never => false,
            };
            if !restart || self.stopped {
                return;
            }
            let limit = self.cfg.start_limit;
            if lived.is_some_and(|l| l >= limit.window) {
                self.failures_in_row = 0;
            }
            let now = Instant::now();
            while self.starts.front().is_some_and(|t| now.duration_since(*t) > limit.window) {
                self.starts.pop_front();
            }
            if self.starts.len() >= limit.count as usize {
                self.fatal = true;
                tracing::warn!(unit = %self.cfg.name, "service hit its start limit; now fatal");
                self.env.store.emit(EventKind::UnitFatal, &self.cfg.name, Some("fatal"));
                return;
            }
            let delay = self.cfg.backoff.delay(self.failures_in_row);
            self.failures_in_row = self.failures_in_row.saturating_add(1);
            self.pending = Some(Pending { at: now + delay, trigger: Trigger::Restart, attempt: 1 });
        } else if matches!(state, RunState::Failed | RunState::TimedOut)
            && attempt <= self.cfg.retries
            && self.active.is_empty()
        {
            let delay = self.cfg.backoff.delay(attempt - 1);
            self.pending = Some(Pending {
                at: Instant::now() + delay,
                trigger: Trigger::Retry,
                attempt: attempt + 1,
            });
        }
    }

    /// Fires the unit on its hosts: one dispatch, its runs recorded in one change, the first
    /// `batch` of them launched. Answers with the first host's run.
    async fn start_dispatch(
        &mut self,
        trigger: Trigger,
        scheduled: Option<Timestamp>,
    ) -> Result<RunRecord> {
        let hosts = self.env.remote.fleet().resolve(&self.cfg.hosts);
        if hosts.is_empty() {
            tracing::warn!(unit = %self.cfg.name, hosts = ?self.cfg.hosts, "no host to run on");
            return Err(Error::Conflict(format!(
                "no host matches {:?}: no enrolled agent has those names or labels",
                self.cfg.hosts
            )));
        }
        let (d, runs) = self
            .env
            .store
            .create_dispatch(
                &self.cfg.name,
                trigger,
                hosts,
                self.cfg.batch,
                self.cfg.tolerance,
                scheduled,
            )
            .await
            .inspect_err(|e| {
                tracing::error!(unit = %self.cfg.name, error = %e, "cannot record a dispatch");
            })?;
        let first = runs[0].clone();
        self.dispatches.insert(d.id, Box::new(Progress::new(d, &runs, &[])));
        for r in runs.into_iter().filter(|r| r.state == RunState::Running) {
            self.launch(r);
        }
        Ok(first)
    }

    /// Takes over the dispatches a previous daemon left unfinished: their runs still
    /// `running` on agents are executed again (the agents' journals start nothing twice), the
    /// waiting ones wait on.
    async fn take_over(&mut self, dispatches: Vec<(DispatchRecord, Vec<RunRecord>)>) {
        for (d, runs) in dispatches {
            let id = d.id;
            let ignored = self.env.store.ignored_runs(id).await.unwrap_or_default();
            let cancelling = d.state == DispatchState::Cancelled;
            self.dispatches.insert(id, Box::new(Progress::new(d, &runs, &ignored)));
            for r in runs.into_iter().filter(|r| r.state == RunState::Running) {
                // Counted when it started, under the previous daemon.
                self.runs_total = self.runs_total.saturating_sub(1);
                let run = r.id;
                self.launch(r);
                // Cancelled before the restart: stopped, as the previous daemon had begun.
                if cancelling && let Some(a) = self.active.get(&run) {
                    a.why.set(StopReason::Cancelled);
                    a.token.cancel();
                }
            }
            if cancelling {
                self.cancel_waiting(id, StopReason::Cancelled).await;
            }
            self.advance(id).await;
        }
    }

    /// A run of a dispatch ended (recorded): a retry on the same host, the tolerance, the
    /// next hosts' turn, the dispatch's end.
    async fn dispatch_run_ended(&mut self, rec: RunRecord) {
        let Some(id) = rec.dispatch else { return };
        let Some(p) = self.dispatches.get_mut(&id) else { return };
        p.ended(&rec);
        let running = p.record.state == DispatchState::Running;
        if running
            && self.deleting.is_none()
            && matches!(rec.state, RunState::Failed | RunState::TimedOut)
            && rec.attempt <= self.cfg.retries
        {
            // On the same host, after the unit's back-off.
            let delay = self.cfg.backoff.delay(rec.attempt - 1);
            p.retry_at(Instant::now() + delay, rec);
            return;
        }
        let failed = matches!(rec.state, RunState::Failed | RunState::TimedOut | RunState::Lost);
        if running && failed && p.over_tolerance() {
            tracing::warn!(unit = %self.cfg.name, dispatch = id, "tolerance exceeded: dispatch paused");
            p.record.state = DispatchState::Paused;
            if let Err(e) = self.env.store.set_dispatch_state(id, DispatchState::Paused).await {
                tracing::error!(dispatch = id, error = %e, "cannot record a paused dispatch");
            }
        }
        self.advance(id).await;
    }

    /// A start (or fire) of a unit on agents while a dispatch of it is in flight, as its
    /// `overlap` says: `skip` refuses it; `allow` starts another dispatch; `queue` keeps one
    /// fire to start when the dispatches in flight end; `replace` cancels them and keeps the
    /// fire. Answers with the newest run of the dispatch in flight, or the new one's first.
    async fn overlap_dispatch(
        &mut self,
        trigger: Trigger,
        scheduled: Option<Timestamp>,
    ) -> Result<RunRecord> {
        let in_flight = self.dispatches.keys().max().copied();
        match self.cfg.overlap {
            Overlap::Allow => return Box::pin(self.start_dispatch(trigger, scheduled)).await,
            Overlap::Skip => {
                // A paused dispatch is still this unit's dispatch in flight.
                return Err(Error::Conflict(format!(
                    "dispatch {} of {} has not ended (overlap: skip): wait, or resume or cancel it",
                    in_flight.unwrap_or_default(),
                    self.cfg.name
                )));
            }
            Overlap::Queue => {
                self.queued_fire.get_or_insert((trigger, scheduled));
            }
            Overlap::Replace => {
                self.queued_fire = Some((trigger, scheduled));
                Box::pin(self.cancel_dispatches(StopReason::Replaced)).await;
            }
        }
        match self.last_run.clone() {
            Some(r) => Ok(r),
            None => Err(Error::Conflict("a dispatch is in flight; this one waits for it".into())),
        }
    }

    /// Runs again, each on its host, the failed runs whose back-off is over.
    async fn dispatch_retries(&mut self) {
        let now = Instant::now();
        let ids: Vec<i64> = self.dispatches.keys().copied().collect();
        for id in ids {
            let due = self.dispatches.get_mut(&id).map(|p| p.due_retries(now)).unwrap_or_default();
            for old in due {
                let attempt = old.attempt + 1;
                let new = self.env.store.create_host_run(
                    &self.cfg.name,
                    old.host.clone(),
                    id,
                    Trigger::Retry,
                    attempt,
                );
                match new.await {
                    Ok(r) => self.launch(r),
                    Err(e) => {
                        tracing::error!(unit = %self.cfg.name, error = %e, "cannot record a retry")
                    }
                }
            }
            self.advance(id).await;
        }
    }

    /// Starts the waiting runs of dispatch `id` whose turn has come, and records its end once
    /// nothing is left to run.
    async fn advance(&mut self, id: i64) {
        while let Some(next) = self.dispatches.get_mut(&id).and_then(|p| p.next_turn()) {
            match self.env.store.start_queued(next.id).await {
                Ok(r) => self.launch(r),
                Err(e) => {
                    // Not left queued for ever: it ends, and the dispatch goes on.
                    tracing::error!(run = next.id, error = %e, "cannot start a host's run");
                    let q = next.cancelled(format!("could not start: {e}"));
                    let _ = self.env.store.finish_run(q.clone(), self.keep_runs()).await;
                    if let Some(p) = self.dispatches.get_mut(&id) {
                        p.ended(&q);
                    }
                }
            }
        }
        let Some(p) = self.dispatches.get(&id) else { return };
        if !p.is_done() {
            return;
        }
        let outcome = p.outcome();
        self.dispatches.remove(&id);
        if let Err(e) = self.env.store.set_dispatch_state(id, outcome).await {
            tracing::error!(dispatch = id, error = %e, "cannot record the end of a dispatch");
        }
        // A fire that waited for the dispatches in flight (`overlap: queue`, `replace`).
        if self.dispatches.is_empty()
            && self.deleting.is_none()
            && let Some((trigger, scheduled)) = self.queued_fire.take()
        {
            let _ = Box::pin(self.start_dispatch(trigger, scheduled)).await;
        }
    }

    /// `Dispatch.Cancel`, `Pause`, `Resume` of dispatch `id` of this unit.
    async fn dispatch_op(&mut self, id: i64, op: DispatchOp) -> Result<DispatchRecord> {
        let Some(p) = self.dispatches.get_mut(&id) else {
            return Err(Error::Conflict(format!("dispatch {id} has ended")));
        };
        let state = p.record.state;
        match (op, state) {
            (DispatchOp::Pause, DispatchState::Running) => {
                p.record.state = DispatchState::Paused;
                self.env.store.set_dispatch_state(id, DispatchState::Paused).await
            }
            (DispatchOp::Resume, DispatchState::Paused) => {
                let forgiven = p.resume();
                let r = self.env.store.resume_dispatch(id, forgiven).await;
                self.advance(id).await;
                r
            }
            (DispatchOp::Cancel, _) => {
                let record = DispatchRecord { state: DispatchState::Cancelled, ..p.record.clone() };
                self.cancel_dispatch(id, StopReason::Cancelled).await;
                Ok(record)
            }
            (DispatchOp::Pause | DispatchOp::Resume, _) => Ok(p.record.clone()),
        }
    }

    /// `Run.Redo`: run `run` (ended, of one of this unit's dispatches) again on its host, as
    /// a new attempt. A dispatch that had ended runs again for it.
    async fn redo(&mut self, run: i64) -> Result<RunRecord> {
        let old = self.env.store.get_run(run).await?;
        let Some(id) = old.dispatch.filter(|_| old.unit == self.cfg.name) else {
            return Err(Error::Conflict(format!("run {run} belongs to no dispatch of this unit")));
        };
        if !old.state.is_final() {
            return Err(Error::Conflict(format!("run {run} is still {}", old.state)));
        }
        if self.deleting.is_some() || self.shared.token.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        // An ended dispatch is read back (nothing written until the new run is).
        let reopened = match self.dispatches.get(&id) {
            Some(_) => None,
            None => {
                let (mut d, runs, _) = self.env.store.get_dispatch(id).await?;
                let ignored = self.env.store.ignored_runs(id).await?;
                d.state = DispatchState::Running;
                Some(Progress::new(d, &runs, &ignored))
            }
        };
        let p = reopened.as_ref().or_else(|| self.dispatches.get(&id).map(|p| &**p));
        // Only a host's newest run, and only when nothing of that host is active or waiting:
        // a redo never runs a host twice at once.
        if p.is_some_and(|p| !p.is_newest_and_idle(&old)) {
            return Err(Error::Conflict(format!(
                "run {run} is not {}'s newest, or that host has a run active or waiting",
                old.host
            )));
        }
        let attempt = old.attempt + 1;
        let host = old.host.clone();
        let new =
            self.env.store.create_host_run(&self.cfg.name, host, id, Trigger::Manual, attempt);
        let rec = new.await?;
        if let Some(p) = reopened {
            if let Err(e) = self.env.store.set_dispatch_state(id, DispatchState::Running).await {
                tracing::error!(dispatch = id, error = %e, "cannot record a dispatch reopened");
            }
            self.dispatches.insert(id, Box::new(p));
        }
        self.launch(rec.clone());
        Ok(rec)
    }

    /// `Run.Ignore`: run `run` of one of this unit's dispatches no longer counts against its
    /// tolerance or outcome; an ended dispatch's outcome is decided again.
    async fn ignore(&mut self, run: i64) -> Result<()> {
        let rec = self.env.store.get_run(run).await?;
        let Some(id) = rec.dispatch.filter(|_| rec.unit == self.cfg.name) else {
            return Err(Error::Conflict(format!("run {run} belongs to no dispatch of this unit")));
        };
        self.env.store.set_ignored(run, true).await?;
        if let Some(p) = self.dispatches.get_mut(&id) {
            p.ignore(run);
            return Ok(());
        }
        let (d, runs, _) = self.env.store.get_dispatch(id).await?;
        let ignored = self.env.store.ignored_runs(id).await?;
        let outcome = Progress::new(d.clone(), &runs, &ignored).outcome();
        if d.state.is_final() && d.state != outcome {
            self.env.store.set_dispatch_state(id, outcome).await?;
        }
        Ok(())
    }

    /// Ends the waiting hosts of dispatch `id` `cancelled` with `reason`, and its record
    /// once nothing of it is active. Returns how many waited.
    async fn cancel_waiting(&mut self, id: i64, reason: StopReason) -> usize {
        let Some(p) = self.dispatches.get_mut(&id) else { return 0 };
        let waiting = p.take_waiting();
        let ended: Vec<RunRecord> =
            waiting.into_iter().map(|r| r.cancelled(reason.as_str())).collect();
        if !ended.is_empty()
            && let Err(e) = self.env.store.finish_runs(ended.clone(), self.keep_runs()).await
        {
            tracing::error!(dispatch = id, error = %e, "cannot record cancelled runs");
        }
        if let Some(p) = self.dispatches.get_mut(&id) {
            for r in &ended {
                p.ended(r);
            }
        }
        self.advance(id).await;
        ended.len()
    }

    /// Cancels every dispatch in flight: hosts waiting for their turn end `cancelled` (the
    /// active ones were stopped by the caller). Returns how many waiting runs ended.
    async fn cancel_dispatches(&mut self, reason: StopReason) -> usize {
        let ids: Vec<i64> = self.dispatches.keys().copied().collect();
        let mut n = 0;
        for id in ids {
            n += self.cancel_dispatch(id, reason).await;
        }
        n
    }

    /// Cancels dispatch `id` with `reason`: its active runs are stopped, its waiting hosts
    /// end `cancelled`, and it is recorded as being cancelled at once (so that a daemon
    /// taking it over stops its runs too); it ends when its last active run does. Returns how
    /// many hosts waited.
    async fn cancel_dispatch(&mut self, id: i64, reason: StopReason) -> usize {
        let Some(p) = self.dispatches.get_mut(&id) else { return 0 };
        p.record.state = DispatchState::Cancelled;
        for run in p.active() {
            if let Some(a) = self.active.get(&run) {
                a.why.set(reason);
                a.token.cancel();
            }
        }
        if let Err(e) = self.env.store.cancelling_dispatch(id).await {
            tracing::error!(dispatch = id, error = %e, "cannot record a cancel");
        }
        self.cancel_waiting(id, reason).await
    }
}
