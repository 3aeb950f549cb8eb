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

use jsonrpsee::core::server::Methods;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use taskd::rpc::auth::Auth;
use taskd::rpc::conn::{Gate, Standing};
use taskd::rpc::middleware::{RpcLayer, no_audit};
use taskd::rpc::tcp::{TcpConfig, serve_connection};
use taskd_fuzz::{TOKEN, methods};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

struct Server {
    runtime: Runtime,
    methods: Methods,
    layer: RpcLayer,
    cfg: TcpConfig,
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
            login_timeout: Duration::from_secs(10),
            // Below the limit after the login, so that both limits are within reach.
            max_login_request_size: 256,
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
    let piece = usize::from(split & 0x7f).max(1);
    let probation = split & 0x80 != 0;
    let s = server();
    // A gate of its own per input: four slots, the last kept for clients that log in. Three
    // connections that never log in fill the others when this one is to be on probation.
    let gate = Gate::new(4, true);
    let holders: Vec<_> = (0..if probation { 3 } else { 0 })
        .map(|_| gate.admit(None).expect("a free slot"))
        .collect();
    let conn = gate.admit(None).expect("a slot for the fuzzed connection");
    let expected = if probation { Standing::Probation } else { Standing::Unauthenticated };
    assert_eq!(conn.standing(), expected);
    let output = s.runtime.block_on(async {
        let (client, stream) = tokio::io::duplex(4096);
        let served = tokio::spawn(serve_connection(
            stream,
            conn,
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
    drop(holders);
    if output.is_empty() {
        return;
    }
    assert!(output.ends_with(b"\n"), "the last message is not a whole line");
    for line in output[..output.len() - 1].split(|&b| b == b'\n') {
        check_message(line);
    }
});
