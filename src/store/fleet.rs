//! Agents, join tokens and dispatches in the store: who may connect as an agent (a hash of
//! each credential, never the credential), which join tokens are still good, and each
//! dispatch with its runs (one per host; a retry or redo adds a run on the same host).

use std::collections::BTreeMap;

use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};

use super::{EventKind, NewRun, RUN_COLUMNS, Store, Tx, insert_run_on, opt_ts, run_from_row, ts};
use crate::error::{Error, Result};
use crate::names::named_enum;
use crate::run::{RunRecord, RunState, Trigger};

named_enum! {
    /// Where a dispatch stands.
    pub enum DispatchState("a dispatch state") {
        /// Hosts are running or waiting for their turn.
        Running = "running",
        /// Hosts not started yet wait: `tolerance` was exceeded, or it was paused by hand.
        Paused = "paused",
        /// Every host succeeded or was ignored.
        Succeeded = "succeeded",
        /// A host ended other than succeeded.
        Failed = "failed",
        /// Cancelled by hand (or its unit deleted).
        Cancelled = "cancelled",
    }
}

impl DispatchState {
    /// Whether it has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, DispatchState::Running | DispatchState::Paused)
    }
}

/// An enrolled agent as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAgent {
    /// Its unique name.
    pub name: String,
    /// SHA-256 of its credential's secret, hex.
    pub secret_hash: String,
    /// Labels, as it last registered them.
    pub labels: BTreeMap<String, String>,
    /// Its version, OS and architecture, as it last registered them.
    pub version: String,
    /// `linux`…
    pub os: String,
    /// `x86_64`…
    pub arch: String,
    /// Most runs at once, as it last registered.
    pub max_runs: u32,
    /// When it enrolled.
    pub created_at: Timestamp,
    /// When it was last connected.
    pub last_seen: Option<Timestamp>,
    /// Revoked: its credential is refused.
    pub revoked: bool,
}

/// One dispatch: a fire of a unit on its hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchRecord {
    /// Its id.
    pub id: i64,
    /// The unit.
    pub unit: String,
    /// What fired it.
    pub trigger: Trigger,
    /// Its state.
    pub state: DispatchState,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
    /// Hosts.
    pub total: u32,
    /// Hosts running at once (0: all).
    pub batch: u32,
    /// Failed hosts allowed before it pauses.
    pub tolerance: Option<u32>,
    /// Failures forgiven by its last resume: only those beyond count against `tolerance`.
    pub forgiven: u32,
}

/// Which dispatches `Store::list_dispatches` returns.
#[derive(Debug, Clone, Default)]
pub struct DispatchFilter {
    /// Of this unit only.
    pub unit: Option<String>,
    /// In this state only.
    pub state: Option<DispatchState>,
    /// At most this many.
    pub limit: u32,
    /// With an id below this.
    pub before: Option<i64>,
}

const DISPATCH_COLUMNS: &str =
    "id, unit, trigger, state, created_at, ended_at, total, batch, tolerance, forgiven";

fn dispatch_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DispatchRecord> {
    let trigger: String = r.get(2)?;
    let state: String = r.get(3)?;
    Ok(DispatchRecord {
        id: r.get(0)?,
        unit: r.get(1)?,
        trigger: trigger.parse().unwrap_or(Trigger::Manual),
        state: state.parse().unwrap_or(DispatchState::Failed),
        created_at: ts(r.get(4)?),
        ended_at: opt_ts(r.get(5)?),
        total: r.get(6)?,
        batch: r.get(7)?,
        tolerance: r.get(8)?,
        forgiven: r.get(9)?,
    })
}

const AGENT_COLUMNS: &str =
    "name, secret_hash, labels, version, os, arch, max_runs, created_at, last_seen, revoked";

fn agent_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAgent> {
    let labels: String = r.get(2)?;
    Ok(StoredAgent {
        name: r.get(0)?,
        secret_hash: r.get(1)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        version: r.get(3)?,
        os: r.get(4)?,
        arch: r.get(5)?,
        max_runs: r.get(6)?,
        created_at: ts(r.get(7)?),
        last_seen: opt_ts(r.get(8)?),
        revoked: r.get(9)?,
    })
}

fn get_agent(t: &Tx<'_>, name: &str) -> Result<Option<StoredAgent>> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1");
    Ok(t.conn.query_row(&sql, params![name], agent_from_row).optional()?)
}

fn get_dispatch(t: &Tx<'_>, id: i64) -> Result<DispatchRecord> {
    let sql = format!("SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE id = ?1");
    t.conn
        .query_row(&sql, params![id], dispatch_from_row)
        .optional()?
        .ok_or(Error::DispatchNotFound(id))
}

