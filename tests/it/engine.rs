//! The engine through the API: runs, schedules, services, stops, retention and recovery.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{TestDaemon, alive, wait_for};

fn run_id(v: &Value) -> i64 {
    v["last_run"]["id"].as_i64().unwrap_or_else(|| panic!("no last run in {v}"))
}

/// Reads pids a test command wrote, one file per pid, waiting until all exist.
fn pids(dir: &Path, names: &[&str]) -> Vec<i32> {
    names
        .iter()
        .map(|n| {
            wait_for(&format!("pid file {n}"), || {
                std::fs::read_to_string(dir.join(n)).ok()?.trim().parse().ok()
            })
        })
        .collect()
}

/// A shell command that starts a background child and a double-forked grandchild, records
/// their pids, and then blocks.
fn tree_script(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "sleep 1000 & echo $! > {d}/child; (sleep 1000 & echo $! > {d}/grandchild); echo $$ > {d}/leader; sleep 1000"
    )
}

/// A shell command that starts `sleep 1000` in a session of its own (out of the run's process
/// group), records its pid in `<dir>/escapee` once it has left the group, and then blocks.
fn escapee_script(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "(setsid sleep 1000 & echo $! > {d}/started); p=$(cat {d}/started); \
         until [ \"$(cut -d' ' -f5 /proc/$p/stat)\" = \"$p\" ]; do sleep 0.01; done; \
         echo $p > {d}/escapee; sleep 1000"
    )
}

#[test]
fn a_one_shot_job_runs_at_add_and_records_its_output() {
    let d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "hello", "command": ["sh", "-c", "echo hi; echo oops >&2; exit 3"]}),
    );
    let run = run_id(&info);
    let r = d.wait_run_end(run);
    assert_eq!(r["state"], "failed");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["trigger"], "add");
    assert_eq!(r["stdout_bytes"], 3);
    assert_eq!(r["stderr_bytes"], 5);
    let out = d.call("Run.Logs", json!({"id": run, "stream": "stdout"}));
    assert_eq!(out["data"], "hi\n");
    let err = d.call("Run.Logs", json!({"id": run, "stream": "stderr"}));
    assert_eq!(err["data"], "oops\n");
    let unit = d.wait_unit("hello", "the unit to be done", |u| u["state"] == "done");
    assert_eq!(unit["runs_total"], 1);
    assert_eq!(unit["failures_total"], 1);
}

#[test]
fn env_cwd_scripts_and_success_codes_apply() {
    let d = TestDaemon::start();
    let work = tempfile::tempdir().unwrap();
    let info = d.call(
        "TaskUnit.Add",
        json!({
            "name": "envy",
            "script": "#!/bin/sh\necho \"$GREETING from $(pwd) as $TASKD_UNIT\"; echo \"home=${HOME:+set}\"; exit 7",
            "env": {"GREETING": "hello"},
            "cwd": work.path(),
            "success_codes": [0, 7],
        }),
    );
    let r = d.wait_run_end(run_id(&info));
    assert_eq!(r["state"], "succeeded", "{r}");
    let out = d.call("Run.Logs", json!({"id": r["id"]}));
    let expect = format!("hello from {} as envy\nhome=set\n", work.path().display());
    assert_eq!(out["data"], expect);
}

#[test]
fn the_daemon_environment_is_not_copied_into_runs() {
    let d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "envcheck", "command": ["sh", "-c", "echo ${RUST_LOG:-unset} $USER"]}),
    );
    let r = d.wait_run_end(run_id(&info));
    // USER names the daemon's account from the user database, not from its environment.
    let me = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().unwrap().name;
    assert_eq!(d.call("Run.Logs", json!({"id": r["id"]}))["data"], format!("unset {me}\n"));
}

