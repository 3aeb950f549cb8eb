//! Output rendering for `taskctl`: tables, relative times, durations, run outcomes and JSON.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use jiff::{Timestamp, Zoned};
use serde::Serialize;
use serde_json::Value;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::stdout_error;
use crate::rpc::types::RunInfo;

/// Writes `text` to standard output and flushes, so streamed lines appear at once.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(stdout_error)
}

/// Writes `text` and a newline.
pub fn line(text: &str) -> anyhow::Result<()> {
    emit(&format!("{text}\n"))
}

/// Prints a result as pretty JSON (one value, the method's wire shape).
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    line(&serde_json::to_string_pretty(value)?)
}

/// Prints one item of a stream as a single line of JSON.
pub fn json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    line(&serde_json::to_string(value)?)
}

/// A table for people to read: a header row, then left-aligned columns two blanks apart,
/// without borders. On a terminal narrower than the table the widest of its flexible columns
/// give way until it fits, and cells cut short end in `…`; anywhere else (a pipe, a file)
/// nothing is cut.
#[derive(Debug)]
pub struct Table {
    header: Vec<Cell>,
    flexible: Vec<bool>,
    rows: Vec<Vec<Cell>>,
}

/// One cell of a [`Table`]: its text, how many columns it takes, and its colour, if any.
#[derive(Debug)]
pub struct Cell {
    text: String,
    width: usize,
    colour: Option<&'static str>,
}

impl Cell {
    /// A cell showing `text`; control characters (a newline in a reason) become blanks, so a
    /// row stays one line.
    pub fn new(text: impl Into<String>) -> Cell {
        let mut text = text.into();
        // Most cells are printable ASCII: one column a byte, nothing to replace.
        if text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Cell { width: text.len(), text, colour: None };
        }
        if text.chars().any(char::is_control) {
            text = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        }
        Cell { width: text.width(), text, colour: None }
    }

    /// The cell in colour: an SGR parameter string (`"31"` is red).
    fn colour(mut self, sgr: &'static str) -> Cell {
        self.colour = Some(sgr);
        self
    }
}

impl Table {
    /// An empty table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| Cell::new(*h)).collect(),
            flexible: vec![false; header.len()],
            rows: Vec::new(),
        }
    }

    /// Lets the columns with these titles give way on a narrow terminal: free text such as
    /// names and reasons, not short values like times and counts that are useless cut.
    pub fn flexible(mut self, titles: &[&str]) -> Table {
        for (flexible, h) in self.flexible.iter_mut().zip(&self.header) {
            *flexible |= titles.contains(&h.text.as_str());
        }
        self
    }

    /// Adds a row: one cell per column.
    pub fn add_row(&mut self, row: Vec<Cell>) {
        self.rows.push(row);
    }

    /// The table as lines of text, at most `fit` columns wide when given (as far as the
    /// flexible columns can give way: each down to its title's width, at least 3), without
    /// trailing blanks.
    pub fn render(&self, fit: Option<usize>) -> String {
        let n = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|c| c.width).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.width);
            }
        }
        if let Some(fit) = fit {
            let mins: Vec<usize> = (0..n)
                .map(|i| {
                    if self.flexible[i] {
                        widths[i].min(self.header[i].width.max(3))
                    } else {
                        widths[i]
                    }
                })
                .collect();
            let mut excess =
                (widths.iter().sum::<usize>() + 2 * n.saturating_sub(1)).saturating_sub(fit);
            while excess > 0 {
                // The widest column that can still give way gives one column.
                let widest = (0..n).filter(|&i| widths[i] > mins[i]).max_by_key(|&i| widths[i]);
                let Some(i) = widest else { break };
                widths[i] -= 1;
                excess -= 1;
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let start = out.len();
            for (i, (cell, &w)) in row.iter().zip(&widths).enumerate() {
                let (shown, shown_width) = if cell.width > w {
                    let (text, width) = cut(&cell.text, w);
                    (Cow::Owned(text), width)
                } else {
                    (Cow::Borrowed(cell.text.as_str()), cell.width)
                };
                match cell.colour {
                    Some(sgr) => {
                        out.push_str("\x1b[");
                        out.push_str(sgr);
                        out.push('m');
                        out.push_str(&shown);
                        out.push_str("\x1b[0m");
                    }
                    None => out.push_str(&shown),
                }
                if i + 1 < n {
                    let pad = w - shown_width.min(w) + 2;
                    out.extend(std::iter::repeat_n(' ', pad));
                }
            }
            let kept = out[start..].trim_end_matches(' ').len();
            out.truncate(start + kept);
            out.push('\n');
        }
        out
    }
}

