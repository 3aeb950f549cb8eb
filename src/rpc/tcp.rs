//! The raw-TCP JSON-RPC transport for one connection: a stream of JSON values in, one JSON value
//! and `\n` per reply out, JSON-RPC 2.0 (batches, notifications, subscriptions) and Go
//! `net/rpc/jsonrpc` (1.0) requests, all through the shared RPC middleware.
//!
//! jsonrpsee has no raw-TCP server, so [`TcpRpcService`] mirrors its private `RpcService` over
//! the public `Methods` API: real connection ids, subscription and response limits, and
//! per-connection request extensions ([`ConnAuth`], [`Peer`], [`Transport`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonrpsee::core::middleware::{
    Batch, BatchEntry, BatchEntryErr, Extensions, Notification, Request, ResponseFuture,
    RpcServiceBuilder, RpcServiceT,
};
use jsonrpsee::core::server::{
    ConnectionId, MethodCallback, MethodResponse, MethodSink, Methods, SubscriptionState,
    prepare_error,
};
use jsonrpsee::server::{IdProvider, RandomIntegerIdProvider};
use jsonrpsee::types::error::{ErrorCode, reject_too_many_subscriptions};
use jsonrpsee::types::{ErrorObject, Id, Params};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use super::auth::{ConnAuth, Peer, Transport};
use super::conn::{Conn, ConnIo, LOGIN_TIMEOUT, Standing};
use crate::error::codes;

/// The error string a legacy (JSON-RPC 1.0) request gets for a subscription method.
pub const LEGACY_SUBSCRIPTION_MESSAGE: &str =
    "subscriptions need JSON-RPC 2.0: send \"jsonrpc\":\"2.0\" with the request";

/// Limits of one raw-TCP connection.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Largest JSON value accepted, in bytes.
    pub max_request_size: u32,
    /// Largest response sent, in bytes.
    pub max_response_size: u32,
    /// Calls executing at once; when reached, the socket is not read until one finishes.
    pub max_in_flight: usize,
    /// A connection that sends nothing for this long, with no call in flight and no active
    /// subscription, is closed. Also the longest a reply may wait for the client to read.
    pub idle_timeout: Duration,
    /// Active subscriptions per connection.
    pub max_subscriptions: u32,
    /// Outgoing messages queued before calls and subscriptions wait for the socket.
    pub message_buffer_capacity: u32,
    /// On daemon shutdown, how long in-flight calls may take to finish.
    pub drain_timeout: Duration,
    /// How long a connection that needs a login may take to log in before it is closed.
    pub login_timeout: Duration,
    /// Largest JSON value accepted before the login, in bytes: a login is small, and so is
    /// what a connection that never logs in may make the daemon hold.
    pub max_login_request_size: u32,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            max_request_size: 1024 * 1024,
            max_response_size: 16 * 1024 * 1024,
            max_in_flight: 64,
            idle_timeout: Duration::from_secs(300),
            max_subscriptions: 64,
            message_buffer_capacity: 1024,
            drain_timeout: Duration::from_secs(10),
            login_timeout: LOGIN_TIMEOUT,
            max_login_request_size: 16 * 1024,
        }
    }
}

/// The innermost RPC service of a raw-TCP connection, dispatching to [`Methods`]: a copy of
/// jsonrpsee's private `RpcService` with calls and subscriptions.
#[derive(Clone)]
pub struct TcpRpcService {
    conn_id: ConnectionId,
    methods: Methods,
    max_response_size: usize,
    subscriptions: Arc<Semaphore>,
    max_subscriptions: u32,
    sink: MethodSink,
    id_provider: Arc<dyn IdProvider>,
}

impl RpcServiceT for TcpRpcService {
    type MethodResponse = MethodResponse;
    type NotificationResponse = MethodResponse;
    type BatchResponse = MethodResponse;

    fn call<'a>(&self, req: Request<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let conn_id = self.conn_id;
        let max = self.max_response_size;
        let Request { id, method, params, extensions, .. } = req;
        let params = Params::new(params.as_ref().map(|p| RawValue::get(p)));

