//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE ID specification
//! (SPIFFE-ID.md, section 2) defines them.
//!
//! Both types hold an interned `Arc<str>`, so cloning them into hot state is cheap,
//! and both round-trip through [`FromStr`] and [`Display`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The URI scheme every SPIFFE ID starts with, including the authority separator.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Longest SPIFFE ID the specification allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name the specification allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Regular expression (RE2 syntax, anchored) that a trust domain name matches.
/// The CRD schemas use it; [`TrustDomain::from_str`] is the authoritative check.
pub const TRUST_DOMAIN_PATTERN: &str = "^[a-z0-9._-]+$";
/// Regular expression (RE2 syntax, anchored) that a SPIFFE ID matches; only the
/// length limit is left to `maxLength`. A path segment starts with a non-dot,
/// or is `.x...`, or `..` followed by at least one more character, so that `.`
/// and `..` segments never match.
pub const SPIFFE_ID_PATTERN: &str = concat!(
    "^spiffe://[a-z0-9._-]+",
    r"(/([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+))*$"
);

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty; expected spiffe://<trust-domain>/<path>")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\" (lower case)")]
    WrongScheme,
    /// The input is longer than 2048 bytes.
    #[error("SPIFFE ID is {0} bytes long; the limit is 2048")]
    TooLong(usize),
    /// No trust domain between `spiffe://` and the path.
    #[error("SPIFFE ID has no trust domain after \"spiffe://\"")]
    MissingTrustDomain,
    /// The trust domain name is longer than 255 bytes.
    #[error("trust domain is {0} bytes long; the limit is 255")]
    TrustDomainTooLong(usize),
    /// A character other than `a-z 0-9 . - _` in the trust domain.
    #[error(
        "trust domain has {0:?} at byte {1}; only lower-case letters, digits, '.', '-' and '_' are allowed (no port, user info or upper case)"
    )]
    BadTrustDomainChar(char, usize),
    /// A query (`?`) or fragment (`#`) part.
    #[error("SPIFFE ID must not have a query or fragment (found {0:?} at byte {1})")]
    QueryOrFragment(char, usize),
    /// Two slashes in a row, or a trailing slash.
    #[error("SPIFFE ID path has an empty segment at byte {0} (double or trailing '/')")]
    EmptySegment(usize),
    /// A `.` or `..` path segment.
    #[error("SPIFFE ID path has a '.' or '..' segment at byte {0}")]
    DotSegment(usize),
    /// A character other than `A-Z a-z 0-9 . - _` in the path.
    #[error(
        "SPIFFE ID path has {0:?} at byte {1}; only letters, digits, '.', '-' and '_' are allowed (no percent-encoding)"
    )]
    BadPathChar(char, usize),
}

/// A SPIFFE trust domain name, such as `example.org`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// The trust domain name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<name>`), used for
    /// example as the bundle endpoint's expected ID.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("{SCHEME_PREFIX}{}", self.0).into(),
            td_end: SCHEME_PREFIX.len() + self.0.len(),
        }
    }

    /// The SPIFFE ID `spiffe://<name><path>`; `path` is checked like any
    /// SPIFFE ID path (it starts with `/`).
    pub fn member(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        format!("{SCHEME_PREFIX}{}{path}", self.0).parse()
    }
}

/// Validates a trust domain name; `offset` shifts byte positions in errors so
/// they point into the enclosing SPIFFE ID.
fn check_trust_domain(name: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(name.len()));
    }
    for (i, c) in name.char_indices() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            '?' | '#' => return Err(SpiffeIdError::QueryOrFragment(c, offset + i)),
            _ => return Err(SpiffeIdError::BadTrustDomainChar(c, offset + i)),
        }
    }
    Ok(())
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    /// Parses a bare trust domain name (`example.org`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_trust_domain(s, 0)?;
        Ok(TrustDomain(s.into()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain>` followed by zero or more path segments.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    full: Arc<str>,
    /// Byte index where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.full[SCHEME_PREFIX.len()..self.td_end].into())
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    /// True when this ID is in `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.full[SCHEME_PREFIX.len()..self.td_end] == td.as_str()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        check_trust_domain(&rest[..td_len], SCHEME_PREFIX.len())?;
        let td_end = SCHEME_PREFIX.len() + td_len;
        check_path(&s[td_end..], td_end)?;
        Ok(SpiffeId {
            full: s.into(),
            td_end,
        })
    }
}

/// Validates a SPIFFE ID path (empty, or `/`-separated non-empty segments).
fn check_path(path: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller split at the first '/', so `path` starts with one.
    let mut segment_start = offset + 1;
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment(segment_start));
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment(segment_start));
        }
        for (i, c) in segment.char_indices() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                '?' | '#' => return Err(SpiffeIdError::QueryOrFragment(c, segment_start + i)),
                _ => return Err(SpiffeIdError::BadPathChar(c, segment_start + i)),
            }
        }
        segment_start += segment.len() + 1;
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

