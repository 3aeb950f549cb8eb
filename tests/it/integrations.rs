//! SPEC §12 against a real daemon: the seed's REST task API driven by the seed's own Python
//! client, `/metrics` read by a Prometheus text parser, and systemd's notify protocol received
//! on a socket of the test's own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::agents::TestAgent;
use crate::common::{Raw, TestDaemon, http, make_private, wait_for};

/// Debian's Python, which the test command gives `requests` (python3-requests).
const PYTHON: &str = "/usr/bin/python3";

/// Whether Debian's Python with `requests` is here; outside CI a test without it skips loudly.
fn python_with_requests() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        ok || !in_ci,
        "CI is set but {PYTHON} cannot import requests: install python3-requests"
    );
    if !ok {
        eprintln!(
            "\n!!!!!!!! SKIPPING: {PYTHON} cannot import requests (python3-requests) !!!!!!!!\n"
        );
    }
    ok
}

/// Runs the seed's client (`tests/seed/seed000.py`) against `d`; its status and body.
fn seed000(d: &TestDaemon, args: &[&str]) -> (u16, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed");
    let out = Command::new(PYTHON)
        .arg(dir.join("seed000.py"))
        .args(args)
        .env("TASKD_URL", format!("http://{}", d.addr))
        .env("TASKD_TOKEN", &d.token)
        // curlify, which the seed's client prints requests with, if it is not installed.
        .env("PYTHONPATH", dir.join("stand-ins"))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "seed000.py failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its last two lines: the status code and the body.
    let mut lines = stdout.lines().rev();
    let body = lines.next().expect("body").to_string();
    let status = lines.next().and_then(|s| s.parse().ok()).expect("status line");
    (status, body)
}

fn whoami() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).expect("own account")
}