#[test]
fn a_missing_program_fails_the_run_with_a_reason() {
    let d = TestDaemon::start();
    let info = d.call("TaskUnit.Add", json!({"name": "nope", "command": ["no-such-program-xyz"]}));
    let r = d.wait_run_end(run_id(&info));
    assert_eq!(r["state"], "failed");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("no-such-program-xyz"), "{reason}");
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "slow", "command": ["sh", "-c", tree_script(tmp.path())],
               "timeout": "500ms", "kill_grace": "200ms"}),
    );
    let procs = pids(tmp.path(), &["leader", "child", "grandchild"]);
    let r = d.wait_run_end(run_id(&info));
    assert_eq!(r["state"], "timed_out", "{r}");
    assert_eq!(r["reason"], "timeout");
    for p in procs {
        wait_for(&format!("pid {p} to be gone"), || (!alive(p)).then_some(()));
    }
}

#[test]
fn delete_stops_the_process_tree_before_answering() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    d.call(
        "TaskUnit.Add",
        json!({"name": "svc", "service": true, "command": ["sh", "-c", tree_script(tmp.path())],
               "kill_grace": "300ms"}),
    );
    let procs = pids(tmp.path(), &["leader", "child", "grandchild"]);
    assert_eq!(d.call("TaskUnit.Delete", json!("svc")), json!(true));
    for p in procs {
        assert!(!alive(p), "pid {p} survived the delete");
    }
    let v = d.raw().call("TaskUnit.Get", json!("svc"));
    assert_eq!(v["error"]["code"], taskd::error::codes::UNIT_NOT_FOUND);
}

#[test]
fn delete_stops_processes_that_left_the_group() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    d.call(
        "TaskUnit.Add",
        json!({"name": "esc", "command": ["sh", "-c", escapee_script(tmp.path())],
               "kill_grace": "300ms"}),
    );
    let escapee = pids(tmp.path(), &["escapee"])[0];
    assert!(alive(escapee));
    assert_eq!(d.call("TaskUnit.Delete", json!("esc")), json!(true));
    assert!(!alive(escapee), "pid {escapee} survived the delete");
}

#[test]
fn recovery_stops_processes_that_left_the_group() {
    let mut d = TestDaemon::start();
    // Several runs, each with a process that left its group: found together at the restart.
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let runs: Vec<(i64, i32)> = dirs
        .iter()
        .enumerate()
        .map(|(i, tmp)| {
            let info = d.call(
                "TaskUnit.Add",
                json!({"name": format!("esc{i}"),
                       "command": ["sh", "-c", escapee_script(tmp.path())]}),
            );
            (run_id(&info), pids(tmp.path(), &["escapee"])[0])
        })
        .collect();
    d.kill9();
    for &(_, escapee) in &runs {
        assert!(alive(escapee), "the escapee should outlive a killed daemon");
    }
    d.restart();
    for (id, escapee) in runs {
        assert_eq!(d.call("Run.Get", json!(id))["state"], "lost");
        wait_for(&format!("escapee {escapee} to be killed"), || (!alive(escapee)).then_some(()));
    }
}

#[test]
fn a_child_ignoring_sigterm_is_killed_after_the_grace() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let ready = tmp.path().join("ready");
    let script = format!("trap '' TERM; touch {}; sleep 1000 & wait; sleep 1000", ready.display());
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "stubborn", "command": ["sh", "-c", script], "kill_grace": "200ms"}),
    );
    let id = run_id(&info);
    wait_for("the trap to be set", || ready.exists().then_some(()));
    let r = d.call("Run.Cancel", json!(id));
    assert_eq!(r["state"], "cancelled");
    assert_eq!(r["reason"], "cancelled");
    assert_eq!(r["signal"], 9, "{r}");
}

