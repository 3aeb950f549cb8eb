//! `taskctl agents`, `exec`, `dispatches`, `dispatch`: the fleet of agents and the runs of
//! units on many hosts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::output::{self, Cell, Table, relative, state_cell};
use super::units::split_hosts;
use super::{CliError, Ctx};
use crate::rpc::agents::{
    AgentApiClient, DispatchApiClient, DispatchInfo, DispatchListArg, JoinTokenArg,
};
use crate::rpc::run::RunApiClient;
use crate::rpc::types::{AddArg, AddResult, FollowArg, FollowItem};
use crate::rpc::unit::TaskUnitApiClient;

/// `taskctl agents`.
#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// What to do (list them when absent).
    #[command(subcommand)]
    pub action: Option<AgentsAction>,
}

/// `taskctl agents …` actions.
#[derive(Debug, Subcommand)]
pub enum AgentsAction {
    /// Print a one-time token a new agent enrolls with (`taskd agent --join TOKEN`)
    JoinToken {
        /// How long it is good for
        #[arg(long, default_value = "1h", value_name = "DURATION")]
        ttl: String,
    },
    /// Close an agent's connection and refuse its credential from now on
    Revoke {
        /// The agent's name
        name: String,
    },
}

/// `taskctl agents`.
pub async fn agents(ctx: &Ctx, a: AgentsArgs) -> anyhow::Result<()> {
    match a.action {
        None => {
            let list = ctx.call(AgentApiClient::list(&ctx.client, None)).await?;
            if ctx.json {
                return output::json(&list);
            }
            let mut t = Table::new(&["NAME", "STATE", "LABELS", "RUNNING", "LAST SEEN", "ADDRESS"]);
            for a in &list {
                let labels: Vec<String> =
                    a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                t.add_row(vec![
                    Cell::new(&a.name),
                    state_cell(&a.state),
                    Cell::new(labels.join(",")),
                    Cell::new(a.running.to_string()),
                    Cell::new(
                        a.last_seen.as_deref().map(relative).unwrap_or_else(|| "never".into()),
                    ),
                    Cell::new(a.addr.clone().unwrap_or_default()),
                ]);
            }
            output::print_table(&t)
        }
        Some(AgentsAction::JoinToken { ttl }) => {
            let t = ctx.call(ctx.client.join_token(Some(JoinTokenArg { ttl: Some(ttl) }))).await?;
            if ctx.json {
                return output::json(&t);
            }
            output::line(&t.token)?;
            // In a cluster, every server the agent may use (it goes on to the next when one
            // is away); else the address dialled.
            let status = crate::rpc::daemon::DaemonApiClient::status(&ctx.client, None);
            let cluster = ctx.call(status).await.ok().and_then(|s| s.cluster);
            let servers: Vec<String> = cluster.map_or_else(Vec::new, |c| {
                c.servers.into_iter().filter(|s| s.role != "gone").map(|s| s.address).collect()
            });
            let servers = if servers.is_empty() { ctx.addr.clone() } else { servers.join(",") };
            eprintln!(
                "taskctl: good once, until {}: on the new host run\n  taskd agent --server {servers} --join {}",
                output::local_time(&t.expires_at),
                t.token
            );
            Ok(())
        }
        Some(AgentsAction::Revoke { name }) => {
            let a = ctx.call(AgentApiClient::revoke(&ctx.client, name)).await?;
            if ctx.json {
                return output::json(&a);
            }
            output::line(&format!("agent {} revoked", a.name))
        }
    }
}

