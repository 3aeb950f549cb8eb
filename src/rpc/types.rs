//! Wire types: the JSON shapes of every method's argument and result, shared by the server,
//! `taskctl` and the tests. Field names are snake_case and never renamed; members may be added.

use std::borrow::Cow;
use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::fmt::StdFmtWrite;
use jiff::fmt::temporal::DateTimePrinter;
use jiff::tz::TimeZone;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::{ListFilter, Registry, UnitSnapshot};
use crate::run::RunRecord;
use crate::store::Event;
use crate::unit::definition::{Action, format_duration};
use crate::unit::schedule::Schedule;
use crate::unit::{UnitConfig, UnitStatus};

/// Renders a time as RFC 3339 with the daemon's local offset, to the microsecond
/// (`2026-12-02T14:35:37.123456+01:00`).
pub fn fmt_time(t: Timestamp) -> String {
    Time { at: t, tz: &TimeZone::system() }.to_string()
}

/// The clock a list renders its times with: one time zone lookup and one `now` for every
/// unit in it, not one per time.
pub struct Clock {
    tz: TimeZone,
    now: Timestamp,
}

impl Clock {
    /// The system's time zone, and now.
    pub fn now() -> Self {
        Clock { tz: TimeZone::system(), now: Timestamp::now() }
    }

    fn time(&self, at: Timestamp) -> Time<'_> {
        Time { at, tz: &self.tz }
    }
}

/// A time as [`fmt_time`] renders it, written straight into the reply when serialized (no
/// string of its own). A server's side of the time fields of [`RunInfoOf`] and
/// [`UnitSummaryOf`].
#[derive(Debug, Clone, Copy)]
pub struct Time<'a> {
    at: Timestamp,
    tz: &'a TimeZone,
}

impl std::fmt::Display for Time<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // jiff's RFC 3339 printer, not a strftime pattern parsed per time.
        const PRINTER: DateTimePrinter = DateTimePrinter::new().precision(Some(6));
        PRINTER
            .print_timestamp_with_offset(&self.at, self.tz.to_offset(self.at), StdFmtWrite(f))
            .map_err(|_| std::fmt::Error)
    }
}

impl Serialize for Time<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One run, as every method returns it: [`RunInfo`]. `S` holds its strings and `T` its
/// times: `String`s for a client and for single results, borrowed strings and [`Time`]s for
/// a list written straight from the engine's records ([`RunInfoOf::view`]). One field list
/// for both, so they cannot drift apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "RunInfo")]
pub struct RunInfoOf<S, T> {
    /// Run id: monotonic, never reused.
    pub id: i64,
    /// The unit's name.
    pub unit: S,
    /// `queued`, `running`, `succeeded`, `failed`, `timed_out`, `cancelled`, `lost`.
    pub state: S,
    /// `add`, `manual`, `schedule`, `retry`, `restart`, `catch-up`.
    pub trigger: S,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Where it ran: `local`, or an agent's name.
    pub host: S,
    /// The dispatch it belongs to (a unit whose `hosts` name agents), else `null`.
    pub dispatch: Option<i64>,
    /// For an active run on an agent: `connected`, or `unreachable` while its agent is away.
    pub host_state: Option<S>,
    /// What its agent reported after the run was ended here (`lost`): state, exit code…
    pub late_result: Option<Value>,
    /// How its webhooks went (`notify`): `[{url, attempts, status, error}]`, once tried.
    pub notified: Option<Value>,
    /// Process id (= process group id).
    pub pid: Option<u32>,
    /// When it was created.
    pub queued_at: T,
    /// For a run its schedule started, the fire time it was for; `started_at` minus this is
    /// how late it fired.
    pub scheduled_at: Option<T>,
    /// When the process started.
    pub started_at: Option<T>,
    /// When it ended.
    pub ended_at: Option<T>,
    /// Milliseconds between start and end (or now, while running).
    pub duration_ms: Option<i64>,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Why it was stopped, lost, or failed to start.
    pub reason: Option<S>,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
    /// Whether output beyond `log_limit` was cut.
    pub truncated: bool,
}