fn runs_of(t: &Tx<'_>, dispatch: i64) -> Result<Vec<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE dispatch = ?1 ORDER BY id");
    let mut st = t.conn.prepare_cached(&sql)?;
    let rows = st.query_map(params![dispatch], run_from_row)?.collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// A dispatch's counts by state: of the newest run of each host, an ignored one counted as
/// `ignored`.
fn counts_of(t: &Tx<'_>, dispatch: i64) -> Result<BTreeMap<String, u32>> {
    let mut st = t.conn.prepare_cached(
        "SELECT CASE WHEN ignored THEN 'ignored' ELSE state END, COUNT(*) FROM runs \
         WHERE id IN (SELECT MAX(id) FROM runs WHERE dispatch = ?1 GROUP BY host) GROUP BY 1",
    )?;
    let rows = st
        .query_map(params![dispatch], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

impl Store {
    /// Every agent ever enrolled, revoked ones included.
    pub async fn load_agents(&self) -> Result<Vec<StoredAgent>> {
        self.call(|t| {
            let sql = format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name");
            let mut st = t.conn.prepare(&sql)?;
            let rows = st.query_map([], agent_from_row)?.collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Records a join token (its hash), good until `expires_at`, once.
    pub async fn create_join_token(&self, hash: String, expires_at: Timestamp) -> Result<()> {
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

    /// Spends the join token whose hash is `token_hash` to enroll agent `name` with the
    /// credential whose secret hashes to `secret_hash`, in one change: a token enrolls one
    /// agent, once. A revoked agent's name may enroll again; an enrolled one's may not.
    pub async fn join_agent(
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
            match token {
                None => return Err(Error::Unauthorized("unknown join token".into())),
                Some((_, Some(by))) => {
                    return Err(Error::Unauthorized(format!(
                        "this join token was spent already (by agent {by:?}): ask for a new \
                         one with `taskctl agents join-token`"
                    )));
                }
                Some((exp, None)) if exp < now.as_microsecond() => {
                    return Err(Error::Unauthorized(
                        "this join token has expired: ask for a new one with `taskctl agents \
                         join-token`"
                            .into(),
                    ));
                }
                Some(_) => {}
            }
            if let Some(a) = get_agent(t, &name)?
                && !a.revoked
            {
                return Err(Error::Conflict(format!(
                    "an agent named {name:?} is enrolled already: give this one another \
                     --name, or revoke that one first (`taskctl agents revoke {name}`)"
                )));
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

    /// Marks agent `name` revoked: its credential is refused from now on.
    pub async fn revoke_agent(&self, name: String) -> Result<StoredAgent> {
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

    /// Records what agent `a.name` said of itself when it connected, and when. Not awaited.
    pub fn agent_seen(&self, a: StoredAgent) {
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

    /// Records a dispatch of `unit` on `hosts` and its runs, in one change whatever the
    /// number of hosts: the first `batch` hosts (all, for 0) `running`, the others `queued`.
    pub async fn create_dispatch(
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

    /// A new running run of dispatch `dispatch` on `host`: a retry or a redo.
    pub async fn create_host_run(
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

    /// Sets a dispatch's state (and its end, when final), emitting `dispatch.finished` when
    /// it ends.
    pub async fn set_dispatch_state(
        &self,
        id: i64,
        state: DispatchState,
    ) -> Result<DispatchRecord> {
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

    /// Keeps what an agent reported of run `id` after it ended here (`late_result`). Not
    /// awaited; its state does not change.
    pub fn set_late_result(&self, id: i64, outcome: String) {
        self.call_detached("late result", move |t| {
            t.conn.execute(
                "UPDATE runs SET late_result = ?2 WHERE id = ?1 AND late_result IS NULL",
                params![id, outcome],
            )?;
            Ok(())
        });
    }

    /// Records that dispatch `id` is being cancelled: state `cancelled`, not ended yet (its
    /// active runs are stopping), so that a daemon taking it over stops them too.
    pub async fn cancelling_dispatch(&self, id: i64) -> Result<()> {
        self.call(move |t| {
            t.conn.execute(
                "UPDATE dispatches SET state = 'cancelled' WHERE id = ?1 AND ended_at IS NULL",
                params![id],
            )?;
            Ok(())
        })
        .await
    }

    /// Resumes dispatch `id` (state `running`), forgiving its first `forgiven` failures.
    pub async fn resume_dispatch(&self, id: i64, forgiven: u32) -> Result<DispatchRecord> {
        self.call(move |t| {
            t.conn.execute(
                "UPDATE dispatches SET state = 'running', forgiven = ?2 WHERE id = ?1",
                params![id, forgiven],
            )?;
            get_dispatch(t, id)
        })
        .await
    }

    /// Marks run `id` of a dispatch ignored (or not): it no longer counts against the
    /// dispatch's tolerance or outcome.
    pub async fn set_ignored(&self, id: i64, ignored: bool) -> Result<()> {
        self.call(move |t| {
            t.conn.execute("UPDATE runs SET ignored = ?2 WHERE id = ?1", params![id, ignored])?;
            Ok(())
        })
        .await
    }

    /// Dispatches, newest first, each with its counts by state.
    pub async fn list_dispatches(
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

    /// One dispatch with all its runs (oldest first) and its counts.
    pub async fn get_dispatch(
        &self,
        id: i64,
    ) -> Result<(DispatchRecord, Vec<RunRecord>, BTreeMap<String, u32>)> {
        self.call(move |t| Ok((get_dispatch(t, id)?, runs_of(t, id)?, counts_of(t, id)?))).await
    }

    /// Dispatches not ended yet (running, paused, or being cancelled), each with its runs:
    /// what a starting daemon takes over.
    pub async fn open_dispatches(&self) -> Result<Vec<(DispatchRecord, Vec<RunRecord>)>> {
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

    /// Ids of the ignored runs of dispatch `id`.
    pub async fn ignored_runs(&self, id: i64) -> Result<Vec<i64>> {
        self.call(move |t| {
            let mut st =
                t.conn.prepare_cached("SELECT id FROM runs WHERE dispatch = ?1 AND ignored")?;
            let rows = st.query_map(params![id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }
}
