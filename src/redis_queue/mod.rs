//! The seed's Redis queue (seed 002, task-job; SPEC §12): with `[redis]` in `taskd.toml`, the
//! daemon takes tasks from a Redis list and runs each as a one-shot unit.
//!
//! Formats, as the seed writes them:
//! - a task, `RPUSH`ed to `queue`: `{"id": "101", "type": "start", "task": {"cmdline":
//!   "bash x.sh", "cmd_args": ["a", "b"], "timeout": 3600}}`: the command line and the
//!   arguments joined with spaces, run by `/bin/sh -c` in `cmd_dir` on `hosts`, stopped after
//!   `timeout` seconds (≤ 0: never). It becomes unit `redis-<id>` (an id that is not a valid
//!   unit name is replaced by a hash of it);
//! - a kill, `RPUSH`ed to `{queue}_control`: `{"id": "101", "type": "kill"}` stops the task's
//!   active runs (recorded `cancelled`);
//! - with `logs = true`, each line of a run's output as it is written, then its end, `RPUSH`ed
//!   to `{queue}_logs`: `{"id", "type", "msg_type": "stdout" | "stderr" | "done", "data"}`,
//!   `done` carrying the exit status (128 + the signal for a run a signal ended, -1 for one
//!   that never ran); see [`push`].
//!
//! A task's unit carries the task's id and type in its environment (see [`crate::task_units`]):
//! its command can read them, the pusher knows the unit's runs by them (also after a
//! restart), and the janitor removes the unit `keep_tasks` after it is done.
//!
//! **Nothing taken is lost, nothing runs twice.** A task is moved, not popped (`BLMOVE` from
//! `queue` to `{queue}_processing:{name}`, Redis's reliable-queue pattern; `name` is the
//! daemon's `--name`, so that several daemons can share a queue as the seed's executors do),
//! and removed from there only once its unit is committed in taskd's store. After a crash
//! (taskd's, or Redis's with persistence), the tasks left in that list are taken again at
//! start; one whose unit exists already was recorded before the crash and is only removed.
//! The same goes for kills (`{queue}_control_processing:{name}`).
//!
//! A malformed item (not UTF-8, not JSON, fields missing) is logged and dropped; it never
//! stops the consumer. A task taskd refuses (a `cmd_dir` outside `allowed_dirs`, an unknown
//! host) is logged and dropped likewise. When the store cannot take a task (disk full, as many
//! units as `max_units`), it stays in the processing list and is tried again with back-off:
//! the queue waits. A Redis that is down or goes away is reconnected with back-off (0.5 s
//! doubling to 30 s), logged once per outage; the API keeps serving meanwhile.
//!

use std::path::PathBuf;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::registry::Registry;
use crate::task_units::{TASK_ID, TASK_TYPE};
use crate::unit::UnitDef;

/// `[redis]` in `taskd.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host[:port][/db]`.
    pub url: String,
    /// The list tasks are taken from.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Where tasks run.
    #[serde(default = "default_hosts")]
    pub hosts: Vec<String>,
    /// The directory tasks run in.
    #[serde(default = "default_cmd_dir")]
    pub cmd_dir: PathBuf,
    /// Push each task's output and end to `{queue}_logs`.
    #[serde(default)]
    pub logs: bool,
}

fn default_queue() -> String {
    "queue_job_task".into()
}

fn default_hosts() -> Vec<String> {
    vec![crate::run::LOCAL.into()]
}

fn default_cmd_dir() -> PathBuf {
    PathBuf::from("/tmp")
}

impl RedisConfig {
    /// Refuses, at start, what would make every task fail: a URL that is not Redis's, an
    /// empty queue name or host list, a relative `cmd_dir`.
    pub fn check(&self) -> anyhow::Result<()> {
        redis::Client::open(self.url.as_str()).map_err(|e| anyhow::anyhow!("[redis] url: {e}"))?;
        if self.queue.trim().is_empty() {
            anyhow::bail!("[redis] queue: a list name is required");
        }
        if self.hosts.is_empty() {
            anyhow::bail!("[redis] hosts: at least one host (\"local\": this one)");
        }
        if !self.cmd_dir.is_absolute() {
            anyhow::bail!("[redis] cmd_dir: an absolute directory is required");
        }
        Ok(())
    }
}

