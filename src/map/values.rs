//! Parsing of typed cell values: numbers, dates, email addresses. Pure.

use chrono::NaiveDate;

use crate::config::{DateOrder, NumberLocale};

/// Years a deal's date may have.
pub const YEARS: std::ops::RangeInclusive<i32> = 1900..=2200;

const CURRENCY: [char; 6] = ['$', '€', '£', '¥', '₹', '₽'];

/// Parses an amount: `5000`, `5,000.50`, `$5,000`, `-1,234.5`, `+5`,
/// `−5` (Unicode minus), `(300)`, `300-`, `5 €`, and with the comma locale
/// `5.000,50` or `€ 5.000`. Grouping separators (one kind per number) must
/// group by three after a first group of 1-3 digits not starting with `0`;
/// at most one currency symbol, before or after; at most one sign (a
/// leading `+` or minus, a trailing minus, or accounting brackets);
/// anything else (`1,2,3`, `0,500`, `1 000,000.5`, `$$5`, `12abc`, `1e5`,
/// `--5`, `(-300)`) is `None`. `-0` is 0.
pub fn parse_number(s: &str, locale: NumberLocale) -> Option<f64> {
    const MINUS: [char; 2] = ['-', '\u{2212}'];
    let mut s = s.trim();
    let (mut signs, mut negative, mut symbols) = (0u32, false, 0u32);
    if let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        (signs, negative) = (1, true);
        s = inner.trim();
    }
    // Signs, then a currency symbol, then signs again, on either side:
    // `-$5`, `$-5`, `$5-`, `5 €`.
    for round in 0..3 {
        if round == 1 {
            if let Some(rest) = s.strip_prefix(CURRENCY) {
                symbols += 1;
                s = rest.trim_start();
            }
            if let Some(rest) = s.strip_suffix(CURRENCY) {
                symbols += 1;
                s = rest.trim_end();
            }
            continue;
        }
        if let Some(rest) = s.strip_prefix(MINUS) {
            (signs, negative) = (signs + 1, true);
            s = rest.trim_start();
        } else if let Some(rest) = s.strip_prefix('+') {
            signs += 1;
            s = rest.trim_start();
        }
        if let Some(rest) = s.strip_suffix(MINUS) {
            (signs, negative) = (signs + 1, true);
            s = rest.trim_end();
        }
    }
    if signs > 1 || symbols > 1 {
        return None;
    }
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
    let mut separators = int_part.chars().filter(|&c| is_group_sep(c));
    if let Some(first) = separators.next()
        && separators.any(|c| c != first)
    {
        return None;
    }
    let groups: Vec<&str> = int_part.split(is_group_sep).collect();
    if groups
        .iter()
        .any(|g| !g.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    if groups.len() > 1 {
        let first_ok = (1..=3).contains(&groups[0].len()) && !groups[0].starts_with('0');
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
    // `-0` is stored as 0, not as IEEE negative zero.
    n.is_finite()
        .then_some(if negative && n != 0.0 { -n } else { n })
}

/// Parses a date to milliseconds since the epoch, at midnight UTC of the
/// date as written: ISO (`2025-12-31`, `2025/12/31`, `2025.12.31`), numeric
/// day/month forms in the configured order only (`12/31/2025` or
/// `31/12/2025`, also with `.` or `-`), and English month names
/// (`Dec 31, 2025`, `Dec 31 2025`, `December 31, 2025`, `31 December 2025`,
/// `31-Dec-2025`). Any of them may be followed by a time
/// (`2025-12-31T10:00:00+01:00`, `12/31/2025 10:00`, `2025-12-31 10:00:00`,
/// `12/31/2025 10:00 PM`): the time is checked, then dropped; an offset
/// never moves the date to another day. Two-digit years, and years before
/// `YEARS` starts or after it ends (`0000-01-01`, a typo `20255`), are
/// refused.
pub fn parse_date(s: &str, order: DateOrder) -> Option<i64> {
    let s = s.trim();
    let date = match split_time(s) {
        Some((date, time)) if valid_time(time) => date,
        Some(_) => return None,
        None => s,
    };
    parse_day(date, order)
        .filter(|d| YEARS.contains(&chrono::Datelike::year(d)))?
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
}

/// Splits `<date> <time>` (or ISO `<date>T<time>`, or `<date>, <time>`) at
/// the hour digits before the first `:`. `None` when there is no such
/// time.
fn split_time(s: &str) -> Option<(&str, &str)> {
    let colon = s.find(':')?;
    let bytes = s.as_bytes();
    let mut start = colon;
    while start > 0 && colon - start < 2 && bytes[start - 1].is_ascii_digit() {
        start -= 1;
    }
    if start == colon || start == 0 {
        return None;
    }
    let time = &s[start..];
    let date = match bytes[start - 1] {
        b'T' => {
            let date = &s[..start - 1];
            // Only after an ISO date: `2025-12-31T10:00`.
            let iso = date.len() == 10
                && date.bytes().enumerate().all(|(i, b)| match i {
                    4 | 7 => b == b'-',
                    _ => b.is_ascii_digit(),
                });
            if !iso {
                return None;
            }
            date
        }
        b if b.is_ascii_whitespace() => {
            let date = s[..start].trim_end();
            date.strip_suffix(',').unwrap_or(date).trim_end()
        }
        _ => return None,
    };
    Some((date, time))
}

/// A time of day: `H:MM`, `H:MM:SS`, `H:MM:SS.fff`, optionally `AM`/`PM`,
/// optionally a zone (`Z`, `UTC`, `GMT`, `+01:00`, `+0100`, `-05`).
fn valid_time(t: &str) -> bool {
    let b = t.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize, min: usize, max: usize| -> Option<u32> {
        let start = *i;
        while *i < b.len() && *i - start < max && b[*i].is_ascii_digit() {
            *i += 1;
        }
        (*i - start >= min).then(|| t[start..*i].parse().ok())?
    };
    let Some(hour) = digits(&mut i, 1, 2) else {
        return false;
    };
    if b.get(i) != Some(&b':') {
        return false;
    }
    i += 1;
    if digits(&mut i, 2, 2).is_none_or(|m| m > 59) {
        return false;
    }
    if b.get(i) == Some(&b':') {
        i += 1;
        if digits(&mut i, 2, 2).is_none_or(|s| s > 60) {
            return false;
        }
        if matches!(b.get(i), Some(b'.' | b',')) {
            i += 1;
            if digits(&mut i, 1, 9).is_none() {
                return false;
            }
        }
    }
    let mut rest = t[i..].trim_start();
    let lower = rest.to_ascii_lowercase();
    let meridiem = ["am", "pm", "a.m.", "p.m."]
        .into_iter()
        .find(|m| lower.starts_with(m));
    match meridiem {
        Some(m) => {
            if !(1..=12).contains(&hour) {
                return false;
            }
            rest = rest[m.len()..].trim_start();
        }
        None if hour > 23 => return false,
        None => {}
    }
    valid_zone(rest)
}

/// Empty, `Z`, `UTC`, `GMT`, or an offset `±HH`, `±HHMM`, `±HH:MM`.
fn valid_zone(z: &str) -> bool {
    if z.is_empty()
        || ["z", "utc", "gmt"]
            .iter()
            .any(|n| z.eq_ignore_ascii_case(n))
    {
        return true;
    }
    let Some(off) = z.strip_prefix(['+', '-']).filter(|off| off.is_ascii()) else {
        return false;
    };
    let (h, m) = match off.len() {
        2 => (off, "00"),
        4 => (&off[..2], &off[2..]),
        5 if off.as_bytes()[2] == b':' => (&off[..2], &off[3..]),
        _ => return false,
    };
    let num = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    num(h).is_some_and(|h| h <= 23) && num(m).is_some_and(|m| m <= 59)
}

/// A date without time: numeric (year first, or year last in `order`) or
/// with an English month name.
fn parse_day(s: &str, order: DateOrder) -> Option<NaiveDate> {
    let mut parts = s.split(['/', '.', '-']);
    if let (Some(a), Some(b), Some(c), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
        && let (Some(a), Some(b), Some(c)) = (number(a), number(b), number(c))
    {
        return match (a.1, b.1, c.1) {
            (4, 1..=2, 1..=2) => NaiveDate::from_ymd_opt(a.0 as i32, b.0, c.0),
            // Only in the configured order: falling back to the other for
            // `13/04/2025` would read a day-first file's `05/04/2025` one
            // way and `13/04/2025` the other, without a word.
            (1..=2, 1..=2, 4) => {
                let (month, day) = match order {
                    DateOrder::Mdy => (a.0, b.0),
                    DateOrder::Dmy => (b.0, a.0),
                };
                NaiveDate::from_ymd_opt(c.0 as i32, month, day)
            }
            _ => None,
        };
    }
    named_month_date(s)
}

/// An ASCII number of at most 4 digits, and its digit count.
fn number(s: &str) -> Option<(u32, usize)> {
    (!s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok().map(|n| (n, s.len())))
        .flatten()
}

/// `Dec 31, 2025`, `December 31 2025`, `31 Dec 2025`, `31-Dec-2025`,
/// `2025-Dec-31`, optionally after a weekday (`Wed, 31 Dec 2025`).
fn named_month_date(s: &str) -> Option<NaiveDate> {
    let mut tokens = s
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '-' | '/' | '.'))
        .filter(|t| !t.is_empty());
    let mut t: [&str; 4] = [""; 4];
    let mut n = 0;
    for tok in tokens.by_ref() {
        if n == t.len() {
            return None;
        }
        t[n] = tok;
        n += 1;
    }
    let t = match n {
        3 => [t[0], t[1], t[2]],
        4 if is_weekday(t[0]) => [t[1], t[2], t[3]],
        _ => return None,
    };
    let (month, day, year) = if let Some(m) = month_number(t[0]) {
        (m, number(t[1])?, number(t[2])?)
    } else if let Some(m) = month_number(t[1]) {
        let (a, b) = (number(t[0])?, number(t[2])?);
        if a.1 == 4 { (m, b, a) } else { (m, a, b) }
    } else {
        return None;
    };
    if year.1 != 4 || day.1 > 2 {
        return None;
    }
    NaiveDate::from_ymd_opt(year.0 as i32, month, day.0)
}

