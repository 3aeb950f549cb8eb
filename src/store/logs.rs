//! Run logs: one log per run, written by one thread: a file `logs/<run id>.log` with the
//! embedded store, rows of `run_logs` with the PostgreSQL store (the same bytes, appended in
//! chunks by [`super::postgres::logs`], so that every server reads them, also after the server
//! that wrote them is gone).
//!
//! Each record is one line: `<RFC 3339 time> <tag> <payload>`. The tag says which stream
//! the payload came from and whether the original output ended the line: `o`/`e` for a
//! stdout/stderr line that ended with a newline, `O`/`E` for a piece without one (a partial
//! line), and `c` for a cut marker (`c stdout 12345`: that many bytes of stdout were dropped
//! here). Payloads never contain a newline, so records are found by splitting on `\n`.
//!
//! `log_limit` is kept per stream: the first half of it goes to the file as it arrives (the
//! head); past that, the stream's output is kept in a ring of the newest half (the tail) in
//! memory, and written after a cut marker when the run ends. The pipe is never blocked:
//! output past the limit only moves the ring. Followers get every chunk live, through a
//! feed bounded in bytes ([`super::live`]).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::live::{LIVE_BUDGET, LiveFeed, LiveReceiver};
use super::postgres::logs::LogTable;
use crate::error::{Error, Result};

pub use crate::exec::Stream;

/// Where a stream's records go in a log file.
impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    fn tags(self) -> (u8, u8) {
        match self {
            Stream::Stdout => (b'o', b'O'),
            Stream::Stderr => (b'e', b'E'),
        }
    }
}

/// A chunk of output as it was produced, for live followers.
#[derive(Debug, Clone)]
pub struct LiveChunk {
    /// Which stream.
    pub stream: Stream,
    /// When it was read.
    pub at: Timestamp,
    /// The bytes.
    pub data: Arc<[u8]>,
}

/// What a run's log held at the moment a follower subscribed.
pub struct Follow {
    /// Every chunk written after the subscription.
    pub live: LiveReceiver,
    /// The file's length at that moment: read the file up to here first.
    pub file_len: u64,
    /// Then the tails kept in memory (oldest first), with the bytes cut before them.
    pub tail: Vec<LiveChunk>,
    /// Bytes dropped per stream (stdout, stderr) so far.
    pub cut: [u64; 2],
}

/// Totals for a finished run's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSummary {
    /// Bytes of stdout produced.
    pub stdout_bytes: u64,
    /// Bytes of stderr produced.
    pub stderr_bytes: u64,
    /// Whether some output was cut.
    pub truncated: bool,
}

enum Msg {
    Open {
        run: i64,
        limit: u64,
    },
    Write {
        run: i64,
        stream: Stream,
        at: Timestamp,
        data: Vec<u8>,
        /// Its bytes' share of [`WRITE_QUEUE_BYTES`], given back once it is written.
        _queued: OwnedSemaphorePermit,
    },
    Finish {
        run: i64,
        reply: oneshot::Sender<LogSummary>,
    },
    Subscribe {
        run: i64,
        tail_max: Option<usize>,
        reply: oneshot::Sender<Option<Follow>>,
    },
    /// Like `Subscribe`, but waits for the log to be opened if it is not yet.
    SubscribeWhenOpen {
        run: i64,
        tail_max: Option<usize>,
        reply: oneshot::Sender<Follow>,
    },
    Totals {
        run: i64,
        reply: oneshot::Sender<Option<[u64; 2]>>,
    },
}

/// Output waiting for the writer thread, in bytes, across all runs: a run that prints faster
/// than the disk takes it waits (its pipe is read more slowly) instead of queueing without
/// bound in the daemon's memory.
pub const WRITE_QUEUE_BYTES: usize = 2 * 1024 * 1024;

/// Where run logs are kept.
#[derive(Clone)]
enum Sink {
    /// Files in this directory.
    Dir(PathBuf),
    /// PostgreSQL's `run_logs`.
    Table(LogTable),
}

/// Handle to the log writer thread.
#[derive(Clone)]
pub struct Logs {
    tx: mpsc::Sender<Msg>,
    sink: Sink,
    queued: Arc<Semaphore>,
}

/// The log file of run `id` under `dir`.
pub fn path_in(dir: &Path, id: i64) -> PathBuf {
    dir.join(format!("{id}.log"))
}

impl Logs {
    /// Starts the writer thread for log files under `dir`.
    pub fn start(dir: PathBuf) -> Result<Logs> {
        Self::start_on(Sink::Dir(dir))
    }

    /// Starts the writer thread for logs kept in PostgreSQL.
    pub(super) fn start_table(table: LogTable) -> Result<Logs> {
        Self::start_on(Sink::Table(table))
    }

    fn start_on(sink: Sink) -> Result<Logs> {
        let (tx, rx) = mpsc::channel(1024);
        let s = sink.clone();
        std::thread::Builder::new()
            .name("taskd-logs".into())
            .spawn(move || writer_thread(s, rx))
            .map_err(|e| Error::Storage(format!("cannot start the log writer: {e}")))?;
        Ok(Logs { tx, sink, queued: Arc::new(Semaphore::new(WRITE_QUEUE_BYTES)) })
    }

