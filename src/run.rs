//! Runs: one execution of a unit. The run state machine, triggers, and the record kept for
//! every run.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;

/// The state of a run. The only transitions are
/// `queued → running → succeeded | failed | timed_out | cancelled | lost` and
/// `queued → cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Waiting for an active run of the same unit to end (`overlap: queue`).
    Queued,
    /// The process is running.
    Running,
    /// Exited with a code in `success_codes`.
    Succeeded,
    /// Exited with another code, was killed by a signal it was not sent by taskd, or could
    /// not be started.
    Failed,
    /// Stopped because it ran longer than `timeout`.
    TimedOut,
    /// Stopped on request (cancel, stop, delete, replace, shutdown).
    Cancelled,
    /// The daemon went away while the run was active.
    Lost,
}

impl RunState {
    /// Every state, in lifecycle order.
    pub const ALL: [RunState; 7] = [
        RunState::Queued,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::TimedOut,
        RunState::Cancelled,
        RunState::Lost,
    ];

    /// The wire name (`timed_out`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
            RunState::Cancelled => "cancelled",
            RunState::Lost => "lost",
        }
    }

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

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RunState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = RunState::ALL.iter().map(|s| s.as_str()).collect();
            format!("{s:?} is not a run state ({})", names.join(", "))
        })
    }
}

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// The unit was just added.
    Add,
    /// `TaskUnit.Start`.
    Manual,
    /// A fire time of its schedule.
    Schedule,
    /// A retry of a failed job run.
    Retry,
    /// A service restart.
    Restart,
    /// A fire time missed while the daemon was down (`catch_up: once`).
    CatchUp,
}

impl Trigger {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Add => "add",
            Trigger::Manual => "manual",
            Trigger::Schedule => "schedule",
            Trigger::Retry => "retry",
            Trigger::Restart => "restart",
            Trigger::CatchUp => "catch-up",
        }
    }
}

impl FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Trigger::Add,
            Trigger::Manual,
            Trigger::Schedule,
            Trigger::Retry,
            Trigger::Restart,
            Trigger::CatchUp,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not a trigger"))
    }
}

/// Why a run was stopped: the `reason` recorded with `cancelled` and `timed_out` runs.
pub mod reason {
    /// `Run.Cancel`. A service or tick unit is then restarted as after a crash.
    pub const CANCELLED: &str = "cancelled";
    /// `TaskUnit.Stop`: the unit stays down until started.
    pub const STOPPED: &str = "stopped";
    /// `TaskUnit.Delete`.
    pub const DELETED: &str = "deleted";
    /// A newer run replaced it (`overlap: replace`).
    pub const REPLACED: &str = "replaced";
    /// The daemon shut down.
    pub const SHUTDOWN: &str = "shutdown";
    /// It ran longer than `timeout`.
    pub const TIMEOUT: &str = "timeout";
}

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
    /// Where it runs (`local`).
    pub host: String,
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

    #[test]
    fn names_round_trip() {
        for s in RunState::ALL {
            assert_eq!(s.as_str().parse::<RunState>().unwrap(), s);
        }
        assert_eq!("catch-up".parse::<Trigger>().unwrap(), Trigger::CatchUp);
    }
}
