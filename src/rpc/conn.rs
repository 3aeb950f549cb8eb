//! What every client connection carries, whatever its protocol: its connection slot, whether
//! it has authenticated, its backlog of replies the client has not read yet, and the switch
//! that closes it. [`ConnIo`] wraps the socket so that all three protocols obey them alike.
//!
//! # Slots
//!
//! A listener has `max_connections` slots ([`Gate`]). A new connection is *unauthenticated*
//! until it logs in (`Auth.Login` on raw TCP, a request with the bearer token on HTTP or a
//! WebSocket upgrade). Unauthenticated connections may hold at most three quarters of the
//! slots; the last quarter is kept for clients that log in. When the unauthenticated share is
//! full, a new connection is admitted *on probation* into the kept quarter: its first request
//! must log in, or it is closed; and when the kept quarter is full of connections still on
//! probation, the oldest of them makes room. So a flood of connections that never log in
//! cannot keep out a client that logs in as soon as it connects (as `taskctl` does), short of
//! opening a quarter of the slots within that client's round trip.
//!
//! # Backlog
//!
//! Memory spent on a client that does not read is bounded in bytes, not messages. Whoever
//! hands a message to a connection's writer counts it ([`Backlog::produced`]): the RPC
//! middleware every response, subscriptions each notification, transports the errors they
//! make themselves. [`ConnIo`] counts what reaches the socket ([`Backlog::sent`]). While the
//! difference is at or over the limit (4 MiB), [`ConnIo`] stops reading the client's
//! requests, subscriptions wait ([`Backlog::room`]) or end (`Run.Follow`, which cannot wait:
//! the output goes on), and a connection whose backlog stays full for the stall time (30 s) is
//! closed. Counting is approximate by design, and errs on the side of the client: framing
//! (WebSocket headers, HTTP headers, the newline after a raw-TCP message) reaches the socket
//! uncounted, and the count never goes below zero, so the backlog seen is at most the real
//! one. What the limit bounds is what matters: queued replies of a client that stopped
//! reading grow to the limit plus the replies of calls already running, and no further.
//!
//! # Closing
//!
//! [`Conn::close`] (eviction, a login deadline, a stalled backlog, shutdown of a WebSocket
//! session that jsonrpsee runs on its own task) makes every later read and write of the
//! connection's [`ConnIo`] fail, which ends whichever task is serving it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Bytes of unread replies a client may have queued before the daemon stops reading from it.
pub const BACKLOG_LIMIT: usize = 4 * 1024 * 1024;

/// How long a backlog may stay at its limit before the connection is closed.
pub const BACKLOG_STALL: Duration = Duration::from_secs(30);

/// How long a connection may take to log in (when the daemon has a token).
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A backlog this large, once its connection is gone, is worth giving back to the system.
pub const HEAVY_BACKLOG: usize = 1024 * 1024;

/// A message this large, once written, is worth giving back to the system.
pub const LARGE_MESSAGE: usize = 256 * 1024;

/// Peers whose failed logins are counted one by one; the rest are counted together.
const TRACKED_PEERS: usize = 1024;

/// At most one log line about failed logins per this interval.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a connection stands with respect to the slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Standing {
    /// Counted in the unauthenticated share.
    Unauthenticated,
    /// Admitted into the share kept for logged-in clients: must log in with its first request.
    Probation,
    /// Logged in (or the daemon needs no login).
    Authenticated,
}

impl Standing {
    const ALL: [Standing; 3] =
        [Standing::Unauthenticated, Standing::Probation, Standing::Authenticated];
}

#[derive(Default)]
struct SlotCounts {
    unauthenticated: usize,
    authenticated: usize,
    /// Connections on probation, oldest first.
    probation: VecDeque<(u64, Weak<Conn>)>,
}

impl SlotCounts {
    fn total(&self) -> usize {
        self.unauthenticated + self.authenticated + self.probation.len()
    }
}

#[derive(Default)]
struct Failures {
    by_peer: HashMap<IpAddr, u64>,
    /// Failures of peers beyond [`TRACKED_PEERS`].
    untracked: u64,
    /// Failures since the last log line.
    unlogged: u64,
    last_log: Option<Instant>,
}

