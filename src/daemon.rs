//! The daemon: opens the store, recovers and starts every unit, and serves the API on the
//! listener it is given until its token is cancelled; then stops every run and drains.
//!
//! `run` installs no signal handler and never exits the process: `main` (or a test) binds the
//! listener, owns the root token, and decides what a signal means.

use std::sync::Arc;

use jiff::Timestamp;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthMode, Config};
use crate::error::Error;
use crate::exec;
use crate::registry::{Registry, RegistryConfig};
use crate::rpc::api::{Api, ApiContext, methods};
use crate::rpc::auth::Auth;
use crate::rpc::conn::Gate;
use crate::rpc::listener::{ServeConfig, listen, serve};
use crate::rpc::middleware::{AUDITED_METHODS, AuditEntry};
use crate::state_dir::{self, ADDRESS_FILE};
use crate::store::{AuditRecord, Store};
use crate::unit::ValidateCtx;
use crate::unit::definition::resolve_allowed_dirs;

/// Gives the allocator's free pages back to the system.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
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
    // First: before anything is created (the umask) or spawned (inherited descriptors).
    exec::process_hygiene();
    let local = socket.local_addr()?;
    if let Some(warning) = cfg.check_security(&local)? {
        tracing::warn!("{warning}");
    }
    if crate::config::is_root() && cfg.allowed_users.is_empty() {
        tracing::warn!(
            "running as root without allowed_users: any client can run commands as any account, root included; set allowed_users (--allowed-user NAME)"
        );
    }
    state_dir::prepare(&cfg.state_dir)?;
    let _lock = state_dir::lock(&cfg.state_dir)?;
    exec::catch_ignored_signals();
    if let Err(e) = exec::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; double-forked grandchildren will not be reaped");
    }
    let store = Store::open(&cfg.state_dir)?;
    let token: Option<Arc<str>> = match cfg.auth {
        AuthMode::Token => Some(state_dir::load_or_create_token(&cfg.state_dir)?.into()),
        AuthMode::None => None,
    };
    // Shutdown goes in two steps: first every unit stops its runs (clients still connected
    // see them end: `Run.Follow` gets its final message), then the listener closes.
    let units_root = CancellationToken::new();
    let unit_tasks = TaskTracker::new();
    let listener_stop = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let followers = TaskTracker::new();
    let conn_tasks = TaskTracker::new();
    std::fs::create_dir_all(&cfg.units_dir).map_err(|e| Error::io(&cfg.units_dir, e))?;
    let registry = Registry::open(
        store.clone(),
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
        },
        units_root.clone(),
        unit_tasks.clone(),
    )
    .await?;
    // Loading left holes in the heap (definitions parsed, records copied) between the units'
    // long-lived state; with 100,000 units that is tens of MiB the allocator would keep.
    trim_heap();
    let gate = Gate::new(cfg.max_connections, token.is_some());
    let api = Api(Arc::new(ApiContext {
        registry: registry.clone(),
        started: Timestamp::now(),
        listeners: vec![local.to_string()],
        token: token.clone(),
        followers: followers.clone(),
        gate: gate.clone(),
    }));
    let audit_store = store.clone();
    let serve_cfg = ServeConfig {
        auth: match &token {
            Some(t) => Auth::Token(t.clone()),
            None => Auth::None,
        },
        max_request_size: cfg.max_request_size,
        max_connections: cfg.max_connections,
        max_in_flight: cfg.max_in_flight,
        idle_timeout: cfg.idle_timeout,
        audit: Arc::new(move |e: AuditEntry| {
            audit_store.audit(AuditRecord {
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
        }),
        audited_methods: AUDITED_METHODS,
        stop_accepting: stop_accepting.clone(),
        allow_hosts: cfg.allow_host.clone(),
        gate: Some(gate),
        ..ServeConfig::default()
    };
    let listener = listen(socket).map_err(|e| anyhow::anyhow!("cannot listen on {local}: {e}"))?;
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
    let server = tokio::spawn(serve(
        listener,
        methods(api),
        serve_cfg,
        listener_stop.clone(),
        conn_tasks.clone(),
    ));
    shutdown.cancelled().await;
    tracing::info!("shutting down: stopping active runs");
    stop_accepting.cancel();
    units_root.cancel();
    unit_tasks.close();
    unit_tasks.wait().await;
    store.flush().await?;
    // Every run has ended; followers only have their final message left to send.
    followers.close();
    if tokio::time::timeout(std::time::Duration::from_secs(5), followers.wait()).await.is_err() {
        tracing::warn!("some Run.Follow subscribers did not finish; closing anyway");
    }
    listener_stop.cancel();
    let _ = server.await;
    conn_tasks.close();
    conn_tasks.wait().await;
    let _ = std::fs::remove_file(&address_file);
    tracing::info!("taskd stopped");
    Ok(())
}
