//! `Run.Follow`: a run's output as it is written, then one message with how it ended.
//!
//! A follower goes through four steps, each in its own function:
//!
//! 0. [`wait_for_log`]: a queued run has no log yet; wait until its log opens (then the log
//!    writer hands over a [`logs::Follow`]: the file's length at that moment, the tail kept in
//!    memory, and a receiver of every chunk written from then on), or until it ends unstarted.
//! 1. [`send_written`]: what was written before the subscription: the file up to that length,
//!    then the kept tail (or only the last `tail` lines of both).
//! 2. [`send_live`]: every chunk as it is written, batched, split on UTF-8 boundaries
//!    ([`Lines`]), until the log closes.
//! 3. [`send_end`]: the run's end, once it is recorded.
//!
//! The subscription to events is taken before the run is looked at, so its end cannot slip in
//! between. Output never waits for a slow client: one that falls a whole backlog behind is
//! sent `lagged` and the subscription ends ([`Out::send`]).

use std::sync::Arc;

use jsonrpsee::PendingSubscriptionSink;
use jsonrpsee::core::SubscriptionResult;
use jsonrpsee::server::{SubscriptionMessage, SubscriptionSink};
use serde_json::value::to_raw_value;
use tokio::sync::broadcast;

use super::api::rpc_error;
use super::conn::Conn;
use super::run::NOTIFICATION_OVERHEAD;
use super::types::{FollowArg, FollowItem, RunInfo};
use crate::error::Error;
use crate::store::logs::{self, LiveChunk, LogQuery, Logs, Stream};
use crate::store::{Event, EventKind, Store};

/// Bytes of live output a follower gathers into one message at most.
const FOLLOW_BATCH: usize = 64 * 1024;
/// The newest bytes of a run's in-memory tail a follower is sent when it starts.
const FOLLOW_TAIL: usize = 1 << 20;
/// What a follower that fell a whole backlog behind is told before its subscription ends.
const LAGGED: &str = "this follower fell more than 4 MiB behind the run's output and was \
     stopped; read the output with Run.Logs, or follow again";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Follows run `arg.id` for the subscriber `pending`, on connection `conn`.
pub(super) async fn follow(
    store: Store,
    conn: Option<Arc<Conn>>,
    pending: PendingSubscriptionSink,
    arg: FollowArg,
) -> SubscriptionResult {
    let stream = match parse_stream(arg.stream.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            pending.reject(rpc_error(e)).await;
            return Ok(());
        }
    };
    // Subscribe to events before looking at the run, so its end cannot slip between.
    let mut events = store.subscribe_events();
    if let Err(e) = store.get_run(arg.id).await {
        pending.reject(rpc_error(e)).await;
        return Ok(());
    }
    let out = Out { sink: pending.accept().await?, conn };
    let live = wait_for_log(&store, &mut events, arg.id).await?;
    let q = LogQuery {
        stream,
        offset: arg.offset.unwrap_or(0),
        limit: 64 * 1024,
        tail: None,
        timestamps: arg.timestamps,
        // Only what was written before the subscription: the rest comes live.
        end: live.as_ref().map(|f| f.file_len),
    };
    send_written(&out, store.logs(), arg.id, &q, live.as_ref(), arg.tail).await?;
    if let Some(f) = live {
        send_live(&out, f, stream, q.timestamps).await?;
    }
    send_end(&out, &store, &mut events, arg.id).await
}

/// A subscriber, on its connection (if it has one, whose backlog it counts against).
struct Out {
    sink: SubscriptionSink,
    conn: Option<Arc<Conn>>,
}

impl Out {
    /// Sends `item`, or `lagged` (and an error, which ends the subscription) when the client
    /// has fallen the whole backlog behind.
    async fn send(&self, item: FollowItem) -> Result<(), BoxError> {
        let lagged = self.conn.as_ref().is_some_and(|c| c.backlog().is_full());
        let item = if lagged { FollowItem::Lagged { message: LAGGED.into() } } else { item };
        let raw = to_raw_value(&item)?;
        if let Some(c) = &self.conn {
            c.backlog().produced(raw.get().len() + NOTIFICATION_OVERHEAD);
        }
        self.sink.send(SubscriptionMessage::from(raw)).await?;
        if lagged {
            return Err(LAGGED.into());
        }
        Ok(())
    }

    /// Sends output text (of one stream, or of both mixed when `stream` is `None`).
    async fn output(&self, stream: Option<Stream>, data: String) -> Result<(), BoxError> {
        self.send(FollowItem::Output { stream: stream.map(|s| s.as_str().into()), data }).await
    }
}

