//! `taskctl`: the command-line client. Parses the command line, connects to the daemon, runs
//! one command and maps what happened to an exit code (0 ok, 1 refused or failed, 2 usage,
//! 3 daemon unreachable).
//!
//! One file per command group: `units` (add, del, edit, list, show, start, stop, pause,
//! resume), `runs` (runs, logs, cancel), `daemon` (status, events, completions); `output`
//! renders tables, relative times and JSON.

mod daemon;
mod fleet;
mod output;
mod runs;
mod units;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use jsonrpsee::core::ClientError as RpcError;
use jsonrpsee::core::client::{BatchResponse, ClientT, Subscription, SubscriptionClientT};
use jsonrpsee::core::params::BatchRequestBuilder;
use jsonrpsee::core::traits::ToRpcParams;
use serde::de::DeserializeOwned;

use crate::config::{DEFAULT_LISTEN, default_state_dir};
use crate::error::codes;
use crate::rpc::client::{CallClient, Client, ClientError, is_connection_error};
use crate::state_dir::ADDRESS_FILE;

/// `taskctl`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "taskctl",
    version,
    about = "Control taskd: add units, start and stop them, read their runs and logs",
    after_help = "Exit codes: 0 success, 1 the daemon refused or the thing failed, \
                  2 usage error, 3 cannot reach the daemon."
)]
pub struct Cli {
    /// Daemon address, HOST:PORT; for a cluster, its servers comma-separated (the first that
    /// answers is used) [default: <state-dir>/address if present, else 127.0.0.1:3333]
    #[arg(
        long,
        global = true,
        env = "TASKD_ADDR",
        value_name = "ADDR",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub addr: Option<String>,
    /// Token for the daemon [default: read from <state-dir>/token if present]
    #[arg(
        long,
        global = true,
        env = "TASKD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub token: Option<String>,
    /// The daemon's state directory [default: ~/.local/state/taskd, /var/lib/taskd as root]
    #[arg(
        long,
        global = true,
        env = "TASKD_STATE_DIR",
        value_name = "DIR",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub state_dir: Option<PathBuf>,
    /// Talk TLS, trusting the daemon's certificate by its SHA-256 fingerprint (as `taskd`
    /// logs it and join tokens carry it)
    #[arg(
        long,
        global = true,
        env = "TASKD_FINGERPRINT",
        value_name = "SHA256",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub fingerprint: Option<String>,
    /// Talk TLS, trusting the daemon's certificate if this CA signed it
    #[arg(
        long,
        global = true,
        env = "TASKD_CA",
        value_name = "FILE",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub ca: Option<PathBuf>,
    /// Machine-readable output: the JSON results of the daemon's methods
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `taskctl`'s commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a unit: `taskctl add NAME [options] [-- COMMAND ARGS…]`
    Add(units::AddArgs),
    /// Delete units (their active runs are stopped first)
    #[command(alias = "delete", alias = "rm")]
    Del(units::DelArgs),
    /// Change a unit's definition: only the options given change
    Edit(units::EditArgs),
    /// List units
    #[command(alias = "ls")]
    List(units::ListArgs),
    /// Show one unit: definition, state, next fire time, last run, counters
    Show(units::NameArg),
    /// Start a run of a unit now
    Start(units::NameArg),
    /// Stop a unit's active runs (a service stays stopped until `start`)
    Stop(units::NameArg),
    /// Pause a unit's schedule and restarts
    Pause(units::NameArg),
    /// Resume a paused unit
    Resume(units::NameArg),
    /// List runs, newest first
    Runs(runs::RunsArgs),
    /// Print a run's output (a run id, or a unit name for its newest run)
    Logs(runs::LogsArgs),
    /// Cancel a run: TERM, grace, KILL
    Cancel(runs::CancelArgs),
    /// List agents; `agents join-token`, `agents revoke NAME`
    Agents(fleet::AgentsArgs),
    /// Run a command once on hosts, printing each host's output as it comes
    Exec(fleet::ExecArgs),
    /// Put a file on hosts (written whole, checked, renamed into place), a line per host
    Push(fleet::PushArgs),
    /// List dispatches (fires of units on their hosts), newest first
    Dispatches(fleet::DispatchesArgs),
    /// Show a dispatch's progress and a row per host; `dispatch cancel|pause|resume ID`
    Dispatch(fleet::DispatchArgs),
    /// Run a dispatch's ended run again on its host, as a new attempt
    Redo(fleet::RunArg),
    /// A dispatch's run no longer counts against its tolerance or outcome
    Ignore(fleet::RunArg),
    /// Show the daemon's status
    Status,
    /// Print every change as it happens, until interrupted
    Events(daemon::EventsArgs),
    /// Show the audit log: state-changing calls of authenticated clients, newest first
    Audit(daemon::AuditArgs),
    /// Print a shell completion script
    Completions(daemon::CompletionsArgs),
}

