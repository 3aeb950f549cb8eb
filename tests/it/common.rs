//! The test harness: a real `taskd` process on `127.0.0.1:0` in a temporary state directory,
//! driven through real clients (the Rust client, raw sockets, and `taskctl` as built).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it returns `Some`, failing the test after `DEADLINE`.
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Gives a state directory the mode the daemon requires (0700): temporary directories and
/// tmpfs mounts are made more open.
pub fn make_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
}

/// A daemon under test.
pub struct TestDaemon {
    /// The state directory (kept across restarts).
    state: PathBuf,
    /// The daemon's own log (its standard error).
    log: PathBuf,
    /// Removes the state directory at the end, when the harness made it.
    _temp: Option<tempfile::TempDir>,
    /// `host:port` it listens on.
    pub addr: String,
    /// The token (empty with `--auth none`).
    pub token: String,
    child: Option<Child>,
    extra: Vec<String>,
    /// Start the daemon with SIGHUP, SIGINT and SIGQUIT ignored, as `nohup` or `&` would.
    ignoring_signals: bool,
    /// Run the daemon as this uid and gid (the state directory is given to them).
    as_user: Option<(u32, u32)>,
    /// Run in the daemon's process before it execs (an inherited descriptor, a umask…).
    pre_exec: Option<fn() -> std::io::Result<()>>,
    /// Extra environment variables for the daemon (`TASKD_*` settings).
    env: Vec<(String, String)>,
    /// Where the next start listens (`127.0.0.1:0` when unset).
    listen: Option<String>,
}

impl TestDaemon {
    /// Starts a daemon with token auth.
    pub fn start() -> TestDaemon {
        Self::start_with(&[])
    }

    /// Starts a daemon with extra flags.
    pub fn start_with(extra: &[&str]) -> TestDaemon {
        Self::unstarted(extra).started()
    }

    /// Starts a daemon whose `taskd.toml` is `config`, with extra flags.
    pub fn start_with_config(config: &str, extra: &[&str]) -> TestDaemon {
        let d = Self::unstarted(extra);
        std::fs::write(d.state.join("taskd.toml"), config).expect("taskd.toml");
        d.started()
    }

    /// Starts a daemon on the state directory `state` (which the caller cleans up), writing
    /// its own log to `log`.
    pub fn start_at(state: &Path, log: &Path) -> TestDaemon {
        let mut d = Self::unstarted(&[]);
        make_private(state);
        (d.state, d.log, d._temp) = (state.to_path_buf(), log.to_path_buf(), None);
        d.started()
    }

    /// Starts a daemon with `--auth none` (and `extra`). A root daemon refuses `--auth none`,
    /// so when the tests run as root it runs as `nobody`, owning its state directory.
    pub fn start_no_auth(extra: &[&str]) -> TestDaemon {
        let mut args = vec!["--auth", "none"];
        args.extend_from_slice(extra);
        let mut d = Self::unstarted(&args);
        if nix::unistd::geteuid().is_root() {
            let nobody = nix::unistd::User::from_name("nobody").expect("getpwnam").expect("nobody");
            let ids = (nobody.uid.as_raw(), nobody.gid.as_raw());
            std::os::unix::fs::chown(&d.state, Some(ids.0), Some(ids.1)).expect("chown state");
            d.as_user = Some(ids);
        }
        d.started()
    }

    /// Starts a daemon that inherits SIGHUP, SIGINT and SIGQUIT as ignored.
    pub fn start_ignoring_signals() -> TestDaemon {
        let mut d = Self::unstarted(&[]);
        d.ignoring_signals = true;
        d.started()
    }

    /// Starts a daemon with extra flags, running `setup` in its process just before it execs
    /// `taskd`, to start it the way a shell or a service manager might (descriptors left
    /// open, a umask). `setup` may only make async-signal-safe calls.
    pub fn start_with_pre_exec(extra: &[&str], setup: fn() -> std::io::Result<()>) -> TestDaemon {
        let mut d = Self::unstarted(extra);
        d.pre_exec = Some(setup);
        d.started()
    }