        match self.methods.method_with_name(&method) {
            None => ResponseFuture::ready(
                MethodResponse::error(id, ErrorObject::from(ErrorCode::MethodNotFound))
                    .with_extensions(extensions),
            ),
            Some((_, MethodCallback::Async(callback))) => ResponseFuture::future((callback)(
                id.into_owned(),
                params.into_owned(),
                conn_id,
                max,
                extensions,
            )),
            Some((_, MethodCallback::Sync(callback))) => {
                ResponseFuture::ready((callback)(id, params, max, extensions))
            }
            Some((_, MethodCallback::Subscription(callback))) => {
                match self.subscriptions.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let state = SubscriptionState {
                            conn_id,
                            id_provider: &*self.id_provider,
                            subscription_permit: permit,
                        };
                        ResponseFuture::future((callback)(
                            id,
                            params,
                            self.sink.clone(),
                            state,
                            extensions,
                        ))
                    }
                    Err(_) => ResponseFuture::ready(
                        MethodResponse::error(
                            id,
                            reject_too_many_subscriptions(self.max_subscriptions),
                        )
                        .with_extensions(extensions),
                    ),
                }
            }
            // Unsubscribing is always allowed, whatever the limits.
            Some((_, MethodCallback::Unsubscription(callback))) => {
                ResponseFuture::ready(callback(id, params, conn_id, max, extensions))
            }
        }
    }

    fn batch<'a>(&self, batch: Batch<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let this = self.clone();
        async move { super::middleware::run_batch(&this, batch, this.max_response_size).await }
    }

    fn notification<'a>(
        &self,
        n: Notification<'a>,
    ) -> impl Future<Output = MethodResponse> + Send + 'a {
        // Executing notifications is the middleware's job; the innermost service only answers.
        std::future::ready(MethodResponse::notification().with_extensions(n.extensions))
    }
}

/// What a [`Framer`] found in the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One complete top-level JSON value, checked to be valid JSON (UTF-8, any JSON type).
    Value(Vec<u8>),
    /// A value longer than the limit. The framer drops input from it up to the first `\n`
    /// after the limit.
    TooLarge,
    /// Input that is not JSON. The framer drops input up to and including the next `\n`.
    Syntax,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Container,
    Str,
    Scalar,
}

/// Splits a byte stream into top-level JSON values, the framing of the raw-TCP transport.
///
/// It scans each byte once, tracking nesting and strings, instead of re-running a JSON parser
/// over the whole buffer after every read: a request arriving one byte at a time would
/// otherwise cost time quadratic in its size. serde_json then validates each complete value.
///
/// The frames produced depend only on the bytes, never on how they were split into
/// [`push`](Framer::push)es, and after [`next_frame`](Framer::next_frame) returns `None` at
/// most the size limit stays buffered: a value over the limit is reported as soon as it
/// passes the limit, and input is dropped from there to the next newline, so a client that
/// sends one value per line (as every known client does) resumes with its next line.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    max: usize,
    kind: Option<Kind>,
    pos: usize,
    depth: usize,
    in_str: bool,
    escape: bool,
    /// Dropping input up to the next `\n`, after input that is not JSON or is too large.
    discarding: bool,
}

impl Framer {
    /// A framer for values of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            kind: None,
            pos: 0,
            depth: 0,
            in_str: false,
            escape: false,
            discarding: false,
        }
    }

    /// Appends input read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held, waiting for the rest of a value.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Gives back the memory of a large value once the buffer is small again.
    pub fn shrink(&mut self) {
        if self.buf.capacity() > 64 * 1024 && self.buf.len() < 16 * 1024 {
            self.buf.shrink_to(16 * 1024);
        }
    }

    fn reset_value(&mut self) {
        self.kind = None;
        self.pos = 0;
        self.depth = 0;
        self.in_str = false;
        self.escape = false;
    }

    /// A value that is not valid JSON: report it and drop input up to the next `\n`.
    fn syntax_error(&mut self) -> Frame {
        self.discarding = true;
        Frame::Syntax
    }

    /// The next frame, or `None` when more input is needed. With `eof`, the input is complete
    /// (a number or literal may end there).
    pub fn next_frame(&mut self, eof: bool) -> Option<Frame> {
        if self.discarding {
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.buf.drain(..=i);
                    self.discarding = false;
                }
                None => {
                    self.buf.clear();
                    return None;
                }
            }
        }
        if self.kind.is_none() {
            let ws = self.buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
            self.buf.drain(..ws);
            self.reset_value();
            let kind = match *self.buf.first()? {
                b'{' | b'[' => Kind::Container,
                b'"' => Kind::Str,
                b'}' | b']' | b',' | b':' => return Some(self.syntax_error()),
                _ => Kind::Scalar,
            };
            self.kind = Some(kind);
            // The opening quote of a string is not its end.
            self.pos = usize::from(matches!(kind, Kind::Str));
        }
        match self.scan() {
            Some(end) if end > self.max => Some(self.too_large()),
            Some(end) => {
                let value: Vec<u8> = self.buf.drain(..end).collect();
                self.reset_value();
                Some(self.check(value))
            }
            None if self.buf.len() > self.max => Some(self.too_large()),
            None if eof => {
                let kind = self.kind;
                let rest = std::mem::take(&mut self.buf);
                self.reset_value();
                // A number or literal may legitimately end at end of input; anything else
                // unfinished is a syntax error.
                Some(match kind {
                    Some(Kind::Scalar) => self.check(rest),
                    _ => self.syntax_error(),
                })
            }
            None => None,
        }
    }

    /// The current value is longer than the limit. Whether it was complete or not, drop its
    /// first `max + 1` bytes (where the limit is found when it arrives in pieces), then input
    /// up to the next `\n`: so the same bytes are dropped however the input was split.
    fn too_large(&mut self) -> Frame {
        self.buf.drain(..=self.max);
        self.reset_value();
        self.discarding = true;
        Frame::TooLarge
    }

    /// The frame for one complete value within the limit.
    fn check(&mut self, value: Vec<u8>) -> Frame {
        if serde_json::from_slice::<&RawValue>(&value).is_err() {
            self.syntax_error()
        } else {
            Frame::Value(value)
        }
    }

    /// Advances over the current value; returns its end offset once it is complete.
    fn scan(&mut self) -> Option<usize> {
        let kind = self.kind?;
        while self.pos < self.buf.len() {
            let b = self.buf[self.pos];
            match kind {
                Kind::Scalar => {
                    if b.is_ascii_whitespace() || b"{}[],:\"".contains(&b) {
                        return Some(self.pos);
                    }
                }
                Kind::Str => {
                    if self.escape {
                        self.escape = false;
                    } else if b == b'\\' {
                        self.escape = true;
                    } else if b == b'"' {
                        self.pos += 1;
                        return Some(self.pos);
                    }
                }
                Kind::Container if self.in_str => {
                    if self.escape {
                        self.escape = false;
                    } else if b == b'\\' {
                        self.escape = true;
                    } else if b == b'"' {
                        self.in_str = false;
                    }
                }
                Kind::Container => match b {
                    b'"' => self.in_str = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            self.pos += 1;
                            return Some(self.pos);
                        }
                    }
                    _ => {}
                },
            }
            self.pos += 1;
        }
        None
    }
}

