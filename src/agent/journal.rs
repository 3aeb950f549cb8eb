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
//! The file is compacted again when it has grown past [`COMPACT_AT`] lines, by the sync turn,
//! off the async threads and without holding the journal: what it holds is copied, written
//! aside and synced; the lines appended meanwhile are added, and the copy is renamed into
//! place, under the lock (a few lines and a rename); the turn then syncs the new file and
//! the directory before it tells anyone their entry is on disk. Until the rename is on disk
//! a crash leaves the old file, which got every line too.
//!
//! Limits: a torn last line (a crash mid-append) is skipped; the entries before it stand.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Every run it knows, by id: the newest [`ACKED_KEPT`] acknowledged ones and those not
    /// acknowledged yet.
    pub runs: BTreeMap<i64, Known>,
    /// The acknowledged runs it knows (beyond [`ACKED_KEPT`], the oldest is forgotten).
    acked: BTreeSet<i64>,
    /// The runs with a result not acknowledged yet: [`Journal::unacked`] is asked at every
    /// send, hundreds of times a second on a busy agent, and a walk over every run known
    /// (ten thousand and more) each time, under the journal's lock, held up every append.
    unacked: BTreeSet<i64>,
    /// Lines in the file (about): past [`COMPACT_AT`] and four times what it knows, it is
    /// compacted.
    lines: usize,
    /// Entries written since it was opened.
    written: u64,
    /// While a compaction is under way: the lines appended since its copy was taken.
    since_copy: Option<Vec<u8>>,
    /// A compacted file was renamed into place, and the directory not synced since.
    dir_unsynced: bool,
    /// Lines it may grow to before it is compacted ([`COMPACT_AT`]).
    compact_at: usize,
    /// Acknowledged runs a compaction keeps ([`ACKED_KEPT`]).
    acked_kept: usize,
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
        let mut acked: BTreeSet<i64> =
            runs.iter().filter(|(_, k)| k.acked).map(|(id, _)| *id).collect();
        let mut unacked: BTreeSet<i64> =
            runs.iter().filter(|(_, k)| k.result.is_some()).map(|(id, _)| *id).collect();
        forget_old_acked(&mut runs, &mut acked, &mut unacked, ACKED_KEPT);
        // Compactions a crash or a dropped sync left half-written.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".journal.tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let tmp = write_compact(&aside(&path, 0), &runs)?;
        std::fs::rename(aside(&path, 0), &path)?;
        sync_dir(&path)?;
        let lines = runs.len();
        Ok(Journal {
            path,
            file: tmp,
            runs,
            acked,
            unacked,
            lines,
            written: 0,
            since_copy: None,
            dir_unsynced: false,
            compact_at: COMPACT_AT,
            acked_kept: ACKED_KEPT,
        })
    }

    /// Appends `entry`, not synced yet (see [`Durable::synced`]); its number.
    pub fn append(&mut self, entry: Entry) -> std::io::Result<u64> {
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        if let Some(since) = &mut self.since_copy {
            since.extend_from_slice(&line);
        }
        let acked = match entry {
            Entry::Result(ref o) => {
                self.unacked.insert(o.run);
                None
            }
            Entry::Acked(run) => {
                self.unacked.remove(&run);
                Some(run)
            }
            _ => None,
        };
        apply(&mut self.runs, entry);
        if let Some(run) = acked {
            self.acked.insert(run);
            forget_old_acked(&mut self.runs, &mut self.acked, &mut self.unacked, self.acked_kept);
        }
        self.written += 1;
        self.lines += 1;
        Ok(self.written)
    }

    /// Whether the file grew enough to be compacted (and no compaction is under way).
    fn compaction_due(&self) -> bool {
        self.since_copy.is_none()
            && self.lines > self.compact_at
            && self.lines > 4 * self.runs.len()
    }

    /// Starts a compaction: copies what it knows, to be written aside; the lines appended
    /// from now on are kept for [`Journal::install`].
    fn copy_for_compaction(&mut self) -> BTreeMap<i64, Known> {
        self.since_copy = Some(Vec::new());
        self.runs.clone()
    }

    /// Ends a compaction: `tmp` (at `tmp_path`), the copy written aside and synced (`copied`
    /// runs), gets the lines appended since, and replaces the file. Those lines and the
    /// rename are not synced yet: the next sync syncs the file and its directory before
    /// telling anyone.
    fn install(&mut self, mut tmp: File, tmp_path: &Path, copied: usize) -> std::io::Result<()> {
        let since = self.since_copy.take().unwrap_or_default();
        tmp.write_all(&since)?;
        std::fs::rename(tmp_path, &self.path)?;
        // The handle follows the file it opened; nothing fails after the rename.
        self.file = tmp;
        self.dir_unsynced = true;
        self.lines = copied + since.iter().filter(|b| **b == b'\n').count();
        Ok(())
    }

    /// Results not acknowledged yet, by run.
    pub fn unacked(&self) -> Vec<Outcome> {
        self.unacked.iter().filter_map(|run| self.runs.get(run)?.result.clone()).collect()
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
    /// Compactions made since it was opened.
    compactions: AtomicU64,
    /// Compactions tried (each writes a file of its own).
    attempts: AtomicU64,
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
            compactions: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
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

    /// Syncs the file as it is now, off the async threads, compacting it first if it is due
    /// (see the module documentation); the last entry it then held.
    async fn sync(&self) -> std::io::Result<u64> {
        self.compact_if_due().await;
        let (file, upto, path, dir) = {
            let j = self.lock();
            (j.file.try_clone()?, j.written, j.path.clone(), j.dir_unsynced)
        };
        tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            if dir { sync_dir(&path) } else { Ok(()) }
        })
        .await
        .map_err(std::io::Error::other)??;
        if dir {
            // Only one sync at a time, and compactions are made by syncs: none came between.
            self.lock().dir_unsynced = false;
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(upto)
    }

    /// Compacts the file if it is due: whether it did. A compaction that fails leaves the
    /// file as it was (it got every line), to be tried again at a later sync.
    async fn compact_if_due(&self) {
        // Each attempt writes a file of its own: one whose sync was dropped may still be
        // writing its own.
        let (runs, tmp_path) = {
            let mut j = self.lock();
            if !j.compaction_due() {
                return;
            }
            let attempt = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
            (j.copy_for_compaction(), aside(&j.path, attempt))
        };
        // Dropped before the end (its sync's wait was dropped), it gives the compaction up.
        let mut abandon = Abandon { durable: self, armed: true };
        let copied = runs.len();
        let path = tmp_path.clone();
        let written = tokio::task::spawn_blocking(move || write_compact(&path, &runs))
            .await
            .map_err(std::io::Error::other)
            .and_then(|w| w);
        abandon.armed = false;
        let mut j = self.lock();
        match written.and_then(|tmp| j.install(tmp, &tmp_path, copied)) {
            Ok(()) => {
                self.compactions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                j.since_copy = None;
                let _ = std::fs::remove_file(&tmp_path);
                tracing::warn!(path = %j.path.display(), error = %e, "agent: cannot compact the journal; trying again later");
            }
        }
    }
}

