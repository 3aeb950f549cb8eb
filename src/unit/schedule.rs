//! When a scheduled unit fires: fixed intervals anchored to a start time, and cron
//! expressions (croner) evaluated in an IANA time zone.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// A validated schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Fire every `period`, at `anchor + k * period`.
    Every {
        /// The interval.
        period: Duration,
    },
    /// Fire at the times a cron expression matches in `tz`.
    Cron {
        /// The parsed expression.
        cron: Box<Cron>,
        /// The expression as written.
        expr: String,
        /// The zone it is evaluated in.
        tz: TimeZone,
    },
}

impl Schedule {
    /// A fixed-interval schedule.
    pub fn every(period: Duration) -> Schedule {
        Schedule::Every { period }
    }

    /// Parses a cron expression (5 fields, 6 with seconds, or `@hourly`-style) in `tz`
    /// (the daemon's local zone when `None`). Errors name the field: `cron` or `tz`.
    pub fn cron(expr: &str, tz: Option<&str>) -> Result<Schedule, (&'static str, String)> {
        let trimmed = expr.trim();
        const ALIASES: [&str; 6] =
            ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"];
        if trimmed.starts_with('@') && !ALIASES.iter().any(|a| a.eq_ignore_ascii_case(trimmed)) {
            return Err((
                "cron",
                format!("unknown shorthand {trimmed:?} (use {})", ALIASES.join(", ")),
            ));
        }
        if !trimmed.starts_with('@') {
            let n = trimmed.split_whitespace().count();
            if n != 5 && n != 6 {
                return Err(("cron", format!("expected 5 or 6 fields, got {n}")));
            }
            // croner skips empty list items, so a field of only commas matches nothing, and
            // proving that such an expression never fires takes croner many seconds.
            if let Some(name) = empty_list_item(trimmed) {
                return Err((
                    "cron",
                    format!("{expr:?}: {name}: a list has an empty item (write e.g. \"1,15\")"),
                ));
            }
        }
        let parser =
            CronParser::builder().seconds(Seconds::Optional).year(Year::Disallowed).build();
        let cron = parser.parse(trimmed).map_err(|e| {
            let why = out_of_range(trimmed).unwrap_or_else(|| e.to_string());
            ("cron", format!("{expr:?}: {why}"))
        })?;
        let tz = match tz {
            None => TimeZone::system(),
            Some(name) => TimeZone::get(name).map_err(|_| {
                ("tz", format!("{name:?} is not a known IANA time zone (e.g. \"Europe/Berlin\")"))
            })?,
        };
        let s = Schedule::Cron { cron: Box::new(cron), expr: trimmed.to_string(), tz };
        if s.next_after(Timestamp::now(), Timestamp::now()).is_none() {
            return Err(("cron", format!("{expr:?} never fires")));
        }
        Ok(s)
    }

    /// The first fire time strictly after `after`. `anchor` is where an interval schedule
    /// counts from (the unit's creation or last edit). `None` when the schedule never fires
    /// again.
    pub fn next_after(&self, after: Timestamp, anchor: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Every { period } => {
                let p = i128::try_from(period.as_nanos()).ok()?.max(1);
                let a = anchor.as_nanosecond();
                let t = after.as_nanosecond();
                let k = if t < a { 0 } else { (t - a) / p + 1 };
                Timestamp::from_nanosecond(a + k * p).ok()
            }
            Schedule::Cron { cron, tz, .. } => {
                let z = after.to_zoned(tz.clone());
                cron.find_next_occurrence(&z, false).ok().map(|z| z.timestamp())
            }
        }
    }

    /// The newest fire time in `(since, now]`, if one fell there: the fire `catch_up: once`
    /// makes (so that a fire another server made already is known by its time). A cron
    /// schedule is stepped through at most 100,000 fire times, then the newest found is it.
    pub fn latest_missed(
        &self,
        since: Timestamp,
        now: Timestamp,
        anchor: Timestamp,
    ) -> Option<Timestamp> {
        match self {
            Schedule::Every { period } => {
                let p = i128::try_from(period.as_nanos()).ok()?.max(1);
                let (a, n) = (anchor.as_nanosecond(), now.as_nanosecond());
                if n < a {
                    return None;
                }
                let t = Timestamp::from_nanosecond(a + (n - a) / p * p).ok()?;
                (t > since).then_some(t)
            }
            Schedule::Cron { .. } => {
                let mut last = None;
                let mut at = since;
                for _ in 0..100_000 {
                    match self.next_after(at, anchor) {
                        Some(t) if t <= now => {
                            last = Some(t);
                            at = t;
                        }
                        _ => break,
                    }
                }
                last
            }
        }
    }
}

/// The fields of a cron expression with their names and ranges; a 5-field expression has no
/// seconds.
fn named_fields(expr: &str) -> impl Iterator<Item = (&str, &'static (&'static str, u32, u32))> {
    const NAMES: &[(&str, u32, u32)] = &[
        ("second", 0, 59),
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of month", 1, 31),
        ("month", 1, 12),
        ("day of week", 0, 7),
    ];
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let names = if fields.len() == 6 { NAMES } else { &NAMES[1..] };
    fields.into_iter().zip(names)
}