const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

/// 1-12 for an English month name or its abbreviation of 3+ letters.
fn month_number(t: &str) -> Option<u32> {
    if t.len() < 3 || !t.is_ascii() {
        return None;
    }
    let t = t.to_ascii_lowercase();
    MONTHS
        .iter()
        .position(|m| m.starts_with(&t))
        .map(|i| i as u32 + 1)
}

fn is_weekday(t: &str) -> bool {
    const DAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    t.len() >= 3 && t.is_ascii() && {
        let t = t.to_ascii_lowercase();
        DAYS.iter().any(|d| d.starts_with(&t))
    }
}

/// An email address in Unicode NFKC (full-width `ｊｏｈｎ@ａｃｍｅ.ｃｏｍ` is
/// `john@acme.com`, a decomposed `é` is one character): the form
/// [`valid_email`] checks.
pub fn nfkc_email(s: &str) -> std::borrow::Cow<'_, str> {
    use unicode_normalization::UnicodeNormalization as _;
    if s.is_ascii() {
        // ASCII is its own NFKC.
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(s.nfkc().collect())
}

/// An email address as stored and matched: [`nfkc_email`], lower-cased
/// (after validation: lower-casing `İ` makes `i` and a combining dot).
pub fn normalise_email(s: &str) -> String {
    nfkc_email(s).to_lowercase()
}

