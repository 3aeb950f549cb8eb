//! The one listener: raw TCP, HTTP and WebSocket JSON-RPC on a single port, told apart by each
//! connection's first byte, with connection slots shared by all three ([`super::conn::Gate`]).
//!
//! An HTTP request line starts with an ASCII letter (`POST`, `GET`); a JSON value starts with
//! `{`, `[` or whitespace. HTTP (and WebSocket upgrades) go through [`super::http`] to
//! jsonrpsee's tower service, raw TCP to [`super::tcp`], and both run the same middleware from
//! [`super::middleware`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use jsonrpsee::server::{Methods, PingConfig, Server, ServerConfig, StopHandle, stop_channel};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{Auth, error_body};
use super::conn::{Conn, Gate, LOGIN_TIMEOUT};
use super::http::{HTTP_KEEP_ALIVE, HostPolicy, HttpGuardLayer};
use super::middleware::{AUDITED_METHODS, AuditHook, RpcLayer, no_audit};
use super::tcp::{self, TcpConfig};
use crate::error::codes;

/// Connections over the limit being told so at once; more are closed without a word.
const MAX_REFUSERS: usize = 64;

/// How long a connection over the limit may take to show its first byte, so that it can be
/// refused in its own protocol.
const REFUSE_PEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a new connection may take to send its first byte before it is dropped.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections the kernel queues for the listener before the daemon accepts them.
const BACKLOG: u32 = 1024;

/// Binds the daemon's address without listening yet: the port is taken (a clash is reported
/// before anything else happens) but connections are refused until [`listen`], so that a
/// client never reaches a daemon whose token file is not written yet.
pub async fn bind(addr: &str) -> std::io::Result<TcpSocket> {
    let mut last = None;
    for sa in tokio::net::lookup_host(addr).await? {
        let socket = if sa.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // As std's TcpListener::bind: a restarted daemon may take its port back at once.
        socket.set_reuseaddr(true)?;
        match socket.bind(sa) {
            Ok(()) => return Ok(socket),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: no address"))
    }))
}

/// Starts accepting connections on a socket from [`bind`].
pub fn listen(socket: TcpSocket) -> std::io::Result<TcpListener> {
    socket.listen(BACKLOG)
}

/// Everything [`serve`] needs to know besides the listener and the methods.
#[derive(Clone)]
pub struct ServeConfig {
    /// Who may call.
    pub auth: Auth,
    /// Largest request (HTTP body, WebSocket message, raw TCP JSON value) and response, in bytes.
    pub max_request_size: u32,
    /// Largest response, in bytes (responses are ours, so this is a sanity bound).
    pub max_response_size: u32,
    /// Open connections across all protocols; more are refused.
    pub max_connections: usize,
    /// Calls executing at once per raw TCP connection.
    pub max_in_flight: usize,
    /// Idle raw TCP connections are closed after this long.
    pub idle_timeout: Duration,
    /// Active subscriptions per connection.
    pub max_subscriptions: u32,
    /// Called once for every call of an audited method.
    pub audit: AuditHook,
    /// The methods whose calls are audited.
    pub audited_methods: &'static [&'static str],
    /// Cancelled to stop accepting new connections while the existing ones are still served
    /// (until the `shutdown` token passed to [`serve`]).
    pub stop_accepting: CancellationToken,
    /// Host names browsers may use for the daemon besides its address and localhost.
    pub allow_hosts: Vec<String>,
    /// The other servers of its cluster, accepted in `Host` and `Origin` (they relay).
    pub peers: super::http::Peers,
    /// The connection slots, when the caller wants to see them (failed logins, occupancy);
    /// else [`serve`] makes its own of `max_connections`.
    pub gate: Option<Arc<Gate>>,
    /// TLS, told apart from plain connections by the first byte (0x16, a handshake).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// With TLS on, whether plain connections from other hosts are still served
    /// (`--insecure`); loopback ones always are.
    pub plain_remote: bool,
    /// Agents' credentials, accepted as bearer tokens on HTTP and WebSocket.
    pub agents: Option<super::http::AgentCheck>,
    /// HTTP requests answered beside JSON-RPC (`/metrics`, the REST API, the dashboard).
    pub routes: Option<Arc<dyn super::http::Routes>>,
    /// The dashboard's sessions: their cookie admits JSON-RPC and WebSocket requests from the
    /// daemon's own origin.
    pub sessions: Option<Arc<super::dashboard::Sessions>>,
    /// Where calls are counted.
    pub metrics: Option<crate::metrics::Metrics>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            auth: Auth::None,
            max_request_size: 1024 * 1024,
            max_response_size: 16 * 1024 * 1024,
            max_connections: 1024,
            max_in_flight: 64,
            idle_timeout: Duration::from_secs(300),
            max_subscriptions: 64,
            audit: no_audit(),
            audited_methods: AUDITED_METHODS,
            stop_accepting: CancellationToken::new(),
            allow_hosts: Vec::new(),
            peers: Default::default(),
            gate: None,
            tls: None,
            plain_remote: true,
            agents: None,
            routes: None,
            sessions: None,
            metrics: None,
        }
    }
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("auth_required", &self.auth.is_required())
            .field("max_request_size", &self.max_request_size)
            .field("max_connections", &self.max_connections)
            .field("max_in_flight", &self.max_in_flight)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("audited_methods", &self.audited_methods)
            .finish_non_exhaustive()
    }
}

