//! The executor of this host: runs spawned through [`crate::exec`] as the unit says (account,
//! environment, script file, working directory), their output written to their log as it
//! is read, their pid recorded with this boot's id, and, at start-up, the processes of runs
//! a crashed daemon left behind found and stopped ([`LocalExecutor::recover`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use nix::sys::signal::Signal::{SIGKILL, SIGTERM};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{OnStart, RunSink, StopCause, scripts};
use crate::error::{Error, Result};
use crate::exec;
use crate::run::{RunRecord, RunState, StopReason};
use crate::store::logs::{LogSummary, Stream};
use crate::store::{StaleRun, Store};
use crate::unit::definition::{Action, UnitConfig, ValidateCtx};

/// The daemon's sink: output to the run's log file, the start to the runs table.
impl RunSink for Store {
    async fn open(&self, run: i64, limit: u64) -> Result<()> {
        self.logs().open(run, limit).await
    }

    async fn write(&self, run: i64, stream: Stream, at: Timestamp, data: Vec<u8>) {
        self.logs().write(run, stream, at, data).await;
    }

    async fn finish(&self, run: i64) -> LogSummary {
        self.logs().finish(run).await
    }

    fn started(
        &self,
        run: i64,
        pid: u32,
        at: Timestamp,
        start_ticks: Option<u64>,
        boot_id: Option<String>,
    ) {
        self.set_pid(run, pid, at, start_ticks, boot_id);
    }

    async fn read_content(
        &self,
        _run: i64,
        sha256: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        self.content().read(sha256, offset, len).await
    }
}

/// Runs units' runs on this host, their output and starts going to `S`.
pub struct LocalExecutor<S = Store> {
    /// Where output and starts go.
    sink: S,
    /// Where scripts of runs as the daemon's own account are written (`<state-dir>/scripts`).
    scripts_dir: PathBuf,
    /// Default working directory (`<state-dir>/work`) of runs without `user` (those with
    /// one start in the account's home directory).
    work_dir: PathBuf,
    /// `allowed_dirs` and `allowed_users`, checked again before each spawn.
    validate: ValidateCtx,
    /// This boot's id, recorded with each pid.
    boot_id: Option<String>,
    /// Identifies the state directory in run tags ([`state_dir_id`]).
    state_dir_id: String,
    /// The daemon's own account (name, home), for the environment of runs without `user`.
    identity: (String, String),
}

impl<S: RunSink> LocalExecutor<S> {
    /// An executor for the state directory `state_dir`, its runs' output and starts going to
    /// `sink`. Looks the account it runs as up (off the async threads).
    pub async fn new(
        sink: S,
        state_dir: &Path,
        work_dir: PathBuf,
        validate: ValidateCtx,
    ) -> Result<Self> {
        std::fs::create_dir_all(&work_dir).map_err(|e| Error::io(&work_dir, e))?;
        let identity =
            tokio::task::spawn_blocking(daemon_identity).await.map_err(|_| Error::ShuttingDown)?;
        Ok(LocalExecutor {
            state_dir_id: state_dir_id(state_dir),
            scripts_dir: state_dir.join("scripts"),
            sink,
            work_dir,
            validate,
            boot_id: exec::boot_id(),
            identity,
        })
    }

    /// Runs `rec` of the unit defined by `cfg` to its end and returns it with how it ended
    /// (state, exit code or signal, reason, output sizes). `stop` stops it; `why` says why
    /// (a timeout sets it here); `started` is told when its process has started.
    pub fn execute(
        self: Arc<Self>,
        cfg: Arc<UnitConfig>,
        rec: RunRecord,
        stop: CancellationToken,
        why: StopCause,
        started: OnStart,
    ) -> impl Future<Output = RunRecord> + Send + 'static {
        execute(self, cfg, rec, stop, why, started)
    }
}

