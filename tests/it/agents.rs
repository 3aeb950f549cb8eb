//! Agents: real `taskd agent` processes (the built binary, each with its own state directory
//! and name) against a real daemon, driven with `taskctl` and raw calls.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::common::{Raw, TestDaemon, alive, http_post, make_private, stop_gracefully, wait_for};

/// A `taskd agent` under test.
pub struct TestAgent {
    name: String,
    dir: tempfile::TempDir,
    server: String,
    labels: String,
    child: Option<Child>,
    /// The network namespace it runs in, if not the test's.
    netns: Option<String>,
    /// More arguments of `taskd agent`.
    extra: Vec<String>,
}

impl TestAgent {
    /// Enrolls a new agent `name` with `labels` (`k=v,…`) on `d`'s daemon and starts it.
    pub fn enroll(d: &TestDaemon, name: &str, labels: &str) -> TestAgent {
        Self::enroll_in(d, name, labels, None)
    }

    /// As [`TestAgent::enroll`], with more arguments of `taskd agent` (`--allowed-dirs D`).
    pub fn enroll_with(d: &TestDaemon, name: &str, extra: &[&str]) -> TestAgent {
        let mut a = Self::new(d, &d.addr, name, "", None);
        a.extra = extra.iter().map(|s| s.to_string()).collect();
        a.join(d);
        a
    }

    /// As [`TestAgent::enroll`], the agent running in network namespace `netns`.
    pub fn enroll_in(d: &TestDaemon, name: &str, labels: &str, netns: Option<&str>) -> TestAgent {
        Self::enroll_listing(d, &d.addr, name, labels, netns)
    }

    /// As [`TestAgent::enroll`], the agent given `servers` (`ADDR[,ADDR…]`) to connect to.
    pub fn enroll_listing(
        d: &TestDaemon,
        servers: &str,
        name: &str,
        labels: &str,
        netns: Option<&str>,
    ) -> TestAgent {
        let mut a = Self::new(d, servers, name, labels, netns);
        a.join(d);
        a
    }

    fn new(_d: &TestDaemon, servers: &str, name: &str, labels: &str, netns: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_private(dir.path());
        TestAgent {
            name: name.into(),
            dir,
            server: servers.into(),
            labels: labels.into(),
            child: None,
            netns: netns.map(str::to_string),
            extra: Vec::new(),
        }
    }

    /// Enrolls it with a join token of `d` and waits until it is connected.
    fn join(&mut self, d: &TestDaemon) {
        let token = d.call("Agent.JoinToken", json!({}))["token"].as_str().unwrap().to_string();
        self.spawn(Some(&token));
        wait_connected(d, &self.name);
    }

    fn spawn(&mut self, join: Option<&str>) {
        let mut cmd = match &self.netns {
            None => Command::new(env!("CARGO_BIN_EXE_taskd")),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_taskd")]);
                c
            }
        };
        cmd.args(["agent", "--server", &self.server, "--name", &self.name])
            .arg("--state-dir")
            .arg(self.dir.path());
        if !self.labels.is_empty() {
            cmd.args(["--labels", &self.labels]);
        }
        if let Some(t) = join {
            cmd.args(["--join", t]);
        }
        cmd.args(&self.extra);
        let log = std::fs::File::create(self.log_path()).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().expect("spawn taskd agent"));
    }

    /// An agent of `d` named `name`, not started, with an empty state directory.
    fn unstarted(d: &TestDaemon, name: &str) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        make_private(dir.path());
        TestAgent {
            name: name.into(),
            dir,
            server: d.addr.clone(),
            labels: String::new(),
            child: None,
            netns: None,
            extra: Vec::new(),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Starts it again (its credential is in its state directory).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn(None);
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn credential(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("credential")).unwrap().trim().to_string()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_gracefully(c);
        }
    }
}

fn agent_state(d: &TestDaemon, name: &str) -> String {
    // Not enrolled yet: no state.
    let v = d.raw().call("Agent.Get", json!(name));
    v["result"]["state"].as_str().unwrap_or_default().to_string()
}

pub fn wait_connected(d: &TestDaemon, name: &str) {
    wait_for(&format!("agent {name} to connect"), || {
        (agent_state(d, name) == "connected").then_some(())
    });
}

/// Polls `Run.Get` until `cond` holds.
pub fn wait_run(d: &TestDaemon, id: i64, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let mut c = d.raw();
    wait_for(what, || {
        let r = c.call("Run.Get", json!(id)).get("result").cloned()?;
        cond(&r).then_some(r)
    })
}