/// Per-connection data every request of the connection carries in its extensions.
#[derive(Clone, Debug)]
struct ConnCtx {
    conn: Arc<Conn>,
    conn_id: ConnectionId,
    methods: Methods,
}

impl ConnCtx {
    fn extensions(&self) -> Extensions {
        let mut ext = Extensions::new();
        ext.insert(ConnAuth::new(self.conn.clone()));
        ext.insert(self.conn.clone());
        ext.insert(Transport("tcp"));
        ext.insert(self.conn_id);
        if let Some(peer) = self.conn.peer() {
            ext.insert(Peer(peer));
        }
        ext
    }

    fn is_subscription(&self, method: &str) -> bool {
        matches!(self.methods.method_with_name(method), Some((_, MethodCallback::Subscription(_))))
    }
}

/// Whether a request (one JSON value) calls `Auth.Login`. A login is small (a method name and
/// a token), so a larger value is not read at all.
fn is_login(value: &[u8]) -> bool {
    if value.len() > 4096 {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Method<'a> {
        #[serde(borrow)]
        method: Option<Cow<'a, str>>,
    }
    serde_json::from_slice::<Method<'_>>(value)
        .is_ok_and(|m| matches!(m.method.as_deref(), Some("Auth.Login" | "AgentLink.Join")))
}

fn error_json(id: Id<'_>, code: i32, message: impl Into<String>) -> Box<RawValue> {
    MethodResponse::error(id, ErrorObject::owned(code, message.into(), None::<()>)).into_json()
}

/// Rewrites a JSON-RPC 2.0 response for a Go `net/rpc/jsonrpc` client: no `jsonrpc` member,
/// `error` a string or `null`, and never `result: null` together with `error: null` (Go shuts
/// the whole connection down on that).
fn to_legacy(json: &RawValue) -> Box<RawValue> {
    #[derive(serde::Deserialize)]
    struct Resp<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(default, borrow)]
        result: Option<&'a RawValue>,
        #[serde(default)]
        error: Option<ErrMsg>,
    }
    #[derive(serde::Deserialize)]
    struct ErrMsg {
        message: String,
    }
    #[derive(serde::Serialize)]
    struct Legacy<'a> {
        id: Option<&'a RawValue>,
        result: Option<&'a RawValue>,
        error: Option<String>,
    }
    let legacy = match serde_json::from_str::<Resp<'_>>(json.get()) {
        Ok(Resp { id, error: Some(e), .. }) => Legacy { id, result: None, error: Some(e.message) },
        Ok(Resp { id, result: Some(result), .. }) => {
            Legacy { id, result: Some(result), error: None }
        }
        Ok(Resp { id, .. }) => {
            tracing::error!("a method answered null; Go clients cannot take that");
            Legacy { id, result: None, error: Some("internal error: null result".to_owned()) }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot translate a response for a legacy client");
            Legacy { id: None, result: None, error: Some("internal error".to_owned()) }
        }
    };
    serde_json::value::to_raw_value(&legacy).unwrap_or_else(|_| json.to_owned())
}