impl Command {
    /// Whether the command reads a stream of notifications (`events`, `logs -f`), which needs
    /// the async client; the others make plain calls.
    fn follows_a_stream(&self) -> bool {
        matches!(self, Command::Events(_) | Command::Exec(_) | Command::Push(_))
            || matches!(self, Command::Logs(a) if a.follow)
    }
}

/// `taskctl`'s command line as clap builds it, with `edit`'s help adjusted: `edit` shares
/// `add`'s definition options, but an edit changes only what is given, so the defaults `add`
/// mentions do not apply, and `--paused` pauses or resumes.
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("edit", |edit| {
        edit.mut_args(|arg| {
            if arg.get_id() == "paused" {
                return arg.help("Pause the unit (resume it with --no-paused)");
            }
            let help = arg.get_help().map(ToString::to_string);
            match help.as_deref().and_then(|h| h.find(" [default: ").map(|cut| &h[..cut])) {
                Some(cut) => {
                    let cut = cut.to_string();
                    arg.help(cut)
                }
                None => arg,
            }
        })
    })
}

/// Parses `args` (the program name first) into a [`Cli`], with the checks clap cannot do.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(&args)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    // `add NAME --` with nothing after it would quietly add a tick unit: clap cannot tell
    // `--` followed by nothing from no `--` at all, so look at the words themselves.
    let ends_with_separator = args.last().is_some_and(|a| a == "--");
    let (sub, def) = match &cli.command {
        Command::Add(a) => ("add", &a.def),
        Command::Edit(a) => ("edit", &a.def),
        _ => return Ok(cli),
    };
    if ends_with_separator && def.command.is_empty() && def.script.is_none() {
        let why = if sub == "add" {
            "nothing after --: give a command, or omit -- for a tick unit"
        } else {
            "nothing after --: give the new command, or omit --"
        };
        let sub = cmd.find_subcommand_mut(sub).expect("a subcommand of taskctl");
        return Err(sub.error(clap::error::ErrorKind::TooFewValues, why));
    }
    Ok(cli)
}

/// Runs `taskctl` with the process's arguments and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version to stdout (exit 0) and errors to stderr (exit 2).
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions(args) = &cli.command {
        return daemon::completions(args);
    }
    // A command that follows a stream needs the async client, and so a runtime with I/O,
    // timers and signals; the rest make calls on a blocking socket, and a bare runtime that
    // costs nothing to start drives them.
    let streams = cli.command.follows_a_stream();
    let mut rt = tokio::runtime::Builder::new_current_thread();
    if streams {
        rt.enable_all();
    }
    let rt = rt.build().map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    rt.block_on(async move {
        let ctx = Ctx::connect(&cli, streams).await?;
        match cli.command {
            Command::Add(a) => units::add(&ctx, a).await,
            Command::Del(a) => units::del(&ctx, a).await,
            Command::Edit(a) => units::edit(&ctx, a).await,
            Command::List(a) => units::list(&ctx, a).await,
            Command::Show(a) => units::show(&ctx, a).await,
            Command::Start(a) => units::start(&ctx, a).await,
            Command::Stop(a) => units::stop(&ctx, a).await,
            Command::Pause(a) => units::pause(&ctx, a, true).await,
            Command::Resume(a) => units::pause(&ctx, a, false).await,
            Command::Runs(a) => runs::runs(&ctx, a).await,
            Command::Logs(a) => runs::logs(&ctx, a).await,
            Command::Cancel(a) => runs::cancel(&ctx, a).await,
            Command::Agents(a) => fleet::agents(&ctx, a).await,
            Command::Exec(a) => fleet::exec(&ctx, a).await,
            Command::Push(a) => fleet::push(&ctx, a).await,
            Command::Dispatches(a) => fleet::dispatches(&ctx, a).await,
            Command::Dispatch(a) => fleet::dispatch(&ctx, a).await,
            Command::Redo(a) => fleet::redo(&ctx, a).await,
            Command::Ignore(a) => fleet::ignore(&ctx, a).await,
            Command::Status => daemon::status(&ctx).await,
            Command::Events(a) => daemon::events(&ctx, a).await,
            Command::Audit(a) => daemon::audit(&ctx, a).await,
            Command::Completions(_) => unreachable!("handled before connecting"),
        }
    })
}