/// `taskctl exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Where to run: agent names, label selectors (`role=web`), `*`, `local`
    #[arg(long, required = true, value_name = "H,…", value_delimiter = ';', num_args = 1..)]
    pub hosts: Vec<String>,
    /// Account to run as (on each host)
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Stop each host's run after this long
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Hosts running at once [default: all]
    #[arg(long, value_name = "N")]
    pub batch: Option<u32>,
    /// Run this script file instead of a command
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
    /// Print each host's output together once it ended, instead of line by line as it comes
    #[arg(long)]
    pub group: bool,
    /// The command and its arguments, after `--`
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `taskctl exec`: a one-shot unit on the hosts, each host's output as it comes, a summary,
/// exit 0 only if every host succeeded.
pub async fn exec(ctx: &Ctx, a: ExecArgs) -> anyhow::Result<()> {
    let mut def = serde_json::Map::new();
    let stamp = jiff::Timestamp::now().as_millisecond();
    def.insert("name".into(), json!(format!("exec-{stamp}-{}", std::process::id() % 1000)));
    def.insert("hosts".into(), json!(split_hosts(&a.hosts)));
    match (&a.script, a.command.is_empty()) {
        (Some(path), true) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
            def.insert("script".into(), json!(text));
        }
        (None, false) => {
            def.insert("command".into(), json!(a.command));
        }
        _ => {
            return Err(
                CliError::Usage("give a command after `--`, or --script FILE".into()).into()
            );
        }
    }
    if let Some(u) = &a.user {
        def.insert("user".into(), json!(u));
    }
    if let Some(t) = &a.timeout {
        def.insert("timeout".into(), json!(t));
    }
    if let Some(b) = a.batch {
        def.insert("batch".into(), json!(b));
    }
    def.insert("keep_runs".into(), json!(1));
    add_and_follow(ctx, def, a.group).await
}

/// `taskctl push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The local file to put on the hosts
    pub file: PathBuf,
    /// Where: agent names, label selectors (`role=web`), `*`, `local`
    #[arg(long, required = true, value_name = "H,…", value_delimiter = ';', num_args = 1..)]
    pub hosts: Vec<String>,
    /// Where it goes on each host (an absolute path; under the agent's --allowed-dirs)
    #[arg(long, value_name = "PATH")]
    pub dest: String,
    /// Its mode, in octal [default: 0644]
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// Its owner, USER or USER:GROUP (the agent must run as root to give it away)
    #[arg(long, value_name = "USER[:GROUP]")]
    pub owner: Option<String>,
    /// Hosts written to at once [default: all]
    #[arg(long, value_name = "N")]
    pub batch: Option<u32>,
}

/// Bytes sent per `File.Append` (base64 makes them 4/3 larger: well inside the daemon's
/// default 1 MiB request limit).
const PUSH_PIECE: usize = 512 * 1024;

/// `taskctl push`: uploads the file unless the daemon keeps it already (by its SHA-256), then
/// a one-shot `file` unit on the hosts, a line per host, exit 0 only if every host has it.
pub async fn push(ctx: &Ctx, a: PushArgs) -> anyhow::Result<()> {
    use sha2::Digest;
    use std::io::Read;
    let open = || {
        std::fs::File::open(&a.file)
            .map_err(|e| CliError::Usage(format!("{}: {e}", a.file.display())))
    };
    // The checksum first: a file the daemon has is not sent again.
    let (sha, size) = {
        let mut f = open()?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut size = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| CliError::Usage(format!("{}: {e}", a.file.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        (crate::store::content::hex(&h.finalize()), size)
    };
    // A connection lost mid-upload (in a cluster, the server that took it died, or the one
    // relaying to it) is dialled again until a server answers at one of the addresses given
    // (another server, or one that took over the address), for up to `UPLOAD_RETRY_FOR` after
    // each loss and `UPLOAD_RESTARTS` times, and the upload starts over there: uploads are not
    // kept across servers, only files.
    let mut fresh: Option<Ctx> = None;
    let mut restarts = 0;
    let source = loop {
        let c = fresh.as_ref().unwrap_or(ctx);
        let err = match upload(c, &a.file, &sha, size).await {
            Ok(source) => break source,
            Err(e) => e,
        };
        if !is_unreachable(&err) || restarts == UPLOAD_RESTARTS {
            return Err(err);
        }
        restarts += 1;
        eprintln!("taskctl: {err}; dialling again to send {} again", a.file.display());
        let until = tokio::time::Instant::now() + UPLOAD_RETRY_FOR;
        fresh = Some(loop {
            tokio::time::sleep(REDIAL_EVERY).await;
            match tokio::time::timeout_at(until, c.redial()).await {
                Ok(Ok(new)) => break new,
                // Refused (a token or certificate the server that answers does not take).
                Ok(Err(e)) if !is_unreachable(&e) => return Err(e),
                Ok(Err(e)) if tokio::time::Instant::now() >= until => return Err(e),
                Ok(Err(_)) => {}
                Err(_) => return Err(err),
            }
        });
    };
    let ctx = fresh.as_ref().unwrap_or(ctx);
    let mut file = serde_json::Map::new();
    file.insert("source".into(), json!(source));
    file.insert("dest".into(), json!(a.dest));
    if let Some(m) = &a.mode {
        file.insert("mode".into(), json!(m));
    }
    if let Some(o) = &a.owner {
        file.insert("owner".into(), json!(o));
    }
    let mut def = serde_json::Map::new();
    let stamp = jiff::Timestamp::now().as_millisecond();
    def.insert("name".into(), json!(format!("push-{stamp}-{}", std::process::id() % 1000)));
    def.insert("hosts".into(), json!(split_hosts(&a.hosts)));
    def.insert("file".into(), Value::Object(file));
    if let Some(b) = a.batch {
        def.insert("batch".into(), json!(b));
    }
    def.insert("keep_runs".into(), json!(1));
    add_and_follow(ctx, def, false).await
}

/// How long `taskctl push` dials again after losing its connection mid-upload: a cluster's
/// lease (10 s by default) and then some.
const UPLOAD_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);
/// How many times it starts an upload over, at most (on a server that lived, each leaves an
/// upload open until it idles out: see `store::content::UPLOAD_IDLE`).
const UPLOAD_RESTARTS: u32 = 3;
/// How often it dials meanwhile.
const REDIAL_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether `e` says the daemon could not be reached (or went away).
fn is_unreachable(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<CliError>(), Some(CliError::Unreachable { .. }))
}

