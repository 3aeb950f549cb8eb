//! The cluster's shared state in PostgreSQL: the servers, the scheduling lease, and the fence
//! that keeps a server that lost the lease from starting anything.
//!
//! **The lease** is one row: holder, epoch, expiry. Its times are the database's
//! (`clock_timestamp()`), so servers' clocks may disagree without harm. A server takes the
//! lease when there is none or it has expired, raising the epoch; the holder renews it every
//! third of its length, and a renewal succeeds only while the holder still has its epoch and
//! the lease has not expired. A holder that cannot renew it in time has lost it, whatever
//! happens later.
//!
//! **The fence.** Every change a cluster server's store makes is made in a transaction that
//! takes an advisory lock ([`LEASE_LOCK`]) shared, then checks holder, epoch and expiry in the
//! lease row. A server taking the lease over (only once the row shows it expired: standbys
//! poll, and the lock would hold the holder's changes back at each poll) takes that lock
//! exclusively first, so it waits for such transactions to end, and those that come after
//! it see the new epoch: a change is
//! made only by the holder of an unexpired lease, even if that holder was paused (SIGSTOP, a
//! long GC, a partition) and wakes up after its lease ran out. Sessions end a transaction left
//! idle for [`IDLE_IN_TRANSACTION`], so a paused holder cannot hold the lock for long. (A row
//! lock `FOR SHARE` on the lease row did the same, but thousands of transactions a second
//! sharing one row's lock cost PostgreSQL a multixact each, and starved the renewals.)
//! A scheduled fire is also recorded under its unit and scheduled time (`fires`), so the
//! same fire is never made twice, across a takeover too.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use jiff::Timestamp;

use crate::error::{Error, Result};

/// The advisory lock a takeover holds exclusively, and every fenced transaction shared.
const LEASE_LOCK: i64 = 0x7461_736b_6402;

/// How long a server that stopped saying it is alive is still listed (as gone).
pub const SERVERS_FORGOTTEN_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How long a session may sit in a transaction doing nothing before PostgreSQL ends it.
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// Which server may create runs, and under which epoch: armed by [`Cluster`], checked by
/// the store when it creates a run.
#[derive(Default)]
pub struct Fence {
    /// This server's name, once it is in a cluster.
    name: OnceLock<String>,
    /// The epoch of the lease it holds; 0 when it holds none.
    epoch: AtomicI64,
}

impl Fence {
    /// `(name, epoch)` to check, when this store is a cluster server's.
    pub fn armed(&self) -> Option<(&str, i64)> {
        self.name.get().map(|n| (n.as_str(), self.epoch.load(Ordering::SeqCst)))
    }
}

/// The lease as it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// Who holds it (maybe expired).
    pub holder: String,
    /// Raised at each takeover.
    pub epoch: i64,
    /// Time left, by the database's clock; negative once expired.
    pub left: jiff::SignedDuration,
    /// Where the holder said it can be reached.
    pub address: Option<String>,
}

/// A server of the cluster, as it last said.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerRow {
    /// Its `--name`.
    pub name: String,
    /// Where others reach it.
    pub address: String,
    /// Its taskd version.
    pub version: String,
    /// When it started.
    pub started_at: Timestamp,
    /// When it last said it was alive.
    pub seen_at: Timestamp,
}

/// One server's handle on the cluster's shared state.
#[derive(Clone)]
pub struct Cluster {
    pool: Pool,
    name: String,
    fence: Arc<Fence>,
    /// The address it joined with, to join again if its row was forgotten meanwhile.
    address: Arc<std::sync::Mutex<Option<String>>>,
}

impl Cluster {
    pub(super) fn new(pool: Pool, name: String, fence: Arc<Fence>) -> Cluster {
        let _ = fence.name.set(name.clone());
        Cluster { pool, name, fence, address: Arc::default() }
    }