    /// Starts a daemon listening on `addr` (an address inside a network namespace the calling
    /// thread has entered, say), with extra flags.
    pub fn start_listening(addr: &str, extra: &[&str]) -> TestDaemon {
        let mut d = Self::unstarted(extra);
        d.listen = Some(addr.to_string());
        d.started()
    }

    /// Starts a daemon with extra flags and environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        let mut d = Self::unstarted(extra);
        d.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        d.started()
    }

    /// A daemon not started yet, with its own private temporary state directory.
    fn unstarted(extra: &[&str]) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        make_private(dir.path());
        TestDaemon {
            state: dir.path().to_path_buf(),
            log: dir.path().join("daemon.log"),
            _temp: Some(dir),
            addr: String::new(),
            token: String::new(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ignoring_signals: false,
            as_user: None,
            pre_exec: None,
            env: Vec::new(),
            listen: None,
        }
    }

    fn started(mut self) -> TestDaemon {
        self.spawn();
        self
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    fn spawn(&mut self) {
        let addr_file = self.state.join("address");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let listen = std::mem::take(&mut self.listen).unwrap_or_else(|| "127.0.0.1:0".into());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskd"));
        cmd.args(["--listen", &listen, "--state-dir"])
            .arg(&self.state)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((uid, gid)) = self.as_user {
            cmd.uid(uid).gid(gid).env("HOME", &self.state);
        }
        if self.ignoring_signals {
            // SAFETY: runs in the child before exec and only calls signal(2), which is
            // async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
                        libc::signal(sig, libc::SIG_IGN);
                    }
                    Ok(())
                });
            }
        }
        if let Some(setup) = self.pre_exec {
            // SAFETY: `setup` runs in the child before exec; its contract is to make only
            // async-signal-safe calls.
            unsafe {
                cmd.pre_exec(setup);
            }
        }
        let child = cmd.spawn().expect("spawn taskd");
        self.child = Some(child);
        let dir = self.state.clone();
        self.addr = wait_for("the daemon to listen", || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("taskd exited early ({st}):\n{}", self.log());
            }
            let text = std::fs::read_to_string(dir.join("address")).ok()?;
            text.ends_with('\n').then(|| text.trim().to_string())
        });
        self.token = std::fs::read_to_string(dir.join("token")).unwrap_or_default().trim().into();
    }

    /// The daemon's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Kills the daemon with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("kill -9");
        c.wait().expect("reap");
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    /// Sends SIGTERM and waits for the daemon to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit()
    }

    /// Waits for the daemon to exit by itself (within the deadline), and reaps it.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = c.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > end {
                let _ = c.kill();
                panic!("taskd did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again on the same state directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }

    /// Starts the daemon again on the same state directory and the same address (agents
    /// reconnect to where they were).
    pub fn restart_on_same_port(&mut self) {
        self.listen = Some(self.addr.clone());
        self.restart();
    }

    /// Runs `taskctl` (the built binary) against this daemon.
    pub fn taskctl(&self, args: &[&str]) -> Output {
        self.taskctl_stdin(args, None)
    }

    /// Runs `taskctl` with `input` on its standard input.
    pub fn taskctl_stdin(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskctl"));
        cmd.arg("--state-dir").arg(&self.state).args(args);
        cmd.env_remove("TASKD_ADDR").env_remove("TASKD_TOKEN").env("NO_COLOR", "1");
        cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn taskctl");
        if let Some(text) = input {
            child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("taskctl output")
    }

    /// A raw TCP connection, logged in when the daemon has a token.
    pub fn raw(&self) -> Raw {
        let mut r = Raw::connect(&self.addr);
        if !self.token.is_empty() {
            let v = r.call("Auth.Login", json!(self.token));
            assert_eq!(v["result"], json!(true), "login failed: {v}");
        }
        r
    }

    /// Calls `method` with one argument on a fresh logged-in connection and returns `result`,
    /// failing the test on an error.
    pub fn call(&self, method: &str, arg: Value) -> Value {
        let v = self.raw().call(method, arg);
        match v.get("result") {
            Some(r) if v.get("error").is_none() => r.clone(),
            _ => panic!("{method} failed: {v}"),
        }
    }

    /// Adds every definition over one connection, all requests sent before the first answer
    /// is read (so they share commits), failing the test on any error.
    pub fn add_many(&self, defs: &[Value]) {
        let mut c = self.raw();
        let mut batch = String::new();
        for (i, def) in defs.iter().enumerate() {
            let req = json!({"jsonrpc": "2.0", "id": i, "method": "TaskUnit.Add", "params": [def]});
            batch.push_str(&format!("{req}\n"));
        }
        c.send(batch.as_bytes());
        for _ in defs {
            let v = c.recv();
            assert!(v.get("error").is_none(), "TaskUnit.Add failed: {v}");
        }
    }

    /// Polls `TaskUnit.Get` until `cond` holds for the unit info.
    pub fn wait_unit(&self, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let mut conn = self.raw();
        wait_for(what, || {
            let v = conn.call("TaskUnit.Get", json!(name));
            let info = v.get("result")?.clone();
            cond(&info).then_some(info)
        })
    }

    /// Polls `Run.Get` until the run has ended, and returns it.
    pub fn wait_run_end(&self, id: i64) -> Value {
        let mut conn = self.raw();
        wait_for(&format!("run {id} to end"), || {
            let v = conn.call("Run.Get", json!(id));
            let r = v.get("result")?.clone();
            (!matches!(r["state"].as_str(), Some("queued" | "running"))).then_some(r)
        })
    }
}

impl Drop for TestDaemon {
    /// Stops the daemon gracefully, so that it stops its runs too: a test must not leave
    /// processes behind. SIGKILL only if it does not exit in time.
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_gracefully(c);
        }
    }
}

