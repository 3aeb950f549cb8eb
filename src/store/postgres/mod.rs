//! The PostgreSQL store (`--store postgres://…`): the database several servers share.
//!
//! Mechanism:
//! - Changes run on a pool of connections (deadpool), each call in a transaction of its own,
//!   except the engine's frequent ones (a dispatch created, runs ended, a dispatch's state),
//!   which are made several to a transaction ([`group`]).
//! - **Events in one order**, numbered by this process, the one that writes, and announced to
//!   the other servers with `NOTIFY` ([`events`]): commits are not put in one line.
//! - Changes nobody waits for (a pid, a fire time, an audit record) go through one queue,
//!   several to a transaction, fire times and pids one statement each that skips rows
//!   another transaction holds (those are tried again shortly); a failed batch is tried
//!   again for a while.
//! - The end of a run that cannot be recorded (database unreachable) is kept in memory and
//!   retried every second until it is, as the SQLite store does.
//!
//! Run logs are rows of `run_logs` ([`logs`]); files kept for `file` units, of `files` and
//! `file_pieces` ([`files`]).
//!
//! Connections are plain TCP, a Unix socket, or TLS as the URL's `sslmode` asks, the
//! server's certificate always verified ([`target_of`]).

mod changes;
pub mod cluster;
pub(super) mod events;
pub(super) mod files;
mod group;
pub mod logs;
pub mod schema;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use jiff::Timestamp;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{
    API_TASK_DONE, AUDIT_KEPT, ApiTask, AuditRecord, Backend, Commits, DispatchFilter,
    DispatchRecord, DispatchState, EVENTS_KEPT, Event, EventKind, RunFilter, StaleRun, StoredAgent,
    StoredUnit,
};
use crate::error::{Error, Result};
use crate::run::{RunRecord, RunState, Trigger};

/// Connections in the pool at most.
const POOL_SIZE: usize = 16;
/// How long a call waits for a connection, or for one to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Changes nobody waits for, committed together at most.
const DETACHED_BATCH: usize = 512;
/// How long a batch of such changes is tried again before it is given up (and logged).
const DETACHED_RETRY_FOR: Duration = Duration::from_secs(60);
/// Such changes waiting at most (about 200 bytes each): while PostgreSQL cannot be reached,
/// the ones beyond are dropped, counted, rather than held without bound.
const DETACHED_QUEUED_MAX: usize = 65_536;
/// How often run ends not recorded yet are tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How soon changes whose rows were locked are tried again.
const BUSY_AGAIN: Duration = Duration::from_millis(20);
/// How often old events and audit records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A change nobody waits for, or a marker a flush waits on.
enum Detached {
    LastFire(String, Timestamp),
    Event(EventKind, String, Option<&'static str>),
    Pid { id: i64, pid: u32, started: Timestamp, pid_start: Option<u64>, boot_id: Option<String> },
    Audit(AuditRecord),
    AgentSeen(StoredAgent),
    LateResult(i64, String),
    Notified(i64, String),
    Flush(oneshot::Sender<()>),
}

/// Ends of runs that could not be recorded yet, with their unit's `keep_runs`.
type Unrecorded = Arc<Mutex<Vec<(RunRecord, u32)>>>;

/// The PostgreSQL store.
pub(super) struct Postgres {
    /// [`Backend::location`].
    location: String,
    /// How to connect (for the cluster's own connections).
    target: Target,
    /// The newest run when the store was opened (see [`logs::LogTable`]).
    newest_run: i64,
    pool: Pool,
    detached: DetachedQueue,
    unrecorded: Unrecorded,
    shared: Arc<Shared>,
    /// Makes the engine's frequent changes several to a transaction.
    group: group::Group,
}

/// What every transaction of the store needs.
pub(super) struct Shared {
    /// Transactions committed.
    commits: Commits,
    /// Armed in a cluster: changes are made only under the lease.
    fence: Arc<cluster::Fence>,
    /// Numbers and publishes events.
    seq: Arc<events::Sequencer>,
}

/// An event a transaction records at its commit: time, kind, unit, run, state.
type PendingEvent = (Timestamp, EventKind, String, Option<i64>, Option<String>);

/// A transaction, with what it needs to record events. Its methods take `&self`, so that
/// the changes of a [`group`] are made side by side in it (their statements pipelined).
///
/// It sends `BEGIN` and `COMMIT` itself, rather than through tokio-postgres' `Transaction`
/// (whose commit takes the transaction, so nothing can be sent alongside it): so a commit
/// goes out in the same round trip as the transaction's events (see [`Tx::commit`]). Dropped
/// before its commit was sent, it sends `ROLLBACK`, as tokio-postgres' does, before its
/// connection goes back to the pool.
struct Tx<'a> {
    t: &'a deadpool_postgres::Object,
    /// Events to record at the commit.
    events: Mutex<Vec<PendingEvent>>,
    shared: &'a Shared,
    /// Checked the fence already.
    fenced: std::sync::atomic::AtomicBool,
    /// The transaction's id, once asked for ([`Tx::learn_xid`]).
    xid: std::sync::OnceLock<String>,
    /// `COMMIT` was sent: dropping it sends no `ROLLBACK`.
    ended: bool,
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.ended {
            // Polled once, the request is sent (tokio-postgres queues a request on its first
            // poll, which the pipelining of this store relies on as well); the answer is not
            // waited for. Requests on a connection are run in order, so its next user's
            // `BEGIN` comes after this.
            let _ = futures_util::FutureExt::now_or_never(self.t.batch_execute("ROLLBACK"));
        }
    }
}

type Params<'a> = [&'a (dyn ToSql + Sync)];
/// `N` statement parameters, to send with others in one round trip.
type Args<'a, const N: usize> = [&'a (dyn ToSql + Sync); N];

