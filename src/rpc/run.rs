//! `Run.*`: list, get and cancel runs, read their logs, and follow a run's output live.

use std::sync::Arc;

use jsonrpsee::core::{RpcResult, SubscriptionResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::server::SubscriptionMessage;
use jsonrpsee::{Extensions, PendingSubscriptionSink};
use serde_json::value::to_raw_value;

use super::api::{Api, rpc_error};
use super::conn::Conn;
use super::types::{FollowArg, FollowItem, LogsArg, LogsResult, RunInfo, RunListArg};
use crate::error::Error;
use crate::run::{RunRecord, RunState};
use crate::store::logs::{self, LogQuery, Stream};
use crate::store::{EventKind, RunFilter};

/// Default and largest page of `Run.List`.
const RUN_PAGE: (u32, u32) = (50, 1000);
/// Bytes of live output a follower gathers into one message at most.
const FOLLOW_BATCH: usize = 64 * 1024;
/// The newest bytes of a run's in-memory tail a follower is sent when it starts.
const FOLLOW_TAIL: usize = 1 << 20;
/// What a follower that fell a whole backlog behind is told before its subscription ends.
const LAGGED: &str = "this follower fell more than 4 MiB behind the run's output and was \
     stopped; read the output with Run.Logs, or follow again";
/// Bytes a subscription notification adds around its item, at least: the shortest wrapper,
/// `{"jsonrpc":"2.0","method":"Run.Follow","params":{"subscription":1,"result":…}}`, is 77.
/// Never more than the real overhead: a count above what reaches the socket would stay in a
/// connection's backlog for good.
pub(crate) const NOTIFICATION_OVERHEAD: usize = 64;
/// Default and largest slice of `Run.Logs`, in bytes.
const LOG_PAGE: (u32, u32) = (64 * 1024, 1 << 20);

/// The `Run` method group.
#[rpc(server, client, namespace = "Run", namespace_separator = ".")]
pub trait RunApi {
    /// Runs, newest first, paged by id (`before`).
    #[method(name = "List")]
    async fn list(&self, arg: Option<RunListArg>) -> RpcResult<Vec<RunInfo>>;

    /// One run.
    #[method(name = "Get")]
    async fn get(&self, id: i64) -> RpcResult<RunInfo>;

    /// Stops a run (TERM, grace, KILL); answers with the run as it ended.
    #[method(name = "Cancel")]
    async fn cancel(&self, id: i64) -> RpcResult<RunInfo>;

    /// A slice of a run's output.
    #[method(name = "Logs")]
    async fn logs(&self, arg: LogsArg) -> RpcResult<LogsResult>;

    /// A run's output as it is written, then one final message with the run's end state (or a
    /// `lagged` message, when the client falls more than 4 MiB behind).
    #[subscription(name = "Follow", unsubscribe = "Unfollow", item = FollowItem, with_extensions)]
    async fn follow(&self, arg: FollowArg) -> SubscriptionResult;
}

impl Api {
    /// A run's wire form; an active run's byte counts come live from its log writer.
    async fn run_info(&self, r: &RunRecord) -> RunInfo {
        let mut info = RunInfo::from(r);
        if r.state == RunState::Running
            && let Some([out, err]) = self.registry.store().logs().totals(r.id).await
        {
            info.stdout_bytes = out;
            info.stderr_bytes = err;
        }
        info
    }
}

/// Reads a run's log; a run that printed nothing has no file, which reads as empty.
async fn read_or_empty(l: &logs::Logs, id: i64, q: LogQuery) -> Result<logs::LogSlice, Error> {
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

fn parse_stream(s: Option<&str>) -> Result<Option<Stream>, Error> {
    match s {
        None | Some("both") | Some("") => Ok(None),
        Some("stdout") => Ok(Some(Stream::Stdout)),
        Some("stderr") => Ok(Some(Stream::Stderr)),
        Some(other) => {
            Err(Error::invalid("stream", format!("{other:?} is not stdout, stderr or both")))
        }
    }
}

#[async_trait]
impl RunApiServer for Api {
    async fn list(&self, arg: Option<RunListArg>) -> RpcResult<Vec<RunInfo>> {
        let arg = arg.unwrap_or_default();
        let state = arg
            .state
            .as_deref()
            .map(|s| s.parse::<RunState>().map_err(|e| rpc_error(Error::invalid("state", e))))
            .transpose()?;
        let limit = arg.limit.unwrap_or(RUN_PAGE.0).clamp(1, RUN_PAGE.1);
        let f = RunFilter { unit: arg.unit, state, limit, before: arg.before };
        let runs = self.registry.runs(f).await.map_err(rpc_error)?;
        let mut out = Vec::with_capacity(runs.len());
        for r in &runs {
            out.push(self.run_info(r).await);
        }
        Ok(out)
    }

    async fn get(&self, id: i64) -> RpcResult<RunInfo> {
        let r = self.registry.run(id).await.map_err(rpc_error)?;
        Ok(self.run_info(&r).await)
    }

    async fn cancel(&self, id: i64) -> RpcResult<RunInfo> {
        let r = self.registry.cancel_run(id).await.map_err(rpc_error)?;
        Ok(RunInfo::from(&r))
    }

    async fn logs(&self, arg: LogsArg) -> RpcResult<LogsResult> {
        let rec = self.registry.run(arg.id).await.map_err(rpc_error)?;
        let stream = parse_stream(arg.stream.as_deref()).map_err(rpc_error)?;
        let limit = arg.limit.unwrap_or(LOG_PAGE.0).clamp(1, LOG_PAGE.1) as usize;
        let store_logs = self.registry.store().logs().clone();
        let active = !rec.state.is_final();
        // While a run is active and over its limit, its tail lives in memory: it is shown
        // after the file's content, newest `limit` bytes at most, as a snapshot.
        let live = if active { store_logs.subscribe(arg.id, Some(limit)).await } else { None };
        let q = LogQuery {
            stream,
            offset: arg.offset.unwrap_or(0),
            limit,
            tail: arg.tail.map(|n| n as usize),
            timestamps: arg.timestamps,
            end: live.as_ref().map(|f| f.file_len),
        };
        let slice = read_or_empty(&store_logs, arg.id, q.clone()).await.map_err(rpc_error)?;
        let mut out = LogsResult {
            data: slice.data,
            next_offset: slice.next_offset,
            eof: slice.eof,
            truncated: slice.truncated || rec.truncated,
            active,
        };
        if let Some(f) = live
            && slice.eof
            && (!f.tail.is_empty() || f.cut.iter().any(|&c| c > 0))
        {
            let tail = logs::render_chunks(&f.tail, f.cut, &q);
            out.data = match q.tail {
                Some(n) => logs::last_lines(&(out.data + &tail), n),
                None => out.data + &tail,
            };
            out.truncated |= f.cut.iter().any(|&c| c > 0);
        }
        Ok(out)
    }

    async fn follow(
        &self,
        pending: PendingSubscriptionSink,
        ext: &Extensions,
        arg: FollowArg,
    ) -> SubscriptionResult {
        let _follower = self.followers.token();
        let conn = ext.get::<Arc<Conn>>().cloned();
        let store = self.registry.store().clone();
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
        let sink = pending.accept().await?;
        let send = |item: FollowItem| {
            let (sink, conn) = (&sink, &conn);
            async move {
                // Output does not wait for a slow client: one that fell the whole backlog
                // behind is told so, and the subscription ends.
                let lagged = conn.as_ref().is_some_and(|c| c.backlog().is_full());
                let item =
                    if lagged { FollowItem::Lagged { message: LAGGED.into() } } else { item };
                let raw = to_raw_value(&item)?;
                if let Some(c) = conn {
                    c.backlog().produced(raw.get().len() + NOTIFICATION_OVERHEAD);
                }
                sink.send(SubscriptionMessage::from(raw))
                    .await
                    .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
                if lagged {
                    let e: Box<dyn std::error::Error + Send + Sync> = LAGGED.into();
                    return Err(e);
                }
                Ok(())
            }
        };
        // A queued run has no log yet: wait for it to open, or for the run to end unstarted.
        let mut opened = store.logs().subscribe_when_open(arg.id, Some(FOLLOW_TAIL)).await;
        let live = 'wait: loop {
            if let Ok(f) = opened.try_recv() {
                break Some(f);
            }
            if store.get_run(arg.id).await.map_err(|e| e.to_string())?.state.is_final() {
                break None;
            }
            loop {
                tokio::select! {
                    f = &mut opened => break 'wait f.ok(),
                    e = events.recv() => match e {
                        Ok(e) if e.run == Some(arg.id) && e.kind == EventKind::RunFinished => break,
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            return Err("the daemon is shutting down".into());
                        }
                    },
                }
            }
        };
        drop(opened);
        let q = LogQuery {
            stream,
            offset: arg.offset.unwrap_or(0),
            limit: 64 * 1024,
            tail: None,
            timestamps: arg.timestamps,
            // Only what was written before the subscription: the rest comes live.
            end: live.as_ref().map(|f| f.file_len),
        };
        if let Some(n) = arg.tail {
            // The last `n` lines of what is there so far (file and kept tail), then live.
            let file = read_or_empty(
                store.logs(),
                arg.id,
                LogQuery { tail: Some(n as usize), ..q.clone() },
            )
            .await
            .map_err(|e| e.to_string())?;
            let kept =
                live.as_ref().map(|f| logs::render_chunks(&f.tail, f.cut, &q)).unwrap_or_default();
            let data = logs::last_lines(&(file.data + &kept), n as usize);
            if !data.is_empty() {
                send(FollowItem::Output { stream: None, data }).await?;
            }
        } else {
            // 1. What the file holds (up to its length when we subscribed, if the run is active).
            let mut offset = q.offset;
            loop {
                let slice = match store.logs().read(arg.id, LogQuery { offset, ..q.clone() }).await
                {
                    Ok(s) => s,
                    Err(_) => break,
                };
                if !slice.data.is_empty() {
                    send(FollowItem::Output { stream: None, data: slice.data }).await?;
                }
                if slice.next_offset == offset || slice.eof {
                    break;
                }
                offset = slice.next_offset;
            }
            // 2. The tail kept in memory.
            if let Some(f) = &live {
                let tail = logs::render_chunks(&f.tail, f.cut, &q);
                if !tail.is_empty() {
                    send(FollowItem::Output { stream: None, data: tail }).await?;
                }
            }
        }
        // 3. Every chunk as it is written. Pipe reads split characters anywhere: an unfinished
        // UTF-8 sequence waits for the rest of its stream's bytes.
        if let Some(mut f) = live {
            use crate::store::live::LiveError;
            let mut carry: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
            let mut at_line_start = [true, true];
            loop {
                let first = match f.live.recv().await {
                    Ok(c) => c,
                    Err(LiveError::Lagged(n)) => {
                        let data = format!("[… {n} chunks skipped: this follower fell behind …]\n");
                        send(FollowItem::Output { stream: None, data }).await?;
                        continue;
                    }
                    Err(LiveError::Closed) => break,
                };
                // Whatever else is already waiting goes out in the same messages: one message
                // per chunk cannot keep up with a chatty process.
                let mut batch = vec![first];
                let mut size = batch[0].data.len();
                while size < FOLLOW_BATCH {
                    match f.live.try_recv() {
                        Ok(Some(c)) => {
                            size += c.data.len();
                            batch.push(c);
                        }
                        Err(LiveError::Lagged(n)) => {
                            let data =
                                format!("[… {n} chunks skipped: this follower fell behind …]\n");
                            batch.push(logs::LiveChunk {
                                stream: Stream::Stdout,
                                at: jiff::Timestamp::now(),
                                data: std::sync::Arc::from(data.as_bytes()),
                            });
                            break;
                        }
                        Ok(None) | Err(LiveError::Closed) => break,
                    }
                }
                let mut pending: Option<(Stream, String)> = None;
                for c in batch {
                    if stream.is_some_and(|s| s != c.stream) {
                        continue;
                    }
                    let i = usize::from(c.stream == Stream::Stderr);
                    carry[i].extend_from_slice(&c.data);
                    let text = take_utf8(&mut carry[i]);
                    if text.is_empty() {
                        continue;
                    }
                    let text = if q.timestamps {
                        stamp_lines(&text, c.at, &mut at_line_start[i])
                    } else {
                        text
                    };
                    match &mut pending {
                        Some((s, buf)) if *s == c.stream => buf.push_str(&text),
                        _ => {
                            if let Some((s, data)) = pending.take() {
                                send(FollowItem::Output { stream: Some(s.as_str().into()), data })
                                    .await?;
                            }
                            pending = Some((c.stream, text));
                        }
                    }
                }
                if let Some((s, data)) = pending {
                    send(FollowItem::Output { stream: Some(s.as_str().into()), data }).await?;
                }
            }
            for (i, rest) in carry.iter().enumerate() {
                if !rest.is_empty() {
                    let s = if i == 0 { Stream::Stdout } else { Stream::Stderr };
                    let data = String::from_utf8_lossy(rest).into_owned();
                    send(FollowItem::Output { stream: Some(s.as_str().into()), data }).await?;
                }
            }
        }
        // 4. The run's end, once it is recorded.
        loop {
            let rec = store.get_run(arg.id).await.map_err(|e| e.to_string())?;
            if rec.state.is_final() {
                send(FollowItem::End { run: Box::new(RunInfo::from(&rec)) }).await?;
                return Ok(());
            }
            loop {
                match events.recv().await {
                    Ok(e) if e.run == Some(arg.id) && e.kind == EventKind::RunFinished => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err("the daemon is shutting down".into());
                    }
                }
            }
        }
    }
}
