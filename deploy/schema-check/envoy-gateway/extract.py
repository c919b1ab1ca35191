"""Extracts the schemas tests/e2e/test_deploy.py checks envoy/'s Envoy Gateway
manifests against, from Envoy Gateway's published CRDs.

    python deploy/schema-check/envoy-gateway/extract.py GIT_DIR TAG...

GIT_DIR is a clone of github.com/envoyproxy/gateway (a bare one will do). For
each TAG it reads
charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_<plural>.yaml
(the CRDs the Helm chart installs) for the kinds envoy/ uses, takes version
v1alpha1's `openAPIV3Schema` as it is, drops the `description` texts (they
carry no constraint) and writes <TAG>/<Kind>.json beside this script, with
the source blob's id in SOURCES."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KINDS = {"EnvoyExtensionPolicy": "envoyextensionpolicies",
         "EnvoyPatchPolicy": "envoypatchpolicies",
         "EnvoyProxy": "envoyproxies"}
CRD_DIR = "charts/gateway-helm/charts/crds/crds/generated"


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k != "description"}
    if isinstance(x, list):
        return [strip(i) for i in x]
    return x


def main() -> int:
    git_dir, tags = sys.argv[1], sys.argv[2:]
    sources = []
    for tag in tags:
        out = HERE / tag
        out.mkdir(exist_ok=True)
        for kind, plural in KINDS.items():
            path = f"{CRD_DIR}/gateway.envoyproxy.io_{plural}.yaml"
            blob = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", f"{tag}:{path}"],
                                  check=True, capture_output=True, text=True).stdout.strip()
            text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{tag}:{path}"],
                                  check=True, capture_output=True, text=True).stdout
            crd = yaml.safe_load(text)
            assert crd["spec"]["names"]["kind"] == kind, (path, crd["spec"]["names"]["kind"])
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
            schema = strip(version["schema"]["openAPIV3Schema"])
            (out / f"{kind}.json").write_text(json.dumps(schema, sort_keys=True, indent=None,
                                                         separators=(",", ":")) + "\n")
            sources.append(f"{tag} {path} blob {blob}")
    (HERE / "SOURCES").write_text("\n".join(sources) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
