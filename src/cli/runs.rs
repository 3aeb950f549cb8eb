//! `taskctl runs`, `logs` and `cancel`: the `Run.*` methods.

use clap::Args;
use jsonrpsee::core::client::SubscriptionCloseReason;

use jsonrpsee::core::ClientError as RpcError;
use jsonrpsee::types::error::OVERSIZED_RESPONSE_CODE;

use super::output::{self, duration_ms, exit_of, kind_and_schedule, relative};
use super::{CliError, Ctx};
use crate::rpc::run::RunApiClient;
use crate::rpc::types::{FollowArg, FollowItem, LogsArg, LogsResult, RunInfo, RunListArg};
use crate::run::RunState;
use crate::store::EventKind;
use crate::store::logs::last_lines;

/// Bytes asked for per `Run.Logs` page. The daemon caps a response at 1 MiB including its
/// JSON wrapping and escapes, so a page stays well below that.
const LOG_PAGE: u32 = 64 * 1024;

/// `--limit` for `runs`: 1 to 1000.
pub(super) fn run_limit(s: &str) -> Result<u32, String> {
    match s.trim().parse::<i64>() {
        Ok(n @ 1..=1000) => Ok(n as u32),
        _ => Err("must be 1-1000".into()),
    }
}

/// A run id argument.
fn run_id(s: &str) -> Result<i64, String> {
    s.trim().parse::<i64>().map_err(|_| "must be a run id (a number)".into())
}

/// `taskctl runs`.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs of this unit
    pub unit: Option<String>,
    /// Only runs in this state
    #[arg(long, value_name = "S", value_parser = RunState::ALL.map(RunState::as_str))]
    pub state: Option<String>,
    /// At most N runs, 1-1000 [default: 50]
    #[arg(
        long,
        short = 'n',
        value_name = "N",
        value_parser = run_limit,
        allow_negative_numbers = true
    )]
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
    #[arg(value_name = "RUN", value_parser = run_id, allow_negative_numbers = true)]
    pub run: i64,
}

/// `taskctl runs`.
pub async fn runs(ctx: &Ctx, a: RunsArgs) -> anyhow::Result<()> {
    let limit = a.limit.unwrap_or(50);
    let arg = RunListArg { unit: a.unit, state: a.state, limit: Some(limit), before: a.before };
    let runs = ctx.call(ctx.client.list(Some(arg))).await?;
    if ctx.json {
        return output::json(&runs);
    }
    if runs.is_empty() {
        return output::line("no runs");
    }
    let mut t = output::Table::new(&[
        "ID", "UNIT", "STATE", "TRIGGER", "ATTEMPT", "STARTED", "DURATION", "EXIT", "REASON",
    ])
    .flexible(&["UNIT", "REASON"]);
    for r in &runs {
        t.add_row(vec![
            output::Cell::new(r.id.to_string()),
            output::Cell::new(&r.unit),
            output::state_cell(&r.state),
            output::Cell::new(&r.trigger),
            output::Cell::new(r.attempt.to_string()),
            output::Cell::new(r.started_at.as_deref().map(relative).unwrap_or_default()),
            output::Cell::new(r.duration_ms.map(duration_ms).unwrap_or_default()),
            output::Cell::new(exit_of(r)),
            output::Cell::new(r.reason.as_deref().unwrap_or_default()),
        ]);
    }
    output::print_table(&t)?;
    // A full page probably has more behind it: say how to get them.
    if runs.len() == limit as usize
        && let Some(last) = runs.last()
    {
        eprintln!("… older runs: taskctl runs --before {} (or --limit up to 1000)", last.id);
    }
    Ok(())
}

/// The run a `logs` target names: a number is a run id, anything else a unit's newest run.
/// With `wait`, a unit that has no run yet is waited for (`logs -f` of a unit just added
/// with a schedule).
async fn resolve_run(ctx: &Ctx, target: &str, wait: bool) -> anyhow::Result<i64> {
    // A number is a run id; a unit named like a number is found when no run has that id.
    if let Ok(id) = target.parse::<i64>() {
        match ctx.client.get(id).await {
            Err(e)
                if crate::rpc::client::error_code(&e)
                    == Some(crate::error::codes::RUN_NOT_FOUND) => {}
            _ => return Ok(id),
        }
    }
    let arg = RunListArg { unit: Some(target.to_string()), limit: Some(1), ..Default::default() };
    let runs = ctx.call(ctx.client.list(Some(arg))).await?;
    match runs.first() {
        Some(r) => Ok(r.id),
        None => {
            // Say whether the unit exists at all: "not found" and "no runs yet" need
            // different fixes.
            ctx.call(crate::rpc::unit::TaskUnitApiClient::get(&ctx.client, target.to_string()))
                .await?;
            if wait {
                return first_run(ctx, target).await;
            }
            Err(CliError::Refused {
                message: format!("unit {target:?} has no runs yet"),
                hint: Some(format!("'taskctl logs -f {target}' waits for its first run")),
            }
            .into())
        }
    }
}

