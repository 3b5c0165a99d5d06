#!/usr/bin/env bash
# Every image compose.yaml runs, built on a machine that reaches Debian's packages and PyPI
# but no image registry: the Python base (base-image.sh), the Tidegate image on it, and the
# stand-ins for PostgreSQL, Mosquitto and Prometheus (local/). Then:
#   podman-compose -f deploy/compose.yaml -f deploy/compose.local.yaml up -d ...  (smoke-local.sh)
# PIP_CERT: a CA bundle for pip inside the build (a proxy's), mounted read-only, not kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
base="${PYTHON_BASE:-localhost/debian-python:bookworm}"
podman image exists "$base" || deploy/container/base-image.sh "$base"
cert=()
if [ -n "${PIP_CERT:-}" ]; then
    cert=(--build-arg PIP_CERT=/run/pip-ca.crt -v "$PIP_CERT:/run/pip-ca.crt:ro")
fi
podman build --network host --build-arg PYTHON_BASE="$base" "${cert[@]}" \
    -f deploy/container/Containerfile -t localhost/tidegate:0.1.0 .
for name in postgres mosquitto prometheus; do
    podman build --network host --build-arg BASE="$base" -f "deploy/container/local/Containerfile.$name" \
        -t "localhost/tidegate-standin-$name:1" deploy/container/local
done
podman images --filter reference='localhost/tidegate*'
