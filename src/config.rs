//! The daemon's configuration: command-line flags, each with a `TASKD_*` environment
//! variable, over a TOML file (`--config`, else `<state-dir>/taskd.toml` when present), over
//! built-in defaults. `taskd` with nothing set starts a working daemon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::unit::definition::{ByteSize, parse_duration, parse_size};

/// Where the daemon listens unless told otherwise (the address the GoTask client dials).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3333";

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A token from `<state-dir>/token` (Bearer on HTTP/WS, `Auth.Login` on raw TCP).
    Token,
    /// No authentication: loopback listeners only.
    None,
}

/// Whether the daemon serves TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS (unless --tls-cert and --tls-key are given).
    Off,
    /// A self-signed certificate, created in `<state-dir>/tls` on first start.
    Auto,
}

/// Format of the daemon's own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `taskd`'s command line.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "taskd",
    version,
    about = "The taskd task daemon: runs units once, on a schedule, or as supervised services"
)]
pub struct Args {
    /// Address to listen on (raw TCP, HTTP and WebSocket on one port) [default: 127.0.0.1:3333]
    #[arg(long, env = "TASKD_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// State directory: database, run logs, token [default: ~/.local/state/taskd, or /var/lib/taskd as root]
    #[arg(long, env = "TASKD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory of unit files `<name>.toml` [default: <state-dir>/units]
    #[arg(long, env = "TASKD_UNITS_DIR", value_name = "DIR")]
    pub units_dir: Option<PathBuf>,
    /// Configuration file [default: <state-dir>/taskd.toml when present]
    #[arg(long, env = "TASKD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Client authentication [default: token]
    #[arg(long, env = "TASKD_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// Allow listening on a non-loopback address without TLS (prints a warning)
    #[arg(long, env = "TASKD_INSECURE")]
    pub insecure: bool,
    /// Also accept HTTP and WebSocket requests for this host name (`Host`/`Origin`), besides
    /// the listener's address and localhost; repeatable
    #[arg(
        long = "allow-host",
        env = "TASKD_ALLOW_HOST",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allow_host: Vec<String>,
    /// Serve `GET /metrics` without the token (Prometheus scrapers on a trusted network)
    #[arg(long, env = "TASKD_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Format of the daemon's own log [default: text]
    #[arg(long, env = "TASKD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// An account units may run as (`user`); repeat for more. When none is given (here or in
    /// taskd.toml), a root daemon lets units run as any account [env: comma-separated]
    #[arg(
        long = "allowed-user",
        env = "TASKD_ALLOWED_USERS",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allowed_users: Vec<String>,
    /// An agent silent this long is disconnected [default: 15s]
    #[arg(long, env = "TASKD_AGENT_TIMEOUT", value_name = "DURATION")]
    pub agent_timeout: Option<String>,
    /// Runs of a disconnected agent become `lost` after this long [default: 5m]
    #[arg(long, env = "TASKD_LOST_AFTER", value_name = "DURATION")]
    pub lost_after: Option<String>,
    /// TLS on the port (beside plain connections): `auto` creates a self-signed certificate
    /// in <state-dir>/tls on first start [default: off, or on with --tls-cert]
    #[arg(long, env = "TASKD_TLS", value_enum)]
    pub tls: Option<TlsMode>,
    /// The TLS certificate (PEM; with --tls-key)
    #[arg(long, env = "TASKD_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM; with --tls-cert)
    #[arg(long, env = "TASKD_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Keep units, runs, events and agents in PostgreSQL instead of the embedded store:
    /// `postgres://USER@HOST/DB` (shared by the servers of a cluster) [default: embedded
    /// SQLite in the state directory]
    #[arg(long, env = "TASKD_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// This server's name in a cluster (`--store postgres://…`), unique among its servers
    /// [default: the host name]
    #[arg(long, env = "TASKD_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Where the other servers of a cluster reach this one (`HOST:PORT`) [default: the listen
    /// address, with the host name for an unspecified IP]
    #[arg(long, env = "TASKD_ADVERTISE", value_name = "ADDR")]
    pub advertise: Option<String>,
    /// How long the cluster's scheduling lease lasts without renewal: another server takes
    /// over within this long of the holder's death [default: 10s]
    #[arg(long, env = "TASKD_LEASE", value_name = "DURATION")]
    pub lease: Option<String>,
    /// Run as a host agent instead (`taskd agent --help`)
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `taskd`'s subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Run on a host as an agent of a taskd server: connects out, runs what it is assigned.
    Agent(crate::agent::AgentArgs),
    /// Work on a store while no daemon uses it.
    #[command(subcommand)]
    Store(StoreCommand),
}

