//! `{queue}_logs` (with `logs = true`): each line of a task's run pushed as it is written,
//! then the run's `done` with its exit status.
//!
//! Mechanism: one [`Pusher`] per consumer follows the daemon's events. A run of a task's unit
//! (known by [`TASK_ID`] in its environment) that starts gets a push of its own
//! ([`push_run`]): it subscribes to the run's log as the log opens (the store's live feed, as
//! `Run.Follow` does), pushes what was written before the subscription, then each batch of
//! complete lines as it arrives (one `RPUSH` per batch, whatever is waiting), then what is
//! left of an unfinished last line once the log closes, and `done` once the run's end is
//! recorded. A run whose log never opened on this daemon (it never started, or another server
//! of a cluster ran it) gets its output read from the store at its end instead.
//!
//! Invariants and limits:
//! - a run's messages are pushed in order: its lines (stdout and stderr as they came), then
//!   `done`, once;
//! - a push is tried [`PUSH_TRIES`] times with back-off on the pusher's connection (made again
//!   after a failure: Redis may have been restarted); a batch that still fails is dropped and
//!   logged, the following ones are tried;
//! - a line longer than [`LINE_MAX`] is pushed in pieces;
//! - after a restart of taskd, the runs still active (on agents) are pushed from then on: what
//!   they wrote before is not pushed again, nor is the end of a run that ended while taskd was
//!   down;
//! - events missed (a burst beyond the event buffer) are made up for by looking up the runs
//!   being pushed: one that ended gets its `done`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ANSWER, BACKOFF};
use crate::registry::{ListFilter, Registry};
use crate::run::RunRecord;
use crate::store::logs::{self, LiveChunk, LogQuery, Stream};
use crate::store::{Event, EventKind};
use crate::task_units::{TASK_ID, TASK_TYPE};

/// Bytes of output one message carries at most.
pub const LINE_MAX: usize = 64 * 1024;
/// Tries to push one batch, at most.
const PUSH_TRIES: u32 = 5;
/// Bytes of the in-memory tail a push takes over when it subscribes.
const TAIL: usize = 1 << 20;

/// A task, as its messages name it.
#[derive(Debug, Clone)]
struct TaskRef {
    id: String,
    kind: String,
}

impl TaskRef {
    fn message(&self, msg_type: &str, data: &str) -> String {
        json!({"id": self.id, "type": self.kind, "msg_type": msg_type, "data": data}).to_string()
    }
}

/// The task unit `name` runs, if it runs one.
fn task_of(registry: &Registry, name: &str) -> Option<TaskRef> {
    if !name.starts_with("redis-") {
        return None;
    }
    let u = registry.get(name).ok()?;
    let id = u.config.env.get(TASK_ID)?.clone();
    let kind = u.config.env.get(TASK_TYPE).cloned().unwrap_or_default();
    Some(TaskRef { id, kind })
}

/// Pushes to `list`, on a connection kept between pushes and made again after a failure.
struct Sink {
    client: redis::Client,
    list: String,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl Sink {
    /// Pushes `msgs` (one `RPUSH`: whole, in order), tried again with back-off.
    async fn push(&self, msgs: Vec<String>, stop: &CancellationToken) {
        if msgs.is_empty() {
            return;
        }
        let mut delay = BACKOFF.0;
        for attempt in 1..=PUSH_TRIES {
            match self.try_push(&msgs).await {
                Ok(()) => return,
                Err(e) if attempt == PUSH_TRIES || stop.is_cancelled() => {
                    tracing::warn!(list = %self.list, messages = msgs.len(), error = %e, "redis: cannot push a task's output; dropped");
                    return;
                }
                Err(_) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {}
                    }
                    delay = (delay * 2).min(BACKOFF.1);
                }
            }
        }
    }

    async fn try_push(&self, msgs: &[String]) -> redis::RedisResult<()> {
        let mut kept = self.conn.lock().await;
        let mut c = match kept.take() {
            Some(c) => c,
            None => {
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(ANSWER));
                self.client.get_multiplexed_async_connection_with_config(&cfg).await?
            }
        };
        let _: usize = redis::AsyncCommands::rpush(&mut c, &self.list, msgs).await?;
        // Kept only after it worked: a failed one is made again next time.
        *kept = Some(c);
        Ok(())
    }
}

/// Follows the daemon's events and pushes the output of tasks' runs.
pub struct Pusher {
    registry: Registry,
    sink: Arc<Sink>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Each run being pushed: cancelled once its end is recorded.
    runs: HashMap<i64, CancellationToken>,
}

