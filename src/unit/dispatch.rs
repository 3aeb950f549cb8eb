//! A dispatch's progress, as its unit loop keeps it: which hosts wait for their turn
//! (`batch`), which run now, how each host's newest run ended, and how many failed against
//! `tolerance`. Pure bookkeeping: the loop does the recording and the launching, and asks
//! this what comes next.

use std::collections::{BTreeMap, HashSet, VecDeque};

use crate::run::{RunRecord, RunState};
use crate::store::{DispatchRecord, DispatchState};

/// One dispatch in flight.
#[derive(Debug)]
pub struct Progress {
    /// As recorded.
    pub record: DispatchRecord,
    /// Hosts' runs waiting for their turn (`queued`), in order.
    waiting: VecDeque<RunRecord>,
    /// Runs active now.
    running: HashSet<i64>,
    /// Each host's newest run and how it stands.
    latest: BTreeMap<String, (i64, RunState)>,
    /// Runs that no longer count (`Run.Ignore`).
    ignored: HashSet<i64>,
    /// Failures forgiven by a resume: only those beyond count against `tolerance`.
    forgiven: u32,
    /// Hosts' failed runs to run again (`retries`) once their back-off is over.
    retrying: Vec<(tokio::time::Instant, RunRecord)>,
}

impl Progress {
    /// The progress of `record` whose runs are `runs` (oldest first): those `running` are
    /// active (the caller launches them), those `queued` wait.
    pub fn new(record: DispatchRecord, runs: &[RunRecord], ignored: &[i64]) -> Self {
        let forgiven = record.forgiven;
        let mut p = Progress {
            record,
            waiting: VecDeque::new(),
            running: HashSet::new(),
            latest: BTreeMap::new(),
            ignored: ignored.iter().copied().collect(),
            forgiven,
            retrying: Vec::new(),
        };
        for r in runs {
            match r.state {
                RunState::Queued => p.waiting.push_back(r.clone()),
                RunState::Running => {
                    p.running.insert(r.id);
                }
                _ => {}
            }
            p.latest.insert(r.host.clone(), (r.id, r.state));
        }
        p
    }

    /// Its id.
    pub fn id(&self) -> i64 {
        self.record.id
    }

    /// Whether `rec` is its host's newest run, ended, with nothing of that host waiting.
    pub fn is_newest_and_idle(&self, rec: &RunRecord) -> bool {
        let newest =
            self.latest.get(&rec.host).is_some_and(|(id, s)| *id == rec.id && s.is_final());
        newest
            && !self.waiting.iter().any(|w| w.host == rec.host)
            && !self.retrying.iter().any(|(_, r)| r.host == rec.host)
    }

    /// Run `rec` of this dispatch is active.
    pub fn launched(&mut self, rec: &RunRecord) {
        // A failure forgiven by a resume that is run again is no longer one to forgive.
        if let Some((id, s)) = self.latest.get(&rec.host)
            && *id != rec.id
            && !self.ignored.contains(id)
            && matches!(s, RunState::Failed | RunState::TimedOut | RunState::Lost)
        {
            self.forgiven = self.forgiven.saturating_sub(1);
        }
        self.running.insert(rec.id);
        self.latest.insert(rec.host.clone(), (rec.id, RunState::Running));
    }

    /// Run `rec` of this dispatch ended.
    pub fn ended(&mut self, rec: &RunRecord) {
        self.running.remove(&rec.id);
        if self.latest.get(&rec.host).is_none_or(|(id, _)| *id <= rec.id) {
            self.latest.insert(rec.host.clone(), (rec.id, rec.state));
        }
    }

    /// Run `run` no longer counts against the dispatch.
    pub fn ignore(&mut self, run: i64) {
        self.ignored.insert(run);
    }

    /// Hosts whose newest run failed, timed out or was lost, ignored ones aside.
    pub fn failures(&self) -> u32 {
        self.latest
            .values()
            .filter(|(id, s)| {
                !self.ignored.contains(id)
                    && matches!(s, RunState::Failed | RunState::TimedOut | RunState::Lost)
            })
            .count() as u32
    }

    /// Whether more hosts failed than `tolerance` allows.
    pub fn over_tolerance(&self) -> bool {
        self.record.tolerance.is_some_and(|t| self.failures().saturating_sub(self.forgiven) > t)
    }

    /// Resumed by hand: the failures so far are forgiven. Returns how many are.
    pub fn resume(&mut self) -> u32 {
        self.forgiven = self.failures();
        self.record.forgiven = self.forgiven;
        self.record.state = DispatchState::Running;
        self.forgiven
    }

