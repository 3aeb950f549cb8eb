//! The engine's frequent changes as a [`group`](super::group) makes them: the dispatches it
//! creates, all in one statement (with their runs, scheduled fires and units' counts); the
//! runs it ends, with their units' prunes; the dispatch states it sets.
//!
//! Why one statement for the dispatches: PostgreSQL pays for each statement (bind, executor
//! start-up, a trigger call per row inserted) besides each row. A fire was three statements
//! (the dispatch and its runs, the fire, the unit's count); a group's fires are now one,
//! about 0.1 ms a fire where the three took 0.16 (pg_stat_statements, BENCHMARKS.md).
//!
//! Mechanism: rows go as arrays, one per column, read back with `unnest ... WITH
//! ORDINALITY`. A new row's id is drawn from its table's sequence inside the statement, in
//! the order the rows were sent, so that what asked for each row finds it by position, and
//! the runs of a dispatch get ascending ids in its hosts' order (as a statement per dispatch
//! gave them).
//!
//! Why not the ends and states too: changing rows by joining the table to `unnest` needs a
//! plan that reads them through the primary key, and a prepared statement is planned once
//! per connection without knowing the arrays are short. It was planned as a scan: of
//! `runs_by_state`, the partial index of active runs, which holds every ended run's old entry
//! until the next vacuum while the statistics count a few rows; or of the whole table,
//! planned while it was small. Milliseconds a statement, where an `UPDATE` of one run by its
//! id takes 0.07 ms. So those are a statement per row, all sent at once: one round trip.
//!
//! Invariants:
//! - a change that cannot be made fails its statement, and so the group's transaction: a
//!   fire made already, a dispatch that is gone. The group then makes each change alone,
//!   where that one gets its own error;
//! - each change's events are the ones it emits when made alone, in the same order; across
//!   changes (of different units: a unit's loop has one change under way at a time) they
//!   follow the order their statements answered.
//!
//! Limits: the units' counts are changed by joining `units` to the group's rows by name, and
//! a plan made while `units` was small may read it whole until PostgreSQL next analyzes it
//! (after a tenth of it changed, within the autovacuum's naptime); a unit's row by its key
//! costs the same at any size, but a statement more per fire.

use std::collections::HashSet;
use std::sync::LazyLock;

use jiff::Timestamp;

use super::group::NewDispatch;
use super::{
    Args, DISPATCH_COLUMNS, DispatchRecord, DispatchState, EventKind, NewRun, Tx,
    dispatch_from_row, inserted_run,
};
use crate::error::{Error, Result};
use crate::run::{RunRecord, RunState};

/// Inserts dispatches, their runs (`running` for the first `batch` hosts, else `queued`),
/// their scheduled fires and their units' counts; answers, per dispatch in the order sent:
/// its columns, its runs' ids in its hosts' order, and whether its fire was made here (not
/// made already). Parameters: per dispatch
/// `$1` units, `$2` triggers, `$4` totals, `$5` batches, `$6` tolerances, `$7` fire times;
/// `$3` now; per run `$8` its dispatch's number, `$9` host, `$10` state; `$11` the epoch.
const INSERT_DISPATCHES: &str = "\
WITH i AS MATERIALIZED (
    SELECT nextval('dispatches_id_seq'::regclass) AS id, x.* FROM (
        SELECT * FROM unnest($1::text[], $2::text[], $4::int[], $5::int[], $6::int[],
            $7::timestamptz[]) WITH ORDINALITY AS x(unit, trigger, total, batch, tolerance,
            scheduled_at, n)
        ORDER BY n) x),
h AS MATERIALIZED (
    SELECT nextval('runs_id_seq'::regclass) AS id, y.* FROM (
        SELECT * FROM unnest($8::int[], $9::text[], $10::text[]) WITH ORDINALITY
            AS y(of_n, host, state, n)
        ORDER BY n) y),
a AS (
    SELECT of_n, array_agg(id ORDER BY n) AS ids,
        count(*) FILTER (WHERE state = 'running') AS running
    FROM h GROUP BY of_n),
