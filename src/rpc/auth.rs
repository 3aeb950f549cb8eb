//! Authentication for every transport: constant-time comparison of the token, and the
//! markers transports put into request extensions.
//!
//! Transports only *establish* identity (an [`Authenticated`] marker for HTTP and WebSocket,
//! set by [`super::http`]; a per-connection [`ConnAuth`] login for raw TCP); the one RPC
//! middleware in [`super::middleware`] decides per call whether that is enough.

use std::net::SocketAddr;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::conn::Conn;

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

/// Request-extension on raw TCP: the connection's login, which `Auth.Login` sets. (HTTP and
/// WebSocket requests carry [`Authenticated`] instead: their token comes with each request.)
#[derive(Clone, Debug)]
pub struct ConnAuth(Arc<Conn>);

impl ConnAuth {
    /// The login of `conn`.
    pub fn new(conn: Arc<Conn>) -> Self {
        Self(conn)
    }

    /// Marks the connection logged in; `Auth.Login` calls this after a successful compare.
    pub fn set(&self) {
        self.0.authenticate();
    }

    /// Marks the connection logged in as agent `name`.
    pub fn set_agent(&self, name: String, epoch: u64) {
        self.0.authenticate_agent(name, epoch);
    }

    /// Whether the connection has logged in.
    pub fn is_set(&self) -> bool {
        self.0.is_authenticated()
    }

    /// Counts a failed login of this connection's peer.
    pub fn failed(&self) {
        self.0.login_failed();
    }
}

/// A JSON-RPC error object serialised as a complete response with `id: null`.
pub(crate) fn error_body(code: i32, message: &str) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare() {
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abc", "abd"));
        assert!(!token_eq("abc", "ab"));
        let auth = Auth::Token("s3cret".into());
        assert!(auth.accepts("s3cret") && !auth.accepts("nope"));
        assert!(Auth::None.accepts("anything"));
    }
}