    /// This server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records this server (its address, version, start) in `servers`.
    pub async fn join(&self, address: &str) -> Result<()> {
        *self.address.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(address.to_string());
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO servers(name, address, version, started_at, seen_at) \
             VALUES ($1, $2, $3, now(), now()) ON CONFLICT (name) DO UPDATE \
             SET address = $2, version = $3, started_at = now(), seen_at = now()",
            &[&self.name, &address, &env!("CARGO_PKG_VERSION")],
        )
        .await?;
        Ok(())
    }

    /// Says this server is alive, and forgets the servers not seen for
    /// [`SERVERS_FORGOTTEN_AFTER`]; joins again if it was forgotten itself (paused or cut off
    /// that long).
    pub async fn heartbeat(&self) -> Result<()> {
        let c = self.pool.get().await?;
        let seen = c
            .execute(
                "WITH gone AS (DELETE FROM servers WHERE name <> $1 \
             AND seen_at < now() - $2 * interval '1 second') \
             UPDATE servers SET seen_at = now() WHERE name = $1",
                &[&self.name, &SERVERS_FORGOTTEN_AFTER.as_secs_f64()],
            )
            .await?;
        drop(c);
        let address =
            self.address.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match address {
            Some(a) if seen == 0 => self.join(&a).await,
            _ => Ok(()),
        }
    }

    /// Takes the lease if nobody holds it or it has expired; its epoch when taken.
    pub async fn try_acquire(&self, ttl: Duration) -> Result<Option<i64>> {
        let mut c = self.pool.get().await?;
        let ttl = ttl.as_secs_f64();
        let t = c.transaction().await?;
        // Nothing to take while the lease runs: return before the lock below, which waits for
        // every fenced transaction in flight and holds back those that come meanwhile (a
        // standby polling it would stall the holder's changes at every poll).
        let running: bool = t
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM lease WHERE id = 1 AND expires_at >= clock_timestamp())",
                &[],
            )
            .await?
            .get(0);
        if running {
            return Ok(None);
        }
        // A lease row locked by a fenced transaction of a paused holder: give up quickly and
        // try again at the next round.
        t.batch_execute("SET LOCAL lock_timeout = '1s'").await?;
        // Waits for the fenced transactions in flight; those that come later see the new epoch.
        t.execute("SELECT pg_advisory_xact_lock($1)", &[&LEASE_LOCK]).await?;
        let row = t
            .query_opt(
                "INSERT INTO lease(id, holder, epoch, expires_at) \
                 VALUES (1, $1, 1, clock_timestamp() + make_interval(secs => $2)) \
                 ON CONFLICT (id) DO UPDATE SET holder = $1, epoch = lease.epoch + 1, \
                 expires_at = clock_timestamp() + make_interval(secs => $2) \
                 WHERE lease.expires_at < clock_timestamp() RETURNING epoch",
                &[&self.name, &ttl],
            )
            .await?;
        let epoch: Option<i64> = row.map(|r| r.get(0));
        // Armed before the commit: once the row says so, this server may create runs.
        if let Some(e) = epoch {
            self.fence.epoch.store(e, Ordering::SeqCst);
        }
        if let Err(e) = t.commit().await {
            self.fence.epoch.store(0, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(epoch)
    }

    /// Renews the lease held under `epoch`; false when it is lost (expired, or taken over).
    pub async fn renew(&self, epoch: i64, ttl: Duration) -> Result<bool> {
        let c = self.pool.get().await?;
        let n = c
            .execute(
                "UPDATE lease SET expires_at = clock_timestamp() + make_interval(secs => $3) \
                 WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()",
                &[&self.name, &epoch, &ttl.as_secs_f64()],
            )
            .await?;
        if n == 0 {
            self.fence.epoch.store(0, Ordering::SeqCst);
        }
        Ok(n == 1)
    }

    /// Stops creating runs under the lease at once (it is being lost or given up).
    pub fn disarm(&self) {
        self.fence.epoch.store(0, Ordering::SeqCst);
    }

    /// Gives the lease up (a clean shutdown), so that another server takes it at once.
    pub async fn release(&self, epoch: i64) -> Result<()> {
        self.disarm();
        let c = self.pool.get().await?;
        c.execute(
            "UPDATE lease SET expires_at = clock_timestamp() - interval '1 second' \
             WHERE id = 1 AND holder = $1 AND epoch = $2",
            &[&self.name, &epoch],
        )
        .await?;
        Ok(())
    }

    /// The lease, if anybody ever held it, with its holder's address.
    pub async fn lease(&self) -> Result<Option<Lease>> {
        let c = self.pool.get().await?;
        let row = c
            .query_opt(
                "SELECT l.holder, l.epoch, \
                 EXTRACT(EPOCH FROM (l.expires_at - clock_timestamp()))::float8, s.address \
                 FROM lease l LEFT JOIN servers s ON s.name = l.holder WHERE l.id = 1",
                &[],
            )
            .await?;
        Ok(row.map(|r| Lease {
            holder: r.get(0),
            epoch: r.get(1),
            left: jiff::SignedDuration::from_secs_f64(r.get::<_, f64>(2)),
            address: r.get(3),
        }))
    }

    /// Every server that ever joined, by name.
    pub async fn servers(&self) -> Result<Vec<ServerRow>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT name, address, version, started_at, seen_at FROM servers ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ServerRow {
                name: r.get(0),
                address: r.get(1),
                version: r.get(2),
                started_at: r.get(3),
                seen_at: r.get(4),
            })
            .collect())
    }

    /// The cluster's value of `key`: the one stored, or `mine` stored now if there is none.
    /// Servers agree on the client token this way.
    pub async fn shared(&self, key: &str, mine: &str) -> Result<String> {
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO cluster_settings(key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &mine],
        )
        .await?;
        let row = c.query_one("SELECT value FROM cluster_settings WHERE key = $1", &[&key]).await?;
        Ok(row.get(0))
    }
}

/// Checks, in `t`, that this server holds the lease under the fence's epoch, holding the lease
/// row until `t` ends; does nothing when the store is not a cluster server's.
pub(super) async fn check(t: &super::Tx<'_>, fence: &Fence) -> Result<()> {
    let Some((name, epoch)) = fence.armed() else { return Ok(()) };
    // First the lock (a takeover waits for it), then the lease, in a statement of its own: its
    // snapshot is taken after any takeover that was waited for committed. Both in one round
    // trip: PostgreSQL runs the second once the first is done.
    let lock = t.prepare("SELECT pg_advisory_xact_lock_shared($1)").await?;
    let lease = t
        .prepare(
            "SELECT 1 FROM lease WHERE id = 1 AND holder = $1 AND epoch = $2 \
             AND expires_at > clock_timestamp()",
        )
        .await?;
    let (lock_args, lease_args): (super::Args<'_, 1>, super::Args<'_, 2>) =
        ([&LEASE_LOCK], [&name, &epoch]);
    let (_, held) =
        tokio::try_join!(t.t.execute(&lock, &lock_args), t.t.query_opt(&lease, &lease_args))?;
    match held {
        Some(_) => Ok(()),
        None => Err(Error::Fenced),
    }
}
