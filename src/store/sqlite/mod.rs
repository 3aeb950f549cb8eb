//! The embedded store: SQLite (WAL) in the state directory.
//!
//! All SQLite work happens on one dedicated thread. Callers send it closures; it runs every
//! closure that is waiting in one transaction (each inside its own savepoint, so one failing
//! change does not undo the others), commits once, and only then answers the callers and
//! publishes the events the batch produced. An answer therefore means the change is durable,
//! and a burst of changes costs one `fsync`.
//!
//! When a commit fails (disk full, read-only state directory…), every change in the batch is
//! refused with a storage error and nothing of it is kept. From then on each job gets a
//! transaction of its own, so reads keep being answered while changes fail, until a change
//! commits again. The end of a run that could not be recorded is kept in memory and retried
//! every second, so that a run never stays `running` in the store once space is back.

mod fleet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{broadcast, oneshot};

use super::{
    API_TASK_DONE, AUDIT_KEPT, ApiTask, AuditRecord, Backend, Commits, DispatchFilter,
    DispatchRecord, DispatchState, EVENTS_KEPT, Event, EventKind, RunFilter, StaleRun, StoredAgent,
    StoredUnit, logs,
};
use crate::error::{Error, Result};
use crate::run::{RunRecord, RunState, Trigger};
use fleet::{
    AGENT_COLUMNS, DISPATCH_COLUMNS, agent_from_row, counts_of, dispatch_from_row, get_agent,
    get_dispatch, runs_of,
};

/// What a closure on the store thread sees.
pub struct Tx<'a> {
    conn: &'a Connection,
    events: Vec<Event>,
    delete_after_commit: Vec<PathBuf>,
    logs_dir: &'a Path,
}

impl Tx<'_> {
    fn emit(
        &mut self,
        kind: EventKind,
        unit: &str,
        run: Option<i64>,
        state: Option<&str>,
    ) -> Result<()> {
        let time = Timestamp::now();
        self.conn.execute(
            "INSERT INTO events(time, kind, unit, run, state) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![time.as_microsecond(), kind.as_str(), unit, run, state],
        )?;
        let seq = self.conn.last_insert_rowid();
        self.events.push(Event {
            seq,
            time,
            kind,
            unit: unit.into(),
            run,
            state: state.map(str::to_string),
        });
        Ok(())
    }
}

/// A change to run on the store thread. `work` runs inside the batch's transaction and says
/// whether it failed (so its writes are rolled back); `done` runs after the commit, with the
/// commit's error if there was one, and answers the caller.
struct Job {
    work: Box<dyn FnOnce(&mut Tx<'_>) -> bool + Send>,
    done: Done,
    /// Nobody waits for it: it may wait up to [`LINGER`] to share a commit with others.
    lazy: bool,
}

/// Answers a job's caller with the commit's error, if any.
type Done = Box<dyn FnOnce(Option<&str>) + Send>;

impl Job {
    fn new<T: Send + 'static>(
        f: impl FnOnce(&mut Tx<'_>) -> Result<T> + Send + 'static,
        answer: impl FnOnce(Result<T>) + Send + 'static,
        lazy: bool,
    ) -> Job {
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
        let slot2 = slot.clone();
        Job {
            work: Box::new(move |t| {
                let r = f(t);
                let failed = r.is_err();
                *slot2.lock().expect("store slot") = Some(r);
                failed
            }),
            done: Box::new(move |commit_error| {
                let r = match (commit_error, slot.lock().expect("store slot").take()) {
                    (Some(e), _) => Err(Error::Storage(e.to_string())),
                    (None, Some(r)) => r,
                    (None, None) => Err(Error::Storage("change was not applied".into())),
                };
                answer(r);
            }),
            lazy,
        }
    }
}

/// Ends of runs that could not be recorded yet, with their unit's `keep_runs`.
type Unrecorded = Arc<Mutex<Vec<(RunRecord, u32)>>>;

/// The SQLite store: a handle to its thread.
pub(super) struct Sqlite {
    path: PathBuf,
    jobs: std_mpsc::Sender<Job>,
    unrecorded: Unrecorded,
    commits: Commits,
}

/// The schema. `runs.id` is AUTOINCREMENT so that ids are never reused, even after deletes.
/// `run_counts` (runs per state, kept by triggers) answers `Daemon.Status` without counting a
/// history of millions of runs on the store thread.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS units (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    stopped INTEGER NOT NULL DEFAULT 0,
    last_fire INTEGER,
    anchor INTEGER,
    runs_total INTEGER NOT NULL DEFAULT 0,
    failures_total INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unit TEXT NOT NULL,
    state TEXT NOT NULL,
    trigger TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    boot_id TEXT,
    queued_at INTEGER NOT NULL,
    scheduled_at INTEGER,
    started_at INTEGER,
    ended_at INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0,
    dispatch INTEGER,
    ignored INTEGER NOT NULL DEFAULT 0,
    late_result TEXT,
    notified TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_unit ON runs(unit, id);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs(state) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS runs_by_dispatch ON runs(dispatch) WHERE dispatch IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_by_unit_alone ON runs(unit, id) WHERE dispatch IS NULL;
CREATE TABLE IF NOT EXISTS run_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS run_counts_insert AFTER INSERT ON runs BEGIN
    INSERT INTO run_counts(state, n) VALUES (NEW.state, 1)
        ON CONFLICT(state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS run_counts_delete AFTER DELETE ON runs BEGIN
    UPDATE run_counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS run_counts_update AFTER UPDATE OF state ON runs
    WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE run_counts SET n = n - 1 WHERE state = OLD.state;
    INSERT INTO run_counts(state, n) VALUES (NEW.state, 1)
        ON CONFLICT(state) DO UPDATE SET n = n + 1;
END;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    unit TEXT NOT NULL,
    run INTEGER,
    state TEXT
);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    version TEXT NOT NULL DEFAULT '',
    os TEXT NOT NULL DEFAULT '',
    arch TEXT NOT NULL DEFAULT '',
    max_runs INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    last_seen INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS join_tokens (
    hash TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    spent_by TEXT
);
CREATE TABLE IF NOT EXISTS dispatches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unit TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    ended_at INTEGER,
    total INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    tolerance INTEGER,
    forgiven INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dispatches_by_unit ON dispatches(unit, id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    peer TEXT NOT NULL,
    method TEXT NOT NULL,
    unit TEXT,
    outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    account TEXT NOT NULL,
    timeout INTEGER NOT NULL,
    hosts TEXT NOT NULL,
    script TEXT NOT NULL,
    args TEXT NOT NULL,
    creator TEXT NOT NULL,
    created INTEGER NOT NULL,
    added INTEGER NOT NULL DEFAULT 0
);
";

/// Columns added to a table after its first release: `(table, column, type)`. A store written
/// by an older taskd gets them on open; `CREATE TABLE` above already has them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("runs", "scheduled_at", "INTEGER"),
    ("runs", "dispatch", "INTEGER"),
    ("runs", "ignored", "INTEGER NOT NULL DEFAULT 0"),
    ("runs", "late_result", "TEXT"),
    ("runs", "notified", "TEXT"),
];

fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, ty) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
        }
    }
    Ok(())
}

/// Commits between two prunings of the events and the audit log.
const PRUNE_EVERY: usize = 1024;
/// Rows one pruning deletes at most per table, so that the first pruning of a large backlog
/// (a database from before audit records were pruned) does not hold up commits for long.
const PRUNE_CHUNK: i64 = 10_000;
/// Changes committed together at most.
const MAX_BATCH: usize = 512;
/// How long a batch of changes nobody waits for (a pid, a fire time, an audit record) waits
/// for an awaited change to commit with, saving a sync of the disk. Bounds their delay.
const LINGER: Duration = Duration::from_millis(20);
/// How often the store thread retries recording the ends of runs it could not record.
const RETRY: Duration = Duration::from_secs(1);

fn ts(us: i64) -> Timestamp {
    Timestamp::from_microsecond(us).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn opt_ts(us: Option<i64>) -> Option<Timestamp> {
    us.map(ts)
}

const RUN_COLUMNS: &str = "id, unit, state, trigger, attempt, host, pid, queued_at, started_at, \
     ended_at, exit_code, signal, reason, stdout_bytes, stderr_bytes, truncated, scheduled_at, dispatch, late_result, notified";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let state: String = r.get(2)?;
    let trigger: String = r.get(3)?;
    Ok(RunRecord {
        id: r.get(0)?,
        unit: r.get(1)?,
        state: state.parse().unwrap_or(RunState::Lost),
        trigger: trigger.parse().unwrap_or(Trigger::Manual),
        attempt: r.get(4)?,
        host: r.get(5)?,
        pid: r.get(6)?,
        queued_at: ts(r.get(7)?),
        started_at: opt_ts(r.get(8)?),
        ended_at: opt_ts(r.get(9)?),
        exit_code: r.get(10)?,
        signal: r.get(11)?,
        reason: r.get(12)?,
        stdout_bytes: r.get::<_, i64>(13)? as u64,
        stderr_bytes: r.get::<_, i64>(14)? as u64,
        truncated: r.get(15)?,
        scheduled_at: opt_ts(r.get(16)?),
        dispatch: r.get(17)?,
        late_result: r.get(18)?,
        notified: r.get(19)?,
    })
}

/// The columns [`unit_from_row`] reads, in its order.
const UNIT_COLUMNS: &str = "name, definition, created_at, updated_at, paused, stopped, last_fire, \
     runs_total, failures_total, COALESCE(anchor, updated_at)";

/// A unit from the row's columns `base..`, in the order of [`UNIT_COLUMNS`].
fn unit_from_row(r: &rusqlite::Row<'_>, base: usize) -> rusqlite::Result<StoredUnit> {
    let def: String = r.get(base + 1)?;
    Ok(StoredUnit {
        name: r.get(base)?,
        definition: serde_json::from_str(&def).unwrap_or(serde_json::Value::Null),
        created_at: ts(r.get(base + 2)?),
        updated_at: ts(r.get(base + 3)?),
        paused: r.get(base + 4)?,
        stopped: r.get(base + 5)?,
        last_fire: opt_ts(r.get(base + 6)?),
        runs_total: r.get::<_, i64>(base + 7)? as u64,
        failures_total: r.get::<_, i64>(base + 8)? as u64,
        anchor: ts(r.get(base + 9)?),
    })
}

impl Sqlite {
    /// Opens (creating if needed) `taskd.db` in `dir` and starts the store thread, which
    /// publishes committed events to `events` and deletes the log files of deleted runs from
    /// `logs_dir`.
    pub(super) fn open(
        dir: &Path,
        logs_dir: &Path,
        events: broadcast::Sender<Event>,
        commits: Commits,
    ) -> Result<Sqlite> {
        use std::os::unix::fs::OpenOptionsExt;
        let db_path = dir.join("taskd.db");
        // Created private before SQLite opens it: SQLite gives the WAL and shared-memory files
        // the database file's mode.
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&db_path)
            .map_err(|e| Error::io(&db_path, e))?;
        let conn = Connection::open(&db_path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite refused WAL mode");
        }
        // FULL: a commit is on disk before the caller hears "ok", even across power loss.
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        // The schema, and the run counts of a database from before they were kept, at once.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let counted: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'run_counts'",
            [],
            |r| r.get(0),
        )?;
        conn.execute_batch(SCHEMA)?;
        add_missing_columns(&conn)?;
        if !counted {
            conn.execute_batch(
                "INSERT INTO run_counts(state, n) SELECT state, COUNT(*) FROM runs GROUP BY state",
            )?;
        }
        conn.execute_batch("COMMIT")?;

        let (jobs, rx) = std_mpsc::channel::<Job>();
        let unrecorded = Unrecorded::default();
        let thread = StoreThread {
            conn,
            events,
            logs_dir: logs_dir.to_path_buf(),
            unrecorded: unrecorded.clone(),
            commits: commits.clone(),
        };
        std::thread::Builder::new()
            .name("taskd-store".into())
            .spawn(move || thread.run(rx))
            .map_err(|e| Error::io(dir, e))?;
        Ok(Sqlite { path: db_path, jobs, unrecorded, commits })
    }

    /// Runs `f` on the store thread inside the next batch; resolves after the batch committed.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Job::new(
            f,
            move |r| {
                let _ = tx.send(r);
            },
            false,
        );
        self.jobs.send(job).map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Queues `f` without waiting for it (errors are logged). Changes queued this way are
    /// committed in order with every other change.
    fn call_detached<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&mut Tx<'_>) -> Result<()> + Send + 'static,
    {
        let job = Job::new(
            f,
            move |r| {
                if let Err(e) = r {
                    tracing::error!(what, error = %e, "store update failed");
                }
            },
            true,
        );
        if self.jobs.send(job).is_err() {
            tracing::warn!(what, "store closed; change dropped");
        }
    }
}

#[async_trait]
impl Backend for Sqlite {
    fn commits(&self) -> u64 {
        self.commits.count()
    }

