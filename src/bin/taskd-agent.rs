//! `taskd-agent`: the host agent alone, built without the server (store, scheduler, RPC
//! server), so that it maps less code than `taskd` does. `taskd agent` runs it when it is
//! installed beside `taskd`; the two take the same flags.

use std::process::ExitCode;

use clap::Parser;
use taskd::agent::AgentArgs;
use taskd::config::LogFormat;
use taskd::process::{init_tracing, stop_on_signals};

/// `taskd-agent`'s command line: `taskd agent`'s flags.
#[derive(Debug, Parser)]
#[command(
    name = "taskd-agent",
    version,
    about = "The taskd host agent (the same as `taskd agent`)"
)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(LogFormat::Text);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskd-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        let stop = stop_on_signals()?;
        taskd::agent::run(cli.agent, stop).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskd-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
