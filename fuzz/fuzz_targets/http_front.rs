//! One HTTP/1.1 connection end to end: `rpc::http::serve_connection` over an in-memory duplex,
//! with jsonrpsee's service assembled as the listener does (`HttpGuardLayer` with token auth
//! and the Host/Origin policy, the RPC middleware) in front of a few small methods. Input: one
//! byte choosing how many bytes each write carries (0: all at once), then what the client
//! sends: requests, bodies, a WebSocket upgrade and frames after it.
//!
//! A service of the target's own between hyper and jsonrpsee's records each request hyper
//! handed over (method, `Host`, `Origin`, `Authorization`) and the response it got. Checked:
//! - nothing panics (libFuzzer aborts on a panic on any task);
//! - a request whose `Host` is missing or not one of the daemon's names, or that carries an
//!   `Origin` that is not one of them (as `OwnNames` reads them, every field of either when
//!   there are several), gets 403 (or 400, for several), never 200 or 101;
//! - 200 and 101 only with the bearer token;
//! - a 401 or 403 carries `connection: close`, and nothing follows it on the wire;
//! - what comes back is a sequence of HTTP/1.1 responses (HTTP/1.0 to an HTTP/1.0 request),
//!   each the one the service gave for the next request, or one error hyper made itself at
//!   the end, up to a 101 after which the WebSocket session speaks;
//! - each 401 is counted as a failed login; the connection's slot is free once it is over;
//! - the connection, and a WebSocket session it upgraded to, end within `BOUND` once the
//!   client has shut its side.
//!
//! Time is paused (tokio's test clock, advanced whenever every task waits): the client sends
//! everything, waits `SETTLE` (which passes once the daemon has answered all it could), and
//! only then shuts its side, since hyper drops a connection whose client half-closes while
//! a request is being answered, response and all. The keep-alive (header read) timeout and
//! every other timer then cost no real time, and a connection that waits for one of them
//! instead of ending at end of input overruns `BOUND`.
#![no_main]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{AUTHORIZATION, CONNECTION, HOST, ORIGIN};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use hyper::body::Incoming;
use jsonrpsee::core::BoxError;
use jsonrpsee::core::server::Methods;
use jsonrpsee::server::{HttpResponse, PingConfig, Server, ServerConfig, stop_channel};
use libfuzzer_sys::fuzz_target;
use taskd::rpc::auth::Auth;
use taskd::rpc::conn::Gate;
use taskd::rpc::http::{HTTP_KEEP_ALIVE, HostPolicy, HttpGuardLayer, serve_connection};
use taskd::rpc::middleware::{RpcLayer, no_audit};
use taskd_fuzz::{OwnNames, TOKEN, methods, presents_bearer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::time::Instant;

const LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 3333);
const PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);
const ALLOW_HOSTS: [&str; 2] = ["taskd.example", "box.lan:8080"];
/// Small, so that 413 is within reach of short inputs.
const MAX_REQUEST: u32 = 2048;

/// How long the client waits (on the paused clock) between its last byte and shutting its side.
const SETTLE: Duration = Duration::from_secs(1);
/// How long the daemon may take to end the connection after that; well under its own timers
/// (the keep-alive is 60 s), so that waiting for one of them shows.
const BOUND: Duration = Duration::from_secs(5);

struct Fixture {
    runtime: Runtime,
    methods: Methods,
    rpc: RpcLayer,
    server_cfg: ServerConfig,
    hosts: Arc<HostPolicy>,
    own: OwnNames,
    /// `HTTP_FRONT_SHOW` is set: print each exchange and what came back (to study an input).
    show: bool,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let methods = methods();
        let rpc = RpcLayer::new(
            &methods,
            Auth::Token(Arc::from(TOKEN)),
            no_audit(),
            ["Test.Echo", "Test.Fail"],
            4096,
        );
        // As the listener's, with small limits.
        let server_cfg = ServerConfig::builder()
            .max_request_body_size(MAX_REQUEST)
            .max_response_body_size(4096)
            .max_subscriptions_per_connection(2)
            .set_message_buffer_capacity(4)
            .enable_ws_ping(PingConfig::new())
            .max_connections(4)
            .build();
        let allow: Vec<String> = ALLOW_HOSTS.iter().map(|s| s.to_string()).collect();
        let hosts = Arc::new(HostPolicy::new(LISTEN, &allow));
        let own = OwnNames::new(LISTEN, Some(LISTEN), &allow);
        let show = std::env::var_os("HTTP_FRONT_SHOW").is_some();
        Fixture { runtime, methods, rpc, server_cfg, hosts, own, show }
    })
}

/// A header value, shown as escaped text.
struct Field(Vec<u8>);

impl std::fmt::Debug for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

