//! Runs one command in its own process group, streams its output, notices its exit at once
//! and stops it (with every descendant in its group, and every process carrying its tag) on
//! request.
//!
//! # How exits are noticed
//!
//! The daemon is a child subreaper ([`become_subreaper`]), so orphaned grandchildren are
//! reparented to it and must be reaped by it. Per-pid waits (as `tokio::process` does) cannot
//! coexist with that, so one process-wide reaper thread listens to SIGCHLD and reaps *every*
//! exited child with `waitid(P_ALL)`. The statuses of the leaders we spawned are handed to their
//! [`Process`] through a `pid → oneshot` map; anything else is an orphan and simply reaped.
//!
//! **Architecture Invariant:** once a [`Process`] has been spawned, nothing else in the daemon
//! may wait for child processes (no `std::process::Command::status`, no `tokio::process`): the
//! reaper would steal their statuses.
//!
//! **Architecture Invariant:** a run's processes never outlive the run: [`Process::wait`]
//! returns only once the group is empty and no process carrying the run's tag is left (or they
//! have been sent SIGKILL).
//!
//! # Finding a run's processes
//!
//! A run is its own process group, but a descendant may leave the group (`setsid`, `setpgid`),
//! and the group then no longer reaches it. So a run can be *tagged* ([`Spec::tag`]): one
//! environment entry, say `TASKD_RUN_TAG=<daemon>-<run>`, that every descendant inherits. The
//! processes of a run are then its group plus every process whose `/proc/<pid>/environ` holds
//! that exact entry. The tag must be unique to the run across everything the daemon can see
//! (other daemons, other users when root), since whatever carries it is stopped with the run.
//!
//! Scanning all of `/proc` costs a read per process, so a run that ends on its own is scanned
//! only when it may have left something behind: its group still has members, or the daemon has a
//! child that is not a leader we track (a process orphaned by the run is reparented to the
//! daemon, the subreaper) and that child carries the tag (or cannot be read). That check reads
//! one `/proc/self/task/<pid>/children` file and the environment of untracked children only.
//! A run that is *stopped* is always scanned (to signal, then to check nothing is left). Those
//! scans are shared: one thread (`taskd-procscan`) walks /proc for every run that asked
//! before the walk started, so stopping N runs at once (a shutdown with thousands of running
//! services) costs a few walks, not N, and no walk blocks a runtime thread. (Recovery at
//! start still scans once per stale run, on a blocking thread.)
//!
//! Limits: `/proc/<pid>/environ` is the environment the process was *started* with, and only
//! readable for processes we may ptrace (a non-root daemon sees its own user's processes, not
//! setuid ones). A process that execs with a scrubbed environment (`env -i`), or that changes
//! user, escapes. Finding processes by tag also races with pid reuse, in a window of
//! microseconds between reading `/proc` and signalling. Putting each run in a cgroup (and
//! killing the cgroup) would be the complete answer; it needs a delegated cgroup subtree, which
//! a daemon started from a login shell does not have.
//!
//! # What children get
//!
//! Only what [`Spec`] says: its argv, environment and working directory, stdin `/dev/null`,
//! stdout and stderr piped, default signal dispositions and an empty signal mask. They also
//! get no file descriptor but 0, 1 and 2 and the umask the daemon was started with, which
//! takes [`process_hygiene`] at start:
//!
//! - Every descriptor from 3 up is marked close-on-exec (`close_range`), including any the
//!   daemon inherited from whoever started it; everything the daemon opens later is opened
//!   close-on-exec (std, tokio and SQLite all do).
//! - The daemon runs with umask 0077, so every file it or SQLite creates is private. A umask
//!   belongs to a thread's filesystem context (`fs_struct`, which also holds the working
//!   directory), shared by all the daemon's threads. Children must not get 0077, and
//!   `posix_spawn` has no way to set a umask, so every spawn happens on one thread,
//!   `taskd-spawner`, which gave itself a filesystem context of its own
//!   (`unshare(CLONE_FS)`) and set its umask back to the daemon's original one: a child
//!   created without `CLONE_FS` (`posix_spawn`'s clone, or a fork) copies the context of the
//!   thread that created it. Spawns were serialised anyway (the reaper's lock is held across
//!   each, see [`Process::spawn`]), so one thread costs no throughput; handing each spawn to it
//!   costs a few microseconds. Where `unshare` is refused (a seccomp filter), the child sets
//!   its umask before exec instead, which needs a fork of the daemon (about 5x slower).
//!
//! **Architecture Invariant:** every child is spawned on the spawner thread, and through
//! `posix_spawn` unless a `pre_exec` hook is needed (switching users, signals inherited as
//! ignored, or the fallback above): a fork copies the daemon's page tables, which at hundreds
//! of spawns a second is most of the cost.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{
    SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal, kill, killpg, sigaction,
    sigprocmask,
};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{Gid, Pid, Uid};
use tokio::net::unix::pipe;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::names::named_enum;

/// The search path used when the command's environment has no `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How much of a pipe is read at once.
const READ_BUF: usize = 64 * 1024;

/// How long the output readers may keep waiting for EOF once the process group is gone: a
/// member that escaped the group (setsid) may hold the pipe open forever.
const READER_GRACE: Duration = Duration::from_millis(100);

/// Once the readers have been told to finish, how much more they read before giving up: enough
/// for whatever the run left in a (possibly enlarged) pipe, bounded so that an escaped process
/// writing without pause cannot keep them going forever.
const FINISH_BUDGET: usize = 4 * 1024 * 1024;

/// How often the stop path checks whether the group is empty yet. Only stopping polls; exits
/// are noticed through SIGCHLD.
const GROUP_POLL: Duration = Duration::from_millis(15);

/// After SIGKILL, how long to wait for the group to disappear (killed processes still have to
/// be reaped by their parent) before returning anyway.
const KILL_SETTLE: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Program and arguments; `argv[0]` is looked up in the `PATH` of `env` if it has no '/'.
    pub argv: Vec<String>,
    /// The complete environment; nothing is inherited from the daemon.
    pub env: Vec<(String, String)>,
    /// The working directory.
    pub cwd: PathBuf,
    /// Run as this account (the daemon must be root).
    pub user: Option<User>,
    /// An environment entry `(KEY, VALUE)` that marks every process of the run, so that one
    /// that left the process group can still be found and stopped (see the module docs). It is
    /// put into the child's environment, replacing any other value of `KEY` in `env`. It must
    /// be unique to the run: every process carrying it is stopped when the run ends.
    pub tag: Option<(String, String)>,
}

/// An account to run as, resolved by [`User::lookup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The login name.
    pub name: String,
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// The supplementary groups (from `getgrouplist`, including the primary group).
    pub groups: Vec<u32>,
    /// The home directory.
    pub home: PathBuf,
    /// The login shell.
    pub shell: PathBuf,
}

impl User {
    /// Resolves an account by name or numeric uid, with its supplementary groups.
    ///
    /// This consults NSS, which may block; call it off the async threads where that matters.
    pub fn lookup(name: &str) -> io::Result<User> {
        let found = match name.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(Uid::from_raw(uid)),
            Err(_) => nix::unistd::User::from_name(name),
        }
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("user {name:?}: {e}")))?;
        let user = found.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no such user: {name:?}"))
        })?;
        let cname = CString::new(user.name.as_str()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("user {name:?}: NUL in name"))
        })?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid).map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("groups of user {name:?}: {e}"))
        })?;
        Ok(User {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups: groups.into_iter().map(Gid::as_raw).collect(),
            home: user.dir,
            shell: user.shell,
        })
    }
}

named_enum! {
    /// Which output pipe a chunk was read from; the same two streams all the way to the log
    /// and the wire.
    pub enum Stream("a stream") {
        /// Standard output.
        Stdout = "stdout",
        /// Standard error.
        Stderr = "stderr",
    }
}

/// A piece of output, as read from the pipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The pipe it came from.
    pub stream: Stream,
    /// The bytes, as read (not split on lines).
    pub data: Vec<u8>,
    /// When it was read.
    pub at: jiff::Timestamp,
}

/// How the process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Termination {
    /// It exited with this status code.
    Exited(i32),
    /// It was killed by this signal number.
    Signaled(i32),
}

/// The outcome of [`Process::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// How the leader ended.
    pub termination: Termination,
    /// We stopped it because the `stop` token was cancelled.
    pub stopped: bool,
    /// SIGKILL had to be sent to the group or a tagged process (SIGTERM was not enough within
    /// the grace period).
    pub killed: bool,
}

/// A running command: the leader of its own process group.
///
/// Call [`Process::wait`] to the end: dropping a `Process` neither stops nor waits for it.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    start_ticks: Option<u64>,
    exit: oneshot::Receiver<Termination>,
    /// The task reading stdout and stderr.
    reader: JoinHandle<()>,
    /// Tells the reader to stop waiting for EOF once the pipes are empty.
    finish: CancellationToken,
    /// The environment entry `KEY=VALUE` of [`Spec::tag`].
    tag: Option<Vec<u8>>,
}

