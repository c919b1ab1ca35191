//! OGX's `route_policy` at the edge: route-level permit / forbid rules, read
//! and evaluated as OGX 1.5.0 does (`ogx/core/access_control/datatypes.py`
//! `RouteAccessRule`, `ogx/core/access_control/route_access.py`
//! `is_route_allowed`, `ogx/core/access_control/conditions.py`).
//!
//! - A rule is `{"permit": {"paths": P}}` or `{"forbid": {"paths": P}}`, with
//!   an optional `when` or `unless` (a condition or a list of them) and an
//!   optional `description`. `P` is a path or a list of paths, each exact,
//!   `prefix*`, `*` (every route) or `regex:<pattern>` (matched from the
//!   start of the route, as Python's `re.match`).
//! - The first rule whose paths match and whose conditions hold decides;
//!   with rules and none deciding, the route is refused; without rules, every
//!   route is allowed. `when`: every condition holds; `unless`: none does.
//!   A rule with conditions never holds for an anonymous request.
//! - Conditions, split on whitespace: `user with <value> in <attribute>`,
//!   `user with <value> not in <attribute>`; OGX's resource conditions are
//!   accepted too and take the value they have for a route, which has no
//!   owner: `user is owner` and `user in owners <attribute>` never hold,
//!   `user is not owner`, `user not in owners <attribute>` and `resource is
//!   unowned` always do.
//! - The route is the normalised request path (`crate::path`) without its
//!   trailing slashes (`/` stays `/`), as OGX strips them.
//!
//! Deliberate differences: a pattern that does not compile refuses the
//! configuration (OGX logs it and skips the pattern); patterns use Rust
//! `regex-lite` syntax (no look-around or backreferences: they refuse to
//! load; classes like `\d` are ASCII) and match in linear time.

use crate::claims::Attributes;
use crate::json::ConfigError;
use serde_json::Value;
use std::fmt;

/// The longest `regex:` pattern accepted (bytes).
pub const MAX_PATTERN: usize = 1024;

/// `route_policy`: the rules, in order.
#[derive(Debug, Clone, Default)]
pub struct RoutePolicy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    permit: bool,
    paths: Vec<PathPattern>,
    conditions: Conditions,
}

#[derive(Debug, Clone)]
enum Conditions {
    None,
    When(Vec<Condition>),
    Unless(Vec<Condition>),
}

#[derive(Debug, Clone)]
enum PathPattern {
    Any,
    Exact(String),
    Prefix(String),
    Regex(regex_lite::Regex),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Condition {
    /// `user with <value> in <attribute>`.
    ValueIn { value: String, attribute: String },
    /// `user with <value> not in <attribute>`.
    ValueNotIn { value: String, attribute: String },
    /// A resource condition: its fixed value for a route.
    Fixed(bool),
}

/// A route the policy refuses; `Display` is OGX's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRefused(pub String);

impl fmt::Display for RouteRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Access denied: insufficient permissions for route {}",
            self.0
        )
    }
}

