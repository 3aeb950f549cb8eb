//! Go interop: a client written with nothing but Go's standard `net/rpc/jsonrpc`
//! (`tests/go/client`) drives a real daemon, with `--auth none` and with `Auth.Login`.
//!
//! Without a Go toolchain these tests fail in CI (`CI` set) and skip loudly elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::json;

use crate::common::{TestDaemon, wait_for};

/// Where the Go toolchain usually lives when it is not on `PATH`.
const GO_FALLBACKS: &[&str] = &["/usr/lib/go/bin/go", "/usr/local/go/bin/go"];

fn find_go() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("go"));
    let versioned = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("go-"))
        .map(|e| e.path().join("bin/go"));
    on_path.chain(GO_FALLBACKS.iter().map(PathBuf::from)).chain(versioned).find(|p| p.is_file())
}

/// Builds the Go program in `dir` (relative to the repository) as `name`, once per test run;
/// `None` when Go is missing outside CI.
pub fn go_build(dir: &str, name: &str) -> Option<PathBuf> {
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let Some(go) = find_go() else {
        assert!(
            !in_ci,
            "CI is set but no Go toolchain was found (PATH, {GO_FALLBACKS:?}, /usr/lib/go-*): \
             install golang-go"
        );
        eprintln!(
            "\n!!!!!!!! SKIPPING a Go test: no `go` found on PATH or in {GO_FALLBACKS:?}. \
             Install golang-go to run it; in CI it fails. !!!!!!!!\n"
        );
        return None;
    };
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go");
    let out = tmp.join(name);
    let build = Command::new(&go)
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
        .env("GOCACHE", tmp.join("cache"))
        .env("GOPATH", tmp.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", go.display()));
    assert!(
        build.status.success(),
        "go build of {dir} failed ({}):\n{}{}",
        build.status,
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    Some(out)
}

/// The interop client (`tests/go/client`), built once per test run.
fn go_client() -> Option<&'static Path> {
    static CLIENT: OnceLock<Option<PathBuf>> = OnceLock::new();
    CLIENT.get_or_init(|| go_build("tests/go/client", "taskd-go-client")).as_deref()
}

/// Runs the Go client against `d` and fails the test unless it reports OK.
fn run_go_client(client: &Path, d: &TestDaemon, prefix: &str) {
    let mut cmd = Command::new(client);
    cmd.args(["-addr", &d.addr, "-prefix", prefix]);
    if !d.token.is_empty() {
        cmd.args(["-token", &d.token]);
    }
    let out_path = d.state_dir().join(format!("{prefix}.out"));
    let out_file = std::fs::File::create(&out_path).expect("client output file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().expect("dup"))
        .stderr(out_file)
        .spawn()
        .expect("spawn the Go client");
    let status = wait_for("the Go client to finish", || child.try_wait().expect("try_wait"));
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "the Go client failed ({status}):\n{output}\ndaemon log:\n{}",
        d.log()
    );
    assert_eq!(output.trim(), "OK");
}

/// What the Go client left behind, as seen from Rust.
fn assert_go_effects(d: &TestDaemon, prefix: &str) {
    let list = d.call("TaskUnit.List", json!({"name_glob": format!("{prefix}-*")}));
    let names: Vec<&str> =
        list.as_array().expect("array").iter().map(|u| u["name"].as_str().expect("name")).collect();
    assert_eq!(names, [format!("{prefix}-kept")]);
    let kept = d.call("TaskUnit.Get", json!(format!("{prefix}-kept")));
    assert_eq!(kept["definition"]["description"], "from Go");
    assert_eq!(kept["definition"]["command"], json!(["true"]));
    assert_eq!(kept["state"], "paused");
}

#[test]
fn go_net_rpc_client_without_auth() {
    let Some(client) = go_client() else { return };
    let d = TestDaemon::start_no_auth(&[]);
    run_go_client(client, &d, "gonone");
    assert_go_effects(&d, "gonone");
}

#[test]
fn go_net_rpc_client_logs_in_with_the_token() {
    let Some(client) = go_client() else { return };
    let d = TestDaemon::start();
    assert!(!d.token.is_empty(), "a default daemon has a token");
    run_go_client(client, &d, "gotoken");
    assert_go_effects(&d, "gotoken");
}