/// Serde support shared by both types: a plain string that must parse.
macro_rules! string_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(SpiffeId);
string_serde!(TrustDomain);

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("spiffe://example.org" ; "trust domain only")]
    #[test_case("spiffe://example.org/ns/default/sa/web" ; "k8s style")]
    #[test_case("spiffe://a_b-c.d/X.y-Z_0" ; "all allowed characters")]
    #[test_case("spiffe://example.org/..a/a.." ; "dots inside a segment")]
    fn valid_ids_round_trip(s: &str) {
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.to_string(), s);
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
    }

    #[test_case("", SpiffeIdError::Empty ; "empty")]
    #[test_case("http://example.org/a", SpiffeIdError::WrongScheme ; "wrong scheme")]
    #[test_case("SPIFFE://example.org/a", SpiffeIdError::WrongScheme ; "upper case scheme")]
    #[test_case("spiffe:///a", SpiffeIdError::MissingTrustDomain ; "no trust domain")]
    #[test_case("spiffe://Example.org", SpiffeIdError::BadTrustDomainChar('E', 9) ; "upper case trust domain")]
    #[test_case("spiffe://example.org:8443/a", SpiffeIdError::BadTrustDomainChar(':', 20) ; "port")]
    #[test_case("spiffe://user@example.org/a", SpiffeIdError::BadTrustDomainChar('@', 13) ; "userinfo")]
    #[test_case("spiffe://example.org/a?x=1", SpiffeIdError::QueryOrFragment('?', 22) ; "query")]
    #[test_case("spiffe://example.org/a#f", SpiffeIdError::QueryOrFragment('#', 22) ; "fragment")]
    #[test_case("spiffe://example.org?x", SpiffeIdError::QueryOrFragment('?', 20) ; "query after trust domain")]
    #[test_case("spiffe://example.org/", SpiffeIdError::EmptySegment(21) ; "trailing slash")]
    #[test_case("spiffe://example.org/a//b", SpiffeIdError::EmptySegment(23) ; "double slash")]
    #[test_case("spiffe://example.org/a/./b", SpiffeIdError::DotSegment(23) ; "dot segment")]
    #[test_case("spiffe://example.org/..", SpiffeIdError::DotSegment(21) ; "dot dot segment")]
    #[test_case("spiffe://example.org/a%20b", SpiffeIdError::BadPathChar('%', 22) ; "percent encoding")]
    #[test_case("spiffe://example.org/ä", SpiffeIdError::BadPathChar('ä', 21) ; "non ascii")]
    fn invalid_ids_are_rejected(s: &str, want: SpiffeIdError) {
        assert_eq!(s.parse::<SpiffeId>().unwrap_err(), want);
    }

    #[test]
    fn length_limits() {
        let long_td = "a".repeat(256);
        assert_eq!(
            format!("spiffe://{long_td}")
                .parse::<SpiffeId>()
                .unwrap_err(),
            SpiffeIdError::TrustDomainTooLong(256)
        );
        let ok_td = "a".repeat(255);
        assert!(format!("spiffe://{ok_td}").parse::<SpiffeId>().is_ok());
        let path = "/x".repeat(1020);
        let id = format!("spiffe://example.org{path}");
        assert_eq!(id.len(), 2060);
        assert_eq!(
            id.parse::<SpiffeId>().unwrap_err(),
            SpiffeIdError::TooLong(2060)
        );
    }

    #[test]
    fn parts() {
        let id: SpiffeId = "spiffe://example.org/ns/a".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/a");
        assert!(id.is_member_of(&"example.org".parse().unwrap()));
        assert!(!id.is_member_of(&"example.or".parse().unwrap()));
        let td: TrustDomain = "example.org".parse().unwrap();
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert_eq!(td.id().path(), "");
    }

    #[test]
    fn serde_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://a/b\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://a/b\"");
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://a//b\"").unwrap_err();
        assert!(err.to_string().contains("empty segment"), "{err}");
        let err = serde_json::from_str::<TrustDomain>("\"A\"").unwrap_err();
        assert!(err.to_string().contains("lower-case"), "{err}");
    }

    /// The schema patterns accept exactly what the parser accepts (length
    /// aside, which the CRDs check with maxLength).
    #[test]
    fn patterns_agree_with_parser_on_samples() {
        let samples = [
            "spiffe://example.org/a/./b",
            "spiffe://example.org/..",
            "spiffe://example.org/.",
            "spiffe://example.org/.../.a/..b/a./a..",
            "spiffe://example.org/a",
            "spiffe://Example.org/a",
            "spiffe://example.org/a/",
            "spiffe://example.org/a b",
            "spiffe://example.org",
            "spiffe://example.org:1/a",
        ];
        let re = regex::Regex::new(SPIFFE_ID_PATTERN).unwrap();
        for s in samples {
            assert_eq!(re.is_match(s), s.parse::<SpiffeId>().is_ok(), "{s}");
        }
        let td = regex::Regex::new(TRUST_DOMAIN_PATTERN).unwrap();
        for s in ["example.org", "Example.org", "a:1", "", "a_b-c"] {
            assert_eq!(td.is_match(s), s.parse::<TrustDomain>().is_ok(), "{s:?}");
        }
    }

    proptest::proptest! {
        /// Any string either fails to parse or round-trips exactly.
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,64}|spiffe://[a-z.]{0,8}(/[A-Za-z0-9./%-]{0,6}){0,4}") {
            if let Ok(id) = s.parse::<SpiffeId>() {
                proptest::prop_assert_eq!(id.to_string(), s.clone());
            }
        }

        /// The schema pattern and the parser agree on every input.
        #[test]
        fn pattern_agrees_with_parser(s in "spiffe://[a-zA-Z.:@]{0,4}(/[A-Za-z.%?-]{0,4}){0,4}") {
            let re = regex::Regex::new(SPIFFE_ID_PATTERN).unwrap();
            proptest::prop_assert_eq!(re.is_match(&s), s.parse::<SpiffeId>().is_ok(), "{}", s);
        }
    }
}
