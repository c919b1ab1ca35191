//! From verified claims to an identity: the principal and the access
//! attributes (Llama Stack's `claims_mapping`), and the header values that
//! carry them to the upstream.

use crate::json::{ConfigError, Obj};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A user's attributes: category (`scopes`, `roles`, `teams`, …) to values.
pub type Attributes = BTreeMap<String, Vec<String>>;

/// Claim (dotted path for nested claims) → attribute category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimsMapping {
    entries: Vec<(Vec<String>, String)>,
    /// Llama Stack's default (no `claims_mapping` in the configuration).
    default: bool,
    /// OGX's `tenant_claim`: the claim holding the tenant id.
    pub tenant_claim: Option<String>,
}

impl ClaimsMapping {
    /// Llama Stack's default mapping, plus `scope` → `scopes`.
    pub fn llama_stack_default() -> Self {
        let pairs = [
            ("sub", "roles"),
            ("username", "roles"),
            ("groups", "teams"),
            ("team", "teams"),
            ("project", "projects"),
            ("tenant", "namespaces"),
            ("namespace", "namespaces"),
            ("scope", "scopes"),
        ];
        ClaimsMapping {
            entries: pairs
                .iter()
                .map(|(c, a)| (vec![c.to_string()], a.to_string()))
                .collect(),
            default: true,
            tenant_claim: None,
        }
    }

    /// A mapping of claims to categories, in this order (a provider's own
    /// default).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        ClaimsMapping {
            entries: pairs
                .iter()
                .map(|(c, a)| (vec![c.to_string()], a.to_string()))
                .collect(),
            default: false,
            tenant_claim: None,
        }
    }

    /// Whether this is the default mapping, not one from the configuration.
    pub fn is_default(&self) -> bool {
        self.default
    }

    /// Parses `{"claim": "category", ...}`.
    pub fn parse(mut o: Obj) -> Result<Self, ConfigError> {
        let mut entries = Vec::new();
        for claim in o.keys() {
            let path = o.path(&claim);
            let category = o
                .nonempty_str(&claim)?
                .ok_or_else(|| ConfigError::new(path.clone(), "must be a category name"))?;
            if claim.is_empty() || claim.split('.').any(str::is_empty) {
                return Err(ConfigError::new(path, "not a valid claim name"));
            }
            entries.push((
                claim.split('.').map(str::to_string).collect(),
                category.to_string(),
            ));
        }
        o.finish()?;
        Ok(ClaimsMapping {
            entries,
            default: false,
            tenant_claim: None,
        })
    }

    /// The tenant of these claims (`tenant_claim`): the claim of that name,
    /// else (an extension of OGX, which reads the literal name only) the
    /// nested claim its dotted path names; a string, normalised and checked
    /// by [`resolve_tenant`]. Any other value, or none, is no tenant.
    pub fn tenant(&self, claims: &Map<String, Value>) -> Result<Option<String>, InvalidTenant> {
        let Some(name) = &self.tenant_claim else {
            return Ok(None);
        };
        let path: Vec<String> = name.split('.').map(str::to_string).collect();
        match claims.get(name).or_else(|| lookup(claims, &path)) {
            Some(Value::String(s)) => resolve_tenant(s),
            _ => Ok(None),
        }
    }

    /// Maps claims to attributes: a string claim is split on whitespace, a
    /// list is taken as is (numbers and booleans as text), anything else is
    /// skipped. Values are de-duplicated, first occurrence kept.
    pub fn apply(&self, claims: &Map<String, Value>) -> Attributes {
        let mut attrs = Attributes::new();
        for (path, category) in &self.entries {
            let Some(value) = lookup(claims, path) else {
                continue;
            };
            let mut values = Vec::new();
            match value {
                Value::String(s) => values.extend(s.split_whitespace().map(str::to_string)),
                Value::Array(items) => values.extend(items.iter().filter_map(scalar_text)),
                other => values.extend(scalar_text(other)),
            }
            if values.is_empty() {
                continue;
            }
            let list = attrs.entry(category.clone()).or_default();
            for v in values {
                if !list.contains(&v) {
                    list.push(v);
                }
            }
        }
        attrs
    }
}

fn lookup<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut cur = claims.get(first)?;
    for seg in rest {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether a value may go into an HTTP header: Envoy refuses (503) header
/// values with control characters, so such identities are rejected instead.
pub fn header_safe(s: &str) -> bool {
    !s.chars().any(|c| c.is_control())
}

/// The identity of an authenticated caller, ready to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub principal: String,
    pub attributes: Attributes,
    /// The attributes as the JSON header value (ASCII only), computed once.
    pub attributes_header: String,
    /// The tenant id (`tenant_claim` / `tenant_field`), normalised.
    pub tenant: Option<String>,
}

