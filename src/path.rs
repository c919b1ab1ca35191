//! The request path as rules and public paths see it: [`normalize_path`].
//!
//! # Path normalisation
//!
//! Rules and public paths are matched against the request path *normalised
//! the way the upstream will see it*, by [`normalize_path`]:
//!
//! 1. The query (`?…`) and fragment (`#…`) are stripped; the rest is the path.
//! 2. The path must start with `/` and be at most 8192 bytes long.
//! 3. Percent escapes are decoded once, and only for unreserved characters
//!    (`A-Z a-z 0-9 - . _ ~`, hex digits of either case): `%61` becomes `a`.
//!    Every other escape is kept as it is, with its two hex digits upper-cased
//!    (`%c3%a9` becomes `%C3%A9`). There is no second round: `%252e` stays
//!    `%252e` (only `%25` is an escape there; the `2e` after it is plain text).
//! 4. Dot segments are resolved as in RFC 3986 `remove_dot_segments`, after the
//!    decoding, so `%2e%2e` counts as `..`: `/v1/admin/../admin/x` becomes
//!    `/v1/admin/x`, `/v1/x/../admin/` becomes `/v1/admin/`, `/v1/admin/./x`
//!    becomes `/v1/admin/x`. A path ending in `.` or `..` keeps a trailing
//!    slash (`/a/b/..` becomes `/a/`).
//! 5. Repeated slashes are merged (`//` becomes `/`), as Envoy's
//!    `merge_slashes` does.
//!
//! A path that cannot be normalised safely is refused ([`PathError`]) rather
//! than guessed at: one not starting with `/`; one longer than 8192 bytes;
//! one with an encoded slash or backslash (`%2F`, `%5C`, any case), a raw
//! backslash, a raw or encoded control character (below 0x20, or 0x7F,
//! including NUL), an invalid percent escape (`%G1`, or `%4` at the end), a
//! raw non-ASCII byte, or a `..` that would climb above the root (`/..`). A
//! `..` directly after an empty segment (`/a//../b`) is refused too: RFC 3986
//! turns it into `/a/b` but merging slashes first gives `/b`, and the upstream
//! may do either.
//!
//! # Path parameters (`;`)
//!
//! The normalised path keeps `;…` parameters as they are, as Starlette and
//! Envoy's routing see them. Servlet stacks (Tomcat, Jetty, Spring) remove
//! them from every segment first. So that both kinds of upstream are safe:
//!
//! - A segment that is `.` or `..` once its parameters are removed (`..;x`,
//!   `%2e%2e;x`) is refused, and so is one that is then empty (`/v1/;x`,
//!   which a `{name}` segment would match only with its parameters).
//! - Rules are checked against the path with its parameters and again without
//!   them (`/v1/admin/report;v=2` and `/v1/admin/report`); both must pass, the
//!   first matching rule deciding in each.
//! - A path is public only when it is public both ways: `/static/app.js;v=1`
//!   is under `/static/*`; `/health;x` is not the exact path `/health`.
//! - Configured paths may not contain `;`, so a path matching something with
//!   its parameters also matches it without them.
//!
//! Trailing slashes are significant: the rule path `/v1/telemetry/traces`
//! does not match `/v1/telemetry/traces/`.
//!

use crate::json::ConfigError;
use std::fmt;

/// The longest path (without query and fragment) accepted, in bytes.
pub const MAX_PATH_LEN: usize = 8192;

/// Why a request path was refused by [`normalize_path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Longer than [`MAX_PATH_LEN`] bytes.
    TooLong,
    /// Does not start with `/` (also an empty path, `*`, absolute URLs).
    NotAbsolute,
    /// `%2F` or `%5C`, in any case.
    EncodedSeparator,
    /// A raw `\`.
    Backslash,
    /// A raw or encoded byte below 0x20, or 0x7F.
    ControlCharacter,
    /// `%` not followed by two hex digits.
    InvalidEscape,
    /// A raw byte above 0x7F.
    NonAscii,
    /// A `..` with nothing left to remove.
    AboveRoot,
    /// A `..` right after an empty segment (`//..`): ambiguous.
    DotDotAfterEmptySegment,
    /// A segment that is `.` or `..` once its `;` parameters are removed
    /// (`..;x`): servlet stacks resolve it, Envoy does not.
    DotSegmentWithParameters,
    /// A segment that is empty once its `;` parameters are removed (`/;x`).
    EmptySegmentWithParameters,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = match self {
            PathError::TooLong => "path is longer than 8192 bytes",
            PathError::NotAbsolute => "path does not start with `/`",
            PathError::EncodedSeparator => "path contains an encoded slash or backslash",
            PathError::Backslash => "path contains a backslash",
            PathError::ControlCharacter => "path contains a control character",
            PathError::InvalidEscape => "path contains an invalid percent escape",
            PathError::NonAscii => "path contains a non-ASCII byte",
            PathError::AboveRoot => "path climbs above the root with `..`",
            PathError::DotDotAfterEmptySegment => "path has `..` right after an empty segment",
            PathError::DotSegmentWithParameters => {
                "path has a `.` or `..` segment with `;` parameters"
            }
            PathError::EmptySegmentWithParameters => {
                "path has a segment that is empty without its `;` parameters"
            }
        };
        f.write_str(reason)
    }
}

