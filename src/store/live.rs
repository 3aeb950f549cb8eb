//! A run's output fanned out to its live followers (`Run.Follow`), bounded in bytes.
//!
//! A broadcast channel bounds its ring in messages: a ring of 1,024 pipe reads of 64 KiB is
//! 64 MiB per chatty run as soon as one follower falls behind. [`LiveFeed`] keeps the newest
//! chunks up to a byte budget instead, and a follower that falls further behind than that
//! learns how many chunks it missed ([`LiveError::Lagged`]) and goes on from the oldest one
//! kept. With no follower, nothing is kept (or even copied): most runs are never followed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::logs::LiveChunk;

/// Bytes of a run's newest output kept for its followers.
pub const LIVE_BUDGET: usize = 1024 * 1024;

/// Why a follower got no chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveError {
    /// This many chunks were dropped before the follower read them.
    Lagged(u64),
    /// The run's log is finished: nothing more will come.
    Closed,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<LiveChunk>,
    /// The sequence number of `chunks[0]`.
    first: u64,
    bytes: usize,
    receivers: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    budget: usize,
    sent: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side, owned by the run's log.
pub struct LiveFeed(Arc<Shared>);

impl LiveFeed {
    /// A feed that keeps up to `budget` bytes of the newest output for slow followers.
    pub fn new(budget: usize) -> Self {
        Self(Arc::new(Shared { state: Mutex::default(), budget, sent: Notify::new() }))
    }

    /// Whether anyone follows; a writer can skip preparing chunks nobody will read.
    pub fn has_receivers(&self) -> bool {
        self.0.lock().receivers > 0
    }

    /// A follower that gets every chunk sent from now on.
    pub fn subscribe(&self) -> LiveReceiver {
        let mut st = self.0.lock();
        st.receivers += 1;
        let next = st.first + st.chunks.len() as u64;
        LiveReceiver { shared: self.0.clone(), next }
    }

    /// Hands `chunk` to every follower; drops the oldest chunks beyond the budget (always
    /// keeping the newest one).
    pub fn send(&self, chunk: LiveChunk) {
        let mut st = self.0.lock();
        if st.receivers == 0 || st.closed {
            return;
        }
        st.bytes += chunk.data.len();
        st.chunks.push_back(chunk);
        while st.bytes > self.0.budget && st.chunks.len() > 1 {
            if let Some(old) = st.chunks.pop_front() {
                st.bytes -= old.data.len();
                st.first += 1;
            }
        }
        drop(st);
        self.0.sent.notify_waiters();
    }
}

impl Drop for LiveFeed {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.sent.notify_waiters();
    }
}

/// One follower's side.
pub struct LiveReceiver {
    shared: Arc<Shared>,
    next: u64,
}

impl LiveReceiver {
    /// The next chunk, without waiting: `Ok(None)` when there is none yet.
    pub fn try_recv(&mut self) -> Result<Option<LiveChunk>, LiveError> {
        let st = self.shared.lock();
        if self.next < st.first {
            let missed = st.first - self.next;
            self.next = st.first;
            return Err(LiveError::Lagged(missed));
        }
        match st.chunks.get((self.next - st.first) as usize) {
            Some(c) => {
                self.next += 1;
                Ok(Some(c.clone()))
            }
            None if st.closed => Err(LiveError::Closed),
            None => Ok(None),
        }
    }

    /// The next chunk, waiting for it.
    pub async fn recv(&mut self) -> Result<LiveChunk, LiveError> {
        loop {
            let shared = self.shared.clone();
            let sent = shared.sent.notified();
            tokio::pin!(sent);
            sent.as_mut().enable();
            if let Some(c) = self.try_recv()? {
                return Ok(c);
            }
            sent.await;
        }
    }
}

impl Drop for LiveReceiver {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.receivers -= 1;
        if st.receivers == 0 {
            // Nobody left to read them.
            st.first += st.chunks.len() as u64;
            st.chunks = VecDeque::new();
            st.bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::logs::Stream;

    fn chunk(text: &str) -> LiveChunk {
        LiveChunk {
            stream: Stream::Stdout,
            at: jiff::Timestamp::now(),
            data: text.as_bytes().into(),
        }
    }

    fn text(c: &LiveChunk) -> String {
        String::from_utf8_lossy(&c.data).into_owned()
    }

    #[tokio::test]
    async fn followers_get_every_chunk_within_the_budget_and_hear_what_they_missed() {
        let feed = LiveFeed::new(10);
        feed.send(chunk("before anyone follows"));
        assert!(!feed.has_receivers());
        let mut slow = feed.subscribe();
        let mut fast = feed.subscribe();
        feed.send(chunk("aaaa"));
        assert_eq!(text(&fast.recv().await.expect("a")), "aaaa");
        feed.send(chunk("bbbb"));
        feed.send(chunk("cccc"));
        // 12 bytes over a budget of 10: the oldest chunk went.
        assert_eq!(slow.recv().await.expect_err("lagged"), LiveError::Lagged(1));
        assert_eq!(text(&slow.recv().await.expect("b")), "bbbb");
        assert_eq!(text(&fast.recv().await.expect("b")), "bbbb");
        // One chunk larger than the budget is still delivered.
        feed.send(chunk("a chunk of more than ten bytes"));
        assert_eq!(slow.recv().await.expect_err("lagged"), LiveError::Lagged(1));
        assert!(text(&slow.recv().await.expect("big")).starts_with("a chunk"));
        assert!(matches!(slow.try_recv(), Ok(None)));
        drop(feed);
        assert_eq!(slow.recv().await.expect_err("closed"), LiveError::Closed);
        assert_eq!(fast.recv().await.expect_err("lagged"), LiveError::Lagged(1));
    }

    #[tokio::test]
    async fn a_waiting_follower_wakes_for_the_next_chunk() {
        let feed = LiveFeed::new(LIVE_BUDGET);
        let mut rx = feed.subscribe();
        let waiter = tokio::spawn(async move { rx.recv().await.map(|c| text(&c)) });
        tokio::task::yield_now().await;
        feed.send(chunk("hello"));
        assert_eq!(waiter.await.expect("join"), Ok("hello".into()));
        // With nobody left, nothing is kept.
        feed.send(chunk("unread"));
        assert_eq!(feed.0.lock().bytes, 0);
    }
}