/// Waits for the first run of `unit` and returns its id.
async fn first_run(ctx: &Ctx, unit: &str) -> anyhow::Result<i64> {
    use crate::rpc::events::EventsApiClient;
    use crate::rpc::types::SubscribeArg;
    // Subscribe before looking again, so a run that starts in between is not missed.
    let mut sub = ctx.call(ctx.client.subscribe_events(Some(SubscribeArg::default()))).await?;
    let arg = RunListArg { unit: Some(unit.to_string()), limit: Some(1), ..Default::default() };
    if let Some(r) = ctx.call(ctx.client.list(Some(arg))).await?.first() {
        return Ok(r.id);
    }
    if !ctx.json {
        eprintln!("taskctl: waiting for the first run of {unit}…");
    }
    loop {
        let item = tokio::select! {
            item = sub.next() => item,
            // Interrupted while waiting: nothing to show, and nothing failed.
            _ = tokio::signal::ctrl_c() => return Err(CliError::Closed.into()),
        };
        match item {
            Some(Ok(e))
                if e.unit == unit && e.kind.parse::<EventKind>().is_ok_and(EventKind::is_run) =>
            {
                if let Some(id) = e.run {
                    return Ok(id);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(anyhow::Error::new(e).context("bad event from taskd")),
            None => return Err(CliError::Disconnected.into()),
        }
    }
}

/// `taskctl logs`.
pub async fn logs(ctx: &Ctx, a: LogsArgs) -> anyhow::Result<()> {
    let id = resolve_run(ctx, &a.target, a.follow).await?;
    let stream = if a.stdout {
        Some("stdout".to_string())
    } else if a.stderr {
        Some("stderr".to_string())
    } else {
        None
    };
    // Following is all `Run.Follow`, `--tail` included (it reads what is stored first, then
    // goes live): reading with `Run.Logs` before would show an active run's in-memory tail
    // twice.
    if a.follow {
        let arg = FollowArg { id, offset: None, stream, timestamps: a.timestamps, tail: a.tail };
        return follow(ctx, arg).await;
    }
    // With --tail, one call gives the last lines and where they end; following goes on
    // from there.
    let (all, any) = match a.tail {
        Some(n) => {
            let page = tail_page(ctx, id, &stream, n, a.timestamps).await?;
            if !ctx.json {
                output::emit(&page.data)?;
            }
            let any = !page.data.is_empty();
            (page, any)
        }
        None => read_all(ctx, id, &stream, a.timestamps, !ctx.json).await?,
    };
    if ctx.json {
        output::json(&all)?;
    }
    if !any && !all.active {
        return says_why_nothing(ctx, id).await;
    }
    Ok(())
}

/// Reads a run's whole stored log page by page, printing each page as it comes when `print`
/// is set. Returns what was read (its data only when not printed) and where it ends, and
/// whether there was any output.
async fn read_all(
    ctx: &Ctx,
    id: i64,
    stream: &Option<String>,
    timestamps: bool,
    print: bool,
) -> anyhow::Result<(LogsResult, bool)> {
    let mut offset = 0;
    let mut all = LogsResult::default();
    let mut any = false;
    loop {
        let arg = LogsArg {
            id,
            stream: stream.clone(),
            offset: Some(offset),
            limit: Some(LOG_PAGE),
            tail: None,
            timestamps,
        };
        let page = ctx.call(ctx.client.logs(arg)).await?;
        any |= !page.data.is_empty();
        if print {
            output::emit(&page.data)?;
        } else {
            all.data.push_str(&page.data);
        }
        let progressed = page.next_offset > offset;
        offset = page.next_offset;
        all.next_offset = page.next_offset;
        all.eof = page.eof;
        all.truncated |= page.truncated;
        all.active = page.active;
        if page.eof || !progressed {
            break;
        }
    }
    Ok((all, any))
}

/// The last `n` lines of a run's log. The daemon answers that in one call, unless those
/// lines are longer than it may send at once (a long line without newlines): then the
/// whole log is read in pages and cut here.
async fn tail_page(
    ctx: &Ctx,
    id: i64,
    stream: &Option<String>,
    n: u32,
    timestamps: bool,
) -> anyhow::Result<LogsResult> {
    let arg = LogsArg {
        id,
        stream: stream.clone(),
        offset: None,
        limit: Some(LOG_PAGE),
        tail: Some(n),
        timestamps,
    };
    match ctx.client.logs(arg).await {
        Ok(page) => Ok(page),
        Err(RpcError::Call(e)) if e.code() == OVERSIZED_RESPONSE_CODE => {
            let (mut all, _) = read_all(ctx, id, stream, timestamps, false).await?;
            all.data = last_lines(&all.data, n as usize);
            Ok(all)
        }
        Err(e) => Err(ctx.rpc_error(e).into()),
    }
}

/// After a finished run's log turned out empty: a run that failed to start says why (exit
/// 1); one that ended otherwise than `succeeded` says how, on standard error.
async fn says_why_nothing(ctx: &Ctx, id: i64) -> anyhow::Result<()> {
    let r = ctx.call(ctx.client.get(id)).await?;
    if let Some(why) = failed_to_start(&r) {
        return Err(CliError::Refused {
            message: format!("run {} failed to start: {why}", r.id),
            hint: None,
        }
        .into());
    }
    if !ctx.json && r.state != "succeeded" && !matches!(r.state.as_str(), "queued" | "running") {
        eprintln!("taskctl: {}, without output", ended(&r));
    }
    Ok(())
}

/// Why a run failed to start (a missing program or working directory…), if it did: it
/// failed without an exit code or signal, with a reason.
fn failed_to_start(r: &RunInfo) -> Option<&str> {
    (r.state == "failed" && r.exit_code.is_none() && r.signal.is_none())
        .then_some(r.reason.as_deref())
        .flatten()
        .map(|why| why.strip_prefix("cannot start: ").unwrap_or(why))
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
                        if let Some(why) = failed_to_start(&run) {
                            return Err(CliError::Refused {
                                message: format!("run {} failed to start: {why}", run.id),
                                hint: None,
                            }
                            .into());
                        }
                        if !ctx.json && run.state != "succeeded" {
                            eprintln!("taskctl: {}", ended(&run));
                        }
                        return Ok(());
                    }
                    FollowItem::Lagged { message } => {
                        return Err(CliError::Refused {
                            message: format!("the daemon stopped following: {message}"),
                            hint: Some("read it with `taskctl logs RUN` (without -f)".into()),
                        }
                        .into());
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
                    _ => CliError::Disconnected,
                }
                .into());
            }
        }
    }
}