impl Process {
    /// Spawns `spec` in a new process group (setpgid), stdin /dev/null, stdout and stderr piped.
    ///
    /// Output chunks are sent to `output` as they are read, by one task that reads both pipes.
    /// The pipes are always drained: a slow receiver is awaited (nothing is dropped), a
    /// receiver that is gone makes the reader discard. Must be called within a tokio runtime,
    /// whose tasks read the pipes.
    ///
    /// The child is spawned on the spawner thread (see the module docs), and gets no file
    /// descriptor but 0, 1 and 2 once [`process_hygiene`] has run.
    ///
    /// Errors name the program or directory at fault, e.g.
    /// `No such file or directory: "nonexistent-cmd"`.
    pub fn spawn(spec: &Spec, output: impl Output) -> io::Result<Process> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("exec::Process::spawn needs a tokio runtime"));
        }
        check_cwd(&spec.cwd)?;
        let program = resolve_program(spec)?;
        let argv0 = &spec.argv[0];

        let mut cmd = std::process::Command::new(&program);
        cmd.arg0(argv0)
            .args(&spec.argv[1..])
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // After `envs`, so that it replaces any other value of the key.
        if let Some((key, value)) = &spec.tag {
            cmd.env(key, value);
        }
        // Resolved before fork: the child may only make async-signal-safe calls.
        let ids = spec.user.as_ref().map(|u| Ids {
            uid: Uid::from_raw(u.uid),
            gid: Gid::from_raw(u.gid),
            groups: u.groups.iter().map(|&g| Gid::from_raw(g)).collect(),
        });
        // Without a pre_exec hook std spawns with posix_spawn (vfork-like, no page-table copy
        // of the daemon), which already empties the signal mask and resets SIGPIPE; the hook is
        // only needed to switch users or to undo signals the daemon inherited as ignored.
        if ids.is_some() || ignores_reset_signals() {
            // SAFETY: the closure runs in the forked child before exec; `child_setup` makes only
            // async-signal-safe calls (sigaction, sigprocmask, setgroups, setgid, setuid), does
            // not allocate, and only reads `ids`, which was built before the fork.
            unsafe {
                cmd.pre_exec(move || child_setup(ids.as_ref()));
            }
        }

        // On the spawner thread, for the children's umask (see the module docs).
        let Spawned { mut child, exit, start_ticks } = match spawn_on_spawner(cmd)? {
            Ok(spawned) => spawned,
            Err(e) => return Err(spawn_error(e, spec)),
        };
        let pid = child.id();

        let pipes = (child.stdout.take(), child.stderr.take());
        let finish = CancellationToken::new();
        let receivers = match pipes {
            (Some(stdout), Some(stderr)) => pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))
                .and_then(|out| {
                    Ok([Some(out), Some(pipe::Receiver::from_owned_fd(OwnedFd::from(stderr))?)])
                }),
            _ => Err(io::Error::other("stdout or stderr was not piped")),
        };
        let reader = match receivers {
            Ok(pipes) => tokio::spawn(pump(pipes, output, finish.clone())),
            Err(e) => {
                // Without readers the child could block on a full pipe forever: do not leave
                // it behind. The reaper collects it.
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                return Err(io::Error::new(e.kind(), format!("output pipes of {argv0:?}: {e}")));
            }
        };
        let tag = spec.tag.as_ref().map(|(key, value)| tag_entry(key, value));
        Ok(Process { pid, start_ticks, exit, reader, finish, tag })
    }

    /// The leader's pid, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When the leader started (field 22 of `/proc/<pid>/stat`, in clock ticks since boot),
    /// read right after spawn; `None` if it could not be read.
    pub fn start_ticks(&self) -> Option<u64> {
        self.start_ticks
    }

    /// Waits until the process exits, or until `stop` is cancelled; then sends SIGTERM to the
    /// whole group and every process carrying the tag, waits up to `grace`, and SIGKILLs what
    /// is left of them.
    ///
    /// If the leader exits on its own while other members of its group or tagged processes
    /// remain, they are stopped the same way. Returns once the leader has been reaped, the group
    /// and the tagged processes are gone and the output readers are finished (all output has
    /// been handed to the receiver).
    ///
    /// Not cancel-safe: dropping the future part-way may leave the group running. To stop a
    /// run, cancel `stop` and let `wait` finish.
    pub async fn wait(mut self, stop: CancellationToken, grace: Duration) -> Exit {
        let run = Members { pgid: Pid::from_raw(self.pid as i32), tag: self.tag.as_deref() };
        let mut stopped = false;
        let mut killed = false;
        let leader = tokio::select! {
            biased;
            t = &mut self.exit => Some(termination_of(t)),
            _ = stop.cancelled() => None,
        };
        let termination = match leader {
            Some(t) => {
                // Runs end by the thousand per second and almost never leave anything behind:
                // look through /proc only when the cheap checks say something may be left.
                if (group_alive(run.pgid) || run.may_have_escaped())
                    && let Some(tagged) = run.terminate().await
                    && !run.wait_gone(tagged, Instant::now() + grace).await
                {
                    killed = run.kill().await;
                }
                t
            }
            None => {
                stopped = true;
                let tagged = run.terminate().await.unwrap_or_default();
                let deadline = Instant::now() + grace;
                let leader = tokio::time::timeout_at(deadline, &mut self.exit).await.ok();
                let gone = match leader {
                    Some(_) => run.wait_gone(tagged, deadline).await,
                    None => false,
                };
                if !gone {
                    killed = run.kill().await;
                }
                match leader {
                    Some(t) => termination_of(t),
                    None => termination_of((&mut self.exit).await),
                }
            }
        };
        self.finish_readers().await;
        Exit { termination, stopped, killed }
    }

    /// Waits for the readers to reach EOF, but only [`READER_GRACE`]: a process that left the
    /// group may hold the pipes open. After that they drain what is left and stop.
    async fn finish_readers(&mut self) {
        let reader = &mut self.reader;
        let join = async move {
            if let Err(e) = reader.await {
                tracing::error!("output reader failed: {e}");
            }
        };
        tokio::pin!(join);
        if tokio::time::timeout(READER_GRACE, &mut join).await.is_err() {
            self.finish.cancel();
            join.await;
        }
    }
}

/// Marks the daemon a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so orphaned
/// grandchildren are reparented to it and reaped by the reaper.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Sends `sig` to process group `pgid`, but only if the process `pgid` is still the one that
/// started at `start_ticks` (field 22 of `/proc/<pgid>/stat`), or, if that leader is gone, to
/// the members of the group that started at or after `start_ticks`. Returns how many processes
/// were signalled.
///
/// Used at daemon start to kill the process groups of runs left over from a crashed daemon;
/// check [`boot_id`] first, as ticks from another boot mean nothing.
pub fn kill_stale_group(pgid: u32, start_ticks: u64, sig: Signal) -> usize {
    signal_stale_group(pgid, start_ticks, sig, &group_members(pgid))
}

/// [`kill_stale_group`] with the group's `members` (live processes) already found.
fn signal_stale_group(pgid: u32, start_ticks: u64, sig: Signal, members: &[Stat]) -> usize {
    if pgid <= 1 || pgid > i32::MAX as u32 {
        return 0;
    }
    match read_stat(pgid) {
        // The pid is in use by a different process: the kernel does not hand out a pid that is
        // still a process group id, so our old group is empty.
        Some(leader) if leader.start_ticks != start_ticks => 0,
        Some(_) => match killpg(Pid::from_raw(pgid as i32), sig) {
            Ok(()) => members.len().max(1),
            Err(_) => 0,
        },
        None => members
            .iter()
            .filter(|m| m.start_ticks >= start_ticks)
            .filter(|m| kill(Pid::from_raw(m.pid as i32), sig).is_ok())
            .count(),
    }
}

/// A run of a crashed daemon whose processes may still be alive: see [`kill_leftovers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Its process group, when the previous daemon recorded one in this boot.
    pub pgid: Option<u32>,
    /// When its process started (the group leader's start ticks), or, without a group, a
    /// time before it started: processes older than this are not the run's.
    pub since: u64,
    /// Its [`Spec::tag`].
    pub tag: (String, String),
}

