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
    /// opens now, before the future is first polled, so that what its agent reports from
    /// here on is never refused.
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
    mut news: mpsc::UnboundedReceiver<News>,
) -> RunRecord {
    let fleet = &ex.fleet;
    let store = fleet.store().clone();
    if let Err(e) = store.logs().open(rec.id, cfg.log_limit).await {
        tracing::error!(run = rec.id, error = %e, "cannot open the run's log");
    }
    let order = Order::Assign(Assignment {
        run: rec.id,
        attempt: rec.attempt,
        unit: rec.unit.clone(),
        trigger: rec.trigger.as_str().into(),
        definition: cfg.for_agent(),
        // A fire made ahead of its time starts at it (a later batch's, or a retry's, is past).
        start_at_us: rec.scheduled_at.map(|t| t.as_microsecond()),
    });
    let (host_wait, lost_after) = (cfg.host_wait, fleet.config().lost_after);
    // Revoked since the dispatch was made: another host may enroll under its name.
    let verdict = if fleet.is_gone(&rec.host) {
        Verdict::Here(RunState::Cancelled, "agent revoked".into())
    } else {
        // Whether a connected agent has been handed the run at least once: from then on, its
        // absence makes the run unreachable (then lost), not unavailable.
        let mut assigned = fleet.send(&rec.host, order.clone());
        let mut deadline = (!assigned).then(|| (Instant::now() + host_wait, false));
        let mut on_start = Some(started);
        let mut stopping: Option<String> = None;
        // The agent's pid and start, recorded once the run has lived `PID_AFTER` (a shorter
        // run's end carries them: one change of its row instead of two side by side).
        let mut pid_due: Option<(Instant, u32, Timestamp)> = None;
        loop {
            let at = deadline.map(|(at, _)| at);
            let pid_at = pid_due.map(|(at, ..)| at);
            tokio::select! {
                n = news.recv() => match n {
                    Some(News::Attached) => {
                        if fleet.send(&rec.host, order.clone()) {
                            assigned = true;
                            deadline = None;
                            if let Some(reason) = &stopping {
                                let run = rec.id;
                                fleet.send(&rec.host, Order::Cancel { run, reason: reason.clone() });
                            }
                        }
                    }
                    Some(News::Detached) => {
                        deadline = Some(if assigned {
                            (Instant::now() + lost_after, true)
                        } else {
                            (Instant::now() + host_wait, false)
                        });
                    }
                    Some(News::Started { pid, at }) => {
                        pid_due = Some((Instant::now() + PID_AFTER, pid, at));
                        rec.pid = Some(pid);
                        rec.started_at = Some(at);
                        if let Some(f) = on_start.take() {
                            f(pid, at);
                        }
                    }
                    Some(News::Finished(o)) => break Verdict::Reported(o),
                    Some(News::Revoked) => break Verdict::Here(RunState::Lost, "agent revoked".into()),
                    None => break Verdict::Here(RunState::Lost, "internal error: the run's slot closed".into()),
                },
                () = stop.cancelled(), if stopping.is_none() => {
                    // The daemon shutting down leaves the run to its agent and the next daemon.
                    if !why.is_set() || why.get() == StopReason::Shutdown {
                        break Verdict::Left;
                    }
                    let reason = why.get().as_str().to_string();
                    stopping = Some(reason.clone());
                    // An agent away now is told when it comes back (it holds a run the server
                    // no longer has active).
                    if !fleet.send(&rec.host, Order::Cancel { run: rec.id, reason: reason.clone() }) {
                        let state = if why.get() == StopReason::Timeout { RunState::TimedOut } else { RunState::Cancelled };
                        break Verdict::Here(state, reason);
                    }
                }
                () = async { tokio::time::sleep_until(pid_at.expect("guarded")).await }, if pid_at.is_some() => {
                    if let Some((_, pid, at)) = pid_due.take() {
                        // The pid is of the agent's host: no boot id, never signalled here.
                        store.set_pid(rec.id, pid, at, None, None);
                    }
                }
                () = async { tokio::time::sleep_until(at.expect("guarded")).await }, if at.is_some() => {
                    break if deadline.is_some_and(|(_, lost)| lost) {
                        Verdict::Here(RunState::Lost, "agent unreachable".into())
                    } else {
                        Verdict::Here(RunState::Cancelled, StopReason::AgentUnavailable.as_str().into())
                    };
                }
            }
        }
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
        Verdict::Left => unreachable!("returned above"),
    }
    rec
}