/// See [`Identity::split_attributes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitAttributes {
    pub rest: String,
    pub per_header: Vec<(String, String)>,
}

/// What OGX requires of a tenant id (`ogx/core/datatypes.py`
/// `_validate_tenant_id`, ogx 1.5.0).
pub const TENANT_RULE: &str = "tenant_id must match [a-z0-9][a-z0-9-_]{0,127}";

/// A tenant id OGX would refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidTenant;

/// OGX's `_resolve_tenant_id` (`ogx/core/server/auth_providers.py`, ogx
/// 1.5.0): outer white space removed (Python's `str.strip`), blank is no
/// tenant; else lower-cased and matching `^[a-z0-9][a-z0-9\-_]{0,127}$`.
pub fn resolve_tenant(raw: &str) -> Result<Option<String>, InvalidTenant> {
    // Python's str.isspace also counts the separators U+001C..U+001F.
    let stripped =
        raw.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c));
    if stripped.is_empty() {
        return Ok(None);
    }
    let t = stripped.to_lowercase();
    let ok = t.len() <= 128
        && t.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && (b == b'-' || b == b'_'))
        });
    if ok {
        Ok(Some(t))
    } else {
        Err(InvalidTenant)
    }
}

/// Why an identity cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsafeIdentity;

impl Identity {
    /// Builds an identity, refusing control characters anywhere in it.
    pub fn new(principal: String, attributes: Attributes) -> Result<Identity, UnsafeIdentity> {
        // Envoy and HTTP/1 servers trim header values: a principal with outer
        // white space would reach the upstream as another name.
        if principal.trim() != principal || principal.is_empty() || !header_safe(&principal) {
            return Err(UnsafeIdentity);
        }
        let all_safe = attributes
            .iter()
            .all(|(k, vs)| header_safe(k) && vs.iter().all(|v| header_safe(v)));
        if !all_safe {
            return Err(UnsafeIdentity);
        }
        let json = serde_json::to_string(&attributes).map_err(|_| UnsafeIdentity)?;
        Ok(Identity {
            principal,
            attributes,
            attributes_header: ascii_json(&json),
            tenant: None,
        })
    }

    /// The attributes split for OGX's `attribute_headers`: each configured
    /// header with its category's values as a JSON list (none for a category
    /// the caller lacks), and the other categories as the JSON object of
    /// `attributes_header`; all ASCII.
    pub fn split_attributes(&self, headers: &[(String, String)]) -> SplitAttributes {
        let mut rest = self.attributes.clone();
        let mut per_header = Vec::new();
        for (header, category) in headers {
            if let Some(values) = self.attributes.get(category) {
                let json = serde_json::to_string(values).unwrap_or_else(|_| "[]".into());
                per_header.push((header.clone(), ascii_json(&json)));
            }
            rest.remove(category);
        }
        let json = serde_json::to_string(&rest).unwrap_or_else(|_| "{}".into());
        SplitAttributes {
            rest: ascii_json(&json),
            per_header,
        }
    }

    /// The same identity with a tenant.
    pub fn with_tenant(mut self, tenant: Option<String>) -> Identity {
        self.tenant = tenant;
        self
    }
}

