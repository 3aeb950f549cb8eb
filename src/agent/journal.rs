//! The agent's journal: an append-only file of what it accepted and what it reported, synced
//! before the agent acts on an `accept` or a `result`, so that across its own crashes an agent
//! never starts a run twice and never loses a result the server has not acknowledged.
//!
//! Syncs are shared ([`Durable`]): an entry is written at once, and whoever waits for it to be
//! on disk syncs the file, off the async threads, for every entry written so far, one sync at
//! a time: those waiting meanwhile find their entry synced by it, or sync next. So a busy
//! agent pays one sync for many entries instead of one each, and a sync never blocks the
//! agent's (or its daemon's) runtime. The waiters a sync covered are woken all at once (a
//! `watch` of the number synced), not handed a lock one after the other: on a busy runtime a
//! chain of hundreds of hand-offs, each waiting for its task's turn, took longer than the
//! syncs (an agent on a cluster's busiest server started runs 100-300 ms after their
//! assignment, with syncs of 1-3 ms).
//!
//! Entries (one JSON object per line): `accept` (run, attempt) before the run starts; `pid`
//! (its process group, start ticks and boot id, to find what is left of it after a crash);
//! `result` (its outcome) before it is reported; `acked` once the server recorded it. At
//! start the file is read whole and rewritten compact: results still unacknowledged, and
//! the ids of the newest acknowledged runs ([`ACKED_KEPT`]), so that an assignment sent again
//! late is still recognised as done.
//!
//! Limits: a torn last line (a crash mid-append) is skipped; the entries before it stand.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::proto::Outcome;

/// Acknowledged run ids kept across compactions.
pub const ACKED_KEPT: usize = 10_000;

/// One line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// Run `run` (attempt `attempt`) was accepted: it starts at most once.
    Accept {
        /// The run.
        run: i64,
        /// Its attempt.
        attempt: u32,
    },
    /// Run `run`'s process started.
    Pid {
        /// The run.
        run: i64,
        /// Its pid (= process group).
        pid: u32,
        /// Its start time in clock ticks since boot.
        ticks: Option<u64>,
        /// The boot it started in.
        boot: Option<String>,
    },
    /// Run `o.run` ended: to report until acknowledged.
    Result(Outcome),
    /// The server recorded run `run`'s end.
    Acked(i64),
}

/// What the journal says of one run.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Its attempt.
    pub attempt: u32,
    /// Its process, if it started: pid, start ticks, boot id.
    pub pid: Option<(u32, Option<u64>, Option<String>)>,
    /// Its outcome, once it ended.
    pub result: Option<Outcome>,
    /// Whether the server acknowledged that outcome.
    pub acked: bool,
}

/// The journal file and what it says.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Every run it knows, by id.
    pub runs: BTreeMap<i64, Known>,
    /// Lines in the file (about): past [`COMPACT_AT`] and four times what it knows, it is
    /// compacted.
    lines: usize,
    /// Entries written since it was opened.
    written: u64,
}

/// Lines a journal may grow to before it is compacted (a long-lived agent's journal would
/// otherwise grow with every run it ever ran).
const COMPACT_AT: usize = 50_000;

