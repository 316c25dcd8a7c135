//! Request paths as rules see them: one canonical spelling, so that no
//! spelling of a path reaches the workload past a rule written for another
//! (`/public/../admin`, `//admin` and `/%61dmin` are all `/admin`).
//!
//! The steps, on the path of the request target (the query is kept apart
//! and forwarded as sent):
//! 1. Percent-encodings are checked (two hex digits) and those of
//!    unreserved characters (letters, digits, `-`, `.`, `_`, `~`) decoded;
//!    the others are kept with upper-case hex (RFC 3986, 6.2.2.1-2).
//! 2. An encoded `/` (`%2F`), an encoded or literal `\` (`%5C`) and an
//!    encoded or literal NUL (`%00`) are refused: servers disagree on what
//!    they mean, so no rule could say what it allows.
//! 3. Repeated slashes are merged, then dot segments removed (RFC 3986,
//!    5.2.4); a `..` above the root stays at the root.

use super::PathError;

/// The canonical form of `target`'s path, and the query (without its `?`)
/// if any. `target` is the request target in origin form (`/a/b?c`).
pub fn normalise(target: &str) -> Result<(String, Option<&str>), PathError> {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let decoded = decode_unreserved(path)?;
    Ok((remove_dot_segments(&merge_slashes(&decoded)), query))
}

/// Step 1 and 2: decodes the percent-encodings of unreserved characters,
/// upper-cases the others and refuses the ambiguous ones.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(PathError::BadEncoding)?;
                match value {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0 => return Err(PathError::Nul),
                    v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => {
                        out.push(char::from(v));
                    }
                    v => out.push_str(&format!("%{v:02X}")),
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::Nul),
            _ => {
                // A whole character (paths are UTF-8 once parsed): copied as is.
                let len = utf8_len(bytes[i]);
                let end = (i + len).min(bytes.len());
                out.push_str(path.get(i..end).ok_or(PathError::BadEncoding)?);
                i = end;
            }
        }
    }
    Ok(out)
}

/// The length of the UTF-8 character starting with `first`.
fn utf8_len(first: u8) -> usize {
    match first {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Step 3a: `//` and longer runs of slashes become one.
fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut last_slash = false;
    for c in path.chars() {
        if c == '/' && last_slash {
            continue;
        }
        last_slash = c == '/';
        out.push(c);
    }
    out
}

/// Step 3b: removes `.` and `..` segments of an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                kept.pop();
                trailing_slash = i == last;
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("/", "/"; "root")]
    #[test_case("/api/v1", "/api/v1"; "plain")]
    #[test_case("/api/v1/", "/api/v1/"; "trailing slash kept")]
    #[test_case("/public/../admin", "/admin"; "dot dot")]
    #[test_case("/a/./b", "/a/b"; "dot")]
    #[test_case("/a/b/..", "/a/"; "dot dot at the end")]
    #[test_case("/a/.", "/a/"; "dot at the end")]
    #[test_case("/../../etc", "/etc"; "above the root")]
    #[test_case("//admin", "/admin"; "double slash")]
    #[test_case("/a///b//", "/a/b/"; "runs of slashes")]
    #[test_case("/%61dmin", "/admin"; "encoded letter")]
    #[test_case("/%2e%2E/admin", "/admin"; "encoded dots")]
    #[test_case("/public/%2e%2e/admin", "/admin"; "encoded dot dot inside")]
    #[test_case("/a%20b", "/a%20b"; "space stays encoded")]
    #[test_case("/a%3fb", "/a%3Fb"; "hex upper-cased")]
    #[test_case("/caf\u{e9}", "/caf\u{e9}"; "utf8 kept")]
    #[test_case("/a..b/c", "/a..b/c"; "dots inside a segment")]
    fn canonical_paths(raw: &str, want: &str) {
        assert_eq!(normalise(raw).unwrap().0, want);
    }

    #[test]
    fn the_query_is_kept_apart_and_untouched() {
        assert_eq!(
            normalise("/a/../b?x=/../%2F").unwrap(),
            ("/b".to_owned(), Some("x=/../%2F"))
        );
    }

    #[test_case("/%2Fadmin", PathError::EncodedSlash; "encoded slash")]
    #[test_case("/a%2fb", PathError::EncodedSlash; "encoded slash lower case")]
    #[test_case("/a%5cb", PathError::Backslash; "encoded backslash")]
    #[test_case("/a\\b", PathError::Backslash; "backslash")]
    #[test_case("/a%00", PathError::Nul; "encoded nul")]
    #[test_case("/a\0", PathError::Nul; "nul")]
    #[test_case("/a%zz", PathError::BadEncoding; "bad hex")]
    #[test_case("/a%4", PathError::BadEncoding; "short escape")]
    #[test_case("admin", PathError::NotOriginForm; "relative")]
    #[test_case("*", PathError::NotOriginForm; "asterisk")]
    fn refused(raw: &str, want: PathError) {
        assert_eq!(normalise(raw).unwrap_err(), want);
    }

    proptest::proptest! {
        /// Whatever comes in, the result is canonical: no dot segment, no
        /// empty segment inside, and normalising it again changes nothing.
        #[test]
        fn canonical_and_idempotent(raw in "/[a-z./%0-9A-F]{0,40}") {
            if let Ok((path, _)) = normalise(&raw) {
                proptest::prop_assert!(path.starts_with('/'));
                proptest::prop_assert!(!path.contains("//"));
                proptest::prop_assert!(!path.split('/').any(|s| s == "." || s == ".."));
                proptest::prop_assert_eq!(normalise(&path).map(|(p, _)| p), Ok(path.clone()));
            }
        }
    }
}
