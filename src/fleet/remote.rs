//! The remote executor: a run executed by a `taskd agent`. It hands the agent the run's
//! assignment (again each time the agent reconnects: the agent's journal starts it once),
//! relays a stop as an order, hears the start and the end through the run's slot in the
//! [`Fleet`], and decides what the agent cannot: a run whose agent never connected within
//! `host_wait` ends `cancelled` (`agent unavailable`); a run whose agent went away and did
//! not come back within `lost_after` ends `lost` (`agent unreachable`). Output does not pass
//! through here: the agent's `AgentLink.Output` calls write it to the run's log directly.
//!
//! A daemon shutting down leaves remote runs running: the executor hands the record back
//! still `running`, the loop does not record it, and the next daemon takes it over.

use std::sync::Arc;

use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Fleet, News};
use crate::executor::{OnStart, StopCause};
use crate::proto::{Assignment, Order, Outcome};
use crate::run::{RunRecord, RunState, StopReason};
use crate::unit::definition::UnitConfig;

/// How long a run on an agent lives before its pid is recorded apart from its end.
const PID_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs units' runs on agents.
pub struct RemoteExecutor {
    fleet: Fleet,
}

/// How a remote run ended without its agent saying so.
enum Verdict {
    /// The agent reported its end.
    Reported(Outcome),
    /// Ended here: state and reason.
    Here(RunState, String),
    /// Left to the next daemon (shutdown).
    Left,
}

impl RemoteExecutor {
    /// An executor on `fleet`'s agents.
    pub fn new(fleet: Fleet) -> Self {
        RemoteExecutor { fleet }
    }

    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Runs `rec` (whose `host` is an agent's name) of the unit `cfg` on that agent, and
    /// returns it ended, or still `running` if the daemon is shutting down. The run's slot
    /// opens now, before the future is first polled, so that its agent's start and end
    /// reports from here on are never refused; its output is taken once the log's opening
    /// is queued (before that it is refused as not ready, and the agent sends it again).
    pub fn execute(
        self: Arc<Self>,
        cfg: Arc<UnitConfig>,
        rec: RunRecord,
        stop: CancellationToken,
        why: StopCause,
        started: OnStart,
    ) -> impl Future<Output = RunRecord> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        self.fleet.open_slot(rec.id, &rec.host, tx);
        execute(self, cfg, rec, stop, why, started, rx)
    }
}

async fn execute(
    ex: Arc<RemoteExecutor>,
    cfg: Arc<UnitConfig>,
    mut rec: RunRecord,
    stop: CancellationToken,
    why: StopCause,
    started: OnStart,
    news: mpsc::UnboundedReceiver<News>,
) -> RunRecord {
    let fleet = &ex.fleet;
    let store = fleet.store().clone();
    if let Err(e) = store.logs().open(rec.id, cfg.log_limit).await {
        tracing::error!(run = rec.id, error = %e, "cannot open the run's log");
    }
    fleet.log_opened(rec.id);
    // Revoked since the dispatch was made: another host may enroll under its name.
    let verdict = if fleet.is_gone(&rec.host) {
        Verdict::Here(RunState::Cancelled, "agent revoked".into())
    } else {
        Watch::new(fleet, &cfg, &mut rec, started).until_end(news, &stop, &why).await
    };
    if matches!(verdict, Verdict::Left) {
        return rec;
    }
    if let Verdict::Here(_, reason) = &verdict {
        // Ended here: should its agent be connected after all (a report that crossed the
        // verdict), it stops the run too.
        fleet.send(&rec.host, Order::Cancel { run: rec.id, reason: reason.clone() });
    }
    let summary = store.logs().finish(rec.id).await;
    rec.stdout_bytes = summary.stdout_bytes;
    rec.stderr_bytes = summary.stderr_bytes;
    rec.truncated = summary.truncated;
    rec.ended_at = Some(Timestamp::now());
    settle(&mut rec, verdict);
    rec
}

/// When a run whose agent is away is given up, and as what.
#[derive(Clone, Copy)]
struct GiveUp {
    at: Instant,
    /// The agent had been handed the run: it ends `lost` (`agent unreachable`), not
    /// `cancelled` (`agent unavailable`).
    lost: bool,
}

/// A run on its agent, followed from its assignment until its end is known.
struct Watch<'a> {
    fleet: &'a Fleet,
    rec: &'a mut RunRecord,
    /// The assignment, handed to the agent again each time it attaches.
    order: Order,
    host_wait: std::time::Duration,
    lost_after: std::time::Duration,
    /// Whether a connected agent has been handed the run at least once: from then on, its
    /// absence makes the run unreachable (then lost), not unavailable.
    assigned: bool,
    /// Set while the agent is away.
    give_up: Option<GiveUp>,
    on_start: Option<OnStart>,
    /// The reason of a stop asked for, once it is.
    stopping: Option<String>,
    /// The agent's pid and start, recorded once the run has lived `PID_AFTER` (a shorter
    /// run's end carries them: one change of its row instead of two side by side).
    pid_due: Option<(Instant, u32, Timestamp)>,
}

