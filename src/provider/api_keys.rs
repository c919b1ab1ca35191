//! Static API keys from the configuration: OGX's `local_api_key` provider
//! (`ogx/core/server/auth_providers.py` `LocalApiKeyAuthProvider`, ogx
//! 1.5.0), and named keys with a principal and attributes of their own.
//!
//! Keys are kept only as SHA-256 digests: a presented token is hashed
//! (`ring`) and compared with every configured digest in constant time
//! (`subtle`), all of them each time, so neither the match nor its position
//! shows in the time taken. The configuration may carry digests instead of
//! keys (`sha256`), so that plain keys need not sit in Envoy's config.
//!
//! - `api_keys: [K, …]` (OGX's shape): every key is an admin and owner, as in
//!   OGX (`roles: [admin, owner]`), but its principal and its `teams` value
//!   are `api-key-` and the first 12 hex digits of the key's SHA-256, not the
//!   key itself (OGX uses the key: it would reach upstream headers and logs).
//! - `keys: [{name, key | sha256, principal, attributes}, …]`: `principal`
//!   defaults to `name`, `attributes` to `{"roles": [<principal>]}`.

use crate::claims::{Attributes, Identity};
use crate::json::{ConfigError, Obj};
use serde_json::Value;
use std::rc::Rc;
use subtle::ConstantTimeEq;

/// Most keys accepted (each is compared on every request).
pub const MAX_KEYS: usize = 1024;

/// The provider's keys.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

#[derive(Clone)]
struct ApiKey {
    digest: [u8; 32],
    identity: Rc<Identity>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The digest is not shown: it identifies the key.
        f.debug_struct("ApiKey")
            .field("principal", &self.identity.principal)
            .finish_non_exhaustive()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    <[u8; 32]>::try_from(d.as_ref()).unwrap_or([0; 32])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = s.get(2 * i..2 * i + 2)?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// Reads `local_api_key`'s configuration (`o`: the provider object
    /// without its `type`).
    pub fn parse(mut o: Obj) -> Result<ApiKeys, ConfigError> {
        let mut keys = Vec::new();
        if let Some(list) = o.array("api_keys")? {
            let path = o.path("api_keys");
            for (i, v) in list.iter().enumerate() {
                let key = match v {
                    Value::String(k) if !k.is_empty() => k,
                    _ => {
                        return Err(ConfigError::new(
                            format!("{path}[{i}]"),
                            "must be a non-empty string",
                        ))
                    }
                };
                let digest = sha256(key.as_bytes());
                let name = format!("api-key-{}", hex(digest.get(..6).unwrap_or_default()));
                let mut attributes = Attributes::new();
                attributes.insert("roles".into(), vec!["admin".into(), "owner".into()]);
                attributes.insert("teams".into(), vec![name.clone()]);
                keys.push(ApiKey {
                    digest,
                    identity: identity(name, attributes, &format!("{path}[{i}]"))?,
                });
            }
        }
        if let Some(list) = o.array("keys")? {
            let path = o.path("keys");
            for (i, v) in list.iter().enumerate() {
                keys.push(named_key(v, &format!("{path}[{i}]"))?);
            }
        }
        if keys.is_empty() {
            return Err(ConfigError::new(
                o.own_path(),
                "needs at least one key (`api_keys` or `keys`)",
            ));
        }
        if keys.len() > MAX_KEYS {
            return Err(ConfigError::new(
                o.own_path(),
                format!("at most {MAX_KEYS} keys"),
            ));
        }
        for (i, k) in keys.iter().enumerate() {
            if keys.iter().take(i).any(|other| other.digest == k.digest) {
                return Err(ConfigError::new(o.own_path(), "a key is given twice"));
            }
        }
        o.finish()?;
        Ok(ApiKeys { keys })
    }

    /// The identity of a presented key, if it is one of them.
    pub fn check(&self, token: &[u8]) -> Option<Rc<Identity>> {
        let digest = sha256(token);
        let mut found = None;
        for k in &self.keys {
            // Every key is compared; the branch below depends on the match
            // only, as any answer does.
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(k.identity.clone());
            }
        }
        found
    }
}

fn identity(
    principal: String,
    attributes: Attributes,
    key: &str,
) -> Result<Rc<Identity>, ConfigError> {
    Identity::new(principal, attributes)
        .map(Rc::new)
        .map_err(|_| ConfigError::new(key, "the principal or an attribute has control characters"))
}

