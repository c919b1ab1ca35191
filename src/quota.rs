//! Per-client quotas counted in shared data.
