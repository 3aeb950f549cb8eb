//! The abuse benchmark (`scripts/abuse`): how much memory hostile clients can make taskd hold,
//! and how well it keeps serving the clients that behave, meanwhile.
//!
//! Starts the daemon binary `TASKD` in a temporary state directory (token auth, 127.0.0.1:0)
//! and runs three phases, each bounded by its own duration:
//!
//! 1. **baseline**: 16 well-behaved clients alone. Each logs in once on a persistent raw-TCP
//!    connection, then loops over `Daemon.Status`, `TaskUnit.Get` and `TaskUnit.List` of a few
//!    units and, now and then, an `Add` and a `Delete`, pausing `--pause-ms` between calls,
//!    and times every call.
//! 2. **attack**: the same clients beside the attackers of `abuse/attack.rs`, all at full
//!    rate: clients that pipeline `rpc.discover` calls and never read (not logged in, and
//!    logged in), never-reading `Run.Follow` subscribers of a unit running `yes`, as many
//!    slot holders as the daemon has connection slots (never log in, one byte every 10 s),
//!    unauthenticated calls (wrong logins, `TaskUnit.Start` with 15 kB and 1 MiB names) and
//!    HTTP requests without the token, with a foreign `Origin` or `Host`. Every attacker
//!    reconnects as soon as the daemon closes it.
//! 3. **after**: the good clients alone again, once every attacker has let go.
//!
//! Meanwhile it samples the daemon's `VmRSS` every 100 ms (and its threads and descriptors),
//! polls `Daemon.Status` for the connections and failed logins it counts, and has a newcomer
//! connect, log in and call `Daemon.Status` every second, as `taskctl status` would. Prints
//! one table, the targets (peak RSS under 64 MiB, good clients' p99 under 10 ms) with PASS or
//! MISS, and what the daemon did to the attackers. Exits non-zero if the daemon died or a
//! good client got an error.
//!
//! ```sh
//! cargo run --release --example abuse -- TASKD [--seconds 60] [--pin] [...]
//! ```
//!
//! With `--pin`, the daemon (and the runs it spawns) is kept on CPU 0 and this program on
//! CPU 1; the attackers run at nice 10 either way, so that the good clients' timings are the
//! daemon's more than this program's.

#[path = "abuse/attack.rs"]
mod attack;
#[path = "load/conn.rs"]
mod conn;

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};

use attack::{Tally, Target};
use conn::{Conn, percentile};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Targets of issue 8.
const RSS_TARGET_MIB: f64 = 64.0;
const P99_TARGET_MS: f64 = 10.0;

/// A good client's call that takes this long is an error.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// Units the good clients read.
const GOOD_UNITS: usize = 8;

#[derive(Parser, Debug)]
#[command(about = "taskd under hostile clients: peak RSS and good clients' latency")]
#[command(args_override_self = true)]
struct Args {
    /// The daemon binary.
    taskd: String,
    /// Length of the attack phase, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Length of the baseline phase (good clients alone), in seconds.
    #[arg(long, default_value_t = 20)]
    baseline: u64,
    /// Length of the phase after the attack, in seconds.
    #[arg(long, default_value_t = 10)]
    after: u64,
    /// Well-behaved clients.
    #[arg(long, default_value_t = 16)]
    good: usize,
    /// Pause of a good client between two calls, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pause_ms: u64,
    /// Connections that pipeline `rpc.discover` without logging in and never read.
    #[arg(long, default_value_t = 40)]
    unauthenticated_readers: usize,
    /// Logged-in connections that pipeline `rpc.discover` and never read (up to 4 MiB each).
    #[arg(long, default_value_t = 4)]
    authenticated_readers: usize,
    /// `rpc.discover` calls each never-reading connection pipelines.
    #[arg(long, default_value_t = 1200)]
    pipelined: u64,
    /// Never-reading `Run.Follow` subscribers of a unit running `yes` (up to 4 MiB each).
    #[arg(long, default_value_t = 4)]
    followers: usize,
    /// Shell script of the chatty unit the followers follow.
    #[arg(long, default_value = "exec yes")]
    chatty: String,
    /// Slot holders: connections that never log in (default: the daemon's max_connections).
    #[arg(long)]
    slot_holders: Option<usize>,
    /// Connections sending unauthenticated calls at full rate.
    #[arg(long, default_value_t = 8)]
    rpc_flooders: usize,
    /// Connections sending refused HTTP requests at full rate.
    #[arg(long, default_value_t = 4)]
    http_flooders: usize,
    /// Pin the daemon to CPU 0 and this program to CPU 1.
    #[arg(long)]
    pin: bool,
    /// Threads of the attackers' runtime.
    #[arg(long, default_value_t = 2)]
    attack_threads: usize,
}

