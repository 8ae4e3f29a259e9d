#!/usr/bin/env bash
# Builds a real kube-apiserver and etcd from their Go modules, for the tests that run meshca
# against a real Kubernetes API server (tests/src/kube/, issue #24).
#
#   tests/kube/build.sh [KUBE_VERSION]      # default: the newest pinned release
#
# Output: target/kube/<version>/{kube-apiserver,etcd} (or $MESHCA_KUBE_CACHE/<version>/), reused
# across runs: a second run finds the binaries and builds nothing. Nothing built or downloaded
# here is committed; the Go module cache ($GOMODCACHE) keeps the sources.
#
# kube-apiserver is built from k8s.io/kubernetes as people consume Kubernetes as a module: a
# throwaway go.mod requires k8s.io/kubernetes at the release and pins every staging module
# (k8s.io/api, k8s.io/apiserver, ...) to the matching v0.x.y, read from the release's own go.mod.
# etcd is built from go.etcd.io/etcd/server/v3 at the version that release's hack/lib/etcd.sh
# tests with.
set -euo pipefail

version="${1:-v1.37.2}"
case "$version" in
  v1.37.2|v1.35.4) ;;
  *) echo "build.sh: $version is not a pinned release (v1.37.2, v1.35.4)" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${MESHCA_KUBE_CACHE:-$root/target/kube}"
out="$cache/$version"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  echo "build.sh: $out is up to date"
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 3; }

# One build at a time per version (test binaries run in parallel and may all ask at once).
mkdir -p "$cache"
exec 9>"$cache/.$version.lock"
flock 9
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then exit 0; fi

export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
# The releases need Go 1.26 (go.mod's `go` line); a newer one comes from the module proxy.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

kmod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
kdir="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
goline="$(sed -n 's/^go \(.*\)$/\1/p' "$kmod")"
minor="${version#v1.}"; minor="${minor%%.*}"; patch="${version##*.}"
staging="v0.$minor.$patch"
etcd_version="v$(sed -n 's/^ETCD_VERSION=\${ETCD_VERSION:-\(.*\)}$/\1/p' "$kdir/hack/lib/etcd.sh")"

mkdir -p "$work/apiserver" "$work/etcd" "$out.tmp"
{
  echo "module meshca.test/kube-apiserver"
  echo
  echo "go $goline"
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "replace ("
  sed -n 's#^\t\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*$#\t\1 => \1 '"$staging"'#p' "$kmod"
  echo ")"
} >"$work/apiserver/go.mod"
echo "build.sh: kube-apiserver $version (staging $staging, go $goline), etcd $etcd_version -> $out"
(cd "$work/apiserver" && go build -trimpath -ldflags="-s -w \
    -X k8s.io/component-base/version.gitVersion=$version \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
    -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
printf 'module meshca.test/etcd\n\ngo %s\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$goline" "$etcd_version" \
  >"$work/etcd/go.mod"
(cd "$work/etcd" && go build -trimpath -ldflags="-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3)
rm -rf "$out"
mv "$out.tmp" "$out"
echo "build.sh: built $version in $(( $(date +%s) - start )) s"