impl Tx<'_> {
    /// `sql` prepared (once per connection): to send several statements in one round trip
    /// (PostgreSQL runs them in the order sent, each with a snapshot of its own).
    async fn prepare(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        Ok(self.t.prepare_cached(sql).await?)
    }

    async fn execute(&self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let st = self.t.prepare_cached(sql).await?;
        Ok(self.t.execute(&st, params).await?)
    }

    async fn query(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
        let st = self.t.prepare_cached(sql).await?;
        Ok(self.t.query(&st, params).await?)
    }

    async fn query_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>> {
        let st = self.t.prepare_cached(sql).await?;
        Ok(self.t.query_opt(&st, params).await?)
    }

    /// Records an event at the commit (see [`Tx::commit`] and the module documentation).
    fn emit(&self, kind: EventKind, unit: &str, run: Option<i64>, state: Option<&str>) {
        let event = (Timestamp::now(), kind, unit.to_string(), run, state.map(str::to_string));
        lock(&self.events).push(event);
    }

    /// In a cluster, checks (once per transaction) that this server holds the lease, and
    /// keeps it from being taken over until the transaction ends (see [`cluster`]).
    async fn fenced(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.fenced.load(Ordering::Acquire) {
            cluster::check(self, &self.shared.fence).await?;
            self.fenced.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Checks the fence as [`Tx::fenced`] does, but lets the transaction's other statements be
    /// sent before the answer (they skip the check): the caller must see this succeed before
    /// it commits. The check's statements are sent first if this is polled first.
    async fn fence_alongside(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.fenced.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let held = cluster::check(self, &self.shared.fence).await;
        if held.is_err() {
            // `commit` checks again, and fails.
            self.fenced.store(false, Ordering::Release);
        }
        held
    }

    /// Records a scheduled fire of `unit` at `at`; refused if it was made already (by this
    /// server or one that held the lease before).
    async fn fire_once(&self, unit: &str, at: Timestamp) -> Result<()> {
        let epoch = self.shared.fence.armed().map_or(0, |(_, e)| e);
        let n = self
            .execute(
                "INSERT INTO fires(unit, scheduled_at, epoch, fired_at) VALUES ($1, $2, $3, now())                  ON CONFLICT DO NOTHING",
                &[&unit, &at, &epoch],
            )
            .await?;
        if n == 0 {
            return Err(Error::Conflict(format!("the fire of {unit} at {at} was made already")));
        }
        Ok(())
    }

    /// Asks for the transaction's id (it then has one), so that [`Tx::commit`] can send the
    /// events and the commit in one round trip: meant to be sent alongside other statements.
    async fn learn_xid(&self) -> Result<()> {
        let st = self.prepare("SELECT pg_current_xact_id()::text").await?;
        let xid: String = self.t.query_one(&st, &[]).await?.get(0);
        let _ = self.xid.set(xid);
        Ok(())
    }

    /// Commits. A transaction with events numbers them only now (see [`events`]), after
    /// the fence, inserts them, and commits; they are published once every lower number
    /// has ended. If its id is known ([`Tx::learn_xid`]), the events and the commit are
    /// sent in one round trip; otherwise the insert brings the id back first. Either way the
    /// id is known before the commit is sent: a commit with no answer is resolved by it.
    async fn commit(mut self) -> Result<()> {
        // In a cluster only the lease's holder changes anything (see `cluster`).
        self.fenced().await?;
        let pending = std::mem::take(&mut *lock(&self.events));
        if pending.is_empty() {
            let started = std::time::Instant::now();
            self.ended = true;
            self.t.batch_execute("COMMIT").await?;
            self.shared.commits.record(started.elapsed());
            return Ok(());
        }
        let mut n = self.shared.seq.number(self.t, pending.len()).await?;
        let events: Vec<Event> = pending
            .into_iter()
            .zip(n.seqs())
            .map(|((time, kind, unit, run, state), seq)| Event {
                seq,
                time,
                kind,
                unit,
                run,
                state,
            })
            .collect();
        let started = std::time::Instant::now();
        let (inserted, committed) = match self.xid.get() {
            Some(xid) => {
                n.inserted_by(xid.clone());
                // Prepared first (a round trip on a connection's first use): sent before the
                // `COMMIT`, it must not wait for its statement meanwhile.
                let insert = match self.t.prepare_cached(INSERT_EVENTS).await {
                    Ok(st) => st,
                    Err(e) => {
                        n.rolled_back();
                        return Err(e.into());
                    }
                };
                // After an insert that failed, PostgreSQL takes the `COMMIT` for a rollback.
                self.ended = true;
                tokio::join!(self.insert_events(&insert, &events), self.t.batch_execute("COMMIT"))
            }
            None => match async {
                let insert = self.t.prepare_cached(INSERT_EVENTS).await?;
                self.insert_events(&insert, &events).await
            }
            .await
            {
                Ok(xid) => {
                    n.inserted_by(xid);
                    self.ended = true;
                    (Ok(String::new()), self.t.batch_execute("COMMIT").await)
                }
                Err(e) => (Err(e), Ok(())),
            },
        };
        match (inserted, committed) {
            (Ok(_), Ok(())) => {}
            // PostgreSQL answered: not committed.
            (Err(e), _) | (_, Err(e)) if e.as_db_error().is_some() => {
                n.rolled_back();
                return Err(e.into());
            }
            // No answer: its numbers are resolved by its transaction id (`Numbered`'s drop);
            // without one, nothing was inserted.
            (Err(e), _) | (_, Err(e)) => return Err(e.into()),
        }
        self.shared.commits.record(started.elapsed());
        n.committed(events);
        Ok(())
    }

    /// Inserts `events` with `insert` ([`INSERT_EVENTS`], prepared); the transaction's id.
    /// PostgreSQL's own error, to tell an answer from none.
    async fn insert_events(
        &self,
        insert: &tokio_postgres::Statement,
        events: &[Event],
    ) -> Result<String, tokio_postgres::Error> {
        let mut seqs = Vec::with_capacity(events.len());
        let mut times = Vec::with_capacity(events.len());
        let (mut kinds, mut units, mut runs, mut states) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in events {
            seqs.push(e.seq);
            times.push(e.time);
            kinds.push(e.kind.as_str());
            units.push(e.unit.as_str());
            runs.push(e.run);
            states.push(e.state.as_deref());
        }
        Ok(self.t.query_one(insert, &[&seqs, &times, &kinds, &units, &runs, &states]).await?.get(0))
    }
}

/// Inserts a transaction's events; answers its id.
const INSERT_EVENTS: &str = "WITH i AS (INSERT INTO events(seq, time, kind, unit, run, state) \
     SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::text[], \
     $5::bigint[], $6::text[])) SELECT pg_current_xact_id()::text";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The columns [`run_from_row`] reads, in its order.
const RUN_COLUMNS: &str = "id, unit, state, trigger, attempt, host, pid, queued_at, started_at, \
     ended_at, exit_code, signal, reason, stdout_bytes, stderr_bytes, truncated, scheduled_at, \
     dispatch, late_result, notified";

fn run_from_row(r: &Row) -> RunRecord {
    let state: String = r.get(2);
    let trigger: String = r.get(3);
    RunRecord {
        id: r.get(0),
        unit: r.get(1),
        state: state.parse().unwrap_or(RunState::Lost),
        trigger: trigger.parse().unwrap_or(Trigger::Manual),
        attempt: r.get::<_, i32>(4) as u32,
        host: r.get(5),
        pid: r.get::<_, Option<i64>>(6).map(|p| p as u32),
        queued_at: r.get(7),
        started_at: r.get(8),
        ended_at: r.get(9),
        exit_code: r.get(10),
        signal: r.get(11),
        reason: r.get(12),
        stdout_bytes: r.get::<_, i64>(13) as u64,
        stderr_bytes: r.get::<_, i64>(14) as u64,
        truncated: r.get(15),
        scheduled_at: r.get(16),
        dispatch: r.get(17),
        late_result: r.get(18),
        notified: r.get(19),
    }
}

/// The columns [`unit_from_row`] reads, in its order.
const UNIT_COLUMNS: &str = "name, definition, created_at, updated_at, paused, stopped, last_fire, \
     runs_total, failures_total, anchor";

/// A unit from the row's columns `base..`, in the order of [`UNIT_COLUMNS`].
fn unit_from_row(r: &Row, base: usize) -> StoredUnit {
    StoredUnit {
        name: r.get(base),
        definition: r.get(base + 1),
        created_at: r.get(base + 2),
        updated_at: r.get(base + 3),
        paused: r.get(base + 4),
        stopped: r.get(base + 5),
        last_fire: r.get(base + 6),
        runs_total: r.get::<_, i64>(base + 7) as u64,
        failures_total: r.get::<_, i64>(base + 8) as u64,
        anchor: r.get(base + 9),
    }
}

const DISPATCH_COLUMNS: &str =
    "id, unit, trigger, state, created_at, ended_at, total, batch, tolerance, forgiven";

fn dispatch_from_row(r: &Row) -> DispatchRecord {
    let trigger: String = r.get(2);
    let state: String = r.get(3);
    DispatchRecord {
        id: r.get(0),
        unit: r.get(1),
        trigger: trigger.parse().unwrap_or(Trigger::Manual),
        state: state.parse().unwrap_or(DispatchState::Failed),
        created_at: r.get(4),
        ended_at: r.get(5),
        total: r.get::<_, i32>(6) as u32,
        batch: r.get::<_, i32>(7) as u32,
        tolerance: r.get::<_, Option<i32>>(8).map(|t| t as u32),
        forgiven: r.get::<_, i32>(9) as u32,
    }
}

const AGENT_COLUMNS: &str =
    "name, secret_hash, labels, version, os, arch, max_runs, created_at, last_seen, revoked";

fn agent_from_row(r: &Row) -> StoredAgent {
    let labels: serde_json::Value = r.get(2);
    StoredAgent {
        name: r.get(0),
        secret_hash: r.get(1),
        labels: serde_json::from_value(labels).unwrap_or_default(),
        version: r.get(3),
        os: r.get(4),
        arch: r.get(5),
        max_runs: r.get::<_, i32>(6) as u32,
        created_at: r.get(7),
        last_seen: r.get(8),
        revoked: r.get(9),
    }
}

fn event_from_row(r: &Row) -> Option<Event> {
    Some(Event {
        seq: r.get(0),
        time: r.get(1),
        kind: r.get::<_, String>(2).parse().ok()?,
        unit: r.get(3),
        run: r.get(4),
        state: r.get(5),
    })
}

/// How to reach the database: its connection settings, and the TLS they ask for.
#[derive(Clone)]
pub(in crate::store) struct Target {
    /// The settings, taskd's defaults added.
    pub cfg: tokio_postgres::Config,
    /// Used when `sslmode` asks for TLS.
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
}

/// The connection settings of `url`, with taskd's defaults where it sets none, and its TLS.
///
/// TLS is used as libpq's `sslmode` says (`disable`, the default here: plain TCP, as before
/// TLS was supported; `prefer`; `require`; `verify-ca`; `verify-full`), with one difference:
/// taskd always verifies the server's certificate and name, against `sslrootcert=FILE` (PEM)
/// when given, else this machine's CAs. (tokio-postgres knows neither `sslrootcert` nor the
/// `verify-*` modes: they are taken out of the URL here.)
pub(in crate::store) fn target_of(url: &str) -> Result<Target> {
    // Where tokio-postgres reads them: the credentials end at the first `@`, the settings
    // start at the first `?` after that.
    let after_credentials = url.find('@').map_or(0, |i| i + 1);
    let (base, query) = match url[after_credentials..].find('?') {
        Some(i) => (&url[..after_credentials + i], &url[after_credentials + i + 1..]),
        None => (url, ""),
    };
    // Shown in errors: no credentials, no `password=`.
    let shown = {
        let host = &base[after_credentials..].trim_start_matches("postgres://");
        let host = host.trim_start_matches("postgresql://");
        let settings: Vec<&str> =
            query.split('&').filter(|p| !p.starts_with("password=")).collect();
        format!("{host}?{}", settings.join("&"))
    };
    let invalid = |e: &dyn std::fmt::Display| {
        Error::Postgres(format!("invalid PostgreSQL URL (…{shown}): {e}"))
    };
    let unparsed = |e: Error| match e {
        Error::Postgres(why) => invalid(&why),
        other => other,
    };
    let (mut root, mut mode) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslrootcert", v)) => {
                let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                root = Some(std::path::PathBuf::from(v.as_ref()));
            }
            Some(("sslmode", v)) => {
                mode = Some(v.to_string());
                let v = if v.starts_with("verify-") { "require" } else { v };
                kept.push(format!("sslmode={v}"));
            }
            _ => kept.push(pair.to_string()),
        }
    }
    let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    let mut cfg = config_of(&url).map_err(unparsed)?;
    if mode.is_none() {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    let trust = match root {
        Some(path) => crate::tls::Trust::Ca(path),
        None if mode.is_some_and(|m| m != "disable") => crate::tls::Trust::System,
        None => crate::tls::Trust::Nobody,
    };
    let client =
        crate::tls::client_config(&trust).map_err(|e| invalid(&format!("sslrootcert: {e}")))?;
    Ok(Target { cfg, tls: tokio_postgres_rustls::MakeRustlsConnect::new((*client).clone()) })
}