/// The RPC service stack a connection dispatches to (middleware over [`TcpRpcService`]).
trait Service:
    RpcServiceT<
        MethodResponse = MethodResponse,
        BatchResponse = MethodResponse,
        NotificationResponse = MethodResponse,
    > + Send
    + Sync
{
}

impl<S> Service for S where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync
{
}

/// Handles one complete JSON value; returns the reply to write, if any.
async fn handle_value<S: Service>(
    service: &S,
    ctx: &ConnCtx,
    value: Vec<u8>,
) -> Option<Box<RawValue>> {
    let Ok(text) = String::from_utf8(value) else {
        return Some(error_json(Id::Null, ErrorCode::ParseError.code(), "Parse error"));
    };
    match text.as_bytes().first() {
        Some(b'{') => handle_single(service, ctx, text).await,
        Some(b'[') => handle_batch(service, ctx, &text).await,
        _ => Some(error_json(
            Id::Null,
            ErrorCode::InvalidRequest.code(),
            "Invalid request: expected a JSON object or array",
        )),
    }
}

async fn handle_single<S: Service>(
    service: &S,
    ctx: &ConnCtx,
    text: String,
) -> Option<Box<RawValue>> {
    // A request without "jsonrpc" comes from Go's net/rpc/jsonrpc (JSON-RPC 1.0).
    let legacy = match serde_json::from_str::<HashMap<Cow<'_, str>, &RawValue>>(&text) {
        Ok(members) => !members.contains_key("jsonrpc"),
        Err(_) => false,
    };
    let text = if legacy {
        let inner = &text[1..];
        if inner.trim_start().starts_with('}') {
            format!("{{\"jsonrpc\":\"2.0\"{inner}")
        } else {
            format!("{{\"jsonrpc\":\"2.0\",{inner}")
        }
    } else {
        text
    };
    let translate = |json: Box<RawValue>| {
        if !legacy {
            return json;
        }
        let out = to_legacy(&json);
        ctx.conn.forget(json.get().len().saturating_sub(out.get().len()));
        out
    };

    if let Ok(mut req) = serde_json::from_str::<Request<'_>>(&text) {
        *req.extensions_mut() = ctx.extensions();
        if legacy && ctx.is_subscription(req.method_name()) {
            return Some(translate(error_json(
                req.id,
                ErrorCode::InvalidRequest.code(),
                LEGACY_SUBSCRIPTION_MESSAGE,
            )));
        }
        let rp = service.call(req).await;
        // Subscription accept/reject responses already went out through the sink.
        return (rp.is_method_call() || rp.is_batch()).then(|| translate(rp.into_json()));
    }
    if let Ok(mut n) = serde_json::from_str::<Notification<'_>>(&text) {
        *n.extensions_mut() = ctx.extensions();
        service.notification(n).await;
        return None;
    }
    // The value is valid JSON (the framer checked), so whatever is wrong is the request's
    // shape: -32600, never a parse error.
    let (id, _) = prepare_error(text.as_bytes());
    Some(translate(
        MethodResponse::error(id, ErrorObject::from(ErrorCode::InvalidRequest)).into_json(),
    ))
}

async fn handle_batch<S: Service>(service: &S, ctx: &ConnCtx, text: &str) -> Option<Box<RawValue>> {
    let Ok(entries) = serde_json::from_str::<Vec<&RawValue>>(text) else {
        return Some(error_json(Id::Null, ErrorCode::ParseError.code(), "Parse error"));
    };
    if entries.is_empty() {
        return Some(error_json(
            Id::Null,
            ErrorCode::InvalidRequest.code(),
            "Invalid request: empty batch",
        ));
    }
    let mut batch = Vec::with_capacity(entries.len());
    for entry in entries {
        if let Ok(mut req) = serde_json::from_str::<Request<'_>>(entry.get()) {
            *req.extensions_mut() = ctx.extensions();
            batch.push(Ok(BatchEntry::Call(req)));
        } else if let Ok(mut n) = serde_json::from_str::<Notification<'_>>(entry.get()) {
            *n.extensions_mut() = ctx.extensions();
            batch.push(Ok(BatchEntry::Notification(n)));
        } else {
            let (id, _) = prepare_error(entry.get().as_bytes());
            batch.push(Err(BatchEntryErr::new(id, ErrorCode::InvalidRequest.into())));
        }
    }
    let rp = service.batch(Batch::from(batch)).await;
    (rp.is_method_call() || rp.is_batch()).then(|| rp.into_json())
}