/// `taskd store …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum StoreCommand {
    /// Copy a store's units, runs with their logs, dispatches, agents, events and audit log
    /// into an empty one: a state directory into a cluster's PostgreSQL database, or back.
    Copy {
        /// Where from: a state directory (the embedded store) or postgres://USER@HOST/DB
        #[arg(long, value_name = "DIR|URL")]
        from: String,
        /// Where to: a state directory (made if missing) or postgres://USER@HOST/DB; must be empty
        #[arg(long, value_name = "DIR|URL")]
        to: String,
    },
}

/// Keys of `taskd.toml`. Every flag has a key of the same name (with `_`), plus the limits.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--state-dir` (only meaningful in a file given with `--config`).
    pub state_dir: Option<PathBuf>,
    /// `--units-dir`.
    pub units_dir: Option<PathBuf>,
    /// `--auth`.
    pub auth: Option<AuthMode>,
    /// `--insecure`.
    pub insecure: Option<bool>,
    /// `--allow-host`: host names browsers may reach the daemon by.
    pub allow_host: Option<Vec<String>>,
    /// `--metrics-public`.
    pub metrics_public: Option<bool>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// Runs kept per unit (default 100).
    pub keep_runs: Option<u32>,
    /// When set, a unit's `cwd` must lie under one of these.
    pub allowed_dirs: Option<Vec<PathBuf>>,
    /// `--allowed-user`, as a list: when set, a unit's `user` must be one of these.
    pub allowed_users: Option<Vec<String>>,
    /// Largest request in bytes or `"1MiB"` (default 1 MiB).
    pub max_request_size: Option<ByteSize>,
    /// Most connections at once (default 1024).
    pub max_connections: Option<usize>,
    /// Most requests executing at once per connection (default 64).
    pub max_in_flight: Option<usize>,
    /// Close raw TCP connections idle this long (default `"5m"`).
    pub idle_timeout: Option<String>,
    /// Most units (default 100000).
    pub max_units: Option<usize>,
    /// `--agent-timeout`.
    pub agent_timeout: Option<String>,
    /// `--lost-after`.
    pub lost_after: Option<String>,
    /// `--tls`.
    pub tls: Option<TlsMode>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--store`.
    pub store: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--advertise`.
    pub advertise: Option<String>,
    /// `--lease`.
    pub lease: Option<String>,
    /// How long a finished REST or Redis task's unit is kept (default `"7d"`; `"0"`: for ever).
    pub keep_tasks: Option<String>,
    /// `[redis]`: take tasks from a Redis list (seed 002).
    pub redis: Option<crate::redis_queue::RedisConfig>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: String,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The units directory.
    pub units_dir: PathBuf,
    /// Authentication mode.
    pub auth: AuthMode,
    /// Non-loopback without TLS allowed.
    pub insecure: bool,
    /// Host names accepted in `Host` and `Origin` besides the listener's own and localhost.
    pub allow_host: Vec<String>,
    /// `/metrics` served without the token.
    pub metrics_public: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Runs kept per unit.
    pub keep_runs: u32,
    /// Allowed working directories (empty: any).
    pub allowed_dirs: Vec<PathBuf>,
    /// Accounts units may run as (empty: any).
    pub allowed_users: Vec<String>,
    /// Largest request.
    pub max_request_size: u32,
    /// Most connections.
    pub max_connections: usize,
    /// Most requests in flight per connection.
    pub max_in_flight: usize,
    /// Raw TCP idle timeout.
    pub idle_timeout: Duration,
    /// Most units.
    pub max_units: usize,
    /// How long a finished task's unit is kept (`None`: for ever).
    pub keep_tasks: Option<Duration>,
    /// An agent silent this long is disconnected.
    pub agent_timeout: Duration,
    /// Runs of a disconnected agent become `lost` after this long.
    pub lost_after: Duration,
    /// TLS: `auto` (self-signed), or the given certificate and key.
    pub tls: Option<TlsSource>,
    /// The PostgreSQL store's URL; `None`: the embedded store.
    pub store: Option<String>,
    /// This server's name (in a cluster).
    pub name: String,
    /// Where other servers reach this one; `None`: derived from the listen address.
    pub advertise: Option<String>,
    /// The cluster's scheduling lease.
    pub lease: Duration,
    /// The Redis queue to take tasks from.
    pub redis: Option<crate::redis_queue::RedisConfig>,
}