/// The pid a run wrote to `file`, once it did.
fn pid_in(file: &Path) -> i32 {
    wait_for("the run to write its pid", || std::fs::read_to_string(file).ok()?.trim().parse().ok())
}

fn output(o: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn taskctl_exec_runs_on_each_selected_host_with_its_output_and_exit_code() {
    let d = TestDaemon::start();
    let _web = TestAgent::enroll(&d, "web-1", "role=web");
    let _db = TestAgent::enroll(&d, "db-1", "role=db");
    let agents = d.taskctl(&["agents"]);
    let (out, _) = output(&agents);
    assert!(out.contains("web-1") && out.contains("db-1") && out.contains("connected"), "{out}");

    let o = d.taskctl(&["exec", "--hosts", "*", "--", "sh", "-c", "echo out; echo err >&2"]);
    let (out, err) = output(&o);
    assert!(o.status.success(), "{out}\n{err}");
    for host in ["web-1", "db-1"] {
        assert!(out.contains(&format!("{host}: out\n")), "{out}");
        assert!(out.contains(&format!("{host}: err\n")), "{out}");
    }
    assert!(err.contains("2 hosts: 2 succeeded"), "{err}");

    // A selector picks its hosts; a failure is the exit code and the summary.
    let o = d.taskctl(&["exec", "--hosts", "role=db", "--", "sh", "-c", "echo db; exit 3"]);
    let (out, err) = output(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert_eq!(out, "db-1: db\n");
    assert!(err.contains("db-1: run") && err.contains("failed (exit 3)"), "{err}");
    assert!(err.contains("1 hosts: 1 failed"), "{err}");

    // Each exec leaves an ordinary unit and dispatch behind.
    let list = d.call("Dispatch.List", json!({}));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["state"], "failed");
    assert_eq!(list[1]["state"], "succeeded");
    assert_eq!(list[1]["counts"], json!({"succeeded": 2}));
    let (shown, _) = output(&d.taskctl(&["dispatch", &list[1]["id"].to_string()]));
    assert!(shown.contains("2/2 done: 2 succeeded"), "{shown}");

    // A name that is no agent is refused at Add, naming the field.
    let v =
        d.raw().call("TaskUnit.Add", json!({"name": "x", "command": ["true"], "hosts": ["nope"]}));
    assert_eq!(v["error"]["data"]["field"], "hosts", "{v}");
}

#[test]
fn join_tokens_are_spent_once_and_agent_credentials_serve_only_the_agent_protocol() {
    let d = TestDaemon::start();
    let token =
        d.call("Agent.JoinToken", json!({"ttl": "10m"}))["token"].as_str().unwrap().to_string();
    let mut anon = Raw::connect(&d.addr);
    let joined = anon.call("AgentLink.Join", json!({"token": token, "name": "h1"}));
    let cred = joined["result"]["credential"].as_str().expect("a credential").to_string();
    let again = Raw::connect(&d.addr).call("AgentLink.Join", json!({"token": token, "name": "h2"}));
    let msg = again["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("spent"), "{again}");
    assert_eq!(d.call("Agent.List", json!({})).as_array().unwrap().len(), 1);

    // The credential logs in, and can call no client method.
    let mut agent = Raw::connect(&d.addr);
    assert_eq!(agent.call("Auth.Login", json!(cred))["result"], true);
    for (method, arg) in [
        ("TaskUnit.List", json!({})),
        ("TaskUnit.Add", json!({"name": "evil", "command": ["true"]})),
        ("Run.List", json!({})),
        ("Agent.JoinToken", json!({})),
    ] {
        let v = agent.call(method, arg);
        assert_eq!(v["error"]["code"], -32050, "{method}: {v}");
    }
    assert_eq!(agent.call("AgentLink.Heartbeat", json!(null))["result"], true);
    // And the daemon's token cannot speak for an agent.
    let v = d.raw().call("AgentLink.Heartbeat", json!(null));
    assert_eq!(v["error"]["code"], -32050, "{v}");
    assert!(d.call("TaskUnit.List", json!({})).as_array().is_some_and(|l| l.is_empty()));

    // Over HTTP (and so WebSocket) the credential is a bearer token, with the same limits.
    let auth = format!("Bearer {cred}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    let call = |method: &str| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": [null]});
        let (status, body) = http_post(&d.addr, &headers, &body.to_string());
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    assert_eq!(call("AgentLink.Heartbeat")["result"], true);
    assert_eq!(call("TaskUnit.List")["error"]["code"], -32050);
    // Nor the REST task API or the metrics.
    for (method, path) in [("GET", "/api/v1/task"), ("POST", "/api/v1/task"), ("GET", "/metrics")] {
        let body = r#"{"script": "id", "hosts": ["local"]}"#;
        let (status, answer) = crate::common::http(&d.addr, method, path, &headers, body);
        assert_eq!(status, 401, "{method} {path}: {answer}");
    }

    // Revoked: refused from then on.
    let mut a = TestAgent::enroll(&d, "h3", "");
    let cred3 = a.credential();
    // A second connection logged in with it, never attached: cut off by the revocation too.
    let mut other = Raw::connect(&d.addr);
    assert_eq!(other.call("Auth.Login", json!(cred3))["result"], true);
    assert_eq!(other.call("AgentLink.Heartbeat", json!(null))["result"], true);
    let r = d.taskctl(&["agents", "revoke", "h3"]);
    assert!(r.status.success(), "{:?}", output(&r));
    assert_eq!(agent_state(&d, "h3"), "revoked");
    let v = Raw::connect(&d.addr).call("Auth.Login", json!(cred3));
    assert_eq!(v["error"]["code"], -32050, "{v}");
    let v = other.call("AgentLink.Heartbeat", json!(null));
    assert_eq!(v["error"]["code"], -32050, "{v}");
    a.kill9();
}

#[test]
fn a_server_stopped_gracefully_leaves_runs_on_agents_running() {
    let mut d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "g1", "");
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "steady", "command": ["sh", "-c", "echo a; sleep 2; echo b"], "hosts": ["g1"]}),
    );
    let run = info["last_run"]["id"].as_i64().unwrap();
    wait_run(&d, run, "the run to start", |r| r["pid"].is_i64());
    assert!(d.terminate().success());
    d.restart_on_same_port();
    let ended = d.wait_run_end(run);
    assert_eq!(ended["state"], "succeeded", "{ended}");
    assert_eq!(d.call("Run.Logs", json!({"id": run}))["data"], "a\nb\n");
}

