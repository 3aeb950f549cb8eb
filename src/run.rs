//! Runs: one execution of a unit. The run state machine, triggers, and the record kept for
//! every run.

use jiff::Timestamp;

use crate::names::named_enum;

named_enum! {
    /// The state of a run. The only transitions are
    /// `queued → running → succeeded | failed | timed_out | cancelled | lost` and
    /// `queued → cancelled`.
    pub enum RunState("a run state") {
        /// Waiting for an active run of the same unit to end (`overlap: queue`).
        Queued = "queued",
        /// The process is running.
        Running = "running",
        /// Exited with a code in `success_codes`.
        Succeeded = "succeeded",
        /// Exited with another code, was killed by a signal it was not sent by taskd, or
        /// could not be started.
        Failed = "failed",
        /// Stopped because it ran longer than `timeout`.
        TimedOut = "timed_out",
        /// Stopped on request (cancel, stop, delete, replace, shutdown).
        Cancelled = "cancelled",
        /// The daemon went away while the run was active.
        Lost = "lost",
    }
}

impl RunState {
    /// Whether the run has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Queued | RunState::Running)
    }

    /// Whether the state machine allows `self → next`.
    pub fn can_become(self, next: RunState) -> bool {
        match self {
            RunState::Queued => matches!(next, RunState::Running | RunState::Cancelled),
            RunState::Running => next.is_final(),
            _ => false,
        }
    }
}

named_enum! {
    /// Why a run started.
    pub enum Trigger("a trigger") {
        /// The unit was just added.
        Add = "add",
        /// `TaskUnit.Start`.
        Manual = "manual",
        /// A fire time of its schedule.
        Schedule = "schedule",
        /// A retry of a failed job run.
        Retry = "retry",
        /// A service restart.
        Restart = "restart",
        /// A fire time missed while the daemon was down (`catch_up: once`).
        CatchUp = "catch-up",
    }
}

named_enum! {
    /// Why taskd stopped a run: the `reason` recorded with its `cancelled` and `timed_out`
    /// runs (other runs' reasons are messages: why a run failed to start, was lost…).
    pub enum StopReason("a stop reason") {
        /// `Run.Cancel`. A service or tick unit is then restarted as after a crash.
        Cancelled = "cancelled",
        /// `TaskUnit.Stop`: the unit stays down until started.
        Stopped = "stopped",
        /// `TaskUnit.Delete`.
        Deleted = "deleted",
        /// A newer run replaced it (`overlap: replace`).
        Replaced = "replaced",
        /// The daemon shut down.
        Shutdown = "shutdown",
        /// It ran longer than `timeout`.
        Timeout = "timeout",
        /// Its host's agent did not connect within the unit's `host_wait`.
        AgentUnavailable = "agent unavailable",
    }
}

/// The host name of the daemon itself.
pub const LOCAL: &str = "local";

/// Everything recorded about one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Monotonic, never reused.
    pub id: i64,
    /// The unit's name.
    pub unit: String,
    /// Current state.
    pub state: RunState,
    /// Why it started.
    pub trigger: Trigger,
    /// 1 for the first attempt, 2 for the first retry…
    pub attempt: u32,
    /// Where it runs: `local`, or an agent's name.
    pub host: String,
    /// The dispatch it belongs to, for a unit whose `hosts` name agents.
    pub dispatch: Option<i64>,
    /// What its agent reported after the server had ended it (lost), as JSON.
    pub late_result: Option<String>,
    /// How its webhooks went (`notify`), as JSON: one `{url, attempts, status, error}` each.
    pub notified: Option<String>,
    /// Process id (and process group id) while and after running.
    pub pid: Option<u32>,
    /// When the run was created (queued or started).
    pub queued_at: Timestamp,
    /// For a scheduled run, the fire time it was started for.
    pub scheduled_at: Option<Timestamp>,
    /// When the process started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Why it was stopped, lost or failed to start.
    pub reason: Option<String>,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
    /// Whether output beyond `log_limit` was cut.
    pub truncated: bool,
}

impl RunRecord {
    /// Run `id` of `unit` as it is created: `state` (`queued` or `running`), nothing run yet,
    /// on this host. Set `scheduled_at` and `started_at` as they apply.
    pub fn fresh(
        id: i64,
        unit: String,
        state: RunState,
        trigger: Trigger,
        attempt: u32,
        queued_at: Timestamp,
    ) -> Self {
        RunRecord {
            id,
            unit,
            state,
            trigger,
            attempt,
            host: "local".into(),
            dispatch: None,
            late_result: None,
            notified: None,
            pid: None,
            queued_at,
            scheduled_at: None,
            started_at: None,
            ended_at: None,
            exit_code: None,
            signal: None,
            reason: None,
            stdout_bytes: 0,
            stderr_bytes: 0,
            truncated: false,
        }
    }

    /// The run, not started, ended `cancelled` now with `reason`.
    pub fn cancelled(self, reason: impl Into<String>) -> Self {
        RunRecord {
            state: RunState::Cancelled,
            ended_at: Some(Timestamp::now()),
            reason: Some(reason.into()),
            ..self
        }
    }

    /// Whether it runs on this host (rather than on an agent).
    pub fn is_local(&self) -> bool {
        self.host == LOCAL
    }

    /// Why taskd stopped it, if it did (a `cancelled` or `timed_out` run).
    pub fn stop_reason(&self) -> Option<StopReason> {
        matches!(self.state, RunState::Cancelled | RunState::TimedOut)
            .then(|| self.reason.as_deref()?.parse().ok())
            .flatten()
    }

    /// How long the run took (or has taken so far, given `now`).
    pub fn duration(&self, now: Timestamp) -> Option<jiff::SignedDuration> {
        let start = self.started_at?;
        Some(self.ended_at.unwrap_or(now).duration_since(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_specified_transitions_exist() {
        use RunState::*;
        let allowed = [
            (Queued, Running),
            (Queued, Cancelled),
            (Running, Succeeded),
            (Running, Failed),
            (Running, TimedOut),
            (Running, Cancelled),
            (Running, Lost),
        ];
        for a in RunState::ALL {
            for b in RunState::ALL {
                assert_eq!(a.can_become(b), allowed.contains(&(a, b)), "{a} -> {b}");
            }
        }
    }
}
