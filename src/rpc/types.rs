//! Wire types: the JSON shapes of every method's argument and result, shared by the server,
//! `taskctl` and the tests. Field names are snake_case and never renamed; members may be added.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::UnitSnapshot;
use crate::run::RunRecord;
use crate::store::Event;
use crate::unit::definition::{Action, format_duration};
use crate::unit::schedule::Schedule;

/// Renders a time as RFC 3339 with the daemon's local offset, to the microsecond.
pub fn fmt_time(t: Timestamp) -> String {
    t.to_zoned(TimeZone::system()).strftime("%Y-%m-%dT%H:%M:%S%.6f%:z").to_string()
}

/// One run, as every method returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunInfo {
    /// Run id: monotonic, never reused.
    pub id: i64,
    /// The unit's name.
    pub unit: String,
    /// `queued`, `running`, `succeeded`, `failed`, `timed_out`, `cancelled`, `lost`.
    pub state: String,
    /// `add`, `manual`, `schedule`, `retry`, `restart`, `catch-up`.
    pub trigger: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Where it ran.
    pub host: String,
    /// Process id (= process group id).
    pub pid: Option<u32>,
    /// When it was created.
    pub queued_at: String,
    /// For a run its schedule started, the fire time it was for; `started_at` minus this is
    /// how late it fired.
    #[serde(default)]
    pub scheduled_at: Option<String>,
    /// When the process started.
    pub started_at: Option<String>,
    /// When it ended.
    pub ended_at: Option<String>,
    /// Milliseconds between start and end (or now, while running).
    pub duration_ms: Option<i64>,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Why it was stopped, lost, or failed to start.
    pub reason: Option<String>,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
    /// Whether output beyond `log_limit` was cut.
    pub truncated: bool,
}

impl From<&RunRecord> for RunInfo {
    fn from(r: &RunRecord) -> Self {
        RunInfo {
            id: r.id,
            unit: r.unit.clone(),
            state: r.state.as_str().into(),
            trigger: r.trigger.as_str().into(),
            attempt: r.attempt,
            host: r.host.clone(),
            pid: r.pid,
            queued_at: fmt_time(r.queued_at),
            scheduled_at: r.scheduled_at.map(fmt_time),
            started_at: r.started_at.map(fmt_time),
            ended_at: r.ended_at.map(fmt_time),
            duration_ms: r.duration(Timestamp::now()).map(|d| d.as_millis() as i64),
            exit_code: r.exit_code,
            signal: r.signal,
            reason: r.reason.clone(),
            stdout_bytes: r.stdout_bytes,
            stderr_bytes: r.stderr_bytes,
            truncated: r.truncated,
        }
    }
}

/// One unit in full (`TaskUnit.Get`, `Add`, `Edit`, `Pause`, `Resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UnitInfo {
    /// The unit's name.
    pub name: String,
    /// `waiting`, `running`, `backoff`, `paused`, `done`, `fatal`.
    pub state: String,
    /// The definition as given, with defaults filled in.
    pub definition: Value,
    /// When it fires next.
    pub next_fire: Option<String>,
    /// The newest run.
    pub last_run: Option<RunInfo>,
    /// Ids of the active runs.
    pub active_runs: Vec<i64>,
    /// Runs started, ever.
    pub runs_total: u64,
    /// Runs that did not succeed, ever.
    pub failures_total: u64,
    /// When it was added.
    pub created_at: String,
    /// When it was last edited.
    pub updated_at: String,
}

/// What kind of unit, and when it runs, in a few words (`every 5m`, `cron 0 3 * * *`,
/// `service`, `once`, `tick 1s`).
pub fn describe_schedule(s: &UnitSnapshot) -> (String, String) {
    let c = &s.config;
    if let Action::Tick(d) = c.action {
        return ("tick".into(), format!("every {}", format_duration(d)));
    }
    if c.service {
        return ("service".into(), "continuous".into());
    }
    match &c.schedule {
        Some(Schedule::Every { period }) => {
            ("job".into(), format!("every {}", format_duration(*period)))
        }
        Some(Schedule::Cron { expr, .. }) => ("job".into(), format!("cron {expr}")),
        None => ("job".into(), "once".into()),
    }
}