/// Largest message copied into the writer's buffer to go out with its `\n` in one write; a
/// larger one (a list of a thousand units) is written from where it is, then the `\n`.
const COPIED_MESSAGE: usize = 64 * 1024;

/// Writes one message and `\n`; false when the client is gone or stalled.
async fn write_message<W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &mut Vec<u8>,
    msg: &RawValue,
    stall_timeout: Duration,
) -> bool {
    let msg = msg.get().as_bytes();
    let write = async {
        if msg.len() > COPIED_MESSAGE {
            // Vectored where the transport can: one system call, no separate `\n` segment.
            let mut both = bytes::Buf::chain(msg, &b"\n"[..]);
            wr.write_all_buf(&mut both).await
        } else {
            // Exact, so a connection keeps at most `COPIED_MESSAGE` bytes of buffer.
            buf.clear();
            buf.reserve_exact(msg.len() + 1);
            buf.extend_from_slice(msg);
            buf.push(b'\n');
            wr.write_all(buf).await
        }
    };
    match tokio::time::timeout(stall_timeout, write).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "tcp write failed");
            false
        }
        Err(_) => {
            tracing::debug!("tcp client stopped reading; closing");
            false
        }
    }
}

/// How many messages the writer has written, for a reader that must wait until its own
/// replies are out.
#[derive(Debug, Default)]
struct Written {
    count: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
}

impl Written {
    fn add(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Waits until at least `n` messages have been written.
    async fn reach(&self, n: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::Acquire) >= n {
                return;
            }
            notified.await;
        }
    }
}

/// Writes queued messages until `close` is cancelled, then flushes what is queued at that
/// moment and closes the socket. Cancels `failed` when the client cannot be written to.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Box<RawValue>>,
    mut wr: W,
    close: CancellationToken,
    failed: CancellationToken,
    stall_timeout: Duration,
    written: Arc<Written>,
) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let msg = tokio::select! {
            biased;
            () = close.cancelled() => break,
            msg = rx.recv() => msg,
        };
        let Some(msg) = msg else { break };
        if !write_message(&mut wr, &mut buf, &msg, stall_timeout).await {
            failed.cancel();
            return;
        }
        written.add();
    }
    // Refuse further messages first, so a busy subscription cannot keep the flush going.
    rx.close();
    while let Some(msg) = rx.recv().await {
        if !write_message(&mut wr, &mut buf, &msg, stall_timeout).await {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    Eof,
    Idle,
    Shutdown,
    ReadFailed,
    WriteFailed,
    /// Closed by the daemon: evicted from probation, or the listener is going away.
    Evicted,
    /// No successful `Auth.Login` within the login timeout.
    LoginTimeout,
    /// On probation, and its first request was not a login.
    NotLoggedIn,
    /// The client did not read its replies for the stall time.
    Stalled,
}

/// One raw-TCP connection being served: the state the read loop and its helpers share.
struct Session<S> {
    service: Arc<S>,
    ctx: Arc<ConnCtx>,
    conn: Arc<Conn>,
    tx: mpsc::Sender<Box<RawValue>>,
    cfg: TcpConfig,
    calls: JoinSet<()>,
    framer: Framer,
    write_failed: CancellationToken,
    shutdown: CancellationToken,
    /// Messages this session handed to the writer, and how many the writer has written.
    pushed: u64,
    written: Arc<Written>,
    /// When a connection that has not logged in is closed.
    login_deadline: tokio::time::Instant,
    /// Subscription slots: an active subscription keeps the connection from idling out.
    subscriptions: Arc<Semaphore>,
}

impl<S: Service + 'static> Session<S> {
    /// Queues a reply the transport made itself (the middleware counts call replies).
    async fn push_own(&mut self, reply: Box<RawValue>) {
        self.conn.backlog().produced(reply.get().len());
        self.push(reply).await;
    }

    /// Queues a reply; gives up when the connection is going away.
    async fn push(&mut self, reply: Box<RawValue>) {
        self.pushed += 1;
        tokio::select! {
            _ = self.tx.send(reply) => {}
            () = self.shutdown.cancelled() => {}
            () = self.write_failed.cancelled() => {}
            () = self.conn.closed() => {}
        }
    }

    /// The reply for a frame that is not a request.
    fn frame_error(&self, frame: &Frame) -> Box<RawValue> {
        match frame {
            Frame::TooLarge => error_json(
                Id::Null,
                codes::LIMIT_EXCEEDED,
                format!(
                    "request too large: the limit is {} bytes per JSON value{}",
                    self.framer.max,
                    if self.conn.is_authenticated() { "" } else { " before Auth.Login" }
                ),
            ),
            _ => error_json(Id::Null, ErrorCode::ParseError.code(), "Parse error"),
        }
    }

    /// Before login: handles one frame to the end, its reply written, before the next is
    /// read, so a call is judged by the login state it arrived in and an unauthenticated
    /// client holds at most one reply. `Some` when the connection must close.
    async fn serve_unauthenticated(&mut self, frame: Frame) -> Option<Closed> {
        let probation = self.conn.standing() == Standing::Probation;
        let reply = match frame {
            Frame::Value(value) if probation && !is_login(&value) => {
                self.push_own(error_json(
                    Id::Null,
                    codes::LIMIT_EXCEEDED,
                    "too many connections: the last slots are kept for clients that call \
                     Auth.Login first; try again later",
                ))
                .await;
                return Some(Closed::NotLoggedIn);
            }
            Frame::Value(value) => {
                let reply = handle_value(&*self.service, &self.ctx, value).await;
                if let Some(reply) = reply {
                    self.push(reply).await;
                }
                None
            }
            other => Some(self.frame_error(&other)),
        };
        if let Some(reply) = reply {
            self.push_own(reply).await;
        }
        if self.conn.is_authenticated() {
            self.framer.max = self.cfg.max_request_size as usize;
            return None;
        }
        if probation {
            return Some(Closed::NotLoggedIn);
        }
        // A client that does not read its answer keeps its connection no longer than its
        // login deadline.
        tokio::select! {
            () = self.written.reach(self.pushed) => None,
            () = self.shutdown.cancelled() => Some(Closed::Shutdown),
            () = self.write_failed.cancelled() => Some(Closed::WriteFailed),
            () = self.conn.closed() => Some(Closed::Evicted),
            () = tokio::time::sleep_until(self.login_deadline) => Some(Closed::LoginTimeout),
        }
    }

    /// After login: starts every buffered request there is room for; the rest waits in the
    /// framer and the socket is not read meanwhile (back-pressure).
    async fn start_calls(&mut self, eof: bool) {
        while self.calls.len() < self.cfg.max_in_flight && !self.conn.backlog().is_full() {
            let Some(frame) = self.framer.next_frame(eof) else { break };
            match frame {
                Frame::Value(value) => {
                    let (service, ctx, tx) =
                        (self.service.clone(), self.ctx.clone(), self.tx.clone());
                    self.calls.spawn(async move {
                        if let Some(reply) = handle_value(&*service, &ctx, value).await {
                            let _ = tx.send(reply).await;
                        }
                    });
                }
                other => {
                    let reply = self.frame_error(&other);
                    self.conn.backlog().produced(reply.get().len());
                    let tx = self.tx.clone();
                    self.calls.spawn(async move {
                        let _ = tx.send(reply).await;
                    });
                }
            }
        }
    }
}

