//! The JSON-RPC API of a real daemon through real sockets: every method's result shape, params
//! forms, batches, framing, the Go 1.0 shape, every error code, bad input, HTTP, WebSocket,
//! subscriptions over raw TCP and WebSocket, and the audit log.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;

use jsonrpsee::core::client::{ClientT, SubscriptionClientT};
use jsonrpsee::rpc_params;
use jsonrpsee::ws_client::{HeaderMap, HeaderValue, WsClient, WsClientBuilder};
use serde_json::{Value, json};
use taskd::error::codes;

use crate::common::{DEADLINE, Raw, TestDaemon, alive, http_post, wait_for};

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

const UNIT_INFO_FIELDS: &[&str] = &[
    "name",
    "state",
    "definition",
    "next_fire",
    "last_run",
    "runs_total",
    "failures_total",
    "created_at",
    "updated_at",
];

const RUN_INFO_FIELDS: &[&str] = &[
    "id",
    "unit",
    "state",
    "trigger",
    "attempt",
    "host",
    "pid",
    "started_at",
    "ended_at",
    "exit_code",
    "signal",
    "reason",
    "stdout_bytes",
    "stderr_bytes",
    "truncated",
];

/// The `result` of a reply, failing the test on an error or a null result.
fn result(reply: &Value) -> &Value {
    assert!(reply.get("error").is_none_or(Value::is_null), "unexpected error: {reply}");
    let r = reply.get("result").unwrap_or_else(|| panic!("no result in {reply}"));
    assert!(!r.is_null(), "a method returned null: {reply}");
    r
}

/// The error object of a 2.0 reply, failing the test on success.
fn error(reply: &Value) -> &Value {
    assert!(reply.get("result").is_none(), "expected an error, got {reply}");
    reply.get("error").unwrap_or_else(|| panic!("no error in {reply}"))
}

/// The error code of a 2.0 reply.
fn code(reply: &Value) -> i64 {
    error(reply)["code"].as_i64().unwrap_or_else(|| panic!("no error code in {reply}"))
}

fn assert_time(v: &Value, what: &str) {
    let s = v.as_str().unwrap_or_else(|| panic!("{what}: expected an RFC 3339 string, got {v}"));
    assert!(s.parse::<jiff::Timestamp>().is_ok(), "{what}: {s:?} is not RFC 3339 with an offset");
}

fn assert_opt_time(v: &Value, what: &str) {
    if !v.is_null() {
        assert_time(v, what);
    }
}

fn assert_run_info(r: &Value) {
    let obj = r.as_object().unwrap_or_else(|| panic!("run info is not an object: {r}"));
    for f in RUN_INFO_FIELDS {
        assert!(obj.contains_key(*f), "run info lacks {f}: {r}");
    }
    assert!(r["id"].as_i64().is_some_and(|id| id > 0), "run id: {r}");
    assert!(r["unit"].is_string() && r["state"].is_string() && r["trigger"].is_string(), "{r}");
    assert!(r["attempt"].as_u64().is_some_and(|a| a >= 1), "attempt: {r}");
    assert!(r["host"].is_string(), "host: {r}");
    assert!(r["stdout_bytes"].is_u64() && r["stderr_bytes"].is_u64(), "byte counts: {r}");
    assert!(r["truncated"].is_boolean(), "truncated: {r}");
    assert_opt_time(&r["started_at"], "started_at");
    assert_opt_time(&r["ended_at"], "ended_at");
}

fn assert_unit_info(u: &Value, name: &str) {
    let obj = u.as_object().unwrap_or_else(|| panic!("unit info is not an object: {u}"));
    for f in UNIT_INFO_FIELDS {
        assert!(obj.contains_key(*f), "unit info lacks {f}: {u}");
    }
    assert_eq!(u["name"], name);
    assert!(u["state"].is_string(), "state: {u}");
    assert_eq!(u["definition"]["name"], name, "definition: {u}");
    assert_opt_time(&u["next_fire"], "next_fire");
    if !u["last_run"].is_null() {
        assert_run_info(&u["last_run"]);
    }
    assert!(u["runs_total"].is_u64() && u["failures_total"].is_u64(), "counters: {u}");
    assert_time(&u["created_at"], "created_at");
    assert_time(&u["updated_at"], "updated_at");
}

