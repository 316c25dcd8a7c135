//! Durations written as in the CRDs (`90s`, `10m`, `1h30m`, `500ms`): whole
//! numbers followed by a unit, repeated, as the schema pattern
//! `^([0-9]+(ms|s|m|h))+$` allows.

use std::time::Duration;

/// The schema pattern for these durations (RE2, anchored).
pub const PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

/// Why a duration string is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty input.
    #[error("empty duration; write for example 10m or 1h30m")]
    Empty,
    /// Something other than digits followed by ms, s, m or h.
    #[error("invalid duration {0:?}; use whole numbers with ms, s, m or h, like 1h30m")]
    Invalid(String),
    /// Too large to represent.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses a CRD duration.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let invalid = || DurationError::Invalid(text.to_owned());
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Overflow(text.to_owned()))?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return Err(invalid());
        };
        rest = &rest[len..];
        let ms = number
            .checked_mul(unit_ms)
            .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
        total = total
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("90s", 90_000)]
    #[test_case("10m", 600_000)]
    #[test_case("1h30m", 5_400_000)]
    #[test_case("500ms", 500)]
    #[test_case("1m1ms", 60_001)]
    fn parses(text: &str, ms: u64) {
        assert_eq!(parse(text), Ok(Duration::from_millis(ms)));
    }

    #[test_case("" ; "empty")]
    #[test_case("10" ; "no unit")]
    #[test_case("m" ; "no number")]
    #[test_case("1d" ; "days")]
    #[test_case("1.5h" ; "fraction")]
    #[test_case("-1m" ; "negative")]
    #[test_case("99999999999999999999h" ; "overflow")]
    fn rejects(text: &str) {
        assert!(parse(text).is_err(), "{text}");
    }

    #[test]
    fn agrees_with_the_schema_pattern() {
        let re = regex::Regex::new(PATTERN).unwrap();
        for s in ["1h", "1h30m", "5ms", "1", "h", "1.5h", "1m1"] {
            assert_eq!(re.is_match(s), parse(s).is_ok(), "{s}");
        }
    }
}
