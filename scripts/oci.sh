#!/usr/bin/env bash
# Packages the built filter as OCI images in an OCI image layout directory
# (default build/oci/), without Docker or any container engine: `make oci`.
#
#   scripts/oci.sh [--wasm FILE] [--out DIR] [--tag TAG]   # paths from the repo root
#
# Tool choice: the layout is written by the small Python (standard library
# only) program below, straight from the OCI image spec (oci-layout, index.json,
# blobs/sha256/<digest>). There is no Docker engine here; Debian's buildah
# needs container storage and user namespaces, umoci builds from an unpacked
# rootfs, and neither writes the Wasm artifact variant; `oras` is not packaged
# in Debian. The hand-written layout has no dependency, is byte-for-byte
# reproducible (no timestamps) and is checked below by re-reading every
# blob. When Debian's
# `skopeo` or `umoci` is installed (apt-get install skopeo umoci) the layout is
# also read back with them (umoci reads only the standard, compat image).
#
# Two images, one per Wasm image variant that Istio and Envoy Gateway pull
# (their image fetchers try both, see github.com/solo-io/wasm spec/):
#
#   TAG         "oci" variant: two layers, the runtime config
#               (application/vnd.module.wasm.config.v1+json) and the raw module
#               (application/vnd.module.wasm.content.layer.v1+wasm), so the Wasm
#               layer's digest IS the sha256 of tollgate.wasm. The fetchers
#               require exactly these two layers; the same config blob is also
#               the manifest's config.
#   TAG-compat  "compat" variant: an ordinary image, one tar+gzip layer holding
#               /plugin.wasm (what `docker build` makes from ./Dockerfile),
#               annotated module.wasm.image/variant=compat. For registries or
#               tools that only handle standard image media types.
#
# TAG defaults to the version in Cargo.toml. Push one with either of
#   skopeo copy oci:build/oci:0.1.0 docker://registry.example.com/tollgate:0.1.0
#   oras cp --from-oci-layout build/oci:0.1.0 registry.example.com/tollgate:0.1.0
# and reference it as oci://registry.example.com/tollgate:0.1.0 (Istio) or
# registry.example.com/tollgate:0.1.0 (Envoy Gateway).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 - "$@" <<'PY'
import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile

WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def cargo_version() -> str:
    with open("Cargo.toml", encoding="utf-8") as f:
        text = f.read()
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    m = re.search(r'^version\s*=\s*"([^"]+)"', package, re.M)
    if not m:
        sys.exit("oci.sh: no version in Cargo.toml [package]")
    return m.group(1)