/// Sends `file` (its SHA-256 `sha`, `size` bytes) unless the daemon keeps it already; its
/// `source` for a `file` unit.
async fn upload(ctx: &Ctx, file: &std::path::Path, sha: &str, size: u64) -> anyhow::Result<String> {
    use crate::rpc::files::{AppendArg, BeginArg, CommitArg, FileApiClient};
    use base64::Engine;
    let open = || {
        std::fs::File::open(file).map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))
    };
    if let Ok(kept) = ctx.call(FileApiClient::stat(&ctx.client, sha.to_string())).await {
        return Ok(kept.source);
    }
    let up = ctx.call(FileApiClient::begin(&ctx.client, BeginArg { size })).await?.upload;
    let mut f = open()?;
    let mut buf = vec![0u8; PUSH_PIECE];
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)
            .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
        if n == 0 {
            break;
        }
        let data = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
        let piece = AppendArg { upload: up, offset, data };
        offset = ctx.call(FileApiClient::append(&ctx.client, piece)).await?;
    }
    let kept = ctx.call(FileApiClient::commit(&ctx.client, CommitArg { upload: up })).await?;
    if kept.source != format!("sha256:{sha}") {
        anyhow::bail!("{} changed while it was sent; push it again", file.display());
    }
    Ok(kept.source)
}

