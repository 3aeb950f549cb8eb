//! Run logs in PostgreSQL: the bytes a log file would hold, as rows `(run, off, data)` of
//! `run_logs`, so that any server reads any run's log, also after the server that wrote it is
//! gone.
//!
//! The log writer thread ([`crate::store::logs`]) appends through [`LogTable::append`]; a task
//! gathers what is waiting, joins the pieces of each run that follow each other into one row,
//! and inserts them all in one statement. A row's key is its run and offset, so a batch sent
//! again after an error is written once. The channel is bounded: when PostgreSQL is slower
//! than the output, the writer thread waits, and so do the runs' pipes (as with a slow disk).
//! A batch that cannot be written for [`GIVE_UP_AFTER`] is dropped with an error in the
//! daemon's log; the run goes on.
//!
//! Reads load a run's whole log (at most twice its `log_limit` per stream, plus the kept
//! tails) and decode it as a file is.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;

use crate::error::Result;

/// Pieces waiting for the table's writer at most; past that, appends wait.
const QUEUED: usize = 1024;
/// Largest row written: longer runs of output are split.
const ROW_MAX: usize = 1 << 20;
/// How long a batch is tried again before it is dropped.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

enum Msg {
    Append {
        run: i64,
        off: u64,
        data: Vec<u8>,
    },
    /// Called once everything appended before it is committed (or given up).
    Flush(Box<dyn FnOnce() + Send>),
}

/// Handle to the `run_logs` table and its writer task.
#[derive(Clone)]
pub struct LogTable {
    tx: mpsc::Sender<Msg>,
    pool: Pool,
    rt: tokio::runtime::Handle,
    /// Runs with ids above this were created by this process's engine: their logs start
    /// empty, and are not read back when opened (see [`LogTable::engine_starts`]).
    older_than: Arc<AtomicI64>,
}

impl LogTable {
    /// Starts the writer task (on the current runtime).
    pub(in crate::store) fn start(pool: Pool, newest_run: i64) -> LogTable {
        let (tx, rx) = mpsc::channel(QUEUED);
        tokio::spawn(writer(pool.clone(), rx));
        let older_than = Arc::new(AtomicI64::new(newest_run));
        LogTable { tx, pool, rt: tokio::runtime::Handle::current(), older_than }
    }

    /// Notes that this process's engine starts (a standby took the lease): runs that exist now
    /// may have logs another server began.
    pub async fn engine_starts(&self) -> Result<()> {
        let c = self.pool.get().await?;
        let newest: i64 = c.query_one("SELECT COALESCE(MAX(id), 0) FROM runs", &[]).await?.get(0);
        self.older_than.store(newest, Ordering::SeqCst);
        Ok(())
    }

    /// Whether run `run` may have a log already (it was created before this process's engine
    /// started: a run on an agent, taken over).
    pub fn may_have_log(&self, run: i64) -> bool {
        run <= self.older_than.load(Ordering::SeqCst)
    }

    /// Appends `data` at byte `off` of run `run`'s log. Blocks while the writer is full: call
    /// it from the log writer thread only.
    pub fn append(&self, run: i64, off: u64, data: Vec<u8>) {
        let _ = self.tx.blocking_send(Msg::Append { run, off, data });
    }

    /// Calls `f` once everything appended so far is committed. Blocks like [`Self::append`].
    pub fn after_flush(&self, f: Box<dyn FnOnce() + Send>) {
        if let Err(mpsc::error::SendError(Msg::Flush(f))) = self.tx.blocking_send(Msg::Flush(f)) {
            f();
        }
    }

    /// Run `run`'s whole log (empty if it has none).
    pub async fn load(&self, run: i64) -> Result<Vec<u8>> {
        let c = self.pool.get().await?;
        let st =
            c.prepare_cached("SELECT off, data FROM run_logs WHERE run = $1 ORDER BY off").await?;
        let rows = c.query(&st, &[&run]).await?;
        Ok(assemble(rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, &[u8]>(1)))))
    }

    /// [`Self::load`] from a thread outside the runtime (the log writer thread).
    pub fn load_blocking(&self, run: i64) -> Result<Vec<u8>> {
        self.rt.block_on(self.load(run))
    }
}