/// Gives a compaction up unless disarmed: the journal stops keeping the lines appended since
/// its copy, and the next sync may compact again.
struct Abandon<'a> {
    durable: &'a Durable,
    armed: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.durable.lock().since_copy = None;
        }
    }
}

/// Where compaction `attempt` writes the journal before it is renamed into place.
fn aside(path: &Path, attempt: u64) -> PathBuf {
    path.with_file_name(format!(".journal.tmp-{attempt}"))
}

/// Forgets all but the newest `kept` acknowledged runs (`acked`).
fn forget_old_acked(
    runs: &mut BTreeMap<i64, Known>,
    acked: &mut BTreeSet<i64>,
    unacked: &mut BTreeSet<i64>,
    kept: usize,
) {
    while acked.len() > kept {
        if let Some(id) = acked.pop_first() {
            runs.remove(&id);
            unacked.remove(&id);
        }
    }
}

/// Writes the compact form of `runs` (results still unacknowledged, the ids of acknowledged
/// runs) to `tmp`, synced; the file, open at its end.
fn write_compact(tmp: &Path, runs: &BTreeMap<i64, Known>) -> std::io::Result<File> {
    let mut out = Vec::new();
    for (id, k) in runs {
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
    let mut f = private(tmp, true)?;
    f.write_all(&out)?;
    f.sync_all()?;
    Ok(f)
}

/// Syncs the directory of `path`: a rename into it is then on disk.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path.parent().unwrap_or(Path::new("."))).and_then(|d| d.sync_all())
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

    use futures_util::FutureExt;

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
        assert_eq!(j.unacked(), [outcome(2)], "reported and not acknowledged");
        drop(j);
        // A torn last line is skipped.
        let mut f = OpenOptions::new().append(true).open(dir.path().join("journal")).unwrap();
        f.write_all(b"{\"accept\":{\"run\":4,").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.runs[&1].result.is_none() && !j.runs[&1].acked, "accepted, no result");
        assert_eq!(j.runs[&2].result, Some(outcome(2)), "to report again");
        assert!(j.runs[&3].acked, "done: never started again");
        assert!(!j.runs.contains_key(&4));
        assert_eq!(j.unacked(), [outcome(2)]);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compactions_made_by_syncs_among_appends_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        (journal.compact_at, journal.acked_kept) = (50, 20);
        let j = std::sync::Arc::new(Durable::new(journal));
        // Every run accepted and reported; all but every tenth acknowledged.
        let appends = (1..=600).map(|run| {
            let j = j.clone();
            tokio::spawn(async move {
                j.append(Entry::Accept { run, attempt: 1 }).await?;
                j.append(Entry::Result(outcome(run))).await?;
                if run % 10 != 0 {
                    j.lock().append(Entry::Acked(run))?;
                }
                std::io::Result::Ok(())
            })
        });
        for a in futures_util::future::join_all(appends).await {
            a.unwrap().unwrap();
        }
        let n = j.lock().written;
        j.synced(n).await.unwrap();
        assert!(j.compactions.load(Ordering::Relaxed) > 0, "the journal was never compacted");
        let known = j.lock().runs.len();
        assert_eq!(known, 60 + 20, "what it remembers is bounded: 60 unacknowledged, 20 acked");
        let lines = std::fs::read_to_string(dir.path().join("journal")).unwrap().lines().count();
        assert!(lines < 1500, "{lines} lines: 1,500 were appended");
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        for run in (10..=600).step_by(10) {
            assert_eq!(j.runs[&run].result, Some(outcome(run)), "run {run}'s result to report");
        }
        let acked = j.runs.values().filter(|k| k.acked).count();
        assert!(acked >= 20, "{acked} acknowledged runs remembered, 20 kept at least");
        assert_eq!(j.runs.len(), 60 + acked, "nothing else");
    }

    #[test]
    fn lines_appended_while_a_compaction_is_written_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(Entry::Accept { run: 1, attempt: 1 }).unwrap();
        let copy = j.copy_for_compaction();
        // Appended after the copy was taken, while it is written aside.
        j.append(Entry::Accept { run: 2, attempt: 1 }).unwrap();
        let tmp_path = aside(&j.path, 1);
        let tmp = write_compact(&tmp_path, &copy).unwrap();
        j.append(Entry::Result(outcome(2))).unwrap();
        j.install(tmp, &tmp_path, copy.len()).unwrap();
        j.append(Entry::Accept { run: 3, attempt: 1 }).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.runs.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(j.runs[&2].result, Some(outcome(2)));
    }

    #[tokio::test]
    async fn a_compaction_whose_sync_was_dropped_is_given_up_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        (journal.compact_at, journal.acked_kept) = (10, 5);
        let j = Durable::new(journal);
        for run in 1..=100 {
            j.lock().append(Entry::Accept { run, attempt: 1 }).unwrap();
            j.lock().append(Entry::Acked(run)).unwrap();
        }
        let n = j.lock().written;
        // Polled once: it takes the turn and starts the compaction (written aside on another
        // thread), and is dropped there. (Polled exactly once: a zero timeout may poll it
        // again before its timer fires, and a loaded machine then finishes the sync.)
        let dropped = j.synced(n).now_or_never();
        assert!(dropped.is_none(), "the sync was over at once");
        assert!(j.lock().since_copy.is_none(), "the compaction was given up");
        j.synced(n).await.unwrap();
        assert_eq!(j.compactions.load(Ordering::Relaxed), 1, "made by the next sync");
        let lines = std::fs::read_to_string(dir.path().join("journal")).unwrap().lines().count();
        assert_eq!(lines, 5, "the newest acknowledged runs");
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
            if j.synced(n).now_or_never().is_none() {
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