mod push;

/// How long one blocking move waits for an item before it is asked again.
const BLOCK: f64 = 2.0;
/// A command's answer may take this long (a blocking move: [`BLOCK`] more).
const ANSWER: Duration = Duration::from_secs(10);
/// Reconnection back-off: first and longest delay.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// A task of the queue.
#[derive(Debug, Clone, PartialEq)]
struct Task {
    id: String,
    kind: String,
    line: String,
    timeout: i64,
}

/// An item's `id`: a string, or a number.
fn id_of(v: &Value) -> Result<String, String> {
    match v.get("id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err("no \"id\" (a non-empty string)".into()),
    }
}

/// A task from a queue item.
fn parse_task(item: &str) -> Result<Task, String> {
    let v: Value = serde_json::from_str(item).map_err(|e| format!("not JSON: {e}"))?;
    let id = id_of(&v)?;
    let kind = v.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let task = v.get("task").ok_or("no \"task\" object")?;
    let cmdline = task
        .get("cmdline")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or("task.cmdline: a non-empty string is required")?;
    let mut line = cmdline.to_string();
    match task.get("cmd_args") {
        None | Some(Value::Null) => {}
        Some(Value::Array(args)) => {
            for a in args {
                match a {
                    Value::String(s) => {
                        line.push(' ');
                        line.push_str(s);
                    }
                    Value::Number(n) => {
                        line.push(' ');
                        line.push_str(&n.to_string());
                    }
                    _ => return Err("task.cmd_args: strings expected".into()),
                }
            }
        }
        Some(_) => return Err("task.cmd_args: an array expected".into()),
    }
    let timeout = match task.get("timeout") {
        None | Some(Value::Null) => 0,
        Some(t) => t.as_i64().ok_or("task.timeout: whole seconds expected")?,
    };
    Ok(Task { id, kind, line, timeout })
}

/// The unit that runs task `id`.
fn unit_name(id: &str) -> String {
    let name = format!("redis-{id}");
    if crate::unit::definition::validate_name(&name).is_ok() {
        name
    } else {
        let hash = crate::tls::sha256_hex(id.as_bytes());
        format!("redis-{}", &hash[..16])
    }
}

/// The unit definition of `t`.
fn definition(cfg: &RedisConfig, t: &Task) -> Value {
    let mut def = json!({
        "name": unit_name(&t.id),
        "command": ["/bin/sh", "-c", t.line],
        "cwd": cfg.cmd_dir,
        "hosts": cfg.hosts,
        "description": format!("queue {} task {} ({})", cfg.queue, t.id, t.kind),
        "env": {TASK_ID: t.id, TASK_TYPE: t.kind},
    });
    if t.timeout > 0 {
        def["timeout"] = json!(format!("{}s", t.timeout));
    }
    def
}

/// What became of a queue item.
enum Handled {
    /// Recorded (or found recorded before): remove it from the processing list.
    Done,
    /// The store could not take it now: leave it there and try again.
    Later(Error),
}

/// The consumer: takes tasks and kills until `stop`.
pub struct Consumer {
    cfg: RedisConfig,
    client: redis::Client,
    registry: Registry,
    /// This daemon's name (`--name`): its processing lists are its own.
    name: String,
}

