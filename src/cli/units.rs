//! `taskctl add`, `del`, `edit`, `list`, `show`, `start`, `stop`, `pause` and `resume`: the
//! `TaskUnit.*` methods.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use super::output::{self, kind_and_schedule, relative, run_summary, time_and_relative};
use super::{CliError, Ctx};
use crate::rpc::types::{AddArg, AddResult, DeleteArg, ListArg, UnitInfo, UnitSummary};
use crate::rpc::unit::TaskUnitApiClient;
use crate::rpc::unit::UNIT_PAGE;
use crate::unit::UnitState;
use crate::unit::definition::{FIELDS, parse_duration};

/// A duration option, checked here so that a typo is a usage error with clap's message.
fn duration(s: &str) -> Result<String, String> {
    if s.trim_start().starts_with('-') {
        return Err("must be positive: a duration such as 30s, 5m or 1h30m".into());
    }
    parse_duration(s).map(|_| s.to_string())
}

/// A count option (`--retries`, `--keep-runs`): a whole number, 0 or more.
fn count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n < 0 => Err("must be 0 or more".into()),
        Ok(n) => u32::try_from(n).map_err(|_| format!("must be at most {}", u32::MAX)),
        Err(_) => Err("must be a whole number, 0 or more".into()),
    }
}

/// A field for `edit --clear`: one of the definition's fields but `name` (`-` for `_`).
fn clear_field(s: &str) -> Result<String, String> {
    let f = s.trim().replace('-', "_");
    if f == "name" {
        return Err("a unit's name cannot be removed".into());
    }
    if !FIELDS.contains(&f.as_str()) {
        let fields: Vec<&str> = FIELDS.iter().copied().filter(|&f| f != "name").collect();
        return Err(format!("unknown field; the fields are: {}", fields.join(", ")));
    }
    Ok(f)
}

/// `K=V` for `--env`.
fn env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("{s:?}: the variable name is empty")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("{s:?} is not K=V")),
    }
}

/// `overlap` policies.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Overlap {
    /// Ignore a fire while a run is active.
    Skip,
    /// Keep at most one waiting run.
    Queue,
    /// Run concurrently.
    Allow,
    /// Stop the active run and start a new one.
    Replace,
}

/// `restart` policies for services.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Restart {
    /// Restart whatever the exit.
    Always,
    /// Restart after a failure only.
    OnFailure,
    /// Never restart.
    Never,
}

/// `catch_up` policies.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CatchUp {
    /// Forget fire times missed while the daemon was down.
    Skip,
    /// Run once for all of them.
    Once,
}

/// The wire name of a `ValueEnum` value (`on-failure`).
fn enum_name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

