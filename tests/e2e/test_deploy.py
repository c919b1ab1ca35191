"""The Istio and Envoy Gateway manifests in envoy/: schema and semantics.

Istio (envoy/istio-wasmplugin.yaml for the istio/gateway Helm chart,
envoy/istio-wasmplugin-istioctl.yaml for `istioctl install`): every object is
validated against Istio's CRD schemas as published in npm
`@kubernetes-models/istio` 3.0.1 (istio/istio 1.29.2's CRDs; the ConfigMap
against npm `kubernetes-models` 5.1.0), with unknown fields refused
(deploy/schema-check/check.mjs; `make setup` installs it in build/).
Envoy Gateway: no registry reachable here publishes its CRD schemas (npm has
no kubernetes-models package for it, PyPI none), so the fields used are
checked against the ones its API types define (api/v1alpha1 at v1.9.0), and
the Envoy parts (cluster, bootstrap) are loaded by the real Envoy.

The semantics that must not regress are asserted directly: the IdP's
certificate name is verified, nothing is exported beyond the gateway's
namespace, each file's selector matches its installation style, digests have
the form the controllers accept, and the stats_tags shipped for each platform
turn tollgate's metric names into Prometheus labels when merged the way that
platform merges them (checked through the real Envoy)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from harness import tokens
from harness.config import jwt_config
from harness.envoy import REPO_ROOT, STATS_TAGS

yaml = pytest.importorskip("yaml")

ENVOY_YAML = REPO_ROOT / "envoy/envoy.yaml"
ISTIO_HELM = REPO_ROOT / "envoy/istio-wasmplugin.yaml"
ISTIO_ISTIOCTL = REPO_ROOT / "envoy/istio-wasmplugin-istioctl.yaml"
GATEWAY = REPO_ROOT / "envoy/envoy-gateway.yaml"
# quota.backend: the rate-limit service (Kubernetes objects only) and the gateway side.
RLS_SERVICE = REPO_ROOT / "envoy/ratelimit-service.yaml"
LIMITADOR_SERVICE = REPO_ROOT / "envoy/limitador-service.yaml"
ISTIO_RLS = REPO_ROOT / "envoy/istio-ratelimit.yaml"
GATEWAY_RLS = REPO_ROOT / "envoy/envoy-gateway-ratelimit.yaml"
CHECK_SRC = REPO_ROOT / "deploy/schema-check/check.mjs"
CHECK_DIR = REPO_ROOT / "build/schema-check"

# Installation style -> (file, gateway namespace, pod selector).
# Helm: `helm install istio-ingress istio/gateway -n istio-ingress`; the chart
# labels pods `istio: <release without "istio-">` (manifests/charts/gateway/
# templates/_helpers.tpl). istioctl: the default profile's
# istio-ingressgateway in istio-system, `istio: ingressgateway`
# (manifests/charts/gateways/istio-ingress/values.yaml).
ISTIO_STYLES = {
    "helm": (ISTIO_HELM, "istio-ingress", {"istio": "ingress"}),
    "istioctl": (ISTIO_ISTIOCTL, "istio-system", {"istio": "ingressgateway"}),
}

HEX64 = re.compile(r"[a-f0-9]{64}")


def load_all(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def reference_stats_tags() -> list[dict]:
    return load_all(ENVOY_YAML)[0]["stats_config"]["stats_tags"]


# ---------------------------------------------------------------- schemas


def schema_check(docs: list[dict]) -> subprocess.CompletedProcess:
    if not (CHECK_DIR / "node_modules/@kubernetes-models/istio").is_dir():
        msg = "Istio schemas not installed: run `make setup` (build/schema-check)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    shutil.copy(CHECK_SRC, CHECK_DIR / "check.mjs")
    return subprocess.run(["node", str(CHECK_DIR / "check.mjs")], input=json.dumps(docs),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("style", ISTIO_STYLES)
def test_istio_manifests_match_istio_crd_schemas(style):
    path = ISTIO_STYLES[style][0]
    docs = load_all(path)
    r = schema_check(docs)
    assert r.returncode == 0, f"{path.name}:\n{r.stdout}{r.stderr}"
    assert f"{len(docs)} objects valid" in r.stdout


@pytest.mark.parametrize("path", [ISTIO_RLS, RLS_SERVICE, LIMITADOR_SERVICE], ids=lambda p: p.name)
def test_ratelimit_manifests_match_their_schemas(path):
    """The global-quota manifests: Istio's DestinationRule against Istio's CRD
    schema, ConfigMap/Service/Deployment against Kubernetes' (kubernetes-models)."""
    docs = load_all(path)
    r = schema_check(docs)
    assert r.returncode == 0, f"{path.name}:\n{r.stdout}{r.stderr}"
    assert f"{len(docs)} objects valid" in r.stdout