impl<'a> Watch<'a> {
    /// Hands the run to its agent if it is connected, and starts watching.
    fn new(fleet: &'a Fleet, cfg: &UnitConfig, rec: &'a mut RunRecord, started: OnStart) -> Self {
        let order = Order::Assign(Assignment {
            run: rec.id,
            attempt: rec.attempt,
            unit: rec.unit.clone(),
            trigger: rec.trigger.as_str().into(),
            definition: cfg.for_agent(),
            // A fire made ahead of its time starts at it (a later batch's, or a retry's, is
            // past).
            start_at_us: rec.scheduled_at.map(|t| t.as_microsecond()),
        });
        let assigned = fleet.send(&rec.host, order.clone());
        let host_wait = cfg.host_wait;
        Watch {
            fleet,
            rec,
            order,
            host_wait,
            lost_after: fleet.config().lost_after,
            assigned,
            give_up: (!assigned).then(|| GiveUp { at: Instant::now() + host_wait, lost: false }),
            on_start: Some(started),
            stopping: None,
            pid_due: None,
        }
    }

    /// Follows the run until its agent reports its end, it is ended here, or it is left to
    /// the next daemon.
    async fn until_end(
        mut self,
        mut news: mpsc::UnboundedReceiver<News>,
        stop: &CancellationToken,
        why: &StopCause,
    ) -> Verdict {
        loop {
            let give_up = self.give_up;
            let pid_at = self.pid_due.map(|(at, ..)| at);
            tokio::select! {
                n = news.recv() => if let Some(v) = self.heard(n) {
                    return v;
                },
                () = stop.cancelled(), if self.stopping.is_none() => if let Some(v) = self.stop(why) {
                    return v;
                },
                () = async { tokio::time::sleep_until(pid_at.expect("guarded")).await }, if pid_at.is_some() => {
                    self.record_pid();
                }
                () = async { tokio::time::sleep_until(give_up.expect("guarded").at).await }, if give_up.is_some() => {
                    return if give_up.is_some_and(|g| g.lost) {
                        Verdict::Here(RunState::Lost, "agent unreachable".into())
                    } else {
                        Verdict::Here(RunState::Cancelled, StopReason::AgentUnavailable.as_str().into())
                    };
                }
            }
        }
    }

    /// What the run's slot heard; the verdict if that ends the watch.
    fn heard(&mut self, news: Option<News>) -> Option<Verdict> {
        let (fleet, host) = (self.fleet, &self.rec.host);
        match news {
            Some(News::Attached) => {
                if fleet.send(host, self.order.clone()) {
                    self.assigned = true;
                    self.give_up = None;
                    if let Some(reason) = &self.stopping {
                        let run = self.rec.id;
                        fleet.send(host, Order::Cancel { run, reason: reason.clone() });
                    }
                }
            }
            Some(News::Detached) => {
                let after = if self.assigned { self.lost_after } else { self.host_wait };
                let lost = self.assigned;
                self.give_up = Some(GiveUp { at: Instant::now() + after, lost });
            }
            Some(News::Started { pid, at }) => {
                self.pid_due = Some((Instant::now() + PID_AFTER, pid, at));
                self.rec.pid = Some(pid);
                self.rec.started_at = Some(at);
                if let Some(f) = self.on_start.take() {
                    f(pid, at);
                }
            }
            Some(News::Finished(o)) => return Some(Verdict::Reported(o)),
            Some(News::Revoked) => {
                return Some(Verdict::Here(RunState::Lost, "agent revoked".into()));
            }
            None => {
                let reason = "internal error: the run's slot closed".into();
                return Some(Verdict::Here(RunState::Lost, reason));
            }
        }
        None
    }

    /// The run was asked to stop: tells its agent; the verdict if the run ends here.
    fn stop(&mut self, why: &StopCause) -> Option<Verdict> {
        // The daemon shutting down leaves the run to its agent and the next daemon.
        if !why.is_set() || why.get() == StopReason::Shutdown {
            return Some(Verdict::Left);
        }
        let reason = why.get().as_str().to_string();
        self.stopping = Some(reason.clone());
        // An agent away now is told when it comes back (it holds a run the server no longer
        // has active).
        let cancel = Order::Cancel { run: self.rec.id, reason: reason.clone() };
        if self.fleet.send(&self.rec.host, cancel) {
            return None;
        }
        let state = match why.get() {
            StopReason::Timeout => RunState::TimedOut,
            _ => RunState::Cancelled,
        };
        Some(Verdict::Here(state, reason))
    }

    /// Records the pid of a run that has lived `PID_AFTER`.
    fn record_pid(&mut self) {
        if let Some((_, pid, at)) = self.pid_due.take() {
            // The pid is of the agent's host: no boot id, never signalled here.
            self.fleet.store().set_pid(self.rec.id, pid, at, None, None);
        }
    }
}

/// Writes how the run ended into `rec`, whose output and end time are already there.
fn settle(rec: &mut RunRecord, verdict: Verdict) {
    match verdict {
        Verdict::Reported(o) => {
            rec.state = o
                .state
                .parse()
                .ok()
                .filter(|s: &RunState| s.is_final())
                .unwrap_or(RunState::Failed);
            rec.exit_code = o.exit_code;
            rec.signal = o.signal;
            rec.reason = o.reason;
            rec.pid = o.pid.or(rec.pid);
            match o.started_at_us {
                Some(us) => {
                    rec.started_at = Timestamp::from_microsecond(us).ok().or(rec.started_at);
                }
                // Ended before it started (stopped while it waited for its time, refused):
                // the dispatch's time is no start.
                None if rec.pid.is_none() => rec.started_at = None,
                None => {}
            }
            rec.ended_at = Timestamp::from_microsecond(o.ended_at_us).ok().or(rec.ended_at);
        }
        Verdict::Here(state, reason) => {
            rec.state = state;
            rec.reason = Some(reason);
        }
        Verdict::Left => unreachable!("a run left to the next daemon is not settled"),
    }
}