/// The connection settings of `url`, with taskd's defaults where it sets none.
fn config_of(url: &str) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url.parse().map_err(Error::from)?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("taskd");
    }
    // A server that vanished without a word (power cut, partition) is noticed in seconds.
    cfg.keepalives(true).keepalives_idle(Duration::from_secs(10));
    cfg.tcp_user_timeout(Duration::from_secs(10));
    // A transaction left open by a paused server ends (see `cluster`).
    let idle = format!(
        "-c idle_in_transaction_session_timeout={}",
        cluster::IDLE_IN_TRANSACTION.as_millis()
    );
    let options = match cfg.get_options() {
        Some(o) => format!("{o} {idle}"),
        None => idle,
    };
    cfg.options(&options);
    Ok(cfg)
}

/// A pool of at most `size` connections to the database of `cfg`.
fn pool_of(target: &Target, size: usize) -> Result<Pool> {
    let mgr = Manager::from_config(
        target.cfg.clone(),
        target.tls.clone(),
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| Error::Postgres(format!("cannot set up the PostgreSQL pool: {e}")))
}

/// `postgres://USER@HOST:PORT/DB` of `cfg`: its password left out.
fn location_of(cfg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let db = cfg.get_dbname().unwrap_or_default();
    format!("postgres://{user}{host}:{port}/{db}")
}

impl Postgres {
    /// Connects to the database at `url`, migrates its schema, and starts the listener that
    /// publishes committed events to `events` and the workers behind it.
    pub(super) async fn open(
        url: &str,
        events: broadcast::Sender<Event>,
        commits: Commits,
    ) -> Result<Postgres> {
        let target = target_of(url)?;
        let pool = pool_of(&target, POOL_SIZE)?;
        let mut c = pool.get().await?;
        schema::migrate(&mut c).await?;
        // Published from here: the watermark announced last (nothing above it is final yet
        // if a holder is at work), or, if none was, the newest event.
        let last: i64 = c
            .query_one(
                "SELECT COALESCE((SELECT value::bigint FROM cluster_settings WHERE key = $1), \
                 (SELECT MAX(seq) FROM events), 0)",
                &[&events::KEPT_AS],
            )
            .await?
            .get(0);
        let newest_run: i64 =
            c.query_one("SELECT COALESCE(MAX(id), 0) FROM runs", &[]).await?.get(0);
        drop(c);
        let seq = events::Sequencer::new(pool.clone(), events, last);
        let mut ready = events::listen(target.clone(), pool.clone(), seq.clone());
        // Changes announced before the listener listens would reach subscribers only through
        // the table: wait for it to listen once (it keeps trying in the background if it cannot).
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, ready.recv()).await;
        let (detached, rx) = DetachedQueue::new(DETACHED_QUEUED_MAX);
        let shared = Arc::new(Shared { commits, fence: Arc::default(), seq });
        tokio::spawn(detached_worker(pool.clone(), rx, shared.clone()));
        tokio::spawn(events::announcer(shared.clone(), pool.clone()));
        tokio::spawn(pruner(pool.clone()));
        let group = group::Group::start(pool.clone(), shared.clone());
        Ok(Postgres {
            location: location_of(&target.cfg),
            target,
            newest_run,
            pool,
            detached,
            unrecorded: Unrecorded::default(),
            shared,
            group,
        })
    }

    /// This store as server `name` of a cluster: from now on it creates runs only while
    /// that server holds the lease.
    pub(super) fn cluster(&self, name: String) -> Result<cluster::Cluster> {
        // Connections of its own: renewing the lease never waits behind a busy engine.
        let pool = pool_of(&self.target, 2)?;
        Ok(cluster::Cluster::new(pool, name, self.shared.fence.clone()))
    }

    /// Starts numbering events now: the engine starts on this server (see [`events`]).
    pub(super) async fn start_numbering(&self) -> Result<()> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        t.fenced().await?;
        self.shared.seq.start(t.t).await?;
        t.commit().await
    }

    /// The run logs' table, with its writer started.
    pub(super) fn log_table(&self) -> logs::LogTable {
        logs::LogTable::start(self.pool.clone(), self.newest_run)
    }

    /// The kept files' tables.
    pub(super) fn file_table(&self) -> files::FileTable {
        files::FileTable::new(self.pool.clone(), self.shared.clone())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    fn detach(&self, d: Detached) {
        self.detached.push(d);
    }

    /// Keeps the ends of `recs` to record later, and makes sure someone tries.
    fn keep_unrecorded(&self, recs: Vec<RunRecord>, keep_runs: u32) {
        let mut u = lock(&self.unrecorded);
        let start = u.is_empty();
        u.extend(recs.into_iter().map(|r| (r, keep_runs)));
        drop(u);
        if start {
            let (pool, unrecorded, shared) =
                (self.pool.clone(), self.unrecorded.clone(), self.shared.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RETRY).await;
                    let ends = std::mem::take(&mut *lock(&unrecorded));
                    if ends.is_empty() {
                        return;
                    }
                    let mut back = Vec::new();
                    for (rec, keep) in ends {
                        let one = std::slice::from_ref(&rec);
                        match record_ends(&pool, &shared, one, keep).await {
                            // Another server holds the lease: the run is its to end.
                            Ok(()) | Err(Error::Fenced) => {}
                            Err(_) => back.push((rec, keep)),
                        }
                    }
                    let mut u = lock(&unrecorded);
                    if back.is_empty() && u.is_empty() {
                        tracing::info!("store: the ends of runs that were not recorded now are");
                        return;
                    }
                    u.extend(back);
                }
            });
        }
    }
}

