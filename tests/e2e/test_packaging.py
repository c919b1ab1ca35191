"""Deployment packaging: the Istio, Envoy Gateway, global-rate-limit and
global-quota (quota.backend) examples in envoy/, the Dockerfile, docker-compose.yaml and scripts/oci.sh.

envoy/envoy.yaml is the reference: its plugin configuration is the one the
e2e tests and `make run` exercise. Every other example must carry the same
JSON, except the keys listed in ALLOWED_DIFFERENCES for that file (the ones
that name the identity provider where it lives in that platform), and the
real Envoy (in --mode validate, which loads the .wasm and runs its
on_configure) must accept each of them. No Docker, Kubernetes or registry is
needed: the image layout is checked against the OCI image spec and against a
port of the Wasm image fetcher that Istio and Envoy Gateway share."""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import io
import json
import posixpath
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from harness.envoy import REPO_ROOT, envoy_bin, wasm_path

yaml = pytest.importorskip(
    "yaml", reason="PyYAML is not installed: tests/requirements.txt needs PyYAML==6.0.3")

ENVOY_YAML = REPO_ROOT / "envoy/envoy.yaml"
ISTIO = REPO_ROOT / "envoy/istio-wasmplugin.yaml"
ISTIO_ISTIOCTL = REPO_ROOT / "envoy/istio-wasmplugin-istioctl.yaml"  # test_deploy: same as ISTIO
GATEWAY = REPO_ROOT / "envoy/envoy-gateway.yaml"
RATELIMIT = REPO_ROOT / "envoy/ratelimit-global.yaml"
# quota.backend (README "Quotas across replicas"): the Envoy example, the engines' own
# configuration and the Kubernetes manifests.
ENVOY_RLS = REPO_ROOT / "envoy/envoy-rls.yaml"
RLS_CONFIG = REPO_ROOT / "envoy/ratelimit-config.yaml"
RLS_SERVICE = REPO_ROOT / "envoy/ratelimit-service.yaml"
LIMITADOR_LIMITS = REPO_ROOT / "envoy/limitador-limits.yaml"
LIMITADOR_SERVICE = REPO_ROOT / "envoy/limitador-service.yaml"
ISTIO_RLS = REPO_ROOT / "envoy/istio-ratelimit.yaml"
GATEWAY_RLS = REPO_ROOT / "envoy/envoy-gateway-ratelimit.yaml"
COMPOSE = REPO_ROOT / "docker-compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
OCI_SH = REPO_ROOT / "scripts/oci.sh"
WASM_REL = "target/wasm32-wasip1/release/tollgate.wasm"  # `make build`'s output

ISSUER = ("auth", "config", "issuer")
JWKS_URI = ("auth", "config", "jwks", "uri")
JWKS_CLUSTER = ("auth", "config", "jwks", "cluster")

# The only keys whose values may differ from envoy/envoy.yaml's, per file.
ALLOWED_DIFFERENCES = {
    ISTIO: {ISSUER, JWKS_URI, JWKS_CLUSTER},  # cluster: Istio's outbound|<port>||<host>
    GATEWAY: {ISSUER, JWKS_URI},              # cluster stays `idp` (EnvoyPatchPolicy)
    RATELIMIT: set(),                         # the same local setup as envoy.yaml
}

WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


# ---------------------------------------------------------------- helpers