/// Sends `sig` to the processes of each run a crashed daemon left: its process group
/// ([`kill_stale_group`]) and every process carrying its tag that started at or after
/// `since`, which finds those that left the group, and a run whose pid was never recorded
/// (the daemon died right after spawning it). Returns how many processes of each run were
/// signalled, in `runs`' order.
///
/// One walk of /proc serves every run: a daemon killed with a thousand services running finds
/// their processes in one pass at its next start, not a thousand. Used at daemon start; check
/// [`boot_id`] first. The start ticks keep a process that carries the tag from an earlier use
/// of it (an older daemon on the same state directory) out of reach.
pub fn kill_leftovers(runs: &[Leftover], sig: Signal) -> Vec<usize> {
    if runs.is_empty() {
        return Vec::new();
    }
    // One walk for the members of every group, one for the tags.
    let wanted: HashSet<u32> = runs.iter().filter_map(|r| r.pgid).collect();
    let mut members: HashMap<u32, Vec<Stat>> = HashMap::new();
    if !wanted.is_empty() {
        for s in all_stats().filter(|s| s.state != 'Z' && wanted.contains(&s.pgrp)) {
            members.entry(s.pgrp).or_default().push(s);
        }
    }
    let groups: Vec<usize> = runs
        .iter()
        .map(|r| {
            r.pgid.map_or(0, |g| {
                signal_stale_group(g, r.since, sig, members.get(&g).map_or(&[], Vec::as_slice))
            })
        })
        .collect();
    let mut keys: Vec<Vec<u8>> = runs.iter().map(|r| r.tag.0.as_bytes().to_vec()).collect();
    keys.sort();
    keys.dedup();
    let scan = scan_tags(keys);
    runs.iter()
        .zip(groups)
        .map(|(r, group)| {
            // Those in the group were signalled through it.
            let skip = r.pgid.filter(|_| group > 0);
            let tagged = scan.by_entry.get(&tag_entry(&r.tag.0, &r.tag.1)).map_or(0, |found| {
                found
                    .iter()
                    .filter(|t| t.start_ticks >= r.since)
                    .filter(|t| skip != Some(t.pgrp))
                    .filter(|t| kill(Pid::from_raw(t.pid as i32), sig).is_ok())
                    .count()
            });
            group + tagged
        })
        .collect()
}

/// The start-time value (`/proc/<pid>/stat` field 22: clock ticks since boot) of a process
/// started at `unix_secs`; `None` when that is before this boot.
pub fn ticks_since_boot(unix_secs: f64) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: f64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let since = unix_secs - btime;
    (since >= 0.0 && hz > 0).then_some((since * hz as f64) as u64)
}

/// The system boot id (`/proc/sys/kernel/random/boot_id`), so that pids and start ticks
/// recorded during another boot are never acted upon.
pub fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Signals a child must start with at their default action.
const RESET_SIGNALS: [Signal; 5] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGPIPE, Signal::SIGHUP, Signal::SIGQUIT];

/// Whether `sig` is ignored in this process.
fn is_ignored(sig: Signal) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null `act` only reads the current disposition into `old`.
    let rc = unsafe { libc::sigaction(sig as libc::c_int, std::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: sigaction succeeded, so it filled `old` (which started zeroed anyway).
    rc == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_IGN
}

/// Whether one of [`RESET_SIGNALS`] (other than SIGPIPE, which std resets itself) is ignored
/// — inherited under `nohup`, say. Exec keeps ignored signals ignored, so children then need
/// [`child_setup`], which costs a fork of the whole daemon: [`catch_ignored_signals`] avoids it.
fn ignores_reset_signals() -> bool {
    RESET_SIGNALS.iter().filter(|s| **s != Signal::SIGPIPE).any(|&sig| is_ignored(sig))
}

/// Replaces each of [`RESET_SIGNALS`] that this process inherited as ignored (under `nohup`,
/// or started with `&` from a script) with a handler that does nothing. The process goes on
/// ignoring them, but exec resets a handled signal to its default, so children start with
/// default signals and can be spawned with posix_spawn instead of a fork of the daemon.
/// Called once at start, before any spawn.
pub fn catch_ignored_signals() {
    extern "C" fn ignore(_: libc::c_int) {}
    for sig in RESET_SIGNALS.into_iter().filter(|s| *s != Signal::SIGPIPE) {
        if is_ignored(sig) {
            let act =
                SigAction::new(SigHandler::Handler(ignore), SaFlags::SA_RESTART, SigSet::empty());
            // SAFETY: the handler does nothing at all, so it is async-signal-safe.
            if let Err(e) = unsafe { sigaction(sig, &act) } {
                tracing::warn!(signal = %sig, error = %e, "cannot replace an ignored signal");
            }
        }
    }
}

/// Credentials to switch to in the child, resolved before fork.
struct Ids {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

/// Runs in the forked child before exec: only async-signal-safe calls, no allocation.
fn child_setup(ids: Option<&Ids>) -> io::Result<()> {
    // Handlers are reset by exec anyway, but ignored signals stay ignored: the child must not
    // inherit an ignored SIGTERM (it could not be stopped gracefully) or SIGPIPE.
    for sig in RESET_SIGNALS {
        // SAFETY: part of pre_exec; installing SIG_DFL runs no Rust code in a handler and
        // sigaction is async-signal-safe.
        unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) }?;
    }
    // The daemon's threads may block signals; the mask is inherited across exec.
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    if let Some(ids) = ids {
        // Groups and gid first: after setuid we would no longer be allowed to change them.
        nix::unistd::setgroups(&ids.groups)?;
        nix::unistd::setgid(ids.gid)?;
        nix::unistd::setuid(ids.uid)?;
    }
    Ok(())
}

fn check_cwd(cwd: &Path) -> io::Result<()> {
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("working directory {cwd:?} is not a directory"),
        )),
        Err(e) => Err(io::Error::new(e.kind(), format!("working directory {cwd:?}: {e}"))),
    }
}

/// Finds the program to exec. std reports exec failures with a bare errno, so the lookup is
/// done here, against the command's own `PATH`, to name what is missing.
fn resolve_program(spec: &Spec) -> io::Result<PathBuf> {
    let argv0 = match spec.argv.first() {
        Some(a) if !a.is_empty() => a,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command")),
    };
    if argv0.contains('/') {
        // Relative paths are relative to the command's working directory.
        let path = spec.cwd.join(argv0);
        return match std::fs::metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(io::Error::new(e.kind(), format!("{e}: {argv0:?}"))),
        };
    }
    let search =
        spec.env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    for dir in search.split(':') {
        // An empty PATH entry means the current directory.
        let dir = if dir.is_empty() { Path::new(".") } else { Path::new(dir) };
        let candidate = spec.cwd.join(dir).join(argv0);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("No such file or directory: {argv0:?} (not found in PATH {search:?})"),
    ))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn spawn_error(e: io::Error, spec: &Spec) -> io::Error {
    let argv0 = OsStr::new(&spec.argv[0]);
    let message = match &spec.user {
        Some(user) => format!("{e}: {argv0:?} (as user {:?})", user.name),
        None => format!("{e}: {argv0:?}"),
    };
    io::Error::new(e.kind(), message)
}

thread_local! {
    /// The read buffer of the runtime thread polling a reader: a pipe is read only once it is
    /// readable, into this, and what was read leaves as a chunk of its own size. A run waiting
    /// for output holds no buffer (a 64 KiB buffer per stream was 128 KiB per running run).
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF].into_boxed_slice());
}

/// Where a process's output goes, chunk by chunk, as it is read.
pub trait Output: Send + 'static {
    /// Takes one chunk. The pipes are not read while this is pending (a slow receiver slows
    /// the child down, it never loses output); false when the receiver is gone, after which
    /// output is read and discarded.
    fn send(&mut self, chunk: Chunk) -> impl Future<Output = bool> + Send;
}

impl Output for mpsc::Sender<Chunk> {
    async fn send(&mut self, chunk: Chunk) -> bool {
        mpsc::Sender::send(self, chunk).await.is_ok()
    }
}

/// Reads whichever of `pipes` is readable, taking turns so that a child that keeps one of
/// them full does not starve the other: which one, and what was read (empty at EOF).
fn poll_pipes(
    cx: &mut Context<'_>,
    pipes: &[Option<pipe::Receiver>; 2],
    turn: &mut usize,
) -> Poll<(usize, io::Result<Vec<u8>>)> {
    for k in 0..2 {
        let i = (*turn + k) % 2;
        let Some(pipe) = &pipes[i] else { continue };
        loop {
            match pipe.poll_read_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready((i, Err(e))),
                Poll::Ready(Ok(())) => {
                    let read = READ_SCRATCH
                        .with_borrow_mut(|buf| pipe.try_read(buf).map(|n| buf[..n].to_vec()));
                    match read {
                        // The readiness was stale and is now cleared: polling again registers
                        // for the next.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => {
                            *turn = i + 1;
                            return Poll::Ready((i, r));
                        }
                    }
                }
            }
        }
    }
    Poll::Pending
}