def test_schema_check_refuses_bad_kubernetes_fields():
    """Not vacuous for Kubernetes objects either: a misspelt Deployment field
    and a Service port that is not a number are refused."""
    bad = copy.deepcopy(load_all(RLS_SERVICE))
    [d for d in bad if d["kind"] == "Deployment"][0]["spec"]["replica"] = 2
    [d for d in bad if d["kind"] == "Service"][0]["spec"]["ports"][0]["port"] = "grpc"
    r = schema_check(bad)
    assert r.returncode == 1, r.stdout
    assert "replica" in r.stdout and "port" in r.stdout, r.stdout


def test_istio_ratelimit_stays_in_the_gateway_namespace():
    (dr,) = load_all(ISTIO_RLS)
    assert dr["metadata"]["namespace"] == ISTIO_STYLES["helm"][1]
    assert dr["spec"]["exportTo"] == ["."]
    assert dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["h2UpgradePolicy"] == "UPGRADE"


EG_SCHEMAS = REPO_ROOT / "deploy/schema-check/envoy-gateway"
EG_VERSIONS = ["v1.8.3", "v1.9.0"]  # the Envoy Gateway releases the manifests are checked against


def strict(schema):
    """A CRD schema as the API server applies it, but refusing unknown fields
    (which it would silently drop: a typo would go unnoticed) unless the
    schema keeps them (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def eg_errors(doc: dict, version: str) -> list[str]:
    import jsonschema

    schema = json.loads((EG_SCHEMAS / version / f"{doc['kind']}.json").read_text())
    validator = jsonschema.Draft7Validator(strict(schema))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("version", EG_VERSIONS)
@pytest.mark.parametrize("path", [GATEWAY, GATEWAY_RLS], ids=["envoy-gateway", "ratelimit"])
def test_envoy_gateway_manifests_match_the_published_crd_schemas(path, version):
    """Every Envoy Gateway object shipped in envoy/ against the CRD schema of
    that Envoy Gateway release (deploy/schema-check/envoy-gateway/SOURCES)."""
    for doc in load_all(path):
        assert doc["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
        assert eg_errors(doc, version) == [], (doc["kind"], version)


def test_envoy_gateway_schema_check_refuses_bad_fields():
    doc = by_kind(load_all(GATEWAY), "EnvoyExtensionPolicy")
    bad = copy.deepcopy(doc)
    bad["spec"]["wasm"][0]["failOpn"] = False          # a typo
    assert any("failOpn" in e for e in eg_errors(bad, "v1.9.0"))
    bad = copy.deepcopy(doc)
    bad["spec"]["wasm"][0]["code"]["type"] = "File"     # not an enum value
    assert eg_errors(bad, "v1.9.0")
    patch = by_kind(load_all(GATEWAY), "EnvoyPatchPolicy")
    bad = copy.deepcopy(patch)
    bad["spec"]["type"] = "StrategicMerge"
    assert eg_errors(bad, "v1.9.0")


def test_envoy_gateway_ratelimit_fields_exist_in_the_api():
    (epp,) = load_all(GATEWAY_RLS)
    assert epp["apiVersion"] == "gateway.envoyproxy.io/v1alpha1" and epp["kind"] == "EnvoyPatchPolicy"
    assert set(epp) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(epp["spec"]) <= EG_FIELDS["EnvoyPatchPolicy.spec"] and epp["spec"]["type"] == "JSONPatch"
    for p in epp["spec"]["jsonPatches"]:
        assert set(p) <= EG_FIELDS["EnvoyJSONPatchConfig"]
        assert set(p["operation"]) <= EG_FIELDS["JSONPatchOperation"]
    assert epp["metadata"]["namespace"] == by_kind(load_all(GATEWAY), "EnvoyPatchPolicy")["metadata"]["namespace"]
    assert "namespace" not in epp["spec"]["targetRef"]


def test_istio_schema_check_refuses_bad_fields():
    """The check is not vacuous: a misspelt field, a bad enum value and a
    `sha256:`-prefixed digest are each refused."""
    docs = load_all(ISTIO_HELM)
    plugin = by_kind(docs, "WasmPlugin")
    dr = by_kind(docs, "DestinationRule")
    bad = copy.deepcopy(docs)
    by_kind(bad, "WasmPlugin")["spec"]["failStrategy"] = "FAIL_CLOSED"  # Envoy's spelling, not Istio's
    by_kind(bad, "WasmPlugin")["spec"]["sha256"] = "sha256:" + "0" * 64
    tls = by_kind(bad, "DestinationRule")["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]
    tls["subjectAltName"] = tls.pop("subjectAltNames")
    r = schema_check(bad)
    assert r.returncode == 1, r.stdout
    assert "failStrategy" in r.stdout and "sha256" in r.stdout and "subjectAltName" in r.stdout, r.stdout
    assert plugin and dr


# ---------------------------------------------------------------- Istio semantics


@pytest.mark.parametrize("style", ISTIO_STYLES)
def test_istio_objects_stay_in_the_gateway_namespace(style):
    path, namespace, selector = ISTIO_STYLES[style]
    docs = load_all(path)
    assert {d["kind"] for d in docs} == {"WasmPlugin", "ServiceEntry", "DestinationRule", "ConfigMap"}
    for d in docs:
        assert d["metadata"]["namespace"] == namespace, d["kind"]
    plugin = by_kind(docs, "WasmPlugin")["spec"]
    assert plugin["selector"] == {"matchLabels": selector}
    assert "targetRefs" not in plugin and "targetRef" not in plugin
    # Exported to this namespace only: sidecars elsewhere never see the IdP's
    # TLS origination (it would wrap their own TLS a second time).
    assert by_kind(docs, "ServiceEntry")["spec"]["exportTo"] == ["."]
    assert by_kind(docs, "DestinationRule")["spec"]["exportTo"] == ["."]


@pytest.mark.parametrize("style", ISTIO_STYLES)
def test_istio_verifies_the_idp_certificate_name(style):
    """With `sni` set Istio adds no automatic SAN check (cluster_tls.go,
    setAutoSniAndAutoSanValidation): subjectAltNames must name the host, and
    nothing may turn verification off."""
    docs = load_all(ISTIO_STYLES[style][0])
    dr = by_kind(docs, "DestinationRule")["spec"]
    host = dr["host"]
    assert host in by_kind(docs, "ServiceEntry")["spec"]["hosts"]
    assert "tls" not in dr["trafficPolicy"] or dr["trafficPolicy"]["tls"].get("mode") != "DISABLE"
    for setting in dr["trafficPolicy"]["portLevelSettings"]:
        tls = setting["tls"]
        assert tls["mode"] == "SIMPLE"
        assert tls.get("sni") in (None, host)
        assert tls.get("subjectAltNames") == [host]
        assert not tls.get("insecureSkipVerify")


def test_istio_styles_differ_only_in_namespace_and_selector():
    def normalised(style):
        path, namespace, selector = ISTIO_STYLES[style]
        docs = copy.deepcopy(load_all(path))
        for d in docs:
            d["metadata"]["namespace"] = "<ns>"
        by_kind(docs, "WasmPlugin")["spec"]["selector"] = "<selector>"
        return docs
    assert normalised("helm") == normalised("istioctl")


@pytest.mark.parametrize("style", ISTIO_STYLES)
def test_istio_image_reference_and_digest_form(style):
    """`sha256` (if set) is the manifest digest as 64 bare hex characters
    (the CRD's pattern; pkg/wasm/cache.go compares it with the manifest
    digest's hex); a digest in the URL is `@sha256:<64 hex>`."""
    plugin = by_kind(load_all(ISTIO_STYLES[style][0]), "WasmPlugin")["spec"]
    url = plugin["url"]
    assert url.startswith("oci://"), "file:// modules are not checked against sha256 by Istio"
    if "@" in url:
        assert re.fullmatch(r"oci://[^@]+@sha256:[a-f0-9]{64}", url)
    if "sha256" in plugin:
        assert HEX64.fullmatch(plugin["sha256"])
    assert plugin["failStrategy"] in ("FAIL_CLOSE", "FAIL_RELOAD")
    text = ISTIO_STYLES[style][0].read_text()
    assert "sha256: <manifest digest, 64 hex characters" in text


@pytest.mark.parametrize("style", ISTIO_STYLES)
def test_istio_stats_tags_configmap_is_envoy_yaml_s(style):
    cm = by_kind(load_all(ISTIO_STYLES[style][0]), "ConfigMap")
    assert cm["metadata"]["name"] == "tollgate-stats-tags"
    override = json.loads(cm["data"]["custom_bootstrap.json"])
    assert override == {"stats_config": {"stats_tags": reference_stats_tags()}}
    assert reference_stats_tags() == STATS_TAGS


# ---------------------------------------------------------------- Envoy Gateway

# The fields of the objects used, from envoyproxy/gateway api/v1alpha1 at
# v1.9.0 (envoyextensionpolicy_types.go, wasm_types.go,
# envoypatchpolicy_types.go, envoyproxy_types.go): a misspelt key fails here
# instead of being pruned by the API server.
EG_FIELDS = {
    "EnvoyExtensionPolicy.spec": {"targetRef", "targetRefs", "targetSelectors", "wasm", "extProc", "lua",
                                  "dynamicModule"},
    "Wasm": {"name", "rootID", "code", "config", "failOpen", "env"},
    "WasmCodeSource": {"type", "http", "image", "pullPolicy"},
    "ImageWasmCodeSource": {"url", "sha256", "pullSecretRef", "tls"},
    "EnvoyPatchPolicy.spec": {"type", "jsonPatches", "targetRef", "priority"},
    "EnvoyJSONPatchConfig": {"type", "name", "operation"},
    "JSONPatchOperation": {"op", "path", "jsonPath", "from", "value"},
    "EnvoyProxy.spec.bootstrap": {"type", "value", "jsonPatches"},
}


def test_envoy_gateway_fields_exist_in_the_api():
    docs = load_all(GATEWAY)
    assert [d["kind"] for d in docs] == ["EnvoyExtensionPolicy", "EnvoyPatchPolicy", "EnvoyProxy"]
    for d in docs:
        assert d["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
        assert set(d) == {"apiVersion", "kind", "metadata", "spec"}
    eep = by_kind(docs, "EnvoyExtensionPolicy")["spec"]
    assert set(eep) <= EG_FIELDS["EnvoyExtensionPolicy.spec"]
    for w in eep["wasm"]:
        assert set(w) <= EG_FIELDS["Wasm"]
        assert set(w["code"]) <= EG_FIELDS["WasmCodeSource"]
        assert w["code"]["type"] in ("HTTP", "Image")
        assert set(w["code"]["image"]) <= EG_FIELDS["ImageWasmCodeSource"]
        assert w["code"]["pullPolicy"] in ("IfNotPresent", "Always")
    epp = by_kind(docs, "EnvoyPatchPolicy")["spec"]
    assert set(epp) <= EG_FIELDS["EnvoyPatchPolicy.spec"]
    assert epp["type"] == "JSONPatch"
    for p in epp["jsonPatches"]:
        assert set(p) <= EG_FIELDS["EnvoyJSONPatchConfig"]
        assert set(p["operation"]) <= EG_FIELDS["JSONPatchOperation"]
        assert p["operation"]["op"] in ("add", "remove", "replace", "move", "copy", "test")
    boot = by_kind(docs, "EnvoyProxy")["spec"]["bootstrap"]
    assert set(boot) <= EG_FIELDS["EnvoyProxy.spec.bootstrap"]


def test_envoy_gateway_objects_share_the_gateway_namespace():
    """EnvoyPatchPolicy's targetRef has no namespace: the Gateway is looked up
    in the policy's own (internal/gatewayapi/envoypatchpolicy.go), and an
    EnvoyProxy is referenced from the Gateway's namespace."""
    docs = load_all(GATEWAY)
    namespaces = {d["metadata"]["namespace"] for d in docs}
    assert len(namespaces) == 1, namespaces
    ref = by_kind(docs, "EnvoyPatchPolicy")["spec"]["targetRef"]
    assert ref["kind"] == "Gateway" and "namespace" not in ref
    for t in by_kind(docs, "EnvoyExtensionPolicy")["spec"]["targetRefs"]:
        assert "namespace" not in t


def test_envoy_gateway_fails_closed_and_pins_by_bare_digest():
    text = GATEWAY.read_text()
    (wasm,) = by_kind(load_all(GATEWAY), "EnvoyExtensionPolicy")["spec"]["wasm"]
    assert wasm["failOpen"] is False
    image = wasm["code"]["image"]
    if "sha256" in image:
        assert HEX64.fullmatch(image["sha256"])
    if "@" in image["url"]:
        assert re.fullmatch(r"[^@/]+(/[^@]+)+@sha256:[a-f0-9]{64}", image["url"])
    # The caveats that bite are written next to the fields they concern.
    assert "no FAIL_RELOAD" in text
    assert "<policy>/wasm/<index>" in text and "quota" in text
    assert "mergeGateways" in text and "GatewayClass" in text


def test_envoy_gateway_idp_cluster_verifies_the_name():
    epp = by_kind(load_all(GATEWAY), "EnvoyPatchPolicy")["spec"]
    (patch,) = epp["jsonPatches"]
    cluster = patch["operation"]["value"]
    host = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["address"]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == host
    sans = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "DNS", "matcher": {"exact": host}}]


