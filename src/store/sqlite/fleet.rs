//! Agents, join tokens and dispatches in SQLite: the rows and the reads several changes share.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};

use super::{RUN_COLUMNS, Tx, opt_ts, run_from_row, ts};
use crate::error::{Error, Result};
use crate::run::{RunRecord, Trigger};
use crate::store::{DispatchRecord, DispatchState, StoredAgent};

pub(super) const DISPATCH_COLUMNS: &str =
    "id, unit, trigger, state, created_at, ended_at, total, batch, tolerance, forgiven";

pub(super) fn dispatch_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DispatchRecord> {
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

pub(super) const AGENT_COLUMNS: &str =
    "name, secret_hash, labels, version, os, arch, max_runs, created_at, last_seen, revoked";

pub(super) fn agent_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAgent> {
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

pub(super) fn get_agent(t: &Tx<'_>, name: &str) -> Result<Option<StoredAgent>> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1");
    Ok(t.conn.query_row(&sql, params![name], agent_from_row).optional()?)
}

pub(super) fn get_dispatch(t: &Tx<'_>, id: i64) -> Result<DispatchRecord> {
    let sql = format!("SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE id = ?1");
    t.conn
        .query_row(&sql, params![id], dispatch_from_row)
        .optional()?
        .ok_or(Error::DispatchNotFound(id))
}

pub(super) fn runs_of(t: &Tx<'_>, dispatch: i64) -> Result<Vec<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE dispatch = ?1 ORDER BY id");
    let mut st = t.conn.prepare_cached(&sql)?;
    let rows = st.query_map(params![dispatch], run_from_row)?.collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// A dispatch's counts by state: of the newest run of each host, an ignored one counted as
/// `ignored`.
pub(super) fn counts_of(t: &Tx<'_>, dispatch: i64) -> Result<BTreeMap<String, u32>> {
    let mut st = t.conn.prepare_cached(
        "SELECT CASE WHEN ignored THEN 'ignored' ELSE state END, COUNT(*) FROM runs \
         WHERE id IN (SELECT MAX(id) FROM runs WHERE dispatch = ?1 GROUP BY host) GROUP BY 1",
    )?;
    let rows = st
        .query_map(params![dispatch], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}