/// Begins a transaction on `c`.
async fn begin<'a>(c: &'a mut deadpool_postgres::Object, shared: &'a Shared) -> Result<Tx<'a>> {
    // Made before `BEGIN` is sent: if this is dropped while waiting for its answer (or it
    // fails), the transaction's drop sends `ROLLBACK`, and the connection goes back to the
    // pool outside a transaction.
    let t = Tx {
        t: c,
        events: Mutex::default(),
        shared,
        fenced: false.into(),
        xid: std::sync::OnceLock::new(),
        ended: false,
    };
    t.t.batch_execute("BEGIN").await?;
    Ok(t)
}

/// Begins a transaction on `c` that skips the fence; it must record no event.
async fn begin_unfenced<'a>(
    c: &'a mut deadpool_postgres::Object,
    shared: &'a Shared,
) -> Result<Tx<'a>> {
    let t = begin(c, shared).await?;
    t.fenced.store(true, std::sync::atomic::Ordering::Release);
    Ok(t)
}

/// Records the ends of `recs` and prunes their units' histories, in one transaction.
async fn record_ends(
    pool: &Pool,
    shared: &Shared,
    recs: &[RunRecord],
    keep_runs: u32,
) -> Result<()> {
    let mut c = pool.get().await?;
    let t = begin(&mut c, shared).await?;
    changes::write_ends(&t, &[(recs, keep_runs)]).await?;
    t.commit().await
}

/// A run to insert, besides its unit.
struct NewRun<'a> {
    state: RunState,
    trigger: Trigger,
    attempt: u32,
    scheduled_at: Option<Timestamp>,
    host: &'a str,
    dispatch: Option<i64>,
}

/// Inserts a run of `unit` and emits its event.
async fn insert_run(t: &Tx<'_>, unit: &str, run: NewRun<'_>) -> Result<RunRecord> {
    let NewRun { state, trigger, attempt, scheduled_at, host, dispatch } = run;
    t.fenced().await?;
    let now = Timestamp::now();
    let started = (state == RunState::Running).then_some(now);
    let insert = t
        .prepare(
            "INSERT INTO runs(unit, state, trigger, attempt, host, queued_at, scheduled_at, \
             started_at, dispatch) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        )
        .await?;
    let count = t.prepare("UPDATE units SET runs_total = runs_total + 1 WHERE name = $1").await?;
    let running = state == RunState::Running;
    // In one round trip.
    let (state_s, trigger_s, attempt_i) = (state.as_str(), trigger.as_str(), attempt as i32);
    let args: Args<'_, 9> =
        [&unit, &state_s, &trigger_s, &attempt_i, &host, &now, &scheduled_at, &started, &dispatch];
    let unit_args: Args<'_, 1> = [&unit];
    let (row, _) = tokio::try_join!(t.t.query_one(&insert, &args), async {
        if running { t.t.execute(&count, &unit_args).await.map(Some) } else { Ok(None) }
    })?;
    let new = NewRun { state, trigger, attempt, scheduled_at, host, dispatch };
    Ok(inserted_run(t, unit, row.get(0), new, now))
}

/// Run `id` of `unit`, inserted at `now` as `run` says: its record, its event emitted.
fn inserted_run(t: &Tx<'_>, unit: &str, id: i64, run: NewRun<'_>, now: Timestamp) -> RunRecord {
    let NewRun { state, trigger, attempt, scheduled_at, host, dispatch } = run;
    let running = state == RunState::Running;
    let kind = if running { EventKind::RunStarted } else { EventKind::RunQueued };
    t.emit(kind, unit, Some(id), Some(state.as_str()));
    RunRecord {
        scheduled_at,
        started_at: running.then_some(now),
        host: host.to_string(),
        dispatch,
        ..RunRecord::fresh(id, unit.to_string(), state, trigger, attempt, now)
    }
}

async fn get_run(t: &Tx<'_>, id: i64) -> Result<Option<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
    Ok(t.query_opt(&sql, &[&id]).await?.as_ref().map(run_from_row))
}

async fn get_dispatch(t: &Tx<'_>, id: i64) -> Result<DispatchRecord> {
    let sql = format!("SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE id = $1");
    t.query_opt(&sql, &[&id])
        .await?
        .as_ref()
        .map(dispatch_from_row)
        .ok_or(Error::DispatchNotFound(id))
}

async fn get_agent(t: &Tx<'_>, name: &str) -> Result<Option<StoredAgent>> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1");
    Ok(t.query_opt(&sql, &[&name]).await?.as_ref().map(agent_from_row))
}

async fn runs_of(t: &Tx<'_>, dispatch: i64) -> Result<Vec<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE dispatch = $1 ORDER BY id");
    Ok(t.query(&sql, &[&dispatch]).await?.iter().map(run_from_row).collect())
}

/// A dispatch's counts by state: of the newest run of each host, an ignored one counted as
/// `ignored`.
async fn counts_of(t: &Tx<'_>, dispatch: i64) -> Result<BTreeMap<String, u32>> {
    let rows = t
        .query(
            "SELECT CASE WHEN ignored THEN 'ignored' ELSE state END, COUNT(*) FROM runs \
             WHERE id IN (SELECT MAX(id) FROM runs WHERE dispatch = $1 GROUP BY host) GROUP BY 1",
            &[&dispatch],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32)).collect())
}

#[async_trait]
impl Backend for Postgres {
    fn commits(&self) -> u64 {
        self.shared.commits.count()
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    async fn load_units(&self) -> Result<Vec<StoredUnit>> {
        let c = self.client().await?;
        let st =
            c.prepare_cached(&format!("SELECT {UNIT_COLUMNS} FROM units ORDER BY name")).await?;
        Ok(c.query(&st, &[]).await?.iter().map(|r| unit_from_row(r, 0)).collect())
    }

    async fn insert_unit(&self, u: StoredUnit) -> Result<()> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let n = t
            .execute(
                "INSERT INTO units(name, definition, created_at, updated_at, paused, stopped, \
                 last_fire, anchor) VALUES ($1, $2, $3, $4, $5, false, $6, $7) \
                 ON CONFLICT (name) DO NOTHING",
                &[
                    &u.name,
                    &u.definition,
                    &u.created_at,
                    &u.updated_at,
                    &u.paused,
                    &u.last_fire,
                    &u.anchor,
                ],
            )
            .await?;
        if n == 0 {
            return Err(Error::UnitExists(u.name));
        }
        t.emit(EventKind::UnitAdded, &u.name, None, None);
        t.commit().await
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
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let n = t
            .execute(
                "UPDATE units SET definition = $3, updated_at = $4, paused = $5, \
                 anchor = CASE WHEN $6 THEN $4 ELSE anchor END \
                 WHERE name = $1 AND created_at = $2",
                &[&name, &created_at, &definition, &at, &paused, &rescheduled],
            )
            .await?;
        if n == 0 {
            return Err(Error::UnitNotFound(name.to_string()));
        }
        t.emit(EventKind::UnitEdited, name, None, None);
        t.commit().await
    }