def test_envoy_gateway_bootstrap_merge_is_envoy_yaml_s_tags():
    boot = by_kind(load_all(GATEWAY), "EnvoyProxy")["spec"]["bootstrap"]
    assert boot["type"] == "Merge"
    assert yaml.safe_load(boot["value"]) == {"stats_config": {"stats_tags": reference_stats_tags()}}


# ---------------------------------------------------------------- labels, through Envoy

# What each platform's own bootstrap already has in stats_config (the parts
# that matter here), so the merge is tested against it:
# Istio 1.29 tools/packaging/common/envoy_bootstrap.json: no default tags, and
# a tag of its own called `cache`, the same name as tollgate's.
ISTIO_STATS_CONFIG = {"use_all_default_tags": False, "stats_tags": [
    {"tag_name": "cluster_name", "regex": r"^cluster(\.(.+);)"},
    {"regex": r"(cache\.(.+?)\.)", "tag_name": "cache"},
    {"regex": r"(component\.(.+?)\.)", "tag_name": "component"},
    {"regex": r"(wasm_filter\.(.+?)\.)", "tag_name": "wasm_filter"},
]}
# Envoy Gateway v1.9 internal/xds/bootstrap/bootstrap.yaml.tpl: default tags on.
EG_STATS_CONFIG = {"use_all_default_tags": True, "stats_tags": [
    {"regex": r"\.zone(\.(([^\.]+)\.))", "tag_name": "from_zone"},
    {"regex": r"\.zone\.[^\.]+\.(([^\.]+)\.)", "tag_name": "to_zone"},
]}


