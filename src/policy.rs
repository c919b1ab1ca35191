//! Route rules: required scopes and attributes per route.