#[test]
fn services_restart_with_backoff_until_their_start_limit() {
    let d = TestDaemon::start();
    d.call(
        "TaskUnit.Add",
        json!({"name": "crashy", "service": true, "command": ["sh", "-c", "exit 1"],
               "backoff": "50ms..100ms", "start_limit": "3/1m"}),
    );
    let u = d.wait_unit("crashy", "the service to turn fatal", |u| u["state"] == "fatal");
    assert_eq!(u["runs_total"], 3);
    let runs = d.call("Run.List", json!({"unit": "crashy"}));
    let triggers: Vec<&str> =
        runs.as_array().unwrap().iter().map(|r| r["trigger"].as_str().unwrap()).collect();
    assert_eq!(triggers, ["restart", "restart", "add"]);
    // Start resets the fatal state and runs again.
    let r = d.call("TaskUnit.Start", json!("crashy"));
    assert_eq!(r["trigger"], "manual");
    d.wait_unit("crashy", "fatal again after more starts", |u| {
        u["state"] == "fatal" && u["runs_total"].as_u64() >= Some(6)
    });
}

#[test]
fn a_stopped_service_stays_stopped_until_started() {
    let d = TestDaemon::start();
    d.call(
        "TaskUnit.Add",
        json!({"name": "web", "service": true, "restart": "always", "command": ["sleep", "1000"],
               "kill_grace": "200ms"}),
    );
    d.wait_unit("web", "the service to run", |u| u["state"] == "running");
    assert_eq!(d.call("TaskUnit.Stop", json!("web")), json!(1));
    let u = d.wait_unit("web", "the service to be idle", |u| u["state"] == "waiting");
    assert_eq!(u["last_run"]["state"], "cancelled");
    assert_eq!(u["last_run"]["reason"], "stopped");
    assert_eq!(u["runs_total"], 1);
    let r = d.call("TaskUnit.Start", json!("web"));
    assert_eq!(r["state"], "running");
    d.wait_unit("web", "the service to run again", |u| u["state"] == "running");
    // Dropping the daemon SIGKILLs it, which would leave the service's process behind.
    d.call("TaskUnit.Stop", json!("web"));
}

#[test]
fn failed_jobs_are_retried() {
    let d = TestDaemon::start();
    d.call(
        "TaskUnit.Add",
        json!({"name": "flaky", "command": ["sh", "-c", "exit 2"], "retries": 2, "backoff": "50ms"}),
    );
    let u = d.wait_unit("flaky", "all attempts", |u| u["runs_total"] == 3 && u["state"] == "done");
    assert_eq!(u["last_run"]["attempt"], 3);
    assert_eq!(u["last_run"]["trigger"], "retry");
}

#[test]
fn interval_jobs_fire_and_skip_overlapping_fires() {
    let d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "tick", "every": "200ms", "command": ["sleep", "0.5"]}),
    );
    assert_eq!(info["state"], "waiting");
    assert!(info["next_fire"].is_string());
    assert!(info["last_run"].is_null(), "a scheduled job waits for its first fire");
    let u = d.wait_unit("tick", "three runs", |u| u["runs_total"].as_u64() >= Some(3));
    // Each run takes 500 ms and fires come every 200 ms: overlapping fires were skipped.
    let runs = d.call("Run.List", json!({"unit": "tick"}));
    let time = |v: &Value| v.as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
    let mut slots = Vec::new();
    for r in runs.as_array().unwrap() {
        assert_eq!(r["trigger"], "schedule");
        // Each run names the fire time it was for, and started at or after it.
        let (slot, started) = (time(&r["scheduled_at"]), time(&r["started_at"]));
        assert!(started >= slot, "{r}");
        slots.push(slot);
    }
    for w in slots.windows(2) {
        let gap = (w[0] - w[1]).total(jiff::Unit::Millisecond).unwrap();
        assert!(gap > 0.0 && (gap / 200.0).fract() == 0.0, "fire times on the 200 ms grid: {gap}");
    }
    let active: Vec<_> =
        runs.as_array().unwrap().iter().filter(|r| r["state"] == "running").collect();
    assert!(active.len() <= 1, "skip allows one active run: {u}");
}

