#!/usr/bin/env bash
# Builds helm from its Go module, for the chart tests (tests/tests/helm_chart.rs, issue #29).
#
#   tests/helm/build.sh            # output: target/helm/<version>/helm (or $MESHCA_HELM_CACHE/...)
#
# Reused across runs: a second run finds the binary and builds nothing. Nothing built here is
# committed; the Go module cache keeps the sources.
set -euo pipefail

version="v4.3.2"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${MESHCA_HELM_CACHE:-$root/target/helm}"
out="$cache/$version"
if [ -x "$out/helm" ]; then
  echo "helm/build.sh: $out/helm is up to date"
  exit 0
fi
command -v go >/dev/null || { echo "helm/build.sh: go is not installed" >&2; exit 3; }
mkdir -p "$cache"
exec 9>"$cache/.$version.lock"
flock 9
if [ -x "$out/helm" ]; then exit 0; fi

export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
mkdir -p "$out.tmp"
printf 'module meshca.test/helm\n\ngo 1.26\n\nrequire helm.sh/helm/v4 %s\n' "$version" >"$work/go.mod"
(cd "$work" && go build -trimpath \
    -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
    -o "$out.tmp/helm" helm.sh/helm/v4/cmd/helm)
rm -rf "$out"
mv "$out.tmp" "$out"
echo "helm/build.sh: built helm $version in $(( $(date +%s) - start )) s"