#[test]
fn a_batch_runs_hosts_in_turn_and_tolerance_pauses_the_rest() {
    let d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "a", "");
    let _b = TestAgent::enroll(&d, "b", "");
    let _c = TestAgent::enroll(&d, "c", "");
    d.call(
        "TaskUnit.Add",
        json!({"name": "rolling", "command": ["sh", "-c", "sleep 0.2"], "hosts": ["c", "a", "b"], "batch": 1}),
    );
    let d1 = d.call("Dispatch.List", json!({"unit": "rolling"}))[0]["id"].as_i64().unwrap();
    let done = wait_for("the dispatch to end", || {
        let g = d.call("Dispatch.Get", json!(d1));
        (g["state"] == "succeeded").then_some(g)
    });
    let runs = done["runs"].as_array().unwrap();
    let hosts: Vec<&str> = runs.iter().map(|r| r["host"].as_str().unwrap()).collect();
    assert_eq!(hosts, ["c", "a", "b"], "as listed");
    for pair in runs.windows(2) {
        let (end, start) =
            (pair[0]["ended_at"].as_str().unwrap(), pair[1]["started_at"].as_str().unwrap());
        let (end, start): (jiff::Timestamp, jiff::Timestamp) =
            (end.parse().unwrap(), start.parse().unwrap());
        assert!(start >= end, "one host at a time: {pair:?}");
    }

    // Tolerance 0: the first failure pauses the dispatch; the hosts after it stay queued.
    d.call(
        "TaskUnit.Add",
        json!({"name": "careful", "command": ["false"], "hosts": ["*"], "batch": 1, "tolerance": 0}),
    );
    let d2 = d.call("Dispatch.List", json!({"unit": "careful"}))[0]["id"].as_i64().unwrap();
    let paused = wait_for("the dispatch to pause", || {
        let g = d.call("Dispatch.Get", json!(d2));
        (g["state"] == "paused").then_some(g)
    });
    assert_eq!(paused["counts"], json!({"failed": 1, "queued": 2}), "{paused}");
    let wait_state = |state: &str, counts: Value| {
        wait_for(&format!("the dispatch to be {state} with {counts}"), || {
            let g = d.call("Dispatch.Get", json!(d2));
            (g["state"] == state && g["counts"] == counts).then_some(g)
        })
    };
    // Resumed: the next host runs, fails, and pauses it again.
    let o = d.taskctl(&["dispatch", "resume", &d2.to_string()]);
    assert!(o.status.success(), "{:?}", output(&o));
    wait_state("paused", json!({"failed": 2, "queued": 1}));
    // Cancelled: the host still waiting ends cancelled.
    let o = d.taskctl(&["dispatch", "cancel", &d2.to_string()]);
    assert!(o.status.success(), "{:?}", output(&o));
    wait_state("cancelled", json!({"failed": 2, "cancelled": 1}));

    // Redo: a failed host runs again, as a new attempt, and the dispatch's outcome follows.
    let tmp = tempfile::tempdir().unwrap();
    let flag = tmp.path().join("ready");
    let cmd = format!("test -e {}", flag.display());
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "flaky", "command": ["sh", "-c", cmd], "hosts": ["a", "b"]}),
    );
    let d3 = info["last_run"]["dispatch"].as_i64().unwrap();
    let failed = wait_for("the dispatch to fail", || {
        let g = d.call("Dispatch.Get", json!(d3));
        (g["state"] == "failed").then_some(g)
    });
    let first = failed["runs"][0]["id"].as_i64().unwrap();
    let second = failed["runs"][1]["id"].as_i64().unwrap();
    std::fs::write(&flag, "").unwrap();
    let o = d.taskctl(&["redo", &first.to_string()]);
    assert!(o.status.success(), "{:?}", output(&o));
    let again = wait_for("the redo to end", || {
        let g = d.call("Dispatch.Get", json!(d3));
        (g["runs"].as_array()?.len() == 3 && g["state"] != "running").then_some(g)
    });
    assert_eq!(again["runs"][2]["attempt"], 2, "{again}");
    // Only a host's newest run is done again: never two of one host at once.
    let v = d.raw().call("Run.Redo", json!(first));
    assert_eq!(v["error"]["code"], -32057, "{v}");
    assert_eq!(again["runs"][2]["host"], "a", "{again}");
    assert_eq!(again["state"], "failed", "b still failed: {again}");
    // Ignoring b's failure decides the outcome again.
    let o = d.taskctl(&["ignore", &second.to_string()]);
    assert!(o.status.success(), "{:?}", output(&o));
    let g = d.call("Dispatch.Get", json!(d3));
    assert_eq!(
        (g["state"].as_str(), &g["counts"]),
        (Some("succeeded"), &json!({"ignored": 1, "succeeded": 1}))
    );
}

