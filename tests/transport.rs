//! Transport tests: a tiny module served by `taskd::rpc::listener::serve` on 127.0.0.1:0, driven
//! by real clients over real sockets (raw TCP, Go-style JSON-RPC 1.0, HTTP, WebSocket, and
//! taskd's own client).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonrpsee::RpcModule;
use jsonrpsee::core::client::{ClientT, SubscriptionClientT};
use jsonrpsee::rpc_params;
use jsonrpsee::types::{ErrorObject, ErrorObjectOwned};
use serde_json::{Value, json};
use taskd::error::codes;
use taskd::rpc::auth::{Auth, ConnAuth};
use taskd::rpc::client::{CallClient, Client};
use taskd::rpc::listener::{ServeConfig, serve};
use taskd::rpc::middleware::AuditEntry;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const TOKEN: &str = "s3cret-token";
const DEADLINE: Duration = Duration::from_secs(10);

struct Ctx {
    bumps: Arc<AtomicUsize>,
}

fn module(bumps: Arc<AtomicUsize>) -> RpcModule<Ctx> {
    let mut m = RpcModule::new(Ctx { bumps });
    m.register_method("Test.Echo", |params, _, _| params.one::<Value>()).expect("register");
    m.register_method("Test.Fail", |_, _, _| {
        Err::<bool, _>(ErrorObject::owned(
            codes::UNIT_NOT_FOUND,
            "unit \"x\" not found",
            None::<()>,
        ))
    })
    .expect("register");
    m.register_method("Test.Null", |_, _, _| Ok::<(), ErrorObjectOwned>(())).expect("register");
    m.register_method("Test.Bump", |_, ctx: &Ctx, _| {
        ctx.bumps.fetch_add(1, Ordering::SeqCst);
        true
    })
    .expect("register");
    m.register_async_method("Test.Slow", |params, _, _| async move {
        let ms: u64 = params.one()?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, ErrorObjectOwned>(ms)
    })
    .expect("register");
    m.register_method("Auth.Login", |params, _, ext| {
        let token: String = params.one()?;
        if token != TOKEN {
            return Err(ErrorObject::owned(codes::UNAUTHORIZED, "wrong token", None::<()>));
        }
        if let Some(flag) = ext.get::<ConnAuth>() {
            flag.set();
        }
        Ok(true)
    })
    .expect("register");
    m.register_subscription(
        "Test.Ticks",
        "Test.Tick",
        "Test.Unticks",
        |_, pending, _, _| async move {
            let Ok(sink) = pending.accept().await else { return };
            for item in [json!(0), json!(1), json!(2), json!("done")] {
                let msg = serde_json::value::to_raw_value(&item).expect("json");
                if sink.send(msg).await.is_err() {
                    return;
                }
            }
        },
    )
    .expect("register");
    m
}

struct Daemon {
    addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    audit: Arc<Mutex<Vec<AuditEntry>>>,
    bumps: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

async fn start(auth: Auth, tweak: impl FnOnce(&mut ServeConfig)) -> Daemon {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let audit = Arc::new(Mutex::new(Vec::new()));
    let sink = audit.clone();
    let mut cfg = ServeConfig {
        auth,
        audit: Arc::new(move |e| sink.lock().expect("lock").push(e)),
        audited_methods: &["Test.Echo", "Test.Fail", "Auth.Login"],
        ..ServeConfig::default()
    };
    tweak(&mut cfg);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let bumps = Arc::new(AtomicUsize::new(0));
    let m = module(bumps.clone());
    let server = tokio::spawn(serve(listener, m, cfg, shutdown.clone(), tracker.clone()));
    Daemon { addr, shutdown, tracker, audit, bumps, server }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw TCP connection reading newline-terminated replies.
struct Raw {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let (rd, wr) = s.into_split();
        Raw { rd: BufReader::new(rd), wr }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.expect("write");
    }

    /// The next reply line, as text.
    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(DEADLINE, self.rd.read_line(&mut line))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "connection closed");
        assert!(line.ends_with('\n'), "reply must end with a newline: {line:?}");
        line.trim_end().to_owned()
    }

    async fn json(&mut self) -> Value {
        let line = self.line().await;
        serde_json::from_str(&line).expect("reply is JSON")
    }

    async fn call(&mut self, req: Value) -> Value {
        self.send(format!("{req}\n").as_bytes()).await;
        self.json().await
    }

    async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, self.rd.read_to_end(&mut rest))
            .await
            .expect("close in time")
            .expect("read");
    }
}

fn echo(id: u64, arg: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "Test.Echo", "params": [arg]})
}

