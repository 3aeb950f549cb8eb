//! The example clients of `examples/clients/` (Python, Node.js, Go, curl), each run against a
//! real daemon as a user would run it: each adds a unit, follows its run's output, deletes the
//! unit, and exits 0. Without an interpreter they fail under `CI` and skip loudly elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::common::TestDaemon;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients")
}

/// Whether `program` runs here (`program --version`); outside CI a missing one skips.
fn have(program: &str, package: &str) -> bool {
    let ok = Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(ok || !in_ci, "CI is set but {program} is missing: install {package}");
    if !ok {
        eprintln!("\n!!!!!!!! SKIPPING: no {program} (Debian: {package}) !!!!!!!!\n");
    }
    ok
}

/// Runs `cmd` against a fresh daemon and checks what a user would see.
fn check(mut cmd: Command, lang: &str) {
    let d = TestDaemon::start();
    let out = cmd.env("TASKD_ADDR", &d.addr).env("TASKD_TOKEN", &d.token).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the {lang} client failed: {stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    // `out: `, `err: `, or `log: ` for a piece that holds both streams (Run.Follow).
    let hello = format!(": hello from {lang}");
    assert!(lines.iter().any(|l| l.ends_with(&hello)), "{stdout}");
    assert!(lines.iter().any(|l| l.ends_with(": to stderr") && !l.starts_with("out")), "{stdout}");
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.ends_with("succeeded, exit code 0"), "{stdout}");
    // It deleted its unit.
    assert_eq!(d.call("TaskUnit.List", json!({})), json!([]));
}

#[test]
fn the_python_client_adds_follows_and_deletes() {
    if have("python3", "python3") {
        let mut cmd = Command::new("python3");
        cmd.arg(examples().join("python/taskd_client.py"));
        check(cmd, "python");
    }
}

#[test]
fn the_node_client_adds_follows_and_deletes() {
    if have("node", "nodejs") {
        let mut cmd = Command::new("node");
        cmd.arg(examples().join("node/taskd-client.mjs"));
        check(cmd, "node");
    }
}

#[test]
fn the_go_client_adds_follows_and_deletes() {
    if let Some(bin) = crate::go::go_build("examples/clients/go", "taskd-example-client") {
        check(Command::new(bin), "go");
    }
}

#[test]
fn the_curl_client_adds_follows_and_deletes() {
    if have("curl", "curl") && have("jq", "jq") {
        let mut cmd = Command::new("bash");
        cmd.arg(examples().join("curl/taskd.sh"));
        check(cmd, "curl");
    }
}