#[test]
fn a_killed_agent_reports_its_run_lost_and_leaves_no_process() {
    let d = TestDaemon::start();
    let mut a = TestAgent::enroll(&d, "k1", "");
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    let cmd = format!("echo $$ > {}; echo started; exec sleep 300", pidfile.display());
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "long", "command": ["sh", "-c", cmd], "hosts": ["k1"]}),
    );
    let run = info["last_run"]["id"].as_i64().unwrap();
    let pid = pid_in(&pidfile);
    // Live output reaches the server's log while the run goes on.
    wait_for("the run's output on the server", || {
        let v = d.call("Run.Logs", json!({"id": run}));
        (v["data"] == "started\n").then_some(())
    });
    a.kill9();
    assert!(alive(pid), "the run outlives its agent's crash, for now");
    a.restart();
    let ended = d.wait_run_end(run);
    assert_eq!(ended["state"], "lost", "{ended}");
    assert_eq!(ended["reason"], "agent restarted", "{ended}");
    wait_for("the run's process to be stopped", || (!alive(pid)).then_some(()));
    // The agent starts nothing twice: it is connected, and the run stays lost.
    wait_connected(&d, "k1");
    assert_eq!(d.call("Run.Get", json!(run))["state"], "lost");
}

#[test]
fn a_frozen_agent_keeps_its_run_within_lost_after_and_loses_it_beyond() {
    let d = TestDaemon::start_with(&["--agent-timeout", "1s", "--lost-after", "3s"]);
    let a = TestAgent::enroll(&d, "f1", "");
    // Back in time: the run goes on and ends with its real outcome.
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "brief", "command": ["sh", "-c", "sleep 1.5; echo done"], "hosts": ["f1"]}),
    );
    let run = info["last_run"]["id"].as_i64().unwrap();
    wait_run(&d, run, "the run to start", |r| r["pid"].is_i64());
    assert_eq!(d.call("Run.Get", json!(run))["state"], "running");
    kill(a.pid(), Signal::SIGSTOP).unwrap();
    wait_run(&d, run, "the run to be unreachable", |r| r["host_state"] == "unreachable");
    kill(a.pid(), Signal::SIGCONT).unwrap();
    let ended = d.wait_run_end(run);
    assert_eq!(ended["state"], "succeeded", "{ended}");
    assert_eq!(d.call("Run.Logs", json!({"id": run}))["data"], "done\n");

    // Away too long: lost, and stopped when the agent comes back.
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    let cmd = format!("echo $$ > {}; exec sleep 300", pidfile.display());
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "stuck", "command": ["sh", "-c", cmd], "hosts": ["f1"]}),
    );
    let run = info["last_run"]["id"].as_i64().unwrap();
    let pid = pid_in(&pidfile);
    kill(a.pid(), Signal::SIGSTOP).unwrap();
    let ended = d.wait_run_end(run);
    assert_eq!(
        (ended["state"].as_str(), ended["reason"].as_str()),
        (Some("lost"), Some("agent unreachable"))
    );
    assert!(alive(pid));
    kill(a.pid(), Signal::SIGCONT).unwrap();
    wait_for("the lost run's process to be stopped", || (!alive(pid)).then_some(()));
    assert_eq!(d.call("Run.Get", json!(run))["state"], "lost", "a late result changes nothing");
}