#[tokio::test]
async fn raw_tcp_calls_notifications_and_batches() {
    let d = start(Auth::None, |_| {}).await;
    let mut c = Raw::connect(d.addr).await;

    assert_eq!(c.call(echo(1, json!("hi"))).await, json!({"jsonrpc":"2.0","id":1,"result":"hi"}));

    // A bare object as params is the one argument.
    let r =
        c.call(json!({"jsonrpc":"2.0","id":2,"method":"Test.Echo","params":{"name":"web"}})).await;
    assert_eq!(r["result"], json!({"name": "web"}));

    let r = c.call(json!({"jsonrpc":"2.0","id":3,"method":"Test.Fail","params":[]})).await;
    assert_eq!(r["error"]["code"], codes::UNIT_NOT_FOUND);

    // A notification is executed, and gets no reply.
    c.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"Test.Bump\",\"params\":[]}\n").await;
    wait_until("the notification to run", || d.bumps.load(Ordering::SeqCst) == 1).await;

    // Batch: a call, a notification and two invalid entries.
    let batch = json!([echo(10, json!(1)), {"jsonrpc":"2.0","method":"Test.Bump"}, {"foo": 1}, 5]);
    let r = c.call(batch).await;
    let arr = r.as_array().expect("array reply");
    assert_eq!(arr.len(), 3, "{r}");
    assert_eq!(arr[0], json!({"jsonrpc":"2.0","id":10,"result":1}));
    assert_eq!(arr[1]["error"]["code"], -32600);
    assert_eq!(arr[2]["error"]["code"], -32600);
    wait_until("the batch notification to run", || d.bumps.load(Ordering::SeqCst) == 2).await;

    // A batch of only notifications gets no reply: the next line answers the next call.
    c.send(b"[{\"jsonrpc\":\"2.0\",\"method\":\"Test.Bump\"}]\n").await;
    assert_eq!(c.call(echo(11, json!("after"))).await["id"], 11);
    wait_until("bumps", || d.bumps.load(Ordering::SeqCst) == 3).await;

    // A value that is not an object or array.
    c.send(b"42\n").await;
    assert_eq!(c.json().await["error"]["code"], -32600);

    // Unknown method.
    let r = c.call(json!({"jsonrpc":"2.0","id":12,"method":"No.Such","params":[]})).await;
    assert_eq!(r["error"]["code"], -32601);
}

#[tokio::test]
async fn raw_tcp_framing() {
    let d = start(Auth::None, |cfg| cfg.max_request_size = 1024).await;
    let mut c = Raw::connect(d.addr).await;

    // Two requests in one write, with no separator at all.
    c.send(format!("{}{}", echo(1, json!("a")), echo(2, json!("b"))).as_bytes()).await;
    let mut ids = vec![c.json().await["id"].clone(), c.json().await["id"].clone()];
    ids.sort_by_key(|v| v.as_u64());
    assert_eq!(ids, vec![json!(1), json!(2)]);

    // One request split byte by byte across writes.
    let req = format!("{}\n", echo(3, json!("split {\"}")));
    for b in req.as_bytes() {
        c.send(&[*b]).await;
        c.wr.flush().await.expect("flush");
    }
    assert_eq!(c.json().await, json!({"jsonrpc":"2.0","id":3,"result":"split {\"}"}));

    // Garbage, then a valid line on the same connection.
    c.send(b"this is not json\n").await;
    let r = c.json().await;
    assert_eq!(r["error"]["code"], -32700);
    assert_eq!(r["id"], Value::Null);
    assert_eq!(c.call(echo(4, json!("ok"))).await["result"], "ok");

    // Oversized: LIMIT_EXCEEDED naming the limit, and the connection still serves.
    let big = echo(5, json!("x".repeat(3000)));
    c.send(format!("{big}\n").as_bytes()).await;
    let r = c.json().await;
    assert_eq!(r["error"]["code"], codes::LIMIT_EXCEEDED);
    assert!(r["error"]["message"].as_str().expect("message").contains("1024"), "{r}");
    assert_eq!(c.call(echo(6, json!("still here"))).await["result"], "still here");

    // Oversized, with a request after it on the same line and another on the next line: input
    // is dropped from the limit to the end of the line, however reads split it, so only the
    // next line is served.
    let big = format!(
        "{} {}\n{}\n",
        echo(8, json!("y".repeat(3000))),
        echo(9, json!("same line")),
        echo(10, json!("next line"))
    );
    c.send(big.as_bytes()).await;
    let mut replies = vec![c.json().await, c.json().await];
    replies.push(c.call(echo(11, json!("after"))).await);
    replies.sort_by_key(|r| r["id"].as_u64());
    assert_eq!(replies[0]["error"]["code"], codes::LIMIT_EXCEEDED, "{replies:?}");
    assert_eq!(replies[1], json!({"jsonrpc":"2.0","id":10,"result":"next line"}));
    assert_eq!(replies[2]["id"], 11, "{replies:?}");

    // Half-close: the reply to a request sent just before EOF still arrives.
    c.send(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"Test.Slow\",\"params\":[100]}").await;
    c.wr.shutdown().await.expect("half-close");
    assert_eq!(c.json().await["result"], 100);
    c.expect_eof().await;
}