/// One run, as a client reads it.
pub type RunInfo = RunInfoOf<String, String>;

/// A run as a list writes it, borrowed from the engine's record.
pub type RunView<'a> = RunInfoOf<Cow<'a, str>, Time<'a>>;

impl<'a> RunView<'a> {
    /// `r`, borrowed, with its times rendered by `clock` as it is serialized.
    pub fn view(r: &'a RunRecord, clock: &'a Clock) -> Self {
        RunInfoOf {
            id: r.id,
            unit: Cow::Borrowed(&r.unit),
            state: Cow::Borrowed(r.state.as_str()),
            trigger: Cow::Borrowed(r.trigger.as_str()),
            attempt: r.attempt,
            host: Cow::Borrowed(&r.host),
            dispatch: r.dispatch,
            host_state: None,
            late_result: r.late_result.as_deref().and_then(|j| serde_json::from_str(j).ok()),
            notified: r.notified.as_deref().and_then(|j| serde_json::from_str(j).ok()),
            pid: r.pid,
            queued_at: clock.time(r.queued_at),
            scheduled_at: r.scheduled_at.map(|t| clock.time(t)),
            started_at: r.started_at.map(|t| clock.time(t)),
            ended_at: r.ended_at.map(|t| clock.time(t)),
            duration_ms: r.duration(clock.now).map(|d| d.as_millis() as i64),
            exit_code: r.exit_code,
            signal: r.signal,
            reason: r.reason.as_deref().map(Cow::Borrowed),
            stdout_bytes: r.stdout_bytes,
            stderr_bytes: r.stderr_bytes,
            truncated: r.truncated,
        }
    }
}

