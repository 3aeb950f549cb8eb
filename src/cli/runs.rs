//! `taskctl runs`, `logs` and `cancel`: the `Run.*` methods.

use clap::Args;
use comfy_table::Cell;
use jsonrpsee::core::client::SubscriptionCloseReason;

use super::output::{self, duration_ms, exit_of, relative};
use super::{CliError, Ctx};
use crate::rpc::run::RunApiClient;
use crate::rpc::types::{FollowArg, FollowItem, LogsArg, LogsResult, RunInfo, RunListArg};

/// Bytes asked for per `Run.Logs` page.
const LOG_PAGE: u32 = 1 << 20;

/// `taskctl runs`.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs of this unit
    pub unit: Option<String>,
    /// Only runs in this state (queued, running, succeeded, failed, timed_out, cancelled, lost)
    #[arg(long, value_name = "S")]
    pub state: Option<String>,
    /// At most N runs [default: 50]
    #[arg(long, short = 'n', value_name = "N")]
    pub limit: Option<u32>,
    /// Only runs with an id below this (paging)
    #[arg(long, value_name = "ID")]
    pub before: Option<i64>,
}

/// `taskctl logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A run id, or a unit name for that unit's newest run
    #[arg(value_name = "RUN|NAME")]
    pub target: String,
    /// Follow the output as it is written, until the run ends
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only standard output
    #[arg(long, conflicts_with = "stderr")]
    pub stdout: bool,
    /// Only standard error
    #[arg(long)]
    pub stderr: bool,
    /// Only the last N lines
    #[arg(long, short = 'n', value_name = "N")]
    pub tail: Option<u32>,
    /// Prefix lines with the time they were written
    #[arg(long, short = 't')]
    pub timestamps: bool,
}

/// `taskctl cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The run id
    pub run: i64,
}

/// `taskctl runs`.
pub async fn runs(ctx: &Ctx, a: RunsArgs) -> anyhow::Result<()> {
    let arg = RunListArg { unit: a.unit, state: a.state, limit: a.limit, before: a.before };
    let runs = ctx.call(ctx.client.list(Some(arg))).await?;
    if ctx.json {
        return output::json(&runs);
    }
    if runs.is_empty() {
        return output::line("no runs");
    }
    let mut t = output::table(&[
        "ID", "UNIT", "STATE", "TRIGGER", "ATTEMPT", "STARTED", "DURATION", "EXIT", "REASON",
    ]);
    for r in &runs {
        t.add_row(vec![
            Cell::new(r.id),
            Cell::new(&r.unit),
            output::state_cell(&r.state),
            Cell::new(&r.trigger),
            Cell::new(r.attempt),
            Cell::new(r.started_at.as_deref().map(relative).unwrap_or_default()),
            Cell::new(r.duration_ms.map(duration_ms).unwrap_or_default()),
            Cell::new(exit_of(r)),
            Cell::new(r.reason.as_deref().unwrap_or_default()),
        ]);
    }
    output::print_table(&t)
}

/// The run a `logs` target names: a number is a run id, anything else a unit's newest run.
async fn resolve_run(ctx: &Ctx, target: &str) -> anyhow::Result<i64> {
    if let Ok(id) = target.parse::<i64>() {
        return Ok(id);
    }
    let arg = RunListArg { unit: Some(target.to_string()), limit: Some(1), ..Default::default() };
    let runs = ctx.call(ctx.client.list(Some(arg))).await?;
    match runs.first() {
        Some(r) => Ok(r.id),
        None => {
            // Say whether the unit exists at all: "not found" and "no runs yet" need
            // different fixes.
            ctx.call(crate::rpc::unit::TaskUnitApiClient::get(&*ctx.client, target.to_string()))
                .await?;
            Err(CliError::Refused {
                message: format!("unit {target:?} has no runs yet"),
                hint: None,
            }
            .into())
        }
    }
}