    async fn set_flags(
        &self,
        name: &str,
        paused: bool,
        stopped: bool,
        kind: EventKind,
    ) -> Result<()> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let n = t
            .execute(
                "UPDATE units SET paused = $2, stopped = $3 WHERE name = $1",
                &[&name, &paused, &stopped],
            )
            .await?;
        if n == 0 {
            return Err(Error::UnitNotFound(name.to_string()));
        }
        t.emit(kind, name, None, None);
        t.commit().await
    }

    fn set_last_fire(&self, name: &str, at: Timestamp) {
        self.detach(Detached::LastFire(name.to_string(), at));
    }

    fn emit(&self, kind: EventKind, unit: &str, state: Option<&'static str>) {
        self.detach(Detached::Event(kind, unit.to_string(), state));
    }

    async fn delete_unit(&self, name: &str, keep_history: bool) -> Result<()> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let n = t.execute("DELETE FROM units WHERE name = $1", &[&name]).await?;
        if n == 0 {
            return Err(Error::UnitNotFound(name.to_string()));
        }
        if !keep_history {
            t.execute("DELETE FROM runs WHERE unit = $1", &[&name]).await?;
        }
        t.emit(EventKind::UnitDeleted, name, None, None);
        t.commit().await
    }

    async fn create_run(
        &self,
        unit: &str,
        state: RunState,
        trigger: Trigger,
        attempt: u32,
        scheduled_at: Option<Timestamp>,
    ) -> Result<RunRecord> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        if let Some(at) = scheduled_at
            && attempt == 1
        {
            t.fenced().await?;
            t.fire_once(unit, at).await?;
        }
        let run = NewRun {
            state,
            trigger,
            attempt,
            scheduled_at,
            host: crate::run::LOCAL,
            dispatch: None,
        };
        let rec = insert_run(&t, unit, run).await?;
        t.commit().await?;
        Ok(rec)
    }

    async fn create_runs(&self, unit: &str, triggers: Vec<Trigger>) -> Result<Vec<RunRecord>> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let mut out = Vec::with_capacity(triggers.len());
        for trigger in triggers {
            let run = NewRun {
                state: RunState::Running,
                trigger,
                attempt: 1,
                scheduled_at: None,
                host: crate::run::LOCAL,
                dispatch: None,
            };
            out.push(insert_run(&t, unit, run).await?);
        }
        t.commit().await?;
        Ok(out)
    }

    async fn start_queued(&self, id: i64) -> Result<RunRecord> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        t.fenced().await?;
        let now = Timestamp::now();
        let n = t
            .execute(
                "UPDATE runs SET state = 'running', started_at = $2 WHERE id = $1 AND state = 'queued'",
                &[&id, &now],
            )
            .await?;
        if n == 0 {
            return Err(Error::Conflict(format!("run {id} is not queued")));
        }
        let rec = get_run(&t, id).await?.ok_or(Error::RunNotFound(id))?;
        t.execute("UPDATE units SET runs_total = runs_total + 1 WHERE name = $1", &[&rec.unit])
            .await?;
        t.emit(EventKind::RunStarted, &rec.unit, Some(id), Some("running"));
        t.commit().await?;
        Ok(rec)
    }

    fn set_pid(
        &self,
        id: i64,
        pid: u32,
        started: Timestamp,
        pid_start: Option<u64>,
        boot_id: Option<String>,
    ) {
        self.detach(Detached::Pid { id, pid, started, pid_start, boot_id });
    }

    async fn finish_runs(&self, recs: Vec<RunRecord>, keep_runs: u32) -> Result<()> {
        let r = self.group.ends(recs.clone(), keep_runs).await;
        if let Err(e) = &r {
            let runs: Vec<i64> = recs.iter().map(|r| r.id).collect();
            tracing::warn!(?runs, error = %e, "the end of a run is not recorded yet; retrying");
            self.keep_unrecorded(recs, keep_runs);
        }
        r
    }

    async fn get_run(&self, id: i64) -> Result<RunRecord> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        get_run(&t, id).await?.ok_or(Error::RunNotFound(id))
    }

    async fn list_runs(&self, f: RunFilter) -> Result<Vec<RunRecord>> {
        // Only the conditions in use, so that the planner can use `runs_by_unit`.
        let mut cond = Vec::new();
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        if let Some(u) = f.unit {
            args.push(Box::new(u));
            cond.push(format!("unit = ${}", args.len()));
        }
        if let Some(s) = f.state {
            args.push(Box::new(s.as_str()));
            cond.push(format!("state = ${}", args.len()));
        }
        if let Some(b) = f.before {
            args.push(Box::new(b));
            cond.push(format!("id < ${}", args.len()));
        }
        let filter =
            if cond.is_empty() { String::new() } else { format!("WHERE {}", cond.join(" AND ")) };
        args.push(Box::new(i64::from(f.limit)));
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs {filter} ORDER BY id DESC LIMIT ${}",
            args.len()
        );
        let c = self.client().await?;
        let st = c.prepare_cached(&sql).await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect();
        Ok(c.query(&st, &params).await?.iter().map(run_from_row).collect())
    }

    async fn load_units_page(
        &self,
        after: String,
        limit: u32,
    ) -> Result<Vec<(StoredUnit, Option<RunRecord>)>> {
        let run_cols: Vec<String> =
            RUN_COLUMNS.split(',').map(|c| format!("r.{}", c.trim())).collect();
        let unit_cols: Vec<String> =
            UNIT_COLUMNS.split(',').map(|c| format!("u.{}", c.trim())).collect();
        let sql = format!(
            "SELECT {}, {} FROM units u LEFT JOIN runs r \
             ON r.id = (SELECT MAX(id) FROM runs WHERE unit = u.name) \
             WHERE u.name > $1 ORDER BY u.name LIMIT $2",
            run_cols.join(", "),
            unit_cols.join(", ")
        );
        let c = self.client().await?;
        let st = c.prepare_cached(&sql).await?;
        let rows = c.query(&st, &[&after, &i64::from(limit)]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let run = r.get::<_, Option<i64>>(0).map(|_| run_from_row(r));
                (unit_from_row(r, run_cols.len()), run)
            })
            .collect())
    }

    async fn recover_stale_runs(&self) -> Result<Vec<StaleRun>> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let sql = format!(
            "SELECT {RUN_COLUMNS}, pid_start, boot_id FROM runs \
             WHERE state IN ('queued', 'running') AND host = 'local' \
             AND (dispatch IS NULL OR state = 'running') FOR UPDATE"
        );
        let stale: Vec<StaleRun> = t
            .query(&sql, &[])
            .await?
            .iter()
            .map(|r| StaleRun {
                record: run_from_row(r),
                pid_start: r.get::<_, Option<i64>>(20).map(|v| v as u64),
                boot_id: r.get(21),
            })
            .collect();
        let now = Timestamp::now();
        let mut out = Vec::with_capacity(stale.len());
        for mut s in stale {
            let (state, reason) = if s.record.state == RunState::Running {
                (RunState::Lost, "the daemon stopped while the run was active")
            } else {
                (RunState::Cancelled, "the daemon stopped before the run started")
            };
            t.execute(
                "UPDATE runs SET state = $2, ended_at = $3, reason = $4 WHERE id = $1",
                &[&s.record.id, &state.as_str(), &now, &reason],
            )
            .await?;
            if state == RunState::Lost {
                t.execute(
                    "UPDATE units SET failures_total = failures_total + 1 WHERE name = $1",
                    &[&s.record.unit],
                )
                .await?;
            }
            t.emit(EventKind::RunFinished, &s.record.unit, Some(s.record.id), Some(state.as_str()));
            s.record.state = state;
            s.record.ended_at = Some(now);
            s.record.reason = Some(reason.into());
            out.push(s);
        }
        t.commit().await?;
        Ok(out)
    }

    async fn last_event_seq(&self) -> Result<i64> {
        Ok(self.shared.seq.published())
    }

    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>> {
        // Only up to the watermark: above it, a number may still be filled in.
        let upto = self.shared.seq.published();
        let c = self.client().await?;
        events::events_between(&c, after, upto, limit).await
    }

    fn audit(&self, a: AuditRecord) {
        self.detach(Detached::Audit(a));
    }

    async fn audit_log(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT id, time, peer, method, unit, outcome FROM audit WHERE id < $2 \
                 ORDER BY id DESC LIMIT $1",
            )
            .await?;
        let rows = c.query(&st, &[&i64::from(limit), &before.unwrap_or(i64::MAX)]).await?;
        Ok(rows
            .iter()
            .map(|r| AuditRecord {
                id: r.get(0),
                time: r.get(1),
                peer: r.get(2),
                method: r.get(3),
                unit: r.get(4),
                outcome: r.get(5),
            })
            .collect())
    }

    async fn run_counts(&self) -> Result<Vec<(String, u64)>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT state, SUM(n)::bigint FROM run_counts GROUP BY state HAVING SUM(n) > 0",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64)).collect())
    }

    async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        // A flush waits for room: it is never dropped.
        self.detached.tx.send(Detached::Flush(tx)).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    async fn load_agents(&self) -> Result<Vec<StoredAgent>> {
        let c = self.client().await?;
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name");
        Ok(c.query(&sql, &[]).await?.iter().map(agent_from_row).collect())
    }

    async fn create_join_token(&self, hash: String, expires_at: Timestamp) -> Result<()> {
        let mut c = self.client().await?;
        // Not fenced: a standby mints the join token of its own agent.
        let t = begin_unfenced(&mut c, &self.shared).await?;
        // Expired tokens are of no use: forget them as new ones come.
        t.execute("DELETE FROM join_tokens WHERE expires_at < $1", &[&Timestamp::now()]).await?;
        t.execute(
            "INSERT INTO join_tokens(hash, expires_at) VALUES ($1, $2)",
            &[&hash, &expires_at],
        )
        .await?;
        t.commit().await
    }

    async fn join_agent(
        &self,
        token_hash: String,
        name: String,
        secret_hash: String,
    ) -> Result<StoredAgent> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let now = Timestamp::now();
        // FOR UPDATE: two servers spending one token at once enroll one agent.
        let token = t
            .query_opt(
                "SELECT expires_at, spent_by FROM join_tokens WHERE hash = $1 FOR UPDATE",
                &[&token_hash],
            )
            .await?
            .map(|r| (r.get::<_, Timestamp>(0), r.get::<_, Option<String>>(1)));
        super::fleet::check_join_token(token, now)?;
        if let Some(a) = get_agent(&t, &name).await?
            && !a.revoked
        {
            return Err(super::fleet::name_taken(&name));
        }
        t.execute(
            "INSERT INTO agents(name, secret_hash, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET secret_hash = $2, created_at = $3, revoked = false",
            &[&name, &secret_hash, &now],
        )
        .await?;
        t.execute("UPDATE join_tokens SET spent_by = $2 WHERE hash = $1", &[&token_hash, &name])
            .await?;
        let a = get_agent(&t, &name).await?.ok_or_else(|| Error::AgentNotFound(name.clone()))?;
        t.commit().await?;
        Ok(a)
    }

    async fn revoke_agent(&self, name: String) -> Result<StoredAgent> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let n = t.execute("UPDATE agents SET revoked = true WHERE name = $1", &[&name]).await?;
        if n == 0 {
            return Err(Error::AgentNotFound(name));
        }
        let a = get_agent(&t, &name).await?.ok_or_else(|| Error::AgentNotFound(name.clone()))?;
        t.commit().await?;
        Ok(a)
    }

    fn agent_seen(&self, a: StoredAgent) {
        self.detach(Detached::AgentSeen(a));
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
        let d = group::NewDispatch {
            unit: unit.to_string(),
            trigger,
            hosts,
            batch,
            tolerance,
            scheduled_at,
        };
        self.group.dispatch(d).await
    }

    async fn create_host_run(
        &self,
        unit: &str,
        host: String,
        dispatch: i64,
        trigger: Trigger,
        attempt: u32,
    ) -> Result<RunRecord> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let new = NewRun {
            state: RunState::Running,
            trigger,
            attempt,
            scheduled_at: None,
            host: &host,
            dispatch: Some(dispatch),
        };
        let rec = insert_run(&t, unit, new).await?;
        t.commit().await?;
        Ok(rec)
    }

    async fn set_dispatch_state(&self, id: i64, state: DispatchState) -> Result<DispatchRecord> {
        self.group.dispatch_state(id, state).await
    }

    fn set_late_result(&self, id: i64, outcome: String) {
        self.detach(Detached::LateResult(id, outcome));
    }

    fn set_notified(&self, id: i64, notified: String) {
        self.detach(Detached::Notified(id, notified));
    }

    async fn cancelling_dispatch(&self, id: i64) -> Result<()> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        t.execute(
            "UPDATE dispatches SET state = 'cancelled' WHERE id = $1 AND ended_at IS NULL",
            &[&id],
        )
        .await?;
        t.commit().await
    }

    async fn resume_dispatch(&self, id: i64, forgiven: u32) -> Result<DispatchRecord> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        t.execute(
            "UPDATE dispatches SET state = 'running', forgiven = $2 WHERE id = $1",
            &[&id, &(forgiven as i32)],
        )
        .await?;
        let d = get_dispatch(&t, id).await?;
        t.commit().await?;
        Ok(d)
    }

    async fn set_ignored(&self, id: i64, ignored: bool) -> Result<()> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        t.execute("UPDATE runs SET ignored = $2 WHERE id = $1", &[&id, &ignored]).await?;
        t.commit().await
    }

    async fn list_dispatches(
        &self,
        f: DispatchFilter,
    ) -> Result<Vec<(DispatchRecord, BTreeMap<String, u32>)>> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let sql = format!(
            "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE ($1::text IS NULL OR unit = $1) \
             AND ($2::text IS NULL OR state = $2) AND ($3::bigint IS NULL OR id < $3) \
             ORDER BY id DESC LIMIT $4"
        );
        let list: Vec<DispatchRecord> = t
            .query(&sql, &[&f.unit, &f.state.map(|s| s.as_str()), &f.before, &i64::from(f.limit)])
            .await?
            .iter()
            .map(dispatch_from_row)
            .collect();
        let mut out = Vec::with_capacity(list.len());
        for d in list {
            let counts = counts_of(&t, d.id).await?;
            out.push((d, counts));
        }
        Ok(out)
    }

    async fn get_dispatch(
        &self,
        id: i64,
    ) -> Result<(DispatchRecord, Vec<RunRecord>, BTreeMap<String, u32>)> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        Ok((get_dispatch(&t, id).await?, runs_of(&t, id).await?, counts_of(&t, id).await?))
    }

    async fn open_dispatches(&self) -> Result<Vec<(DispatchRecord, Vec<RunRecord>)>> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let sql =
            format!("SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE ended_at IS NULL ORDER BY id");
        let list: Vec<DispatchRecord> =
            t.query(&sql, &[]).await?.iter().map(dispatch_from_row).collect();
        let mut out = Vec::with_capacity(list.len());
        for d in list {
            let runs = runs_of(&t, d.id).await?;
            out.push((d, runs));
        }
        Ok(out)
    }

    async fn ignored_runs(&self, id: i64) -> Result<Vec<i64>> {
        let c = self.client().await?;
        let rows = c.query("SELECT id FROM runs WHERE dispatch = $1 AND ignored", &[&id]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn insert_api_task(&self, a: ApiTask) -> Result<i64> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let hosts = serde_json::json!(a.hosts);
        let row = t
            .query_opt(
                "INSERT INTO api_tasks(title, account, timeout, hosts, script, args, creator, \
                 created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                &[
                    &a.title,
                    &a.account,
                    &i64::from(a.timeout),
                    &hosts,
                    &a.script,
                    &a.args,
                    &a.creator,
                    &a.created,
                ],
            )
            .await?
            .ok_or_else(|| Error::Postgres("no task id".into()))?;
        t.commit().await?;
        Ok(row.get(0))
    }

    async fn settle_api_task(&self, id: i64, added: bool) -> Result<()> {
        let mut c = self.client().await?;
        let t = begin(&mut c, &self.shared).await?;
        let sql = if added {
            "UPDATE api_tasks SET added = true WHERE id = $1"
        } else {
            "DELETE FROM api_tasks WHERE id = $1"
        };
        t.execute(sql, &[&id]).await?;
        t.commit().await
    }

    async fn list_api_tasks(&self, limit: u32, before: Option<i64>) -> Result<Vec<ApiTask>> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT * FROM (SELECT id, title, account, timeout, hosts, script, args, creator, \
             created, {API_TASK_DONE} FROM api_tasks t WHERE added AND id < $2 \
             ORDER BY id DESC LIMIT $1) k ORDER BY id"
        );
        let rows = c.query(&sql, &[&i64::from(limit), &before.unwrap_or(i64::MAX)]).await?;
        Ok(rows
            .iter()
            .map(|r| ApiTask {
                id: r.get(0),
                title: r.get(1),
                account: r.get(2),
                timeout: r.get::<_, i64>(3).clamp(0, i64::from(u32::MAX)) as u32,
                hosts: serde_json::from_value(r.get(4)).unwrap_or_default(),
                script: r.get(5),
                args: r.get(6),
                creator: r.get(7),
                created: r.get(8),
                done: r.get(9),
            })
            .collect())
    }
}

