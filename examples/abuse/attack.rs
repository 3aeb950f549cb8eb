//! The attackers of the abuse benchmark: clients that never read their replies, clients that
//! hold connection slots without logging in, and clients that flood the daemon with
//! unauthenticated raw-TCP calls and HTTP requests. Each reconnects whenever the daemon closes
//! it, until its deadline, and counts what the daemon did to it in a shared [`Tally`].

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// How often a client that never reads looks whether the daemon closed it.
const CLOSE_POLL: Duration = Duration::from_millis(250);

/// How often a slot holder sends its byte.
const TRICKLE: Duration = Duration::from_secs(10);

/// How long a flooder waits for an answer before it counts it as missing and reconnects.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// Outcomes counted per attacker class: `(class, outcome) → count`.
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<(&'static str, &'static str), u64>>);

impl Tally {
    /// Counts one `outcome` of `class`.
    pub fn add(&self, class: &'static str, outcome: &'static str) {
        self.add_n(class, outcome, 1);
    }

    /// Counts `n` of `outcome` of `class`.
    pub fn add_n(&self, class: &'static str, outcome: &'static str, n: u64) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *m.entry((class, outcome)).or_default() += n;
    }

    /// Everything counted, by class then outcome.
    pub fn snapshot(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// What every attacker knows.
#[derive(Clone)]
pub struct Target {
    /// `host:port` of the daemon.
    pub addr: String,
    /// The daemon's token, for the attackers that log in before they stop reading.
    pub token: String,
    /// When every attacker lets go.
    pub until: Instant,
    /// Where outcomes are counted.
    pub tally: Arc<Tally>,
}

impl Target {
    async fn connect(&self, class: &'static str) -> Option<TcpStream> {
        let left = self.until.saturating_duration_since(Instant::now());
        match timeout(left, TcpStream::connect(&self.addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                self.tally.add(class, "connections");
                Some(s)
            }
            Ok(Err(_)) => {
                self.tally.add(class, "connect failed");
                // Out of ports or descriptors: do not spin.
                sleep(Duration::from_millis(50)).await;
                None
            }
            Err(_) => None,
        }
    }

    fn over(&self) -> bool {
        Instant::now() >= self.until
    }
}

/// Whether the peer has closed `s` (FIN or RST), without reading from it.
fn peer_closed(s: &TcpStream) -> bool {
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Writes `payload`, then never reads: waits until the daemon closes the connection, counts
/// that, and starts over, until the deadline.
async fn never_read(t: Target, class: &'static str, payload: impl Fn() -> Vec<u8>) {
    while !t.over() {
        let Some(mut s) = t.connect(class).await else { continue };
        let left = t.until.saturating_duration_since(Instant::now());
        // The daemon may stop reading before all of it is in: that is the point.
        let _ = timeout(left, s.write_all(&payload())).await;
        loop {
            if peer_closed(&s) {
                t.tally.add(class, "closed by the daemon");
                break;
            }
            if t.over() {
                // Maybe closed by the daemon all the same: its FIN waits behind the replies
                // this client never read (the daemon's sockets are counted at the end).
                t.tally.add(class, "not seen closed at the end");
                return;
            }
            sleep(CLOSE_POLL).await;
        }
    }
}

fn request(id: u64, method: &str, params: Option<&str>) -> String {
    match params {
        Some(p) => format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"{method}\",\"params\":[{p}]}}\n"
        ),
        None => format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"{method}\"}}\n"),
    }
}

fn login(token: &str) -> String {
    request(0, "Auth.Login", Some(&serde_json::Value::from(token).to_string()))
}

/// Pipelines `calls` `rpc.discover` calls without logging in, and never reads.
pub async fn unauthenticated_reader(t: Target, calls: u64) {
    let payload = (1..=calls).map(|i| request(i, "rpc.discover", None)).collect::<String>();
    never_read(t, "never-reading, not logged in", move || payload.clone().into_bytes()).await;
}