impl Journal {
    /// Opens (creating) `<dir>/journal`, reads it, and rewrites it compact.
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        let path = dir.join("journal");
        let mut runs: BTreeMap<i64, Known> = BTreeMap::new();
        if let Ok(f) = File::open(&path) {
            // As bytes: a line torn by a crash may end inside a character.
            for line in BufReader::new(f).split(b'\n') {
                let Ok(entry) = serde_json::from_slice::<Entry>(&line?) else { continue };
                apply(&mut runs, entry);
            }
        }
        let file = private(&path, false)?;
        let mut j = Journal { path, file, runs, lines: 0, written: 0 };
        j.compact()?;
        Ok(j)
    }

    /// Rewrites the file with only what matters: results still unacknowledged, and the ids
    /// of the newest acknowledged runs. Written aside, synced, renamed into place.
    fn compact(&mut self) -> std::io::Result<()> {
        let acked: Vec<i64> =
            self.runs.iter().filter(|(_, k)| k.acked).map(|(id, _)| *id).collect();
        for id in acked.iter().take(acked.len().saturating_sub(ACKED_KEPT)) {
            self.runs.remove(id);
        }
        let tmp = self.path.with_file_name(".journal.tmp");
        let mut out = Vec::new();
        for (id, k) in &self.runs {
            let entries = if k.acked {
                vec![Entry::Acked(*id)]
            } else {
                let mut v = vec![Entry::Accept { run: *id, attempt: k.attempt }];
                if let Some((pid, ticks, boot)) = &k.pid {
                    v.push(Entry::Pid { run: *id, pid: *pid, ticks: *ticks, boot: boot.clone() });
                }
                v.extend(k.result.clone().map(Entry::Result));
                v
            };
            for e in entries {
                serde_json::to_writer(&mut out, &e)?;
                out.push(b'\n');
            }
        }
        let mut f = private(&tmp, true)?;
        f.write_all(&out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = private(&self.path, false)?;
        self.lines = self.runs.len();
        Ok(())
    }

    /// Appends `entry`, not synced yet (see [`Durable::synced`]); its number.
    pub fn append(&mut self, entry: Entry) -> std::io::Result<u64> {
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        apply(&mut self.runs, entry);
        self.written += 1;
        self.lines += 1;
        if self.lines > COMPACT_AT && self.lines > 4 * self.runs.len() {
            self.compact()?;
        }
        Ok(self.written)
    }

    /// Results not acknowledged yet, by run.
    pub fn unacked(&self) -> Vec<Outcome> {
        self.runs.values().filter_map(|k| k.result.clone()).collect()
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The journal, shared by the agent's tasks, with its syncs shared too (module
/// documentation).
pub struct Durable {
    journal: Mutex<Journal>,
    /// The number of the last entry known to be on disk; waiters watch it.
    synced: tokio::sync::watch::Sender<u64>,
    /// Whether a sync is under way (its [`Turn`] clears it, however it ends).
    syncing: AtomicBool,
    /// Syncs made.
    syncs: AtomicU64,
}

/// The one sync under way: when it ends (done, failed, or its task dropped), it says so and
/// wakes every waiter, with the number it synced if it did.
struct Turn<'a> {
    durable: &'a Durable,
    upto: Option<u64>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.durable.syncing.store(false, Ordering::Release);
        let upto = self.upto;
        self.durable.synced.send_modify(|n| *n = (*n).max(upto.unwrap_or(0)));
    }
}

impl Durable {
    /// Shares `journal`: what it holds now is on disk (it was compacted at its opening).
    pub fn new(journal: Journal) -> Durable {
        Durable {
            synced: tokio::sync::watch::Sender::new(journal.written),
            journal: Mutex::new(journal),
            syncing: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
        }
    }

    /// How many syncs it made (fewer than the entries waited for, when they come together).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// The journal, to read or append to.
    pub fn lock(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `entry` and waits until it is on disk.
    pub async fn append(&self, entry: Entry) -> std::io::Result<()> {
        let n = self.lock().append(entry)?;
        self.synced(n).await
    }

    /// Waits until entry `n` is on disk: syncs the file for every entry written so far,
    /// after the sync under way, if any (which may have covered it).
    pub async fn synced(&self, n: u64) -> std::io::Result<()> {
        let mut watch = self.synced.subscribe();
        loop {
            if *watch.borrow_and_update() >= n {
                return Ok(());
            }
            if self
                .syncing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let mut turn = Turn { durable: self, upto: None };
                turn.upto = Some(self.sync().await?);
                // Dropped: publishes, and wakes those it covered and those it did not (one of
                // them syncs next).
                continue;
            }
            // A change since the read above counts: no wake-up is missed. The sender lives
            // as long as `self`.
            let _ = watch.changed().await;
        }
    }