    fn location(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    async fn load_units(&self) -> Result<Vec<StoredUnit>> {
        self.call(|t| {
            let mut st =
                t.conn.prepare(&format!("SELECT {UNIT_COLUMNS} FROM units ORDER BY name"))?;
            let rows =
                st.query_map([], |r| unit_from_row(r, 0))?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_unit(&self, u: StoredUnit) -> Result<()> {
        self.call(move |t| {
            let def = u.definition.to_string();
            let n = t.conn.execute(
                "INSERT OR IGNORE INTO units(name, definition, created_at, updated_at, paused, \
                 stopped, last_fire, anchor) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7)",
                params![
                    u.name,
                    def,
                    u.created_at.as_microsecond(),
                    u.updated_at.as_microsecond(),
                    u.paused,
                    u.last_fire.map(|t| t.as_microsecond()),
                    u.anchor.as_microsecond()
                ],
            )?;
            if n == 0 {
                return Err(Error::UnitExists(u.name));
            }
            t.emit(EventKind::UnitAdded, &u.name, None, None)
        })
        .await
    }

    async fn update_definition(
        &self,
        name: &str,
        created_at: Timestamp,
        definition: serde_json::Value,
        paused: bool,
        at: Timestamp,
        rescheduled: bool,
    ) -> Result<()> {
        let name = name.to_string();
        self.call(move |t| {
            let n = t.conn.execute(
                "UPDATE units SET definition = ?3, updated_at = ?4, paused = ?5, \
                 anchor = CASE WHEN ?6 THEN ?4 ELSE COALESCE(anchor, updated_at) END \
                 WHERE name = ?1 AND created_at = ?2",
                params![
                    name,
                    created_at.as_microsecond(),
                    definition.to_string(),
                    at.as_microsecond(),
                    paused,
                    rescheduled
                ],
            )?;
            if n == 0 {
                return Err(Error::UnitNotFound(name));
            }
            t.emit(EventKind::UnitEdited, &name, None, None)
        })
        .await
    }

    async fn set_flags(
        &self,
        name: &str,
        paused: bool,
        stopped: bool,
        kind: EventKind,
    ) -> Result<()> {
        let name = name.to_string();
        self.call(move |t| {
            let n = t.conn.execute(
                "UPDATE units SET paused = ?2, stopped = ?3 WHERE name = ?1",
                params![name, paused, stopped],
            )?;
            if n == 0 {
                return Err(Error::UnitNotFound(name));
            }
            t.emit(kind, &name, None, None)
        })
        .await
    }

    fn set_last_fire(&self, name: &str, at: Timestamp) {
        let name = name.to_string();
        self.call_detached("last_fire", move |t| {
            t.conn.execute(
                "UPDATE units SET last_fire = ?2 WHERE name = ?1",
                params![name, at.as_microsecond()],
            )?;
            Ok(())
        });
    }

    fn emit(&self, kind: EventKind, unit: &str, state: Option<&'static str>) {
        let unit = unit.to_string();
        self.call_detached("event", move |t| t.emit(kind, &unit, None, state));
    }

    async fn delete_unit(&self, name: &str, keep_history: bool) -> Result<()> {
        let name = name.to_string();
        self.call(move |t| {
            let n = t.conn.execute("DELETE FROM units WHERE name = ?1", params![name])?;
            if n == 0 {
                return Err(Error::UnitNotFound(name));
            }
            if !keep_history {
                let ids: Vec<i64> = t
                    .conn
                    .prepare("SELECT id FROM runs WHERE unit = ?1")?
                    .query_map(params![name], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                t.conn.execute("DELETE FROM runs WHERE unit = ?1", params![name])?;
                for id in ids {
                    t.delete_after_commit.push(logs::path_in(t.logs_dir, id));
                }
            }
            t.emit(EventKind::UnitDeleted, &name, None, None)
        })
        .await
    }

    async fn create_run(
        &self,
        unit: &str,
        state: RunState,
        trigger: Trigger,
        attempt: u32,
        scheduled_at: Option<Timestamp>,
    ) -> Result<RunRecord> {
        let unit = unit.to_string();
        self.call(move |t| insert_run(t, unit, state, trigger, attempt, scheduled_at)).await
    }

    async fn create_runs(&self, unit: &str, triggers: Vec<Trigger>) -> Result<Vec<RunRecord>> {
        let unit = unit.to_string();
        self.call(move |t| {
            triggers
                .into_iter()
                .map(|trigger| insert_run(t, unit.clone(), RunState::Running, trigger, 1, None))
                .collect()
        })
        .await
    }

    async fn start_queued(&self, id: i64) -> Result<RunRecord> {
        self.call(move |t| {
            let now = Timestamp::now();
            let n = t.conn.execute(
                "UPDATE runs SET state = 'running', started_at = ?2 WHERE id = ?1 AND state = 'queued'",
                params![id, now.as_microsecond()],
            )?;
            if n == 0 {
                return Err(Error::Conflict(format!("run {id} is not queued")));
            }
            let rec = get_run(t.conn, id)?.ok_or(Error::RunNotFound(id))?;
            t.conn.execute(
                "UPDATE units SET runs_total = runs_total + 1 WHERE name = ?1",
                params![rec.unit],
            )?;
            t.emit(EventKind::RunStarted, &rec.unit, Some(id), Some("running"))?;
            Ok(rec)
        })
        .await
    }

    fn set_pid(
        &self,
        id: i64,
        pid: u32,
        started: Timestamp,
        pid_start: Option<u64>,
        boot_id: Option<String>,
    ) {
        self.call_detached("pid", move |t| {
            t.conn.execute(
                "UPDATE runs SET pid = ?2, started_at = ?3, pid_start = ?4, boot_id = ?5 \
                 WHERE id = ?1",
                params![id, pid, started.as_microsecond(), pid_start.map(|s| s as i64), boot_id],
            )?;
            Ok(())
        });
    }

    async fn finish_runs(&self, recs: Vec<RunRecord>, keep_runs: u32) -> Result<()> {
        let again = recs.clone();
        let r = self
            .call(move |t| {
                recs.iter().try_for_each(|rec| write_end(t, rec))?;
                // Once per unit, not per run: a dispatch's thousand ends prune once.
                let mut units: Vec<&str> = recs.iter().map(|r| r.unit.as_str()).collect();
                units.dedup();
                units.into_iter().try_for_each(|u| prune(t, u, keep_runs))
            })
            .await;
        if let Err(e) = &r
            && !matches!(e, Error::ShuttingDown)
        {
            let runs: Vec<i64> = again.iter().map(|r| r.id).collect();
            tracing::warn!(?runs, error = %e, "the end of a run is not recorded yet; retrying");
            lock(&self.unrecorded).extend(again.into_iter().map(|rec| (rec, keep_runs)));
            self.call_detached("retry", |_| Ok(()));
        }
        r
    }

    async fn get_run(&self, id: i64) -> Result<RunRecord> {
        self.call(move |t| get_run(t.conn, id)?.ok_or(Error::RunNotFound(id))).await
    }

    async fn list_runs(&self, f: RunFilter) -> Result<Vec<RunRecord>> {
        self.call(move |t| {
            // Only the conditions in use, so SQLite can use `runs_by_unit` (unit, id).
            let mut cond = Vec::new();
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(u) = f.unit {
                cond.push("unit = ?");
                args.push(u.into());
            }
            if let Some(s) = f.state {
                cond.push("state = ?");
                args.push(s.as_str().to_string().into());
            }
            if let Some(b) = f.before {
                cond.push("id < ?");
                args.push(b.into());
            }
            let filter = if cond.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", cond.join(" AND "))
            };
            args.push(i64::from(f.limit).into());
            let sql = format!("SELECT {RUN_COLUMNS} FROM runs {filter} ORDER BY id DESC LIMIT ?");
            let mut st = t.conn.prepare_cached(&sql)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args), run_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn load_units_page(
        &self,
        after: String,
        limit: u32,
    ) -> Result<Vec<(StoredUnit, Option<RunRecord>)>> {
        self.call(move |t| {
            // The run's columns first, where `run_from_row` reads them. No column name is in
            // both tables, so only the run's need their table named.
            let run_cols: Vec<String> =
                RUN_COLUMNS.split(',').map(|c| format!("r.{}", c.trim())).collect();
            let sql = format!(
                "SELECT {}, {UNIT_COLUMNS} FROM units u LEFT JOIN runs r \
                 ON r.id = (SELECT MAX(id) FROM runs WHERE unit = u.name) \
                 WHERE u.name > ?1 ORDER BY u.name LIMIT ?2",
                run_cols.join(", ")
            );
            let mut st = t.conn.prepare_cached(&sql)?;
            let rows = st
                .query_map(params![after, limit], |r| {
                    let run = match r.get::<_, Option<i64>>(0)? {
                        Some(_) => Some(run_from_row(r)?),
                        None => None,
                    };
                    Ok((unit_from_row(r, run_cols.len())?, run))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn recover_stale_runs(&self) -> Result<Vec<StaleRun>> {
        self.call(|t| {
            let sql = format!(
                "SELECT {RUN_COLUMNS}, pid_start, boot_id FROM runs WHERE state IN ('queued', 'running') \
                 AND host = 'local' AND (dispatch IS NULL OR state = 'running')"
            );
            let mut st = t.conn.prepare(&sql)?;
            let stale = st
                .query_map([], |r| {
                    Ok(StaleRun {
                        record: run_from_row(r)?,
                        pid_start: r.get::<_, Option<i64>>("pid_start")?.map(|v| v as u64),
                        boot_id: r.get("boot_id")?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(st);
            let now = Timestamp::now();
            let mut out = Vec::with_capacity(stale.len());
            for mut s in stale {
                let (state, reason) = if s.record.state == RunState::Running {
                    (RunState::Lost, "the daemon stopped while the run was active")
                } else {
                    (RunState::Cancelled, "the daemon stopped before the run started")
                };
                t.conn.execute(
                    "UPDATE runs SET state = ?2, ended_at = ?3, reason = ?4 WHERE id = ?1",
                    params![s.record.id, state.as_str(), now.as_microsecond(), reason],
                )?;
                if state == RunState::Lost {
                    t.conn.execute(
                        "UPDATE units SET failures_total = failures_total + 1 WHERE name = ?1",
                        params![s.record.unit],
                    )?;
                }
                t.emit(EventKind::RunFinished, &s.record.unit, Some(s.record.id), Some(state.as_str()))?;
                s.record.state = state;
                s.record.ended_at = Some(now);
                s.record.reason = Some(reason.into());
                out.push(s);
            }
            Ok(out)
        })
        .await
    }

    async fn last_event_seq(&self) -> Result<i64> {
        self.call(|t| {
            Ok(t.conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?)
        })
        .await
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            let kinds: Vec<String> =
                EventKind::ALL.iter().map(|k| format!("'{}'", k.as_str())).collect();
            format!(
                "SELECT seq, time, kind, unit, run, state FROM events \
                 WHERE seq > ?1 AND kind IN ({}) ORDER BY seq LIMIT ?2",
                kinds.join(", ")
            )
        });
        self.call(move |t| {
            let mut st = t.conn.prepare_cached(&SQL)?;
            let rows = st
                .query_map(params![after, limit], |r| {
                    Ok(Event {
                        seq: r.get(0)?,
                        time: ts(r.get(1)?),
                        kind: r.get::<_, String>(2)?.parse().map_err(|e: String| {
                            rusqlite::Error::FromSqlConversionFailure(
                                2,
                                rusqlite::types::Type::Text,
                                e.into(),
                            )
                        })?,
                        unit: r.get(3)?,
                        run: r.get(4)?,
                        state: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    fn audit(&self, a: AuditRecord) {
        self.call_detached("audit", move |t| {
            t.conn.execute(
                "INSERT INTO audit(time, peer, method, unit, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![a.time.as_microsecond(), a.peer, a.method, a.unit, a.outcome],
            )?;
            Ok(())
        });
    }

    async fn audit_log(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditRecord>> {
        self.call(move |t| {
            let mut st = t.conn.prepare(
                "SELECT id, time, peer, method, unit, outcome FROM audit WHERE id < ?2 \
                 ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = st
                .query_map(params![limit, before.unwrap_or(i64::MAX)], |r| {
                    Ok(AuditRecord {
                        id: r.get(0)?,
                        time: ts(r.get(1)?),
                        peer: r.get(2)?,
                        method: r.get(3)?,
                        unit: r.get(4)?,
                        outcome: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn run_counts(&self) -> Result<Vec<(String, u64)>> {
        self.call(|t| {
            let mut st = t.conn.prepare("SELECT state, n FROM run_counts WHERE n > 0")?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.call(|_| Ok(())).await
    }

    async fn load_agents(&self) -> Result<Vec<StoredAgent>> {
        self.call(|t| {
            let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name");
            let mut st = t.conn.prepare(&sql)?;
            let rows = st.query_map([], agent_from_row)?.collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    async fn create_join_token(&self, hash: String, expires_at: Timestamp) -> Result<()> {
        self.call(move |t| {
            // Expired tokens are of no use: forget them as new ones come.
            t.conn.execute(
                "DELETE FROM join_tokens WHERE expires_at < ?1",
                params![Timestamp::now().as_microsecond()],
            )?;
            t.conn.execute(
                "INSERT INTO join_tokens(hash, expires_at) VALUES (?1, ?2)",
                params![hash, expires_at.as_microsecond()],
            )?;
            Ok(())
        })
        .await
    }

    async fn join_agent(
        &self,
        token_hash: String,
        name: String,
        secret_hash: String,
    ) -> Result<StoredAgent> {
        self.call(move |t| {
            let now = Timestamp::now();
            let token: Option<(i64, Option<String>)> = t
                .conn
                .query_row(
                    "SELECT expires_at, spent_by FROM join_tokens WHERE hash = ?1",
                    params![token_hash],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let token = token.map(|(exp, by)| (ts(exp), by));
            super::fleet::check_join_token(token, now)?;
            if let Some(a) = get_agent(t, &name)?
                && !a.revoked
            {
                return Err(super::fleet::name_taken(&name));
            }
            t.conn.execute(
                "INSERT INTO agents(name, secret_hash, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(name) DO UPDATE SET secret_hash = ?2, created_at = ?3, revoked = 0",
                params![name, secret_hash, now.as_microsecond()],
            )?;
            t.conn.execute(
                "UPDATE join_tokens SET spent_by = ?2 WHERE hash = ?1",
                params![token_hash, name],
            )?;
            get_agent(t, &name)?.ok_or_else(|| Error::AgentNotFound(name.clone()))
        })
        .await
    }

    async fn revoke_agent(&self, name: String) -> Result<StoredAgent> {
        self.call(move |t| {
            let n =
                t.conn.execute("UPDATE agents SET revoked = 1 WHERE name = ?1", params![name])?;
            if n == 0 {
                return Err(Error::AgentNotFound(name));
            }
            get_agent(t, &name)?.ok_or(Error::AgentNotFound(name))
        })
        .await
    }

    fn agent_seen(&self, a: StoredAgent) {
        self.call_detached("agent", move |t| {
            t.conn.execute(
                "UPDATE agents SET labels = ?2, version = ?3, os = ?4, arch = ?5, max_runs = ?6, \
                 last_seen = ?7 WHERE name = ?1",
                params![
                    a.name,
                    serde_json::to_string(&a.labels).unwrap_or_else(|_| "{}".into()),
                    a.version,
                    a.os,
                    a.arch,
                    a.max_runs,
                    a.last_seen.map(|t| t.as_microsecond())
                ],
            )?;
            Ok(())
        });
    }

    async fn create_dispatch(
        &self,
        unit: &str,
        trigger: Trigger,
        hosts: Vec<String>,
        batch: u32,
        tolerance: Option<u32>,
        scheduled_at: Option<Timestamp>,
    ) -> Result<(DispatchRecord, Vec<RunRecord>)> {
        let unit = unit.to_string();
        self.call(move |t| {
            let now = Timestamp::now();
            t.conn.execute(
                "INSERT INTO dispatches(unit, trigger, state, created_at, total, batch, tolerance) \
                 VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?6)",
                params![
                    unit,
                    trigger.as_str(),
                    now.as_microsecond(),
                    hosts.len() as u32,
                    batch,
                    tolerance
                ],
            )?;
            let id = t.conn.last_insert_rowid();
            if let Some(at) = scheduled_at {
                t.conn.execute(
                    "UPDATE units SET last_fire = ?2 WHERE name = ?1",
                    params![unit, at.as_microsecond()],
                )?;
            }
            t.emit(EventKind::DispatchStarted, &unit, Some(id), Some("running"))?;
            let mut runs = Vec::with_capacity(hosts.len());
            for (i, host) in hosts.iter().enumerate() {
                let state = if batch == 0 || i < batch as usize {
                    RunState::Running
                } else {
                    RunState::Queued
                };
                let new =
                    NewRun { state, trigger, attempt: 1, scheduled_at, host, dispatch: Some(id) };
                runs.push(insert_run_on(t, unit.clone(), new)?);
            }
            Ok((get_dispatch(t, id)?, runs))
        })
        .await
    }

    async fn create_host_run(
        &self,
        unit: &str,
        host: String,
        dispatch: i64,
        trigger: Trigger,
        attempt: u32,
    ) -> Result<RunRecord> {
        let unit = unit.to_string();
        self.call(move |t| {
            let new = NewRun {
                state: RunState::Running,
                trigger,
                attempt,
                scheduled_at: None,
                host: &host,
                dispatch: Some(dispatch),
            };
            insert_run_on(t, unit, new)
        })
        .await
    }

    async fn set_dispatch_state(&self, id: i64, state: DispatchState) -> Result<DispatchRecord> {
        self.call(move |t| {
            let ended = state.is_final().then(|| Timestamp::now().as_microsecond());
            t.conn.execute(
                "UPDATE dispatches SET state = ?2, ended_at = ?3 WHERE id = ?1",
                params![id, state.as_str(), ended],
            )?;
            let d = get_dispatch(t, id)?;
            if state.is_final() {
                t.emit(EventKind::DispatchFinished, &d.unit, Some(id), Some(state.as_str()))?;
            }
            Ok(d)
        })
        .await
    }

    fn set_late_result(&self, id: i64, outcome: String) {
        self.call_detached("late result", move |t| {
            t.conn.execute(
                "UPDATE runs SET late_result = ?2 WHERE id = ?1 AND late_result IS NULL",
                params![id, outcome],
            )?;
            Ok(())
        });
    }

    fn set_notified(&self, id: i64, notified: String) {
        self.call_detached("notified", move |t| {
            t.conn.execute("UPDATE runs SET notified = ?2 WHERE id = ?1", params![id, notified])?;
            Ok(())
        });
    }

    async fn cancelling_dispatch(&self, id: i64) -> Result<()> {
        self.call(move |t| {
            t.conn.execute(
                "UPDATE dispatches SET state = 'cancelled' WHERE id = ?1 AND ended_at IS NULL",
                params![id],
            )?;
            Ok(())
        })
        .await
    }

    async fn resume_dispatch(&self, id: i64, forgiven: u32) -> Result<DispatchRecord> {
        self.call(move |t| {
            t.conn.execute(
                "UPDATE dispatches SET state = 'running', forgiven = ?2 WHERE id = ?1",
                params![id, forgiven],
            )?;
            get_dispatch(t, id)
        })
        .await
    }

    async fn set_ignored(&self, id: i64, ignored: bool) -> Result<()> {
        self.call(move |t| {
            t.conn.execute("UPDATE runs SET ignored = ?2 WHERE id = ?1", params![id, ignored])?;
            Ok(())
        })
        .await
    }

    async fn list_dispatches(
        &self,
        f: DispatchFilter,
    ) -> Result<Vec<(DispatchRecord, BTreeMap<String, u32>)>> {
        self.call(move |t| {
            let sql = format!(
                "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE (?1 IS NULL OR unit = ?1) \
                 AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR id < ?3) \
                 ORDER BY id DESC LIMIT ?4"
            );
            let list: Vec<DispatchRecord> = t
                .conn
                .prepare_cached(&sql)?
                .query_map(
                    params![f.unit, f.state.map(|s| s.as_str()), f.before, f.limit],
                    dispatch_from_row,
                )?
                .collect::<rusqlite::Result<_>>()?;
            list.into_iter()
                .map(|d| {
                    let counts = counts_of(t, d.id)?;
                    Ok((d, counts))
                })
                .collect()
        })
        .await
    }

    async fn get_dispatch(
        &self,
        id: i64,
    ) -> Result<(DispatchRecord, Vec<RunRecord>, BTreeMap<String, u32>)> {
        self.call(move |t| Ok((get_dispatch(t, id)?, runs_of(t, id)?, counts_of(t, id)?))).await
    }

    async fn open_dispatches(&self) -> Result<Vec<(DispatchRecord, Vec<RunRecord>)>> {
        self.call(|t| {
            let sql = format!(
                "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE ended_at IS NULL \
                 ORDER BY id"
            );
            let list: Vec<DispatchRecord> = t
                .conn
                .prepare(&sql)?
                .query_map([], dispatch_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            list.into_iter()
                .map(|d| {
                    let runs = runs_of(t, d.id)?;
                    Ok((d, runs))
                })
                .collect()
        })
        .await
    }

    async fn ignored_runs(&self, id: i64) -> Result<Vec<i64>> {
        self.call(move |t| {
            let mut st =
                t.conn.prepare_cached("SELECT id FROM runs WHERE dispatch = ?1 AND ignored")?;
            let rows = st.query_map(params![id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    async fn insert_api_task(&self, a: ApiTask) -> Result<i64> {
        self.call(move |t| {
            let hosts = serde_json::to_string(&a.hosts).unwrap_or_else(|_| "[]".into());
            t.conn.execute(
                "INSERT INTO api_tasks(title, account, timeout, hosts, script, args, creator, \
                 created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    a.title,
                    a.account,
                    a.timeout,
                    hosts,
                    a.script,
                    a.args,
                    a.creator,
                    a.created.as_microsecond()
                ],
            )?;
            Ok(t.conn.last_insert_rowid())
        })
        .await
    }

    async fn settle_api_task(&self, id: i64, added: bool) -> Result<()> {
        self.call(move |t| {
            let sql = if added {
                "UPDATE api_tasks SET added = 1 WHERE id = ?1"
            } else {
                "DELETE FROM api_tasks WHERE id = ?1"
            };
            t.conn.execute(sql, params![id])?;
            Ok(())
        })
        .await
    }

    async fn list_api_tasks(&self, limit: u32, before: Option<i64>) -> Result<Vec<ApiTask>> {
        self.call(move |t| {
            let sql = format!(
                "SELECT * FROM (SELECT id, title, account, timeout, hosts, script, args, creator, \
                 created, {API_TASK_DONE} FROM api_tasks t WHERE added AND id < ?2 \
                 ORDER BY id DESC LIMIT ?1) ORDER BY id"
            );
            let mut st = t.conn.prepare_cached(&sql)?;
            let rows = st
                .query_map(params![limit, before.unwrap_or(i64::MAX)], |r| {
                    let hosts: String = r.get(4)?;
                    Ok(ApiTask {
                        id: r.get(0)?,
                        title: r.get(1)?,
                        account: r.get(2)?,
                        timeout: r.get(3)?,
                        hosts: serde_json::from_str(&hosts).unwrap_or_default(),
                        script: r.get(5)?,
                        args: r.get(6)?,
                        creator: r.get(7)?,
                        created: ts(r.get(8)?),
                        done: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }
}

fn get_run(conn: &Connection, id: i64) -> Result<Option<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row(params![id], run_from_row).optional()?)
}

/// Records the end of a run (see [`Store::finish_run`]); nothing happens if it already ended.
/// Records the end of `rec` (if it is still active), its unit's counters and its event;
/// the caller prunes the unit's history.
fn write_end(t: &mut Tx<'_>, rec: &RunRecord) -> Result<()> {
    let ended = rec.ended_at.unwrap_or_else(Timestamp::now);
    let n = t.conn.execute(
        "UPDATE runs SET state = ?2, started_at = ?3, ended_at = ?4, exit_code = ?5, \
         signal = ?6, reason = ?7, stdout_bytes = ?8, stderr_bytes = ?9, truncated = ?10, \
         pid = COALESCE(?11, pid) WHERE id = ?1 AND state IN ('queued', 'running')",
        params![
            rec.id,
            rec.state.as_str(),
            rec.started_at.map(|s| s.as_microsecond()),
            ended.as_microsecond(),
            rec.exit_code,
            rec.signal,
            rec.reason,
            rec.stdout_bytes as i64,
            rec.stderr_bytes as i64,
            rec.truncated,
            rec.pid,
        ],
    )?;
    if n == 0 {
        return Ok(());
    }
    if matches!(rec.state, RunState::Failed | RunState::TimedOut) {
        t.conn.execute(
            "UPDATE units SET failures_total = failures_total + 1 WHERE name = ?1",
            params![rec.unit],
        )?;
    }
    t.emit(EventKind::RunFinished, &rec.unit, Some(rec.id), Some(rec.state.as_str()))?;
    Ok(())
}

fn prune(t: &mut Tx<'_>, unit: &str, keep: u32) -> Result<()> {
    // Runs of no dispatch: the newest `keep` of them stay.
    let ids: Vec<i64> = t
        .conn
        .prepare_cached(
            "SELECT id FROM runs WHERE unit = ?1 AND dispatch IS NULL \
             AND state NOT IN ('queued', 'running') \
             AND id < (SELECT COALESCE(MIN(id), 0) FROM \
                 (SELECT id FROM runs WHERE unit = ?1 AND dispatch IS NULL \
                  ORDER BY id DESC LIMIT ?2))",
        )?
        .query_map(params![unit, keep], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in ids {
        t.conn.execute("DELETE FROM runs WHERE id = ?1", params![id])?;
        t.delete_after_commit.push(logs::path_in(t.logs_dir, id));
    }
    // Dispatches are kept whole: the newest `keep` ended ones, with all their runs.
    let old: Vec<i64> = t
        .conn
        .prepare_cached(
            "SELECT id FROM dispatches WHERE unit = ?1 AND ended_at IS NOT NULL \
             AND id < (SELECT COALESCE(MIN(id), 0) FROM \
                 (SELECT id FROM dispatches WHERE unit = ?1 ORDER BY id DESC LIMIT ?2))",
        )?
        .query_map(params![unit, keep], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for d in old {
        let runs: Vec<i64> = t
            .conn
            .prepare_cached("SELECT id FROM runs WHERE dispatch = ?1")?
            .query_map(params![d], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        t.conn.execute("DELETE FROM runs WHERE dispatch = ?1", params![d])?;
        t.conn.execute("DELETE FROM dispatches WHERE id = ?1", params![d])?;
        for id in runs {
            t.delete_after_commit.push(logs::path_in(t.logs_dir, id));
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Inserts a new run of `unit` (running or queued) and says so in the events.
fn insert_run(
    t: &mut Tx<'_>,
    unit: String,
    state: RunState,
    trigger: Trigger,
    attempt: u32,
    scheduled_at: Option<Timestamp>,
) -> Result<RunRecord> {
    let run =
        NewRun { state, trigger, attempt, scheduled_at, host: crate::run::LOCAL, dispatch: None };
    insert_run_on(t, unit, run)
}

/// A run to insert, besides its unit.
struct NewRun<'a> {
    state: RunState,
    trigger: Trigger,
    attempt: u32,
    scheduled_at: Option<Timestamp>,
    /// `local` or an agent's name.
    host: &'a str,
    dispatch: Option<i64>,
}

/// Inserts a run of `unit` and emits its event.
fn insert_run_on(t: &mut Tx<'_>, unit: String, run: NewRun<'_>) -> Result<RunRecord> {
    let NewRun { state, trigger, attempt, scheduled_at, host, dispatch } = run;
    let now = Timestamp::now();
    let started = (state == RunState::Running).then_some(now);
    t.conn.execute(
        "INSERT INTO runs(unit, state, trigger, attempt, host, queued_at, scheduled_at, \
             started_at, dispatch) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            unit,
            state.as_str(),
            trigger.as_str(),
            attempt,
            host,
            now.as_microsecond(),
            scheduled_at.map(|s| s.as_microsecond()),
            started.map(|s| s.as_microsecond()),
            dispatch
        ],
    )?;
    let id = t.conn.last_insert_rowid();
    if state == RunState::Running {
        t.conn.execute(
            "UPDATE units SET runs_total = runs_total + 1 WHERE name = ?1",
            params![unit],
        )?;
    }
    let kind =
        if state == RunState::Running { EventKind::RunStarted } else { EventKind::RunQueued };
    t.emit(kind, &unit, Some(id), Some(state.as_str()))?;
    Ok(RunRecord {
        scheduled_at,
        started_at: started,
        host: host.to_string(),
        dispatch,
        ..RunRecord::fresh(id, unit, state, trigger, attempt, now)
    })
}

/// What one transaction did.
struct Committed {
    /// Why it did not commit, if it did not.
    error: Option<String>,
    /// Whether a job changed something that was committed.
    wrote: bool,
}

/// The store thread: the only owner of the SQLite connection.
struct StoreThread {
    conn: Connection,
    events: broadcast::Sender<Event>,
    logs_dir: PathBuf,
    unrecorded: Unrecorded,
    /// See [`Store::commits`].
    commits: Commits,
}

/// Whether commits fail (disk full…): then each job gets a transaction of its own.
struct Health {
    failing: bool,
    next_retry: Instant,
}

impl Health {
    /// Takes note of a transaction's outcome.
    fn note(&mut self, c: &Committed) {
        match &c.error {
            Some(e) if !self.failing => {
                tracing::error!(error = %e, "store: cannot commit; changes are refused until they can be written, reads go on");
                self.failing = true;
            }
            None if self.failing && c.wrote => {
                tracing::info!("store: changes are written again");
                self.failing = false;
                // Record the ends of runs that wait for it now.
                self.next_retry = Instant::now();
            }
            _ => {}
        }
    }
}

impl StoreThread {
    fn run(self, rx: std_mpsc::Receiver<Job>) {
        let mut since_prune = 0usize;
        let mut health = Health { failing: false, next_retry: Instant::now() };
        loop {
            let retrying = !lock(&self.unrecorded).is_empty();
            let first = if retrying {
                let wait = health.next_retry.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(j) => Some(j),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(j) => Some(j),
                    Err(_) => break,
                }
            };
            if retrying && Instant::now() >= health.next_retry {
                health.next_retry = Instant::now() + RETRY;
                let c = self.record_unrecorded();
                health.note(&c);
            }
            let Some(first) = first else { continue };
            let mut lazy = first.lazy;
            let mut batch = vec![first];
            let linger_until = Instant::now() + LINGER;
            while lazy && batch.len() < MAX_BATCH {
                match rx.recv_timeout(linger_until.saturating_duration_since(Instant::now())) {
                    Ok(j) => {
                        lazy = j.lazy;
                        batch.push(j);
                    }
                    Err(_) => break,
                }
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            if health.failing {
                for job in batch {
                    let c = self.commit(vec![job]);
                    health.note(&c);
                }
            } else {
                let c = self.commit(batch);
                health.note(&c);
                since_prune += usize::from(c.error.is_none());
            }
            if since_prune >= PRUNE_EVERY {
                since_prune = 0;
                if let Err(e) = prune_logs(&self.conn, EVENTS_KEPT, AUDIT_KEPT, PRUNE_CHUNK) {
                    tracing::warn!(error = %e, "cannot prune old events and audit records");
                }
            }
        }
        // The daemon is stopping: a last try for ends not recorded yet (else they are `lost`
        // at the next start).
        if !lock(&self.unrecorded).is_empty() {
            self.record_unrecorded();
        }
    }

    /// Runs `batch` in one transaction, each job in its own savepoint, commits, answers every
    /// job, and publishes the events (and deletes the files) of a committed batch. If the
    /// commit fails, the jobs that ran before any change in it was made, and changed nothing
    /// themselves, still get their answers: they read only what was committed before.
    fn commit(&self, batch: Vec<Job>) -> Committed {
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            // Nothing can be written: answer every caller with the error, run nothing.
            let msg = e.to_string();
            for job in batch {
                (job.done)(Some(&msg));
            }
            return Committed { error: Some(msg), wrote: false };
        }
        let conn = &self.conn;
        let mut tx = Tx {
            conn,
            events: Vec::new(),
            delete_after_commit: Vec::new(),
            logs_dir: &self.logs_dir,
        };
        let mut wrote = false;
        let mut done = Vec::with_capacity(batch.len());
        for job in batch {
            let events_before = tx.events.len();
            let deletes_before = tx.delete_after_commit.len();
            let changes_before = conn.total_changes();
            let savepoint = conn.execute_batch("SAVEPOINT job");
            let failed = (job.work)(&mut tx);
            let clean = !wrote;
            if failed && savepoint.is_ok() {
                // Undo whatever the failing change wrote, keeping the rest of the batch.
                let _ = conn.execute_batch("ROLLBACK TO job");
                tx.events.truncate(events_before);
                tx.delete_after_commit.truncate(deletes_before);
            } else {
                wrote |= conn.total_changes() != changes_before;
            }
            let _ = conn.execute_batch("RELEASE job");
            done.push((job.done, clean && !wrote));
        }
        let t = Instant::now();
        let commit = conn.execute_batch("COMMIT");
        // One line per commit (one fsync) at debug level: `RUST_LOG=taskd::store=debug`
        // shows how many changes each shared.
        tracing::debug!(changes = done.len(), ok = commit.is_ok(), "store commit");
        let err = commit.as_ref().err().map(|e| e.to_string());
        if err.is_some() {
            let _ = conn.execute_batch("ROLLBACK");
        } else {
            self.commits.record(t.elapsed());
        }
        let Tx { events: evs, delete_after_commit, .. } = tx;
        for (d, read_only) in done {
            d(if read_only { None } else { err.as_deref() });
        }
        if err.is_none() {
            for e in evs {
                let _ = self.events.send(e);
            }
            for p in delete_after_commit {
                let _ = std::fs::remove_file(&p);
            }
        }
        Committed { error: err, wrote }
    }

    /// Tries again to record the ends of runs that could not be recorded.
    fn record_unrecorded(&self) -> Committed {
        let ends = std::mem::take(&mut *lock(&self.unrecorded));
        let back = Arc::new(Mutex::new(Vec::new()));
        let jobs = ends
            .into_iter()
            .map(|(rec, keep)| {
                let (again, back) = (rec.clone(), back.clone());
                Job::new(
                    move |t| {
                        write_end(t, &rec)?;
                        prune(t, &rec.unit, keep)
                    },
                    move |r: Result<()>| {
                        if r.is_err() {
                            lock(&back).push((again, keep));
                        }
                    },
                    true,
                )
            })
            .collect();
        let c = self.commit(jobs);
        let back = std::mem::take(&mut *lock(&back));
        if back.is_empty() {
            tracing::info!("store: the ends of runs that were not recorded now are");
        }
        lock(&self.unrecorded).extend(back);
        c
    }
}

/// Deletes the oldest events and audit records beyond the newest `events` and `audit`, at most
/// `chunk` of each.
fn prune_logs(conn: &Connection, events: i64, audit: i64, chunk: i64) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM events WHERE seq <= MIN((SELECT MAX(seq) FROM events) - ?1, \
         (SELECT MIN(seq) FROM events) + ?2 - 1)",
        [events, chunk],
    )?;
    conn.execute(
        "DELETE FROM audit WHERE id <= MIN((SELECT MAX(id) FROM audit) - ?1, \
         (SELECT MIN(id) FROM audit) + ?2 - 1)",
        [audit, chunk],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::unit;

    /// The store in `dir`, and its event feed.
    fn open(dir: &Path) -> (Sqlite, broadcast::Sender<Event>) {
        let (events, _) = broadcast::channel(64);
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        (Sqlite::open(dir, &logs, events.clone(), Commits::new()).unwrap(), events)
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_events_and_audit_records() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        for i in 0..30 {
            store.insert_unit(unit(&format!("u{i}"))).await.unwrap();
            store.audit(AuditRecord {
                id: 0,
                time: Timestamp::now(),
                peer: "local".into(),
                method: format!("M{i}"),
                unit: None,
                outcome: "ok".into(),
            });
        }
        store.flush().await.unwrap();
        let db = Connection::open(dir.path().join("taskd.db")).unwrap();
        // At most 8 of each per pruning: events 30 → 22 → 14 → 6 → 5, audit 30 → 22 → 14 → 10.
        prune_logs(&db, 5, 10, 8).unwrap();
        let count = |table: &str| -> i64 {
            db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap()
        };
        assert_eq!((count("events"), count("audit")), (22, 22));
        for _ in 0..4 {
            prune_logs(&db, 5, 10, 8).unwrap();
        }
        let units: Vec<String> = db
            .prepare("SELECT unit FROM events ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(units, ["u25", "u26", "u27", "u28", "u29"]);
        let audit = store.audit_log(100, None).await.unwrap();
        let methods: Vec<&str> = audit.iter().map(|a| a.method.as_str()).collect();
        assert_eq!(methods, ["M29", "M28", "M27", "M26", "M25", "M24", "M23", "M22", "M21", "M20"]);
        let older = store.audit_log(3, Some(audit[4].id)).await.unwrap();
        let methods: Vec<&str> = older.iter().map(|a| a.method.as_str()).collect();
        assert_eq!(methods, ["M24", "M23", "M22"]);
    }

    #[tokio::test]
    async fn a_failing_change_does_not_undo_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, events) = open(dir.path());
        let mut events = events.subscribe();
        let (a, b, c) = tokio::join!(
            store.insert_unit(unit("a")),
            store.insert_unit(unit("a")),
            store.insert_unit(unit("b")),
        );
        let oks = [&a, &b, &c].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 2, "{a:?} {b:?} {c:?}");
        assert!(matches!(
            (&a, &b),
            (Err(Error::UnitExists(_)), _) | (_, Err(Error::UnitExists(_)))
        ));
        let names: Vec<_> = store.load_units().await.unwrap().into_iter().map(|u| u.name).collect();
        assert_eq!(names, ["a", "b"]);
        // Exactly one event per unit that was added.
        let mut seen = vec![events.recv().await.unwrap().unit, events.recv().await.unwrap().unit];
        seen.sort();
        assert_eq!(seen, ["a", "b"]);
        assert!(events.try_recv().is_err());
    }

    /// The kept counts, and the counts by a scan of the table.
    async fn counts(store: &Sqlite) -> (Vec<(String, u64)>, Vec<(String, u64)>) {
        let mut kept = store.run_counts().await.unwrap();
        kept.sort();
        let scanned = store
            .call(|t| {
                let mut st =
                    t.conn.prepare("SELECT state, COUNT(*) FROM runs GROUP BY state ORDER BY 1")?;
                let rows = st
                    .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
            .unwrap();
        (kept, scanned)
    }

    #[tokio::test]
    async fn run_counts_follow_every_change_and_are_rebuilt_for_an_old_database() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        store.insert_unit(unit("u")).await.unwrap();
        store.insert_unit(unit("v")).await.unwrap();
        for _ in 0..4 {
            let r =
                store.create_run("u", RunState::Running, Trigger::Manual, 1, None).await.unwrap();
            let mut done = r.clone();
            done.state = RunState::Succeeded;
            store.finish_run(done, 2).await.unwrap();
        }
        store.create_run("v", RunState::Queued, Trigger::Manual, 1, None).await.unwrap();
        store.create_run("v", RunState::Running, Trigger::Manual, 1, None).await.unwrap();
        let (kept, scanned) = counts(&store).await;
        assert_eq!(kept, scanned);
        assert_eq!(kept, [("queued".into(), 1), ("running".into(), 1), ("succeeded".into(), 2)]);
        store.recover_stale_runs().await.unwrap();
        store.delete_unit("u", false).await.unwrap();
        let (kept, scanned) = counts(&store).await;
        assert_eq!(kept, scanned);
        assert_eq!(kept, [("cancelled".into(), 1), ("lost".into(), 1)]);
        store.flush().await.unwrap();
        drop(store);

        // A database from before the counts were kept gets them counted once, at open.
        let db = Connection::open(dir.path().join("taskd.db")).unwrap();
        db.execute_batch(
            "DROP TRIGGER run_counts_insert; DROP TRIGGER run_counts_update; \
             DROP TRIGGER run_counts_delete; DROP TABLE run_counts; INSERT INTO runs(unit, state, trigger, attempt, host, \
             queued_at) VALUES ('v', 'failed', 'manual', 1, 'local', 0)",
        )
        .unwrap();
        drop(db);
        let (store, _) = open(dir.path());
        let (kept, scanned) = counts(&store).await;
        assert_eq!(kept, scanned);
        assert_eq!(kept.len(), 3);
    }

    #[tokio::test]
    async fn a_store_from_before_scheduled_at_opens_and_keeps_its_runs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join("taskd.db")).unwrap();
            old.execute_batch(&SCHEMA.replace("    scheduled_at INTEGER,\n", "")).unwrap();
            old.execute(
                "INSERT INTO runs(unit, state, trigger, attempt, host, queued_at) \
                 VALUES ('u', 'succeeded', 'add', 1, 'local', 1)",
                [],
            )
            .unwrap();
        }
        let (store, _) = open(dir.path());
        let old = store.get_run(1).await.unwrap();
        assert_eq!((old.state, old.scheduled_at), (RunState::Succeeded, None));
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        let new = store.create_run("u", RunState::Running, Trigger::Schedule, 1, Some(at));
        let id = new.await.unwrap().id;
        assert_eq!(store.get_run(id).await.unwrap().scheduled_at, Some(at));
    }

    #[tokio::test]
    async fn a_change_nobody_waits_for_commits_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (store, events) = open(dir.path());
        let mut events = events.subscribe();
        store.emit(EventKind::UnitFatal, "u", None);
        let e = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(e.expect("committed after lingering").unwrap().kind, EventKind::UnitFatal);
    }

    #[tokio::test]
    async fn events_of_a_kind_this_build_does_not_know_are_left_out_of_replays() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        store.emit(EventKind::UnitFatal, "a", None);
        // As a newer build might have written it.
        store
            .call(|t| {
                t.conn.execute(
                    "INSERT INTO events(time, kind, unit) VALUES (0, 'future.kind', 'h')",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        store.emit(EventKind::UnitFatal, "b", None);
        store.flush().await.unwrap();
        let units: Vec<String> =
            store.events_after(0, 1).await.unwrap().into_iter().map(|e| e.unit).collect();
        assert_eq!(units, ["a"]);
        let after = store.events_after(0, 10).await.unwrap();
        let units: Vec<&str> = after.iter().map(|e| e.unit.as_str()).collect();
        assert_eq!(units, ["a", "b"]);
        // A page that ends before the unknown one, then the next page: nothing lost.
        let next = store.events_after(after[0].seq, 1).await.unwrap();
        assert_eq!(next[0].unit, "b");
    }
}