/// Logs in and pipelines `calls` `rpc.discover` calls in the same write, and never reads.
pub async fn authenticated_reader(t: Target, calls: u64) {
    let mut payload = login(&t.token);
    payload.extend((1..=calls).map(|i| request(i, "rpc.discover", None)));
    never_read(t, "never-reading, logged in", move || payload.clone().into_bytes()).await;
}

/// Logs in and follows run `run` in the same write, and never reads.
pub async fn follower(t: Target, run: i64) {
    let mut payload = login(&t.token);
    payload.push_str(&request(1, "Run.Follow", Some(&format!("{{\"id\":{run}}}"))));
    never_read(t, "never-reading Run.Follow", move || payload.clone().into_bytes()).await;
}

/// A connection closed without a word: evicted from probation, or refused when more than the
/// daemon tells why at once (64) are waiting.
const SILENT: &str = "closed without a word (evicted, or refused)";

/// What the daemon said before it closed a connection, judged from its last words.
fn closing_words(text: &str) -> &'static str {
    if text.contains("the limit is") && text.contains("too many connections") {
        "refused: no slot"
    } else if text.contains("kept for clients that call") {
        "closed: on probation, did not log in"
    } else if text.contains("login timed out") {
        "closed: login timeout"
    } else if text.is_empty() {
        SILENT
    } else {
        "closed after another message"
    }
}

/// Holds a connection slot without logging in: one byte (a space, which is no request) now
/// and every 10 s; reads what the daemon says, and reconnects as soon as it is closed.
pub async fn slot_holder(t: Target) {
    const CLASS: &str = "slot holder (1 byte / 10 s)";
    let mut buf = vec![0u8; 1024];
    while !t.over() {
        let Some(mut s) = t.connect(CLASS).await else { continue };
        let mut heard = Vec::new();
        let mut next = Instant::now();
        let outcome = loop {
            tokio::select! {
                () = sleep_until(t.until) => break "open at the end",
                () = sleep_until(next) => {
                    if s.write_all(b" ").await.is_err() {
                        break "closed: write failed";
                    }
                    next += TRICKLE;
                }
                r = s.read(&mut buf) => match r {
                    Ok(0) => break closing_words(&String::from_utf8_lossy(&heard)),
                    Ok(n) => heard.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        break if heard.is_empty() {
                            "closed: reset"
                        } else {
                            closing_words(&String::from_utf8_lossy(&heard))
                        };
                    }
                    Err(_) => break "closed: read failed",
                },
            }
        };
        t.tally.add(CLASS, outcome);
    }
}

/// Unauthenticated calls at full rate on one connection at a time, each answer read before
/// the next call: wrong logins, and `TaskUnit.Start` with names of 15,000 bytes and (one in
/// eight) 1 MiB.
pub async fn rpc_flooder(t: Target, me: u64) {
    const CLASS: &str = "flood: unauthenticated calls";
    let mid = "n".repeat(15_000);
    let huge = "h".repeat(1 << 20);
    let mut n = me;
    while !t.over() {
        let Some(s) = t.connect(CLASS).await else { continue };
        let (rd, mut wr) = s.into_split();
        let mut rd = BufReader::new(rd);
        let mut line = String::new();
        loop {
            n += 1;
            let req = match n % 8 {
                0 => request(n, "TaskUnit.Start", Some(&format!("\"{huge}\""))),
                1 | 3 | 5 => request(n, "Auth.Login", Some(&format!("\"wrong-token-{n}\""))),
                _ => request(n, "TaskUnit.Start", Some(&format!("\"{mid}{n}\""))),
            };
            let left = t.until.saturating_duration_since(Instant::now());
            match timeout(left, wr.write_all(req.as_bytes())).await {
                Ok(Ok(())) => t.tally.add(CLASS, "calls sent"),
                Ok(Err(_)) => {
                    t.tally.add(CLASS, "closed: write failed");
                    break;
                }
                Err(_) => return,
            }
            line.clear();
            let wait = ANSWER_WAIT.min(t.until.saturating_duration_since(Instant::now()));
            match timeout(wait, rd.read_line(&mut line)).await {
                Ok(Ok(0)) => {
                    t.tally.add(CLASS, SILENT);
                    break;
                }
                Ok(Ok(_)) => {
                    let outcome = if line.contains("login timed out") {
                        "closed: login timeout"
                    } else if line.contains("kept for clients that call") {
                        "closed: on probation, did not log in"
                    } else if line.contains("too many connections") {
                        "refused: no slot"
                    } else if line.contains("wrong token") {
                        "answer: wrong token"
                    } else if line.contains("unauthorized") {
                        "answer: unauthorized"
                    } else if line.contains("request too large") {
                        "answer: request too large"
                    } else if line.contains("\"error\"") {
                        "answer: another error"
                    } else {
                        "answer: SUCCESS (should not happen)"
                    };
                    t.tally.add(CLASS, outcome);
                    if outcome.starts_with("closed") || outcome.starts_with("refused") {
                        break;
                    }
                }
                Ok(Err(_)) => {
                    t.tally.add(CLASS, "closed: read failed");
                    break;
                }
                Err(_) if t.over() => return,
                Err(_) => {
                    t.tally.add(CLASS, "no answer in 15 s");
                    break;
                }
            }
        }
    }
}

