//! The one listener: raw TCP, HTTP and WebSocket JSON-RPC on a single port, told apart by each
//! connection's first byte, with a connection limit shared by all three.
//!
//! An HTTP request line starts with an ASCII letter (`POST`, `GET`); a JSON value starts with
//! `{`, `[` or whitespace. HTTP (and WebSocket upgrades) go to jsonrpsee's tower service, raw
//! TCP to [`super::tcp`], and both run the same middleware from [`super::middleware`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use jsonrpsee::server::{Methods, Server, ServerConfig, StopHandle, stop_channel};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{Auth, HttpAuthLayer, error_body};
use super::middleware::{AUDITED_METHODS, AuditHook, RpcLayer, no_audit};
use super::tcp::{self, TcpConfig};
use crate::error::codes;

/// How long a connection over the limit may take to show its first byte, so that it can be
/// refused in its own protocol.
const REFUSE_PEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a new connection may take to send its first byte before it is dropped.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

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
    );
    let server_cfg = ServerConfig::builder()
        .max_request_body_size(cfg.max_request_size)
        .max_response_body_size(cfg.max_response_size)
        .max_subscriptions_per_connection(cfg.max_subscriptions)
        .set_message_buffer_capacity(1024)
        // The limit across protocols is ours (below); jsonrpsee's guard is per connection here.
        .max_connections(u32::try_from(cfg.max_connections).unwrap_or(u32::MAX))
        .build();
    let (stop, server_handle) = stop_channel();
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let shared = Arc::new(Shared {
        cfg,
        methods,
        rpc,
        server_cfg,
        stop,
        shutdown: shutdown.clone(),
        next_conn_id: AtomicU32::new(1),
    });
    let local = listener.local_addr().ok();
    tracing::debug!(addr = ?local, "rpc listener serving raw TCP, HTTP and WebSocket");

    let stop_accepting = shared.cfg.stop_accepting.clone();
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
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tracker.spawn(async move {
                    handle_connection(stream, peer, &shared).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracing::warn!(%peer, "connection limit reached; refusing");
                let max = shared.cfg.max_connections;
                tracker.spawn(refuse(stream, max));
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
    let is_http = matches!(
        tokio::time::timeout(REFUSE_PEEK_TIMEOUT, stream.peek(&mut first)).await,
        Ok(Ok(1..)) if first[0].is_ascii_alphabetic()
    );
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

async fn handle_connection(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    // `peek` waits for at least one byte; a client that never sends one is dropped.
    let peeked = tokio::select! {
        () = shared.shutdown.cancelled() => return,
        peeked = tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)) => peeked,
    };
    match peeked {
        Ok(Ok(1..)) => {}
        Ok(Ok(0)) | Err(_) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "peek failed");
            return;
        }
    }
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    if first[0].is_ascii_alphabetic() {
        serve_http(stream, peer, conn_id, shared).await;
    } else {
        let cfg = TcpConfig {
            max_request_size: shared.cfg.max_request_size,
            max_response_size: shared.cfg.max_response_size,
            max_in_flight: shared.cfg.max_in_flight.max(1),
            idle_timeout: shared.cfg.idle_timeout,
            max_subscriptions: shared.cfg.max_subscriptions,
            ..TcpConfig::default()
        };
        tcp::serve_connection(
            stream,
            Some(peer),
            conn_id,
            shared.methods.clone(),
            shared.rpc.builder(),
            cfg,
            shared.shutdown.clone(),
        )
        .await;
    }
}

async fn serve_http(stream: TcpStream, peer: SocketAddr, conn_id: u32, shared: &Shared) {
    let http_middleware = tower::ServiceBuilder::new().layer(HttpAuthLayer::new(
        shared.cfg.auth.clone(),
        Some(peer),
        shared.cfg.max_request_size,
    ));
    let mut svc = Server::builder()
        .set_config(shared.server_cfg.clone())
        .set_http_middleware(http_middleware)
        .set_rpc_middleware(shared.rpc.builder())
        .to_service_builder()
        .connection_id(conn_id)
        .build(shared.methods.clone(), shared.stop.clone());
    // Resolves once every piece of this connection is gone, including a WebSocket session
    // that jsonrpsee runs on its own task after the upgrade; holding the connection permit
    // (and the tracker task) until then keeps the limit and shutdown honest.
    let session_closed = svc.on_session_closed();
    let stopped = shared.stop.clone().shutdown();
    if let Err(e) = jsonrpsee::server::serve_with_graceful_shutdown(stream, svc, stopped).await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
    session_closed.await;
}