/// How a run ended, in a few words: `run 12 failed (exit 3)`.
pub(super) fn ended(r: &RunInfo) -> String {
    let mut s = format!("run {} {}", r.id, r.state);
    let exit = exit_of(r);
    if !exit.is_empty() {
        s.push_str(&format!(
            " ({})",
            if r.signal.is_some() { exit } else { format!("exit {exit}") }
        ));
    }
    // A reason that only repeats the state (`cancelled`) says nothing more.
    if let Some(reason) = r.reason.as_ref().filter(|why| **why != r.state) {
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
    // The daemon restarts a service or tick unit after a cancelled run, as after a crash:
    // say so, and how to keep it down.
    let kind = match crate::rpc::unit::TaskUnitApiClient::get(&ctx.client, r.unit.clone()).await {
        Ok(u) => kind_and_schedule(&u.definition).0,
        Err(_) => String::new(),
    };
    let what = match kind.as_str() {
        "service" => "a service",
        "tick" => "a tick unit",
        _ => return output::line(&ended(&r)),
    };
    output::line(&format!(
        "{}; {} is {what} and restarts (use 'taskctl stop {}' to keep it down)",
        ended(&r),
        r.unit,
        r.unit
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_and_limits_are_checked() {
        assert_eq!(run_id("42"), Ok(42));
        assert_eq!(run_id("abc"), Err("must be a run id (a number)".into()));
        assert_eq!(run_limit("1000"), Ok(1000));
        for bad in ["0", "1001", "-1", "x"] {
            assert_eq!(run_limit(bad), Err("must be 1-1000".into()), "{bad}");
        }
    }
}