#[test]
fn queue_overlap_keeps_one_waiting_run() {
    let d = TestDaemon::start();
    d.call("TaskUnit.Add", json!({"name": "q", "command": ["sleep", "0.4"], "overlap": "queue"}));
    let second = d.call("TaskUnit.Start", json!("q"));
    assert_eq!(second["state"], "queued");
    assert!(second["scheduled_at"].is_null(), "only a schedule's runs have a fire time");
    let third = d.call("TaskUnit.Start", json!("q"));
    assert_eq!(third["id"], second["id"], "at most one queued run");
    let r = d.wait_run_end(second["id"].as_i64().unwrap());
    assert_eq!(r["state"], "succeeded");
}

#[test]
fn replace_overlap_stops_the_active_run() {
    let d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "r", "command": ["sleep", "1000"], "overlap": "replace", "kill_grace": "200ms"}),
    );
    let first = run_id(&info);
    let next = d.call("TaskUnit.Start", json!("r"));
    let old = d.wait_run_end(first);
    assert_eq!(old["state"], "cancelled");
    assert_eq!(old["reason"], "replaced");
    d.wait_unit("r", "the replacement to run", |u| u["active_runs"] == json!([next["id"]]));
    d.call("TaskUnit.Stop", json!("r"));
}

#[test]
fn cron_with_seconds_fires() {
    let d = TestDaemon::start();
    d.call(
        "TaskUnit.Add",
        json!({"name": "c", "cron": "* * * * * *", "tz": "UTC", "command": ["true"]}),
    );
    let u = d.wait_unit("c", "two cron runs", |u| u["runs_total"].as_u64() >= Some(2));
    assert_eq!(u["last_run"]["trigger"], "schedule");
}

#[test]
fn pause_stops_firing_and_resume_continues() {
    let d = TestDaemon::start();
    d.call("TaskUnit.Add", json!({"name": "p", "every": "100ms", "command": ["true"]}));
    d.wait_unit("p", "a first run", |u| u["runs_total"].as_u64() >= Some(1));
    let paused = d.call("TaskUnit.Pause", json!("p"));
    assert!(paused["next_fire"].is_null());
    // A run that was active when the pause came ends; no new one starts.
    let paused = d.wait_unit("p", "the unit to be paused", |u| u["state"] == "paused");
    let runs = paused["runs_total"].clone();
    assert_eq!(d.call("TaskUnit.Get", json!("p"))["runs_total"], runs);
    let resumed = d.call("TaskUnit.Resume", json!("p"));
    assert_ne!(resumed["state"], "paused");
    let before = resumed["runs_total"].as_u64().unwrap();
    d.wait_unit("p", "runs after resume", |u| u["runs_total"].as_u64() > Some(before + 1));
}

#[test]
fn edit_applies_from_the_next_run() {
    let d = TestDaemon::start();
    let info = d.call("TaskUnit.Add", json!({"name": "e", "command": ["echo", "one"]}));
    d.wait_run_end(run_id(&info));
    let edited = d.call(
        "TaskUnit.Edit",
        json!({"name": "e", "command": ["echo", "two"], "description": "changed"}),
    );
    assert_eq!(edited["definition"]["command"], json!(["echo", "two"]));
    assert_eq!(edited["definition"]["description"], "changed");
    let r = d.call("TaskUnit.Start", json!("e"));
    let r = d.wait_run_end(r["id"].as_i64().unwrap());
    assert_eq!(d.call("Run.Logs", json!({"id": r["id"]}))["data"], "two\n");
    // An invalid edit changes nothing.
    let bad = d.raw().call("TaskUnit.Edit", json!({"name": "e", "every": "soon"}));
    assert_eq!(bad["error"]["data"]["field"], "every");
    assert_eq!(d.call("TaskUnit.Get", json!("e"))["definition"]["command"], json!(["echo", "two"]));
}