def scrape(gw) -> str:
    with urllib.request.urlopen(gw.admin_url + "/stats/prometheus", timeout=5) as r:
        return r.read().decode()


@pytest.fixture
def key(idp):
    k = tokens.rsa_key("deploy")
    idp.set_keys(k)  # before Envoy starts: the key set is fetched at start
    return k


def exercise(gw, key):
    token = key.sign(tokens.claims(sub=f"u-{uuid.uuid4().hex[:8]}"))
    assert gw.get("/v1/models").status == 401
    assert gw.get("/v1/models", token=token).status == 200
    assert gw.get("/v1/models", token=token).status == 200
    time.sleep(1.5)  # cache counters are reported on the 1 s tick


def assert_labelled(text: str) -> None:
    assert re.search(r'^tollgate_requests_denied_total\{reason="missing"\} 1$', text, re.M), text
    assert re.search(r'^tollgate_cache_hits_total\{cache="token"\} [1-9]', text, re.M), text
    assert re.search(r'^tollgate_callouts_total\{provider="custom",outcome="ok"\} 0$', text, re.M), text
    assert "tollgate_requests_denied_total_reason" not in text
    assert "tollgate_cache_hits_total_cache" not in text


def with_stats_config(stats_config: dict):
    def transform(b: dict) -> dict:
        b["stats_config"] = copy.deepcopy(stats_config)
        return b
    return transform