/// The slots and the failed-login counts of one listener.
pub struct Gate {
    max: usize,
    /// Slots unauthenticated connections may hold outside probation.
    unauthenticated_max: usize,
    login_required: bool,
    counts: Mutex<SlotCounts>,
    failures: Mutex<Failures>,
    failures_total: AtomicU64,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("max", &self.max)
            .field("login_required", &self.login_required)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate of `max` slots; a quarter is kept for logged-in clients when `login_required`.
    pub fn new(max: usize, login_required: bool) -> Arc<Gate> {
        let max = max.max(1);
        Arc::new(Gate {
            max,
            unauthenticated_max: max - max / 4,
            login_required,
            counts: Mutex::default(),
            failures: Mutex::default(),
            failures_total: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        })
    }

    /// The number of slots.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Admits a new connection from `peer`, or `None` when every slot is taken by connections
    /// that are not on probation.
    pub fn admit(self: &Arc<Self>, peer: Option<SocketAddr>) -> Option<Arc<Conn>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The connection evicted, closed once the gate is unlocked: closing it wakes its task,
        // which may drop the last other handle, and its drop takes the gate's lock.
        let mut evicted = None;
        let mut counts = lock(&self.counts);
        let standing = if !self.login_required {
            (counts.total() < self.max).then_some(Standing::Authenticated)
        } else if counts.unauthenticated < self.unauthenticated_max && counts.total() < self.max {
            Some(Standing::Unauthenticated)
        } else if counts.total() < self.max {
            Some(Standing::Probation)
        } else {
            // Full: the oldest connection still on probation makes room, if there is one. A
            // client that logs in as it connects is evicted only if a quarter of the slots'
            // worth of connections arrive before its login does.
            while let Some((_, weak)) = counts.probation.pop_front() {
                if let Some(old) = weak.upgrade() {
                    // Counted as unauthenticated until it is gone: the slot is not free yet.
                    old.set_standing(Standing::Unauthenticated);
                    counts.unauthenticated += 1;
                    evicted = Some(old);
                    break;
                }
            }
            evicted.is_some().then_some(Standing::Probation)
        }?;
        let conn = Arc::new(Conn {
            id,
            peer,
            gate: self.clone(),
            standing: AtomicU8::new(standing as u8),
            authenticated: AtomicBool::new(standing == Standing::Authenticated),
            agent: std::sync::OnceLock::new(),
            close: CancellationToken::new(),
            gone: CancellationToken::new(),
            backlog: Backlog::default(),
            read_waker: Mutex::new(None),
            socket: Mutex::new(-1),
        });
        match standing {
            Standing::Unauthenticated => counts.unauthenticated += 1,
            Standing::Authenticated => counts.authenticated += 1,
            Standing::Probation => counts.probation.push_back((id, Arc::downgrade(&conn))),
        }
        drop(counts);
        if let Some(old) = evicted {
            old.close();
        }
        Some(conn)
    }

    /// Gives back the slot of `conn`, which is going away.
    fn release(&self, conn: &Conn) {
        let mut counts = lock(&self.counts);
        match conn.standing() {
            Standing::Unauthenticated => counts.unauthenticated -= 1,
            Standing::Authenticated => counts.authenticated -= 1,
            Standing::Probation => counts.probation.retain(|(i, _)| *i != conn.id),
        }
    }

    /// Moves `conn`, which logged in, into the logged-in share.
    fn promote(&self, conn: &Conn) {
        let mut counts = lock(&self.counts);
        match conn.standing() {
            Standing::Unauthenticated => counts.unauthenticated -= 1,
            Standing::Probation => counts.probation.retain(|(i, _)| *i != conn.id),
            Standing::Authenticated => return,
        }
        conn.set_standing(Standing::Authenticated);
        counts.authenticated += 1;
    }

    /// Connections open now: `(unauthenticated, on probation, authenticated)`.
    pub fn occupancy(&self) -> (usize, usize, usize) {
        let counts = lock(&self.counts);
        (counts.unauthenticated, counts.probation.len(), counts.authenticated)
    }

    /// Counts a failed login (or an unauthorized request) from `peer`, and logs about it at
    /// most once per [`FAILURE_LOG_INTERVAL`], so that no flood of them floods the log.
    pub fn login_failed(&self, peer: Option<SocketAddr>) {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        let mut f = lock(&self.failures);
        let count = match peer.map(|p| p.ip()) {
            Some(ip) if f.by_peer.len() < TRACKED_PEERS || f.by_peer.contains_key(&ip) => {
                let n = f.by_peer.entry(ip).or_default();
                *n += 1;
                *n
            }
            _ => {
                f.untracked += 1;
                f.untracked
            }
        };
        f.unlogged += 1;
        let now = Instant::now();
        if f.last_log.is_none_or(|t| now.duration_since(t) >= FAILURE_LOG_INTERVAL) {
            tracing::warn!(
                peer = ?peer.map(|p| p.ip()),
                from_this_peer = count,
                since_last_report = f.unlogged,
                "failed login or unauthorized request (reported at most every {}s)",
                FAILURE_LOG_INTERVAL.as_secs()
            );
            f.unlogged = 0;
            f.last_log = Some(now);
        }
    }

    /// Failed logins and unauthorized requests since the daemon started.
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }
}

