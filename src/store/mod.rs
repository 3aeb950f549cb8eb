//! The store boundary: everything taskd keeps (units, runs, dispatches, events, the audit
//! log, agents' credentials) goes through [`Backend`], which two stores implement:
//!
//! - [`sqlite`]: the embedded default, one file in the state directory, one thread, changes
//!   batched into shared commits;
//! - [`postgres`]: a PostgreSQL database that several servers share (`--store postgres://…`).
//!
//! Both keep the same promises, which the store tests check against each:
//! - an answer means the change is durable (committed), and its events are published to
//!   [`Store::subscribe_events`] only after the commit, in the order of their sequence numbers;
//! - a change that fails changes nothing;
//! - run ids, event sequence numbers and audit ids only grow, and are never reused;
//! - the end of a run that cannot be recorded now (store unreachable, disk full) is kept in
//!   memory and retried until it is, so that a run never stays `running` in the store.
//!
//! Run output goes to [`Logs`]: files beside the SQLite database, or rows in PostgreSQL.

pub mod content;
pub mod copy;
mod fleet;
pub mod live;
pub mod logs;
mod postgres;
mod sqlite;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::names::named_enum;
use crate::run::{RunRecord, RunState, Trigger};

pub use fleet::{DispatchFilter, DispatchRecord, DispatchState, StoredAgent};
pub use logs::Logs;
pub use postgres::cluster::{Cluster, Lease, ServerRow};

/// A unit as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUnit {
    /// The unit's name.
    pub name: String,
    /// The definition as given, as JSON.
    pub definition: serde_json::Value,
    /// When it was added.
    pub created_at: Timestamp,
    /// When it was last edited.
    pub updated_at: Timestamp,
    /// Paused by the user.
    pub paused: bool,
    /// A service stopped by the user (stays stopped until `Start`).
    pub stopped: bool,
    /// The last fire time handled, for `catch_up`.
    pub last_fire: Option<Timestamp>,
    /// Where `every` schedules count from: set when the schedule was last defined.
    pub anchor: Timestamp,
    /// Runs started, ever.
    pub runs_total: u64,
    /// Runs that did not succeed, ever.
    pub failures_total: u64,
}

named_enum! {
    /// What an [`Event`] says happened.
    pub enum EventKind("an event kind") {
        /// `TaskUnit.Add`.
        UnitAdded = "unit.added",
        /// `TaskUnit.Edit`.
        UnitEdited = "unit.edited",
        /// `TaskUnit.Delete`.
        UnitDeleted = "unit.deleted",
        /// `TaskUnit.Start` of a stopped service (its flag cleared).
        UnitStarted = "unit.started",
        /// `TaskUnit.Stop`.
        UnitStopped = "unit.stopped",
        /// `TaskUnit.Pause`.
        UnitPaused = "unit.paused",
        /// `TaskUnit.Resume`.
        UnitResumed = "unit.resumed",
        /// A service hit its start limit.
        UnitFatal = "unit.fatal",
        /// A run was created to wait for the unit's active one (`overlap: queue`).
        RunQueued = "run.queued",
        /// A run started.
        RunStarted = "run.started",
        /// A run ended (its `state` says how).
        RunFinished = "run.finished",
        /// An agent connected (`unit` is the agent's name).
        AgentConnected = "agent.connected",
        /// An agent's connection dropped or went quiet (`unit` is the agent's name).
        AgentDisconnected = "agent.disconnected",
        /// A unit fired on its hosts (`run` is the dispatch's id).
        DispatchStarted = "dispatch.started",
        /// A dispatch ended (`run` is its id, `state` says how).
        DispatchFinished = "dispatch.finished",
    }
}

impl EventKind {
    /// Whether it is about a run (`run.*`).
    pub fn is_run(self) -> bool {
        matches!(self, EventKind::RunQueued | EventKind::RunStarted | EventKind::RunFinished)
    }
}

/// A change notification, as stored and broadcast.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Monotonic sequence number, assigned by the store.
    pub seq: i64,
    /// When it happened.
    pub time: Timestamp,
    /// What happened.
    pub kind: EventKind,
    /// The unit concerned.
    pub unit: String,
    /// The run concerned, if any.
    pub run: Option<i64>,
    /// The run's (or unit's) state after the change.
    pub state: Option<String>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Its number, increasing; given by the store (0 in a record to append).
    pub id: i64,
    /// When the call was made.
    pub time: Timestamp,
    /// Who made it (address, or `local`).
    pub peer: String,
    /// The method called.
    pub method: String,
    /// The unit concerned, if any.
    pub unit: Option<String>,
    /// `ok` or the error message.
    pub outcome: String,
}

