//! Faults from outside: a full or read-only state directory, a run's log file deleted under
//! it, a job that daemonizes, a stored definition this version cannot load. (A missing
//! program, a child that ignores SIGTERM and processes that leave the run's group are in
//! `engine.rs`.)
//!
//! The disk tests mount a small tmpfs, which needs root or CAP_SYS_ADMIN: without it they
//! fail in CI (`CI` set) and skip loudly elsewhere.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use taskd::error::codes;

use crate::common::{TestDaemon, alive, wait_for};

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with `options` (`size=8m`, …) on `at`; `None` (after saying so) when
    /// this environment cannot mount outside CI.
    fn mount(at: &Path, options: &str) -> Option<Tmpfs> {
        let target = CString::new(at.as_os_str().as_bytes()).expect("path");
        let data = CString::new(format!("{options},mode=0700")).expect("options");
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if r == 0 {
            return Some(Tmpfs(at.to_path_buf()));
        }
        let e = std::io::Error::last_os_error();
        let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        assert!(
            !in_ci,
            "CI is set but a tmpfs cannot be mounted on {} ({e}): the state-directory fault \
             tests need root or CAP_SYS_ADMIN",
            at.display()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPING a state-directory fault test: cannot mount a tmpfs ({e}); it \
             needs root or CAP_SYS_ADMIN. In CI it fails. !!!!!!!!\n"
        );
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path; a lazy unmount cannot fail on a busy mount.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Writes a file in `dir` until the file system has no room left; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    for chunk in [1 << 16, 4096, 1] {
        let buf = vec![b'x'; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    path
}

fn run_id(v: &Value) -> i64 {
    v["last_run"]["id"].as_i64().unwrap_or_else(|| panic!("no last run in {v}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array().expect("a list").iter().map(|u| u["name"].as_str().expect("a name")).collect()
}

#[test]
fn a_full_disk_refuses_changes_keeps_serving_reads_and_recovers() {
    let base = tempfile::tempdir().unwrap();
    let state = base.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let Some(_fs) = Tmpfs::mount(&state, "size=8m") else { return };
    let mut d = TestDaemon::start_at(&state, &base.path().join("daemon.log"));
    let before = d.call("TaskUnit.Add", json!({"name": "before", "command": ["echo", "hello"]}));
    let before_run = d.wait_run_end(run_id(&before));
    assert_eq!(before_run["state"], "succeeded");
    // A job that writes more than there is room for once it is let go.
    let go = base.path().join("go");
    let script = format!(
        "echo start; until [ -e {} ]; do sleep 0.02; done; head -c 100000 /dev/zero | tr '\\0' x; \
         echo; echo end",
        go.display()
    );
    let ender = d.call("TaskUnit.Add", json!({"name": "ender", "command": ["sh", "-c", script]}));
    let ender_run = run_id(&ender);
    wait_for("the job's first line", || {
        (d.call("Run.Logs", json!({"id": ender_run}))["data"] == "start\n").then_some(())
    });

    let filler = fill(&state);
    let mut c = d.raw();
    // Changes are refused with a storage error that says why, and change nothing.
    let r = c.call("TaskUnit.Add", json!({"name": "during", "command": ["true"]}));
    assert_eq!(r["error"]["code"], codes::STORAGE, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("disk is full"), "{r}");
    let r = c.call("TaskUnit.Start", json!("before"));
    assert_eq!(r["error"]["code"], codes::STORAGE, "{r}");
    // Reads go on.
    let r = c.call("TaskUnit.Get", json!("during"));
    assert_eq!(r["error"]["code"], codes::UNIT_NOT_FOUND, "{r}");
    assert_eq!(names(&c.call("TaskUnit.List", json!({}))["result"]), ["before", "ender"]);
    assert_eq!(c.call("Run.Get", json!(before_run["id"]))["result"]["state"], "succeeded");
    let r = c.call("Run.List", json!({"unit": "before"}));
    assert_eq!(r["result"].as_array().map(Vec::len), Some(1), "{r}");
    let r = c.call("Run.Logs", json!({"id": before_run["id"]}));
    assert_eq!(r["result"]["data"], "hello\n", "{r}");
    assert_eq!(c.call("Daemon.Status", json!({}))["result"]["units"]["total"], 2);
    // The job ends while nothing can be written: its output and its end cannot be stored.
    std::fs::write(&go, "").unwrap();
    d.wait_unit("ender", "the job to end", |u| u["state"] == "done");
    assert!(c.call("Run.Get", json!(ender_run)).get("result").is_some());

    std::fs::remove_file(filler).unwrap();
    // Its end is recorded once there is room; the output that could not be written is cut.
    let r = d.wait_run_end(ender_run);
    assert_eq!((&r["state"], &r["exit_code"]), (&json!("succeeded"), &json!(0)), "{r}");
    assert_eq!(r["stdout_bytes"], 6 + 100_001 + 4, "{r}");
    assert_eq!(r["truncated"], true, "{r}");
    let logs = d.call("Run.Logs", json!({"id": ender_run}));
    assert!(logs["data"].as_str().unwrap().starts_with("start\n"), "{logs}");
    assert_eq!(logs["truncated"], true);
    // Changes work again.
    let after = d.call("TaskUnit.Add", json!({"name": "after", "command": ["true"]}));
    assert_eq!(d.wait_run_end(run_id(&after))["state"], "succeeded");
    let db = rusqlite::Connection::open_with_flags(
        state.join("taskd.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    drop(db);
    // Everything acknowledged survives kill -9; nothing refused appears.
    d.kill9();
    d.restart();
    assert_eq!(names(&d.call("TaskUnit.List", json!({}))), ["after", "before", "ender"]);
    assert_eq!(d.call("Run.Get", json!(ender_run))["state"], "succeeded");
}

#[test]
fn an_unwritable_state_directory_is_refused_at_start() {
    let base = tempfile::tempdir().unwrap();
    let state = base.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let Some(_fs) = Tmpfs::mount(&state, "size=1m,ro") else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_taskd"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .expect("run taskd");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*state.to_string_lossy()) && err.contains("Read-only"), "{err}");
}

#[test]
fn a_log_file_deleted_under_a_running_run() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let go = tmp.path().join("go");
    let script = format!("echo one; until [ -e {} ]; do sleep 0.02; done; echo two", go.display());
    let info = d.call("TaskUnit.Add", json!({"name": "chatty", "command": ["sh", "-c", script]}));
    let id = run_id(&info);
    wait_for("the first line", || {
        (d.call("Run.Logs", json!({"id": id}))["data"] == "one\n").then_some(())
    });
    std::fs::remove_file(d.state_dir().join("logs").join(format!("{id}.log"))).unwrap();
    // The file is gone: there is nothing to show, and no error.
    let logs = d.call("Run.Logs", json!({"id": id}));
    assert_eq!((&logs["data"], &logs["eof"]), (&json!(""), &json!(true)), "{logs}");
    std::fs::write(&go, "").unwrap();
    // The run goes on writing (to the deleted file) and ends normally, its output counted.
    let r = d.wait_run_end(id);
    assert_eq!((&r["state"], &r["exit_code"]), (&json!("succeeded"), &json!(0)), "{r}");
    assert_eq!(r["stdout_bytes"], 8);
    assert_eq!(d.call("Run.Logs", json!({"id": id}))["data"], "");
    // The unit's next run has its log as usual.
    let next = d.call("TaskUnit.Start", json!("chatty"))["id"].as_i64().unwrap();
    d.wait_run_end(next);
    assert_eq!(d.call("Run.Logs", json!({"id": next}))["data"], "one\ntwo\n");
}

#[test]
fn a_job_that_daemonizes_leaves_nothing_behind() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("daemon.pid");
    // The classic double fork: a subshell starts a process in a session of its own and exits,
    // so the process is reparented; the job ends once it has written its pid.
    let p = pid_file.display();
    let script = format!(
        "(setsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000' &); \
         until [ -s {p} ]; do sleep 0.01; done"
    );
    let info = d.call("TaskUnit.Add", json!({"name": "forker", "command": ["sh", "-c", script]}));
    let r = d.wait_run_end(run_id(&info));
    assert_eq!(r["state"], "succeeded", "{r}");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    wait_for(&format!("the daemonized pid {pid} to be gone"), || (!alive(pid)).then_some(()));
}

#[test]
fn a_stored_unit_that_no_longer_loads_keeps_its_name_until_deleted() {
    let mut d = TestDaemon::start();
    d.call("TaskUnit.Add", json!({"name": "old", "command": ["true"], "every": "1h"}));
    d.terminate();
    // As if written by a different version: a field this one does not know.
    let db = rusqlite::Connection::open(d.state_dir().join("taskd.db")).unwrap();
    let def = r#"{"name": "old", "command": ["true"], "every": "1h", "from_the_future": 1}"#;
    db.execute("UPDATE units SET definition = ?1 WHERE name = 'old'", [def]).unwrap();
    drop(db);
    d.restart();
    let mut c = d.raw();
    assert_eq!(names(&c.call("TaskUnit.List", json!({}))["result"]), Vec::<&str>::new());
    let r = c.call("TaskUnit.Add", json!({"name": "old", "command": ["true"]}));
    assert_eq!(r["error"]["code"], codes::UNIT_EXISTS, "{r}");
    assert_eq!(c.call("TaskUnit.Delete", json!("old"))["result"], true);
    let r = c.call("TaskUnit.Delete", json!("old"));
    assert_eq!(r["error"]["code"], codes::UNIT_NOT_FOUND, "{r}");
    d.call("TaskUnit.Add", json!({"name": "old", "command": ["true"], "every": "1h"}));
    d.kill9();
    d.restart();
    assert_eq!(names(&d.call("TaskUnit.List", json!({}))), ["old"]);
}
