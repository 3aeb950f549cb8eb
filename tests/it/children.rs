//! What a run's process gets from the daemon besides its definition: no file descriptor but
//! 0, 1 and 2.

use serde_json::{Value, json};

use crate::common::TestDaemon;

fn run_id(v: &Value) -> i64 {
    v["last_run"]["id"].as_i64().unwrap_or_else(|| panic!("no last run in {v}"))
}

/// Adds `def`, waits for the run it starts, checks that it succeeded and returns its stdout.
fn output_of(d: &TestDaemon, def: Value) -> String {
    let info = d.call("TaskUnit.Add", def);
    let run = d.wait_run_end(run_id(&info));
    assert_eq!(run["state"], "succeeded", "{run}");
    d.call("Run.Logs", json!({"id": run["id"], "stream": "stdout"}))["data"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Prints the descriptors open in the shell, one a line, but for two of its own:
/// - the glob reads `/proc/$$/fd` through a descriptor that is listed too, and closed once the
///   glob is expanded: `[ -e ]` (a builtin, a stat, which opens nothing) leaves it out;
/// - a shell running a script reads the script through a descriptor (dash's is 10): the one
///   whose target is the script itself, `$0`. (For `sh -c`, `$0` is `sh`, no file.)
const LIST_FDS: &str = r#"for f in /proc/$$/fd/*; do
    if [ -e "$f" ] && [ "$(readlink "$f")" != "$0" ]; then echo "${f##*/}"; fi
done"#;

/// Leaves descriptors 7 and 42 open on `/etc/passwd` without close-on-exec, as a shell script
/// that starts the daemon might (`exec 7</etc/passwd`). Runs in the daemon's process before it
/// execs: only async-signal-safe calls.
fn leak_descriptors() -> std::io::Result<()> {
    // SAFETY: open, dup2 and close are async-signal-safe and get a valid C string.
    unsafe {
        let fd = libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for target in [7, 42] {
            if fd != target && libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if fd != 7 && fd != 42 {
            libc::close(fd);
        }
    }
    Ok(())
}

/// The descriptors open in process `pid`.
fn open_fds(pid: u32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    fds.sort();
    fds
}

#[test]
fn runs_inherit_no_descriptor_but_stdin_stdout_and_stderr() {
    let d = TestDaemon::start_with_pre_exec(&[], leak_descriptors);
    let daemon_fds = open_fds(d.pid());
    assert!(
        daemon_fds.contains(&"7".into()) && daemon_fds.contains(&"42".into()),
        "the daemon was to inherit descriptors 7 and 42: {daemon_fds:?}"
    );
    let out = output_of(&d, json!({"name": "fds", "command": ["sh", "-c", LIST_FDS]}));
    assert_eq!(out, "0\n1\n2\n", "the run inherited more than stdin, stdout and stderr");
    // A script run too: its interpreter is given the script's path and opens it itself.
    let out = output_of(&d, json!({"name": "fds-script", "script": LIST_FDS}));
    assert_eq!(out, "0\n1\n2\n", "the script run inherited more than stdin, stdout and stderr");
}