/// One HTTP request of the flood: what it lacks or carries that the daemon must refuse.
fn http_request(kind: u64, addr: &str, port: &str) -> String {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"TaskUnit.Add","params":[{"name":"pwned","command":["id"]}]}"#;
    let post = |extra: &str, host: &str| {
        format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    match kind % 5 {
        0 => post("", addr),
        1 => post("Authorization: Bearer wrong-token\r\n", addr),
        2 => post("Origin: http://evil.example\r\n", addr),
        3 => post("", &format!("evil.example:{port}")),
        _ => format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    }
}

/// Reads one HTTP response: its status and whether the daemon will close the connection.
async fn read_response(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> io::Result<Option<(u16, bool)>> {
    let mut line = String::new();
    if rd.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        } else if l.starts_with("connection:") && l.contains("close") {
            close = true;
        }
    }
    let mut body = vec![0u8; length];
    rd.read_exact(&mut body).await?;
    Ok(Some((status, close)))
}

/// HTTP requests at full rate, keep-alive while the daemon allows it: without the token, with
/// a wrong one, with a foreign `Origin`, with a foreign `Host` (DNS rebinding), and a
/// WebSocket upgrade with a foreign `Origin`.
pub async fn http_flooder(t: Target, me: u64) {
    const CLASS: &str = "flood: HTTP";
    let port = t.addr.rsplit(':').next().unwrap_or("0").to_string();
    let mut n = me;
    while !t.over() {
        let Some(s) = t.connect(CLASS).await else { continue };
        let (rd, mut wr) = s.into_split();
        let mut rd = BufReader::new(rd);
        loop {
            n += 1;
            let req = http_request(n, &t.addr, &port);
            let left = t.until.saturating_duration_since(Instant::now());
            match timeout(left, wr.write_all(req.as_bytes())).await {
                Ok(Ok(())) => t.tally.add(CLASS, "requests sent"),
                Ok(Err(_)) => {
                    t.tally.add(CLASS, "closed: write failed");
                    break;
                }
                Err(_) => return,
            }
            let wait = ANSWER_WAIT.min(t.until.saturating_duration_since(Instant::now()));
            match timeout(wait, read_response(&mut rd)).await {
                Ok(Ok(Some((status, close)))) => {
                    t.tally.add(
                        CLASS,
                        match status {
                            401 => "answer: 401",
                            403 => "answer: 403",
                            503 => "answer: 503 (no slot)",
                            200..=299 | 101 => "answer: SUCCESS (should not happen)",
                            _ => "answer: another status",
                        },
                    );
                    if close {
                        t.tally.add(CLASS, "closed with Connection: close");
                        break;
                    }
                }
                Ok(Ok(None)) => {
                    t.tally.add(CLASS, "closed by the daemon");
                    break;
                }
                Ok(Err(_)) => {
                    t.tally.add(CLASS, "closed: read failed");
                    break;
                }
                Err(_) if t.over() => return,
                Err(_) => {
                    t.tally.add(CLASS, "no answer in 15 s");
                    break;
                }
            }
        }
    }
}