d AS (
    INSERT INTO dispatches(id, unit, trigger, state, created_at, total, batch, tolerance)
    SELECT id, unit, trigger, 'running', $3, total, batch, tolerance FROM i
    RETURNING {DISPATCH_COLUMNS}),
r AS (
    INSERT INTO runs(id, unit, state, trigger, attempt, host, queued_at, scheduled_at,
        started_at, dispatch)
    SELECT h.id, i.unit, h.state, i.trigger, 1, h.host, $3, i.scheduled_at,
        CASE WHEN h.state = 'running' THEN $3 END, i.id
    FROM h JOIN i ON i.n = h.of_n
    ORDER BY h.n),
f AS (
    INSERT INTO fires(unit, scheduled_at, epoch, fired_at)
    SELECT unit, scheduled_at, $11, now() FROM i WHERE scheduled_at IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING unit, scheduled_at),
c AS (
    UPDATE units u SET runs_total = u.runs_total + k.running,
        last_fire = CASE WHEN k.fire IS NULL THEN u.last_fire
            ELSE GREATEST(COALESCE(u.last_fire, k.fire), k.fire) END
    FROM (SELECT i.unit, SUM(COALESCE(a.running, 0))::bigint AS running,
            MAX(i.scheduled_at) AS fire
          FROM i LEFT JOIN a ON a.of_n = i.n GROUP BY i.unit) k
    WHERE u.name = k.unit AND (k.running > 0 OR k.fire IS NOT NULL))
SELECT d.*, COALESCE(a.ids, '{}'),
    i.scheduled_at IS NULL OR EXISTS (
        SELECT 1 FROM f WHERE f.unit = i.unit AND f.scheduled_at = i.scheduled_at)
FROM d JOIN i ON i.id = d.id LEFT JOIN a ON a.of_n = i.n
ORDER BY i.n";

/// Records dispatches (each with its scheduled fire, refused if it was made already) and
/// their hosts' runs, in transaction `t`: each one's record and runs, in order.
pub(super) async fn insert_dispatches(
    t: &Tx<'_>,
    new: &[&NewDispatch],
) -> Result<Vec<(DispatchRecord, Vec<RunRecord>)>> {
    t.fenced().await?;
    // Two fires of one unit for one time would both find their fire made (`ON CONFLICT DO
    // NOTHING` skips the second row of a statement): refused here, so that made alone, the
    // second is refused as made already. (A unit's loop has one change under way at a time.)
    // Compared as PostgreSQL keeps them, to the microsecond.
    let mut fires = HashSet::new();
    let mut keys = new.iter().filter_map(|d| Some((&d.unit, d.scheduled_at?.as_microsecond())));
    if keys.any(|f| !fires.insert(f)) {
        return Err(Error::Conflict("two fires of one unit for one time in one group".into()));
    }
    let now = Timestamp::now();
    let epoch = t.shared.fence.armed().map_or(0, |(_, e)| e);
    let mut units = Vec::with_capacity(new.len());
    let mut triggers = Vec::with_capacity(new.len());
    let mut totals = Vec::with_capacity(new.len());
    let mut batches = Vec::with_capacity(new.len());
    let mut tolerances = Vec::with_capacity(new.len());
    let mut scheduled = Vec::with_capacity(new.len());
    let (mut of, mut hosts, mut states) = (Vec::new(), Vec::new(), Vec::new());
    for (n, d) in new.iter().enumerate() {
        units.push(d.unit.as_str());
        triggers.push(d.trigger.as_str());
        totals.push(d.hosts.len() as i32);
        batches.push(d.batch as i32);
        tolerances.push(d.tolerance.map(|t| t as i32));
        scheduled.push(d.scheduled_at);
        for (i, host) in d.hosts.iter().enumerate() {
            of.push(n as i32 + 1);
            hosts.push(host.as_str());
            states.push(first_state(d, i).as_str());
        }
    }
    static SQL: LazyLock<String> =
        LazyLock::new(|| INSERT_DISPATCHES.replace("{DISPATCH_COLUMNS}", DISPATCH_COLUMNS));
    let insert = t.prepare(&SQL).await?;
    let rows =
        t.t.query(
            &insert,
            &[
                &units,
                &triggers,
                &now,
                &totals,
                &batches,
                &tolerances,
                &scheduled,
                &of,
                &hosts,
                &states,
                &epoch,
            ],
        )
        .await?;
    if rows.len() != new.len() {
        return Err(Error::Postgres(format!(
            "{} dispatches inserted for {} asked for",
            rows.len(),
            new.len()
        )));
    }
    let columns = DISPATCH_COLUMNS.split(',').count();
    let mut made = Vec::with_capacity(new.len());
    for (d, row) in new.iter().zip(&rows) {
        let fired: bool = row.get(columns + 1);
        if !fired {
            let at = d.scheduled_at.expect("only a scheduled fire can be made already");
            return Err(Error::Conflict(format!(
                "the fire of {} at {at} was made already",
                d.unit
            )));
        }
        let record = dispatch_from_row(row);
        let ids: Vec<i64> = row.get(columns);
        if ids.len() != d.hosts.len() {
            return Err(Error::Postgres(format!(
                "dispatch {}: {} runs inserted for {} hosts",
                record.id,
                ids.len(),
                d.hosts.len()
            )));
        }
        t.emit(EventKind::DispatchStarted, &d.unit, Some(record.id), Some("running"));
        let runs = d
            .hosts
            .iter()
            .zip(ids)
            .enumerate()
            .map(|(i, (host, id))| {
                let run = NewRun {
                    state: first_state(d, i),
                    trigger: d.trigger,
                    attempt: 1,
                    scheduled_at: d.scheduled_at,
                    host,
                    dispatch: Some(record.id),
                };
                inserted_run(t, &d.unit, id, run, now)
            })
            .collect();
        made.push((record, runs));
    }
    Ok(made)
}