/// Definition options shared by `add` and `edit`. Every one is optional; only those given
/// are sent.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Definition")]
pub struct DefArgs {
    /// Run every D (`30s`, `5m`, `1h30m`)
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub every: Option<String>,
    /// Run on a cron schedule (5 fields, 6 with seconds, or @hourly, @daily…)
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// IANA time zone for --cron [default: the daemon's]
    #[arg(long, value_name = "TZ")]
    pub tz: Option<String>,
    /// Keep the process running, restarting it per --restart
    #[arg(long)]
    pub service: bool,
    /// Stop a run that lasts longer than D
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub timeout: Option<String>,
    /// Extra attempts for a failed run
    #[arg(long, value_name = "N", value_parser = count, allow_negative_numbers = true)]
    pub retries: Option<u32>,
    /// What a fire does while a run is active [default: skip]
    #[arg(long, value_name = "P", value_enum)]
    pub overlap: Option<Overlap>,
    /// Environment variable for the command (repeatable)
    #[arg(long, value_name = "K=V", value_parser = env_pair)]
    pub env: Vec<(String, String)>,
    /// Working directory (a relative path is taken from where taskctl runs)
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Run as this account (needs a root daemon)
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Create without starting or firing
    #[arg(long)]
    pub paused: bool,
    /// Run a script read from FILE, or from standard input with `-`
    #[arg(long, value_name = "FILE|-")]
    pub script: Option<String>,
    /// Free text
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Time between SIGTERM and SIGKILL when stopping [default: 5s]
    #[arg(long, value_name = "D", value_parser = duration, allow_hyphen_values = true)]
    pub kill_grace: Option<String>,
    /// Fire times missed while the daemon was down [default: skip]
    #[arg(long, value_name = "P", value_enum)]
    pub catch_up: Option<CatchUp>,
    /// When a service is restarted [default: on-failure]
    #[arg(long, value_name = "P", value_enum)]
    pub restart: Option<Restart>,
    /// Restart/retry delay, first and maximum, doubling: `1s..60s`
    #[arg(long, value_name = "D..D")]
    pub backoff: Option<String>,
    /// More than N starts within a window makes a service fatal: `5/60s`
    #[arg(long, value_name = "N/D")]
    pub start_limit: Option<String>,
    /// Bytes kept per stream per run: `1MiB`
    #[arg(long, value_name = "SIZE")]
    pub log_limit: Option<String>,
    /// Exit codes that count as success, comma-separated [default: 0]
    #[arg(long, value_name = "CODES", value_delimiter = ',', num_args = 1..)]
    pub success_codes: Option<Vec<i32>>,
    /// Runs kept for this unit [default: the daemon's keep_runs]
    #[arg(long, value_name = "N", value_parser = count, allow_negative_numbers = true)]
    pub keep_runs: Option<u32>,
    /// Where to run: `local`, agent names, label selectors (`role=web`), `*`; comma-separated
    /// [default: local]
    #[arg(long, value_name = "H,…", value_delimiter = ';', num_args = 1..)]
    pub hosts: Option<Vec<String>>,
    /// Hosts of one dispatch running at once [default: 0, all]
    #[arg(long, value_name = "N")]
    pub batch: Option<u32>,
    /// Failed hosts one dispatch allows before it pauses [default: no limit]
    #[arg(long, value_name = "N")]
    pub tolerance: Option<u32>,
    /// How long a run waits for its agent to connect [default: 5m]
    #[arg(long, value_name = "DURATION")]
    pub host_wait: Option<String>,
    /// A webhook POSTed when a run ends: `URL`, or `URL@on,on` with the outcomes that notify
    /// (succeeded, failed, timed_out, cancelled, lost) [default outcomes: failed, timed_out,
    /// lost]; repeatable
    #[arg(long, value_name = "URL[@ON,…]")]
    pub notify: Vec<String>,
    /// The command and its arguments, after `--` (with --script: the script's arguments)
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `--hosts` entries: comma-separated, except inside a selector (`role=web,dc=eu` stays
/// one entry: a comma followed by `key=` continues it). `;` always separates.
pub(crate) fn split_hosts(given: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for g in given {
        for part in g.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match out.last_mut() {
                Some(last) if last.contains('=') && part.contains('=') => {
                    last.push(',');
                    last.push_str(part);
                }
                _ => out.push(part.to_string()),
            }
        }
    }
    out
}

impl DefArgs {
    /// The definition fields these options set, as a JSON object without `name`. For `edit`,
    /// setting one of two exclusive fields removes the other (switching from `--cron` to
    /// `--every`, or from a command to a script, is one edit).
    fn fields(&self, editing: bool) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        let script = self.script.as_deref().map(read_script).transpose()?;
        if let Some(s) = script {
            put("script", json!(s));
            if !self.command.is_empty() {
                put("args", json!(self.command));
            }
        } else if !self.command.is_empty() {
            put("command", json!(self.command));
        }
        if let Some(v) = &self.every {
            put("every", json!(v));
        }
        if let Some(v) = &self.cron {
            put("cron", json!(v));
        }
        if let Some(v) = &self.tz {
            put("tz", json!(v));
        }
        if self.service {
            put("service", json!(true));
        }
        if let Some(v) = &self.timeout {
            put("timeout", json!(v));
        }
        if let Some(v) = self.retries {
            put("retries", json!(v));
        }
        if let Some(v) = self.overlap {
            put("overlap", json!(enum_name(v)));
        }
        if !self.env.is_empty() {
            let env: BTreeMap<_, _> = self.env.iter().cloned().collect();
            put("env", json!(env));
        }
        if let Some(v) = &self.cwd {
            // The daemon wants an absolute path; `--cwd .` means here, as in a shell.
            let path = std::path::Path::new(v);
            let joined = if path.is_absolute() {
                path.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|e| CliError::Usage(format!("--cwd {v}: {e}")))?
                    .join(path)
            };
            // `.` and `..` resolved lexically, as the shell shows the directory.
            let mut abs = std::path::PathBuf::new();
            for c in joined.components() {
                match c {
                    std::path::Component::CurDir => {}
                    std::path::Component::ParentDir => {
                        abs.pop();
                    }
                    other => abs.push(other),
                }
            }
            put("cwd", json!(abs));
        }
        if let Some(v) = &self.user {
            put("user", json!(v));
        }
        if self.paused {
            put("paused", json!(true));
        }
        if let Some(v) = &self.description {
            put("description", json!(v));
        }
        if let Some(v) = &self.kill_grace {
            put("kill_grace", json!(v));
        }
        if let Some(v) = self.catch_up {
            put("catch_up", json!(enum_name(v)));
        }
        if let Some(v) = self.restart {
            put("restart", json!(enum_name(v)));
        }
        if let Some(v) = &self.backoff {
            put("backoff", json!(v));
        }
        if let Some(v) = &self.start_limit {
            put("start_limit", json!(v));
        }
        if let Some(v) = &self.log_limit {
            put("log_limit", json!(v));
        }
        if let Some(v) = &self.success_codes {
            put("success_codes", json!(v));
        }
        if let Some(v) = self.keep_runs {
            put("keep_runs", json!(v));
        }
        if let Some(v) = &self.hosts {
            put("hosts", json!(split_hosts(v)));
        }
        if let Some(v) = self.batch {
            put("batch", json!(v));
        }
        if let Some(v) = self.tolerance {
            put("tolerance", json!(v));
        }
        if let Some(v) = &self.host_wait {
            put("host_wait", json!(v));
        }
        if !self.notify.is_empty() {
            let hooks: Vec<Value> = self
                .notify
                .iter()
                .map(|n| match n.rsplit_once('@') {
                    // An `@` in the URL's user part comes before its host: only a list of
                    // outcomes after the last `@` is one.
                    Some((url, on)) if !on.contains('/') && !on.contains(':') => {
                        json!({"url": url, "on": on.split(',').collect::<Vec<_>>()})
                    }
                    _ => json!({"url": n}),
                })
                .collect();
            put("notify", json!(hooks));
        }
        if editing {
            for (set, other) in
                [("every", "cron"), ("cron", "every"), ("command", "script"), ("script", "command")]
            {
                if m.contains_key(set) && !m.contains_key(other) {
                    m.insert(other.to_string(), Value::Null);
                }
            }
            drop_tz_with_cron(&mut m);
        }
        Ok(m)
    }
}

