//! What a run's process gets from the daemon besides its definition: no file descriptor but
//! 0, 1 and 2, the umask the daemon was started with (while the daemon itself keeps 0077), and
//! a working directory checked where it leads, at `Add` and again before each spawn.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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

/// Starts the daemon with umask 0027, which neither the usual 0022 nor the daemon's own 0077.
fn umask_027() -> std::io::Result<()> {
    // SAFETY: umask is async-signal-safe and cannot fail.
    unsafe { libc::umask(0o027) };
    Ok(())
}

/// The `Umask:` line of `/proc/<pid>/status`.
fn umask_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).expect("a Umask line");
    line.trim_start_matches("Umask:").trim().to_string()
}

#[test]
fn runs_start_with_the_umask_the_daemon_was_started_with_while_the_daemon_keeps_0077() {
    let d = TestDaemon::start_with_pre_exec(&[], umask_027);
    assert_eq!(umask_of(d.pid()), "0077", "the daemon's own umask");
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made");
    let out = output_of(
        &d,
        json!({"name": "umask", "command": ["sh", "-c", "umask; echo x > \"$0\"", made]}),
    );
    assert_eq!(out, "0027\n");
    let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "a file the run created: {mode:o}");
    // Meanwhile what the daemon creates is its own: the run's log file, written on the log
    // writer's thread.
    let logs = d.state_dir().join("logs");
    for entry in std::fs::read_dir(&logs).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.path().display());
    }
    assert_eq!(umask_of(d.pid()), "0077", "the daemon's umask after spawning");
}

/// Writes `taskd.toml` with `toml` into `dir` and returns the flags that make a daemon read it.
fn config_flags(dir: &Path, toml: &str) -> Vec<String> {
    let path = dir.join("taskd.toml");
    std::fs::write(&path, toml).unwrap();
    vec!["--config".into(), path.display().to_string()]
}