    /// Notes that the engine starts on this store (a cluster's standby took the lease): logs
    /// of the runs that exist now are carried on where another server left them.
    pub async fn engine_starts(&self) -> Result<()> {
        match &self.sink {
            Sink::Dir(_) => Ok(()),
            Sink::Table(t) => t.engine_starts().await,
        }
    }

    /// The log file of run `id` (with the embedded store).
    #[cfg(test)]
    fn path(&self, id: i64) -> PathBuf {
        match &self.sink {
            Sink::Dir(dir) => path_in(dir, id),
            Sink::Table(_) => unreachable!("logs in PostgreSQL have no file"),
        }
    }

    /// Opens the log of a run that is about to start, keeping `limit` bytes per stream.
    ///
    /// Returns once the writer thread has it queued, not once it is open: everything asked
    /// of the log later (output, followers, the end) is queued after it and so finds it open,
    /// and a run need not wait for a thread that is background work (niced, and busy with
    /// every other run's output): on a cluster's lease holder every assignment to an agent
    /// waited for its log's opening, so a writer behind by a fraction of a second made every
    /// host start late at once. Opening cannot fail: a log that cannot be carried on keeps
    /// nothing more, and says so in the daemon's log.
    pub async fn open(&self, run: i64, limit: u64) -> Result<()> {
        self.tx.send(Msg::Open { run, limit }).await.map_err(|_| Error::ShuttingDown)
    }

    /// Appends output of a run; waits while the writer thread has its fill of output queued.
    pub async fn write(&self, run: i64, stream: Stream, at: Timestamp, data: Vec<u8>) {
        let bytes = data.len().clamp(1, WRITE_QUEUE_BYTES) as u32;
        let Ok(queued) = self.queued.clone().acquire_many_owned(bytes).await else { return };
        let _ = self.tx.send(Msg::Write { run, stream, at, data, _queued: queued }).await;
    }

    /// Writes the kept tails, closes the file and returns the totals.
    pub async fn finish(&self, run: i64) -> LogSummary {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Finish { run, reply }).await.is_err() {
            return LogSummary::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Reads part of run `run`'s log (off the async threads).
    pub async fn read(&self, run: i64, q: LogQuery) -> Result<LogSlice> {
        match &self.sink {
            Sink::Dir(dir) => {
                let path = path_in(dir, run);
                tokio::task::spawn_blocking(move || {
                    read(&path, &q).map_err(|e| Error::io(&path, e))
                })
                .await
                .map_err(|_| Error::ShuttingDown)?
            }
            Sink::Table(t) => {
                let data = t.load(run).await?;
                if data.is_empty() {
                    // As a file that was never created: the run printed nothing (yet).
                    return Err(Error::io(
                        Path::new(&format!("run_logs/{run}")),
                        std::io::ErrorKind::NotFound.into(),
                    ));
                }
                let len = data.len() as u64;
                read_from(&mut std::io::Cursor::new(data), len, &q)
                    .map_err(|e| Error::Postgres(format!("log of run {run}: {e}")))
            }
        }
    }

    /// Subscribes to a run's output as soon as its log is opened (at once if it is open). The
    /// receiver never resolves for a run that never starts: wait on its end alongside.
    pub async fn subscribe_when_open(
        &self,
        run: i64,
        tail_max: Option<usize>,
    ) -> oneshot::Receiver<Follow> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::SubscribeWhenOpen { run, tail_max, reply }).await;
        rx
    }

    /// Bytes of stdout and stderr an active run has produced so far; `None` once it ended.
    pub async fn totals(&self, run: i64) -> Option<[u64; 2]> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Totals { run, reply }).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Subscribes to a run's output; `None` when the run's log is closed (the run ended).
    /// `tail_max` bounds the copy of the in-memory tail to its newest bytes.
    pub async fn subscribe(&self, run: i64, tail_max: Option<usize>) -> Option<Follow> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Subscribe { run, tail_max, reply }).await.ok()?;
        rx.await.ok().flatten()
    }
}

struct StreamState {
    /// Bytes the process wrote.
    total: u64,
    /// Bytes of records this stream put in the file's head.
    head: u64,
    /// Bytes of output in the file's head.
    head_payload: u64,
    /// The newest output beyond the head, oldest first, each piece with its cost on disk.
    ring: VecDeque<(Timestamp, Vec<u8>, u64)>,
    /// Bytes of output in the ring.
    ring_bytes: u64,
    /// What the ring will cost on disk (records included).
    ring_cost: u64,
    /// Bytes of output dropped between head and ring.
    dropped: u64,
}

impl StreamState {
    fn new() -> Self {
        StreamState {
            total: 0,
            head: 0,
            head_payload: 0,
            ring: VecDeque::new(),
            ring_bytes: 0,
            ring_cost: 0,
            dropped: 0,
        }
    }
}

/// Bytes a record adds around its payload: time (27), tag and spaces (3), newline (1).
const RECORD_OVERHEAD: u64 = 31;

/// What `data` costs on disk once encoded as records.
fn encoded_cost(data: &[u8]) -> u64 {
    let lines = bytecount::count(data, b'\n') as u64;
    let partial = u64::from(data.last().is_some_and(|&b| b != b'\n'));
    data.len() as u64 - lines + (lines + partial) * RECORD_OVERHEAD
}