/// A log from its rows `(offset, bytes)` in offset order. Rows follow each other; one that
/// overlaps what came before (written twice) adds only what is new. Where bytes are missing
/// (a batch the database did not take), a line break keeps the record cut short apart from
/// the next: readers skip it as a malformed line.
pub fn assemble<'a>(rows: impl IntoIterator<Item = (i64, &'a [u8])>) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    let mut end = 0i64;
    for (off, data) in rows {
        if off > end {
            out.push(b'\n');
            end = off;
        }
        let skip = (end - off).max(0) as usize;
        if let Some(new) = data.get(skip..) {
            out.extend_from_slice(new);
            end += new.len() as i64;
        }
    }
    out
}

/// Pieces joined per run: `(run, offset, bytes)`.
fn join(pieces: Vec<(i64, u64, Vec<u8>)>) -> Vec<(i64, i64, Vec<u8>)> {
    let mut rows: Vec<(i64, i64, Vec<u8>)> = Vec::new();
    let mut last: HashMap<i64, usize> = HashMap::new();
    for (run, off, data) in pieces {
        if let Some(&i) = last.get(&run) {
            let row = &mut rows[i];
            if row.1 as u64 + row.2.len() as u64 == off && row.2.len() + data.len() <= ROW_MAX {
                row.2.extend_from_slice(&data);
                continue;
            }
        }
        last.insert(run, rows.len());
        rows.push((run, off as i64, data));
    }
    rows
}

async fn insert(pool: &Pool, rows: &[(i64, i64, Vec<u8>)]) -> Result<()> {
    let runs: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let offs: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let data: Vec<&[u8]> = rows.iter().map(|r| r.2.as_slice()).collect();
    let c = pool.get().await?;
    // Output of a run deleted meanwhile (its unit deleted while it ran) is dropped.
    let st = c
        .prepare_cached(
            "INSERT INTO run_logs(run, off, data) \
             SELECT u.run, u.off, u.data FROM unnest($1::bigint[], $2::bigint[], $3::bytea[]) \
             AS u(run, off, data) WHERE EXISTS (SELECT 1 FROM runs r WHERE r.id = u.run) \
             ON CONFLICT DO NOTHING",
        )
        .await?;
    c.execute(&st, &[&runs, &offs, &data]).await?;
    Ok(())
}

async fn writer(pool: Pool, mut rx: mpsc::Receiver<Msg>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, QUEUED).await > 0 {
        let mut pieces = Vec::new();
        let mut flushes = Vec::new();
        for m in batch.drain(..) {
            match m {
                Msg::Append { run, off, data } => pieces.push((run, off, data)),
                Msg::Flush(f) => flushes.push(f),
            }
        }
        if !pieces.is_empty() {
            let rows = join(pieces);
            let give_up = tokio::time::Instant::now() + GIVE_UP_AFTER;
            let mut pause = Duration::from_millis(50);
            loop {
                match insert(&pool, &rows).await {
                    Ok(()) => break,
                    Err(e) if tokio::time::Instant::now() < give_up => {
                        tracing::warn!(error = %e, "cannot write run output to PostgreSQL; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        let bytes: usize = rows.iter().map(|r| r.2.len()).sum();
                        tracing::error!(error = %e, bytes, "run output dropped: PostgreSQL did not take it");
                        break;
                    }
                }
            }
        }
        for f in flushes {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn a_log_is_assembled_from_overlapping_and_missing_rows() {
        let rows: [(i64, &[u8]); 4] = [(0, b"ab\n"), (2, b"\ncd\n"), (10, b"ef\n"), (13, b"g")];
        assert_eq!(super::assemble(rows), b"ab\ncd\n\nef\ng");
    }

    #[test]
    fn pieces_that_follow_each_other_become_one_row_per_run() {
        let rows = join(vec![
            (1, 0, b"ab".to_vec()),
            (2, 10, b"x".to_vec()),
            (1, 2, b"cd".to_vec()),
            (1, 9, b"z".to_vec()),
            (2, 11, b"y".to_vec()),
        ]);
        assert_eq!(
            rows,
            [(1, 0, b"abcd".to_vec()), (2, 10, b"xy".to_vec()), (1, 9, b"z".to_vec())]
        );
    }
}
