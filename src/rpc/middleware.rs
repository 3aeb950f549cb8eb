//! The one JSON-RPC middleware every transport (HTTP, WebSocket, raw TCP) runs each call through:
//! params normalisation, authorisation, executing notifications, the audit hook and tracing.
//!
//! **Architecture Invariant:** transports never decide whether a call is allowed; they only put
//! identity into the request extensions, and [`RpcMiddleware`] decides, for single calls and for
//! every batch entry alike.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use jsonrpsee::core::middleware::{
    Batch, BatchEntry, Extensions, Notification, Request, RpcServiceBuilder, RpcServiceT,
};
use jsonrpsee::core::server::{BatchResponseBuilder, MethodCallback, MethodResponse, Methods};
use jsonrpsee::types::{ErrorObject, Id};
use serde_json::value::RawValue;
use tower::layer::util::{Identity, Stack};

use super::auth::{Auth, Authenticated, ConnAuth, Peer, Transport};
use super::conn::Conn;
use crate::error::codes;
use crate::metrics::{CallOutcome, Metrics};
use crate::unit::definition::validate_name;

/// The message of the error a call gets before the connection authenticated.
pub const UNAUTHORIZED_MESSAGE: &str = "unauthorized: call Auth.Login with the daemon's token \
     first (raw TCP) or send Authorization: Bearer <token>";

/// Methods that need no authentication. (`rpc.discover` is not one: its 22 KB answer to a
/// 50-byte request would let anyone make the daemon send far more than they send it.)
pub const PUBLIC_METHODS: &[&str] = &["Auth.Login", "AgentLink.Join"];

/// The agent protocol: callable only on a connection logged in with an agent's credential,
/// which can call nothing else (besides the public methods).
pub const AGENT_METHODS: &[&str] = &[
    "AgentLink.Attach",
    "AgentLink.Detach",
    "AgentLink.Started",
    "AgentLink.Output",
    "AgentLink.Finished",
    "AgentLink.FinishedMany",
    "AgentLink.Heartbeat",
    "AgentLink.FileRead",
];

/// The message of the error an agent's connection gets for any other method.
const AGENT_ONLY_MESSAGE: &str =
    "unauthorized: an agent's credential serves only the agent protocol (AgentLink.*)";

/// The message of the error a client gets for an agent-protocol method.
const AGENTS_ONLY_MESSAGE: &str =
    "unauthorized: AgentLink methods are for agents, logged in with their credential";

/// The state-changing methods written to the audit log.
pub const AUDITED_METHODS: &[&str] = &[
    "TaskUnit.Add",
    "TaskUnit.Delete",
    "TaskUnit.Edit",
    "TaskUnit.Start",
    "TaskUnit.Stop",
    "TaskUnit.Pause",
    "TaskUnit.Resume",
    "Run.Cancel",
    "Run.Redo",
    "Run.Ignore",
    "Dispatch.Cancel",
    "Dispatch.Pause",
    "Dispatch.Resume",
    "Agent.JoinToken",
    "Agent.Revoke",
    "File.Commit",
];

/// One audited call, handed to the audit hook after the call was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// The client's address, when the transport knows it.
    pub peer: Option<SocketAddr>,
    /// `"tcp"`, `"http"`, `"ws"`, or `"unknown"`.
    pub transport: &'static str,
    /// The JSON-RPC method name.
    pub method: String,
    /// The unit the call was about: the argument when it is a string, else its `name` member.
    pub unit: Option<String>,
    /// `Ok` when the call succeeded, else the error message sent to the client.
    pub outcome: Result<(), String>,
}

/// The audit hook: called once per audited call, on the connection's task, so keep it quick
/// (hand the entry to a channel).
pub type AuditHook = Arc<dyn Fn(AuditEntry) + Send + Sync>;

/// A hook that drops every entry.
pub fn no_audit() -> AuditHook {
    Arc::new(|_| {})
}