/// The queue of changes nobody waits for: bounded, what finds it full dropped and counted.
struct DetachedQueue {
    tx: mpsc::Sender<Detached>,
    /// Dropped since the queue was last found with room.
    dropped: std::sync::atomic::AtomicU64,
}

impl DetachedQueue {
    fn new(max: usize) -> (DetachedQueue, mpsc::Receiver<Detached>) {
        let (tx, rx) = mpsc::channel(max);
        (DetachedQueue { tx, dropped: 0.into() }, rx)
    }

    /// Queues `d`, or drops it if the queue is full (said once per run of drops) or closed.
    /// Whether it was queued.
    fn push(&self, d: Detached) -> bool {
        use std::sync::atomic::Ordering;
        match self.tx.try_send(d) {
            Ok(()) => {
                let dropped = self.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        "store: queue of changes nobody waits for has room again"
                    );
                }
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::error!(
                        max = DETACHED_QUEUED_MAX,
                        "store: queue of changes nobody waits for is full (PostgreSQL out of \
                         reach?); dropping pids, fire times, audit records until it has room"
                    );
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!("store closed; change dropped");
                false
            }
        }
    }
}

/// Applies changes nobody waits for, in order, several to a transaction.
async fn detached_worker(pool: Pool, mut rx: mpsc::Receiver<Detached>, shared: Arc<Shared>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, DETACHED_BATCH).await > 0 {
        let flushes: Vec<oneshot::Sender<()>> = batch
            .extract_if(.., |d| matches!(d, Detached::Flush(_)))
            .filter_map(|d| match d {
                Detached::Flush(tx) => Some(tx),
                _ => None,
            })
            .collect();
        if !batch.is_empty() {
            let give_up = tokio::time::Instant::now() + DETACHED_RETRY_FOR;
            loop {
                match apply_detached(&pool, &shared, &batch).await {
                    Ok(busy) if busy.is_empty() => break,
                    // Rows a transaction of the engine holds: those changes, again shortly.
                    Ok(busy) if tokio::time::Instant::now() < give_up => {
                        batch = keep_only(batch, &busy);
                        tokio::time::sleep(BUSY_AGAIN).await;
                    }
                    Ok(busy) => {
                        tracing::error!(
                            changes = busy.len(),
                            "rows stayed locked; changes dropped"
                        );
                        break;
                    }
                    // This server lost the cluster's lease: nothing it writes is taken again.
                    Err(Error::Fenced) => {
                        tracing::warn!(
                            changes = batch.len(),
                            "changes dropped: this server lost the cluster's lease"
                        );
                        break;
                    }
                    Err(e) if tokio::time::Instant::now() < give_up => {
                        tracing::warn!(error = %e, "store update failed; trying again");
                        tokio::time::sleep(RETRY).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, changes = batch.len(), "store update failed; changes dropped");
                        break;
                    }
                }
            }
            batch.clear();
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// The items of `batch` at the positions `keep` (ascending).
fn keep_only(batch: Vec<Detached>, keep: &[usize]) -> Vec<Detached> {
    let mut keep = keep.iter().peekable();
    batch
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.next_if_eq(&i).is_some())
        .map(|(_, d)| d)
        .collect()
}

