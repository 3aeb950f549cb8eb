//! The per-unit loop: one tokio task per unit that owns everything that happens to it.
//! It turns schedule fires, manual starts, retries and service restarts into runs, applies
//! the overlap policy, stops runs on request, and publishes a status snapshot.
//!
//! Each run is its own task (in the loop's `JoinSet`) with a child cancellation token; it
//! spawns the process through `exec`, forwards output to the run's log, enforces `timeout`,
//! and records the outcome through the store before handing the record back to the loop.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::definition::{Action, CatchUp, Overlap, Restart, UnitConfig, ValidateCtx};
use super::handle::{Control, Inbox, UnitHandle, UnitShared, UnitState, UnitStatus};
use crate::error::{Error, Result};
use crate::exec;
use crate::run::{RunRecord, RunState, StopReason, Trigger};
use crate::store::logs::{Logs, Stream};
use crate::store::{EventKind, Store};

/// What every unit loop needs from the daemon.
#[derive(Clone)]
pub struct RunnerEnv {
    /// The store.
    pub store: Store,
    /// Default working directory (`<state-dir>/work`) of runs without `user` (those with
    /// one start in the account's home directory).
    pub work_dir: PathBuf,
    /// `allowed_dirs` and `allowed_users`, checked again before each spawn.
    pub validate: ValidateCtx,
    /// Runs kept per unit unless the unit says otherwise.
    pub keep_runs: u32,
    /// This boot's id, recorded with each pid.
    pub boot_id: Option<String>,
    /// Identifies the state directory in run tags ([`state_dir_id`]).
    pub state_dir_id: String,
    /// The daemon's own account (name, home), for the environment of runs without `user`.
    pub identity: Arc<(String, String)>,
}

/// The daemon's account name and home directory, from the user database (the daemon's own
/// environment may lack `USER`, under systemd for instance). Blocks: call it off the async
/// threads.
pub fn daemon_identity() -> (String, String) {
    let uid = nix::unistd::getuid();
    match exec::User::lookup(&uid.to_string()) {
        Ok(u) => (u.name, u.home.display().to_string()),
        Err(_) => (
            std::env::var("USER").unwrap_or_else(|_| uid.to_string()),
            std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        ),
    }
}

/// The environment variable that tags every process of a run ([`run_tag`]).
pub const RUN_TAG_VAR: &str = "TASKD_RUN_TAG";

