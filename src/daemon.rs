//! The daemon: secures the state directory, opens the store, recovers and starts every unit,
//! and serves the API on the socket it is given until its token is cancelled; then stops
//! every run and drains.
//!
//! `run` installs no signal handler and never exits the process: `main` (or a test) binds the
//! listener, owns the root token, and decides what a signal means.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthMode, Config, TlsSource};
use crate::error::Error;
use crate::exec;
use crate::fleet::{Fleet, FleetConfig};
use crate::heap;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::registry::{Registry, RegistryConfig};
use crate::rpc::api::{Api, ApiContext, methods};
use crate::rpc::auth::Auth;
use crate::rpc::conn::Gate;
use crate::rpc::listener::{ServeConfig, listen, serve};
use crate::rpc::middleware::{AUDITED_METHODS, AuditEntry, AuditHook};
use crate::rpc::routes::DaemonRoutes;
use crate::state_dir::{self, ADDRESS_FILE};
use crate::store::{AuditRecord, Store};
use crate::tls::ServerTls;
use crate::unit::ValidateCtx;
use crate::unit::definition::resolve_allowed_dirs;

/// What start-up secured before anything is served: the state directory's lock, the store,
/// and the token (none with `--auth none`).
struct Opened {
    _lock: state_dir::StateLock,
    store: Store,
    token: Option<Arc<str>>,
}

/// Everything before the units are loaded: the process itself made safe to spawn from, the
/// security rules checked, the state directory made private and locked, the store opened and
/// the token written.
async fn open_state(cfg: &Config, local: &std::net::SocketAddr) -> anyhow::Result<Opened> {
    // First: before anything is created (the umask) or spawned (inherited descriptors).
    exec::process_hygiene();
    if let Some(warning) = cfg.check_security(local)? {
        tracing::warn!("{warning}");
    }
    if crate::config::is_root() && cfg.allowed_users.is_empty() {
        tracing::warn!(
            "running as root without allowed_users: any client can run commands as any account, root included; set allowed_users (--allowed-user NAME)"
        );
    }
    state_dir::prepare(&cfg.state_dir)?;
    let lock = state_dir::lock(&cfg.state_dir)?;
    exec::catch_ignored_signals();
    if let Err(e) = exec::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; double-forked grandchildren will not be reaped");
    }
    let store = match &cfg.store {
        None => Store::open(&cfg.state_dir)?,
        Some(url) => Store::open_postgres(url, &cfg.state_dir).await?,
    };
    let token = match cfg.auth {
        AuthMode::Token => Some(state_dir::load_or_create_token(&cfg.state_dir)?.into()),
        AuthMode::None => None,
    };
    std::fs::create_dir_all(&cfg.units_dir).map_err(|e| Error::io(&cfg.units_dir, e))?;
    Ok(Opened { _lock: lock, store, token })
}

/// The arguments of this server's own agent (a cluster's servers are hosts by their names):
/// it connects to this server's port on loopback, keeps its state in `<state-dir>/agent`, and
/// enrolls with a join token minted here on its first start.
async fn host_agent(
    cfg: &Config,
    store: &Store,
    local: std::net::SocketAddr,
) -> anyhow::Result<crate::agent::AgentArgs> {
    let dir = cfg.state_dir.join("agent");
    let join = if dir.join("credential").exists() {
        None
    } else {
        let secret = state_dir::random_hex(32)?;
        let token = format!("{}{secret}", crate::proto::JOIN_PREFIX);
        let expires = Timestamp::now() + jiff::SignedDuration::from_mins(10);
        store.create_join_token(crate::tls::sha256_hex(token.as_bytes()), expires).await?;
        Some(token)
    };
    let ip = if local.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        local.ip()
    };
    Ok(crate::agent::AgentArgs {
        server: vec![std::net::SocketAddr::new(ip, local.port()).to_string()],
        name: Some(cfg.name.clone()),
        labels: vec!["taskd=server".into()],
        state_dir: Some(dir),
        join,
        max_runs: 64,
        allowed_dirs: cfg.allowed_dirs.clone(),
        allowed_users: cfg.allowed_users.clone(),
        ca: None,
        fingerprint: None,
        insecure: false,
    })
}

/// Stops this server's own agent (its runs are stopped and journaled) and waits for it.
async fn stop_host(
    stop: &CancellationToken,
    host: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
) {
    stop.cancel();
    if let Some(h) = host {
        match tokio::time::timeout(Duration::from_secs(15), h).await {
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = format!("{e:#}"), "this server's agent failed")
            }
            Err(_) => tracing::warn!("this server's agent did not stop in time"),
            _ => {}
        }
    }
}