/// The shortest prefix of `data` to drop (never all of it) so that at least `bytes_over`
/// bytes and `cost_over` of encoded cost go: its length and its cost, which is what the rest
/// of `data` costs less than all of it (a newline is worth a record, any other byte one).
fn shed_prefix(data: &[u8], bytes_over: usize, cost_over: usize) -> (usize, u64) {
    let last = data.len().saturating_sub(1);
    let mut k = bytes_over.min(last);
    let per_line = RECORD_OVERHEAD as usize - 1;
    let mut shed = k + per_line * bytecount::count(&data[..k], b'\n');
    // Past `bytes_over`, walk from newline to newline: each byte adds one, each newline a
    // record's overhead besides.
    while shed < cost_over && k < last {
        let need = cost_over - shed;
        match data[k..last].iter().position(|&b| b == b'\n') {
            Some(i) if i < need => {
                k += i + 1;
                shed += i + 1 + per_line;
            }
            Some(_) => {
                k += need;
                shed += need;
            }
            None => {
                let n = need.min(last - k);
                k += n;
                shed += n;
            }
        }
    }
    (k, shed as u64)
}

/// Encodes as much of `data` as fits in `room` bytes of records; returns the payload bytes
/// taken. A piece that does not fit whole is split (its first part becomes a partial record).
fn encode_within(
    out: &mut Vec<u8>,
    stream: Stream,
    at: Timestamp,
    data: &[u8],
    room: u64,
) -> usize {
    let mut taken = 0;
    let mut left = room;
    while taken < data.len() && left > RECORD_OVERHEAD {
        let rest = &data[taken..];
        let piece = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
        let fits = (left - RECORD_OVERHEAD) as usize;
        // A newline costs nothing extra: it becomes the record's own.
        let payload = if rest[..piece].ends_with(b"\n") { piece - 1 } else { piece };
        let n = if payload <= fits { piece } else { fits.min(payload) };
        if n == 0 {
            break;
        }
        encode(out, stream, at, &rest[..n]);
        left = room.saturating_sub(out.len() as u64);
        taken += n;
    }
    taken
}

/// Where one run's log goes.
enum Out {
    /// A file, created on the first output: most runs of small jobs print nothing, and
    /// creating a file is the costliest part of a run's log.
    File { path: PathBuf, file: Option<File> },
    /// Rows of `run_logs`.
    Table(LogTable),
}

struct RunLog {
    run: i64,
    out: Out,
    /// The file could not be created: the run's output is not kept on disk.
    failed: bool,
    /// A write failed (disk full…) and that was logged: later failures are only counted.
    write_failed: bool,
    len: u64,
    half: u64,
    streams: [StreamState; 2],
    live: LiveFeed,
}

fn ts_text(at: Timestamp) -> String {
    format!("{at:.6}")
}

/// Encodes `data` as records; pieces without a trailing newline get the partial tag.
fn encode(out: &mut Vec<u8>, stream: Stream, at: Timestamp, data: &[u8]) {
    let (line_tag, part_tag) = stream.tags();
    let ts = ts_text(at);
    let mut rest = data;
    while !rest.is_empty() {
        let (piece, tag, advance) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], line_tag, i + 1),
            None => (rest, part_tag, rest.len()),
        };
        out.extend_from_slice(ts.as_bytes());
        out.push(b' ');
        out.push(tag);
        out.push(b' ');
        out.extend_from_slice(piece);
        out.push(b'\n');
        rest = &rest[advance..];
    }
}

impl RunLog {
    /// Carries on the file a previous daemon began for this run (a run on an agent, taken
    /// over after a restart): appended to, its output counted, never truncated.
    fn resume(&mut self) {
        let data = match &self.out {
            Out::File { path, .. } => std::fs::read(path).unwrap_or_default(),
            Out::Table(t) if !t.may_have_log(self.run) => return,
            Out::Table(t) => match t.load_blocking(self.run) {
                Ok(data) => data,
                Err(e) => {
                    // Appending at a guessed offset would garble it: keep nothing more.
                    tracing::warn!(run = self.run, error = %e, "cannot read a run's log to carry it on; its further output is not kept");
                    self.failed = true;
                    return;
                }
            },
        };
        if data.is_empty() {
            return;
        }
        // Up to the last whole record: a torn one is cut away.
        let whole = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in data[..whole].split(|&b| b == b'\n') {
            if let Some(Record::Output(stream, _, payload, ended)) = decode(line) {
                let st = &mut self.streams[stream.index()];
                let n = payload.len() as u64 + u64::from(ended);
                st.total += n;
                st.head_payload += n;
                st.head += line.len() as u64 + 1;
            }
        }
        match &mut self.out {
            Out::File { path, file } => {
                let opened =
                    std::fs::OpenOptions::new().write(true).open(&*path).and_then(|mut f| {
                        f.set_len(whole as u64)?;
                        f.seek(SeekFrom::End(0))?;
                        Ok(f)
                    });
                if let Ok(f) = opened {
                    *file = Some(f);
                    self.len = whole as u64;
                }
            }
            // A torn record at the end stays in the table; appends go after it.
            Out::Table(_) => self.len = data.len() as u64,
        }
    }