impl From<&RunRecord> for RunInfo {
    fn from(r: &RunRecord) -> Self {
        let clock = Clock::now();
        let v = RunInfoOf::view(r, &clock);
        let time = |t: Time<'_>| t.to_string();
        RunInfoOf {
            id: v.id,
            unit: v.unit.into_owned(),
            state: v.state.into_owned(),
            trigger: v.trigger.into_owned(),
            attempt: v.attempt,
            host: v.host.into_owned(),
            dispatch: v.dispatch,
            host_state: None,
            late_result: v.late_result,
            notified: v.notified,
            pid: v.pid,
            queued_at: time(v.queued_at),
            scheduled_at: v.scheduled_at.map(time),
            started_at: v.started_at.map(time),
            ended_at: v.ended_at.map(time),
            duration_ms: v.duration_ms,
            exit_code: v.exit_code,
            signal: v.signal,
            reason: v.reason.map(Cow::into_owned),
            stdout_bytes: v.stdout_bytes,
            stderr_bytes: v.stderr_bytes,
            truncated: v.truncated,
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
pub fn describe_schedule(c: &UnitConfig) -> (&'static str, Cow<'static, str>) {
    if let Action::Tick(d) = c.action {
        return ("tick", format!("every {}", format_duration(d)).into());
    }
    if c.service {
        return ("service", "continuous".into());
    }
    match &c.schedule {
        Some(Schedule::Every { period }) => {
            ("job", format!("every {}", format_duration(*period)).into())
        }
        Some(Schedule::Cron { expr, .. }) => ("job", format!("cron {expr}").into()),
        None => ("job", "once".into()),
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

/// A large result serialized by the method itself, once, into one buffer.
///
/// jsonrpsee serializes a method's result through a size-bounded writer whose every token is
/// a call of its own, then checks the whole reply is valid JSON: for a list of a thousand
/// units that is a third of the call. A result serialized ahead into `Encoded::Json` passes
/// that writer as one copy. Clients see the same JSON and decode it as `T`
/// (`Encoded::Value`); the server never does.
#[derive(Debug, Clone)]
pub enum Encoded<T> {
    /// Serialized by the server.
    Json(Box<serde_json::value::RawValue>),
    /// Decoded by a client.
    Value(T),
}

impl<T> Encoded<T> {
    /// `value`, serialized now: a value whose JSON is that of a `T` (a view of the engine's
    /// state written as `T` is, such as [`UnitView`] for [`UnitSummary`]).
    pub fn encode(value: &impl Serialize) -> serde_json::Result<Self> {
        serde_json::value::to_raw_value(value).map(Encoded::Json)
    }
}

impl<T: serde::de::DeserializeOwned> Encoded<T> {
    /// The value, decoding it if it is still JSON.
    pub fn into_value(self) -> serde_json::Result<T> {
        match self {
            Encoded::Json(json) => serde_json::from_str(json.get()),
            Encoded::Value(v) => Ok(v),
        }
    }
}

impl<T: Serialize> Serialize for Encoded<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Encoded::Json(json) => json.serialize(s),
            Encoded::Value(v) => v.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Encoded<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Encoded::Value)
    }
}

/// One unit in a `TaskUnit.List`: [`UnitSummary`] for a client, [`UnitView`] for the
/// server writing it (see [`RunInfoOf`] for `S` and `T`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "UnitSummary")]
pub struct UnitSummaryOf<S, T> {
    /// The unit's name.
    pub name: S,
    /// Its state.
    pub state: S,
    /// `job`, `service` or `tick`.
    pub kind: S,
    /// `once`, `every 5m`, `cron …`, `continuous`.
    pub schedule: S,
    /// When it fires next.
    pub next_fire: Option<T>,
    /// The newest run.
    pub last_run: Option<RunInfoOf<S, T>>,
    /// Runs started, ever.
    pub runs_total: u64,
    /// Runs that did not succeed, ever.
    pub failures_total: u64,
    /// The unit's description.
    pub description: S,
}

/// One unit in a `TaskUnit.List`, as a client reads it.
pub type UnitSummary = UnitSummaryOf<String, String>;

/// Units as `TaskUnit.List` writes them: the units `filter` picks, each written from its
/// definition and status under its status lock ([`Registry::list`]), no copy made first.
pub struct ListView<'a> {
    /// Where the units are.
    pub registry: &'a Registry,
    /// Which units.
    pub filter: &'a ListFilter,
}

impl Serialize for ListView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let clock = Clock::now();
        let mut seq = s.serialize_seq(None)?;
        let mut failed = None;
        self.registry.list(self.filter, |config, status| {
            if failed.is_none() {
                let unit = UnitSummaryOf::view(config, status, &clock);
                failed = seq.serialize_element(&unit).err();
            }
        });
        match failed {
            Some(e) => Err(e),
            None => seq.end(),
        }
    }
}

/// A unit as a list writes it, borrowed from its definition and status.
pub type UnitView<'a> = UnitSummaryOf<Cow<'a, str>, Time<'a>>;