/// An id for the state directory `dir` (a 64-bit FNV-1a hash of its canonical path, in hex),
/// the same for every daemon started on it, different for daemons on other directories.
pub fn state_dir_id(dir: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    // Spelled out rather than std's hasher, which may change between Rust releases: a daemon
    // built by a newer compiler must still find the processes of its predecessor's runs.
    let hash = dir.as_os_str().as_bytes().iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The tag of run `run_id` ([`exec::Spec::tag`]): `TASKD_RUN_TAG=<state dir id>-<run id>`.
///
/// Not `TASKD_RUN_ID` alone: run ids restart at 1 in every state directory, and every process
/// carrying a run's tag is stopped with it, so other daemons' runs (tests run many side by
/// side; a root daemon sees every user's processes) must not share it. A restarted daemon
/// computes the same tag to find a lost run's processes.
pub fn run_tag(state_dir_id: &str, run_id: i64) -> (String, String) {
    (RUN_TAG_VAR.into(), format!("{state_dir_id}-{run_id}"))
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
        next_fire: None,
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
    tracker.spawn(Box::new(l).run(inbox, token, init.fresh, init.quiet, init.last_fire, ready_tx));
    (handle, ready_rx)
}

struct ActiveRun {
    token: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
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
    next_fire: Option<Timestamp>,
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
        fresh: bool,
        quiet: bool,
        last_fire: Option<Timestamp>,
        ready: oneshot::Sender<()>,
    ) {
        // Every handler below is boxed: the loop's own future stays small (it is most of an
        // idle unit's memory), and a handler's state exists only while it runs.
        Box::pin(self.start_up(fresh, quiet, last_fire)).await;
        self.answer(ready, ());
        loop {
            self.publish();
            let fire_at = if self.paused || self.deleting.is_some() {
                None
            } else {
                self.next_fire.map(instant_of)
            };
            let pending_at =
                if self.deleting.is_some() { None } else { self.pending.as_ref().map(|p| p.at) };
            tokio::select! {
                ctl = rx.recv() => match ctl {
                    // Starts that each make a new run: take the others waiting behind this
                    // one and record them all in one change.
                    Some(Control::Start { trigger, reply }) if self.starts_together() => {
                        let mut starts = vec![(trigger, reply)];
                        starts.extend(rx.take_starts(STARTS_TOGETHER - 1));
                        Box::pin(self.manual_starts(starts)).await;
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
                        next = if self.starts_together() {
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
            self.next_fire =
                self.cfg.schedule.as_ref().and_then(|s| s.next_after(now, self.anchor));
            return;
        }
        if let Some(s) = self.cfg.schedule.clone() {
            // Fire times before the anchor (the last edit) belong to an older definition.
            let since = last_fire.map_or(self.anchor, |l| l.max(self.anchor));
            if !fresh
                && !self.paused
                && self.cfg.catch_up == CatchUp::Once
                && s.missed(since, now, self.anchor)
            {
                self.env.store.set_last_fire(&self.cfg.name, now);
                self.start_run(Trigger::CatchUp, 1).await;
            }
            self.next_fire = s.next_after(now, self.anchor);
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
            Control::Stop { reply } => {
                let n = self.stop_all(StopReason::Stopped);
                let q = self.cancel_queued(StopReason::Stopped).await;
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
            Control::Pause { paused, reply } if paused == self.paused => {
                // Already so: nothing to record, nothing to start.
                self.answer(reply, Ok(()));
            }
            Control::Pause { paused, reply } => {
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
                        if let Some(s) = &self.cfg.schedule {
                            self.next_fire = s.next_after(now, self.anchor);
                        } else if (self.cfg.service || self.cfg.is_tick()) && !self.stopped && idle
                        {
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
            Control::Edit { config, at, reply } => {
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
                    self.next_fire =
                        self.cfg.schedule.as_ref().and_then(|s| s.next_after(Timestamp::now(), at));
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
            Control::Cancel { run, reply } => {
                if let Some(a) = self.active.get_mut(&run) {
                    // A stop already under way (a timeout, say) keeps its reason.
                    a.reason.lock().expect("reason lock").get_or_insert(StopReason::Cancelled);
                    a.token.cancel();
                    a.waiters.push(reply);
                } else if self.queued.as_ref().is_some_and(|q| q.id == run) {
                    let r = self.cancel_queued(StopReason::Cancelled).await;
                    let rec = self.last_run.clone().filter(|_| r > 0);
                    self.answer(reply, rec.ok_or(Error::RunNotFound(run)));
                } else {
                    self.answer(reply, Err(Error::Conflict(format!("run {run} is not active"))));
                }
            }
            Control::Delete { reply } => {
                self.stop_all(StopReason::Deleted);
                self.cancel_queued(StopReason::Deleted).await;
                self.pending = None;
                self.next_fire = None;
                self.deleting = Some(reply);
                if self.active.is_empty() {
                    self.drain().await;
                    return true;
                }
            }
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
            && self.deleting.is_none()
    }

    /// Several `Start`s of a unit for which each is a new run ([`Loop::starts_together`]),
    /// recorded in one change (one commit), then launched and answered in order.
    async fn manual_starts(&mut self, starts: Vec<(Trigger, oneshot::Sender<Result<RunRecord>>)>) {
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

    async fn fire(&mut self) {
        let Some(s) = self.cfg.schedule.clone() else {
            self.next_fire = None;
            return;
        };
        let fired_at = self.next_fire.unwrap_or_else(Timestamp::now);
        self.next_fire = s.next_after(Timestamp::now().max(fired_at), self.anchor);
        self.env.store.set_last_fire(&self.cfg.name, fired_at);
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
        let _ = self.try_start_run(Trigger::Schedule, 1, Some(fired_at)).await;
    }

    /// Signals every active run to stop with `reason`; returns how many.
    fn stop_all(&mut self, reason: StopReason) -> usize {
        for a in self.active.values() {
            let mut r = a.reason.lock().expect("reason lock");
            if r.is_none() {
                *r = Some(reason);
            }
            a.token.cancel();
        }
        self.active.len()
    }

    /// Cancels the queued run, if any; returns how many (0 or 1).
    async fn cancel_queued(&mut self, reason: StopReason) -> usize {
        let Some(mut q) = self.queued.take() else { return 0 };
        q.state = RunState::Cancelled;
        q.ended_at = Some(Timestamp::now());
        q.reason = Some(reason.as_str().into());
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
        if self.cfg.service || self.cfg.is_tick() {
            // Only restarts of continuous units count against the start limit.
            self.starts.push_back(Instant::now());
        }
        let token = self.shared.token.child_token();
        let reason = Arc::new(Mutex::new(None));
        self.active.insert(
            rec.id,
            Box::new(ActiveRun {
                token: token.clone(),
                reason: reason.clone(),
                record: rec.clone(),
                waiters: Vec::new(),
            }),
        );
        self.last_run = Some(rec.clone());
        let env = self.env.clone();
        let cfg = self.cfg.clone();
        let id = rec.id;
        let task = self.runs.spawn(execute(env, cfg, rec, token, reason));
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
        if let Err(e) = self.env.store.finish_run(rec.clone(), self.keep_runs()).await {
            tracing::error!(run = rec.id, error = %e, "cannot record the end of a run");
        }
        self.forget(rec);
    }

    /// Forgets a run whose end is recorded: answers who waited for it, counts it.
    fn forget(&mut self, rec: RunRecord) {
        // Stopping a run on purpose is not a failure; losing it is.
        if matches!(rec.state, RunState::Failed | RunState::TimedOut | RunState::Lost) {
            self.failures_total += 1;
        }
        if let Some(mut a) = self.active.remove(&rec.id) {
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
        if let Err(e) = self.env.store.finish_runs(recs.clone(), self.keep_runs()).await {
            tracing::error!(unit = %self.cfg.name, error = %e, "cannot record the end of a run");
        }
        for rec in recs {
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
                    let mut q = q;
                    q.state = RunState::Cancelled;
                    q.ended_at = Some(Timestamp::now());
                    q.reason = Some(format!("could not start: {e}"));
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
}

/// The environment every run gets: a fixed base (the daemon's own is not copied), the
/// unit's `env` on top, and `TASKD_*` variables describing the run.
fn run_env(
    cfg: &UnitConfig,
    rec: &RunRecord,
    user: Option<&exec::User>,
    identity: &(String, String),
) -> Vec<(String, String)> {
    let mut env: std::collections::BTreeMap<String, String> = Default::default();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    let (name, home) = match user {
        Some(u) => (u.name.clone(), u.home.display().to_string()),
        None => identity.clone(),
    };
    env.insert("HOME".into(), home);
    env.insert("USER".into(), name.clone());
    env.insert("LOGNAME".into(), name);
    env.insert("SHELL".into(), "/bin/sh".into());
    if let Ok(lang) = std::env::var("LANG") {
        env.insert("LANG".into(), lang);
    }
    env.insert("TASKD_UNIT".into(), cfg.name.clone());
    env.insert("TASKD_RUN_ID".into(), rec.id.to_string());
    env.insert("TASKD_ATTEMPT".into(), rec.attempt.to_string());
    env.insert("TASKD_TRIGGER".into(), rec.trigger.as_str().into());
    for (k, v) in &cfg.env {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

/// The argv of a script run: its `#!` interpreter (with one optional argument), else `/bin/sh`.
fn script_argv(text: &str, path: &std::path::Path, args: &[String]) -> Vec<String> {
    let mut argv = Vec::new();
    match text.strip_prefix("#!").and_then(|rest| rest.lines().next()) {
        Some(line) if !line.trim().is_empty() => {
            let line = line.trim();
            match line.split_once(char::is_whitespace) {
                Some((interp, arg)) => {
                    argv.push(interp.to_string());
                    argv.push(arg.trim().to_string());
                }
                None => argv.push(line.to_string()),
            }
        }
        _ => argv.push("/bin/sh".into()),
    }
    argv.push(path.display().to_string());
    argv.extend(args.iter().cloned());
    argv
}

/// Where a run as `user` without `cwd` starts: the account's home directory (the state
/// directory's `work/` belongs to the daemon's account), or `/` when it has none (`nobody`'s is
/// `/nonexistent`), as login(1) does.
fn home_of(user: &exec::User) -> PathBuf {
    if user.home.is_dir() { user.home.clone() } else { PathBuf::from("/") }
}

/// A run's output, handed straight to its log as it is read: `wait` returns once every chunk
/// has been handed over.
struct ToLog {
    logs: Logs,
    run: i64,
}

impl exec::Output for ToLog {
    async fn send(&mut self, c: exec::Chunk) -> bool {
        self.logs.write(self.run, to_log_stream(c.stream), c.at, c.data).await;
        true
    }
}

fn to_log_stream(s: exec::Stream) -> Stream {
    match s {
        exec::Stream::Stdout => Stream::Stdout,
        exec::Stream::Stderr => Stream::Stderr,
    }
}

/// Runs one run to its end; the loop records it.
async fn execute(
    env: Arc<RunnerEnv>,
    cfg: Arc<UnitConfig>,
    mut rec: RunRecord,
    stop: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
) -> RunRecord {
    let logs = env.store.logs().clone();
    if let Err(e) = logs.open(rec.id, cfg.log_limit).await {
        tracing::error!(run = rec.id, error = %e, "cannot open the run's log");
    }
    let outcome = match &cfg.action {
        Action::Tick(every) => tick(&env, &cfg, &rec, *every, &stop).await,
        _ => spawn_and_wait(&env, &cfg, &rec, &stop, &reason).await,
    };
    let summary = logs.finish(rec.id).await;
    rec.ended_at = Some(Timestamp::now());
    rec.stdout_bytes = summary.stdout_bytes;
    rec.stderr_bytes = summary.stderr_bytes;
    rec.truncated = summary.truncated;
    match outcome {
        Outcome::Exited { termination, stopped, pid, started } => {
            rec.pid = Some(pid);
            rec.started_at = Some(started);
            match termination {
                exec::Termination::Exited(c) => rec.exit_code = Some(c),
                exec::Termination::Signaled(s) => rec.signal = Some(s),
            }
            // Only a shutdown cancels a run without giving a reason (it cancels the parent).
            let why = reason.lock().expect("reason lock").unwrap_or(StopReason::Shutdown);
            rec.state = if stopped {
                rec.reason = Some(why.as_str().into());
                if why == StopReason::Timeout { RunState::TimedOut } else { RunState::Cancelled }
            } else {
                match termination {
                    exec::Termination::Exited(c) if cfg.success_codes.contains(&c) => {
                        RunState::Succeeded
                    }
                    _ => RunState::Failed,
                }
            };
        }
        Outcome::Ticked => {
            rec.state = RunState::Cancelled;
            let why = reason.lock().expect("reason lock").unwrap_or(StopReason::Shutdown);
            rec.reason = Some(why.as_str().into());
        }
        Outcome::NotStarted(msg) => {
            rec.state = RunState::Failed;
            rec.reason = Some(msg);
        }
    }
    rec
}

enum Outcome {
    Exited { termination: exec::Termination, stopped: bool, pid: u32, started: Timestamp },
    Ticked,
    NotStarted(String),
}

async fn tick(
    env: &RunnerEnv,
    cfg: &UnitConfig,
    rec: &RunRecord,
    every: Duration,
    stop: &CancellationToken,
) -> Outcome {
    let logs = env.store.logs();
    let mut next = Instant::now();
    loop {
        let now = Timestamp::now();
        let line = format!("tick {} {}\n", cfg.name, now.strftime("%Y-%m-%dT%H:%M:%S%:z"));
        logs.write(rec.id, Stream::Stdout, now, line.into_bytes()).await;
        next += every;
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => return Outcome::Ticked,
        }
    }
}

async fn spawn_and_wait(
    env: &RunnerEnv,
    cfg: &UnitConfig,
    rec: &RunRecord,
    stop: &CancellationToken,
    reason: &Arc<Mutex<Option<StopReason>>>,
) -> Outcome {
    let user = match &cfg.user {
        None => None,
        Some(name) => {
            // NSS lookups may block (LDAP, files): keep them off the async threads.
            let n = name.clone();
            match tokio::task::spawn_blocking(move || exec::User::lookup(&n)).await {
                Ok(Ok(u)) => Some(u),
                Ok(Err(e)) => return Outcome::NotStarted(format!("cannot run as {name:?}: {e}")),
                Err(e) => return Outcome::NotStarted(format!("cannot run as {name:?}: {e}")),
            }
        }
    };
    // `allowed_users` may have changed since `Add` (a restart with other settings).
    if let Some(u) = &user
        && let Err(e) = env.validate.check_user(&u.name, u.uid)
    {
        return Outcome::NotStarted(format!("cannot start: {e}"));
    }
    let mut script_path = None;
    let argv = match &cfg.action {
        Action::Command(cmd) => cmd.iter().chain(cfg.args.iter()).cloned().collect(),
        Action::Script(text) => {
            match env.store.write_script(rec.id, text, user.as_ref().map(|u| (u.uid, u.gid))).await
            {
                Ok(p) => {
                    let argv = script_argv(text, &p, &cfg.args);
                    script_path = Some(p);
                    argv
                }
                Err(e) => return Outcome::NotStarted(format!("cannot write the script: {e}")),
            }
        }
        Action::Tick(_) => unreachable!("tick units do not spawn"),
    };
    // Resolved again right before the spawn, which starts in the resolved path: a symlink on
    // the way may have been swapped since `Add`, and `allowed_dirs` may have changed. (A swap
    // in the microseconds between this and the child's chdir is not caught: that would take
    // entering the directory through a descriptor opened here.)
    let cwd = match &cfg.cwd {
        Some(cwd) => match env.validate.resolve_cwd(cwd) {
            Ok(resolved) => resolved,
            Err(e) => {
                if let Some(p) = script_path {
                    env.store.remove_script(p);
                }
                return Outcome::NotStarted(format!("cannot start: {e}"));
            }
        },
        None => match &user {
            Some(u) => home_of(u),
            None => env.work_dir.clone(),
        },
    };
    let spec = exec::Spec {
        argv,
        env: run_env(cfg, rec, user.as_ref(), &env.identity),
        cwd,
        user,
        tag: Some(run_tag(&env.state_dir_id, rec.id)),
    };
    let output = ToLog { logs: env.store.logs().clone(), run: rec.id };
    let proc = match exec::Process::spawn(&spec, output) {
        Ok(p) => p,
        Err(e) => {
            if let Some(p) = script_path {
                env.store.remove_script(p);
            }
            return Outcome::NotStarted(format!("cannot start: {e}"));
        }
    };
    let pid = proc.pid();
    let started = Timestamp::now();
    env.store.set_pid(rec.id, pid, started, proc.start_ticks(), env.boot_id.clone());
    let stop_proc = stop.child_token();
    let mut timer = cfg.timeout.map(|t| Box::pin(tokio::time::sleep(t)));
    let wait = proc.wait(stop_proc.clone(), cfg.kill_grace);
    tokio::pin!(wait);
    let exit = loop {
        tokio::select! {
            exit = &mut wait => break exit,
            _ = async { timer.as_mut().expect("guarded").await }, if timer.is_some() => {
                timer = None;
                let mut r = reason.lock().expect("reason lock");
                if r.is_none() {
                    *r = Some(StopReason::Timeout);
                }
                drop(r);
                stop_proc.cancel();
            }
        }
    };
    if let Some(p) = script_path {
        env.store.remove_script(p);
    }
    Outcome::Exited { termination: exit.termination, stopped: exit.stopped, pid, started }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_run_with_their_interpreter() {
        let p = std::path::Path::new("/s");
        assert_eq!(script_argv("echo hi", p, &[]), ["/bin/sh", "/s"]);
        assert_eq!(
            script_argv("#!/usr/bin/env python3\nprint(1)", p, &["a".into()]),
            ["/usr/bin/env", "python3", "/s", "a"]
        );
        assert_eq!(script_argv("#!/bin/bash\n", p, &[]), ["/bin/bash", "/s"]);
    }

    #[test]
    fn run_tags_tell_state_directories_apart() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let id = state_dir_id(a.path());
        assert_eq!(id.len(), 16);
        // Stable: a restarted daemon must compute the same tag.
        assert_eq!(state_dir_id(&a.path().join("../").join(a.path().file_name().unwrap())), id);
        assert_ne!(state_dir_id(b.path()), id);
        assert_eq!(run_tag(&id, 42), ("TASKD_RUN_TAG".to_string(), format!("{id}-42")));
    }
}
