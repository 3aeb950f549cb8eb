//! systemd's notify protocol (`Type=notify`, SPEC §12), through the `sd-notify` crate: a
//! datagram to the socket named by `NOTIFY_SOCKET`, which systemd sets for such a service.
//!
//! - `READY=1` once the daemon serves: the store is open, the token written and the listener
//!   accepting (a cluster's standby is ready once it relays to the lease holder);
//! - `STOPPING=1` when shutdown begins;
//! - `WATCHDOG=1` every half of `WatchdogSec=` (`WATCHDOG_USEC`), while the runtime runs: a
//!   daemon whose runtime is stuck stops sending, and systemd restarts it;
//! - `STATUS=…`: a line `systemctl status` shows.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call does nothing. A socket that cannot
//! be written is logged once per call and never stops the daemon. Limit: the crate connects to
//! filesystem sockets only, not to Linux abstract ones (`@name`), which systemd does not use
//! for services.

use tokio_util::sync::CancellationToken;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot tell systemd (NOTIFY_SOCKET)");
    }
}

/// The daemon serves; `status` says how (`systemctl status`).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new status line, the daemon still serving.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: ending active runs")]);
}

/// Sends `WATCHDOG=1` every half of the watchdog period systemd set, until `stop`; does
/// nothing without one.
pub fn keep_watchdog(stop: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let every = (period / 2).max(std::time::Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
                () = stop.cancelled() => return,
            }
        }
    });
}
