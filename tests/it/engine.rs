//! The engine through the API: runs, schedules, services, stops, recovery.

use serde_json::json;

use crate::common::TestDaemon;

#[test]
fn a_one_shot_job_runs_at_add_and_records_its_output() {
    let d = TestDaemon::start();
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "hello", "command": ["sh", "-c", "echo hi; echo oops >&2; exit 3"]}),
    );
    let run = info["last_run"]["id"].as_i64().expect("the add started a run");
    let r = d.wait_run_end(run);
    assert_eq!(r["state"], "failed");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["trigger"], "add");
    let out = d.call("Run.Logs", json!({"id": run, "stream": "stdout"}));
    assert_eq!(out["data"], "hi\n");
    let err = d.call("Run.Logs", json!({"id": run, "stream": "stderr"}));
    assert_eq!(err["data"], "oops\n");
}