#[test]
fn a_server_killed_mid_dispatch_ends_each_run_exactly_once() {
    let mut d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "s1", "");
    let _b = TestAgent::enroll(&d, "s2", "");
    let tmp = tempfile::tempdir().unwrap();
    let marks = tmp.path().display().to_string();
    let cmd = format!("echo before; touch {marks}/$TASKD_RUN_ID; sleep 1.5; echo after");
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "span", "command": ["sh", "-c", cmd], "hosts": ["*"]}),
    );
    let dispatch = info["last_run"]["dispatch"].as_i64().unwrap();
    wait_for("both runs to start", || {
        (std::fs::read_dir(tmp.path()).ok()?.count() == 2).then_some(())
    });
    d.kill9();
    d.restart_on_same_port();
    let done = wait_for("the dispatch to end", || {
        let g = d.call("Dispatch.Get", json!(dispatch));
        (g["state"] != "running").then_some(g)
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    for r in done["runs"].as_array().unwrap() {
        let log = d.call("Run.Logs", json!({"id": r["id"]}));
        assert_eq!(log["data"], "before\nafter\n", "output on both sides of the restart: {r}");
    }
    // Each run ended once: one run.finished event per run.
    let mut sub = d.raw();
    let first = sub.call("Events.Subscribe", json!({"after_seq": 0}));
    assert!(first.get("result").is_some(), "{first}");
    let mut finished = std::collections::BTreeMap::<i64, u32>::new();
    loop {
        let n = sub.recv();
        let e = &n["params"]["result"];
        if e["kind"] == "run.finished" {
            *finished.entry(e["run"].as_i64().unwrap()).or_default() += 1;
        }
        if e["kind"] == "dispatch.finished" {
            break;
        }
    }
    assert_eq!(finished.values().copied().collect::<Vec<_>>(), [1, 1], "{finished:?}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2, "nothing started twice");
}

#[test]
fn taskctl_logs_follows_a_run_on_an_agent() {
    let d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "l1", "");
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "chatty", "command": ["sh", "-c", "echo one; sleep 0.5; echo two >&2; sleep 0.5; echo three"], "hosts": ["l1"]}),
    );
    let run = info["last_run"]["id"].as_i64().unwrap().to_string();
    let o = d.taskctl(&["logs", "-f", &run]);
    let (out, err) = output(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out, "one\ntwo\nthree\n");
}

