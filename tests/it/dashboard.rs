//! The web dashboard (SPEC §13) in a real headless Chromium: `tests/browser/dashboard.mjs`
//! (playwright-core driving Debian's `chromium`) signs in, watches units appear and runs
//! follow live, cancels a run, meets a validation error at its field, watches a dispatch grid
//! of two real agents fill in, and is refused a WebSocket from another origin. Without
//! Chromium or the npm package it fails under `CI` and skips loudly elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::agents::TestAgent;
use crate::common::TestDaemon;

fn browser_tests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Whether Chromium, Node.js and playwright-core are here; outside CI a missing one skips.
fn ready() -> bool {
    let missing: Vec<&str> = [
        (Path::new("/usr/bin/chromium").exists(), "chromium (Debian: chromium)"),
        (
            Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success()),
            "node (Debian: nodejs)",
        ),
        (
            browser_tests().join("node_modules/playwright-core").exists(),
            "playwright-core (npm ci in tests/browser)",
        ),
    ]
    .into_iter()
    .filter_map(|(ok, what)| (!ok).then_some(what))
    .collect();
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(missing.is_empty() || !in_ci, "CI is set but these are missing: {missing:?}");
    if !missing.is_empty() {
        eprintln!("\n!!!!!!!! SKIPPING the dashboard's browser tests: no {missing:?} !!!!!!!!\n");
    }
    missing.is_empty()
}

#[test]
fn the_dashboard_works_in_a_real_browser() {
    if !ready() {
        return;
    }
    let d = TestDaemon::start();
    let _h1 = TestAgent::enroll(&d, "web-01", "");
    let _h2 = TestAgent::enroll(&d, "web-02", "");
    let out = Command::new("node")
        .arg(browser_tests().join("dashboard.mjs"))
        .env("TASKD_ADDR", &d.addr)
        .env("TASKD_TOKEN", &d.token)
        .env("TASKD_HOSTS", "web-01,web-02")
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser checks failed:\n{stdout}\n{stderr}");
    // Every check ran (none was left out by a missing agent).
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 15, "{stdout}");
}