fn named_key(v: &Value, path: &str) -> Result<ApiKey, ConfigError> {
    let mut o = Obj::new(v, path)?;
    let name = o
        .nonempty_str("name")?
        .ok_or_else(|| ConfigError::new(o.path("name"), "is required"))?
        .to_string();
    let digest = match (o.nonempty_str("key")?, o.nonempty_str("sha256")?) {
        (Some(k), None) => sha256(k.as_bytes()),
        (None, Some(d)) => parse_hex32(&d.to_ascii_lowercase()).ok_or_else(|| {
            ConfigError::new(o.path("sha256"), "must be 64 hex digits (a SHA-256 digest)")
        })?,
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(path, "give `key` or `sha256`, not both"))
        }
        (None, None) => return Err(ConfigError::new(path, "needs `key` or `sha256`")),
    };
    let principal = o
        .nonempty_str("principal")?
        .map(str::to_string)
        .unwrap_or_else(|| name.clone());
    let attributes = match o.get("attributes") {
        None => {
            let mut a = Attributes::new();
            a.insert("roles".into(), vec![principal.clone()]);
            a
        }
        Some(v) => read_attributes(v, &o.path("attributes"))?,
    };
    o.finish()?;
    Ok(ApiKey {
        digest,
        identity: identity(principal, attributes, path)?,
    })
}

fn read_attributes(v: &Value, path: &str) -> Result<Attributes, ConfigError> {
    let Value::Object(map) = v else {
        return Err(ConfigError::new(
            path,
            "must be an object of lists of strings",
        ));
    };
    let mut out = Attributes::new();
    for (category, values) in map {
        let list = match values {
            Value::Array(items) => items
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>(),
            _ => None,
        }
        .ok_or_else(|| {
            ConfigError::new(format!("{path}.{category}"), "must be a list of strings")
        })?;
        out.insert(category.clone(), list);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ApiKeys, ConfigError> {
        ApiKeys::parse(Obj::new(&v, "auth.provider_config").unwrap())
    }

    #[test]
    fn ogx_shape_and_named_keys() {
        let digest = hex(&sha256(b"s3cret-ci"));
        let k = parse(json!({
            "api_keys": ["plain-key"],
            "keys": [
                {"name": "ci", "sha256": digest.to_uppercase(), "attributes": {"roles": ["ci"], "teams": ["build"]}},
                {"name": "nightly", "key": "n1ght", "principal": "svc-nightly"}
            ]
        }))
        .unwrap();
        let ogx = k.check(b"plain-key").unwrap();
        let short = hex(sha256(b"plain-key").get(..6).unwrap());
        assert_eq!(ogx.principal, format!("api-key-{short}"));
        assert_eq!(ogx.attributes["roles"], ["admin", "owner"]);
        assert_eq!(ogx.attributes["teams"], [format!("api-key-{short}")]);
        let ci = k.check(b"s3cret-ci").unwrap();
        assert_eq!(ci.principal, "ci");
        assert_eq!(ci.attributes["teams"], ["build"]);
        let n = k.check(b"n1ght").unwrap();
        assert_eq!(n.principal, "svc-nightly");
        assert_eq!(n.attributes["roles"], ["svc-nightly"]);
        for wrong in [&b""[..], b"plain-key ", b"PLAIN-KEY", b"n1gh"] {
            assert!(k.check(wrong).is_none());
        }
        // No key material in Debug.
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("plain-key") && !dbg.contains(&digest));
    }

    #[test]
    fn bad_keys_refuse_to_load_naming_the_key() {
        for (v, key, reason) in [
            (
                json!({}),
                "auth.provider_config",
                "needs at least one key (`api_keys` or `keys`)",
            ),
            (
                json!({"api_keys": [""]}),
                "auth.provider_config.api_keys[0]",
                "must be a non-empty string",
            ),
            (
                json!({"api_keys": "k"}),
                "auth.provider_config.api_keys",
                "expected a list, found a string",
            ),
            (
                json!({"api_keys": ["a", "a"]}),
                "auth.provider_config",
                "a key is given twice",
            ),
            (
                json!({"keys": [{"name": "x", "sha256": "abc"}]}),
                "auth.provider_config.keys[0].sha256",
                "must be 64 hex digits (a SHA-256 digest)",
            ),
            (
                json!({"keys": [{"name": "x", "key": "k", "sha256": hex(&sha256(b"k"))}]}),
                "auth.provider_config.keys[0]",
                "give `key` or `sha256`, not both",
            ),
            (
                json!({"keys": [{"name": "x"}]}),
                "auth.provider_config.keys[0]",
                "needs `key` or `sha256`",
            ),
            (
                json!({"keys": [{"key": "k"}]}),
                "auth.provider_config.keys[0].name",
                "is required",
            ),
            (
                json!({"keys": [{"name": "x", "key": "k", "attributes": {"roles": "a"}}]}),
                "auth.provider_config.keys[0].attributes.roles",
                "must be a list of strings",
            ),
            (
                json!({"keys": [{"name": "x", "key": "k", "extra": 1}]}),
                "auth.provider_config.keys[0].extra",
                "unknown key",
            ),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert_eq!((e.key.as_str(), e.reason.as_str()), (key, reason), "{v}");
        }
    }
}
