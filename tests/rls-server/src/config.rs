//! The limits file: envoyproxy/ratelimit's configuration schema (one domain), written as JSON
//! (YAML accepts JSON, so the same file loads in envoyproxy/ratelimit). Only the keys listed in
//! [`SUPPORTED`] are accepted; envoyproxy/ratelimit's other keys are refused by name so that no
//! test relies on a feature this server does not implement.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::proto::{Entry, Unit};

/// A limit from the file or from a descriptor's `limit` override.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    pub requests_per_unit: u32,
    pub unit: Unit,
    pub name: String,
}

/// What a descriptor resolves to (envoyproxy/ratelimit src/config/config_impl.go GetLimit).
#[derive(Clone, Debug, PartialEq)]
pub enum Resolved {
    /// No rule: OK without a limit, nothing counted.
    NoLimit,
    /// `unlimited: true`: OK with limit_remaining = u32::MAX, nothing counted.
    Unlimited,
    Limited(Limit),
}

#[derive(Default, Debug)]
struct Node {
    limit: Option<Resolved>,
    children: HashMap<String, Node>,
}

#[derive(Debug)]
pub struct Config {
    pub domain: String,
    root: Node,
}

#[derive(Debug, PartialEq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "limits file: {}", self.0)
    }
}

const SUPPORTED: &[&str] = &[
    "domain",
    "descriptors",
    "key",
    "value",
    "rate_limit",
    "requests_per_unit",
    "unit",
    "unlimited",
    "name",
];

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

fn check_keys(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), ConfigError> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return if SUPPORTED.contains(&k.as_str()) {
                err(format!("key '{k}' is not allowed here"))
            } else {
                err(format!(
                    "key '{k}' is not supported by this test server (supported: {})",
                    SUPPORTED.join(", ")
                ))
            };
        }
    }
    Ok(())
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<String, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => err(format!("'{key}' must be a string")),
    }
}

impl Config {
    /// A domain with no rules: only descriptors carrying a `limit` override are limited.
    pub fn empty(domain: &str) -> Config {
        Config {
            domain: domain.to_string(),
            root: Node::default(),
        }
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ConfigError(format!("not JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return err("the top level must be an object");
        };
        check_keys(&obj, &["domain", "descriptors"])?;
        let domain = string(&obj, "domain")?;
        if domain.is_empty() {
            return err("config file cannot have empty domain");
        }
        let mut root = Node::default();
        load(&mut root, obj.get("descriptors"), "")?;
        Ok(Config { domain, root })
    }

    /// The limit that applies to a descriptor of this domain, as envoyproxy/ratelimit's
    /// GetLimit without wildcards: at each level an entry matches `key_value`, else `key`; the
    /// limit counts only if it sits at the descriptor's last entry.
    pub fn lookup(&self, entries: &[Entry]) -> Resolved {
        let mut level = &self.root.children;
        let mut found = Resolved::NoLimit;
        for (i, entry) in entries.iter().enumerate() {
            let with_value = format!("{}_{}", entry.key, entry.value);
            let Some(next) = level.get(&with_value).or_else(|| level.get(&entry.key)) else {
                break;
            };
            if i + 1 == entries.len() {
                if let Some(limit) = &next.limit {
                    found = limit.clone();
                }
            }
            if next.children.is_empty() {
                break;
            }
            level = &next.children;
        }
        found
    }
}

fn load(node: &mut Node, descriptors: Option<&Value>, parent: &str) -> Result<(), ConfigError> {
    let list = match descriptors {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(list)) => list,
        Some(_) => return err("'descriptors' must be a list"),
    };
    for d in list {
        let Value::Object(d) = d else {
            return err("a descriptor must be an object");
        };
        check_keys(d, &["key", "value", "rate_limit", "descriptors"])?;
        let key = string(d, "key")?;
        if key.is_empty() {
            return err("descriptor has empty key");
        }
        let value = string(d, "value")?;
        let final_key = if value.is_empty() {
            key.clone()
        } else {
            format!("{key}_{value}")
        };
        if final_key.contains('*') {
            return err(format!(
                "'{parent}{final_key}': wildcards are not supported by this test server"
            ));
        }
        if node.children.contains_key(&final_key) {
            return err(format!(
                "duplicate descriptor composite key '{parent}{final_key}'"
            ));
        }
        let mut child = Node::default();
        if let Some(rl) = d.get("rate_limit") {
            child.limit = Some(rate_limit(rl)?);
        }
        load(
            &mut child,
            d.get("descriptors"),
            &format!("{parent}{final_key}."),
        )?;
        node.children.insert(final_key, child);
    }
    Ok(())
}