def test_istio_override_gives_labels_through_envoy(envoy, idp, key):
    """The ConfigMap's custom_bootstrap.json reaches Envoy as --config-yaml on
    top of Istio's bootstrap (pkg/envoy/proxy.go): Envoy merges it, appending
    the tags, and Istio's own `cache` tag does not get in the way."""
    override = by_kind(load_all(ISTIO_HELM), "ConfigMap")["data"]["custom_bootstrap.json"]
    gw = envoy(jwt_config(idp.port), transform=with_stats_config(ISTIO_STATS_CONFIG), concurrency=1,
               extra_args=("--config-yaml", override))
    exercise(gw, key)
    assert_labelled(scrape(gw))


def test_istio_without_override_metrics_are_flattened(envoy, idp, key):
    """The control: Istio's bootstrap alone leaves the labels in the names."""
    gw = envoy(jwt_config(idp.port), transform=with_stats_config(ISTIO_STATS_CONFIG), concurrency=1)
    exercise(gw, key)
    text = scrape(gw)
    assert re.search(r"^tollgate_requests_denied_total_reason_missing\{\} 1$", text, re.M), text


def test_envoy_gateway_merge_gives_labels_through_envoy(envoy, idp, key):
    """EnvoyProxy bootstrap `type: Merge` is a protobuf merge
    (internal/xds/bootstrap/util.go): lists are appended."""
    merged = copy.deepcopy(EG_STATS_CONFIG)
    value = yaml.safe_load(by_kind(load_all(GATEWAY), "EnvoyProxy")["spec"]["bootstrap"]["value"])
    merged["stats_tags"] += value["stats_config"]["stats_tags"]
    gw = envoy(jwt_config(idp.port), transform=with_stats_config(merged), concurrency=1)
    exercise(gw, key)
    assert_labelled(scrape(gw))


