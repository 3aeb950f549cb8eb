//! `taskd`: the daemon's entry point. Parses flags, sets up tracing, binds the listener's port,
//! turns SIGTERM/SIGINT into cancellation of the root token, and runs the daemon.

use std::process::ExitCode;

use clap::Parser;
use taskd::config::{Args, Command, Config, LogFormat, Refused, StoreCommand};
use taskd::process::{init_tracing, stop_on_signals};
use taskd::store::copy::Place;

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
    if let Some(Command::Store(StoreCommand::Copy { from, to })) = &args.command {
        init_tracing(args.log_format.unwrap_or(LogFormat::Text));
        let (from, to) = (Place::parse(from), Place::parse(to));
        let copied = taskd::store::copy::copy(&from, &to).await.map_err(|e| (1, e.into()))?;
        println!("copied {copied}");
        return Ok(());
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

/// `taskd agent …` becomes `taskd-agent …` when that binary is installed beside this one: the
/// agent then maps only its own code (an idle agent's memory is mostly the pages of the binary
/// it runs). Returns only if it is not there (or cannot be run): the agent then runs here.
fn exec_lean_agent() {
    use std::os::unix::process::CommandExt;
    let mut argv = std::env::args_os().skip(1);
    if argv.next().as_deref() != Some(std::ffi::OsStr::new("agent")) {
        return;
    }
    let Some(lean) = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("taskd-agent")))
        .filter(|p| p.is_file())
    else {
        return;
    };
    let err = std::process::Command::new(&lean).args(argv).exec();
    eprintln!("taskd: cannot run {} ({err}); running the agent in this process", lean.display());
}

fn main() -> ExitCode {
    taskd::daemon::process_started();
    exec_lean_agent();
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