impl Consumer {
    /// A consumer of `cfg`'s queue for `registry`, named `name`; refuses a URL that is not
    /// Redis's.
    pub fn new(cfg: RedisConfig, registry: Registry, name: String) -> anyhow::Result<Consumer> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| anyhow::anyhow!("[redis] url: {e}"))?;
        Ok(Consumer { cfg, client, registry, name })
    }

    /// Consumes tasks and kills, in `tasks`, until `take_until`, reconnecting as needed;
    /// pushes the output of tasks' runs (with `logs`) until `stop`.
    pub fn spawn(
        self,
        take_until: CancellationToken,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) {
        let me = std::sync::Arc::new(self);
        let (ready, pushing) = tokio::sync::oneshot::channel();
        if me.cfg.logs {
            let list = format!("{}_logs", me.cfg.queue);
            let (registry, client) = (me.registry.clone(), me.client.clone());
            let p = push::Pusher::new(registry, client, list, stop, tasks.clone());
            tasks.spawn(p.run(ready));
        } else {
            let _ = ready.send(());
        }
        // Tasks are taken once the pusher follows the runs.
        let lanes = tasks.clone();
        tasks.spawn(async move {
            if pushing.await.is_ok() {
                lanes.spawn(me.clone().keep(take_until.clone(), Lane::Tasks));
                lanes.spawn(me.keep(take_until, Lane::Control));
            }
        });
    }

    /// The list a lane takes from, and this consumer's own processing list for it (several
    /// taskd daemons may share a queue, as the seed's executors do: none takes back what
    /// another one holds).
    fn lists(&self, lane: Lane) -> (String, String) {
        let (q, me) = (&self.cfg.queue, &self.name);
        match lane {
            Lane::Tasks => (q.clone(), format!("{q}_processing:{me}")),
            Lane::Control => (format!("{q}_control"), format!("{q}_control_processing:{me}")),
        }
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(ANSWER));
        self.client.get_multiplexed_async_connection_with_config(&cfg).await
    }

    /// One lane, for ever: connect, take back what a crash left, then move and handle items.
    async fn keep(self: std::sync::Arc<Self>, stop: CancellationToken, lane: Lane) {
        let (from, processing) = self.lists(lane);
        let mut delay = BACKOFF.0;
        let mut down = false;
        while !stop.is_cancelled() {
            let r = tokio::select! {
                r = self.serve(lane, &from, &processing, &mut down, &mut delay) => r,
                () = stop.cancelled() => return,
            };
            if let Err(e) = r {
                if !down {
                    tracing::warn!(url = %self.cfg.url, list = %from, error = %e, "redis: unreachable; retrying with back-off");
                    down = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return,
                }
                delay = (delay * 2).min(BACKOFF.1);
            }
        }
    }

    async fn serve(
        &self,
        lane: Lane,
        from: &str,
        processing: &str,
        down: &mut bool,
        delay: &mut Duration,
    ) -> redis::RedisResult<()> {
        let mut c = self.connect().await?;
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        if *down {
            tracing::info!(list = %from, "redis: reachable again");
        }
        *down = false;
        *delay = BACKOFF.0;
        // What a crash left between the two lists. Items are read as bytes: one that is not
        // UTF-8 is dropped like any malformed item, never taken for a Redis failure.
        let left: Vec<Vec<u8>> = c.lrange(processing, 0, -1).await?;
        for item in left {
            self.handle(&mut c, lane, processing, &item).await?;
        }
        loop {
            let item: Option<Vec<u8>> = c
                .blmove(from, processing, redis::Direction::Left, redis::Direction::Right, BLOCK)
                .await?;
            if let Some(item) = item {
                self.handle(&mut c, lane, processing, &item).await?;
            }
        }
    }

    /// Handles `item` until it is recorded (or dropped), then removes it from `processing`.
    async fn handle(
        &self,
        c: &mut MultiplexedConnection,
        lane: Lane,
        processing: &str,
        raw: &[u8],
    ) -> redis::RedisResult<()> {
        let mut wait = BACKOFF.0;
        loop {
            let handled = match (std::str::from_utf8(raw), lane) {
                (Err(_), _) => {
                    let shown = String::from_utf8_lossy(raw);
                    tracing::warn!(item = %cut(&shown), "redis: an item that is not UTF-8 dropped");
                    Handled::Done
                }
                (Ok(item), Lane::Tasks) => self.task(item).await,
                (Ok(item), Lane::Control) => self.control(item).await,
            };
            match handled {
                Handled::Done => break,
                Handled::Later(e) => {
                    tracing::warn!(error = %e, "redis: the store cannot take a task now; it stays queued");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF.1);
                }
            }
        }
        let _: usize = c.lrem(processing, 1, raw).await?;
        Ok(())
    }

    async fn task(&self, item: &str) -> Handled {
        let t = match parse_task(item) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(item = %cut(item), "redis: malformed task dropped: {e}");
                return Handled::Done;
            }
        };
        let def = match UnitDef::from_json(definition(&self.cfg, &t)) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(id = %t.id, "redis: task refused and dropped: {e}");
                return Handled::Done;
            }
        };
        let name = def.name.clone();
        match self.registry.add(def).await {
            Ok(_) => {
                tracing::info!(id = %t.id, unit = %name, "redis: task recorded");
                Handled::Done
            }
            // Recorded before a crash, or an id used twice: taken once.
            Err(Error::UnitExists(_)) => Handled::Done,
            // The store cannot take it now, or the daemon holds as many units as it may: it
            // stays queued until it can.
            Err(
                e @ (Error::Limit(_)
                | Error::Store(_)
                | Error::Storage(_)
                | Error::Postgres(_)
                | Error::Io { .. }
                | Error::NotRecorded(_)
                | Error::Fenced
                | Error::ShuttingDown),
            ) => Handled::Later(e),
            Err(e) => {
                tracing::warn!(id = %t.id, "redis: task refused and dropped: {e}");
                Handled::Done
            }
        }
    }

    async fn control(&self, item: &str) -> Handled {
        let v: Value = match serde_json::from_str(item) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(item = %cut(item), "redis: malformed control message dropped: {e}");
                return Handled::Done;
            }
        };
        let (id, kind) = (id_of(&v), v.get("type").and_then(Value::as_str));
        match (id, kind) {
            (Ok(id), Some("kill")) => match self.registry.stop(&unit_name(&id)).await {
                Ok(n) => tracing::info!(%id, stopped = n, "redis: task killed"),
                Err(Error::UnitNotFound(_)) => {
                    tracing::warn!(%id, "redis: kill of an unknown task")
                }
                Err(e @ (Error::ShuttingDown | Error::Fenced)) => return Handled::Later(e),
                Err(e) => tracing::warn!(%id, "redis: kill failed: {e}"),
            },
            _ => {
                tracing::warn!(item = %cut(item), "redis: control message dropped: expected {{\"id\", \"type\": \"kill\"}}")
            }
        }
        Handled::Done
    }
}

