//! The server's side of its agents: who is enrolled (credentials, join tokens, revocation),
//! who is connected now (one session per agent), the remote runs in flight and what their
//! agents report of them. The RPC layer (`rpc::link`) turns the agent protocol's calls into
//! calls on [`Fleet`]; the unit loops reach agents through [`remote::RemoteExecutor`].
//!
//! Mechanism. Each connected agent has a [`Session`]: a queue of [`Order`]s the RPC layer
//! forwards to the agent's `AgentLink.Attach` subscription, and a switch that closes the
//! connection (revocation, a newer connection of the same agent, missed heartbeats). Each
//! remote run in flight has a slot ([`RunSlot`]) through which its executor hears what
//! happens to it: the agent attached or went away, the process started, the run finished.
//!
//! Invariants:
//! - An agent's calls only touch runs assigned to it: every report names a run whose slot's
//!   host is the calling agent, or is refused.
//! - A run's end is acknowledged to its agent only after it is recorded (`Fleet::recorded`,
//!   called by the unit loop after the commit), so an agent forgets a result only once the
//!   server cannot lose it.
//! - An agent that comes back holding a run the server no longer has active (it was lost,
//!   or cancelled while the agent was away) is told to stop it.
//! - Credentials and join tokens are kept as SHA-256 hashes only; the compare is
//!   constant-time.

pub mod remote;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use jiff::Timestamp;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::names::named_enum;
use crate::proto::{self, Hello, Order, Outcome};
use crate::run::LOCAL;
use crate::store::logs::Stream;
use crate::store::{EventKind, Store, StoredAgent};

/// The start of the message of a report the server cannot take yet: the agent keeps it and
/// sends it again.
pub const NOT_READY: &str = "not ready, send again";

/// Runs an agent may say it holds when it attaches.
const MAX_HELD: usize = 100_000;

/// Timing of agent connections (daemon settings `agent_timeout` and `lost_after`).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// An agent silent this long (no heartbeat, no report) is disconnected.
    pub agent_timeout: Duration,
    /// Runs of a disconnected agent stay `running` (`host_state: unreachable`) this long,
    /// then become `lost`.
    pub lost_after: Duration,
    /// The SHA-256 fingerprint of the server's TLS certificate, when it serves TLS: join
    /// tokens carry it, so that a new agent trusts this server and no other.
    pub fingerprint: Option<String>,
    /// In a cluster, `local` names no host (which server holds the lease changes): units
    /// name servers, agents or selectors.
    pub cluster: bool,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            agent_timeout: Duration::from_secs(15),
            lost_after: Duration::from_secs(300),
            fingerprint: None,
            cluster: false,
        }
    }
}

named_enum! {
    /// Where an agent stands.
    pub enum AgentState("an agent state") {
        /// It has a live connection.
        Connected = "connected",
        /// Enrolled, not connected now.
        Disconnected = "disconnected",
        /// Its credential is refused.
        Revoked = "revoked",
    }
}

/// An agent as `Agent.List` shows it.
#[derive(Debug, Clone)]
pub struct AgentStatus {
    /// What the store keeps of it.
    pub stored: StoredAgent,
    /// Where it stands.
    pub state: AgentState,
    /// Its address, while connected.
    pub addr: Option<String>,
    /// When its connection was made, while connected.
    pub connected_at: Option<Timestamp>,
    /// When it was last heard from.
    pub last_seen: Option<Timestamp>,
    /// Its runs active now.
    pub running: usize,
}

/// A connected agent's session: where its orders go, and the switch that ends its connection.
#[derive(Debug)]
pub struct Session {
    /// Tells this session from the agent's earlier and later ones.
    pub id: u64,
    orders: mpsc::UnboundedSender<Order>,
    /// Cancelled when the session ends for any reason; the RPC layer closes the connection.
    pub close: CancellationToken,
}