def load_all(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def by_kind(path: Path, kind: str) -> dict:
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def wasm_filters(bootstrap: dict) -> list[dict]:
    """The envoy.filters.http.wasm entries of every listener's HCM."""
    found = []
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                for hf in f["typed_config"].get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.wasm":
                        found.append(hf)
    return found


def plugin_of(bootstrap: dict) -> dict:
    filters = wasm_filters(bootstrap)
    assert len(filters) == 1, "expected exactly one tollgate wasm filter"
    return filters[0]["typed_config"]["config"]


def reference_bootstrap() -> dict:
    return load_all(ENVOY_YAML)[0]


def reference_config() -> dict:
    return json.loads(plugin_of(reference_bootstrap())["configuration"]["value"])


def get_path(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


def masked(config: dict, paths: set) -> dict:
    """A copy with the values at `paths` replaced by a marker (each must exist)."""
    out = copy.deepcopy(config)
    for p in paths:
        parent = get_path(out, p[:-1])
        assert p[-1] in parent, f"key {'.'.join(p)} missing"
        parent[p[-1]] = "<may differ>"
    return out


def assert_same_config(config: dict, path: Path) -> None:
    allowed = ALLOWED_DIFFERENCES[path]
    ref = reference_config()
    if masked(config, allowed) != masked(ref, allowed):
        diff = difflib_lines(masked(ref, allowed), masked(config, allowed))
        pytest.fail(f"{path.name}: the plugin configuration differs from envoy/envoy.yaml's "
                    f"beyond {sorted('.'.join(p) for p in allowed)}:\n" + "\n".join(diff))


def difflib_lines(a: dict, b: dict) -> list[str]:
    import difflib
    return list(difflib.unified_diff(json.dumps(a, indent=2, sort_keys=True).splitlines(),
                                     json.dumps(b, indent=2, sort_keys=True).splitlines(),
                                     "envoy/envoy.yaml", "example", lineterm=""))


def struct_json(value) -> str:
    """The JSON string Istio hands the plugin for a WasmPlugin's pluginConfig.

    pluginConfig is a google.protobuf.Struct: every number becomes a double,
    and istiod serialises it with protojson, which writes integral doubles
    without a fraction (3600.0 -> 3600). tollgate refuses `3600.0` for its
    integer keys, so this matters."""
    def conv(v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            f = float(v)
            return int(f) if f.is_integer() and abs(f) < 1e21 else f
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        raise TypeError(f"not representable in a protobuf Struct: {v!r}")
    return json.dumps(conv(value))


def cargo_version() -> str:
    text = (REPO_ROOT / "Cargo.toml").read_text()
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', package, re.M).group(1)


def envoy_validate(bootstrap: dict, tmp_path: Path, name: str) -> str:
    """Runs `envoy --mode validate`; asserts it accepts the bootstrap. Validation
    builds the filter chain, so the .wasm is loaded and on_configure runs."""
    wasm = wasm_path()
    assert wasm.is_file(), f"{wasm} not found: run `make build`"
    for f in wasm_filters(bootstrap):
        f["typed_config"]["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(bootstrap, indent=2))
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", str(cfg), "-l", "warn"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "OK" in out, f"Envoy refused {name}:\n{out[-4000:]}"
    assert "refused its configuration" not in out, out
    return out


def self_signed_ca(path: Path) -> Path:
    """A throwaway CA certificate, for trusted_ca when the system bundle is absent."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def with_plugin_config(config_json: str) -> dict:
    """envoy/envoy.yaml with its plugin configuration replaced."""
    b = reference_bootstrap()
    plugin_of(b)["configuration"]["value"] = config_json
    return b


# ---------------------------------------------------------------- the YAML files


@pytest.mark.parametrize("path", [ENVOY_YAML, ISTIO, ISTIO_ISTIOCTL, GATEWAY, RATELIMIT, COMPOSE,
                                  ENVOY_RLS, RLS_CONFIG, RLS_SERVICE, LIMITADOR_SERVICE, ISTIO_RLS,
                                  GATEWAY_RLS], ids=lambda p: p.name)
def test_parses_as_yaml(path):
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_reference_envoy_yaml_loads_in_envoy(tmp_path):
    envoy_validate(reference_bootstrap(), tmp_path, "envoy.yaml")


# ---------------------------------------------------------------- Istio


def test_istio_wasmplugin_carries_the_reference_config():
    plugin = by_kind(ISTIO, "WasmPlugin")
    assert plugin["apiVersion"] == "extensions.istio.io/v1alpha1"
    spec = plugin["spec"]
    # What the plugin will receive: the Struct as istiod serialises it.
    assert_same_config(json.loads(struct_json(spec["pluginConfig"])), ISTIO)
    assert spec["phase"] == "AUTHN"
    assert spec["failStrategy"] in ("FAIL_CLOSE", "FAIL_RELOAD"), "an auth filter must fail closed"
    assert spec["pluginName"] == plugin_of(reference_bootstrap())["root_id"]
    assert spec["url"].startswith("oci://") and spec["url"].endswith(f"/tollgate:{cargo_version()}")


def test_istio_jwks_cluster_is_the_service_entry_cluster():
    """jwks.cluster is Istio's name for the ServiceEntry port the JWKS URL
    points at, outbound|<port>||<host>, and TLS is originated for it."""
    config = by_kind(ISTIO, "WasmPlugin")["spec"]["pluginConfig"]
    uri, cluster = get_path(config, JWKS_URI), get_path(config, JWKS_CLUSTER)
    m = re.fullmatch(r"(https?)://([^/:]+)(?::(\d+))?(/.*)", uri)
    assert m, uri
    scheme, host, port = m.group(1), m.group(2), int(m.group(3) or (443 if m.group(1) == "https" else 80))
    assert cluster == f"outbound|{port}||{host}"
    se = by_kind(ISTIO, "ServiceEntry")["spec"]
    assert host in se["hosts"] and port in [p["number"] for p in se["ports"]]
    if scheme == "https":
        dr = by_kind(ISTIO, "DestinationRule")["spec"]
        assert dr["host"] == host
        tls = [s["tls"] for s in dr["trafficPolicy"]["portLevelSettings"] if s["port"]["number"] == port]
        assert tls and tls[0]["mode"] == "SIMPLE" and tls[0]["sni"] == host
    assert get_path(config, ISSUER).startswith(f"{scheme}://{host}")


def test_istio_plugin_config_loads_in_envoy(tmp_path):
    spec = by_kind(ISTIO, "WasmPlugin")["spec"]
    envoy_validate(with_plugin_config(struct_json(spec["pluginConfig"])), tmp_path, "istio")


# ---------------------------------------------------------------- Envoy Gateway


def test_envoy_gateway_policy_carries_the_reference_config():
    policy = by_kind(GATEWAY, "EnvoyExtensionPolicy")
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert [t["kind"] for t in policy["spec"]["targetRefs"]] == ["HTTPRoute"]
    (wasm,) = policy["spec"]["wasm"]
    assert_same_config(wasm["config"], GATEWAY)
    assert wasm["rootID"] == plugin_of(reference_bootstrap())["root_id"]
    assert wasm["failOpen"] is False, "an auth filter must fail closed"
    assert wasm["code"]["type"] == "Image"
    url = wasm["code"]["image"]["url"]
    assert "://" not in url and url.endswith(f"/tollgate:{cargo_version()}")


def gateway_idp_cluster() -> dict:
    patch = by_kind(GATEWAY, "EnvoyPatchPolicy")["spec"]
    (p,) = [p for p in patch["jsonPatches"] if p["type"].endswith("envoy.config.cluster.v3.Cluster")]
    assert p["operation"]["op"] == "add" and p["operation"]["path"] == ""
    return p["operation"]["value"]


def test_envoy_gateway_adds_the_jwks_cluster():
    (wasm,) = by_kind(GATEWAY, "EnvoyExtensionPolicy")["spec"]["wasm"]
    cluster = gateway_idp_cluster()
    assert cluster["name"] == get_path(wasm["config"], JWKS_CLUSTER)
    host = re.match(r"https://([^/:]+)", get_path(wasm["config"], JWKS_URI)).group(1)
    (lb,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"] == {"address": host, "port_value": 443}
    assert cluster["transport_socket"]["typed_config"]["sni"] == host


def test_envoy_gateway_config_and_cluster_load_in_envoy(tmp_path):
    (wasm,) = by_kind(GATEWAY, "EnvoyExtensionPolicy")["spec"]["wasm"]
    b = with_plugin_config(json.dumps(wasm["config"]))
    # The patched-in cluster replaces envoy.yaml's local `idp`: Envoy checks it too.
    cluster = gateway_idp_cluster()
    ca = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"]
    if not Path(ca["filename"]).is_file():  # the Envoy Gateway proxy image has it; this machine may not
        ca["filename"] = str(self_signed_ca(tmp_path / "ca.pem"))
    clusters = b["static_resources"]["clusters"]
    b["static_resources"]["clusters"] = [c for c in clusters if c["name"] != cluster["name"]] + [cluster]
    envoy_validate(b, tmp_path, "envoy-gateway")


# ---------------------------------------------------------------- global rate limit


SERVICE_CONFIG = re.compile(r"^# --- ratelimit service config ---\n(.*?)^# --- end ratelimit service config ---",
                            re.M | re.S)


def ratelimit_service_config() -> dict:
    m = SERVICE_CONFIG.search(RATELIMIT.read_text())
    assert m, "the commented rate limit service config block is missing"
    return yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line[1:]
                                    for line in m.group(1).splitlines()))


def hcm_of(bootstrap: dict) -> dict:
    (listener,) = bootstrap["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (f,) = chain["filters"]
    return f["typed_config"]


def test_ratelimit_global_keys_on_the_principal_after_tollgate():
    b = load_all(RATELIMIT)[0]
    assert_same_config(json.loads(plugin_of(b)["configuration"]["value"]), RATELIMIT)
    hcm = hcm_of(b)
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.wasm", "envoy.filters.http.ratelimit", "envoy.filters.http.router"]
    rl = hcm["http_filters"][1]["typed_config"]
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (limit,) = route["route"]["rate_limits"]
    (action,) = limit["actions"]
    principal_header = reference_config()["forward"]["principal_header"]
    assert action == {"request_headers": {"header_name": principal_header, "descriptor_key": "principal"}}
    # The service's config: same domain, a per-principal daily limit.
    service = ratelimit_service_config()
    assert service["domain"] == rl["domain"]
    assert service["descriptors"] == [
        {"key": "principal", "rate_limit": {"unit": "day", "requests_per_unit": 1000}}]
    cluster_name = rl["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    (cluster,) = [c for c in b["static_resources"]["clusters"] if c["name"] == cluster_name]
    assert "http2_protocol_options" in json.dumps(cluster), "gRPC needs HTTP/2"


def test_ratelimit_global_is_envoy_yaml_plus_the_three_additions():
    """Everything but the rate limit additions is envoy/envoy.yaml, so the
    example keeps in step with the tested one."""
    b = load_all(RATELIMIT)[0]
    hcm = hcm_of(b)
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        route["route"].pop("rate_limits", None)
    (rl,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"]
    hcm["http_filters"].remove(rl)
    name = rl["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    b["static_resources"]["clusters"] = [c for c in b["static_resources"]["clusters"] if c["name"] != name]
    if b != reference_bootstrap():
        pytest.fail("envoy/ratelimit-global.yaml drifted from envoy/envoy.yaml:\n"
                    + "\n".join(difflib_lines(reference_bootstrap(), b)))


def test_ratelimit_global_loads_in_envoy(tmp_path):
    envoy_validate(load_all(RATELIMIT)[0], tmp_path, "ratelimit-global")


# ---------------------------------------------------------------- quota.backend (global quotas)


def backend_of(config: dict) -> dict:
    return config["quota"]["backend"]


def without_backend(config: dict) -> dict:
    out = copy.deepcopy(config)
    del out["quota"]["backend"]
    return out


def envoy_rls_bootstrap() -> dict:
    return load_all(ENVOY_RLS)[0]


def envoy_rls_config() -> dict:
    return json.loads(plugin_of(envoy_rls_bootstrap())["configuration"]["value"])


def test_envoy_rls_is_envoy_yaml_plus_the_backend_and_its_cluster():
    """envoy/envoy-rls.yaml = envoy/envoy.yaml + quota.backend + the HTTP/2
    `ratelimit` cluster, on its own ports: the example keeps in step."""
    b = envoy_rls_bootstrap()
    config = envoy_rls_config()
    backend = backend_of(config)
    assert backend == {"type": "rls", "cluster": "ratelimit", "domain": "tollgate",
                       "timeout_ms": 100, "failure_mode": "deny", "max_batch": 32}
    assert without_backend(config) == reference_config()
    (cluster,) = [c for c in b["static_resources"]["clusters"] if c["name"] == backend["cluster"]]
    assert "http2_protocol_options" in json.dumps(cluster), "gRPC needs HTTP/2"
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"] == {"address": "127.0.0.1", "port_value": 8081}
    ref = reference_bootstrap()
    b["static_resources"]["clusters"].remove(cluster)
    plugin_of(b)["configuration"]["value"] = plugin_of(ref)["configuration"]["value"]
    ports = (b["admin"]["address"]["socket_address"]["port_value"],
             b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"])
    assert ports == (9911, 10001), "beside make run's Envoy (9901, 10000), as README says"
    b["admin"] = ref["admin"]
    b["static_resources"]["listeners"][0]["address"] = ref["static_resources"]["listeners"][0]["address"]
    if b != ref:
        pytest.fail("envoy/envoy-rls.yaml drifted from envoy/envoy.yaml:\n"
                    + "\n".join(difflib_lines(ref, b)))
    # The README's sed line makes the second Envoy's file.
    text = ENVOY_RLS.read_text()
    assert "s/port_value: 10001/port_value: 10002/" in text and "s/port_value: 9911/port_value: 9912/" in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert code.count("port_value: 10001") == 1 and code.count("port_value: 9911") == 1


def test_envoy_rls_loads_in_envoy(tmp_path):
    envoy_validate(envoy_rls_bootstrap(), tmp_path, "envoy-rls")


def quota_limits() -> tuple[int, int, str]:
    q = reference_config()["quota"]
    return q["authenticated_max_requests"], q["anonymous_max_requests"], q["period"]


def test_ratelimit_config_configures_the_domain_with_tollgate_s_limits():
    """envoyproxy/ratelimit applies tollgate's limit overrides only for a
    configured domain; the file's own rules (the fallback) equal the quota."""
    doc = load_all(RLS_CONFIG)[0]
    backend = backend_of(envoy_rls_config())
    assert doc["domain"] == backend["domain"]
    authenticated, anonymous, period = quota_limits()
    assert doc["descriptors"] == [
        {"key": "tollgate_principal", "rate_limit": {"unit": period, "requests_per_unit": authenticated}},
        {"key": "tollgate_anonymous", "rate_limit": {"unit": period, "requests_per_unit": anonymous}}]
    # The keys tollgate sends (src/rls.rs).
    rls_rs = (REPO_ROOT / "src/rls.rs").read_text()
    for d in doc["descriptors"]:
        assert f'"{d["key"]}"' in rls_rs, d["key"]


PERIOD_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def test_limitador_limits_hold_tollgate_s_limits():
    """Limitador ignores the override: its file must carry the same numbers."""
    limits = yaml.safe_load(LIMITADOR_LIMITS.read_text())
    authenticated, anonymous, period = quota_limits()
    domain = backend_of(envoy_rls_config())["domain"]
    by_var = {tuple(lim["variables"]): lim for lim in limits}
    assert set(by_var) == {("descriptors[0]['tollgate_principal']",),
                           ("descriptors[0]['tollgate_anonymous']",)}
    for (var,), lim in by_var.items():
        assert lim["namespace"] == domain and lim["conditions"] == []
        assert lim["seconds"] == PERIOD_SECONDS[period]
        assert lim["max_value"] == (authenticated if "principal" in var else anonymous)
        assert set(lim) == {"name", "namespace", "max_value", "seconds", "conditions", "variables"}


def k8s_docs(path: Path) -> list[dict]:
    docs = load_all(path)
    assert len({d["metadata"]["namespace"] for d in docs}) == 1, f"{path.name}: one namespace"
    return docs


def named(docs: list[dict], kind: str, name: str) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def check_service_manifest(path: Path, app: str, config_key: str, config_file: Path) -> dict:
    """Redis + the engine: selectors match, the ConfigMap holds the shipped
    file, the gRPC port is declared as gRPC (Istio: HTTP/2 cluster)."""
    docs = k8s_docs(path)
    ns = docs[0]["metadata"]["namespace"]
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} >= {
        ("Deployment", "redis"), ("Service", "redis"), ("Deployment", app), ("Service", app)}
    for name in ("redis", app):
        dep, svc = named(docs, "Deployment", name), named(docs, "Service", name)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels == svc["spec"]["selector"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert yaml.safe_load(cm["data"][config_key]) == yaml.safe_load(config_file.read_text()), \
        f"{path.name}: the ConfigMap differs from {config_file.name}"
    (port,) = named(docs, "Service", app)["spec"]["ports"]
    assert port["name"] == "grpc" and port["appProtocol"] == "grpc" and port["port"] == 8081
    pod = named(docs, "Deployment", app)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "grpc", "containerPort": 8081} in container["ports"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert named(docs, "Deployment", app)["spec"]["replicas"] >= 2
    redis_host = f"redis.{ns}.svc.cluster.local:6379"
    assert redis_host in json.dumps(container), f"{app} must count in the Redis of this file"
    return {"docs": docs, "namespace": ns, "container": container, "volume": volume}


def test_ratelimit_service_manifest():
    m = check_service_manifest(RLS_SERVICE, "ratelimit", "tollgate.yaml", RLS_CONFIG)
    c = m["container"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["REDIS_SOCKET_TYPE"] == "tcp" and env["USE_STATSD"] == "false"
    # The file is read from RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config/ (settings.go:100-103).
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == f'{env["RUNTIME_ROOT"]}/{env["RUNTIME_SUBDIRECTORY"]}/config'
    assert env["RUNTIME_IGNOREDOTFILES"] == "true"
    assert re.fullmatch(r"envoyproxy/ratelimit:[0-9a-f]{8}", c["image"])


def test_limitador_service_manifest():
    m = check_service_manifest(LIMITADOR_SERVICE, "limitador", "limits.yaml", LIMITADOR_LIMITS)
    c = m["container"]
    (mount,) = c["volumeMounts"]
    # limitador-server <LIMITS_FILE> redis <URL>: never redis_cached (not exact).
    cmd = c["command"]
    assert cmd[0] == "limitador-server" and cmd[1] == mount["mountPath"] and cmd[2] == "redis"
    assert cmd[3] == f"redis://redis.{m['namespace']}.svc.cluster.local:6379"


BLOCK = r"^# --- {0} ---\n(.*?)^# --- end {0} ---"


def commented_block(path: Path, title: str) -> dict:
    m = re.search(BLOCK.format(re.escape(title)), path.read_text(), re.M | re.S)
    assert m, f"{path.name}: the commented block '{title}' is missing"
    return yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line[1:]
                                    for line in m.group(1).splitlines()))


def service_host(path: Path, app: str) -> str:
    docs = load_all(path)
    svc = named(docs, "Service", app)
    return f"{app}.{svc['metadata']['namespace']}.svc.cluster.local"


def test_istio_backend_names_the_service_cluster(tmp_path):
    backend = commented_block(ISTIO_RLS, "pluginConfig.quota.backend")["backend"]
    host = service_host(RLS_SERVICE, "ratelimit")
    assert backend["cluster"] == f"outbound|8081||{host}"
    assert backend["domain"] == load_all(RLS_CONFIG)[0]["domain"]
    (dr,) = load_all(ISTIO_RLS)
    assert dr["kind"] == "DestinationRule" and dr["spec"]["host"] == host
    assert dr["spec"]["exportTo"] == ["."]
    assert dr["metadata"]["namespace"] == by_kind(ISTIO, "WasmPlugin")["metadata"]["namespace"]
    # The WasmPlugin's configuration with the backend: Envoy accepts it.
    config = copy.deepcopy(by_kind(ISTIO, "WasmPlugin")["spec"]["pluginConfig"])
    config["quota"]["backend"] = backend
    envoy_validate(with_plugin_config(struct_json(config)), tmp_path, "istio-rls")


def test_envoy_gateway_backend_names_the_patched_cluster(tmp_path):
    backend = commented_block(GATEWAY_RLS, "config.quota.backend")["backend"]
    (patch_policy,) = load_all(GATEWAY_RLS)
    (p,) = patch_policy["spec"]["jsonPatches"]
    assert p["operation"]["op"] == "add" and p["operation"]["path"] == ""
    cluster = p["operation"]["value"]
    assert cluster["name"] == p["name"] == backend["cluster"]
    assert "http2_protocol_options" in json.dumps(cluster), "gRPC needs HTTP/2"
    (lb,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"] == {
        "address": service_host(RLS_SERVICE, "ratelimit"), "port_value": 8081}
    assert backend["domain"] == load_all(RLS_CONFIG)[0]["domain"]
    # Same Gateway and namespace as envoy/envoy-gateway.yaml's patch policy.
    idp_policy = by_kind(GATEWAY, "EnvoyPatchPolicy")
    assert patch_policy["spec"]["targetRef"] == idp_policy["spec"]["targetRef"]
    assert patch_policy["metadata"]["namespace"] == idp_policy["metadata"]["namespace"]
    # The policy's configuration with the backend, and the cluster: Envoy accepts both.
    (wasm,) = by_kind(GATEWAY, "EnvoyExtensionPolicy")["spec"]["wasm"]
    config = copy.deepcopy(wasm["config"])
    config["quota"]["backend"] = backend
    b = with_plugin_config(json.dumps(config))
    b["static_resources"]["clusters"].append(cluster)
    envoy_validate(b, tmp_path, "envoy-gateway-rls")


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, list[str]]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.split()))
    return out


