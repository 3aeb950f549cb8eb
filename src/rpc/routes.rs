//! The HTTP requests the daemon answers itself on its port, beside JSON-RPC (SPEC §12):
//!
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]), with the token, or to anyone who
//!   passes the browser rules with `--metrics-public`;
//! - `POST /api/v1/task` and `GET /api/v1/task`: the seed's REST task API ([`super::rest`]),
//!   with the token;
//! - `GET /`, `GET /ui/…`, `POST /login`, `POST /logout`: the web dashboard
//!   ([`super::dashboard`]), to anyone who passes the browser rules (the page's data comes
//!   over the WebSocket, with the session's cookie).
//!
//! Every other request goes to JSON-RPC. The guard in front of them ([`super::http`]) applies
//! the browser rules, the token and the size limit to these routes as to every call.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, StatusCode};
use jsonrpsee::server::{HttpBody, HttpResponse};

use super::http::{Access, Routes, route_error};
use crate::registry::Registry;

/// Prometheus scrapes.
pub const METRICS_PATH: &str = "/metrics";

/// The daemon's own routes.
pub struct DaemonRoutes {
    registry: Registry,
    metrics_public: bool,
    /// The dashboard's sessions, and the token that opens one (`None`: no auth).
    sessions: Arc<super::dashboard::Sessions>,
    token: Option<Arc<str>>,
}

impl DaemonRoutes {
    /// The routes of the daemon of `registry`; `/metrics` needs no token if `metrics_public`;
    /// the dashboard's sign-in opens `sessions` for `token`.
    pub fn new(
        registry: Registry,
        metrics_public: bool,
        sessions: Arc<super::dashboard::Sessions>,
        token: Option<Arc<str>>,
    ) -> Self {
        Self { registry, metrics_public, sessions, token }
    }

    fn metrics(&self) -> HttpResponse {
        let mut resp = HttpResponse::new(HttpBody::from(self.registry.scrape()));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
        resp
    }
}

/// 405 with the methods `path` takes.
fn not_allowed(allow: &'static str) -> HttpResponse {
    let mut resp = route_error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allow}"));
    resp.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

#[async_trait::async_trait]
impl Routes for DaemonRoutes {
    fn access(&self, method: &Method, path: &str) -> Option<Access> {
        match path {
            // Public for scrapes only: anything else asks for the token before its body is read.
            METRICS_PATH if self.metrics_public && method == Method::GET => Some(Access::Public),
            METRICS_PATH => Some(Access::Token),
            super::rest::TASK_PATH => Some(Access::Token),
            p if super::dashboard::is_dashboard(method, p) => Some(Access::Public),
            _ => None,
        }
    }

    async fn call(
        &self,
        req: http::Request<bytes::Bytes>,
        peer: Option<SocketAddr>,
    ) -> HttpResponse {
        let path = req.uri().path();
        match (path, req.method()) {
            (METRICS_PATH, &Method::GET) => self.metrics(),
            (METRICS_PATH, _) => not_allowed("GET"),
            (super::rest::TASK_PATH, &Method::POST) => {
                super::rest::add(&self.registry, req.body(), peer).await
            }
            (super::rest::TASK_PATH, &Method::GET) => {
                super::rest::list(&self.registry, req.uri().query()).await
            }
            (super::rest::TASK_PATH, _) => not_allowed("GET, POST"),
            (p @ (super::dashboard::LOGIN_PATH | super::dashboard::LOGOUT_PATH), m) => {
                let token = self.token.as_deref();
                let secure = req.extensions().get::<super::http::OverTls>().is_some();
                let sign = super::dashboard::Sign { method: m, path: p, secure };
                super::dashboard::sign(&self.sessions, token, sign, req.headers(), req.body())
            }
            (p, m) if super::dashboard::is_dashboard(m, p) => super::dashboard::asset(m, p),
            _ => route_error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}
