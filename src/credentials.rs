//! Where a credential is found besides headers (`auth.credentials`): a
//! cookie of the `Cookie` header and a parameter of the request's query,
//! and the same request without them, for `strip_authorization`.
//!
//! - Cookies: the `Cookie` header is `name=value` pairs separated by `;`
//!   (RFC 6265 §4.2.1 `cookie-string`; a space after `;` optional, as
//!   user agents and Envoy's own `Http::Utility::parseCookieValue` accept),
//!   the first `=` ending the name; a value in double quotes loses them
//!   (§4.1.1 `cookie-value`). The first cookie of the name counts.
//! - Query: the part of the target after `?` (a `#` ends it), `&`-separated
//!   `name=value` pairs, percent-decoded (`+` is kept: a credential is not
//!   form data); the first parameter of the name counts.

use crate::path::percent_decode;

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (n, v) = (pair.get(..eq)?, pair.get(eq + 1..)?);
        (n.trim_ascii() == name.as_bytes()).then(|| unquote(v.trim_ascii()))
    })
}

fn unquote(v: &[u8]) -> &[u8] {
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

/// The `Cookie` header without the cookies in `names`; `None` when nothing
/// is left.
pub fn without_cookies(header: &[u8], names: &[&str]) -> Option<Vec<u8>> {
    let kept: Vec<&[u8]> = header
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|pair| {
            let name = pair
                .iter()
                .position(|&b| b == b'=')
                .and_then(|eq| pair.get(..eq))
                .unwrap_or(pair)
                .trim_ascii();
            !pair.is_empty() && !names.iter().any(|n| n.as_bytes() == name)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join(&b"; "[..]))
}

/// The query of a request target: after `?`, before any `#`.
fn query_of(target: &str) -> Option<&str> {
    let (_, q) = target.split_once('?')?;
    Some(q.split('#').next().unwrap_or(q))
}

/// The percent-decoded value of query parameter `name`.
pub fn query(target: &str, name: &str) -> Option<String> {
    query_of(target)?.split('&').find_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(n, false) == name).then(|| percent_decode(v, false))
    })
}

/// The target without the query parameters in `names` (and without `?` when
/// none is left).
pub fn without_query(target: &str, names: &[&str]) -> String {
    let Some((path, rest)) = target.split_once('?') else {
        return target.to_string();
    };
    let (q, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (rest, None),
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let n = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !pair.is_empty() && !names.iter().any(|name| percent_decode(n, false) == *name)
        })
        .collect();
    let mut out = path.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies() {
        let h = b"a=1; session=\"tok en\";b=2; session=later";
        assert_eq!(cookie(h, "session"), Some(&b"tok en"[..]));
        assert_eq!(cookie(h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie(h, "b"), Some(&b"2"[..]));
        assert_eq!(cookie(h, "c"), None);
        assert_eq!(cookie(b"flag; x=y", "flag"), None);
        assert_eq!(cookie(b" k = v ", "k"), Some(&b"v"[..]));
        assert_eq!(cookie(b"k==v", "k"), Some(&b"=v"[..]));
        assert_eq!(
            without_cookies(h, &["session"]).as_deref(),
            Some(&b"a=1; b=2"[..])
        );
        assert_eq!(without_cookies(b"session=x", &["session"]), None);
        assert_eq!(
            without_cookies(b"a=1;;b", &["zz"]).as_deref(),
            Some(&b"a=1; b"[..])
        );
    }

    #[test]
    fn queries() {
        let t = "/v1/models?x=1&key=a%2Bb+c&key=second#frag";
        assert_eq!(query(t, "key").as_deref(), Some("a+b+c"));
        assert_eq!(query(t, "x").as_deref(), Some("1"));
        assert_eq!(query(t, "frag"), None);
        assert_eq!(query("/p?k", "k").as_deref(), Some(""));
        assert_eq!(query("/p?%6Bey=v", "key").as_deref(), Some("v"));
        assert_eq!(query("/p", "key"), None);
        assert_eq!(without_query(t, &["key"]), "/v1/models?x=1#frag");
        assert_eq!(without_query("/p?key=1", &["key"]), "/p");
        assert_eq!(without_query("/p?a=1&&b", &["key"]), "/p?a=1&b");
        assert_eq!(without_query("/p", &["key"]), "/p");
    }
}