/// A task of the seed's REST API (`POST /api/v1/task`): what was asked, kept as given. Its
/// unit is `task-<id>`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiTask {
    /// Its number, increasing; given by the store (0 in a task to insert).
    pub id: i64,
    /// Free text.
    pub title: String,
    /// The account the script runs as (empty: the daemon's or agent's own).
    pub account: String,
    /// Seconds a host's run may take (0: no limit).
    pub timeout: u32,
    /// The hosts, as given.
    pub hosts: Vec<String>,
    /// The script's text.
    pub script: String,
    /// The script's arguments, as given.
    pub args: String,
    /// Who asked.
    pub creator: String,
    /// When it was asked.
    pub created: Timestamp,
    /// Every host's run has ended (filled in by [`Backend::list_api_tasks`]).
    pub done: bool,
}

impl ApiTask {
    /// The name of the unit that runs task `id`.
    pub fn unit_name(id: i64) -> String {
        format!("task-{id}")
    }
}

/// SQL (the same for both stores) telling whether the task of the row `t` is done: its unit's
/// dispatch, or its unit's run on the daemon itself, has ended, or its unit is gone.
const API_TASK_DONE: &str = "(EXISTS (SELECT 1 FROM dispatches d WHERE d.unit = 'task-' || t.id \
     AND d.ended_at IS NOT NULL) OR EXISTS (SELECT 1 FROM runs r WHERE r.unit = 'task-' || t.id \
     AND r.dispatch IS NULL AND r.ended_at IS NOT NULL) OR NOT EXISTS (SELECT 1 FROM units u \
     WHERE u.name = 'task-' || t.id))";

/// Tasks `GET /api/v1/task` answers by default and at most (the newest).
pub const API_TASKS_LISTED: (u32, u32) = (1000, 10_000);

/// Filter for [`Store::list_runs`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs of this unit.
    pub unit: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// At most this many (newest first).
    pub limit: u32,
    /// Only runs with an id below this.
    pub before: Option<i64>,
}

/// A run left active by a previous daemon, found at start-up.
#[derive(Debug, Clone)]
pub struct StaleRun {
    /// The run, now recorded `lost` (or `cancelled` if it never started).
    pub record: RunRecord,
    /// Its process start time in clock ticks since boot, if known.
    pub pid_start: Option<u64>,
    /// The boot it ran in.
    pub boot_id: Option<String>,
}