    /// Appends whole records to the file; false if they could not be written (nothing of
    /// them is left in the file then, so the records before and after stay whole).
    fn append(&mut self, buf: &[u8]) -> bool {
        if buf.is_empty() {
            return true;
        }
        if self.failed {
            return false;
        }
        let (path, file) = match &mut self.out {
            Out::Table(t) => {
                t.append(self.run, self.len, buf.to_vec());
                self.len += buf.len() as u64;
                return true;
            }
            Out::File { path, file } => (path, file),
        };
        if file.is_none() {
            // Private whatever the umask: a run's output may hold secrets.
            let created = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new().write(true).create(true).truncate(true),
                0o600,
            )
            .open(&*path);
            match created {
                Ok(f) => *file = Some(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot create a run log");
                    self.failed = true;
                    return false;
                }
            }
        }
        let f = file.as_mut().expect("just created");
        let Err(e) = f.write_all(buf) else {
            self.len += buf.len() as u64;
            return true;
        };
        if !self.write_failed {
            self.write_failed = true;
            tracing::warn!(path = %path.display(), error = %e, "cannot write a run log; output is cut until it can");
        }
        // Drop the part of a record that made it, and carry on where the file ended.
        if f.set_len(self.len).and_then(|()| f.seek(SeekFrom::Start(self.len))).is_err() {
            self.failed = true;
        }
        false
    }

    fn write(&mut self, stream: Stream, at: Timestamp, mut data: Vec<u8>) {
        if self.live.has_receivers() {
            self.live.send(LiveChunk { stream, at, data: Arc::from(data.as_slice()) });
        }
        let half = self.half;
        let st = &mut self.streams[stream.index()];
        st.total += data.len() as u64;
        // The head keeps the first `half` bytes of output, and takes at most twice that on
        // disk: a flood of tiny lines (each stored with its time) cannot blow a limit up.
        let payload_room = half.saturating_sub(st.head_payload) as usize;
        let disk_room = (2 * half).saturating_sub(st.head);
        let mut buf = Vec::new();
        let head = &data[..payload_room.min(data.len())];
        let taken = encode_within(&mut buf, stream, at, head, disk_room);
        st.head += buf.len() as u64;
        st.head_payload += taken as u64;
        if taken < data.len() {
            // Past the head, the chunk itself goes to the ring: no copy.
            let rest = if taken == 0 { data } else { data.split_off(taken) };
            // Once the head is full, it stays full: what follows belongs to the tail.
            st.head = st.head.max(2 * half);
            st.head_payload = st.head_payload.max(half);
            let cost = encoded_cost(&rest);
            st.ring_bytes += rest.len() as u64;
            st.ring_cost += cost;
            st.ring.push_back((at, rest, cost));
            // The tail likewise: the newest `half` bytes, at most twice that on disk.
            while st.ring_bytes > half || st.ring_cost > 2 * half {
                let bytes_over = (st.ring_bytes.saturating_sub(half)) as usize;
                let cost_over = st.ring_cost.saturating_sub(2 * half) as usize;
                let front = st.ring.front_mut().expect("ring holds the excess");
                let cost = front.2;
                if front.1.len() <= bytes_over.max(1) || cost as usize <= cost_over {
                    st.ring_bytes -= front.1.len() as u64;
                    st.ring_cost -= cost;
                    st.dropped += front.1.len() as u64;
                    st.ring.pop_front();
                } else {
                    // Drop just enough of the front to get under both bounds.
                    let (k, shed) = shed_prefix(&front.1, bytes_over, cost_over);
                    front.1.drain(..k);
                    front.2 = cost - shed;
                    st.ring_bytes -= k as u64;
                    st.ring_cost -= shed;
                    st.dropped += k as u64;
                }
            }
        }
        if !self.append(&buf) {
            // Output that could not be written counts as cut: readers see a cut marker.
            let st = &mut self.streams[stream.index()];
            st.dropped += taken as u64;
        }
    }

    /// The kept tail of both streams, oldest first; `max` keeps only its newest `max` bytes
    /// (what is left out is added to the returned per-stream cut counts).
    fn tail_chunks(&self, max: Option<usize>) -> (Vec<LiveChunk>, [u64; 2]) {
        let mut cut = [self.streams[0].dropped, self.streams[1].dropped];
        // Sort references first: only the chunks that are kept get copied.
        let mut refs: Vec<(Timestamp, usize, &Vec<u8>)> = Vec::new();
        for (i, st) in self.streams.iter().enumerate() {
            refs.extend(st.ring.iter().map(|(at, data, _)| (*at, i, data)));
        }
        refs.sort_by_key(|r| r.0);
        let mut budget = max.unwrap_or(usize::MAX);
        let mut kept = Vec::new();
        for (at, i, data) in refs.into_iter().rev() {
            if budget == 0 {
                cut[i] += data.len() as u64;
                continue;
            }
            let take = data.len().min(budget);
            budget -= take;
            cut[i] += (data.len() - take) as u64;
            let stream = if i == 0 { Stream::Stdout } else { Stream::Stderr };
            kept.push(LiveChunk { stream, at, data: Arc::from(&data[data.len() - take..]) });
        }
        kept.reverse();
        (kept, cut)
    }

    fn finish(mut self) -> LogSummary {
        let mut buf = Vec::new();
        let now = Timestamp::now();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let dropped = self.streams[stream.index()].dropped;
            if dropped > 0 {
                buf.extend_from_slice(
                    format!("{} c {} {dropped}\n", ts_text(now), stream.as_str()).as_bytes(),
                );
            }
        }
        for c in self.tail_chunks(None).0 {
            encode(&mut buf, c.stream, c.at, &c.data);
        }
        let tail_written = self.append(&buf);
        if let Out::File { file: Some(f), .. } = &mut self.out {
            let _ = f.flush();
        }
        let kept_in_memory = self.streams.iter().any(|s| !s.ring.is_empty());
        LogSummary {
            stdout_bytes: self.streams[0].total,
            stderr_bytes: self.streams[1].total,
            truncated: self.streams.iter().any(|s| s.dropped > 0)
                || (!tail_written && kept_in_memory),
        }
    }
}

