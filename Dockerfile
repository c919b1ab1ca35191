# tollgate as an OCI image that Istio (WasmPlugin) and Envoy Gateway
# (EnvoyExtensionPolicy, code.type: Image) pull: the "compat" variant of the
# Wasm image spec (github.com/solo-io/wasm, spec/spec-compat.md) — an ordinary
# image whose only layer holds the module as /plugin.wasm, the file name their
# image fetchers look for.
#
#   make build
#   docker buildx build --provenance=false --sbom=false \
#     -t registry.example.com/tollgate:0.1.0 --push .
#
# --provenance=false --sbom=false keep the push a single image manifest: with
# attestations BuildKit pushes an image index, which the fetchers resolve for
# linux/amd64 only. The plain `docker build` + `docker push` (classic builder)
# also works.
#
# No Docker? `make oci` writes this same image (tag <version>-compat) and the
# "oci" artifact variant (tag <version>) to build/oci/ without one.
FROM scratch
# Exactly one COPY: the compat variant must be a single layer.
COPY target/wasm32-wasip1/release/tollgate.wasm ./plugin.wasm