impl<'a> UnitView<'a> {
    /// The unit with this definition and status, borrowed, with its times rendered by
    /// `clock` as it is serialized.
    pub fn view(config: &'a UnitConfig, status: &'a UnitStatus, clock: &'a Clock) -> Self {
        let (kind, schedule) = describe_schedule(config);
        UnitSummaryOf {
            name: Cow::Borrowed(&config.name),
            state: Cow::Borrowed(status.state.as_str()),
            kind: Cow::Borrowed(kind),
            schedule,
            next_fire: status.next_fire.map(|t| clock.time(t)),
            last_run: status.last_run.as_ref().map(|r| RunInfoOf::view(r, clock)),
            runs_total: status.runs_total,
            failures_total: status.failures_total,
            description: Cow::Borrowed(&config.description),
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
            kind: e.kind.as_str().into(),
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
    /// Where units and runs are kept: `sqlite <file>` or `postgres://USER@HOST:PORT/DB`.
    #[serde(default)]
    pub store: String,
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
    /// Agents per state (and `total`).
    #[serde(default)]
    pub agents: BTreeMap<String, usize>,
    /// The cluster, when the store is PostgreSQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// `Daemon.Status`'s view of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterStatus {
    /// The server answering (the lease holder: standbys relay to it).
    pub name: String,
    /// The lease holder.
    pub holder: String,
    /// The lease's epoch: raised at each takeover.
    pub epoch: i64,
    /// Milliseconds before the lease runs out unless renewed.
    pub lease_left_ms: i64,
    /// Every server that joined, by name.
    pub servers: Vec<ServerStatus>,
}

/// A server of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServerStatus {
    /// Its `--name`.
    pub name: String,
    /// Where the others reach it.
    pub address: String,
    /// Its taskd version.
    pub version: String,
    /// `holder`, `standby`, or `gone` (silent for a lease time).
    pub role: String,
    /// When it last said it was alive (RFC 3339).
    pub seen_at: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_written_from_its_view_reads_back_as_the_summary_a_client_expects() {
        use crate::run::{RunState, Trigger};
        use crate::unit::{UnitDef, UnitState, ValidateCtx};
        let def = serde_json::json!({"name": "nightly", "command": ["true"], "every": "5m",
                                     "description": "a \"quoted\" job"});
        let config =
            UnitConfig::validate(UnitDef::from_json(def).unwrap(), &ValidateCtx::default())
                .unwrap();
        let at: Timestamp = "2026-12-02T14:35:37.123456Z".parse().unwrap();
        let run = RunRecord {
            pid: Some(4242),
            scheduled_at: Some(at),
            started_at: Some(at),
            ended_at: Some(at + jiff::SignedDuration::from_millis(1500)),
            exit_code: Some(3),
            reason: Some("exited with 3".into()),
            stdout_bytes: 10,
            stderr_bytes: 20,
            truncated: true,
            ..RunRecord::fresh(7, "nightly".into(), RunState::Failed, Trigger::Schedule, 2, at)
        };
        let status = UnitStatus {
            state: UnitState::Waiting,
            next_fire: Some(at),
            last_run: Some(run.clone()),
            active: Vec::new(),
            runs_total: 9,
            failures_total: 4,
            created_at: at,
            updated_at: at,
            paused: false,
            stopped: false,
        };
        let clock = Clock::now();
        let json = serde_json::to_string(&UnitSummaryOf::view(&config, &status, &clock)).unwrap();
        let got: UnitSummary = serde_json::from_str(&json).unwrap();
        assert_eq!(
            got,
            UnitSummary {
                name: "nightly".into(),
                state: "waiting".into(),
                kind: "job".into(),
                schedule: "every 5m".into(),
                next_fire: Some(fmt_time(at)),
                last_run: Some(RunInfo::from(&run)),
                runs_total: 9,
                failures_total: 4,
                description: "a \"quoted\" job".into(),
            }
        );
        let last = got.last_run.unwrap();
        assert_eq!((last.state.as_str(), last.duration_ms), ("failed", Some(1500)));
        assert_eq!(last.reason.as_deref(), Some("exited with 3"));
    }

    #[test]
    fn times_render_as_rfc_3339_with_the_local_offset_to_the_microsecond() {
        let cases = [
            ("2026-12-02T14:35:37.123456789Z", "UTC", "2026-12-02T14:35:37.123456+00:00"),
            ("2026-12-02T14:35:37Z", "Asia/Kolkata", "2026-12-02T20:05:37.000000+05:30"),
            ("2026-07-01T00:00:00.5Z", "America/New_York", "2026-06-30T20:00:00.500000-04:00"),
            ("2026-01-01T00:00:00.000001Z", "America/New_York", "2025-12-31T19:00:00.000001-05:00"),
        ];
        for (at, zone, want) in cases {
            let t: Timestamp = at.parse().unwrap();
            let tz = TimeZone::get(zone).unwrap();
            assert_eq!(Time { at: t, tz: &tz }.to_string(), want, "{at} in {zone}");
            assert_eq!(serde_json::to_value(Time { at: t, tz: &tz }).unwrap(), want);
        }
    }
}
