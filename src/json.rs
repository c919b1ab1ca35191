//! Strict reading of JSON objects with a key path for error messages.
//!
//! Configuration is hostile until parsed: every key is read through [`Obj`],
//! which remembers which keys were taken so that [`Obj::finish`] can refuse
//! unknown keys, and which names the full key path (`auth.config.jwks.uri`) in
//! every error.

use serde_json::{Map, Value};
use std::fmt;

/// A configuration error: the key path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "configuration: {}", self.reason)
        } else {
            write!(f, "configuration key `{}`: {}", self.key, self.reason)
        }
    }
}

/// Joins a parent path and a key: `join("auth", "config")` is `auth.config`.
pub fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Names the JSON type of a value, for error messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A JSON object being read key by key.
#[derive(Debug)]
pub struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    taken: Vec<&'a str>,
}

impl<'a> Obj<'a> {
    /// Reads `v` as an object found at `path`.
    pub fn new(v: &'a Value, path: &str) -> Result<Obj<'a>, ConfigError> {
        match v {
            Value::Object(map) => Ok(Obj {
                path: path.to_string(),
                map,
                taken: Vec::new(),
            }),
            other => Err(ConfigError::new(
                path,
                format!("expected an object, found {}", type_name(other)),
            )),
        }
    }

    /// The full path of `key` inside this object.
    pub fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The object's own path.
    pub fn own_path(&self) -> &str {
        &self.path
    }

    /// The object's keys, in order.
    pub fn keys(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    /// Whether the key is present (null counts as absent).
    pub fn has(&self, key: &str) -> bool {
        matches!(self.map.get(key), Some(v) if !v.is_null())
    }

    /// Takes a key; null counts as absent.
    pub fn get(&mut self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.taken.push(k.as_str());
        if v.is_null() {
            None
        } else {
            Some(v)
        }
    }

    pub fn str(&mut self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    /// A string that must not be empty.
    pub fn nonempty_str(&mut self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.str(key)? {
            Some("") => Err(ConfigError::new(self.path(key), "must not be empty")),
            other => Ok(other),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(key, "true or false", other)),
        }
    }

    /// A non-negative integer no larger than `max`.
    pub fn u64_max(&mut self, key: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                Some(_) => Err(ConfigError::new(
                    self.path(key),
                    format!("must be at most {max}"),
                )),
                None => Err(self.wrong(key, "a non-negative integer", v)),
            },
        }
    }

    pub fn obj(&mut self, key: &str) -> Result<Option<Obj<'a>>, ConfigError> {
        let path = self.path(key);
        match self.get(key) {
            None => Ok(None),
            Some(v) => Obj::new(v, &path).map(Some),
        }
    }

    pub fn array(&mut self, key: &str) -> Result<Option<&'a Vec<Value>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(self.wrong(key, "a list", other)),
        }
    }

    /// A list of non-empty strings.
    pub fn str_list(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let path = self.path(key);
        match self.array(key)? {
            None => Ok(None),
            Some(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    Value::String(_) => Err(ConfigError::new(
                        format!("{path}[{i}]"),
                        "must not be empty",
                    )),
                    other => Err(ConfigError::new(
                        format!("{path}[{i}]"),
                        format!("expected a string, found {}", type_name(other)),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
        }
    }

    /// A string or a list of strings, as a list.
    pub fn str_or_list(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.map.get(key) {
            Some(Value::String(_)) => Ok(self.nonempty_str(key)?.map(|s| vec![s.to_string()])),
            _ => self.str_list(key),
        }
    }

    /// The error for a key of the wrong type.
    pub fn wrong(&self, key: &str, expected: &str, found: &Value) -> ConfigError {
        ConfigError::new(
            self.path(key),
            format!("expected {expected}, found {}", type_name(found)),
        )
    }

    /// Refuses keys that were never taken. A key whose value is `null` is
    /// absent, whatever its name: configuration models (Llama Stack's, OGX's)
    /// dump every optional key, the unset ones as `null`.
    pub fn finish(self) -> Result<(), ConfigError> {
        let mut unknown: Vec<&str> = self
            .map
            .iter()
            .filter(|(k, v)| !v.is_null() && !self.taken.contains(&k.as_str()))
            .map(|(k, _)| k.as_str())
            .collect();
        unknown.sort_unstable();
        match unknown.first() {
            None => Ok(()),
            Some(k) => Err(ConfigError::new(join(&self.path, k), "unknown key")),
        }
    }
}

/// RFC 9110 `tchar`: the bytes of a configured header name or method.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses JSON like `serde_json::from_slice`, but refuses duplicate object
/// keys at any depth (a token whose header or payload repeats a key is
/// ambiguous: different parsers would read different claims).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(v.0)
}

struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.insert(key, v).is_some() {
                return Err(serde::de::Error::custom("duplicate key"));
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_and_refuses_unknown_keys() {
        let v = json!({"a": "x", "b": 3, "c": null, "zz": 1});
        let mut o = Obj::new(&v, "top").unwrap();
        assert_eq!(o.str("a").unwrap(), Some("x"));
        assert_eq!(o.u64_max("b", 10).unwrap(), Some(3));
        assert_eq!(o.str("c").unwrap(), None);
        let e = o.finish().unwrap_err();
        assert_eq!(e.key, "top.zz");
        assert_eq!(e.to_string(), "configuration key `top.zz`: unknown key");
    }

    #[test]
    fn null_is_absent_even_for_keys_never_read() {
        let v = json!({"a": "x", "jwks": null, "introspection": null, "tenant_claim": null});
        let mut o = Obj::new(&v, "top").unwrap();
        assert!(!o.has("jwks"));
        assert_eq!(o.str("a").unwrap(), Some("x"));
        assert_eq!(o.finish(), Ok(()));
        let v = json!({"a": null, "b": 0});
        assert_eq!(Obj::new(&v, "t").unwrap().finish().unwrap_err().key, "t.b");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let v = json!({"a": 1, "n": -1, "m": 11, "l": ["x", ""], "o": []});
        let mut o = Obj::new(&v, "").unwrap();
        assert_eq!(o.str("a").unwrap_err().key, "a");
        assert_eq!(
            o.u64_max("n", 10).unwrap_err().reason,
            "expected a non-negative integer, found a number"
        );
        assert_eq!(o.u64_max("m", 10).unwrap_err().reason, "must be at most 10");
        assert_eq!(o.str_list("l").unwrap_err().key, "l[1]");
        assert_eq!(o.obj("o").unwrap_err().key, "o");
    }

    #[test]
    fn strict_parse_refuses_duplicates() {
        assert!(parse_strict(br#"{"a":1,"b":{"c":2}}"#).is_ok());
        assert!(parse_strict(br#"{"a":1,"a":2}"#).is_err());
        assert!(parse_strict(br#"{"x":{"a":1,"a":1}}"#).is_err());
        assert!(parse_strict(br#"[{"a":1,"a":1}]"#).is_err());
        assert!(parse_strict(br#"{"a":1} x"#).is_err());
        assert_eq!(parse_strict(b"1.5").unwrap(), serde_json::json!(1.5));
    }

    #[test]
    fn str_or_list() {
        let v = json!({"a": "x", "b": ["y", "z"], "c": ""});
        let mut o = Obj::new(&v, "").unwrap();
        assert_eq!(o.str_or_list("a").unwrap(), Some(vec!["x".to_string()]));
        assert_eq!(o.str_or_list("b").unwrap().unwrap().len(), 2);
        assert!(o.str_or_list("c").is_err());
    }
}