def test_dockerfile_puts_the_wasm_at_plugin_wasm():
    """The compat image variant: FROM scratch, one layer, the module at
    /plugin.wasm (the file name Istio's and Envoy Gateway's fetchers look for)."""
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", ["scratch"])
    layers = [i for i in ins if i[0] in ("COPY", "ADD", "RUN")]
    assert len(layers) == 1, "the compat variant must be a single layer"
    (op, args) = layers[0]
    assert op == "COPY" and not any(a.startswith("--") for a in args)
    src, dest = args
    assert src == WASM_REL and (REPO_ROOT / src).resolve() == (REPO_ROOT / WASM_REL).resolve()
    workdir = "/"
    for word, a in ins:
        if word == "WORKDIR":
            workdir = posixpath.join(workdir, a[0])
    assert posixpath.normpath(posixpath.join(workdir, dest)) == "/plugin.wasm"


# ---------------------------------------------------------------- OCI image layout


class Layout:
    def __init__(self, root: Path):
        self.root = root
        assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
        self.index = json.loads((root / "index.json").read_text())
        assert self.index["schemaVersion"] == 2 and self.index["mediaType"] == OCI_INDEX

    def blob(self, desc: dict) -> bytes:
        algo, hexd = desc["digest"].split(":")
        assert algo == "sha256" and re.fullmatch(r"[0-9a-f]{64}", hexd)
        data = (self.root / "blobs" / algo / hexd).read_bytes()
        assert len(data) == desc["size"], desc
        assert hashlib.sha256(data).hexdigest() == hexd, desc
        return data

    def manifest(self, tag: str) -> dict:
        (desc,) = [m for m in self.index["manifests"]
                   if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
        assert desc["mediaType"] == OCI_MANIFEST
        m = json.loads(self.blob(desc))
        assert m["schemaVersion"] == 2 and m["mediaType"] == OCI_MANIFEST
        for d in [m["config"], *m["layers"]]:
            self.blob(d)
        return m


def fetch_like_istio(layout: Layout, manifest: dict) -> bytes:
    """A port of the Wasm image fetcher shared by Istio (pkg/wasm/imagefetcher.go)
    and Envoy Gateway (internal/wasm/imagefetcher.go): a Docker manifest is the
    compat variant; an OCI one is tried as compat (last layer tar+gzip with a
    `plugin.wasm`), then as the oci variant (exactly two layers, one of them the
    raw module)."""
    layers = manifest["layers"]
    errors = []
    compat_types = [DOCKER_LAYER] if manifest.get("mediaType") == "application/vnd.docker.distribution.manifest.v2+json" \
        else [OCI_LAYER_GZIP]
    if layers and layers[-1]["mediaType"] in compat_types:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layout.blob(layers[-1])))) as tar:
            for member in tar:
                if posixpath.basename(member.name) == "plugin.wasm":
                    return tar.extractfile(member).read()
        errors.append("compat: plugin.wasm not found in the archive")
    else:
        errors.append("compat: last layer is not tar+gzip")
    if len(layers) == 2:
        for layer in layers:
            if layer["mediaType"] == WASM_LAYER:
                return layout.blob(layer)
        errors.append("oci: no layer of type " + WASM_LAYER)
    else:
        errors.append(f"oci: number of layers must be 2 but got {len(layers)}")
    raise AssertionError("Istio could not read this image: " + "; ".join(errors))