    /// Takes run `run` out of the waiting ones (to cancel it), if it waits.
    pub fn take_waiting_run(&mut self, run: i64) -> Option<RunRecord> {
        let i = self.waiting.iter().position(|r| r.id == run)?;
        self.waiting.remove(i)
    }

    /// The next waiting run to start now, if its turn has come: the dispatch runs, and
    /// fewer than `batch` hosts are active.
    pub fn next_turn(&mut self) -> Option<RunRecord> {
        let room = self.record.batch == 0 || self.running.len() < self.record.batch as usize;
        if self.record.state != DispatchState::Running || !room {
            return None;
        }
        self.waiting.pop_front()
    }

    /// Takes every waiting run (to cancel them); retries not started yet are dropped.
    pub fn take_waiting(&mut self) -> Vec<RunRecord> {
        self.retrying.clear();
        self.waiting.drain(..).collect()
    }

    /// Failed run `rec` runs again on its host at `at` (after the unit's back-off).
    pub fn retry_at(&mut self, at: tokio::time::Instant, rec: RunRecord) {
        self.retrying.push((at, rec));
    }

    /// When the next retry is due, while the dispatch runs.
    pub fn next_retry(&self) -> Option<tokio::time::Instant> {
        (self.record.state == DispatchState::Running)
            .then(|| self.retrying.iter().map(|(at, _)| *at).min())
            .flatten()
    }

    /// The failed runs whose retry is due at `now`.
    pub fn due_retries(&mut self, now: tokio::time::Instant) -> Vec<RunRecord> {
        if self.record.state != DispatchState::Running {
            return Vec::new();
        }
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.retrying).into_iter().partition(|(at, _)| *at <= now);
        self.retrying = later;
        due.into_iter().map(|(_, r)| r).collect()
    }

    /// Runs active now.
    pub fn active(&self) -> impl Iterator<Item = i64> + '_ {
        self.running.iter().copied()
    }

    /// Whether nothing is active and nothing waits (or it is cancelled, so nothing will run).
    pub fn is_done(&self) -> bool {
        self.running.is_empty()
            && (self.record.state == DispatchState::Cancelled
                || (self.waiting.is_empty() && self.retrying.is_empty()))
    }

    /// How it ended, once done: cancelled, or succeeded when every host's newest run
    /// succeeded or is ignored, else failed.
    pub fn outcome(&self) -> DispatchState {
        if self.record.state == DispatchState::Cancelled {
            return DispatchState::Cancelled;
        }
        let all_ok = self
            .latest
            .values()
            .all(|(id, s)| *s == RunState::Succeeded || self.ignored.contains(id));
        if all_ok { DispatchState::Succeeded } else { DispatchState::Failed }
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::*;
    use crate::run::Trigger;

    fn run(id: i64, host: &str, state: RunState) -> RunRecord {
        RunRecord {
            host: host.into(),
            dispatch: Some(1),
            ..RunRecord::fresh(id, "u".into(), state, Trigger::Manual, 1, Timestamp::now())
        }
    }

    fn dispatch(batch: u32, tolerance: Option<u32>) -> DispatchRecord {
        DispatchRecord {
            id: 1,
            unit: "u".into(),
            trigger: Trigger::Manual,
            state: DispatchState::Running,
            created_at: Timestamp::now(),
            ended_at: None,
            total: 3,
            batch,
            tolerance,
            forgiven: 0,
        }
    }

    #[test]
    fn a_batch_runs_hosts_in_turn_and_tolerance_counts_failures() {
        let runs = [
            run(1, "a", RunState::Running),
            run(2, "b", RunState::Queued),
            run(3, "c", RunState::Queued),
        ];
        let mut p = Progress::new(dispatch(1, Some(0)), &runs, &[]);
        assert!(p.next_turn().is_none(), "one host at a time");
        let mut a = runs[0].clone();
        a.state = RunState::Failed;
        p.ended(&a);
        assert_eq!(p.failures(), 1);
        assert!(p.over_tolerance());
        let b = p.next_turn().expect("b's turn");
        assert_eq!(b.host, "b");
        p.launched(&b);
        assert!(!p.is_done());
        p.ignore(1);
        assert!(!p.over_tolerance());
        let mut b = b;
        b.state = RunState::Succeeded;
        p.ended(&b);
        let c = p.next_turn().unwrap();
        p.launched(&c);
        let mut c = c;
        c.state = RunState::Succeeded;
        p.ended(&c);
        assert!(p.is_done());
        assert_eq!(p.outcome(), DispatchState::Succeeded, "the failure is ignored");
    }
}
