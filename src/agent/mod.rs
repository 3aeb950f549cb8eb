//! `taskd agent`: a host's agent. It connects out to its server (no port opens on the host),
//! enrolls once with a join token, then logs in with its credential, registers, and runs
//! what it is assigned with the same executor the daemon uses for its own host
//! ([`LocalExecutor`]), streaming output as it comes.
//!
//! Mechanism: one connection at a time ([`session`]), with the orders stream
//! (`AgentLink.Attach`), a heartbeat every [`proto::HEARTBEAT_EVERY`], and a sender task that
//! drains each run's [`Outbox`] in bounded batches and reports results. A run is journaled
//! (`accept`) before it starts and its outcome (`result`) before it is reported; it is
//! forgotten only once the server acknowledges its end ([`journal`]). The server is told of
//! output at least once per chunk (chunks carry their number, and the server writes each
//! once), so nothing the run printed is lost to a reconnection, up to [`OUTBOX_LIMIT`] bytes
//! per run while the server is away: beyond that the run waits on its pipe.
//!
//! Limits: output is sent as text (invalid UTF-8 replaced); the agent's own process is the
//! subreaper of its runs, so one agent per host account is the intended setup.

pub mod journal;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use jiff::Timestamp;
use jsonrpsee::core::client::Subscription;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::exec;
use crate::executor::{LocalExecutor, OnStart, RunSink, StopCause};
use crate::proto::{self, Assignment, Chunk, Hello, JoinRequest, Order, Outcome};
use crate::rpc::client::Client;
use crate::rpc::link::AgentLinkApiClient;
use crate::run::{RunRecord, RunState, StopReason, Trigger};
use crate::store::logs::{LogSummary, Stream};
use crate::tls::Trust;
use crate::unit::definition::{UnitConfig, UnitDef, ValidateCtx, resolve_allowed_dirs};
use journal::{Durable, Entry, Journal};

/// `taskd agent`'s flags. Every flag has a `TASKD_AGENT_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The server(s) to connect to, tried in turn: HOST:PORT[,HOST:PORT…]
    #[arg(
        long,
        env = "TASKD_AGENT_SERVER",
        value_name = "ADDR",
        value_delimiter = ',',
        required = true
    )]
    pub server: Vec<String>,
    /// This agent's name [default: the host name]
    #[arg(long, env = "TASKD_AGENT_NAME")]
    pub name: Option<String>,
    /// Labels `hosts` selectors match: k=v[,k=v…]
    #[arg(long, env = "TASKD_AGENT_LABELS", value_delimiter = ',', value_name = "K=V")]
    pub labels: Vec<String>,
    /// State directory: credential, journal [default: /var/lib/taskd-agent as root, else
    /// ~/.local/state/taskd-agent]
    #[arg(long, env = "TASKD_AGENT_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A join token from `taskctl agents join-token`, for the first start
    #[arg(long, env = "TASKD_AGENT_JOIN", value_name = "TOKEN")]
    pub join: Option<String>,
    /// Most runs at once; more wait their turn
    #[arg(long, env = "TASKD_AGENT_MAX_RUNS", default_value_t = 64)]
    pub max_runs: u32,
    /// Runs' `cwd` must lie under one of these
    #[arg(long, env = "TASKD_AGENT_ALLOWED_DIRS", value_delimiter = ',', value_name = "DIR")]
    pub allowed_dirs: Vec<PathBuf>,
    /// Runs' `user` must be one of these
    #[arg(long, env = "TASKD_AGENT_ALLOWED_USERS", value_delimiter = ',', value_name = "USER")]
    pub allowed_users: Vec<String>,
    /// Trust the server's TLS certificate if this CA signed it (instead of the fingerprint a
    /// join token carries)
    #[arg(long, env = "TASKD_AGENT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Trust the server's TLS certificate by this SHA-256 fingerprint (instead of the one a
    /// join token carries)
    #[arg(long, env = "TASKD_AGENT_FINGERPRINT", value_name = "SHA256", conflicts_with = "ca")]
    pub fingerprint: Option<String>,
    /// Allow plain TCP (join token and credential in clear) to a server that is not on
    /// loopback
    #[arg(long, env = "TASKD_AGENT_INSECURE")]
    pub insecure: bool,
}