/// `text` cut to at most `width` columns, its end replaced by `…`, and the columns it takes
/// (one less than `width` when a wide character did not fit).
fn cut(text: &str, width: usize) -> (String, usize) {
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        out.push(c);
        used += w;
    }
    out.push('…');
    (out, used + 1)
}

/// The width of the terminal standard output is, if it is one that reports a usable width
/// (a pseudo-terminal may say 0 columns: fitting to that would help nobody).
pub fn terminal_width() -> Option<usize> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ only writes a `winsize` to the pointer given, which is valid.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col >= 20).then_some(usize::from(ws.ws_col))
}

/// Whether to colour output: only on a terminal, and never when `NO_COLOR` is set. Asked
/// once per process: a table of many rows asks for every cell.
fn colour() -> bool {
    static COLOUR: OnceLock<bool> = OnceLock::new();
    *COLOUR.get_or_init(|| {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    })
}

/// A table cell for a unit or run state, coloured by how it is doing when colour is on.
pub fn state_cell(state: &str) -> Cell {
    let cell = Cell::new(state);
    if !colour() {
        return cell;
    }
    match state {
        "failed" | "timed_out" | "lost" | "fatal" => cell.colour("31"),
        "running" | "succeeded" => cell.colour("32"),
        "backoff" | "queued" | "cancelled" => cell.colour("33"),
        "paused" => cell.colour("90"),
        _ => cell,
    }
}

/// Prints a table, fitted to the terminal when standard output is one.
pub fn print_table(t: &Table) -> anyhow::Result<()> {
    emit(&t.render(terminal_width()))
}

/// Parses an RFC 3339 time from the wire.
pub fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse::<Timestamp>().ok()
}

/// A relative time: `3s ago`, `in 5m10s`, `in 1h29m`, `3d4h ago`, `now`.
pub fn relative(s: &str) -> String {
    match parse_time(s) {
        Some(t) => relative_to(t, Timestamp::now()),
        None => s.to_string(),
    }
}

/// `t` relative to `now`: seconds below a minute, else the two largest units that fit.
pub fn relative_to(t: Timestamp, now: Timestamp) -> String {
    let secs = t.as_second() - now.as_second();
    if secs == 0 {
        return "now".into();
    }
    let span = short_secs(secs.unsigned_abs());
    if secs > 0 { format!("in {span}") } else { format!("{span} ago") }
}

/// Seconds as `42s`, `5m10s`, `1h29m`, `3d4h`: one unit below a minute, else two, rounded
/// down, the second left out when it is zero (`5m`, `2h`, `3d`).
fn short_secs(s: u64) -> String {
    let (big, big_unit, small, small_unit) = match s {
        0..60 => return format!("{s}s"),
        60..3600 => (s / 60, "m", s % 60, "s"),
        3600..86_400 => (s / 3600, "h", s % 3600 / 60, "m"),
        _ => (s / 86_400, "d", s % 86_400 / 3600, "h"),
    };
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit}{small}{small_unit}")
    }
}

/// A time as the local date and time: `2024-05-01 12:03:04 CEST`.
pub fn local_time(s: &str) -> String {
    match parse_time(s) {
        Some(t) => {
            let z: Zoned = t.to_zoned(local_zone());
            z.strftime("%Y-%m-%d %H:%M:%S %Z").to_string()
        }
        None => s.to_string(),
    }
}

/// The local time zone, found once per process. Without `TZ` it is read straight from
/// `/etc/localtime`: finding it by name (`TimeZone::system`) first lists the whole zoneinfo
/// tree, about 70 directories, which took longer than the rest of `taskctl show`. The
/// printed abbreviation (`CEST`) comes from the file either way.
pub fn local_zone() -> jiff::tz::TimeZone {
    static ZONE: OnceLock<jiff::tz::TimeZone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let from_file = || {
            let data = std::fs::read("/etc/localtime").ok()?;
            jiff::tz::TimeZone::tzif("localtime", &data).ok()
        };
        let tz_set = std::env::var_os("TZ").is_some_and(|v| !v.is_empty());
        (!tz_set).then(from_file).flatten().unwrap_or_else(jiff::tz::TimeZone::system)
    })
    .clone()
}

