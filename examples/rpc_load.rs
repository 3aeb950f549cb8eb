//! Load generators for taskd's raw-TCP JSON-RPC.
//!
//! **One method** (used by `scripts/bench`): N connections, each sending one request and
//! waiting for its answer (closed loop), for a fixed time. Prints one JSON object:
//! `{"connections", "requests", "per_second", "p50_us", "p99_us", "errors"}`.
//!
//! ```sh
//! cargo run --release --example rpc_load -- ADDR TOKEN CONNECTIONS SECONDS [METHOD [ARG]]
//! ```
//!
//! `METHOD` defaults to `TaskUnit.List` and `ARG` (JSON) to `{}`.
//!
//! **Mixed** (used by `scripts/load`): starts the daemon binary `TASKD` in a temporary state
//! directory, runs N clients mixing `TaskUnit.Add/Edit/Delete/Start/Get/List` on a shared set
//! of names for D seconds (`load/mixed.rs`), prints a table, checks that the daemon holds
//! exactly what was acknowledged, kills it with SIGKILL, starts it again and checks again.
//! Exits non-zero on any failure.
//!
//! ```sh
//! cargo run --release --example rpc_load -- mixed TASKD [CLIENTS [SECONDS [NAMES]]]
//! ```
//!
//! Defaults: 64 clients, 60 seconds, 256 names (at most 1000).

#[path = "load/conn.rs"]
mod conn;
#[path = "load/mixed.rs"]
mod mixed;

use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use conn::{Conn, percentile};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Sample {
    latencies: Vec<u64>,
    errors: u64,
}

async fn worker(
    addr: String,
    token: String,
    method: String,
    arg: String,
    until: Instant,
) -> std::io::Result<Sample> {
    let mut c = Conn::connect(&addr, &token).await?;
    let mut s = Sample { latencies: Vec::new(), errors: 0 };
    while Instant::now() < until {
        let (line, took) = c.call_raw(&method, &arg).await?;
        s.latencies.push(took.as_micros() as u64);
        if line.contains("\"error\"") {
            s.errors += 1;
        }
    }
    Ok(s)
}

async fn one_method(args: &[String]) -> Res<()> {
    if args.len() < 4 {
        return Err("usage: rpc_load ADDR TOKEN CONNECTIONS SECONDS [METHOD [ARG]]".into());
    }
    let (addr, token) = (args[0].clone(), args[1].clone());
    let conns: usize = args[2].parse()?;
    let secs: f64 = args[3].parse()?;
    let method = args.get(4).cloned().unwrap_or_else(|| "TaskUnit.List".into());
    let arg = args.get(5).cloned().unwrap_or_else(|| "{}".into());
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(worker(addr.clone(), token.clone(), method.clone(), arg.clone(), until))
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let s = t.await??;
        all.extend(s.latencies);
        errors += s.errors;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "connections": conns,
            "requests": all.len(),
            "per_second": all.len() as f64 / elapsed,
            "p50_us": percentile(&all, 0.50),
            "p99_us": percentile(&all, 0.99),
            "errors": errors,
        })
    );
    Ok(())
}

/// Starts `taskd` on a free loopback port in `dir`; returns it with its address and token.
fn start_daemon(taskd: &str, dir: &Path) -> Res<(Child, String, String)> {
    let addr_file = dir.join("address");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log"))?;
    let mut child = Command::new(taskd)
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{taskd}: {e}"))?;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait()? {
            return Err(format!("taskd exited at start ({st}); see {}", dir.display()).into());
        }
        if let Ok(text) = std::fs::read_to_string(&addr_file)
            && text.ends_with('\n')
        {
            let token = std::fs::read_to_string(dir.join("token"))?.trim().to_string();
            return Ok((child, text.trim().to_string(), token));
        }
        if Instant::now() > end {
            let _ = child.kill();
            return Err("taskd did not start listening within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn report(what: &str, problems: &[String]) -> bool {
    if problems.is_empty() {
        println!("{what}: ok");
    } else {
        println!("{what}: {} problem(s)", problems.len());
        for p in problems {
            println!("  {p}");
        }
    }
    problems.is_empty()
}

async fn mixed_mode(args: &[String]) -> Res<bool> {
    let Some(taskd) = args.first() else {
        return Err("usage: rpc_load mixed TASKD [CLIENTS [SECONDS [NAMES]]]".into());
    };
    let num = |i: usize, default: u64| -> Res<u64> {
        Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(default))
    };
    let (clients, secs, names) = (num(1, 64)?, num(2, 60)?, num(3, 256)?.clamp(1, 1000));
    let dir = tempfile::Builder::new().prefix("taskd-load-").tempdir()?;
    let (mut child, addr, token) = start_daemon(taskd, dir.path())?;
    let cfg = mixed::Config {
        addr: addr.clone(),
        token: token.clone(),
        clients: clients as usize,
        duration: Duration::from_secs(secs),
        names: names as usize,
    };
    let outcome = mixed::run(cfg).await;
    print!("{}", outcome.table());
    let mut ok = report("\nrequests", &outcome.problems());
    ok &= report("state", &mixed::verify(&addr, &token, &outcome.expected).await);
    child.kill()?;
    child.wait()?;
    let (mut child, addr, token) = start_daemon(taskd, dir.path())?;
    ok &= report(
        "state after kill -9 and a restart",
        &mixed::verify(&addr, &token, &outcome.expected).await,
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    child.wait()?;
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("mixed") => mixed_mode(&args[1..]).await,
        _ => one_method(&args).await.map(|()| true),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rpc_load: {e}");
            ExitCode::from(2)
        }
    }
}