impl From<&UnitSnapshot> for UnitInfo {
    fn from(s: &UnitSnapshot) -> Self {
        let mut definition = s.config.filled();
        // `paused` shows whether the unit is paused now, not only how it was created.
        definition["paused"] = s.status.paused.into();
        UnitInfo {
            name: s.config.name.clone(),
            state: s.status.state.as_str().into(),
            definition,
            next_fire: s.status.next_fire.map(fmt_time),
            last_run: s.status.last_run.as_ref().map(RunInfo::from),
            active_runs: s.status.active.clone(),
            runs_total: s.status.runs_total,
            failures_total: s.status.failures_total,
            created_at: fmt_time(s.status.created_at),
            updated_at: fmt_time(s.status.updated_at),
        }
    }
}

/// One unit in a `TaskUnit.List`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UnitSummary {
    /// The unit's name.
    pub name: String,
    /// Its state.
    pub state: String,
    /// `job`, `service` or `tick`.
    pub kind: String,
    /// `once`, `every 5m`, `cron …`, `continuous`.
    pub schedule: String,
    /// When it fires next.
    pub next_fire: Option<String>,
    /// The newest run.
    pub last_run: Option<RunInfo>,
    /// Runs started, ever.
    pub runs_total: u64,
    /// Runs that did not succeed, ever.
    pub failures_total: u64,
    /// The unit's description.
    pub description: String,
}

impl From<&UnitSnapshot> for UnitSummary {
    fn from(s: &UnitSnapshot) -> Self {
        let (kind, schedule) = describe_schedule(s);
        UnitSummary {
            name: s.config.name.clone(),
            state: s.status.state.as_str().into(),
            kind,
            schedule,
            next_fire: s.status.next_fire.map(fmt_time),
            last_run: s.status.last_run.as_ref().map(RunInfo::from),
            runs_total: s.status.runs_total,
            failures_total: s.status.failures_total,
            description: s.config.description.clone(),
        }
    }
}

/// `TaskUnit.Add`'s argument: a definition, or a bare name (tick unit or unit file).
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum AddArg {
    /// A bare name.
    Name(String),
    /// A unit definition object.
    Definition(#[schemars(with = "crate::unit::UnitDef")] Value),
}

/// Anything but a string or an object is a parameter of the wrong type (-32602), not a bad
/// definition: say which.
impl<'de> Deserialize<'de> for AddArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(name) => Ok(AddArg::Name(name)),
            v @ Value::Object(_) => Ok(AddArg::Definition(v)),
            other => Err(serde::de::Error::custom(format!(
                "expected a unit definition (an object) or a unit name (a string), got {}",
                crate::unit::definition::kind_of(&other)
            ))),
        }
    }
}

/// `TaskUnit.Add`'s result: `true` for the bare-name form, else the unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AddResult {
    /// The bare-name form's answer.
    Done(bool),
    /// The unit as added.
    Unit(Box<UnitInfo>),
}

/// `TaskUnit.Delete`'s argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum DeleteArg {
    /// A bare name.
    Name(String),
    /// With options.
    Options {
        /// The unit.
        name: String,
        /// Keep its runs and logs.
        #[serde(default)]
        keep_history: bool,
    },
}

/// `TaskUnit.List`'s argument. Units come sorted by name, a page at a time: a page of
/// `limit` units means there may be more, asked for with `after` set to the page's last name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArg {
    /// Only units in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Only names matching this glob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_glob: Option<String>,
    /// At most this many units (default 1000, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only units named after this (the last name of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// `Run.List`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunListArg {
    /// Only runs of this unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Only runs in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// At most this many (default 50, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only runs with an id below this (for paging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
}

/// `Audit.List`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditListArg {
    /// At most this many (default 50, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only records with an id below this (for paging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
}

/// One audit record: a state-changing call by an authenticated client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditInfo {
    /// Its number (newer records have larger ones).
    pub id: i64,
    /// When the call was answered (RFC 3339).
    pub time: String,
    /// Transport and address of the client: `tcp:127.0.0.1:41234`.
    pub peer: String,
    /// The method called.
    pub method: String,
    /// The unit it was about, when it named a valid one.
    pub unit: Option<String>,
    /// `ok`, or the error the client got.
    pub outcome: String,
}