/// Escapes every non-ASCII character of serialised JSON as `\uXXXX` (they
/// can only occur inside strings), so the header value is plain ASCII.
pub fn ascii_json(json: &str) -> String {
    if json.is_ascii() {
        return json.to_string();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn default_mapping_is_llama_stacks() {
        let m = ClaimsMapping::llama_stack_default();
        let a = m.apply(&claims(json!({
            "sub": "alice", "username": "al", "groups": ["g1", "g2"], "team": "t",
            "project": "p", "tenant": "x", "namespace": "y", "scope": "read  write",
            "other": "ignored"
        })));
        assert_eq!(a["roles"], vec!["alice", "al"]);
        assert_eq!(a["teams"], vec!["g1", "g2", "t"]);
        assert_eq!(a["projects"], vec!["p"]);
        assert_eq!(a["namespaces"], vec!["x", "y"]);
        assert_eq!(a["scopes"], vec!["read", "write"]);
        assert_eq!(a.len(), 5);
    }

    #[test]
    fn empty_strings_in_lists_are_no_values() {
        let m = ClaimsMapping::llama_stack_default();
        let a = m.apply(&claims(json!({
            "groups": ["", "g1", 7, true, null, {"x": 1}, ""], "team": ["", ""]
        })));
        assert_eq!(a["teams"], vec!["g1", "7", "true"]);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn custom_mapping_with_nested_claims() {
        let v = json!({"realm_access.roles": "roles", "scp": "scopes"});
        let m = ClaimsMapping::parse(Obj::new(&v, "m").unwrap()).unwrap();
        let a = m.apply(&claims(json!({
            "realm_access": {"roles": ["admin", 7, true, null, {"x": 1}]},
            "scp": ["a", "a", "b"], "sub": "bob"
        })));
        assert_eq!(a["roles"], vec!["admin", "7", "true"]);
        assert_eq!(a["scopes"], vec!["a", "b"]);
        assert!(!a.contains_key("teams"));
    }

    #[test]
    fn mapping_errors_name_the_claim() {
        let v = json!({"groups": ""});
        let e = ClaimsMapping::parse(Obj::new(&v, "cm").unwrap()).unwrap_err();
        assert_eq!(e.key, "cm.groups");
        let v = json!({"groups": 3});
        assert_eq!(
            ClaimsMapping::parse(Obj::new(&v, "cm").unwrap())
                .unwrap_err()
                .key,
            "cm.groups"
        );
        let v = json!({"a..b": "roles"});
        assert!(ClaimsMapping::parse(Obj::new(&v, "cm").unwrap()).is_err());
    }

    #[test]
    fn identity_refuses_control_characters() {
        assert!(Identity::new("a\r\nx: y".into(), Attributes::new()).is_err());
        assert!(Identity::new("".into(), Attributes::new()).is_err());
        assert!(Identity::new(" alice".into(), Attributes::new()).is_err());
        assert!(Identity::new("   ".into(), Attributes::new()).is_err());
        let mut attrs = Attributes::new();
        attrs.insert("roles".into(), vec!["ok".into(), "bad\u{7f}".into()]);
        assert!(Identity::new("alice".into(), attrs).is_err());
        let mut attrs = Attributes::new();
        attrs.insert("roles".into(), vec!["zoë".into(), "😀".into()]);
        let id = Identity::new("alice".into(), attrs).unwrap();
        assert!(id.attributes_header.is_ascii());
        let back: Value = serde_json::from_str(&id.attributes_header).unwrap();
        assert_eq!(back, json!({"roles": ["zoë", "😀"]}));
    }

    #[test]
    fn tenants_are_normalised_and_checked_as_ogx_does() {
        for (raw, out) in [
            ("acme", Some("acme")),
            ("  ACME-Corp_1 \n", Some("acme-corp_1")),
            ("\u{1c}x\u{1f}", Some("x")),
            ("", None),
            ("   ", None),
            ("0", Some("0")),
        ] {
            assert_eq!(resolve_tenant(raw), Ok(out.map(str::to_string)), "{raw:?}");
        }
        let max = "a".repeat(128);
        assert!(resolve_tenant(&max).is_ok());
        for bad in [
            "-acme", "_acme", "ac me", "acme!", "ac.me", "ümlaut", "a/b", "x\u{0}",
        ] {
            assert_eq!(resolve_tenant(bad), Err(InvalidTenant), "{bad:?}");
        }
        assert_eq!(resolve_tenant(&"a".repeat(129)), Err(InvalidTenant));
    }

    #[test]
    fn the_tenant_claim_is_read_literally_then_as_a_path() {
        let mut m = ClaimsMapping::llama_stack_default();
        let claims = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert_eq!(m.tenant(&claims(serde_json::json!({"org": "x"}))), Ok(None));
        m.tenant_claim = Some("org".into());
        assert_eq!(
            m.tenant(&claims(serde_json::json!({"org": " Acme "}))),
            Ok(Some("acme".into()))
        );
        // Not a string (OGX: isinstance(raw, str)): no tenant.
        for v in [
            serde_json::json!(5),
            serde_json::json!(["a"]),
            serde_json::json!(null),
        ] {
            assert_eq!(m.tenant(&claims(serde_json::json!({ "org": v }))), Ok(None));
        }
        assert_eq!(
            m.tenant(&claims(serde_json::json!({"org": "Bad Tenant"}))),
            Err(InvalidTenant)
        );
        m.tenant_claim = Some("app.tenant".into());
        assert_eq!(
            m.tenant(&claims(serde_json::json!({"app": {"tenant": "t1"}}))),
            Ok(Some("t1".into()))
        );
        assert_eq!(
            m.tenant(&claims(
                serde_json::json!({"app.tenant": "lit", "app": {"tenant": "t1"}})
            )),
            Ok(Some("lit".into()))
        );
    }
}