/// One request as hyper handed it over, and the service's answer.
#[derive(Debug)]
struct Exchange {
    method: Method,
    version: Version,
    hosts: Vec<Field>,
    origins: Vec<Field>,
    authorizations: Vec<Field>,
    /// `None` while unanswered, or when the service failed.
    response: Option<(StatusCode, HeaderMap)>,
}

type Log = Arc<Mutex<Vec<Exchange>>>;

/// The outermost service: records each exchange, in the order hyper handles them.
#[derive(Clone)]
struct Recorder<S> {
    inner: S,
    log: Log,
}

impl<S> tower::Service<Request<Incoming>> for Recorder<S>
where
    S: tower::Service<Request<Incoming>, Response = HttpResponse, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let all = |name| -> Vec<Field> {
            req.headers().get_all(name).iter().map(|v| Field(v.as_bytes().to_vec())).collect()
        };
        let exchange = Exchange {
            method: req.method().clone(),
            version: req.version(),
            hosts: all(HOST),
            origins: all(ORIGIN),
            authorizations: all(AUTHORIZATION),
            response: None,
        };
        let index = {
            let mut log = self.log.lock().expect("log");
            log.push(exchange);
            log.len() - 1
        };
        let log = self.log.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let res = answer.await;
            if let Ok(resp) = &res {
                log.lock().expect("log")[index].response =
                    Some((resp.status(), resp.headers().clone()));
            }
            res
        })
    }
}

/// The values of the header `name` in a parsed head.
fn header_values<'h>(
    fields: &'h [httparse::Header<'h>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> {
    fields.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
}

/// Whether a `Connection` header list names `token`.
fn names_token<'a>(mut values: impl Iterator<Item = &'a [u8]>, token: &str) -> bool {
    values.any(|v| {
        v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

fn shown(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(400)];
    format!("{}{}", cut.escape_ascii(), if bytes.len() > 400 { "…" } else { "" })
}

/// The length of a chunked body at the start of `rest`, trailers included.
fn chunked_len(rest: &[u8]) -> usize {
    let line_end = |from: usize| {
        rest[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| from + i)
            .unwrap_or_else(|| panic!("a truncated chunked body: {}", shown(rest)))
    };
    let mut pos = 0;
    loop {
        let end = line_end(pos);
        let line = std::str::from_utf8(&rest[pos..end]).expect("a chunk size line is ASCII");
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .unwrap_or_else(|e| panic!("a bad chunk size {line:?} ({e}): {}", shown(rest)));
        pos = end + 2;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                let end = line_end(pos);
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return pos;
                }
            }
        }
        assert!(rest.len() >= pos + size + 2, "a truncated chunk: {}", shown(rest));
        assert_eq!(&rest[pos + size..pos + size + 2], b"\r\n", "a chunk without its CRLF");
        pos += size + 2;
    }
}

/// Checks what came back against the exchanges the service saw.
fn check_wire(out: &[u8], log: &[Exchange]) {
    let mut rest = out;
    let mut next = 0;
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => panic!("a truncated response: {}", shown(rest)),
            Err(e) => panic!("not an HTTP/1.1 response ({e}): {}", shown(rest)),
        };
        let (status, version) = (resp.code.expect("status"), resp.version.expect("version"));
        let fields = &*resp.headers;
        let values = |name: &'static str| header_values(fields, name);
        let exchange = log.get(next);
        let http10_request = exchange.is_none_or(|e| e.version == Version::HTTP_10);
        assert!(
            version == 1 || version == 0 && http10_request,
            "an HTTP/1.{version} response to an HTTP/1.1 request: {}",
            shown(rest)
        );
        let close = names_token(values("connection"), "close")
            || version == 0 && !names_token(values("connection"), "keep-alive");
        let te_chunked = values("transfer-encoding").last().is_some_and(|v| {
            v.rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        });
        let content_length = values("content-length").next().map(|v| {
            std::str::from_utf8(v).ok().and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or_else(
                || panic!("a bad content-length {:?}", v.escape_ascii().to_string()),
            )
        });
        rest = &rest[head_len..];

        if status == 100 {
            // Interim, written by hyper for `Expect: 100-continue`.
            continue;
        }
        let Some(exchange) = exchange else {
            // Hyper's own answer to a request it could not parse: an error, and the end.
            assert!(status >= 400, "a {status} no request was answered with: {}", shown(out));
            assert!(close, "hyper's {status} without closing");
            let len = content_length.unwrap_or(rest.len());
            assert_eq!(rest.len(), len, "bytes after hyper's {status}: {}", shown(out));
            return;
        };
        let (recorded, _) = exchange
            .response
            .as_ref()
            .unwrap_or_else(|| panic!("a response the service never gave: {}", shown(out)));
        assert_eq!(recorded.as_u16(), status, "responses out of order: {}", shown(out));
        next += 1;
        if status == 101 {
            // The WebSocket session follows.
            return;
        }
        assert!(status >= 200, "an unexpected interim {status}");
        let body = if exchange.method == Method::HEAD || status == 204 || status == 304 {
            0
        } else if te_chunked {
            chunked_len(rest)
        } else if let Some(len) = content_length {
            len
        } else {
            rest.len()
        };
        assert!(rest.len() >= body, "a truncated body: {}", shown(out));
        rest = &rest[body..];
        if status == 401 || status == 403 {
            assert!(
                names_token(values("connection"), "close"),
                "a {status} without connection: close"
            );
        }
        assert!(
            !close || rest.is_empty(),
            "bytes after a response that closes the connection: {}",
            shown(out)
        );
    }
}