/// Whether `addr` (`host:port`) is on this host's loopback.
fn is_loopback(addr: &str) -> bool {
    let host = crate::tls::host_of(addr);
    host == "localhost"
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Whom the agent trusts over TLS: `--ca`, else the server fingerprint kept from its join
/// token (`<state-dir>/server-fingerprint`, written on first start); none: plain TCP.
fn trust(
    dir: &Path,
    ca: Option<&Path>,
    fingerprint: Option<&str>,
    join: Option<&str>,
) -> anyhow::Result<Option<Trust>> {
    if let Some(ca) = ca {
        return Ok(Some(Trust::Ca(ca.to_path_buf())));
    }
    if let Some(fp) = fingerprint {
        let fp = crate::tls::normalise_fingerprint(fp)
            .context("--fingerprint: not a SHA-256 fingerprint (64 hex digits)")?;
        return Ok(Some(Trust::Fingerprint(fp)));
    }
    let kept = dir.join("server-fingerprint");
    if let Ok(fp) = std::fs::read_to_string(&kept) {
        let fp = crate::tls::normalise_fingerprint(&fp)
            .with_context(|| format!("{}: not a SHA-256 fingerprint", kept.display()))?;
        return Ok(Some(Trust::Fingerprint(fp)));
    }
    if let Some((_, Some(fp))) = join.map(proto::split_join_token) {
        let fp = crate::tls::normalise_fingerprint(fp)
            .context("the join token's fingerprint is not a SHA-256 fingerprint")?;
        crate::state_dir::write_private(dir, "server-fingerprint", format!("{fp}\n").as_bytes())?;
        return Ok(Some(Trust::Fingerprint(fp)));
    }
    Ok(None)
}

/// Output kept per run while the server has not taken it.
pub const OUTBOX_LIMIT: usize = 1 << 20;

/// The default state directory.
fn default_state_dir() -> PathBuf {
    if crate::config::is_root() {
        return PathBuf::from("/var/lib/taskd-agent");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".local/state/taskd-agent")
}

/// This machine's host name (`localhost` if it has none).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A run's output not yet taken by the server.
#[derive(Default)]
struct Outbox {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    next_seq: u64,
    totals: [u64; 2],
}

/// A run in progress on this agent.
struct Active {
    stop: CancellationToken,
    why: StopCause,
}

/// What the agent's tasks share.
struct Core {
    name: String,
    journal: Durable,
    active: Mutex<HashMap<i64, Active>>,
    outboxes: Mutex<BTreeMap<i64, Outbox>>,
    /// Starts to report.
    starts: Mutex<Vec<proto::Started>>,
    /// Room freed in an outbox.
    room: Notify,
    /// Something to send.
    wake: Notify,
    slots: Semaphore,
    validate: ValidateCtx,
    executor: std::sync::OnceLock<Arc<LocalExecutor<Sink>>>,
    stop: CancellationToken,
    /// The connection to the server while there is one (file units read their content
    /// through it).
    link: tokio::sync::watch::Sender<Option<Arc<Client>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The agent's sink: output to the run's outbox, starts to the journal and the server.
#[derive(Clone)]
struct Sink(Arc<Core>);

impl RunSink for Sink {
    async fn open(&self, run: i64, _limit: u64) -> crate::error::Result<()> {
        lock(&self.0.outboxes).entry(run).or_default();
        Ok(())
    }

    async fn write(&self, run: i64, stream: Stream, at: Timestamp, data: Vec<u8>) {
        loop {
            let room = self.0.room.notified();
            {
                let mut boxes = lock(&self.0.outboxes);
                let b = boxes.entry(run).or_default();
                if b.bytes < OUTBOX_LIMIT {
                    b.bytes += data.len();
                    b.totals[usize::from(stream == Stream::Stderr)] += data.len() as u64;
                    let seq = b.next_seq;
                    b.next_seq += 1;
                    b.chunks.push_back(Chunk {
                        seq,
                        stream: stream.as_str().into(),
                        at_us: at.as_microsecond(),
                        data: String::from_utf8_lossy(&data).into_owned(),
                    });
                    break;
                }
            }
            // Full while the server is away: the run waits on its pipe.
            room.await;
        }
        self.0.wake.notify_one();
    }

    async fn finish(&self, run: i64) -> LogSummary {
        let totals = lock(&self.0.outboxes).get(&run).map(|b| b.totals).unwrap_or_default();
        LogSummary { stdout_bytes: totals[0], stderr_bytes: totals[1], truncated: false }
    }

    fn started(&self, run: i64, pid: u32, at: Timestamp, ticks: Option<u64>, boot: Option<String>) {
        // Not waited for: a pid lost to a crash leaves the run `lost` all the same.
        if let Err(e) = self.0.journal.lock().append(Entry::Pid { run, pid, ticks, boot }) {
            tracing::error!(run, error = %e, "cannot journal a run's pid");
        }
        lock(&self.0.starts).push(proto::Started { run, pid, at_us: at.as_microsecond() });
        self.0.wake.notify_one();
    }

    async fn read_content(
        &self,
        run: i64,
        sha256: &str,
        offset: u64,
        len: usize,
    ) -> crate::error::Result<Vec<u8>> {
        use base64::Engine;
        let mut link = self.0.link.subscribe();
        loop {
            // Waits for a connection (a server away: the put waits, as output does).
            let client = link
                .wait_for(Option::is_some)
                .await
                .map_err(|_| crate::error::Error::ShuttingDown)?
                .clone()
                .expect("waited for");
            let ask = proto::FileRead { run, sha256: sha256.into(), offset, len: len as u32 };
            match client.file_read(ask).await {
                Ok(d) => {
                    return base64::engine::general_purpose::STANDARD.decode(d.data).map_err(|e| {
                        crate::error::Error::Storage(format!("a piece of the file: {e}"))
                    });
                }
                // The server refused: no point asking again.
                Err(jsonrpsee::core::ClientError::Call(e)) => {
                    return Err(crate::error::Error::Storage(e.message().to_string()));
                }
                // The connection broke: ask again on the next one.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Runs the agent until `stop` is cancelled.
pub async fn run(args: AgentArgs, stop: CancellationToken) -> anyhow::Result<()> {
    exec::process_hygiene();
    exec::become_subreaper().context("cannot become the subreaper of its runs")?;
    let dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    crate::state_dir::prepare(&dir)
        .with_context(|| format!("state directory {}", dir.display()))?;
    let _lock = crate::state_dir::lock(&dir)
        .with_context(|| format!("{}: is another agent running on it?", dir.display()))?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l.split_once('=').with_context(|| format!("label {l:?}: write key=value"))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    let journal = Journal::open(&dir).with_context(|| format!("{}/journal", dir.display()))?;
    let trusted =
        trust(&dir, args.ca.as_deref(), args.fingerprint.as_deref(), args.join.as_deref())?;
    if trusted.is_none()
        && !args.insecure
        && let Some(far) = args.server.iter().find(|s| !is_loopback(s))
    {
        anyhow::bail!(
            "{far} is not on loopback, and nothing says which TLS certificate to trust: the \
             join token and credential would travel in clear. Serve TLS (taskd --tls auto: its \
             join tokens carry the fingerprint), or give --fingerprint or --ca, or --insecure"
        );
    }
    let tls = match trusted {
        Some(t) => Some(crate::tls::client_config(&t)?),
        None => None,
    };
    let validate = ValidateCtx {
        is_root: crate::config::is_root(),
        allowed_dirs: resolve_allowed_dirs(&args.allowed_dirs),
        allowed_users: args.allowed_users.clone(),
    };
    let core = Arc::new(Core {
        name: name.clone(),
        journal: Durable::new(journal),
        active: Mutex::default(),
        outboxes: Mutex::default(),
        starts: Mutex::default(),
        room: Notify::new(),
        wake: Notify::new(),
        slots: Semaphore::new(args.max_runs.max(1) as usize),
        validate: validate.clone(),
        executor: std::sync::OnceLock::new(),
        stop: stop.clone(),
        link: tokio::sync::watch::Sender::new(None),
    });
    let executor = LocalExecutor::new(Sink(core.clone()), &dir, dir.join("work"), validate).await?;
    let _ = core.executor.set(Arc::new(executor));
    recover(&core, &dir).await;
    let hello = Hello {
        name,
        labels,
        version: env!("CARGO_PKG_VERSION").into(),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        max_runs: args.max_runs,
        holding: Vec::new(),
    };
    tracing::info!(agent = %hello.name, servers = ?args.server, "taskd agent starting");
    let mut backoff = Duration::from_secs(1);
    let mut i = 0;
    while !stop.is_cancelled() {
        let addr = &args.server[i % args.server.len()];
        i += 1;
        let up = tokio::time::Instant::now();
        tokio::select! {
            r = session(&core, &dir, addr, args.join.as_deref(), &hello, tls.clone()) => match r {
                Ok(()) => tracing::warn!(server = %addr, "connection to the server ended"),
                Err(e) if e.is::<JoinRefused>() => return Err(e),
                Err(e) => tracing::warn!(server = %addr, error = format!("{e:#}"), "cannot talk to the server"),
            },
            () = stop.cancelled() => break,
        }
        if up.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_secs(1);
        }
        // Jittered: a fleet that lost its server does not come back all in the same instant.
        let jitter = Duration::from_millis(u64::from(std::process::id() % 1000));
        tokio::select! {
            () = tokio::time::sleep(backoff / 2 + jitter.min(backoff / 2)) => {}
            () = stop.cancelled() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    // Shutting down: runs in progress are stopped and their ends journaled, to report at
    // the next start.
    let runs: Vec<(CancellationToken, StopCause)> =
        lock(&core.active).values().map(|a| (a.stop.clone(), a.why.clone())).collect();
    for (t, why) in runs {
        why.set(StopReason::Shutdown);
        t.cancel();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !lock(&core.active).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// After a restart: runs journaled as accepted without a result were cut short by the
/// restart. What is left of their processes is stopped, and they are reported `lost`.
async fn recover(core: &Arc<Core>, dir: &Path) {
    let boot = exec::boot_id();
    let dir_id = crate::executor::local::state_dir_id(dir);
    let cut: Vec<(i64, journal::Known)> = core
        .journal
        .lock()
        .runs
        .iter()
        .filter(|(_, k)| k.result.is_none() && !k.acked)
        .map(|(id, k)| (*id, k.clone()))
        .collect();
    let mut leftovers = Vec::new();
    for (run, k) in &cut {
        let tag = crate::executor::local::run_tag(&dir_id, *run);
        if let Some((pid, Some(ticks), b)) = &k.pid
            && b.is_some()
            && *b == boot
        {
            leftovers.push(exec::Leftover { pgid: Some(*pid), since: *ticks, tag });
        }
        let o = Outcome {
            run: *run,
            attempt: k.attempt,
            state: RunState::Lost.as_str().into(),
            exit_code: None,
            signal: None,
            reason: Some("agent restarted".into()),
            pid: k.pid.as_ref().map(|p| p.0),
            started_at_us: None,
            ended_at_us: Timestamp::now().as_microsecond(),
            stdout_bytes: 0,
            stderr_bytes: 0,
        };
        tracing::warn!(run, "run cut short by the agent's restart: lost");
        if let Err(e) = core.journal.append(Entry::Result(o)).await {
            tracing::error!(run, error = %e, "cannot journal a lost run");
        }
    }
    if !leftovers.is_empty() {
        let _ = tokio::task::spawn_blocking(move || {
            use nix::sys::signal::Signal::{SIGKILL, SIGTERM};
            exec::kill_leftovers(&leftovers, SIGTERM);
            std::thread::sleep(Duration::from_secs(2));
            exec::kill_leftovers(&leftovers, SIGKILL);
        })
        .await;
    }
}

/// The credential in `<dir>/credential`, after trading `join` for it on `client` if there
/// is none yet.
async fn credential(
    dir: &Path,
    addr: &str,
    join: Option<&str>,
    name: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<String> {
    let path = dir.join("credential");
    if let Ok(c) = std::fs::read_to_string(&path) {
        return Ok(c.trim().to_string());
    }
    let Some(token) = join else {
        anyhow::bail!(
            "no credential in {}: start the agent once with --join TOKEN (from `taskctl agents \
             join-token` on the server)",
            path.display()
        );
    };
    let client = Client::connect_tls(addr, None, tls).await?;
    let request = JoinRequest { token: token.trim().to_string(), name: name.to_string() };
    let joined = match client.join(request).await {
        Ok(joined) => joined,
        Err(jsonrpsee::core::ClientError::Call(refusal))
            if matches!(
                refusal.code(),
                crate::error::codes::UNAUTHORIZED | crate::error::codes::CONFLICT
            ) =>
        {
            return Err(JoinRefused(refusal.message().to_string()).into());
        }
        Err(e) => return Err(anyhow::Error::new(e).context("joining")),
    };
    crate::state_dir::write_private(
        dir,
        "credential",
        format!("{}\n", joined.credential).as_bytes(),
    )?;
    tracing::info!(agent = name, "enrolled; credential kept in the state directory");
    Ok(joined.credential)
}

/// The server refused to enroll this agent for good (its join token unknown, spent or
/// expired; its name taken): asking again cannot help, so the agent stops.
#[derive(Debug, thiserror::Error)]
#[error("the server refused to enroll this agent: {0}")]
struct JoinRefused(String);

/// One connection to `addr`, until it breaks.
async fn session(
    core: &Arc<Core>,
    dir: &Path,
    addr: &str,
    join: Option<&str>,
    hello: &Hello,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<()> {
    let cred = credential(dir, addr, join, &hello.name, tls.clone()).await?;
    let client = Arc::new(Client::connect_tls(addr, Some(&cred), tls).await?);
    let mut hello = hello.clone();
    hello.holding = lock(&core.active).keys().copied().collect();
    let mut orders: Subscription<Order> = client.attach(hello).await.context("attach")?;
    tracing::info!(server = addr, "connected");
    core.link.send_replace(Some(client.clone()));
    let done = CancellationToken::new();
    let sender = tokio::spawn(send_loop(core.clone(), client.clone(), done.clone()));
    core.wake.notify_one();
    let mut beat = tokio::time::interval(proto::HEARTBEAT_EVERY);
    let r = loop {
        tokio::select! {
            o = orders.next() => match o {
                Some(Ok(order)) => handle(core, order, &mut beat).await,
                Some(Err(e)) => break Err(anyhow::anyhow!("bad order: {e}")),
                None => break Ok(()),
            },
            _ = beat.tick() => {
                // A server that does not answer within three beats is gone (a cut link
                // leaves the connection open): connect again.
                let patience = (beat.period() * 3).max(Duration::from_secs(1));
                match tokio::time::timeout(patience, client.heartbeat(None)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(anyhow::anyhow!("heartbeat: {e}")),
                    Err(_) => break Err(anyhow::anyhow!("the server did not answer a heartbeat in {patience:?}")),
                }
            }
            () = done.cancelled() => break Ok(()),
        }
    };
    done.cancel();
    core.link.send_replace(None);
    let _ = sender.await;
    r
}

/// Does what the server orders.
async fn handle(core: &Arc<Core>, order: Order, beat: &mut tokio::time::Interval) {
    match order {
        Order::Settings { heartbeat_ms } => {
            let every = Duration::from_millis(heartbeat_ms.clamp(100, 60_000));
            *beat = tokio::time::interval(every);
        }
        Order::Assign(a) => assign(core, a),
        Order::Cancel { run, reason } => {
            if let Some(a) = lock(&core.active).get(&run) {
                a.why.set(reason.parse().unwrap_or(StopReason::Cancelled));
                a.stop.cancel();
            }
        }
    }
}

/// Takes an assignment: started once, whatever number of times it is sent.
fn assign(core: &Arc<Core>, a: Assignment) {
    let accepted = {
        let mut j = core.journal.lock();
        if j.runs.contains_key(&a.run) {
            // Running, reported, or done: never started again.
            return;
        }
        match j.append(Entry::Accept { run: a.run, attempt: a.attempt }) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(run = a.run, error = %e, "cannot journal an assignment; not started");
                return;
            }
        }
    };
    let stop = core.stop.child_token();
    let why = StopCause::default();
    lock(&core.active).insert(a.run, Active { stop: stop.clone(), why: why.clone() });
    tokio::spawn(execute(core.clone(), a, accepted, stop, why));
}

/// How long to wait for an assignment's start time, by this host's clock: at most
/// [`proto::START_WAIT_MAX`].
fn start_wait(start_at_us: Option<i64>) -> Duration {
    let Some(at) = start_at_us.and_then(|us| Timestamp::from_microsecond(us).ok()) else {
        return Duration::ZERO;
    };
    Duration::try_from(at.duration_since(Timestamp::now()))
        .unwrap_or(Duration::ZERO)
        .min(proto::START_WAIT_MAX)
}

/// Runs an assignment, once its acceptance (journal entry `accepted`) is on disk, to its end,
/// and journals its outcome for the sender.
async fn execute(
    core: Arc<Core>,
    a: Assignment,
    accepted: u64,
    stop: CancellationToken,
    why: StopCause,
) {
    let run = a.run;
    let now = Timestamp::now();
    let trigger = a.trigger.parse().unwrap_or(Trigger::Manual);
    // Its start is its process's (or, for a file, its writing's): a run ended before then
    // reports none.
    let rec = RunRecord {
        host: core.name.clone(),
        ..RunRecord::fresh(run, a.unit.clone(), RunState::Running, trigger, a.attempt, now)
    };
    let config = UnitDef::from_json(a.definition)
        .and_then(|d| UnitConfig::validate(d, &core.validate))
        .map(Arc::new);
    let config = match core.journal.synced(accepted).await {
        Ok(()) => config,
        Err(e) => Err(crate::error::Error::io(core.journal.lock().path(), e)),
    };
    let ended = match config {
        Err(e) => RunRecord {
            state: RunState::Failed,
            reason: Some(format!("refused by agent {:?}: {e}", core.name)),
            ended_at: Some(Timestamp::now()),
            ..rec
        },
        Ok(cfg) => {
            // A fire sent ahead of its time waits for it, holding no slot meanwhile; a stop
            // until then ends it unstarted.
            let permit = tokio::select! {
                p = async {
                    tokio::time::sleep(start_wait(a.start_at_us)).await;
                    core.slots.acquire().await
                } => p.ok(),
                () = stop.cancelled() => None,
            };
            if permit.is_none() {
                RunRecord {
                    state: RunState::Cancelled,
                    reason: Some(why.get().as_str().into()),
                    ended_at: Some(Timestamp::now()),
                    ..rec
                }
            } else {
                let ex = core.executor.get().expect("set at start").clone();
                let on_start: OnStart = Box::new(|_, _| {});
                ex.execute(cfg, rec, stop, why, on_start).await
            }
        }
    };
    let o = Outcome {
        run,
        attempt: ended.attempt,
        state: ended.state.as_str().into(),
        exit_code: ended.exit_code,
        signal: ended.signal,
        reason: ended.reason,
        pid: ended.pid,
        started_at_us: ended.started_at.map(|t| t.as_microsecond()),
        ended_at_us: ended.ended_at.unwrap_or_else(Timestamp::now).as_microsecond(),
        stdout_bytes: ended.stdout_bytes,
        stderr_bytes: ended.stderr_bytes,
    };
    if let Err(e) = core.journal.append(Entry::Result(o)).await {
        tracing::error!(run, error = %e, "cannot journal a run's end");
    }
    lock(&core.active).remove(&run);
    core.wake.notify_one();
}

/// Sends what there is to send: starts, output (in batches of at most
/// [`proto::MAX_OUTPUT_BATCH`] bytes), then results whose output has all been taken, until
/// the connection breaks or `done` is cancelled. Calls of a kind go out side by side, up to
/// [`IN_FLIGHT`] at once (one output batch per run at a time, so a run's output stays in
/// order). A result waits for the server to record it, so results go
/// [`proto::MAX_RESULTS_BATCH`] a call: one a call capped an agent at [`IN_FLIGHT`] runs per
/// commit time (about 320 a second when commits took 150 ms), and past that its unreported
/// ends piled up.
async fn send_loop(core: Arc<Core>, client: Arc<Client>, done: CancellationToken) {
    let r: anyhow::Result<()> = async {
        loop {
            let woken = core.wake.notified();
            send_starts(&core, &client).await?;
            let mut retry = send_output(&core, &client).await?;
            retry |= send_results(&core, &client).await?;
            let wait = if retry { Duration::from_secs(1) } else { Duration::from_secs(30) };
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(wait) => {}
                () = done.cancelled() => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(error = format!("{e:#}"), "sending to the server failed");
    }
    done.cancel();
}

/// Calls to the server of one kind in flight at once (the server takes 64 per connection).
const IN_FLIGHT: usize = 48;

/// Reports the runs that started.
async fn send_starts(core: &Core, client: &Client) -> anyhow::Result<()> {
    let starts = std::mem::take(&mut *lock(&core.starts));
    let mut calls = futures_util::stream::iter(starts.into_iter().map(|s| client.started(s)))
        .buffer_unordered(IN_FLIGHT);
    while let Some(r) = calls.next().await {
        match r {
            // A start of a run the server no longer has is not an error worth a reconnect.
            Ok(_) | Err(jsonrpsee::core::ClientError::Call(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends the runs' output, one batch per run at a time, until the outboxes are empty; true
/// if some must be sent again later (a server that just started).
async fn send_output(core: &Core, client: &Client) -> anyhow::Result<bool> {
    let mut retry = false;
    let mut runs: Vec<i64> = lock(&core.outboxes).keys().copied().collect();
    while !runs.is_empty() {
        let batches: Vec<(i64, Vec<Chunk>)> = {
            let boxes = lock(&core.outboxes);
            runs.iter().filter_map(|run| Some((*run, next_batch(boxes.get(run)?)))).collect()
        };
        let sends =
            batches.into_iter().filter_map(|(run, batch)| {
                let last = batch.last()?.seq;
                Some(async move {
                    (run, last, client.output(proto::Output { run, chunks: batch }).await)
                })
            });
        let mut calls = futures_util::stream::iter(sends).buffer_unordered(IN_FLIGHT);
        let mut more = Vec::new();
        while let Some((run, last, r)) = calls.next().await {
            match r {
                Ok(_) => more.push(run),
                Err(jsonrpsee::core::ClientError::Call(e))
                    if e.message().starts_with(crate::fleet::NOT_READY) =>
                {
                    // A daemon that just started has not taken the run over yet.
                    retry = true;
                    continue;
                }
                Err(jsonrpsee::core::ClientError::Call(e)) => {
                    // The server no longer has the run active: its output has nowhere to go.
                    tracing::debug!(run, error = %e, "output refused");
                    more.push(run);
                }
                Err(e) => return Err(e.into()),
            }
            let mut boxes = lock(&core.outboxes);
            if let Some(b) = boxes.get_mut(&run) {
                while b.chunks.front().is_some_and(|c| c.seq <= last) {
                    let c = b.chunks.pop_front().expect("checked");
                    b.bytes -= c.data.len().min(b.bytes);
                }
            }
            core.room.notify_waiters();
        }
        runs = more;
    }
    Ok(retry)
}

/// The oldest chunks of `b`, up to [`proto::MAX_OUTPUT_BATCH`] bytes (at least one).
fn next_batch(b: &Outbox) -> Vec<Chunk> {
    let mut size = 0;
    b.chunks
        .iter()
        .take_while(|c| {
            let first = size == 0;
            size += c.data.len();
            first || size <= proto::MAX_OUTPUT_BATCH
        })
        .cloned()
        .collect()
}

/// Reports the results whose output is all out, in batches (one at a time to a server of an
/// older build); true if some must be sent again later.
async fn send_results(core: &Core, client: &Client) -> anyhow::Result<bool> {
    let results: Vec<Outcome> = {
        let boxes = lock(&core.outboxes);
        let unacked = core.journal.lock().unacked();
        unacked
            .into_iter()
            .filter(|o| boxes.get(&o.run).is_none_or(|b| b.chunks.is_empty()))
            .collect()
    };
    // In batches: each call waits for its ends to be recorded.
    let batches: Vec<Vec<Outcome>> =
        results.chunks(proto::MAX_RESULTS_BATCH).map(<[Outcome]>::to_vec).collect();
    let sends = batches.into_iter().map(|batch| async move {
        let runs: Vec<i64> = batch.iter().map(|o| o.run).collect();
        let answers = match client.finished_many(batch.clone()).await {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            // A server of an older build: one call a result.
            Err(jsonrpsee::core::ClientError::Call(e))
                if e.code() == jsonrpsee::types::ErrorCode::MethodNotFound.code() =>
            {
                let mut answers = Vec::new();
                for o in batch {
                    answers.push(match client.finished(o).await {
                        Ok(_) => Ok(None),
                        Err(jsonrpsee::core::ClientError::Call(e)) => Ok(Some(e.message().into())),
                        Err(e) => Err(e),
                    });
                }
                answers
            }
            Err(jsonrpsee::core::ClientError::Call(e)) => {
                runs.iter().map(|_| Ok(Some(e.message().to_string()))).collect()
            }
            Err(e) => vec![Err(e)],
        };
        (runs, answers)
    });
    let mut calls = futures_util::stream::iter(sends).buffer_unordered(IN_FLIGHT);
    let mut retry = false;
    while let Some((runs, answers)) = calls.next().await {
        for (run, answer) in runs.into_iter().zip(answers) {
            match answer {
                Ok(None) => {
                    lock(&core.outboxes).remove(&run);
                    // Not waited for: a result sent again after a crash is known to the server.
                    if let Err(e) = core.journal.lock().append(Entry::Acked(run)) {
                        tracing::error!(run, error = %e, "cannot journal an acknowledgement");
                    }
                }
                Ok(Some(why)) => {
                    tracing::debug!(run, why, "result not taken yet");
                    retry = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(retry)
}