struct AgentEntry {
    stored: StoredAgent,
    /// Changes when the agent enrolls again or is revoked: connections logged in before
    /// carry an older one and are refused.
    epoch: u64,
    session: Option<Session>,
    addr: Option<String>,
    connected_at: Option<Timestamp>,
    last_seen: Option<Timestamp>,
    /// When last heard from, on the monotonic clock (for `agent_timeout`).
    heard: tokio::time::Instant,
}

/// What a remote run's executor hears about it.
#[derive(Debug)]
pub enum News {
    /// Its agent (re)connected: the assignment must be sent (again).
    Attached,
    /// Its agent went away.
    Detached,
    /// Its process started.
    Started {
        /// Its pid on the agent's host.
        pid: u32,
        /// When.
        at: Timestamp,
    },
    /// It ended on its agent.
    Finished(Outcome),
    /// Its agent was revoked: it is lost.
    Revoked,
}

struct RunSlot {
    host: String,
    /// Its start was reported (later reports of it are ignored).
    started: bool,
    news: mpsc::UnboundedSender<News>,
    /// Output chunks below this number were written already.
    next_seq: u64,
    /// The run's log is open (its opening queued to the log writer): until then output is
    /// refused as not ready, for a write queued ahead of the opening would be dropped.
    log_open: bool,
    /// Agents' calls waiting for the run's end to be recorded.
    acks: Vec<oneshot::Sender<()>>,
}

struct Inner {
    store: Store,
    cfg: FleetConfig,
    agents: DashMap<String, AgentEntry>,
    runs: DashMap<i64, RunSlot>,
    sessions: AtomicU64,
    epochs: AtomicU64,
}

/// The server's agents; cheap to clone.
#[derive(Clone)]
pub struct Fleet(Arc<Inner>);

/// SHA-256 of `s`, hex: what the store keeps of a secret.
fn hash(s: &str) -> String {
    crate::tls::sha256_hex(s.as_bytes())
}

/// Whether a `hosts` entry is a label selector (`role=web,dc=eu`, or `*` for every agent).
pub fn is_selector(host: &str) -> bool {
    host == "*" || host.contains('=')
}

/// The `(key, value)` pairs of a selector, or what is wrong with it.
fn selector_pairs(sel: &str) -> std::result::Result<Vec<(&str, &str)>, String> {
    if sel == "*" {
        return Ok(Vec::new());
    }
    sel.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                Ok((k.trim(), v.trim()))
            }
            _ => Err(format!("{pair:?} is not a label selector: write key=value[,key=value…]")),
        })
        .collect()
}

fn matches(labels: &BTreeMap<String, String>, pairs: &[(&str, &str)]) -> bool {
    pairs.iter().all(|(k, v)| labels.get(*k).is_some_and(|l| l == v))
}