/// In an edit patch that removes `cron`, removes `tz` too unless the patch sets it: a zone
/// without a cron schedule means nothing, and the daemon refuses it.
fn drop_tz_with_cron(m: &mut Map<String, Value>) {
    if m.get("cron").is_some_and(Value::is_null) && !m.contains_key("tz") {
        m.insert("tz".into(), Value::Null);
    }
}

/// Reads a script from a file, or from standard input for `-`.
fn read_script(src: &str) -> anyhow::Result<String> {
    if src == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the script from stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(src).with_context(|| format!("cannot read the script {src}"))
    }
}

/// `taskctl add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The unit's name; alone, a tick unit or the unit file <units-dir>/NAME.toml
    pub name: String,
    #[command(flatten)]
    pub def: DefArgs,
}

/// `taskctl edit`.
#[derive(Debug, Args)]
pub struct EditArgs {
    /// The unit
    pub name: String,
    #[command(flatten)]
    pub def: DefArgs,
    /// Make a service a job again
    #[arg(long, conflicts_with = "service")]
    pub no_service: bool,
    /// Resume a paused unit (as `taskctl resume` does)
    #[arg(long, conflicts_with = "paused")]
    pub no_paused: bool,
    /// Remove fields, back to their defaults (repeatable): `--clear every --clear env`;
    /// `--clear cron` removes `tz` too
    #[arg(long, value_name = "FIELD", value_delimiter = ',', value_parser = clear_field)]
    pub clear: Vec<String>,
}

/// `taskctl del`.
#[derive(Debug, Args)]
pub struct DelArgs {
    /// The units
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Keep their runs and logs
    #[arg(long)]
    pub keep_history: bool,
}

/// `--limit` for `list`: a positive number.
fn list_limit(s: &str) -> Result<usize, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n as usize),
        _ => Err("must be a positive number".into()),
    }
}

