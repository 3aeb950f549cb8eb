//! Unit definitions: the fields a user writes (JSON or TOML), their validation, and the
//! checked form the engine runs.
//!
//! A definition is kept *as given* (`UnitDef`, only the fields the user set) so that
//! `TaskUnit.Edit` can apply a JSON merge patch to it; the engine works from the validated
//! `UnitConfig`, which also renders the definition with every default filled in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::schedule::Schedule;
use crate::error::{Error, Result};

/// The longest duration any field accepts (ten years): keeps arithmetic far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// Names every unit must match: `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            format!(
                "{} is not a valid unit name: use 1-64 letters, digits, '.', '_' or '-', \
                 starting with a letter or digit",
                crate::error::shown_name(name)
            ),
        ))
    }
}

/// A size given either as a number of bytes or as a string such as `"1MiB"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ByteSize {
    /// A plain number of bytes.
    Bytes(u64),
    /// A string with a unit: `B`, `KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`.
    Text(String),
}

/// A file to put on each host, as the user gives it (`file`, SPEC §10.7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileDef {
    /// The content, as the server keeps it: `sha256:<64 hex digits>` (`File.Commit`'s answer;
    /// `taskctl push` uploads it).
    pub source: String,
    /// Where it goes on each host: an absolute path (under the agent's `--allowed-dirs`).
    pub dest: String,
    /// Its mode, in octal (`"0644"`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Its owner, `user` or `user:group` (the host's agent must run as root to give it away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A validated `file`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSpec {
    /// The content's SHA-256, lowercase hex.
    pub sha256: String,
    /// The absolute destination path.
    pub dest: PathBuf,
    /// Its mode bits.
    pub mode: u32,
    /// Its owner and group, if given.
    pub owner: Option<(String, Option<String>)>,
}

/// The prefix of a `file.source`.
pub const CONTENT_PREFIX: &str = "sha256:";

/// A webhook as the user gives it (`notify` entries): where, and on which run outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyDef {
    /// `http://` or `https://` URL the notification is POSTed to.
    pub url: String,
    /// Final run states that notify: `succeeded`, `failed`, `timed_out`, `cancelled`, `lost`
    /// [default: failed, timed_out, lost].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<String>>,
}

/// A validated webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Where to POST.
    pub url: http::Uri,
    /// The run outcomes that notify.
    pub on: Vec<crate::run::RunState>,
}

/// Webhooks one unit may have at most.
const MAX_WEBHOOKS: usize = 16;
/// The longest webhook URL.
const MAX_URL: usize = 2048;
/// The outcomes that notify when `on` is not given.
const DEFAULT_ON: [crate::run::RunState; 3] =
    [crate::run::RunState::Failed, crate::run::RunState::TimedOut, crate::run::RunState::Lost];

macro_rules! unit_def {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty ),* $(,)?) => {
        /// A unit definition as the user gave it: every field optional except `name`.
        /// Serialises with only the fields that are set.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, schemars::JsonSchema)]
        #[schemars(deny_unknown_fields)]
        pub struct UnitDef {
            /// The unit's name.
            pub name: String,
            $(
                $(#[$doc])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        /// Every field a definition may have, in the order of the specification.
        pub const FIELDS: &[&str] = &["name", $(stringify!($field)),*];

        impl UnitDef {
            fn set_field(&mut self, key: &str, value: Value) -> Result<()> {
                match key {
                    "name" => {
                        self.name = match value {
                            Value::String(s) => s,
                            other => return Err(Error::invalid(
                                "name",
                                format!("expected a string, got {}", kind_of(&other)),
                            )),
                        };
                    }
                    $(
                        stringify!($field) => {
                            self.$field = if value.is_null() {
                                None
                            } else {
                                Some(<$ty>::deserialize(&value).map_err(|e| {
                                    Error::invalid(key, type_error(key, &e, &value))
                                })?)
                            };
                        }
                    )*
                    other => {
                        return Err(Error::invalid(
                            other,
                            format!("unknown field; the fields are: {}", FIELDS.join(", ")),
                        ))
                    }
                }
                Ok(())
            }
        }
    };
}

unit_def! {
    /// argv, run without a shell.
    command: Vec<String>,
    /// Script text, run by its `#!` interpreter or `/bin/sh`.
    script: String,
    /// Extra arguments appended to `command` or passed to `script`.
    args: Vec<String>,
    /// A fixed interval between fire times.
    every: String,
    /// A cron expression (5 or 6 fields, or `@hourly`…).
    cron: String,
    /// IANA time zone for `cron`.
    tz: String,
    /// Keep the process running.
    service: bool,
    /// `always`, `on-failure` or `never`.
    restart: String,
    /// Restart/retry delay: `"1s..60s"`.
    backoff: String,
    /// Start limit for services: `"5/60s"`.
    start_limit: String,
    /// Extra attempts for a failed job run.
    retries: u32,
    /// Stop a run that lasts longer than this.
    timeout: String,
    /// Time between SIGTERM and SIGKILL.
    kill_grace: String,
    /// `skip`, `queue`, `allow` or `replace`.
    overlap: String,
    /// `skip` or `once`.
    catch_up: String,
    /// Exit codes that count as success.
    success_codes: Vec<i32>,
    /// Extra environment variables.
    env: BTreeMap<String, String>,
    /// Working directory.
    cwd: String,
    /// Account to run as.
    user: String,
    /// Bytes kept per stream per run.
    log_limit: ByteSize,
    /// Created without starting.
    paused: bool,
    /// Free text.
    description: String,
    /// Hosts to run on: `local`, agent names, label selectors (`role=web`), `*`.
    hosts: Vec<String>,
    /// Hosts of one dispatch running at once (0: all).
    batch: u32,
    /// Failed hosts one dispatch allows before it pauses.
    tolerance: u32,
    /// How long a run waits for its host's agent to connect.
    host_wait: String,
    /// Runs kept for this unit (overrides the daemon's `keep_runs`).
    keep_runs: u32,
    /// Webhooks POSTed when a run ends: `[{url, on}]`.
    notify: Vec<NotifyDef>,
    /// A file to put on each host instead of running a command: `{source, dest, mode, owner}`.
    file: FileDef,
}

/// The JSON type of `v`, as error messages name it (`a number`, `an object`).
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn type_error(field: &str, e: &serde_json::Error, v: &Value) -> String {
    let msg = e.to_string();
    if msg.starts_with("invalid type") || msg.contains("did not match any variant") {
        let expected = match field {
            "command" | "args" | "hosts" => "an array of strings, e.g. [\"date\", \"-u\"]",
            "env" => "a table of strings, e.g. {\"LANG\": \"C\"}",
            "success_codes" => "an array of exit codes, e.g. [0, 3]",
            "service" | "paused" => "true or false",
            "retries" | "keep_runs" => "a whole number (0 or more)",
            "notify" => "an array of {\"url\": \"http://…\", \"on\": [\"failed\"]} objects",
            "log_limit" => "a size such as \"1MiB\" or a number of bytes",
            _ => "a string",
        };
        format!("expected {expected}, got {}", kind_of(v))
    } else if msg.starts_with("invalid value") {
        format!("expected a whole number (0 or more), got {v}")
    } else {
        msg
    }
}

impl UnitDef {
    /// Parses a definition from a JSON object, naming the field at fault on any error.
    pub fn from_json(value: Value) -> Result<UnitDef> {
        let Value::Object(map) = value else {
            return Err(Error::invalid(
                "definition",
                format!("expected an object, got {}", kind_of(&value)),
            ));
        };
        let mut def = UnitDef::default();
        let mut has_name = false;
        for (key, value) in map {
            has_name |= key == "name";
            def.set_field(&key, value)?;
        }
        if !has_name {
            return Err(Error::invalid("name", "missing: every unit needs a name"));
        }
        Ok(def)
    }

    /// Parses a unit file (`<units-dir>/<name>.toml`). The file's `name`, if present, must
    /// equal `name`; when absent it is taken from the file name.
    pub fn from_toml(text: &str, name: &str) -> Result<UnitDef> {
        // The whole message: it shows the line and column of the mistake.
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| Error::invalid("file", e.to_string().trim_end().to_string()))?;
        let mut value =
            serde_json::to_value(table).map_err(|e| Error::invalid("definition", e.to_string()))?;
        let obj = value.as_object_mut().expect("a TOML table is an object");
        match obj.get("name") {
            None => {
                obj.insert("name".into(), Value::String(name.into()));
            }
            Some(Value::String(n)) if n == name => {}
            Some(other) => {
                return Err(Error::invalid(
                    "name",
                    format!("the file for {name:?} names the unit {other}; they must agree"),
                ));
            }
        }
        UnitDef::from_json(value)
    }

    /// The definition as a JSON object (only the fields that are set).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a definition always serialises")
    }
}