@pytest.fixture(scope="module")
def oci_layout(tmp_path_factory):
    """scripts/oci.sh run on a private copy of the built .wasm (another build may
    replace target/'s meanwhile)."""
    src = wasm_path()
    assert src.is_file(), f"{src} not found: run `make build`"
    tmp = tmp_path_factory.mktemp("oci")
    wasm = tmp / "tollgate.wasm"
    shutil.copy(src, wasm)
    out = tmp / "layout"
    r = subprocess.run(["bash", str(OCI_SH), "--wasm", str(wasm), "--out", str(out), "--tag", "9.9.9"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, wasm.read_bytes(), r.stdout


def test_oci_variant_wasm_layer_is_the_built_wasm(oci_layout):
    out, wasm, _ = oci_layout
    layout = Layout(out)
    m = layout.manifest("9.9.9")
    assert m["config"]["mediaType"] == WASM_CONFIG
    assert [lay["mediaType"] for lay in m["layers"]] == [WASM_CONFIG, WASM_LAYER]
    wasm_layer = m["layers"][1]
    assert wasm_layer["digest"] == "sha256:" + hashlib.sha256(wasm).hexdigest()
    assert wasm_layer["size"] == len(wasm)
    assert layout.blob(wasm_layer) == wasm
    runtime = json.loads(layout.blob(m["config"]))
    assert runtime["type"] == "envoy_proxy"
    assert runtime["config"]["root_ids"] == [plugin_of(reference_bootstrap())["root_id"]]
    assert m["annotations"]["org.opencontainers.image.version"] == cargo_version()
    assert fetch_like_istio(layout, m) == wasm


def test_compat_variant_holds_plugin_wasm(oci_layout):
    out, wasm, _ = oci_layout
    layout = Layout(out)
    m = layout.manifest("9.9.9-compat")
    assert m["annotations"]["module.wasm.image/variant"] == "compat"
    (layer,) = m["layers"]
    assert layer["mediaType"] == OCI_LAYER_GZIP
    tar_bytes = gzip.decompress(layout.blob(layer))
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        (member,) = tar.getmembers()
        assert member.name == "plugin.wasm" and member.isfile()
        assert tar.extractfile(member).read() == wasm
    config = json.loads(layout.blob(m["config"]))
    assert m["config"]["mediaType"] == OCI_CONFIG
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]}
    assert config["architecture"] and config["os"]
    assert fetch_like_istio(layout, m) == wasm