/// Bytes handed to a connection's writer and not yet written to its socket.
#[derive(Debug)]
pub struct Backlog {
    queued: AtomicUsize,
    /// Bytes written to the socket since the connection opened.
    sent_total: AtomicU64,
    /// The most ever queued.
    high_water: AtomicUsize,
    limit: usize,
    /// Notified when the backlog crosses its limit either way, or empties.
    changed: Notify,
}

impl Default for Backlog {
    fn default() -> Self {
        Self {
            queued: AtomicUsize::new(0),
            sent_total: AtomicU64::new(0),
            high_water: AtomicUsize::new(0),
            limit: BACKLOG_LIMIT,
            changed: Notify::new(),
        }
    }
}

impl Backlog {
    /// Counts `n` bytes handed to the writer; wakes waiters when the backlog becomes full.
    pub fn produced(&self, n: usize) {
        if n >= LARGE_MESSAGE {
            crate::heap::note_large_free();
        }
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        self.high_water.fetch_max(before + n, Ordering::Relaxed);
        if before < self.limit && before + n >= self.limit {
            self.changed.notify_waiters();
        }
    }

    /// Bytes written to the socket so far.
    fn sent_total(&self) -> u64 {
        self.sent_total.load(Ordering::Acquire)
    }

    /// Counts `n` bytes written to the socket; wakes waiters when room appears.
    fn sent(&self, n: usize) -> bool {
        self.sent_total.fetch_add(n as u64, Ordering::AcqRel);
        let before = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(n)))
            .unwrap_or(0);
        let after = before.saturating_sub(n);
        let freed = before >= self.limit && after < self.limit || before > 0 && after == 0;
        if freed {
            self.changed.notify_waiters();
        }
        freed
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether the backlog is at its limit.
    pub fn is_full(&self) -> bool {
        self.queued() >= self.limit
    }

    /// Waits until the backlog is below its limit.
    pub async fn room(&self) {
        self.wait_until(|b| !b.is_full()).await;
    }

    /// Waits until everything handed to the writer has been written.
    pub async fn empty(&self) {
        self.wait_until(|b| b.queued() == 0).await;
    }

    async fn wait_until(&self, cond: impl Fn(&Self) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cond(self) {
                return;
            }
            notified.await;
        }
    }
}