impl RoutePolicy {
    /// Reads a `route_policy` list found at `key`.
    pub fn parse(v: &Value, key: &str) -> Result<RoutePolicy, ConfigError> {
        let Value::Array(items) = v else {
            return Err(ConfigError::new(key, "must be a list of rules"));
        };
        let rules = items
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::parse(r, &format!("{key}[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(RoutePolicy { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a request to `path` (normalised) by a caller with these
    /// attributes (`None`: anonymous) may go on.
    pub fn check(&self, path: &str, user: Option<&Attributes>) -> Result<(), RouteRefused> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let route = route_of(path);
        for rule in &self.rules {
            if rule.paths.iter().any(|p| p.matches(route)) && rule.conditions.hold(user) {
                return if rule.permit {
                    Ok(())
                } else {
                    Err(RouteRefused(route.to_string()))
                };
            }
        }
        Err(RouteRefused(route.to_string()))
    }
}

/// The route OGX matches: the path without trailing slashes, but `/`.
fn route_of(path: &str) -> &str {
    if path == "/" {
        path
    } else {
        path.trim_end_matches('/')
    }
}

impl Rule {
    fn parse(v: &Value, key: &str) -> Result<Rule, ConfigError> {
        let Value::Object(map) = v else {
            return Err(ConfigError::new(key, "must be an object (a rule)"));
        };
        let present = |k: &str| map.get(k).is_some_and(|v| !v.is_null());
        for k in map.keys() {
            if !["permit", "forbid", "when", "unless", "description"].contains(&k.as_str())
                && !map.get(k).is_some_and(Value::is_null)
            {
                return Err(ConfigError::new(format!("{key}.{k}"), "unknown key"));
            }
        }
        let permit = match (present("permit"), present("forbid")) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => {
                return Err(ConfigError::new(
                    key,
                    "permit and forbid are mutually exclusive",
                ))
            }
            (false, false) => {
                return Err(ConfigError::new(key, "one of permit or forbid is required"))
            }
        };
        let scope_key = if permit { "permit" } else { "forbid" };
        let paths = parse_scope(map.get(scope_key), &format!("{key}.{scope_key}"))?;
        let conditions = match (present("when"), present("unless")) {
            (true, true) => {
                return Err(ConfigError::new(
                    key,
                    "when and unless are mutually exclusive",
                ))
            }
            (true, false) => {
                Conditions::When(parse_conditions(map.get("when"), &format!("{key}.when"))?)
            }
            (false, true) => Conditions::Unless(parse_conditions(
                map.get("unless"),
                &format!("{key}.unless"),
            )?),
            (false, false) => Conditions::None,
        };
        match map.get("description") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => {
                return Err(ConfigError::new(
                    format!("{key}.description"),
                    "must be a string",
                ))
            }
        }
        Ok(Rule {
            permit,
            paths,
            conditions,
        })
    }
}

fn parse_scope(v: Option<&Value>, key: &str) -> Result<Vec<PathPattern>, ConfigError> {
    let Some(Value::Object(map)) = v else {
        return Err(ConfigError::new(key, "must be an object with `paths`"));
    };
    if let Some(k) = map
        .iter()
        .find(|(k, v)| k.as_str() != "paths" && !v.is_null())
        .map(|(k, _)| k)
    {
        return Err(ConfigError::new(format!("{key}.{k}"), "unknown key"));
    }
    let key = format!("{key}.paths");
    match map.get("paths") {
        Some(Value::String(p)) => Ok(vec![PathPattern::parse(p, &key)?]),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::String(p) => PathPattern::parse(p, &format!("{key}[{i}]")),
                _ => Err(ConfigError::new(format!("{key}[{i}]"), "must be a string")),
            })
            .collect(),
        _ => Err(ConfigError::new(key, "must be a path or a list of paths")),
    }
}

impl PathPattern {
    fn parse(p: &str, key: &str) -> Result<PathPattern, ConfigError> {
        if p == "*" {
            return Ok(PathPattern::Any);
        }
        if let Some(pattern) = p.strip_prefix("regex:") {
            if pattern.len() > MAX_PATTERN {
                return Err(ConfigError::new(
                    key,
                    format!("the pattern is longer than {MAX_PATTERN} bytes"),
                ));
            }
            // Anchored at the start only, as Python's re.match.
            return regex_lite::Regex::new(&format!("^(?:{pattern})"))
                .map(PathPattern::Regex)
                .map_err(|e| ConfigError::new(key, format!("invalid regex: {e}")));
        }
        Ok(match p.strip_suffix('*') {
            Some(prefix) => PathPattern::Prefix(prefix.to_string()),
            None => PathPattern::Exact(p.to_string()),
        })
    }

    fn matches(&self, route: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(p) => p == route,
            PathPattern::Prefix(p) => route.starts_with(p.as_str()),
            PathPattern::Regex(r) => r.is_match(route),
        }
    }
}

fn parse_conditions(v: Option<&Value>, key: &str) -> Result<Vec<Condition>, ConfigError> {
    match v {
        Some(Value::String(c)) => Ok(vec![Condition::parse(c, key)?]),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Value::String(c) => Condition::parse(c, &format!("{key}[{i}]")),
                _ => Err(ConfigError::new(format!("{key}[{i}]"), "must be a string")),
            })
            .collect(),
        _ => Err(ConfigError::new(
            key,
            "must be a condition or a list of conditions",
        )),
    }
}