fn rate_limit(rl: &Value) -> Result<Resolved, ConfigError> {
    let Value::Object(rl) = rl else {
        return err("'rate_limit' must be an object");
    };
    check_keys(rl, &["requests_per_unit", "unit", "unlimited", "name"])?;
    let unlimited = match rl.get("unlimited") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return err("'unlimited' must be a boolean"),
    };
    let unit = Unit::from_name(&string(rl, "unit")?);
    if unlimited {
        return match unit {
            Some(_) => err("should not specify rate limit unit when unlimited"),
            None => Ok(Resolved::Unlimited),
        };
    }
    let Some(unit) = unit else {
        return err(format!("invalid rate limit unit '{}'", string(rl, "unit")?));
    };
    let requests_per_unit = match rl.get("requests_per_unit") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => n,
            None => return err("'requests_per_unit' must be an integer 0..=4294967295"),
        },
    };
    Ok(Resolved::Limited(Limit {
        requests_per_unit,
        unit,
        name: string(rl, "name")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(k: &str, v: &str) -> Entry {
        Entry {
            key: k.into(),
            value: v.into(),
        }
    }

    fn lim(n: u32, unit: Unit) -> Resolved {
        Resolved::Limited(Limit {
            requests_per_unit: n,
            unit,
            name: String::new(),
        })
    }

    const FILE: &str = r#"{"domain": "tollgate", "descriptors": [
        {"key": "client", "rate_limit": {"requests_per_unit": 5, "unit": "minute"}},
        {"key": "client", "value": "vip", "rate_limit": {"unlimited": true}},
        {"key": "route", "value": "/a", "descriptors": [
            {"key": "client", "rate_limit": {"requests_per_unit": 2, "unit": "SECOND"}}
        ]}
    ]}"#;

    #[test]
    fn lookup_matches_value_then_key_at_the_last_entry() {
        let c = Config::parse(FILE).unwrap();
        assert_eq!(c.domain, "tollgate");
        assert_eq!(c.lookup(&[e("client", "alice")]), lim(5, Unit::Minute));
        assert_eq!(c.lookup(&[e("client", "vip")]), Resolved::Unlimited);
        assert_eq!(
            c.lookup(&[e("route", "/a"), e("client", "x")]),
            lim(2, Unit::Second)
        );
        // The limit is on a deeper level than the descriptor reaches, or below a missing level.
        assert_eq!(c.lookup(&[e("route", "/a")]), Resolved::NoLimit);
        assert_eq!(
            c.lookup(&[e("route", "/b"), e("client", "x")]),
            Resolved::NoLimit
        );
        // More entries than the configuration has levels.
        assert_eq!(
            c.lookup(&[e("client", "alice"), e("x", "y")]),
            Resolved::NoLimit
        );
        assert_eq!(c.lookup(&[e("other", "1")]), Resolved::NoLimit);
    }

    #[test]
    fn refuses_what_envoyproxy_ratelimit_refuses_and_what_is_unsupported() {
        let bad = [
            (r#"{"descriptors": []}"#, "empty domain"),
            (
                r#"{"domain": "d", "descriptors": [{"value": "v"}]}"#,
                "empty key",
            ),
            (
                r#"{"domain": "d", "descriptors": [{"key": "k"}, {"key": "k"}]}"#,
                "duplicate descriptor composite key 'k'",
            ),
            (
                r#"{"domain": "d", "descriptors": [{"key": "k", "rate_limit": {"unit": "fortnight"}}]}"#,
                "invalid rate limit unit 'fortnight'",
            ),
            (
                r#"{"domain": "d", "descriptors": [{"key": "k", "rate_limit": {"unlimited": true, "unit": "second"}}]}"#,
                "unit when unlimited",
            ),
            (
                r#"{"domain": "d", "descriptors": [{"key": "k", "shadow_mode": true}]}"#,
                "'shadow_mode' is not supported",
            ),
            (
                r#"{"domain": "d", "descriptors": [{"key": "k", "value": "a*"}]}"#,
                "wildcards",
            ),
        ];
        for (text, want) in bad {
            let got = Config::parse(text).unwrap_err().to_string();
            assert!(got.contains(want), "{text}: {got}");
        }
    }
}