/// Names the first field with an empty list item (`,5`, `1,,2`, `,`).
fn empty_list_item(expr: &str) -> Option<&'static str> {
    named_fields(expr)
        .find(|(field, _)| field.split(',').any(|item| item.is_empty()))
        .map(|(_, (name, ..))| *name)
}

/// Names the first field holding a number outside its range (`minute: 61 is out of range
/// 0-59`), to explain a parse error better than the parser does.
fn out_of_range(expr: &str) -> Option<String> {
    for (field, (name, lo, hi)) in named_fields(expr) {
        // Numbers in lists, ranges and steps: `1,5`, `10-20`, `*/15` (a step is not a value).
        for part in field.split(',') {
            let values = part.split('/').next().unwrap_or("");
            for n in values.split('-').filter_map(|v| v.parse::<u32>().ok()) {
                if n < *lo || n > *hi {
                    return Some(format!("{name}: {n} is out of range {lo}-{hi}"));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn every_counts_from_the_anchor_without_drift() {
        let s = Schedule::every(Duration::from_secs(10));
        let a = ts("2026-01-01T00:00:00Z");
        assert_eq!(s.next_after(a, a), Some(ts("2026-01-01T00:00:10Z")));
        assert_eq!(s.next_after(ts("2026-01-01T00:00:15Z"), a), Some(ts("2026-01-01T00:00:20Z")));
        assert_eq!(s.next_after(ts("2026-01-01T00:00:20Z"), a), Some(ts("2026-01-01T00:00:30Z")));
    }

    #[test]
    fn cron_with_seconds_and_zone() {
        let s = Schedule::cron("*/15 * * * * *", Some("UTC")).unwrap();
        assert_eq!(
            s.next_after(ts("2026-01-01T00:00:01Z"), ts("2026-01-01T00:00:00Z")),
            Some(ts("2026-01-01T00:00:15Z"))
        );
        let s = Schedule::cron("30 2 * * *", Some("Europe/Berlin")).unwrap();
        // 02:30 Berlin in winter is 01:30 UTC.
        assert_eq!(
            s.next_after(ts("2026-01-10T00:00:00Z"), ts("2026-01-10T00:00:00Z")),
            Some(ts("2026-01-10T01:30:00Z"))
        );
        assert!(Schedule::cron("@hourly", None).is_ok());
    }

    #[test]
    fn cron_errors_name_their_field() {
        assert_eq!(Schedule::cron("* * *", None).unwrap_err().0, "cron");
        let (field, why) = Schedule::cron("61 * * * *", None).unwrap_err();
        assert_eq!(field, "cron");
        assert!(why.ends_with("minute: 61 is out of range 0-59"), "{why}");
        let why = Schedule::cron("0 0 25 * * *", None).unwrap_err().1;
        assert!(why.ends_with("hour: 25 is out of range 0-23"), "{why}");
        assert_eq!(Schedule::cron("* * * * *", Some("Nowhere/Land")).unwrap_err().0, "tz");
        assert_eq!(Schedule::cron("0 0 30 2 *", None).unwrap_err().0, "cron");
    }

    #[test]
    fn cron_refuses_empty_list_items() {
        // A seconds field of only a comma matches no second; croner would search a year of
        // seconds, for many seconds of CPU, before finding that it never fires.
        let (field, why) = Schedule::cron(", 30 2 * * *", Some("UTC")).unwrap_err();
        assert_eq!(field, "cron");
        assert!(why.ends_with("second: a list has an empty item (write e.g. \"1,15\")"), "{why}");
        let why = Schedule::cron("0 1,,2 * * *", None).unwrap_err().1;
        assert!(why.contains("hour: a list has an empty item"), "{why}");
        let why = Schedule::cron("0 0 * * 1,", None).unwrap_err().1;
        assert!(why.contains("day of week: a list has an empty item"), "{why}");
        assert!(Schedule::cron("0,30 9-17 * * MON,FRI", Some("UTC")).is_ok());
    }

    #[test]
    fn the_newest_missed_fire_time_is_found() {
        let s = Schedule::every(Duration::from_secs(60));
        let a = ts("2026-01-01T00:00:00Z");
        let since = ts("2026-01-01T00:00:30Z");
        assert_eq!(
            s.latest_missed(since, ts("2026-01-01T00:05:10Z"), a),
            Some(ts("2026-01-01T00:05:00Z"))
        );
        assert_eq!(s.latest_missed(since, ts("2026-01-01T00:00:50Z"), a), None);
        // Exactly at a fire time: that fire is missed; since a fire time: not again.
        assert_eq!(
            s.latest_missed(since, ts("2026-01-01T00:01:00Z"), a),
            Some(ts("2026-01-01T00:01:00Z"))
        );
        assert_eq!(
            s.latest_missed(ts("2026-01-01T00:01:00Z"), ts("2026-01-01T00:01:30Z"), a),
            None
        );
        let c = Schedule::cron("0 * * * * *", Some("UTC")).unwrap();
        assert_eq!(
            c.latest_missed(since, ts("2026-01-01T00:03:30Z"), a),
            Some(ts("2026-01-01T00:03:00Z"))
        );
        assert_eq!(c.latest_missed(since, ts("2026-01-01T00:00:59Z"), a), None);
    }
}