/// Reads until `buf` is full or the file ends: the bytes read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Adds the one-shot unit `def` on its hosts and follows its dispatch: each host's output
/// (line by line, or grouped per host), then a summary; exit 0 only if every host succeeded.
async fn add_and_follow(
    ctx: &Ctx,
    def: serde_json::Map<String, Value>,
    group: bool,
) -> anyhow::Result<()> {
    let added = ctx.call(ctx.client.add(AddArg::Definition(Value::Object(def)))).await?;
    let AddResult::Unit(unit) = added else {
        anyhow::bail!("the daemon answered an add without a unit")
    };
    let Some(first) = unit.last_run.clone() else {
        anyhow::bail!("unit {} started no run", unit.name);
    };
    // On agents, a dispatch; on the daemon's own host alone (`--hosts local`), one run.
    let dispatch = first.dispatch;
    let runs = match dispatch {
        Some(id) => {
            ctx.call(DispatchApiClient::get(&ctx.client, id)).await?.runs.unwrap_or_default()
        }
        None => vec![first],
    };
    let width = runs.iter().map(|r| r.host.len()).max().unwrap_or(0);
    let mut streams = Vec::new();
    for r in &runs {
        let arg = FollowArg { id: r.id, offset: None, stream: None, timestamps: false, tail: None };
        let sub = ctx.call(ctx.client.follow(arg)).await?;
        let host = r.host.clone();
        streams.push(sub.map(move |item| (host.clone(), item)).boxed());
    }
    let mut merged = futures_util::stream::select_all(streams);
    let mut partial: BTreeMap<String, String> = BTreeMap::new();
    let mut grouped: BTreeMap<String, String> = BTreeMap::new();
    let mut left = runs.len();
    while left > 0 {
        let next = tokio::select! {
            n = merged.next() => n,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("taskctl: stopped following; the runs go on (unit {})", unit.name);
                return Err(CliError::Reported.into());
            }
        };
        let Some((host, item)) = next else { break };
        match item {
            Ok(FollowItem::Output { data, .. }) => {
                if ctx.json {
                    output::json_line(&json!({"host": host, "data": data}))?;
                } else if group {
                    grouped.entry(host).or_default().push_str(&data);
                } else {
                    let buf = partial.entry(host.clone()).or_default();
                    buf.push_str(&data);
                    while let Some(i) = buf.find('\n') {
                        let line: String = buf.drain(..=i).collect();
                        output::emit(&format!("{host:>width$}: {line}"))?;
                    }
                }
            }
            Ok(FollowItem::End { .. }) => {
                left -= 1;
                if let Some(rest) = partial.remove(&host).filter(|r| !r.is_empty()) {
                    output::emit(&format!("{host:>width$}: {rest}\n"))?;
                }
                if let Some(text) = grouped.remove(&host) {
                    output::emit(&format!("--- {host}\n{text}"))?;
                }
            }
            Ok(FollowItem::Lagged { message }) => {
                left -= 1;
                eprintln!("taskctl: {host}: {message}");
            }
            Err(e) => return Err(anyhow::Error::new(e).context("bad message from taskd")),
        }
    }
    // Every host's newest run, as recorded.
    let (ended, d) = match dispatch {
        Some(id) => {
            let d = ctx.call(DispatchApiClient::get(&ctx.client, id)).await?;
            (d.runs.clone().unwrap_or_default(), Some(d))
        }
        None => (vec![ctx.call(RunApiClient::get(&ctx.client, runs[0].id)).await?], None),
    };
    let mut latest: BTreeMap<String, crate::rpc::types::RunInfo> = BTreeMap::new();
    for r in ended {
        latest.insert(r.host.clone(), r);
    }
    let ok = latest.values().filter(|r| r.state == "succeeded").count();
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for r in latest.values() {
        *by_state.entry(r.state.as_str()).or_default() += 1;
        if r.state != "succeeded" && !ctx.json {
            eprintln!("taskctl: {}: {}", r.host, super::runs::ended(r));
        }
    }
    if ctx.json {
        match &d {
            Some(d) => output::json_line(d)?,
            None => output::json_line(&latest.values().collect::<Vec<_>>())?,
        }
    } else {
        let parts: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
        eprintln!("{} hosts: {}", latest.len(), parts.join(", "));
    }
    if ok == latest.len() { Ok(()) } else { Err(CliError::Reported.into()) }
}

