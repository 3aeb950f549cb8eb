//! How fast `exec::Process::spawn` starts and reaps short commands: `/bin/true`, N times, one
//! at a time and with C in flight, each spawned, waited for and its output drained as a run
//! would be. A measure of the spawning path alone (no store, no RPC), to compare builds with
//! when that path changes.
//!
//! Usage: `cargo run --release --example spawn_rate [N] [C]` (defaults 2000 and 16).

use std::time::{Duration, Instant};

use taskd::exec::{Process, Spec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

async fn one(spec: &Spec) {
    let (tx, mut rx) = mpsc::channel(4);
    let process = Process::spawn(spec, tx).expect("spawn");
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    process.wait(CancellationToken::new(), Duration::from_secs(5)).await;
    drain.await.expect("drain");
}

/// Spawns `n` runs of `spec` with at most `in_flight` at once; returns runs per second.
async fn rate(spec: &Spec, n: usize, in_flight: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        if tasks.len() >= in_flight {
            tasks.join_next().await.expect("a task").expect("a run");
        }
        let spec = spec.clone();
        tasks.spawn(async move { one(&spec).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a run");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let n = args.first().copied().unwrap_or(2000);
    let c = args.get(1).copied().unwrap_or(16);
    taskd::exec::become_subreaper().expect("subreaper");
    let spec = Spec {
        argv: vec!["/bin/true".into()],
        env: vec![("PATH".into(), taskd::exec::DEFAULT_PATH.into())],
        cwd: "/".into(),
        user: None,
        tag: None,
    };
    // Warm up: the reaper thread, page cache, the runtime's workers.
    rate(&spec, 50, c).await;
    println!("sequential: {:.0} spawns/s", rate(&spec, n, 1).await);
    println!("{c} in flight: {:.0} spawns/s", rate(&spec, n, c).await);
}