/// Which list a consumer loop serves.
#[derive(Debug, Clone, Copy)]
enum Lane {
    Tasks,
    Control,
}

fn cut(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_task_becomes_a_shell_command_in_cmd_dir() {
        let item = r#"{"id":"101","type":"test","task":{"cmdline":"install.sh","cmd_args":["feature/homestead"],"timeout":3600}}"#;
        let t = parse_task(item).unwrap();
        assert_eq!(t.line, "install.sh feature/homestead");
        let cfg: RedisConfig = toml::from_str("url = \"redis://127.0.0.1/\"").unwrap();
        assert_eq!((cfg.queue.as_str(), cfg.logs), ("queue_job_task", false));
        let def = definition(&cfg, &t);
        assert_eq!(def["name"], "redis-101");
        assert_eq!(def["command"], json!(["/bin/sh", "-c", "install.sh feature/homestead"]));
        assert_eq!((def["cwd"].as_str(), def["timeout"].as_str()), (Some("/tmp"), Some("3600s")));
        let t = parse_task(r#"{"id": 7, "task": {"cmdline": "true", "timeout": -1}}"#).unwrap();
        assert!(definition(&cfg, &t).get("timeout").is_none());
        assert_eq!(unit_name("a b/c").len(), "redis-".len() + 16);
    }

    #[test]
    fn malformed_items_say_why() {
        for (item, why) in [
            ("nope", "not JSON"),
            (r#"{"task": {"cmdline": "x"}}"#, "id"),
            (r#"{"id": "1"}"#, "task"),
            (r#"{"id": "1", "task": {"cmdline": " "}}"#, "cmdline"),
            (r#"{"id": "1", "task": {"cmdline": "x", "cmd_args": "a"}}"#, "cmd_args"),
            (r#"{"id": "1", "task": {"cmdline": "x", "timeout": "1"}}"#, "timeout"),
        ] {
            let e = parse_task(item).unwrap_err();
            assert!(e.contains(why), "{item}: {e}");
        }
    }
}
