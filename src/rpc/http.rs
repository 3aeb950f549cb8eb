//! The HTTP front of the listener: HTTP/1.1 (hyper) in front of jsonrpsee's HTTP and WebSocket
//! service, and the one tower layer every HTTP request and WebSocket upgrade passes first.
//!
//! The layer ([`HttpGuardLayer`]) decides, in this order:
//!
//! 1. **Browsers** ([`HostPolicy`]): a request whose `Host` is not one of the daemon's own
//!    names (its address, `localhost`, `127.0.0.1`, `[::1]` with its port, or an
//!    `--allow-host` name), or that carries an `Origin` other than `http(s)://` one of those,
//!    is refused with 403, whatever the auth mode. A web page can make a browser send
//!    requests to any address, but it cannot choose their `Origin`, and a page that reaches
//!    the daemon through DNS rebinding sends its own name as `Host`. Requests without
//!    `Origin` (curl, scripts) are judged by the other rules alone.
//! 2. **Token**: without the bearer token, 401 with `Connection: close`, and the failure is
//!    counted for the peer (never written to the audit log).
//! 3. **Size**: a declared body over the request limit is refused before it is read.
//!
//! Then the request goes to jsonrpsee with its connection ([`Conn`]), peer and transport in
//! its extensions, unless it is one of the daemon's own [`Routes`] (`/metrics`, the seed's
//! REST API): those are answered here, after the same rules (a public route skips the token),
//! their body read whole within the request limit.
//!
//! HTTP/2 is not offered: its concurrent streams would let one connection queue many unread
//! replies. Keep-alive connections are closed after [`HTTP_KEEP_ALIVE`] without a request
//! (hyper's header-read timeout, which runs from the end of one response until the next
//! request's head is complete, so a client trickling a head byte by byte is closed too).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, ORIGIN,
    WWW_AUTHENTICATE,
};
use http::{HeaderMap, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use jsonrpsee::core::BoxError;
use jsonrpsee::server::{HttpBody, HttpRequest, HttpResponse};

use super::auth::{Auth, Authenticated, Peer, Transport, error_body, token_eq};
use super::conn::{Conn, ConnIo};
use crate::error::codes;

/// The message sent with HTTP 401 when the bearer token is missing or wrong.
pub const HTTP_UNAUTHORIZED_MESSAGE: &str = "missing or wrong bearer token: pass Authorization: \
     Bearer <token> (the token is in <state-dir>/token)";

/// How long an HTTP keep-alive connection may wait for its next request.
pub const HTTP_KEEP_ALIVE: Duration = Duration::from_secs(60);

/// The largest request head (request line and headers), in bytes: 431 beyond.
pub const MAX_HEADER_SIZE: usize = 32 * 1024;

/// Host names in a refusal are cut to this many characters.
const ECHO_MAX: usize = 80;

/// Which `Host` and `Origin` values name this daemon.
#[derive(Clone, Debug)]
pub struct HostPolicy {
    /// The listener's port: `localhost`, `127.0.0.1` and `[::1]` must come with it.
    port: u16,
    /// The listener's own address (its IP with its port).
    listen: SocketAddr,
    /// `--allow-host` names without a port (any port), lower case.
    names: Vec<String>,
    /// `--allow-host` names with a port.
    named_ports: Vec<(String, u16)>,
    /// The other servers of its cluster (`host:port` as they advertise themselves), which
    /// relay connections to this one: kept up to date by the daemon.
    peers: Peers,
}

/// The advertised addresses of a cluster's servers, shared with the daemon that updates them.
pub type Peers = Arc<std::sync::RwLock<Vec<String>>>;

/// A `host[:port]` split, the host lower case and without IPv6 brackets.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    // A trailing dot names the same host (`localhost.`); what is left must not be empty.
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b)) {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// Trims HTTP's optional whitespace (spaces and tabs) and nothing else: a `Host` ending in a
/// no-break space is not `localhost`.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(ECHO_MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl HostPolicy {
    /// The policy of a listener on `listen`, with the `--allow-host` names.
    pub fn new(listen: SocketAddr, allow_hosts: &[String], peers: Peers) -> Self {
        let mut names = Vec::new();
        let mut named_ports = Vec::new();
        for entry in allow_hosts {
            match split_authority(trim_ows(entry)) {
                Some((host, Some(port))) => named_ports.push((host, port)),
                Some((host, None)) => names.push(host),
                None => tracing::warn!(entry = %entry, "--allow-host: not a host name; ignored"),
            }
        }
        Self { port: listen.port(), listen, names, named_ports, peers }
    }

    /// Whether `host` (lower case) with `port` names this daemon, reached at `local`.
    fn is_own(&self, host: &str, port: u16, local: Option<SocketAddr>) -> bool {
        if self.names.iter().any(|n| n == host)
            || self.named_ports.iter().any(|(n, p)| n == host && *p == port)
        {
            return true;
        }
        let peers = self.peers.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if peers
            .iter()
            .filter_map(|a| split_authority(a))
            .any(|(n, p)| n == host && p == Some(port))
        {
            return true;
        }
        if port != self.port {
            return false;
        }
        if host == "localhost" {
            return true;
        }
        let Ok(ip) = host.parse::<IpAddr>() else { return false };
        ip == IpAddr::from([127, 0, 0, 1])
            || ip == IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
            || ip == self.listen.ip()
            || local.is_some_and(|l| l.ip() == ip)
    }

    /// Checks a request's `Host` and `Origin` headers (`local`: the address the connection
    /// reached). `Err` says why it is refused.
    pub fn check(
        &self,
        host: Option<&[u8]>,
        origin: Option<&[u8]>,
        local: Option<SocketAddr>,
    ) -> Result<(), String> {
        let Some(host) = host else {
            return Err("a Host header is required".into());
        };
        let host = String::from_utf8_lossy(host);
        match split_authority(trim_ows(&host)) {
            Some((name, port)) if self.is_own(&name, port.unwrap_or(80), local) => {}
            _ => {
                return Err(format!(
                    "Host {:?} is not this daemon's address; to reach it by that name, start \
                     it with --allow-host NAME",
                    cut(&host)
                ));
            }
        }
        let Some(origin) = origin else { return Ok(()) };
        let origin = String::from_utf8_lossy(origin);
        let own = || {
            let (scheme, rest) = trim_ows(&origin).split_once("://")?;
            let default_port = match scheme.to_ascii_lowercase().as_str() {
                "http" => 80,
                "https" => 443,
                _ => return None,
            };
            let (name, port) = split_authority(rest)?;
            Some(self.is_own(&name, port.unwrap_or(default_port), local))
        };
        if own() == Some(true) {
            Ok(())
        } else {
            Err(format!(
                "Origin {:?} is not this daemon's own: requests from other web pages are refused",
                cut(&origin)
            ))
        }
    }
}