/// The audit hook: every audited call becomes a record in the store (not awaited).
fn audit_to(store: Store) -> AuditHook {
    Arc::new(move |e: AuditEntry| {
        store.audit(AuditRecord {
            id: 0,
            time: Timestamp::now(),
            peer: match e.peer {
                Some(p) => format!("{}:{p}", e.transport),
                None => e.transport.to_string(),
            },
            method: e.method,
            unit: e.unit,
            outcome: match e.outcome {
                Ok(()) => "ok".into(),
                Err(m) => m,
            },
        })
    })
}

/// How long shutdown waits for the store to take the changes nobody waited for.
const STOP_FLUSH: Duration = Duration::from_secs(5);

/// How long shutdown waits for the last webhooks and Redis pushes.
const BACKGROUND_GRACE: Duration = Duration::from_secs(5);

/// The tokens and trackers shutdown goes through, in order (see [`Stopping::stop`]).
#[derive(Default)]
struct Stopping {
    /// Every unit's loop and runs.
    units_root: CancellationToken,
    unit_tasks: TaskTracker,
    /// Every active `Run.Follow`.
    followers: TaskTracker,
    /// Work beside the units (webhooks, the Redis queue): stopped once the units stopped, so
    /// that their ends are still notified and pushed.
    background_stop: CancellationToken,
    background: TaskTracker,
    /// No new connections.
    stop_accepting: CancellationToken,
    /// The listener and every connection.
    listener_stop: CancellationToken,
    conn_tasks: TaskTracker,
}

impl Stopping {
    /// Shutdown goes in two steps: first every unit stops its runs (clients still connected
    /// see them end: `Run.Follow` gets its final message), then the listener closes.
    async fn stop(self, store: &Store, server: tokio::task::JoinHandle<()>) -> anyhow::Result<()> {
        tracing::info!("shutting down: stopping active runs");
        self.stop_accepting.cancel();
        self.units_root.cancel();
        self.unit_tasks.close();
        self.unit_tasks.wait().await;
        self.background_stop.cancel();
        self.background.close();
        if tokio::time::timeout(BACKGROUND_GRACE, self.background.wait()).await.is_err() {
            tracing::warn!(
                "webhooks or Redis pushes still under way after {BACKGROUND_GRACE:?}; stopping \
                 without them"
            );
        }
        // What nobody waited for (pids, fire times, audit records) is lost to a store that
        // cannot take it now, as it would be to a kill -9: shutdown does not wait for ever.
        match tokio::time::timeout(STOP_FLUSH, store.flush()).await {
            Ok(r) => r?,
            Err(_) => tracing::warn!(
                "the store did not take the last changes nobody waited for (pids, fire times, \
                 audit records) within {STOP_FLUSH:?}; stopping without them"
            ),
        }
        // Every run has ended; followers only have their final message left to send.
        self.followers.close();
        let followed = tokio::time::timeout(Duration::from_secs(5), self.followers.wait()).await;
        if followed.is_err() {
            tracing::warn!("some Run.Follow subscribers did not finish; closing anyway");
        }
        self.listener_stop.cancel();
        let _ = server.await;
        self.conn_tasks.close();
        self.conn_tasks.wait().await;
        Ok(())
    }
}

/// The cluster's shared token, written to this server's state directory when it differs
/// from `own`: any server's token works on every server.
async fn share_token(
    cluster: &crate::store::Cluster,
    cfg: &Config,
    own: Arc<str>,
) -> anyhow::Result<Arc<str>> {
    let shared = cluster.shared("token", &own).await?;
    if shared.as_str() == &*own {
        return Ok(own);
    }
    state_dir::write_private(&cfg.state_dir, "token", format!("{shared}\n").as_bytes())?;
    Ok(shared.into())
}

/// The cluster's lease as this server takes part in it: `stop` ends its cluster tasks (the
/// heartbeat, the lease's renewal, its own agent), `lost` is cancelled if the lease is lost.
struct Lease<'a> {
    cluster: &'a crate::store::Cluster,
    stop: &'a CancellationToken,
    lost: &'a CancellationToken,
}

/// What a cluster's server has once it holds the lease: its listener, its own agent and the
/// lease's epoch.
struct Holding {
    listener: tokio::net::TcpListener,
    host: tokio::task::JoinHandle<anyhow::Result<()>>,
    epoch: i64,
}