const PHASES: [&str; 3] = ["baseline", "attack", "after"];
/// The phase value once every phase is over.
const DONE: u8 = 3;

/// What the sampler saw of the daemon in one phase.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    samples: u64,
    rss_sum: u64,
    rss_peak: u64,
    anon_peak: u64,
    threads_peak: u64,
    fds_peak: u64,
    rss_last: u64,
    /// Pages of TCP buffers in the kernel, machine-wide (`/proc/net/sockstat`): RSS does not
    /// count what the daemon's sockets hold there.
    tcp_pages_peak: u64,
    /// CPU ticks at the phase's first and last sample: the daemon (not the runs it spawns),
    /// this program, and each CPU's busy and total.
    ticks_first: Option<Ticks>,
    ticks_last: Option<Ticks>,
}

/// CPU time, in clock ticks.
#[derive(Debug, Default, Clone, Copy)]
struct Ticks {
    daemon: u64,
    me: u64,
    /// Busy and total ticks of CPU 0 and CPU 1.
    cpus: [(u64, u64); 2],
}

/// Pages the kernel holds in TCP buffers, machine-wide.
fn tcp_pages() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp = text.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let mut words = tcp.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    0
}

/// The size of a page, in KiB.
fn page_kib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(bytes).unwrap_or(4096) / 1024
}