/// A time for humans: the local date and time, with the relative time after it.
pub fn time_and_relative(s: &str) -> String {
    match parse_time(s) {
        Some(t) => format!("{} ({})", local_time(s), relative_to(t, Timestamp::now())),
        None => s.to_string(),
    }
}

/// A duration for humans: `350ms`, `1.2s`, `3m4s`, `2h5m`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let s = ms / 1000;
    if s < 3600 {
        return format!("{}m{}s", s / 60, s % 60);
    }
    if s < 86_400 {
        return format!("{}h{}m", s / 3600, (s % 3600) / 60);
    }
    format!("{}d{}h", s / 86_400, (s % 86_400) / 3600)
}

/// An uptime: `42s`, `3m4s`, `2h5m`, `3d4h`.
pub fn uptime(secs: u64) -> String {
    if secs < 60 { format!("{secs}s") } else { duration_ms(secs.saturating_mul(1000) as i64) }
}

/// A signal number as its name (`SIGKILL`), or `signal N` when unknown.
pub fn signal_name(n: i32) -> String {
    match nix::sys::signal::Signal::try_from(n) {
        Ok(s) => s.as_str().to_string(),
        Err(_) => format!("signal {n}"),
    }
}

/// How a run ended: `3`, `SIGKILL`, or empty while it has not.
pub fn exit_of(r: &RunInfo) -> String {
    match (r.exit_code, r.signal) {
        (_, Some(sig)) => signal_name(sig),
        (Some(code), None) => code.to_string(),
        (None, None) => String::new(),
    }
}

/// A run in a few words: `#12 failed (exit 3) 2m ago`, `#13 running for 5s`.
pub fn run_summary(r: &RunInfo) -> String {
    let mut s = format!("#{} {}", r.id, r.state);
    match (r.exit_code, r.signal) {
        (_, Some(sig)) => s.push_str(&format!(" ({})", signal_name(sig))),
        (Some(code), None) if r.state != "succeeded" => s.push_str(&format!(" (exit {code})")),
        _ => {}
    }
    match r.state.as_str() {
        "running" => {
            if let Some(ms) = r.duration_ms {
                s.push_str(&format!(" for {}", short_secs(ms.max(0) as u64 / 1000)));
            }
        }
        "queued" => {}
        _ => {
            let when = r.ended_at.as_deref().or(r.started_at.as_deref()).unwrap_or(&r.queued_at);
            s.push(' ');
            s.push_str(&relative(when));
        }
    }
    s
}

/// A unit's kind and schedule from its (filled-in) definition: `("job", "every 5m")`.
pub fn kind_and_schedule(def: &Value) -> (String, String) {
    let has = |k: &str| def.get(k).is_some_and(|v| !v.is_null());
    let every = def.get("every").and_then(Value::as_str);
    if !has("command") && !has("script") {
        return ("tick".into(), format!("every {}", every.unwrap_or("1s")));
    }
    if def.get("service").and_then(Value::as_bool) == Some(true) {
        return ("service".into(), "continuous".into());
    }
    if let Some(e) = every {
        return ("job".into(), format!("every {e}"));
    }
    if let Some(c) = def.get("cron").and_then(Value::as_str) {
        let tz = def.get("tz").and_then(Value::as_str);
        return ("job".into(), tz.map_or(format!("cron {c}"), |tz| format!("cron {c} ({tz})")));
    }
    ("job".into(), "once".into())
}

