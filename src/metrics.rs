//! Prometheus metrics (`GET /metrics`, SPEC §12), kept with the official `prometheus-client`
//! crate and written in the Prometheus text format (version 0.0.4).
//!
//! Two kinds of figures:
//! - **counted as things happen**: runs started and finished (by state), run durations, fire
//!   lateness (the unit loops, see [`Metrics::run_started`], [`Metrics::fire_started`] and
//!   [`Metrics::run_finished`]), RPC calls by method and outcome (the JSON-RPC middleware),
//!   store commit latency (the store);
//! - **read at scrape time**: units by state and agents by state, from the registry and the
//!   fleet, through the [`Gauges`] a scrape is given.
//!
//! Invariants:
//! - every label value comes from a closed set (states, trigger names, the daemon's own method
//!   names, `other` for any method it does not serve): no client can grow the metrics' memory
//!   by calling made-up methods;
//! - a scrape never waits for the store or a unit loop.
//!
//! Counters count from this process's start, as Prometheus expects (`rate()` copes with resets).
//! In a cluster each server counts what its own engine and API did.

use std::sync::{Arc, Mutex, PoisonError};

use jiff::Timestamp;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::run::{RunRecord, RunState};

/// The content type of a scrape's answer.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Fire lateness buckets, in seconds: 1 ms to 10 s (a fire is late by milliseconds when all is
/// well, by seconds when the daemon is saturated).
const LATENESS_BUCKETS: [f64; 14] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// Run duration buckets, in seconds: 10 ms to 12 hours.
const DURATION_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
    21600.0, 43200.0,
];

/// Store commit buckets, in seconds: 100 µs to 5 s.
const COMMIT_BUCKETS: [f64; 13] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A label set of one label.
type One = [(&'static str, &'static str); 1];
/// A label set of two labels.
type Two = [(&'static str, &'static str); 2];

/// What an RPC call came to, for `taskd_rpc_calls_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// Answered with a result.
    Ok,
    /// Answered with an error.
    Error,
    /// Refused before it ran: not authenticated, or not allowed to this caller.
    Unauthorized,
}

impl CallOutcome {
    fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Error => "error",
            CallOutcome::Unauthorized => "unauthorized",
        }
    }
}