/// Prints an error with its whole chain (and a hint when there is one) and picks the exit
/// code.
fn report(err: &anyhow::Error) -> ExitCode {
    let cli_err = err.chain().find_map(|e| e.downcast_ref::<CliError>());
    match cli_err {
        // The reader of our output went away (`taskctl events | head`): not a failure.
        Some(CliError::Closed) => return ExitCode::SUCCESS,
        Some(CliError::Reported) => return ExitCode::FAILURE,
        _ => {}
    }
    eprintln!("taskctl: {err:#}");
    if let Some(hint) = cli_err.and_then(CliError::hint) {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(cli_err.map_or(1, CliError::exit_code))
}

/// A failure that maps to a particular exit code or carries a hint.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A usage error found after parsing (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The daemon cannot be reached (exit 3).
    #[error("cannot reach taskd at {addr}: {why}")]
    Unreachable {
        /// The address dialled.
        addr: String,
        /// What went wrong.
        why: String,
        /// How to start the daemon.
        hint: String,
    },
    /// The daemon answered with an error (exit 1).
    #[error("{message}")]
    Refused {
        /// The daemon's message, with the field for invalid definitions.
        message: String,
        /// What to do about it.
        hint: Option<String>,
    },
    /// The daemon closed a connection a command was still reading from, as it does when it
    /// shuts down (exit 3).
    #[error("taskd closed the connection (is it shutting down?)")]
    Disconnected,
    /// Something failed and has been reported already, line by line (exit 1, nothing more
    /// printed).
    #[error("failed")]
    Reported,
    /// Standard output was closed by its reader (exit 0, silently).
    #[error("standard output closed")]
    Closed,
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Closed => 0,
            CliError::Refused { .. } | CliError::Reported => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } | CliError::Disconnected => 3,
        }
    }

    fn hint(&self) -> Option<&str> {
        match self {
            CliError::Unreachable { hint, .. } => Some(hint),
            CliError::Refused { hint, .. } => hint.as_deref(),
            CliError::Usage(_) | CliError::Disconnected | CliError::Reported | CliError::Closed => {
                None
            }
        }
    }
}

/// Turns an `io::Error` from writing standard output into an error, quietly successful
/// when the reader has gone away.
pub(crate) fn stdout_error(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        CliError::Closed.into()
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}

/// A command's connection to the daemon: plain calls on a blocking socket, or the async
/// client for a command that follows a stream. Either way it implements the traits the
/// generated `…ApiClient` methods need.
pub(crate) enum Conn {
    /// [`CallClient`]: no subscriptions.
    Calls(CallClient),
    /// [`Client`]: calls and subscriptions.
    Streams(Client),
}

impl ClientT for Conn {
    async fn notification<Params>(&self, method: &str, params: Params) -> Result<(), RpcError>
    where
        Params: ToRpcParams + Send,
    {
        match self {
            Conn::Calls(c) => c.notification(method, params).await,
            Conn::Streams(c) => c.notification(method, params).await,
        }
    }

    async fn request<R, Params>(&self, method: &str, params: Params) -> Result<R, RpcError>
    where
        R: DeserializeOwned,
        Params: ToRpcParams + Send,
    {
        match self {
            Conn::Calls(c) => c.request(method, params).await,
            Conn::Streams(c) => c.request(method, params).await,
        }
    }

