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
//!   only up to it ([`Sequencer::published`]). A transaction whose commit had no answer (its
//!   connection was lost, or its caller went away meanwhile) is resolved by its transaction
//!   id (`pg_xact_status`), waiting while PostgreSQL still has it in progress, before the
//!   watermark passes it.
//! - **Start.** Numbering starts when the engine starts ([`Sequencer::start`]), or at the
//!   first transaction with events, after the highest number in the table, announced, or
//!   handed out by the column's identity (`taskd store copy` sets it), read in a transaction
//!   that passed the fence: so every transaction of the previous holder has ended (a
//!   takeover waits for them). The events up to that number are published from the table
//!   first.
//! - **To the others.** One task ([`announcer`]) announces the watermark of this server's
//!   own numbering with `NOTIFY`, and keeps it in `cluster_settings` (`events_published`):
//!   one fenced transaction at a time, with the newest value. Every server's listener
//!   ([`listen`]) reads the table up to an announced watermark; after (re)connecting, up to
//!   the kept one. A number published already is skipped, so no event is published twice,
//!   none is left out, and every server publishes them in one order.
//!
//! Limits: numbers a holder rolled back after its last announcement may be handed out again
//! by the next one (no event was ever published under them). A subscriber that gives no
//! `after_seq` starts at this server's watermark, which on a server that has just taken
//! over (or whose listener is catching up) is below the newest committed event: its first
//! events may be of changes committed just before it subscribed. None is sent twice, none
//! is missed; `Events.Subscribe` promises events after the subscription's "now", and this is
//! the server's "now".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use futures_util::StreamExt;
use tokio::sync::{OnceCell, broadcast, mpsc, watch};
use tokio_postgres::AsyncMessage;

use super::{Shared, begin, event_from_row, lock};
use crate::error::{Error, Result};
use crate::store::{Event, EventKind};

/// The notification channel of events.
const CHANNEL: &str = "taskd_events";
/// Where the announced watermark is kept (`cluster_settings`).
pub(in crate::store) const KEPT_AS: &str = "events_published";
/// How often the outcome of a commit with no answer is asked for.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(200);
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
    rt: tokio::runtime::Handle,
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
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// The watermark: readers read events only up to it.
    pub(super) fn published(&self) -> i64 {
        lock(&self.state).published
    }

    /// Starts numbering (once), in transaction `t`, which has passed the fence.
    pub(super) async fn start(&self, t: &impl GenericClient) -> Result<()> {
        self.started
            .get_or_try_init(|| async {
                // Above the announced watermark too (a number the previous holder passed,
                // rolled back, is not handed out again), and the identity's (a store copied
                // here keeps the numbers its source handed out).
                let max: i64 = t
                    .query_one(
                        "SELECT GREATEST((SELECT COALESCE(MAX(seq), 0) FROM events), \
                         (SELECT COALESCE(MAX(value::bigint), 0) FROM cluster_settings \
                         WHERE key = $1), COALESCE(pg_sequence_last_value(\
                         pg_get_serial_sequence('events', 'seq')::regclass), 0))",
                        &[&KEPT_AS],
                    )
                    .await?
                    .get(0);
                catch_up(t, self, max).await?;
                lock(&self.state).next = max + 1;
                Ok::<_, Error>(())
            })
            .await?;
        Ok(())
    }

    /// Numbers for `len` events of transaction `t`, which has passed the fence.
    pub(super) async fn number(
        self: &Arc<Self>,
        t: &impl GenericClient,
        len: usize,
    ) -> Result<Numbered> {
        self.start(t).await?;
        let len = len as i64;
        let mut s = lock(&self.state);
        let first = s.next;
        s.next += len;
        s.pending.insert(first, Pending { len, ended: None });
        Ok(Numbered { seq: self.clone(), first, len, xid: None, ended: false })
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
    /// The transaction's id, once its events are inserted.
    xid: Option<String>,
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

    /// The events are inserted by transaction `xid`.
    pub(super) fn inserted_by(&mut self, xid: String) {
        self.xid = Some(xid);
    }

    /// The transaction was rolled back (or its commit refused).
    pub(super) fn rolled_back(mut self) {
        self.ended = true;
        self.seq.end(self.first, Vec::new());
    }
}

