//! The least a client process can do to add a unit: connect, send `Auth.Login` and
//! `TaskUnit.Add` in one write, read the two answers, exit. No argument parsing beyond
//! position, no runtime, no decoding. `scripts/bench` times it beside `taskctl add` to show
//! how much of a CLI round trip is the process and the daemon, and how much is `taskctl`.
//!
//! Usage: `least_add STATE_DIR NAME` (reads `address` and `token` from the state directory;
//! adds NAME `every 1h` running `true`). Exits 1 if either answer is an error.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, name] = args.as_slice() else {
        eprintln!("usage: least_add STATE_DIR NAME");
        return ExitCode::from(2);
    };
    let read =
        |f: &str| std::fs::read_to_string(Path::new(dir).join(f)).map(|s| s.trim().to_string());
    let (Ok(addr), Ok(token)) = (read("address"), read("token")) else {
        eprintln!("least_add: cannot read {dir}/address and {dir}/token");
        return ExitCode::FAILURE;
    };
    let login =
        serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "Auth.Login", "params": [token]});
    let add = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "TaskUnit.Add",
        "params": [{"name": name, "every": "1h", "command": ["true"]}]});
    let run = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(&addr)?;
        s.set_nodelay(true)?;
        s.write_all(format!("{login}\n{add}\n").as_bytes())?;
        let mut answers = BufReader::new(s);
        let mut ok = true;
        for _ in 0..2 {
            let mut line = String::new();
            answers.read_line(&mut line)?;
            ok &= line.contains("\"result\"");
        }
        Ok(ok)
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("least_add: {e}");
            ExitCode::FAILURE
        }
    }
}