struct Shared {
    auth: Auth,
    audit: AuditHook,
    audited: HashSet<String>,
    /// Subscribe/unsubscribe methods: a notification naming one is not executed, since its
    /// result (a subscription id) is the only handle to the stream and would be lost.
    streaming: HashSet<String>,
    max_response_size: usize,
    /// Where calls are counted, and the method names they are counted under (any other
    /// name counts as `other`, so that made-up names cannot grow the metrics).
    metrics: Option<(Metrics, HashSet<&'static str>)>,
}

/// The middleware's layer; cheap to clone. Build it once per listener with [`RpcLayer::new`].
#[derive(Clone)]
pub struct RpcLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RpcLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcLayer").field("auth_required", &self.shared.auth.is_required()).finish()
    }
}

impl RpcLayer {
    /// A layer for `methods`, checking `auth`, reporting calls of `audited` methods to `audit`,
    /// limiting batch responses to `max_response_size` bytes, and counting calls in `metrics`.
    pub fn new<'a>(
        methods: &Methods,
        auth: Auth,
        audit: AuditHook,
        audited: impl IntoIterator<Item = &'a str>,
        max_response_size: usize,
        metrics: Option<Metrics>,
    ) -> Self {
        let streaming = methods
            .method_names()
            .filter(|name| {
                matches!(
                    methods.method_with_name(name),
                    Some((_, MethodCallback::Subscription(_) | MethodCallback::Unsubscription(_)))
                )
            })
            .map(str::to_owned)
            .collect();
        let shared = Shared {
            auth,
            audit,
            audited: audited.into_iter().map(str::to_owned).collect(),
            streaming,
            max_response_size,
            metrics: metrics.map(|m| (m, methods.method_names().collect())),
        };
        Self { shared: Arc::new(shared) }
    }

    /// The middleware stack as an [`RpcServiceBuilder`], for jsonrpsee's `set_rpc_middleware`
    /// and for the raw TCP transport.
    pub fn builder(&self) -> RpcServiceBuilder<Stack<RpcLayer, Identity>> {
        RpcServiceBuilder::new().layer(self.clone())
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcMiddleware<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMiddleware { inner, shared: self.shared.clone() }
    }
}

/// The middleware service wrapping a transport's inner service `S`.
#[derive(Clone)]
pub struct RpcMiddleware<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Rewrites `"params": {…}` or any other bare non-array value to `[value]`, because every
/// method takes exactly one positional argument.
fn normalise_params(params: &mut Option<Cow<'_, RawValue>>) {
    let Some(raw) = params.as_ref() else { return };
    let text = raw.get().trim_start();
    if text.starts_with('[') {
        return;
    }
    // A RawValue is valid JSON, so wrapping it in brackets is too.
    if let Ok(wrapped) = RawValue::from_string(format!("[{}]", raw.get())) {
        *params = Some(Cow::Owned(wrapped));
    }
}

/// The unit named by an audited call's argument. Only a valid unit name is recorded: a
/// hostile "name" of a megabyte must not be copied into the audit log.
fn unit_of(method: &str, params: Option<&Cow<'_, RawValue>>) -> Option<String> {
    // Auth.Login's argument is the token: never copy it anywhere.
    if method.starts_with("Auth.") {
        return None;
    }
    let args: Vec<serde_json::Value> = serde_json::from_str(params?.get()).ok()?;
    let name = match args.into_iter().next()? {
        serde_json::Value::String(name) => Some(name),
        serde_json::Value::Object(map) => {
            map.get("name").or_else(|| map.get("Name"))?.as_str().map(str::to_owned)
        }
        _ => None,
    }?;
    validate_name(&name).is_ok().then_some(name)
}