impl From<&crate::store::AuditRecord> for AuditInfo {
    fn from(a: &crate::store::AuditRecord) -> Self {
        Self {
            id: a.id,
            time: fmt_time(a.time),
            peer: a.peer.clone(),
            method: a.method.clone(),
            unit: a.unit.clone(),
            outcome: a.outcome.clone(),
        }
    }
}

/// `Run.Logs`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsArg {
    /// The run.
    pub id: i64,
    /// `stdout`, `stderr`, or both when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Where to start (a `next_offset` from an earlier call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// At most about this many bytes (default 64 KiB, at most 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only the last N lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
    /// Prefix lines with their time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timestamps: bool,
}

/// `Run.Logs`'s result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogsResult {
    /// The output.
    pub data: String,
    /// Where to continue.
    pub next_offset: u64,
    /// Whether the end of what is stored was reached.
    pub eof: bool,
    /// Whether output was cut (`log_limit`).
    pub truncated: bool,
    /// Whether the run is still active (more may come).
    pub active: bool,
}

/// `Run.Follow`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowArg {
    /// The run.
    pub id: i64,
    /// Where to start in the stored log (default 0: from the beginning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// `stdout`, `stderr`, or both when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Prefix lines with their time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timestamps: bool,
    /// Start with the last N lines (instead of from `offset`), then follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
}

/// One message of a `Run.Follow` subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FollowItem {
    /// Output.
    Output {
        /// `stdout` or `stderr`; absent when the piece mixes both.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<String>,
        /// The text.
        data: String,
    },
    /// The last message: the run as it ended.
    End {
        /// The run.
        run: Box<RunInfo>,
    },
    /// The last message of a follower that fell too far behind (its client did not read).
    Lagged {
        /// What happened and what to do.
        message: String,
    },
}

/// `Events.Subscribe`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeArg {
    /// Replay stored events after this sequence number first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<i64>,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventInfo {
    /// Sequence number.
    pub seq: i64,
    /// When.
    pub time: String,
    /// `unit.added`, `unit.edited`, `unit.deleted`, `unit.paused`, `unit.resumed`,
    /// `unit.stopped`, `unit.started`, `unit.fatal`, `run.queued`, `run.started`,
    /// `run.finished`.
    pub kind: String,
    /// The unit.
    pub unit: String,
    /// The run id, for run events.
    pub run: Option<i64>,
    /// The run's state after the change, for run events.
    pub state: Option<String>,
}

impl From<&Event> for EventInfo {
    fn from(e: &Event) -> Self {
        EventInfo {
            seq: e.seq,
            time: fmt_time(e.time),
            kind: e.kind.clone(),
            unit: e.unit.clone(),
            run: e.run,
            state: e.state.clone(),
        }
    }
}

/// `Daemon.Status`'s result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatusInfo {
    /// taskd's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// When it started.
    pub started_at: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Units per state (and `total`).
    pub units: BTreeMap<String, usize>,
    /// Runs per state (and `total`), as stored.
    pub runs: BTreeMap<String, u64>,
    /// Addresses the daemon listens on.
    pub listeners: Vec<String>,
    /// The state directory.
    pub state_dir: String,
    /// `token` or `none`.
    pub auth: String,
    /// Connections open now, and the limit.
    #[serde(default)]
    pub connections: ConnectionCounts,
    /// Failed logins and unauthorized requests since the daemon started.
    #[serde(default)]
    pub auth_failures: u64,
    /// Store transactions committed since the daemon started (each one `fsync`): changes
    /// made together share one.
    #[serde(default)]
    pub store_commits: u64,
}

/// `Daemon.Status`'s connection counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConnectionCounts {
    /// Logged in (or needing no login).
    pub authenticated: usize,
    /// Not logged in yet.
    pub unauthenticated: usize,
    /// Admitted into the share kept for logged-in clients, and not logged in yet.
    pub probation: usize,
    /// The limit.
    pub max: usize,
}