/// Where the daemon's TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Self-signed, in `<state-dir>/tls`.
    Auto,
    /// Given: certificate and key files.
    Files(PathBuf, PathBuf),
}

/// Whether the current process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The default state directory: `/var/lib/taskd` for root, else
/// `$XDG_STATE_HOME/taskd` or `~/.local/state/taskd`.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/taskd");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("taskd");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".local/state/taskd")
}

/// Refuses a `--store` that is not a PostgreSQL URL taskd can use, naming what is wrong.
fn check_store_url(url: &str) -> anyhow::Result<()> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        anyhow::bail!(
            "store: {url:?} is not a PostgreSQL URL (postgres://USER@HOST/DB); the embedded \
             store needs no --store (its place is --state-dir)"
        );
    }
    // Its error says "store: …" already.
    crate::store::check_postgres_url(url).map_err(|e| anyhow::anyhow!("{e}"))
}

fn read_file(path: &Path, required: bool) -> anyhow::Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end())),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

impl Config {
    /// Resolves flags and environment (already in `args`) over the config file over defaults.
    pub fn resolve(args: &Args) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(p) => read_file(p, true)?,
            None => {
                let dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
                read_file(&dir.join("taskd.toml"), false)?
            }
        };
        let state_dir =
            args.state_dir.clone().or(file.state_dir.clone()).unwrap_or_else(default_state_dir);
        let state_dir = if state_dir.is_absolute() {
            state_dir
        } else {
            std::env::current_dir()?.join(state_dir)
        };
        let units_dir = args
            .units_dir
            .clone()
            .or(file.units_dir.clone())
            .unwrap_or_else(|| state_dir.join("units"));
        let max_request_size = match &file.max_request_size {
            None => 1 << 20,
            Some(s) => {
                let n = parse_size(s).map_err(|e| anyhow::anyhow!("max_request_size: {e}"))?;
                u32::try_from(n).map_err(|_| anyhow::anyhow!("max_request_size: at most 4GiB"))?
            }
        };
        let keep_tasks = match file.keep_tasks.as_deref() {
            None => Some(Duration::from_secs(7 * 86_400)),
            Some("0") => None,
            Some(s) => Some(parse_duration(s).map_err(|e| anyhow::anyhow!("keep_tasks: {e}"))?),
        };
        let idle_timeout = match &file.idle_timeout {
            None => Duration::from_secs(300),
            Some(s) => parse_duration(s).map_err(|e| anyhow::anyhow!("idle_timeout: {e}"))?,
        };
        let setting =
            |name: &str, arg: &Option<String>, file: &Option<String>, default: u64| match arg
                .as_ref()
                .or(file.as_ref())
            {
                None => Ok(Duration::from_secs(default)),
                Some(s) => parse_duration(s).map_err(|e| anyhow::anyhow!("{name}: {e}")),
            };
        let agent_timeout = setting("agent_timeout", &args.agent_timeout, &file.agent_timeout, 15)?;
        let lost_after = setting("lost_after", &args.lost_after, &file.lost_after, 300)?;
        let tls = match (
            args.tls.or(file.tls),
            args.tls_cert.clone().or(file.tls_cert.clone()),
            args.tls_key.clone().or(file.tls_key.clone()),
        ) {
            (_, Some(c), Some(k)) => Some(TlsSource::Files(c, k)),
            (_, Some(_), None) | (_, None, Some(_)) => {
                anyhow::bail!("tls_cert and tls_key go together")
            }
            (Some(TlsMode::Auto), None, None) => Some(TlsSource::Auto),
            (Some(TlsMode::Off) | None, None, None) => None,
        };
        let store = args.store.clone().or(file.store);
        if let Some(url) = &store {
            check_store_url(url)?;
        }
        let lease = setting("lease", &args.lease, &file.lease, 10)?;
        if lease < Duration::from_secs(1) {
            anyhow::bail!("lease: at least 1s (the holder renews it every third of it)");
        }
        let name = args.name.clone().or(file.name).unwrap_or_else(crate::agent::host_name);
        crate::unit::definition::validate_name(&name)
            .map_err(|e| anyhow::anyhow!("name {name:?}: {e}"))?;
        if let Some(r) = &file.redis {
            r.check()?;
        }
        let cfg = Config {
            store,
            name,
            advertise: args.advertise.clone().or(file.advertise),
            lease,
            listen: args.listen.clone().or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.into()),
            state_dir,
            units_dir,
            auth: args.auth.or(file.auth).unwrap_or(AuthMode::Token),
            insecure: args.insecure || file.insecure.unwrap_or(false),
            allow_host: if args.allow_host.is_empty() {
                file.allow_host.unwrap_or_default()
            } else {
                args.allow_host.clone()
            },
            metrics_public: args.metrics_public || file.metrics_public.unwrap_or(false),
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            keep_runs: file.keep_runs.unwrap_or(100).max(1),
            allowed_dirs: file.allowed_dirs.unwrap_or_default(),
            allowed_users: if args.allowed_users.is_empty() {
                file.allowed_users.unwrap_or_default()
            } else {
                args.allowed_users.clone()
            },
            max_request_size,
            max_connections: file.max_connections.unwrap_or(1024).max(1),
            max_in_flight: file.max_in_flight.unwrap_or(64).max(1),
            idle_timeout,
            max_units: file.max_units.unwrap_or(100_000).max(1),
            keep_tasks,
            agent_timeout,
            lost_after,
            tls,
            redis: file.redis,
        };
        Ok(cfg)
    }

    /// Checks the configuration against the security rules before anything is served:
    /// `--auth none` only on loopback and never as root, non-loopback only with `--insecure`.
    /// Returns a warning to print, if any.
    pub fn check_security(&self, addr: &SocketAddr) -> Result<Option<String>, Refused> {
        let loopback = addr.ip().is_loopback();
        if self.auth == AuthMode::None {
            if !loopback {
                return Err(Refused(format!(
                    "--auth none is only allowed on a loopback address; {addr} is not one"
                )));
            }
            if is_root() {
                return Err(Refused(
                    "--auth none is refused for a daemon running as root: any local account \
                     could run commands as root through it. Run taskd as an unprivileged \
                     account, or use the token (the default)"
                        .into(),
                ));
            }
        }
        if !loopback && !self.insecure && self.tls.is_none() {
            return Err(Refused(format!(
                "{addr} is not a loopback address: traffic would travel without TLS; \
                 serve TLS (--tls auto, or --tls-cert and --tls-key), or pass --insecure to \
                 allow it"
            )));
        }
        Ok((!loopback && self.tls.is_none()).then(|| {
            format!(
                "listening on {addr} without TLS (--insecure): tokens and data travel in clear text"
            )
        }))
    }
}