/// The error message inside a serialised error response.
fn error_message(rp: &MethodResponse) -> String {
    #[derive(serde::Deserialize)]
    struct Resp {
        error: Option<Err>,
    }
    #[derive(serde::Deserialize)]
    struct Err {
        message: String,
    }
    serde_json::from_str::<Resp>(rp.as_json().get())
        .ok()
        .and_then(|r| r.error)
        .map_or_else(|| "error".to_owned(), |e| e.message)
}

/// Whether the request's client has authenticated (its bearer token on HTTP and WebSocket,
/// its connection's login on raw TCP).
fn authenticated(ext: &Extensions) -> bool {
    ext.get::<Authenticated>().is_some() || ext.get::<ConnAuth>().is_some_and(ConnAuth::is_set)
}

impl<S> RpcMiddleware<S> {
    /// Whether the call may proceed; if not, the message to refuse it with.
    fn authorized(&self, req: &Request<'_>) -> Result<(), &'static str> {
        let method = req.method_name();
        let agent = req.extensions().get::<Arc<Conn>>().is_some_and(|c| c.agent().is_some());
        if AGENT_METHODS.contains(&method) {
            return if agent { Ok(()) } else { Err(AGENTS_ONLY_MESSAGE) };
        }
        if agent && !PUBLIC_METHODS.contains(&method) {
            return Err(AGENT_ONLY_MESSAGE);
        }
        let ok = !self.shared.auth.is_required()
            || PUBLIC_METHODS.contains(&method)
            || authenticated(req.extensions());
        if ok { Ok(()) } else { Err(UNAUTHORIZED_MESSAGE) }
    }
}

impl<S> RpcServiceT for RpcMiddleware<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    type MethodResponse = MethodResponse;
    type NotificationResponse = MethodResponse;
    type BatchResponse = MethodResponse;

    fn call<'a>(&self, mut req: Request<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let this = self.clone();
        async move {
            normalise_params(&mut req.params);
            let started = Instant::now();
            let method = req.method_name().to_owned();
            let ext = req.extensions();
            let transport = ext.get::<Transport>().map_or("unknown", |t| t.0);
            let peer = ext.get::<Peer>().map(|p| p.0);
            let conn = ext.get::<Arc<Conn>>().cloned();
            let verdict = this.authorized(&req);
            let authorized = verdict.is_ok();
            // Judged after the call, since a login authenticates its own call: unauthenticated
            // traffic (failed logins included) never writes audit records. It is counted
            // instead, so that no flood of it can push real records out.
            let bearer = req.extensions().get::<Authenticated>().is_some();
            let login = req.extensions().get::<ConnAuth>().cloned();
            let audit_unit = (authorized && this.shared.audited.contains(&method))
                .then(|| unit_of(&method, req.params.as_ref()));

            let rp = if authorized {
                this.inner.call(req).await
            } else {
                if let Some(conn) = &conn {
                    conn.login_failed();
                }
                let message = verdict.err().unwrap_or(UNAUTHORIZED_MESSAGE);
                let err = ErrorObject::owned(codes::UNAUTHORIZED, message, None::<()>);
                MethodResponse::error(req.id, err)
            };
            // A call's reply goes to the connection's writer: count it. (A subscription's
            // answer went out through its sink, and a notification gets none.)
            if let Some(conn) = &conn
                && (rp.is_method_call() || rp.is_batch())
            {
                conn.backlog().produced(rp.as_json().get().len());
            }

            let ok = rp.is_success();
            if let Some((metrics, names)) = &this.shared.metrics {
                let name = names.get(method.as_str()).copied().unwrap_or("other");
                let outcome = match (authorized, ok) {
                    (false, _) => CallOutcome::Unauthorized,
                    (true, true) => CallOutcome::Ok,
                    (true, false) => CallOutcome::Error,
                };
                metrics.rpc_call(name, outcome);
            }
            tracing::debug!(
                method = %method,
                transport,
                peer = ?peer,
                elapsed_us = started.elapsed().as_micros() as u64,
                ok,
                "rpc call"
            );
            let audited = !this.shared.auth.is_required()
                || bearer
                || login.as_ref().is_some_and(ConnAuth::is_set);
            if let Some(unit) = audit_unit.filter(|_| audited) {
                let outcome = if ok { Ok(()) } else { Err(error_message(&rp)) };
                (this.shared.audit)(AuditEntry { peer, transport, method, unit, outcome });
            }
            rp
        }
    }

    fn batch<'a>(&self, batch: Batch<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        // Not delegated to the inner service: its `batch` would bypass this middleware's
        // `call` (auth, audit) and `notification` (execution) for every entry.
        let this = self.clone();
        async move { run_batch(&this, batch, this.shared.max_response_size).await }
    }

    fn notification<'a>(
        &self,
        n: Notification<'a>,
    ) -> impl Future<Output = MethodResponse> + Send + 'a {
        // JSON-RPC 2.0: a notification is executed, only its reply is dropped. jsonrpsee's own
        // service ignores notifications, so run it as a call with a null id.
        let this = self.clone();
        async move {
            if this.shared.streaming.contains(n.method_name()) {
                return MethodResponse::notification();
            }
            let req = Request {
                jsonrpc: jsonrpsee::types::TwoPointZero,
                id: Id::Null,
                method: n.method,
                params: n.params,
                extensions: n.extensions,
            };
            let _ = this.call(req).await;
            MethodResponse::notification()
        }
    }
}