impl RunLog {
    fn follow(&self, tail_max: Option<usize>) -> Follow {
        let (tail, cut) = self.tail_chunks(tail_max);
        Follow { live: self.live.subscribe(), file_len: self.len, tail, cut }
    }
}

/// A follower waiting for a run's log to open, with the tail budget it asked for.
type Waiter = (Option<usize>, oneshot::Sender<Follow>);

/// How much nicer than the daemon the writer thread is: writing run output is background
/// work, and a run whose output outpaces the disk or the CPU waits for it (its pipe fills), so
/// the API keeps answering while a chatty run saturates a core.
const WRITER_NICE: i32 = 5;

/// Calls `f` once what was appended so far can be read back: at once for files, after the
/// table's writer committed it for PostgreSQL.
fn when_readable(sink: &Sink, f: impl FnOnce() + Send + 'static) {
    match sink {
        Sink::Dir(_) => f(),
        Sink::Table(t) => t.after_flush(Box::new(f)),
    }
}

fn writer_thread(sink: Sink, mut rx: mpsc::Receiver<Msg>) {
    #[cfg(target_os = "linux")]
    // SAFETY: on Linux, PRIO_PROCESS with a thread id sets that thread's nice value only.
    unsafe {
        let tid = libc::gettid();
        let now = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, now + WRITER_NICE);
    }
    let mut runs: HashMap<i64, RunLog> = HashMap::new();
    // Followers of runs whose log is not open yet (queued runs).
    let mut waiting: HashMap<i64, Vec<Waiter>> = HashMap::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Open { run, limit } => {
                let live = LiveFeed::new(LIVE_BUDGET);
                let log = runs.entry(run).or_insert_with(|| {
                    let out = match &sink {
                        Sink::Dir(dir) => Out::File { path: path_in(dir, run), file: None },
                        Sink::Table(t) => Out::Table(t.clone()),
                    };
                    let mut log = RunLog {
                        run,
                        out,
                        failed: false,
                        write_failed: false,
                        len: 0,
                        half: (limit / 2).max(1),
                        streams: [StreamState::new(), StreamState::new()],
                        live,
                    };
                    log.resume();
                    log
                });
                for (tail_max, w) in waiting.remove(&run).unwrap_or_default() {
                    let f = log.follow(tail_max);
                    when_readable(&sink, move || {
                        let _ = w.send(f);
                    });
                }
            }
            Msg::Write { run, stream, at, data, .. } => {
                if let Some(log) = runs.get_mut(&run) {
                    log.write(stream, at, data);
                }
            }
            Msg::Finish { run, reply } => {
                let summary = runs.remove(&run).map(RunLog::finish).unwrap_or_default();
                when_readable(&sink, move || {
                    let _ = reply.send(summary);
                });
            }
            Msg::Totals { run, reply } => {
                let t = runs.get(&run).map(|l| [l.streams[0].total, l.streams[1].total]);
                let _ = reply.send(t);
            }
            Msg::Subscribe { run, tail_max, reply } => {
                let f = runs.get(&run).map(|l| l.follow(tail_max));
                when_readable(&sink, move || {
                    let _ = reply.send(f);
                });
            }
            Msg::SubscribeWhenOpen { run, tail_max, reply } => match runs.get(&run) {
                Some(log) => {
                    let f = log.follow(tail_max);
                    when_readable(&sink, move || {
                        let _ = reply.send(f);
                    });
                }
                None => {
                    // Forget followers that gave up (their run never started).
                    waiting.retain(|_, ws| {
                        ws.retain(|(_, w)| !w.is_closed());
                        !ws.is_empty()
                    });
                    waiting.entry(run).or_default().push((tail_max, reply));
                }
            },
        }
    }
}

/// What to read from a log file.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Only this stream; both when `None`.
    pub stream: Option<Stream>,
    /// Byte offset in the file to start at (a `next_offset` from an earlier read).
    pub offset: u64,
    /// Return at most about this many bytes of output.
    pub limit: usize,
    /// Only the last this many lines (ignores `offset`).
    pub tail: Option<usize>,
    /// Read no further than this byte offset (a follower's hand-over point).
    pub end: Option<u64>,
    /// Prefix each line with its time.
    pub timestamps: bool,
}

