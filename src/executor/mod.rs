//! Where runs execute. The unit loop decides *that* a run happens (schedules, overlap,
//! retries, restarts) and records it; an executor decides *how*: it runs the record it is
//! handed to its end, writes the output to the run's log as it comes, and hands the record
//! back with how it ended. What is the executing host's business stays behind this line: the
//! account a run uses, its environment, its script file, its working directory, the boot
//! and process ids it is recorded with, and stopping what a crashed daemon left running.
//!
//! [`local::LocalExecutor`] runs processes on this host through [`crate::exec`] (in the
//! daemon, and in every `taskd agent` for its own host). The remote executor
//! ([`crate::fleet::remote::RemoteExecutor`]) hands a run to an agent: it takes the same run
//! record, stop token, [`StopCause`] and [`OnStart`], and gives back the same record.

pub mod file;
pub mod local;
pub mod scripts;

use std::sync::{Arc, Mutex, PoisonError};

use jiff::Timestamp;

use crate::error::Result;
use crate::run::StopReason;
use crate::store::logs::{LogSummary, Stream};

pub use local::LocalExecutor;

/// Where an executor puts what its runs produce (their output, the fact of their start) and
/// gets what they need from their server (the content of a `file` unit).
/// The daemon's is its store (log files, the runs table: `impl RunSink for Store` in
/// [`local`]); an agent's is its outboxes, journal and connection to the server. So the
/// executor itself knows nothing of either.
pub trait RunSink: Clone + Send + Sync + 'static {
    /// Gets ready for `run`'s output, keeping at most `limit` bytes per stream.
    fn open(&self, run: i64, limit: u64) -> impl Future<Output = Result<()>> + Send;

    /// One chunk of `run`'s output, read at `at`. May wait: the run's pipes are not read
    /// meanwhile, so a slow sink slows the run down instead of losing output.
    fn write(
        &self,
        run: i64,
        stream: Stream,
        at: Timestamp,
        data: Vec<u8>,
    ) -> impl Future<Output = ()> + Send;

    /// `run`'s output has ended: what was written and kept.
    fn finish(&self, run: i64) -> impl Future<Output = LogSummary> + Send;

    /// `run`'s process started: its pid, when, its start time in clock ticks since boot and
    /// the boot's id, which a restarted daemon (or agent) needs to find it again. Not awaited.
    fn started(
        &self,
        run: i64,
        pid: u32,
        at: Timestamp,
        start_ticks: Option<u64>,
        boot_id: Option<String>,
    );

    /// At most `len` bytes, from `offset`, of the file the server keeps as `sha256`, for run
    /// `run` of a `file` unit (fewer only at its end, none past it).
    fn read_content(
        &self,
        run: i64,
        sha256: &str,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
}

/// Told once, when a run's process has started: its pid and when. Not told for a run that
/// never starts a process (it failed to start, or is a tick unit's).
pub type OnStart = Box<dyn FnOnce(u32, Timestamp) + Send>;

/// Why a run is being stopped: set by whoever stops it first (the unit loop on cancel, stop,
/// delete or replace; the executor on timeout), read by the executor once the run has ended.
/// Unset means the daemon is shutting down: a shutdown cancels every run through their
/// parent token, without a word.
#[derive(Debug, Clone, Default)]
pub struct StopCause(Arc<Mutex<Option<StopReason>>>);

impl StopCause {
    /// Records `reason`, unless a stop is already under way with its own (a timeout, say).
    pub fn set(&self, reason: StopReason) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(reason);
    }

    /// Whether a reason was given (unset: the daemon is shutting down).
    pub fn is_set(&self) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// Why the run was stopped.
    pub fn get(&self) -> StopReason {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).unwrap_or(StopReason::Shutdown)
    }
}