/// `taskctl list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only units in this state
    #[arg(long, value_name = "S", value_parser = UnitState::ALL.map(UnitState::as_str))]
    pub state: Option<String>,
    /// Only units whose name matches this glob
    pub glob: Option<String>,
    /// At most N units, the first by name [default: all]
    #[arg(
        long,
        short = 'n',
        value_name = "N",
        value_parser = list_limit,
        allow_negative_numbers = true
    )]
    pub limit: Option<usize>,
    /// Only units named after this one (paging)
    #[arg(long, value_name = "NAME")]
    pub after: Option<String>,
}

/// Commands that take one unit name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// The unit
    pub name: String,
}

/// One line about a unit just added or changed: `hello (job, every 5m): next run in 5m`.
fn unit_line(u: &UnitInfo) -> String {
    let (kind, schedule) = kind_and_schedule(&u.definition);
    let what = if kind == "service" { kind } else { format!("{kind}, {schedule}") };
    let mut s = format!("{} ({what})", u.name);
    let active = u.last_run.as_ref().filter(|r| u.active_runs.contains(&r.id));
    let paused = u.state == "paused" || u.definition["paused"] == json!(true);
    if paused {
        s.push_str(": paused");
        if let Some(r) = active {
            s.push_str(&format!(" (run {} still {})", r.id, r.state));
        }
    } else if let Some(r) = active {
        s.push_str(&format!(": run {} {}", r.id, r.state));
    } else if let Some(next) = &u.next_fire {
        s.push_str(&format!(": next run {}", relative(next)));
    } else if let Some(r) = &u.last_run {
        s.push_str(&format!(": last run {}", run_summary(r)));
    } else {
        s.push_str(&format!(": {}", u.state));
    }
    s
}

/// `taskctl add`.
pub async fn add(ctx: &Ctx, a: AddArgs) -> anyhow::Result<()> {
    let fields = a.def.fields(false)?;
    let arg = if fields.is_empty() {
        AddArg::Name(a.name.clone())
    } else {
        let mut def = Map::new();
        def.insert("name".into(), json!(a.name));
        def.extend(fields);
        AddArg::Definition(Value::Object(def))
    };
    let res = ctx.call(ctx.client.add(arg)).await?;
    if ctx.json {
        return output::json(&res);
    }
    let info = match res {
        AddResult::Unit(u) => *u,
        // The bare-name form answers `true`; fetch the unit to say what was made of it.
        AddResult::Done(_) => ctx.call(ctx.client.get(a.name)).await?,
    };
    output::line(&format!("added {}", unit_line(&info)))
}

/// `taskctl edit`.
pub async fn edit(ctx: &Ctx, a: EditArgs) -> anyhow::Result<()> {
    let mut fields = a.def.fields(true)?;
    if a.no_service {
        fields.insert("service".into(), json!(false));
    }
    for f in a.clear {
        // Back to the default, `false`, said as such: the daemon pauses or resumes on a
        // boolean `paused` only.
        let v = if f == "paused" { json!(false) } else { Value::Null };
        fields.insert(f, v);
    }
    if a.no_paused {
        fields.insert("paused".into(), json!(false));
    }
    drop_tz_with_cron(&mut fields);
    if fields.is_empty() {
        return Err(CliError::Usage(format!(
            "nothing to change: give options, e.g. `taskctl edit {} --every 5m`",
            a.name
        ))
        .into());
    }
    let mut patch = Map::new();
    patch.insert("name".into(), json!(a.name));
    patch.extend(fields);
    let info = ctx.call(ctx.client.edit(patch)).await?;
    if ctx.json {
        return output::json(&info);
    }
    output::line(&format!("edited {}", unit_line(&info)))
}

/// `taskctl del`: each name in turn; fails (exit 1) if any did.
pub async fn del(ctx: &Ctx, a: DelArgs) -> anyhow::Result<()> {
    let mut failed = false;
    let mut done = Map::new();
    for name in &a.names {
        let arg = if a.keep_history {
            DeleteArg::Options { name: name.clone(), keep_history: true }
        } else {
            DeleteArg::Name(name.clone())
        };
        match ctx.client.delete(arg).await {
            Ok(v) => {
                if ctx.json {
                    done.insert(name.clone(), json!(v));
                } else {
                    output::line(&format!("deleted {name}"))?;
                }
            }
            Err(e) => {
                let e = ctx.rpc_error(e);
                if matches!(e, CliError::Unreachable { .. }) {
                    return Err(e.into());
                }
                // One line per failure; the daemon's message usually names the unit.
                let msg = e.to_string();
                if msg.contains(name.as_str()) {
                    eprintln!("taskctl: {msg}");
                } else {
                    eprintln!("taskctl: {name}: {msg}");
                }
                failed = true;
            }
        }
    }
    if ctx.json {
        output::json(&done)?;
    }
    if failed { Err(CliError::Reported.into()) } else { Ok(()) }
}