#[tokio::test]
async fn go_net_rpc_requests() {
    let d = start(Auth::None, |_| {}).await;
    let mut c = Raw::connect(d.addr).await;

    c.send(b"{\"method\":\"Test.Echo\",\"params\":[\"x\"],\"id\":0}\n").await;
    assert_eq!(c.line().await, r#"{"id":0,"result":"x","error":null}"#);

    c.send(b"{\"method\":\"Test.Fail\",\"params\":[null],\"id\":1}\n").await;
    assert_eq!(c.line().await, r#"{"id":1,"result":null,"error":"unit \"x\" not found"}"#);

    c.send(b"{\"method\":\"Test.Null\",\"params\":[null],\"id\":2}\n").await;
    assert_eq!(c.line().await, r#"{"id":2,"result":null,"error":"internal error: null result"}"#);

    c.send(b"{\"method\":\"Test.Ticks\",\"params\":[null],\"id\":3}\n").await;
    let r = c.json().await;
    assert_eq!(r["id"], 3);
    assert!(r["error"].as_str().expect("string error").contains("JSON-RPC 2.0"), "{r}");
    assert!(r.get("jsonrpc").is_none());

    c.send(b"{\"method\":\"No.Such\",\"params\":[1],\"id\":4}\n").await;
    let r = c.json().await;
    assert_eq!(r["id"], 4);
    assert!(r["error"].is_string());
}

#[tokio::test]
async fn raw_tcp_login_audit_and_subscriptions() {
    let d = start(Auth::Token(TOKEN.into()), |_| {}).await;
    let mut c = Raw::connect(d.addr).await;

    let r = c.call(echo(1, json!("web"))).await;
    assert_eq!(r["error"]["code"], codes::UNAUTHORIZED);
    assert!(r["error"]["message"].as_str().expect("msg").contains("Auth.Login"));
    // Batches are checked per entry.
    let r = c.call(json!([echo(2, json!("a")), echo(3, json!("b"))])).await;
    assert_eq!(r[0]["error"]["code"], codes::UNAUTHORIZED);
    assert_eq!(r[1]["error"]["code"], codes::UNAUTHORIZED);
    let r = c.call(json!({"jsonrpc":"2.0","id":4,"method":"Test.Ticks","params":[]})).await;
    assert_eq!(r["error"]["code"], codes::UNAUTHORIZED);

    let r = c.call(json!({"jsonrpc":"2.0","id":5,"method":"Auth.Login","params":["wrong"]})).await;
    assert_eq!(r["error"]["code"], codes::UNAUTHORIZED);
    let r = c.call(json!({"jsonrpc":"2.0","id":6,"method":"Auth.Login","params":[TOKEN]})).await;
    assert_eq!(r["result"], true);
    assert_eq!(c.call(echo(7, json!("web"))).await["result"], "web");

    // Subscriptions deliver notifications on the same connection.
    let r = c.call(json!({"jsonrpc":"2.0","id":8,"method":"Test.Ticks","params":[]})).await;
    let sub = r["result"].clone();
    assert!(!sub.is_null(), "{r}");
    let mut items = Vec::new();
    for _ in 0..4 {
        let n = c.json().await;
        assert_eq!(n["method"], "Test.Tick");
        assert_eq!(n["params"]["subscription"], sub);
        items.push(n["params"]["result"].clone());
    }
    assert_eq!(items, vec![json!(0), json!(1), json!(2), json!("done")]);

    // Only authenticated calls are audited: the failed login and the three calls before the
    // login are not (they are counted as failures instead).
    let audit = d.audit.lock().expect("lock").clone();
    let logins: Vec<_> = audit.iter().filter(|e| e.method == "Auth.Login").collect();
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert!(logins[0].outcome.is_ok());
    assert!(logins.iter().all(|e| e.unit.is_none() && e.transport == "tcp" && e.peer.is_some()));
    let echoes: Vec<_> = audit.iter().filter(|e| e.method == "Test.Echo").collect();
    assert_eq!(echoes.len(), 1, "{echoes:?}");
    assert_eq!(echoes[0].unit.as_deref(), Some("web"));
    assert_eq!(echoes[0].outcome, Ok(()));
}

/// Sends one hand-written HTTP/1.1 request; returns the status code and the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sent_with_the_login_in_one_write_run_after_it() {
    let d = start(Auth::Token(TOKEN.into()), |_| {}).await;
    for round in 0..20 {
        let mut c = Raw::connect(d.addr).await;
        let login = json!({"jsonrpc":"2.0","id":0,"method":"Auth.Login","params":[TOKEN]});
        let mut burst = format!("{login}\n");
        for id in 1..=8 {
            burst.push_str(&format!("{}\n", echo(id, json!(id))));
        }
        c.send(burst.as_bytes()).await;
        let mut answers: Vec<Value> = Vec::new();
        for _ in 0..9 {
            answers.push(c.json().await);
        }
        // The login is answered first; every call after it is authenticated.
        assert_eq!(answers[0], json!({"jsonrpc":"2.0","id":0,"result":true}), "round {round}");
        for a in &answers[1..] {
            assert_eq!(a["result"], a["id"], "round {round}: {a}");
        }
    }
}

async fn http_post(addr: SocketAddr, headers: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut resp))
        .await
        .expect("response in time")
        .expect("read");
    let resp = String::from_utf8(resp).expect("utf8");
    let status = resp.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn http_needs_the_bearer_token() {
    let d = start(Auth::Token(TOKEN.into()), |cfg| cfg.max_request_size = 4096).await;
    let call = echo(1, json!("over http")).to_string();

    let (status, body) = http_post(d.addr, "", &call).await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(body["error"]["code"], codes::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().expect("msg").contains("Bearer"));

    let (status, _) = http_post(d.addr, "Authorization: Bearer wrong\r\n", &call).await;
    assert_eq!(status, 401);

    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let (status, body) = http_post(d.addr, &auth, &call).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(body["result"], "over http");

    let big = echo(2, json!("x".repeat(5000))).to_string();
    let (status, body) = http_post(d.addr, &auth, &big).await;
    assert_eq!(status, 413);
    assert!(body.contains(&codes::LIMIT_EXCEEDED.to_string()) && body.contains("4096"), "{body}");

    let audit = d.audit.lock().expect("lock").clone();
    assert!(audit.iter().any(|e| e.method == "Test.Echo" && e.transport == "http"), "{audit:?}");
}

#[tokio::test]
async fn websocket_with_bearer_token() {
    use jsonrpsee::ws_client::{HeaderMap, HeaderValue, WsClientBuilder};
    let d = start(Auth::Token(TOKEN.into()), |_| {}).await;
    let url = format!("ws://{}", d.addr);

    let refused = WsClientBuilder::default().build(&url).await;
    assert!(refused.is_err(), "an upgrade without the token must be refused");

    let mut headers = HeaderMap::new();
    headers.insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
    );
    let ws = WsClientBuilder::default().set_headers(headers).build(&url).await.expect("ws");
    let r: String = ws.request("Test.Echo", rpc_params!["ws"]).await.expect("call");
    assert_eq!(r, "ws");
    let mut sub = ws
        .subscribe::<Value, _>("Test.Ticks", rpc_params![], "Test.Unticks")
        .await
        .expect("subscribe");
    let mut items = Vec::new();
    for _ in 0..4 {
        let item = tokio::time::timeout(DEADLINE, sub.next()).await.expect("in time");
        items.push(item.expect("item").expect("ok"));
    }
    assert_eq!(items, vec![json!(0), json!(1), json!(2), json!("done")]);
    let audit = d.audit.lock().expect("lock").clone();
    assert!(audit.iter().any(|e| e.method == "Test.Echo" && e.transport == "ws"), "{audit:?}");
}