/// The state a dispatch's run on its `i`th host starts in: the first `batch` run at once.
fn first_state(d: &NewDispatch, i: usize) -> RunState {
    if d.batch == 0 || i < d.batch as usize { RunState::Running } else { RunState::Queued }
}

/// Ends a run if it is still active.
const END_RUN: &str = "UPDATE runs SET state = $2, started_at = $3, ended_at = $4, exit_code = $5, \
     signal = $6, reason = $7, stdout_bytes = $8, stderr_bytes = $9, truncated = $10, \
     pid = COALESCE($11, pid) WHERE id = $1 AND state IN ('queued', 'running')";

/// Deletes a unit's runs of no dispatch beyond its newest `$2`.
const PRUNE_RUNS: &str = "DELETE FROM runs WHERE unit = $1 AND dispatch IS NULL \
     AND state NOT IN ('queued', 'running') \
     AND id < (SELECT COALESCE(MIN(id), 0) FROM \
         (SELECT id FROM runs WHERE unit = $1 AND dispatch IS NULL \
          ORDER BY id DESC LIMIT $2) k)";

/// Deletes a unit's ended dispatches beyond its newest `$2`, with their runs.
const PRUNE_DISPATCHES: &str = "WITH old AS (DELETE FROM dispatches WHERE unit = $1 \
     AND ended_at IS NOT NULL AND id < (SELECT COALESCE(MIN(id), 0) FROM \
         (SELECT id FROM dispatches WHERE unit = $1 ORDER BY id DESC LIMIT $2) k) \
     RETURNING id) DELETE FROM runs WHERE dispatch IN (SELECT id FROM old)";