/// A piece of a log, rendered as text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogSlice {
    /// The output (invalid UTF-8 replaced).
    pub data: String,
    /// Where to continue reading.
    pub next_offset: u64,
    /// Whether the end of the file was reached.
    pub eof: bool,
    /// Whether a cut marker was met.
    pub truncated: bool,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record<'a> {
    /// Output: stream, time text, payload, whether the line ended.
    Output(Stream, &'a str, &'a [u8], bool),
    /// `bytes` of `stream` were cut here.
    Cut(Stream, u64),
}

/// Decodes one record line (without its newline).
pub fn decode(line: &[u8]) -> Option<Record<'_>> {
    let sp = line.iter().position(|&b| b == b' ')?;
    let ts = std::str::from_utf8(&line[..sp]).ok()?;
    let tag = *line.get(sp + 1)?;
    let payload = line.get(sp + 3..).unwrap_or(&[]);
    Some(match tag {
        b'o' => Record::Output(Stream::Stdout, ts, payload, true),
        b'O' => Record::Output(Stream::Stdout, ts, payload, false),
        b'e' => Record::Output(Stream::Stderr, ts, payload, true),
        b'E' => Record::Output(Stream::Stderr, ts, payload, false),
        b'c' => {
            let text = std::str::from_utf8(payload).ok()?;
            let (s, n) = text.split_once(' ')?;
            let stream = if s == "stderr" { Stream::Stderr } else { Stream::Stdout };
            Record::Cut(stream, n.trim().parse().ok()?)
        }
        _ => return None,
    })
}

/// Renders a cut marker the way readers show it.
pub fn cut_notice(stream: Stream, bytes: u64) -> String {
    format!("[… {bytes} bytes of {} cut …]\n", stream.as_str())
}

/// Appends one record's rendering to `out`; returns false if it is filtered out.
fn render(out: &mut Vec<u8>, rec: &Record<'_>, q: &LogQuery, at_line_start: &mut bool) -> bool {
    match rec {
        Record::Output(s, ts, payload, ended) => {
            if q.stream.is_some_and(|want| want != *s) {
                return false;
            }
            if q.timestamps && *at_line_start {
                out.extend_from_slice(ts.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(payload);
            if *ended {
                out.push(b'\n');
            }
            *at_line_start = *ended;
            true
        }
        Record::Cut(s, n) => {
            if q.stream.is_some_and(|want| want != *s) {
                return false;
            }
            if !*at_line_start {
                out.push(b'\n');
            }
            out.extend_from_slice(cut_notice(*s, *n).as_bytes());
            *at_line_start = true;
            true
        }
    }
}

/// Most bytes one [`read`] call scans (it may return less output than asked, with progress).
const SCAN_LIMIT: u64 = 8 << 20;

/// Reads part of a run's log file as text. Always makes progress: at least one whole record
/// is returned unless the end is reached.
pub fn read(path: &Path, q: &LogQuery) -> std::io::Result<LogSlice> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    read_from(&mut f, len, q)
}

/// [`read`] of a log of `len` bytes in `f`.
fn read_from<R: Read + Seek>(f: &mut R, len: u64, q: &LogQuery) -> std::io::Result<LogSlice> {
    let stop = q.end.map_or(len, |e| e.min(len));
    if let Some(n) = q.tail {
        return read_tail(f, stop, n, q);
    }
    let start = q.offset.min(stop);
    f.seek(SeekFrom::Start(start))?;
    let want = if q.limit == 0 { 64 * 1024 } else { q.limit };
    let mut raw = Vec::new();
    let mut pos = start;
    let mut out = Vec::new();
    let mut consumed = 0usize;
    let mut at_line_start = true;
    let mut truncated = false;
    // Bytes of `raw` already dropped (consumed records are not kept in memory).
    let mut base = 0usize;
    'read: loop {
        while let Some(nl) = raw[consumed..].iter().position(|&b| b == b'\n') {
            if out.len() >= want && base + consumed > 0 {
                break 'read;
            }
            if let Some(rec) = decode(&raw[consumed..consumed + nl]) {
                truncated |= matches!(rec, Record::Cut(..));
                render(&mut out, &rec, q, &mut at_line_start);
            }
            consumed += nl + 1;
        }
        raw.drain(..consumed);
        base += consumed;
        consumed = 0;
        // A filter that matches nothing must not scan a huge file in one call: report
        // progress instead.
        let scanned_enough = pos - start > SCAN_LIMIT && base > 0;
        if pos >= stop || (out.len() >= want && base > 0) || scanned_enough {
            break;
        }
        let block = (stop - pos).min(64 * 1024) as usize;
        let before = raw.len();
        raw.resize(before + block, 0);
        f.read_exact(&mut raw[before..])?;
        pos += block as u64;
    }
    let next = start + (base + consumed) as u64;
    Ok(LogSlice {
        data: String::from_utf8_lossy(&out).into_owned(),
        next_offset: next,
        eof: next >= stop,
        truncated,
    })
}