#[tokio::test]
async fn taskd_client_calls_and_subscribes() {
    let d = start(Auth::Token(TOKEN.into()), |_| {}).await;
    let addr = d.addr.to_string();

    let err = Client::connect(&addr, Some("wrong")).await.expect_err("wrong token");
    assert!(!err.is_unreachable(), "{err}");

    let client = Client::connect(&addr, Some(TOKEN)).await.expect("connect");
    let r: Value =
        client.rpc().request("Test.Echo", rpc_params![json!({"a": 1})]).await.expect("call");
    assert_eq!(r, json!({"a": 1}));
    let e = client.request::<bool, _>("Test.Fail", rpc_params![]).await.expect_err("fails");
    assert!(!taskd::rpc::client::is_connection_error(&e));

    let mut sub = client
        .subscribe::<Value, _>("Test.Ticks", rpc_params![], "Test.Unticks")
        .await
        .expect("subscribe");
    let mut items = Vec::new();
    for _ in 0..4 {
        let item = tokio::time::timeout(DEADLINE, sub.next()).await.expect("in time");
        items.push(item.expect("item").expect("ok"));
    }
    assert_eq!(items, vec![json!(0), json!(1), json!(2), json!("done")]);

    // Nothing listens on a freshly closed port.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let err = Client::connect(&dead, None).await.expect_err("no daemon");
    assert!(err.is_unreachable(), "{err}");
}