/// State shared by all connections of one listener.
struct Shared {
    cfg: ServeConfig,
    methods: Methods,
    rpc: RpcLayer,
    server_cfg: ServerConfig,
    stop: StopHandle,
    shutdown: CancellationToken,
    /// Connection ids are unique across protocols; subscriptions are keyed by them.
    next_conn_id: AtomicU32,
    gate: Arc<Gate>,
    hosts: Arc<HostPolicy>,
}

/// Serves `listener` until `shutdown` is cancelled, then stops accepting and tells every
/// connection to finish its in-flight calls and close. Connection tasks run on `tracker`, so
/// the caller waits for them with `tracker.close(); tracker.wait().await`.
pub async fn serve(
    listener: TcpListener,
    methods: impl Into<Methods>,
    cfg: ServeConfig,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let methods: Methods = methods.into();
    let rpc = RpcLayer::new(
        &methods,
        cfg.auth.clone(),
        cfg.audit.clone(),
        cfg.audited_methods.iter().copied(),
        cfg.max_response_size as usize,
        cfg.metrics.clone(),
    );
    let server_cfg = ServerConfig::builder()
        .max_request_body_size(cfg.max_request_size)
        .max_response_body_size(cfg.max_response_size)
        .max_subscriptions_per_connection(cfg.max_subscriptions)
        .set_message_buffer_capacity(1024)
        // A WebSocket peer that stops answering pings (a closed laptop, a vanished tab) is
        // closed instead of holding its slot forever.
        .enable_ws_ping(PingConfig::new())
        // The limit across protocols is ours (below); jsonrpsee's guard is per connection here.
        .max_connections(u32::try_from(cfg.max_connections).unwrap_or(u32::MAX))
        .build();
    let (stop, server_handle) = stop_channel();
    let gate =
        cfg.gate.clone().unwrap_or_else(|| Gate::new(cfg.max_connections, cfg.auth.is_required()));
    let local = listener.local_addr().ok();
    let hosts = Arc::new(HostPolicy::new(
        local.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        &cfg.allow_hosts,
        cfg.peers.clone(),
    ));
    let shared = Arc::new(Shared {
        cfg,
        methods,
        rpc,
        server_cfg,
        stop,
        shutdown: shutdown.clone(),
        next_conn_id: AtomicU32::new(1),
        gate,
        hosts,
    });
    tracing::debug!(addr = ?local, "rpc listener serving raw TCP, HTTP and WebSocket");

    let stop_accepting = shared.cfg.stop_accepting.clone();
    let refusers = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSERS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            () = stop_accepting.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        match shared.gate.admit(Some(peer)) {
            Some(conn) => {
                let shared = shared.clone();
                tracker.spawn(async move { handle_connection(stream, conn, &shared).await });
            }
            None => {
                // Telling a refused client why takes a moment; a flood of them is just closed.
                match refusers.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tracing::warn!(%peer, "connection limit reached; refusing");
                        let max = shared.gate.max();
                        tracker.spawn(async move {
                            refuse(stream, max).await;
                            drop(permit);
                        });
                    }
                    Err(_) => drop(stream),
                }
            }
        }
    }

    // Closing the socket makes the kernel refuse new connections; the ones already accepted
    // are served until `shutdown`.
    drop(listener);
    tracing::debug!(addr = ?local, "rpc listener stopped accepting");
    shutdown.cancelled().await;
    // Stop HTTP and WebSocket connections gracefully; raw TCP ones watch `shutdown` directly.
    let _ = server_handle.stop();
}