#[test]
fn tick_units_and_unit_files() {
    let d = TestDaemon::start();
    assert_eq!(d.call("TaskUnit.Add", json!("ticker")), json!(true));
    let u = d.wait_unit("ticker", "the tick run", |u| u["state"] == "running");
    let id = run_id(&u);
    let line = wait_for("a tick line", || {
        let out = d.call("Run.Logs", json!({"id": id}));
        let data = out["data"].as_str()?.to_string();
        data.starts_with("tick ticker ").then_some(data)
    });
    let when = line.lines().next().unwrap().trim_start_matches("tick ticker ");
    assert!(when.parse::<jiff::Timestamp>().is_ok(), "not RFC 3339: {when}");
    // An active run's byte counts are live.
    let bytes = d.call("Run.Get", json!(id))["stdout_bytes"].as_u64().unwrap();
    assert!(bytes >= line.lines().next().unwrap().len() as u64, "{bytes}");

    let units = d.state_dir().join("units");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join("fromfile.toml"), "command = [\"echo\", \"from a file\"]\n").unwrap();
    assert_eq!(d.call("TaskUnit.Add", json!("fromfile")), json!(true));
    let u = d.wait_unit("fromfile", "its run", |u| u["state"] == "done");
    assert_eq!(d.call("Run.Logs", json!({"id": run_id(&u)}))["data"], "from a file\n");
    d.call("TaskUnit.Delete", json!("ticker"));
}

#[test]
fn output_beyond_the_log_limit_keeps_head_and_tail() {
    let d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "chatty", "command": ["sh", "-c", "seq 1 100000"], "log_limit": "4KiB"}),
    );
    let r = d.wait_run_end(run_id(&info));
    assert_eq!(r["state"], "succeeded");
    assert_eq!(r["truncated"], true);
    assert_eq!(r["stdout_bytes"], 588895);
    let out = d.call("Run.Logs", json!({"id": r["id"]}));
    let data = out["data"].as_str().unwrap();
    assert!(data.starts_with("1\n2\n3\n"));
    assert!(data.ends_with("99999\n100000\n"));
    assert!(data.contains("bytes of stdout cut"));
    assert!(data.len() < 6000, "kept {} bytes", data.len());
}

#[test]
fn retention_keeps_the_newest_runs() {
    let d = TestDaemon::start();
    d.call("TaskUnit.Add", json!({"name": "k", "command": ["true"], "keep_runs": 3}));
    let mut last = 0;
    for _ in 0..5 {
        let r = d.call("TaskUnit.Start", json!("k"));
        last = r["id"].as_i64().unwrap();
        d.wait_run_end(last);
    }
    let runs = d.call("Run.List", json!({"unit": "k"}));
    let ids: Vec<i64> =
        runs.as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [last, last - 1, last - 2]);
    let gone = d.raw().call("Run.Get", json!(last - 3));
    assert_eq!(gone["error"]["code"], taskd::error::codes::RUN_NOT_FOUND);
    assert!(!d.state_dir().join(format!("logs/{}.log", last - 3)).exists());
}