def test_oci_script_prints_the_sha256_to_paste(oci_layout):
    """WasmPlugin.sha256 and EnvoyExtensionPolicy code.image.sha256 take the
    manifest digest as 64 bare hex characters: the script prints that line."""
    out, _, stdout = oci_layout
    layout = Layout(out)
    for tag in ("9.9.9", "9.9.9-compat"):
        (desc,) = [m for m in layout.index["manifests"]
                   if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
        m = re.search(rf"^pin {re.escape(tag)} .*\n  (sha256: (\S+))$", stdout, re.M)
        assert m, stdout
        assert re.fullmatch(r"[a-f0-9]{64}", m.group(2))
        assert "sha256:" + m.group(2) == desc["digest"]
        assert yaml.safe_load(m.group(1)) == {"sha256": desc["digest"].split(":")[1]}


def test_oci_layout_is_reproducible(oci_layout, tmp_path):
    out, wasm, _ = oci_layout
    src = tmp_path / "tollgate.wasm"
    src.write_bytes(wasm)
    r = subprocess.run(["bash", str(OCI_SH), "--wasm", str(src), "--out", str(tmp_path / "again"),
                        "--tag", "9.9.9"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again/index.json").read_bytes() == (out / "index.json").read_bytes()


def test_oci_layout_reads_back_with_skopeo(oci_layout):
    """A second, independent reader, when Debian's skopeo is installed."""
    out, _, _ = oci_layout
    skopeo = shutil.which("skopeo")
    if not skopeo:
        pytest.skip("skopeo not installed (apt-get install skopeo): the pure-Python checks above still ran")
    layout = Layout(out)
    for tag in ("9.9.9", "9.9.9-compat"):
        raw = subprocess.run([skopeo, "inspect", "--raw", f"oci:{out}:{tag}"],
                             capture_output=True, check=True, timeout=60).stdout
        (desc,) = [m for m in layout.index["manifests"]
                   if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == desc["digest"]
    info = json.loads(subprocess.run([skopeo, "inspect", f"oci:{out}:9.9.9-compat"],
                                     capture_output=True, check=True, timeout=60).stdout)
    assert len(info["Layers"]) == 1


def test_oci_script_refuses_a_non_wasm_file(tmp_path):
    bogus = tmp_path / "x.wasm"
    bogus.write_bytes(b"not wasm")
    r = subprocess.run(["bash", str(OCI_SH), "--wasm", str(bogus), "--out", str(tmp_path / "o")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a Wasm module" in r.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- docker-compose


def load_demo_module():
    spec = importlib.util.spec_from_file_location("tollgate_demo", REPO_ROOT / "scripts/demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compose_runs_envoy_with_envoy_yaml_and_the_wasm():
    services = load_all(COMPOSE)[0]["services"]
    envoy = services["envoy"]
    assert envoy["image"].startswith("envoyproxy/envoy:v1.40")
    workdir = envoy["working_dir"]
    mounts = {}
    for v in envoy["volumes"]:
        src, dest, *_ = v.split(":")
        mounts[posixpath.normpath(dest)] = posixpath.normpath(src)
    cmd = envoy["command"]
    config = cmd[cmd.index("-c") + 1]
    # The file Envoy reads is envoy/envoy.yaml itself, unchanged...
    assert mounts[posixpath.join(workdir, config)] == "envoy/envoy.yaml"
    # ...so its relative module path must resolve to the mounted .wasm.
    module = plugin_of(reference_bootstrap())["vm_config"]["code"]["local"]["filename"]
    assert mounts[posixpath.normpath(posixpath.join(workdir, module))] == WASM_REL
    # envoy.yaml's loopback addresses work only on the host's network.
    assert envoy["network_mode"] == "host" and services["demo"]["network_mode"] == "host"


def test_compose_demo_matches_make_run():
    """The demo service runs scripts/demo.py's IdP and echo upstream on the
    ports envoy/envoy.yaml's clusters use, with the pinned Python packages."""
    demo = load_demo_module()
    clusters = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"] for c in reference_bootstrap()["static_resources"]["clusters"]}
    assert (clusters["idp"], clusters["upstream"]) == (demo.IDP_PORT, demo.UPSTREAM_PORT) == (9100, 9200)
    b = reference_bootstrap()
    assert b["admin"]["address"]["socket_address"]["port_value"] == 9901
    assert b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 10000

    script = load_all(COMPOSE)[0]["services"]["demo"]["command"][-1]
    code = script.split("python -c '", 1)[1].rsplit("'", 1)[0]
    compile(code, "docker-compose.yaml demo", "exec")
    for attr in set(re.findall(r"\bdemo\.(\w+)", code)):
        assert hasattr(demo, attr), f"docker-compose.yaml uses demo.{attr}, which scripts/demo.py lacks"
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO_ROOT / "tests/requirements.txt").read_text(), re.M))
    for name, version in re.findall(r"\b(PyJWT|cryptography)==(\S+)", script):
        assert pins[name] == version, f"{name} pin differs from tests/requirements.txt"


# ---------------------------------------------------------------- CHANGELOG


def test_changelog_has_the_cargo_version():
    text = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(cargo_version())}\]", text, re.M)

