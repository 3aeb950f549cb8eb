//! `taskctl` as built, against a real daemon: output, `--json` shapes and exit codes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use serde_json::Value;

use crate::common::{DEADLINE, TestDaemon, wait_for};

/// Standard output of a run that must have succeeded.
#[track_caller]
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "taskctl failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The exit code and standard error of a run that must have failed.
#[track_caller]
fn fails(out: Output) -> (i32, String) {
    assert!(
        !out.status.success(),
        "taskctl should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.code().expect("exited, not killed"), String::from_utf8(out.stderr).expect("utf-8"))
}

/// Parses `--json` output.
#[track_caller]
fn json(out: Output) -> Value {
    let s = ok(out);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn list_shows_every_unit_page_by_page() {
    let d = TestDaemon::start();
    // More than one page (taskctl asks for 1,001 at a time).
    let defs: Vec<Value> = (0..1203)
        .map(
            |i| serde_json::json!({"name": format!("u{i:04}"), "every": "1h", "command": ["true"]}),
        )
        .collect();
    d.add_many(&defs);
    let all = json(d.taskctl(&["--json", "list"]));
    let names: Vec<&str> = all
        .as_array()
        .expect("an array")
        .iter()
        .map(|u| u["name"].as_str().expect("name"))
        .collect();
    let want: Vec<String> = (0..1203).map(|i| format!("u{i:04}")).collect();
    assert_eq!(names, want);
    let table = ok(d.taskctl(&["list"]));
    assert_eq!(table.lines().filter(|l| l.starts_with('u')).count(), 1203, "{table}");

    // --limit cuts the list and says how to see the rest; --after starts after a name.
    let out = d.taskctl(&["list", "--limit", "2", "u1*"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let rows: Vec<String> =
        ok(out).lines().skip(1).map(|l| l.split_whitespace().next().unwrap_or("").into()).collect();
    assert_eq!(rows, ["u1000", "u1001"]);
    assert!(err.contains("taskctl list --after u1001"), "{err}");
    let rest = json(d.taskctl(&["--json", "list", "--after", "u1199"]));
    assert_eq!(rest.as_array().expect("an array").len(), 3, "{rest}");
    let (code, err) = fails(d.taskctl(&["list", "--limit", "0"]));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn add_list_show_edit_del_round_trip() {
    let d = TestDaemon::start();
    let out = ok(d.taskctl(&["add", "hello", "--every", "5m", "--env", "A=1", "--", "echo", "hi"]));
    assert!(out.starts_with("added hello (job, every 5m)"), "{out}");

    let list = ok(d.taskctl(&["list"]));
    let header = list.lines().next().expect("a header");
    for col in ["NAME", "STATE", "NEXT", "LAST RUN", "RUNS", "FAILS"] {
        assert!(header.contains(col), "{header}");
    }
    let row = list.lines().find(|l| l.starts_with("hello")).expect("a row for hello");
    assert!(row.contains("every 5m") && row.contains("waiting") && row.contains("in "), "{row}");

    let show = ok(d.taskctl(&["show", "hello"]));
    assert!(show.contains("state:") && show.contains("waiting"), "{show}");
    assert!(
        show.lines().any(|l| l.trim_start().starts_with("every:") && l.ends_with(" 5m")),
        "{show}"
    );
    // One environment variable per line, its value quoted.
    assert!(
        show.lines().any(|l| l.trim_start().starts_with("env.A:") && l.ends_with("\"1\"")),
        "{show}"
    );

    // Switching from an interval to cron in one edit: the interval goes away by itself.
    let out = ok(d.taskctl(&["edit", "hello", "--cron", "0 3 * * *", "--description", "nightly"]));
    assert!(out.starts_with("edited hello (job, cron 0 3 * * *"), "{out}");
    let info = json(d.taskctl(&["--json", "show", "hello"]));
    assert_eq!(info["definition"]["cron"], "0 3 * * *");
    assert_eq!(info["definition"]["description"], "nightly");
    assert!(info["definition"].get("every").is_none(), "{info}");
    assert_eq!(info["definition"]["command"], serde_json::json!(["echo", "hi"]));

    // `--clear` removes a field.
    ok(d.taskctl(&["edit", "hello", "--clear", "env"]));
    let info = json(d.taskctl(&["--json", "show", "hello"]));
    assert!(info["definition"]["env"].as_object().is_none_or(|m| m.is_empty()), "{info}");

    assert_eq!(ok(d.taskctl(&["del", "hello"])), "deleted hello\n");
    let list = ok(d.taskctl(&["list"]));
    assert!(list.starts_with("no units; add one with `taskctl add NAME -- COMMAND`"), "{list}");
}

#[test]
fn json_output_has_the_wire_fields() {
    let d = TestDaemon::start();
    let info = json(d.taskctl(&["--json", "add", "bad-exit", "--", "sh", "-c", "exit 3"]));
    assert_eq!(info["name"], "bad-exit");
    assert!(info["state"].is_string(), "{info}");
    let run = info["last_run"]["id"].as_i64().expect("the add started a run");
    d.wait_run_end(run);

    let info = json(d.taskctl(&["--json", "show", "bad-exit"]));
    assert_eq!(info["last_run"]["id"], run);
    assert_eq!(info["last_run"]["state"], "failed");
    assert_eq!(info["last_run"]["exit_code"], 3);
    assert_eq!(info["runs_total"], 1);
    assert_eq!(info["failures_total"], 1);

    let list = json(d.taskctl(&["--json", "list"]));
    assert_eq!(list[0]["name"], "bad-exit");
    assert_eq!(list[0]["last_run"]["id"], run);

    let runs = json(d.taskctl(&["--json", "runs", "bad-exit"]));
    assert_eq!(runs[0]["id"], run);
    assert_eq!(runs[0]["unit"], "bad-exit");
    assert_eq!(runs[0]["trigger"], "add");

    let human = ok(d.taskctl(&["runs"]));
    let row = human.lines().find(|l| l.starts_with(&run.to_string())).expect("a row");
    assert!(row.contains("bad-exit") && row.contains("failed") && row.contains(" 3"), "{row}");
    let list = ok(d.taskctl(&["list"]));
    assert!(list.contains(&format!("#{run} failed (exit 3)")), "{list}");

    let status = json(d.taskctl(&["--json", "status"]));
    assert_eq!(status["pid"], d.pid());
    assert_eq!(status["units"]["total"], 1);
    let human = ok(d.taskctl(&["status"]));
    assert!(human.contains("pid:") && human.contains(&d.pid().to_string()), "{human}");
    assert!(human.contains(&d.addr), "{human}");
}

#[test]
fn logs_of_a_finished_run() {
    let d = TestDaemon::start();
    let info = json(d.taskctl(&[
        "--json",
        "add",
        "out",
        "--",
        "sh",
        "-c",
        "echo one; echo two; echo err >&2",
    ]));
    let run = info["last_run"]["id"].as_i64().expect("a run");
    d.wait_run_end(run);

    let all = ok(d.taskctl(&["logs", "out"]));
    for l in ["one\n", "two\n", "err\n"] {
        assert!(all.contains(l), "{all:?}");
    }
    assert_eq!(ok(d.taskctl(&["logs", &run.to_string(), "--stdout"])), "one\ntwo\n");
    assert_eq!(ok(d.taskctl(&["logs", "out", "--stderr"])), "err\n");
    assert_eq!(ok(d.taskctl(&["logs", "out", "--stdout", "--tail", "1"])), "two\n");
    let j = json(d.taskctl(&["--json", "logs", "out", "--stdout"]));
    assert_eq!(j["data"], "one\ntwo\n");
    assert_eq!(j["eof"], true);

    // -f on a finished run prints everything, then ends.
    assert_eq!(ok(d.taskctl(&["logs", "-f", "out", "--stdout"])), "one\ntwo\n");

    let (code, err) = fails(d.taskctl(&["logs", "nosuch"]));
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn logs_follow_prints_a_running_unit_live_and_ends() {
    let d = TestDaemon::start();
    let script = "for i in 1 2 3; do echo line$i; sleep 0.2; done";
    ok(d.taskctl(&["add", "slow", "--", "sh", "-c", script]));
    let out = ok(d.taskctl(&["logs", "-f", "slow"]));
    assert_eq!(out, "line1\nline2\nline3\n");
    let runs = json(d.taskctl(&["--json", "runs", "slow"]));
    assert_eq!(runs[0]["state"], "succeeded", "the follow ended with the run");

    // A second run, followed with --json: output items, then the end.
    let run = json(d.taskctl(&["--json", "start", "slow"]));
    let id = run["id"].as_i64().expect("a run id");
    let out = ok(d.taskctl(&["--json", "logs", "-f", &id.to_string()]));
    let items: Vec<Value> =
        out.lines().map(|l| serde_json::from_str(l).expect("one JSON item per line")).collect();
    let last = items.last().expect("items");
    assert_eq!(last["kind"], "end");
    assert_eq!(last["run"]["id"], id);
    let text: String = items.iter().filter_map(|i| i["data"].as_str()).collect();
    assert_eq!(text, "line1\nline2\nline3\n");
}

/// An address on a port that was just free: nothing listens on it.
fn dead_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

#[test]
fn unreachable_daemon_is_exit_3_with_a_hint() {
    let d = TestDaemon::start();
    let addr = dead_addr();
    let (code, err) = fails(d.taskctl(&["--addr", &addr, "list"]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("cannot reach taskd at {addr}")), "{err}");
    assert!(err.contains("start it with: taskd --state-dir"), "{err}");

    // Without --addr, the address comes from <state-dir>/address: the daemon is found.
    ok(d.taskctl(&["list"]));

    // Several addresses (a cluster's servers): the first that answers is used…
    let both = format!("{addr},{}", d.addr);
    ok(d.taskctl(&["--addr", &both, "list"]));
    // …and when none does, the error names them all.
    let none = format!("{addr},{}", dead_addr());
    let (code, err) = fails(d.taskctl(&["--addr", &none, "list"]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("cannot reach taskd at {none}")), "{err}");
    assert!(err.contains("none of the servers given answered"), "{err}");
    // One bad address in the list is a usage error that names it.
    let (code, err) = fails(d.taskctl(&["--addr", &format!("{},nowhere", d.addr), "list"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid --addr \"nowhere\""), "{err}");
}

#[test]
fn a_wrong_token_is_exit_1_with_a_hint() {
    let d = TestDaemon::start();
    let (code, err) = fails(d.taskctl(&["--token", "not-the-token", "status"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("token"), "{err}");
    // The right one, given explicitly, works.
    ok(d.taskctl(&["--token", &d.token, "status"]));

    // A state directory without a token file: taskctl connects without logging in, and the
    // daemon's refusal comes with a hint about where the token is read from.
    let empty = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_taskctl"))
        .arg("--state-dir")
        .arg(empty.path())
        .args(["--addr", &d.addr, "list"])
        .env_remove("TASKD_ADDR")
        .env_remove("TASKD_TOKEN")
        .output()
        .expect("run taskctl");
    let (code, err) = fails(out);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}", empty.path().join("token").display())), "{err}");
}

#[test]
fn an_invalid_definition_is_exit_1_naming_the_field() {
    let d = TestDaemon::start();
    let (code, err) = fails(d.taskctl(&["add", "bad", "--cron", "* * *", "--", "true"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("taskctl: ") && err.contains("cron"), "{err}");
    let list = json(d.taskctl(&["--json", "list"]));
    assert_eq!(list, serde_json::json!([]), "nothing was added");

    let (code, err) =
        fails(d.taskctl(&["add", "badtz", "--tz", "Not/AZone", "--cron", "@daily", "--", "true"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tz"), "{err}");
}

#[test]
fn usage_errors_are_exit_2() {
    let d = TestDaemon::start();
    for args in [
        &["add"][..],
        &["frobnicate"],
        &["add", "x", "--env", "NOEQUALS", "--", "true"],
        &["add", "x", "--every", "5 parsecs", "--", "true"],
        &["add", "x", "--overlap", "sometimes", "--", "true"],
        &["edit", "x"],
        &["logs", "1", "--stdout", "--stderr"],
    ] {
        let (code, err) = fails(d.taskctl(args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?}");
    }
    // Each with what it says.
    for (args, says) in [
        (&["--addr", "nonsense", "status"][..], "invalid --addr"),
        (&["runs", "--state", "bogus"], "timed_out"),
        (&["list", "--state", "bogus"], "backoff"),
        (&["runs", "--limit", "0"], "must be 1-1000"),
        (&["runs", "--limit", "1001"], "must be 1-1000"),
        (&["cancel", "abc"], "must be a run id (a number)"),
        (&["add", "x", "--"], "nothing after --: give a command, or omit -- for a tick unit"),
        (&["add", "x", "--every", "-5s", "--", "true"], "must be positive"),
        (&["add", "x", "--timeout", "-1s", "--", "true"], "must be positive"),
        (&["add", "x", "--retries", "-1", "--", "true"], "must be 0 or more"),
        (&["edit", "x", "--clear", "colour"], "the fields are: command, script"),
        (&["edit", "x", "--clear", "name"], "name cannot be removed"),
    ] {
        let (code, err) = fails(d.taskctl(args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let list = json(d.taskctl(&["--json", "list"]));
    assert_eq!(list, serde_json::json!([]), "nothing was added");
}

#[test]
fn del_reports_each_name_and_fails_if_any_did() {
    let d = TestDaemon::start();
    let (code, err) = fails(d.taskctl(&["del", "missing"]));
    assert_eq!(code, 1);
    assert!(err.contains("missing") && err.contains("not found"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line per failure: {err}");

    ok(d.taskctl(&["add", "a", "--paused", "--", "true"]));
    let out = d.taskctl(&["del", "a", "missing"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "deleted a\n");
    let (code, _) = fails(out);
    assert_eq!(code, 1);
    assert_eq!(json(d.taskctl(&["--json", "list"])), serde_json::json!([]));
}

#[test]
fn script_from_stdin_with_arguments() {
    let d = TestDaemon::start();
    let script = "#!/bin/sh\necho \"from a script: $1\"\n";
    let out = d
        .taskctl_stdin(&["--json", "add", "scripted", "--script", "-", "--", "arg1"], Some(script));
    let info = json(out);
    assert_eq!(info["definition"]["script"], script);
    let run = info["last_run"]["id"].as_i64().expect("a run");
    assert_eq!(d.wait_run_end(run)["state"], "succeeded");
    assert_eq!(ok(d.taskctl(&["logs", "scripted"])), "from a script: arg1\n");
}

#[test]
fn a_bare_name_adds_a_tick_unit() {
    let d = TestDaemon::start();
    let out = ok(d.taskctl(&["add", "ticker"]));
    assert!(out.starts_with("added ticker (tick, every 1s)"), "{out}");
    // The tick writes its first line at once; wait for it rather than sleep.
    let logs = wait_for("a tick line", || {
        let out = ok(d.taskctl(&["logs", "ticker"]));
        (!out.is_empty()).then_some(out)
    });
    assert!(logs.starts_with("tick ticker "), "{logs}");
}

#[test]
fn start_stop_pause_resume_and_cancel() {
    let d = TestDaemon::start();
    ok(d.taskctl(&["add", "svc", "--service", "--", "sleep", "30"]));
    d.wait_unit("svc", "the service to run", |u| u["state"] == "running");
    assert_eq!(ok(d.taskctl(&["stop", "svc"])), "svc: stopped 1 run\n");
    d.wait_unit("svc", "the service to stop", |u| u["state"] != "running");

    let out = ok(d.taskctl(&["start", "svc"]));
    assert!(out.starts_with("svc: run "), "{out}");
    let id = d.wait_unit("svc", "a running run", |u| u["state"] == "running")["last_run"]["id"]
        .as_i64()
        .expect("a run");
    let out = ok(d.taskctl(&["cancel", &id.to_string()]));
    assert!(out.starts_with(&format!("run {id} cancelled")), "{out}");
    assert!(
        out.contains("svc is a service and restarts (use 'taskctl stop svc' to keep it down)"),
        "{out}"
    );
    // Look the run up by id: a service may already have been restarted after it.
    let runs = json(d.taskctl(&["--json", "runs", "svc", "--limit", "10"]));
    let r = runs.as_array().and_then(|a| a.iter().find(|r| r["id"] == id)).expect("the run");
    assert_eq!(r["state"], "cancelled");

    ok(d.taskctl(&["add", "job", "--every", "1h", "--", "true"]));
    let out = ok(d.taskctl(&["pause", "job"]));
    assert!(out.starts_with("paused job") && out.contains("paused"), "{out}");
    assert_eq!(json(d.taskctl(&["--json", "show", "job"]))["state"], "paused");
    let out = ok(d.taskctl(&["resume", "job"]));
    assert!(out.starts_with("resumed job"), "{out}");
    assert_eq!(json(d.taskctl(&["--json", "resume", "job"]))["name"], "job");

    let (code, err) = fails(d.taskctl(&["cancel", "999999"]));
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn events_replay_and_follow() {
    let d = TestDaemon::start();
    ok(d.taskctl(&["add", "ev", "--paused", "--", "true"]));
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskctl"))
        .arg("--state-dir")
        .arg(d.state_dir())
        .args(["--json", "events", "--after", "0"])
        .env_remove("TASKD_ADDR")
        .env_remove("TASKD_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn taskctl events");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> Value {
        let line = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("no event: {what}"));
        serde_json::from_str(&line).expect("one JSON event per line")
    };
    // Replayed: the add.
    let e = next("the replayed add");
    assert_eq!(e["kind"], "unit.added");
    assert_eq!(e["unit"], "ev");
    assert!(e["seq"].as_i64().is_some());
    // Live: a start.
    ok(d.taskctl(&["start", "ev"]));
    let finished = wait_for("run.finished", || {
        let e = next("a live event");
        (e["kind"] == "run.finished").then_some(e)
    });
    assert_eq!(finished["unit"], "ev");
    assert!(finished["run"].as_i64().is_some());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn completions_are_printed() {
    let d = TestDaemon::start();
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(d.taskctl(&["completions", shell]));
        assert!(out.contains("taskctl"), "{shell}: {out}");
    }
    let (code, _) = fails(d.taskctl(&["completions", "cmd.exe"]));
    assert_eq!(code, 2);
}

#[test]
fn logs_of_a_run_over_a_mebibyte_are_read_in_pages() {
    let d = TestDaemon::start();
    let script = "head -c 3000000 /dev/zero | tr '\\0' a; echo";
    let info =
        json(d.taskctl(&["--json", "add", "big", "--log-limit", "8MiB", "--", "sh", "-c", script]));
    let run = info["last_run"]["id"].as_i64().expect("a run");
    assert_eq!(d.wait_run_end(run)["state"], "succeeded");

    let all = ok(d.taskctl(&["logs", "big"]));
    assert_eq!(all.len(), 3_000_001);
    assert!(all.starts_with("aaa") && all.ends_with("a\n"), "{}", &all[..10]);
    // The last lines are that one long line, longer than the daemon sends at once.
    let tail = ok(d.taskctl(&["logs", "big", "--tail", "5"]));
    assert_eq!(tail.len(), 3_000_001);
    let j = json(d.taskctl(&["--json", "logs", &run.to_string()]));
    assert_eq!(j["data"].as_str().map(str::len), Some(3_000_001));
    assert_eq!(j["eof"], true);
}

#[test]
fn logs_of_a_run_that_failed_to_start_say_why() {
    let d = TestDaemon::start();
    let info = json(d.taskctl(&["--json", "add", "nocwd", "--", "/no/such/dir/program", "--flag"]));
    let run = info["last_run"]["id"].as_i64().expect("a run");
    assert_eq!(d.wait_run_end(run)["state"], "failed");
    for args in [
        &["logs", "nocwd"][..],
        &["logs", &run.to_string(), "--tail", "3"],
        &["logs", "-f", "nocwd"],
    ] {
        let out = d.taskctl(args);
        assert!(out.stdout.is_empty(), "{args:?}: stdout stays clean");
        let (code, err) = fails(out);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.starts_with(&format!("taskctl: run {run} failed to start: ")), "{err}");
        assert!(err.contains("/no/such/dir"), "{err}");
    }

    // A run that failed quietly: said on stderr; the logs themselves were read fine.
    let info = json(d.taskctl(&["--json", "add", "quiet", "--", "sh", "-c", "exit 3"]));
    let run = info["last_run"]["id"].as_i64().expect("a run");
    d.wait_run_end(run);
    let out = d.taskctl(&["logs", "quiet"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("run {run} failed (exit 3)")) && err.contains("without output"),
        "{err}"
    );
}

#[test]
fn followers_say_when_the_daemon_shuts_down() {
    let mut d = TestDaemon::start();
    ok(d.taskctl(&["add", "svc", "--service", "--", "sh", "-c", "echo up; exec sleep 60"]));
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_taskctl"))
            .arg("--state-dir")
            .arg(d.state_dir())
            .args(args)
            .env_remove("TASKD_ADDR")
            .env_remove("TASKD_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn taskctl")
    };
    let mut logs = spawn(&["logs", "-f", "svc"]);
    let mut events = spawn(&["events", "--after", "0"]);
    // Both are reading once each has printed its first line.
    let first_line = |child: &mut std::process::Child| {
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("a line");
        assert!(!line.is_empty(), "no output");
        out
    };
    let _logs_out = first_line(&mut logs);
    let _events_out = first_line(&mut events);
    assert!(d.terminate().success());
    // The follower of a run sees it end (stopped by the shutdown) before the daemon closes.
    let out = logs.wait_with_output().expect("taskctl ends");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cancelled"), "{err}");
    // The events follower has no end: the connection closes under it.
    let (code, err) = fails(events.wait_with_output().expect("taskctl ends"));
    assert_eq!(code, 3, "{err}");
    assert_eq!(err, "taskctl: taskd closed the connection (is it shutting down?)\n");
}

#[test]
fn edit_clear_cron_clears_tz_so_a_job_becomes_a_service_in_one_step() {
    let d = TestDaemon::start();
    ok(d.taskctl(&[
        "add",
        "p1",
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Berlin",
        "--",
        "sleep",
        "30",
    ]));
    let out = ok(d.taskctl(&["edit", "p1", "--clear", "cron", "--service"]));
    assert!(out.starts_with("edited p1 (service)"), "{out}");
    let info = json(d.taskctl(&["--json", "show", "p1"]));
    assert!(info["definition"].get("cron").is_none_or(Value::is_null), "{info}");
    assert!(info["definition"].get("tz").is_none_or(Value::is_null), "{info}");
    assert_eq!(info["definition"]["service"], true);

    // --paused and --no-paused pause and resume (a running service keeps its run).
    ok(d.taskctl(&["edit", "p1", "--paused"]));
    assert_eq!(json(d.taskctl(&["--json", "show", "p1"]))["definition"]["paused"], true);
    ok(d.taskctl(&["edit", "p1", "--no-paused"]));
    assert_eq!(json(d.taskctl(&["--json", "show", "p1"]))["definition"]["paused"], false);
}

#[test]
fn show_says_how_to_reset_a_fatal_service() {
    let d = TestDaemon::start();
    ok(d.taskctl(&[
        "add",
        "crashy",
        "--service",
        "--backoff",
        "10ms..10ms",
        "--start-limit",
        "2/60s",
        "--",
        "false",
    ]));
    d.wait_unit("crashy", "the service to hit its start limit", |u| u["state"] == "fatal");
    let show = ok(d.taskctl(&["show", "crashy"]));
    assert!(
        show.lines().any(|l| l.starts_with("fatal:")
            && l.ends_with("hit its start limit; 'taskctl start crashy' resets it")),
        "{show}"
    );
}

#[test]
fn help_groups_the_global_options() {
    let d = TestDaemon::start();
    let help = ok(d.taskctl(&["--help"]));
    assert!(help.contains("Global options:"), "{help}");
    assert!(!help.contains("TASKD_ADDR="), "{help}");
    let edit = ok(d.taskctl(&["edit", "--help"]));
    assert!(!edit.contains("Create without starting"), "{edit}");
    assert!(!edit.contains("[default: skip]"), "{edit}");
    assert!(ok(d.taskctl(&["add", "--help"])).contains("Create without starting"));
}

#[test]
fn events_replays_thousands_of_events_without_falling_behind() {
    let d = TestDaemon::start();
    // 500 one-shot units: 1,500 stored events (added, started, finished).
    let mut raw = d.raw();
    for i in 0..500 {
        let req = serde_json::json!({"jsonrpc": "2.0", "id": i, "method": "TaskUnit.Add",
            "params": [{"name": format!("e{i}"), "command": ["true"]}]});
        raw.send(format!("{req}\n").as_bytes());
    }
    for _ in 0..500 {
        assert!(raw.recv().get("result").is_some());
    }
    wait_for("every run to be recorded", || {
        let runs = d.call("Run.List", serde_json::json!({"state": "succeeded", "limit": 1000}));
        (runs.as_array()?.len() == 500).then_some(())
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskctl"))
        .arg("--state-dir")
        .arg(d.state_dir())
        .args(["--json", "events", "--after", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn taskctl events");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut last = 0;
    for _ in 0..1500 {
        let line = lines.next().expect("an event").expect("a line");
        let e: Value = serde_json::from_str(&line).expect("one JSON event per line");
        let seq = e["seq"].as_i64().expect("seq");
        assert!(seq > last, "events in order, once each");
        last = seq;
    }
    assert!(child.try_wait().expect("try_wait").is_none(), "events still following");
    child.kill().expect("kill");
    child.wait().expect("reap");
}

#[test]
fn logs_follow_waits_for_a_units_first_run() {
    let d = TestDaemon::start();
    ok(d.taskctl(&["add", "soon", "--paused", "--", "echo", "first"]));
    // Without -f there is nothing to show yet, and the hint says how to wait.
    let (code, err) = fails(d.taskctl(&["logs", "soon"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has no runs yet") && err.contains("logs -f soon"), "{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskctl"))
        .arg("--state-dir")
        .arg(d.state_dir())
        .args(["logs", "-f", "soon"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn taskctl logs -f");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("a line");
    assert!(line.contains("waiting for the first run of soon"), "{line}");
    // The paused one-shot job runs when resumed; the follower shows it and ends.
    ok(d.taskctl(&["resume", "soon"]));
    let out = child.wait_with_output().expect("taskctl ends");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "first\n");
}

#[test]
fn a_relative_cwd_is_taken_from_where_taskctl_runs() {
    let d = TestDaemon::start();
    let info = json(d.taskctl(&["--json", "add", "here", "--cwd", ".", "--", "pwd"]));
    let run = info["last_run"]["id"].as_i64().expect("a run");
    assert_eq!(d.wait_run_end(run)["state"], "succeeded");
    let here = std::env::current_dir().unwrap();
    assert_eq!(info["definition"]["cwd"], here.display().to_string());
    assert_eq!(ok(d.taskctl(&["logs", "here"])), format!("{}\n", here.display()));
}