/// A 2.0 request with arbitrary `params` (not wrapped).
fn req(id: u64, method: &str, params: Value) -> String {
    format!("{}\n", json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
}

/// Reads `n` replies and returns them keyed by id (replies may come in any order).
fn recv_n(conn: &mut Raw, n: usize) -> std::collections::BTreeMap<String, Value> {
    (0..n)
        .map(|_| {
            let v = conn.recv();
            (v["id"].to_string(), v)
        })
        .collect()
}

fn names(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|u| u["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn every_method_answers_with_its_documented_shape() {
    let d = TestDaemon::start();
    let mut c = d.raw();

    // TaskUnit.Add, bare string: a tick unit, answered with `true`.
    assert_eq!(*result(&c.call("TaskUnit.Add", json!("ticker"))), json!(true));

    // TaskUnit.Add, definition: the unit info, with the run the add started.
    let def = json!({"name": "echo", "command": ["sh", "-c", "echo out; echo err >&2"]});
    let info = result(&c.call("TaskUnit.Add", def)).clone();
    assert_unit_info(&info, "echo");
    assert_eq!(info["definition"]["command"], json!(["sh", "-c", "echo out; echo err >&2"]));
    assert_eq!(info["last_run"]["trigger"], "add");
    let run_id = info["last_run"]["id"].as_i64().expect("a run id");

    // Run.Get until it ended.
    let run = d.wait_run_end(run_id);
    assert_run_info(&run);
    assert_eq!(run["state"], "succeeded");
    assert_eq!(run["unit"], "echo");
    assert_eq!(run["exit_code"], 0);
    assert_eq!(run["stdout_bytes"], 4);
    assert_eq!(run["stderr_bytes"], 4);
    assert_time(&run["ended_at"], "ended_at");

    // Run.Logs.
    let logs = result(&c.call("Run.Logs", json!({"id": run_id, "stream": "stdout"}))).clone();
    for f in ["data", "next_offset", "eof", "truncated"] {
        assert!(logs.get(f).is_some(), "Run.Logs lacks {f}: {logs}");
    }
    assert_eq!(logs["data"], "out\n");
    assert_eq!(logs["eof"], true);
    assert_eq!(logs["truncated"], false);
    let err = result(&c.call("Run.Logs", json!({"id": run_id, "stream": "stderr"}))).clone();
    assert_eq!(err["data"], "err\n");

    // TaskUnit.Get.
    let got = d.wait_unit("echo", "the one-shot to be done", |u| u["state"] == "done");
    assert_unit_info(&got, "echo");
    assert_eq!(got["last_run"]["id"], run_id);
    assert_eq!(got["runs_total"], 1);
    assert_eq!(got["failures_total"], 0);

    // TaskUnit.List: summaries of both units.
    let list = result(&c.call("TaskUnit.List", json!({}))).clone();
    assert_eq!(names(&list), BTreeSet::from(["echo".to_owned(), "ticker".to_owned()]));
    for u in list.as_array().expect("array") {
        for f in ["name", "state", "next_fire", "last_run", "runs_total", "failures_total"] {
            assert!(u.get(f).is_some(), "summary lacks {f}: {u}");
        }
    }
    let filtered = result(&c.call("TaskUnit.List", json!({"name_glob": "ech*"}))).clone();
    assert_eq!(names(&filtered), BTreeSet::from(["echo".to_owned()]));
    let done = result(&c.call("TaskUnit.List", json!({"state": "done"}))).clone();
    assert_eq!(names(&done), BTreeSet::from(["echo".to_owned()]));

    // TaskUnit.Edit: a merge patch; the definition shows it.
    let edited =
        result(&c.call("TaskUnit.Edit", json!({"name": "echo", "description": "says hi"}))).clone();
    assert_unit_info(&edited, "echo");
    assert_eq!(edited["definition"]["description"], "says hi");
    assert_eq!(edited["definition"]["command"], info["definition"]["command"]);

    // TaskUnit.Start: a new manual run.
    let started = result(&c.call("TaskUnit.Start", json!("echo"))).clone();
    assert_run_info(&started);
    assert_eq!(started["trigger"], "manual");
    assert_eq!(started["unit"], "echo");
    let second = started["id"].as_i64().expect("id");
    assert!(second > run_id, "run ids increase: {second} after {run_id}");
    assert_eq!(d.wait_run_end(second)["state"], "succeeded");

    // Run.List: newest first, limited.
    let runs = result(&c.call("Run.List", json!({"unit": "echo"}))).clone();
    let ids: Vec<i64> =
        runs.as_array().expect("array").iter().map(|r| r["id"].as_i64().expect("id")).collect();
    assert_eq!(ids, vec![second, run_id]);
    runs.as_array().expect("array").iter().for_each(assert_run_info);
    let one = result(&c.call("Run.List", json!({"unit": "echo", "limit": 1}))).clone();
    assert_eq!(one.as_array().map(Vec::len), Some(1));
    let older = result(&c.call("Run.List", json!({"unit": "echo", "before": second}))).clone();
    assert_eq!(older[0]["id"], run_id);

    // TaskUnit.Pause / Resume.
    let paused = result(&c.call("TaskUnit.Pause", json!("echo"))).clone();
    assert_unit_info(&paused, "echo");
    assert_eq!(paused["state"], "paused");
    let resumed = result(&c.call("TaskUnit.Resume", json!("echo"))).clone();
    assert_unit_info(&resumed, "echo");
    assert_ne!(resumed["state"], "paused");

    // TaskUnit.Stop: the number of runs stopped.
    let sleeper = result(&c.call(
        "TaskUnit.Add",
        json!({"name": "sleeper", "command": ["sleep", "60"], "kill_grace": "1s"}),
    ))
    .clone();
    let sleep_run = sleeper["last_run"]["id"].as_i64().expect("run");
    assert_eq!(*result(&c.call("TaskUnit.Stop", json!("sleeper"))), json!(1));
    let stopped = d.wait_run_end(sleep_run);
    assert_eq!(stopped["state"], "cancelled");
    assert!(stopped["reason"].is_string(), "a stop records why: {stopped}");

    // Run.Cancel: the run as it ended.
    let again = result(&c.call("TaskUnit.Start", json!("sleeper"))).clone();
    let again_id = again["id"].as_i64().expect("id");
    let cancelled = result(&c.call("Run.Cancel", json!(again_id))).clone();
    assert_run_info(&cancelled);
    assert_eq!(cancelled["id"], again_id);
    assert_eq!(cancelled["state"], "cancelled");
    assert_time(&cancelled["ended_at"], "ended_at");

    // Daemon.Status.
    let st = result(&c.call("Daemon.Status", json!({}))).clone();
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(st["uptime_secs"].is_u64(), "{st}");
    assert_eq!(st["units"]["total"], 3, "{st}");
    assert!(st["runs"]["total"].as_u64() >= Some(4), "{st}");
    assert!(
        st["listeners"].as_array().is_some_and(|l| l.iter().any(|a| a == d.addr.as_str())),
        "listeners lack {}: {st}",
        d.addr
    );

    // TaskUnit.Delete: a name, and the {name, keep_history} form.
    assert_eq!(*result(&c.call("TaskUnit.Delete", json!("echo"))), json!(true));
    assert_eq!(
        *result(&c.call("TaskUnit.Delete", json!({"name": "ticker", "keep_history": true}))),
        json!(true)
    );
    let left = result(&c.call("TaskUnit.List", json!({}))).clone();
    assert_eq!(names(&left), BTreeSet::from(["sleeper".to_owned()]));
}

/// Every page of `TaskUnit.List` with `arg` (plus `limit` and `after`), concatenated; fails
/// the test if a page is longer than `limit` or out of order.
fn all_pages(c: &mut Raw, arg: Value, limit: u64) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    loop {
        let mut a = arg.clone();
        a["limit"] = json!(limit);
        if let Some(last) = out.last() {
            a["after"] = json!(last);
        }
        let page = result(&c.call("TaskUnit.List", a)).as_array().expect("an array").clone();
        assert!(page.len() as u64 <= limit, "a page longer than its limit");
        let names: Vec<String> =
            page.iter().map(|u| u["name"].as_str().expect("name").to_owned()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "a page out of order: {names:?}");
        assert!(out.last().is_none_or(|l| names.first().is_none_or(|f| f > l)), "pages overlap");
        out.extend(names);
        if (page.len() as u64) < limit {
            return out;
        }
    }
}

#[test]
fn list_pages_in_name_order_after_filtering() {
    let d = TestDaemon::start();
    // 1005 units, added out of order: `a-0000`…, `b-0000`…; the odd ones paused.
    let mut defs: Vec<Value> = (0..1005)
        .map(|i| {
            let name = format!("{}-{:04}", if i % 3 == 0 { "b" } else { "a" }, i);
            json!({"name": name, "every": "1h", "command": ["true"], "paused": i % 2 == 1})
        })
        .collect();
    defs.reverse();
    d.add_many(&defs);
    let mut all: Vec<String> =
        defs.iter().map(|d| d["name"].as_str().expect("name").to_owned()).collect();
    all.sort();
    let mut c = d.raw();

    // A plain `{}` answers the first page of 1000; paging with a small limit answers each
    // unit exactly once, in order.
    let first = result(&c.call("TaskUnit.List", json!({}))).as_array().expect("array").clone();
    assert_eq!(first.len(), 1000);
    assert_eq!(first[0]["name"], all[0]);
    assert_eq!(first[999]["name"], all[999]);
    assert_eq!(all_pages(&mut c, json!({}), 97), all);
    assert_eq!(all_pages(&mut c, json!({}), 1005), all);

    // Filters apply before paging: every page is full until the last.
    let b: Vec<String> = all.iter().filter(|n| n.starts_with("b-")).cloned().collect();
    assert_eq!(all_pages(&mut c, json!({"name_glob": "b-*"}), 10), b);
    let paused: Vec<String> =
        all.iter().filter(|n| n[2..].parse::<u32>().expect("number") % 2 == 1).cloned().collect();
    assert_eq!(all_pages(&mut c, json!({"state": "paused"}), 33), paused);
    let both: Vec<String> = all
        .iter()
        .filter(|n| n.starts_with("a-") && n.ends_with('7') && paused.contains(n))
        .cloned()
        .collect();
    assert!(!both.is_empty());
    assert_eq!(all_pages(&mut c, json!({"name_glob": "a-*7", "state": "paused"}), 4), both);
    // A cursor need not be a unit's name; past the end there is nothing.
    let v = c.call("TaskUnit.List", json!({"after": "a-0500x", "limit": 2}));
    assert_eq!(names(result(&v)), BTreeSet::from(["a-0502".to_owned(), "a-0503".to_owned()]));
    let v = c.call("TaskUnit.List", json!({"after": "c", "name_glob": "b-*"}));
    assert_eq!(*result(&v), json!([]));

    // Bad pages are refused, naming the field.
    for (arg, field) in [
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 10_001}), "limit"),
        (json!({"limit": 5, "name_glob": "x".repeat(257)}), "name_glob"),
        (json!({"state": "asleep"}), "state"),
    ] {
        let v = c.call("TaskUnit.List", arg.clone());
        assert_eq!(code(&v), i64::from(codes::INVALID_DEFINITION), "{arg}: {v}");
        assert_eq!(error(&v)["data"]["field"], field, "{arg}: {v}");
    }
    for arg in [
        json!({"limit": "10"}),
        json!({"limit": -1}),
        json!({"limit": 1.5}),
        json!({"after": 7}),
        json!({"page": 2}),
    ] {
        let v = c.call("TaskUnit.List", arg.clone());
        assert_eq!(code(&v), INVALID_PARAMS, "{arg}: {v}");
    }
}