/// `taskctl logs`.
pub async fn logs(ctx: &Ctx, a: LogsArgs) -> anyhow::Result<()> {
    let id = resolve_run(ctx, &a.target).await?;
    let stream = if a.stdout {
        Some("stdout".to_string())
    } else if a.stderr {
        Some("stderr".to_string())
    } else {
        None
    };
    // Following from the start is all `Run.Follow` (it reads the stored log first): reading
    // with `Run.Logs` before would show an active run's in-memory tail twice.
    if a.follow && a.tail.is_none() {
        let arg = FollowArg { id, offset: None, stream, timestamps: a.timestamps };
        return follow(ctx, arg).await;
    }
    // With --tail, one call gives the last lines and where they end; following goes on
    // from there.
    let mut offset = 0;
    let mut all = LogsResult::default();
    loop {
        let arg = LogsArg {
            id,
            stream: stream.clone(),
            offset: Some(offset),
            limit: Some(LOG_PAGE),
            tail: a.tail,
            timestamps: a.timestamps,
        };
        let page = ctx.call(ctx.client.logs(arg)).await?;
        if ctx.json {
            all.data.push_str(&page.data);
        } else {
            output::emit(&page.data)?;
        }
        let progressed = page.next_offset > offset;
        offset = page.next_offset;
        all.next_offset = page.next_offset;
        all.eof = page.eof;
        all.truncated |= page.truncated;
        all.active = page.active;
        if page.eof || !progressed || a.tail.is_some() {
            break;
        }
    }
    if !a.follow {
        return if ctx.json { output::json(&all) } else { Ok(()) };
    }
    if ctx.json && !all.data.is_empty() {
        output::json_line(&FollowItem::Output { stream: stream.clone(), data: all.data })?;
    }
    follow(ctx, FollowArg { id, offset: Some(offset), stream, timestamps: a.timestamps }).await
}

/// Prints a run's output as it comes (`Run.Follow`) until the final message.
async fn follow(ctx: &Ctx, arg: FollowArg) -> anyhow::Result<()> {
    let mut sub = ctx.call(ctx.client.follow(arg)).await?;
    loop {
        let item = tokio::select! {
            item = sub.next() => item,
            // Ctrl-C stops following; the run goes on.
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match item {
            Some(Ok(item)) => {
                if ctx.json {
                    output::json_line(&item)?;
                }
                match item {
                    FollowItem::Output { data, .. } => {
                        if !ctx.json {
                            output::emit(&data)?;
                        }
                    }
                    FollowItem::End { run } => {
                        if !ctx.json && run.state != "succeeded" {
                            eprintln!("taskctl: {}", ended(&run));
                        }
                        return Ok(());
                    }
                }
            }
            Some(Err(e)) => return Err(anyhow::Error::new(e).context("bad message from taskd")),
            None => {
                return Err(match sub.close_reason() {
                    Some(SubscriptionCloseReason::Lagged) => CliError::Refused {
                        message: "fell behind the run's output; the daemon closed the stream"
                            .into(),
                        hint: Some("read it with `taskctl logs RUN` (without -f)".into()),
                    },
                    _ => ctx.unreachable("the connection closed before the run ended"),
                }
                .into());
            }
        }
    }
}

/// How a run ended, in a few words: `run 12 failed (exit 3)`.
fn ended(r: &RunInfo) -> String {
    let mut s = format!("run {} {}", r.id, r.state);
    let exit = exit_of(r);
    if !exit.is_empty() {
        s.push_str(&format!(
            " ({})",
            if r.signal.is_some() { exit } else { format!("exit {exit}") }
        ));
    }
    if let Some(reason) = &r.reason {
        s.push_str(&format!(": {reason}"));
    }
    s
}

/// `taskctl cancel`.
pub async fn cancel(ctx: &Ctx, a: CancelArgs) -> anyhow::Result<()> {
    let r = ctx.call(ctx.client.cancel(a.run)).await?;
    if ctx.json {
        return output::json(&r);
    }
    output::line(&ended(&r))
}