/// A configuration the daemon refuses to start with; `taskd` exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_setup() {
        let dir = tempfile::tempdir().unwrap();
        let args = Args { state_dir: Some(dir.path().into()), ..Default::default() };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.auth, AuthMode::Token);
        assert_eq!(c.units_dir, dir.path().join("units"));
        assert_eq!(c.keep_runs, 100);
    }

    #[test]
    fn the_file_fills_what_flags_leave_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("taskd.toml"),
            "keep_runs = 7\nlisten = \"127.0.0.1:4000\"\n",
        )
        .unwrap();
        let args = Args {
            state_dir: Some(dir.path().into()),
            listen: Some("127.0.0.1:5000".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.keep_runs, 7);
        assert_eq!(c.listen, "127.0.0.1:5000");
        std::fs::write(dir.path().join("taskd.toml"), "keep_run = 7\n").unwrap();
        let e = Config::resolve(&args).unwrap_err().to_string();
        assert!(e.contains("keep_run"), "{e}");
    }

    #[test]
    fn allowed_users_come_from_flags_or_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("taskd.toml"), "allowed_users = [\"www-data\"]\n").unwrap();
        let state = dir.path().to_str().unwrap();
        let resolve = |argv: &[&str]| {
            let args = Args::try_parse_from(argv).unwrap();
            Config::resolve(&args).unwrap().allowed_users
        };
        assert_eq!(resolve(&["taskd", "--state-dir", state]), ["www-data"]);
        assert_eq!(
            resolve(&["taskd", "--state-dir", state, "--allowed-user", "a", "--allowed-user", "b"]),
            ["a", "b"]
        );
        // TASKD_ALLOWED_USERS (comma-separated) is tried on the real binary, in tests/it.
    }

    #[test]
    fn non_loopback_needs_insecure_and_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut c =
            Config::resolve(&Args { state_dir: Some(dir.path().into()), ..Default::default() })
                .unwrap();
        let public: SocketAddr = "0.0.0.0:3333".parse().unwrap();
        assert!(c.check_security(&public).is_err());
        c.insecure = true;
        assert!(c.check_security(&public).unwrap().is_some());
        c.auth = AuthMode::None;
        assert!(c.check_security(&public).is_err());
        // On loopback `--auth none` is allowed, unless the daemon is root.
        assert_eq!(c.check_security(&"127.0.0.1:1".parse().unwrap()).is_err(), is_root());
    }
}
