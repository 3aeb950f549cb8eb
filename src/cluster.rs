//! A taskd server in a cluster (`--store postgres://…`): several servers, one database, one
//! of them at a time running the engine.
//!
//! Mechanism (the lease itself and the fence are in [`crate::store::Cluster`]):
//! - A server starts as a **standby**: it listens on its port and hands every connection to
//!   the lease holder, byte for byte ([`standby`]), so that clients and agents may talk to any
//!   server (the holder authenticates them, and every call, subscription and agent link is
//!   the holder's). Meanwhile it tries to take the lease every [`poll`] interval.
//! - The server that takes the lease becomes the **holder**: it starts the engine as a daemon
//!   starts after a restart (units loaded, dispatches and runs on agents taken over, missed
//!   fires made per `catch_up`), and serves its port itself. It renews the lease every third
//!   of its length ([`keep`]).
//! - A holder that cannot renew before its lease would run out has lost it: from that moment
//!   the store refuses it every new run (the fence), and it stops and exits with an error, so
//!   that its supervisor starts it again as a standby. On a clean shutdown it gives the lease
//!   up after its engine stopped, so a standby takes over at once.
//!
//! Limits: all calls and agents go through the holder (standbys only relay), so one server's
//! capacity bounds the cluster's; standbys relay to the holder's advertised address, which
//! must be reachable from them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::rpc::http::Peers;
use crate::store::Cluster;

/// How long a relayed connection waits for a holder to appear before it is closed.
const WAIT_FOR_HOLDER: Duration = Duration::from_secs(15);

/// How often a standby tries to take the lease: often enough that a dead holder is replaced
/// within the lease time and a little more.
pub fn poll(lease: Duration) -> Duration {
    (lease / 10).clamp(Duration::from_millis(100), Duration::from_millis(500))
}

/// The lease, taken: its epoch, and an instant no later than when it was taken (the lease
/// runs from then).
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    /// The lease's epoch.
    pub epoch: i64,
    /// Asked for no later than this.
    pub at: tokio::time::Instant,
}

/// Serves `listener` as a standby, relaying every connection to the holder, until this
/// server takes the lease or `shutdown` (None). Relayed connections live on in `relays` after
/// it returns, until either side closes. The lease is polled by a task of its own, so that
/// accepting never waits for the database.
pub async fn standby(
    cluster: &Cluster,
    own_address: &str,
    listener: &TcpListener,
    lease: Duration,
    max_connections: usize,
    shutdown: &CancellationToken,
    relays: &TaskTracker,
) -> Option<Taken> {
    let (holder_tx, holder_rx) = watch::channel(None::<String>);
    let (taken_tx, mut taken_rx) = tokio::sync::oneshot::channel();
    let own = own_address.to_string();
    let poller = tokio::spawn(poll_lease(cluster.clone(), lease, own, holder_tx, taken_tx));
    let _stop_poller = AbortOnDropHandle::new(poller);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            taken = &mut taken_rx => return taken.ok(),
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!("standby: too many relayed connections; one refused");
                    continue;
                };
                let holder = holder_rx.clone();
                let own = own_address.to_string();
                relays.spawn(async move {
                    relay(socket, holder, own).await;
                    drop(slot);
                });
            }
        }
    }
}

/// Tries to take the lease every [`poll`] interval (then publishes `own_address` as the
/// holder's); meanwhile publishes where the holder is:
/// `None` while there is none, or while the lease names this server (a holder restarted
/// within its lease waits for it to run out, and relays to nobody, itself least of all).
async fn poll_lease(
    cluster: Cluster,
    lease: Duration,
    own_address: String,
    holder: watch::Sender<Option<String>>,
    taken: tokio::sync::oneshot::Sender<Taken>,
) {
    let mut tick = tokio::time::interval(poll(lease));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_holder = String::new();
    loop {
        tick.tick().await;
        let at = tokio::time::Instant::now();
        match cluster.try_acquire(lease).await {
            Ok(Some(epoch)) => {
                // Connections waiting for a holder are this server's now.
                holder.send_replace(Some(own_address));
                let _ = taken.send(Taken { epoch, at });
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "standby: cannot reach the cluster's lease");
                continue;
            }
        }
        let address = match cluster.lease().await {
            Ok(Some(l)) if l.left > jiff::SignedDuration::ZERO && l.holder != cluster.name() => {
                if l.holder != last_holder {
                    tracing::info!(holder = %l.holder, address = ?l.address, epoch = l.epoch, "standby: the cluster's lease holder");
                    last_holder = l.holder.clone();
                }
                l.address
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "standby: cannot read the cluster's lease");
                continue;
            }
        };
        holder.send_if_modified(|a| {
            let changed = *a != address;
            *a = address;
            changed
        });
    }
}