impl Drop for Numbered {
    /// Not known to have committed or not: its transaction's outcome is asked for until
    /// PostgreSQL knows it. The watermark waits meanwhile. Without a transaction id, its
    /// events were never inserted: the transaction is rolled back with its connection's
    /// handle.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (seq, first, last) = (self.seq.clone(), self.first, self.first + self.len - 1);
        let Some(xid) = self.xid.take() else {
            seq.end(first, Vec::new());
            return;
        };
        let rt = seq.rt.clone();
        rt.spawn(async move {
            let mut backoff = RESOLVE_EVERY;
            loop {
                match resolve(&seq.pool, &xid, first, last).await {
                    Ok(Some(events)) => {
                        tracing::warn!(first, last, committed = events.len(), "store: a commit with no answer resolved");
                        seq.end(first, events);
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "store: cannot tell whether a commit was made; trying again");
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                tokio::time::sleep(backoff).await;
            }
        });
    }
}

/// The events committed by transaction `xid` in `first..=last`, or `None` while it is still
/// in progress.
async fn resolve(pool: &Pool, xid: &str, first: i64, last: i64) -> Result<Option<Vec<Event>>> {
    let c = pool.get().await?;
    let status: Option<String> =
        c.query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid]).await?.get(0);
    match status.as_deref() {
        Some("in progress") => Ok(None),
        Some("aborted") => Ok(Some(Vec::new())),
        // Committed, or too old to be known: the table says.
        _ => {
            let mut events = Vec::new();
            let mut after = first - 1;
            loop {
                let page = events_between(&c, after, last, PAGE).await?;
                let whole = page.len() < PAGE as usize;
                after = page.last().map_or(last, |e| e.seq);
                events.extend(page);
                if whole {
                    return Ok(Some(events));
                }
            }
        }
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
pub(super) fn listen(target: super::Target, pool: Pool, seq: Arc<Sequencer>) -> mpsc::Receiver<()> {
    let (ready, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen_once(&target, &pool, &seq, &ready).await {
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
    target: &super::Target,
    pool: &Pool,
    seq: &Sequencer,
    ready: &mpsc::Sender<()>,
) -> Result<()> {
    let (client, mut conn) = target.cfg.connect(target.tls.clone()).await?;
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

    /// A transaction with `len` events numbered and inserted (not committed), its numbers and
    /// the events.
    async fn numbered<'c>(
        c: &'c mut deadpool_postgres::Object,
        seq: &Arc<Sequencer>,
        len: usize,
    ) -> (deadpool_postgres::Transaction<'c>, Numbered, Vec<Event>) {
        let t = c.transaction().await.unwrap();
        let mut n = seq.number(&t, len).await.unwrap();
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
        let xid = t.query_one("SELECT pg_current_xact_id()::text", &[]).await.unwrap().get(0);
        n.inserted_by(xid);
        (t, n, events)
    }

    #[tokio::test]
    async fn ranges_ending_out_of_order_are_published_in_order_and_unanswered_ones_when_known() {
        let Some(db) = TestDb::create().await else { return };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_postgres(&db.url, dir.path()).await.unwrap();
        let mut sub = store.subscribe_events();
        let pg = store.postgres.as_ref().unwrap();
        let seq = pg.shared.seq.clone();
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(pg.pool.get().await.unwrap());
        }
        let [c1, c2, c3, c4] = &mut conns[..] else { unreachable!() };
        // 1-2: committed, but its commit had no answer. 3: no answer, still in progress.
        // 4: rolled back. 5: committed first.
        let (t1, first, _) = numbered(c1, &seq, 2).await;
        let (t2, second, _) = numbered(c2, &seq, 1).await;
        let (t3, third, _) = numbered(c3, &seq, 1).await;
        let (t4, fourth, fourth_events) = numbered(c4, &seq, 1).await;
        t4.commit().await.unwrap();
        fourth.committed(fourth_events);
        drop(t3);
        third.rolled_back();
        t1.commit().await.unwrap();
        drop(first);
        drop(second);
        let mut got = Vec::new();
        for _ in 0..2 {
            let e = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await.unwrap();
            got.push(e.unwrap().seq);
        }
        assert_eq!(got, [1, 2]);
        // The watermark waits for the transaction still in progress…
        tokio::time::sleep(RESOLVE_EVERY * 3).await;
        assert_eq!(seq.published(), 2);
        assert!(sub.try_recv().is_err());
        // …which commits late: its event is published, then the rest, in order.
        t2.commit().await.unwrap();
        for _ in 0..2 {
            let e = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await.unwrap();
            got.push(e.unwrap().seq);
        }
        assert_eq!(got, [1, 2, 3, 5], "in order, the rolled back number skipped");
        assert_eq!(seq.published(), 5);
        assert_eq!(*seq.own.borrow(), 5, "announced to the other servers");
    }
}