/// Sends SIGTERM to `c` (after SIGCONT, should it be stopped) and reaps it; SIGKILL if it
/// does not exit within [`DEADLINE`]. A test must not leave processes behind.
pub fn stop_gracefully(mut c: Child) {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// A line-oriented raw TCP JSON-RPC connection.
pub struct Raw {
    /// The socket, for writing raw bytes.
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
    next_id: u64,
}

impl Raw {
    /// Connects.
    pub fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Raw { stream, reader, next_id: 1 }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one reply line as JSON.
    pub fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read reply");
        assert!(n > 0, "connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    /// A JSON-RPC 2.0 call with one argument; returns the whole reply.
    pub fn call(&mut self, method: &str, arg: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": [arg]});
        self.send(format!("{req}\n").as_bytes());
        self.recv()
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit_once(')').map(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some(Some('Z')) | Some(Some('X')))
        }
        Err(_) => false,
    }
}

/// A hand-written HTTP/1.1 POST to `/` with `Host: addr`; returns the status code and the body.
pub fn http_post(addr: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    http(addr, "POST", "/", headers, body)
}

/// A hand-written HTTP/1.1 request with `Host: addr`; returns the status code and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let (status, _, body) = http_raw(addr, &req);
    (status, body)
}

/// Sends `request` as it is and reads the response until the daemon closes the connection;
/// returns the status code, the head and the body.
pub fn http_raw(addr: &str, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s.write_all(request.as_bytes()).expect("write request");
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        panic!("no complete response (the daemon kept the connection open?): {e}");
    }
    parse_response(raw)
}

/// [`http_raw`] over TLS, trusting the certificate whose SHA-256 fingerprint is `fp`.
pub fn https_raw(addr: &str, fp: &str, request: &str) -> (u16, String, String) {
    let trust = taskd::tls::Trust::Fingerprint(fp.to_string());
    let config = taskd::tls::client_config(&trust).expect("a client configuration");
    let name = taskd::tls::server_name(addr).expect("a server name");
    let tls = rustls::ClientConnection::new(config, name).expect("a TLS client");
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut s = rustls::StreamOwned::new(tls, tcp);
    s.write_all(request.as_bytes()).expect("write request");
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        // Closed without a TLS close_notify: what came before it is the whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("no complete response (the daemon kept the connection open?): {e}"),
    }
    parse_response(raw)
}

/// Status, head and (dechunked) body of a whole HTTP response.
fn parse_response(raw: Vec<u8>) -> (u16, String, String) {
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) =
        text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    (status, head.to_owned(), body)
}

/// The body of a chunked response.
pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size");
        let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}
