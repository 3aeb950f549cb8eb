//! The agent's journal: an append-only file of what it accepted and what it reported, synced
//! before the agent acts on each entry, so that across its own crashes an agent never starts a
//! run twice and never loses a result the server has not acknowledged.
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
        let mut j = Journal { path, file, runs, lines: 0 };
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

    /// Appends `entry` and syncs it to disk before returning.
    pub fn append(&mut self, entry: Entry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        apply(&mut self.runs, entry);
        self.lines += 1;
        if self.lines > COMPACT_AT && self.lines > 4 * self.runs.len() {
            self.compact()?;
        }
        Ok(())
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
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
}