/// Applies an RFC 7396 JSON merge patch to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Default::default());
        }
        let t = target.as_object_mut().expect("just made an object");
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// What a run executes.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// An argv, run without a shell.
    Command(Vec<String>),
    /// Script text.
    Script(String),
    /// No command: write `tick <name> <time>` to the log every interval.
    Tick(Duration),
    /// Put a file the server keeps at a path (see [`crate::executor::file`]).
    File(FileSpec),
}

/// Restart policy of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Restart whenever it exits.
    Always,
    /// Restart when it exits with a code not in `success_codes` or by a signal.
    OnFailure,
    /// Never restart.
    Never,
}

/// What a fire does while a run is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Drop the fire.
    Skip,
    /// Queue at most one run.
    Queue,
    /// Start another run alongside.
    Allow,
    /// Stop the active run, then start.
    Replace,
}

/// What to do with fire times missed while the daemon was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Forget them.
    Skip,
    /// Fire once at start-up.
    Once,
}

/// Doubling delay between restarts or retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub first: Duration,
    /// The ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The delay before attempt `n` (0-based): `first * 2^n`, capped at `max`.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.first.checked_mul(factor).unwrap_or(self.max).min(self.max)
    }
}

/// More than `count` starts within `window` make a service `fatal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartLimit {
    /// Starts allowed within the window.
    pub count: u32,
    /// The sliding window.
    pub window: Duration,
}

/// The validated form of a unit: what the engine runs.
#[derive(Debug, Clone)]
pub struct UnitConfig {
    /// The unit's name.
    pub name: String,
    /// What to run.
    pub action: Action,
    /// Extra arguments.
    pub args: Vec<String>,
    /// When to fire, for scheduled jobs.
    pub schedule: Option<Schedule>,
    /// Whether this is a supervised service.
    pub service: bool,
    /// Service restart policy.
    pub restart: Restart,
    /// Restart/retry back-off.
    pub backoff: Backoff,
    /// Service start limit.
    pub start_limit: StartLimit,
    /// Extra attempts for a failed job run.
    pub retries: u32,
    /// Run timeout.
    pub timeout: Option<Duration>,
    /// SIGTERM→SIGKILL grace.
    pub kill_grace: Duration,
    /// Overlap policy.
    pub overlap: Overlap,
    /// Catch-up policy.
    pub catch_up: CatchUp,
    /// Exit codes that count as success.
    pub success_codes: Vec<i32>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory; `None` means the state directory's `work/`, or with `user` that
    /// account's home directory.
    pub cwd: Option<PathBuf>,
    /// Account to run as.
    pub user: Option<String>,
    /// Bytes kept per stream per run.
    pub log_limit: u64,
    /// Created paused.
    pub paused: bool,
    /// Free text.
    pub description: String,
    /// Hosts to run on.
    pub hosts: Vec<String>,
    /// Hosts of one dispatch running at once (0: all).
    pub batch: u32,
    /// Failed, timed-out or lost hosts one dispatch allows; one more pauses it.
    pub tolerance: Option<u32>,
    /// How long a run waits for its agent to be connected before it ends `cancelled`.
    pub host_wait: Duration,
    /// Runs to keep; `None` means the daemon's default.
    pub keep_runs: Option<u32>,
    /// Webhooks to notify of run outcomes.
    pub notify: Vec<Webhook>,
    /// The definition exactly as given.
    pub def: UnitDef,
}