    async fn batch_request<'a, R>(
        &self,
        batch: BatchRequestBuilder<'a>,
    ) -> Result<BatchResponse<'a, R>, RpcError>
    where
        R: DeserializeOwned + std::fmt::Debug + 'a,
    {
        match self {
            Conn::Calls(c) => c.batch_request(batch).await,
            Conn::Streams(c) => c.batch_request(batch).await,
        }
    }
}

impl SubscriptionClientT for Conn {
    async fn subscribe<'a, Notif, Params>(
        &self,
        subscribe_method: &'a str,
        params: Params,
        unsubscribe_method: &'a str,
    ) -> Result<Subscription<Notif>, RpcError>
    where
        Params: ToRpcParams + Send,
        Notif: DeserializeOwned,
    {
        match self {
            Conn::Streams(c) => c.subscribe(subscribe_method, params, unsubscribe_method).await,
            Conn::Calls(_) => Err(no_streams(subscribe_method)),
        }
    }

    async fn subscribe_to_method<Notif>(
        &self,
        method: &str,
    ) -> Result<Subscription<Notif>, RpcError>
    where
        Notif: DeserializeOwned,
    {
        match self {
            Conn::Streams(c) => c.subscribe_to_method(method).await,
            Conn::Calls(_) => Err(no_streams(method)),
        }
    }
}

/// A connection's failure as the user is told of it: unreachable (exit 3), or refused (a
/// certificate not trusted, a login refused: exit 1).
fn connect_error(
    e: ClientError,
    addr: &str,
    tls: bool,
    start_hint: &str,
    token_hint: &str,
) -> anyhow::Error {
    match e {
        e if e.is_unreachable() => {
            let why = unreachable_why(&e);
            if refused_by_tls(&e, tls) {
                // Reached, but not trusted: not a daemon to start.
                return CliError::Refused {
                    message: format!("TLS to {addr} refused: {why}"),
                    hint: Some(
                        "the daemon logs its certificate's fingerprint at start (\"TLS on\"), \
                         and every join token ends with it"
                            .into(),
                    ),
                }
                .into();
            }
            CliError::Unreachable { addr: addr.to_string(), why, hint: start_hint.to_string() }
                .into()
        }
        ClientError::Login(inner) => {
            let message = match &inner {
                RpcError::Call(obj) => obj.message().to_string(),
                other => other.to_string(),
            };
            CliError::Refused {
                message: format!("login refused: {message}"),
                hint: Some(token_hint.to_string()),
            }
            .into()
        }
        e => e.into(),
    }
}

/// What made a connection fail before the daemon answered.
fn unreachable_why(e: &ClientError) -> String {
    match e {
        ClientError::Connect { source, .. } => source.to_string(),
        ClientError::Login(inner) => inner.to_string(),
    }
}

/// Whether a connection that failed reached a server whose certificate was not trusted: not a
/// daemon to start, nor one to pass over for another.
fn refused_by_tls(e: &ClientError, tls: bool) -> bool {
    tls && unreachable_why(e).contains("certificate")
}

impl Dial {
    /// Connects to the first of `addrs` that answers, and says which. A refusal (a login or
    /// a certificate) is not tried elsewhere: a cluster's servers share their token and
    /// certificate authority. When none answers, the error names them all.
    async fn connect_any(&self, addrs: &[String]) -> Result<(Conn, String), (ClientError, String)> {
        let mut unreachable = None;
        for addr in addrs {
            match self.connect(addr).await {
                Ok(c) => return Ok((c, addr.clone())),
                Err(e) if e.is_unreachable() && !refused_by_tls(&e, self.tls.is_some()) => {
                    unreachable = Some(e)
                }
                Err(e) => return Err((e, addr.clone())),
            }
        }
        Err((unreachable.expect("at least one address"), addrs.join(",")))
    }

    async fn connect(&self, addr: &str) -> Result<Conn, ClientError> {
        let (token, tls) = (self.token.as_deref(), self.tls.clone());
        if self.streams {
            Client::connect_tls(addr, token, tls).await.map(Conn::Streams)
        } else {
            CallClient::connect_tls(addr, token, tls).await.map(Conn::Calls)
        }
    }
}