/// Records the ends of runs (those still active), their units' failure counts and events,
/// and prunes each unit's history to its newest `keep` runs, in transaction `t`: `ends` are
/// each change's runs and `keep`.
///
/// A statement per run and per unit (see the module documentation), all sent at once: one
/// round trip.
pub(super) async fn write_ends(t: &Tx<'_>, ends: &[(&[RunRecord], u32)]) -> Result<()> {
    let recs: Vec<&RunRecord> = ends.iter().flat_map(|(recs, _)| recs.iter()).collect();
    // Each unit once, with the `keep` of its first change.
    let mut seen = HashSet::new();
    let mut units = Vec::new();
    for (recs, keep) in ends {
        for r in recs.iter().filter(|r| seen.insert(r.unit.as_str())) {
            units.push((r.unit.as_str(), i64::from(*keep)));
        }
    }
    let end = t.prepare(END_RUN).await?;
    let prune_runs = t.prepare(PRUNE_RUNS).await?;
    let prune_dispatches = t.prepare(PRUNE_DISPATCHES).await?;
    let now = Timestamp::now();
    let ended = futures_util::future::try_join_all(recs.iter().map(|r| {
        let end = &end;
        async move {
            let (state, ended) = (r.state.as_str(), r.ended_at.unwrap_or(now));
            let (out, err) = (r.stdout_bytes as i64, r.stderr_bytes as i64);
            let pid = r.pid.map(i64::from);
            let args: Args<'_, 11> = [
                &r.id,
                &state,
                &r.started_at,
                &ended,
                &r.exit_code,
                &r.signal,
                &r.reason,
                &out,
                &err,
                &r.truncated,
                &pid,
            ];
            Ok::<_, tokio_postgres::Error>(t.t.execute(end, &args).await? == 1)
        }
    }));
    // The prunes run after the ends (statements run in the order sent): a run ended here whose
    // unit has `keep` newer runs ended already is pruned with them, in this transaction, as
    // the SQLite store does (`keep` is of the newest by id).
    let prunes = futures_util::future::try_join_all(units.iter().map(|(unit, keep)| {
        let (prune_runs, prune_dispatches) = (&prune_runs, &prune_dispatches);
        async move {
            let args: Args<'_, 2> = [unit, keep];
            tokio::try_join!(t.t.execute(prune_runs, &args), t.t.execute(prune_dispatches, &args))
        }
    }));
    let (ended, _) = tokio::try_join!(ended, prunes)?;
    let ended: Vec<&RunRecord> =
        recs.into_iter().zip(ended).filter(|(_, ended)| *ended).map(|(r, _)| r).collect();
    let failed = ended.iter().filter(|r| matches!(r.state, RunState::Failed | RunState::TimedOut));
    let failed: Vec<&str> = failed.map(|r| r.unit.as_str()).collect();
    if !failed.is_empty() {
        t.execute(
            "UPDATE units SET failures_total = failures_total + k.n \
             FROM (SELECT unit, count(*) AS n FROM unnest($1::text[]) AS f(unit) GROUP BY unit) k \
             WHERE name = k.unit",
            &[&failed],
        )
        .await?;
    }
    for r in ended {
        t.emit(EventKind::RunFinished, &r.unit, Some(r.id), Some(r.state.as_str()));
    }
    Ok(())
}

/// Sets dispatches' states (and their ends, if final), in transaction `t`: their records,
/// in order. A statement each (see [`write_ends`]), sent at once.
pub(super) async fn write_dispatch_states(
    t: &Tx<'_>,
    states: &[(i64, DispatchState)],
) -> Result<Vec<DispatchRecord>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE dispatches SET state = $2, ended_at = $3 WHERE id = $1 \
             RETURNING {DISPATCH_COLUMNS}"
        )
    });
    let st = t.prepare(&SQL).await?;
    let now = Timestamp::now();
    let rows = futures_util::future::try_join_all(states.iter().map(|(id, state)| {
        let st = &st;
        async move {
            let ended = state.is_final().then_some(now);
            t.t.query_opt(st, &[id, &state.as_str(), &ended]).await
        }
    }))
    .await?;
    states
        .iter()
        .zip(rows)
        .map(|((id, state), row)| {
            let d = row.as_ref().map(dispatch_from_row).ok_or(Error::DispatchNotFound(*id))?;
            if state.is_final() {
                t.emit(EventKind::DispatchFinished, &d.unit, Some(*id), Some(state.as_str()));
            }
            Ok(d)
        })
        .collect()
}