impl<S> LocalExecutor<S> {
    /// Stops what is left of the runs a crashed daemon left active (`stale`): SIGTERM now to their
    /// process groups and tagged processes, SIGKILL five seconds later (on `tracker`, cut short by
    /// `root`) to those that had any. One walk of /proc finds the tagged processes of every run
    /// (see [`exec::kill_leftovers`]).
    pub async fn recover(
        &self,
        stale: &[StaleRun],
        root: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let (boot_id, state_dir_id) = (&self.boot_id, &self.state_dir_id);
        let mut runs = Vec::new();
        for s in stale {
            tracing::warn!(run = s.record.id, unit = %s.record.unit, state = %s.record.state, "run left active by the previous daemon");
            let tag = run_tag(state_dir_id, s.record.id);
            // Only a pid from this boot can still be the run's process group; by group and by
            // tag, as processes that left the group are found by the latter.
            let run = if let (Some(pid), Some(start)) = (s.record.pid, s.pid_start)
                && s.boot_id.is_some()
                && s.boot_id == *boot_id
            {
                exec::Leftover { pgid: Some(pid), since: start, tag }
            } else if s.record.pid.is_none()
            && let Some(started) = s.record.started_at
            // The previous daemon died before it recorded the pid: find the run by its tag,
            // among processes started since (a second earlier, for clock rounding).
            && let Some(since) =
                exec::ticks_since_boot(started.as_millisecond() as f64 / 1000.0 - 1.0)
            {
                exec::Leftover { pgid: None, since, tag }
            } else {
                continue;
            };
            runs.push((s.record.id, run));
        }
        if runs.is_empty() {
            return;
        }
        // Scanning /proc blocks: not on an async thread.
        let to_kill = tokio::task::spawn_blocking(move || {
            let (ids, runs): (Vec<i64>, Vec<exec::Leftover>) = runs.into_iter().unzip();
            let stopped = exec::kill_leftovers(&runs, SIGTERM);
            let mut to_kill = Vec::new();
            for ((id, run), n) in ids.into_iter().zip(runs).zip(stopped) {
                if n > 0 {
                    tracing::warn!(run = id, pid = run.pgid, n, "stopping processes of a lost run");
                    to_kill.push(run);
                }
            }
            to_kill
        })
        .await
        .unwrap_or_default();
        if to_kill.is_empty() {
            return;
        }
        let stop = root.clone();
        tracker.spawn(async move {
            // The grace a lost run's processes get; a shutdown meanwhile cuts it short.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.cancelled() => {}
            }
            let _ =
                tokio::task::spawn_blocking(move || exec::kill_leftovers(&to_kill, SIGKILL)).await;
        });
    }
}

/// The daemon's account name and home directory, from the user database (the daemon's own
/// environment may lack `USER`, under systemd for instance). Blocks: call it off the async
/// threads.
pub fn daemon_identity() -> (String, String) {
    let uid = nix::unistd::getuid();
    match exec::User::lookup(&uid.to_string()) {
        Ok(u) => (u.name, u.home.display().to_string()),
        Err(_) => (
            std::env::var("USER").unwrap_or_else(|_| uid.to_string()),
            std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        ),
    }
}

/// The environment variable that tags every process of a run ([`run_tag`]).
pub const RUN_TAG_VAR: &str = "TASKD_RUN_TAG";