/// A subscription asked of a calls-only connection: a command that follows a stream must say
/// so in [`Command::follows_a_stream`].
fn no_streams(method: &str) -> RpcError {
    RpcError::Custom(format!("{method} needs a streaming connection"))
}

/// What every command needs: the connection, where it goes, and how to print.
pub(crate) struct Ctx {
    /// The connection to the daemon.
    pub client: Conn,
    /// The address dialled (the one that answered, of several).
    pub addr: String,
    /// Every address given (a cluster's servers), in the order they are tried.
    pub addrs: Vec<String>,
    /// `--json`.
    pub json: bool,
    /// How to start the daemon, for the unreachable hint.
    start_hint: String,
    /// Where the token came from, for the unauthorized hint.
    token_hint: String,
    /// How it connected, to dial again ([`Ctx::redial`]).
    dial: Dial,
}

/// How a [`Ctx`] connected.
#[derive(Clone)]
struct Dial {
    token: Option<String>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    streams: bool,
}

impl Ctx {
    /// Works out the address and token, and connects (logging in when there is a token): with
    /// the async client when the command follows a stream, else with the blocking one.
    async fn connect(cli: &Cli, streams: bool) -> anyhow::Result<Ctx> {
        let default_dir = default_state_dir();
        let state_dir = cli.state_dir.clone().unwrap_or_else(|| default_dir.clone());
        let addrs = match &cli.addr {
            Some(a) => parse_addrs(a)?,
            None => vec![
                read_trimmed(&state_dir.join(ADDRESS_FILE))
                    .unwrap_or_else(|| DEFAULT_LISTEN.to_string()),
            ],
        };
        let token_file = state_dir.join("token");
        // An empty --token or TASKD_TOKEN counts as not given.
        let given = cli.token.as_deref().map(str::trim).filter(|t| !t.is_empty());
        let token = match given {
            Some(t) => Some(t.to_string()),
            // No token file means a daemon with `--auth none` (or none started yet): try
            // without logging in; a daemon that wants one answers "unauthorized" with a hint.
            None => read_trimmed(&token_file),
        };
        let start_hint = if addrs.len() > 1 {
            "none of the servers given answered (or the one in use went away): start one \
             (taskd --store postgres://… --name NAME); taskctl status on any server lists them all"
                .to_string()
        } else if state_dir == default_dir {
            "start it with: taskd (or pass --state-dir/--addr for a daemon elsewhere)".to_string()
        } else {
            format!("start it with: taskd --state-dir {}", state_dir.display())
        };
        let token_hint = if given.is_some() {
            format!(
                "the token given with --token or TASKD_TOKEN was refused; the daemon's token is in {}",
                token_file.display()
            )
        } else {
            format!(
                "taskctl reads the token from {}; pass --state-dir for another daemon, or --token",
                token_file.display()
            )
        };
        let trust = match (&cli.fingerprint, &cli.ca) {
            (Some(fp), _) => Some(crate::tls::Trust::Fingerprint(
                crate::tls::normalise_fingerprint(fp).ok_or_else(|| {
                    CliError::Usage(format!(
                        "--fingerprint {fp:?}: not a SHA-256 fingerprint (64 hex digits)"
                    ))
                })?,
            )),
            (None, Some(ca)) => Some(crate::tls::Trust::Ca(ca.clone())),
            (None, None) => None,
        };
        let tls = match &trust {
            Some(t) => {
                Some(crate::tls::client_config(t).map_err(|e| CliError::Usage(format!("{e:#}")))?)
            }
            None => None,
        };
        let dial = Dial { token, tls, streams };
        let (client, addr) = dial.connect_any(&addrs).await.map_err(|(e, at)| {
            connect_error(e, &at, dial.tls.is_some(), &start_hint, &token_hint)
        })?;
        Ok(Ctx { client, addr, addrs, json: cli.json, start_hint, token_hint, dial })
    }