#[test]
fn kill_9_loses_nothing_acknowledged_and_recovers() {
    let mut d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    d.call("TaskUnit.Add", json!({"name": "job", "every": "1h", "command": ["true"]}));
    d.call(
        "TaskUnit.Add",
        json!({"name": "svc", "service": true, "command": ["sh", "-c", tree_script(tmp.path())]}),
    );
    d.call("TaskUnit.Edit", json!({"name": "job", "description": "edited"}));
    d.call("TaskUnit.Add", json!({"name": "gone", "command": ["true"]}));
    d.call("TaskUnit.Delete", json!("gone"));
    let procs = pids(tmp.path(), &["leader", "child", "grandchild"]);
    let old_run = d.call("TaskUnit.Get", json!("svc"))["last_run"]["id"].as_i64().unwrap();

    d.kill9();
    d.restart();

    let names: Vec<String> = d
        .call("TaskUnit.List", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["job", "svc"]);
    assert_eq!(d.call("TaskUnit.Get", json!("job"))["definition"]["description"], "edited");
    let lost = d.call("Run.Get", json!(old_run));
    assert_eq!(lost["state"], "lost");
    assert!(lost["reason"].as_str().unwrap().contains("daemon"));
    // The old process tree is gone; the service runs again under a new run.
    for p in &procs {
        wait_for(&format!("old pid {p} to be killed"), || (!alive(*p)).then_some(()));
    }
    let u = d.wait_unit("svc", "the service to restart", |u| {
        u["state"] == "running" && u["last_run"]["id"].as_i64() > Some(old_run)
    });
    assert_eq!(u["last_run"]["trigger"], "restart");
    d.call("TaskUnit.Delete", json!("svc"));
}

#[test]
fn catch_up_once_fires_a_missed_run_after_downtime() {
    let mut d = TestDaemon::start();
    d.call(
        "TaskUnit.Add",
        json!({"name": "cu", "every": "1s", "catch_up": "once", "command": ["true"]}),
    );
    d.call("TaskUnit.Add", json!({"name": "nocu", "every": "1s", "command": ["true"]}));
    let next: jiff::Timestamp =
        d.call("TaskUnit.Get", json!("cu"))["next_fire"].as_str().unwrap().parse().unwrap();
    let status = d.terminate();
    assert!(status.success());
    // A fire time passes while the daemon is down.
    wait_for("a fire time to pass", || (jiff::Timestamp::now() > next).then_some(()));
    d.restart();
    let runs = d.call("Run.List", json!({"unit": "cu"}));
    let first = runs.as_array().unwrap().last().expect("a catch-up run").clone();
    assert_eq!(first["trigger"], "catch-up");
    let others = d.call("Run.List", json!({"unit": "nocu"}));
    assert!(others.as_array().unwrap().iter().all(|r| r["trigger"] != "catch-up"));
}

#[test]
fn sigterm_cancels_active_runs_and_exits_zero() {
    let mut d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "long", "command": ["sleep", "1000"], "kill_grace": "1s"}),
    );
    let id = run_id(&info);
    d.wait_unit("long", "the run to start", |u| u["state"] == "running");
    // A follower connected at shutdown sees the run end before the connection closes.
    let mut follower = d.raw();
    assert!(follower.call("Run.Follow", json!({"id": id}))["result"].is_number());
    let status = d.terminate();
    assert!(status.success(), "{status}");
    let end = loop {
        let msg = follower.recv();
        if msg["params"]["result"]["kind"] == "end" {
            break msg["params"]["result"]["run"].clone();
        }
    };
    assert_eq!(end["state"], "cancelled");
    assert_eq!(end["reason"], "shutdown");
    d.restart();
    let r = d.call("Run.Get", json!(id));
    assert_eq!(r["state"], "cancelled");
    assert_eq!(r["reason"], "shutdown");
}

#[test]
fn cancelling_a_service_run_restarts_the_service() {
    let d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "svc", "service": true, "command": ["sleep", "1000"], "backoff": "50ms",
               "kill_grace": "200ms"}),
    );
    let first = run_id(&info);
    let r = d.call("Run.Cancel", json!(first));
    assert_eq!(r["state"], "cancelled");
    assert_eq!(r["reason"], "cancelled");
    let u = d.wait_unit("svc", "a restarted run", |u| {
        u["state"] == "running" && u["last_run"]["id"].as_i64() > Some(first)
    });
    assert_eq!(u["last_run"]["trigger"], "restart");
    d.call("TaskUnit.Stop", json!("svc"));
}

