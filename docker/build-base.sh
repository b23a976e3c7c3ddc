#!/usr/bin/env bash
# Build the node base image: Debian bookworm with openssh-server, python3 and python3-venv.
#
# Two paths, one result (the tag $BASE_TAG):
#   1. a registry answers: build docker/base.Dockerfile FROM debian:bookworm-slim;
#   2. no registry (this machine's engine can pull nothing): debootstrap a minimal bookworm
#      root filesystem from Debian's archive and `docker import` it.
# Skipped when the tag exists already (delete it with `make docker-down` to rebuild).
set -euo pipefail
cd "$(dirname "$0")"

BASE_TAG=${BASE_TAG:-sshjobs/base:bookworm}
REGISTRY_IMAGE=${REGISTRY_IMAGE:-debian:bookworm-slim}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=openssh-server,python3,python3-venv,ca-certificates
LABEL=com.docker.compose.project=sshjobs

if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  echo "base image $BASE_TAG exists: skipped"
  exit 0
fi

t0=$(date +%s)
if timeout 60 docker pull -q "$REGISTRY_IMAGE" >/dev/null 2>&1; then
  echo "base image: building $BASE_TAG from the registry image $REGISTRY_IMAGE"
  docker build -q -t "$BASE_TAG" --label "$LABEL" --build-arg "FROM=$REGISTRY_IMAGE" -f base.Dockerfile . >/dev/null
else
  echo "base image: no registry answers for $REGISTRY_IMAGE; building $BASE_TAG with debootstrap from $MIRROR"
  if ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    else
      echo "debootstrap is missing: sudo apt-get install debootstrap" >&2; exit 1
    fi
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "debootstrap needs root" >&2; exit 1
  fi
  root=$(mktemp -d /tmp/sshjobs-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || {
    tail -30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
  rm -f "$root.log"
  # Host keys are made per container at start: none may be baked into the image.
  rm -f "$root"/etc/ssh/ssh_host_*
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*.log
  tar -C "$root" --numeric-owner -c . | docker import --change "LABEL $LABEL" --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
fi
echo "base image $BASE_TAG built in $(( $(date +%s) - t0 ))s ($(docker image inspect -f '{{.Size}}' "$BASE_TAG" | awk '{printf "%d MB", $1/1e6}'))"
