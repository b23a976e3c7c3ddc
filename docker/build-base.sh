#!/usr/bin/env bash
# Build the node base image: Debian bookworm with openssh-server, python3 and python3-venv.
#
# Two paths, one result (the tag $BASE_TAG):
#   1. a registry answers: build docker/base.Dockerfile FROM debian:bookworm-slim;
#   2. no registry (this machine's engine can pull nothing): debootstrap a minimal bookworm
#      root filesystem from Debian's archive and `docker import` it.
# Skipped when the tag exists already (delete it with `make docker-down` to rebuild).
#
# debootstrap fetches from DEBIAN_MIRROR, else from the Debian archive this machine's apt
# uses (its sources under $APT_ETC, default /etc/apt): no mirror is written in here.
# `build-base.sh --print-mirror` prints the one it would use.
set -euo pipefail
cd "$(dirname "$0")"

BASE_TAG=${BASE_TAG:-sshjobs/base:bookworm}
REGISTRY_IMAGE=${REGISTRY_IMAGE:-debian:bookworm-slim}
PACKAGES=openssh-server,python3,python3-venv,ca-certificates
LABEL=com.docker.compose.project=sshjobs

# The first archive URI of a main suite (not -security, -updates, -backports) in apt's
# one-line sources (*.list) or deb822 stanzas (*.sources; `Enabled: no` ones skipped).
apt_mirror() {
  local etc=${APT_ETC:-/etc/apt} f
  for f in "$etc/sources.list" "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    case $f in
      *.sources) awk '
        function flush(   n, i, s, u) {
          if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) !~ /^[ \t]*(no|false)/) {
            n = split(suites, s, /[ \t]+/)
            for (i = 1; i <= n; i++) if (s[i] != "" && s[i] !~ /-/) { split(uris, u, /[ \t]+/); print u[1]; break }
          }
          types = uris = suites = enabled = ""
        }
        /^#/ { next }
        /^[ \t]*$/ { flush(); next }
        { key = tolower($1); val = $0; sub(/^[^:]*:[ \t]*/, "", val) }
        key == "types:" { types = val } key == "uris:" { uris = val }
        key == "suites:" { suites = val } key == "enabled:" { enabled = val }
        END { flush() }' "$f" ;;
      *) awk '$1 == "deb" {
          i = 2
          if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
          if ($(i + 1) !~ /-/) print $i
        }' "$f" ;;
    esac
  done | grep -E -m1 '^((https?|ftp)://|file:)' || true
}

if [ "${1:-}" = --print-mirror ]; then
  mirror=${DEBIAN_MIRROR:-$(apt_mirror)}
  [ -n "$mirror" ] && echo "$mirror"
  exit $(( ${#mirror} == 0 ))
fi

if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  echo "base image $BASE_TAG exists: skipped"
  exit 0
fi

t0=$(date +%s)
if timeout 60 docker pull -q "$REGISTRY_IMAGE" >/dev/null 2>&1; then
  echo "base image: building $BASE_TAG from the registry image $REGISTRY_IMAGE"
  docker build -q -t "$BASE_TAG" --label "$LABEL" --build-arg "FROM=$REGISTRY_IMAGE" -f base.Dockerfile . >/dev/null
else
  MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
  if [ -z "$MIRROR" ]; then
    echo "no Debian archive in ${APT_ETC:-/etc/apt}/sources.list{,.d}: set DEBIAN_MIRROR to one" >&2; exit 1
  fi
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