/// Checks each exchange the service saw.
fn check_exchanges(own: &OwnNames, log: &[Exchange]) {
    for e in log {
        let Some((status, headers)) = &e.response else { continue };
        let foreign = e.hosts.is_empty()
            || e.hosts.iter().any(|h| !own.is_own_host(&h.0))
            || e.origins.iter().any(|o| !own.is_own_origin(&o.0));
        // Several `Host` fields are a bad request (RFC 9112 §3.2): 400 will do for those.
        let several = e.hosts.len() > 1 || e.origins.len() > 1;
        assert!(
            !foreign
                || *status == StatusCode::FORBIDDEN
                || several && *status == StatusCode::BAD_REQUEST,
            "{status} to a request from a foreign page: {e:?}"
        );
        let authorized = e.authorizations.iter().any(|a| presents_bearer(&a.0, TOKEN));
        assert!(
            authorized || !matches!(status.as_u16(), 200 | 101),
            "{status} without the token: {e:?}"
        );
        if matches!(status.as_u16(), 401 | 403) {
            assert!(
                names_token(headers.get_all(CONNECTION).iter().map(|v| v.as_bytes()), "close"),
                "a {status} without connection: close: {headers:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let piece = if split == 0 { input.len().max(1) } else { usize::from(split) };
    let f = fixture();
    let gate = Gate::new(4, true);
    let conn = gate.admit(Some(PEER)).expect("a slot");
    let log: Log = Arc::default();

    let (output, times) = f.runtime.block_on(async {
        let (stop, server_handle) = stop_channel();
        let guard = HttpGuardLayer::new(
            Auth::Token(Arc::from(TOKEN)),
            f.hosts.clone(),
            conn.clone(),
            Some(LISTEN),
            MAX_REQUEST,
        );
        let mut svc = Server::builder()
            .set_config(f.server_cfg.clone())
            .set_http_middleware(tower::ServiceBuilder::new().layer(guard))
            .set_rpc_middleware(f.rpc.builder())
            .to_service_builder()
            .connection_id(1)
            .build(f.methods.clone(), stop.clone());
        let session_closed = svc.on_session_closed();
        let service = Recorder { inner: svc, log: log.clone() };
        let (client, stream) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve_connection(
            stream,
            conn.clone(),
            service,
            HTTP_KEEP_ALIVE,
            stop.shutdown(),
        ));
        let start = Instant::now();
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async move {
            for chunk in input.chunks(piece) {
                if wr.write_all(chunk).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(SETTLE).await;
            let _ = wr.shutdown().await;
            Instant::now()
        };
        let receive = async move {
            let mut out = Vec::new();
            rd.read_to_end(&mut out).await.expect("read from the duplex");
            out
        };
        let serve = async move {
            // A hyper error (a malformed request, say) is an answer too; a panic is not.
            let _ = served.await.expect("serve_connection panicked");
            let http_done = Instant::now();
            session_closed.await;
            (http_done, Instant::now())
        };
        let limit = SETTLE + BOUND;
        let Ok((shut, out, (http_done, ws_done))) =
            tokio::time::timeout(limit, async { tokio::join!(send, receive, serve) }).await
        else {
            panic!("the connection did not end within {limit:?} of its start");
        };
        drop(server_handle);
        (out, (start, shut, http_done, ws_done))
    });
    let (start, shut, http_done, ws_done) = times;
    assert!(shut.duration_since(start) <= SETTLE, "sending waited on a timer");
    assert!(http_done.duration_since(shut) <= BOUND, "the HTTP connection outlived its input");
    assert!(ws_done.duration_since(shut) <= BOUND, "the session outlived its input");

    let log = std::mem::take(&mut *log.lock().expect("log"));
    if f.show {
        eprintln!("exchanges: {log:#?}\nwire ({} bytes): {}", output.len(), output.escape_ascii());
    }
    check_exchanges(&f.own, &log);
    check_wire(&output, &log);
    let refused = log.iter().filter(|e| e.response.as_ref().is_some_and(|r| r.0 == 401)).count();
    assert_eq!(gate.failures_total(), refused as u64, "401s and counted failures differ");
    drop(conn);
    assert_eq!(gate.occupancy(), (0, 0, 0), "the connection's slot outlived it");
});
