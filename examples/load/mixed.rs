//! The mixed workload: N clients for D seconds, each doing a random mix of `TaskUnit.Add`,
//! `Edit`, `Delete`, `Start`, `Get` and `List` on one small set of names shared by all, so
//! that clients collide on purpose. Every answer is classified: an error a client earns
//! under such races (the name is taken, or not there) is expected; any other error is a
//! failure, and so is a request still unanswered after [`STUCK`] (a deadlock). At the end,
//! [`verify`] compares the state the acknowledged answers imply with the daemon's.
//!
//! The expected state is exact although clients race. On one name, acknowledged `Add`s and
//! `Delete`s alternate (an Add succeeds only while the name is free, a Delete only while it
//! is taken), so a name must exist at the end exactly when it had one more acknowledged Add
//! than Delete, and any other difference is itself an inconsistency. Its definition: every
//! Add and Edit answer carries the unit's `created_at` (which incarnation of the name) and
//! `updated_at`, and the daemon applies the edits of one unit one at a time, so the answer
//! of the newest incarnation with the latest `updated_at` holds the definition it must have.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::{Value, json};
use taskd::error::codes;

use super::conn::{Conn, RpcError, percentile};

/// A request unanswered for this long counts as a deadlock.
pub const STUCK: Duration = Duration::from_secs(10);