/// One client connection: its slot, its standing, its backlog and its close switch.
pub struct Conn {
    id: u64,
    peer: Option<SocketAddr>,
    gate: Arc<Gate>,
    /// A [`Standing`], changed only under the gate's lock, together with its counts: so they
    /// always agree, and the gate never takes a connection's lock while holding its own, nor
    /// the other way round.
    standing: AtomicU8,
    authenticated: AtomicBool,
    /// The agent this connection logged in as, if it logged in with an agent's credential.
    agent: std::sync::OnceLock<(String, u64)>,
    close: CancellationToken,
    /// Cancelled when this is dropped (see [`Conn::gone`]).
    gone: CancellationToken,
    backlog: Backlog,
    read_waker: Mutex<Option<Waker>>,
    /// The socket's descriptor while its [`ConnIo`] lives (-1 otherwise), to reset it. A
    /// lock, not an atomic: [`Conn::close`] uses the descriptor under it, and [`ConnIo`]
    /// clears it under it before the socket is closed, so a number the kernel reused for
    /// another connection is never shut down.
    socket: Mutex<i32>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("standing", &self.standing())
            .field("queued", &self.backlog.queued())
            .finish()
    }
}

impl Conn {
    /// The client's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Where the connection stands.
    pub fn standing(&self) -> Standing {
        Standing::ALL[usize::from(self.standing.load(Ordering::Acquire))]
    }

    /// Under the gate's lock only.
    fn set_standing(&self, standing: Standing) {
        self.standing.store(standing as u8, Ordering::Release);
    }

    /// Whether the connection has logged in (always, when the daemon needs no login).
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }

    /// Records a successful login: the connection moves into the logged-in share.
    pub fn authenticate(&self) {
        self.gate.promote(self);
        self.authenticated.store(true, Ordering::Release);
    }

    /// Records a login with agent `name`'s credential: the connection is that agent's, and
    /// serves only the agent protocol.
    pub fn authenticate_agent(&self, name: String, epoch: u64) {
        let _ = self.agent.set((name, epoch));
        self.authenticate();
    }

    /// The agent this connection belongs to, if any.
    /// With the epoch of the credential it logged in with ([`crate::fleet::Fleet::current`]).
    pub fn agent(&self) -> Option<(&str, u64)> {
        self.agent.get().map(|(n, e)| (n.as_str(), *e))
    }

    /// Takes back `n` bytes counted as produced that will not reach the socket (a reply
    /// rewritten shorter, for instance).
    pub fn forget(&self, n: usize) {
        if self.backlog.sent(n) {
            self.wake_reader();
        }
    }

    /// Names the connection's socket, so that [`Conn::close`] can reset it; the socket must
    /// then be served through a [`ConnIo`], which forgets it when it is dropped.
    pub fn attach_socket(&self, socket: &impl AsRawFd) {
        *self.socket.lock().unwrap_or_else(PoisonError::into_inner) = socket.as_raw_fd();
    }

    /// Counts a failed login or unauthorized request of this connection's peer.
    pub fn login_failed(&self) {
        self.gate.login_failed(self.peer);
    }

    /// Its backlog of unwritten replies.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    /// Closes the connection: the socket is shut down (a task waiting to read it wakes up),
    /// every later read or write of its [`ConnIo`] fails, and the socket is reset when it is
    /// dropped, so that what the client never read does not linger in the kernel's buffers
    /// either.
    pub fn close(&self) {
        let socket = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        let fd = *socket;
        if fd >= 0 {
            let off = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: `fd` is the connection's socket, open while the lock is held: `ConnIo`
            // clears it under the lock before dropping the socket. setsockopt only reads `off`, whose size is passed; shutdown touches no
            // memory (and leaves the descriptor open: `ConnIo` still owns it).
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&off as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
                // And a reader parked on the socket (not on the backlog) wakes up to its end.
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
        drop(socket);
        self.close.cancel();
        self.wake_reader();
    }

    /// A token cancelled once the connection is over (its last handle dropped), for what
    /// watches it from outside with a `Weak` handle and must not keep it alive.
    pub fn gone(&self) -> CancellationToken {
        self.gone.clone()
    }

    /// Whether [`Conn::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled()
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        self.close.cancelled().await;
    }

    /// Resolves when the backlog has been at its limit for [`BACKLOG_STALL`] and not a byte
    /// of it reached the socket meanwhile: the client stopped reading. (A client that reads,
    /// however slowly, is not stalled.)
    pub async fn stalled(&self) {
        loop {
            self.backlog.wait_until(Backlog::is_full).await;
            let mark = self.backlog.sent_total();
            tokio::time::sleep(BACKLOG_STALL).await;
            if self.backlog.is_full() && self.backlog.sent_total() == mark {
                return;
            }
        }
    }

    fn wake_reader(&self) {
        // Woken with the lock released: a waker may run code of its own.
        let waker = lock(&self.read_waker).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.gone.cancel();
        self.gate.release(self);
        if self.backlog.high_water.load(Ordering::Relaxed) >= HEAVY_BACKLOG {
            crate::heap::note_large_free();
        }
    }
}

