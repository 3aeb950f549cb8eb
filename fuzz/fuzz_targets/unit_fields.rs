//! The field parsers on their own: durations, sizes and cron schedules (croner, jiff zones).
//! The first byte picks the parser; the rest is the text. What parses renders back to text
//! that parses to the same value.
#![no_main]

use jiff::Timestamp;
use libfuzzer_sys::fuzz_target;
use taskd::unit::Schedule;
use taskd::unit::definition::{
    ByteSize, MAX_DURATION, format_duration, format_size, parse_duration, parse_size,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 3 {
        0 => {
            if let Ok(d) = parse_duration(text) {
                assert!(!d.is_zero() && d <= MAX_DURATION, "{text:?} gave {d:?}");
                assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{text:?}");
            }
        }
        1 => {
            if let Ok(n) = parse_size(&ByteSize::Text(text.to_owned())) {
                assert_eq!(parse_size(&ByteSize::Text(format_size(n))), Ok(n), "{text:?}");
            }
        }
        _ => {
            // `EXPR|ZONE`, or just `EXPR` for the daemon's zone.
            let (expr, tz) = match text.split_once('|') {
                Some((expr, tz)) => (expr, Some(tz)),
                None => (text, None),
            };
            if let Ok(schedule) = Schedule::cron(expr, tz) {
                let now = Timestamp::now();
                if let Some(next) = schedule.next_after(now, now) {
                    assert!(next > now, "{text:?}: next fire {next} is not after {now}");
                }
                let day_ago = now - jiff::SignedDuration::from_hours(24);
                let _ = schedule.missed(day_ago, now, day_ago);
            }
        }
    }
});
