//! The daemon's heap: glibc's thresholds fixed for a server, and freed memory given back to
//! the system a second after large work is done.
//!
//! glibc moves its trim and map thresholds as a process goes. For a daemon that answers the
//! same large call over and over (a list of a thousand units is half a MiB of reply, which
//! jsonrpsee copies once) that means handing the pages back after every call and faulting
//! them in again at the next: a third of the call's time. [`tune`] fixes the thresholds so
//! an arena keeps up to [`KEEP_FREE`] of freed memory at its top and blocks below
//! [`MAP_FROM`] come from the arenas: enough for the replies of a thousand units, not so much
//! that a machine with many arenas keeps much (at most `KEEP_FREE` each; larger blocks are
//! mapped and unmapped on their own, as before).
//!
//! What is kept is not lost: whoever frees a lot at once (a connection with a large backlog
//! gone, a large message written) calls [`note_large_free`], and [`give_back_after_bursts`]
//! trims the whole heap a second later, once per burst. A client listing in a loop pays for
//! the page faults once a second, not at every call, and a daemon left alone returns to its
//! idle size.

use std::sync::LazyLock;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Freed memory an arena keeps at its top instead of handing it back at once.
pub const KEEP_FREE: usize = 2 << 20;

/// Blocks this large or larger get a mapping of their own (freed straight back).
pub const MAP_FROM: usize = 1 << 20;

/// How long a burst of large frees is given to end before the heap is trimmed.
const SETTLE: Duration = Duration::from_secs(1);

static LARGE_FREE: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Fixes glibc's thresholds (see the module documentation). Called once at start-up.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's allocation parameters; it has no preconditions.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREE as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MAP_FROM as libc::c_int);
    }
}

/// Gives the allocator's free pages back to the system, now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Says that a lot of memory was just freed (or is about to be): the heap is trimmed a
/// second later. Cheap enough to call for every large message.
pub fn note_large_free() {
    LARGE_FREE.notify_one();
}

/// Trims the heap [`SETTLE`] after each burst of [`note_large_free`], until `stop`.
pub async fn give_back_after_bursts(stop: CancellationToken) {
    loop {
        tokio::select! {
            () = LARGE_FREE.notified() => {}
            () = stop.cancelled() => return,
        }
        // Let the rest of the burst go too.
        tokio::select! {
            () = tokio::time::sleep(SETTLE) => {}
            () = stop.cancelled() => return,
        }
        tokio::task::spawn_blocking(trim);
    }
}