# ---------------------------------------------------------------- dashboard

DASHBOARD = REPO_ROOT / "deploy/grafana/tollgate-dashboard.json"


def exported_metrics() -> set[str]:
    """The metric names tollgate defines (src/metrics.rs), without the
    `.label.value` parts that stats_tags turn into labels."""
    src = (REPO_ROOT / "src/metrics.rs").read_text()
    body = src.split("pub fn all_names()", 1)[1].split("\n}\n", 1)[0]
    return set(re.findall(r'"(tollgate_[a-z_]+)', body))


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_name_only_exported_metrics():
    names = exported_metrics()
    # + quota_fallbacks (#18), tokens_charged and token_usage_missing (#19)
    assert "tollgate_requests_denied_total" in names and len(names) == 14, names
    readme = (REPO_ROOT / "README.md").read_text()
    used = set()
    for expr in dashboard_queries():
        assert expr.count("(") == expr.count(")"), expr
        found = set(re.findall(r"\b(tollgate_\w+)", expr))
        assert found, f"query names no tollgate metric: {expr}"
        assert found <= names, f"{expr}: {found - names} is not a tollgate metric"
        used |= found
    for n in used:
        assert f"`{n}`" in readme, f"{n} is not in README's metrics table"
    # What the issue asks the dashboard to show.
    for n in ("tollgate_requests_allowed_total", "tollgate_requests_denied_total",
              "tollgate_callouts_total", "tollgate_cache_hits_total", "tollgate_cache_misses_total",
              "tollgate_jwks_age_seconds", "tollgate_jwks_fetch_failures_total",
              "tollgate_quota_rejections_total", "tollgate_config_failures_total"):
        assert n in used, f"the dashboard does not show {n}"


def test_dashboard_queries_match_a_real_scrape(envoy, idp, key):
    """Every metric a query names is in Envoy's /stats/prometheus (with
    envoy/envoy.yaml's stats_tags), carrying every label the query groups by."""
    gw = envoy(jwt_config(idp.port), concurrency=1)
    exercise(gw, key)
    series: dict[str, set[str]] = {}
    for line in scrape(gw).splitlines():
        m = re.match(r"^(tollgate_\w+)\{([^}]*)\} ", line)
        if m:
            series.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2)))
    for expr in dashboard_queries():
        labels = set()
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            labels |= {x.strip() for x in group.split(",")}
        for name in re.findall(r"\b(tollgate_\w+)", expr):
            assert name in series, f"{name} not exported by Envoy: {expr}"
            assert labels <= series[name], f"{expr}: {name} has labels {series[name]}"