/// What validation needs to know about the daemon, and the daemon's limits on where and as
/// whom units run, which are checked against this machine at `Add`, `Edit` and before each
/// spawn ([`ValidateCtx::resolve_cwd`], [`ValidateCtx::check_user`]).
#[derive(Debug, Clone, Default)]
pub struct ValidateCtx {
    /// Whether the daemon runs as root (`user` is refused otherwise).
    pub is_root: bool,
    /// When non-empty, `cwd` must resolve to a directory under one of these, which are
    /// resolved paths themselves ([`resolve_allowed_dirs`]).
    pub allowed_dirs: Vec<PathBuf>,
    /// When non-empty, `user` must name one of these accounts (by name or numeric uid).
    pub allowed_users: Vec<String>,
}

impl ValidateCtx {
    /// Resolves a unit's `cwd` as the kernel would on the way in: symlinks followed, `..`
    /// taken after them (`allowed/link/..` is the parent of where `link` leads). Checks that
    /// it is a directory and, when `allowed_dirs` is set, that it lies under one of them.
    /// Returns the resolved path, which is where a run should start. Errors name `cwd`.
    ///
    /// Reads the file system: call it off the async threads where that matters.
    pub fn resolve_cwd(&self, cwd: &Path) -> Result<PathBuf> {
        let resolved = std::fs::canonicalize(cwd).map_err(|e| {
            let reason = if e.kind() == std::io::ErrorKind::NotFound && !self.allowed_dirs.is_empty()
            {
                format!(
                    "{} does not exist: with allowed_dirs set, it must, so that where it leads                      can be checked",
                    cwd.display()
                )
            } else {
                format!("{}: {e}", cwd.display())
            };
            Error::invalid("cwd", reason)
        })?;
        let shown = if resolved == cwd {
            cwd.display().to_string()
        } else {
            format!("{} (which leads to {})", cwd.display(), resolved.display())
        };
        if !resolved.is_dir() {
            return Err(Error::invalid("cwd", format!("{shown} is not a directory")));
        }
        if !self.allowed_dirs.is_empty()
            && !self.allowed_dirs.iter().any(|d| resolved.starts_with(d))
        {
            let dirs: Vec<_> = self.allowed_dirs.iter().map(|d| d.display().to_string()).collect();
            return Err(Error::invalid(
                "cwd",
                format!("{shown} is not under an allowed directory ({})", dirs.join(", ")),
            ));
        }
        Ok(resolved)
    }

    /// Checks the account a unit runs as (its login name and uid, once looked up) against
    /// `allowed_users`. Errors name `user`.
    pub fn check_user(&self, name: &str, uid: u32) -> Result<()> {
        if self.allowed_users.is_empty()
            || self.allowed_users.iter().any(|a| a == name || *a == uid.to_string())
        {
            return Ok(());
        }
        Err(Error::invalid(
            "user",
            format!(
                "{name:?} is not one of the daemon's allowed_users ({})",
                self.allowed_users.join(", ")
            ),
        ))
    }
}

/// Resolves the daemon's `allowed_dirs` once at start, so that resolved `cwd`s can be
/// compared with them (an allowed directory reached through a symlink, `/srv` → `/data/srv`,
/// still allows what lies under it). One that cannot be resolved (it does not exist yet) is
/// kept as given, after a warning: a `cwd` under it is allowed only if it resolves to a path
/// under that spelling.
pub fn resolve_allowed_dirs(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .map(|d| match std::fs::canonicalize(d) {
            Ok(resolved) => resolved,
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "allowed_dirs: cannot resolve this directory; restart taskd once it exists");
                d.clone()
            }
        })
        .collect()
}

/// Parses a duration such as `"500ms"`, `"30s"`, `"5m"`, `"1h30m"` or `"2d"`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: write e.g. \"30s\", \"5m\" or \"1h30m\"".into());
    }
    let bytes = t.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "{s:?} is not a duration: write e.g. \"30s\", \"5m\" or \"1h30m\""
            ));
        }
        let n: u128 = t[start..i].parse().map_err(|_| format!("{s:?}: number too large"))?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit_ms: u128 = match &t[ustart..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{s:?}: missing unit after {n} (use ms, s, m, h or d)")),
            u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m, h or d)")),
        };
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
        if total > MAX_DURATION.as_millis() {
            return Err(format!("{s:?} is too long: at most 3660d"));
        }
    }
    if total == 0 {
        return Err(format!("{s:?} must be greater than zero"));
    }
    Ok(Duration::from_millis(total as u64))
}

/// Renders a duration the way [`parse_duration`] reads it (`"1h30m"`, `"500ms"`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