/// Events buffered for subscribers; one that falls further behind goes back to the table.
/// Each slot is ~140 bytes, allocated at start.
const EVENTS_BUFFERED: usize = 1024;
/// Events kept for `Events.Subscribe { after_seq }` replay.
const EVENTS_KEPT: i64 = 100_000;
/// Audit records kept: the newest this many (about 6 MB), so a busy API does not grow the
/// database without bound.
const AUDIT_KEPT: i64 = 100_000;
/// What every store does; see the module documentation for the promises each keeps.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Transactions committed since the store was opened: how well changes share commits,
    /// for `Daemon.Status` and the tests.
    fn commits(&self) -> u64;

    /// Where it keeps its data, for people: `sqlite <file>`, or the PostgreSQL URL without
    /// its password.
    fn location(&self) -> String;

    /// All units.
    async fn load_units(&self) -> Result<Vec<StoredUnit>>;

    /// Records a new unit; fails with `UnitExists` if the name is taken.
    async fn insert_unit(&self, u: StoredUnit) -> Result<()>;

    /// Replaces the definition of the unit created at `created_at` (not a namesake added
    /// since); `rescheduled` moves the schedule's anchor to `at`.
    async fn update_definition(
        &self,
        name: &str,
        created_at: Timestamp,
        definition: serde_json::Value,
        paused: bool,
        at: Timestamp,
        rescheduled: bool,
    ) -> Result<()>;

    /// Records the user's pause/stop flags of a unit and emits `kind`.
    async fn set_flags(
        &self,
        name: &str,
        paused: bool,
        stopped: bool,
        kind: EventKind,
    ) -> Result<()>;

    /// Records the last fire time handled (for catch-up after a restart). Not awaited.
    fn set_last_fire(&self, name: &str, at: Timestamp);

    /// Emits an event that changes nothing else (`unit.fatal`, …). Not awaited.
    fn emit(&self, kind: EventKind, unit: &str, state: Option<&'static str>);

    /// Deletes a unit; unless `keep_history`, also its runs and their log files.
    async fn delete_unit(&self, name: &str, keep_history: bool) -> Result<()>;

    /// Creates a run in `state` (`queued` or `running`) and returns it with its new id.
    async fn create_run(
        &self,
        unit: &str,
        state: RunState,
        trigger: Trigger,
        attempt: u32,
        scheduled_at: Option<Timestamp>,
    ) -> Result<RunRecord>;

    /// Records new running runs of `unit`, one per trigger, in one change: a burst of starts
    /// of one unit shares a commit (one `fsync`) as starts of different units do.
    async fn create_runs(&self, unit: &str, triggers: Vec<Trigger>) -> Result<Vec<RunRecord>>;

    /// Moves a queued run to running.
    async fn start_queued(&self, id: i64) -> Result<RunRecord>;

    /// Records the process of a started run and when it started. Not awaited.
    fn set_pid(
        &self,
        id: i64,
        pid: u32,
        started: Timestamp,
        pid_start: Option<u64>,
        boot_id: Option<String>,
    );

    /// Records the end of a run, updates the unit's counters, and deletes runs (and logs)
    /// beyond the newest `keep_runs` of that unit. If it cannot be recorded now, the error is
    /// returned and the store keeps retrying until it is.
    async fn finish_run(&self, rec: RunRecord, keep_runs: u32) -> Result<()> {
        self.finish_runs(vec![rec], keep_runs).await
    }

    /// Records the ends of several runs of one unit in one change (one commit), as
    /// [`Store::finish_run`] does for one.
    async fn finish_runs(&self, recs: Vec<RunRecord>, keep_runs: u32) -> Result<()>;

    /// One run.
    async fn get_run(&self, id: i64) -> Result<RunRecord>;

    /// Runs, newest first.
    async fn list_runs(&self, f: RunFilter) -> Result<Vec<RunRecord>>;

    /// The units named after `after` (all of them for `""`), in name order, at most `limit`,
    /// each with its newest run. Start-up loads units a page at a time, so that a large set is
    /// never held in memory twice; the newest run is one index lookup per unit, whatever the
    /// length of the history.
    async fn load_units_page(
        &self,
        after: String,
        limit: u32,
    ) -> Result<Vec<(StoredUnit, Option<RunRecord>)>>;

    /// Marks every run on this host a previous daemon left `running` as `lost` and every
    /// `queued` one as `cancelled` (except those waiting for their turn in a dispatch, which
    /// the dispatch takes over), and returns them so their process groups can be killed.
    /// Runs on agents stay as they are: their agents report them to the new daemon.
    async fn recover_stale_runs(&self) -> Result<Vec<StaleRun>>;

    /// The newest event's sequence number (0 when there is none).
    async fn last_event_seq(&self) -> Result<i64>;

    /// Events with a sequence number above `after`, oldest first, at most `limit`. Events of
    /// a kind this build does not know (written by a newer one) are left out, so replaying
    /// the rest still works after a downgrade, page by page.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>>;

    /// Appends to the audit log. Not awaited.
    fn audit(&self, a: AuditRecord);

    /// The newest `limit` audit records (below id `before`, when given), newest first.
    async fn audit_log(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditRecord>>;

    /// Counts of runs by state, for `Daemon.Status`.
    async fn run_counts(&self) -> Result<Vec<(String, u64)>>;

    /// Waits until every change sent so far is committed.
    async fn flush(&self) -> Result<()>;

    /// Every agent ever enrolled, revoked ones included.
    async fn load_agents(&self) -> Result<Vec<StoredAgent>>;

    /// Records a join token (its hash), good until `expires_at`, once.
    async fn create_join_token(&self, hash: String, expires_at: Timestamp) -> Result<()>;

    /// Spends the join token whose hash is `token_hash` to enroll agent `name` with the
    /// credential whose secret hashes to `secret_hash`, in one change: a token enrolls one
    /// agent, once. A revoked agent's name may enroll again; an enrolled one's may not.
    async fn join_agent(
        &self,
        token_hash: String,
        name: String,
        secret_hash: String,
    ) -> Result<StoredAgent>;

    /// Marks agent `name` revoked: its credential is refused from now on.
    async fn revoke_agent(&self, name: String) -> Result<StoredAgent>;

    /// Records what agent `a.name` said of itself when it connected, and when. Not awaited.
    fn agent_seen(&self, a: StoredAgent);

    /// Records a dispatch of `unit` on `hosts` and its runs, in one change whatever the
    /// number of hosts: the first `batch` hosts (all, for 0) `running`, the others `queued`.
    /// A fire's dispatch (`scheduled_at`) is also the unit's last fire, as
    /// [`Backend::set_last_fire`] records it, in the same change.
    async fn create_dispatch(
        &self,
        unit: &str,
        trigger: Trigger,
        hosts: Vec<String>,
        batch: u32,
        tolerance: Option<u32>,
        scheduled_at: Option<Timestamp>,
    ) -> Result<(DispatchRecord, Vec<RunRecord>)>;

    /// A new running run of dispatch `dispatch` on `host`: a retry or a redo.
    async fn create_host_run(
        &self,
        unit: &str,
        host: String,
        dispatch: i64,
        trigger: Trigger,
        attempt: u32,
    ) -> Result<RunRecord>;

    /// Sets a dispatch's state (and its end, when final), emitting `dispatch.finished` when
    /// it ends.
    async fn set_dispatch_state(&self, id: i64, state: DispatchState) -> Result<DispatchRecord>;

    /// Keeps what an agent reported of run `id` after it ended here (`late_result`). Not
    /// awaited; its state does not change.
    fn set_late_result(&self, id: i64, outcome: String);

    /// Keeps how run `id`'s webhooks went (`notified`, JSON). Not awaited.
    fn set_notified(&self, id: i64, notified: String);

    /// Records that dispatch `id` is being cancelled: state `cancelled`, not ended yet (its
    /// active runs are stopping), so that a daemon taking it over stops them too.
    async fn cancelling_dispatch(&self, id: i64) -> Result<()>;

    /// Resumes dispatch `id` (state `running`), forgiving its first `forgiven` failures.
    async fn resume_dispatch(&self, id: i64, forgiven: u32) -> Result<DispatchRecord>;

    /// Marks run `id` of a dispatch ignored (or not): it no longer counts against the
    /// dispatch's tolerance or outcome.
    async fn set_ignored(&self, id: i64, ignored: bool) -> Result<()>;

    /// Dispatches, newest first, each with its counts by state.
    async fn list_dispatches(
        &self,
        f: DispatchFilter,
    ) -> Result<Vec<(DispatchRecord, BTreeMap<String, u32>)>>;

    /// One dispatch with all its runs (oldest first) and its counts.
    async fn get_dispatch(
        &self,
        id: i64,
    ) -> Result<(DispatchRecord, Vec<RunRecord>, BTreeMap<String, u32>)>;

    /// Dispatches not ended yet (running, paused, or being cancelled), each with its runs:
    /// what a starting daemon takes over.
    async fn open_dispatches(&self) -> Result<Vec<(DispatchRecord, Vec<RunRecord>)>>;

    /// Ids of the ignored runs of dispatch `id`.
    async fn ignored_runs(&self, id: i64) -> Result<Vec<i64>>;

    /// Records a task of the REST API; its id.
    async fn insert_api_task(&self, t: ApiTask) -> Result<i64>;

    /// Settles task `id` once its unit's `Add` was answered: listed from now on if the unit
    /// was `added`, else forgotten. (Until then it is not listed: its unit may not exist yet.)
    async fn settle_api_task(&self, id: i64, added: bool) -> Result<()>;

    /// The newest `limit` settled tasks of the REST API with an id below `before`, oldest
    /// first, each with `done` as of now.
    async fn list_api_tasks(&self, limit: u32, before: Option<i64>) -> Result<Vec<ApiTask>>;
}

/// The commits a store made: how many, and how long each took (`/metrics`).
#[derive(Clone)]
pub(crate) struct Commits {
    n: Arc<std::sync::atomic::AtomicU64>,
    latency: prometheus_client::metrics::histogram::Histogram,
}

impl Commits {
    fn new() -> Commits {
        Commits { n: Arc::default(), latency: crate::metrics::Metrics::commit_histogram() }
    }

    /// A commit that took `took`.
    pub(crate) fn record(&self, took: std::time::Duration) {
        self.n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.latency.observe(took.as_secs_f64());
    }

    /// Commits so far.
    pub(crate) fn count(&self) -> u64 {
        self.n.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A cheap-to-clone handle to the store: its backend (whose methods it derefs to), the run
/// logs and the event feed.
#[derive(Clone)]
pub struct Store {
    db: Arc<dyn Backend>,
    /// The same backend when it is PostgreSQL: it makes the servers' [`Cluster`] handles.
    postgres: Option<Arc<postgres::Postgres>>,
    events: broadcast::Sender<Event>,
    logs: Logs,
    dir: PathBuf,
    commits: Commits,
    /// Files kept for `file` units (`<state-dir>/files`).
    content: Arc<content::Content>,
}

impl Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.db
    }
}

/// Checks that `url` is a PostgreSQL URL taskd can connect with (its TLS settings too), without
/// connecting; the error names what is wrong, and not the password.
pub fn check_postgres_url(url: &str) -> Result<()> {
    postgres::target_of(url).map(drop)
}

impl Store {
    /// Opens (creating if needed) the embedded store in `dir`: `taskd.db` and `logs/`.
    pub fn open(dir: &Path) -> Result<Store> {
        let logs_dir = private_dir(dir)?;
        let (events, _) = broadcast::channel(EVENTS_BUFFERED);
        let commits = Commits::new();
        let db = sqlite::Sqlite::open(dir, &logs_dir, events.clone(), commits.clone())?;
        let logs = Logs::start(logs_dir)?;
        let content = Arc::new(content::Content::open(&dir.join("files"))?);
        let dir = dir.to_path_buf();
        Ok(Store { db: Arc::new(db), postgres: None, events, logs, dir, commits, content })
    }

    /// Connects to the PostgreSQL store at `url` (migrating its schema), which keeps the run
    /// logs too; `dir` is the state directory.
    pub async fn open_postgres(url: &str, dir: &Path) -> Result<Store> {
        private_dir(dir)?;
        let (events, _) = broadcast::channel(EVENTS_BUFFERED);
        let commits = Commits::new();
        let db = postgres::Postgres::open(url, events.clone(), commits.clone()).await?;
        let logs = Logs::start_table(db.log_table())?;
        let content =
            Arc::new(content::Content::open(&dir.join("files"))?.kept_in(db.file_table()));
        let db = Arc::new(db);
        let dir = dir.to_path_buf();
        Ok(Store { db: db.clone(), postgres: Some(db), events, logs, dir, commits, content })
    }

    /// This store as server `name` of a cluster (PostgreSQL only): the lease, the servers,
    /// and from now on runs created only while `name` holds the lease.
    pub fn join_cluster(&self, name: &str) -> Option<Result<Cluster>> {
        self.postgres.as_ref().map(|pg| pg.cluster(name.to_string()))
    }

    /// Notes that the engine starts on this store (in a cluster: this server took the lease):
    /// run logs carry on where another server left them, and event numbers after its.
    pub async fn engine_starts(&self) -> Result<()> {
        self.logs.engine_starts().await?;
        if let Some(pg) = &self.postgres {
            pg.start_numbering().await?;
        }
        Ok(())
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The run logs.
    pub fn logs(&self) -> &Logs {
        &self.logs
    }

    /// The files kept for `file` units.
    pub fn content(&self) -> &content::Content {
        &self.content
    }

    /// Whether this is a cluster's store (PostgreSQL), shared by several servers.
    pub fn is_shared(&self) -> bool {
        self.postgres.is_some()
    }

    /// How long the store's commits take (a histogram in seconds, for `/metrics`).
    pub fn commit_latency(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.commits.latency.clone()
    }

    /// Subscribes to events as they are committed.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Makes `dir` and its `logs/` private directories (created if missing); returns `logs/`.
fn private_dir(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let logs = dir.join("logs");
    for p in [dir, &logs] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .map_err(|e| Error::io(p, e))?;
    }
    Ok(logs)
}
