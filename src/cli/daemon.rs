//! `taskctl status`, `events`, `audit` and `completions`: the `Daemon`, `Events` and `Audit`
//! methods, and shell completion scripts.

use clap::Args;
use clap_complete::Shell;
use jsonrpsee::core::client::SubscriptionCloseReason;

use super::output::{self, parse_time};
use super::{CliError, Ctx, stdout_error};
use crate::rpc::audit::AuditApiClient;
use crate::rpc::daemon::DaemonApiClient;
use crate::rpc::events::EventsApiClient;
use crate::rpc::types::{AuditListArg, ConnectionCounts, EventInfo, SubscribeArg};

/// `taskctl events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// First replay the stored events after this sequence number
    #[arg(long, value_name = "SEQ")]
    pub after: Option<i64>,
}

/// `taskctl audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// At most N records, 1-1000 [default: 50]
    #[arg(
        long,
        short = 'n',
        value_name = "N",
        value_parser = super::runs::run_limit,
        allow_negative_numbers = true
    )]
    pub limit: Option<u32>,
    /// Only records with an id below this (paging)
    #[arg(long, value_name = "ID")]
    pub before: Option<i64>,
}

/// `taskctl audit`: the newest audit records as a table.
pub async fn audit(ctx: &Ctx, a: AuditArgs) -> anyhow::Result<()> {
    let limit = a.limit.unwrap_or(50);
    let arg = AuditListArg { limit: Some(limit), before: a.before };
    let rows = ctx.call(AuditApiClient::list(&ctx.client, Some(arg))).await?;
    if ctx.json {
        return output::json(&rows);
    }
    if rows.is_empty() {
        return output::line("no audit records");
    }
    let mut t = output::Table::new(&["ID", "TIME", "PEER", "METHOD", "UNIT", "OUTCOME"])
        .flexible(&["UNIT", "OUTCOME"]);
    for r in &rows {
        t.add_row(vec![
            output::Cell::new(r.id.to_string()),
            output::Cell::new(output::relative(&r.time)),
            output::Cell::new(&r.peer),
            output::Cell::new(&r.method),
            output::Cell::new(r.unit.as_deref().unwrap_or_default()),
            output::Cell::new(&r.outcome),
        ]);
    }
    output::print_table(&t)?;
    if rows.len() == limit as usize
        && let Some(last) = rows.last()
    {
        eprintln!("… older records: taskctl audit --before {} (or --limit up to 1000)", last.id);
    }
    Ok(())
}

/// `taskctl completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `taskctl completions SHELL`: the script on standard output.
pub fn completions(a: &CompletionsArgs) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut super::command(), "taskctl", &mut buf);
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, &buf).map_err(stdout_error)
}

/// `name: n, name: n` for the non-zero counts, `total` first.
fn counts<N: std::fmt::Display + PartialEq + Default>(
    m: &std::collections::BTreeMap<String, N>,
) -> String {
    let zero = N::default();
    let mut parts: Vec<String> = Vec::new();
    if let Some(t) = m.get("total") {
        parts.push(format!("{t} total"));
    }
    let rest: Vec<String> = m
        .iter()
        .filter(|(k, n)| k.as_str() != "total" && **n != zero)
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    if rest.is_empty() {
        return parts.join("");
    }
    format!("{} ({})", parts.join(""), rest.join(", "))
}

/// `4 of 1024 (3 logged in, 1 not yet)`.
fn connections(c: &ConnectionCounts) -> String {
    let open = c.authenticated + c.unauthenticated + c.probation;
    let waiting = c.unauthenticated + c.probation;
    if waiting == 0 {
        return format!("{open} of {}", c.max);
    }
    format!("{open} of {} ({} logged in, {waiting} not yet)", c.max, c.authenticated)
}

/// `taskctl status`.
pub async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let s = ctx.call(ctx.client.status(None)).await?;
    if ctx.json {
        return output::json(&s);
    }
    let rows = vec![
        ("version".to_string(), format!("taskd {}", s.version)),
        ("pid".into(), s.pid.to_string()),
        (
            "uptime".into(),
            format!(
                "{} (since {})",
                output::uptime(s.uptime_secs),
                output::local_time(&s.started_at)
            ),
        ),
        ("listening".into(), s.listeners.join(", ")),
        ("state dir".into(), s.state_dir.clone()),
        ("store".into(), s.store.clone()),
        ("auth".into(), s.auth.clone()),
        ("units".into(), counts(&s.units)),
        ("runs".into(), counts(&s.runs)),
        ("connections".into(), connections(&s.connections)),
        ("failed logins".into(), s.auth_failures.to_string()),
        ("agents".into(), counts(&s.agents)),
    ];
    let Some(c) = &s.cluster else { return output::emit(&output::key_values(&rows, "")) };
    let mut rows = rows;
    rows.push((
        "lease".into(),
        format!(
            "held by {} (epoch {}, {} left unless renewed)",
            c.holder,
            c.epoch,
            output::duration_ms(c.lease_left_ms.max(0))
        ),
    ));
    let mut text = output::key_values(&rows, "");
    let mut t = output::Table::new(&["SERVER", "ROLE", "ADDRESS", "VERSION", "LAST SEEN"]);
    for srv in &c.servers {
        t.add_row(vec![
            output::Cell::new(&srv.name),
            output::state_cell(&srv.role),
            output::Cell::new(&srv.address),
            output::Cell::new(&srv.version),
            output::Cell::new(output::relative(&srv.seen_at)),
        ]);
    }
    text.push('\n');
    text.push_str(&t.render(output::terminal_width()));
    output::emit(&text)
}

/// One event as a line: `12:03:04.123  run.finished  hello  #12  succeeded`.
fn event_line(e: &EventInfo) -> String {
    let time = parse_time(&e.time)
        .map(|t| t.to_zoned(output::local_zone()).strftime("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| e.time.clone());
    let run = e.run.map(|r| format!("#{r}")).unwrap_or_default();
    let state = e.state.as_deref().unwrap_or("");
    format!("{time}  {:<6} {:<13} {:<20} {:<7} {state}", e.seq, e.kind, e.unit, run)
        .trim_end()
        .to_string()
}

/// `taskctl events`: one line per event until interrupted or the daemon goes away.
pub async fn events(ctx: &Ctx, a: EventsArgs) -> anyhow::Result<()> {
    let arg = SubscribeArg { after_seq: a.after };
    let mut sub = ctx.call(ctx.client.subscribe_events(Some(arg))).await?;
    loop {
        let item = tokio::select! {
            item = sub.next() => item,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match item {
            Some(Ok(e)) => {
                if ctx.json {
                    output::json_line(&e)?;
                } else {
                    output::line(&event_line(&e))?;
                }
            }
            Some(Err(e)) => return Err(anyhow::Error::new(e).context("bad event from taskd")),
            None => {
                return Err(match sub.close_reason() {
                    Some(SubscriptionCloseReason::Lagged) => CliError::Refused {
                        message: "fell behind the daemon's events; the stream was closed".into(),
                        hint: Some("resume with `taskctl events --after SEQ`".into()),
                    },
                    _ => CliError::Disconnected,
                }
                .into());
            }
        }
    }
}