/// Parses a byte size: a number of bytes, or `"512KiB"`, `"1MiB"`, `"10MB"`, `"1GiB"`.
pub fn parse_size(s: &ByteSize) -> std::result::Result<u64, String> {
    let text = match s {
        ByteSize::Bytes(n) => return Ok(*n),
        ByteSize::Text(t) => t.trim(),
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("{text:?} is not a size: write e.g. \"1MiB\", \"512KiB\" or a number of bytes")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" | "K" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" | "M" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" | "G" => 1 << 30,
        u => {
            return Err(format!("{text:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, KB, MB, GB)"));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

/// Renders a byte size in the largest binary unit that divides it.
pub fn format_size(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    format!("{n}B")
}

fn duration_field(field: &str, v: &Option<String>) -> Result<Option<Duration>> {
    v.as_deref().map(|s| parse_duration(s).map_err(|e| Error::invalid(field, e))).transpose()
}

fn parse_backoff(s: &str) -> std::result::Result<Backoff, String> {
    let (first, max) = match s.split_once("..") {
        Some((a, b)) => (parse_duration(a)?, parse_duration(b)?),
        None => {
            let d = parse_duration(s)?;
            (d, d)
        }
    };
    if first > max {
        return Err(format!("{s:?}: the first delay is longer than the maximum"));
    }
    Ok(Backoff { first, max })
}

fn parse_start_limit(s: &str) -> std::result::Result<StartLimit, String> {
    let (n, w) =
        s.split_once('/').ok_or_else(|| format!("{s:?}: write COUNT/WINDOW, e.g. \"5/60s\""))?;
    let count: u32 =
        n.trim().parse().map_err(|_| format!("{s:?}: {n:?} is not a whole number of starts"))?;
    if count == 0 {
        return Err(format!("{s:?}: the count must be at least 1"));
    }
    Ok(StartLimit { count, window: parse_duration(w)? })
}

fn one_of<T: Copy>(field: &str, v: &str, options: &[(&str, T)]) -> Result<T> {
    options.iter().find(|(k, _)| *k == v).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<_> = options.iter().map(|(k, _)| *k).collect();
        Error::invalid(field, format!("{v:?} is not one of {}", names.join(", ")))
    })
}

/// `command`, `script`, or neither (a tick unit, every `every`).
fn action_of(def: &UnitDef, every: Option<Duration>) -> Result<Action> {
    if let Some(f) = &def.file {
        if def.command.is_some() || def.script.is_some() || def.service == Some(true) {
            return Err(Error::invalid("file", "a file unit has no command, script or service"));
        }
        return file_of(f).map(Action::File);
    }
    Ok(match (&def.command, &def.script) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid("script", "give either command or script, not both"));
        }
        (Some(cmd), None) => {
            if cmd.is_empty() {
                return Err(Error::invalid("command", "must not be empty"));
            }
            if cmd[0].is_empty() {
                return Err(Error::invalid("command", "the program (first element) is empty"));
            }
            if cmd.iter().any(|a| a.contains('\0')) {
                return Err(Error::invalid("command", "arguments must not contain NUL"));
            }
            Action::Command(cmd.clone())
        }
        (None, Some(text)) => {
            if text.trim().is_empty() {
                return Err(Error::invalid("script", "must not be empty"));
            }
            Action::Script(text.clone())
        }
        (None, None) => Action::Tick(every.unwrap_or(Duration::from_secs(1))),
    })
}

/// `file`: the content's id, an absolute destination, an octal mode, `user[:group]`.
fn file_of(f: &FileDef) -> Result<FileSpec> {
    let sha256 = f
        .source
        .strip_prefix(CONTENT_PREFIX)
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| Error::invalid("file.source", "expected sha256:<64 lowercase hex digits>"))?
        .to_string();
    let dest = PathBuf::from(&f.dest);
    if !dest.is_absolute() || f.dest.ends_with('/') || dest.file_name().is_none() {
        return Err(Error::invalid(
            "file.dest",
            format!("{:?} must be an absolute file path", f.dest),
        ));
    }
    if dest.components().any(|c| matches!(c, std::path::Component::ParentDir))
        || f.dest.contains('\0')
    {
        return Err(Error::invalid("file.dest", "must not contain .. or NUL"));
    }
    let mode = match &f.mode {
        None => 0o644,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Error::invalid("file.mode", format!("{m:?} is not an octal mode such as \"0644\""))
            })?,
    };
    let owner = match &f.owner {
        None => None,
        Some(o) => {
            let (user, group) = match o.split_once(':') {
                Some((u, g)) => (u, Some(g)),
                None => (o.as_str(), None),
            };
            if user.is_empty() || group.is_some_and(str::is_empty) {
                return Err(Error::invalid("file.owner", "expected user or user:group"));
            }
            Some((user.to_string(), group.map(str::to_string)))
        }
    };
    Ok(FileSpec { sha256, dest, mode, owner })
}

/// `every` or `cron` (with `tz`), checked against the unit's kind.
fn schedule_of(
    def: &UnitDef,
    service: bool,
    is_tick: bool,
    every: Option<Duration>,
) -> Result<Option<Schedule>> {
    if def.every.is_some() && def.cron.is_some() {
        return Err(Error::invalid("cron", "give at most one of every and cron"));
    }
    if service && (def.every.is_some() || def.cron.is_some()) {
        let f = if def.every.is_some() { "every" } else { "cron" };
        return Err(Error::invalid(f, "a service runs continuously and takes no schedule"));
    }
    if def.tz.is_some() && def.cron.is_none() {
        return Err(Error::invalid("tz", "only applies to cron schedules"));
    }
    if is_tick && def.cron.is_some() {
        return Err(Error::invalid(
            "cron",
            "a tick unit (no command or script) ticks every `every`; give a command to use cron",
        ));
    }
    Ok(if is_tick {
        None
    } else if let Some(d) = every {
        Some(Schedule::every(d))
    } else if let Some(expr) = &def.cron {
        Some(
            Schedule::cron(expr, def.tz.as_deref())
                .map_err(|(field, reason)| Error::invalid(field, reason))?,
        )
    } else {
        None
    })
}

/// `restart`: services only; on failure by default.
fn restart_of(def: &UnitDef, service: bool) -> Result<Restart> {
    Ok(match &def.restart {
        None => {
            if service {
                Restart::OnFailure
            } else {
                Restart::Never
            }
        }
        Some(r) => {
            let r = one_of(
                "restart",
                r,
                &[
                    ("always", Restart::Always),
                    ("on-failure", Restart::OnFailure),
                    ("never", Restart::Never),
                ],
            )?;
            if !service && r != Restart::Never {
                return Err(Error::invalid(
                    "restart",
                    "only services restart; use retries for jobs, or set service = true",
                ));
            }
            r
        }
    })
}