/// `taskctl list`.
pub async fn list(ctx: &Ctx, a: ListArgs) -> anyhow::Result<()> {
    let filtered = a.state.is_some() || a.glob.is_some() || a.after.is_some();
    let want = a.limit.unwrap_or(usize::MAX);
    // Page by page, of the daemon's default size plus one (a daemon with a thousand units
    // answers in one call, not two; a page stays far below the 16 MiB reply limit, whatever
    // the descriptions); one more than asked for, so that a cut list can say so.
    let mut units: Vec<UnitSummary> = Vec::new();
    let mut after = a.after;
    let more = loop {
        let page = (want.saturating_add(1) - units.len()).min(UNIT_PAGE.0 as usize + 1) as u32;
        let arg = ListArg {
            state: a.state.clone(),
            name_glob: a.glob.clone(),
            limit: Some(page),
            after: after.clone(),
        };
        let got = ctx.call(ctx.client.list(Some(arg))).await?.into_value()?;
        let full = got.len() == page as usize;
        after = got.last().map(|u| u.name.clone());
        units.extend(got);
        if units.len() > want {
            units.truncate(want);
            break true;
        }
        if !full {
            break false;
        }
    };
    if ctx.json {
        return output::json(&units);
    }
    if units.is_empty() {
        return output::line(if filtered {
            "no units match"
        } else {
            "no units; add one with `taskctl add NAME -- COMMAND`"
        });
    }
    let mut t = output::Table::new(&[
        "NAME", "KIND", "SCHEDULE", "STATE", "NEXT", "LAST RUN", "RUNS", "FAILS",
    ])
    .flexible(&["NAME", "SCHEDULE", "LAST RUN"]);
    for u in &units {
        let schedule = if u.kind == "service" { String::new() } else { u.schedule.clone() };
        t.add_row(vec![
            output::Cell::new(&u.name),
            output::Cell::new(&u.kind),
            output::Cell::new(schedule),
            output::state_cell(&u.state),
            output::Cell::new(u.next_fire.as_deref().map(relative).unwrap_or_default()),
            output::Cell::new(u.last_run.as_ref().map(run_summary).unwrap_or_default()),
            output::Cell::new(u.runs_total.to_string()),
            output::Cell::new(u.failures_total.to_string()),
        ]);
    }
    output::print_table(&t)?;
    if more && let Some(last) = units.last() {
        eprintln!("… more units: taskctl list --after {} (or a larger --limit)", last.name);
    }
    Ok(())
}

/// `taskctl show`.
pub async fn show(ctx: &Ctx, a: NameArg) -> anyhow::Result<()> {
    let u = ctx.call(ctx.client.get(a.name)).await?;
    if ctx.json {
        return output::json(&u);
    }
    let (kind, schedule) = kind_and_schedule(&u.definition);
    let mut rows = vec![("name".to_string(), u.name.clone()), ("state".into(), u.state.clone())];
    if u.state == "fatal" {
        rows.push((
            "fatal".into(),
            format!("hit its start limit; 'taskctl start {}' resets it", u.name),
        ));
    }
    rows.extend([
        ("kind".into(), if kind == "service" { kind } else { format!("{kind}, {schedule}") }),
        ("next fire".into(), u.next_fire.as_deref().map_or("-".into(), time_and_relative)),
        ("last run".into(), u.last_run.as_ref().map_or("-".into(), run_summary)),
    ]);
    if !u.active_runs.is_empty() {
        let ids: Vec<String> = u.active_runs.iter().map(|id| format!("#{id}")).collect();
        rows.push(("active runs".into(), ids.join(" ")));
    }
    if let Some(d) = u.last_run.as_ref().and_then(|r| r.dispatch) {
        let client = &ctx.client;
        if let Ok(d) = crate::rpc::agents::DispatchApiClient::get(client, d).await {
            let shown = format!("#{} {}: {}", d.id, d.state, super::fleet::progress(&d));
            rows.push(("dispatch".into(), shown));
        }
    }
    rows.push(("runs".into(), format!("{} ({} failed)", u.runs_total, u.failures_total)));
    rows.push(("created".into(), time_and_relative(&u.created_at)));
    rows.push(("updated".into(), time_and_relative(&u.updated_at)));
    let mut s = output::key_values(&rows, "");
    s.push_str("definition:\n");
    if let Some(def) = u.definition.as_object() {
        let rows: Vec<(String, String)> = def
            .iter()
            // Empty defaults (no env, no args, no description) say nothing.
            .filter(|(k, v)| k.as_str() != "name" && !is_empty(v))
            .flat_map(|(k, v)| match (k.as_str(), v) {
                // One variable per line, quoted: values may hold spaces, '=' or newlines.
                ("env", Value::Object(vars)) => vars
                    .iter()
                    .map(|(name, val)| (format!("env.{name}"), val.to_string()))
                    .collect::<Vec<_>>(),
                _ => vec![(k.clone(), output::value_text(k, v))],
            })
            .collect();
        s.push_str(&output::key_values(&rows, "  "));
    }
    output::emit(&s)
}

