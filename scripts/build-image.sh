#!/usr/bin/env bash
# Build the daemon's OCI image with umoci, without a registry or a container
# engine: a root filesystem holding this machine's Python and a venv with the
# blobstore wheel plus the packages installed in VENV (deploy/image/rootfs.py).
#
#   scripts/build-image.sh [-o OUT.tar] [--venv VENV] [--tag TAG]
#
# OUT.tar (default dist/blobstore-image-VERSION.tar) is an OCI archive:
#   podman load -i OUT.tar
#   skopeo copy oci-archive:OUT.tar docker-daemon:blobstore:TAG   (or docker load, 25+)
#   skopeo copy oci-archive:OUT.tar docker://registry.example/blobstore:TAG
#   blobstore image import OUT.tar images/blobstore:TAG  # into a store, for the fleet
# With docker or podman and a registry at hand, the Containerfile builds the same.
set -euo pipefail
cd "$(dirname "$0")/.."
out="" venv=.venv tag=""
usage() { echo "build-image: $1 (see --help)" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--out|--venv|--tag) [ $# -ge 2 ] || usage "$1 needs a value" ;;&
    -o|--out) out=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
command -v umoci >/dev/null || { echo "build-image: needs umoci (apt-get install umoci)" >&2; exit 1; }
python="$venv/bin/python"
[ -x "$python" ] || { echo "build-image: no venv at $venv (scripts/setup.sh makes .venv)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/blobstore-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Built from a copy: an in-tree build leaves build/lib behind, and files deleted from the
# tree since would end up in the next wheel.
mkdir "$work/src"
tar --exclude=__pycache__ -cf - pyproject.toml README.md blobstore p2p | tar -C "$work/src" -xf -
"$python" -m pip wheel -q --no-deps -w "$work/wheel" "$work/src" >"$work/pip.log" 2>&1 \
  || { cat "$work/pip.log" >&2; echo "build-image: building the wheel failed" >&2; exit 1; }
wheel=$(echo "$work"/wheel/blobstore-*.whl)
version=$(basename "$wheel" | cut -d- -f2)
tag=${tag:-$version}
out=${out:-dist/blobstore-image-$version.tar}

rootless=()
[ "$(id -u)" = 0 ] || rootless=(--rootless)
image="$work/layout:$tag"
umoci init --layout "$work/layout"
umoci new --image "$image"
umoci unpack "${rootless[@]}" --image "$image" "$work/bundle" >/dev/null
"$python" deploy/image/rootfs.py "$work/bundle/rootfs" "$wheel"
umoci repack --image "$image" --history.created_by "scripts/build-image.sh" "$work/bundle"
umoci config --image "$image" \
  --author "blobstore scripts/build-image.sh" \
  --history.created_by "scripts/build-image.sh (config)" \
  --config.entrypoint /opt/blobstore/bin/blobstore \
  --config.cmd daemon \
  --config.user 65532:65532 \
  --config.workingdir / \
  --config.env PATH=/opt/blobstore/bin:/usr/local/bin \
  --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --config.env BLOBSTORE_CACHE=/var/cache/blobstore \
  --config.env BLOBSTORE_LISTEN=0.0.0.0:7411 \
  --config.env BLOBSTORE_HTTP=0.0.0.0:7421 \
  --config.exposedports 7411/tcp \
  --config.exposedports 7421/tcp \
  --config.volume /var/cache/blobstore \
  --config.label org.opencontainers.image.title=blobstore \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
umoci gc --layout "$work/layout"
mkdir -p "$(dirname "$out")"
tar -C "$work/layout" -cf "$out.tmp" . && mv "$out.tmp" "$out"
echo "$out: OCI archive, image blobstore:$tag ($(du -h "$out" | cut -f1))"