/// `retries`: jobs only, at most 1000.
fn retries_of(def: &UnitDef, service: bool) -> Result<u32> {
    let retries = def.retries.unwrap_or(0);
    if retries > 1000 {
        return Err(Error::invalid("retries", "at most 1000"));
    }
    if service && retries > 0 {
        return Err(Error::invalid("retries", "services restart instead; use restart/backoff"));
    }
    Ok(retries)
}

/// `success_codes`: exit codes, at least one; `[0]` by default.
fn success_codes_of(def: &UnitDef) -> Result<Vec<i32>> {
    let success_codes = def.success_codes.clone().unwrap_or_else(|| vec![0]);
    if success_codes.is_empty() {
        return Err(Error::invalid("success_codes", "must list at least one exit code"));
    }
    if let Some(bad) = success_codes.iter().find(|c| !(0..=255).contains(*c)) {
        return Err(Error::invalid("success_codes", format!("{bad} is not an exit code (0-255)")));
    }
    Ok(success_codes)
}

/// `env`: names without `=` or NUL, values without NUL.
fn env_of(def: &UnitDef) -> Result<BTreeMap<String, String>> {
    let env = def.env.clone().unwrap_or_default();
    for (k, v) in &env {
        if k.is_empty() {
            return Err(Error::invalid("env", "variable names must not be empty"));
        }
        if k.contains('=') || k.contains('\0') {
            return Err(Error::invalid(format!("env.{k}"), "names contain neither '=' nor NUL"));
        }
        if v.contains('\0') {
            return Err(Error::invalid(format!("env.{k}"), "values must not contain NUL"));
        }
    }
    Ok(env)
}

/// `cwd`: an absolute path (where it leads is checked against the file system later).
fn cwd_of(def: &UnitDef) -> Result<Option<PathBuf>> {
    Ok(match &def.cwd {
        None => None,
        Some(c) => {
            let p = PathBuf::from(c);
            if !p.is_absolute() {
                return Err(Error::invalid("cwd", format!("{c:?} must be an absolute path")));
            }
            // Where it leads (and so whether it is allowed) is a question for the file
            // system, asked at `Add`, `Edit` and each spawn: `ValidateCtx::resolve_cwd`.
            Some(p)
        }
    })
}

/// `user`: another account, for a daemon running as root.
fn user_of(def: &UnitDef, ctx: &ValidateCtx, remote: bool) -> Result<Option<String>> {
    Ok(match &def.user {
        None => None,
        Some(u) => {
            if u.is_empty() {
                return Err(Error::invalid("user", "must not be empty"));
            }
            // On an agent, the agent decides.
            if !ctx.is_root && !remote {
                return Err(Error::invalid(
                    "user",
                    "running as another account needs a daemon running as root",
                ));
            }
            Some(u.clone())
        }
    })
}

/// `log_limit`: bytes kept per stream, 1 KiB to 1 GiB; 1 MiB by default.
fn log_limit_of(def: &UnitDef) -> Result<u64> {
    Ok(match &def.log_limit {
        None => 1 << 20,
        Some(s) => {
            let n = parse_size(s).map_err(|e| Error::invalid("log_limit", e))?;
            if !(1024..=(1 << 30)).contains(&n) {
                return Err(Error::invalid("log_limit", "must be between 1KiB and 1GiB"));
            }
            n
        }
    })
}

/// `notify`: each URL `http://` or `https://` with a host, each `on` a final run state.
fn notify_of(def: &UnitDef) -> Result<Vec<Webhook>> {
    use crate::run::RunState;
    let hooks = def.notify.as_deref().unwrap_or_default();
    if hooks.len() > MAX_WEBHOOKS {
        return Err(Error::invalid("notify", format!("at most {MAX_WEBHOOKS} webhooks")));
    }
    let mut out = Vec::with_capacity(hooks.len());
    for (i, h) in hooks.iter().enumerate() {
        let field = format!("notify[{i}].url");
        if h.url.len() > MAX_URL {
            return Err(Error::invalid(field, format!("at most {MAX_URL} characters")));
        }
        let url: http::Uri =
            h.url.parse().map_err(|e| Error::invalid(&field, format!("not a URL: {e}")))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(Error::invalid(field, "expected http://HOST/… or https://HOST/…"));
        }
        // It would be sent as the Host header and kept on runs in clear: put a secret in the
        // path or query instead.
        if url.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(Error::invalid(field, "no user or password in the URL"));
        }
        let on = match &h.on {
            None => DEFAULT_ON.to_vec(),
            Some(on) if on.is_empty() => {
                return Err(Error::invalid(format!("notify[{i}].on"), "name at least one outcome"));
            }
            Some(on) => on
                .iter()
                .map(|s| match s.parse::<RunState>() {
                    Ok(st) if st.is_final() => Ok(st),
                    _ => Err(Error::invalid(
                        format!("notify[{i}].on"),
                        format!(
                            "{} is not a run outcome: use succeeded, failed, timed_out, \
                             cancelled or lost",
                            crate::error::shown_name(s)
                        ),
                    )),
                })
                .collect::<Result<_>>()?,
        };
        out.push(Webhook { url, on });
    }
    Ok(out)
}

/// `hosts`: where runs execute, `["local"]` by default. Whether each name is an enrolled
/// agent is the registry's question (`Fleet::check_hosts`), asked at `Add` and `Edit`.
fn hosts_of(def: &UnitDef) -> Result<Vec<String>> {
    let hosts = def.hosts.clone().unwrap_or_else(|| vec![crate::run::LOCAL.into()]);
    if hosts.is_empty() {
        return Err(Error::invalid("hosts", "must name at least one host (\"local\": this one)"));
    }
    if hosts.len() > 10_000 {
        return Err(Error::invalid("hosts", "at most 10000 entries"));
    }
    for h in &hosts {
        if h.trim().is_empty() || h.len() > 256 {
            return Err(Error::invalid("hosts", "each entry must be 1-256 characters"));
        }
    }
    Ok(hosts)
}