/// utime + stime of a process, in ticks.
fn process_ticks(pid: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

fn ticks(pid: u32) -> Ticks {
    let mut t = Ticks {
        daemon: process_ticks(&pid.to_string()),
        me: process_ticks("self"),
        ..Default::default()
    };
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    for (i, name) in ["cpu0 ", "cpu1 "].iter().enumerate() {
        if let Some(line) = stat.lines().find(|l| l.starts_with(name)) {
            let v: Vec<u64> =
                line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            t.cpus[i] = (total - idle, total);
        }
    }
    t
}

/// What `Daemon.Status` said in one phase.
#[derive(Debug, Default, Clone, Copy)]
struct StatusSeen {
    polls: u64,
    failed: u64,
    authenticated_peak: u64,
    unauthenticated_peak: u64,
    probation_peak: u64,
    auth_failures_first: Option<u64>,
    auth_failures_last: u64,
}

/// A newcomer's connect, login and `Daemon.Status`, in one phase.
#[derive(Debug, Default, Clone)]
struct Probes {
    latencies: Vec<u64>,
    failures: Vec<String>,
}

/// Everything measured, by phase.
#[derive(Default)]
struct Watch {
    phase: AtomicU8,
    seen: Mutex<[Seen; 3]>,
    status: Mutex<[StatusSeen; 3]>,
    probes: Mutex<[Probes; 3]>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Watch {
    /// The current phase, or `None` once it is over.
    fn phase(&self) -> Option<usize> {
        let p = self.phase.load(Ordering::Acquire);
        (p < DONE).then_some(p as usize)
    }
}

/// Fields (kB, or a count) from `/proc/PID/status`.
fn proc_status(pid: u32, keys: &[&str]) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut out = vec![0; keys.len()];
    for line in text.lines() {
        for (i, k) in keys.iter().enumerate() {
            if let Some(v) = line.strip_prefix(k).and_then(|r| r.strip_prefix(':')) {
                out[i] = v.split_whitespace().next()?.parse().ok()?;
            }
        }
    }
    Some(out)
}

/// Samples the daemon every 100 ms (descriptors every second) until `stop`.
fn sampler(pid: u32, watch: Arc<Watch>, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    let mut fds = 0;
    while !stop.load(Ordering::Acquire) {
        if let (Some(p), Some(v)) =
            (watch.phase(), proc_status(pid, &["VmRSS", "RssAnon", "Threads"]))
        {
            if n.is_multiple_of(10) {
                fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
            }
            let mut seen = lock(&watch.seen);
            let s = &mut seen[p];
            s.samples += 1;
            s.rss_sum += v[0];
            s.rss_last = v[0];
            s.rss_peak = s.rss_peak.max(v[0]);
            s.anon_peak = s.anon_peak.max(v[1]);
            s.threads_peak = s.threads_peak.max(v[2]);
            s.fds_peak = s.fds_peak.max(fds);
            s.tcp_pages_peak = s.tcp_pages_peak.max(tcp_pages());
            let t = ticks(pid);
            s.ticks_first.get_or_insert(t);
            s.ticks_last = Some(t);
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keeps the calling thread on `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lowers the calling thread's priority (Linux: nice applies per thread).
fn be_nice() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Raises the soft limit on open descriptors to the hard one (the daemon inherits it).
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max.min(1 << 20);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

/// Starts `taskd` on a free loopback port in `dir` (on CPU 0 when `pin`); returns it with its
/// address and token.
fn start_daemon(taskd: &str, dir: &Path, pin: bool) -> Res<(Child, String, String)> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let state = dir.join("state");
    let mut cmd = Command::new(taskd);
    cmd.args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if pin {
        // SAFETY: sched_setaffinity is a plain syscall, safe between fork and exec.
        unsafe {
            cmd.pre_exec(|| pin_to(0));
        }
    }
    let mut child = cmd.spawn().map_err(|e| format!("{taskd}: {e}"))?;
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait()? {
            return Err(format!("taskd exited at start ({st}); see {}", dir.display()).into());
        }
        if let Ok(text) = std::fs::read_to_string(state.join("address"))
            && text.ends_with('\n')
        {
            let token = std::fs::read_to_string(state.join("token"))?.trim().to_string();
            return Ok((child, text.trim().to_string(), token));
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            return Err("taskd did not start listening within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's side of its connections (`ss`, local port `port`): how many in each state, and
/// the bytes waiting in their send queues.
fn daemon_sockets(port: &str) -> String {
    let filter = format!("( sport = :{port} )");
    let out = match Command::new("ss").args(["-tnH", &filter]).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => return "(ss not available)".into(),
    };
    let mut by_state: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let e = by_state.entry(f[0].to_string()).or_default();
        e.0 += 1;
        e.1 += f[2].parse::<u64>().unwrap_or(0);
    }
    by_state
        .iter()
        .map(|(st, (n, q))| format!("{st} {n} ({:.1} MiB unsent)", *q as f64 / 1048576.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One call of a good client or the monitor: its result, or why there is none.
async fn call(c: &mut Conn, method: &str, arg: Value) -> Result<(Value, Duration), String> {
    match timeout(CALL_LIMIT, c.call(method, &arg.to_string())).await {
        Ok(Ok((Ok(v), took))) => Ok((v, took)),
        Ok(Ok((Err(e), _))) => Err(format!("{method}: error {}: {}", e.code, e.message)),
        Ok(Err(e)) => Err(format!("{method}: {e}")),
        Err(_) => Err(format!("{method}: no answer in {CALL_LIMIT:?}")),
    }
}

/// The methods the good clients call, in the order the report lists them.
const GOOD_METHODS: [&str; 5] =
    ["Daemon.Status", "TaskUnit.Get", "TaskUnit.List", "TaskUnit.Add", "TaskUnit.Delete"];

/// What one good client saw: latencies (µs) per phase and method, and its errors.
#[derive(Default)]
struct GoodLog {
    latencies: [[Vec<u64>; GOOD_METHODS.len()]; 3],
    errors: Vec<String>,
}

/// A well-behaved client: one login, then real work in a loop until the phases are over.
async fn good_client(
    addr: String,
    token: String,
    me: usize,
    pause: Duration,
    w: Arc<Watch>,
) -> GoodLog {
    let mut log = GoodLog::default();
    let mut c = match timeout(CALL_LIMIT, Conn::connect(&addr, &token)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log.errors.push(format!("client {me}: connect: {e}"));
            return log;
        }
        Err(_) => {
            log.errors.push(format!("client {me}: no connection in {CALL_LIMIT:?}"));
            return log;
        }
    };
    let mine = format!("tmp-{me:02}");
    let mut n = me as u64;
    while let Some(p) = w.phase() {
        n += 1;
        let unit = format!("good-{}", n % GOOD_UNITS as u64);
        let calls: Vec<(&str, Value)> = match n % 10 {
            0..=2 => vec![("Daemon.Status", json!({}))],
            3..=6 => vec![("TaskUnit.Get", json!(unit))],
            7 | 8 => vec![("TaskUnit.List", json!({"name_glob": "good-*"}))],
            _ if n % 50 == 9 => vec![
                ("TaskUnit.Add", json!({"name": mine, "every": "1h", "command": ["true"]})),
                ("TaskUnit.Delete", json!(mine)),
            ],
            _ => vec![("TaskUnit.Get", json!(unit))],
        };
        for (method, arg) in calls {
            match call(&mut c, method, arg).await {
                Ok((_, took)) => {
                    let m = GOOD_METHODS.iter().position(|g| *g == method).unwrap_or(0);
                    log.latencies[p][m].push(took.as_micros() as u64);
                }
                Err(e) => {
                    log.errors.push(format!("client {me} ({}): {e}", PHASES[p]));
                    return log;
                }
            }
        }
        if !pause.is_zero() {
            sleep(pause).await;
        }
    }
    log
}

/// Polls `Daemon.Status` every 500 ms on a connection of its own.
async fn status_poller(addr: String, token: String, w: Arc<Watch>) {
    let mut c = None;
    while let Some(p) = w.phase() {
        if c.is_none() {
            c = timeout(CALL_LIMIT, Conn::connect(&addr, &token)).await.ok().and_then(Result::ok);
        }
        let got = match c.as_mut() {
            Some(conn) => call(conn, "Daemon.Status", json!({})).await.ok(),
            None => None,
        };
        {
            let mut st = lock(&w.status);
            let s = &mut st[p];
            s.polls += 1;
            match got {
                Some((v, _)) => {
                    let n = |k: &str| v["connections"][k].as_u64().unwrap_or(0);
                    s.authenticated_peak = s.authenticated_peak.max(n("authenticated"));
                    s.unauthenticated_peak = s.unauthenticated_peak.max(n("unauthenticated"));
                    s.probation_peak = s.probation_peak.max(n("probation"));
                    let f = v["auth_failures"].as_u64().unwrap_or(0);
                    s.auth_failures_first.get_or_insert(f);
                    s.auth_failures_last = f;
                }
                None => {
                    s.failed += 1;
                    c = None;
                }
            }
        }
        sleep(Duration::from_millis(500)).await;
    }
}

/// Every second, a newcomer connects, logs in and calls `Daemon.Status`, as `taskctl status`.
async fn newcomer(addr: String, token: String, w: Arc<Watch>) {
    while let Some(p) = w.phase() {
        let t = std::time::Instant::now();
        let r = match timeout(CALL_LIMIT, Conn::connect(&addr, &token)).await {
            Ok(Ok(mut c)) => call(&mut c, "Daemon.Status", json!({})).await.map(|_| ()),
            Ok(Err(e)) => Err(format!("connect and login: {e}")),
            Err(_) => Err(format!("connect and login: nothing in {CALL_LIMIT:?}")),
        };
        let took = t.elapsed();
        {
            let mut probes = lock(&w.probes);
            match r {
                Ok(()) => probes[p].latencies.push(took.as_micros() as u64),
                Err(e) => probes[p].failures.push(e),
            }
        }
        sleep(Duration::from_secs(1).saturating_sub(took)).await;
    }
}

/// Adds the chatty unit and returns its run.
async fn add_chatty(c: &mut Conn, script: &str) -> Result<i64, String> {
    let (v, _) = call(c, "TaskUnit.Add", json!({"name": "chatty", "script": script})).await?;
    v["active_runs"][0]
        .as_i64()
        .or_else(|| v["last_run"]["id"].as_i64())
        .ok_or_else(|| format!("TaskUnit.Add chatty: no run in {v}"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

struct Figures {
    good: [[Vec<u64>; GOOD_METHODS.len()]; 3],
    good_errors: Vec<String>,
    seen: [Seen; 3],
    status: [StatusSeen; 3],
    probes: [Probes; 3],
    hwm_attack: u64,
    hwm_end: u64,
    rollup: String,
    sockets: String,
    alive: bool,
    tally: std::collections::BTreeMap<(&'static str, &'static str), u64>,
    log_lines: usize,
    log_bytes: u64,
    log_refusals: usize,
    log_failures: usize,
}

fn table(a: &Args, f: &Figures, shape: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{shape}\n");
    let secs = [a.baseline, a.seconds, a.after];
    let mut row = |name: &str, cells: [String; 3]| {
        let _ = writeln!(out, "{name:<46}{:>19}{:>19}{:>19}", cells[0], cells[1], cells[2]);
    };
    row("", PHASES.map(|p| p.to_string()));
    row("seconds", secs.map(|s| s.to_string()));
    let per = |g: &dyn Fn(usize) -> String| [g(0), g(1), g(2)];
    row(
        "daemon RSS peak (MiB, VmRSS every 100 ms)",
        per(&|i| format!("{:.1}", mib(f.seen[i].rss_peak))),
    );
    row(
        "daemon RSS mean (MiB)",
        per(&|i| {
            let s = &f.seen[i];
            format!("{:.1}", mib(s.rss_sum.checked_div(s.samples).unwrap_or(0)))
        }),
    );
    row("daemon RSS at phase end (MiB)", per(&|i| format!("{:.1}", mib(f.seen[i].rss_last))));
    row("daemon RssAnon peak (MiB)", per(&|i| format!("{:.1}", mib(f.seen[i].anon_peak))));
    row(
        "kernel TCP buffers, both ends (MiB, peak)",
        per(&|i| format!("{:.1}", mib(f.seen[i].tcp_pages_peak * page_kib()))),
    );
    row("daemon threads (peak)", per(&|i| f.seen[i].threads_peak.to_string()));
    row("daemon open descriptors (peak, every 1 s)", per(&|i| f.seen[i].fds_peak.to_string()));
    let cpu = |i: usize, g: &dyn Fn(&Ticks) -> (u64, u64)| match f.seen[i] {
        Seen { ticks_first: Some(a), ticks_last: Some(b), .. } => {
            let ((b0, t0), (b1, t1)) = (g(&a), g(&b));
            format!("{:.0}", 100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64)
        }
        _ => "-".into(),
    };
    // Ticks of one process over the ticks of one CPU: % of one core.
    row("daemon CPU (% of one core)", per(&|i| cpu(i, &|t| (t.daemon, t.cpus[0].1))));
    row("load generator CPU (% of one core)", per(&|i| cpu(i, &|t| (t.me, t.cpus[0].1))));
    row("CPU 0 busy (%)", per(&|i| cpu(i, &|t| t.cpus[0])));
    row("CPU 1 busy (%)", per(&|i| cpu(i, &|t| t.cpus[1])));
    let sorted: Vec<Vec<u64>> = f
        .good
        .iter()
        .map(|by_method| {
            let mut v = by_method.concat();
            v.sort_unstable();
            v
        })
        .collect();
    row("good calls", per(&|i| sorted[i].len().to_string()));
    row(
        "good calls per second",
        per(&|i| format!("{:.0}", sorted[i].len() as f64 / secs[i].max(1) as f64)),
    );
    row("good p50 (ms)", per(&|i| format!("{:.2}", ms(percentile(&sorted[i], 0.50)))));
    row("good p99 (ms)", per(&|i| format!("{:.2}", ms(percentile(&sorted[i], 0.99)))));
    row("good max (ms)", per(&|i| format!("{:.1}", ms(sorted[i].last().copied().unwrap_or(0)))));
    for (m, method) in GOOD_METHODS.iter().enumerate() {
        row(
            &format!("  {method}: calls, p50 / p99 (ms)"),
            per(&|i| {
                let mut v = f.good[i][m].clone();
                v.sort_unstable();
                format!(
                    "{} {:.1} / {:.1}",
                    v.len(),
                    ms(percentile(&v, 0.5)),
                    ms(percentile(&v, 0.99))
                )
            }),
        );
    }
    row(
        "newcomer connect+login+Status ok / failed",
        per(&|i| format!("{} / {}", f.probes[i].latencies.len(), f.probes[i].failures.len())),
    );
    row(
        "newcomer p50 / max (ms)",
        per(&|i| {
            let mut v = f.probes[i].latencies.clone();
            v.sort_unstable();
            format!("{:.1} / {:.1}", ms(percentile(&v, 0.5)), ms(v.last().copied().unwrap_or(0)))
        }),
    );
    row(
        "Status: logged-in / unauth / probation (peak)",
        per(&|i| {
            let s = &f.status[i];
            format!("{}/{}/{}", s.authenticated_peak, s.unauthenticated_peak, s.probation_peak)
        }),
    );
    row(
        "Status: auth_failures during the phase",
        per(&|i| {
            let s = &f.status[i];
            (s.auth_failures_last - s.auth_failures_first.unwrap_or(s.auth_failures_last))
                .to_string()
        }),
    );
    row(
        "Status polls failed / made",
        per(&|i| format!("{} / {}", f.status[i].failed, f.status[i].polls)),
    );
    let _ = writeln!(
        out,
        "\nVmHWM (peak RSS as the kernel saw it): {:.1} MiB at the end of the attack, {:.1} MiB \
         at the end",
        mib(f.hwm_attack),
        mib(f.hwm_end)
    );
    let _ = writeln!(out, "smaps_rollup at the end of the attack: {}", f.rollup);
    let _ = writeln!(out, "the daemon's sockets 0.5 s before the end of the attack: {}", f.sockets);
    let _ = writeln!(
        out,
        "auth_failures at the end: {}; daemon log (RUST_LOG=warn): {} lines, {} bytes, {} of \
         them \"connection limit reached\", {} about failed logins",
        f.status[2].auth_failures_last, f.log_lines, f.log_bytes, f.log_refusals, f.log_failures
    );

    let _ = writeln!(out, "\nWhat the daemon did to the attackers (as they saw it):");
    let mut last = "";
    for ((class, outcome), n) in &f.tally {
        if *class != last {
            let _ = writeln!(out, "  {class}");
            last = class;
        }
        let _ = writeln!(out, "    {outcome:<44}{n:>12}");
    }

    let peak = mib(f.seen.iter().map(|s| s.rss_peak).max().unwrap_or(0).max(f.hwm_end));
    let p99 = ms(percentile(&sorted[1], 0.99));
    let _ = writeln!(out, "\nTargets:");
    let _ = writeln!(
        out,
        "  daemon peak RSS < {RSS_TARGET_MIB} MiB: {peak:.1} MiB (VmHWM)  {}",
        verdict(peak < RSS_TARGET_MIB)
    );
    let _ = writeln!(
        out,
        "  good clients' p99 under attack < {P99_TARGET_MS} ms: {p99:.2} ms  {}",
        verdict(p99 < P99_TARGET_MS)
    );
    let _ = writeln!(out, "  daemon stayed up: {}", if f.alive { "yes" } else { "NO" });
    let _ = writeln!(out, "  good clients' errors: {}", f.good_errors.len());
    for e in f.good_errors.iter().take(10) {
        let _ = writeln!(out, "    {e}");
    }
    for (i, p) in f.probes.iter().enumerate() {
        for e in p.failures.iter().take(3) {
            let _ = writeln!(out, "  newcomer failed ({}): {e}", PHASES[i]);
        }
    }
    out
}

fn run(a: Args) -> Res<bool> {
    let nofile = raise_nofile();
    let dir = tempfile::Builder::new().prefix("taskd-abuse-").tempdir()?;
    let (mut child, addr, token) = start_daemon(&a.taskd, dir.path(), a.pin)?;
    let pid = child.id();
    if a.pin {
        pin_to(1)?;
    }
    let pin = a.pin;
    let attack_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.attack_threads.max(1))
        .thread_name("attack")
        .enable_all()
        .on_thread_start(move || {
            if pin {
                let _ = pin_to(1);
            }
            be_nice();
        })
        .build()?;
    let good_rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;

    let watch = Arc::new(Watch::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (w, s) = (watch.clone(), stop.clone());
        std::thread::spawn(move || {
            if pin {
                let _ = pin_to(1);
            }
            sampler(pid, w, s)
        })
    };
    let tally = Arc::new(Tally::default());

    let outcome: Res<_> = good_rt.block_on(async {
        let mut admin = Conn::connect(&addr, &token).await?;
        let (status, _) = call(&mut admin, "Daemon.Status", json!({})).await?;
        let slots = a
            .slot_holders
            .unwrap_or(status["connections"]["max"].as_u64().unwrap_or(1024) as usize);
        for i in 0..GOOD_UNITS {
            let def = json!({"name": format!("good-{i}"), "every": "1h", "command": ["true"]});
            call(&mut admin, "TaskUnit.Add", def).await?;
        }
        let pause = Duration::from_millis(a.pause_ms);
        let goods: Vec<_> = (0..a.good)
            .map(|i| {
                tokio::spawn(good_client(addr.clone(), token.clone(), i, pause, watch.clone()))
            })
            .collect();
        let poller = tokio::spawn(status_poller(addr.clone(), token.clone(), watch.clone()));
        let probe = tokio::spawn(newcomer(addr.clone(), token.clone(), watch.clone()));

        sleep(Duration::from_secs(a.baseline)).await;

        let run = add_chatty(&mut admin, &a.chatty).await?;
        let until = Instant::now() + Duration::from_secs(a.seconds);
        let t = Target { addr: addr.clone(), token: token.clone(), until, tally: tally.clone() };
        watch.phase.store(1, Ordering::Release);
        let h = attack_rt.handle();
        let mut attackers = Vec::new();
        for _ in 0..a.unauthenticated_readers {
            attackers.push(h.spawn(attack::unauthenticated_reader(t.clone(), a.pipelined)));
        }
        for _ in 0..a.authenticated_readers {
            attackers.push(h.spawn(attack::authenticated_reader(t.clone(), a.pipelined)));
        }
        for _ in 0..a.followers {
            attackers.push(h.spawn(attack::follower(t.clone(), run)));
        }
        for i in 0..a.rpc_flooders {
            attackers.push(h.spawn(attack::rpc_flooder(t.clone(), i as u64)));
        }
        for i in 0..a.http_flooders {
            attackers.push(h.spawn(attack::http_flooder(t.clone(), i as u64)));
        }
        for _ in 0..slots {
            attackers.push(h.spawn(attack::slot_holder(t.clone())));
        }
        // The daemon's side of every connection just before the attackers let go: a client
        // that never reads cannot see that the daemon closed it (the FIN waits behind the
        // unread replies), but the daemon's socket says so.
        tokio::time::sleep_until(until - Duration::from_millis(500)).await;
        let port = addr.rsplit(':').next().unwrap_or("0").to_string();
        let sockets = tokio::task::spawn_blocking(move || daemon_sockets(&port)).await?;
        tokio::time::sleep_until(until).await;
        // Every attacker lets go at `until`; give them a moment to drop their sockets.
        let all = futures_join(attackers);
        if timeout(Duration::from_secs(10), all).await.is_err() {
            eprintln!("abuse: some attackers did not stop within 10 s of the deadline");
        }
        let hwm_attack = proc_status(pid, &["VmHWM"]).map_or(0, |v| v[0]);
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .map(|t| {
                t.lines()
                    .filter(|l| {
                        ["Rss:", "Anonymous:", "Private_Dirty:", "Shared_Clean:"]
                            .iter()
                            .any(|k| l.starts_with(k))
                    })
                    .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ") + " kB")
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        // The daemon may be gone: the figures say so, and what it did until then.
        if let Err(e) = call(&mut admin, "TaskUnit.Delete", json!("chatty")).await {
            eprintln!("abuse: {e}");
        }
        watch.phase.store(2, Ordering::Release);

        sleep(Duration::from_secs(a.after)).await;
        watch.phase.store(DONE, Ordering::Release);
        let mut good: [[Vec<u64>; GOOD_METHODS.len()]; 3] = Default::default();
        let mut good_errors = Vec::new();
        for g in goods {
            let log = g.await?;
            for (p, by_method) in log.latencies.into_iter().enumerate() {
                for (m, l) in by_method.into_iter().enumerate() {
                    good[p][m].extend(l);
                }
            }
            good_errors.extend(log.errors);
        }
        let _ = poller.await;
        let _ = probe.await;
        Ok((good, good_errors, hwm_attack, rollup, slots, sockets))
    });
    drop(attack_rt);
    let hwm_end = proc_status(pid, &["VmHWM"]).map_or(0, |v| v[0]);
    stop.store(true, Ordering::Release);
    let _ = sampler.join();
    let alive = child.try_wait()?.is_none();
    if alive {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > end {
                eprintln!("abuse: taskd did not stop within 30 s of SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (good, good_errors, hwm_attack, rollup, slots, sockets) = match outcome {
        Ok(o) => o,
        Err(e) => {
            let _ = child.kill();
            return Err(
                format!("{e} (daemon log: {})", dir.path().join("daemon.log").display()).into()
            );
        }
    };
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let figures = Figures {
        good,
        good_errors,
        seen: *lock(&watch.seen),
        status: *lock(&watch.status),
        probes: lock(&watch.probes).clone(),
        hwm_attack,
        hwm_end,
        rollup,
        sockets,
        alive,
        tally: tally.snapshot(),
        log_lines: log.lines().count(),
        log_bytes: log.len() as u64,
        log_refusals: log.lines().filter(|l| l.contains("connection limit reached")).count(),
        log_failures: log.lines().filter(|l| l.contains("failed login")).count(),
    };
    let shape = format!(
        "taskd abuse: {} s of attack beside {} good clients (pausing {} ms between calls), \
         {} s baseline before, {} s after\n\
         attack: {} never-reading unauthenticated + {} never-reading logged-in connections \
         ({} pipelined rpc.discover each), {} never-reading Run.Follow of `{}`, {} slot \
         holders, {} unauthenticated-call flooders, {} HTTP flooders\n\
         {}; attackers at nice 10 on {} threads; RLIMIT_NOFILE {}",
        a.seconds,
        a.good,
        a.pause_ms,
        a.baseline,
        a.after,
        a.unauthenticated_readers,
        a.authenticated_readers,
        a.pipelined,
        a.followers,
        a.chatty,
        slots,
        a.rpc_flooders,
        a.http_flooders,
        if a.pin { "daemon pinned to CPU 0, this program to CPU 1" } else { "not pinned" },
        a.attack_threads,
        nofile,
    );
    print!("{}", table(&a, &figures, &shape));
    Ok(figures.alive && figures.good_errors.is_empty())
}

/// Waits for every handle (errors of aborted or panicked tasks are ignored).
async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("abuse: {e}");
            ExitCode::from(2)
        }
    }
}