/// A connection's socket, obeying its [`Conn`]: reads wait while the backlog is full, writes
/// are counted off the backlog, and both fail once the connection is closed.
#[derive(Debug)]
pub struct ConnIo<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S> ConnIo<S> {
    /// Wraps `inner`, the socket of `conn`.
    pub fn new(inner: S, conn: Arc<Conn>) -> Self {
        Self { inner, conn }
    }
}

impl<S> Drop for ConnIo<S> {
    fn drop(&mut self) {
        // The descriptor is about to be closed, and its number reused.
        *self.conn.socket.lock().unwrap_or_else(PoisonError::into_inner) = -1;
    }
}

fn aborted() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed by the daemon")
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.conn.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        if self.conn.backlog.is_full() {
            *lock(&self.conn.read_waker) = Some(cx.waker().clone());
            // Written meanwhile, or closed meanwhile: look again rather than miss the wake-up.
            if self.conn.backlog.is_full() && !self.conn.is_closed() {
                return Poll::Pending;
            }
            if self.conn.is_closed() {
                return Poll::Ready(Err(aborted()));
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.conn.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written
            && self.conn.backlog.sent(n)
        {
            self.conn.wake_reader();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.conn.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written
            && self.conn.backlog.sent(n)
        {
            self.conn.wake_reader();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Option<SocketAddr> {
        Some("127.0.0.1:9".parse().expect("addr"))
    }

    #[test]
    fn a_quarter_of_the_slots_is_kept_for_logged_in_clients() {
        let gate = Gate::new(8, true);
        let holders: Vec<_> = (0..6).map(|_| gate.admit(peer()).expect("admitted")).collect();
        assert!(holders.iter().all(|c| c.standing() == Standing::Unauthenticated));
        // The unauthenticated share is full: the next two are on probation.
        let p1 = gate.admit(peer()).expect("probation 1");
        let p2 = gate.admit(peer()).expect("probation 2");
        assert_eq!((p1.standing(), p2.standing()), (Standing::Probation, Standing::Probation));
        assert_eq!(gate.occupancy(), (6, 2, 0));
        // Full: a newcomer evicts the oldest on probation.
        let p3 = gate.admit(peer()).expect("evicts p1");
        assert!(p1.is_closed() && !p2.is_closed());
        drop(p1);
        assert_eq!(gate.occupancy(), (6, 2, 0));
        // One logs in: it keeps its slot, and can no longer be evicted.
        p2.authenticate();
        assert_eq!(gate.occupancy(), (6, 1, 1));
        let p4 = gate.admit(peer()).expect("evicts p3");
        assert!(p3.is_closed() && !p2.is_closed());
        drop(p3);
        // While an evicted connection is still going away, its slot is not free.
        p4.authenticate();
        let p5 = gate.admit(peer());
        assert!(p5.is_none(), "nothing on probation left to evict");
        drop(holders);
        assert_eq!(gate.occupancy(), (0, 0, 2));
    }

    #[test]
    fn a_connection_that_logs_in_or_goes_away_as_it_is_evicted_never_locks_the_gate() {
        // Every newcomer evicts the one before it, which another thread meanwhile logs in or
        // drops: the two used to take the gate's and the connection's locks in opposite
        // orders, and an evicted connection's last handle could be dropped under the gate's.
        let gate = Gate::new(4, true);
        let _holders: Vec<_> = (0..3).map(|_| gate.admit(peer()).expect("admitted")).collect();
        let (to_other, other) = std::sync::mpsc::channel::<(u32, Arc<Conn>)>();
        let other = std::thread::spawn(move || {
            for (i, conn) in other {
                if i % 2 == 0 {
                    conn.authenticate();
                }
            }
        });
        let (done, finished) = std::sync::mpsc::channel();
        let g = gate.clone();
        std::thread::spawn(move || {
            for i in 0..20_000 {
                let conn = loop {
                    // Full only while the one logged in is still held.
                    match g.admit(peer()) {
                        Some(c) => break c,
                        None => std::thread::yield_now(),
                    }
                };
                assert_eq!(conn.standing(), Standing::Probation);
                to_other.send((i, conn)).expect("other thread");
            }
            let _ = done.send(());
        });
        if finished.recv_timeout(Duration::from_secs(60)).is_err() {
            // A thread holds the gate's lock for good: dropping a connection would hang too.
            std::mem::forget(gate);
            std::mem::forget(_holders);
            panic!("admitting connections stopped: the gate is locked for good");
        }
        other.join().expect("other thread");
        assert_eq!(gate.occupancy(), (3, 0, 0), "every slot given back");
    }

    #[test]
    fn without_login_every_connection_is_authenticated() {
        let gate = Gate::new(2, false);
        let a = gate.admit(peer()).expect("a");
        let _b = gate.admit(peer()).expect("b");
        assert!(a.is_authenticated());
        assert!(gate.admit(peer()).is_none(), "only two slots");
        drop(a);
        assert!(gate.admit(peer()).is_some());
    }

    #[test]
    fn failures_are_counted_per_peer_in_bounded_memory() {
        let gate = Gate::new(1, true);
        for i in 0..(TRACKED_PEERS as u32 + 100) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            gate.login_failed(Some(SocketAddr::new(ip.into(), 1)));
        }
        assert_eq!(gate.failures_total(), TRACKED_PEERS as u64 + 100);
        let f = lock(&gate.failures);
        assert_eq!(f.by_peer.len(), TRACKED_PEERS);
        assert_eq!(f.untracked, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_full_with_no_progress_for_the_stall_time_is_noticed() {
        let gate = Gate::new(4, false);
        let conn = gate.admit(peer()).expect("conn");
        let stalled = tokio::spawn({
            let conn = conn.clone();
            async move { conn.stalled().await }
        });
        tokio::task::yield_now().await;
        conn.backlog().produced(BACKLOG_LIMIT + 1000);
        // A client that reads, however little, is not stalled.
        for _ in 0..4 {
            tokio::time::sleep(BACKLOG_STALL / 2).await;
            conn.backlog().sent(10);
        }
        tokio::time::sleep(BACKLOG_STALL / 2).await;
        assert!(!stalled.is_finished(), "a slow reader is not stalled");
        // One that stops is, a stall time after its last byte.
        tokio::time::sleep(BACKLOG_STALL * 2).await;
        assert!(stalled.is_finished(), "a backlog full for the stall time is a stalled client");
    }

    #[tokio::test]
    async fn the_backlog_stops_reads_until_the_client_catches_up() {
        let gate = Gate::new(4, false);
        let conn = gate.admit(peer()).expect("conn");
        let (client, server) = tokio::io::duplex(64);
        let mut io = ConnIo::new(server, conn.clone());
        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client_wr.write_all(b"hello").await.expect("write");
        conn.backlog().produced(BACKLOG_LIMIT);
        let mut buf = [0u8; 5];
        let read = tokio::time::timeout(Duration::from_millis(50), io.read(&mut buf)).await;
        assert!(read.is_err(), "a full backlog must stop reads");
        // Writing the backlog out (the client reads it) lets reads go on.
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while client_rd.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < BACKLOG_LIMIT {
            io.write_all(&chunk).await.expect("write out");
            sent += chunk.len();
        }
        assert_eq!(conn.backlog().queued(), 0);
        io.read_exact(&mut buf).await.expect("read after drain");
        assert_eq!(&buf, b"hello");
        conn.close();
        assert!(io.read(&mut buf).await.is_err(), "closed");
        drop(io);
        drain.abort();
    }
}