/// Whether a unit on `hosts` runs anywhere but here.
pub fn is_remote(hosts: &[String]) -> bool {
    hosts.iter().any(|h| h != crate::run::LOCAL)
}

/// `batch`, `tolerance` and `host_wait`: how a dispatch proceeds; only for units on agents,
/// and neither for services nor tick units (they keep one run going, on this host).
fn dispatch_of(
    def: &UnitDef,
    hosts: &[String],
    continuous: bool,
) -> Result<(u32, Option<u32>, Duration)> {
    let remote = is_remote(hosts);
    if remote && continuous {
        return Err(Error::invalid(
            "hosts",
            "services and tick units run on \"local\" only: run a service on a host with \
             that host's own taskd",
        ));
    }
    for (field, given) in [
        ("batch", def.batch.is_some()),
        ("tolerance", def.tolerance.is_some()),
        ("host_wait", def.host_wait.is_some()),
    ] {
        if given && !remote {
            return Err(Error::invalid(field, "applies to units whose hosts name agents"));
        }
    }
    let host_wait =
        duration_field("host_wait", &def.host_wait)?.unwrap_or(Duration::from_secs(300));
    Ok((def.batch.unwrap_or(0), def.tolerance, host_wait))
}

impl UnitConfig {
    /// Validates `def`, naming the field and the reason on the first problem found.
    pub fn validate(def: UnitDef, ctx: &ValidateCtx) -> Result<UnitConfig> {
        validate_name(&def.name)?;
        let service = def.service.unwrap_or(false);
        let every = duration_field("every", &def.every)?;
        let action = action_of(&def, every)?;
        let schedule = schedule_of(&def, service, matches!(action, Action::Tick(_)), every)?;
        let restart = restart_of(&def, service)?;
        let backoff = match &def.backoff {
            None => Backoff { first: Duration::from_secs(1), max: Duration::from_secs(60) },
            Some(s) => parse_backoff(s).map_err(|e| Error::invalid("backoff", e))?,
        };
        let start_limit = match &def.start_limit {
            None => StartLimit { count: 5, window: Duration::from_secs(60) },
            Some(s) => parse_start_limit(s).map_err(|e| Error::invalid("start_limit", e))?,
        };
        let retries = retries_of(&def, service)?;
        let timeout = duration_field("timeout", &def.timeout)?;
        let kill_grace =
            duration_field("kill_grace", &def.kill_grace)?.unwrap_or(Duration::from_secs(5));
        let overlap = match &def.overlap {
            None => Overlap::Skip,
            Some(o) => one_of(
                "overlap",
                o,
                &[
                    ("skip", Overlap::Skip),
                    ("queue", Overlap::Queue),
                    ("allow", Overlap::Allow),
                    ("replace", Overlap::Replace),
                ],
            )?,
        };
        let catch_up = match &def.catch_up {
            None => CatchUp::Skip,
            Some(c) => one_of("catch_up", c, &[("skip", CatchUp::Skip), ("once", CatchUp::Once)])?,
        };
        let success_codes = success_codes_of(&def)?;
        let env = env_of(&def)?;
        let cwd = cwd_of(&def)?;
        let hosts = hosts_of(&def)?;
        let user = user_of(&def, ctx, !hosts.iter().any(|h| h == crate::run::LOCAL))?;
        let log_limit = log_limit_of(&def)?;
        let continuous = service || matches!(action, Action::Tick(_));
        let (batch, tolerance, host_wait) = dispatch_of(&def, &hosts, continuous)?;
        if let Some(0) = def.keep_runs {
            return Err(Error::invalid("keep_runs", "must be at least 1"));
        }
        let description = def.description.clone().unwrap_or_default();
        let notify = notify_of(&def)?;
        Ok(UnitConfig {
            name: def.name.clone(),
            action,
            args: def.args.clone().unwrap_or_default(),
            schedule,
            service,
            restart,
            backoff,
            start_limit,
            retries,
            timeout,
            kill_grace,
            overlap,
            catch_up,
            success_codes,
            env,
            cwd,
            user,
            log_limit,
            paused: def.paused.unwrap_or(false),
            description,
            hosts,
            batch,
            tolerance,
            host_wait,
            keep_runs: def.keep_runs,
            notify,
            def,
        })
    }

    /// Whether its runs execute on agents (its `hosts` name anything but `local`).
    pub fn is_remote(&self) -> bool {
        is_remote(&self.hosts)
    }

    /// The definition an agent is given for a run: what to run and how, without the fields
    /// that are the server's business (schedule, overlap, retries, hosts…).
    pub fn for_agent(&self) -> Value {
        const KEPT: &[&str] = &[
            "name",
            "command",
            "script",
            "args",
            "timeout",
            "kill_grace",
            "success_codes",
            "env",
            "cwd",
            "user",
            "log_limit",
            "file",
        ];
        let mut v = self.def.to_json();
        if let Some(o) = v.as_object_mut() {
            o.retain(|k, _| KEPT.contains(&k.as_str()));
        }
        v
    }

    /// Whether this is a tick unit (no command, no script).
    pub fn is_tick(&self) -> bool {
        matches!(self.action, Action::Tick(_))
    }