/// Reads stdout and stderr to EOF, sending what it reads: one task per run, holding no buffer
/// while the child is quiet. Never stops reading because of the receiver: a full pipe would
/// block the child.
async fn pump(
    mut pipes: [Option<pipe::Receiver>; 2],
    mut output: impl Output,
    finish: CancellationToken,
) {
    const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];
    let mut receiver_gone = false;
    let mut budget = FINISH_BUDGET;
    let mut turn = 0;
    while pipes.iter().any(Option::is_some) {
        // Reading first: once told to finish, keep going while data is there to be read.
        let (i, read) = tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| poll_pipes(cx, &pipes, &mut turn)) => r,
            _ = finish.cancelled() => break,
        };
        let stream = STREAMS[i];
        let data = match read {
            Ok(data) if data.is_empty() => {
                pipes[i] = None;
                continue;
            }
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(?stream, "reading command output: {e}");
                pipes[i] = None;
                continue;
            }
        };
        if finish.is_cancelled() {
            budget = budget.saturating_sub(data.len());
        }
        if !receiver_gone {
            // Awaited outside the select: a slow receiver delays us, it never loses data.
            receiver_gone = !output.send(Chunk { stream, data, at: jiff::Timestamp::now() }).await;
        }
        if budget == 0 {
            break;
        }
    }
}

/// The processes of one run: its process group and, if the run is tagged, every process that
/// carries the tag.
struct Members<'a> {
    pgid: Pid,
    /// `KEY=VALUE`, as it appears in `/proc/<pid>/environ`.
    tag: Option<&'a [u8]>,
}

impl Members<'_> {
    /// Asks the group and every tagged process to terminate. SIGCONT follows SIGTERM because a
    /// stopped process would only act on the SIGTERM once continued, and would otherwise always
    /// need SIGKILL. Returns the tagged processes signalled, or `None` if there was nothing at
    /// all to signal.
    async fn terminate(&self) -> Option<Vec<Stat>> {
        let group = killpg(self.pgid, Signal::SIGTERM).is_ok();
        let _ = killpg(self.pgid, Signal::SIGCONT);
        let tagged = self.signal_tagged(&[Signal::SIGTERM, Signal::SIGCONT]).await;
        (group || !tagged.is_empty()).then_some(tagged)
    }

    /// Sends `signals` to every process carrying the tag (a /proc scan, shared with the runs
    /// that ask at the same time); returns them.
    async fn signal_tagged(&self, signals: &[Signal]) -> Vec<Stat> {
        let Some(tag) = self.tag else { return Vec::new() };
        let found = shared_scan(tag).await;
        for process in &found {
            for &sig in signals {
                let _ = kill(Pid::from_raw(process.pid as i32), sig);
            }
        }
        found
    }

    /// Polls until the group is empty and the `tagged` processes are gone, or `deadline`
    /// passes; returns whether everything is gone.
    ///
    /// Only the known tagged pids are polled. Once they are gone, /proc is scanned once more:
    /// a process may have started another while it was terminating; any found is asked to
    /// terminate too and waited for.
    async fn wait_gone(&self, mut tagged: Vec<Stat>, deadline: Instant) -> bool {
        loop {
            if !group_alive(self.pgid) && tagged.iter().all(has_ended) {
                tagged = self.signal_tagged(&[Signal::SIGTERM, Signal::SIGCONT]).await;
                if tagged.is_empty() {
                    return true;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep_until(deadline.min(now + GROUP_POLL)).await;
        }
    }

    /// SIGKILLs the group and every tagged process, again and again until nothing is left (a
    /// tagged process may have been forking) or [`KILL_SETTLE`] passes: killed processes still
    /// have to be reaped by their parent. Returns whether SIGKILL was sent.
    async fn kill(&self) -> bool {
        let deadline = Instant::now() + KILL_SETTLE;
        let mut killed = false;
        loop {
            let group = killpg(self.pgid, Signal::SIGKILL).is_ok();
            let tagged = self.signal_tagged(&[Signal::SIGKILL]).await;
            if !group && tagged.is_empty() {
                return killed;
            }
            killed = true;
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    pgid = self.pgid.as_raw(),
                    tagged = tagged.len(),
                    "processes of a run still present after SIGKILL"
                );
                return killed;
            }
            tokio::time::sleep_until(deadline.min(now + GROUP_POLL)).await;
        }
    }

    /// Whether the run may have left a process outside its group, judged without scanning
    /// /proc. Once the leader and the group are gone, whatever is left of the run is the
    /// descendant of an orphan, and orphans are reparented to the daemon (the subreaper): so
    /// something is left only if the daemon has a child that is not a leader we track and that
    /// carries the tag (one that scrubbed its environment escapes a scan as well). Errs on the
    /// side of `true` when something cannot be read.
    fn may_have_escaped(&self) -> bool {
        let Some(tag) = self.tag else { return false };
        let Some(children) = main_thread_children() else { return true };
        if children.is_empty() {
            return false;
        }
        let untracked: Vec<u32> = {
            let waiters = lock_waiters();
            children
                .into_iter()
                .filter(|pid| waiters.as_ref().is_none_or(|w| !w.contains_key(pid)))
                .collect()
        };
        let mut buf = Vec::new();
        untracked.into_iter().any(|pid| match environ_has(pid, tag, &mut buf) {
            Ok(has) => has,
            // Gone meanwhile: nothing left to stop.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => false,
            Err(_) => true,
        })
    }
}

/// Whether any process is left in group `pgid` (a zombie leader not yet reaped counts).
fn group_alive(pgid: Pid) -> bool {
    killpg(pgid, None).is_ok()
}

/// Whether the process found as `process` runs no more: it is gone, a zombie, or its pid now
/// belongs to a process that started later.
fn has_ended(process: &Stat) -> bool {
    read_stat(process.pid).is_none_or(|s| s.state == 'Z' || s.start_ticks != process.start_ticks)
}

fn termination_of(received: Result<Termination, oneshot::error::RecvError>) -> Termination {
    received.unwrap_or_else(|_| {
        // Cannot happen while the reaper runs: it never drops a sender without sending.
        tracing::error!("the reaper dropped an exit status");
        Termination::Signaled(0)
    })
}

// ---------------------------------------------------------------------------------------------
// Process hygiene and the spawner thread
// ---------------------------------------------------------------------------------------------

/// The umask the daemon was started with, which children start with: recorded by
/// [`process_hygiene`] before it sets 0077 (or by the spawner thread, if it starts first).
static CHILD_UMASK: OnceLock<libc::mode_t> = OnceLock::new();

/// Process-wide set-up for a daemon that spawns children, done first thing at start (before
/// any file is created or child spawned; calling it again changes nothing):
///
/// - marks every file descriptor from 3 up close-on-exec, so that children inherit none of
///   those the daemon got from whoever started it;
/// - sets the umask to 0077, so that every file the daemon or SQLite creates is private,
///   while children still start with the umask the daemon was started with (module docs).
pub fn process_hygiene() {
    if let Err(e) = cloexec_from(3) {
        tracing::warn!(error = %e, "cannot mark inherited file descriptors close-on-exec; children may inherit them");
    }
    // SAFETY: umask only swaps the mask of this process's filesystem context; it cannot fail.
    let started_with = unsafe { libc::umask(0o077) };
    CHILD_UMASK.get_or_init(|| started_with);
}

/// Marks every file descriptor from `first` up close-on-exec: `close_range` (Linux 5.11),
/// else one `fcntl` per descriptor listed in `/proc/self/fd`.
fn cloexec_from(first: libc::c_uint) -> io::Result<()> {
    // SAFETY: with CLOSE_RANGE_CLOEXEC, close_range only sets a flag on open descriptors; it
    // takes no pointers.
    let rc = unsafe {
        libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC)
    };
    if rc == 0 {
        return Ok(());
    }
    // ENOSYS on older kernels, EINVAL where the flag is unknown, EPERM under some seccomp
    // filters.
    cloexec_by_listing(first)
}

/// The fallback of [`cloexec_from`]: lists `/proc/self/fd` whole first (the listing's own
/// descriptor is in it, and closed by the time the flags are set: `fcntl` then fails with
/// EBADF, which is ignored), then sets `FD_CLOEXEC` on each descriptor from `first` up.
fn cloexec_by_listing(first: libc::c_uint) -> io::Result<()> {
    let fds: Vec<libc::c_int> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd: &libc::c_int| fd >= 0 && fd as libc::c_uint >= first)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD and F_SETFD read and set the flags of a descriptor number; a number
        // that is not open gives EBADF and changes nothing.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// A spawned child, registered with the reaper.
struct Spawned {
    child: std::process::Child,
    exit: oneshot::Receiver<Termination>,
    start_ticks: Option<u64>,
}

/// A command for the spawner thread, and where to send what became of it.
struct SpawnJob {
    cmd: std::process::Command,
    reply: std::sync::mpsc::SyncSender<io::Result<Spawned>>,
}

/// The spawner thread's queue; `None` until the first spawn starts it.
static SPAWNER: Mutex<Option<std::sync::mpsc::Sender<SpawnJob>>> = Mutex::new(None);