/// A definition value on one line: strings bare, `K=V …` for `env`, JSON otherwise.
pub fn value_text(key: &str, v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) if key == "env" => m
            .iter()
            .map(|(k, v)| {
                format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_string))
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// Aligns `key: value` lines on their values.
pub fn key_values(rows: &[(String, String)], indent: &str) -> String {
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0) + 1;
    let mut s = String::new();
    for (k, v) in rows {
        let key = format!("{k}:");
        // Multi-line values (a script) continue under the value column.
        let pad = " ".repeat(indent.len() + width + 1);
        let v = v.trim_end_matches('\n').replace('\n', &format!("\n{pad}"));
        let l = format!("{indent}{key:<width$} {v}");
        s.push_str(l.trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_naturally() {
        let now: Timestamp = "2024-01-01T12:00:00Z".parse().unwrap();
        let at = |s: &str| relative_to(s.parse().unwrap(), now);
        assert_eq!(at("2024-01-01T12:04:10Z"), "in 4m10s");
        assert_eq!(at("2024-01-01T12:05:00Z"), "in 5m");
        assert_eq!(at("2024-01-01T12:00:42Z"), "in 42s");
        assert_eq!(at("2024-01-01T13:29:59Z"), "in 1h29m");
        assert_eq!(at("2024-01-01T11:59:57Z"), "3s ago");
        assert_eq!(at("2024-01-01T10:00:00Z"), "2h ago");
        assert_eq!(at("2024-01-02T11:00:00Z"), "in 23h");
        assert_eq!(at("2023-12-29T08:00:00Z"), "3d4h ago");
        assert_eq!(at("2023-12-29T12:00:00Z"), "3d ago");
        assert_eq!(at("2024-01-01T12:00:00Z"), "now");
    }

    fn sample() -> Table {
        let mut t = Table::new(&["NAME", "STATE", "REASON"]).flexible(&["NAME", "REASON"]);
        t.add_row(vec![Cell::new("backup-nightly"), Cell::new("failed"), Cell::new("exit 1")]);
        t.add_row(vec![Cell::new("web"), Cell::new("running"), Cell::new("")]);
        t.add_row(vec![Cell::new("x"), Cell::new("7"), Cell::new("line one\nline two")]);
        t
    }

    #[test]
    fn tables_line_up_without_trailing_blanks() {
        assert_eq!(
            sample().render(None),
            "NAME            STATE    REASON\n\
             backup-nightly  failed   exit 1\n\
             web             running\n\
             x               7        line one line two\n"
        );
    }

    #[test]
    fn a_narrow_terminal_cuts_the_widest_flexible_column_first() {
        // Natural width 42: REASON (17) gives way first, then NAME and REASON in turn; STATE
        // never does, and no column goes below its title.
        let fitted = sample().render(Some(36));
        assert_eq!(
            fitted,
            "NAME           STATE    REASON\n\
             backup-night…  failed   exit 1\n\
             web            running\n\
             x              7        line one li…\n"
        );
        assert!(fitted.lines().all(|l| l.chars().count() <= 36), "{fitted}");
        let tight = sample().render(Some(20));
        assert!(tight.contains("\nbac…  failed   exit 1\n"), "{tight}");
        assert!(tight.ends_with("\nx     7        line …\n"), "{tight}");
    }

    #[test]
    fn wide_characters_and_controls_keep_columns_aligned() {
        let mut t = Table::new(&["NAME", "N"]).flexible(&["NAME"]);
        t.add_row(vec![Cell::new("日本語の名前"), Cell::new("1")]);
        t.add_row(vec![Cell::new("a\u{9b}b"), Cell::new("2")]);
        assert_eq!(t.render(None), "NAME          N\n日本語の名前  1\na b           2\n");
        // Cut to 4 columns, a wide character does not fit beside the `…`: 3 columns shown,
        // padded to the column's 4.
        assert_eq!(t.render(Some(7)), "NAME  N\n日…   1\na b   2\n");
    }

    #[test]
    fn coloured_cells_are_padded_by_their_text() {
        let mut t = Table::new(&["STATE", "N"]);
        t.add_row(vec![Cell::new("ok").colour("32"), Cell::new("1")]);
        assert_eq!(t.render(None), "STATE  N\n\x1b[32mok\x1b[0m     1\n");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration_ms(350), "350ms");
        assert_eq!(duration_ms(1234), "1.2s");
        assert_eq!(duration_ms(184_000), "3m4s");
        assert_eq!(duration_ms(7_500_000), "2h5m");
    }

    #[test]
    fn signals_have_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(999), "signal 999");
    }

    #[test]
    fn schedules_are_described_from_the_definition() {
        let d = serde_json::json!({"name": "a", "command": ["x"], "every": "5m"});
        assert_eq!(kind_and_schedule(&d), ("job".into(), "every 5m".into()));
        let d = serde_json::json!({"name": "a"});
        assert_eq!(kind_and_schedule(&d).0, "tick");
        let d = serde_json::json!({"name": "a", "script": "x", "service": true});
        assert_eq!(kind_and_schedule(&d).0, "service");
    }
}