#[test]
fn over_tls_an_agent_trusts_the_server_by_the_fingerprint_in_its_join_token() {
    let d = TestDaemon::start_with(&["--tls", "auto"]);
    let token = d.call("Agent.JoinToken", json!({}))["token"].as_str().unwrap().to_string();
    let (_, fp) = token.split_once("@sha256:").expect("the token carries the fingerprint");
    assert_eq!(fp.len(), 64, "{token}");
    let a = TestAgent::enroll(&d, "t1", "");
    assert_eq!(
        std::fs::read_to_string(a.dir.path().join("server-fingerprint")).unwrap().trim(),
        fp,
        "kept for later connections"
    );
    let o = d.taskctl(&["exec", "--hosts", "t1", "--", "echo", "sealed"]);
    assert_eq!(output(&o).0, "t1: sealed\n", "{:?}", output(&o));
    // taskctl over TLS: the right fingerprint, then a wrong one (refused, both named).
    let o = d.taskctl(&["--fingerprint", fp, "exec", "--hosts", "t1", "--", "echo", "again"]);
    assert_eq!(output(&o).0, "t1: again\n", "{:?}", output(&o));
    let o = d.taskctl(&["--fingerprint", fp, "agents"]);
    assert!(output(&o).0.contains("t1"), "{:?}", output(&o));
    let wrong = "1".repeat(64);
    let o = d.taskctl(&["--fingerprint", &wrong, "agents"]);
    let (_, err) = output(&o);
    assert!(!o.status.success() && err.contains(&wrong) && err.contains(fp), "{err}");

    // A token whose fingerprint is not the server's: refused, and the log says why.
    let token = d.call("Agent.JoinToken", json!({}))["token"].as_str().unwrap().to_string();
    let (secret, _) = token.split_once("@sha256:").unwrap();
    let forged = format!("{secret}@sha256:{}", "0".repeat(64));
    let mut b = TestAgent::unstarted(&d, "t2");
    b.spawn(Some(&forged));
    let log = wait_for("the agent to refuse the certificate", || {
        let log = std::fs::read_to_string(b.log_path()).ok()?;
        log.contains("fingerprint").then_some(log)
    });
    assert!(log.contains(&format!("sha256:{}", "0".repeat(64))) && log.contains(fp), "{log}");
    assert_eq!(agent_state(&d, "t2"), "", "never enrolled");
    b.kill9();
}

#[test]
fn an_agent_whose_join_token_is_refused_stops_and_says_why() {
    let d = TestDaemon::start();
    let token = d.call("Agent.JoinToken", json!({}))["token"].as_str().unwrap().to_string();
    // Spent by another agent first: no retry can make it good again.
    let spent = Raw::connect(&d.addr).call("AgentLink.Join", json!({"token": token, "name": "h1"}));
    assert!(spent["result"]["credential"].is_string(), "{spent}");
    let mut b = TestAgent::unstarted(&d, "h2");
    b.spawn(Some(&token));
    let status = wait_for("the agent to stop", || b.child.as_mut()?.try_wait().unwrap());
    b.child = None;
    assert!(!status.success());
    let log = std::fs::read_to_string(b.log_path()).unwrap();
    assert!(log.contains("spent already") && log.contains("join-token"), "{log}");
    assert!(!log.contains("ErrorObject"), "said in words: {log}");
    assert_eq!(agent_state(&d, "h2"), "", "never enrolled");
}