/// Failure messages kept for the report (all are counted).
const KEPT_FAILURES: usize = 50;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` of the daemon.
    pub addr: String,
    /// Its token (empty with `--auth none`).
    pub token: String,
    /// Concurrent clients, one connection each.
    pub clients: usize,
    /// How long they keep sending.
    pub duration: Duration,
    /// Size of the shared name space (`mx-000`, `mx-001`, …).
    pub names: usize,
}

/// The operations, in the order the report lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Add,
    Edit,
    Delete,
    Start,
    Get,
    List,
}

/// How often each operation is picked, out of 100.
const MIX: [(Op, u64); 6] = [
    (Op::Add, 20),
    (Op::Edit, 20),
    (Op::Delete, 15),
    (Op::Start, 10),
    (Op::Get, 25),
    (Op::List, 10),
];

impl Op {
    fn method(self) -> &'static str {
        match self {
            Op::Add => "TaskUnit.Add",
            Op::Edit => "TaskUnit.Edit",
            Op::Delete => "TaskUnit.Delete",
            Op::Start => "TaskUnit.Start",
            Op::Get => "TaskUnit.Get",
            Op::List => "TaskUnit.List",
        }
    }

    /// Whether error `code` is the client's own doing when names are raced for.
    fn expected(self, code: i64) -> bool {
        let code = code as i32;
        match self {
            Op::Add => code == codes::UNIT_EXISTS,
            Op::Edit | Op::Delete | Op::Start | Op::Get => code == codes::UNIT_NOT_FOUND,
            Op::List => false,
        }
    }
}

fn code_name(code: i64) -> &'static str {
    match code as i32 {
        codes::UNIT_EXISTS => "exists",
        codes::UNIT_NOT_FOUND => "not found",
        _ => "other",
    }
}

/// A small, fast pseudo-random generator (splitmix64); each client seeds its own.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

fn name_of(i: usize) -> String {
    format!("mx-{i:03}")
}

/// A definition to add: a one-shot job, a scheduled job, or a paused script.
fn definition(name: &str, variant: u64, tag: &str) -> Value {
    match variant % 3 {
        0 => json!({"name": name, "command": ["true"], "description": tag}),
        1 => json!({"name": name, "every": "1h", "command": ["true"], "description": tag}),
        _ => json!({"name": name, "script": "echo load", "paused": true, "description": tag}),
    }
}

/// An edit: valid for every definition above.
fn patch(name: &str, variant: u64, tag: &str) -> Value {
    match variant % 4 {
        0 => json!({"name": name, "description": tag}),
        1 => json!({"name": name, "every": "30m", "description": tag}),
        2 => json!({"name": name, "every": null, "env": {"TAG": tag}}),
        _ => json!({"name": name, "paused": variant % 8 < 4, "description": tag}),
    }
}

/// An acknowledged Add or Edit: which incarnation, when, and the definition it answered.
#[derive(Debug, Clone)]
struct Ack {
    add: bool,
    created: Timestamp,
    updated: Timestamp,
    definition: Value,
}

/// What one client saw of one name.
#[derive(Debug, Clone, Default)]
struct NameLog {
    adds: u64,
    deletes: u64,
    acks: Vec<Ack>,
    /// A change was sent whose answer never came: the name's state is not known.
    unknown: bool,
}

/// What one client saw.
struct ClientLog {
    latencies: BTreeMap<Op, Vec<u64>>,
    expected: BTreeMap<(Op, i64), u64>,
    failed: BTreeMap<Op, u64>,
    failures: Vec<String>,
    names: Vec<NameLog>,
}

impl ClientLog {
    fn fail(&mut self, op: Op, what: String) {
        *self.failed.entry(op).or_default() += 1;
        self.failures.push(what);
    }
}

fn time_of(info: &Value, field: &str) -> Option<Timestamp> {
    info[field].as_str()?.parse().ok()
}

fn ack_of(info: &Value, add: bool) -> Option<Ack> {
    Some(Ack {
        add,
        created: time_of(info, "created_at")?,
        updated: time_of(info, "updated_at")?,
        definition: info.get("definition")?.clone(),
    })
}

async fn client(cfg: Arc<Config>, me: usize, until: Instant) -> ClientLog {
    let mut log = ClientLog {
        latencies: BTreeMap::new(),
        expected: BTreeMap::new(),
        failed: BTreeMap::new(),
        failures: Vec::new(),
        names: vec![NameLog::default(); cfg.names],
    };
    let mut conn = match tokio::time::timeout(STUCK, Conn::connect(&cfg.addr, &cfg.token)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log.fail(Op::List, format!("client {me}: connect: {e}"));
            return log;
        }
        Err(_) => {
            log.fail(Op::List, format!("client {me}: no connection within {STUCK:?}"));
            return log;
        }
    };
    let seed = Timestamp::now().as_nanosecond() as u64 ^ ((me as u64) << 48);
    let mut rng = Rng(seed);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let i = rng.below(cfg.names as u64) as usize;
        let name = name_of(i);
        let mut pick = rng.below(100);
        let op = MIX
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map_or(Op::Get, |(op, _)| *op);
        let tag = format!("c{me} #{n}");
        let variant = rng.below(1 << 16);
        let arg = match op {
            Op::Add => definition(&name, variant, &tag),
            Op::Edit => patch(&name, variant, &tag),
            Op::Delete | Op::Start | Op::Get => json!(name),
            // Groups of at most ten names, so that a page limit on List cannot hide any.
            Op::List => json!({"name_glob": format!("mx-{:02}?", i / 10)}),
        };
        let answer = tokio::time::timeout(STUCK, conn.call(op.method(), &arg.to_string())).await;
        let (reply, took) = match answer {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                log.names[i].unknown |= matches!(op, Op::Add | Op::Edit | Op::Delete);
                log.fail(op, format!("client {me}: {} {name}: {e}", op.method()));
                break;
            }
            Err(_) => {
                log.names[i].unknown |= matches!(op, Op::Add | Op::Edit | Op::Delete);
                log.fail(
                    op,
                    format!("client {me}: {} {name}: no answer in {STUCK:?}", op.method()),
                );
                break;
            }
        };
        log.latencies.entry(op).or_default().push(took.as_micros() as u64);
        match reply {
            Err(RpcError { code, .. }) if op.expected(code) => {
                *log.expected.entry((op, code)).or_default() += 1;
            }
            Err(RpcError { code, message }) => {
                log.fail(
                    op,
                    format!("client {me}: {} {name}: error {code}: {message}", op.method()),
                );
            }
            Ok(v) => {
                let fine = match op {
                    Op::Add | Op::Edit => match ack_of(&v, op == Op::Add) {
                        Some(a) if v["name"] == name.as_str() => {
                            log.names[i].adds += u64::from(op == Op::Add);
                            log.names[i].acks.push(a);
                            true
                        }
                        _ => false,
                    },
                    Op::Delete => {
                        log.names[i].deletes += 1;
                        v == json!(true)
                    }
                    Op::Start => v["unit"] == name.as_str() && v["id"].is_i64(),
                    Op::Get => v["name"] == name.as_str(),
                    Op::List => v.as_array().is_some_and(|a| a.len() <= 10),
                };
                if !fine {
                    log.fail(
                        op,
                        format!("client {me}: {} {name}: unexpected answer {v}", op.method()),
                    );
                }
            }
        }
    }
    log
}

/// What the daemon must hold at the end of a run, per name.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Names that must exist: incarnation, last edit, and the definitions it may have (more
    /// than one only if two answers carried the same `updated_at`).
    present: BTreeMap<String, (Timestamp, Timestamp, Vec<Value>)>,
    /// Names whose state is not known (an answer was lost): not checked.
    unknown: BTreeSet<String>,
    names: usize,
}

impl Expected {
    fn from_logs(names: &[NameLog], failures: &mut Vec<String>) -> Expected {
        let mut e = Expected { names: names.len(), ..Default::default() };
        for (i, log) in names.iter().enumerate() {
            let name = name_of(i);
            if log.unknown {
                e.unknown.insert(name);
                continue;
            }
            match log.adds.checked_sub(log.deletes) {
                Some(0) => {}
                Some(1) => {
                    let created = log.acks.iter().filter(|a| a.add).map(|a| a.created).max();
                    let Some(created) = created else { continue };
                    if log.acks.iter().any(|a| a.created > created) {
                        failures.push(format!("{name}: an edit answered for a unit never added"));
                    }
                    let mine: Vec<&Ack> =
                        log.acks.iter().filter(|a| a.created == created).collect();
                    let updated = mine.iter().map(|a| a.updated).max().unwrap_or(created);
                    let defs = mine
                        .iter()
                        .filter(|a| a.updated == updated)
                        .map(|a| a.definition.clone())
                        .collect();
                    e.present.insert(name, (created, updated, defs));
                }
                _ => {
                    failures.push(format!(
                        "{name}: {} Adds and {} Deletes acknowledged, which cannot alternate",
                        log.adds, log.deletes
                    ));
                    e.unknown.insert(name);
                }
            }
        }
        e
    }
}

/// The result of a run.
pub struct Outcome {
    clients: usize,
    elapsed: Duration,
    latencies: BTreeMap<Op, Vec<u64>>,
    expected_errors: BTreeMap<(Op, i64), u64>,
    failed: BTreeMap<Op, u64>,
    failures: Vec<String>,
    /// The state the acknowledged answers imply.
    pub expected: Expected,
}

/// Runs the workload and returns what it saw.
pub async fn run(cfg: Config) -> Outcome {
    let start = Instant::now();
    let until = start + cfg.duration;
    let cfg = Arc::new(cfg);
    let tasks: Vec<_> =
        (0..cfg.clients).map(|c| tokio::spawn(client(cfg.clone(), c, until))).collect();
    let mut o = Outcome {
        clients: cfg.clients,
        elapsed: Duration::ZERO,
        latencies: BTreeMap::new(),
        expected_errors: BTreeMap::new(),
        failed: BTreeMap::new(),
        failures: Vec::new(),
        expected: Expected::default(),
    };
    let mut names = vec![NameLog::default(); cfg.names];
    for t in tasks {
        let log = match t.await {
            Ok(log) => log,
            Err(e) => {
                o.failures.push(format!("a client task failed: {e}"));
                continue;
            }
        };
        for (op, l) in log.latencies {
            o.latencies.entry(op).or_default().extend(l);
        }
        for (k, n) in log.expected {
            *o.expected_errors.entry(k).or_default() += n;
        }
        for (op, n) in log.failed {
            *o.failed.entry(op).or_default() += n;
        }
        o.failures.extend(log.failures);
        for (all, mine) in names.iter_mut().zip(log.names) {
            all.adds += mine.adds;
            all.deletes += mine.deletes;
            all.acks.extend(mine.acks);
            all.unknown |= mine.unknown;
        }
    }
    o.elapsed = start.elapsed();
    for l in o.latencies.values_mut() {
        l.sort_unstable();
    }
    o.expected = Expected::from_logs(&names, &mut o.failures);
    o
}

impl Outcome {
    /// Everything that went wrong: failed requests, inconsistent answers, and a run that did
    /// not exercise what it is for (an operation that never succeeded, races that never
    /// happened). Empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.failures.iter().take(KEPT_FAILURES).cloned().collect();
        if self.failures.len() > KEPT_FAILURES {
            out.push(format!("… and {} more failures", self.failures.len() - KEPT_FAILURES));
        }
        for (op, _) in MIX {
            let answered = self.latencies.get(&op).map_or(0, Vec::len) as u64;
            let refused: u64 =
                self.expected_errors.iter().filter(|((o, _), _)| *o == op).map(|(_, n)| n).sum();
            if answered <= refused + self.failed.get(&op).copied().unwrap_or(0) {
                out.push(format!("no {} succeeded", op.method()));
            }
        }
        if self.expected_errors.is_empty() {
            out.push("no client ever raced another (no exists/not-found answer)".into());
        }
        out
    }

    /// A table: per method, answers, rate, latency percentiles, errors by class.
    pub fn table(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} clients, {:.1} s, {} names, {} exist at the end\n",
            self.clients,
            secs,
            self.expected.names,
            self.expected.present.len()
        );
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>8} {:>8} {:>8} {:>9}  {:<26} {:>6}",
            "method", "answers", "per s", "p50 µs", "p99 µs", "max µs", "expected errors", "failed"
        );
        let mut total = 0;
        for (op, _) in MIX {
            let l = self.latencies.get(&op).map(Vec::as_slice).unwrap_or(&[]);
            total += l.len();
            let expected: Vec<String> = self
                .expected_errors
                .iter()
                .filter(|((o, _), _)| *o == op)
                .map(|((_, code), n)| format!("{} {n}", code_name(*code)))
                .collect();
            let _ = writeln!(
                s,
                "{:<16} {:>8} {:>8.0} {:>8} {:>8} {:>9}  {:<26} {:>6}",
                op.method(),
                l.len(),
                l.len() as f64 / secs,
                percentile(l, 0.50),
                percentile(l, 0.99),
                l.last().copied().unwrap_or(0),
                if expected.is_empty() { "-".to_string() } else { expected.join(", ") },
                self.failed.get(&op).copied().unwrap_or(0),
            );
        }
        let _ = writeln!(s, "{:<16} {:>8} {:>8.0}", "all", total, total as f64 / secs);
        s
    }
}

/// Waits until no run is active (so that a `kill -9` after it cannot catch the daemon
/// spawning a process), then compares the daemon's state with `want`: `TaskUnit.Get` of every
/// name (existence, incarnation, last edit, definition) and `TaskUnit.List` over all of them
/// (nothing missing, nothing extra). Returns the differences; empty when they agree.
pub async fn verify(addr: &str, token: &str, want: &Expected) -> Vec<String> {
    let mut out = Vec::new();
    let mut conn = match tokio::time::timeout(STUCK, Conn::connect(addr, token)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return vec![format!("verify: connect: {e}")],
        Err(_) => return vec![format!("verify: no connection within {STUCK:?}")],
    };
    let mut call = async |method: &str, arg: Value| match tokio::time::timeout(
        STUCK,
        conn.call(method, &arg.to_string()),
    )
    .await
    {
        Ok(Ok((r, _))) => Ok(r),
        Ok(Err(e)) => Err(format!("{method} {arg}: {e}")),
        Err(_) => Err(format!("{method} {arg}: no answer in {STUCK:?}")),
    };
    let idle_by = Instant::now() + STUCK;
    loop {
        match call("Daemon.Status", json!({})).await {
            Ok(Ok(v)) if v["runs"]["running"].as_u64().unwrap_or(0) == 0 => break,
            Ok(Ok(_)) if Instant::now() < idle_by => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(Ok(v)) => return vec![format!("runs still active after {STUCK:?}: {}", v["runs"])],
            Ok(Err(e)) => return vec![format!("Daemon.Status: {}: {}", e.code, e.message)],
            Err(e) => return vec![e],
        }
    }
    let mut listed = BTreeSet::new();
    for group in 0..want.names.div_ceil(10) {
        match call("TaskUnit.List", json!({"name_glob": format!("mx-{group:02}?")})).await {
            Ok(Ok(Value::Array(units))) => {
                listed.extend(units.iter().filter_map(|u| u["name"].as_str().map(str::to_string)))
            }
            Ok(other) => out.push(format!("TaskUnit.List group {group}: {other:?}")),
            Err(e) => return [out, vec![e]].concat(),
        }
    }
    for i in 0..want.names {
        let name = name_of(i);
        if want.unknown.contains(&name) {
            continue;
        }
        let got = match call("TaskUnit.Get", json!(name)).await {
            Ok(r) => r,
            Err(e) => return [out, vec![e]].concat(),
        };
        match (want.present.get(&name), got) {
            (Some((created, updated, defs)), Ok(info)) => {
                if time_of(&info, "created_at") != Some(*created) {
                    out.push(format!(
                        "{name}: created_at {} instead of {created}",
                        info["created_at"]
                    ));
                } else if time_of(&info, "updated_at") != Some(*updated) {
                    out.push(format!(
                        "{name}: updated_at {} instead of {updated} (the last acknowledged edit)",
                        info["updated_at"]
                    ));
                } else if !defs.contains(&info["definition"]) {
                    out.push(format!(
                        "{name}: definition {} instead of {}",
                        info["definition"], defs[0]
                    ));
                }
                if !listed.contains(&name) {
                    out.push(format!("{name}: exists but TaskUnit.List does not show it"));
                }
            }
            (Some(_), Err(e)) => {
                out.push(format!("{name}: acknowledged but missing ({}: {})", e.code, e.message))
            }
            (None, Ok(info)) => out.push(format!(
                "{name}: exists (created_at {}) but its last acknowledged change was a delete",
                info["created_at"]
            )),
            (None, Err(e)) if e.code == i64::from(codes::UNIT_NOT_FOUND) => {
                if listed.contains(&name) {
                    out.push(format!("{name}: TaskUnit.List shows a unit that does not exist"));
                }
            }
            (None, Err(e)) => out.push(format!("{name}: TaskUnit.Get: {}: {}", e.code, e.message)),
        }
    }
    out
}