    /// The definition with every default filled in, as shown by `TaskUnit.Get`.
    pub fn filled(&self) -> Value {
        let mut v = self.def.to_json();
        let o = v.as_object_mut().expect("definitions are objects");
        let mut put = |k: &str, val: Value| {
            o.entry(k.to_string()).or_insert(val);
        };
        put("args", Value::from(self.args.clone()));
        put("service", Value::from(self.service));
        if self.service {
            put(
                "restart",
                Value::from(match self.restart {
                    Restart::Always => "always",
                    Restart::OnFailure => "on-failure",
                    Restart::Never => "never",
                }),
            );
            put(
                "start_limit",
                Value::from(format!(
                    "{}/{}",
                    self.start_limit.count,
                    format_duration(self.start_limit.window)
                )),
            );
        }
        put(
            "backoff",
            Value::from(format!(
                "{}..{}",
                format_duration(self.backoff.first),
                format_duration(self.backoff.max)
            )),
        );
        put("retries", Value::from(self.retries));
        put("kill_grace", Value::from(format_duration(self.kill_grace)));
        put(
            "overlap",
            Value::from(match self.overlap {
                Overlap::Skip => "skip",
                Overlap::Queue => "queue",
                Overlap::Allow => "allow",
                Overlap::Replace => "replace",
            }),
        );
        put(
            "catch_up",
            Value::from(match self.catch_up {
                CatchUp::Skip => "skip",
                CatchUp::Once => "once",
            }),
        );
        put("success_codes", Value::from(self.success_codes.clone()));
        put("env", serde_json::to_value(&self.env).expect("a map of strings"));
        put("log_limit", Value::from(format_size(self.log_limit)));
        put("paused", Value::from(self.paused));
        put("description", Value::from(self.description.clone()));
        put("hosts", Value::from(self.hosts.clone()));
        if self.is_remote() {
            put("batch", Value::from(self.batch));
            put("host_wait", Value::from(format_duration(self.host_wait)));
        }
        // A service takes no `every` (a tick service ticks every second), and the filled-in
        // definition must itself be one that validates.
        if let Action::Tick(d) = self.action
            && !self.service
        {
            put("every", Value::from(format_duration(d)));
        }
        if let Some(Schedule::Cron { tz, .. }) = &self.schedule {
            put("tz", Value::from(tz.iana_name().unwrap_or("local").to_string()));
        }
        // Each webhook with its outcomes filled in.
        o.insert(
            "notify".into(),
            Value::from(
                self.notify
                    .iter()
                    .map(|w| {
                        let on: Vec<&str> = w.on.iter().map(|s| s.as_str()).collect();
                        serde_json::json!({"url": w.url.to_string(), "on": on})
                    })
                    .collect::<Vec<_>>(),
            ),
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Result<UnitConfig> {
        UnitConfig::validate(UnitDef::from_json(v)?, &ValidateCtx::default())
    }

    fn field_of(r: Result<UnitConfig>) -> String {
        match r {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected an invalid-definition error, got {other:?}"),
        }
    }

    #[test]
    fn durations_parse_and_render() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("99999999999999999999999d").is_err());
        assert!(parse_duration("4000d").is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size(&ByteSize::Text("1MiB".into())).unwrap(), 1 << 20);
        assert_eq!(parse_size(&ByteSize::Bytes(4096)).unwrap(), 4096);
        assert!(parse_size(&ByteSize::Text("1XB".into())).is_err());
    }