/// Has the spawner thread spawn `cmd` and register it with the reaper; waits for it. The
/// outer error is about the machinery (the reaper or the spawner could not start), the inner
/// one is `cmd.spawn()`'s.
fn spawn_on_spawner(cmd: std::process::Command) -> io::Result<io::Result<Spawned>> {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let mut job = SpawnJob { cmd, reply };
    let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    let mut restarted = false;
    loop {
        let queue = match spawner.as_ref() {
            Some(queue) => queue,
            None => spawner.insert(start_spawner()?),
        };
        match queue.send(job) {
            Ok(()) => break,
            // The thread is gone (it panicked, which it should never do): start another once.
            Err(std::sync::mpsc::SendError(back)) if !restarted => {
                job = back;
                *spawner = None;
                restarted = true;
            }
            Err(_) => return Err(io::Error::other("the spawner thread keeps dying")),
        }
    }
    drop(spawner);
    answer.recv().map_err(|_| io::Error::other("the spawner thread died while spawning"))
}

/// Starts the reaper if it is not running yet, then the spawner thread, which gives itself a
/// filesystem context of its own with the children's umask and spawns whatever it is sent.
fn start_spawner() -> io::Result<std::sync::mpsc::Sender<SpawnJob>> {
    {
        let mut waiters = lock_waiters();
        if waiters.is_none() {
            start_reaper()?;
            *waiters = Some(HashMap::new());
        }
    }
    let (queue, jobs) = std::sync::mpsc::channel::<SpawnJob>();
    std::thread::Builder::new()
        .name("taskd-spawner".into())
        .spawn(move || {
            let own_umask = take_child_umask();
            for mut job in jobs {
                if !own_umask && let Some(&mask) = CHILD_UMASK.get() {
                    // SAFETY: runs in the forked child before exec; umask is async-signal-safe
                    // and the closure only copies `mask`.
                    unsafe {
                        job.cmd.pre_exec(move || {
                            libc::umask(mask);
                            Ok(())
                        });
                    }
                }
                // The caller may be gone only if it panicked; nothing to do then.
                let _ = job.reply.send(spawn_registered(&mut job.cmd));
            }
        })
        .map_err(|e| io::Error::new(e.kind(), format!("starting the spawner thread: {e}")))?;
    Ok(queue)
}

/// Gives the calling thread a filesystem context of its own and sets its umask to the one
/// children start with; returns whether that worked. Without it the thread shares the
/// daemon's umask (0077 once [`process_hygiene`] ran).
fn take_child_umask() -> bool {
    // SAFETY: unshare(CLONE_FS) only gives this thread its own copy of the root, working
    // directory and umask; it takes no pointers.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        let e = io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot give the spawner thread a umask of its own; children get theirs set after a fork of the daemon, which is slower");
        return false;
    }
    // SAFETY: from here on the umask is this thread's alone: reading it by setting it (umask
    // has no getter) affects no other thread.
    let current = unsafe { libc::umask(0o077) };
    let mask = *CHILD_UMASK.get_or_init(|| current);
    // SAFETY: as above.
    unsafe { libc::umask(mask) };
    true
}

/// Spawns `cmd` and registers it with the reaper, on the spawner thread.
fn spawn_registered(cmd: &mut std::process::Command) -> io::Result<Spawned> {
    // Held across spawn, map insert and reading /proc so that the reaper cannot reap the
    // child (and lose its status, or let its pid be reused) before it is registered.
    let mut guard = lock_waiters();
    let Some(waiters) = guard.as_mut() else {
        return Err(io::Error::other("the child reaper is not running"));
    };
    let child = cmd.spawn()?;
    let pid = child.id();
    let (tx, exit) = oneshot::channel();
    waiters.insert(pid, tx);
    let start_ticks = read_stat(pid).map(|s| s.start_ticks);
    Ok(Spawned { child, exit, start_ticks })
}

// ---------------------------------------------------------------------------------------------
// The reaper
// ---------------------------------------------------------------------------------------------

type Waiters = HashMap<u32, oneshot::Sender<Termination>>;

/// Leaders waiting for their status; `None` until the reaper has been started. Spawning and
/// reaping both hold this lock (see `spawn_registered`).
static WAITERS: Mutex<Option<Waiters>> = Mutex::new(None);

fn lock_waiters() -> MutexGuard<'static, Option<Waiters>> {
    // The map stays consistent even if a holder panicked: every operation is a single insert
    // or remove.
    WAITERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the reaper on a thread of its own, with its own small runtime, so that it outlives any
/// particular runtime (tests run many) and is never starved by busy workers. Returns once the
/// SIGCHLD listener is registered, so no exit can be missed by a later spawn.
fn start_reaper() -> io::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
    std::thread::Builder::new().name("taskd-reaper".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let sigchld = {
            let _enter = rt.enter();
            signal(SignalKind::child())
        };
        match sigchld {
            Ok(mut sigchld) => {
                let _ = ready_tx.send(Ok(()));
                rt.block_on(async move {
                    loop {
                        reap_children();
                        if sigchld.recv().await.is_none() {
                            break;
                        }
                    }
                });
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the reaper thread died while starting")))
        .map_err(|e| io::Error::new(e.kind(), format!("starting the child reaper: {e}")))
}

/// Reaps every exited child, handing the statuses of our leaders to their waiters.
fn reap_children() {
    let mut guard = lock_waiters();
    let Some(waiters) = guard.as_mut() else { return };
    loop {
        // Peek (WNOWAIT) and only then reap by pid: nix cannot represent every status (a death
        // by a real-time signal), and a status reaped but not decoded would be lost.
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::All, flags) {
            Ok(WaitStatus::Exited(pid, code)) => reap(waiters, pid, Termination::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                reap(waiters, pid, Termination::Signaled(sig as i32))
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(other) => {
                // Not asked for (no WSTOPPED/WCONTINUED); do not spin on it.
                tracing::warn!("unexpected child status {other:?}");
                break;
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EINVAL) => {
                if !reap_undecodable(waiters) {
                    break;
                }
            }
            Err(e) => {
                tracing::error!("waitid: {e}");
                break;
            }
        }
    }
}

fn reap(waiters: &mut Waiters, pid: Pid, termination: Termination) {
    if let Err(e) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        // EINVAL means reaped but not decodable; anything else is unexpected.
        if e != Errno::EINVAL {
            tracing::warn!(pid = pid.as_raw(), "waitpid: {e}");
        }
    }
    if let Some(tx) = waiters.remove(&(pid.as_raw() as u32)) {
        // The Process may have been dropped; its status is then of no interest.
        let _ = tx.send(termination);
    }
}

/// Reaps zombie children whose status nix cannot decode, reading the raw status from
/// `/proc/<pid>/stat` first. Returns whether any was found.
fn reap_undecodable(waiters: &mut Waiters) -> bool {
    let me = std::process::id();
    let zombies: Vec<Stat> = all_stats().filter(|s| s.ppid == me && s.state == 'Z').collect();
    for zombie in &zombies {
        let status = std::process::ExitStatus::from_raw(zombie.exit_code.unwrap_or(0));
        let termination = match (status.code(), status.signal()) {
            (Some(code), _) => Termination::Exited(code),
            (None, Some(sig)) => Termination::Signaled(sig),
            (None, None) => Termination::Signaled(0),
        };
        reap(waiters, Pid::from_raw(zombie.pid as i32), termination);
    }
    !zombies.is_empty()
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// The fields of `/proc/<pid>/stat` that we use.
#[derive(Clone, Copy, Debug)]
struct Stat {
    pid: u32,
    state: char,
    ppid: u32,
    pgrp: u32,
    start_ticks: u64,
    /// The status in `waitpid` form, once the process has exited (Linux 3.5+).
    exit_code: Option<i32>,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

fn parse_stat(pid: u32, text: &str) -> Option<Stat> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 of proc_pid_stat(5).
    let field = |n: usize| fields.get(n - 3).copied();
    Some(Stat {
        pid,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        pgrp: field(5)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
        exit_code: field(52).and_then(|f| f.parse().ok()),
    })
}

/// The pid of every process currently visible in /proc.
fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
}

/// Every process currently visible in /proc.
fn all_stats() -> impl Iterator<Item = Stat> {
    all_pids().filter_map(read_stat)
}

/// The environment entry that [`Spec::tag`] `(key, value)` puts into the run's processes.
fn tag_entry(key: &str, value: &str) -> Vec<u8> {
    format!("{key}={value}").into_bytes()
}

/// Whether `/proc/<pid>/environ` holds exactly `entry` (`KEY=VALUE`). `buf` is reused across
/// calls. A zombie's environment reads as empty.
fn environ_has(pid: u32, entry: &[u8], buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.clear();
    std::fs::File::open(format!("/proc/{pid}/environ"))?.read_to_end(buf)?;
    Ok(buf.split(|&b| b == 0).any(|e| e == entry))
}

/// Every live process but the daemon itself whose environment holds `entry`: a full /proc
/// scan. Processes we may not read are skipped.
fn tagged_processes(entry: &[u8]) -> Vec<Stat> {
    #[cfg(test)]
    tests::record_scan(entry);
    scan_tags(vec![tag_key(entry).to_vec()]).by_entry.remove(entry).unwrap_or_default()
}

/// The `KEY` of a `KEY=VALUE` tag entry.
fn tag_key(entry: &[u8]) -> &[u8] {
    entry.split(|&b| b == b'=').next().unwrap_or_default()
}

/// One /proc scan for tagged processes: when it started, the tag keys it looked for, and the
/// live processes carrying each `KEY=VALUE` entry of those keys.
struct TagScan {
    started: std::time::Instant,
    keys: Vec<Vec<u8>>,
    by_entry: HashMap<Vec<u8>, Vec<Stat>>,
}

/// Scans /proc on a thread of its own for every run that asks, one scan at a time: see
/// [`shared_scan`].
struct Scanner {
    /// Tag keys asked for since the current scan started.
    asked: Mutex<Vec<Vec<u8>>>,
    wake: std::sync::Condvar,
    /// The newest scan.
    scans: tokio::sync::watch::Sender<Option<Arc<TagScan>>>,
}

/// The scanner, started on first use; `None` if its thread could not be started.
fn scanner() -> Option<&'static Scanner> {
    static SCANNER: OnceLock<Option<&'static Scanner>> = OnceLock::new();
    *SCANNER.get_or_init(|| {
        let scanner: &'static Scanner = Box::leak(Box::new(Scanner {
            asked: Mutex::new(Vec::new()),
            wake: std::sync::Condvar::new(),
            scans: tokio::sync::watch::Sender::new(None),
        }));
        let spawned = std::thread::Builder::new().name("taskd-procscan".into()).spawn(move || {
            loop {
                let keys = {
                    let mut asked = scanner.asked.lock().unwrap_or_else(PoisonError::into_inner);
                    while asked.is_empty() {
                        asked = scanner.wake.wait(asked).unwrap_or_else(PoisonError::into_inner);
                    }
                    std::mem::take(&mut *asked)
                };
                scanner.scans.send_replace(Some(Arc::new(scan_tags(keys))));
            }
        });
        match spawned {
            Ok(_) => Some(scanner),
            Err(e) => {
                // Every caller then scans on its own (see `shared_scan`).
                tracing::error!("cannot start the /proc scanner thread: {e}");
                None
            }
        }
    })
}