/// Step 0: the run's log, once it is open; `None` if the run ended without one.
async fn wait_for_log(
    store: &Store,
    events: &mut broadcast::Receiver<Event>,
    id: i64,
) -> Result<Option<logs::Follow>, BoxError> {
    let mut opened = store.logs().subscribe_when_open(id, Some(FOLLOW_TAIL)).await;
    loop {
        if let Ok(f) = opened.try_recv() {
            return Ok(Some(f));
        }
        if store.get_run(id).await?.state.is_final() {
            return Ok(None);
        }
        tokio::select! {
            f = &mut opened => return Ok(f.ok()),
            ended = run_finished(events, id) => ended?,
        }
    }
}

/// Step 1: what was written before the subscription (the file up to `live.file_len`, then the
/// tail kept in memory), or only its last `tail` lines.
async fn send_written(
    out: &Out,
    logs: &Logs,
    id: i64,
    q: &LogQuery,
    live: Option<&logs::Follow>,
    tail: Option<u32>,
) -> Result<(), BoxError> {
    let kept = |q: &LogQuery| live.map(|f| logs::render_chunks(&f.tail, f.cut, q));
    if let Some(n) = tail {
        let file =
            read_or_empty(logs, id, LogQuery { tail: Some(n as usize), ..q.clone() }).await?;
        let data = logs::last_lines(&(file.data + &kept(q).unwrap_or_default()), n as usize);
        if !data.is_empty() {
            out.output(None, data).await?;
        }
        return Ok(());
    }
    let mut offset = q.offset;
    loop {
        let Ok(slice) = logs.read(id, LogQuery { offset, ..q.clone() }).await else { break };
        if !slice.data.is_empty() {
            out.output(None, slice.data).await?;
        }
        if slice.next_offset == offset || slice.eof {
            break;
        }
        offset = slice.next_offset;
    }
    match kept(q) {
        Some(tail) if !tail.is_empty() => out.output(None, tail).await,
        _ => Ok(()),
    }
}

/// Step 2: every chunk of stream `stream` (or both) as it is written, until the log closes.
/// Whatever else is already waiting goes out in the same messages: one message per chunk
/// cannot keep up with a chatty process.
async fn send_live(
    out: &Out,
    mut f: logs::Follow,
    stream: Option<Stream>,
    timestamps: bool,
) -> Result<(), BoxError> {
    use crate::store::live::LiveError;
    let skipped = |n| format!("[… {n} chunks skipped: this follower fell behind …]\n");
    let mut lines = Lines::new(timestamps);
    loop {
        let first = match f.live.recv().await {
            Ok(c) => c,
            Err(LiveError::Lagged(n)) => {
                out.output(None, skipped(n)).await?;
                continue;
            }
            Err(LiveError::Closed) => break,
        };
        let mut batch = vec![first];
        let mut size = batch[0].data.len();
        while size < FOLLOW_BATCH {
            match f.live.try_recv() {
                Ok(Some(c)) => {
                    size += c.data.len();
                    batch.push(c);
                }
                Err(LiveError::Lagged(n)) => {
                    batch.push(LiveChunk {
                        stream: Stream::Stdout,
                        at: jiff::Timestamp::now(),
                        data: Arc::from(skipped(n).as_bytes()),
                    });
                    break;
                }
                Ok(None) | Err(LiveError::Closed) => break,
            }
        }
        // Consecutive text of one stream goes out as one message.
        let mut pending: Option<(Stream, String)> = None;
        for c in batch.iter().filter(|c| stream.is_none_or(|s| s == c.stream)) {
            let Some(text) = lines.push(c) else { continue };
            match &mut pending {
                Some((s, buf)) if *s == c.stream => buf.push_str(&text),
                _ => {
                    if let Some((s, data)) = pending.replace((c.stream, text)) {
                        out.output(Some(s), data).await?;
                    }
                }
            }
        }
        if let Some((s, data)) = pending {
            out.output(Some(s), data).await?;
        }
    }
    for (s, data) in lines.rest() {
        out.output(Some(s), data).await?;
    }
    Ok(())
}

/// Step 3: the run's end, once it is recorded.
async fn send_end(
    out: &Out,
    store: &Store,
    events: &mut broadcast::Receiver<Event>,
    id: i64,
) -> SubscriptionResult {
    loop {
        let rec = store.get_run(id).await.map_err(|e| e.to_string())?;
        if rec.state.is_final() {
            out.send(FollowItem::End { run: Box::new(RunInfo::from(&rec)) }).await?;
            return Ok(());
        }
        run_finished(events, id).await?;
    }
}

/// Waits for the `run.finished` event of run `id` (or for events to have been missed: look
/// again). Errs when the daemon is shutting down.
async fn run_finished(events: &mut broadcast::Receiver<Event>, id: i64) -> Result<(), BoxError> {
    loop {
        match events.recv().await {
            Ok(e) if e.run == Some(id) && e.kind == EventKind::RunFinished => return Ok(()),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
            Err(broadcast::error::RecvError::Closed) => {
                return Err("the daemon is shutting down".into());
            }
        }
    }
}