/// `taskctl dispatches [NAME]`.
#[derive(Debug, Args)]
pub struct DispatchesArgs {
    /// Only this unit's
    pub name: Option<String>,
    /// At most this many
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

/// The progress line of a dispatch: `7/10 done: 6 succeeded, 1 failed, 3 running`.
pub fn progress(d: &DispatchInfo) -> String {
    let active = ["running", "queued"];
    let done: u32 =
        d.counts.iter().filter(|(s, _)| !active.contains(&s.as_str())).map(|(_, n)| n).sum();
    let mut parts: Vec<(&String, &u32)> = d.counts.iter().collect();
    parts.sort_by_key(|(s, _)| active.contains(&s.as_str()));
    let parts: Vec<String> = parts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!("{done}/{} done: {}", d.total, parts.join(", "))
}

/// `taskctl dispatches`.
pub async fn dispatches(ctx: &Ctx, a: DispatchesArgs) -> anyhow::Result<()> {
    let arg = DispatchListArg { unit: a.name, state: None, limit: Some(a.limit), before: None };
    let list = ctx.call(DispatchApiClient::list(&ctx.client, Some(arg))).await?;
    if ctx.json {
        return output::json(&list);
    }
    let mut t = Table::new(&["ID", "UNIT", "STATE", "CREATED", "PROGRESS"]);
    for d in &list {
        t.add_row(vec![
            Cell::new(d.id.to_string()),
            Cell::new(&d.unit),
            state_cell(&d.state),
            Cell::new(relative(&d.created_at)),
            Cell::new(progress(d)),
        ]);
    }
    output::print_table(&t)
}

/// `taskctl dispatch ID` and `taskctl dispatch cancel|pause|resume ID`.
#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// The dispatch's id, or `cancel`, `pause`, `resume` followed by it
    #[arg(value_name = "ID|ACTION")]
    pub what: String,
    /// The dispatch's id, after an action
    #[arg(value_name = "ID")]
    pub id: Option<i64>,
}

/// `taskctl redo RUN` / `taskctl ignore RUN`.
#[derive(Debug, Args)]
pub struct RunArg {
    /// The run's id
    pub run: i64,
}

/// `taskctl redo RUN`: the run again on its host, as a new attempt.
pub async fn redo(ctx: &Ctx, a: RunArg) -> anyhow::Result<()> {
    let r = ctx.call(RunApiClient::redo(&ctx.client, a.run)).await?;
    if ctx.json {
        return output::json(&r);
    }
    output::line(&format!(
        "run {} on {}: attempt {} started as run {}",
        a.run, r.host, r.attempt, r.id
    ))
}

/// `taskctl ignore RUN`: the run no longer counts against its dispatch.
pub async fn ignore(ctx: &Ctx, a: RunArg) -> anyhow::Result<()> {
    let r = ctx.call(RunApiClient::ignore(&ctx.client, a.run)).await?;
    if ctx.json {
        return output::json(&r);
    }
    output::line(&format!("run {} on {} ignored", r.id, r.host))
}

/// `taskctl dispatch ID`: progress and a row per host.
pub async fn dispatch(ctx: &Ctx, a: DispatchArgs) -> anyhow::Result<()> {
    let usage =
        || CliError::Usage("usage: taskctl dispatch ID | dispatch cancel|pause|resume ID".into());
    let id = match (a.what.parse::<i64>(), a.id) {
        (Ok(id), None) => id,
        (Err(_), Some(id)) => {
            let client = &ctx.client;
            let d = match a.what.as_str() {
                "cancel" => ctx.call(DispatchApiClient::cancel(client, id)).await?,
                "pause" => ctx.call(DispatchApiClient::pause(client, id)).await?,
                "resume" => ctx.call(DispatchApiClient::resume(client, id)).await?,
                _ => return Err(usage().into()),
            };
            if ctx.json {
                return output::json(&d);
            }
            return output::line(&format!("dispatch {} {}: {}", d.id, d.state, progress(&d)));
        }
        _ => return Err(usage().into()),
    };
    let d = ctx.call(DispatchApiClient::get(&ctx.client, id)).await?;
    if ctx.json {
        return output::json(&d);
    }
    output::line(&format!("dispatch {} of {} ({}): {}", d.id, d.unit, d.state, progress(&d)))?;
    let mut t = Table::new(&["HOST", "RUN", "STATE", "EXIT", "DURATION", "REASON"]);
    for r in d.runs.as_deref().unwrap_or_default() {
        let state = match &r.host_state {
            Some(h) if h != "connected" => format!("{} ({h})", r.state),
            _ => r.state.clone(),
        };
        t.add_row(vec![
            Cell::new(&r.host),
            Cell::new(r.id.to_string()),
            state_cell(&state),
            Cell::new(output::exit_of(r)),
            Cell::new(r.duration_ms.map(output::duration_ms).unwrap_or_default()),
            Cell::new(r.reason.clone().unwrap_or_default()),
        ]);
    }
    output::print_table(&t)
}