impl std::error::Error for PathError {}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s` (and `+` as a space when `plus_is_space`); a `%` not
/// followed by two hex digits is kept; the bytes are read as lossy UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|&h| hex_value(h));
                let lo = bytes.get(i + 2).and_then(|&l| hex_value(l));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_upper(n: u8) -> char {
    char::from_digit(u32::from(n), 16)
        .map(|c| c.to_ascii_uppercase())
        .unwrap_or('0')
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalises a request path (`:path`, query allowed) as described in the
/// module documentation, or says why it cannot be done safely.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }

    // Decode unreserved escapes once; upper-case the others.
    let mut decoded = String::with_capacity(path.len());
    let mut bytes = path.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = bytes.next().and_then(hex_value);
                let lo = bytes.next().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::InvalidEscape);
                };
                let v = (hi << 4) | lo;
                if is_unreserved(v) {
                    decoded.push(char::from(v));
                } else if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSeparator);
                } else if v < 0x20 || v == 0x7f {
                    return Err(PathError::ControlCharacter);
                } else {
                    decoded.push('%');
                    decoded.push(hex_upper(hi));
                    decoded.push(hex_upper(lo));
                }
            }
            b'\\' => return Err(PathError::Backslash),
            0x00..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            0x80..=0xff => return Err(PathError::NonAscii),
            _ => decoded.push(char::from(b)),
        }
    }

    // remove_dot_segments over the decoded path, empty segments included, so
    // that a `..` consuming an empty segment (where RFC 3986 and "merge
    // slashes first" disagree) can be refused.
    let rest = decoded.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut stack: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in rest.split('/') {
        // Servlet stacks drop `;params` from each segment before resolving
        // dot segments: refuse what they would read as `.`, `..` or empty.
        if let Some((base, _)) = seg.split_once(';') {
            match base {
                "." | ".." => return Err(PathError::DotSegmentWithParameters),
                "" => return Err(PathError::EmptySegmentWithParameters),
                _ => {}
            }
        }
        match seg {
            "." => trailing_slash = true,
            ".." => {
                match stack.pop() {
                    None => return Err(PathError::AboveRoot),
                    Some("") => return Err(PathError::DotDotAfterEmptySegment),
                    Some(_) => {}
                }
                trailing_slash = true;
            }
            other => {
                stack.push(other);
                trailing_slash = other.is_empty();
            }
        }
    }

    // Merge slashes: drop the empty segments.
    let mut out = String::with_capacity(decoded.len());
    for seg in stack.iter().filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// `path` (normalised) with the `;…` parameters removed from every segment,
/// as servlet stacks route it; `None` when it has no `;`.
pub(crate) fn without_parameters(path: &str) -> Option<String> {
    if !path.contains(';') {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg.split(';').next().unwrap_or_default());
    }
    Some(out)
}

/// Checks that a configured path starts with `/`, has no `;`, normalises
/// without error and is already in normal form (so that it can match
/// normalised requests).
///
/// Without `;` in configured paths, a path that matches an entry or rule
/// with its parameters also matches it without them: `;` starts after
/// the end of any prefix, and a `{name}` segment is never empty once its
/// parameters are gone (`normalize_path` refuses that).
pub(crate) fn check_config_path(p: &str, key: &str) -> Result<(), ConfigError> {
    if !p.starts_with('/') {
        return Err(ConfigError::new(key, "must start with `/`"));
    }
    if p.contains(';') {
        return Err(ConfigError::new(
            key,
            "must not contain `;`: requests are matched both with and without their `;` \
             path parameters",
        ));
    }
    match normalize_path(p) {
        Err(e) => Err(ConfigError::new(key, format!("is not a valid path: {e}"))),
        Ok(n) if n != p => Err(ConfigError::new(
            key,
            format!("is not in normal form; write `{n}`"),
        )),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- normalisation ----

    fn norm(p: &str) -> String {
        normalize_path(p).unwrap()
    }

    #[test]
    fn normalize_plain_paths_unchanged() {
        assert_eq!(norm("/"), "/");
        assert_eq!(norm("/v1/models"), "/v1/models");
        assert_eq!(norm("/v1/models/"), "/v1/models/");
        assert_eq!(norm("/v1/a-b_c.d~e"), "/v1/a-b_c.d~e");
        assert_eq!(norm("/v1/{x}"), "/v1/{x}");
    }

    #[test]
    fn normalize_dot_segments() {
        assert_eq!(norm("/v1/admin/../admin/x"), "/v1/admin/x");
        assert_eq!(norm("/v1/x/../admin/"), "/v1/admin/");
        assert_eq!(norm("/v1/admin/./x"), "/v1/admin/x");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/b/."), "/a/b/");
        assert_eq!(norm("/a/.."), "/");
        assert_eq!(norm("/."), "/");
        assert_eq!(norm("/a/./../b"), "/b");
        assert_eq!(norm("/a/.../b"), "/a/.../b");
        assert_eq!(norm("/a/..b/.c"), "/a/..b/.c");
    }

    #[test]
    fn normalize_decodes_unreserved_only() {
        assert_eq!(norm("/v1/%61dmin/x"), "/v1/admin/x");
        assert_eq!(norm("/v1/%41%7a%30%2D%2e%5F%7E"), "/v1/Az0-._~");
        assert_eq!(norm("/a/%c3%a9"), "/a/%C3%A9");
        assert_eq!(norm("/a/%3f%23%25%20"), "/a/%3F%23%25%20");
        assert_eq!(norm("/a/%7b"), "/a/%7B");
    }

    #[test]
    fn normalize_encoded_dots_count_as_dots() {
        assert_eq!(norm("/v1/x/%2e%2e/admin/x"), "/v1/admin/x");
        assert_eq!(norm("/v1/x/%2E./admin/x"), "/v1/admin/x");
        assert_eq!(norm("/v1/x/.%2e/admin/x"), "/v1/admin/x");
        assert_eq!(norm("/v1/admin/%2e/x"), "/v1/admin/x");
        assert_eq!(normalize_path("/%2e%2e"), Err(PathError::AboveRoot));
    }

    #[test]
    fn normalize_no_double_decoding() {
        assert_eq!(norm("/v1/%252e%252e/admin"), "/v1/%252e%252e/admin");
        assert_eq!(norm("/v1/%252E"), "/v1/%252E");
        assert_eq!(norm("/v1/%252f"), "/v1/%252f");
        // `%25` followed by `61` is not `a`.
        assert_eq!(norm("/v1/%2561dmin"), "/v1/%2561dmin");
    }

    #[test]
    fn normalize_merges_slashes() {
        assert_eq!(norm("/v1//admin/x"), "/v1/admin/x");
        assert_eq!(norm("//v1///admin//"), "/v1/admin/");
        assert_eq!(norm("//"), "/");
        assert_eq!(norm("/a//./b"), "/a/b");
        assert_eq!(norm("/a//."), "/a/");
    }

    #[test]
    fn normalize_strips_query_and_fragment() {
        assert_eq!(norm("/v1/models?x=/../admin"), "/v1/models");
        assert_eq!(norm("/v1/models#frag"), "/v1/models");
        assert_eq!(norm("/v1/models?a#b"), "/v1/models");
        assert_eq!(norm("/v1/models#a?b"), "/v1/models");
        assert_eq!(norm("/v1/models?q=%00\\é"), "/v1/models");
        assert_eq!(norm("/?"), "/");
    }

    #[test]
    fn normalize_rejects_climbing_above_root() {
        assert_eq!(normalize_path("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/../v1/admin"), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/a/../.."), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/a/b/../../../c"), Err(PathError::AboveRoot));
    }

    #[test]
    fn normalize_rejects_dot_dot_after_empty_segment() {
        assert_eq!(
            normalize_path("/v1/admin//../x"),
            Err(PathError::DotDotAfterEmptySegment)
        );
        assert_eq!(
            normalize_path("//.."),
            Err(PathError::DotDotAfterEmptySegment)
        );
        assert_eq!(
            normalize_path("/a//./../b"),
            Err(PathError::DotDotAfterEmptySegment)
        );
    }

    #[test]
    fn normalize_rejects_encoded_separators() {
        for p in [
            "/v1/admin%2Fx",
            "/v1/admin%2fx",
            "/v1/a%5Cb",
            "/v1/a%5cb",
            "/%2F",
        ] {
            assert_eq!(normalize_path(p), Err(PathError::EncodedSeparator), "{p}");
        }
    }

    #[test]
    fn normalize_rejects_backslash_and_control() {
        assert_eq!(normalize_path("/v1\\admin"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/v1/a%00"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/v1/a%1f"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/v1/a%7F"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/v1/a%0a"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/v1/a\0"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/v1/a\tb"), Err(PathError::ControlCharacter));
        assert_eq!(
            normalize_path("/v1/a\x7f"),
            Err(PathError::ControlCharacter)
        );
        assert_eq!(
            normalize_path("/v1/a\r\n"),
            Err(PathError::ControlCharacter)
        );
    }

    #[test]
    fn normalize_rejects_invalid_escapes() {
        for p in ["/a%G1", "/a%4", "/a%", "/a%%41", "/a%1G", "/a%4é"] {
            assert_eq!(normalize_path(p), Err(PathError::InvalidEscape), "{p}");
        }
    }

    #[test]
    fn normalize_rejects_non_ascii() {
        assert_eq!(normalize_path("/v1/caf\u{e9}"), Err(PathError::NonAscii));
        assert_eq!(
            normalize_path("/v1/\u{ff0f}admin"),
            Err(PathError::NonAscii)
        );
    }

    #[test]
    fn normalize_rejects_relative_and_empty() {
        for p in ["", "v1/admin", "*", "?x=1", "http://host/v1", "%2Fv1"] {
            assert_eq!(normalize_path(p), Err(PathError::NotAbsolute), "{p}");
        }
    }

    #[test]
    fn normalize_length_limit() {
        let ok = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        assert_eq!(norm(&ok), ok);
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(normalize_path(&long), Err(PathError::TooLong));
        // The query does not count.
        let with_query = format!("/a?{}", "q".repeat(MAX_PATH_LEN * 2));
        assert_eq!(norm(&with_query), "/a");
    }

    #[test]
    fn normalize_is_idempotent() {
        for p in [
            "/v1/admin/../admin/x",
            "/v1/%61dmin/%c3%a9/",
            "/a//b/./c/..",
            "/v1/%252e",
        ] {
            let once = norm(p);
            assert_eq!(norm(&once), once, "{p}");
        }
    }

    #[test]
    fn path_error_display() {
        assert_eq!(
            PathError::EncodedSeparator.to_string(),
            "path contains an encoded slash or backslash"
        );
        assert_eq!(
            PathError::TooLong.to_string(),
            "path is longer than 8192 bytes"
        );
    }

    // ---- `;` path parameters ----

    #[test]
    fn normalize_refuses_dot_or_empty_segments_with_parameters() {
        for raw in [
            "/static/..;/v1/admin/x",
            "/v1/x/..;/admin/y",
            "/v1/x/..;a=b/admin/y",
            "/v1/x/..;",
            "/v1/x/.;x/admin",
            "/v1/x/.;",
            "/v1/x/%2e%2e;x/admin",
            "/v1/x/%2E.;x/admin",
            "/v1/x/%2e;/admin",
            "/v1/x/..;a;b/admin",
        ] {
            assert_eq!(
                normalize_path(raw),
                Err(PathError::DotSegmentWithParameters),
                "{raw}"
            );
        }
        for raw in [
            "/;x",
            "/v1/files/;x",
            "/v1/files/;",
            "/v1//;x/a",
            "/v1/;a;b/",
        ] {
            assert_eq!(
                normalize_path(raw),
                Err(PathError::EmptySegmentWithParameters),
                "{raw}"
            );
        }
        // Refused even where the query would hide nothing: it is a path error.
        assert!(normalize_path("/v1/x/..;/admin/y?a=1").is_err());
        assert_eq!(
            PathError::DotSegmentWithParameters.to_string(),
            "path has a `.` or `..` segment with `;` parameters"
        );
    }

    #[test]
    fn normalize_keeps_ordinary_parameters() {
        assert_eq!(norm("/v1/admin/report;v=2"), "/v1/admin/report;v=2");
        assert_eq!(norm("/v1/a;x/b;y=1;z/c"), "/v1/a;x/b;y=1;z/c");
        assert_eq!(norm("/v1/a;x/../b"), "/v1/b");
        assert_eq!(norm("/v1/a/b;x/"), "/v1/a/b;x/");
        assert_eq!(norm("/v1/...;x/b"), "/v1/...;x/b");
        assert_eq!(norm("/v1/..x;y/b"), "/v1/..x;y/b");
        assert_eq!(norm("/v1/x;../b"), "/v1/x;../b");
        // An encoded `;` is not a parameter separator, for servlets either.
        assert_eq!(norm("/v1/x/..%3bx/b"), "/v1/x/..%3Bx/b");
        assert_eq!(norm("/v1/a;x?q=;..;"), "/v1/a;x");
        assert_eq!(norm(&norm("/v1/a;x//./b;y")), "/v1/a;x/b;y");
    }

    #[test]
    fn parameters_are_removed_per_segment() {
        assert_eq!(without_parameters("/v1/a"), None);
        assert_eq!(
            without_parameters("/a;x/b;y=1;z/c").as_deref(),
            Some("/a/b/c")
        );
        assert_eq!(without_parameters("/a/b;x/").as_deref(), Some("/a/b/"));
        assert_eq!(without_parameters("/a;").as_deref(), Some("/a"));
    }
}