/// Serves one raw-TCP connection until the client closes it, it idles out, writing fails, it
/// does not log in in time, it stops reading its replies, or `shutdown` is cancelled (then
/// in-flight calls get `drain_timeout` to finish).
///
/// Before `Auth.Login` succeeds (when `conn` needs a login), requests are handled one at a
/// time, each to its written reply, and may be at most `max_login_request_size` bytes; after
/// it, up to `max_in_flight` run at once.
///
/// `rpc` is the middleware stack (see [`super::middleware::RpcLayer::builder`]); `conn_id`
/// must be unique among the server's live connections, since unsubscribing is keyed by it.
pub async fn serve_connection<St, L>(
    stream: St,
    conn: Arc<Conn>,
    conn_id: u32,
    methods: Methods,
    rpc: RpcServiceBuilder<L>,
    cfg: TcpConfig,
    shutdown: CancellationToken,
) where
    St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    L: tower::Layer<TcpRpcService>,
    L::Service: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync
        + 'static,
{
    let (rd, wr) = tokio::io::split(ConnIo::new(stream, conn.clone()));
    let (tx, rx) = mpsc::channel::<Box<RawValue>>(cfg.message_buffer_capacity.max(1) as usize);
    let close = CancellationToken::new();
    let write_failed = CancellationToken::new();
    let written = Arc::new(Written::default());
    let writer = tokio::spawn(write_loop(
        rx,
        wr,
        close.clone(),
        write_failed.clone(),
        cfg.idle_timeout,
        written.clone(),
    ));

    let subscriptions = Arc::new(Semaphore::new(cfg.max_subscriptions as usize));
    let ctx = Arc::new(ConnCtx {
        conn: conn.clone(),
        conn_id: ConnectionId::from(conn_id),
        methods: methods.clone(),
    });
    let service = Arc::new(rpc.service(TcpRpcService {
        conn_id: ConnectionId::from(conn_id),
        methods,
        max_response_size: cfg.max_response_size as usize,
        subscriptions: subscriptions.clone(),
        max_subscriptions: cfg.max_subscriptions,
        sink: MethodSink::new_with_limit(tx.clone(), cfg.max_response_size),
        id_provider: Arc::new(RandomIntegerIdProvider),
    }));
    let first_limit =
        if conn.is_authenticated() { cfg.max_request_size } else { cfg.max_login_request_size };
    let mut s = Session {
        service,
        ctx,
        conn: conn.clone(),
        tx,
        cfg: cfg.clone(),
        calls: JoinSet::new(),
        framer: Framer::new(first_limit as usize),
        write_failed,
        shutdown,
        pushed: 0,
        written,
        login_deadline: tokio::time::Instant::now() + cfg.login_timeout,
        subscriptions,
    };
    let closed = s.serve(rd).await;
    s.finish(closed).await;
    tracing::debug!(peer = ?conn.peer(), conn_id, reason = ?closed, "tcp connection closed");

    // Let the writer flush what is queued, then close; dropping its receiver ends this
    // connection's subscriptions.
    close.cancel();
    drop(s);
    let mut writer = writer;
    if tokio::time::timeout(cfg.drain_timeout, &mut writer).await.is_err() {
        writer.abort();
    }
}