/// Live output made text, per stream: pipe reads split characters anywhere, so an unfinished
/// UTF-8 sequence waits for the rest of its stream's bytes; with timestamps, each line starts
/// with the time its first bytes were read.
struct Lines {
    carry: [Vec<u8>; 2],
    at_line_start: [bool; 2],
    timestamps: bool,
}

impl Lines {
    fn new(timestamps: bool) -> Self {
        Lines { carry: [Vec::new(), Vec::new()], at_line_start: [true, true], timestamps }
    }

    /// The text `c` completes, if any.
    fn push(&mut self, c: &LiveChunk) -> Option<String> {
        let i = usize::from(c.stream == Stream::Stderr);
        self.carry[i].extend_from_slice(&c.data);
        let text = take_utf8(&mut self.carry[i]);
        if text.is_empty() {
            return None;
        }
        Some(if self.timestamps {
            stamp_lines(&text, c.at, &mut self.at_line_start[i])
        } else {
            text
        })
    }

    /// What is left unfinished at the end, replaced where invalid.
    fn rest(self) -> impl Iterator<Item = (Stream, String)> {
        let [out, err] = self.carry;
        [(Stream::Stdout, out), (Stream::Stderr, err)]
            .into_iter()
            .filter(|(_, rest)| !rest.is_empty())
            .map(|(s, rest)| (s, String::from_utf8_lossy(&rest).into_owned()))
    }
}

/// Reads a run's log; a run that printed nothing has no file, which reads as empty.
pub(super) async fn read_or_empty(l: &Logs, id: i64, q: LogQuery) -> Result<logs::LogSlice, Error> {
    match l.read(id, q).await {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(logs::LogSlice { eof: true, ..Default::default() })
        }
        other => other,
    }
}

/// The longest valid UTF-8 prefix of `buf` as text; an unfinished sequence at the end stays
/// in `buf`. Bytes that can never be valid are replaced.
fn take_utf8(buf: &mut Vec<u8>) -> String {
    let keep = match std::str::from_utf8(buf) {
        Ok(_) => 0,
        Err(e) if e.error_len().is_none() => buf.len() - e.valid_up_to(),
        Err(_) => 0,
    };
    let rest = buf.split_off(buf.len() - keep);
    let text = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    text
}

/// Prefixes each line of `text` that starts a line with `at`.
fn stamp_lines(text: &str, at: jiff::Timestamp, at_line_start: &mut bool) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    for piece in text.split_inclusive('\n') {
        if *at_line_start {
            out.push_str(&format!("{at:.6} "));
        }
        out.push_str(piece);
        *at_line_start = piece.ends_with('\n');
    }
    out
}

/// `stream` of `Run.Follow` and `Run.Logs`: one stream, or both (`None`).
pub(super) fn parse_stream(s: Option<&str>) -> Result<Option<Stream>, Error> {
    match s {
        None | Some("both") | Some("") => Ok(None),
        Some("stdout") => Ok(Some(Stream::Stdout)),
        Some("stderr") => Ok(Some(Stream::Stderr)),
        Some(other) => {
            Err(Error::invalid("stream", format!("{other:?} is not stdout, stderr or both")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: Stream, data: &[u8]) -> LiveChunk {
        let at = "2026-12-02T10:00:00Z".parse().unwrap();
        LiveChunk { stream, at, data: Arc::from(data) }
    }

    #[test]
    fn a_character_split_across_reads_waits_for_its_stream() {
        let mut lines = Lines::new(false);
        let e = "é".as_bytes();
        assert_eq!(lines.push(&chunk(Stream::Stdout, &[b'a', e[0]])).as_deref(), Some("a"));
        // The other stream is not held up by it.
        assert_eq!(lines.push(&chunk(Stream::Stderr, b"x")).as_deref(), Some("x"));
        assert_eq!(lines.push(&chunk(Stream::Stdout, &[e[1], b'\n'])).as_deref(), Some("é\n"));
        assert_eq!(lines.push(&chunk(Stream::Stdout, &[e[0]])), None);
        let rest: Vec<_> = lines.rest().collect();
        assert_eq!(rest, [(Stream::Stdout, "\u{fffd}".to_string())]);
    }

    #[test]
    fn timestamps_start_each_line_once() {
        let mut lines = Lines::new(true);
        let got = lines.push(&chunk(Stream::Stdout, b"one\ntw")).unwrap();
        assert_eq!(got, "2026-12-02T10:00:00.000000Z one\n2026-12-02T10:00:00.000000Z tw");
        assert_eq!(lines.push(&chunk(Stream::Stdout, b"o\n")).unwrap(), "o\n");
    }
}