impl Condition {
    /// OGX's `parse_condition` (words split on whitespace).
    fn parse(c: &str, key: &str) -> Result<Condition, ConfigError> {
        let words: Vec<&str> = c.split_whitespace().collect();
        let owned = |s: &str| s.to_string();
        Ok(match words.as_slice() {
            ["user", "with", value, "in", attribute] => Condition::ValueIn {
                value: owned(value),
                attribute: owned(attribute),
            },
            ["user", "with", value, "not", "in", attribute] => Condition::ValueNotIn {
                value: owned(value),
                attribute: owned(attribute),
            },
            ["user", "is", "owner"] | ["user", "in", "owners", _] => Condition::Fixed(false),
            ["user", "is", "not", "owner"]
            | ["user", "not", "in", "owners", _]
            | ["resource", "is", "unowned"] => Condition::Fixed(true),
            _ => {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "invalid condition: {c:?} (expected e.g. \"user with admin in roles\")"
                    ),
                ))
            }
        })
    }

    fn holds(&self, attributes: &Attributes) -> bool {
        match self {
            Condition::ValueIn { value, attribute } => has(attributes, attribute, value),
            Condition::ValueNotIn { value, attribute } => !has(attributes, attribute, value),
            Condition::Fixed(v) => *v,
        }
    }
}

fn has(attributes: &Attributes, attribute: &str, value: &str) -> bool {
    attributes
        .get(attribute)
        .is_some_and(|values| values.iter().any(|v| v == value))
}

