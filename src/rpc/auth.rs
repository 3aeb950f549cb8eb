//! Authentication for every transport: the daemon's token file, constant-time comparison, the
//! markers transports put into request extensions, and the HTTP/WebSocket bearer-token layer.
//!
//! Transports only *establish* identity (an [`Authenticated`] marker for HTTP and WebSocket, a
//! per-connection [`ConnAuth`] flag for raw TCP); the one RPC middleware in
//! [`super::middleware`] decides per call whether that is enough.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, StatusCode};
use jsonrpsee::core::BoxError;
use jsonrpsee::server::{HttpBody, HttpRequest, HttpResponse};
use subtle::ConstantTimeEq;

use crate::error::codes;

/// The message sent with HTTP 401 when the bearer token is missing or wrong.
pub const HTTP_UNAUTHORIZED_MESSAGE: &str = "missing or wrong bearer token: pass Authorization: \
     Bearer <token> (the token is in <state-dir>/token)";

/// How clients must prove who they are.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Every call needs this token: as `Authorization: Bearer` on HTTP/WebSocket, or through
    /// `Auth.Login` on raw TCP.
    Token(Arc<str>),
    /// `--auth none`: everyone is served (loopback only, for clients that cannot log in).
    None,
}

impl Auth {
    /// Whether `presented` is the daemon's token (always true with [`Auth::None`]).
    /// The comparison takes the same time wherever the first difference is.
    pub fn accepts(&self, presented: &str) -> bool {
        match self {
            Auth::Token(token) => token_eq(token, presented),
            Auth::None => true,
        }
    }

    /// Whether calls need authentication at all.
    pub fn is_required(&self) -> bool {
        matches!(self, Auth::Token(_))
    }
}

/// Constant-time string comparison; a length difference is not hidden (token length is public).
pub fn token_eq(expected: &str, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// Reads the token from `<state_dir>/token`, or creates that file (mode 0600) with 32 random
/// bytes, hex-encoded, when it is missing or empty.
pub fn load_or_create_token(state_dir: &Path) -> io::Result<String> {
    let path = state_dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(existing) if !existing.trim().is_empty() => return Ok(existing.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(state_dir)?;

    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();

    // Write a private temporary file and rename it into place, so no reader ever sees a
    // half-written token and the file is never world-readable, even for an instant.
    let tmp = state_dir.join(format!(".token.{}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(token.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

/// Request-extension marker: this HTTP request or WebSocket connection presented the right
/// bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authenticated;

/// Request-extension: the remote address of the connection a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// Request-extension: which transport carried the request (`"tcp"`, `"http"` or `"ws"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport(pub &'static str);

/// Request-extension on raw TCP: whether `Auth.Login` has succeeded on this connection.
/// Cheap to clone; every clone shares the one flag of its connection.
#[derive(Clone, Debug, Default)]
pub struct ConnAuth(Arc<AtomicBool>);

impl ConnAuth {
    /// A new, unauthenticated flag.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the connection authenticated; `Auth.Login` calls this after a successful compare.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the connection has authenticated.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A JSON-RPC error object serialised as a complete response with `id: null`.
pub(crate) fn error_body(code: i32, message: &str) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}})
        .to_string()
}

fn json_response(status: StatusCode, code: i32, message: &str) -> HttpResponse {
    let mut resp = HttpResponse::new(HttpBody::from(error_body(code, message)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Tower layer for jsonrpsee's `set_http_middleware`: checks the bearer token on every HTTP
/// request and WebSocket upgrade, refuses bodies over the size limit, and records the peer.
#[derive(Clone, Debug)]
pub struct HttpAuthLayer {
    auth: Auth,
    peer: Option<SocketAddr>,
    max_request_size: u32,
}

impl HttpAuthLayer {
    /// A layer for one connection from `peer`.
    pub fn new(auth: Auth, peer: Option<SocketAddr>, max_request_size: u32) -> Self {
        Self { auth, peer, max_request_size }
    }
}

impl<S> tower::Layer<S> for HttpAuthLayer {
    type Service = HttpAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpAuth { inner, layer: self.clone() }
    }
}

/// The service made by [`HttpAuthLayer`].
#[derive(Clone, Debug)]
pub struct HttpAuth<S> {
    inner: S,
    layer: HttpAuthLayer,
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

impl<S, B> tower::Service<HttpRequest<B>> for HttpAuth<S>
where
    S: tower::Service<HttpRequest<B>, Response = HttpResponse, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest<B>) -> Self::Future {
        let layer = &self.layer;
        if let Auth::Token(token) = &layer.auth {
            let ok = bearer(req.headers()).is_some_and(|presented| token_eq(token, presented));
            if !ok {
                let mut resp = json_response(
                    StatusCode::UNAUTHORIZED,
                    codes::UNAUTHORIZED,
                    HTTP_UNAUTHORIZED_MESSAGE,
                );
                resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Box::pin(std::future::ready(Ok(resp)));
            }
            req.extensions_mut().insert(Authenticated);
        }

        // jsonrpsee enforces the limit while reading the body as well; checking the declared
        // length first refuses an oversized upload before a byte of it is buffered.
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > u64::from(layer.max_request_size)) {
            let message = format!(
                "request too large: the limit is {} bytes per request",
                layer.max_request_size
            );
            return Box::pin(std::future::ready(Ok(json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::LIMIT_EXCEEDED,
                &message,
            ))));
        }

        let transport = if is_ws_upgrade(req.headers()) { "ws" } else { "http" };
        req.extensions_mut().insert(Transport(transport));
        if let Some(peer) = layer.peer {
            req.extensions_mut().insert(Peer(peer));
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create_token(dir.path()).expect("create");
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(dir.path().join("token")).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(dir.path()).expect("reuse"), first);

        std::fs::write(dir.path().join("token"), "").expect("empty it");
        let second = load_or_create_token(dir.path()).expect("recreate");
        assert_ne!(second, first);
    }

    #[test]
    fn compare_and_bearer_parsing() {
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abc", "abd"));
        assert!(!token_eq("abc", "ab"));
        let auth = Auth::Token("s3cret".into());
        assert!(auth.accepts("s3cret") && !auth.accepts("nope"));
        assert!(Auth::None.accepts("anything"));

        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  tok "));
        assert_eq!(bearer(&headers), Some("tok"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic tok"));
        assert_eq!(bearer(&headers), None);
    }
}
