//! Seed 002's Redis queue against a real `redis-server` (started by the test on a free
//! loopback port, persistence off): tasks pushed as the seed pushes them run, their output
//! comes back on `{queue}_logs`, kills stop them, and neither a kill -9 of taskd nor a Redis
//! restart loses or repeats one.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use redis::Commands;
use serde_json::{Value, json};

use crate::agents::TestAgent;
use crate::common::{TestDaemon, wait_for};

/// A throwaway `redis-server` on a free loopback port, killed when dropped.
struct TestRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TestRedis {
    /// Starts one, or `None` (outside CI) when Redis is not installed.
    fn start() -> Option<TestRedis> {
        let have = Command::new("redis-server").arg("--version").output().is_ok();
        let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        assert!(have || !in_ci, "CI is set but redis-server is missing: install redis-server");
        if !have {
            eprintln!("\n!!!!!!!! SKIPPING: no redis-server (Debian: redis-server) !!!!!!!!\n");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut r = TestRedis { port, dir: tempfile::tempdir().unwrap(), child: None };
        r.spawn();
        Some(r)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .args(["--appendonly", "no", "--daemonize", "no", "--dir"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_for("redis to answer", || {
            let mut c = self.client().get_connection().ok()?;
            redis::cmd("PING").query::<String>(&mut c).ok()
        });
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("connect to redis")
    }

    /// Kills it (its data goes with it) and waits for it to exit.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The daemon's name in these tests: its processing lists are `…_processing:q1`.
const NAME: &str = "q1";
const PROCESSING: &str = "queue_job_task_processing:q1";

/// A daemon named [`NAME`] taking tasks from `r` (with `extra` lines of `taskd.toml`), running
/// them in a directory of the test's own.
fn daemon(r: &TestRedis, logs: bool, extra: &str) -> (TestDaemon, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    let config = format!(
        "{extra}\n[redis]\nurl = \"{}\"\ncmd_dir = \"{}\"\nlogs = {logs}\n",
        r.url(),
        work.path().display()
    );
    (TestDaemon::start_with_config(&config, &["--name", NAME]), work)
}

/// The next message of `{queue}_logs` (waits up to 30 s).
fn next_log(c: &mut redis::Connection) -> Value {
    let got: Option<(String, String)> = c.blpop("queue_job_task_logs", 30.0).unwrap();
    serde_json::from_str(&got.expect("a log message within 30 s").1).unwrap()
}

#[test]
fn the_seeds_tasks_run_push_their_output_and_are_killed_through_control() {
    let Some(r) = TestRedis::start() else { return };
    let (d, work) = daemon(&r, true, "");
    let mut c = r.conn();
    // Exactly as the seed pushes one (its own example command would not exist here).
    let _: () = c
        .rpush(
            "queue_job_task",
            r#"{"id":"101","type":"test","task":{"cmdline":"echo hello; pwd; echo oops >&2","cmd_args":["&&","exit","3"],"timeout":3600}}"#,
        )
        .unwrap();
    let u = d.wait_unit("redis-101", "its run ended", |u| u["last_run"]["state"] == "failed");
    assert_eq!(u["last_run"]["exit_code"], 3);
    let mk = |t: &str, d: &str| json!({"id": "101", "type": "test", "msg_type": t, "data": d});
    let cwd = work.path().canonicalize().unwrap().display().to_string();
    // Each stream's lines in their order (stdout and stderr are two pipes, read side by
    // side: their lines may interleave either way), then `done`.
    let lines: Vec<Value> = (0..3).map(|_| next_log(&mut c)).collect();
    let of = |t: &str| lines.iter().filter(|l| l["msg_type"] == t).cloned().collect::<Vec<_>>();
    assert_eq!(of("stdout"), [mk("stdout", "hello"), mk("stdout", &cwd)], "{lines:?}");
    assert_eq!(of("stderr"), [mk("stderr", "oops")], "{lines:?}");
    assert_eq!(next_log(&mut c), mk("done", "3"));
    // Lines are pushed as they are written, not when the run ends; the task's id is in its
    // command's environment.
    let _: () = c
        .rpush(
            "queue_job_task",
            r#"{"id":"104","type":"live","task":{"cmdline":"echo first $TASKD_TASK_ID; while [ ! -e go ]; do sleep 0.05; done; echo second"}}"#,
        )
        .unwrap();
    let first = next_log(&mut c);
    assert_eq!((first["id"].as_str(), first["data"].as_str()), (Some("104"), Some("first 104")));
    assert_eq!(d.call("TaskUnit.Get", json!("redis-104"))["last_run"]["state"], "running");
    std::fs::write(work.path().join("go"), "").unwrap();
    let mk = |t: &str, d: &str| json!({"id": "104", "type": "live", "msg_type": t, "data": d});
    assert_eq!(next_log(&mut c), mk("stdout", "second"));
    assert_eq!(next_log(&mut c), mk("done", "0"));

    // A malformed item is dropped; the consumer goes on with the next.
    let _: () = c.rpush("queue_job_task", b"\xff\xfe not UTF-8".as_slice()).unwrap();
    let _: () = c.rpush("queue_job_task", "{not json").unwrap();
    let _: () = c.rpush("queue_job_task", r#"{"id":"102","task":{}}"#).unwrap();
    let _: () = c
        .rpush("queue_job_task", r#"{"id":"103","type":"long","task":{"cmdline":"sleep 60"}}"#)
        .unwrap();
    d.wait_unit("redis-103", "its run started", |u| u["last_run"]["state"] == "running");
    let _: () = c.rpush("queue_job_task_control", r#"{"id":"103","type":"kill"}"#).unwrap();
    let u = d.wait_unit("redis-103", "killed", |u| u["last_run"]["state"] == "cancelled");
    assert!(u["last_run"]["ended_at"].is_string());
    let done = next_log(&mut c);
    assert_eq!((done["id"].as_str(), done["msg_type"].as_str()), (Some("103"), Some("done")));
    assert_eq!(done["data"], "143", "SIGTERM: 128 + 15");
    for list in ["queue_job_task", PROCESSING, "queue_job_task_control_processing:q1"] {
        let n: usize = c.llen(list).unwrap();
        assert_eq!(n, 0, "{list}");
    }
    assert!(d.log().contains("malformed task dropped"), "{}", d.log());
    assert!(d.log().contains("not UTF-8 dropped"), "{}", d.log());
    let units = d.call("TaskUnit.List", json!({}));
    let names: Vec<&str> =
        units.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["redis-101", "redis-103", "redis-104"]);
}

#[test]
fn no_task_is_lost_or_repeated_across_a_kill_9_of_taskd_or_a_redis_restart() {
    let Some(mut r) = TestRedis::start() else { return };
    let (mut d, _work) = daemon(&r, false, "");
    let mut c = r.conn();
    const N: usize = 40;
    for i in 0..N {
        let item = json!({"id": format!("t{i}"), "type": "x", "task": {"cmdline": "true"}});
        let _: () = c.rpush("queue_job_task", item.to_string()).unwrap();
    }
    // kill -9 as soon as the queue is drained: some tasks may be between the two lists.
    wait_for("the queue drained", || {
        (c.llen::<_, usize>("queue_job_task").unwrap() == 0).then_some(())
    });
    d.kill9();
    // What a crash between the two steps leaves: a task taken and recorded (its unit exists),
    // and one taken and not recorded.
    let t0 = json!({"id": "t0", "type": "x", "task": {"cmdline": "true"}}).to_string();
    let late = json!({"id": "late", "type": "x", "task": {"cmdline": "true"}}).to_string();
    let _: () = c.rpush(PROCESSING, vec![t0, late]).unwrap();
    d.restart();
    let mut raw = d.raw();
    wait_for("every task recorded once", || {
        let v = raw.call("TaskUnit.List", json!({}));
        (v["result"].as_array()?.len() == N + 1).then_some(())
    });
    wait_for("the processing list emptied", || {
        (c.llen::<_, usize>(PROCESSING).unwrap() == 0).then_some(())
    });
    let u = d.wait_unit("redis-late", "its run ended", |u| u["last_run"]["ended_at"].is_string());
    assert_eq!(u["runs_total"], 1);
    for i in 0..N {
        let u = d.wait_unit(&format!("redis-t{i}"), "its run ended", |u| {
            u["last_run"]["ended_at"].is_string()
        });
        assert_eq!(u["runs_total"], 1, "redis-t{i} ran once: {u}");
    }

    // Redis goes away: the API keeps serving; when it is back, tasks are taken again.
    r.kill();
    let status = d.call("Daemon.Status", json!({}));
    assert!(status.is_object());
    r.spawn();
    let mut c = r.conn();
    let _: () = c.rpush("queue_job_task", r#"{"id":"after","task":{"cmdline":"true"}}"#).unwrap();
    d.wait_unit("redis-after", "its run succeeded", |u| u["last_run"]["state"] == "succeeded");
    assert!(d.log().contains("redis: unreachable"), "{}", d.log());
}

#[test]
fn tasks_wait_in_redis_while_taskd_holds_as_many_units_as_it_may() {
    let Some(r) = TestRedis::start() else { return };
    let (d, _work) = daemon(&r, false, "max_units = 2");
    let mut c = r.conn();
    for id in ["a", "b", "c"] {
        let item = json!({"id": id, "task": {"cmdline": "true"}}).to_string();
        let _: () = c.rpush("queue_job_task", item).unwrap();
    }
    d.wait_unit("redis-b", "b recorded", |u| u["last_run"]["ended_at"].is_string());
    // The third waits, taken but not dropped, until there is room.
    wait_for("c waiting", || (c.llen::<_, usize>(PROCESSING).unwrap() == 1).then_some(()));
    wait_for("the wait logged", || d.log().contains("stays queued").then_some(()));
    d.call("TaskUnit.Delete", json!("redis-a"));
    d.wait_unit("redis-c", "c recorded", |u| u["last_run"]["state"] == "succeeded");
    assert_eq!(c.llen::<_, usize>(PROCESSING).unwrap(), 0);
}

#[test]
fn a_task_running_on_an_agent_goes_on_pushing_its_output_after_taskd_restarts() {
    let Some(r) = TestRedis::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let config = format!(
        "[redis]\nurl = \"{}\"\ncmd_dir = \"{}\"\nhosts = [\"h1\"]\nlogs = true\n",
        r.url(),
        work.path().display()
    );
    let mut d = TestDaemon::start_with_config(&config, &["--name", NAME]);
    let _agent = TestAgent::enroll(&d, "h1", "");
    let mut c = r.conn();
    let task = r#"{"id":"a1","type":"far","task":{"cmdline":"echo before; while [ ! -e go ]; do sleep 0.05; done; echo after"}}"#;
    let _: () = c.rpush("queue_job_task", task).unwrap();
    let mk = |t: &str, d: &str| json!({"id": "a1", "type": "far", "msg_type": t, "data": d});
    assert_eq!(next_log(&mut c), mk("stdout", "before"));
    d.kill9();
    d.restart_on_same_port();
    crate::agents::wait_connected(&d, "h1");
    std::fs::write(work.path().join("go"), "").unwrap();
    assert_eq!(next_log(&mut c), mk("stdout", "after"));
    assert_eq!(next_log(&mut c), mk("done", "0"));
    let n: usize = c.llen("queue_job_task_logs").unwrap();
    assert_eq!(n, 0, "nothing pushed twice");
}