#[test]
fn follow_of_a_queued_run_gets_its_output_and_end() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let gate = tmp.path().join("go");
    let script =
        format!("while [ ! -e {} ]; do sleep 0.02; done; echo run $TASKD_RUN_ID", gate.display());
    d.call(
        "TaskUnit.Add",
        json!({"name": "q", "command": ["sh", "-c", script], "overlap": "queue"}),
    );
    let queued = d.call("TaskUnit.Start", json!("q"));
    assert_eq!(queued["state"], "queued");
    let id = queued["id"].as_i64().unwrap();
    let mut conn = d.raw();
    let sub = conn.call("Run.Follow", json!({"id": id}));
    assert!(sub["result"].is_number(), "{sub}");
    std::fs::write(&gate, "").unwrap();
    let mut out = String::new();
    let end = loop {
        let msg = conn.recv();
        let item = &msg["params"]["result"];
        match item["kind"].as_str() {
            Some("output") => out.push_str(item["data"].as_str().unwrap()),
            Some("end") => break item["run"].clone(),
            _ => panic!("unexpected {msg}"),
        }
    };
    assert_eq!(out, format!("run {id}\n"));
    assert_eq!(end["state"], "succeeded");
}

#[test]
fn an_acknowledged_pause_survives_edit_and_kill_9() {
    let mut d = TestDaemon::start();
    d.call("TaskUnit.Add", json!({"name": "svc", "service": true, "command": ["sleep", "1000"]}));
    d.wait_unit("svc", "the service to run", |u| u["state"] == "running");
    d.call("TaskUnit.Pause", json!("svc"));
    d.call("TaskUnit.Edit", json!({"name": "svc", "description": "still paused"}));
    d.kill9();
    d.restart();
    let u = d.call("TaskUnit.Get", json!("svc"));
    assert_eq!(u["state"], "paused", "{u}");
    assert_eq!(u["definition"]["description"], "still paused");
}

#[test]
fn a_job_added_paused_runs_when_resumed() {
    let d = TestDaemon::start();
    let info =
        d.call("TaskUnit.Add", json!({"name": "later", "command": ["true"], "paused": true}));
    assert_eq!(info["state"], "paused");
    assert!(info["last_run"].is_null());
    let resumed = d.call("TaskUnit.Resume", json!("later"));
    let r = d.wait_run_end(run_id(&resumed));
    assert_eq!(r["trigger"], "add");
    assert_eq!(r["state"], "succeeded");
}

#[test]
fn editing_other_fields_keeps_the_next_fire() {
    let d = TestDaemon::start();
    let info = d.call("TaskUnit.Add", json!({"name": "e", "every": "1h", "command": ["true"]}));
    let edited = d.call("TaskUnit.Edit", json!({"name": "e", "description": "x"}));
    assert_eq!(edited["next_fire"], info["next_fire"]);
    let rescheduled = d.call("TaskUnit.Edit", json!({"name": "e", "every": "2h"}));
    assert_ne!(rescheduled["next_fire"], info["next_fire"]);
}

#[test]
fn stopping_on_purpose_is_not_a_failure() {
    let d = TestDaemon::start();
    d.call("TaskUnit.Add", json!({"name": "svc", "service": true, "command": ["sleep", "1000"], "kill_grace": "200ms"}));
    d.wait_unit("svc", "the service to run", |u| u["state"] == "running");
    d.call("TaskUnit.Stop", json!("svc"));
    let u = d.wait_unit("svc", "the service to stop", |u| u["state"] == "waiting");
    assert_eq!(u["failures_total"], 0);
}

#[test]
fn cwd_and_user_must_exist_at_add() {
    let d = TestDaemon::start();
    let v = d
        .raw()
        .call("TaskUnit.Add", json!({"name": "x", "command": ["true"], "cwd": "/no/such/dir"}));
    assert_eq!(v["error"]["data"]["field"], "cwd", "{v}");
    let v = d.raw().call("TaskUnit.Edit", json!({"name": "nope", "bogus": null}));
    assert_eq!(v["error"]["data"]["field"], "bogus", "{v}");
    assert!(d.call("TaskUnit.List", json!({})).as_array().unwrap().is_empty());
}