/// Asks for `def` to be added and returns the refusal, checking it names `field`.
fn refusal(d: &TestDaemon, def: Value, field: &str) -> String {
    let v = d.raw().call("TaskUnit.Add", def);
    assert_eq!(v["error"]["data"]["field"], field, "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn cwd_is_checked_where_it_leads_at_add_and_again_before_each_spawn() {
    let tmp = tempfile::tempdir().unwrap();
    let allowed = tmp.path().join("allowed");
    std::fs::create_dir_all(allowed.join("swapped")).unwrap();
    std::os::unix::fs::symlink("/etc", allowed.join("link")).unwrap();
    let toml = format!("allowed_dirs = [{:?}]\n", allowed.display().to_string());
    let flags = config_flags(tmp.path(), &toml);
    let d = TestDaemon::start_with(&flags.iter().map(String::as_str).collect::<Vec<_>>());

    // A symlink inside the allowed directory leads to /etc; `link/..` to `/`.
    let pwd = |name: &str, cwd: &Path| json!({"name": name, "command": ["pwd"], "cwd": cwd});
    let m = refusal(&d, pwd("link", &allowed.join("link")), "cwd");
    assert!(m.contains("leads to /etc") && m.contains("not under an allowed directory"), "{m}");
    let m = refusal(&d, pwd("up", &allowed.join("link/..")), "cwd");
    assert!(m.contains("leads to /)"), "{m}");
    let m = refusal(&d, pwd("missing", &allowed.join("missing")), "cwd");
    assert!(m.contains("does not exist"), "{m}");

    // Allowed at Add, and its first run starts there.
    let dir = allowed.join("swapped");
    assert_eq!(
        output_of(&d, pwd("swap", &dir)),
        format!("{}\n", dir.canonicalize().unwrap().display())
    );
    // Then the directory is swapped for a symlink to /etc: the next run does not start.
    std::fs::remove_dir(&dir).unwrap();
    std::os::unix::fs::symlink("/etc", &dir).unwrap();
    let run = d.call("TaskUnit.Start", json!("swap"));
    let run = d.wait_run_end(run["id"].as_i64().unwrap());
    assert_eq!(run["state"], "failed", "{run}");
    assert!(run["pid"].is_null(), "a process was started: {run}");
    assert_eq!(run["stdout_bytes"], 0, "{run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(reason.contains("cwd") && reason.contains("leads to /etc"), "{reason}");
}

/// Whether this process may run units as other accounts (root). Outside CI a test that needs
/// it skips, saying so loudly; in CI (`CI` set) it fails instead.
fn can_switch_users(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(!in_ci, "CI is set but {test} cannot run units as other accounts: it needs root");
    eprintln!(
        "\n!!!!!!!! SKIPPING {test}: running units as other accounts needs root. In CI it \
         fails. !!!!!!!!\n"
    );
    false
}

const ROOT_WARNING: &str = "any client can run commands as any account, root included";

#[test]
fn allowed_users_limits_the_accounts_units_run_as_at_add_and_before_each_spawn() {
    if !can_switch_users("allowed_users_limits_the_accounts_units_run_as") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let flags = config_flags(tmp.path(), "allowed_users = [\"nobody\"]\n");
    let mut d = TestDaemon::start_with(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!d.log().contains(ROOT_WARNING), "warned although allowed_users is set");

    let id = |name: &str, user: &str| json!({"name": name, "command": ["id", "-un"], "user": user});
    let m = refusal(&d, id("as-root", "root"), "user");
    assert!(m.contains("\"root\" is not one of the daemon's allowed_users (nobody)"), "{m}");
    assert_eq!(output_of(&d, id("as-nobody", "nobody")), "nobody\n");
    // The same account by its uid.
    let uid = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid.to_string();
    assert_eq!(output_of(&d, id("as-65534", &uid)), "nobody\n");

    // Restarted with another list, the unit is still there, but its runs do not start.
    d.terminate();
    std::fs::write(tmp.path().join("taskd.toml"), "allowed_users = [\"daemon\"]\n").unwrap();
    d.restart();
    let run = d.call("TaskUnit.Start", json!("as-nobody"));
    let run = d.wait_run_end(run["id"].as_i64().unwrap());
    assert_eq!(run["state"], "failed", "{run}");
    assert!(run["pid"].is_null(), "a process was started: {run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(reason.contains("\"nobody\" is not one of the daemon's allowed_users"), "{reason}");
}

#[test]
fn a_root_daemon_without_allowed_users_warns_and_taskd_allowed_users_is_a_list() {
    if !can_switch_users("a_root_daemon_without_allowed_users_warns") {
        return;
    }
    let d = TestDaemon::start();
    assert!(d.log().contains(ROOT_WARNING), "no warning:\n{}", d.log());
    let d = TestDaemon::start_with_env(&[], &[("TASKD_ALLOWED_USERS", "daemon,nobody")]);
    assert!(!d.log().contains(ROOT_WARNING), "warned although allowed_users is set");
    let m = refusal(&d, json!({"name": "r", "command": ["true"], "user": "root"}), "user");
    assert!(m.contains("allowed_users (daemon, nobody)"), "{m}");
}

/// Where a run as `name` without `cwd` should start: its home directory, or `/` without one.
fn home_of(name: &str) -> String {
    let home = nix::unistd::User::from_name(name).unwrap().unwrap().dir;
    match home.canonicalize() {
        Ok(home) if home.is_dir() => home.display().to_string(),
        _ => "/".into(),
    }
}

#[test]
fn a_unit_with_a_user_and_no_cwd_starts_in_that_accounts_home() {
    if !can_switch_users("a_unit_with_a_user_and_no_cwd_starts_in_that_accounts_home") {
        return;
    }
    let d = TestDaemon::start();
    for user in ["root", "nobody"] {
        let out = output_of(&d, json!({"name": user, "command": ["pwd"], "user": user}));
        assert_eq!(out, format!("{}\n", home_of(user)), "a run as {user}");
    }
    // Without `user`, the state directory's work/ as before.
    let out = output_of(&d, json!({"name": "daemon", "command": ["pwd"]}));
    let work = d.state_dir().join("work").canonicalize().unwrap();
    assert_eq!(out, format!("{}\n", work.display()));
}

#[test]
fn scripts_are_readable_by_the_daemons_account_only() {
    let d = TestDaemon::start();
    let out = output_of(&d, json!({"name": "s", "script": "stat -c '%a' \"$0\"; dirname \"$0\""}));
    let scripts = d.state_dir().join("scripts");
    assert_eq!(out, format!("600\n{}\n", scripts.display()));
}

#[test]
fn scripts_of_units_with_a_user_are_that_accounts_alone_and_removed_after_the_run() {
    if !can_switch_users("scripts_of_units_with_a_user_are_that_accounts_alone") {
        return;
    }
    let d = TestDaemon::start();
    // As the state directory will be: nobody but the daemon's account may enter it.
    std::fs::set_permissions(d.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let script = "#!/bin/sh\nid -un\nstat -c '%U %a' \"$0\"\necho \"$0\"\n";
    let out = output_of(&d, json!({"name": "s", "script": script, "user": "nobody"}));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["nobody", "nobody 400"], "{out}");
    let path = Path::new(lines[2]);
    assert!(!path.starts_with(d.state_dir()), "{}", path.display());
    // Removed once the run has ended (the removal is not awaited by the run).
    crate::common::wait_for("the script to be removed", || (!path.exists()).then_some(()));
    // And descriptors stay closed for a run that switches accounts (it forks to do so).
    let out = output_of(&d, json!({"name": "fds", "script": LIST_FDS, "user": "nobody"}));
    assert_eq!(out, "0\n1\n2\n", "the run as nobody inherited more than stdin, stdout and stderr");
    let out =
        output_of(&d, json!({"name": "umask", "command": ["sh", "-c", "umask"], "user": "nobody"}));
    let mine = umask_of(std::process::id());
    assert_eq!(out, format!("{mine}\n"), "a run as nobody: the umask taskd was started with");
}
