//! Route rules: required scopes and attributes per route ([`RouteRules`]),
//! and public paths ([`PublicPaths`]). Both match the request path normalised
//! by [`crate::path::normalize_path`] (see there for normalisation and `;`
//! path parameters).
//!
//! # Rules
//!
//! A rule matches by `path` (exact; a `{name}` segment matches exactly one
//! non-empty segment) or by `path_prefix` (a plain string prefix of the
//! normalised path), and by `methods` when given (case-insensitive; a rule on
//! `GET` also covers `HEAD`, which Starlette serves on every GET route). The first
//! matching rule decides; no matching rule means the request is allowed.

use crate::claims::Attributes;
use crate::json::{is_tchar, join, type_name, ConfigError, Obj};
use crate::path::{check_config_path, without_parameters};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;

/// The attribute holding the user's scopes.
const SCOPES: &str = "scopes";

/// Paths that need no authentication: exact paths, and prefixes written with
/// a trailing `*`. Matched against normalised paths.
#[derive(Debug, Clone, Default)]
pub struct PublicPaths {
    exact: BTreeSet<String>,
    prefixes: Vec<String>,
}

impl PublicPaths {
    /// `key` is the config key path used in errors, e.g. "public_paths".
    pub fn parse(list: &[String], key: &str) -> Result<PublicPaths, ConfigError> {
        let mut public = PublicPaths::default();
        for (i, entry) in list.iter().enumerate() {
            let at = format!("{key}[{i}]");
            if entry.is_empty() {
                return Err(ConfigError::new(at, "must not be empty"));
            }
            let (base, is_prefix) = match entry.strip_suffix('*') {
                Some(base) => (base, true),
                None => (entry.as_str(), false),
            };
            if base.contains('*') {
                return Err(ConfigError::new(
                    at,
                    "`*` is only allowed once, at the end (a prefix)",
                ));
            }
            if base.contains(['{', '}']) {
                return Err(ConfigError::new(
                    at,
                    "templates (`{name}`) are not supported in public paths",
                ));
            }
            check_config_path(base, &at)?;
            if is_prefix {
                public.prefixes.push(base.to_string());
            } else {
                public.exact.insert(base.to_string());
            }
        }
        Ok(public)
    }

    /// Whether a normalised path is public: with its `;` parameters and
    /// without them (see [`crate::path`]).
    pub fn matches(&self, normalized_path: &str) -> bool {
        let public = |p: &str| self.exact.contains(p) || self.covering_prefix(p).is_some();
        public(normalized_path) && without_parameters(normalized_path).is_none_or(|s| public(&s))
    }

    /// Whether no path is public.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// The public prefix that `s` starts with, if any.
    fn covering_prefix(&self, s: &str) -> Option<&str> {
        self.prefixes
            .iter()
            .map(String::as_str)
            .find(|p| s.starts_with(p))
    }

    /// The public entry, as written, that makes `s` public: `s` itself as an
    /// exact public path, or a public prefix `s` starts with. For a rule
    /// prefix `s` this means every path the rule can match is public (or, for
    /// an exact entry, its most obvious target is).
    fn covering_entry(&self, s: &str) -> Option<String> {
        if let Some(p) = self.covering_prefix(s) {
            return Some(format!("{p}*"));
        }
        self.exact.get(s).cloned()
    }
}

/// Why a request was refused by a route rule. `Display` is the message shown
/// to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessDenied {
    /// The `scopes` attribute lacks the rule's `required_scope`.
    Scope(String),
    /// The user's attributes do not satisfy the rule's `required_attributes`.
    Attributes,
    /// `route_policy` refuses the route (the route as matched).
    Route(String),
}

impl fmt::Display for AccessDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessDenied::Scope(scope) => write!(
                f,
                "Access denied: user does not have required scope: {scope}"
            ),
            AccessDenied::Attributes => {
                f.write_str("Access denied: user does not have required attributes for this route")
            }
            AccessDenied::Route(route) => {
                write!(f, "{}", crate::route_policy::RouteRefused(route.clone()))
            }
        }
    }
}