impl Conditions {
    fn hold(&self, user: Option<&Attributes>) -> bool {
        match (self, user) {
            (Conditions::None, _) => true,
            (_, None) => false,
            (Conditions::When(all), Some(a)) => all.iter().all(|c| c.holds(a)),
            (Conditions::Unless(none), Some(a)) => !none.iter().any(|c| c.holds(a)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: Value) -> RoutePolicy {
        RoutePolicy::parse(&v, "route_policy").unwrap()
    }

    fn user(pairs: &[(&str, &[&str])]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    /// The examples of OGX's `RouteAccessRule` docstring.
    fn ogx_examples() -> RoutePolicy {
        policy(json!([
            {"permit": {"paths": "/v1/chat/completions"}, "when": "user with developer in roles",
             "description": "developers can access chat completions"},
            {"permit": {"paths": ["/v1/files*", "/v1/models*"]}, "when": "user with user in roles",
             "description": "users can access files and models routes"},
            {"permit": {"paths": "*"}, "when": "user with admin in roles",
             "description": "admins have access to all routes"}
        ]))
    }

    #[test]
    fn ogx_docstring_examples() {
        let p = ogx_examples();
        let dev = user(&[("roles", &["developer"])]);
        let usr = user(&[("roles", &["user"])]);
        let admin = user(&[("roles", &["admin"])]);
        assert!(p.check("/v1/chat/completions", Some(&dev)).is_ok());
        assert!(p.check("/v1/chat/completions/", Some(&dev)).is_ok());
        assert_eq!(
            p.check("/v1/models", Some(&dev)).unwrap_err().to_string(),
            "Access denied: insufficient permissions for route /v1/models"
        );
        assert!(p.check("/v1/files", Some(&usr)).is_ok());
        assert!(p.check("/v1/files/upload", Some(&usr)).is_ok());
        assert!(p.check("/v1/models/m1", Some(&usr)).is_ok());
        assert!(p.check("/v1/chat/completions", Some(&usr)).is_err());
        assert!(p.check("/v1/anything/at/all", Some(&admin)).is_ok());
        // Anonymous: every rule here has a condition.
        assert!(p.check("/v1/models", None).is_err());
        // No rules: everything.
        assert!(RoutePolicy::default().check("/x", None).is_ok());
    }

    #[test]
    fn first_match_decides_and_forbid_refuses() {
        let p = policy(json!([
            {"forbid": {"paths": "/v1/admin*"}, "unless": "user with admin in roles"},
            {"permit": {"paths": "regex:/v1/(chat|inference)/.*"}},
            {"permit": {"paths": "/v1/health"}},
            {"permit": {"paths": "*"}, "when": ["user with a in teams", "user with b not in teams"]}
        ]));
        let a = user(&[("teams", &["a"])]);
        let ab = user(&[("teams", &["a", "b"])]);
        let admin = user(&[("roles", &["admin"])]);
        assert!(p.check("/v1/admin/x", Some(&a)).is_err());
        assert_eq!(
            p.check("/v1/admin/x/", None).unwrap_err(),
            RouteRefused("/v1/admin/x".into())
        );
        // unless + admin: the forbid does not hold; admin has no team: refused at the end.
        assert!(p.check("/v1/admin/x", Some(&admin)).is_err());
        assert!(p.check("/v1/chat/completions", None).is_ok());
        // re.match: anchored at the start only.
        assert!(p.check("/v1/inference/x/y", None).is_ok());
        assert!(p.check("/x/v1/chat/y", Some(&ab)).is_err());
        assert!(p.check("/v1/health", None).is_ok());
        assert!(p.check("/v1/other", Some(&a)).is_ok());
        assert!(p.check("/v1/other", Some(&ab)).is_err());
        assert!(p.check("/", Some(&ab)).is_err());
    }

    #[test]
    fn resource_conditions_take_their_route_values() {
        for (cond, holds) in [
            ("user is owner", false),
            ("user in owners roles", false),
            ("user is not owner", true),
            ("user not in owners roles", true),
            ("resource is unowned", true),
            ("  user   with x   in roles ", false),
        ] {
            let p = policy(json!([{"permit": {"paths": "*"}, "when": cond}]));
            assert_eq!(
                p.check("/a", Some(&Attributes::new())).is_ok(),
                holds,
                "{cond}"
            );
        }
    }

    #[test]
    fn bad_rules_refuse_to_load_naming_the_key() {
        for (v, key, reason) in [
            (json!({}), "route_policy", "must be a list of rules"),
            (
                json!(["x"]),
                "route_policy[0]",
                "must be an object (a rule)",
            ),
            (
                json!([{}]),
                "route_policy[0]",
                "one of permit or forbid is required",
            ),
            (
                json!([{"permit": {"paths": "*"}, "forbid": {"paths": "*"}}]),
                "route_policy[0]",
                "permit and forbid are mutually exclusive",
            ),
            (
                json!([{"permit": {"paths": "*"}, "when": "user with a in b", "unless": "user with a in b"}]),
                "route_policy[0]",
                "when and unless are mutually exclusive",
            ),
            (
                json!([{"permit": {"paths": "*"}, "when": "user is admin"}]),
                "route_policy[0].when",
                "invalid condition: \"user is admin\" (expected e.g. \"user with admin in roles\")",
            ),
            (
                json!([{"permit": {"paths": "*"}, "when": ["user with a in b", 3]}]),
                "route_policy[0].when[1]",
                "must be a string",
            ),
            (
                json!([{"permit": {"paths": "regex:(?=x)"}}]),
                "route_policy[0].permit.paths",
                "invalid regex",
            ),
            (
                json!([{"permit": {"paths": ["/a", "regex:("]}}]),
                "route_policy[0].permit.paths[1]",
                "invalid regex",
            ),
            (
                json!([{"permit": {"paths": 3}}]),
                "route_policy[0].permit.paths",
                "must be a path or a list of paths",
            ),
            (
                json!([{"permit": {"path": "/a"}}]),
                "route_policy[0].permit.path",
                "unknown key",
            ),
            (
                json!([{"permit": {"paths": "/a"}, "why": "x"}]),
                "route_policy[0].why",
                "unknown key",
            ),
            (
                json!([{"permit": {"paths": "/a"}, "description": 1}]),
                "route_policy[0].description",
                "must be a string",
            ),
        ] {
            let e = RoutePolicy::parse(&v, "route_policy").unwrap_err();
            assert_eq!(e.key, key, "{v}");
            assert!(e.reason.starts_with(reason), "{v}: {}", e.reason);
        }
        let long = format!("regex:{}", "a".repeat(MAX_PATTERN + 1));
        let e = RoutePolicy::parse(&json!([{"permit": {"paths": long}}]), "r").unwrap_err();
        assert_eq!(e.reason, "the pattern is longer than 1024 bytes");
    }

    #[test]
    fn nested_quantifiers_match_in_linear_time() {
        let p = policy(json!([{"permit": {"paths": "regex:/(a+)+b"}}]));
        let route = format!("/{}", "a".repeat(100_000));
        assert!(p.check(&route, None).is_err());
    }
}