#[test]
fn a_failed_host_is_retried_on_the_same_host_after_the_back_off() {
    let d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "r1", "");
    let _b = TestAgent::enroll(&d, "r2", "");
    // Fails the first time on each host, succeeds the second.
    let cmd = "test \"$TASKD_ATTEMPT\" = 2";
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "twice", "command": ["sh", "-c", cmd], "hosts": ["r1", "r2"], "retries": 1, "backoff": "1s..1s"}),
    );
    let id = info["last_run"]["dispatch"].as_i64().unwrap();
    let done = wait_for("the dispatch to end", || {
        let g = d.call("Dispatch.Get", json!(id));
        (g["state"] != "running").then_some(g)
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    let runs = done["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{done}");
    for host in ["r1", "r2"] {
        let of: Vec<&Value> = runs.iter().filter(|r| r["host"] == host).collect();
        assert_eq!(
            (of[0]["state"].as_str(), of[1]["state"].as_str()),
            (Some("failed"), Some("succeeded"))
        );
        assert_eq!(
            (of[1]["attempt"].as_i64(), of[1]["trigger"].as_str()),
            (Some(2), Some("retry"))
        );
        let ended: jiff::Timestamp = of[0]["ended_at"].as_str().unwrap().parse().unwrap();
        let again: jiff::Timestamp = of[1]["started_at"].as_str().unwrap().parse().unwrap();
        assert!(
            again.duration_since(ended) >= jiff::SignedDuration::from_millis(900),
            "backed off"
        );
    }
}

#[test]
fn overlap_queue_and_replace_apply_per_dispatch() {
    let d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "o1", "");
    // queue: a start while the dispatch runs waits for it, then runs.
    d.call(
        "TaskUnit.Add",
        json!({"name": "queued", "command": ["sleep", "0.5"], "hosts": ["o1"], "overlap": "queue"}),
    );
    d.call("TaskUnit.Start", json!("queued"));
    let list = wait_for("two dispatches to end", || {
        let l = d.call("Dispatch.List", json!({"unit": "queued"}));
        let ended = l.as_array()?.iter().filter(|x| x["state"] == "succeeded").count();
        (ended == 2).then_some(l)
    });
    let (first, second) = (&list[1], &list[0]);
    let ended: jiff::Timestamp = first["ended_at"].as_str().unwrap().parse().unwrap();
    let created: jiff::Timestamp = second["created_at"].as_str().unwrap().parse().unwrap();
    assert!(created >= ended, "the queued fire waited: {list}");

    // replace: the dispatch in flight is cancelled, and the new one runs.
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "newest", "command": ["sleep", "30"], "hosts": ["o1"], "overlap": "replace"}),
    );
    let old = info["last_run"]["id"].as_i64().unwrap();
    wait_run(&d, old, "the first run to start", |r| r["pid"].is_i64());
    d.call("TaskUnit.Start", json!("newest"));
    let ended = d.wait_run_end(old);
    assert_eq!(
        (ended["state"].as_str(), ended["reason"].as_str()),
        (Some("cancelled"), Some("replaced"))
    );
    let list = wait_for("the replacing dispatch", || {
        let l = d.call("Dispatch.List", json!({"unit": "newest"}));
        (l.as_array()?.len() == 2 && l[0]["state"] == "running" && l[1]["state"] == "cancelled")
            .then_some(l)
    });
    assert_eq!(list[0]["counts"], json!({"running": 1}), "{list}");
}

#[test]
fn a_dispatch_cancelled_before_a_server_restart_stays_cancelled_after_it() {
    let mut d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "c1", "");
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    // Ignores SIGTERM (and so does its sleep): it stops only at the KILL after the grace, so
    // the cancel is still under way when the server dies.
    let cmd = format!("trap '' TERM; echo $$ > {}; sleep 300", pidfile.display());
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "halt", "command": ["sh", "-c", cmd], "hosts": ["c1"], "kill_grace": "3s"}),
    );
    let dispatch = info["last_run"]["dispatch"].as_i64().unwrap();
    let pid = pid_in(&pidfile);
    let c = d.call("Dispatch.Cancel", json!(dispatch));
    assert_eq!(c["state"], "cancelled", "{c}");
    d.kill9();
    d.restart_on_same_port();
    let done = wait_for("the dispatch to end", || {
        let g = d.call("Dispatch.Get", json!(dispatch));
        g["ended_at"].is_string().then_some(g)
    });
    assert_eq!(done["state"], "cancelled", "taken over as cancelled, not run on: {done}");
    assert_eq!(done["runs"][0]["state"], "cancelled", "{done}");
    wait_for("the run's process to be stopped", || (!alive(pid)).then_some(()));
}

/// The next run of `unit` (after run `seen`) that is recorded at least 100 ms ahead of its
/// fire time, with that time: a schedule's fire on agents is made half a second early. Seen
/// too late (a loaded machine), the next fire is waited for, up to five.
fn fire_seen_ahead(d: &TestDaemon, unit: &str, mut seen: i64) -> (i64, jiff::Timestamp) {
    let mut c = d.raw();
    for _ in 0..5 {
        let (run, at) = wait_for("a fire sent ahead of its time", || {
            let r = c.call("Run.List", json!({"unit": unit, "limit": 1}))["result"][0].clone();
            let id = r["id"].as_i64()?;
            let at: jiff::Timestamp = r["scheduled_at"].as_str()?.parse().ok()?;
            (id > seen).then_some((id, at))
        });
        if at.duration_since(jiff::Timestamp::now()) >= jiff::SignedDuration::from_millis(100) {
            return (run, at);
        }
        seen = run;
    }
    panic!("no fire of {unit} was seen ahead of its time");
}