    #[test]
    fn every_rule_names_its_field() {
        assert_eq!(field_of(check(json!({"name": "a", "bogus": 1}))), "bogus");
        assert_eq!(field_of(check(json!({"name": "-a"}))), "name");
        assert_eq!(field_of(check(json!({"command": ["x"]}))), "name");
        assert_eq!(field_of(check(json!({"name": "a", "command": []}))), "command");
        assert_eq!(field_of(check(json!({"name": "a", "command": [""]}))), "command");
        assert_eq!(field_of(check(json!({"name": "a", "command": "ls"}))), "command");
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "script": "y"}))),
            "script"
        );
        assert_eq!(
            field_of(check(
                json!({"name": "a", "command": ["x"], "every": "1s", "cron": "* * * * *"})
            )),
            "cron"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "service": true, "every": "1s"}))),
            "every"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "cron": "* * * *"}))),
            "cron"
        );
        assert_eq!(
            field_of(check(
                json!({"name": "a", "command": ["x"], "cron": "* * * * *", "tz": "Mars/Base"})
            )),
            "tz"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "timeout": "0s"}))),
            "timeout"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "retries": -1}))),
            "retries"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "overlap": "x"}))),
            "overlap"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "env": {"A=B": "1"}}))),
            "env.A=B"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "env": {"": "1"}}))),
            "env"
        );
        assert_eq!(field_of(check(json!({"name": "a", "command": ["x"], "user": "root"}))), "user");
        assert_eq!(field_of(check(json!({"name": "a", "command": ["x"], "cwd": "rel"}))), "cwd");
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "log_limit": "1XB"}))),
            "log_limit"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "backoff": "10s..1s"}))),
            "backoff"
        );
        assert_eq!(
            field_of(check(
                json!({"name": "a", "command": ["x"], "service": true, "start_limit": "0/1s"})
            )),
            "start_limit"
        );
        assert_eq!(
            field_of(check(json!({"name": "a", "command": ["x"], "restart": "always"}))),
            "restart"
        );
    }

    #[test]
    fn cron_error_counts_fields() {
        let e = check(json!({"name": "a", "command": ["x"], "cron": "* * * *"})).unwrap_err();
        assert_eq!(e.to_string(), "cron: expected 5 or 6 fields, got 4");
    }

    /// `allowed_dirs = [<tmp>/allowed]`, with `<tmp>/allowed/{real, link -> /etc}` and
    /// `<tmp>/outside`.
    fn allowed_tree() -> (tempfile::TempDir, PathBuf, ValidateCtx) {
        let tmp = tempfile::tempdir().unwrap();
        let allowed = tmp.path().join("allowed");
        std::fs::create_dir_all(allowed.join("real")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("link")).unwrap();
        let ctx = ValidateCtx {
            allowed_dirs: resolve_allowed_dirs(std::slice::from_ref(&allowed)),
            ..ValidateCtx::default()
        };
        (tmp, allowed, ctx)
    }

    fn reason_of(r: Result<PathBuf>) -> String {
        match r {
            Err(Error::Invalid { field, reason }) if field == "cwd" => reason,
            other => panic!("expected an invalid cwd, got {other:?}"),
        }
    }

    #[test]
    fn cwd_is_checked_where_it_leads() {
        let (_tmp, allowed, ctx) = allowed_tree();
        let real = allowed.join("real").canonicalize().unwrap();
        assert_eq!(ctx.resolve_cwd(&allowed.join("real")).unwrap(), real);
        assert_eq!(ctx.resolve_cwd(&allowed.join("real/../real/.")).unwrap(), real);
        // A symlink inside an allowed directory leads out of it.
        let reason = reason_of(ctx.resolve_cwd(&allowed.join("link")));
        assert!(reason.contains("which leads to /etc") && reason.contains("not under"), "{reason}");
        // `..` is taken after the symlink: `link/..` is `/`.
        let reason = reason_of(ctx.resolve_cwd(&allowed.join("link/..")));
        assert!(reason.contains("which leads to /)"), "{reason}");
        // Lexically under, but `..` climbs out.
        reason_of(ctx.resolve_cwd(&allowed.join("../outside")));
        let reason = reason_of(ctx.resolve_cwd(&allowed.join("missing")));
        assert!(reason.contains("does not exist"), "{reason}");
        std::fs::write(allowed.join("file"), "").unwrap();
        let reason = reason_of(ctx.resolve_cwd(&allowed.join("file")));
        assert!(reason.contains("not a directory"), "{reason}");
        // Without allowed_dirs, anywhere that exists.
        let open = ValidateCtx::default();
        assert_eq!(open.resolve_cwd(&allowed.join("link")).unwrap(), Path::new("/etc"));
    }

    #[test]
    fn allowed_dirs_reached_through_a_symlink_are_resolved_at_start() {
        let (tmp, allowed, _) = allowed_tree();
        let alias = tmp.path().join("alias");
        std::os::unix::fs::symlink(&allowed, &alias).unwrap();
        let ctx = ValidateCtx {
            allowed_dirs: resolve_allowed_dirs(std::slice::from_ref(&alias)),
            ..ValidateCtx::default()
        };
        assert!(ctx.resolve_cwd(&allowed.join("real")).is_ok());
        assert!(ctx.resolve_cwd(&alias.join("real")).is_ok());
        reason_of(ctx.resolve_cwd(&tmp.path().join("outside")));
    }

    #[test]
    fn users_are_checked_against_allowed_users_by_name_or_uid() {
        assert!(ValidateCtx::default().check_user("root", 0).is_ok());
        let ctx = ValidateCtx {
            allowed_users: vec!["www-data".into(), "1001".into()],
            ..Default::default()
        };
        assert!(ctx.check_user("www-data", 33).is_ok());
        assert!(ctx.check_user("backup", 1001).is_ok());
        match ctx.check_user("root", 0) {
            Err(Error::Invalid { field, reason }) => {
                assert_eq!(field, "user");
                assert!(reason.contains("allowed_users (www-data, 1001)"), "{reason}");
            }
            other => panic!("root was let through: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_filled_and_tick_units_exist() {
        let u = check(json!({"name": "t"})).unwrap();
        assert_eq!(u.action, Action::Tick(Duration::from_secs(1)));
        let f = u.filled();
        assert_eq!(f["overlap"], "skip");
        assert_eq!(f["kill_grace"], "5s");
        assert_eq!(f["log_limit"], "1MiB");
        let s = check(json!({"name": "s", "command": ["x"], "service": true})).unwrap();
        assert_eq!(s.restart, Restart::OnFailure);
        assert_eq!(s.filled()["restart"], "on-failure");
    }

    #[test]
    fn filled_definitions_validate_to_themselves() {
        for def in [
            json!({"name": "t"}),
            json!({"name": "t", "every": "10s", "paused": true}),
            // Found by fuzzing: the filled form of a tick service had an `every`, which a
            // service refuses.
            json!({"name": "ts", "service": true}),
            json!({"name": "s", "script": "sleep 1", "service": true, "restart": "always"}),
            json!({"name": "c", "command": ["x"], "cron": "0 9 * * MON-FRI", "tz": "UTC"}),
            json!({"name": "e", "command": ["x"], "every": "90s", "log_limit": 4096}),
        ] {
            let filled = check(def.clone()).unwrap().filled();
            let again = check(filled.clone())
                .unwrap_or_else(|e| panic!("{def}: filled {filled} does not validate: {e}"));
            assert_eq!(again.filled(), filled, "{def}");
        }
    }

    #[test]
    fn toml_unit_files_take_the_name_from_the_file() {
        let d =
            UnitDef::from_toml("command = [\"echo\", \"hi\"]\nevery = \"5m\"\n", "job").unwrap();
        assert_eq!(d.name, "job");
        assert!(UnitDef::from_toml("name = \"other\"\n", "job").is_err());
        let e = UnitDef::from_toml("comand = [\"x\"]\n", "job").unwrap_err();
        assert!(e.to_string().starts_with("comand: unknown field"), "{e}");
    }

    #[test]
    fn merge_patch_follows_rfc7396() {
        let mut t = json!({"name": "a", "every": "1s", "env": {"A": "1", "B": "2"}});
        merge_patch(&mut t, &json!({"every": null, "cron": "@daily", "env": {"A": null}}));
        assert_eq!(t, json!({"name": "a", "cron": "@daily", "env": {"B": "2"}}));
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let b = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(60) };
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(3), Duration::from_secs(8));
        assert_eq!(b.delay(10), Duration::from_secs(60));
        assert_eq!(b.delay(100), Duration::from_secs(60));
    }
}
