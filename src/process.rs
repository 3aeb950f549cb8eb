//! What the `taskd` and `taskd-agent` processes set up before anything else: their own log,
//! and SIGTERM/SIGINT turned into a cancellation.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::LogFormat;

/// Logs to stderr, filtered by `RUST_LOG` (`info` when unset or unreadable): a default level
/// and `target=level` directives, such as `warn,taskd::store=debug`.
pub fn init_tracing(format: LogFormat) {
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
pub fn stop_on_signals() -> anyhow::Result<CancellationToken> {
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
