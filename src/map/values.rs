//! Parsing of typed cell values: numbers, dates, email addresses. Pure.

use chrono::{NaiveDate, NaiveDateTime};

use crate::config::{DateOrder, NumberLocale};

const CURRENCY: [char; 6] = ['$', '€', '£', '¥', '₹', '₽'];

/// Parses an amount: `5000`, `5,000.50`, `$5,000`, `-1,234.5`, `(300)`,
/// `300-`, and with the comma locale `5.000,50` or `€ 5.000`. Grouping
/// separators must group by three; at most one sign (a leading or trailing
/// minus, or accounting brackets); anything else (`1,2,3`, `12abc`, `1e5`,
/// `--5`, `(-300)`) is `None`.
pub fn parse_number(s: &str, locale: NumberLocale) -> Option<f64> {
    let mut s = s.trim();
    let mut signs = 0u32;
    if let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        signs += 1;
        s = inner.trim();
    }
    if let Some(rest) = s.strip_prefix('-') {
        signs += 1;
        s = rest.trim_start();
    }
    if let Some(rest) = s.strip_suffix('-') {
        signs += 1;
        s = rest.trim_end();
    }
    s = s
        .trim_start_matches(CURRENCY)
        .trim_end_matches(CURRENCY)
        .trim();
    if let Some(rest) = s.strip_prefix('-') {
        signs += 1;
        s = rest.trim_start();
    }
    if let Some(rest) = s.strip_suffix('-') {
        signs += 1;
        s = rest.trim_end();
    }
    if signs > 1 {
        return None;
    }
    let negative = signs == 1;
    let (group, decimal) = match locale {
        NumberLocale::Dot => (',', '.'),
        NumberLocale::Comma => ('.', ','),
    };
    let (int_part, frac_part) = match s.split_once(decimal) {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    if let Some(f) = frac_part
        && (f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let is_group_sep = |c: char| c == group || c == ' ' || c == '\u{a0}' || c == '\u{202f}';
    let groups: Vec<&str> = int_part.split(is_group_sep).collect();
    if groups
        .iter()
        .any(|g| !g.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    if groups.len() > 1 {
        let first_ok = (1..=3).contains(&groups[0].len());
        if !first_ok || groups[1..].iter().any(|g| g.len() != 3) {
            return None;
        }
    }
    let digits: String = groups.concat();
    if digits.is_empty() && frac_part.is_none() {
        return None;
    }
    let text = match frac_part {
        Some(f) => format!("{}.{f}", if digits.is_empty() { "0" } else { &digits }),
        None => digits,
    };
    let n: f64 = text.parse().ok()?;
    n.is_finite().then_some(if negative { -n } else { n })
}

/// Parses a date to milliseconds since the epoch (midnight UTC): ISO
/// (`2025-12-31`, with an optional time), numeric day/month forms in the
/// configured order (`12/31/2025` or `31/12/2025`, also with `.` or `-`; the
/// other order is used when the configured one is impossible), and month
/// names (`Dec 31, 2025`, `31 December 2025`).
pub fn parse_date(s: &str, order: DateOrder) -> Option<i64> {
    let s = s.trim();
    let to_ms = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
    };
    // Fast path for the common `YYYY-MM-DD`: the format-string parsers
    // below showed in the import profile.
    if let [y1, y2, y3, y4, b'-', m1, m2, b'-', d1, d2] = *s.as_bytes() {
        let num = |ds: &[u8]| {
            ds.iter().try_fold(0u32, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        };
        if let (Some(y), Some(m), Some(d)) =
            (num(&[y1, y2, y3, y4]), num(&[m1, m2]), num(&[d1, d2]))
        {
            return NaiveDate::from_ymd_opt(y as i32, m, d).and_then(to_ms);
        }
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    let four_digit_year_first = s.len() >= 4 && s.as_bytes()[..4].iter().all(u8::is_ascii_digit);
    if four_digit_year_first {
        for f in ["%Y-%m-%d", "%Y/%m/%d"] {
            if let Ok(d) = NaiveDate::parse_from_str(s, f) {
                return to_ms(d);
            }
        }
    }
    for f in ["%b %d, %Y", "%B %d, %Y", "%d %b %Y", "%d %B %Y"] {
        if let Ok(d) = NaiveDate::parse_from_str(s, f) {
            return to_ms(d);
        }
    }
    let parts: Vec<&str> = s.split(['/', '.', '-']).collect();
    if parts.len() == 3
        && parts[2].len() == 4
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty())
    {
        let (a, b, y): (u32, u32, i32) = (
            parts[0].parse().ok()?,
            parts[1].parse().ok()?,
            parts[2].parse().ok()?,
        );
        let (first, second) = match order {
            DateOrder::Mdy => ((a, b), (b, a)),
            DateOrder::Dmy => ((b, a), (a, b)),
        };
        return NaiveDate::from_ymd_opt(y, first.0, first.1)
            .or_else(|| NaiveDate::from_ymd_opt(y, second.0, second.1))
            .and_then(to_ms);
    }
    None
}

/// A plausible email address: one `@`, a non-empty local part, a dotted
/// domain of non-empty labels, no whitespace, at most 254 characters.
pub fn valid_email(s: &str) -> bool {
    if s.len() > 254 || s.chars().any(char::is_whitespace) {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && domain
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numbers_in_the_dot_locale() {
        let p = |s| parse_number(s, NumberLocale::Dot);
        assert_eq!(p("5000"), Some(5000.0));
        assert_eq!(p("5,000.50"), Some(5000.5));
        assert_eq!(p("$5,000"), Some(5000.0));
        assert_eq!(p(" $ 1,234,567.89 "), Some(1_234_567.89));
        assert_eq!(p("-42"), Some(-42.0));
        assert_eq!(p("(300)"), Some(-300.0));
        assert_eq!(p("-$5"), Some(-5.0));
        assert_eq!(p(".5"), Some(0.5));
        for bad in [
            "", "abc", "12abc", "1,2,3", "1e5", "5.", "5,00", "$", "1.2.3", "NaN", "inf",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn at_most_one_sign() {
        let p = |s| parse_number(s, NumberLocale::Dot);
        assert_eq!(p("300-"), Some(-300.0));
        assert_eq!(p("$5-"), Some(-5.0));
        assert_eq!(p("$-5"), Some(-5.0));
        assert_eq!(p("- 5"), Some(-5.0));
        assert_eq!(p("($1,234.50)"), Some(-1234.5));
        for bad in [
            "--5", "- -5", "-$-5", "(-300)", "-(300)", "(300-)", "-5-", "$-5-", "(-$5)", "-", "()",
            "(5", "5)",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_number("-5.000,50", NumberLocale::Comma),
            Some(-5000.5)
        );
        assert_eq!(parse_number("--5.000,50", NumberLocale::Comma), None);
    }

    #[test]
    fn numbers_in_the_comma_locale() {
        let p = |s| parse_number(s, NumberLocale::Comma);
        assert_eq!(p("5.000,50"), Some(5000.5));
        assert_eq!(p("€ 5.000"), Some(5000.0));
        assert_eq!(p("5 000,5"), Some(5000.5));
        assert_eq!(p("5,000.50"), None);
    }

    #[test]
    fn dates() {
        let ms = |y, m, d| {
            NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp_millis()
        };
        assert_eq!(
            parse_date("2025-12-31", DateOrder::Mdy),
            Some(ms(2025, 12, 31))
        );
        assert_eq!(
            parse_date("12/31/2025", DateOrder::Mdy),
            Some(ms(2025, 12, 31))
        );
        assert_eq!(
            parse_date("03/04/2025", DateOrder::Mdy),
            Some(ms(2025, 3, 4))
        );
        assert_eq!(
            parse_date("03/04/2025", DateOrder::Dmy),
            Some(ms(2025, 4, 3))
        );
        assert_eq!(
            parse_date("31.12.2025", DateOrder::Mdy),
            Some(ms(2025, 12, 31))
        );
        assert_eq!(
            parse_date("Dec 31, 2025", DateOrder::Dmy),
            Some(ms(2025, 12, 31))
        );
        assert_eq!(
            parse_date("31 December 2025", DateOrder::Dmy),
            Some(ms(2025, 12, 31))
        );
        assert!(parse_date("2025-12-31T10:00:00Z", DateOrder::Mdy).is_some());
        for bad in ["", "tomorrow", "13/13/2025", "2025-02-30", "1/2/25"] {
            assert_eq!(parse_date(bad, DateOrder::Mdy), None, "{bad:?}");
        }
    }

    #[test]
    fn emails() {
        assert!(valid_email("john@acme.com"));
        assert!(valid_email("a.b+c@sub.example.co.uk"));
        for bad in [
            "",
            "john",
            "john@",
            "@acme.com",
            "john@acme",
            "jo hn@acme.com",
            "a@b@c.com",
            "a@.com",
        ] {
            assert!(!valid_email(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn formatted_numbers_round_trip(n in 0u64..10_000_000_000, cents in 0u32..100) {
            let int = n.to_string();
            let mut grouped = String::new();
            for (i, c) in int.chars().enumerate() {
                if i > 0 && (int.len() - i) % 3 == 0 { grouped.push(','); }
                grouped.push(c);
            }
            let text = format!("${grouped}.{cents:02}");
            let expected = n as f64 + f64::from(cents) / 100.0;
            let got = parse_number(&text, NumberLocale::Dot).unwrap();
            prop_assert!((got - expected).abs() < 1e-6 * expected.max(1.0));
            let comma = text.replace(',', " ").replace('.', ",");
            let got = parse_number(&comma, NumberLocale::Comma).unwrap();
            prop_assert!((got - expected).abs() < 1e-6 * expected.max(1.0));
        }

        #[test]
        fn number_parsing_never_panics(s in "\\PC{0,30}") {
            if let Some(n) = parse_number(&s, NumberLocale::Dot) { prop_assert!(n.is_finite()); }
            let _ = parse_number(&s, NumberLocale::Comma);
            let _ = parse_date(&s, DateOrder::Dmy);
            let _ = valid_email(&s);
        }
    }
}
