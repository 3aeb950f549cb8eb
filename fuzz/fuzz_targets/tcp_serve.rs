//! One raw-TCP connection end to end: `serve_connection` over an in-memory duplex, with the
//! real middleware (token auth, audit, notifications, batches, Go 1.0 translation) in front
//! of a few small methods. Input: one byte choosing how many bytes each write carries, then
//! what the client sends before closing its side. The connection must end, and every message
//! written back must be one line of JSON: a reply (an object with an `id`, or a non-empty
//! array of them) or a subscription notification (an object with a `method`).
//!
//! The daemon's own methods are not served here: they need the whole engine (SQLite store,
//! registry, real processes), which makes each input slow and leaves state behind between
//! inputs. Their argument parsing is fuzzed by `unit_json`; the transport and middleware they
//! sit behind are the same as here.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use jsonrpsee::RpcModule;
use jsonrpsee::core::server::Methods;
use jsonrpsee::types::{ErrorObject, ErrorObjectOwned};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use taskd::rpc::auth::{Auth, ConnAuth};
use taskd::rpc::middleware::{RpcLayer, no_audit};
use taskd::rpc::tcp::{TcpConfig, serve_connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fuzz";

struct Server {
    runtime: Runtime,
    methods: Methods,
    layer: RpcLayer,
    cfg: TcpConfig,
}

fn methods() -> Methods {
    let mut m = RpcModule::new(());
    m.register_method("Test.Echo", |params, _, _| params.one::<Value>()).expect("register");
    m.register_method("Test.Fail", |_, _, _| {
        Err::<(), _>(ErrorObject::owned(-32010, "it failed", None::<()>))
    })
    .expect("register");
    m.register_method("Test.Null", |_, _, _| Ok::<(), ErrorObjectOwned>(())).expect("register");
    m.register_async_method("Test.Async", |params, _, _| async move {
        tokio::task::yield_now().await;
        params.one::<Value>()
    })
    .expect("register");
    m.register_method("Auth.Login", |params, _, ext| {
        let token: String = params.one()?;
        if token != TOKEN {
            return Err(ErrorObject::owned(-32001, "wrong token", None::<()>));
        }
        if let Some(flag) = ext.get::<ConnAuth>() {
            flag.set();
        }
        Ok(true)
    })
    .expect("register");
    m.register_subscription("Test.Sub", "Test.Item", "Test.Unsub", |_, pending, _, _| async move {
        let Ok(sink) = pending.accept().await else { return };
        for i in 0..3 {
            let item = serde_json::value::to_raw_value(&i).expect("json");
            if sink.send(item).await.is_err() {
                return;
            }
        }
    })
    .expect("register");
    m.into()
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let methods = methods();
        // Small limits, so that oversized requests and responses, back-pressure and the
        // subscription limit are all within reach of short inputs.
        let cfg = TcpConfig {
            max_request_size: 512,
            max_response_size: 1024,
            max_in_flight: 4,
            idle_timeout: Duration::from_secs(60),
            max_subscriptions: 2,
            message_buffer_capacity: 2,
            drain_timeout: Duration::from_secs(1),
        };
        let layer = RpcLayer::new(
            &methods,
            Auth::Token(Arc::from(TOKEN)),
            no_audit(),
            ["Test.Echo", "Test.Fail", "Auth.Login"],
            cfg.max_response_size as usize,
        );
        Server { runtime, methods, layer, cfg }
    })
}

/// Checks one message the server wrote.
fn check_message(line: &[u8]) {
    let text = std::str::from_utf8(line).expect("a reply is UTF-8");
    let value: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("a reply that is not JSON ({e}): {text:?}"));
    let is_reply = |v: &Value| v.as_object().is_some_and(|o| o.contains_key("id"));
    match &value {
        Value::Array(replies) => {
            assert!(!replies.is_empty(), "an empty batch reply");
            assert!(replies.iter().all(is_reply), "a batch reply with a non-reply: {text}");
        }
        Value::Object(o) => {
            assert!(is_reply(&value) || o.contains_key("method"), "not a reply: {text}")
        }
        _ => panic!("a reply that is not an object or array: {text}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let piece = usize::from(split).max(1);
    let s = server();
    let output = s.runtime.block_on(async {
        let (client, conn) = tokio::io::duplex(4096);
        let served = tokio::spawn(serve_connection(
            conn,
            None,
            1,
            s.methods.clone(),
            s.layer.builder(),
            s.cfg.clone(),
            CancellationToken::new(),
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async move {
            for chunk in input.chunks(piece) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        let receive = async move {
            let mut out = Vec::new();
            rd.read_to_end(&mut out).await.expect("read from the duplex");
            out
        };
        let ((), out) = tokio::join!(send, receive);
        served.await.expect("serve_connection panicked");
        out
    });
    if output.is_empty() {
        return;
    }
    assert!(output.ends_with(b"\n"), "the last message is not a whole line");
    for line in output[..output.len() - 1].split(|&b| b == b'\n') {
        check_message(line);
    }
});