// Two workers: the blocking client holds the test's thread while the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_client_makes_one_call_at_a_time_on_a_blocking_socket() {
    let d = start(Auth::Token(TOKEN.into()), |_| {}).await;
    let addr = d.addr.to_string();

    let err = CallClient::connect(&addr, Some("wrong")).await.expect_err("wrong token");
    assert!(!err.is_unreachable(), "{err}");

    let client = CallClient::connect(&addr, Some(TOKEN)).await.expect("connect");
    let r: Value =
        client.request("Test.Echo", rpc_params![json!({"a": [1, "é\n"]})]).await.expect("call");
    assert_eq!(r, json!({"a": [1, "é\n"]}));
    let e = client.request::<bool, _>("Test.Fail", rpc_params![]).await.expect_err("fails");
    assert_eq!(taskd::rpc::client::error_code(&e), Some(codes::UNIT_NOT_FOUND), "{e}");
    assert!(!taskd::rpc::client::is_connection_error(&e));
    let null: Option<u32> = client.request("Test.Null", rpc_params![]).await.expect("null");
    assert_eq!(null, None);
    client.notification("Test.Bump", rpc_params![]).await.expect("notify");
    // A call after a notification still gets its own answer.
    let r: Value = client.request("Test.Echo", rpc_params![7]).await.expect("call");
    assert_eq!(r, json!(7));
    wait_until("the notification", || d.bumps.load(Ordering::SeqCst) == 1).await;

    // The daemon goes away: the next call fails as a connection error, and so does every
    // one after it.
    d.shutdown.cancel();
    tokio::time::timeout(DEADLINE, d.server).await.expect("serve returns").expect("join");
    d.tracker.close();
    tokio::time::timeout(DEADLINE, d.tracker.wait()).await.expect("connections drain");
    for _ in 0..2 {
        let e = client.request::<Value, _>("Test.Echo", rpc_params![1]).await.expect_err("gone");
        assert!(taskd::rpc::client::is_connection_error(&e), "{e}");
    }

    // Nothing listens on a freshly closed port.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let err = CallClient::connect(&dead, None).await.expect_err("no daemon");
    assert!(err.is_unreachable(), "{err}");
}

#[tokio::test]
async fn limits_idle_and_shutdown() {
    let d = start(Auth::None, |cfg| {
        cfg.max_connections = 2;
        cfg.idle_timeout = Duration::from_millis(300);
    })
    .await;

    // An idle raw connection is closed once it has been quiet for the idle timeout.
    let mut idle = Raw::connect(d.addr).await;
    assert_eq!(idle.call(echo(1, json!(1))).await["result"], 1);
    idle.expect_eof().await;

    let mut a = Raw::connect(d.addr).await;
    assert_eq!(a.call(echo(1, json!("a"))).await["result"], "a");
    // Keep `a` busy so the idle timer does not close it while the limit is tested.
    a.send(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"Test.Slow\",\"params\":[3000]}\n").await;
    let mut b = Raw::connect(d.addr).await;
    b.send(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"Test.Slow\",\"params\":[3000]}\n").await;
    // `b` was connected before `over`, and the listener accepts in order, so `over` is the third.
    let mut over = Raw::connect(d.addr).await;
    over.send(b"\n").await;
    let r = over.json().await;
    assert_eq!(r["error"]["code"], codes::LIMIT_EXCEEDED);
    over.expect_eof().await;

    // Shutdown: in-flight calls are answered, then connections close and the tracker drains.
    d.shutdown.cancel();
    assert_eq!(a.json().await["id"], 2);
    a.expect_eof().await;
    assert_eq!(b.json().await["id"], 1);
    b.expect_eof().await;
    tokio::time::timeout(DEADLINE, d.server).await.expect("serve returns").expect("join");
    d.tracker.close();
    tokio::time::timeout(DEADLINE, d.tracker.wait()).await.expect("connections drain");
}