def canonical(obj) -> bytes:
    """Stable JSON bytes: the digest of a document depends only on its content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"))

    def blob(self, data: bytes, media_type: str, annotations=None) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.root, "blobs", "sha256", digest)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        d = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
        if annotations:
            d["annotations"] = annotations
        return d


def compat_layer(wasm: bytes) -> tuple[bytes, str]:
    """A reproducible tar+gzip with one file, plugin.wasm; returns (gzip, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime = len(wasm), 0o644, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    tar_bytes = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=9) as g:
        g.write(tar_bytes)
    return gz.getvalue(), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def build(wasm_path: str, out: str, tag: str, version: str) -> None:
    with open(wasm_path, "rb") as f:
        wasm = f.read()
    if wasm[:4] != b"\0asm":
        sys.exit(f"oci.sh: {wasm_path} is not a Wasm module")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lay = Layout(tmp)
    common = {
        "org.opencontainers.image.title": "tollgate",
        "org.opencontainers.image.description": "tollgate proxy-wasm filter for Envoy",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    manifests = []

    # "oci" variant: the Wasm image spec's runtime config, then the raw module.
    runtime = canonical({"type": "envoy_proxy", "abiVersions": ["v0.2.1"],
                         "config": {"root_ids": ["tollgate"]}})
    config = lay.blob(runtime, WASM_CONFIG)
    layers = [lay.blob(runtime, WASM_CONFIG, {"org.opencontainers.image.title": "runtime-config.json"}),
              lay.blob(wasm, WASM_LAYER, {"org.opencontainers.image.title": "plugin.wasm"})]
    m = lay.blob(canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                            "layers": layers, "annotations": common}), OCI_MANIFEST)
    m["annotations"] = {"org.opencontainers.image.ref.name": tag}
    manifests.append(m)

    # "compat" variant: a standard image whose single layer holds /plugin.wasm.
    layer, diff_id = compat_layer(wasm)
    image_config = canonical({"architecture": "wasm", "os": "wasip1",
                              "config": {"Labels": common},
                              "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    m = lay.blob(canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                            "config": lay.blob(image_config, OCI_CONFIG),
                            "layers": [lay.blob(layer, OCI_LAYER_GZIP)],
                            "annotations": {**common, "module.wasm.image/variant": "compat"}}),
                 OCI_MANIFEST)
    m["annotations"] = {"org.opencontainers.image.ref.name": f"{tag}-compat"}
    manifests.append(m)

    with open(os.path.join(tmp, "index.json"), "wb") as f:
        f.write(canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
    with open(os.path.join(tmp, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))
    check(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    # The manifest digest is what a pinned reference (repo@sha256:...) and the
    # `sha256` field of a WasmPlugin or EnvoyExtensionPolicy image compare with;
    # that field takes the 64 hex characters alone (both CRDs: ^[a-f0-9]{64}$).
    print(f"{out}: {tag}         manifest {manifests[0]['digest']} (oci variant; "
          f"wasm layer sha256:{hashlib.sha256(wasm).hexdigest()})")
    print(f"{out}: {tag}-compat  manifest {manifests[1]['digest']} (compat variant)")
    for t, m in ((tag, manifests[0]), (f"{tag}-compat", manifests[1])):
        hexd = m["digest"].split(":", 1)[1]
        print(f"pin {t} (WasmPlugin spec / EnvoyExtensionPolicy code.image):")
        print(f"  sha256: {hexd}")


def check(root: str) -> None:
    """Re-reads the layout: every descriptor's blob exists with its size and digest."""
    def blob(desc):
        algo, hexd = desc["digest"].split(":", 1)
        with open(os.path.join(root, "blobs", algo, hexd), "rb") as f:
            data = f.read()
        if len(data) != desc["size"] or hashlib.sha256(data).hexdigest() != hexd:
            sys.exit(f"oci.sh: blob {desc['digest']} does not match its descriptor")
        return data

    with open(os.path.join(root, "index.json"), "rb") as f:
        index = json.load(f)
    for desc in index["manifests"]:
        manifest = json.loads(blob(desc))
        for d in [manifest["config"], *manifest["layers"]]:
            blob(d)


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/oci.sh", description="Writes an OCI image layout for tollgate.wasm.")
    p.add_argument("--wasm", default="target/wasm32-wasip1/release/tollgate.wasm")
    p.add_argument("--out", default="build/oci")
    p.add_argument("--tag", default=None, help="default: the version in Cargo.toml")
    a = p.parse_args()
    if not os.path.isfile(a.wasm):
        sys.exit(f"oci.sh: {a.wasm} not found: run `make build` first")
    version = cargo_version()
    build(a.wasm, a.out, a.tag or version, version)


main()
PY

# Read it back with a second, independent implementation when there is one.
out=build/oci tag=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) exit 0 ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --tag) tag="$2"; shift ;;
    --tag=*) tag="${1#--tag=}" ;;
  esac
  shift
done
[ -n "$tag" ] || tag=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
if command -v skopeo >/dev/null; then
  skopeo inspect --raw "oci:$out:$tag" >/dev/null
  skopeo inspect "oci:$out:$tag-compat" >/dev/null
  echo "$out: skopeo reads both images"
fi
if command -v umoci >/dev/null; then
  umoci stat --image "$out:$tag-compat" >/dev/null  # umoci knows only standard images
  echo "$out: umoci reads $tag-compat"
fi
