//! Events in PostgreSQL: numbered and published in order by the one server that writes them,
//! and announced to the others with `NOTIFY`.
//!
//! Only one process changes a database at a time: in a cluster the lease holder (every
//! change is fenced, see [`super::cluster`]); outside one, the process that opened it
//! (`taskd store copy` refuses a store in use). So that process numbers its events itself,
//! rather than under a lock held through each commit, which would put every commit, and its
//! WAL flush, in one line; `NOTIFY` in a transaction does the same (PostgreSQL holds a
//! database-wide lock from a notifying commit until it is flushed).
//!
//! Mechanism:
//! - **Numbering.** A transaction with events takes a range of numbers just before it
//!   commits ([`Sequencer::number`]), inserts its events with them, and commits, alongside
//!   the others: their WAL flushes are grouped by PostgreSQL.
//! - **In order.** Ranges are published in number order: a range waits until every lower one
//!   has ended (committed: its events are published; rolled back: skipped). The highest number
//!   so passed is the *watermark*: at or below it the table changes no more, so readers read
//!   only up to it ([`Sequencer::published`]). A transaction whose commit got no answer (its
//!   connection was lost) is resolved from the table after a pause, before the watermark
//!   passes it; one dropped half way (its caller went away) too.
//! - **Start.** Numbering starts at the first transaction with events, after the highest
//!   number in the table (or announced), read in that transaction. On a cluster server that transaction has
//!   passed the fence, so every transaction of the previous holder has ended (a takeover
//!   waits for them). The events up to that number are published from the table first.
//! - **To the others.** One task ([`announcer`]) announces the watermark of this server's
//!   own numbering with `NOTIFY`, and keeps it in `cluster_settings` (`events_published`):
//!   one fenced transaction at a time, with the newest value. Every server's listener
//!   ([`listen`]) reads the table up to an announced watermark; after (re)connecting, up to
//!   the kept one. A number published already is skipped, so no event is published twice,
//!   none is left out, and every server publishes them in one order.
//!
//! Limits: a transaction whose connection was lost in its commit, and whose commit PostgreSQL
//! finishes after [`RESOLVE_AFTER`], would have its events in the table but not published
//! live (a subscriber that replays from the table gets them). Numbers a holder rolled back
//! after its last announcement may be handed out again by the next one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use futures_util::StreamExt;
use tokio::sync::{OnceCell, broadcast, mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use super::{Shared, begin, event_from_row, lock};
use crate::error::{Error, Result};
use crate::store::{Event, EventKind};

/// The notification channel of events.
const CHANNEL: &str = "taskd_events";
/// Where the announced watermark is kept (`cluster_settings`).
const KEPT_AS: &str = "events_published";
/// How long after a commit with no answer its events are looked for in the table.
pub const RESOLVE_AFTER: Duration = Duration::from_secs(1);
/// Events read from the table at a time.
const PAGE: u32 = 1000;
/// Longest pause between two attempts to connect again, or to announce again.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Numbers this process's events and publishes every event in order (see the module
/// documentation).
pub(super) struct Sequencer {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// Set once numbering has started.
    started: OnceCell<()>,
    /// The watermark of this process's own numbering, for the [`announcer`].
    own: watch::Sender<i64>,
    /// For resolving commits that got no answer.
    pool: Pool,
}

struct State {
    /// The watermark: every event at or below it is published or was never committed.
    published: i64,
    /// The next number to hand out, once numbering has started.
    next: i64,
    /// Ranges handed out and not yet passed, by their first number.
    pending: BTreeMap<i64, Pending>,
}

struct Pending {
    len: i64,
    /// Once ended: the events it committed (none if rolled back).
    ended: Option<Vec<Event>>,
}

impl Sequencer {
    /// A sequencer that publishes to `events` what comes after `published`.
    pub(super) fn new(pool: Pool, events: broadcast::Sender<Event>, published: i64) -> Arc<Self> {
        Arc::new(Sequencer {
            state: Mutex::new(State { published, next: 0, pending: BTreeMap::new() }),
            events,
            started: OnceCell::new(),
            own: watch::Sender::new(0),
            pool,
        })
    }

    /// The watermark: readers read events only up to it.
    pub(super) fn published(&self) -> i64 {
        lock(&self.state).published
    }

    /// Numbers for `len` events of transaction `t`, which has passed the fence.
    pub(super) async fn number(
        self: &Arc<Self>,
        t: &deadpool_postgres::Transaction<'_>,
        len: usize,
    ) -> Result<Numbered> {
        self.started
            .get_or_try_init(|| async {
                // Above the announced watermark too: a number the previous holder passed
                // (rolled back) is not handed out again.
                let max: i64 = t
                    .query_one(
                        "SELECT GREATEST((SELECT COALESCE(MAX(seq), 0) FROM events), \
                         (SELECT COALESCE(MAX(value::bigint), 0) FROM cluster_settings \
                         WHERE key = $1))",
                        &[&KEPT_AS],
                    )
                    .await?
                    .get(0);
                catch_up(t, self, max).await?;
                lock(&self.state).next = max + 1;
                Ok::<_, Error>(())
            })
            .await?;
        let len = len as i64;
        let mut s = lock(&self.state);
        let first = s.next;
        s.next += len;
        s.pending.insert(first, Pending { len, ended: None });
        Ok(Numbered { seq: self.clone(), first, len, ended: false })
    }

    /// Range `first` ended with `events` committed: publishes what is now in order.
    fn end(&self, first: i64, events: Vec<Event>) {
        let mut s = lock(&self.state);
        if let Some(p) = s.pending.get_mut(&first) {
            p.ended = Some(events);
        }
        let mut moved = false;
        while let Some(entry) = s.pending.first_entry() {
            if entry.get().ended.is_none() {
                break;
            }
            let (first, p) = entry.remove_entry();
            for e in p.ended.unwrap_or_default() {
                if e.seq > s.published {
                    let _ = self.events.send(e);
                }
            }
            s.published = s.published.max(first + p.len - 1);
            moved = true;
        }
        if moved {
            let w = s.published;
            drop(s);
            self.own.send_if_modified(|o| std::mem::replace(o, w) != w);
        }
    }

    /// Publishes `page`, read from the table in order, skipping what was published already;
    /// then, if given, moves the watermark to `upto` (everything below it was read).
    fn publish_read(&self, page: Vec<Event>, upto: Option<i64>) {
        let mut s = lock(&self.state);
        for e in page {
            if e.seq > s.published {
                s.published = e.seq;
                let _ = self.events.send(e);
            }
        }
        if let Some(u) = upto {
            s.published = s.published.max(u);
        }
    }
}

/// A range of event numbers held by a transaction until it ends.
pub(super) struct Numbered {
    seq: Arc<Sequencer>,
    first: i64,
    len: i64,
    ended: bool,
}

impl Numbered {
    /// The numbers, in order.
    pub(super) fn seqs(&self) -> std::ops::Range<i64> {
        self.first..self.first + self.len
    }

    /// The transaction committed these events.
    pub(super) fn committed(mut self, events: Vec<Event>) {
        self.ended = true;
        self.seq.end(self.first, events);
    }

    /// The transaction was rolled back before its commit was asked for.
    pub(super) fn rolled_back(mut self) {
        self.ended = true;
        self.seq.end(self.first, Vec::new());
    }
}

impl Drop for Numbered {
    /// Not known to have committed or not: looked for in the table, after a pause for a commit
    /// still under way. The watermark waits meanwhile.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (seq, first, last) = (self.seq.clone(), self.first, self.first + self.len - 1);
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            tokio::time::sleep(RESOLVE_AFTER).await;
            let mut backoff = Duration::from_millis(100);
            loop {
                let read = async {
                    let c = seq.pool.get().await?;
                    events_between(&c, first - 1, last, PAGE).await
                };
                match read.await {
                    Ok(events) => {
                        tracing::warn!(first, last, committed = events.len(), "store: a commit with no answer resolved from the table");
                        seq.end(first, events);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "store: cannot tell whether a commit was made; trying again");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        });
    }
}

