//! Files put on hosts (SPEC §10.7): `taskctl push` against a real daemon and real agents,
//! each a `taskd agent` process. The agents share this machine's file system, so each host's
//! run is checked through the daemon (what it recorded) and the file through the disk.

use serde_json::{Value, json};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::agents::TestAgent;
use crate::common::{TestDaemon, make_private, wait_for};

/// `n` bytes that do not repeat in any way a file system could take a short cut on.
pub(crate) fn random_file(dir: &Path, name: &str, n: usize) -> std::path::PathBuf {
    let mut data = vec![0u8; n];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// The runs of the newest dispatch of the newest `push-*` unit, by host.
fn host_runs(d: &TestDaemon) -> Vec<Value> {
    let d0 = d.call("Dispatch.List", json!({"limit": 1}));
    let id = d0[0]["id"].clone();
    let mut runs = d.call("Dispatch.Get", id)["runs"].as_array().cloned().unwrap_or_default();
    runs.sort_by_key(|r| r["host"].as_str().unwrap_or_default().to_string());
    runs
}

/// `taskctl push SRC --hosts HOSTS --dest DEST EXTRA…`: whether it exited 0, and what it said.
fn push_to(d: &TestDaemon, src: &str, hosts: &str, dest: &str, extra: &[&str]) -> (bool, String) {
    push(d, &[&[src, "--hosts", hosts, "--dest", dest], extra].concat())
}

fn push(d: &TestDaemon, args: &[&str]) -> (bool, String) {
    let out = d.taskctl(&[&["push"], args].concat());
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn a_pushed_file_lands_whole_with_its_mode_then_is_unchanged() {
    let d = TestDaemon::start();
    let _agents: Vec<TestAgent> =
        ["web-1", "web-2", "web-3"].iter().map(|n| TestAgent::enroll(&d, n, "")).collect();
    let work = tempfile::tempdir().unwrap();
    let src = random_file(work.path(), "app.bin", 3 << 20);
    let dest = work.path().join("out/app.bin");
    std::fs::create_dir(work.path().join("out")).unwrap();
    let dest_s = dest.to_str().unwrap();
    let (ok, said) =
        push_to(&d, src.to_str().unwrap(), "web-1,web-2,web-3", dest_s, &["--mode", "0640"]);
    assert!(ok, "{said}");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
    assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o640);
    assert!(said.contains("3 hosts: 3 succeeded"), "{said}");
    let runs = host_runs(&d);
    assert_eq!(runs.len(), 3);
    for r in &runs {
        assert_eq!(r["state"], "succeeded", "{r}");
        let out = d.call("Run.Logs", json!({"id": r["id"]}));
        let text = out["data"].as_str().unwrap_or_default();
        assert!(
            text.contains(&format!("wrote {} bytes", 3 << 20)) && text.contains("sha256:"),
            "{text}"
        );
    }
    // Nothing left beside it.
    let names: Vec<String> = std::fs::read_dir(work.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["app.bin"]);
    // Again: the daemon keeps the content (nothing is uploaded), and every host finds it
    // unchanged.
    let before = std::fs::metadata(&dest).unwrap().ino();
    let (ok, said) =
        push_to(&d, src.to_str().unwrap(), "web-1,web-2,web-3", dest_s, &["--mode", "0640"]);
    assert!(ok, "{said}");
    for r in host_runs(&d) {
        assert_eq!(
            (r["state"].as_str(), r["reason"].as_str()),
            (Some("succeeded"), Some("unchanged")),
            "{r}"
        );
    }
    assert_eq!(std::fs::metadata(&dest).unwrap().ino(), before, "not written again");
    // As root, the owner too.
    if nix::unistd::Uid::effective().is_root() {
        let (ok, said) =
            push_to(&d, src.to_str().unwrap(), "web-1", dest_s, &["--owner", "nobody:nogroup"]);
        assert!(ok, "{said}");
        let m = std::fs::metadata(&dest).unwrap();
        assert_eq!((m.uid(), m.permissions().mode() & 0o7777), (65534, 0o644));
    }
    // A unit naming content the daemon does not keep is refused at Add, at its field.
    let mut raw = d.raw();
    let v = raw.call(
        "TaskUnit.Add",
        json!({"name": "nofile", "hosts": ["web-1"],
        "file": {"source": format!("sha256:{}", "0".repeat(64)), "dest": dest_s}}),
    );
    assert_eq!(v["error"]["data"]["field"], "file.source", "{v}");
}

#[test]
fn a_destination_outside_the_agents_allowed_dirs_is_refused_with_the_reason() {
    let d = TestDaemon::start();
    let allowed = tempfile::tempdir().unwrap();
    make_private(allowed.path());
    let _strict =
        TestAgent::enroll_with(&d, "strict", &["--allowed-dirs", allowed.path().to_str().unwrap()]);
    let work = tempfile::tempdir().unwrap();
    let src = random_file(work.path(), "x.conf", 1000);
    let outside = work.path().join("x.conf.out");
    let (ok, said) = push_to(&d, src.to_str().unwrap(), "strict", outside.to_str().unwrap(), &[]);
    assert!(!ok, "{said}");
    let r = &host_runs(&d)[0];
    assert_eq!(r["state"], "failed");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("dest") && reason.contains(&allowed.path().display().to_string()),
        "{reason}"
    );
    assert!(!outside.exists());
    // Inside, it lands.
    let inside = allowed.path().join("x.conf");
    let (ok, said) = push_to(&d, src.to_str().unwrap(), "strict", inside.to_str().unwrap(), &[]);
    assert!(ok, "{said}");
    assert_eq!(std::fs::read(inside).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn an_agent_killed_mid_push_leaves_no_partial_file_and_the_next_push_lands() {
    let d = TestDaemon::start();
    let mut agent = TestAgent::enroll(&d, "slow", "");
    let work = tempfile::tempdir().unwrap();
    let src = random_file(work.path(), "big.bin", 64 << 20);
    std::fs::create_dir(work.path().join("out")).unwrap();
    let dest = work.path().join("out/big.bin");
    // Uploaded first (put on the daemon's own host): the push below sends nothing, so the
    // agent starts reading at once.
    let (ok, said) = push_to(
        &d,
        src.to_str().unwrap(),
        "local",
        work.path().join("first.bin").to_str().unwrap(),
        &[],
    );
    assert!(ok, "{said}");
    // The push runs in the background; the agent dies once its temporary file is there.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_taskctl"));
    cmd.args([
        "--addr",
        &d.addr,
        "--token",
        &d.token,
        "push",
        src.to_str().unwrap(),
        "--hosts",
        "slow",
        "--dest",
        dest.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut client = cmd.spawn().unwrap();
    let out_dir = work.path().join("out");
    wait_for("the agent's temporary file", || {
        let found = std::fs::read_dir(&out_dir).ok()?.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(".big.bin.taskd-") && e.metadata().is_ok_and(|m| m.len() > 0)
        });
        found.then_some(())
    });
    agent.kill9();
    // Nothing at dest, or (had the put just finished) the whole file: never a part of it.
    if dest.exists() {
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
    }
    let _ = client.kill();
    let _ = client.wait();
    // Back, the agent reports the run it lost; a new push lands whole and clears what the
    // killed one left.
    agent.restart();
    crate::agents::wait_connected(&d, "slow");
    wait_for("the killed run to end", || {
        let r = host_runs(&d).first().cloned()?;
        (r["state"] != "running").then_some(())
    });
    let (ok, said) = push_to(&d, src.to_str().unwrap(), "slow", dest.to_str().unwrap(), &[]);
    assert!(ok, "{said}");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
    let names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["big.bin"]);
}