#[test]
fn a_bare_params_value_is_the_same_as_a_one_element_array() {
    let d = TestDaemon::start_no_auth(&[]);
    let mut c = Raw::connect(&d.addr);
    let def =
        |name: &str| json!({"name": name, "command": ["true"], "every": "1h", "paused": true});

    c.send(req(1, "TaskUnit.Add", def("bare")).as_bytes());
    let bare = result(&c.recv()).clone();
    c.send(req(2, "TaskUnit.Add", json!([def("wrapped")])).as_bytes());
    let wrapped = result(&c.recv()).clone();
    assert_unit_info(&bare, "bare");
    assert_unit_info(&wrapped, "wrapped");
    let strip = |mut d: Value| {
        d.as_object_mut().expect("object").remove("name");
        d
    };
    assert_eq!(strip(bare["definition"].clone()), strip(wrapped["definition"].clone()));
    assert_eq!(bare["state"], wrapped["state"]);

    for (a, b) in [
        (req(3, "TaskUnit.Get", json!("bare")), req(3, "TaskUnit.Get", json!(["bare"]))),
        (req(4, "TaskUnit.List", json!({})), req(4, "TaskUnit.List", json!([{}]))),
        (
            req(5, "TaskUnit.List", json!({"name_glob": "w*"})),
            req(5, "TaskUnit.List", json!([{"name_glob": "w*"}])),
        ),
        (req(6, "Run.List", json!({})), req(6, "Run.List", json!([{}]))),
    ] {
        c.send(a.as_bytes());
        let ra = c.recv();
        c.send(b.as_bytes());
        let rb = c.recv();
        result(&ra);
        assert_eq!(ra, rb, "{a} and {b} differ");
    }
    // The bare-string form of Add answers `true`, bare or wrapped.
    c.send(req(7, "TaskUnit.Add", json!("tick-bare")).as_bytes());
    assert_eq!(*result(&c.recv()), json!(true));
    c.send(req(8, "TaskUnit.Add", json!(["tick-wrapped"])).as_bytes());
    assert_eq!(*result(&c.recv()), json!(true));
}

#[test]
fn batches_mix_calls_notifications_and_invalid_entries() {
    let d = TestDaemon::start_no_auth(&[]);
    let mut c = Raw::connect(&d.addr);
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "TaskUnit.Add",
         "params": [{"name": "b1", "command": ["true"], "every": "1h", "paused": true}]},
        {"jsonrpc": "2.0", "method": "TaskUnit.Add", "params": ["noted"]},
        42,
        {"jsonrpc": "2.0", "id": "x", "method": "No.Such"},
        {"jsonrpc": "2.0", "id": 2, "method": "TaskUnit.Get", "params": ["b1"]},
        {"jsonrpc": "2.0", "id": 3, "method": "TaskUnit.Get", "params": ["absent"]},
    ]);
    c.send(format!("{batch}\n").as_bytes());
    let reply = c.recv();
    let entries = reply.as_array().unwrap_or_else(|| panic!("a batch gets an array: {reply}"));
    assert_eq!(
        entries.len(),
        5,
        "one reply per call and invalid entry, none for the notification: {reply}"
    );
    let by_id = |id: Value| {
        entries
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("no reply with id {id} in {reply}"))
    };
    assert_unit_info(result(by_id(json!(1))), "b1");
    assert_unit_info(result(by_id(json!(2))), "b1");
    assert_eq!(code(by_id(json!("x"))), METHOD_NOT_FOUND);
    assert_eq!(code(by_id(json!(3))), i64::from(codes::UNIT_NOT_FOUND));
    assert_eq!(code(by_id(Value::Null)), INVALID_REQUEST);
    for e in entries {
        assert_eq!(e["jsonrpc"], "2.0", "{e}");
    }

    // The notification was executed, only its reply dropped.
    c.send(req(10, "TaskUnit.Get", json!("noted")).as_bytes());
    assert_unit_info(result(&c.recv()), "noted");

    // Notifications alone (single or batched) get no reply at all: the next line answers
    // the call after them.
    c.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"Daemon.Status\",\"params\":[{}]}\n");
    c.send(b"[{\"jsonrpc\":\"2.0\",\"method\":\"Daemon.Status\"},{\"jsonrpc\":\"2.0\",\"method\":\"TaskUnit.List\"}]\n");
    c.send(req(11, "TaskUnit.List", json!({})).as_bytes());
    let next = c.recv();
    assert_eq!(next["id"], 11, "notifications must not be answered: {next}");

    // An empty batch is an invalid request.
    c.send(b"[]\n");
    assert_eq!(code(&c.recv()), INVALID_REQUEST);
}

#[test]
fn framing_concatenated_and_split_requests() {
    let d = TestDaemon::start_no_auth(&[]);
    let mut c = Raw::connect(&d.addr);
    c.stream.set_nodelay(true).expect("nodelay");

    // Two requests in one write, with no separator at all.
    let two = format!(
        "{}{}",
        json!({"jsonrpc": "2.0", "id": 1, "method": "TaskUnit.Add", "params": ["one"]}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "Daemon.Status", "params": [{}]})
    );
    c.send(two.as_bytes());
    let replies = recv_n(&mut c, 2);
    assert_eq!(*result(&replies["1"]), json!(true));
    assert_eq!(result(&replies["2"])["version"], env!("CARGO_PKG_VERSION"));

    // Two newline-separated requests in one write.
    c.send(
        format!("{}{}", req(3, "TaskUnit.Get", json!("one")), req(4, "TaskUnit.List", json!({})))
            .as_bytes(),
    );
    let replies = recv_n(&mut c, 2);
    assert_unit_info(result(&replies["3"]), "one");
    assert_eq!(names(result(&replies["4"])), BTreeSet::from(["one".to_owned()]));

    // One request, byte by byte, with braces and quotes inside strings.
    let tricky = json!({"jsonrpc": "2.0", "id": 5, "method": "TaskUnit.Add",
        "params": [{"name": "split", "command": ["true"], "description": "a } \" { [ ] \\ é", "paused": true}]});
    for b in format!("{tricky}\n").as_bytes() {
        c.stream.write_all(&[*b]).expect("write one byte");
    }
    let reply = c.recv();
    assert_eq!(reply["id"], 5);
    assert_eq!(result(&reply)["definition"]["description"], "a } \" { [ ] \\ é");

    // Every reply is one line: a reply to a request without a trailing newline, after
    // the client half-closes, still arrives.
    c.send(
        json!({"jsonrpc": "2.0", "id": 6, "method": "TaskUnit.Get", "params": ["split"]})
            .to_string()
            .as_bytes(),
    );
    c.stream.shutdown(std::net::Shutdown::Write).expect("half-close");
    let reply = c.recv();
    assert_eq!(reply["id"], 6);
    assert_unit_info(result(&reply), "split");
}