/// Applies `batch` in one transaction; the positions of the changes left for later because
/// their rows were locked (by a transaction of the engine: a run's end, a dispatch). The
/// frequent ones (fire times, pids) are one statement each for the whole batch, and wait for
/// no lock: a transaction that waited here while holding other rows could deadlock with the
/// engine's, which take theirs in no fixed order.
async fn apply_detached(pool: &Pool, shared: &Shared, batch: &[Detached]) -> Result<Vec<usize>> {
    let mut c = pool.get().await?;
    let t = begin(&mut c, shared).await?;
    let mut busy = set_last_fires(&t, batch).await?;
    busy.extend(set_pids(&t, batch).await?);
    for d in batch {
        apply_one(&t, d).await?;
    }
    t.commit().await?;
    busy.sort_unstable();
    Ok(busy)
}

/// The `LastFire`s of `batch`, the newest per unit, in one statement; the positions of those
/// left for later because their unit's row was locked.
async fn set_last_fires(t: &Tx<'_>, batch: &[Detached]) -> Result<Vec<usize>> {
    let mut fires: BTreeMap<&str, (Timestamp, Vec<usize>)> = BTreeMap::new();
    for (i, d) in batch.iter().enumerate() {
        if let Detached::LastFire(name, at) = d {
            let e = fires.entry(name.as_str()).or_insert((*at, Vec::new()));
            e.0 = e.0.max(*at);
            e.1.push(i);
        }
    }
    if fires.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = fires.keys().copied().collect();
    let ats: Vec<Timestamp> = fires.values().map(|(at, _)| *at).collect();
    // Never backwards (a late change from a server that lost the lease).
    let done = t
        .query(
            "UPDATE units u SET last_fire = GREATEST(COALESCE(u.last_fire, x.at), x.at) \
             FROM unnest($1::text[], $2::timestamptz[]) AS x(name, at) \
             WHERE u.name = x.name AND u.name IN \
             (SELECT name FROM units WHERE name = ANY($1) FOR UPDATE SKIP LOCKED) \
             RETURNING u.name",
            &[&names, &ats],
        )
        .await?;
    let mut busy = Vec::new();
    if done.len() < names.len() {
        let done: std::collections::HashSet<String> = done.iter().map(|r| r.get(0)).collect();
        let left: Vec<&str> = names.into_iter().filter(|n| !done.contains(*n)).collect();
        // Left because locked, or because the unit is gone (nothing to do then).
        for r in t.query("SELECT name FROM units WHERE name = ANY($1)", &[&left]).await? {
            let name: String = r.get(0);
            busy.extend(fires.get(name.as_str()).map(|(_, at)| at.clone()).unwrap_or_default());
        }
    }
    Ok(busy)
}