impl Pusher {
    /// A pusher to `list` through `client`, its pushes in `tasks`, until `stop`.
    pub fn new(
        registry: Registry,
        client: redis::Client,
        list: String,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Pusher {
        let sink = Arc::new(Sink { client, list, conn: Mutex::new(None) });
        Pusher { registry, sink, stop, tasks, runs: HashMap::new() }
    }

    /// Subscribes to events, then takes over the task runs active now (from before a restart);
    /// `ready` is told once both are done, so that no task taken after slips between.
    pub async fn run(mut self, ready: tokio::sync::oneshot::Sender<()>) {
        let mut events = self.registry.store().subscribe_events();
        let mut active = Vec::new();
        let filter = ListFilter { name_glob: Some("redis-*".into()), ..ListFilter::default() };
        self.registry.list(&filter, |c, s| {
            if c.env.contains_key(TASK_ID) {
                active.extend(s.active.iter().map(|&run| (c.name.clone(), run)));
            }
        });
        for (unit, run) in active {
            if let Some(task) = task_of(&self.registry, &unit) {
                self.start(run, task, false);
            }
        }
        let _ = ready.send(());
        loop {
            let e = tokio::select! {
                () = self.stop.cancelled() => return,
                e = events.recv() => e,
            };
            match e {
                Ok(e) => self.event(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "redis: events missed; the runs being pushed are looked up"
                    );
                    self.look_up().await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn event(&mut self, e: Event) {
        let Some(run) = e.run else { return };
        match e.kind {
            EventKind::RunStarted if !self.runs.contains_key(&run) => {
                if let Some(task) = task_of(&self.registry, &e.unit) {
                    self.start(run, task, true);
                }
            }
            EventKind::RunFinished => match self.runs.remove(&run) {
                Some(ended) => ended.cancel(),
                // Ended without starting (cancelled while queued): only its `done`.
                None => {
                    if let Some(task) = task_of(&self.registry, &e.unit) {
                        self.start(run, task, true);
                        if let Some(ended) = self.runs.remove(&run) {
                            ended.cancel();
                        }
                    }
                }
            },
            _ => {}
        }
    }

    /// After missed events: the runs being pushed that ended are told so.
    async fn look_up(&mut self) {
        let ids: Vec<i64> = self.runs.keys().copied().collect();
        for id in ids {
            let ended = self.registry.run(id).await.map_or(true, |r| r.state.is_final());
            if ended && let Some(t) = self.runs.remove(&id) {
                t.cancel();
            }
        }
    }

    /// Starts pushing run `run` of `task` (`written`: also what it wrote before now).
    fn start(&mut self, run: i64, task: TaskRef, written: bool) {
        let ended = CancellationToken::new();
        self.runs.insert(run, ended.clone());
        let (registry, sink, stop) = (self.registry.clone(), self.sink.clone(), self.stop.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                () = push_run(&registry, &sink, &stop, run, &task, written, ended) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Pushes run `run`'s output as it is written (`written`: from its start), then its `done`
/// once `ended`.
async fn push_run(
    registry: &Registry,
    sink: &Sink,
    stop: &CancellationToken,
    run: i64,
    task: &TaskRef,
    written: bool,
    ended: CancellationToken,
) {
    let logs = registry.store().logs().clone();
    let opened = logs.subscribe_when_open(run, Some(TAIL)).await;
    let follow = tokio::select! {
        f = opened => f.ok(),
        () = ended.cancelled() => None,
    };
    let mut lines = LineSplitter::default();
    match follow {
        Some(mut f) => {
            if written {
                let before = read_stored(&logs, run, Some(f.file_len)).await;
                let mut msgs: Vec<String> =
                    before.iter().map(|(s, line)| task.message(s.as_str(), line)).collect();
                for c in &f.tail {
                    msgs.extend(lines.push(c).map(|(s, l)| task.message(s.as_str(), &l)));
                }
                sink.push(msgs, stop).await;
            }
            push_live(&mut f, &mut lines, sink, stop, task).await;
        }
        // Its log never opened here: what the store has, at its end.
        None => {
            let msgs = read_stored(&logs, run, None).await;
            sink.push(msgs.iter().map(|(s, l)| task.message(s.as_str(), l)).collect(), stop).await;
        }
    }
    let rest: Vec<String> = lines.rest().map(|(s, l)| task.message(s.as_str(), &l)).collect();
    sink.push(rest, stop).await;
    ended.cancelled().await;
    if let Ok(rec) = registry.run(run).await {
        sink.push(vec![task.message("done", &exit_status(&rec).to_string())], stop).await;
    }
}

/// Pushes the lines of each batch of live chunks until the log closes.
async fn push_live(
    f: &mut logs::Follow,
    lines: &mut LineSplitter,
    sink: &Sink,
    stop: &CancellationToken,
    task: &TaskRef,
) {
    use crate::store::live::LiveError;
    loop {
        let mut msgs = Vec::new();
        match f.live.recv().await {
            Ok(c) => msgs.extend(lines.push(&c).map(|(s, l)| task.message(s.as_str(), &l))),
            Err(LiveError::Lagged(n)) => {
                tracing::warn!(run = %task.id, chunks = n, "redis: output skipped: pushes fell behind")
            }
            Err(LiveError::Closed) => return,
        }
        // Whatever else is waiting goes in the same push.
        while msgs.len() < 1024 {
            match f.live.try_recv() {
                Ok(Some(c)) => {
                    msgs.extend(lines.push(&c).map(|(s, l)| task.message(s.as_str(), &l)));
                }
                Ok(None) | Err(_) => break,
            }
        }
        sink.push(msgs, stop).await;
    }
}

/// The lines of run `run`'s stored output (up to byte `end` of its log file), stdout's then
/// stderr's.
async fn read_stored(logs: &logs::Logs, run: i64, end: Option<u64>) -> Vec<(Stream, String)> {
    let mut out = Vec::new();
    for stream in [Stream::Stdout, Stream::Stderr] {
        let mut offset = 0;
        loop {
            let q = LogQuery {
                stream: Some(stream),
                offset,
                limit: LINE_MAX,
                end,
                ..LogQuery::default()
            };
            let Ok(slice) = logs.read(run, q).await else { break };
            out.extend(slice.data.lines().map(|l| (stream, l.to_string())));
            if slice.eof || slice.next_offset <= offset {
                break;
            }
            offset = slice.next_offset;
        }
    }
    out
}

/// The exit status `done` carries: the code, 128 + the signal that ended the run, or -1 for a
/// run that never ran.
fn exit_status(rec: &RunRecord) -> i32 {
    match (rec.exit_code, rec.signal) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => -1,
    }
}

/// Live output cut into lines, per stream: a line waits for its newline (or for
/// [`LINE_MAX`] bytes, then goes in pieces).
#[derive(Default)]
struct LineSplitter {
    carry: [Vec<u8>; 2],
}

impl LineSplitter {
    /// The lines `c` completes.
    fn push(&mut self, c: &LiveChunk) -> impl Iterator<Item = (Stream, String)> + use<> {
        let buf = &mut self.carry[usize::from(c.stream == Stream::Stderr)];
        buf.extend_from_slice(&c.data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
            out.push(String::from_utf8_lossy(&buf[start..start + i]).into_owned());
            start += i + 1;
        }
        while buf.len() - start >= LINE_MAX {
            out.push(String::from_utf8_lossy(&buf[start..start + LINE_MAX]).into_owned());
            start += LINE_MAX;
        }
        buf.drain(..start);
        let stream = c.stream;
        out.into_iter().map(move |l| (stream, l))
    }

    /// What is left unfinished at the end.
    fn rest(&mut self) -> impl Iterator<Item = (Stream, String)> + use<> {
        let [out, err] = std::mem::take(&mut self.carry);
        [(Stream::Stdout, out), (Stream::Stderr, err)]
            .into_iter()
            .filter(|(_, rest)| !rest.is_empty())
            .map(|(s, rest)| (s, String::from_utf8_lossy(&rest).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: Stream, data: &[u8]) -> LiveChunk {
        LiveChunk { stream, at: jiff::Timestamp::now(), data: Arc::from(data) }
    }

    #[test]
    fn lines_wait_for_their_newline_per_stream() {
        let mut l = LineSplitter::default();
        assert_eq!(
            l.push(&chunk(Stream::Stdout, b"a\nb")).collect::<Vec<_>>(),
            [(Stream::Stdout, "a".into())]
        );
        assert_eq!(
            l.push(&chunk(Stream::Stderr, b"e1\n")).collect::<Vec<_>>(),
            [(Stream::Stderr, "e1".into())]
        );
        let got: Vec<_> = l.push(&chunk(Stream::Stdout, b"c\nd\n")).collect();
        assert_eq!(got, [(Stream::Stdout, "bc".into()), (Stream::Stdout, "d".into())]);
        assert_eq!(l.push(&chunk(Stream::Stderr, b"tail")).count(), 0);
        assert_eq!(l.rest().collect::<Vec<_>>(), [(Stream::Stderr, "tail".into())]);
        // A line longer than a message goes in pieces.
        let long = vec![b'x'; LINE_MAX * 2 + 5];
        let got: Vec<_> = l.push(&chunk(Stream::Stdout, &long)).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(l.rest().next().map(|(_, s)| s.len()), Some(5));
    }
}