/// What [`tagged_processes`] finds, from a scan that started after this call: one scan of
/// /proc serves every run that asked before it started. Stopping N runs at once (a shutdown
/// with thousands of services) then costs a few scans instead of N, each of which reads the
/// environment of every process, and no scan blocks a runtime thread.
async fn shared_scan(entry: &[u8]) -> Vec<Stat> {
    #[cfg(test)]
    tests::record_scan(entry);
    let key = tag_key(entry);
    let Some(s) = scanner() else { return tagged_processes(entry) };
    let mut scans = s.scans.subscribe();
    let asked = std::time::Instant::now();
    {
        let mut keys = s.asked.lock().unwrap_or_else(PoisonError::into_inner);
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_vec());
        }
        s.wake.notify_one();
    }
    loop {
        let found = scans.borrow_and_update().as_ref().and_then(|scan| {
            (scan.started >= asked && scan.keys.iter().any(|k| k == key))
                .then(|| scan.by_entry.get(entry).cloned().unwrap_or_default())
        });
        if let Some(found) = found {
            return found;
        }
        if scans.changed().await.is_err() {
            return tagged_processes(entry);
        }
    }
}

/// Walks /proc once: the live processes (but the daemon) whose environment has one of `keys`,
/// by their `KEY=VALUE` entry.
fn scan_tags(keys: Vec<Vec<u8>>) -> TagScan {
    let started = std::time::Instant::now();
    let me = std::process::id();
    let prefixes: Vec<Vec<u8>> = keys.iter().map(|k| [k.as_slice(), b"="].concat()).collect();
    let mut buf = Vec::new();
    let mut by_entry: HashMap<Vec<u8>, Vec<Stat>> = HashMap::new();
    #[cfg(test)]
    tests::WALKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for pid in all_pids().filter(|&pid| pid != me) {
        buf.clear();
        let read = std::fs::File::open(format!("/proc/{pid}/environ"))
            .and_then(|mut f| f.read_to_end(&mut buf));
        if read.is_err() {
            continue;
        }
        let entries: Vec<&[u8]> =
            buf.split(|&b| b == 0).filter(|e| prefixes.iter().any(|p| e.starts_with(p))).collect();
        if entries.is_empty() {
            continue;
        }
        let Some(stat) = read_stat(pid).filter(|s| s.state != 'Z') else { continue };
        for entry in entries {
            by_entry.entry(entry.to_vec()).or_default().push(stat);
        }
    }
    TagScan { started, keys, by_entry }
}

/// The children of the daemon's main thread, from `/proc/self/task/<pid>/children`; `None` if
/// the kernel has no such file (`CONFIG_PROC_CHILDREN`).
///
/// A child is listed under the thread that forked it, so this misses leaders spawned by other
/// threads, which is fine: they are tracked anyway. What matters is that an orphan is
/// reparented to the first live thread of the subreaper (`find_new_reaper` in kernel/exit.c),
/// which is the main thread while the daemon runs. Reading one file instead of one per thread
/// keeps this check at a few microseconds.
fn main_thread_children() -> Option<Vec<u32>> {
    let path = format!("/proc/self/task/{}/children", std::process::id());
    let mut text = String::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text)).ok()?;
    Some(text.split_ascii_whitespace().filter_map(|p| p.parse::<u32>().ok()).collect())
}

