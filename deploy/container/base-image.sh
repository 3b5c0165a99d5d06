#!/usr/bin/env bash
# A Python base image without a registry: Debian bookworm (minbase) with its Python 3.11,
# made by debootstrap from Debian's own mirror and imported into podman. For a machine that
# reaches Debian's packages but no image registry (this project's CI machine); anywhere else,
# the Containerfile's default base (docker.io/library/python) is the one to use.
#   sudo deploy/container/base-image.sh [IMAGE]      # then:
#   podman build --build-arg PYTHON_BASE=IMAGE -f deploy/container/Containerfile -t tidegate:0.1.0 .
set -euo pipefail
image="${1:-localhost/debian-python:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
root="$(mktemp -d /var/tmp/tidegate-base-XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >&2
echo "$image: $(chroot "$root" python3 --version)"
