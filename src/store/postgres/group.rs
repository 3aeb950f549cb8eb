//! The engine's frequent changes (a dispatch and its runs created, runs ended, a dispatch's
//! state) made several to a transaction.
//!
//! Mechanism: callers hand their change to one queue and wait for its answer. A worker takes
//! what is waiting (up to [`GROUP_MAX`]) and makes it in one transaction: the fence checked
//! once, the changes' statements sent side by side on the connection (tokio-postgres
//! pipelines what is sent at once; all the group's dispatches are one statement, see
//! [`super::changes`]), one commit sent with the group's events: three round trips
//! (`BEGIN`; the fence and the changes; the events and `COMMIT`; a fourth when a run failed:
//! its unit's failure count waits for its end). Up to [`GROUPS_AT_ONCE`]
//! groups are under way at a time; what arrives meanwhile waits for the next, which is how a
//! burst of fires shares commits and round trips (about 20 statements and 3 commits per run
//! of a dispatch when each had a transaction of its own).
//!
//! Invariants:
//! - a caller is answered only after its change committed, or with the error that kept it
//!   from committing: as if its change had had a transaction of its own;
//! - one change that fails (a fire made already, a dispatch that is gone) does not fail the
//!   others: the group is rolled back and each change is made again in a transaction of its
//!   own, so the failing one gets its own error;
//! - the fence holds for the whole group (one check, in the transaction, sent with the
//!   changes' first statements, its answer awaited before the commit);
//! - groups cannot deadlock with each other although their changes take row locks in no fixed
//!   order: every change is of one unit, made by that unit's loop, which waits for each, so
//!   two groups under way never hold rows of the same unit.

use std::sync::Arc;

use deadpool_postgres::Pool;
use jiff::Timestamp;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::changes::{insert_dispatches, write_dispatch_states, write_ends};
use super::{DispatchRecord, DispatchState, Shared, Tx, begin};
use crate::error::{Error, Result};
use crate::run::{RunRecord, Trigger};

/// Changes made in one transaction at most.
const GROUP_MAX: usize = 256;
/// Groups under way at once (each holds a pooled connection).
const GROUPS_AT_ONCE: usize = 4;
/// Changes waiting for a group, at most (callers wait for room beyond that).
const QUEUED_MAX: usize = 4096;

/// A dispatch to create: `Backend::create_dispatch`'s arguments.
pub(super) struct NewDispatch {
    pub unit: String,
    pub trigger: Trigger,
    pub hosts: Vec<String>,
    pub batch: u32,
    pub tolerance: Option<u32>,
    pub scheduled_at: Option<Timestamp>,
}

/// A change, with where its answer goes.
enum Change {
    Dispatch(NewDispatch, oneshot::Sender<Result<(DispatchRecord, Vec<RunRecord>)>>),
    Ends(Vec<RunRecord>, u32, oneshot::Sender<Result<()>>),
    DispatchState(i64, DispatchState, oneshot::Sender<Result<DispatchRecord>>),
}

/// What a change made, to answer with once its transaction committed.
enum Made {
    Dispatch(DispatchRecord, Vec<RunRecord>),
    Ends,
    DispatchState(DispatchRecord),
}

impl Change {
    /// Answers the caller.
    fn answer(self, made: Result<Made>) {
        match (self, made) {
            (Change::Dispatch(_, tx), Ok(Made::Dispatch(d, runs))) => {
                let _ = tx.send(Ok((d, runs)));
            }
            (Change::Ends(_, _, tx), Ok(Made::Ends)) => {
                let _ = tx.send(Ok(()));
            }
            (Change::DispatchState(_, _, tx), Ok(Made::DispatchState(d))) => {
                let _ = tx.send(Ok(d));
            }
            (Change::Dispatch(_, tx), Err(e)) => {
                let _ = tx.send(Err(e));
            }
            (Change::Ends(_, _, tx), Err(e)) => {
                let _ = tx.send(Err(e));
            }
            (Change::DispatchState(_, _, tx), Err(e)) => {
                let _ = tx.send(Err(e));
            }
            (_, Ok(_)) => unreachable!("a change answered with another's result"),
        }
    }
}

/// Makes `changes` in `t`: their dispatches in one statement, their ends and states a
/// statement each, all sent at once (see [`super::changes`]); what each made, in order.
async fn make_all(t: &Tx<'_>, changes: &[Change]) -> Result<Vec<Made>> {
    let (mut dispatches, mut ends, mut states) = (Vec::new(), Vec::new(), Vec::new());
    for c in changes {
        match c {
            Change::Dispatch(d, _) => dispatches.push(d),
            Change::Ends(recs, keep, _) => ends.push((recs.as_slice(), *keep)),
            Change::DispatchState(id, state, _) => states.push((*id, *state)),
        }
    }
    // Side by side: their statements go out in one round trip.
    let (dispatches, (), states) = tokio::try_join!(
        async {
            if dispatches.is_empty() {
                Ok(Vec::new())
            } else {
                insert_dispatches(t, &dispatches).await
            }
        },
        async { if ends.is_empty() { Ok(()) } else { write_ends(t, &ends).await } },
        async {
            if states.is_empty() { Ok(Vec::new()) } else { write_dispatch_states(t, &states).await }
        },
    )?;
    let (mut dispatches, mut states) = (dispatches.into_iter(), states.into_iter());
    Ok(changes
        .iter()
        .map(|c| match c {
            Change::Dispatch(..) => {
                let (d, runs) = dispatches.next().expect("one per dispatch asked for");
                Made::Dispatch(d, runs)
            }
            Change::Ends(..) => Made::Ends,
            Change::DispatchState(..) => {
                Made::DispatchState(states.next().expect("one per state asked for"))
            }
        })
        .collect())
}