#[test]
fn the_seeds_python_client_adds_a_task_that_runs_on_its_hosts_and_lists_it_done() {
    if !python_with_requests() {
        return;
    }
    let d = TestDaemon::start();
    let _h1 = TestAgent::enroll(&d, "h1", "");
    let _h2 = TestAgent::enroll(&d, "h2", "");
    let account = whoami();
    let (status, body) = seed000(&d, &["add", "h1,h2", &account]);
    assert_eq!(status, 200, "{body}");
    let id: i64 = body.trim().parse().unwrap_or_else(|_| panic!("a bare id: {body}"));
    let name = format!("task-{id}");
    let unit = d.call("TaskUnit.Get", json!(name));
    assert_eq!(unit["definition"]["hosts"], json!(["h1", "h2"]), "{unit}");
    assert_eq!(unit["definition"]["user"], json!(account));
    assert_eq!(unit["definition"]["timeout"], json!("5s"));

    let task = wait_for("the task done", || {
        let (status, body) = seed000(&d, &["query"]);
        assert_eq!(status, 200, "{body}");
        let tasks: Vec<Value> = serde_json::from_str(&body).expect("a JSON array");
        tasks.into_iter().find(|t| t["id"] == id && t["done"] == 1)
    });
    assert_eq!(task["title"], "test01");
    assert_eq!(task["account"], json!(account));
    assert_eq!(task["timeout"], 5);
    assert_eq!(task["hosts"], json!(["h1", "h2"]));
    assert_eq!(task["script"], "#!/bin/bash\nss -ntlp");
    assert_eq!(task["creator"], "xiaoyi");
    assert!(task["created"].as_str().is_some_and(|c| c.parse::<jiff::Timestamp>().is_ok()));

    // One dispatch, each host's run of the script succeeded, with `ss`'s output.
    let list = d.call("Dispatch.List", json!({"unit": name}));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let dispatch = d.call("Dispatch.Get", list[0]["id"].clone());
    assert_eq!(dispatch["state"], "succeeded", "{dispatch}");
    let runs = dispatch["runs"].as_array().expect("runs");
    let mut hosts: Vec<&str> = runs.iter().map(|r| r["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, ["h1", "h2"]);
    for r in runs {
        let logs = d.call("Run.Logs", json!({"id": r["id"]}));
        assert!(logs["data"].as_str().is_some_and(|o| o.contains("State")), "{logs}");
    }
}

#[test]
fn a_refused_task_gets_its_reason_and_leaves_nothing_behind() {
    let d = TestDaemon::start();
    let auth = format!("Bearer {}", d.token);
    let h = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    let path = "/api/v1/task";
    // Without the token: 401, in the API's own error shape.
    let (status, body) = http(&d.addr, "GET", path, &[], "");
    assert_eq!(status, 401, "{body}");
    let err: Value = serde_json::from_str(&body).expect("JSON error");
    assert!(err["error"].as_str().is_some_and(|e| e.contains("token")), "{body}");
    for (body, why) in [
        (r#"{"script": "true", "hosts": "[\"nowhere\"]"}"#, "hosts: no agent is named"),
        (r#"{"script": "true", "hosts": "h1, h2"}"#, "hosts: a string must hold a JSON array"),
        (r#"{"hosts": ["local"]}"#, "script:"),
        (r#"{"script": "true", "hosts": ["local"], "timeout": "5"}"#, "timeout:"),
        ("{not json", "not JSON"),
    ] {
        let (status, answer) = http(&d.addr, "POST", path, &h, body);
        assert_eq!(status, 400, "{body}: {answer}");
        let err: Value = serde_json::from_str(&answer).expect("JSON error");
        assert!(err["error"].as_str().is_some_and(|e| e.contains(why)), "{body}: {answer}");
    }
    let (status, body) = http(&d.addr, "DELETE", path, &h, "");
    assert_eq!(status, 405, "{body}");
    let (status, body) = http(&d.addr, "GET", path, &h, "");
    assert_eq!((status, body.as_str()), (200, "[]"));
    assert_eq!(d.call("TaskUnit.List", json!({})), json!([]));
    // A good one after them gets the next id; ids are not reused.
    let (status, body) =
        http(&d.addr, "POST", path, &h, r#"{"script": "echo hi", "hosts": ["local"]}"#);
    assert_eq!(status, 200, "{body}");
    let id: i64 = body.parse().expect("a bare id");
    d.wait_unit(&format!("task-{id}"), "its run ended", |u| u["last_run"]["state"] == "succeeded");
    // A user's unit named as the next task would be costs that task its id, nothing more.
    let mine = format!("task-{}", id + 1);
    d.call("TaskUnit.Add", json!({"name": mine, "command": ["true"], "every": "1h"}));
    let (status, body) =
        http(&d.addr, "POST", path, &h, r#"{"script": "echo again", "hosts": ["local"]}"#);
    assert_eq!(status, 200, "{body}");
    let next: i64 = body.parse().expect("a bare id");
    assert!(next > id + 1, "{next}");
    d.wait_unit(&format!("task-{next}"), "its run ended", |u| {
        u["last_run"]["state"] == "succeeded"
    });
    assert_eq!(d.call("TaskUnit.Get", json!(mine))["definition"]["command"], json!(["true"]));
    let (_, listed) = http(&d.addr, "GET", path, &h, "");
    let ids: Vec<i64> = serde_json::from_str::<Vec<Value>>(&listed)
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![id, next]);
    // A body over the daemon's request limit (1 MiB): 413, nothing added.
    let huge = format!(r#"{{"script": "{}", "hosts": ["local"]}}"#, "x".repeat(2 << 20));
    let (status, answer) = http(&d.addr, "POST", path, &h, &huge);
    assert_eq!(status, 413, "{answer}");
    let (_, after) = http(&d.addr, "GET", path, &h, "");
    assert_eq!(after, listed);
}

#[test]
fn a_finished_tasks_unit_is_removed_after_keep_tasks_and_the_task_stays_listed() {
    let d = TestDaemon::start_with_config("keep_tasks = \"1s\"\n", &[]);
    let auth = format!("Bearer {}", d.token);
    let h = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    // A user's own unit with a task's name is never the janitor's.
    d.call("TaskUnit.Add", json!({"name": "task-999", "command": ["true"]}));
    d.wait_unit("task-999", "its run ended", |u| u["state"] == "done");
    let (status, body) = http(
        &d.addr,
        "POST",
        "/api/v1/task",
        &h,
        r#"{"script": "echo $TASKD_TASK_ID", "hosts": ["local"]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let name = format!("task-{body}");
    let u = d.wait_unit(&name, "its run ended", |u| u["state"] == "done");
    let out = d.call("Run.Logs", json!({"id": u["last_run"]["id"]}));
    assert_eq!(out["data"].as_str().map(str::trim), Some(body.as_str()), "{out}");
    let mut raw = d.raw();
    wait_for("the task's unit removed", || {
        raw.call("TaskUnit.Get", json!(name))["error"].is_object().then_some(())
    });
    let (_, listed) = http(&d.addr, "GET", "/api/v1/task", &h, "");
    let listed: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!((listed.len(), &listed[0]["done"]), (1, &json!(1)), "{listed:?}");
    assert_eq!(d.call("TaskUnit.Get", json!("task-999"))["state"], "done");
}

/// A scrape of `d`'s `/metrics` with `headers`, parsed by a Prometheus text parser.
fn scrape(d: &TestDaemon, headers: &[(&str, &str)]) -> prometheus_parse::Scrape {
    let (status, body) = http(&d.addr, "GET", "/metrics", headers, "");
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses")
}

/// The value of `metric` with `labels`, if the scrape has it.
fn value(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(b) => b.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[test]
fn metrics_count_runs_calls_and_units_and_need_the_token_unless_public() {
    let d = TestDaemon::start();
    let (status, _) = http(&d.addr, "GET", "/metrics", &[], "");
    assert_eq!(status, 401);
    let auth = format!("Bearer {}", d.token);
    let h = [("Authorization", auth.as_str())];
    let before = scrape(&d, &h);
    assert_eq!(value(&before, "taskd_runs_finished_total", &[("state", "succeeded")]), Some(0.0));
    assert_eq!(value(&before, "taskd_units", &[("state", "done")]), Some(0.0));

    d.call("TaskUnit.Add", json!({"name": "ok", "command": ["true"]}));
    d.call("TaskUnit.Add", json!({"name": "bad", "command": ["false"]}));
    d.call("TaskUnit.Add", json!({"name": "tick", "every": "1h", "command": ["true"]}));
    for name in ["ok", "bad"] {
        d.wait_unit(name, "its run ended", |u| u["last_run"]["ended_at"].is_string());
    }
    // A made-up method is counted, but not under its own name.
    let mut raw = d.raw();
    raw.call("No.Such", json!({}));

    let after = scrape(&d, &h);
    let v =
        |m: &str, l: &[(&str, &str)]| value(&after, m, l).unwrap_or_else(|| panic!("{m} {l:?}"));
    assert_eq!(v("taskd_runs_started_total", &[("trigger", "add")]), 2.0);
    assert_eq!(v("taskd_runs_finished_total", &[("state", "succeeded")]), 1.0);
    assert_eq!(v("taskd_runs_finished_total", &[("state", "failed")]), 1.0);
    assert_eq!(v("taskd_run_duration_seconds", &[]), 2.0, "two durations observed");
    assert_eq!(v("taskd_units", &[("state", "done")]), 2.0);
    assert_eq!(v("taskd_units", &[("state", "waiting")]), 1.0);
    assert_eq!(v("taskd_rpc_calls_total", &[("method", "TaskUnit.Add"), ("outcome", "ok")]), 3.0);
    assert_eq!(v("taskd_rpc_calls_total", &[("method", "other"), ("outcome", "error")]), 1.0);
    assert!(after.samples.iter().all(|s| s.labels.get("method") != Some("No.Such")));
    assert!(v("taskd_store_commit_seconds", &[]) >= 3.0, "commits observed");
    assert_eq!(v("taskd_agents", &[("state", "connected")]), 0.0);

    // With --metrics-public, no token is needed; the browser rules still hold.
    let p = TestDaemon::start_with(&["--metrics-public"]);
    scrape(&p, &[]);
    let (status, _) = http(&p.addr, "GET", "/metrics", &[("Origin", "http://evil.example")], "");
    assert_eq!(status, 403);
    // Other paths still need the token.
    let (status, _) = http(&p.addr, "GET", "/api/v1/task", &[], "");
    assert_eq!(status, 401);
}

#[test]
fn under_systemd_the_daemon_is_ready_once_serving_keeps_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    make_private(dir.path());
    let state = dir.path().join("state");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskd"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "100000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        // One state per line (sd-notify ends each with a newline).
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    };
    let ready = loop {
        let m = recv();
        if m.contains("READY=1") {
            break m;
        }
        assert_eq!(m, "WATCHDOG=1", "only the watchdog comes before READY");
    };
    assert!(ready.contains("STATUS=serving on 127.0.0.1:"), "{ready}");
    // Once READY is said: the token and the address are written, the port accepts the token.
    let token = std::fs::read_to_string(state.join("token")).expect("token written");
    let addr = std::fs::read_to_string(state.join("address")).expect("address written");
    let mut raw = Raw::connect(addr.trim());
    assert_eq!(raw.call("Auth.Login", json!(token.trim()))["result"], true);
    // WatchdogSec=100ms: pinged every 50 ms.
    let mut pings = 0;
    while pings < 3 {
        if recv() == "WATCHDOG=1" {
            pings += 1;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    while !recv().contains("STOPPING=1") {}
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_systemd_unit_files_are_valid_and_let_taskd_stop_its_own_runs() {
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let have = Command::new("systemd-analyze").arg("--version").output().is_ok();
    assert!(have || !in_ci, "CI is set but systemd-analyze is missing: install systemd");
    if !have {
        eprintln!("\n!!!!!!!! SKIPPING: no systemd-analyze (Debian: systemd) !!!!!!!!\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    for (file, kind) in [("taskd.service", "Type=notify"), ("taskd-agent.service", "Type=exec")] {
        let text = std::fs::read_to_string(contrib.join(file)).unwrap();
        for line in [kind, "KillMode=mixed", "NoNewPrivileges=yes", "StateDirectoryMode=0700"] {
            assert!(text.lines().any(|l| l == line), "{file}: {line}");
        }
        // The binary where the test built it, so that verify finds it.
        let local = dir.path().join(file);
        std::fs::write(&local, text.replace("/usr/local/bin/taskd", env!("CARGO_BIN_EXE_taskd")))
            .unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&local).output().unwrap();
        // It exits 0 on many errors: what it prints about the file is the verdict.
        let said = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let ours: Vec<&str> = said.lines().filter(|l| l.contains(file)).collect();
        assert!(out.status.success() && ours.is_empty(), "{file}: {said}");
    }
}

/// How a webhook receiver answers one request.
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    /// Reads the request and never answers (until the test ends).
    Hang,
}

/// A webhook receiver on loopback: answers the requests about each run in turn as `answers`
/// says (the last one for every later request), and keeps every request body.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start(answers: Vec<Answer>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook?x=1", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            let mut hung = Vec::new();
            let mut seen = std::collections::HashMap::<i64, usize>::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                let mut line = String::new();
                let head_ok = loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break false;
                    }
                    let l = line.to_ascii_lowercase();
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break true;
                    }
                };
                if !head_ok {
                    continue;
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let n = seen.entry(body["run"]["id"].as_i64().unwrap_or(0)).or_default();
                let i = *n;
                *n += 1;
                kept.lock().unwrap().push(body);
                match answers[i.min(answers.len() - 1)] {
                    Answer::Status(code) => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                    }
                    Answer::Hang => hung.push(conn),
                }
            }
        });
        Receiver { url, bodies }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

#[test]
fn an_endpoint_that_hangs_holds_up_only_its_own_webhooks() {
    let d = TestDaemon::start();
    let hangs = Receiver::start(vec![Answer::Hang]);
    let ok = Receiver::start(vec![Answer::Status(200)]);
    let on = json!(["succeeded"]);
    d.call(
        "TaskUnit.Add",
        json!({"name": "to-hang", "command": ["true"], "notify": [{"url": hangs.url, "on": on}]}),
    );
    let u = d.wait_unit("to-hang", "its first run", |u| u["last_run"]["state"] == "succeeded");
    // More ended runs than the notifier sends at once, all to the endpoint that hangs (each
    // of their attempts takes 5 s, five of them).
    let mut hanging = vec![u["last_run"]["id"].clone()];
    for _ in 0..30 {
        let r = d.call("TaskUnit.Start", json!("to-hang"));
        d.wait_run_end(r["id"].as_i64().unwrap());
        hanging.push(r["id"].clone());
    }
    d.call(
        "TaskUnit.Add",
        json!({"name": "to-ok", "command": ["true"], "notify": [{"url": ok.url, "on": on}]}),
    );
    let u = d.wait_unit("to-ok", "its run ended", |u| u["last_run"]["state"] == "succeeded");
    // Delivered while every run before it is still waiting on the endpoint that hangs.
    let record = notified(&d, &u["last_run"]["id"]);
    assert_eq!(record[0]["status"], 200, "{record:?}");
    for id in hanging {
        let r = d.call("Run.Get", id);
        assert!(r["notified"].is_null(), "{r}");
    }
    assert!(hangs.bodies().len() <= 4, "at most 4 requests at once to one endpoint");
}

/// The `notified` record of run `id`, once it is there.
fn notified(d: &TestDaemon, id: &Value) -> Vec<Value> {
    let mut raw = d.raw();
    wait_for("the run's webhooks recorded", || {
        let r = raw.call("Run.Get", id.clone());
        r["result"]["notified"].as_array().cloned()
    })
}

#[test]
fn webhooks_are_retried_recorded_on_the_run_and_never_hold_up_runs() {
    let d = TestDaemon::start();
    let flaky =
        Receiver::start(vec![Answer::Status(500), Answer::Status(503), Answer::Status(200)]);
    let hangs = Receiver::start(vec![Answer::Hang, Answer::Status(204)]);
    let wrong = Receiver::start(vec![Answer::Status(404)]);
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let refused = format!("http://{closed}/");
    let on_fail = json!(["failed"]);
    d.call(
        "TaskUnit.Add",
        json!({"name": "fails", "command": ["sh", "-c", "echo out; echo err >&2; exit 3"],
               "notify": [{"url": flaky.url, "on": on_fail}, {"url": hangs.url},
                          {"url": wrong.url}, {"url": refused}]}),
    );
    let first = d.wait_unit("fails", "its run ended", |u| u["last_run"]["state"] == "failed");
    let run = first["last_run"]["id"].clone();
    // The unit goes on while its webhooks are being tried (one hangs for 5 s).
    for _ in 0..3 {
        let r = d.call("TaskUnit.Start", json!("fails"));
        let ended = d.wait_run_end(r["id"].as_i64().unwrap());
        assert_eq!(ended["state"], "failed");
    }
    let still = d.call("Run.Get", run.clone());
    assert!(still["notified"].is_null(), "the first run's webhooks are still being tried: {still}");
    let record = notified(&d, &run);
    let by_url = |u: &str| record.iter().find(|o| o["url"] == u).cloned().expect(u);
    let o = by_url(&flaky.url);
    assert_eq!((o["attempts"].as_u64(), o["status"].as_u64()), (Some(3), Some(200)), "{o}");
    let o = by_url(&hangs.url);
    assert_eq!((o["attempts"].as_u64(), o["status"].as_u64()), (Some(2), Some(204)), "{o}");
    let o = by_url(&wrong.url);
    assert_eq!((o["attempts"].as_u64(), o["status"].as_u64()), (Some(1), Some(404)), "{o}");
    let o = by_url(&refused);
    assert_eq!(o["attempts"].as_u64(), Some(5), "{o}");
    assert!(o["error"].as_str().is_some_and(|e| e.contains("connect")), "{o}");
    // What a receiver got: the unit, the run as Run.Get shows it, the end of its output.
    let body = flaky.bodies()[0].clone();
    assert_eq!(body["unit"], "fails");
    assert_eq!(body["run"]["id"], run);
    assert_eq!(
        (body["run"]["state"].as_str(), body["run"]["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
    let output = body["output"].as_str().unwrap();
    assert!(output.contains("out") && output.contains("err"), "{output}");

    // A run that succeeds notifies nothing by default (failed, timed_out, lost): the receiver
    // gets the second run's failure, and never the first run's success.
    let ok = Receiver::start(vec![Answer::Status(200)]);
    let flag = tempfile::tempdir().unwrap();
    let script = format!("test -e {0}/ran && exit 1; touch {0}/ran", flag.path().display());
    d.call(
        "TaskUnit.Add",
        json!({"name": "fine", "command": ["sh", "-c", script], "notify": [{"url": ok.url}]}),
    );
    let u = d.wait_unit("fine", "its run ended", |u| u["last_run"]["state"] == "succeeded");
    let succeeded = u["last_run"]["id"].clone();
    assert_eq!(
        u["definition"]["notify"],
        json!([{"url": ok.url, "on": ["failed", "timed_out", "lost"]}])
    );
    let r = d.call("TaskUnit.Start", json!("fine"));
    let failed = r["id"].clone();
    assert_eq!(d.wait_run_end(failed.as_i64().unwrap())["state"], "failed");
    assert_eq!(notified(&d, &failed)[0]["status"], 200);
    let runs: Vec<Value> = ok.bodies().iter().map(|b| b["run"]["id"].clone()).collect();
    assert_eq!(runs, vec![failed]);
    assert!(d.call("Run.Get", succeeded)["notified"].is_null());
    // A bad webhook is refused at Add, naming the field.
    let mut raw = d.raw();
    for (notify, field) in [
        (json!([{"url": "ftp://x/"}]), "notify[0].url"),
        (json!([{"url": "http://x/", "on": ["running"]}]), "notify[0].on"),
        (json!([{"url": "http://x/", "when": ["failed"]}]), "notify"),
        (json!("http://x/"), "notify"),
    ] {
        let v =
            raw.call("TaskUnit.Add", json!({"name": "bad", "command": ["true"], "notify": notify}));
        let msg = v["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.starts_with(field), "{notify}: {v}");
    }
}