    /// A new connection to the same daemon, as this one was made: for a command that goes on
    /// after its connection was lost (a cluster's server that went away: another of the
    /// servers given, or one that took over its address). Its errors are the first
    /// connection's.
    pub async fn redial(&self) -> anyhow::Result<Ctx> {
        let tls = self.dial.tls.is_some();
        let (client, addr) =
            self.dial.connect_any(&self.addrs).await.map_err(|(e, at)| {
                connect_error(e, &at, tls, &self.start_hint, &self.token_hint)
            })?;
        Ok(Ctx {
            client,
            addr,
            addrs: self.addrs.clone(),
            json: self.json,
            start_hint: self.start_hint.clone(),
            token_hint: self.token_hint.clone(),
            dial: self.dial.clone(),
        })
    }

    /// Awaits one call and turns its error into a [`CliError`] with the right exit code.
    pub async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, RpcError>>,
    ) -> anyhow::Result<T> {
        fut.await.map_err(|e| self.rpc_error(e).into())
    }

    /// The daemon went away mid-command (exit 3).
    pub fn unreachable(&self, why: &str) -> CliError {
        CliError::Unreachable {
            addr: self.addr.clone(),
            why: why.to_string(),
            hint: self.start_hint.clone(),
        }
    }

    /// Maps a call's error: connection trouble is exit 3, an answer from the daemon exit 1.
    pub fn rpc_error(&self, e: RpcError) -> CliError {
        if is_connection_error(&e) {
            return self.unreachable(&e.to_string());
        }
        match e {
            RpcError::Call(obj) => {
                let field = obj
                    .data()
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(d.get()).ok())
                    .and_then(|d| d.get("field").and_then(|f| f.as_str()).map(str::to_string));
                let message = match (obj.code(), field) {
                    (codes::INVALID_DEFINITION, Some(field)) => {
                        // The daemon's message starts with the field already
                        // ("cron: expected 5 or 6 fields"); add it only if it does not.
                        let msg = obj.message();
                        if msg.starts_with(&format!("{field}:")) {
                            format!("invalid definition: {msg}")
                        } else {
                            format!("invalid definition: {field}: {msg}")
                        }
                    }
                    _ => obj.message().to_string(),
                };
                let hint = (obj.code() == codes::UNAUTHORIZED).then(|| self.token_hint.clone());
                CliError::Refused { message, hint }
            }
            other => CliError::Refused { message: other.to_string(), hint: None },
        }
    }
}

/// `--addr`'s addresses: one, or a cluster's servers separated by commas.
fn parse_addrs(given: &str) -> Result<Vec<String>, CliError> {
    let addrs: Vec<String> = given.split(',').map(|a| a.trim().to_string()).collect();
    match addrs.iter().find(|a| !is_host_port(a)) {
        Some(bad) => Err(CliError::Usage(format!(
            "invalid --addr {bad:?} (or TASKD_ADDR): expected HOST:PORT, e.g. {DEFAULT_LISTEN}, \
             or several separated by commas"
        ))),
        None => Ok(addrs),
    }
}

/// Whether `s` looks like an address to dial: `HOST:PORT` with a port number, the host a
/// name, an IPv4 address or a bracketed IPv6 address.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    host_ok && port.parse::<u16>().is_ok()
}

/// The trimmed contents of a small file, or `None` when it is missing, unreadable or empty.
fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_and_port() {
        for ok in ["127.0.0.1:3333", "localhost:1", "[::1]:3333", "my-host.example:80"] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in ["nonsense", "127.0.0.1", ":3333", "host:port", "a b:1", "[::1:3333", "h:99999"]
        {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn edit_help_claims_no_defaults() {
        let mut cmd = command();
        let edit = cmd.find_subcommand_mut("edit").expect("edit");
        let help = edit.render_long_help().to_string();
        for claim in ["[default: skip]", "[default: 5s]", "[default: on-failure]", "[default: 0]"] {
            assert!(!help.contains(claim), "{claim}: {help}");
        }
        assert!(!help.contains("Create without starting"), "{help}");
        let add = command().find_subcommand("add").expect("add").clone().render_long_help();
        assert!(add.to_string().contains("[default: skip]"), "{add}");
    }
}