impl Fleet {
    /// The fleet of the store's enrolled agents, none connected yet. Spawns the watch that
    /// disconnects agents silent for `agent_timeout` (it ends with `stop`).
    pub async fn open(store: Store, cfg: FleetConfig, stop: CancellationToken) -> Result<Fleet> {
        let agents = DashMap::new();
        for a in store.load_agents().await? {
            let entry = AgentEntry {
                last_seen: a.last_seen,
                epoch: 0,
                stored: a,
                session: None,
                addr: None,
                connected_at: None,
                heard: tokio::time::Instant::now(),
            };
            agents.insert(entry.stored.name.clone(), entry);
        }
        let fleet = Fleet(Arc::new(Inner {
            store,
            cfg,
            agents,
            runs: DashMap::new(),
            sessions: 0.into(),
            epochs: 1.into(),
        }));
        let watch = fleet.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => watch.disconnect_silent(),
                    () = stop.cancelled() => return,
                }
            }
        });
        Ok(fleet)
    }

    /// The settings.
    pub fn config(&self) -> &FleetConfig {
        &self.0.cfg
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// A one-time join token good for `ttl`, and when it expires.
    pub async fn join_token(&self, ttl: Duration) -> Result<(String, Timestamp)> {
        let secret = crate::state_dir::random_hex(32).map_err(|e| Error::io("/dev/urandom", e))?;
        let token = format!("{}{secret}", proto::JOIN_PREFIX);
        let expires = Timestamp::now() + jiff::SignedDuration::try_from(ttl).unwrap_or_default();
        self.0.store.create_join_token(hash(&token), expires).await?;
        // The certificate's fingerprint rides along; only the secret is checked.
        Ok((proto::join_token(&token, self.0.cfg.fingerprint.as_deref()), expires))
    }

    /// Trades join token `token` for the credential of a new agent `name`.
    pub async fn join(&self, token: &str, name: &str) -> Result<String> {
        crate::unit::definition::validate_name(name).map_err(|_| {
            Error::invalid(
                "name",
                format!(
                    "{} is not a valid agent name: use 1-64 letters, digits, '.', '_' or '-', \
                     starting with a letter or digit",
                    crate::error::shown_name(name)
                ),
            )
        })?;
        if name == LOCAL {
            return Err(Error::invalid("name", "\"local\" names the daemon itself"));
        }
        let secret = crate::state_dir::random_hex(32).map_err(|e| Error::io("/dev/urandom", e))?;
        let (token, _) = proto::split_join_token(token);
        let stored = self.0.store.join_agent(hash(token), name.to_string(), hash(&secret)).await?;
        tracing::info!(agent = name, "agent enrolled");
        // A revoked agent of that name may still be connected: it goes, and runs given to
        // it end (this is another host).
        if let Some((_, old)) = self.0.agents.remove(name)
            && let Some(s) = old.session
        {
            s.close.cancel();
        }
        for slot in self.0.runs.iter().filter(|s| s.host == name) {
            let _ = slot.news.send(News::Revoked);
        }
        let entry = AgentEntry {
            stored,
            epoch: self.0.epochs.fetch_add(1, Ordering::Relaxed),
            session: None,
            addr: None,
            connected_at: None,
            last_seen: None,
            heard: tokio::time::Instant::now(),
        };
        self.0.agents.insert(name.to_string(), entry);
        Ok(format!("{}{name}:{secret}", proto::CREDENTIAL_PREFIX))
    }

    /// The agent `credential` belongs to, if it is one of an enrolled, unrevoked agent, and
    /// the epoch of that credential ([`Fleet::current`]).
    pub fn authenticate(&self, credential: &str) -> Option<(String, u64)> {
        let (name, secret) = proto::parse_credential(credential)?;
        // Hashed before the lookup: the time taken does not tell enrolled names apart.
        let presented = hash(secret);
        let a = self.0.agents.get(name)?;
        let ok: bool = a.stored.secret_hash.as_bytes().ct_eq(presented.as_bytes()).into();
        (ok && !a.stored.revoked).then(|| (name.to_string(), a.epoch))
    }

    /// Whether a login of agent `name` with a credential of `epoch` still stands: the agent
    /// is not revoked and has not enrolled again since.
    pub fn current(&self, name: &str, epoch: u64) -> bool {
        self.0.agents.get(name).is_some_and(|a| !a.stored.revoked && a.epoch == epoch)
    }

    /// Revokes agent `name`: its connection closes and its credential is refused.
    pub async fn revoke(&self, name: &str) -> Result<AgentStatus> {
        // Refused in memory first: the old credential acts no more while the store commits.
        if let Some(mut a) = self.0.agents.get_mut(name) {
            a.stored.revoked = true;
            a.epoch = self.0.epochs.fetch_add(1, Ordering::Relaxed);
        }
        let stored = self.0.store.revoke_agent(name.to_string()).await?;
        self.detach(name, None);
        // Its runs end now: a host enrolled again under this name must not be sent them.
        for slot in self.0.runs.iter().filter(|s| s.host == name) {
            let _ = slot.news.send(News::Revoked);
        }
        tracing::warn!(agent = name, "agent revoked");
        self.status(name).ok_or(Error::AgentNotFound(stored.name))
    }

    /// Agent `hello.name` connected from `addr`: its new session, whose orders the caller
    /// forwards to the agent. An older session of the same agent is closed. Runs it holds
    /// that the server no longer has active are ordered stopped; runs assigned to it are
    /// told it is back (their executors send their assignments again).
    pub fn attach(
        &self,
        hello: Hello,
        addr: Option<String>,
        epoch: u64,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Order>, CancellationToken)> {
        let name = hello.name.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.0.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let close = CancellationToken::new();
        let now = Timestamp::now();
        let mut held: Vec<i64> = hello.holding.clone();
        held.sort_unstable();
        held.dedup();
        held.truncate(MAX_HELD);
        {
            let mut a = self.0.agents.get_mut(&name).ok_or(Error::AgentNotFound(name.clone()))?;
            if a.stored.revoked || a.epoch != epoch {
                return Err(Error::Unauthorized(format!("agent {name:?} is revoked")));
            }
            let session = Session { id, orders: tx.clone(), close: close.clone() };
            if let Some(old) = a.session.replace(session) {
                old.close.cancel();
            }
            a.addr = addr;
            a.connected_at = Some(now);
            a.last_seen = Some(now);
            a.heard = tokio::time::Instant::now();
            a.stored.labels = hello.labels;
            a.stored.version = hello.version;
            a.stored.os = hello.os;
            a.stored.arch = hello.arch;
            a.stored.max_runs = hello.max_runs;
            a.stored.last_seen = Some(now);
            self.0.store.agent_seen(a.stored.clone());
            // Told under the agent's lock, so that a detach cannot overtake it.
            for slot in self.0.runs.iter().filter(|s| s.host == name) {
                let _ = slot.news.send(News::Attached);
            }
        }
        self.0.store.emit(EventKind::AgentConnected, &name, Some("connected"));
        tracing::info!(agent = %name, "agent connected");
        // Runs it holds that the server has not active: those the store says ended (or
        // does not know) are stopped; one still running there is being taken over by a
        // daemon that just started, and its executor will claim it.
        let unknown: Vec<i64> = held
            .into_iter()
            .filter(|run| self.0.runs.get(run).is_none_or(|s| s.host != name))
            .collect();
        if !unknown.is_empty() {
            let store = self.0.store.clone();
            let orders = tx.clone();
            tokio::spawn(async move {
                for run in unknown {
                    let r = store.get_run(run).await;
                    let active = matches!(&r, Ok(r) if !r.state.is_final() && r.host == name);
                    if !active {
                        let _ = orders.send(Order::Cancel { run, reason: "lost".into() });
                    }
                }
            });
        }
        Ok((id, rx, close))
    }

    /// Agent `name`'s session `session` ended (any session, for `None`): it is disconnected,
    /// and its runs hear so.
    pub fn detach(&self, name: &str, session: Option<u64>) {
        let Some(mut a) = self.0.agents.get_mut(name) else { return };
        match &a.session {
            Some(s) if session.is_none_or(|id| id == s.id) => {}
            _ => return,
        }
        let s = a.session.take().expect("checked");
        s.close.cancel();
        a.addr = None;
        a.connected_at = None;
        // Told under the agent's lock, so that an attach cannot overtake it.
        for slot in self.0.runs.iter().filter(|s| s.host == name) {
            let _ = slot.news.send(News::Detached);
        }
        drop(a);
        self.0.store.emit(EventKind::AgentDisconnected, name, Some("disconnected"));
        tracing::warn!(agent = name, "agent disconnected");
    }

    /// Agent `name` is alive (a heartbeat, or any report).
    pub fn heard(&self, name: &str) {
        if let Some(mut a) = self.0.agents.get_mut(name) {
            a.heard = tokio::time::Instant::now();
            a.last_seen = Some(Timestamp::now());
        }
    }

    fn disconnect_silent(&self) {
        let limit = self.0.cfg.agent_timeout;
        let silent: Vec<(String, u64)> = self
            .0
            .agents
            .iter()
            .filter(|a| a.heard.elapsed() > limit)
            .filter_map(|a| Some((a.key().clone(), a.session.as_ref()?.id)))
            .collect();
        for (name, session) in silent {
            tracing::warn!(agent = %name, "agent missed its heartbeats");
            // That session only: a newer one may have attached meanwhile.
            self.detach(&name, Some(session));
        }
    }

    /// Whether `host` names an agent that is revoked or no longer enrolled.
    pub fn is_gone(&self, host: &str) -> bool {
        host != LOCAL && self.0.agents.get(host).is_none_or(|a| a.stored.revoked)
    }

    /// Whether host `host` can be given work now: `local`, or a connected agent.
    pub fn is_connected(&self, host: &str) -> bool {
        host == LOCAL || self.0.agents.get(host).is_some_and(|a| a.session.is_some())
    }

    /// Sends `order` to agent `host`; false when it is not connected.
    fn send(&self, host: &str, order: Order) -> bool {
        self.0
            .agents
            .get(host)
            .and_then(|a| a.session.as_ref().map(|s| s.orders.send(order).is_ok()))
            .unwrap_or(false)
    }

    /// Agent `name` as `Agent.Get` shows it.
    pub fn status(&self, name: &str) -> Option<AgentStatus> {
        let a = self.0.agents.get(name)?;
        let running = self.0.runs.iter().filter(|s| s.host == name).count();
        Some(Self::status_of(&a, running))
    }

    /// An agent's status, given how many runs it has active.
    fn status_of(a: &AgentEntry, running: usize) -> AgentStatus {
        AgentStatus {
            stored: a.stored.clone(),
            state: if a.stored.revoked {
                AgentState::Revoked
            } else if a.session.is_some() {
                AgentState::Connected
            } else {
                AgentState::Disconnected
            },
            addr: a.addr.clone(),
            connected_at: a.connected_at,
            last_seen: a.last_seen,
            running,
        }
    }

    /// Every agent, by name. Runs are counted in one pass, not once per agent.
    pub fn list(&self) -> Vec<AgentStatus> {
        let mut running: std::collections::HashMap<String, usize> = Default::default();
        for slot in self.0.runs.iter() {
            *running.entry(slot.host.clone()).or_default() += 1;
        }
        let mut list: Vec<AgentStatus> = self
            .0
            .agents
            .iter()
            .map(|a| Self::status_of(&a, running.get(a.key()).copied().unwrap_or(0)))
            .collect();
        list.sort_by(|a, b| a.stored.name.cmp(&b.stored.name));
        list
    }

    /// Checks a unit's `hosts` at `Add`/`Edit`: each is `local`, an enrolled agent's name or
    /// a well-formed selector.
    pub fn check_hosts(&self, hosts: &[String]) -> Result<()> {
        for h in hosts {
            if h == LOCAL && self.0.cfg.cluster {
                return Err(Error::invalid(
                    "hosts",
                    "in a cluster, \"local\" (the default) names no host: name where to run, \
                     a server by its --name, an agent, or a selector such as \"taskd=server\"",
                ));
            }
            if h == LOCAL {
                continue;
            }
            if is_selector(h) {
                selector_pairs(h).map_err(|e| Error::invalid("hosts", e))?;
                continue;
            }
            if self.0.agents.get(h).is_none_or(|a| a.stored.revoked) {
                return Err(Error::invalid(
                    "hosts",
                    format!(
                        "no agent is named {}: enroll it first (`taskctl agents join-token`), \
                         or use a label selector such as \"role=web\"",
                        crate::error::shown_name(h)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The hosts `hosts` names now, in order: as listed, each selector's matches by name,
    /// each host once. Revoked agents are left out; so are names of agents no longer
    /// enrolled.
    pub fn resolve(&self, hosts: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let push = |h: String, out: &mut Vec<String>| {
            if !out.contains(&h) {
                out.push(h);
            }
        };
        for h in hosts {
            if h == LOCAL {
                push(h.clone(), &mut out);
            } else if is_selector(h) {
                let Ok(pairs) = selector_pairs(h) else { continue };
                let mut names: Vec<String> = self
                    .0
                    .agents
                    .iter()
                    .filter(|a| !a.stored.revoked && matches(&a.stored.labels, &pairs))
                    .map(|a| a.key().clone())
                    .collect();
                names.sort();
                for n in names {
                    push(n, &mut out);
                }
            } else if self.0.agents.get(h).is_some_and(|a| !a.stored.revoked) {
                push(h.clone(), &mut out);
            }
        }
        out
    }

    /// Opens the slot of remote run `run` on `host`: what its agent reports reaches `news`.
    fn open_slot(&self, run: i64, host: &str, news: mpsc::UnboundedSender<News>) {
        let slot = RunSlot {
            host: host.to_string(),
            started: false,
            news,
            next_seq: 0,
            log_open: false,
            acks: Vec::new(),
        };
        self.0.runs.insert(run, slot);
    }

    /// The log of remote run `run` is open: its agent's output is taken from now on.
    fn log_opened(&self, run: i64) {
        if let Some(mut slot) = self.0.runs.get_mut(&run) {
            slot.log_open = true;
        }
    }

    /// The slot of `run` if agent `agent` holds it.
    fn slot_of(
        &self,
        agent: &str,
        run: i64,
    ) -> Result<dashmap::mapref::one::RefMut<'_, i64, RunSlot>> {
        match self.0.runs.get_mut(&run) {
            Some(s) if s.host == agent => Ok(s),
            _ => Err(Error::Conflict(format!("run {run} is not active on agent {agent:?}"))),
        }
    }

    /// Agent `agent` started run `run`'s process.
    pub fn started(&self, agent: &str, s: proto::Started) -> Result<()> {
        self.heard(agent);
        let mut slot = self.slot_of(agent, s.run)?;
        if std::mem::replace(&mut slot.started, true) {
            return Ok(());
        }
        let at = Timestamp::from_microsecond(s.at_us).unwrap_or_else(|_| Timestamp::now());
        let _ = slot.news.send(News::Started { pid: s.pid, at });
        Ok(())
    }

    /// Output of a run from agent `agent`, into the run's log (each chunk once).
    pub async fn output(&self, agent: &str, out: proto::Output) -> Result<()> {
        self.heard(agent);
        let mut fresh = Vec::with_capacity(out.chunks.len());
        match self.slot_of(agent, out.run) {
            Ok(slot) if !slot.log_open => {
                // Taken over just now: its log's opening is not queued yet.
                return Err(Error::Conflict(format!("{NOT_READY}: run {}", out.run)));
            }
            Ok(mut slot) => {
                for c in out.chunks {
                    if c.seq < slot.next_seq {
                        continue;
                    }
                    slot.next_seq = c.seq.saturating_add(1);
                    fresh.push(c);
                }
            }
            Err(_) => return Err(self.not_active(agent, out.run).await),
        }
        for c in fresh {
            let stream = c.stream.parse::<Stream>().unwrap_or(Stream::Stdout);
            let at = Timestamp::from_microsecond(c.at_us).unwrap_or_else(|_| Timestamp::now());
            self.0.store.logs().write(out.run, stream, at, c.data.into_bytes()).await;
        }
        Ok(())
    }

    /// Run `o.run` ended on agent `agent`. Resolves once its end is recorded, or at once for
    /// a run that ended here already (lost, or cancelled while the agent was away): that
    /// result is late, and changes nothing.
    pub async fn finished(&self, agent: &str, o: Outcome) -> Result<()> {
        self.heard(agent);
        let run = o.run;
        let wait = match self.0.runs.get_mut(&run) {
            Some(mut slot) if slot.host == agent => {
                let (tx, rx) = oneshot::channel();
                slot.acks.push(tx);
                let _ = slot.news.send(News::Finished(o));
                rx
            }
            Some(_) => {
                return Err(Error::Conflict(format!("run {run} is not active on agent {agent:?}")));
            }
            None => {
                let rec = match self.0.store.get_run(run).await {
                    Ok(rec) => rec,
                    // Deleted with its unit, or pruned: nothing left to record it on.
                    Err(Error::RunNotFound(_)) => return Ok(()),
                    Err(e) => return Err(e),
                };
                if rec.host != agent {
                    return Err(Error::Conflict(format!("run {run} is not agent {agent:?}'s")));
                }
                if !rec.state.is_final() {
                    // Active, but not taken over yet by this (just started) daemon, or its
                    // end not committed yet.
                    return Err(Error::Conflict(format!("{NOT_READY}: run {run}")));
                }
                tracing::info!(run, agent, state = %o.state, "late result of a run that ended here");
                self.0.store.set_late_result(run, serde_json::to_string(&o).unwrap_or_default());
                return Ok(());
            }
        };
        wait.await.map_err(|_| Error::ShuttingDown)
    }

    /// Why agent `agent` cannot report on `run` now: not ready (a daemon that just started
    /// has not taken it over yet: send it again), or not its own active run.
    async fn not_active(&self, agent: &str, run: i64) -> Error {
        match self.0.store.get_run(run).await {
            Ok(r) if r.host == agent && !r.state.is_final() => {
                Error::Conflict(format!("{NOT_READY}: run {run}"))
            }
            _ => Error::Conflict(format!("run {run} is not active on agent {agent:?}")),
        }
    }

    /// The end of remote run `run` is recorded (or, with `recorded` false, the run is left to
    /// the next daemon): its slot closes, and an agent waiting for the acknowledgement gets it.
    pub fn recorded(&self, run: i64, recorded: bool) {
        if let Some((_, slot)) = self.0.runs.remove(&run) {
            for ack in slot.acks {
                if recorded {
                    let _ = ack.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_every_pair() {
        let labels: BTreeMap<String, String> =
            [("role".into(), "web".into()), ("dc".into(), "eu".into())].into();
        let pairs = selector_pairs("role=web,dc=eu").unwrap();
        assert!(matches(&labels, &pairs));
        assert!(!matches(&labels, &selector_pairs("role=web,dc=us").unwrap()));
        assert!(matches(&labels, &selector_pairs("*").unwrap()));
        assert!(selector_pairs("role=").is_err());
        assert!(is_selector("*") && is_selector("a=b") && !is_selector("web-01"));
    }

    /// A run taken over: its agent's output may come before the executor has queued the
    /// log's opening. It is refused as not ready (the agent sends it again), never dropped.
    #[tokio::test]
    async fn output_before_the_log_is_open_is_refused_as_not_ready_then_taken() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fleet = Fleet::open(store.clone(), FleetConfig::default(), CancellationToken::new())
            .await
            .unwrap();
        let (news, _heard) = mpsc::unbounded_channel();
        fleet.open_slot(7, "w1", news);
        let out = || proto::Output {
            run: 7,
            chunks: vec![proto::Chunk {
                seq: 0,
                stream: "stdout".into(),
                at_us: 0,
                data: "hi\n".into(),
            }],
        };
        let e = fleet.output("w1", out()).await.unwrap_err();
        assert!(e.to_string().contains(NOT_READY), "{e}");
        store.logs().open(7, 1 << 20).await.unwrap();
        fleet.log_opened(7);
        fleet.output("w1", out()).await.unwrap();
        assert_eq!(store.logs().finish(7).await.stdout_bytes, 3, "the chunk written once");
    }
}
