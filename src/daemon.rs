//! The daemon: opens the store, recovers and starts every unit, and serves the API on the
//! listener it is given until its token is cancelled; then stops every run and drains.
//!
//! `run` installs no signal handler and never exits the process: `main` (or a test) binds the
//! listener, owns the root token, and decides what a signal means.

use std::sync::Arc;

use jiff::Timestamp;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthMode, Config};
use crate::error::Error;
use crate::exec;
use crate::registry::{Registry, RegistryConfig};
use crate::rpc::api::{Api, ApiContext, methods};
use crate::rpc::auth::{Auth, load_or_create_token};
use crate::rpc::listener::{ServeConfig, serve};
use crate::rpc::middleware::{AUDITED_METHODS, AuditEntry};
use crate::store::{AuditRecord, Store};
use crate::unit::ValidateCtx;
use crate::unit::definition::resolve_allowed_dirs;

/// The file in the state directory that holds the address the daemon listens on, so that
/// `taskctl` finds a daemon started with `--listen 127.0.0.1:0`.
pub const ADDRESS_FILE: &str = "address";

/// How long a locked state directory is waited for before giving up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Holds the state directory for this daemon: a second daemon on the same directory fails.
struct StateLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn lock_state_dir(cfg: &Config) -> anyhow::Result<StateLock> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        anyhow::anyhow!("cannot create the state directory {}: {e}", cfg.state_dir.display())
    })?;
    let path = cfg.state_dir.join("taskd.lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // A daemon killed while starting a child leaves that child holding the lock until it
    // execs, a moment later: wait that moment out before calling the directory taken.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(StateLock { _lock: lock }),
            Err((back, _)) if std::time::Instant::now() < deadline => {
                f = back;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(_) => anyhow::bail!(
                "another taskd is already using {}; stop it or pass a different --state-dir",
                cfg.state_dir.display()
            ),
        }
    }
}

/// Gives the allocator's free pages back to the system.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the daemon on `listener` until `shutdown` is cancelled, then stops every active run
/// (recorded `cancelled`, reason `shutdown`), waits for every task, and returns.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // First: before anything is created (the umask) or spawned (inherited descriptors).
    exec::process_hygiene();
    let _lock = lock_state_dir(&cfg)?;
    exec::catch_ignored_signals();
    if let Err(e) = exec::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; double-forked grandchildren will not be reaped");
    }
    let local = listener.local_addr()?;
    if let Some(warning) = cfg.check_listen(&local)? {
        tracing::warn!("{warning}");
    }
    if crate::config::is_root() && cfg.allowed_users.is_empty() {
        tracing::warn!(
            "running as root without allowed_users: any client can run commands as any account, root included; set allowed_users (--allowed-user NAME)"
        );
    }
    let store = Store::open(&cfg.state_dir)?;
    let token: Option<Arc<str>> = match cfg.auth {
        AuthMode::Token => Some(
            load_or_create_token(&cfg.state_dir)
                .map_err(|e| Error::io(cfg.state_dir.join("token"), e))?
                .into(),
        ),
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
    let api = Api(Arc::new(ApiContext {
        registry: registry.clone(),
        started: Timestamp::now(),
        listeners: vec![local.to_string()],
        token: token.clone(),
        followers: followers.clone(),
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
        ..ServeConfig::default()
    };
    let address_file = cfg.state_dir.join(ADDRESS_FILE);
    // Written whole and renamed into place: a reader never sees half an address.
    let tmp = cfg.state_dir.join(format!("{ADDRESS_FILE}.tmp"));
    std::fs::write(&tmp, format!("{local}\n"))
        .and_then(|()| std::fs::rename(&tmp, &address_file))
        .map_err(|e| Error::io(&address_file, e))?;
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