/// How long a relayed connection's peer may leave keepalive probes unanswered before the
/// relay gives up on it: a holder that vanished without a word (partition, power cut) does
/// not hold a relay, and its slot, forever.
const RELAY_KEEPALIVE: Duration = Duration::from_secs(15);

fn keepalive(s: &TcpStream) {
    let sock = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(RELAY_KEEPALIVE / 3)
        .with_interval(RELAY_KEEPALIVE / 6);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(RELAY_KEEPALIVE));
    let _ = s.set_nodelay(true);
}

/// Relays `client` to the holder's address once one is known, byte for byte. A holder that
/// does not answer (it just died) is tried again when the address changes, for up to
/// [`WAIT_FOR_HOLDER`] in all. If this server takes the lease meanwhile, the connection goes
/// to its own port (`own`), where it is served now.
async fn relay(mut client: TcpStream, mut holder: watch::Receiver<Option<String>>, own: String) {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_HOLDER;
    let mut upstream = loop {
        let addr = match tokio::time::timeout_at(deadline, holder.wait_for(Option::is_some)).await {
            Ok(Ok(a)) => a.clone().expect("waited for an address"),
            // The standby ended without a holder (it is stopping).
            Ok(Err(_)) => own.clone(),
            Err(_) => return,
        };
        match TcpStream::connect(&addr).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "standby: cannot reach the holder; waiting for another");
                holder.mark_unchanged();
                // The address changes (another holder, or this server took the lease), or
                // this relay gives up.
                match tokio::time::timeout_at(deadline, holder.changed()).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
        }
    };
    keepalive(&client);
    keepalive(&upstream);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Renews the lease `taken` every third of `lease` until `stop`; when it cannot be renewed in
/// time, disarms the fence and cancels `lost`. Started as soon as the lease is taken, before
/// the engine: starting that may take longer than the lease.
pub async fn keep(
    cluster: Cluster,
    taken: Taken,
    lease: Duration,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    let (epoch, every) = (taken.epoch, lease / 3);
    // The lease was taken (or last renewed) no earlier than this.
    let mut valid_until = taken.at + lease;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        loop {
            let asked = tokio::time::Instant::now();
            // A renewal that does not answer in time counts as failed.
            let left = valid_until.saturating_duration_since(asked);
            match tokio::time::timeout(left, cluster.renew(epoch, lease)).await {
                Ok(Ok(true)) => {
                    valid_until = asked + lease;
                    break;
                }
                Ok(Ok(false)) => {
                    tracing::error!(epoch, "the cluster's lease was taken over: this server stops");
                    cluster.disarm();
                    lost.cancel();
                    return;
                }
                Ok(Err(e))
                    if tokio::time::Instant::now() + Duration::from_millis(200) < valid_until =>
                {
                    tracing::warn!(error = %e, "cannot renew the cluster's lease; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => {
                    tracing::error!(
                        epoch,
                        "the cluster's lease ran out before it could be renewed: this server stops"
                    );
                    cluster.disarm();
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// How often a server rereads the servers' addresses: a server that just joined is accepted
/// in `Host` headers within this long.
const PEERS_EVERY: Duration = Duration::from_millis(200);

/// Says this server is alive in `servers` every `every`, and keeps `peers` (the servers'
/// addresses) up to date, until `stop`.
pub async fn heartbeat(cluster: Cluster, every: Duration, peers: Peers, stop: CancellationToken) {
    let mut beat_due = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= beat_due {
            beat_due += every;
            if let Err(e) = cluster.heartbeat().await {
                tracing::debug!(error = %e, "cannot record this server's heartbeat");
            }
        }
        if let Ok(servers) = cluster.servers().await {
            let addresses = servers.into_iter().map(|s| s.address).collect();
            *peers.write().unwrap_or_else(std::sync::PoisonError::into_inner) = addresses;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PEERS_EVERY) => {}
        }
    }
}

/// Where other servers reach this one: `advertise` if given, else the listen address (with
/// the host name in place of an unspecified IP).
pub fn advertised(advertise: Option<&str>, local: SocketAddr) -> String {
    match advertise {
        Some(a) => a.to_string(),
        None if local.ip().is_unspecified() => {
            format!("{}:{}", crate::agent::host_name(), local.port())
        }
        None => local.to_string(),
    }
}