fn json_response(status: StatusCode, code: i32, message: &str) -> HttpResponse {
    let mut resp = HttpResponse::new(HttpBody::from(error_body(code, message)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A refusal that also closes the connection: a client that was refused has no business
/// keeping a slot.
fn refusal(status: StatusCode, code: i32, message: &str) -> HttpResponse {
    let mut resp = json_response(status, code, message);
    resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Who may call one of the daemon's own HTTP routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// With the bearer token, as every JSON-RPC call.
    Token,
    /// Anyone who passes the browser rules (`/metrics` with `--metrics-public`).
    Public,
}

/// Requests the daemon answers itself beside JSON-RPC (see [`super::routes`]).
#[async_trait::async_trait]
pub trait Routes: Send + Sync {
    /// Whether `method path` is one of these routes, and who may call it; `None` sends the
    /// request on to JSON-RPC.
    fn access(&self, method: &http::Method, path: &str) -> Option<Access>;

    /// Answers `req`, its body read whole; `peer` is the caller's address.
    async fn call(
        &self,
        req: http::Request<bytes::Bytes>,
        peer: Option<SocketAddr>,
    ) -> HttpResponse;
}

/// An error of one of the routes, as the seed's REST API answers them: `{"error": "…"}`.
pub fn route_error(status: StatusCode, message: &str) -> HttpResponse {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut resp = HttpResponse::new(HttpBody::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Checks an agent's credential: the agent's name and the credential's epoch, if it stands.
pub type AgentCheck = Arc<dyn Fn(&str) -> Option<(String, u64)> + Send + Sync>;

/// Tower layer for jsonrpsee's `set_http_middleware`: the browser rules, the bearer token,
/// the size limit, and the request extensions (see the module docs).
#[derive(Clone)]
pub struct HttpGuardLayer {
    auth: Auth,
    hosts: Arc<HostPolicy>,
    conn: Arc<Conn>,
    local: Option<SocketAddr>,
    max_request_size: u32,
    /// Agents' credentials, accepted as bearer tokens (the connection becomes the agent's).
    agents: Option<AgentCheck>,
    /// The daemon's own routes.
    routes: Option<Arc<dyn Routes>>,
    /// The dashboard's sessions (see [`super::dashboard`]).
    sessions: Option<Arc<super::dashboard::Sessions>>,
    /// The connection is TLS: the daemon's routes get [`OverTls`] in their requests.
    tls: bool,
}

/// In the extensions of a request to the daemon's [`Routes`] that came over TLS (so that the
/// dashboard's cookie is marked `Secure`).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

impl std::fmt::Debug for HttpGuardLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGuardLayer").field("conn", &self.conn).finish_non_exhaustive()
    }
}

impl HttpGuardLayer {
    /// A layer for one connection, `conn`, which reached the daemon at `local`.
    pub fn new(
        auth: Auth,
        hosts: Arc<HostPolicy>,
        conn: Arc<Conn>,
        local: Option<SocketAddr>,
        max_request_size: u32,
    ) -> Self {
        Self {
            auth,
            hosts,
            conn,
            local,
            max_request_size,
            agents: None,
            routes: None,
            sessions: None,
            tls: false,
        }
    }

    /// The connection is TLS (see [`OverTls`]).
    pub fn over_tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Answers `routes` itself (see [`Routes`]).
    pub fn with_routes(mut self, routes: Arc<dyn Routes>) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Also accepts the cookie of a dashboard session in `sessions` on JSON-RPC and WebSocket
    /// requests that come from the daemon's own origin (they carry an `Origin`, which the
    /// browser rules checked).
    pub fn with_sessions(mut self, sessions: Arc<super::dashboard::Sessions>) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// Also accepts agents' credentials as bearer tokens, checked by `check`: such a request's
    /// connection is the agent's, and serves only the agent protocol (as on raw TCP).
    pub fn with_agents(mut self, check: AgentCheck) -> Self {
        self.agents = Some(check);
        self
    }
}

impl HttpGuardLayer {
    /// The browser rules and the credentials (module docs, steps 1 and 2) for `req`, which is
    /// for `route` (`None`: JSON-RPC): marks it authenticated, or says why it is refused.
    fn admit<B>(
        &self,
        req: &mut HttpRequest<B>,
        route: Option<Access>,
    ) -> Result<(), (StatusCode, String)> {
        let headers = req.headers();
        // One of each, or the request is ambiguous (RFC 9112 §3.2: several Hosts are a 400).
        if headers.get_all(HOST).iter().count() > 1 || headers.get_all(ORIGIN).iter().count() > 1 {
            let why = "a request carries at most one Host and one Origin header";
            return Err((StatusCode::BAD_REQUEST, why.into()));
        }
        let query = req.uri().query();
        let host = headers.get(HOST).map(HeaderValue::as_bytes);
        let origin = headers.get(ORIGIN).map(HeaderValue::as_bytes);
        if let Err(why) = self.hosts.check(host, origin, self.local) {
            tracing::debug!(peer = ?self.conn.peer(), "refused: {why}");
            return Err((StatusCode::FORBIDDEN, format!("forbidden: {why}")));
        }
        let credential = bearer(headers).filter(|b| crate::proto::parse_credential(b).is_some());
        if route == Some(Access::Public) {
            // Judged by the browser rules alone.
        } else if route.is_some() && credential.is_some() {
            // An agent's credential serves only the agent protocol.
            self.conn.login_failed();
            let why = "unauthorized: an agent's credential serves only the agent protocol";
            return Err((StatusCode::UNAUTHORIZED, why.into()));
        } else if let (Some(check), Some(presented)) = (&self.agents, credential) {
            let Some((name, epoch)) = check(presented) else {
                self.conn.login_failed();
                let why = "agent credential refused: unknown or revoked";
                return Err((StatusCode::UNAUTHORIZED, why.into()));
            };
            self.conn.authenticate_agent(name, epoch);
            req.extensions_mut().insert(Authenticated);
        } else if let Auth::Token(token) = &self.auth {
            let by_token = bearer(headers).is_some_and(|presented| token_eq(token, presented));
            let by_session = || {
                let sessions = self.sessions.as_ref().filter(|_| route.is_none())?;
                origin.and_then(|_| sessions.admits(headers, query))
            };
            if !by_token {
                let Some(session) = by_session() else {
                    self.conn.login_failed();
                    return Err((StatusCode::UNAUTHORIZED, HTTP_UNAUTHORIZED_MESSAGE.into()));
                };
                // A WebSocket lives as long as the session that let it in, no longer (an HTTP
                // call is judged on its own each time).
                if is_ws_upgrade(headers) {
                    let (conn, gone) = (Arc::downgrade(&self.conn), self.conn.gone());
                    tokio::spawn(async move {
                        let expired = tokio::time::sleep_until(session.until.into());
                        tokio::select! {
                            () = session.ended.cancelled() => {}
                            () = expired => {}
                            () = gone.cancelled() => return,
                        }
                        if let Some(conn) = conn.upgrade() {
                            conn.close();
                        }
                    });
                }
            }
            self.conn.authenticate();
            req.extensions_mut().insert(Authenticated);
        }
        Ok(())
    }
}

impl<S> tower::Layer<S> for HttpGuardLayer {
    type Service = HttpGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpGuard { inner, layer: self.clone() }
    }
}

/// The service made by [`HttpGuardLayer`].
#[derive(Clone)]
pub struct HttpGuard<S> {
    inner: S,
    layer: HttpGuardLayer,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn is_ws_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

impl<S, B> tower::Service<HttpRequest<B>> for HttpGuard<S>
where
    S: tower::Service<HttpRequest<B>, Response = HttpResponse, Error = BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest<B>) -> Self::Future {
        let layer = self.layer.clone();
        // One of the daemon's own routes, or JSON-RPC: it decides the shape of a refusal.
        let route = match &layer.routes {
            Some(r) if !is_ws_upgrade(req.headers()) => r.access(req.method(), req.uri().path()),
            _ => None,
        };
        // A refusal closes the connection: a client that was refused has no business keeping
        // a slot (an oversized JSON-RPC call excepted, which is answered as a call).
        let refusal_of = |status, code, message: &str| match route {
            Some(_) => {
                let mut r = route_error(status, message);
                r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                r
            }
            None if status == StatusCode::PAYLOAD_TOO_LARGE => json_response(status, code, message),
            None => refusal(status, code, message),
        };
        let refuse = |resp| -> Self::Future { Box::pin(std::future::ready(Ok(resp))) };
        if let Err((status, why)) = layer.admit(&mut req, route) {
            let mut resp = refusal_of(status, codes::UNAUTHORIZED, &why);
            if why == HTTP_UNAUTHORIZED_MESSAGE {
                resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return refuse(resp);
        }

        // jsonrpsee enforces the limit while reading the body as well; checking the declared
        // length first refuses an oversized upload before a byte of it is buffered.
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let too_large =
            format!("request too large: the limit is {} bytes per request", layer.max_request_size);
        if declared.is_some_and(|len| len > u64::from(layer.max_request_size)) {
            return refuse(refusal_of(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::LIMIT_EXCEEDED,
                &too_large,
            ));
        }

        if let (Some(routes), Some(_)) = (layer.routes.clone(), route) {
            let limit = layer.max_request_size as usize;
            let peer = layer.conn.peer();
            let conn = layer.conn.clone();
            if layer.tls {
                req.extensions_mut().insert(OverTls);
            }
            return Box::pin(async move {
                let (parts, body) = req.into_parts();
                let limited = http_body_util::Limited::new(body, limit);
                let body = match http_body_util::BodyExt::collect(limited).await {
                    Ok(b) => b.to_bytes(),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                        return Ok(route_error(StatusCode::PAYLOAD_TOO_LARGE, &too_large));
                    }
                    Err(e) => {
                        let message = format!("cannot read the request body: {e}");
                        return Ok(route_error(StatusCode::BAD_REQUEST, &message));
                    }
                };
                let mut resp = routes.call(http::Request::from_parts(parts, body), peer).await;
                // A refused sign-in (`POST /login`) counts as a failed login, as a wrong
                // token does anywhere, and closes its connection.
                if resp.status() == StatusCode::UNAUTHORIZED {
                    conn.login_failed();
                    resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok(resp)
            });
        }

        let transport = if is_ws_upgrade(req.headers()) { "ws" } else { "http" };
        req.extensions_mut().insert(Transport(transport));
        req.extensions_mut().insert(layer.conn.clone());
        if let Some(peer) = layer.conn.peer() {
            req.extensions_mut().insert(Peer(peer));
        }
        Box::pin(self.inner.call(req))
    }
}

/// Serves one HTTP/1.1 connection with `service` (jsonrpsee's, behind [`HttpGuardLayer`])
/// until the client is done, the connection is closed by the daemon, or `stopped` resolves
/// (then gracefully: the request in progress is answered).
///
/// Returns once the HTTP exchange is over; a WebSocket session it upgraded to goes on in
/// jsonrpsee's own task, over the same [`ConnIo`].
pub async fn serve_connection<I, S>(
    stream: I,
    conn: Arc<Conn>,
    service: S,
    keep_alive: Duration,
    stopped: impl Future<Output = ()>,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = HttpResponse>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let io = TokioIo::new(ConnIo::new(stream, conn.clone()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(keep_alive)
        .keep_alive(true)
        // A request head is small; a client may not make the daemon buffer a large one.
        .max_header_size(MAX_HEADER_SIZE)
        .max_buf_size(MAX_HEADER_SIZE.max(64 * 1024));
    let served = builder.serve_connection(io, TowerToHyperService::new(service)).with_upgrades();
    tokio::pin!(served, stopped);
    tokio::select! {
        res = &mut served => res,
        () = &mut stopped => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        () = conn.closed() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> HostPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        HostPolicy::new("127.0.0.1:3333".parse().expect("addr"), &allow, Peers::default())
    }

    fn ok(p: &HostPolicy, host: &str, origin: Option<&str>) -> bool {
        p.check(Some(host.as_bytes()), origin.map(str::as_bytes), None).is_ok()
    }

    #[test]
    fn own_hosts_pass_and_others_are_refused() {
        let p = policy(&[]);
        for host in ["127.0.0.1:3333", "localhost:3333", "LOCALHOST:3333", "[::1]:3333"] {
            assert!(ok(&p, host, None), "{host}");
        }
        for host in ["evil.example:3333", "localhost:80", "localhost", "127.0.0.2:3333", "", "[::1"]
        {
            assert!(!ok(&p, host, None), "{host}");
        }
        assert!(p.check(None, None, None).is_err(), "no Host");
        for odd in ["localhost:3333\u{a0}", "\u{b}localhost:3333", ".:3333", "..:3333"] {
            assert!(!ok(&p, odd, None), "{odd:?}");
        }
        assert!(ok(&p, " localhost.:3333\t", None));
        assert!(policy(&["."]).check(Some(b"."), None, None).is_err(), "no empty name");
        // The address the connection reached counts as the daemon's own.
        let local = Some("10.1.2.3:3333".parse().expect("addr"));
        assert!(p.check(Some(b"10.1.2.3:3333"), None, local).is_ok());
    }

    #[test]
    fn origins_must_be_the_daemons_own() {
        let p = policy(&[]);
        assert!(ok(&p, "localhost:3333", Some("http://localhost:3333")));
        assert!(ok(&p, "localhost:3333", Some("https://127.0.0.1:3333")));
        for origin in [
            "http://evil.example",
            "http://evil.example:3333",
            "null",
            "http://localhost",
            "file://",
            "http://localhost:3333/path",
            "ftp://localhost:3333",
        ] {
            assert!(!ok(&p, "localhost:3333", Some(origin)), "{origin}");
        }
    }

    #[test]
    fn allowed_names_with_and_without_ports() {
        let p = policy(&["taskd.example", "box.lan:8080"]);
        assert!(ok(&p, "taskd.example", Some("https://taskd.example")));
        assert!(ok(&p, "TASKD.example:9999", None));
        assert!(ok(&p, "box.lan:8080", Some("http://box.lan:8080")));
        assert!(!ok(&p, "box.lan:3333", None));
        assert!(!ok(&p, "other.example:3333", None));
    }

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  tok "));
        assert_eq!(bearer(&headers), Some("tok"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic tok"));
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn refusals_do_not_echo_long_values() {
        let p = policy(&[]);
        let long = "a".repeat(10_000);
        let e = p.check(Some(long.as_bytes()), None, None).expect_err("refused");
        assert!(e.len() < 300, "{}", e.len());
    }
}