/// Runs a batch entry by entry through `svc`'s own `call` and `notification`, so every entry
/// gets the same treatment as a single request (auth, audit, execution of notifications).
/// A batch of only notifications gets no reply.
pub(crate) async fn run_batch<S>(
    svc: &S,
    batch: Batch<'_>,
    max_response_size: usize,
) -> MethodResponse
where
    S: RpcServiceT<MethodResponse = MethodResponse, NotificationResponse = MethodResponse>,
{
    let mut responses = BatchResponseBuilder::new_with_limit(max_response_size);
    let mut got_notification = false;
    for entry in batch {
        let rp = match entry {
            Ok(BatchEntry::Call(req)) => svc.call(req).await,
            Ok(BatchEntry::Notification(n)) => {
                got_notification = true;
                svc.notification(n).await;
                continue;
            }
            Err(err) => {
                let (err, id) = err.into_parts();
                MethodResponse::error(id, err)
            }
        };
        if let Err(too_big) = responses.append(rp) {
            return too_big;
        }
    }
    if responses.is_empty() && got_notification {
        MethodResponse::notification()
    } else {
        MethodResponse::from_batch(responses.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Option<Cow<'static, RawValue>> {
        Some(Cow::Owned(RawValue::from_string(s.to_owned()).expect("json")))
    }

    #[test]
    fn params_are_wrapped_unless_an_array() {
        for (input, want) in [
            (r#"{"a":1}"#, r#"[{"a":1}]"#),
            (r#""x""#, r#"["x"]"#),
            ("7", "[7]"),
            (r#"["x"]"#, r#"["x"]"#),
        ] {
            let mut p = raw(input);
            normalise_params(&mut p);
            assert_eq!(p.expect("some").get(), want);
        }
        let mut none = None;
        normalise_params(&mut none);
        assert!(none.is_none());
    }

    #[test]
    fn unit_comes_from_the_argument() {
        assert_eq!(unit_of("TaskUnit.Add", raw(r#"["web"]"#).as_ref()), Some("web".into()));
        assert_eq!(unit_of("TaskUnit.Edit", raw(r#"[{"name":"db"}]"#).as_ref()), Some("db".into()));
        assert_eq!(unit_of("Run.Cancel", raw("[12]").as_ref()), None);
        assert_eq!(unit_of("Auth.Login", raw(r#"["secret"]"#).as_ref()), None);
        let long = format!("[{:?}]", "x".repeat(100));
        assert_eq!(unit_of("TaskUnit.Start", raw(&long).as_ref()), None);
    }
}