/// The last `n` lines before `stop`, reading the file backwards only as far as needed. Each
/// block is decoded once: only the lines it completes are counted.
fn read_tail<R: Read + Seek>(
    f: &mut R,
    stop: u64,
    n: usize,
    q: &LogQuery,
) -> std::io::Result<LogSlice> {
    let wanted = |r: &Record<'_>| match r {
        Record::Output(s, _, _, ended) => *ended && q.stream.is_none_or(|w| w == *s),
        Record::Cut(..) => true,
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = stop;
    let mut ends = 0usize;
    // Enough when the region holds more than `n` line-ending records of the wanted streams
    // (the extra one guarantees the first kept line is whole).
    while ends <= n && pos > 0 {
        let block = pos.min(64 * 1024);
        pos -= block;
        f.seek(SeekFrom::Start(pos))?;
        let mut chunk = vec![0u8; block as usize];
        f.read_exact(&mut chunk)?;
        let old_first = buf.iter().position(|&b| b == b'\n');
        let clen = chunk.len();
        chunk.extend_from_slice(&buf);
        buf = chunk;
        // Lines completed by this block: from its first whole line (or the file's start) up
        // to the end of what was the first, partial line of the region read before.
        let end = old_first.map_or(buf.len(), |i| clen + i + 1);
        let start = if pos == 0 {
            0
        } else {
            buf[..clen].iter().position(|&b| b == b'\n').map_or(end, |i| i + 1)
        };
        ends += buf[start..end].split(|&b| b == b'\n').filter_map(decode).filter(wanted).count();
    }
    // Unless at the start of the file, the first line may be a piece of a record.
    let first = if pos == 0 {
        0
    } else {
        buf.iter().position(|&b| b == b'\n').map_or(buf.len(), |i| i + 1)
    };
    let mut out = Vec::new();
    let mut at_line_start = true;
    let mut truncated = false;
    for line in buf[first..].split(|&b| b == b'\n') {
        if let Some(rec) = decode(line) {
            truncated |= matches!(rec, Record::Cut(..));
            render(&mut out, &rec, q, &mut at_line_start);
        }
    }
    Ok(LogSlice {
        data: last_lines(&String::from_utf8_lossy(&out), n),
        next_offset: stop,
        eof: true,
        truncated,
    })
}