#[test]
fn a_second_daemon_on_the_same_state_directory_is_refused() {
    let d = TestDaemon::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskd"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(d.state_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another taskd is already using"), "{err}");
    // The first one is untouched.
    assert_eq!(d.call("Daemon.Status", json!({}))["units"]["total"], 0);
}

#[test]
fn a_daemon_started_with_signals_ignored_still_ignores_them_but_its_children_do_not() {
    let d = TestDaemon::start_ignoring_signals();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "sig", "command": ["grep", "SigIgn", "/proc/self/status"]}),
    );
    let run = d.wait_run_end(run_id(&info));
    assert_eq!(run["state"], "succeeded");
    let logs = d.call("Run.Logs", json!({"id": run["id"]}));
    let mask = logs["data"].as_str().unwrap().trim().trim_start_matches("SigIgn:").trim();
    let mask = u64::from_str_radix(mask, 16).unwrap();
    // Bit n-1 is signal n: HUP 1, INT 2, QUIT 3, PIPE 13, TERM 15.
    let reset = [1, 2, 3, 13, 15].iter().fold(0u64, |m, s| m | 1 << (s - 1));
    assert_eq!(mask & reset, 0, "the child starts with these signals at their default: {logs}");
    // As under nohup: a hangup does not stop the daemon.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert_eq!(d.call("TaskUnit.Get", json!("sig"))["name"], "sig");
    assert!(alive(d.pid() as i32));
}

#[test]
fn a_burst_of_starts_of_one_unit_shares_commits() {
    let d = TestDaemon::start();
    // The add starts the job's first run: let it end first.
    let info =
        d.call("TaskUnit.Add", json!({"name": "burst", "command": ["true"], "overlap": "allow"}));
    d.wait_run_end(run_id(&info));
    let commits = || d.call("Daemon.Status", json!({}))["store_commits"].as_u64().expect("count");
    const N: usize = 200;
    let before = commits();
    let mut c = d.raw();
    let burst: String = (0..N)
        .map(|i| {
            let req = json!({"jsonrpc": "2.0", "id": 100 + i, "method": "TaskUnit.Start", "params": ["burst"]});
            format!("{req}\n")
        })
        .collect();
    c.send(burst.as_bytes());
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..N {
        let v = c.recv();
        let id = v["result"]["id"].as_i64().unwrap_or_else(|| panic!("TaskUnit.Start failed: {v}"));
        ids.insert(id);
    }
    assert_eq!(ids.len(), N, "every start is a run of its own");
    let info = d.wait_unit("burst", "every run ended", |u| {
        u["runs_total"] == N + 1 && u["active_runs"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(info["failures_total"], 0, "{info}");
    // One commit per start and one per end would be 2 × N: the starts waiting together are
    // recorded together, and so are the ends that arrive together.
    let used = commits() - before;
    assert!(used < N as u64 / 2, "{N} runs (starts and ends) took {used} commits");
}

#[test]
fn a_running_runs_pid_and_start_show_in_its_units_last_run() {
    let d = TestDaemon::start();
    d.call("TaskUnit.Add", json!({"name": "svc", "command": ["sleep", "1000"], "service": true}));
    let unit = d.wait_unit("svc", "its run's pid", |u| u["last_run"]["pid"].is_u64());
    let run = d.call("Run.Get", unit["last_run"]["id"].clone());
    assert_eq!(run["state"], "running");
    assert_eq!(unit["last_run"]["pid"], run["pid"], "{unit} vs {run}");
    assert_eq!(unit["last_run"]["started_at"], run["started_at"], "{unit} vs {run}");
    let list = d.call("TaskUnit.List", json!({}));
    assert_eq!(list[0]["last_run"]["pid"], run["pid"], "{list}");
}