/// Figures read at scrape time: `(label value, count)` pairs.
pub struct Gauges {
    /// Units by state (every state, zeros included).
    pub units: Vec<(&'static str, usize)>,
    /// Agents by state (every state, zeros included).
    pub agents: Vec<(&'static str, usize)>,
}

/// The daemon's metrics: a cheap-to-clone handle.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    /// Encoding reads the gauges set just before: one scrape at a time.
    registry: Mutex<Registry>,
    units: Family<One, Gauge>,
    agents: Family<One, Gauge>,
    runs_started: Family<One, Counter>,
    runs_finished: Family<One, Counter>,
    run_duration: Histogram,
    fire_lateness: Histogram,
    rpc_calls: Family<Two, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// New metrics, all zero; `commits` is the store's commit latency histogram.
    pub fn new(commits: Histogram) -> Metrics {
        let mut registry = Registry::with_prefix("taskd");
        let inner = Inner {
            registry: Mutex::new(Registry::default()),
            units: Family::default(),
            agents: Family::default(),
            runs_started: Family::default(),
            runs_finished: Family::default(),
            run_duration: Histogram::new(DURATION_BUCKETS),
            fire_lateness: Histogram::new(LATENESS_BUCKETS),
            rpc_calls: Family::default(),
        };
        registry.register("units", "Units by state", inner.units.clone());
        registry.register("agents", "Agents by state", inner.agents.clone());
        registry.register("runs_started", "Runs started, by trigger", inner.runs_started.clone());
        registry.register(
            "runs_finished",
            "Runs ended, by final state",
            inner.runs_finished.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "Time from a run's start to its end",
            inner.run_duration.clone(),
        );
        registry.register(
            "fire_lateness_seconds",
            "Time from a scheduled fire time to the run's start",
            inner.fire_lateness.clone(),
        );
        registry.register(
            "rpc_calls",
            "JSON-RPC calls, by method and outcome",
            inner.rpc_calls.clone(),
        );
        registry.register("store_commit_seconds", "Time a store commit takes", commits);
        *inner.registry.lock().unwrap_or_else(PoisonError::into_inner) = registry;
        Metrics(Arc::new(inner))
    }

    /// A histogram for store commit latency, with the buckets [`Metrics::new`] expects.
    pub fn commit_histogram() -> Histogram {
        Histogram::new(COMMIT_BUCKETS)
    }

    /// A run started (it is `running` now): counted by trigger, and a scheduled one's lateness
    /// if it runs here (a run on an agent starts later, there: [`Metrics::fire_started`]).
    pub fn run_started(&self, rec: &RunRecord) {
        self.0.runs_started.get_or_create(&[("trigger", rec.trigger.as_str())]).inc();
        if rec.is_local()
            && let Some(at) = rec.scheduled_at
        {
            self.fire_started(at, rec.started_at.unwrap_or_else(Timestamp::now));
        }
    }

    /// The process of a fire for `scheduled` started `at`: its lateness.
    pub fn fire_started(&self, scheduled: Timestamp, at: Timestamp) {
        self.0.fire_lateness.observe(seconds_between(scheduled, at));
    }

    /// A run's end is recorded: counted by state, and how long it ran if it started.
    pub fn run_finished(&self, rec: &RunRecord) {
        if !rec.state.is_final() {
            return;
        }
        self.0.runs_finished.get_or_create(&[("state", rec.state.as_str())]).inc();
        if let (Some(start), Some(end)) = (rec.started_at, rec.ended_at) {
            self.0.run_duration.observe(seconds_between(start, end));
        }
    }

    /// An RPC call of `method` (one of the daemon's own names, or `other`) answered so.
    pub fn rpc_call(&self, method: &'static str, outcome: CallOutcome) {
        self.0.rpc_calls.get_or_create(&[("method", method), ("outcome", outcome.as_str())]).inc();
    }

    /// The text a scrape answers, with `gauges` as of now.
    pub fn encode(&self, gauges: &Gauges) -> String {
        let registry = self.0.registry.lock().unwrap_or_else(PoisonError::into_inner);
        for (state, n) in &gauges.units {
            self.0.units.get_or_create(&[("state", state)]).set(*n as i64);
        }
        for (state, n) in &gauges.agents {
            self.0.agents.get_or_create(&[("state", state)]).set(*n as i64);
        }
        // Every final state is listed from the first scrape, so that `rate()` sees it start.
        for state in RunState::ALL.into_iter().filter(|s| s.is_final()) {
            drop(self.0.runs_finished.get_or_create(&[("state", state.as_str())]));
        }
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// Seconds from `a` to `b` (zero if `b` is earlier).
fn seconds_between(a: Timestamp, b: Timestamp) -> f64 {
    let us = b.as_microsecond().saturating_sub(a.as_microsecond()).max(0);
    us as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Trigger;

    #[test]
    fn runs_and_calls_are_counted_and_every_final_state_listed() {
        let m = Metrics::new(Metrics::commit_histogram());
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let mut rec = RunRecord::fresh(1, "u".into(), RunState::Running, Trigger::Schedule, 1, t0);
        rec.scheduled_at = Some(t0);
        rec.started_at = Some(t0 + jiff::SignedDuration::from_millis(3));
        m.run_started(&rec);
        rec.state = RunState::Failed;
        rec.ended_at = Some(t0 + jiff::SignedDuration::from_secs(2));
        m.run_finished(&rec);
        m.rpc_call("TaskUnit.Add", CallOutcome::Ok);
        let text = m.encode(&Gauges { units: vec![("idle", 3)], agents: vec![("connected", 1)] });
        for line in [
            "taskd_units{state=\"idle\"} 3",
            "taskd_agents{state=\"connected\"} 1",
            "taskd_runs_started_total{trigger=\"schedule\"} 1",
            "taskd_runs_finished_total{state=\"failed\"} 1",
            "taskd_runs_finished_total{state=\"succeeded\"} 0",
            "taskd_run_duration_seconds_sum 1.997",
            "taskd_fire_lateness_seconds_bucket{le=\"0.005\"} 1",
            "taskd_fire_lateness_seconds_bucket{le=\"0.002\"} 0",
            "taskd_rpc_calls_total{method=\"TaskUnit.Add\",outcome=\"ok\"} 1",
            "taskd_store_commit_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }
}
