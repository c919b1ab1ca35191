"""End-to-end test harness for tollgate: keys and tokens, a scriptable
identity provider, an echo upstream, and a real Envoy loading the filter."""
