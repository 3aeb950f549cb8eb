//! `taskd`: the daemon's entry point. Parses flags, sets up tracing, binds the listener's port,
//! turns SIGTERM/SIGINT into cancellation of the root token, and runs the daemon.

use std::process::ExitCode;

use clap::Parser;
use taskd::config::{Args, Command, Config, LogFormat, Refused};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Logs to stderr, filtered by `RUST_LOG` (`info` when unset or unreadable): a default level
/// and `target=level` directives, such as `warn,taskd::store=debug`.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Empty directives (`RUST_LOG=`, `warn,`) are skipped: `Targets` would read one as "every
    // target at TRACE".
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    let directives: Vec<&str> =
        directives.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let filter = Some(directives.join(","))
        .filter(|d| !d.is_empty())
        .and_then(|d| d.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
}

/// A token cancelled by SIGTERM or SIGINT.
fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    let root = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = root.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    });
    Ok(root)
}

/// Exit status for a configuration the daemon refuses (bad flags, files or combinations).
const EXIT_USAGE: u8 = 2;

async fn run(args: Args) -> Result<(), (u8, anyhow::Error)> {
    let usage = |e: anyhow::Error| (EXIT_USAGE, e);
    if let Some(Command::Agent(agent)) = args.command {
        init_tracing(args.log_format.unwrap_or(LogFormat::Text));
        return taskd::agent::run(agent, stop_on_signals().map_err(|e| (1, e))?)
            .await
            .map_err(|e| (1, e));
    }
    let cfg = Config::resolve(&args).map_err(usage)?;
    init_tracing(cfg.log_format);
    // Bound, not listening: the daemon starts accepting once its token and store are ready.
    let socket = taskd::rpc::listener::bind(&cfg.listen).await.map_err(|e| {
        let e = anyhow::anyhow!(
            "cannot listen on {}: {e} (is another taskd running? try --listen)",
            cfg.listen
        );
        (1, e)
    })?;
    let root = stop_on_signals().map_err(|e| (1, e))?;
    taskd::daemon::run(cfg, socket, root).await.map_err(|e| {
        let code = if e.is::<Refused>() { EXIT_USAGE } else { 1 };
        (code, e)
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("taskd: {e:#}");
            ExitCode::from(code)
        }
    }
}