    /// Syncs the file as it is now, off the async threads; the last entry it then held.
    async fn sync(&self) -> std::io::Result<u64> {
        let (file, upto) = {
            let j = self.lock();
            (j.file.try_clone()?, j.written)
        };
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(std::io::Error::other)??;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(upto)
    }
}

fn private(path: &Path, truncate: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.create(true).mode(0o600);
    if truncate {
        o.write(true).truncate(true);
    } else {
        o.append(true);
    }
    o.open(path)
}

fn apply(runs: &mut BTreeMap<i64, Known>, entry: Entry) {
    match entry {
        Entry::Accept { run, attempt } => {
            runs.entry(run).or_default().attempt = attempt;
        }
        Entry::Pid { run, pid, ticks, boot } => {
            runs.entry(run).or_default().pid = Some((pid, ticks, boot))
        }
        Entry::Result(o) => {
            let k = runs.entry(o.run).or_default();
            k.result = Some(o);
        }
        Entry::Acked(run) => {
            let k = runs.entry(run).or_default();
            k.acked = true;
            k.result = None;
            k.pid = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn outcome(run: i64) -> Outcome {
        Outcome {
            run,
            attempt: 1,
            state: "succeeded".into(),
            exit_code: Some(0),
            signal: None,
            reason: None,
            pid: Some(10),
            started_at_us: None,
            ended_at_us: 1,
            stdout_bytes: 0,
            stderr_bytes: 0,
        }
    }

    #[test]
    fn what_was_accepted_and_reported_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(Entry::Accept { run: 1, attempt: 1 }).unwrap();
        j.append(Entry::Accept { run: 2, attempt: 1 }).unwrap();
        j.append(Entry::Result(outcome(2))).unwrap();
        j.append(Entry::Accept { run: 3, attempt: 1 }).unwrap();
        j.append(Entry::Result(outcome(3))).unwrap();
        j.append(Entry::Acked(3)).unwrap();
        drop(j);
        // A torn last line is skipped.
        let mut f = OpenOptions::new().append(true).open(dir.path().join("journal")).unwrap();
        f.write_all(b"{\"accept\":{\"run\":4,").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.runs[&1].result.is_none() && !j.runs[&1].acked, "accepted, no result");
        assert_eq!(j.runs[&2].result, Some(outcome(2)), "to report again");
        assert!(j.runs[&3].acked, "done: never started again");
        assert!(!j.runs.contains_key(&4));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_waited_for_together_share_syncs_and_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Durable::new(Journal::open(dir.path()).unwrap()));
        let appends = (1..=200).map(|run| {
            let j = j.clone();
            tokio::spawn(async move { j.append(Entry::Accept { run, attempt: 1 }).await })
        });
        for a in futures_util::future::join_all(appends).await {
            a.unwrap().unwrap();
        }
        let syncs = j.syncs();
        assert!((1..200).contains(&syncs), "200 entries, {syncs} syncs");
        // Already on disk: no sync more.
        let n = j.lock().written;
        j.synced(n).await.unwrap();
        assert_eq!(j.syncs(), syncs);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.runs.len(), 200);
    }

    #[tokio::test]
    async fn a_wait_dropped_in_its_sync_leaves_the_next_one_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        let j = Durable::new(Journal::open(dir.path()).unwrap());
        let mut dropped = 0;
        for run in 1..=200 {
            let n = j.lock().append(Entry::Accept { run, attempt: 1 }).unwrap();
            // Polled once: it takes the turn, starts its sync and, unless that sync was
            // already over, is dropped in it.
            if tokio::time::timeout(Duration::ZERO, j.synced(n)).await.is_err() {
                dropped += 1;
            }
            tokio::time::timeout(Duration::from_secs(10), j.synced(n))
                .await
                .expect("the next wait syncs (the dropped one's turn was given back)")
                .unwrap();
        }
        assert!(dropped > 0, "no wait was dropped in its sync");
    }
}
