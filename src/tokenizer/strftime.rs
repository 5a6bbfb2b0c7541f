//! `strftime_now(format)` for chat templates, as transformers' `apply_chat_template` provides it (several model
//! families' templates put today's date in the system prompt with it). The date is UTC (transformers takes the
//! machine's local time; hayloft has no time-zone database).
//!
//! Specifiers: `%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %B %h %F %T %%`; any other is an error naming it, so a
//! template never gets a silently wrong date.

use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Civil date (year, month 1–12, day 1–31) of `days` since 1970-01-01 (Howard Hinnant's days-to-civil algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

/// `fmt` with the time `secs` seconds after the Unix epoch (UTC).
pub fn strftime(fmt: &str, secs: i64) -> Result<String, String> {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil(days);
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[m as usize - 1] + d + u32::from(m > 2 && is_leap(y));
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let s = match chars.next() {
            Some('Y') => y.to_string(),
            Some('y') => format!("{:02}", y.rem_euclid(100)),
            Some('m') => format!("{m:02}"),
            Some('d') => format!("{d:02}"),
            Some('e') => format!("{d:>2}"),
            Some('j') => format!("{yday:03}"),
            Some('H') => format!("{hh:02}"),
            Some('I') => format!("{h12:02}"),
            Some('M') => format!("{mm:02}"),
            Some('S') => format!("{ss:02}"),
            Some('p') => (if hh < 12 { "AM" } else { "PM" }).to_string(),
            Some('a') => DAYS[weekday][..3].to_string(),
            Some('A') => DAYS[weekday].to_string(),
            Some('b') | Some('h') => MONTHS[m as usize - 1][..3].to_string(),
            Some('B') => MONTHS[m as usize - 1].to_string(),
            Some('F') => format!("{y}-{m:02}-{d:02}"),
            Some('T') => format!("{hh:02}:{mm:02}:{ss:02}"),
            Some('%') => "%".to_string(),
            Some(other) => return Err(format!("strftime_now: unsupported specifier %{other}")),
            None => return Err("strftime_now: the format ends with a lone %".to_string()),
        };
        out.push_str(&s);
    }
    Ok(out)
}

/// The template function: `fmt` at the current time.
pub fn strftime_now(fmt: String) -> Result<String, minijinja::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&fmt, secs)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_as_python_does() {
        // Values checked with Python: datetime.fromtimestamp(t, timezone.utc).strftime(f).
        let cases = [
            (
                0,
                "%Y-%m-%d %H:%M:%S %a %A %b %B %j",
                "1970-01-01 00:00:00 Thu Thursday Jan January 001",
            ),
            (1_721_952_000, "%d %b %Y", "26 Jul 2024"),
            (
                1_764_950_400 + 13 * 3600 + 5 * 60 + 9,
                "%F %T %I %p %y %e",
                "2025-12-06 05:05:09 05 AM 25  6",
            ),
            (951_782_400, "%Y-%m-%d %j %A", "2000-02-29 060 Tuesday"),
            (4_107_542_400, "%B %d, %Y", "March 01, 2100"),
            (-86_400, "%Y-%m-%d %%", "1969-12-31 %"),
        ];
        for (t, f, want) in cases {
            assert_eq!(strftime(f, t).unwrap(), want, "{t} {f}");
        }
        assert!(strftime("%Q", 0).unwrap_err().contains("%Q"));
        assert!(strftime("50%", 0).is_err());
    }
}