/// Tells a client over the connection limit why it is being closed, in its own protocol.
async fn refuse(mut stream: TcpStream, max: usize) {
    let message = format!("too many connections: the limit is {max}; try again later");
    let body = error_body(codes::LIMIT_EXCEEDED, &message);
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(REFUSE_PEEK_TIMEOUT, stream.peek(&mut first)).await;
    if matches!(peeked, Ok(Ok(1..))) && first[0] == TLS_HANDSHAKE {
        // A TLS client would read plain text as a broken handshake: just close.
        let _ = stream.shutdown().await;
        return;
    }
    let is_http = matches!(peeked, Ok(Ok(1..)) if first[0].is_ascii_alphabetic());
    let reply = if is_http {
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        format!("{body}\n")
    };
    let _ = tokio::time::timeout(REFUSE_PEEK_TIMEOUT, stream.write_all(reply.as_bytes())).await;
    let _ = stream.shutdown().await;
}

async fn handle_connection(stream: TcpStream, conn: Arc<Conn>, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    conn.attach_socket(&stream);
    let peer = conn.peer();
    let mut first = [0u8; 1];
    // `peek` waits for at least one byte; a client that never sends one is dropped, at its
    // login deadline when it needs a login.
    let first_byte_timeout =
        if conn.is_authenticated() { FIRST_BYTE_TIMEOUT } else { shared.login_timeout() };
    // One deadline from the accept for the first byte, a TLS handshake and the first
    // decrypted byte; the login deadline after them is what is left of the login timeout.
    let accepted_at = tokio::time::Instant::now();
    let deadline = accepted_at + first_byte_timeout;
    let peeked = tokio::select! {
        () = shared.shutdown.cancelled() => return,
        () = conn.closed() => return,
        peeked = tokio::time::timeout(first_byte_timeout, stream.peek(&mut first)) => peeked,
    };
    match peeked {
        Ok(Ok(1..)) => {}
        Ok(Ok(0)) | Err(_) => return,
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "peek failed");
            return;
        }
    }
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let local = stream.local_addr().ok();
    if first[0] == TLS_HANDSHAKE {
        // Boxed: the TLS path's state (a rustls connection, buffers) is only allocated for
        // TLS connections, not reserved in every plain connection's task.
        Box::pin(serve_tls(stream, local, conn, conn_id, shared, accepted_at, deadline)).await;
        return;
    }
    if shared.cfg.tls.is_some()
        && !shared.cfg.plain_remote
        && peer.is_some_and(|p| !p.ip().to_canonical().is_loopback())
    {
        tracing::debug!(?peer, "plain connection from another host refused: TLS only");
        return;
    }
    let reached = Reached { local, tls: false };
    serve_protocol(first[0], stream, reached, conn, conn_id, shared, accepted_at).await;
}

/// A TLS connection: the handshake, then the usual sniff on the decrypted bytes.
async fn serve_tls(
    stream: TcpStream,
    local: Option<std::net::SocketAddr>,
    conn: Arc<Conn>,
    conn_id: u32,
    shared: &Shared,
    accepted_at: tokio::time::Instant,
    deadline: tokio::time::Instant,
) {
    use tokio::io::AsyncBufReadExt;
    let peer = conn.peer();
    let Some(acceptor) = shared.cfg.tls.clone() else {
        tracing::debug!(?peer, "TLS handshake, but TLS is off");
        return;
    };
    let accepted = tokio::select! {
        () = shared.shutdown.cancelled() => return,
        () = conn.closed() => return,
        a = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => a,
    };
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    // Sniffed again, on the decrypted bytes, without consuming them.
    let mut io = tokio::io::BufReader::new(tls);
    let first = match tokio::time::timeout_at(deadline, io.fill_buf()).await {
        Ok(Ok([b, ..])) => *b,
        _ => return,
    };
    let reached = Reached { local, tls: true };
    serve_protocol(first, io, reached, conn, conn_id, shared, accepted_at).await;
}

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// How a connection reached the daemon.
#[derive(Clone, Copy)]
struct Reached {
    /// The daemon's address it reached.
    local: Option<std::net::SocketAddr>,
    /// Over TLS (what is served is the decrypted stream).
    tls: bool,
}