impl<S: Service + 'static> Session<S> {
    /// Reads and serves requests until the connection ends; says why it did.
    async fn serve<R: AsyncRead + Unpin>(&mut self, mut rd: R) -> Closed {
        let (conn, cfg) = (self.conn.clone(), self.cfg.clone());
        // Small until the login: thousands of connections that never log in cost little.
        let mut chunk = vec![0u8; if conn.is_authenticated() { 16 * 1024 } else { 1024 }];
        let mut eof = false;
        let idle = tokio::time::sleep(cfg.idle_timeout);
        tokio::pin!(idle);
        let login_deadline = tokio::time::sleep_until(self.login_deadline);
        tokio::pin!(login_deadline);
        let stalled = conn.stalled();
        tokio::pin!(stalled);
        loop {
            if conn.is_authenticated() {
                if chunk.len() < 16 * 1024 {
                    chunk.resize(16 * 1024, 0);
                }
                self.start_calls(eof).await;
            } else if let Some(frame) = self.framer.next_frame(eof) {
                match self.serve_unauthenticated(frame).await {
                    Some(closed) => return closed,
                    None => continue,
                }
            }
            if eof && self.calls.is_empty() {
                return Closed::Eof;
            }
            self.framer.shrink();

            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Closed::Shutdown,
                () = self.write_failed.cancelled() => return Closed::WriteFailed,
                () = conn.closed() => return Closed::Evicted,
                () = &mut login_deadline, if !conn.is_authenticated() => {
                    self.push_own(error_json(
                        Id::Null,
                        codes::UNAUTHORIZED,
                        format!(
                            "login timed out: call Auth.Login within {} s of connecting",
                            cfg.login_timeout.as_secs()
                        ),
                    ))
                    .await;
                    return Closed::LoginTimeout;
                }
                () = &mut stalled => return Closed::Stalled,
                // Requests may wait in the framer for room in the backlog: start them once
                // there is, even if the client sends nothing more.
                () = conn.backlog().room(), if conn.backlog().is_full() => {}
                Some(_) = self.calls.join_next(), if !self.calls.is_empty() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                }
                read = rd.read(&mut chunk), if !eof && self.calls.len() < cfg.max_in_flight => {
                    match read {
                        Ok(0) => eof = true,
                        Ok(n) => {
                            self.framer.push(&chunk[..n]);
                            idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "tcp read failed");
                            return Closed::ReadFailed;
                        }
                    }
                }
                () = &mut idle, if self.calls.is_empty() && !eof => {
                    if self.subscriptions.available_permits() < cfg.max_subscriptions as usize {
                        // An active subscription is not idleness: the client is listening.
                        idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                    } else {
                        return Closed::Idle;
                    }
                }
            }
        }
    }

    /// Ends the calls still running: at shutdown they get `drain_timeout` to answer; a client
    /// that stopped reading or was evicted gets nothing more.
    async fn finish(&mut self, closed: Closed) {
        match closed {
            Closed::Shutdown => {
                let drain = async { while self.calls.join_next().await.is_some() {} };
                if tokio::time::timeout(self.cfg.drain_timeout, drain).await.is_err() {
                    tracing::debug!("tcp calls did not finish in time at shutdown");
                }
            }
            Closed::Stalled | Closed::Evicted => self.conn.close(),
            _ => {}
        }
        self.calls.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut Framer, eof: bool) -> Vec<Frame> {
        std::iter::from_fn(|| framer.next_frame(eof)).collect()
    }

    fn value(s: &str) -> Frame {
        Frame::Value(s.as_bytes().to_vec())
    }

    #[test]
    fn framer_splits_concatenated_and_partial_values() {
        let mut f = Framer::new(1024);
        f.push(br#"{"a":"}{\"x"}[1,[2]]  "s\"" 42"#);
        assert_eq!(
            frames(&mut f, false),
            vec![value(r#"{"a":"}{\"x"}"#), value("[1,[2]]"), value(r#""s\"""#)]
        );
        assert_eq!(frames(&mut f, true), vec![value("42")]);

        let mut f = Framer::new(1024);
        let input = br#"{"method":"x","params":["}"]}"#;
        for (i, b) in input.iter().enumerate() {
            f.push(&[*b]);
            let got = frames(&mut f, false);
            if i + 1 < input.len() {
                assert!(got.is_empty(), "early frame at {i}");
            } else {
                assert_eq!(got, vec![Frame::Value(input.to_vec())]);
            }
        }
    }

    #[test]
    fn framer_limits_and_resyncs() {
        let mut f = Framer::new(8);
        f.push(b"[1,2,3,4,5,6");
        assert_eq!(frames(&mut f, false), vec![Frame::TooLarge]);
        f.push(b",7]\n[1]\n");
        assert_eq!(frames(&mut f, false), vec![value("[1]")]);

        let mut f = Framer::new(64);
        f.push(b"} junk\n{}");
        assert_eq!(frames(&mut f, false), vec![Frame::Syntax, value("{}")]);
        f.push(b"{\"unterminated");
        assert_eq!(frames(&mut f, true), vec![Frame::Syntax]);

        // A complete value that is not JSON also drops the rest of its line.
        let mut f = Framer::new(64);
        f.push(b"[1,}] [2]\n[3] nul");
        assert_eq!(frames(&mut f, false), vec![Frame::Syntax, value("[3]")]);
        assert_eq!(frames(&mut f, true), vec![Frame::Syntax]);
    }

    /// Feeds `input` whole and one byte at a time; both must give the same frames.
    fn frames_whole_and_bytewise(max: usize, input: &[u8]) -> Vec<Frame> {
        let mut f = Framer::new(max);
        f.push(input);
        let whole = frames(&mut f, true);
        let mut f = Framer::new(max);
        let mut bytewise = Vec::new();
        for b in input {
            f.push(&[*b]);
            bytewise.extend(frames(&mut f, false));
            assert!(f.buffered() <= max, "{} bytes buffered", f.buffered());
        }
        bytewise.extend(frames(&mut f, true));
        assert_eq!(whole, bytewise, "frames depend on how {:?} is split", input.escape_ascii());
        whole
    }

    #[test]
    fn framer_drops_the_same_bytes_of_an_oversized_value_however_it_arrives() {
        // From the byte past the limit to the next newline, whether the value was complete
        // when the limit was found or not (a request after it on the same line used to be
        // served or dropped depending on where reads split the stream).
        assert_eq!(
            frames_whole_and_bytewise(8, b"[1,2,3,4,5,6] [1]\n[2]\n\"abcdefghij\"\n[3]"),
            vec![Frame::TooLarge, value("[2]"), Frame::TooLarge, value("[3]")]
        );
        // A newline inside the value before the limit does not end the dropping.
        assert_eq!(
            frames_whole_and_bytewise(8, b"[1,\n2,3,4,5,6]\n[7]"),
            vec![Frame::TooLarge, value("[7]")]
        );
        assert_eq!(
            frames_whole_and_bytewise(4, b"12345 [1]\n1"),
            vec![Frame::TooLarge, value("1")]
        );
        assert_eq!(
            frames_whole_and_bytewise(3, b"[1]\n[22]\n[3]"),
            vec![value("[1]"), Frame::TooLarge, value("[3]")]
        );
        // Unfinished at end of input: reported once, as too large.
        assert_eq!(frames_whole_and_bytewise(4, b"{\"abcdef"), vec![Frame::TooLarge]);
    }

    #[test]
    fn legacy_translation() {
        let ok =
            RawValue::from_string(r#"{"jsonrpc":"2.0","id":3,"result":"x"}"#.into()).expect("json");
        assert_eq!(to_legacy(&ok).get(), r#"{"id":3,"result":"x","error":null}"#);
        let err = RawValue::from_string(
            r#"{"jsonrpc":"2.0","id":4,"error":{"code":-1,"message":"boom"}}"#.into(),
        )
        .expect("json");
        assert_eq!(to_legacy(&err).get(), r#"{"id":4,"result":null,"error":"boom"}"#);
        let null = RawValue::from_string(r#"{"jsonrpc":"2.0","id":5,"result":null}"#.into())
            .expect("json");
        assert_eq!(
            to_legacy(&null).get(),
            r#"{"id":5,"result":null,"error":"internal error: null result"}"#
        );
    }
}