/// Renders chunks kept in memory (a running run's tail) like [`read`] renders records.
pub fn render_chunks(chunks: &[LiveChunk], cut: [u64; 2], q: &LogQuery) -> String {
    let mut out = Vec::new();
    let mut start = true;
    for (i, s) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
        if cut[i] > 0 {
            render(&mut out, &Record::Cut(s, cut[i]), q, &mut start);
        }
    }
    for c in chunks {
        let mut recs = Vec::new();
        encode(&mut recs, c.stream, c.at, &c.data);
        for line in recs.split(|&b| b == b'\n') {
            if let Some(rec) = decode(line) {
                render(&mut out, &rec, q, &mut start);
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut idx = body.len();
    for _ in 0..n {
        match body[..idx].rfind('\n') {
            Some(i) => idx = i,
            None => return text.to_string(),
        }
    }
    text[idx + 1..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u32) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s as i64).unwrap()
    }

    #[tokio::test]
    async fn records_round_trip_with_partial_lines_and_streams() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::start(dir.path().to_path_buf()).unwrap();
        logs.open(1, 1 << 20).await.unwrap();
        logs.write(1, Stream::Stdout, at(0), b"hel".to_vec()).await;
        logs.write(1, Stream::Stdout, at(1), b"lo\nworld\n".to_vec()).await;
        logs.write(1, Stream::Stderr, at(2), b"oops\n".to_vec()).await;
        let sum = logs.finish(1).await;
        assert_eq!(sum, LogSummary { stdout_bytes: 12, stderr_bytes: 5, truncated: false });
        let p = logs.path(1);
        let all = read(&p, &LogQuery::default()).unwrap();
        assert_eq!(all.data, "hello\nworld\noops\n");
        assert!(all.eof);
        let out = read(&p, &LogQuery { stream: Some(Stream::Stdout), ..Default::default() });
        assert_eq!(out.unwrap().data, "hello\nworld\n");
        let err = read(&p, &LogQuery { stream: Some(Stream::Stderr), ..Default::default() });
        assert_eq!(err.unwrap().data, "oops\n");
        let tail = read(&p, &LogQuery { tail: Some(2), ..Default::default() }).unwrap();
        assert_eq!(tail.data, "world\noops\n");
    }

    #[tokio::test]
    async fn paging_by_offset_covers_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::start(dir.path().to_path_buf()).unwrap();
        logs.open(2, 1 << 20).await.unwrap();
        let mut expect = String::new();
        for i in 0..500 {
            let line = format!("line {i}\n");
            expect.push_str(&line);
            logs.write(2, Stream::Stdout, at(i), line.into_bytes()).await;
        }
        logs.finish(2).await;
        let mut got = String::new();
        let mut off = 0;
        loop {
            let s =
                read(&logs.path(2), &LogQuery { offset: off, limit: 100, ..Default::default() })
                    .unwrap();
            got.push_str(&s.data);
            off = s.next_offset;
            if s.eof {
                break;
            }
        }
        assert_eq!(got, expect);
    }

    #[tokio::test]
    async fn output_past_the_limit_keeps_head_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::start(dir.path().to_path_buf()).unwrap();
        logs.open(3, 2048).await.unwrap();
        for i in 0..1000u32 {
            logs.write(3, Stream::Stdout, at(i), format!("{i:09}\n").into_bytes()).await;
        }
        logs.write(3, Stream::Stderr, at(2000), b"small\n".to_vec()).await;
        let sum = logs.finish(3).await;
        assert!(sum.truncated);
        assert_eq!(sum.stdout_bytes, 10_000);
        let text = read(&logs.path(3), &LogQuery::default()).unwrap();
        assert!(text.truncated);
        assert!(text.data.starts_with("000000000\n000000001\n"));
        assert!(text.data.contains("bytes of stdout cut"));
        assert!(text.data.ends_with("000000999\nsmall\n") || text.data.contains("000000999\n"));
        assert!(text.data.contains("small\n"));
        // Head + tail of stdout hold about the limit, never much more.
        let stdout =
            read(&logs.path(3), &LogQuery { stream: Some(Stream::Stdout), ..Default::default() })
                .unwrap();
        assert!(stdout.data.len() < 2048 + 200, "{}", stdout.data.len());
    }

    #[tokio::test]
    async fn small_pages_always_make_progress_and_files_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::start(dir.path().to_path_buf()).unwrap();
        logs.open(4, 1 << 20).await.unwrap();
        // One long line (a record far bigger than the page).
        logs.write(4, Stream::Stdout, at(0), vec![b'x'; 300_000]).await;
        logs.finish(4).await;
        let s = read(&logs.path(4), &LogQuery { limit: 4096, ..Default::default() }).unwrap();
        assert!(s.next_offset > 0 && !s.data.is_empty());
        // Millions of empty lines cannot blow a limit up on disk.
        logs.open(5, 64 * 1024).await.unwrap();
        for _ in 0..100 {
            logs.write(5, Stream::Stdout, at(1), vec![b'\n'; 10_000]).await;
        }
        logs.finish(5).await;
        // Tiny lines: the disk bound (twice the limit) holds.
        let size = std::fs::metadata(logs.path(5)).unwrap().len();
        assert!(size <= 2 * 64 * 1024 + 200, "{size}");
        // Ordinary lines: the whole limit of output is kept.
        logs.open(7, 64 * 1024).await.unwrap();
        let line = format!("{}\n", "y".repeat(79));
        for i in 0..5000 {
            logs.write(7, Stream::Stdout, at(i), line.clone().into_bytes()).await;
        }
        let sum = logs.finish(7).await;
        assert!(sum.truncated);
        let kept = read(&logs.path(7), &LogQuery { limit: 1 << 20, ..Default::default() }).unwrap();
        let output = kept.data.lines().filter(|l| l.starts_with('y')).count() * 80;
        // (Two lines are cut where head and tail meet, and count whole here.)
        assert!((63 * 1024..=64 * 1024 + 160).contains(&output), "kept {output} bytes");
        let tail = read(&logs.path(5), &LogQuery { tail: Some(3), ..Default::default() }).unwrap();
        assert_eq!(tail.data, "\n\n\n");
    }

    #[tokio::test]
    async fn tail_reads_backwards_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::start(dir.path().to_path_buf()).unwrap();
        logs.open(6, 64 << 20).await.unwrap();
        let mut out = String::new();
        let mut err = String::new();
        for i in 0..20_000u32 {
            let line = format!("line {i} {}\n", "x".repeat((i % 50) as usize));
            if i % 3 == 0 {
                err.push_str(&line);
                logs.write(6, Stream::Stderr, at(i), line.into_bytes()).await;
            } else {
                out.push_str(&line);
                logs.write(6, Stream::Stdout, at(i), line.into_bytes()).await;
            }
        }
        logs.finish(6).await;
        for n in [1, 7, 1000, 5000] {
            let q = LogQuery { tail: Some(n), stream: Some(Stream::Stderr), ..Default::default() };
            assert_eq!(read(&logs.path(6), &q).unwrap().data, last_lines(&err, n), "stderr {n}");
            let q = LogQuery { tail: Some(n), stream: Some(Stream::Stdout), ..Default::default() };
            assert_eq!(read(&logs.path(6), &q).unwrap().data, last_lines(&out, n), "stdout {n}");
        }
    }

    #[test]
    fn shed_prefix_is_the_shortest_that_covers_both_bounds() {
        // The byte-at-a-time definition the fast one must agree with.
        fn naive(data: &[u8], bytes_over: usize, cost_over: usize) -> (usize, u64) {
            let (mut k, mut shed) = (0, 0u64);
            while k < data.len() - 1 && (k < bytes_over || (shed as usize) < cost_over) {
                shed += if data[k] == b'\n' { RECORD_OVERHEAD } else { 1 };
                k += 1;
            }
            (k, shed)
        }
        let samples: [&[u8]; 5] = [
            b"y\ny\ny\ny\ny\n",
            b"no newline at all here",
            b"\n\n\n\nabc",
            b"long line\nx\n",
            b"a",
        ];
        for data in samples {
            for bytes_over in 0..data.len() + 2 {
                for cost_over in (0..200).step_by(7) {
                    let (k, shed) = shed_prefix(data, bytes_over, cost_over);
                    assert_eq!(
                        (k, shed),
                        naive(data, bytes_over, cost_over),
                        "{data:?} {bytes_over} {cost_over}"
                    );
                    assert_eq!(encoded_cost(&data[k..]), encoded_cost(data) - shed);
                }
            }
        }
    }

    #[test]
    fn last_lines_counts_from_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 1), "c");
        assert_eq!(last_lines("a\n", 5), "a\n");
    }
}