/// Stands by as a cluster's server (`listener` listening on `local`): joins the cluster, starts its own agent and heartbeat,
/// relays every call on `listener` to the lease holder until this server takes the lease
/// (then keeps it renewed and returns what the engine needs), or until `shutdown` (then
/// stops its agent and returns None).
async fn stand_by(
    cfg: &Config,
    store: &Store,
    lease: Lease<'_>,
    listener: tokio::net::TcpListener,
    local: std::net::SocketAddr,
    peers: &crate::rpc::http::Peers,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Holding>> {
    let c = lease.cluster;
    let address = crate::cluster::advertised(cfg.advertise.as_deref(), local);
    c.join(&address).await?;
    let address_file =
        state_dir::write_private(&cfg.state_dir, ADDRESS_FILE, format!("{local}\n").as_bytes())?;
    // Every server is also a host, by its name: an agent of the cluster, in this process.
    let args = host_agent(cfg, store, local).await?;
    let host = tokio::spawn(crate::agent::run(args, lease.stop.clone()));
    let beat =
        crate::cluster::heartbeat(c.clone(), cfg.lease / 3, peers.clone(), lease.stop.clone());
    tokio::spawn(beat);
    tracing::info!(name = %cfg.name, %address, "taskd standing by: relaying to the cluster's lease holder until this server holds the lease");
    crate::systemd::ready(&format!(
        "standing by as {}: relaying to the cluster's lease holder",
        cfg.name
    ));
    let relays = TaskTracker::new();
    let taken = crate::cluster::standby(
        c,
        &address,
        &listener,
        cfg.lease,
        cfg.max_connections,
        shutdown,
        &relays,
    )
    .await;
    let Some(taken) = taken else {
        crate::systemd::stopping();
        let _ = std::fs::remove_file(&address_file);
        stop_host(lease.stop, Some(host)).await;
        tracing::info!("taskd stopped");
        return Ok(None);
    };
    tracing::info!(
        epoch = taken.epoch,
        "this server holds the cluster's lease: starting the engine"
    );
    let epoch = taken.epoch;
    // Renewed from now on: starting the engine may take longer than the lease.
    let keep =
        crate::cluster::keep(c.clone(), taken, cfg.lease, lease.stop.clone(), lease.lost.clone());
    tokio::spawn(keep);
    if let Err(e) = store.engine_starts().await {
        give_lease_up(c, epoch, lease.stop).await;
        return Err(e.into());
    }
    Ok(Some(Holding { listener, host, epoch }))
}

/// Gives the cluster's lease of `epoch` up (its renewal and this server's own agent stopped
/// by `stop` first), so that a standby takes over at once instead of when it runs out.
async fn give_lease_up(c: &crate::store::Cluster, epoch: i64, stop: &CancellationToken) {
    stop.cancel();
    if let Err(e) = c.release(epoch).await {
        tracing::warn!(error = %e, "cannot give the cluster's lease up; it runs out by itself");
    }
}

/// The server's TLS, when it is on: its certificate (made and kept in the state directory
/// with `--tls auto`) for this host's names and addresses.
fn server_tls(cfg: &Config, local: std::net::SocketAddr) -> anyhow::Result<Option<ServerTls>> {
    let Some(source) = &cfg.tls else { return Ok(None) };
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !local.ip().is_unspecified() {
        names.push(local.ip().to_string());
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(h.trim().to_string());
    }
    let tls = match source {
        TlsSource::Auto => ServerTls::load(None, None, Some(&cfg.state_dir.join("tls")), &names)?,
        TlsSource::Files(c, k) => ServerTls::load(Some(c), Some(k), None, &names)?,
    };
    tracing::info!(cert = %tls.cert_path.display(), fingerprint = %tls.fingerprint, "TLS on");
    Ok(Some(tls))
}

/// Opens the fleet and the registry: every unit loaded from the store and started.
/// `fingerprint` is the server's TLS certificate's, given to agents; `cluster` whether this
/// server is a cluster's.
async fn open_registry(
    cfg: &Config,
    store: &Store,
    fingerprint: Option<String>,
    cluster: bool,
    stopping: &Stopping,
) -> anyhow::Result<Registry> {
    let fleet_cfg = FleetConfig {
        agent_timeout: cfg.agent_timeout,
        lost_after: cfg.lost_after,
        fingerprint,
        cluster,
    };
    let fleet = Fleet::open(store.clone(), fleet_cfg, stopping.listener_stop.clone()).await?;
    Registry::open(
        store.clone(),
        fleet,
        RegistryConfig {
            validate: ValidateCtx {
                is_root: crate::config::is_root(),
                allowed_dirs: resolve_allowed_dirs(&cfg.allowed_dirs),
                allowed_users: cfg.allowed_users.clone(),
            },
            units_dir: cfg.units_dir.clone(),
            work_dir: cfg.state_dir.join("work"),
            keep_runs: cfg.keep_runs,
            max_units: cfg.max_units,
            metrics: Metrics::new(store.commit_latency()),
            notifier: Notifier::start(
                store.clone(),
                |r| serde_json::to_value(crate::rpc::types::RunInfo::from(r)).unwrap_or_default(),
                stopping.background_stop.clone(),
                &stopping.background,
            ),
        },
        stopping.units_root.clone(),
        stopping.unit_tasks.clone(),
    )
    .await
    .map_err(Into::into)
}

/// Starts the work beside the units: the janitor of finished task units
/// (`--keep-tasks`), the Redis queue's consumer (`--redis`).
fn start_background(cfg: &Config, registry: &Registry, stopping: &Stopping) -> anyhow::Result<()> {
    if let Some(keep) = cfg.keep_tasks {
        let janitor = crate::task_units::Janitor::new(registry.clone(), keep);
        stopping.background.spawn(janitor.run(stopping.stop_accepting.clone()));
    }
    if let Some(r) = &cfg.redis {
        // Tasks taken from Redis while the engine runs, none during shutdown.
        let consumer =
            crate::redis_queue::Consumer::new(r.clone(), registry.clone(), cfg.name.clone())?;
        consumer.spawn(
            stopping.stop_accepting.clone(),
            stopping.background_stop.clone(),
            &stopping.background,
        );
        tracing::info!(queue = %r.queue, "taking tasks from redis");
    }
    Ok(())
}

/// Runs the daemon on `socket` (bound, not yet listening: see
/// [`crate::rpc::listener::bind`]) until `shutdown` is cancelled, then stops every active run
/// (recorded `cancelled`, reason `shutdown`), waits for every task, and returns.
///
/// The socket starts accepting only once the state directory is locked, the store open and
/// the token written, so a client that connects as soon as the port accepts finds them.
pub async fn run(
    cfg: Config,
    socket: TcpSocket,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    heap::tune();
    let watchdog = CancellationToken::new();
    let _stop_watchdog = watchdog.clone().drop_guard();
    crate::systemd::keep_watchdog(watchdog);
    let local = socket.local_addr()?;
    let Opened { _lock, store, mut token } = open_state(&cfg, &local).await?;
    let stopping = Stopping::default();
    // In a cluster: stand by, relaying to the lease holder, until this server holds the lease.
    let cluster = store.join_cluster(&cfg.name).transpose()?;
    let cluster_stop = CancellationToken::new();
    let _stop_cluster_tasks = cluster_stop.clone().drop_guard();
    let lost = CancellationToken::new();
    let peers = crate::rpc::http::Peers::default();
    // A cluster's server listens while it stands by; a lone daemon once its units are loaded.
    let mut socket = Some(socket);
    // Loaded before standing by: a server whose certificate cannot be loaded stops at once,
    // not after it has taken the lease over.
    let tls = server_tls(&cfg, local)?;
    let mut holding = None;
    if let Some(c) = &cluster {
        if let Some(t) = token {
            token = Some(share_token(c, &cfg, t).await?);
        }
        let listener = listen(socket.take().expect("not listening yet"))
            .map_err(|e| anyhow::anyhow!("cannot listen on {local}: {e}"))?;
        let lease = Lease { cluster: c, stop: &cluster_stop, lost: &lost };
        match stand_by(&cfg, &store, lease, listener, local, &peers, &shutdown).await? {
            Some(h) => holding = Some(h),
            None => return Ok(()),
        }
    }
    let fingerprint = tls.as_ref().map(|t| t.fingerprint.clone());
    let registry =
        match open_registry(&cfg, &store, fingerprint, cluster.is_some(), &stopping).await {
            Ok(r) => r,
            Err(e) => {
                if let (Some(c), Some(h)) = (&cluster, &holding) {
                    give_lease_up(c, h.epoch, &cluster_stop).await;
                }
                return Err(e);
            }
        };
    // Loading left holes in the heap (definitions parsed, records copied) between the units'
    // long-lived state; with 100,000 units that is tens of MiB the allocator would keep.
    heap::trim();
    let gate = Gate::new(cfg.max_connections, token.is_some());
    stopping.conn_tasks.spawn(heap::give_back_after_bursts(stopping.listener_stop.clone()));
    let api = Api(Arc::new(ApiContext {
        registry: registry.clone(),
        started: process_started(),
        listeners: vec![local.to_string()],
        token: token.clone(),
        followers: stopping.followers.clone(),
        gate: gate.clone(),
        cluster: cluster.clone().map(|c| (c, cfg.lease)),
    }));
    let serve_cfg = serve_config(&cfg, &registry, &token, tls, peers, gate, &stopping);
    let (listener, host, epoch) = match (holding, socket) {
        (Some(h), _) => (h.listener, Some(h.host), Some(h.epoch)),
        (None, Some(s)) => {
            let l = listen(s).map_err(|e| anyhow::anyhow!("cannot listen on {local}: {e}"))?;
            (l, None, None)
        }
        (None, None) => unreachable!("the socket listens once"),
    };
    // Written whole and renamed into place: a reader never sees half an address.
    let address_file =
        state_dir::write_private(&cfg.state_dir, ADDRESS_FILE, format!("{local}\n").as_bytes())?;
    tracing::info!(
        addr = %local,
        state_dir = %cfg.state_dir.display(),
        units = registry.len(),
        auth = if token.is_some() { "token" } else { "none" },
        "taskd ready"
    );
    crate::systemd::ready(&format!(
        "serving on {local}: {} units{}",
        registry.len(),
        if cluster.is_some() { ", holding the cluster's lease" } else { "" }
    ));
    start_background(&cfg, &registry, &stopping)?;
    let server = tokio::spawn(serve(
        listener,
        methods(api),
        serve_cfg,
        stopping.listener_stop.clone(),
        stopping.conn_tasks.clone(),
    ));
    let lost_lease = tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = lost.cancelled() => true,
    };
    crate::systemd::stopping();
    stopping.stop(&store, server).await?;
    let _ = std::fs::remove_file(&address_file);
    stop_host(&cluster_stop, host).await;
    if lost_lease {
        anyhow::bail!(
            "this server lost the cluster's lease and stopped; start it again to stand by"
        );
    }
    if let (Some(c), Some(e)) = (&cluster, epoch) {
        // After the engine stopped: a standby takes over at once, and nobody fires meanwhile.
        give_lease_up(c, e, &cluster_stop).await;
    }
    tracing::info!("taskd stopped");
    Ok(())
}