/// The queue of changes and its worker.
pub(super) struct Group {
    tx: mpsc::Sender<Change>,
}

impl Group {
    /// Starts the worker.
    pub(super) fn start(pool: Pool, shared: Arc<Shared>) -> Group {
        let (tx, rx) = mpsc::channel(QUEUED_MAX);
        tokio::spawn(worker(pool, shared, rx));
        Group { tx }
    }

    async fn submit<T>(
        &self,
        change: impl FnOnce(oneshot::Sender<Result<T>>) -> Change,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(change(tx)).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// `Backend::create_dispatch`.
    pub(super) async fn dispatch(
        &self,
        d: NewDispatch,
    ) -> Result<(DispatchRecord, Vec<RunRecord>)> {
        self.submit(|tx| Change::Dispatch(d, tx)).await
    }

    /// `Backend::finish_runs`.
    pub(super) async fn ends(&self, recs: Vec<RunRecord>, keep_runs: u32) -> Result<()> {
        self.submit(|tx| Change::Ends(recs, keep_runs, tx)).await
    }

    /// `Backend::set_dispatch_state`.
    pub(super) async fn dispatch_state(
        &self,
        id: i64,
        state: DispatchState,
    ) -> Result<DispatchRecord> {
        self.submit(|tx| Change::DispatchState(id, state, tx)).await
    }
}

/// Takes what is waiting, a group at a time, [`GROUPS_AT_ONCE`] groups at most under way.
async fn worker(pool: Pool, shared: Arc<Shared>, mut rx: mpsc::Receiver<Change>) {
    let permits = Arc::new(Semaphore::new(GROUPS_AT_ONCE));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let mut changes = Vec::new();
        if rx.recv_many(&mut changes, GROUP_MAX).await == 0 {
            return;
        }
        let (pool, shared) = (pool.clone(), shared.clone());
        tokio::spawn(async move {
            let (started, changes_n) = (std::time::Instant::now(), changes.len());
            make_group(&pool, &shared, changes).await;
            // One line per group at debug level (`RUST_LOG=taskd::store=debug`): how many
            // changes shared it, and how long it took.
            tracing::debug!(changes = changes_n, took = ?started.elapsed(), "store group");
            drop(permit);
        });
    }
}

/// Makes `changes` in one transaction, or, if one of them fails, each in its own.
async fn make_group(pool: &Pool, shared: &Shared, changes: Vec<Change>) {
    if changes.len() > 1 {
        match together(pool, shared, &changes).await {
            Ok(Some(made)) => {
                for (c, m) in changes.into_iter().zip(made) {
                    c.answer(Ok(m));
                }
                return;
            }
            // One change failed: each is made again on its own, below.
            Ok(None) => {}
            // The transaction did not get that far (no connection, the fence): none would.
            Err(e) => {
                for c in changes {
                    c.answer(Err(again(&e)));
                }
                return;
            }
        }
    }
    let alone = changes.into_iter().map(|c| async move {
        let made = async {
            let mut conn = pool.get().await?;
            let t = begin(&mut conn, shared).await?;
            let made = make_all(&t, std::slice::from_ref(&c)).await?;
            t.commit().await?;
            Ok(made.into_iter().next().expect("one change, one answer"))
        }
        .await;
        c.answer(made);
    });
    futures_util::future::join_all(alone).await;
}

/// Makes `changes` side by side in one transaction: what each made, or `None` if one failed
/// (nothing committed).
async fn together(pool: &Pool, shared: &Shared, changes: &[Change]) -> Result<Option<Vec<Made>>> {
    let mut conn = pool.get().await?;
    let t = begin(&mut conn, shared).await?;
    // The fence is checked side by side with the changes, in the same round trip: nothing
    // they wrote commits unless it held. The transaction's id is asked for in it too, so
    // that the events and the commit go in one round trip (`Tx::commit`).
    let (held, xid, made) = tokio::join!(t.fence_alongside(), t.learn_xid(), make_all(&t, changes));
    held?;
    // Without the id (its statement failed), the commit asks for it with the events.
    let _ = xid;
    let Ok(made) = made else {
        // Dropped: rolled back.
        return Ok(None);
    };
    t.commit().await?;
    Ok(Some(made))
}

/// `e` again, for each change of a group it failed.
fn again(e: &Error) -> Error {
    match e {
        Error::Fenced => Error::Fenced,
        Error::ShuttingDown => Error::ShuttingDown,
        other => Error::Postgres(other.to_string()),
    }
}
