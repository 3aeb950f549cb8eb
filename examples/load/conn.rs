//! What taskd's load generators share: a raw-TCP JSON-RPC 2.0 connection (one request a
//! line, each answered before the next is sent) and latency percentiles.

use std::io;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A JSON-RPC error answer: its code and message.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The error code (`error::codes` in taskd, or JSON-RPC's own).
    pub code: i64,
    /// The message.
    pub message: String,
}

/// A raw-TCP connection, logged in.
pub struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    next_id: u64,
    line: String,
}

impl Conn {
    /// Connects to `addr` and, unless `token` is empty, logs in with it.
    pub async fn connect(addr: &str, token: &str) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut c = Conn { rd: BufReader::new(rd), wr, next_id: 1, line: String::new() };
        if !token.is_empty() {
            let arg = Value::from(token).to_string();
            match c.call("Auth.Login", &arg).await?.0 {
                Ok(_) => {}
                Err(e) => return Err(io::Error::other(format!("Auth.Login: {}", e.message))),
            }
        }
        Ok(c)
    }

    /// Sends one request whose argument is the JSON text `arg`, and returns the raw reply line
    /// (without parsing it) and how long the answer took.
    pub async fn call_raw(&mut self, method: &str, arg: &str) -> io::Result<(&str, Duration)> {
        let id = self.next_id;
        self.next_id += 1;
        let req = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"{method}\",\"params\":[{arg}]}}\n"
        );
        let t = Instant::now();
        self.wr.write_all(req.as_bytes()).await?;
        self.line.clear();
        if self.rd.read_line(&mut self.line).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok((&self.line, t.elapsed()))
    }

    /// Like [`Conn::call_raw`], with the reply parsed: its `result`, or its `error`.
    pub async fn call(
        &mut self,
        method: &str,
        arg: &str,
    ) -> io::Result<(Result<Value, RpcError>, Duration)> {
        let expect = self.next_id;
        let (line, took) = self.call_raw(method, arg).await?;
        let mut v: Value = serde_json::from_str(line)
            .map_err(|e| io::Error::other(format!("{method}: bad reply {line:?}: {e}")))?;
        if v["id"] != expect {
            return Err(io::Error::other(format!(
                "{method}: reply for id {} to {expect}",
                v["id"]
            )));
        }
        let r = match v.get_mut("error") {
            Some(e) => Err(RpcError {
                code: e["code"].as_i64().unwrap_or(0),
                message: e["message"].as_str().unwrap_or("").to_string(),
            }),
            None => Ok(v.get_mut("result").map(Value::take).unwrap_or(Value::Null)),
        };
        Ok((r, took))
    }
}

/// The `p` quantile (0..=1) of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
