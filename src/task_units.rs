//! Units made from the seeds' tasks: one per REST task (`task-<id>`, seed 000) and per Redis
//! task (`redis-<id>`, seed 002). Such a unit carries its task's id in its environment
//! ([`TASK_ID`], and the Redis task's `type` in [`TASK_TYPE`]): its command can read them, the
//! Redis pusher knows the unit's runs by them, and the [`Janitor`] knows which units it may
//! remove (a user's own unit named `task-7` has no such variable and is never touched).
//!
//! The janitor keeps the unit count from growing with every task: once a task's unit is done
//! (its one run, or its dispatch on every host, ended) and its last run ended more than
//! `keep_tasks` ago, the unit is deleted with its runs and logs. The REST task itself stays
//! listed (`done: 1`). It sweeps every quarter of `keep_tasks` (1 s to 10 min), looking only at
//! units whose names start with those prefixes.

use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::registry::{ListFilter, Registry};
use crate::unit::UnitState;

/// The environment variable that tells a task's unit (and its command) the task's id.
pub const TASK_ID: &str = "TASKD_TASK_ID";
/// The environment variable that holds a Redis task's `type`.
pub const TASK_TYPE: &str = "TASKD_TASK_TYPE";
/// The name prefixes of tasks' units.
const PREFIXES: [&str; 2] = ["task-", "redis-"];

/// Removes tasks' units that are done and older than the time they are kept.
pub struct Janitor {
    registry: Registry,
    keep: Duration,
}

impl Janitor {
    /// A janitor of `registry`'s task units, keeping them `keep` after their last run ended.
    pub fn new(registry: Registry, keep: Duration) -> Janitor {
        Janitor { registry, keep }
    }

    /// Sweeps until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let every = (self.keep / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            let n = self.sweep().await;
            if n > 0 {
                tracing::info!(removed = n, "finished tasks' units removed");
            }
        }
    }

    /// Deletes the task units done since before `keep` ago: how many.
    pub async fn sweep(&self) -> usize {
        let Ok(keep) = jiff::SignedDuration::try_from(self.keep) else { return 0 };
        let before = Timestamp::now() - keep;
        let mut old = Vec::new();
        for prefix in PREFIXES {
            let f = ListFilter {
                state: Some(UnitState::Done),
                name_glob: Some(format!("{prefix}*")),
                ..ListFilter::default()
            };
            self.registry.list(&f, |c, s| {
                let ended = s.last_run.as_ref().and_then(|r| r.ended_at).unwrap_or(s.updated_at);
                if c.env.contains_key(TASK_ID) && s.active.is_empty() && ended < before {
                    old.push(c.name.clone());
                }
            });
        }
        let mut removed = 0;
        for name in old {
            match self.registry.delete(&name, false).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(unit = %name, error = %e, "cannot remove a finished task's unit")
                }
            }
        }
        removed
    }
}