/// Events with a number above `after` and at most `upto`, oldest first, at most `limit`;
/// kinds this build does not know are left out.
pub(super) async fn events_between<C: GenericClient>(
    c: &C,
    after: i64,
    upto: i64,
    limit: u32,
) -> Result<Vec<Event>> {
    let kinds: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    let st = c
        .prepare_cached(
            "SELECT seq, time, kind, unit, run, state FROM events \
             WHERE seq > $1 AND seq <= $2 AND kind = ANY($4) ORDER BY seq LIMIT $3",
        )
        .await?;
    let rows = c.query(&st, &[&after, &upto, &i64::from(limit), &kinds]).await?;
    Ok(rows.iter().filter_map(event_from_row).collect())
}

/// Publishes from the table every event above the watermark up to `upto`, in order.
async fn catch_up<C: GenericClient>(c: &C, seq: &Sequencer, upto: i64) -> Result<()> {
    loop {
        let after = seq.published();
        if after >= upto {
            return Ok(());
        }
        let page = events_between(c, after, upto, PAGE).await?;
        let whole = page.len() < PAGE as usize;
        seq.publish_read(page, whole.then_some(upto));
        if whole {
            return Ok(());
        }
    }
}

/// Announces the watermark of this process's own numbering to the other servers, and keeps
/// it for listeners that connect later: the newest value, one transaction at a time. Fenced:
/// a server that lost the lease announces nothing.
pub(super) async fn announcer(shared: Arc<Shared>, pool: Pool) {
    let mut own = shared.seq.own.subscribe();
    let mut backoff = Duration::from_millis(100);
    while own.changed().await.is_ok() {
        let w = *own.borrow_and_update();
        let r = async {
            let mut c = pool.get().await?;
            let t = begin(&mut c, &shared).await?;
            t.execute(
                "WITH k AS (INSERT INTO cluster_settings(key, value) VALUES ($1, $2::bigint::text) \
                 ON CONFLICT (key) DO UPDATE SET value = \
                 GREATEST(cluster_settings.value::bigint, EXCLUDED.value::bigint)::text \
                 RETURNING value) SELECT pg_notify($3, value) FROM k",
                &[&KEPT_AS, &w, &CHANNEL],
            )
            .await?;
            t.commit().await
        };
        match r.await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(Error::Fenced) => {}
            Err(e) => {
                tracing::warn!(error = %e, "store: cannot announce new events; trying again");
                own.mark_changed();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Starts the listener (see the module documentation): it publishes the events other
/// processes announce. The returned receiver gets a message each time it listens (again).
pub(super) fn listen(
    cfg: tokio_postgres::Config,
    pool: Pool,
    seq: Arc<Sequencer>,
) -> mpsc::Receiver<()> {
    let (ready, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen_once(&cfg, &pool, &seq, &ready).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "store: lost the PostgreSQL event listener; connecting again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    });
    rx
}

/// One connection's worth of listening.
async fn listen_once(
    cfg: &tokio_postgres::Config,
    pool: &Pool,
    seq: &Sequencer,
    ready: &mpsc::Sender<()>,
) -> Result<()> {
    let (client, mut conn) = cfg.connect(NoTls).await?;
    let (tx, mut notes) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = msgs.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if let Ok(w) = n.payload().parse::<i64>()
                        && tx.send(w).is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "PostgreSQL listener connection ended");
                    return;
                }
            }
        }
    });
    let _stop_driver = tokio_util::task::AbortOnDropHandle::new(driver);
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    let _ = ready.try_send(());
    // What was announced while nobody listened.
    let c = pool.get().await?;
    let kept = c
        .query_opt("SELECT value::bigint FROM cluster_settings WHERE key = $1", &[&KEPT_AS])
        .await?;
    catch_up(&c, seq, kept.map_or(0, |r| r.get(0))).await?;
    drop(c);
    while let Some(w) = notes.recv().await {
        if w <= seq.published() {
            continue;
        }
        let c = pool.get().await?;
        catch_up(&c, seq, w).await?;
    }
    Err(Error::Postgres("the listener's connection closed".into()))
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::*;
    use crate::store::Store;
    use crate::store::tests::TestDb;

    /// Numbers `len` events in a transaction of its own, inserts them, and commits.
    async fn numbered(store: &Store, len: usize, commit: bool) -> (Numbered, Vec<Event>) {
        let pg = store.postgres.as_ref().unwrap();
        let mut c = pg.pool.get().await.unwrap();
        let t = c.transaction().await.unwrap();
        let n = pg.shared.seq.number(&t, len).await.unwrap();
        let mut events = Vec::new();
        for seq in n.seqs() {
            let e = Event {
                seq,
                time: Timestamp::now(),
                kind: EventKind::UnitAdded,
                unit: format!("u{seq}"),
                run: None,
                state: None,
            };
            t.execute(
                "INSERT INTO events(seq, time, kind, unit) VALUES ($1, $2, $3, $4)",
                &[&e.seq, &e.time, &e.kind.as_str(), &e.unit],
            )
            .await
            .unwrap();
            events.push(e);
        }
        if commit {
            t.commit().await.unwrap();
        }
        (n, events)
    }

    #[tokio::test]
    async fn ranges_ending_out_of_order_are_published_in_order_and_an_unanswered_one_from_the_table()
     {
        let Some(db) = TestDb::create().await else { return };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_postgres(&db.url, dir.path()).await.unwrap();
        let mut sub = store.subscribe_events();
        let seq = store.postgres.as_ref().unwrap().shared.seq.clone();
        let (first, _) = numbered(&store, 2, true).await;
        let (second, _) = numbered(&store, 1, false).await;
        let (third, third_events) = numbered(&store, 1, true).await;
        // The third ends first, the second is rolled back: both wait for the first, whose
        // commit got no answer (committed, in fact).
        third.committed(third_events);
        second.rolled_back();
        assert_eq!(seq.published(), 0);
        drop(first);
        let mut got = Vec::new();
        for _ in 0..3 {
            let e = tokio::time::timeout(RESOLVE_AFTER * 5, sub.recv()).await.unwrap().unwrap();
            got.push(e.seq);
        }
        assert_eq!(got, [1, 2, 4], "in order, the rolled back number skipped");
        assert_eq!(seq.published(), 4);
        assert_eq!(*seq.own.borrow(), 4, "announced to the other servers");
    }
}