/// A practical email address check: `local@domain`, at most 254 bytes.
/// The local part is RFC 5322 `atext` (letters, digits and
/// ``!#$%&'*+/=?^_`{|}~-``, also non-ASCII letters) in dot-separated,
/// non-empty pieces of at most 64 bytes in all; the domain has at least
/// two dot-separated labels of letters, digits and inner hyphens, and ends
/// in a top-level domain of 2+ letters (or a punycode `xn--` one). Quoted
/// local parts, comments, IP literals and display names are refused.
pub fn valid_email(s: &str) -> bool {
    if s.len() > 254 {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    valid_local_part(local) && valid_domain(domain)
}

fn valid_local_part(l: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+/=?^_`{|}~-";
    l.len() <= 64
        && l.split('.').all(|piece| {
            !piece.is_empty()
                && piece.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || SPECIALS.contains(c)
                        || (!c.is_ascii() && c.is_alphanumeric())
                })
        })
}

fn valid_domain(d: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c == '-' || c.is_alphanumeric())
    };
    let Some((_, tld)) = d.rsplit_once('.') else {
        return false;
    };
    let tld_ok = (tld.chars().count() >= 2 && tld.chars().all(char::is_alphabetic))
        || tld.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("xn--"));
    tld_ok && d.split('.').all(label_ok)
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
        assert_eq!(p("+5"), Some(5.0));
        assert_eq!(p("\u{2212}5"), Some(-5.0));
        assert_eq!(p("5 €"), Some(5.0));
        assert_eq!(p("5$"), Some(5.0));
        assert_eq!(p("007"), Some(7.0));
        assert_eq!(p("0.5"), Some(0.5));
        let zero = p("-0").unwrap();
        assert!(zero == 0.0 && zero.is_sign_positive());
        for bad in [
            "",
            "abc",
            "12abc",
            "1,2,3",
            "1e5",
            "5.",
            "5,00",
            "$",
            "1.2.3",
            "NaN",
            "inf",
            "$$5",
            "$€5",
            "$5$",
            "0,500",
            "1 000,000.5",
            "+-5",
            "++5",
            "+5-",
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

    fn ms(y: i32, m: u32, d: u32) -> i64 {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis()
    }

    #[test]
    fn dates() {
        let day = Some(ms(2025, 12, 31));
        for s in [
            "2025-12-31",
            "2025/12/31",
            "2025.12.31",
            "2025-12-31T00:00:00Z",
            "Dec 31, 2025",
            "Dec 31 2025",
            "Dec. 31, 2025",
            "December 31, 2025",
            "december 31 2025",
            "31 December 2025",
            "31 Dec 2025",
            "31-Dec-2025",
            "31-DEC-2025",
            "31/Dec/2025",
            "2025-Dec-31",
            "Wed, 31 Dec 2025",
            " 2025-12-31 ",
        ] {
            assert_eq!(parse_date(s, DateOrder::Mdy), day, "{s:?}");
            assert_eq!(parse_date(s, DateOrder::Dmy), day, "{s:?}");
        }
        assert_eq!(
            parse_date("03/04/2025", DateOrder::Mdy),
            Some(ms(2025, 3, 4))
        );
        assert_eq!(
            parse_date("03/04/2025", DateOrder::Dmy),
            Some(ms(2025, 4, 3))
        );
        assert_eq!(parse_date("3-4-2025", DateOrder::Dmy), Some(ms(2025, 4, 3)));
        // The configured order only, never the other as a fallback.
        assert_eq!(parse_date("12/31/2025", DateOrder::Mdy), day);
        assert_eq!(parse_date("31.12.2025", DateOrder::Dmy), day);
        assert_eq!(parse_date("12/31/2025", DateOrder::Dmy), None);
        assert_eq!(parse_date("31.12.2025", DateOrder::Mdy), None);
        // Year first is always year-month-day.
        assert_eq!(
            parse_date("2025.03.04", DateOrder::Dmy),
            Some(ms(2025, 3, 4))
        );
        for bad in [
            "",
            "tomorrow",
            "13/13/2025",
            "2025-02-30",
            "1/2/25",
            "31-Dec-25",
            "Dec 32 2025",
            "Foo 31 2025",
            "Ma 3 2025",
            "2025.13.01",
            "12025-01-01",
            "2025-12-31 abc",
            "31 Dec 2025 2026",
            "Dec 31, 2025 Wed",
            "2025-12-31 10:00 +1€",
            "0000-01-01",
            "1899-12-31",
            "2201-01-01",
            "2025-12-31 10:00 -é1",
        ] {
            assert_eq!(parse_date(bad, DateOrder::Mdy), None, "{bad:?}");
        }
    }

    #[test]
    fn date_times_keep_the_date_as_written() {
        let day = Some(ms(2025, 12, 31));
        for s in [
            "2025-12-31T00:00:00+01:00",
            "2025-12-31T23:30:00-05:00",
            "2025-12-31T10:00:00Z",
            "2025-12-31T10:00:00.123Z",
            "2025-12-31T10:00",
            "2025-12-31T10:00:00+0100",
            "2025-12-31 10:00:00",
            "2025-12-31 10:00",
            "2025-12-31 23:59:59.999999",
            "2025-12-31 10:00:00 UTC",
            "12/31/2025 10:00",
            "12/31/2025 0:00",
            "12/31/2025 10:00:00 PM",
            "12/31/2025 10:00AM",
            "12/31/2025, 10:00:00 a.m.",
            "Dec 31, 2025 10:00",
            "31-Dec-2025 10:00:00",
        ] {
            assert_eq!(parse_date(s, DateOrder::Mdy), day, "{s:?}");
        }
        // The configured order still decides ambiguous dates with a time.
        assert_eq!(
            parse_date("03/04/2025 10:00", DateOrder::Mdy),
            Some(ms(2025, 3, 4))
        );
        assert_eq!(
            parse_date("03/04/2025 10:00", DateOrder::Dmy),
            Some(ms(2025, 4, 3))
        );
        for bad in [
            "2025-12-31T25:00:00",
            "2025-12-31T10:60",
            "2025-12-31T10",
            "2025-12-31 10:0",
            "2025-12-31 100:00",
            "12/31/2025 13:00 PM",
            "12/31/2025 0:00 AM",
            "2025-12-31 10:00 xyz",
            "2025-12-31 10:00:00+25:00",
            "2025-12-31 10:00:00.",
            "12/31/2025T10:00",
            "Dec 31 2025T10:00",
            "12/31/2025 10:00 10:00",
            "10:00",
            "10:00 12/31/2025",
        ] {
            assert_eq!(parse_date(bad, DateOrder::Mdy), None, "{bad:?}");
        }
    }

    #[test]
    fn emails_normalise_to_one_spelling() {
        assert_eq!(normalise_email("ｊｏｈｎ@ａｃｍｅ.ｃｏｍ"), "john@acme.com");
        assert_eq!(normalise_email("John@ACME.com"), "john@acme.com");
        let decomposed = "jose\u{301}@cafe\u{301}.fr";
        assert!(!valid_email(decomposed));
        assert_eq!(normalise_email(decomposed), "josé@café.fr");
        assert!(valid_email(&nfkc_email(decomposed)));
        // Turkish dotted capital I: valid as written, stored lower-cased.
        assert!(valid_email(&nfkc_email("İpek@firma.com.tr")));
        assert_eq!(
            normalise_email("İpek@firma.com.tr"),
            "i\u{307}pek@firma.com.tr"
        );
    }

    #[test]
    fn emails() {
        for ok in [
            "john@acme.com",
            "a.b+c@sub.example.co.uk",
            "o'brien@acme.com",
            "x_y-z@my-host.io",
            "john@acme.xn--p1ai",
            "josé@café.fr",
            "1@2.de",
        ] {
            assert!(valid_email(ok), "{ok:?}");
        }
        let long_local = format!("{}@acme.com", "a".repeat(65));
        let long = format!("a@{}.com", "b".repeat(250));
        for bad in [
            "",
            "john",
            "john@",
            "@acme.com",
            "john@acme",
            "jo hn@acme.com",
            "a@b@c.com",
            "a@.com",
            "<john@acme.com>",
            "John <john@acme.com>",
            "john@acme.com,jane",
            "john@acme.com;jane@acme.com",
            "jo\"hn@acme.com",
            "\"john\"@acme.com",
            ".john@acme.com",
            "john.@acme.com",
            "jo..hn@acme.com",
            "john@acme..com",
            "john@-acme.com",
            "john@acme-.com",
            "john@acme.c",
            "john@acme.c0m",
            "john@acme.com.",
            "john@acme_corp.com",
            "john@[127.0.0.1]",
            "john(x)@acme.com",
            "john@acme.com\n",
            &long_local,
            &long,
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
        fn dates_in_every_format_are_midnight_of_the_written_day(
            y in 1900i32..2100, m in 1u32..=12, d in 1u32..=28,
            h in 0u32..24, min in 0u32..60,
            off in -14i32..=14,
            style in 0usize..8,
            dmy in any::<bool>(),
        ) {
            let order = if dmy { DateOrder::Dmy } else { DateOrder::Mdy };
            let name = MONTHS[m as usize - 1];
            let (dd, mm) = if dmy { (d, m) } else { (m, d) };
            let sign = if off < 0 { '-' } else { '+' };
            let text = match style {
                0 => format!("{y}-{m:02}-{d:02}T{h:02}:{min:02}:00{sign}{:02}:00", off.abs()),
                1 => format!("{y}-{m:02}-{d:02} {h:02}:{min:02}:00"),
                2 => format!("{dd:02}/{mm:02}/{y} {h}:{min:02}"),
                3 => format!("{dd}.{mm}.{y}"),
                4 => format!("{d}-{}-{y}", &name[..3]),
                5 => format!("{name} {d}, {y}"),
                6 => format!("{y}.{m:02}.{d:02}"),
                _ => format!("{} {d} {y} {h}:{min:02}", &name[..3]),
            };
            prop_assert_eq!(parse_date(&text, order), Some(ms(y, m, d)), "{}", text);
        }

        #[test]
        fn number_parsing_never_panics(s in "\\PC{0,30}") {
            if let Some(n) = parse_number(&s, NumberLocale::Dot) { prop_assert!(n.is_finite()); }
            let _ = parse_number(&s, NumberLocale::Comma);
            let _ = parse_date(&s, DateOrder::Dmy);
            let _ = valid_email(&s);
        }

        #[test]
        fn a_time_followed_by_any_text_never_panics(
            time in "(2025-12-31|12/31/2025)[ T]1?0:00(:00)?( ?[ap]m)?",
            tail in "[ +-]{0,2}\\PC{0,6}",
        ) {
            let _ = parse_date(&format!("{time}{tail}"), DateOrder::Mdy);
        }
    }
}