/// The live (non-zombie) members of process group `pgid`.
fn group_members(pgid: u32) -> Vec<Stat> {
    all_stats().filter(|s| s.pgrp == pgid && s.state != 'Z').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    fn setup() {
        // Orphans must be reaped by us, not by a container init that may not reap at all.
        become_subreaper().unwrap();
    }

    fn spec(argv: &[&str]) -> Spec {
        Spec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: PathBuf::from("/"),
            user: None,
            tag: None,
        }
    }

    fn sh(script: &str) -> Spec {
        spec(&["sh", "-c", script])
    }

    /// The tag entries of every full /proc scan so far, so a test can tell whether its own
    /// (unique) tag was scanned for while other tests run alongside.
    static SCANNED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// Walks of /proc made by the shared scanner.
    pub(super) static WALKS: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    pub(super) fn record_scan(entry: &[u8]) {
        SCANNED.lock().unwrap_or_else(PoisonError::into_inner).push(entry.to_vec());
    }

    fn scanned_for(spec: &Spec) -> bool {
        let (key, value) = spec.tag.as_ref().unwrap();
        let entry = tag_entry(key, value);
        SCANNED.lock().unwrap_or_else(PoisonError::into_inner).contains(&entry)
    }

    /// `sh -c script` with a tag unique to this test process and call: tests run in parallel,
    /// and so may other test binaries, so a shared tag would stop their processes.
    fn tagged_sh(script: &str) -> Spec {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut spec = sh(script);
        spec.tag = Some(("TASKD_TEST_TAG".into(), format!("{}-{n}", std::process::id())));
        spec
    }

    /// A script that starts `sleep 1000` in a session of its own, writes its pid to `pid_file`
    /// and waits until it has left the group; then runs `rest`.
    fn escapee_script(pid_file: &Path, rest: &str) -> String {
        let f = pid_file.display();
        format!(
            "(setsid sleep 1000 & echo $! > {f}); p=$(cat {f}); \
             until [ \"$(cut -d' ' -f5 /proc/$p/stat)\" = \"$p\" ]; do sleep 0.01; done; {rest}"
        )
    }

    fn read_pid(pid_file: &Path) -> u32 {
        std::fs::read_to_string(pid_file).unwrap().trim().parse().unwrap()
    }

    /// A tagged run whose command leaves a setsid escapee, then prints `ready` (as `rest`
    /// says) and goes on with `rest`. Returns once `ready` is read: the run's spec and
    /// process, the escapee's pid, and the directory holding its pid file.
    async fn spawn_with_escapee(rest: &str) -> (Spec, Process, u32, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let spec = tagged_sh(&escapee_script(&pid_file, rest));
        let (tx, mut rx) = mpsc::channel(16);
        let process = Process::spawn(&spec, tx).unwrap();
        assert_eq!(rx.recv().await.unwrap().data, b"ready\n");
        let escapee = read_pid(&pid_file);
        (spec, process, escapee, dir)
    }

    /// Spawns `spec` with a collector that gathers every chunk until the readers are done.
    fn start(spec: &Spec) -> (Process, JoinHandle<Vec<Chunk>>) {
        let (tx, mut rx) = mpsc::channel(16);
        let process = Process::spawn(spec, tx).unwrap();
        let collector = tokio::spawn(async move {
            let mut chunks = Vec::new();
            while let Some(chunk) = rx.recv().await {
                chunks.push(chunk);
            }
            chunks
        });
        (process, collector)
    }

    fn text(chunks: &[Chunk], stream: Stream) -> String {
        let bytes: Vec<u8> =
            chunks.iter().filter(|c| c.stream == stream).flat_map(|c| c.data.clone()).collect();
        String::from_utf8(bytes).unwrap()
    }

    /// Polls `cond` until it holds, panicking after a generous deadline.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + LONG;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Gone, or a zombie about to be reaped: in either case it runs no more.
    fn is_gone(pid: u32) -> bool {
        read_stat(pid).is_none_or(|s| s.state == 'Z')
    }

    fn comms(pids: &[Stat]) -> Vec<String> {
        pids.iter()
            .map(|s| {
                std::fs::read_to_string(format!("/proc/{}/comm", s.pid))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .collect()
    }

    async fn wait_normally(process: Process) -> Exit {
        process.wait(CancellationToken::new(), LONG).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn separates_stdout_and_stderr() {
        setup();
        let (process, collector) = start(&sh("echo hi; echo err >&2"));
        let exit = wait_normally(process).await;
        assert_eq!(
            exit,
            Exit { termination: Termination::Exited(0), stopped: false, killed: false }
        );
        let chunks = collector.await.unwrap();
        assert_eq!(text(&chunks, Stream::Stdout), "hi\n");
        assert_eq!(text(&chunks, Stream::Stderr), "err\n");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reports_exit_codes_and_signals() {
        setup();
        let (process, _) = start(&sh("exit 3"));
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(3));
        let (process, _) = start(&sh("kill -9 $$"));
        assert_eq!(wait_normally(process).await.termination, Termination::Signaled(9));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reports_deaths_by_real_time_signals() {
        setup();
        // nix cannot decode these statuses; the raw status comes from /proc instead.
        let sig = libc::SIGRTMIN() + 6;
        let (process, _) = start(&sh(&format!("kill -{sig} $$")));
        assert_eq!(wait_normally(process).await.termination, Termination::Signaled(sig));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn many_concurrent_runs_all_report() {
        setup();
        let runs: Vec<_> = (0..40)
            .map(|i| {
                let (process, _) = start(&sh(&format!("exit {i}")));
                tokio::spawn(wait_normally(process))
            })
            .collect();
        for (i, run) in runs.into_iter().enumerate() {
            assert_eq!(run.await.unwrap().termination, Termination::Exited(i as i32));
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn notices_exit_at_once() {
        setup();
        let started = std::time::Instant::now();
        let (process, _) = start(&spec(&["true"]));
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
        // A loose sanity bound: the exit comes through SIGCHLD, not a polling interval.
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn passes_env_cwd_and_signal_state() {
        setup();
        let dir = tempfile::tempdir().unwrap();
        let mut spec =
            sh("echo \"$FOO\" \"$HOME\"; pwd; grep -E '^Sig(Blk|Ign)' /proc/self/status");
        spec.env.push(("FOO".into(), "bar".into()));
        spec.cwd = dir.path().to_owned();
        let (process, collector) = start(&spec);
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
        let out = text(&collector.await.unwrap(), Stream::Stdout);
        let mut lines = out.lines();
        // Nothing of the daemon's environment leaks: HOME is unset.
        assert_eq!(lines.next(), Some("bar "));
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(lines.next(), Some(cwd.to_str().unwrap()));
        assert_eq!(lines.next(), Some("SigBlk:\t0000000000000000"));
        // SIGPIPE (13) is bit 12, SIGTERM (15) bit 14, SIGINT (2) bit 1: none is ignored.
        let ignored =
            u64::from_str_radix(lines.next().unwrap().trim_start_matches("SigIgn:\t"), 16).unwrap();
        assert_eq!(ignored & (1 << 12 | 1 << 14 | 1 << 1), 0, "ignored: {ignored:x}");
    }

    /// Spawns `script`, waits until its group holds `sleeps` sleep processes, stops it and
    /// checks that every process that was in the group is gone.
    async fn stop_and_check(script: &str, sleeps: usize) {
        let (process, _) = start(&sh(script));
        let pgid = process.pid();
        let mut members = Vec::new();
        eventually("the sleeps to start", || {
            members = group_members(pgid);
            comms(&members).iter().filter(|c| *c == "sleep").count() == sleeps
        })
        .await;
        let stop = CancellationToken::new();
        stop.cancel();
        let exit = process.wait(stop, LONG).await;
        assert!(exit.stopped);
        assert!(!exit.killed, "SIGTERM should have been enough");
        assert_eq!(exit.termination, Termination::Signaled(15));
        assert!(!group_alive(Pid::from_raw(pgid as i32)), "the group outlived the stop");
        for member in &members {
            eventually("the group's members to be gone", || is_gone(member.pid)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn runs_stopped_together_share_their_proc_walks() {
        setup();
        const RUNS: usize = 24;
        let runs: Vec<Process> =
            (0..RUNS).map(|_| start(&tagged_sh("exec sleep 1000")).0).collect();
        for p in &runs {
            let pid = p.pid();
            eventually("the sleep to start", || comms(&group_members(pid)) == ["sleep"]).await;
        }
        let before = WALKS.load(std::sync::atomic::Ordering::Relaxed);
        let stop = CancellationToken::new();
        stop.cancel();
        let waits: Vec<_> =
            runs.into_iter().map(|p| tokio::spawn(p.wait(stop.clone(), LONG))).collect();
        for w in waits {
            assert!(w.await.unwrap().stopped);
        }
        // Each stop asks for a scan to signal and one to check: 2 × RUNS walks unshared. Other
        // tests running alongside may add a few of their own.
        let walks = WALKS.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(walks < RUNS, "{RUNS} runs stopped together walked /proc {walks} times");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stop_kills_background_children() {
        setup();
        stop_and_check("sleep 1000 & sleep 1000 & wait", 2).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stop_kills_double_forked_grandchildren() {
        setup();
        stop_and_check("(sleep 1000 &) ; sleep 1000", 2).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sigkills_what_ignores_sigterm() {
        setup();
        let (process, collector) = start(&sh("trap '' TERM; echo ready; sleep 1000"));
        let (pid, mut collector) = (process.pid(), collector);
        // Wait for the trap to be set before stopping, else SIGTERM would simply work.
        eventually("the trap to be set", || {
            group_members(pid).iter().any(|m| comms(&[*m]) == ["sleep"])
        })
        .await;
        let stop = CancellationToken::new();
        stop.cancel();
        let exit = process.wait(stop, Duration::from_millis(200)).await;
        assert_eq!(
            exit,
            Exit { termination: Termination::Signaled(9), stopped: true, killed: true }
        );
        assert!(!group_alive(Pid::from_raw(pid as i32)));
        assert_eq!(text(&(&mut collector).await.unwrap(), Stream::Stdout), "ready\n");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stop_terminates_a_stopped_process_without_sigkill() {
        setup();
        let (process, _) = start(&spec(&["sleep", "1000"]));
        let pid = process.pid();
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        eventually("the process to stop", || read_stat(pid).is_some_and(|s| s.state == 'T')).await;
        let stop = CancellationToken::new();
        stop.cancel();
        let exit = process.wait(stop, LONG).await;
        assert_eq!(
            exit,
            Exit { termination: Termination::Signaled(15), stopped: true, killed: false }
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn normal_exit_stops_lingering_members() {
        setup();
        let (process, collector) = start(&sh("sleep 1000 & echo $!"));
        let pgid = process.pid();
        let exit = wait_normally(process).await;
        assert_eq!(
            exit,
            Exit { termination: Termination::Exited(0), stopped: false, killed: false }
        );
        assert!(!group_alive(Pid::from_raw(pgid as i32)));
        let sleep: u32 = text(&collector.await.unwrap(), Stream::Stdout).trim().parse().unwrap();
        eventually("the background sleep to be gone", || is_gone(sleep)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_escaped_process_holding_the_pipe_does_not_block_wait() {
        setup();
        let (process, collector) = start(&sh("setsid sleep 1000 & echo $!"));
        let exit = wait_normally(process).await;
        assert_eq!(exit.termination, Termination::Exited(0));
        let escaped: u32 = text(&collector.await.unwrap(), Stream::Stdout).trim().parse().unwrap();
        // It left our group, so it is not ours to stop; clean up after the test.
        let _ = kill(Pid::from_raw(escaped as i32), Signal::SIGKILL);
        eventually("the escaped sleep to be gone", || is_gone(escaped)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stop_kills_tagged_processes_that_left_the_group() {
        setup();
        let (_spec, process, escapee, _dir) = spawn_with_escapee("echo ready; sleep 1000").await;
        assert_ne!(read_stat(escapee).unwrap().pgrp, process.pid());
        let stop = CancellationToken::new();
        stop.cancel();
        let exit = process.wait(stop, LONG).await;
        assert_eq!(
            exit,
            Exit { termination: Termination::Signaled(15), stopped: true, killed: false }
        );
        assert!(is_gone(escapee), "the escapee outlived the stop");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_normal_exit_kills_tagged_processes_left_behind() {
        setup();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let spec = tagged_sh(&escapee_script(&pid_file, "true"));
        let (process, _) = start(&spec);
        let exit = wait_normally(process).await;
        assert_eq!(
            exit,
            Exit { termination: Termination::Exited(0), stopped: false, killed: false }
        );
        assert!(is_gone(read_pid(&pid_file)), "the escapee outlived the run");
        assert!(scanned_for(&spec));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_run_that_leaves_nothing_behind_is_not_scanned_for() {
        setup();
        // Another run's escapee is an untracked child of ours meanwhile, but not tagged as ours.
        let (_, other, other_escapee, _dir) = spawn_with_escapee("echo ready; sleep 1000").await;
        let spec = tagged_sh("true");
        let (process, _) = start(&spec);
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
        assert!(!scanned_for(&spec), "a run that left nothing behind was scanned for");
        let stop = CancellationToken::new();
        stop.cancel();
        other.wait(stop, LONG).await;
        assert!(is_gone(other_escapee));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_tag_replaces_a_value_from_the_environment() {
        setup();
        let mut spec = tagged_sh("echo \"$TASKD_TEST_TAG\"");
        spec.env.push(("TASKD_TEST_TAG".into(), "forged".into()));
        let (process, collector) = start(&spec);
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
        let value = &spec.tag.as_ref().unwrap().1;
        assert_eq!(text(&collector.await.unwrap(), Stream::Stdout), format!("{value}\n"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn drains_large_output_for_a_slow_receiver() {
        setup();
        const SIZE: usize = 2 * 1024 * 1024;
        let (tx, mut rx) = mpsc::channel(1);
        let process =
            Process::spawn(&spec(&["head", "-c", &SIZE.to_string(), "/dev/zero"]), tx).unwrap();
        let receiver = tokio::spawn(async move {
            let mut total = 0;
            while let Some(chunk) = rx.recv().await {
                assert_eq!(chunk.stream, Stream::Stdout);
                total += chunk.data.len();
                // Slower than the pipe, so data is still pending when `head` exits.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            total
        });
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
        assert_eq!(receiver.await.unwrap(), SIZE);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn keeps_draining_when_the_receiver_is_gone() {
        setup();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let process = Process::spawn(&spec(&["head", "-c", "1048576", "/dev/zero"]), tx).unwrap();
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn spawn_errors_name_what_is_missing() {
        setup();
        let (tx, _rx) = mpsc::channel(1);
        let err = Process::spawn(&spec(&["nonexistent-cmd"]), tx.clone()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("\"nonexistent-cmd\""), "{err}");

        let err = Process::spawn(&spec(&["./nonexistent-cmd"]), tx.clone()).unwrap_err();
        assert!(err.to_string().contains("\"./nonexistent-cmd\""), "{err}");

        let mut missing_cwd = spec(&["true"]);
        missing_cwd.cwd = PathBuf::from("/nonexistent-dir");
        let err = Process::spawn(&missing_cwd, tx.clone()).unwrap_err();
        assert!(err.to_string().contains("\"/nonexistent-dir\""), "{err}");

        // Found in PATH but not executable.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("script"), "#!/bin/sh\n").unwrap();
        let err =
            Process::spawn(&spec(&[dir.path().join("script").to_str().unwrap()]), tx).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("script"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn kill_stale_group_checks_start_ticks() {
        setup();
        let (process, _) = start(&spec(&["sleep", "1000"]));
        let (pid, ticks) = (process.pid(), process.start_ticks().unwrap());
        assert_eq!(kill_stale_group(pid, ticks + 1, Signal::SIGKILL), 0);
        assert!(group_alive(Pid::from_raw(pid as i32)));
        assert_eq!(kill_stale_group(pid, ticks, Signal::SIGKILL), 1);
        assert_eq!(wait_normally(process).await.termination, Termination::Signaled(9));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn kill_stale_group_without_its_leader() {
        setup();
        let (tx, mut rx) = mpsc::channel(16);
        let process = Process::spawn(&sh("sleep 1000 & echo $!"), tx).unwrap();
        let (pgid, ticks) = (process.pid(), process.start_ticks().unwrap());
        let sleep: u32 =
            String::from_utf8(rx.recv().await.unwrap().data).unwrap().trim().parse().unwrap();
        // The leader is reaped as soon as it exits, even though nobody waits on the Process.
        eventually("the leader to be reaped", || read_stat(pgid).is_none()).await;
        assert_eq!(kill_stale_group(pgid, ticks, Signal::SIGKILL), 1);
        eventually("the member to be gone", || is_gone(sleep)).await;
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
    }

    #[test]
    fn ticks_since_boot_matches_proc_start_times() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let mine = read_stat(std::process::id()).unwrap().start_ticks;
        let ticks = ticks_since_boot(now).expect("this boot");
        assert!(ticks >= mine, "{ticks} < {mine}");
        assert!(ticks_since_boot(0.0).is_none(), "1970 is before this boot");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn kill_leftovers_finds_processes_by_group_and_tag_in_one_walk() {
        setup();
        // "ready" only once the leader's own `sleep` exists, so that all three can be counted.
        let (spec, process, escapee, _dir) =
            spawn_with_escapee("sleep 1000 & echo ready; wait").await;
        let (pgid, ticks) = (process.pid(), process.start_ticks().unwrap());
        let tag = spec.tag.clone().unwrap();
        let run = |pgid, since| Leftover { pgid, since, tag: tag.clone() };
        // Other runs, never started, whose tags nothing carries.
        let others: Vec<Leftover> = (0..19)
            .map(|i| Leftover { tag: (tag.0.clone(), format!("no-such-run-{i}")), ..run(None, 0) })
            .collect();
        // Recorded as started later than they did: none of them is the lost run's.
        let late = [others.clone(), vec![run(Some(pgid), u64::MAX)]].concat();
        assert!(kill_leftovers(&late, Signal::SIGKILL).iter().all(|&n| n == 0));
        assert!(!is_gone(escapee));
        // The leader, its `sleep 1000` and the escapee; the twenty runs in one walk (other
        // tests running alongside may add a few of their own).
        let walks = WALKS.load(std::sync::atomic::Ordering::Relaxed);
        let runs = [others, vec![run(Some(pgid), ticks)]].concat();
        let killed = kill_leftovers(&runs, Signal::SIGKILL);
        assert_eq!(killed[..19], [0; 19]);
        assert_eq!(killed[19], 3);
        let walks = WALKS.load(std::sync::atomic::Ordering::Relaxed) - walks;
        assert!(walks < 10, "20 leftover runs walked /proc {walks} times");
        assert_eq!(wait_normally(process).await.termination, Termination::Signaled(9));
        eventually("the escapee to be gone", || is_gone(escapee)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn runs_as_another_user() {
        setup();
        if !Uid::effective().is_root() {
            return;
        }
        let nobody = User::lookup("nobody").unwrap();
        assert_eq!(User::lookup(&nobody.uid.to_string()).unwrap(), nobody);
        let mut spec = sh("id -u; id -g");
        spec.user = Some(nobody.clone());
        let (process, collector) = start(&spec);
        assert_eq!(wait_normally(process).await.termination, Termination::Exited(0));
        let out = text(&collector.await.unwrap(), Stream::Stdout);
        assert_eq!(out, format!("{}\n{}\n", nobody.uid, nobody.gid));
    }

    #[test]
    fn descriptors_from_a_number_up_are_marked_close_on_exec() {
        let flags = |fd| {
            // SAFETY: F_GETFD only reads a descriptor's flags.
            unsafe { libc::fcntl(fd, libc::F_GETFD) }
        };
        let file = std::fs::File::open("/dev/null").unwrap();
        for (how, mark) in [
            ("close_range", cloexec_from as fn(libc::c_uint) -> io::Result<()>),
            ("listing /proc/self/fd", cloexec_by_listing),
        ] {
            // A copy without close-on-exec, numbered above what the rest of the tests use.
            // SAFETY: F_DUPFD duplicates an open descriptor; the copy is closed below.
            let fd =
                unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_DUPFD, 900) };
            assert!(fd >= 900, "F_DUPFD: {}", io::Error::last_os_error());
            assert_eq!(flags(fd) & libc::FD_CLOEXEC, 0);
            mark(fd as libc::c_uint).unwrap();
            assert_eq!(flags(fd) & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "{how}");
            // SAFETY: `fd` is ours and closed once.
            unsafe { libc::close(fd) };
        }
    }

    #[test]
    fn lookup_errors() {
        let err = User::lookup("no-such-user-here").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no-such-user-here"));
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        let mut fields = vec!["S", "1", "42", "42"];
        fields.extend(std::iter::repeat_n("0", 15)); // fields 7 to 21
        fields.push("12345"); // field 22
        let text = format!("42 (a) (b c) {}\n", fields.join(" "));
        let stat = parse_stat(42, &text).unwrap();
        assert_eq!((stat.state, stat.ppid, stat.pgrp, stat.start_ticks), ('S', 1, 42, 12345));
        assert_eq!(stat.exit_code, None);
    }

    #[test]
    fn boot_id_is_read() {
        assert!(boot_id().is_some_and(|id| id.len() == 36));
    }
}