#[test]
fn go_1_0_requests_get_go_1_0_replies() {
    let d = TestDaemon::start();
    let mut c = Raw::connect(&d.addr);
    let keys = |v: &Value| v.as_object().expect("object").keys().cloned().collect::<BTreeSet<_>>();
    let go_keys = BTreeSet::from(["id".to_owned(), "result".to_owned(), "error".to_owned()]);

    // Before Auth.Login, an error as a string.
    c.send(b"{\"method\":\"TaskUnit.List\",\"params\":[{}],\"id\":0}\n");
    let v = c.recv();
    assert_eq!(keys(&v), go_keys, "{v}");
    assert_eq!(v["id"], 0);
    assert_eq!(v["result"], Value::Null);
    assert!(v["error"].as_str().is_some_and(|e| e.contains("unauthorized")), "{v}");

    c.send(
        format!("{{\"method\":\"Auth.Login\",\"params\":[\"{}\"],\"id\":1}}\n", d.token).as_bytes(),
    );
    let v = c.recv();
    assert_eq!(v, json!({"id": 1, "result": true, "error": null}));

    c.send(b"{\"method\":\"TaskUnit.Add\",\"params\":[\"gostyle\"],\"id\":2}\n");
    assert_eq!(c.recv(), json!({"id": 2, "result": true, "error": null}));

    c.send(b"{\"method\":\"TaskUnit.Get\",\"params\":[\"gostyle\"],\"id\":3}\n");
    let v = c.recv();
    assert_eq!(keys(&v), go_keys, "{v}");
    assert_eq!(v["error"], Value::Null);
    assert_unit_info(&v["result"], "gostyle");

    for (line, needle) in [
        (r#"{"method":"TaskUnit.Get","params":["missing"],"id":4}"#, "not found"),
        (r#"{"method":"TaskUnit.Add","params":["gostyle"],"id":4}"#, "already exists"),
        (r#"{"method":"No.Such","params":[null],"id":4}"#, "not found"),
        (r#"{"method":"Run.Get","params":["x"],"id":4}"#, "nvalid params"),
        (r#"{"method":"Events.Subscribe","params":[{}],"id":4}"#, "2.0"),
    ] {
        c.send(format!("{line}\n").as_bytes());
        let v = c.recv();
        assert_eq!(keys(&v), go_keys, "{line}: {v}");
        assert_eq!(v["id"], 4, "{line}: {v}");
        assert_eq!(v["result"], Value::Null, "{line}: {v}");
        let e = v["error"].as_str().unwrap_or_else(|| panic!("{line}: error is not a string: {v}"));
        assert!(e.contains(needle), "{line}: {e:?} lacks {needle:?}");
    }

    // Pipelined: ids echoed, Go matches replies by id.
    let many: String = (100..110)
        .map(|i| format!("{{\"method\":\"TaskUnit.Get\",\"params\":[\"gostyle\"],\"id\":{i}}}\n"))
        .collect();
    c.send(many.as_bytes());
    let got: BTreeSet<u64> = (0..10)
        .map(|_| {
            let v = c.recv();
            assert_eq!(v["error"], Value::Null, "{v}");
            v["id"].as_u64().expect("numeric id")
        })
        .collect();
    assert_eq!(got, (100..110).collect());
}

#[test]
fn every_error_code() {
    let d = TestDaemon::start();

    // UNAUTHORIZED: before Auth.Login, and with a wrong token.
    let mut anon = Raw::connect(&d.addr);
    let v = anon.call("TaskUnit.List", json!({}));
    assert_eq!(code(&v), i64::from(codes::UNAUTHORIZED), "{v}");
    let v = anon.call("TaskUnit.Add", json!("sneaky"));
    assert_eq!(code(&v), i64::from(codes::UNAUTHORIZED), "{v}");
    let v = anon.call("Auth.Login", json!("not-the-token"));
    assert_eq!(code(&v), i64::from(codes::UNAUTHORIZED), "{v}");
    let v = anon.call("Daemon.Status", json!({}));
    assert_eq!(code(&v), i64::from(codes::UNAUTHORIZED), "a wrong token does not log in: {v}");
    // A batch is checked entry by entry.
    anon.send(
        format!(
            "[{},{}]\n",
            req(1, "Auth.Login", json!(["bad"])).trim(),
            req(2, "TaskUnit.List", json!([{}])).trim()
        )
        .as_bytes(),
    );
    let v = anon.recv();
    for e in v.as_array().expect("array") {
        assert_eq!(code(e), i64::from(codes::UNAUTHORIZED), "{v}");
    }
    let v = anon.call("Auth.Login", json!(d.token));
    assert_eq!(*result(&v), json!(true));
    let mut c = anon;
    assert!(result(&c.call("TaskUnit.List", json!({}))).is_array());
    assert!(
        d.call("TaskUnit.List", json!({})).as_array().is_some_and(Vec::is_empty),
        "no unauthorized call changed anything"
    );

    // -32700: not JSON (after a first request, so the connection is raw TCP).
    c.send(b"{\"jsonrpc\": oops}\n");
    let v = c.recv();
    assert_eq!(code(&v), PARSE_ERROR, "{v}");
    assert_eq!(v["id"], Value::Null);
    // -32600: valid JSON that is not a request.
    for bad in [
        "42",
        "\"str\"",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":7}",
        "{\"jsonrpc\":\"2.0\",\"id\":1}",
    ] {
        c.send(format!("{bad}\n").as_bytes());
        assert_eq!(code(&c.recv()), INVALID_REQUEST, "{bad}");
    }
    // -32601
    let v = c.call("TaskUnit.Frobnicate", json!({}));
    assert_eq!(code(&v), METHOD_NOT_FOUND, "{v}");
    // -32602: wrong param types.
    for (m, arg) in [
        ("Run.Get", json!("x")),
        ("Run.Cancel", json!({"id": 1})),
        ("TaskUnit.Get", json!(7)),
        ("Run.Logs", json!({"id": "x"})),
        ("TaskUnit.List", json!({"bogus": 1})),
    ] {
        let v = c.call(m, arg.clone());
        assert_eq!(code(&v), INVALID_PARAMS, "{m}({arg}): {v}");
    }
    // UNIT_EXISTS, UNIT_NOT_FOUND, RUN_NOT_FOUND.
    let def = json!({"name": "x", "command": ["true"], "every": "1h", "paused": true});
    result(&c.call("TaskUnit.Add", def.clone()));
    let v = c.call("TaskUnit.Add", def);
    assert_eq!(code(&v), i64::from(codes::UNIT_EXISTS), "{v}");
    assert!(error(&v)["message"].as_str().is_some_and(|m| m.contains("\"x\"")), "{v}");
    let v = c.call("TaskUnit.Add", json!("x"));
    assert_eq!(code(&v), i64::from(codes::UNIT_EXISTS), "{v}");
    for m in [
        "TaskUnit.Get",
        "TaskUnit.Delete",
        "TaskUnit.Start",
        "TaskUnit.Stop",
        "TaskUnit.Pause",
        "TaskUnit.Resume",
    ] {
        let v = c.call(m, json!("ghost"));
        assert_eq!(code(&v), i64::from(codes::UNIT_NOT_FOUND), "{m}: {v}");
        assert!(error(&v)["message"].as_str().is_some_and(|s| s.contains("ghost")), "{v}");
    }
    let v = c.call("TaskUnit.Edit", json!({"name": "ghost", "description": "d"}));
    assert_eq!(code(&v), i64::from(codes::UNIT_NOT_FOUND), "{v}");
    for m in ["Run.Get", "Run.Cancel"] {
        let v = c.call(m, json!(987_654));
        assert_eq!(code(&v), i64::from(codes::RUN_NOT_FOUND), "{m}: {v}");
    }
    let v = c.call("Run.Logs", json!({"id": 987_654}));
    assert_eq!(code(&v), i64::from(codes::RUN_NOT_FOUND), "{v}");
    // INVALID_DEFINITION with data.field.
    let v = c.call("TaskUnit.Add", json!({"name": "x2", "cron": "* * *", "command": ["true"]}));
    assert_eq!(code(&v), i64::from(codes::INVALID_DEFINITION), "{v}");
    assert_eq!(error(&v)["data"]["field"], "cron", "{v}");
    assert!(error(&v)["message"].as_str().is_some_and(|m| m.starts_with("cron")), "{v}");
    let v = c.call("TaskUnit.Add", json!({"name": "x2", "comand": ["true"]}));
    assert_eq!(code(&v), i64::from(codes::INVALID_DEFINITION), "{v}");
    assert_eq!(error(&v)["data"]["field"], "comand", "{v}");
    let v = c.call("TaskUnit.Edit", json!({"name": "x", "every": "soon"}));
    assert_eq!(code(&v), i64::from(codes::INVALID_DEFINITION), "{v}");
    assert_eq!(error(&v)["data"]["field"], "every", "{v}");
    // LIMIT_EXCEEDED: a request over 1 MiB; the connection keeps working after it.
    let big = req(
        99,
        "TaskUnit.Add",
        json!([{"name": "big", "command": ["true"], "description": "a".repeat(1_100_000)}]),
    );
    c.send(big.as_bytes());
    let v = c.recv();
    assert_eq!(code(&v), i64::from(codes::LIMIT_EXCEEDED), "{v}");
    let v = c.call("TaskUnit.Get", json!("big"));
    assert_eq!(code(&v), i64::from(codes::UNIT_NOT_FOUND), "the oversized Add did nothing: {v}");
}

#[test]
fn a_json_object_that_is_not_a_request_is_an_invalid_request() {
    // JSON-RPC 2.0: valid JSON that is not a Request object is -32600, not a parse error.
    let d = TestDaemon::start_no_auth(&[]);
    let mut c = Raw::connect(&d.addr);
    for bad in [r#"{"jsonrpc":"2.0"}"#, r#"{"jsonrpc":"2.0","params":[]}"#, "{}"] {
        c.send(format!("{bad}\n").as_bytes());
        let v = c.recv();
        let code = match &v["error"] {
            Value::Object(e) => e["code"].as_i64(),
            // A request without "jsonrpc" gets the Go shape, with the message only.
            Value::String(m) => {
                Some(if m.contains("Invalid request") { INVALID_REQUEST } else { 0 })
            }
            _ => None,
        };
        assert_eq!(code, Some(INVALID_REQUEST), "{bad}: {v}");
    }
}

/// Invalid definitions and the field each one's error must name (any of the given ones).
fn invalid_definitions() -> Vec<(Value, &'static [&'static str])> {
    let long = "n".repeat(65);
    vec![
        (json!({"name": "-bad", "command": ["true"]}), &["name"]),
        (json!({"name": "a/b", "command": ["true"]}), &["name"]),
        (json!({"name": "", "command": ["true"]}), &["name"]),
        (json!({"name": long, "command": ["true"]}), &["name"]),
        (json!({"name": "sp ace", "command": ["true"]}), &["name"]),
        (json!({"command": ["true"]}), &["name"]),
        (json!({"name": 5, "command": ["true"]}), &["name"]),
        (json!({"name": "x", "command": []}), &["command"]),
        (json!({"name": "x", "command": [""]}), &["command"]),
        (json!({"name": "x", "command": "true"}), &["command"]),
        (json!({"name": "x", "command": [1, 2]}), &["command"]),
        (json!({"name": "x", "command": ["true"], "script": "echo hi"}), &["command", "script"]),
        (json!({"name": "x", "script": "   "}), &["script"]),
        (
            json!({"name": "x", "command": ["true"], "every": "1m", "cron": "* * * * *"}),
            &["every", "cron"],
        ),
        (
            json!({"name": "x", "command": ["true"], "service": true, "every": "1m"}),
            &["every", "service"],
        ),
        (json!({"name": "x", "command": ["true"], "service": "yes"}), &["service"]),
        (json!({"name": "x", "command": ["true"], "cron": "* * *"}), &["cron"]),
        (json!({"name": "x", "command": ["true"], "cron": "61 * * * *"}), &["cron"]),
        (
            json!({"name": "x", "command": ["true"], "cron": "0 3 * * *", "tz": "Mars/Olympus_Mons"}),
            &["tz"],
        ),
        (json!({"name": "x", "command": ["true"], "every": "5 parsecs"}), &["every"]),
        (json!({"name": "x", "command": ["true"], "every": "0s"}), &["every"]),
        (json!({"name": "x", "command": ["true"], "every": "-5s"}), &["every"]),
        (json!({"name": "x", "command": ["true"], "every": "99999999999999999999h"}), &["every"]),
        (json!({"name": "x", "command": ["true"], "every": 5}), &["every"]),
        (json!({"name": "x", "command": ["true"], "timeout": ""}), &["timeout"]),
        (json!({"name": "x", "command": ["true"], "timeout": "1y"}), &["timeout"]),
        (json!({"name": "x", "command": ["true"], "kill_grace": "0s"}), &["kill_grace"]),
        (json!({"name": "x", "command": ["true"], "backoff": "fast"}), &["backoff"]),
        (json!({"name": "x", "command": ["true"], "start_limit": "many"}), &["start_limit"]),
        (json!({"name": "x", "command": ["true"], "retries": -1}), &["retries"]),
        (json!({"name": "x", "command": ["true"], "retries": 1.5}), &["retries"]),
        (json!({"name": "x", "command": ["true"], "overlap": "sometimes"}), &["overlap"]),
        (json!({"name": "x", "command": ["true"], "catch_up": "all"}), &["catch_up"]),
        (
            json!({"name": "x", "command": ["true"], "restart": "whenever", "service": true}),
            &["restart"],
        ),
        (json!({"name": "x", "command": ["true"], "success_codes": []}), &["success_codes"]),
        (json!({"name": "x", "command": ["true"], "success_codes": [300]}), &["success_codes"]),
        (json!({"name": "x", "command": ["true"], "env": {"A=B": "1"}}), &["env", "env.A=B"]),
        (json!({"name": "x", "command": ["true"], "env": {"": "1"}}), &["env"]),
        (json!({"name": "x", "command": ["true"], "env": ["A=1"]}), &["env"]),
        (json!({"name": "x", "command": ["true"], "env": {"A": 1}}), &["env", "env.A"]),
        (json!({"name": "x", "command": ["true"], "cwd": "relative/dir"}), &["cwd"]),
        (json!({"name": "x", "command": ["true"], "log_limit": "lots"}), &["log_limit"]),
        (json!({"name": "x", "command": ["true"], "paused": "no"}), &["paused"]),
        (json!({"name": "x", "command": ["true"], "bogus": 1}), &["bogus"]),
        (json!({"name": "x", "command": ["true"], "Every": "1m"}), &["Every"]),
    ]
}

#[test]
fn bad_input_changes_nothing_and_the_daemon_keeps_serving() {
    let d = TestDaemon::start();
    let mut c = d.raw();
    result(&c.call(
        "TaskUnit.Add",
        json!({"name": "keeper", "command": ["true"], "every": "1h", "paused": true}),
    ));
    let units_before = result(&c.call("TaskUnit.List", json!({}))).clone();
    let keeper_before = result(&c.call("TaskUnit.Get", json!("keeper"))).clone();
    let runs_before = result(&c.call("Run.List", json!({}))).clone();
    let pid_before =
        result(&c.call("Daemon.Status", json!({})))["pid"].as_u64().expect("pid") as u32;
    assert_eq!(runs_before, json!([]), "a paused unit has no runs");

    // Garbage bytes: each line gets a parse error and the stream resynchronises.
    for garbage in [
        &b"\x00\x01\x02\xff\xfe\n"[..],
        b"}}}]]]\n",
        b"{\"no value\": }\n",
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"TaskUnit.Add\",\"params\":[{\"name\":\"half\"\n}}}\n",
        b"[1,2,,]\n",
        b"\xc3\x28{}\n",
    ] {
        c.send(garbage);
        let v = c.recv();
        assert!(
            matches!(code(&v), PARSE_ERROR | INVALID_REQUEST),
            "{:?}: {v}",
            String::from_utf8_lossy(garbage)
        );
        // The connection is still in sync: the next request gets its own reply.
        let v = c.call("Daemon.Status", json!({}));
        assert!(result(&v)["version"].is_string(), "after {:?}: {v}", String::from_utf8_lossy(garbage));
    }

    // Invalid definitions, through Add and Edit.
    for (def, fields) in invalid_definitions() {
        let v = c.call("TaskUnit.Add", def.clone());
        assert_eq!(code(&v), i64::from(codes::INVALID_DEFINITION), "Add {def}: {v}");
        let field =
            error(&v)["data"]["field"].as_str().unwrap_or_else(|| panic!("no data.field: {v}"));
        assert!(fields.contains(&field), "Add {def}: field {field:?}, expected one of {fields:?}");
        let msg = error(&v)["message"].as_str().expect("message");
        assert!(msg.len() > field.len() + 2, "the message says why: {msg:?}");

        let mut patch = def.clone();
        if let Some(obj) = patch.as_object_mut()
            && obj.get("name").is_some_and(|n| n.is_string())
            && fields != ["name"]
        {
            obj.insert("name".into(), json!("keeper"));
            if obj.contains_key("script") || obj.contains_key("service") {
                // These conflict with the stored command in ways that depend on merge order;
                // Add covers them.
                continue;
            }
            let v = c.call("TaskUnit.Edit", patch.clone());
            assert_eq!(code(&v), i64::from(codes::INVALID_DEFINITION), "Edit {patch}: {v}");
        }
    }
    // A bare name that is not a valid unit name.
    for bad in ["../etc", "", "a b", "-x"] {
        let v = c.call("TaskUnit.Add", json!(bad));
        assert_eq!(code(&v), i64::from(codes::INVALID_DEFINITION), "Add {bad:?}: {v}");
        assert_eq!(error(&v)["data"]["field"], "name", "{v}");
    }
    // Not an object at all.
    for bad in [json!(42), json!([1, 2]), json!(null), json!(true)] {
        let v = c.call("TaskUnit.Add", bad.clone());
        assert!(
            matches!(code(&v), INVALID_PARAMS) || code(&v) == i64::from(codes::INVALID_DEFINITION),
            "Add {bad}: {v}"
        );
    }

    // An oversized request, complete and never finished.
    let big = req(
        7,
        "TaskUnit.Add",
        json!([{"name": "big", "command": ["true"], "description": "x".repeat(2 << 20)}]),
    );
    c.send(big.as_bytes());
    assert_eq!(code(&c.recv()), i64::from(codes::LIMIT_EXCEEDED));
    c.send(&vec![b'['; 3 << 20]);
    c.send(b"\n");
    assert_eq!(code(&c.recv()), i64::from(codes::LIMIT_EXCEEDED));

    // Nesting bombs, within the size limit.
    let bomb = format!("{}{}\n", "[".repeat(200_000), "]".repeat(200_000));
    c.send(bomb.as_bytes());
    // A deep array is a batch whose one entry is not a request, or unparseable: either way
    // only errors come back.
    let v = c.recv();
    let errors = match v.as_array() {
        Some(entries) => entries.iter().map(code).collect(),
        None => vec![code(&v)],
    };
    assert!(errors.iter().all(|c| matches!(*c, PARSE_ERROR | INVALID_REQUEST)), "{v}");
    let nested = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":8,\"method\":\"TaskUnit.Add\",\"params\":[{{\"name\":\"bomb\",\"command\":{}{}}}]}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    c.send(nested.as_bytes());
    let v = c.recv();
    assert!(
        matches!(code(&v), PARSE_ERROR | INVALID_REQUEST | INVALID_PARAMS)
            || code(&v) == i64::from(codes::INVALID_DEFINITION),
        "{v}"
    );
    let obj_bomb = format!("{}{}\n", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    c.send(obj_bomb.as_bytes());
    assert!(matches!(code(&c.recv()), PARSE_ERROR | INVALID_REQUEST));

    // Unknown methods, including ones that look like internals.
    for m in ["No.Such", "rpc.unknown", "TaskUnit.add", "", "Events.Unsubscribe.X"] {
        let v = c.call(m, json!({}));
        assert_eq!(code(&v), METHOD_NOT_FOUND, "{m:?}: {v}");
    }

    // Still serving, on this connection and on a new one, and nothing changed.
    let v = c.call("Daemon.Status", json!({}));
    assert_eq!(result(&v)["units"]["total"], 1, "{v}");
    let pid = result(&v)["pid"].as_i64().expect("the daemon's pid");
    assert_eq!(pid, i64::from(pid_before), "the daemon was restarted:\n{}", d.log());
    assert!(alive(pid as i32), "the daemon died:\n{}", d.log());
    let mut fresh = d.raw();
    assert_eq!(*result(&fresh.call("TaskUnit.List", json!({}))), units_before);
    assert_eq!(*result(&fresh.call("TaskUnit.Get", json!("keeper"))), keeper_before);
    assert_eq!(*result(&fresh.call("Run.List", json!({}))), runs_before, "no run was created");
    assert_eq!(*result(&c.call("TaskUnit.List", json!({}))), units_before);
}

#[test]
fn http_post_needs_the_bearer_token() {
    let d = TestDaemon::start();
    let bearer = format!("Bearer {}", d.token);
    let json_ct = ("Content-Type", "application/json");
    let body = |id: u64, method: &str, arg: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": [arg]}).to_string()
    };

    let (status, text) = http_post(
        &d.addr,
        &[json_ct, ("Authorization", &bearer)],
        &body(1, "TaskUnit.Add", json!({"name": "via-http", "command": ["true"], "paused": true})),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json body");
    assert_eq!(v["id"], 1);
    assert_unit_info(result(&v), "via-http");

    let (status, text) = http_post(
        &d.addr,
        &[json_ct, ("Authorization", &bearer)],
        &body(2, "Daemon.Status", json!({})),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json body");
    assert_eq!(result(&v)["units"]["total"], 1);

    // A bare-object params and an application error, over HTTP.
    let (status, text) = http_post(
        &d.addr,
        &[json_ct, ("Authorization", &bearer)],
        &json!({"jsonrpc": "2.0", "id": 3, "method": "TaskUnit.Get", "params": "nope"}).to_string(),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json body");
    assert_eq!(code(&v), i64::from(codes::UNIT_NOT_FOUND), "{v}");

    // Without the token, or with a wrong one: 401, and nothing happens.
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic dXNlcjpwYXNz"),
        Some(bearer.trim_end_matches(|c: char| c != ' ')),
    ] {
        let mut headers = vec![json_ct];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let (status, text) =
            http_post(&d.addr, &headers, &body(4, "TaskUnit.Add", json!("sneaky")));
        assert_eq!(status, 401, "auth {auth:?}: {text}");
    }

    // Over the size limit: 413 and the limit error, nothing added.
    let (status, text) = http_post(
        &d.addr,
        &[json_ct, ("Authorization", &bearer)],
        &body(
            5,
            "TaskUnit.Add",
            json!({"name": "huge", "command": ["true"], "description": "a".repeat(1_100_000)}),
        ),
    );
    assert_eq!(status, 413, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json body");
    assert_eq!(code(&v), i64::from(codes::LIMIT_EXCEEDED), "{v}");

    // A WebSocket upgrade without the token: 401.
    let mut s = TcpStream::connect(&d.addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            d.addr
        )
        .as_bytes(),
    )
    .expect("write upgrade");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("status line");
    assert_eq!(&head, b"HTTP/1.1 401", "{}", String::from_utf8_lossy(&head));

    let units = d.call("TaskUnit.List", json!({}));
    assert_eq!(names(&units), BTreeSet::from(["via-http".to_owned()]));
}

async fn ws(d: &TestDaemon) -> WsClient {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {}", d.token)).expect("header"),
    );
    WsClientBuilder::default()
        .set_headers(headers)
        .request_timeout(DEADLINE)
        .build(format!("ws://{}", d.addr))
        .await
        .expect("websocket connect")
}

async fn next_item(sub: &mut jsonrpsee::core::client::Subscription<Value>) -> Value {
    tokio::time::timeout(DEADLINE, sub.next())
        .await
        .expect("a notification before the deadline")
        .expect("the subscription is open")
        .expect("a JSON item")
}

/// A client told of a `unit.added` finds the unit when it asks for it at once, even while
/// other adds are being recorded around it; told of a `unit.edited`, it reads the new
/// definition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_is_found_as_its_added_and_edited_events_say() {
    const UNITS: usize = 300;
    let d = TestDaemon::start();
    let watcher = ws(&d).await;
    let mut events = watcher
        .subscribe::<Value, _>("Events.Subscribe", rpc_params![json!({})], "Events.Unsubscribe")
        .await
        .expect("subscribe");
    let caller = std::sync::Arc::new(ws(&d).await);
    let adds = call_each(
        &caller,
        "TaskUnit.Add",
        UNITS,
        |i| json!({"name": format!("seen-{i}"), "command": ["true"], "every": "1h"}),
    );
    for _ in 0..UNITS {
        let name = next_of(&mut events, "unit.added").await;
        let got: Result<Value, _> =
            watcher.request("TaskUnit.Get", rpc_params![name.clone()]).await;
        assert!(got.is_ok(), "{name} was announced but not found: {got:?}");
    }
    for a in adds {
        a.await.expect("adder");
    }
    // The same for edits: told of one, a client reads the new definition.
    let edits = call_each(
        &caller,
        "TaskUnit.Edit",
        UNITS,
        |i| json!({"name": format!("seen-{i}"), "description": "edited"}),
    );
    for _ in 0..UNITS {
        let name = next_of(&mut events, "unit.edited").await;
        let got: Value =
            watcher.request("TaskUnit.Get", rpc_params![name.clone()]).await.expect("get");
        assert_eq!(got["definition"]["description"], "edited", "{name}: {got}");
    }
    for e in edits {
        e.await.expect("editor");
    }
}

/// `method` called `n` times side by side on `client`, with `arg(i)` for the `i`th call.
fn call_each(
    client: &std::sync::Arc<WsClient>,
    method: &'static str,
    n: usize,
    arg: impl Fn(usize) -> Value,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let (client, arg) = (client.clone(), arg(i));
            tokio::spawn(async move {
                let r: Result<Value, _> = client.request(method, rpc_params![arg]).await;
                if let Err(e) = r {
                    panic!("{method}: {e}");
                }
            })
        })
        .collect()
}

/// The unit named by the next event of `kind` (others are skipped).
async fn next_of(sub: &mut jsonrpsee::core::client::Subscription<Value>, kind: &str) -> String {
    loop {
        let ev = next_item(sub).await;
        if ev["kind"] == kind {
            return ev["unit"].as_str().expect("unit").to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_calls_events_and_follow() {
    let d = TestDaemon::start();

    // No token: the upgrade is refused.
    let refused = WsClientBuilder::default().build(format!("ws://{}", d.addr)).await;
    assert!(refused.is_err(), "a WebSocket without the bearer token must be refused");

    let client = ws(&d).await;
    let st: Value = client.request("Daemon.Status", rpc_params![json!({})]).await.expect("status");
    assert_eq!(st["auth"], "token");

    // Events.Subscribe: a unit.added event after an Add.
    let mut events = client
        .subscribe::<Value, _>("Events.Subscribe", rpc_params![json!({})], "Events.Unsubscribe")
        .await
        .expect("subscribe");
    let added: Value = client
        .request(
            "TaskUnit.Add",
            rpc_params![
                json!({"name": "ws-unit", "command": ["true"], "every": "1h", "paused": true})
            ],
        )
        .await
        .expect("add");
    assert_unit_info(&added, "ws-unit");
    let ev = loop {
        let ev = next_item(&mut events).await;
        if ev["kind"] == "unit.added" {
            break ev;
        }
    };
    assert_eq!(ev["unit"], "ws-unit");
    assert!(ev["seq"].is_i64(), "{ev}");
    assert_time(&ev["time"], "event time");

    // Run.Follow: output, then one final end item.
    let gate = d.state_dir().join("go-on");
    let script =
        format!("echo one; while [ ! -e '{}' ]; do sleep 0.02; done; echo two", gate.display());
    let info: Value = client
        .request(
            "TaskUnit.Add",
            rpc_params![json!({"name": "talker", "command": ["sh", "-c", script]})],
        )
        .await
        .expect("add talker");
    let run = info["last_run"]["id"].as_i64().expect("run id");
    let mut follow = client
        .subscribe::<Value, _>("Run.Follow", rpc_params![json!({"id": run})], "Run.Unfollow")
        .await
        .expect("follow");
    let mut out = String::new();
    let end = loop {
        let item = next_item(&mut follow).await;
        match item["kind"].as_str() {
            Some("output") => {
                out.push_str(item["data"].as_str().expect("data"));
                if out.contains("one\n") && !gate.exists() {
                    std::fs::write(&gate, "").expect("open the gate");
                }
            }
            Some("end") => break item,
            _ => panic!("unexpected follow item {item}"),
        }
    };
    assert!(gate.exists(), "the end came before the output: {out:?}");
    assert_eq!(out, "one\ntwo\n");
    assert_run_info(&end["run"]);
    assert_eq!(end["run"]["id"], run);
    assert_eq!(end["run"]["state"], "succeeded");

    // The client may end the subscription itself after the end item.
    follow.unsubscribe().await.expect("unsubscribe after the end");
    events.unsubscribe().await.expect("unsubscribe from events");
}

#[test]
fn subscriptions_over_raw_tcp() {
    let d = TestDaemon::start();
    let mut sub = d.raw();
    let v = sub.call("Events.Subscribe", json!({}));
    let sub_id = result(&v).clone();

    d.call("TaskUnit.Add", json!({"name": "watched", "command": ["sh", "-c", "echo hello"]}));
    let mut seen = Vec::new();
    let run = wait_for("run.finished for watched", || {
        let n = sub.recv();
        assert_eq!(n["jsonrpc"], "2.0", "{n}");
        assert!(n.get("id").is_none(), "a notification has no id: {n}");
        assert_eq!(n["params"]["subscription"], sub_id, "{n}");
        let ev = n["params"]["result"].clone();
        assert_eq!(ev["unit"], "watched", "{n}");
        seen.push(ev["kind"].as_str().expect("kind").to_owned());
        (ev["kind"] == "run.finished").then(|| ev["run"].as_i64().expect("run id"))
    });
    assert_eq!(seen.first().map(String::as_str), Some("unit.added"), "{seen:?}");
    assert!(seen.iter().any(|k| k == "run.started"), "{seen:?}");

    // Replay with after_seq on a new connection gets the same events.
    let mut replay = d.raw();
    let v = replay.call("Events.Subscribe", json!({"after_seq": 0}));
    result(&v);
    let first = replay.recv();
    assert_eq!(first["params"]["result"]["kind"], "unit.added", "{first}");

    // Run.Follow of a finished run over raw TCP: its output, then the end item.
    let mut f = d.raw();
    let v = f.call("Run.Follow", json!({"id": run}));
    let fid = result(&v).clone();
    let mut out = String::new();
    let end = wait_for("the end item", || {
        let n = f.recv();
        assert_eq!(n["params"]["subscription"], fid, "{n}");
        let item = n["params"]["result"].clone();
        if item["kind"] == "output" {
            out.push_str(item["data"].as_str().expect("data"));
            None
        } else {
            Some(item)
        }
    });
    assert_eq!(end["kind"], "end");
    assert_eq!(end["run"]["state"], "succeeded");
    assert_eq!(out, "hello\n");

    // Following an unknown run is an error, not a subscription.
    let v = f.call("Run.Follow", json!({"id": 424_242}));
    assert_eq!(code(&v), i64::from(codes::RUN_NOT_FOUND), "{v}");
    // Subscriptions need authentication too.
    let mut anon = Raw::connect(&d.addr);
    let v = anon.call("Events.Subscribe", json!({}));
    assert_eq!(code(&v), i64::from(codes::UNAUTHORIZED), "{v}");
}

/// Audit rows as (method, unit, outcome, peer).
type AuditRow = (String, Option<String>, String, String);

fn audit_rows(d: &TestDaemon) -> Vec<AuditRow> {
    let db = rusqlite::Connection::open_with_flags(
        d.state_dir().join("taskd.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open taskd.db read-only");
    let mut st = db
        .prepare("SELECT method, unit, outcome, peer, time FROM audit ORDER BY id")
        .expect("the audit table");
    st.query_map([], |r| {
        let time: i64 = r.get(4)?;
        assert!(time > 0, "audit time");
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })
    .expect("query")
    .collect::<Result<_, _>>()
    .expect("rows")
}

#[test]
fn state_changes_are_audited_and_durable() {
    let mut d = TestDaemon::start();
    let mut c = d.raw();
    let def = json!({"name": "audited", "command": ["true"], "every": "1h", "paused": true});
    result(&c.call("TaskUnit.Add", def.clone()));
    assert_eq!(code(&c.call("TaskUnit.Add", def)), i64::from(codes::UNIT_EXISTS));
    result(&c.call("TaskUnit.Delete", json!("audited")));
    assert_eq!(
        code(&c.call("TaskUnit.Delete", json!("audited"))),
        i64::from(codes::UNIT_NOT_FOUND)
    );
    result(&c.call("TaskUnit.Add", json!({"name": "kept", "command": ["true"], "paused": true})));
    // Reads are not audited.
    result(&c.call("TaskUnit.List", json!({})));
    // Over HTTP too.
    let (status, text) = http_post(
        &d.addr,
        &[("Content-Type", "application/json"), ("Authorization", &format!("Bearer {}", d.token))],
        &json!({"jsonrpc": "2.0", "id": 1, "method": "TaskUnit.Add", "params": ["by-http"]})
            .to_string(),
    );
    assert_eq!(status, 200, "{text}");

    let want: Vec<(&str, Option<&str>, Option<&str>)> = vec![
        ("TaskUnit.Add", Some("audited"), None),
        ("TaskUnit.Add", Some("audited"), Some("already exists")),
        ("TaskUnit.Delete", Some("audited"), None),
        ("TaskUnit.Delete", Some("audited"), Some("not found")),
        ("TaskUnit.Add", Some("kept"), None),
        ("TaskUnit.Add", Some("by-http"), None),
    ];
    let rows = wait_for("the audit rows", || {
        let rows = audit_rows(&d);
        (rows.len() >= want.len()).then_some(rows)
    });
    assert_eq!(rows.len(), want.len(), "{rows:#?}");
    for (row, (method, unit, failure)) in rows.iter().zip(&want) {
        assert_eq!(row.0, *method, "{row:?}");
        assert_eq!(row.1.as_deref(), *unit, "{row:?}");
        match failure {
            None => assert_eq!(row.2, "ok", "{row:?}"),
            Some(needle) => assert!(row.2.contains(needle), "{row:?} lacks {needle:?}"),
        }
        assert!(
            !row.2.contains(&d.token) && !row.3.contains(&d.token),
            "the token leaked: {row:?}"
        );
    }
    assert!(rows[..5].iter().all(|r| r.3.starts_with("tcp:127.0.0.1:")), "{rows:#?}");
    assert!(rows[5].3.starts_with("http:127.0.0.1:"), "{rows:#?}");

    // A graceful stop, then a restart: the answered changes are there.
    let st = d.terminate();
    assert!(st.success(), "taskd exited {st}:\n{}", d.log());
    assert_eq!(audit_rows(&d).len(), want.len());
    d.restart();
    let units = d.call("TaskUnit.List", json!({}));
    assert_eq!(names(&units), BTreeSet::from(["by-http".to_owned(), "kept".to_owned()]));

    // And after kill -9.
    d.call(
        "TaskUnit.Add",
        json!({"name": "durable", "command": ["true"], "every": "1h", "paused": true}),
    );
    d.call("TaskUnit.Delete", json!("kept"));
    d.kill9();
    d.restart();
    let units = d.call("TaskUnit.List", json!({}));
    assert_eq!(names(&units), BTreeSet::from(["by-http".to_owned(), "durable".to_owned()]));
    assert_eq!(d.call("TaskUnit.Get", json!("durable"))["definition"]["every"], "1h");
}

#[test]
fn a_silent_client_does_not_hold_up_others() {
    let d = TestDaemon::start();
    let _silent = TcpStream::connect(&d.addr).expect("connect");
    let v = d.call("Daemon.Status", json!({}));
    assert_eq!(v["auth"], "token");
}

#[test]
fn rpc_discover_describes_the_api_to_clients_that_logged_in() {
    let d = TestDaemon::start();
    let v = Raw::connect(&d.addr).call("rpc.discover", json!({}));
    assert_eq!(code(&v), i64::from(codes::UNAUTHORIZED), "{v}");
    let mut c = d.raw();
    let doc = result(&c.call("rpc.discover", json!({}))).clone();
    assert_eq!(doc["openrpc"], "1.3.2");
    let names: BTreeSet<String> = doc["methods"]
        .as_array()
        .expect("methods")
        .iter()
        .map(|m| m["name"].as_str().expect("name").to_owned())
        .collect();
    for m in ["TaskUnit.Add", "Run.Follow", "Events.Subscribe", "Auth.Login", "rpc.discover"] {
        assert!(names.contains(m), "{m} missing from {names:?}");
    }
}