/// The `Pid`s of `batch`, the newest start per run, in one statement; the positions of those
/// left for later because their run's row was locked.
async fn set_pids(t: &Tx<'_>, batch: &[Detached]) -> Result<Vec<usize>> {
    // The newest start of a run wins.
    let pids: BTreeMap<i64, (usize, &Detached)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match d {
            Detached::Pid { id, .. } => Some((*id, (i, d))),
            _ => None,
        })
        .collect();
    if pids.is_empty() {
        return Ok(Vec::new());
    }
    let (mut ids, mut ps, mut starts, mut pid_starts, mut boots) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (_, d) in pids.values() {
        if let Detached::Pid { id, pid, started, pid_start, boot_id } = d {
            ids.push(*id);
            ps.push(i64::from(*pid));
            starts.push(*started);
            pid_starts.push(pid_start.map(|s| s as i64));
            boots.push(boot_id.as_deref());
        }
    }
    let done = t
        .query(
            "UPDATE runs r SET pid = x.pid, started_at = x.started, \
             pid_start = x.pid_start, boot_id = x.boot_id \
             FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::bigint[], \
             $5::text[]) AS x(id, pid, started, pid_start, boot_id) \
             WHERE r.id = x.id AND r.id IN \
             (SELECT id FROM runs WHERE id = ANY($1) FOR UPDATE SKIP LOCKED) \
             RETURNING r.id",
            &[&ids, &ps, &starts, &pid_starts, &boots],
        )
        .await?;
    let mut busy = Vec::new();
    if done.len() < ids.len() {
        let done: std::collections::HashSet<i64> = done.iter().map(|r| r.get(0)).collect();
        let left: Vec<i64> = ids.into_iter().filter(|id| !done.contains(id)).collect();
        for r in t.query("SELECT id FROM runs WHERE id = ANY($1)", &[&left]).await? {
            let id: i64 = r.get(0);
            busy.extend(pids.get(&id).map(|(i, _)| *i));
        }
    }
    Ok(busy)
}

/// One of the rarer detached changes (fire times and pids are made for the whole batch).
async fn apply_one(t: &Tx<'_>, d: &Detached) -> Result<()> {
    match d {
        Detached::LastFire(..) | Detached::Pid { .. } | Detached::Flush(_) => {}
        Detached::Event(kind, unit, state) => t.emit(*kind, unit, None, *state),
        Detached::Audit(a) => {
            t.execute(
                "INSERT INTO audit(time, peer, method, unit, outcome) VALUES ($1, $2, $3, $4, $5)",
                &[&a.time, &a.peer, &a.method, &a.unit, &a.outcome],
            )
            .await?;
        }
        Detached::AgentSeen(a) => {
            let labels = serde_json::to_value(&a.labels).unwrap_or_default();
            t.execute(
                "UPDATE agents SET labels = $2, version = $3, os = $4, arch = $5, \
                 max_runs = $6, last_seen = $7 WHERE name = $1",
                &[&a.name, &labels, &a.version, &a.os, &a.arch, &(a.max_runs as i32), &a.last_seen],
            )
            .await?;
        }
        Detached::LateResult(id, outcome) => {
            t.execute(
                "UPDATE runs SET late_result = $2 WHERE id = $1 AND late_result IS NULL",
                &[id, outcome],
            )
            .await?;
        }
        Detached::Notified(id, notified) => {
            t.execute("UPDATE runs SET notified = $2 WHERE id = $1", &[id, notified]).await?;
        }
    }
    Ok(())
}

/// Deletes the oldest events and audit records beyond the newest kept, now and then.
async fn pruner(pool: Pool) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    loop {
        every.tick().await;
        let r = async {
            let c = pool.get().await?;
            c.execute(
                "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - $1",
                &[&EVENTS_KEPT],
            )
            .await?;
            c.execute(
                "DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - $1",
                &[&AUDIT_KEPT],
            )
            .await?;
            // Run counts' deltas folded into one row per state (rows added meanwhile stay).
            c.batch_execute(
                "WITH d AS (DELETE FROM run_counts RETURNING state, n) \
                 INSERT INTO run_counts(state, n) SELECT state, SUM(n) FROM d GROUP BY state",
            )
            .await?;
            c.execute("DELETE FROM fires WHERE fired_at < now() - interval '1 day'", &[]).await?;
            Ok::<_, Error>(())
        };
        if let Err(e) = r.await {
            tracing::warn!(error = %e, "cannot prune old events and audit records");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn changes_beyond_a_full_queue_are_dropped_and_counted() {
        let (q, mut rx) = DetachedQueue::new(2);
        let fire = || Detached::LastFire("u".into(), Timestamp::UNIX_EPOCH);
        assert!(q.push(fire()) && q.push(fire()));
        assert!(!q.push(fire()), "a full queue takes no more");
        assert!(!q.push(fire()));
        assert_eq!(q.dropped.load(Ordering::Relaxed), 2);
        assert!(rx.try_recv().is_ok());
        assert!(q.push(fire()), "taken again once there is room");
        assert_eq!(q.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn tls_is_used_as_the_url_says_and_errors_show_no_password() {
        use tokio_postgres::config::SslMode;
        let mode = |url: &str| target_of(url).unwrap().cfg.get_ssl_mode();
        assert_eq!(mode("postgres://u@h/db"), SslMode::Disable, "plain unless asked");
        assert_eq!(mode("postgres://u@h/db?sslmode=prefer"), SslMode::Prefer);
        assert_eq!(
            mode("postgres://u@h/db?application_name=x&sslmode=verify-full"),
            SslMode::Require
        );
        assert_eq!(mode("postgres://u@h/db?sslmode=verify-ca"), SslMode::Require);
        let cfg = target_of("postgres://u@h/db?application_name=x&sslmode=require").unwrap().cfg;
        assert_eq!(cfg.get_application_name(), Some("x"), "the other settings kept");
        // A `?` in the password is the password's.
        assert_eq!(mode("postgres://u:a?b@h/db?sslmode=require"), SslMode::Require);
        for bad in [
            "postgres://u:hunter2@h/db?sslmode=sometimes",
            "postgres://u:hunter2@h/db?sslmode=require&sslrootcert=/no/such.pem",
            "postgres://h/db?user=u&password=hunter2&sslmode=sometimes",
        ] {
            let e = target_of(bad).err().expect("refused").to_string();
            assert!(e.contains("invalid PostgreSQL URL") && !e.contains("hunter2"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_transaction_dropped_uncommitted_leaves_nothing_on_its_connection() {
        let Some(db) = crate::store::tests::TestDb::create().await else { return };
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open_postgres(&db.url, dir.path()).await.unwrap();
        let pg = store.postgres.as_ref().unwrap();
        let mut c = pg.pool.get().await.unwrap();
        // Dropped with a change made (one a group would make before another of its changes
        // failed), then the connection's next transaction commits.
        let t = begin(&mut c, &pg.shared).await.unwrap();
        t.execute("INSERT INTO cluster_settings(key, value) VALUES ('dropped', 'x')", &[])
            .await
            .unwrap();
        drop(t);
        let t = begin(&mut c, &pg.shared).await.unwrap();
        t.execute("INSERT INTO cluster_settings(key, value) VALUES ('next', 'y')", &[])
            .await
            .unwrap();
        t.commit().await.unwrap();
        let other = pg.pool.get().await.unwrap();
        let keys: Vec<String> = other
            .query("SELECT key FROM cluster_settings WHERE key IN ('dropped', 'next')", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(keys, ["next"], "the dropped transaction's change was not committed");
    }
}