/// An id for the state directory `dir` (a 64-bit FNV-1a hash of its canonical path, in hex),
/// the same for every daemon started on it, different for daemons on other directories.
pub fn state_dir_id(dir: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    // Spelled out rather than std's hasher, which may change between Rust releases: a daemon
    // built by a newer compiler must still find the processes of its predecessor's runs.
    let hash = dir.as_os_str().as_bytes().iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The tag of run `run_id` ([`exec::Spec::tag`]): `TASKD_RUN_TAG=<state dir id>-<run id>`.
///
/// Not `TASKD_RUN_ID` alone: run ids restart at 1 in every state directory, and every process
/// carrying a run's tag is stopped with it, so other daemons' runs (tests run many side by
/// side; a root daemon sees every user's processes) must not share it. A restarted daemon
/// computes the same tag to find a lost run's processes.
pub fn run_tag(state_dir_id: &str, run_id: i64) -> (String, String) {
    (RUN_TAG_VAR.into(), format!("{state_dir_id}-{run_id}"))
}

/// The environment every run gets: a fixed base (the daemon's own is not copied), the
/// unit's `env` on top, and `TASKD_*` variables describing the run.
fn run_env(
    cfg: &UnitConfig,
    rec: &RunRecord,
    user: Option<&exec::User>,
    identity: &(String, String),
) -> Vec<(String, String)> {
    let mut env: std::collections::BTreeMap<String, String> = Default::default();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    let (name, home) = match user {
        Some(u) => (u.name.clone(), u.home.display().to_string()),
        None => identity.clone(),
    };
    env.insert("HOME".into(), home);
    env.insert("USER".into(), name.clone());
    env.insert("LOGNAME".into(), name);
    env.insert("SHELL".into(), "/bin/sh".into());
    if let Ok(lang) = std::env::var("LANG") {
        env.insert("LANG".into(), lang);
    }
    env.insert("TASKD_UNIT".into(), cfg.name.clone());
    env.insert("TASKD_RUN_ID".into(), rec.id.to_string());
    env.insert("TASKD_ATTEMPT".into(), rec.attempt.to_string());
    env.insert("TASKD_TRIGGER".into(), rec.trigger.as_str().into());
    for (k, v) in &cfg.env {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

/// The argv of a script run: its `#!` interpreter (with one optional argument), else `/bin/sh`.
fn script_argv(text: &str, path: &std::path::Path, args: &[String]) -> Vec<String> {
    let mut argv = Vec::new();
    match text.strip_prefix("#!").and_then(|rest| rest.lines().next()) {
        Some(line) if !line.trim().is_empty() => {
            let line = line.trim();
            match line.split_once(char::is_whitespace) {
                Some((interp, arg)) => {
                    argv.push(interp.to_string());
                    argv.push(arg.trim().to_string());
                }
                None => argv.push(line.to_string()),
            }
        }
        _ => argv.push("/bin/sh".into()),
    }
    argv.push(path.display().to_string());
    argv.extend(args.iter().cloned());
    argv
}

/// Where a run as `user` without `cwd` starts: the account's home directory (the state
/// directory's `work/` belongs to the daemon's account), or `/` when it has none (`nobody`'s is
/// `/nonexistent`), as login(1) does.
fn home_of(user: &exec::User) -> PathBuf {
    if user.home.is_dir() { user.home.clone() } else { PathBuf::from("/") }
}

/// A run's output, handed straight to its log as it is read: `wait` returns once every chunk
/// has been handed over.
struct ToSink<S> {
    sink: S,
    run: i64,
}

impl<S: RunSink> exec::Output for ToSink<S> {
    async fn send(&mut self, c: exec::Chunk) -> bool {
        self.sink.write(self.run, c.stream, c.at, c.data).await;
        true
    }
}

/// Runs one run to its end; the loop records it.
async fn execute<S: RunSink>(
    env: Arc<LocalExecutor<S>>,
    cfg: Arc<UnitConfig>,
    mut rec: RunRecord,
    stop: CancellationToken,
    why: StopCause,
    started: OnStart,
) -> RunRecord {
    if let Err(e) = env.sink.open(rec.id, cfg.log_limit).await {
        tracing::error!(run = rec.id, error = %e, "cannot open the run's log");
    }
    let outcome = match &cfg.action {
        Action::Tick(every) => tick(&env, &cfg, &rec, *every, &stop).await,
        Action::File(spec) => {
            let put = super::file::put(&env.sink, &env.validate, rec.id, spec, &stop).await;
            let said = match &put {
                super::file::Put::Written(n) => Some(format!(
                    "wrote {n} bytes to {} (sha256:{})\n",
                    spec.dest.display(),
                    spec.sha256
                )),
                super::file::Put::Unchanged => {
                    Some(format!("{} unchanged (sha256:{})\n", spec.dest.display(), spec.sha256))
                }
                super::file::Put::Failed(why) => Some(format!("{why}\n")),
                super::file::Put::Stopped => None,
            };
            if let Some(line) = said {
                let stream = if matches!(put, super::file::Put::Failed(_)) {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                env.sink.write(rec.id, stream, Timestamp::now(), line.into_bytes()).await;
            }
            Outcome::Put(put)
        }
        _ => spawn_and_wait(&env, &cfg, &rec, &stop, &why, started).await,
    };
    let summary = env.sink.finish(rec.id).await;
    rec.ended_at = Some(Timestamp::now());
    rec.stdout_bytes = summary.stdout_bytes;
    rec.stderr_bytes = summary.stderr_bytes;
    rec.truncated = summary.truncated;
    match outcome {
        Outcome::Exited { termination, stopped, pid, started } => {
            rec.pid = Some(pid);
            rec.started_at = Some(started);
            match termination {
                exec::Termination::Exited(c) => rec.exit_code = Some(c),
                exec::Termination::Signaled(s) => rec.signal = Some(s),
            }
            // Only a shutdown cancels a run without giving a reason (it cancels the parent).
            let why = why.get();
            rec.state = if stopped {
                rec.reason = Some(why.as_str().into());
                if why == StopReason::Timeout { RunState::TimedOut } else { RunState::Cancelled }
            } else {
                match termination {
                    exec::Termination::Exited(c) if cfg.success_codes.contains(&c) => {
                        RunState::Succeeded
                    }
                    _ => RunState::Failed,
                }
            };
        }
        Outcome::Ticked => {
            rec.state = RunState::Cancelled;
            rec.reason = Some(why.get().as_str().into());
        }
        Outcome::NotStarted(msg) => {
            rec.state = RunState::Failed;
            rec.reason = Some(msg);
        }
        Outcome::Put(put) => {
            rec.started_at.get_or_insert_with(Timestamp::now);
            match put {
                super::file::Put::Written(_) => rec.state = RunState::Succeeded,
                super::file::Put::Unchanged => {
                    rec.state = RunState::Succeeded;
                    rec.reason = Some("unchanged".into());
                }
                super::file::Put::Failed(why) => {
                    rec.state = RunState::Failed;
                    rec.reason = Some(why);
                }
                super::file::Put::Stopped => {
                    let why = why.get();
                    rec.reason = Some(why.as_str().into());
                    rec.state = if why == StopReason::Timeout {
                        RunState::TimedOut
                    } else {
                        RunState::Cancelled
                    };
                }
            }
        }
    }
    rec
}

enum Outcome {
    Exited { termination: exec::Termination, stopped: bool, pid: u32, started: Timestamp },
    Ticked,
    NotStarted(String),
    Put(super::file::Put),
}

async fn tick<S: RunSink>(
    env: &LocalExecutor<S>,
    cfg: &UnitConfig,
    rec: &RunRecord,
    every: Duration,
    stop: &CancellationToken,
) -> Outcome {
    let mut next = Instant::now();
    loop {
        let now = Timestamp::now();
        let line = format!("tick {} {}\n", cfg.name, now.strftime("%Y-%m-%dT%H:%M:%S%:z"));
        env.sink.write(rec.id, Stream::Stdout, now, line.into_bytes()).await;
        next += every;
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => return Outcome::Ticked,
        }
    }
}

async fn spawn_and_wait<S: RunSink>(
    env: &LocalExecutor<S>,
    cfg: &UnitConfig,
    rec: &RunRecord,
    stop: &CancellationToken,
    why: &StopCause,
    on_start: OnStart,
) -> Outcome {
    let user = match &cfg.user {
        None => None,
        Some(name) => {
            // NSS lookups may block (LDAP, files): keep them off the async threads.
            let n = name.clone();
            match tokio::task::spawn_blocking(move || exec::User::lookup(&n)).await {
                Ok(Ok(u)) => Some(u),
                Ok(Err(e)) => return Outcome::NotStarted(format!("cannot run as {name:?}: {e}")),
                Err(e) => return Outcome::NotStarted(format!("cannot run as {name:?}: {e}")),
            }
        }
    };
    // `allowed_users` may have changed since `Add` (a restart with other settings).
    if let Some(u) = &user
        && let Err(e) = env.validate.check_user(&u.name, u.uid)
    {
        return Outcome::NotStarted(format!("cannot start: {e}"));
    }
    let mut script_path = None;
    let argv = match &cfg.action {
        Action::Command(cmd) => cmd.iter().chain(cfg.args.iter()).cloned().collect(),
        Action::Script(text) => {
            match scripts::write(
                &env.scripts_dir,
                rec.id,
                text,
                user.as_ref().map(|u| (u.uid, u.gid)),
            )
            .await
            {
                Ok(p) => {
                    let argv = script_argv(text, &p, &cfg.args);
                    script_path = Some(p);
                    argv
                }
                Err(e) => return Outcome::NotStarted(format!("cannot write the script: {e}")),
            }
        }
        Action::Tick(_) | Action::File(_) => unreachable!("tick and file units do not spawn"),
    };
    // Resolved again right before the spawn, which starts in the resolved path: a symlink on
    // the way may have been swapped since `Add`, and `allowed_dirs` may have changed. (A swap
    // in the microseconds between this and the child's chdir is not caught: that would take
    // entering the directory through a descriptor opened here.)
    let cwd = match &cfg.cwd {
        Some(cwd) => match env.validate.resolve_cwd(cwd) {
            Ok(resolved) => resolved,
            Err(e) => {
                if let Some(p) = script_path {
                    scripts::remove(p);
                }
                return Outcome::NotStarted(format!("cannot start: {e}"));
            }
        },
        None => match &user {
            Some(u) => home_of(u),
            None => env.work_dir.clone(),
        },
    };
    let spec = exec::Spec {
        argv,
        env: run_env(cfg, rec, user.as_ref(), &env.identity),
        cwd,
        user,
        tag: Some(run_tag(&env.state_dir_id, rec.id)),
    };
    let output = ToSink { sink: env.sink.clone(), run: rec.id };
    let proc = match exec::Process::spawn(&spec, output) {
        Ok(p) => p,
        Err(e) => {
            if let Some(p) = script_path {
                scripts::remove(p);
            }
            return Outcome::NotStarted(format!("cannot start: {e}"));
        }
    };
    let pid = proc.pid();
    let started = Timestamp::now();
    env.sink.started(rec.id, pid, started, proc.start_ticks(), env.boot_id.clone());
    on_start(pid, started);
    let stop_proc = stop.child_token();
    let mut timer = cfg.timeout.map(|t| Box::pin(tokio::time::sleep(t)));
    let wait = proc.wait(stop_proc.clone(), cfg.kill_grace);
    tokio::pin!(wait);
    let exit = loop {
        tokio::select! {
            exit = &mut wait => break exit,
            _ = async { timer.as_mut().expect("guarded").await }, if timer.is_some() => {
                timer = None;
                why.set(StopReason::Timeout);
                stop_proc.cancel();
            }
        }
    };
    if let Some(p) = script_path {
        scripts::remove(p);
    }
    Outcome::Exited { termination: exit.termination, stopped: exit.stopped, pid, started }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use sha2::Digest;

    use super::*;
    use crate::run::Trigger;
    use crate::unit::UnitDef;

    /// A sink that keeps everything in memory: the executor needs no store.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Sunk>>);

    /// What [`Kept`] was given: output chunks, and (run, pid) starts.
    type Sunk = (Vec<(Stream, Vec<u8>)>, Vec<(i64, u32)>);

    impl RunSink for Kept {
        async fn open(&self, _run: i64, _limit: u64) -> Result<()> {
            Ok(())
        }

        async fn write(&self, _run: i64, stream: Stream, _at: Timestamp, data: Vec<u8>) {
            self.0.lock().unwrap().0.push((stream, data));
        }

        async fn finish(&self, _run: i64) -> LogSummary {
            let kept = self.0.lock().unwrap();
            let bytes = |s: Stream| {
                kept.0.iter().filter(|(k, _)| *k == s).map(|(_, d)| d.len() as u64).sum()
            };
            LogSummary {
                stdout_bytes: bytes(Stream::Stdout),
                stderr_bytes: bytes(Stream::Stderr),
                truncated: false,
            }
        }

        fn started(&self, run: i64, pid: u32, _: Timestamp, _: Option<u64>, _: Option<String>) {
            self.0.lock().unwrap().1.push((run, pid));
        }

        async fn read_content(
            &self,
            _: i64,
            sha: &str,
            offset: u64,
            len: usize,
        ) -> Result<Vec<u8>> {
            if sha != crate::store::content::hex(&sha2::Sha256::digest(FILE)) {
                return Err(Error::invalid("sha256", "no such file is kept here"));
            }
            let start = (offset as usize).min(FILE.len());
            Ok(FILE[start..(start + len).min(FILE.len())].to_vec())
        }
    }

    /// An executor whose runs go to a [`Kept`], with its scripts and work in `dir`.
    async fn kept_executor(dir: &std::path::Path) -> (Kept, Arc<LocalExecutor<Kept>>) {
        let sink = Kept::default();
        let ex = LocalExecutor::new(sink.clone(), dir, dir.join("work"), ValidateCtx::default());
        (sink, Arc::new(ex.await.unwrap()))
    }

    /// The content [`Kept`] serves.
    const FILE: &[u8] = b"listen 127.0.0.1:8080\nworkers 4\n";

    fn file_unit(name: &str, dest: &std::path::Path, sha: &str, mode: &str) -> Arc<UnitConfig> {
        let def = serde_json::json!({"name": name, "file": {"source": format!("sha256:{sha}"),
            "dest": dest, "mode": mode}});
        let ctx = ValidateCtx::default();
        Arc::new(UnitConfig::validate(UnitDef::from_json(def).unwrap(), &ctx).unwrap())
    }

    #[tokio::test]
    async fn a_file_unit_puts_its_file_whole_then_finds_it_unchanged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (sink, ex) = kept_executor(dir.path()).await;
        let sha = crate::store::content::hex(&sha2::Sha256::digest(FILE));
        let dest = dir.path().join("app.conf");
        // What a crash of an earlier put left beside it.
        std::fs::write(dir.path().join(".app.conf.taskd-1.tmp"), "half").unwrap();
        let run = |id: i64, cfg: Arc<UnitConfig>| {
            let now = Timestamp::now();
            let rec =
                RunRecord::fresh(id, cfg.name.clone(), RunState::Running, Trigger::Manual, 1, now);
            let on_start: OnStart = Box::new(|_, _| {});
            ex.clone().execute(cfg, rec, CancellationToken::new(), StopCause::default(), on_start)
        };
        let first = run(2, file_unit("put", &dest, &sha, "0640")).await;
        assert_eq!((first.state, first.reason.as_deref()), (RunState::Succeeded, None));
        assert_eq!(std::fs::read(&dest).unwrap(), FILE);
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o640);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("taskd-"))
            .collect();
        assert!(names.is_empty(), "no temporary file left: {names:?}");
        let again = run(3, file_unit("put", &dest, &sha, "0600")).await;
        assert_eq!(
            (again.state, again.reason.as_deref()),
            (RunState::Succeeded, Some("unchanged"))
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o600);
        // Content the server does not have: the run fails, the file stays as it was.
        let other = "0".repeat(64);
        let failed = run(4, file_unit("put", &dir.path().join("x.conf"), &other, "0644")).await;
        assert_eq!(failed.state, RunState::Failed);
        assert!(failed.reason.unwrap().contains("no such file"));
        assert!(!dir.path().join("x.conf").exists());
        // A destination in a directory that does not exist: refused with the reason.
        let nowhere = run(5, file_unit("put", &dir.path().join("none/x.conf"), &sha, "0644")).await;
        assert_eq!(nowhere.state, RunState::Failed);
        assert!(nowhere.reason.unwrap().starts_with("dest:"));
        let out = sink.0.lock().unwrap();
        let said: String =
            out.0.iter().map(|(_, d)| String::from_utf8_lossy(d).into_owned()).collect();
        assert!(
            said.contains(&format!("wrote {} bytes to {}", FILE.len(), dest.display())),
            "{said}"
        );
        assert!(said.contains("unchanged"), "{said}");
    }

    /// What someone put at a file unit's destination, or beside it as a leftover, is
    /// replaced, never followed nor opened: a symlink's target keeps its content and mode, a
    /// FIFO does not hold the put up.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_file_unit_replaces_symlinks_and_fifos_without_following_or_opening_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (_sink, ex) = kept_executor(dir.path()).await;
        let sha = crate::store::content::hex(&sha2::Sha256::digest(FILE));
        let target = dir.path().join("target");
        std::fs::write(&target, FILE).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let linked = dir.path().join("linked.conf");
        std::os::unix::fs::symlink(&target, &linked).unwrap();
        let fifo = dir.path().join("fifo.conf");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        nix::unistd::mkfifo(
            &dir.path().join(".fifo.conf.taskd-1.tmp"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        for (id, dest) in [(2, &linked), (3, &fifo)] {
            let cfg = file_unit("put", dest, &sha, "0644");
            let rec = RunRecord::fresh(
                id,
                cfg.name.clone(),
                RunState::Running,
                Trigger::Manual,
                1,
                Timestamp::now(),
            );
            let on_start: OnStart = Box::new(|_, _| {});
            let run = ex.clone().execute(
                cfg,
                rec,
                CancellationToken::new(),
                StopCause::default(),
                on_start,
            );
            let ended = tokio::time::timeout(Duration::from_secs(10), run)
                .await
                .expect("the put is not held up by what is there");
            assert_eq!((ended.state, ended.reason.as_deref()), (RunState::Succeeded, None));
            let meta = std::fs::symlink_metadata(dest).unwrap();
            assert!(meta.file_type().is_file(), "{} is a file now", dest.display());
            assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
            assert_eq!(std::fs::read(dest).unwrap(), FILE);
        }
        let kept = std::fs::metadata(&target).unwrap();
        assert_eq!(kept.permissions().mode() & 0o7777, 0o600, "the link's target is untouched");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_run_executes_into_any_sink() {
        exec::become_subreaper().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (sink, ex) = kept_executor(dir.path()).await;
        let def = serde_json::json!({"name": "u", "command": ["sh", "-c", "echo out; echo err >&2; exit 3"]});
        let cfg = UnitConfig::validate(UnitDef::from_json(def).unwrap(), &ValidateCtx::default())
            .unwrap();
        let now = Timestamp::now();
        let rec = RunRecord {
            started_at: Some(now),
            ..RunRecord::fresh(7, "u".into(), RunState::Running, Trigger::Manual, 1, now)
        };
        let told = Arc::new(Mutex::new(None));
        let t = told.clone();
        let on_start: OnStart = Box::new(move |pid, _| *t.lock().unwrap() = Some(pid));
        let why = StopCause::default();
        let ended = ex.execute(Arc::new(cfg), rec, CancellationToken::new(), why, on_start).await;
        assert_eq!((ended.state, ended.exit_code), (RunState::Failed, Some(3)));
        assert_eq!((ended.stdout_bytes, ended.stderr_bytes), (4, 4));
        let kept = sink.0.lock().unwrap();
        let of = |s: Stream| -> Vec<u8> {
            kept.0.iter().filter(|(k, _)| *k == s).flat_map(|(_, d)| d.clone()).collect()
        };
        assert_eq!(
            (of(Stream::Stdout), of(Stream::Stderr)),
            (b"out\n".to_vec(), b"err\n".to_vec())
        );
        assert_eq!(kept.1, [(7, ended.pid.unwrap())]);
        assert_eq!(*told.lock().unwrap(), ended.pid);
    }

    #[test]
    fn scripts_run_with_their_interpreter() {
        let p = std::path::Path::new("/s");
        assert_eq!(script_argv("echo hi", p, &[]), ["/bin/sh", "/s"]);
        assert_eq!(
            script_argv("#!/usr/bin/env python3\nprint(1)", p, &["a".into()]),
            ["/usr/bin/env", "python3", "/s", "a"]
        );
        assert_eq!(script_argv("#!/bin/bash\n", p, &[]), ["/bin/bash", "/s"]);
    }

    #[test]
    fn run_tags_tell_state_directories_apart() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let id = state_dir_id(a.path());
        assert_eq!(id.len(), 16);
        // Stable: a restarted daemon must compute the same tag.
        assert_eq!(state_dir_id(&a.path().join("../").join(a.path().file_name().unwrap())), id);
        assert_ne!(state_dir_id(b.path()), id);
        assert_eq!(run_tag(&id, 42), ("TASKD_RUN_TAG".to_string(), format!("{id}-42")));
    }
}