/// Whether a definition value is empty: `""`, `[]`, `{}` or null.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `taskctl start`.
pub async fn start(ctx: &Ctx, a: NameArg) -> anyhow::Result<()> {
    let r = ctx.call(ctx.client.start(a.name)).await?;
    if ctx.json {
        return output::json(&r);
    }
    output::line(&format!("{}: run {} {}", r.unit, r.id, r.state))
}

/// `taskctl stop`.
pub async fn stop(ctx: &Ctx, a: NameArg) -> anyhow::Result<()> {
    let n = ctx.call(ctx.client.stop(a.name.clone())).await?;
    if ctx.json {
        return output::json(&n);
    }
    let runs = if n == 1 { "run" } else { "runs" };
    output::line(&format!("{}: stopped {n} {runs}", a.name))
}

/// `taskctl pause` and `taskctl resume`.
pub async fn pause(ctx: &Ctx, a: NameArg, pause: bool) -> anyhow::Result<()> {
    let u = if pause {
        ctx.call(ctx.client.pause(a.name)).await?
    } else {
        ctx.call(ctx.client.resume(a.name)).await?
    };
    if ctx.json {
        return output::json(&u);
    }
    let verb = if pause { "paused" } else { "resumed" };
    output::line(&format!("{verb} {}", unit_line(&u)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs_need_an_equals_sign() {
        assert_eq!(env_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(env_pair("A").is_err());
        assert!(env_pair("=x").is_err());
    }

    #[test]
    fn an_edit_that_sets_every_removes_cron() {
        let d = DefArgs { every: Some("5m".into()), ..Default::default() };
        let m = d.fields(true).unwrap();
        assert_eq!(m["every"], json!("5m"));
        assert_eq!(m["cron"], Value::Null);
        assert!(d.fields(false).unwrap().get("cron").is_none());
    }

    #[test]
    fn clearing_cron_clears_tz_unless_tz_is_set() {
        let mut m = Map::new();
        m.insert("cron".into(), Value::Null);
        drop_tz_with_cron(&mut m);
        assert_eq!(m.get("tz"), Some(&Value::Null));
        let mut m = Map::new();
        m.insert("cron".into(), Value::Null);
        m.insert("tz".into(), json!("UTC"));
        drop_tz_with_cron(&mut m);
        assert_eq!(m["tz"], json!("UTC"));
    }

    #[test]
    fn clear_takes_known_fields_only() {
        assert_eq!(clear_field("kill-grace"), Ok("kill_grace".into()));
        assert!(clear_field("name").is_err());
        let e = clear_field("colour").unwrap_err();
        assert!(e.contains("every") && e.contains("cron") && !e.contains("name"), "{e}");
    }

    #[test]
    fn negative_values_say_what_is_wrong() {
        assert_eq!(count("3"), Ok(3));
        assert_eq!(count("-1"), Err("must be 0 or more".into()));
        assert!(duration("-5s").unwrap_err().contains("positive"));
        assert_eq!(duration("5s"), Ok("5s".into()));
    }

    #[test]
    fn no_options_means_no_fields() {
        assert!(DefArgs::default().fields(false).unwrap().is_empty());
    }
}
