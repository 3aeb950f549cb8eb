//! A load generator for taskd's raw-TCP JSON-RPC: N connections, each sending one request
//! and waiting for its answer (closed loop), for a fixed time. Prints requests per second and
//! latency percentiles. Used by `scripts/bench`.
//!
//! ```sh
//! cargo run --release --example rpc_load -- ADDR TOKEN CONNECTIONS SECONDS [METHOD [ARG]]
//! ```
//!
//! `METHOD` defaults to `TaskUnit.List` and `ARG` (JSON) to `{}`. The output is one JSON
//! object: `{"connections", "requests", "per_second", "p50_us", "p99_us", "errors"}`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
    let stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    if !token.is_empty() {
        let login = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"Auth.Login\",\"params\":[{}]}}\n",
            serde_json::Value::from(token)
        );
        wr.write_all(login.as_bytes()).await?;
        rd.read_line(&mut line).await?;
    }
    let mut s = Sample { latencies: Vec::new(), errors: 0 };
    let mut id = 1u64;
    while Instant::now() < until {
        let req = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"{method}\",\"params\":[{arg}]}}\n"
        );
        let t = Instant::now();
        wr.write_all(req.as_bytes()).await?;
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        s.latencies.push(t.elapsed().as_micros() as u64);
        if line.contains("\"error\"") {
            s.errors += 1;
        }
        id += 1;
    }
    Ok(s)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