/// Serves a connection (plain, or decrypted TLS) by its first byte: HTTP or WebSocket for a
/// letter, raw TCP JSON-RPC for anything else.
async fn serve_protocol<I>(
    first: u8,
    stream: I,
    reached: Reached,
    conn: Arc<Conn>,
    conn_id: u32,
    shared: &Shared,
    accepted_at: tokio::time::Instant,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let login_left = shared.login_timeout().saturating_sub(accepted_at.elapsed());
    if first.is_ascii_alphabetic() {
        serve_http(stream, reached, conn, conn_id, shared, login_left).await;
    } else {
        let cfg = TcpConfig {
            max_request_size: shared.cfg.max_request_size,
            max_response_size: shared.cfg.max_response_size,
            max_in_flight: shared.cfg.max_in_flight.max(1),
            idle_timeout: shared.cfg.idle_timeout,
            max_subscriptions: shared.cfg.max_subscriptions,
            login_timeout: login_left,
            ..TcpConfig::default()
        };
        tcp::serve_connection(
            stream,
            conn,
            conn_id,
            shared.methods.clone(),
            shared.rpc.builder(),
            cfg,
            shared.shutdown.clone(),
        )
        .await;
    }
}

impl Shared {
    fn login_timeout(&self) -> Duration {
        LOGIN_TIMEOUT.min(self.cfg.idle_timeout)
    }
}

async fn serve_http<I>(
    stream: I,
    Reached { local, tls }: Reached,
    conn: Arc<Conn>,
    conn_id: u32,
    shared: &Shared,
    login_left: Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer();
    let mut guard = HttpGuardLayer::new(
        shared.cfg.auth.clone(),
        shared.hosts.clone(),
        conn.clone(),
        local,
        shared.cfg.max_request_size,
    );
    if let Some(check) = &shared.cfg.agents {
        guard = guard.with_agents(check.clone());
    }
    if let Some(routes) = &shared.cfg.routes {
        guard = guard.with_routes(routes.clone());
    }
    if let Some(sessions) = &shared.cfg.sessions {
        guard = guard.with_sessions(sessions.clone());
    }
    if tls {
        guard = guard.over_tls();
    }
    let mut svc = Server::builder()
        .set_config(shared.server_cfg.clone())
        .set_http_middleware(tower::ServiceBuilder::new().layer(guard))
        .set_rpc_middleware(shared.rpc.builder())
        .to_service_builder()
        .connection_id(conn_id)
        .build(shared.methods.clone(), shared.stop.clone());
    // Resolves once every piece of this connection is gone, including a WebSocket session
    // that jsonrpsee runs on its own task after the upgrade; holding the connection (its
    // slot, and the tracker task) until then keeps the limits and shutdown honest.
    let session_closed = svc.on_session_closed();
    let stopped = shared.stop.clone().shutdown();
    let keep_alive = HTTP_KEEP_ALIVE.min(shared.cfg.idle_timeout);
    let served = super::http::serve_connection(stream, conn.clone(), svc, keep_alive, stopped);
    let login_deadline = tokio::time::sleep(login_left);
    tokio::pin!(served, login_deadline);
    loop {
        tokio::select! {
            res = &mut served => {
                if let Err(e) = res {
                    tracing::debug!(?peer, error = %e, "http connection ended with an error");
                }
                break;
            }
            () = &mut login_deadline, if !conn.is_authenticated() && !conn.is_closed() => {
                tracing::debug!(?peer, "http connection did not authenticate in time");
                conn.close();
            }
            () = conn.stalled(), if !conn.is_closed() => {
                tracing::debug!(?peer, "http client stopped reading; closing");
                conn.close();
            }
        }
    }
    tokio::pin!(session_closed);
    loop {
        tokio::select! {
            () = &mut session_closed => break,
            () = conn.stalled(), if !conn.is_closed() => {
                tracing::debug!(?peer, "websocket client stopped reading; closing");
                conn.close();
            }
        }
    }
}