impl std::error::Error for AccessDenied {}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}`: exactly one non-empty segment.
    Var,
}

#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Template {
        /// The literal text before the first variable, ending in `/`: a
        /// cheap first test.
        literal_prefix: String,
        /// The segments after the leading `/`.
        segments: Vec<Segment>,
    },
    Prefix(String),
}

impl Matcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Exact(p) => p == path,
            Matcher::Prefix(p) => path.starts_with(p.as_str()),
            Matcher::Template {
                literal_prefix,
                segments,
            } => {
                if !path.starts_with(literal_prefix.as_str()) {
                    return false;
                }
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = rest.split('/');
                for seg in segments {
                    let ok = match (seg, parts.next()) {
                        (_, None) => false,
                        (Segment::Literal(l), Some(p)) => l == p,
                        (Segment::Var, Some(p)) => !p.is_empty(),
                    };
                    if !ok {
                        return false;
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    matcher: Matcher,
    /// Upper-cased; `None` matches every method.
    methods: Option<Vec<String>>,
    scope: Option<String>,
    /// Category and accepted values; every category must share a value.
    attributes: Vec<(String, Vec<String>)>,
}

impl Rule {
    fn applies(&self, method: &str, path: &str) -> bool {
        let method_ok = match &self.methods {
            None => true,
            Some(ms) => ms.iter().any(|m| m.eq_ignore_ascii_case(method)),
        };
        method_ok && self.matcher.matches(path)
    }

    fn decide(&self, attrs: &Attributes) -> Result<(), AccessDenied> {
        if let Some(scope) = &self.scope {
            let has = attrs
                .get(SCOPES)
                .is_some_and(|have| have.iter().any(|s| s == scope));
            if !has {
                return Err(AccessDenied::Scope(scope.clone()));
            }
        }
        let attrs_ok = self.attributes.iter().all(|(category, wanted)| {
            attrs
                .get(category)
                .is_some_and(|have| wanted.iter().any(|w| have.contains(w)))
        });
        if attrs_ok {
            Ok(())
        } else {
            Err(AccessDenied::Attributes)
        }
    }
}

/// The route rules from `route_scopes`, compiled for matching.
#[derive(Debug, Clone, Default)]
pub struct RouteRules {
    rules: Vec<Rule>,
}

impl RouteRules {
    /// `v` is the value of `route_scopes`; `key` its path ("route_scopes").
    /// Null counts as absent (no rules), as everywhere in the configuration.
    pub fn parse(v: &Value, key: &str, public: &PublicPaths) -> Result<RouteRules, ConfigError> {
        let items = match v {
            Value::Null => return Ok(RouteRules::default()),
            Value::Array(items) => items,
            other => {
                return Err(ConfigError::new(
                    key,
                    format!("expected a list, found {}", type_name(other)),
                ))
            }
        };
        let rules = items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_rule(item, &format!("{key}[{i}]"), public))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RouteRules { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// `method` as received (any case); `path` already normalised.
    /// The first matching rule decides; no matching rule allows. A path with
    /// `;` parameters is checked with them and again without them (see
    /// `crate::path`); both must pass.
    pub fn check(&self, method: &str, path: &str, attrs: &Attributes) -> Result<(), AccessDenied> {
        self.check_one(method, path, attrs)?;
        match without_parameters(path) {
            Some(stripped) => self.check_one(method, &stripped, attrs),
            None => Ok(()),
        }
    }

    fn check_one(&self, method: &str, path: &str, attrs: &Attributes) -> Result<(), AccessDenied> {
        match self.rules.iter().find(|r| r.applies(method, path)) {
            None => Ok(()),
            Some(rule) => rule.decide(attrs),
        }
    }
}

fn parse_rule(v: &Value, at: &str, public: &PublicPaths) -> Result<Rule, ConfigError> {
    let mut o = Obj::new(v, at)?;
    let path_key = o.path("path");
    let prefix_key = o.path("path_prefix");
    let methods_key = o.path("methods");
    let scope_key = o.path("required_scope");
    let attrs_key = o.path("required_attributes");

    let path = o.nonempty_str("path")?;
    let prefix = o.nonempty_str("path_prefix")?;
    let methods = o.str_list("methods")?;
    let scope = o.nonempty_str("required_scope")?;
    let attrs_value = o.get("required_attributes");
    o.finish()?;

    let matcher = match (path, prefix) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                at,
                "set exactly one of `path` and `path_prefix`, not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(at, "needs `path` or `path_prefix`"));
        }
        (Some(p), None) => compile_path(p, &path_key, public)?,
        (None, Some(p)) => compile_prefix(p, &prefix_key, public)?,
    };

    let methods = match methods {
        None => None,
        Some(ms) if ms.is_empty() => {
            return Err(ConfigError::new(
                methods_key,
                "must not be empty (leave it out to match every method)",
            ))
        }
        Some(ms) => {
            let mut upper = Vec::with_capacity(ms.len());
            for (i, m) in ms.iter().enumerate() {
                if !m.bytes().all(is_tchar) {
                    return Err(ConfigError::new(
                        format!("{methods_key}[{i}]"),
                        format!("`{m}` is not an HTTP method name"),
                    ));
                }
                let m = m.to_ascii_uppercase();
                if !upper.contains(&m) {
                    upper.push(m);
                }
            }
            // Starlette (Llama Stack's server) answers HEAD on every GET route:
            // a rule on GET covers HEAD too, or HEAD would walk around it.
            if upper.iter().any(|m| m == "GET") && !upper.iter().any(|m| m == "HEAD") {
                upper.push("HEAD".to_string());
            }
            Some(upper)
        }
    };

    if let Some(s) = scope {
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::new(
                scope_key,
                "must be a single scope (no spaces or control characters)",
            ));
        }
    }

    let attributes = match attrs_value {
        None => Vec::new(),
        Some(v) => parse_attributes(v, &attrs_key)?,
    };

    if scope.is_none() && attributes.is_empty() {
        return Err(ConfigError::new(
            at,
            "needs `required_scope` or `required_attributes`",
        ));
    }

    Ok(Rule {
        matcher,
        methods,
        scope: scope.map(str::to_string),
        attributes,
    })
}

fn parse_attributes(v: &Value, key: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let Value::Object(map) = v else {
        return Err(ConfigError::new(
            key,
            format!("expected an object, found {}", type_name(v)),
        ));
    };
    if map.is_empty() {
        return Err(ConfigError::new(
            key,
            "must name at least one attribute category",
        ));
    }
    let mut o = Obj::new(v, key)?;
    let mut out = Vec::with_capacity(map.len());
    for category in map.keys() {
        if category.is_empty() {
            return Err(ConfigError::new(key, "category names must not be empty"));
        }
        let cat_key = join(key, category);
        match o.str_list(category)? {
            None => {
                return Err(ConfigError::new(cat_key, "expected a list, found null"));
            }
            Some(values) if values.is_empty() => {
                return Err(ConfigError::new(cat_key, "must not be empty"));
            }
            Some(values) => out.push((category.clone(), values)),
        }
    }
    o.finish()?;
    Ok(out)
}

/// Refuses a trailing `*`, which is not a wildcard in rules.
fn refuse_star(p: &str, key: &str) -> Result<(), ConfigError> {
    if p.ends_with('*') {
        return Err(ConfigError::new(
            key,
            "a trailing `*` is not a wildcard here; use `path_prefix` without it",
        ));
    }
    Ok(())
}

fn compile_prefix(p: &str, key: &str, public: &PublicPaths) -> Result<Matcher, ConfigError> {
    if p.contains(['{', '}']) {
        return Err(ConfigError::new(
            key,
            "templates (`{name}`) are not allowed in `path_prefix`",
        ));
    }
    refuse_star(p, key)?;
    check_config_path(p, key)?;
    if let Some(entry) = public.covering_entry(p) {
        return Err(on_public_path(key, &entry));
    }
    Ok(Matcher::Prefix(p.to_string()))
}

fn on_public_path(key: &str, entry: &str) -> ConfigError {
    ConfigError::new(
        key,
        format!("is covered by the public path `{entry}`, so this rule would never apply"),
    )
}

fn compile_path(p: &str, key: &str, public: &PublicPaths) -> Result<Matcher, ConfigError> {
    refuse_star(p, key)?;
    check_config_path(p, key)?;
    if !p.contains(['{', '}']) {
        if let Some(entry) = public.covering_entry(p) {
            return Err(on_public_path(key, &entry));
        }
        return Ok(Matcher::Exact(p.to_string()));
    }

    let rest = p
        .strip_prefix('/')
        .ok_or_else(|| ConfigError::new(key, "must start with `/`"))?;
    let mut segments = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    let mut literal_prefix = String::from("/");
    for seg in rest.split('/') {
        if !seg.contains(['{', '}']) {
            if names.is_empty() {
                literal_prefix.push_str(seg);
                literal_prefix.push('/');
            }
            segments.push(Segment::Literal(seg.to_string()));
            continue;
        }
        let name = seg
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .filter(|n| !n.contains(['{', '}']));
        let Some(name) = name else {
            let reason = if seg.matches('{').count() != seg.matches('}').count() {
                format!("unbalanced braces in `{seg}`")
            } else {
                format!("`{seg}`: a template variable must be a whole segment, `{{name}}`")
            };
            return Err(ConfigError::new(key, reason));
        };
        if name.is_empty() {
            return Err(ConfigError::new(key, "empty template variable `{}`"));
        }
        if name.contains(':') {
            return Err(ConfigError::new(
                key,
                format!(
                    "`{seg}`: converters are not supported; a variable matches exactly one \
                     segment (use `path_prefix` for more)"
                ),
            ));
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ConfigError::new(
                key,
                format!("`{seg}`: variable names may only hold letters, digits and `_`"),
            ));
        }
        if names.contains(&name) {
            return Err(ConfigError::new(
                key,
                format!("duplicate template variable `{seg}`"),
            ));
        }
        names.push(name);
        segments.push(Segment::Var);
    }
    if let Some(entry) = public.covering_prefix(&literal_prefix) {
        return Err(on_public_path(key, &format!("{entry}*")));
    }
    Ok(Matcher::Template {
        literal_prefix,
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::normalize_path;
    use serde_json::json;

    fn norm(p: &str) -> String {
        normalize_path(p).unwrap()
    }

    fn attrs(pairs: &[(&str, &[&str])]) -> Attributes {
        pairs
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect()
    }

    fn scopes(s: &[&str]) -> Attributes {
        attrs(&[("scopes", s)])
    }

    fn public(list: &[&str]) -> PublicPaths {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        PublicPaths::parse(&list, "public_paths").unwrap()
    }

    fn rules(v: Value) -> RouteRules {
        RouteRules::parse(&v, "route_scopes", &PublicPaths::default()).unwrap()
    }

    fn rules_err(v: Value) -> ConfigError {
        rules_err_with(v, &PublicPaths::default())
    }

    fn rules_err_with(v: Value, public: &PublicPaths) -> ConfigError {
        RouteRules::parse(&v, "route_scopes", public).unwrap_err()
    }

    fn issue_rules() -> RouteRules {
        rules(json!([
            {"path": "/v1/telemetry/traces/{trace_id}", "methods": ["GET"], "required_scope": "telemetry.read"},
            {"path": "/v1/telemetry/traces", "required_scope": "telemetry.read"},
            {"path_prefix": "/v1/admin/", "required_scope": "admin"},
            {"path_prefix": "/v1/models/", "methods": ["POST", "DELETE"],
             "required_attributes": {"roles": ["admin", "ml-eng"], "teams": ["ml-team"]}}
        ]))
    }

    fn scope_denied(s: &str) -> Result<(), AccessDenied> {
        Err(AccessDenied::Scope(s.to_string()))
    }

    // ---- matching ----

    #[test]
    fn access_denied_messages() {
        assert_eq!(
            AccessDenied::Scope("telemetry.read".into()).to_string(),
            "Access denied: user does not have required scope: telemetry.read"
        );
        assert_eq!(
            AccessDenied::Attributes.to_string(),
            "Access denied: user does not have required attributes for this route"
        );
    }

    #[test]
    fn issue_example_parses() {
        let r = issue_rules();
        assert_eq!(r.len(), 4);
        assert!(!r.is_empty());
        assert!(RouteRules::default().is_empty());
    }

    #[test]
    fn template_matches_one_nonempty_segment() {
        let r = issue_rules();
        let none = Attributes::new();
        let ok = scopes(&["telemetry.read"]);
        let p = "/v1/telemetry/traces/abc";
        assert_eq!(r.check("GET", p, &none), scope_denied("telemetry.read"));
        assert_eq!(r.check("GET", p, &ok), Ok(()));
        // Not across `/`: rule 0 does not match, nor does any other rule.
        assert_eq!(r.check("GET", "/v1/telemetry/traces/a/b", &none), Ok(()));
        // Not empty: `/v1/telemetry/traces/` matches neither rule 0 nor rule 1.
        assert_eq!(r.check("GET", "/v1/telemetry/traces/", &none), Ok(()));
        // Trailing slash after the variable: no match.
        assert_eq!(r.check("GET", "/v1/telemetry/traces/abc/", &none), Ok(()));
    }

    #[test]
    fn exact_path_trailing_slash_is_significant() {
        let r = issue_rules();
        let none = Attributes::new();
        assert_eq!(
            r.check("GET", "/v1/telemetry/traces", &none),
            scope_denied("telemetry.read")
        );
        assert_eq!(r.check("GET", "/v1/telemetry/traces/", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/telemetry/tracesx", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/telemetry", &none), Ok(()));
    }

    #[test]
    fn template_with_several_variables_and_literals() {
        let r = rules(json!([
            {"path": "/v1/{a}/items/{b}/x", "required_scope": "s"},
            {"path": "/{only}", "required_scope": "root"}
        ]));
        let none = Attributes::new();
        assert_eq!(r.check("GET", "/v1/p/items/q/x", &none), scope_denied("s"));
        assert_eq!(r.check("GET", "/v1/p/items/q/y", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/p/item/q/x", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/p/items/q/x/", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/p/items/q", &none), Ok(()));
        assert_eq!(r.check("GET", "/v2/p/items/q/x", &none), Ok(()));
        assert_eq!(r.check("GET", "/top", &none), scope_denied("root"));
        assert_eq!(r.check("GET", "/", &none), Ok(()));
    }

    #[test]
    fn template_variable_matches_escaped_segment() {
        let r = rules(json!([{"path": "/v1/models/{id}", "required_scope": "m"}]));
        let p = norm("/v1/models/%c3%a9");
        assert_eq!(r.check("GET", &p, &Attributes::new()), scope_denied("m"));
    }

    #[test]
    fn prefix_matching() {
        let r = issue_rules();
        let none = Attributes::new();
        assert_eq!(r.check("GET", "/v1/admin/", &none), scope_denied("admin"));
        assert_eq!(
            r.check("PUT", "/v1/admin/x/y", &none),
            scope_denied("admin")
        );
        assert_eq!(r.check("GET", "/v1/admin", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/administrator", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/admin/x", &scopes(&["admin"])), Ok(()));
    }

    #[test]
    fn prefix_is_a_plain_string_prefix() {
        let r = rules(json!([{"path_prefix": "/v1/admin", "required_scope": "admin"}]));
        let none = Attributes::new();
        assert_eq!(r.check("GET", "/v1/admin", &none), scope_denied("admin"));
        assert_eq!(
            r.check("GET", "/v1/administrator", &none),
            scope_denied("admin")
        );
        assert_eq!(r.check("GET", "/v1/admi", &none), Ok(()));
    }

    #[test]
    fn methods_case_insensitive_and_absent_means_all() {
        let r = issue_rules();
        let none = Attributes::new();
        for m in ["GET", "get", "Get"] {
            assert_eq!(
                r.check(m, "/v1/telemetry/traces/t1", &none),
                scope_denied("telemetry.read"),
                "{m}"
            );
        }
        for m in ["GET", "POST", "delete", "PATCH", "CUSTOM"] {
            assert_eq!(
                r.check(m, "/v1/admin/x", &none),
                scope_denied("admin"),
                "{m}"
            );
        }
        let lower = rules(json!([{"path": "/x", "methods": ["get"], "required_scope": "s"}]));
        assert_eq!(lower.check("GET", "/x", &none), scope_denied("s"));
        assert_eq!(
            lower.check("HEAD", "/x", &none),
            scope_denied("s"),
            "a GET rule covers HEAD"
        );
        let post = rules(json!([{"path": "/x", "methods": ["POST"], "required_scope": "s"}]));
        assert_eq!(post.check("HEAD", "/x", &none), Ok(()));
    }

    #[test]
    fn listed_methods_not_matching_fall_through() {
        let r = issue_rules();
        let none = Attributes::new();
        // Rule 3 is for POST and DELETE only: GET passes through.
        assert_eq!(r.check("GET", "/v1/models/m1", &none), Ok(()));
        assert_eq!(
            r.check("post", "/v1/models/m1", &none),
            Err(AccessDenied::Attributes)
        );
        // A later rule applies when an earlier one is skipped for the method.
        let r = rules(json!([
            {"path": "/v1/x", "methods": ["POST"], "required_scope": "write"},
            {"path_prefix": "/v1/", "required_scope": "read"}
        ]));
        assert_eq!(r.check("GET", "/v1/x", &none), scope_denied("read"));
        assert_eq!(r.check("POST", "/v1/x", &none), scope_denied("write"));
    }

    #[test]
    fn first_match_wins() {
        let r = rules(json!([
            {"path": "/v1/admin/open", "required_scope": "basic"},
            {"path_prefix": "/v1/admin/", "required_scope": "admin"}
        ]));
        // Only `basic` is needed for the first rule, even without `admin`.
        assert_eq!(
            r.check("GET", "/v1/admin/open", &scopes(&["basic"])),
            Ok(())
        );
        assert_eq!(
            r.check("GET", "/v1/admin/other", &scopes(&["basic"])),
            scope_denied("admin")
        );
        let reversed = rules(json!([
            {"path_prefix": "/v1/admin/", "required_scope": "admin"},
            {"path": "/v1/admin/open", "required_scope": "basic"}
        ]));
        assert_eq!(
            reversed.check("GET", "/v1/admin/open", &scopes(&["basic"])),
            scope_denied("admin")
        );
    }

    #[test]
    fn no_match_allows() {
        let r = issue_rules();
        assert_eq!(
            r.check("GET", "/v1/inference/chat", &Attributes::new()),
            Ok(())
        );
        assert_eq!(
            RouteRules::default().check("GET", "/", &Attributes::new()),
            Ok(())
        );
    }

    #[test]
    fn scope_present_and_absent() {
        let r = rules(json!([{"path": "/x", "required_scope": "a.b"}]));
        assert_eq!(r.check("GET", "/x", &scopes(&["c", "a.b"])), Ok(()));
        assert_eq!(r.check("GET", "/x", &scopes(&["c"])), scope_denied("a.b"));
        assert_eq!(r.check("GET", "/x", &scopes(&[])), scope_denied("a.b"));
        assert_eq!(
            r.check("GET", "/x", &Attributes::new()),
            scope_denied("a.b")
        );
        // Exact values only: no prefix or case folding.
        assert_eq!(
            r.check("GET", "/x", &scopes(&["a.b.c", "A.B"])),
            scope_denied("a.b")
        );
        // The scope must be in `scopes`, not another category.
        assert_eq!(
            r.check("GET", "/x", &attrs(&[("roles", &["a.b"])])),
            scope_denied("a.b")
        );
    }

    #[test]
    fn attributes_any_of_per_category_all_categories() {
        let r = issue_rules();
        let p = "/v1/models/m";
        let both = attrs(&[("roles", &["ml-eng"]), ("teams", &["x", "ml-team"])]);
        assert_eq!(r.check("POST", p, &both), Ok(()));
        let other_role = attrs(&[("roles", &["admin", "viewer"]), ("teams", &["ml-team"])]);
        assert_eq!(r.check("DELETE", p, &other_role), Ok(()));
        let wrong_team = attrs(&[("roles", &["admin"]), ("teams", &["other"])]);
        assert_eq!(
            r.check("POST", p, &wrong_team),
            Err(AccessDenied::Attributes)
        );
        let missing_team = attrs(&[("roles", &["admin"])]);
        assert_eq!(
            r.check("POST", p, &missing_team),
            Err(AccessDenied::Attributes)
        );
        let empty_team = attrs(&[("roles", &["admin"]), ("teams", &[])]);
        assert_eq!(
            r.check("POST", p, &empty_team),
            Err(AccessDenied::Attributes)
        );
        assert_eq!(
            r.check("POST", p, &Attributes::new()),
            Err(AccessDenied::Attributes)
        );
    }

    #[test]
    fn both_keys_scope_checked_first() {
        let r = rules(json!([{
            "path_prefix": "/v1/x/",
            "required_scope": "x.write",
            "required_attributes": {"roles": ["admin"]}
        }]));
        let p = "/v1/x/1";
        let neither = Attributes::new();
        assert_eq!(r.check("GET", p, &neither), scope_denied("x.write"));
        let only_role = attrs(&[("roles", &["admin"])]);
        assert_eq!(r.check("GET", p, &only_role), scope_denied("x.write"));
        let only_scope = scopes(&["x.write"]);
        assert_eq!(
            r.check("GET", p, &only_scope),
            Err(AccessDenied::Attributes)
        );
        let all = attrs(&[("roles", &["admin"]), ("scopes", &["x.write"])]);
        assert_eq!(r.check("GET", p, &all), Ok(()));
    }

    #[test]
    fn normalised_attacks_hit_the_rule() {
        let r = issue_rules();
        let none = Attributes::new();
        for raw in [
            "/v1/admin/../admin/x",
            "/v1/%61dmin/x",
            "/v1/x/%2e%2e/admin/x",
            "/v1//admin/x",
            "/v1/admin/./x",
            "/v1/x/../admin/",
            "/v1/admin/x?y=1",
            "/v1/admin/x#f",
            "/v1/%41dmin/../admin/x",
        ] {
            let p = norm(raw);
            assert_eq!(
                r.check("GET", &p, &none),
                scope_denied("admin"),
                "{raw} -> {p}"
            );
        }
        // `%41` is `A`: a different path, which is what the upstream sees too.
        assert_eq!(norm("/v1/%41dmin/x"), "/v1/Admin/x");
        for raw in [
            "/v1/admin%2Fx",
            "/..",
            "/v1/admin/%00",
            "/v1\\admin/x",
            "/v1/\u{e0}dmin",
        ] {
            assert!(normalize_path(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn many_rules_last_one_matches() {
        let mut list: Vec<Value> = (0..499)
            .map(|i| {
                if i % 2 == 0 {
                    json!({"path": format!("/v1/r{i}/{{id}}"), "methods": ["GET"], "required_scope": format!("s{i}")})
                } else {
                    json!({"path_prefix": format!("/v1/p{i}/"), "required_scope": format!("s{i}")})
                }
            })
            .collect();
        list.push(
            json!({"path": "/v1/last/{a}/{b}", "methods": ["PUT"], "required_scope": "last"}),
        );
        let r = rules(Value::Array(list));
        assert_eq!(r.len(), 500);
        let none = Attributes::new();
        assert_eq!(r.check("put", "/v1/last/x/y", &none), scope_denied("last"));
        assert_eq!(r.check("PUT", "/v1/last/x/y", &scopes(&["last"])), Ok(()));
        assert_eq!(r.check("GET", "/v1/last/x/y", &none), Ok(()));
        assert_eq!(r.check("GET", "/v1/r498/z", &none), scope_denied("s498"));
        assert_eq!(r.check("GET", "/v1/p497/z", &none), scope_denied("s497"));
    }

    // ---- configuration errors ----

    fn assert_err(v: Value, key: &str, reason_part: &str) {
        let e = rules_err(v);
        assert_eq!(e.key, key, "{e}");
        assert!(e.reason.contains(reason_part), "{e}");
    }

    #[test]
    fn route_scopes_must_be_a_list_of_objects() {
        assert_err(json!({"path": "/x"}), "route_scopes", "expected a list");
        assert_err(json!("x"), "route_scopes", "expected a list");
        assert_err(
            json!([{"path": "/x", "required_scope": "s"}, 3]),
            "route_scopes[1]",
            "expected an object",
        );
        let empty =
            RouteRules::parse(&Value::Null, "route_scopes", &PublicPaths::default()).unwrap();
        assert!(empty.is_empty());
        assert!(rules(json!([])).is_empty());
    }

    #[test]
    fn config_error_unknown_key() {
        assert_err(
            json!([{"path": "/x", "required_scopes": "s"}]),
            "route_scopes[0].required_scopes",
            "unknown key",
        );
    }

    #[test]
    fn config_error_wrong_types() {
        assert_err(
            json!([{"path": 1, "required_scope": "s"}]),
            "route_scopes[0].path",
            "expected a string",
        );
        assert_err(
            json!([{"path_prefix": [], "required_scope": "s"}]),
            "route_scopes[0].path_prefix",
            "expected a string",
        );
        assert_err(
            json!([{"path": "/x", "required_scope": ["s"]}]),
            "route_scopes[0].required_scope",
            "expected a string",
        );
        assert_err(
            json!([{"path": "/x", "methods": "GET", "required_scope": "s"}]),
            "route_scopes[0].methods",
            "expected a list",
        );
        assert_err(
            json!([{"path": "/x", "methods": [1], "required_scope": "s"}]),
            "route_scopes[0].methods[0]",
            "expected a string",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": ["roles"]}]),
            "route_scopes[0].required_attributes",
            "expected an object",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": {"roles": "admin"}}]),
            "route_scopes[0].required_attributes.roles",
            "expected a list",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": {"roles": null}}]),
            "route_scopes[0].required_attributes.roles",
            "expected a list",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": {"roles": [1]}}]),
            "route_scopes[0].required_attributes.roles[0]",
            "expected a string",
        );
    }

    #[test]
    fn config_error_path_and_prefix() {
        assert_err(
            json!([{"path": "/x", "path_prefix": "/x/", "required_scope": "s"}]),
            "route_scopes[0]",
            "exactly one",
        );
        assert_err(
            json!([{"methods": ["GET"], "required_scope": "s"}]),
            "route_scopes[0]",
            "needs `path` or `path_prefix`",
        );
        assert_err(
            json!([{"path": "", "required_scope": "s"}]),
            "route_scopes[0].path",
            "must not be empty",
        );
        assert_err(
            json!([{"path": "v1/x", "required_scope": "s"}]),
            "route_scopes[0].path",
            "must start with `/`",
        );
        assert_err(
            json!([{"path_prefix": "v1/", "required_scope": "s"}]),
            "route_scopes[0].path_prefix",
            "must start with `/`",
        );
        assert_err(
            json!([{"path": "/v1/../x", "required_scope": "s"}]),
            "route_scopes[0].path",
            "normal form; write `/x`",
        );
        assert_err(
            json!([{"path": "/v1//x", "required_scope": "s"}]),
            "route_scopes[0].path",
            "normal form",
        );
        assert_err(
            json!([{"path": "/v1/%61", "required_scope": "s"}]),
            "route_scopes[0].path",
            "normal form; write `/v1/a`",
        );
        assert_err(
            json!([{"path": "/v1/x?y", "required_scope": "s"}]),
            "route_scopes[0].path",
            "normal form",
        );
        assert_err(
            json!([{"path_prefix": "/v1/a%2Fb", "required_scope": "s"}]),
            "route_scopes[0].path_prefix",
            "encoded slash",
        );
        assert_err(
            json!([{"path_prefix": "/v1/admin/*", "required_scope": "s"}]),
            "route_scopes[0].path_prefix",
            "trailing `*`",
        );
        assert_err(
            json!([{"path": "/v1/admin/*", "required_scope": "s"}]),
            "route_scopes[0].path",
            "trailing `*`",
        );
    }

    #[test]
    fn config_error_scope_and_attributes() {
        let ok = json!({"path": "/ok", "required_scope": "s"});
        assert_err(
            json!([ok, {"path": "/x"}]),
            "route_scopes[1]",
            "needs `required_scope` or `required_attributes`",
        );
        assert_err(
            json!([ok, ok, {"path": "/x", "required_scope": ""}]),
            "route_scopes[2].required_scope",
            "must not be empty",
        );
        assert_err(
            json!([{"path": "/x", "required_scope": "a b"}]),
            "route_scopes[0].required_scope",
            "single scope",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": {}}]),
            "route_scopes[0].required_attributes",
            "at least one",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": {"roles": []}}]),
            "route_scopes[0].required_attributes.roles",
            "must not be empty",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": {"roles": ["a", ""]}}]),
            "route_scopes[0].required_attributes.roles[1]",
            "must not be empty",
        );
        assert_err(
            json!([{"path": "/x", "required_attributes": {"": ["a"]}}]),
            "route_scopes[0].required_attributes",
            "category names must not be empty",
        );
        // Null counts as absent, so the rule then has neither key.
        assert_err(
            json!([{"path": "/x", "required_scope": null}]),
            "route_scopes[0]",
            "needs `required_scope`",
        );
    }

    #[test]
    fn config_error_methods() {
        assert_err(
            json!([{"path": "/x", "methods": [], "required_scope": "s"}]),
            "route_scopes[0].methods",
            "must not be empty",
        );
        assert_err(
            json!([{"path": "/x", "methods": ["GET", ""], "required_scope": "s"}]),
            "route_scopes[0].methods[1]",
            "must not be empty",
        );
        for bad in ["GE T", "GET/", "GÉT", "G(ET)", "GET\n", "{GET}"] {
            assert_err(
                json!([{"path": "/x", "methods": ["POST", bad], "required_scope": "s"}]),
                "route_scopes[0].methods[1]",
                "not an HTTP method",
            );
        }
        // tchar extension methods are fine.
        let r = rules(
            json!([{"path": "/x", "methods": ["M-SEARCH", "x!#$%&'*+.^_`|~1"], "required_scope": "s"}]),
        );
        assert_eq!(
            r.check("m-search", "/x", &Attributes::new()),
            scope_denied("s")
        );
    }

    #[test]
    fn config_error_templates() {
        let cases = [
            ("/v1/{id", "unbalanced"),
            ("/v1/id}", "unbalanced"),
            ("/v1/{a/b}", "unbalanced"),
            ("/v1/{{a}", "unbalanced"),
            ("/v1/{}", "empty template variable"),
            ("/v1/a{b}", "whole segment"),
            ("/v1/{b}c", "whole segment"),
            ("/v1/{a}{b}", "whole segment"),
            ("/v1/{{a}}", "whole segment"),
            ("/v1/{a}/x/{a}", "duplicate template variable `{a}`"),
            ("/v1/{id:path}", "converters are not supported"),
            ("/v1/{a-b}", "letters, digits and `_`"),
        ];
        for (path, reason) in cases {
            assert_err(
                json!([{"path": path, "required_scope": "s"}]),
                "route_scopes[0].path",
                reason,
            );
        }
        assert_err(
            json!([{"path_prefix": "/v1/{id}/", "required_scope": "s"}]),
            "route_scopes[0].path_prefix",
            "not allowed in `path_prefix`",
        );
        assert_err(
            json!([{"path_prefix": "/v1/}", "required_scope": "s"}]),
            "route_scopes[0].path_prefix",
            "not allowed in `path_prefix`",
        );
        // Distinct names and underscores are fine.
        let r = rules(json!([{"path": "/v1/{a_1}/{B2}", "required_scope": "s"}]));
        assert_eq!(r.len(), 1);
    }

    // ---- public paths ----

    #[test]
    fn public_paths_exact_and_prefix() {
        let p = public(&["/v1/health", "/static/*", "/docs*"]);
        assert!(!p.is_empty());
        assert!(p.matches("/v1/health"));
        assert!(!p.matches("/v1/health/"));
        assert!(!p.matches("/v1/healthz"));
        assert!(p.matches("/static/"));
        assert!(p.matches("/static/a/b.css"));
        assert!(!p.matches("/static"));
        assert!(p.matches("/docs"));
        assert!(p.matches("/docs/x"));
        assert!(p.matches("/docsy"));
        assert!(!p.matches("/v1/models"));
        assert!(!PublicPaths::default().matches("/"));
        assert!(PublicPaths::default().is_empty());
    }

    #[test]
    fn public_paths_match_normalised_paths() {
        let p = public(&["/v1/health", "/static/*"]);
        assert!(p.matches(&norm("/v1/%68ealth?x=1")));
        assert!(p.matches(&norm("/v1//health")));
        // Climbing out of a public prefix leaves it.
        assert!(!p.matches(&norm("/static/../v1/admin/x")));
        assert!(!p.matches(&norm("/static/%2e%2e/v1/admin/x")));
    }

    #[test]
    fn public_paths_errors() {
        let cases: [(&[&str], &str, &str); 8] = [
            (&["/ok", "health"], "public_paths[1]", "must start with `/`"),
            (&["*"], "public_paths[0]", "must start with `/`"),
            (&[""], "public_paths[0]", "must not be empty"),
            (
                &["/a/*/b"],
                "public_paths[0]",
                "only allowed once, at the end",
            ),
            (
                &["/a/**"],
                "public_paths[0]",
                "only allowed once, at the end",
            ),
            (&["/a/{id}"], "public_paths[0]", "templates"),
            (&["/a/../b"], "public_paths[0]", "normal form"),
            (&["/a%2Fb*"], "public_paths[0]", "encoded slash"),
        ];
        for (list, key, reason) in cases {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            let e = PublicPaths::parse(&list, "public_paths").unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }

    #[test]
    fn rule_on_public_path_is_an_error() {
        let p = public(&["/v1/health", "/static/*", "/v1/open/*"]);
        let cases = [
            (
                json!({"path": "/v1/health", "required_scope": "s"}),
                "route_scopes[0].path",
                "`/v1/health`",
            ),
            (
                json!({"path": "/static/x.js", "required_scope": "s"}),
                "route_scopes[0].path",
                "`/static/*`",
            ),
            (
                json!({"path": "/static/", "required_scope": "s"}),
                "route_scopes[0].path",
                "`/static/*`",
            ),
            (
                json!({"path": "/v1/open/{id}", "required_scope": "s"}),
                "route_scopes[0].path",
                "`/v1/open/*`",
            ),
            (
                json!({"path": "/v1/open/a/{id}/b", "required_scope": "s"}),
                "route_scopes[0].path",
                "`/v1/open/*`",
            ),
            (
                json!({"path_prefix": "/static/css/", "required_scope": "s"}),
                "route_scopes[0].path_prefix",
                "`/static/*`",
            ),
            (
                json!({"path_prefix": "/static/", "required_scope": "s"}),
                "route_scopes[0].path_prefix",
                "`/static/*`",
            ),
            (
                json!({"path_prefix": "/v1/health", "required_scope": "s"}),
                "route_scopes[0].path_prefix",
                "`/v1/health`",
            ),
        ];
        for (rule, key, entry) in cases {
            let e = rules_err_with(json!([rule]), &p);
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains(entry), "{e}");
            assert!(e.reason.contains("public path"), "{e}");
        }
    }

    #[test]
    fn partial_overlap_with_public_paths_is_fine() {
        let p = public(&["/v1/health", "/static/*", "/v1/open/a*"]);
        let r = RouteRules::parse(
            &json!([
                {"path_prefix": "/v1/", "required_scope": "s"},
                {"path_prefix": "/", "required_scope": "s"},
                {"path_prefix": "/static", "required_scope": "s"},
                {"path": "/static", "required_scope": "s"},
                {"path": "/v1/health/x", "required_scope": "s"},
                {"path": "/v1/open/{id}", "required_scope": "s"},
                {"path": "/{x}/static/y", "required_scope": "s"}
            ]),
            "route_scopes",
            &p,
        )
        .unwrap();
        assert_eq!(r.len(), 7);
    }

    // ---- `;` path parameters ----

    #[test]
    fn rules_see_the_path_with_and_without_parameters() {
        let r = rules(json!([
            {"path": "/v1/docs/report", "required_scope": "secret"},
            {"path_prefix": "/v1/docs/", "required_scope": "read"},
            {"path": "/v1/files/{id}", "required_scope": "files"},
            {"path_prefix": "/v1/admin/", "required_scope": "admin"}
        ]));
        let none = Attributes::new();
        let read = scopes(&["read"]);
        // The prefix rule decides for the literal path; the exact rule for
        // the path a servlet routes (`/v1/docs/report`): both must pass.
        assert_eq!(
            r.check("GET", "/v1/docs/report;v=2", &read),
            scope_denied("secret")
        );
        assert_eq!(
            r.check("GET", "/v1/docs/report;v=2", &scopes(&["read", "secret"])),
            Ok(())
        );
        assert_eq!(
            r.check("GET", "/v1/docs/report;v=2", &none),
            scope_denied("read"),
            "the literal view is checked first"
        );
        assert_eq!(r.check("GET", "/v1/docs/other;v=2", &read), Ok(()));
        assert_eq!(
            r.check("GET", "/v1/files/a;v=1", &none),
            scope_denied("files")
        );
        assert_eq!(
            r.check("GET", "/v1/admin/report;v=2", &read),
            scope_denied("admin")
        );
        assert_eq!(
            r.check("GET", "/v1/admin/report;v=2", &scopes(&["admin"])),
            Ok(())
        );
        // `/v1/admin;x/y` is `/v1/admin/y` to a servlet.
        assert_eq!(
            r.check("GET", "/v1/admin;x/y", &read),
            scope_denied("admin")
        );
    }

    #[test]
    fn public_only_when_public_with_and_without_parameters() {
        let p = public(&["/v1/health", "/static/*"]);
        assert!(p.matches(&norm("/static/app.js;v=1")));
        assert!(p.matches(&norm("/static/a;x/b.css")));
        assert!(!p.matches(&norm("/v1/health;x")));
        assert!(!p.matches(&norm("/static;x/app.js")));
        assert!(!p.matches(&norm("/v1;x/health")));
        assert!(normalize_path("/static/..;/v1/admin/x").is_err());
    }

    #[test]
    fn matching_with_parameters_implies_matching_without() {
        // The argument for checking both views with configured paths free of
        // `;`: no matcher matches a path with parameters but not without.
        let matchers: Vec<Matcher> = [
            json!({"path": "/v1/files/{id}", "required_scope": "s"}),
            json!({"path": "/{a}/{b}/", "required_scope": "s"}),
            json!({"path": "/v1/x", "required_scope": "s"}),
            json!({"path_prefix": "/v1/", "required_scope": "s"}),
            json!({"path_prefix": "/v1/fil", "required_scope": "s"}),
        ]
        .into_iter()
        .map(|v| rules(json!([v])).rules.remove(0).matcher)
        .collect();
        let publics = public(&["/v1/x", "/v1/fil*", "/v1/files/*"]);
        let segs = [
            "v1", "files", "fil", "x", "a;b", "x;", "v1;q", "files;=1", "f;;",
        ];
        let mut paths = Vec::new();
        for a in segs {
            for b in segs {
                for c in segs {
                    paths.push(format!("/{a}/{b}"));
                    paths.push(format!("/{a}/{b}/{c}"));
                    paths.push(format!("/{a}/{b}/{c}/"));
                }
            }
        }
        for path in &paths {
            let p = norm(path);
            let Some(stripped) = without_parameters(&p) else {
                continue;
            };
            for m in &matchers {
                assert!(!m.matches(&p) || m.matches(&stripped), "{m:?} {p}");
            }
            let public =
                |s: &str| publics.exact.contains(s) || publics.covering_prefix(s).is_some();
            assert!(!public(&p) || public(&stripped), "{p}");
        }
    }

    #[test]
    fn configured_paths_must_not_contain_semicolons() {
        for (list, key) in [
            (vec!["/static;x/*"], "public_paths[0]"),
            (vec!["/ok", "/v1/health;v=1"], "public_paths[1]"),
            (vec!["/;*"], "public_paths[0]"),
        ] {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            let e = PublicPaths::parse(&list, "public_paths").unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains("`;`"), "{e}");
        }
        assert_err(
            json!([{"path": "/v1/a;b", "required_scope": "s"}]),
            "route_scopes[0].path",
            "must not contain `;`",
        );
        assert_err(
            json!([{"path": "/v1/{id};x", "required_scope": "s"}]),
            "route_scopes[0].path",
            "must not contain `;`",
        );
        assert_err(
            json!([{"path_prefix": "/v1/;", "required_scope": "s"}]),
            "route_scopes[0].path_prefix",
            "must not contain `;`",
        );
    }
}