/// How the server serves its port: limits, auth, audit, TLS, agents' credentials, the HTTP
/// routes (dashboard, `/metrics`, the seeds' REST facade) and peers to relay to.
fn serve_config(
    cfg: &Config,
    registry: &Registry,
    token: &Option<Arc<str>>,
    tls: Option<ServerTls>,
    peers: crate::rpc::http::Peers,
    gate: Arc<Gate>,
    stopping: &Stopping,
) -> ServeConfig {
    let sessions = Arc::new(crate::rpc::dashboard::Sessions::default());
    ServeConfig {
        auth: match token {
            Some(t) => Auth::Token(t.clone()),
            None => Auth::None,
        },
        max_request_size: cfg.max_request_size,
        max_connections: cfg.max_connections,
        max_in_flight: cfg.max_in_flight,
        idle_timeout: cfg.idle_timeout,
        audit: audit_to(registry.store().clone()),
        audited_methods: AUDITED_METHODS,
        stop_accepting: stopping.stop_accepting.clone(),
        allow_hosts: cfg.allow_host.clone(),
        peers,
        gate: Some(gate),
        tls: tls.map(|t| t.acceptor),
        plain_remote: cfg.insecure,
        agents: Some({
            let fleet = registry.fleet().clone();
            Arc::new(move |credential: &str| fleet.authenticate(credential))
        }),
        routes: Some(Arc::new(DaemonRoutes::new(
            registry.clone(),
            cfg.metrics_public,
            sessions.clone(),
            token.clone(),
        ))),
        sessions: Some(sessions),
        metrics: Some(registry.metrics().clone()),
        ..ServeConfig::default()
    }
}

/// When this process started (first asked for at the top of `main`): what `Daemon.Status`
/// counts its uptime from, also on a cluster's server that took the lease over long after it
/// started.
pub fn process_started() -> Timestamp {
    static STARTED: std::sync::OnceLock<Timestamp> = std::sync::OnceLock::new();
    *STARTED.get_or_init(Timestamp::now)
}