#[test]
fn a_fire_on_an_agent_starts_at_its_time_even_while_its_server_is_frozen() {
    // A schedule's fire on agents is recorded and sent ahead of its time, and the agent starts
    // it at that time by itself: a server slow to record it (here frozen from before the
    // time until a second after it) does not make it late.
    let d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "t1", "");
    wait_connected(&d, "t1");
    d.call(
        "TaskUnit.Add",
        json!({"name": "on-time", "every": "2s", "command": ["true"], "hosts": ["t1"]}),
    );
    let (run, at) = fire_seen_ahead(&d, "on-time", 0);
    let ahead = at.duration_since(jiff::Timestamp::now());
    d.signal(Signal::SIGSTOP);
    std::thread::sleep((ahead + jiff::SignedDuration::from_secs(1)).try_into().unwrap());
    d.signal(Signal::SIGCONT);
    let ended = d.wait_run_end(run);
    assert_eq!(ended["state"], "succeeded", "{ended}");
    let started: jiff::Timestamp = ended["started_at"].as_str().unwrap().parse().unwrap();
    assert!(started >= at, "never before its time: {ended}");
    assert!(
        started < at + jiff::SignedDuration::from_secs(1),
        "started at its time, while the server was frozen: {ended}"
    );
}

#[test]
fn a_fire_made_ahead_of_its_time_is_not_made_again_nor_run_if_stopped_meanwhile() {
    let d = TestDaemon::start();
    let _a = TestAgent::enroll(&d, "t2", "");
    wait_connected(&d, "t2");
    d.call(
        "TaskUnit.Add",
        json!({"name": "once", "every": "2s", "overlap": "allow", "command": ["true"],
               "hosts": ["t2"]}),
    );
    // Paused and resumed before its time, the unit works out its next fire anew: not the one
    // it made already.
    let (run, at) = fire_seen_ahead(&d, "once", 0);
    d.call("TaskUnit.Pause", json!("once"));
    d.call("TaskUnit.Resume", json!("once"));
    let next = fire_seen_ahead(&d, "once", run).0;
    let runs = d.call("Run.List", json!({"unit": "once"}));
    let of_at: Vec<&Value> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["scheduled_at"].as_str().and_then(|t| t.parse().ok()) == Some(at))
        .collect();
    assert_eq!(of_at.len(), 1, "one run for the fire at {at}: {runs}");
    // Stopped before its time: it ends cancelled, never started.
    d.call("TaskUnit.Stop", json!("once"));
    let ended = d.wait_run_end(next);
    assert_eq!(ended["state"], "cancelled", "{ended}");
    assert!(ended["started_at"].is_null() && ended["pid"].is_null(), "never started: {ended}");
}

#[test]
fn an_agent_reports_ends_in_batches_each_answered_on_its_own() {
    let d = TestDaemon::start();
    let a = TestAgent::enroll(&d, "b1", "");
    let mut b = TestAgent::enroll(&d, "b2", "");
    wait_connected(&d, "b1");
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "held", "command": ["sleep", "300"], "hosts": ["b1"]}),
    );
    let run = info["last_run"]["id"].as_i64().unwrap();
    wait_run(&d, run, "the run to start", |r| r["pid"].is_i64());
    // Many ends in one call: each is answered on its own, and an agent speaks only for its own
    // runs (b2 for b1's is refused, which changes nothing); a run the server no longer has is
    // taken (nothing to record).
    let cred = b.credential();
    b.kill9();
    let mut c = Raw::connect(&d.addr);
    assert_eq!(c.call("Auth.Login", json!(cred))["result"], true);
    let outcome = |run: i64| {
        json!({"run": run, "attempt": 1, "state": "succeeded", "exit_code": 0, "signal": null,
               "reason": null, "pid": null, "started_at_us": null, "ended_at_us": 1,
               "stdout_bytes": 0, "stderr_bytes": 0})
    };
    let v = c.call("AgentLink.FinishedMany", json!([outcome(run), outcome(run + 1000)]));
    let answers = v["result"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert!(answers[0].as_str().is_some_and(|m| m.contains("not active on agent")), "{v}");
    assert!(answers[1].is_null(), "{v}");
    assert_eq!(d.call("Run.Get", json!(run))["state"], "running");
    // At most 256 a call.
    let many: Vec<Value> = (0..257).map(|i| outcome(run + 1000 + i)).collect();
    let v = c.call("AgentLink.FinishedMany", json!(many));
    assert_eq!(v["error"]["code"], -32055, "{v}");
    // The real agent's own end goes through.
    d.call("TaskUnit.Stop", json!("held"));
    assert_eq!(d.wait_run_end(run)["state"], "cancelled");
    drop(a);
}
