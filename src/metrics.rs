//! Prometheus metrics through proxy-wasm's metric API (host glue).
//!
//! Envoy shows a metric under the name it is defined with. Labels are encoded
//! in the name as `.<label>.<value>` so that Envoy's `stats_tags` can turn them
//! into Prometheus labels (see `envoy/envoy.yaml`); without that config they
//! appear flattened, e.g. `tollgate_requests_denied_total_reason_expired`.

use crate::driver::Metric;
use crate::host::{self, METRIC_COUNTER, METRIC_GAUGE};
use std::collections::HashMap;

/// Every denial reason (`Denial::reason`, `ProviderError::reason`).
pub const DENIAL_REASONS: [&str; 14] = [
    "missing",
    "malformed",
    "invalid_token",
    "expired",
    "wrong_audience",
    "unknown_kid",
    "scope",
    "attributes",
    "route",
    "quota",
    "auth_unavailable",
    "auth_timeout",
    "bad_path",
    "internal",
];

/// Provider callout outcomes.
pub const CALLOUT_OUTCOMES: [&str; 3] = ["ok", "rejected", "error"];

/// Metric ids of one VM.
#[derive(Debug, Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
    /// `tollgate_requests_allowed_total`, looked up once (the hot path).
    allowed: Option<u32>,
    /// The labels of the token budget's counted paths, by index.
    token_paths: Vec<String>,
}

/// Tokens reported by answers on counted paths, with labels `path` (see
/// [`crate::token_quota::path_label`]) and `direction` (`input`, `output`).
pub const TOKENS_TOTAL: &str = "tollgate_tokens_total";

/// The names of every metric tollgate defines (for the README and tests).
pub fn all_names() -> Vec<String> {
    let mut names = vec![
        "tollgate_requests_allowed_total".to_string(),
        "tollgate_jwks_fetches_total".to_string(),
        "tollgate_jwks_fetch_failures_total".to_string(),
        "tollgate_jwks_age_seconds".to_string(),
        "tollgate_quota_rejections_total".to_string(),
        "tollgate_config_loads_total".to_string(),
        "tollgate_config_failures_total".to_string(),
    ];
    for r in DENIAL_REASONS {
        names.push(format!("tollgate_requests_denied_total.reason.{r}"));
    }
    for cache in ["token", "decision"] {
        names.push(format!("tollgate_cache_hits_total.cache.{cache}"));
        names.push(format!("tollgate_cache_misses_total.cache.{cache}"));
    }
    names.push("tollgate_quota_fallbacks_total".to_string());
    names.push("tollgate_tokens_charged_total".to_string());
    names.push("tollgate_token_usage_missing_total".to_string());
    for provider in ["introspection", "custom", "kubernetes", "rls"] {
        for outcome in CALLOUT_OUTCOMES {
            names.push(format!(
                "tollgate_callouts_total.provider.{provider}.outcome.{outcome}"
            ));
        }
    }
    names
}

impl Metrics {
    /// Defines every metric (idempotent in the host: same name, same stat).
    pub fn define() -> Metrics {
        let mut ids = HashMap::new();
        for name in all_names() {
            let kind = if name.ends_with("_seconds") {
                METRIC_GAUGE
            } else {
                METRIC_COUNTER
            };
            if let Some(id) = host::define_metric(kind, &name) {
                ids.insert(name, id);
            }
        }
        let allowed = ids.get("tollgate_requests_allowed_total").copied();
        Metrics {
            ids,
            allowed,
            token_paths: Vec::new(),
        }
    }

    /// Defines the per-path, per-direction token metrics of a token budget.
    pub fn define_token_paths(&mut self, labels: Vec<String>) {
        for label in &labels {
            for direction in ["input", "output"] {
                let name = format!("{TOKENS_TOTAL}.path.{label}.direction.{direction}");
                if let Some(id) = host::define_metric(METRIC_COUNTER, &name) {
                    self.ids.insert(name, id);
                }
            }
        }
        self.token_paths = labels;
    }

    fn add(&self, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(id) = self.ids.get(name) {
            host::increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn inc(&self, name: &str) {
        self.add(name, 1);
    }

    /// Adds `n` allowed requests (counted locally, reported on the tick).
    pub fn allowed(&self, n: u64) {
        if let (Some(id), true) = (self.allowed, n > 0) {
            host::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn denied(&self, reason: &str) {
        self.inc(&format!("tollgate_requests_denied_total.reason.{reason}"));
        if reason == "quota" {
            self.inc("tollgate_quota_rejections_total");
        }
    }

    pub fn callout(&self, provider: &str, outcome: &str) {
        self.inc(&format!(
            "tollgate_callouts_total.provider.{provider}.outcome.{outcome}"
        ));
    }

    pub fn cache(&self, cache: &str, hits: u64, misses: u64) {
        self.add(&format!("tollgate_cache_hits_total.cache.{cache}"), hits);
        self.add(
            &format!("tollgate_cache_misses_total.cache.{cache}"),
            misses,
        );
    }

    /// Counts what the driver asked to count.
    pub fn count(&self, metric: Metric) {
        match metric {
            Metric::Allowed(n) => self.allowed(n),
            Metric::Denied(reason) => self.denied(reason),
            Metric::Callout { provider, outcome } => self.callout(provider, outcome),
            Metric::JwksFetch { failed } => {
                self.inc("tollgate_jwks_fetches_total");
                if failed {
                    self.inc("tollgate_jwks_fetch_failures_total");
                }
            }
            Metric::Cache {
                cache,
                hits,
                misses,
            } => self.cache(cache, hits, misses),
            Metric::JwksAgeSeconds(s) => self.set_gauge("tollgate_jwks_age_seconds", s),
            Metric::QuotaFallback => self.inc("tollgate_quota_fallbacks_total"),
            Metric::Tokens {
                charged,
                path,
                usage,
            } => {
                self.add("tollgate_tokens_charged_total", charged);
                let Some(usage) = usage else {
                    self.inc("tollgate_token_usage_missing_total");
                    return;
                };
                if let Some(label) = self.token_paths.get(path) {
                    let name = |d: &str| format!("{TOKENS_TOTAL}.path.{label}.direction.{d}");
                    self.add(&name("input"), usage.input);
                    self.add(&name("output"), usage.output);
                }
            }
        }
    }

    pub fn set_gauge(&self, name: &str, value: u64) {
        if let Some(id) = self.ids.get(name) {
            host::record_metric(*id, value);
        }
    }
}
