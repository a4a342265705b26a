#!/bin/bash
# Builds kube-apiserver from Debian's `kubernetes` source tree, the way that release's own
# build scripts do (GOPATH mode, the vendor tree), with the two fixes it needs on a current Go:
# the OpenAPI definitions the tarball lacks are generated with the vendored openapi-gen, and the
# vendored modern-go/reflect2 1.0.1 (broken on Go 1.18 and later) is replaced by Debian's 1.0.2.
# Usage: kube-apiserver-build.sh SOURCE_DIR OUTPUT_BINARY GO_ROOT REFLECT2_DIR
set -euo pipefail
src=$1 out=$2 goroot=$3 reflect2=$4
cd "$src"
export GOROOT=$goroot PATH=$goroot/bin:$PATH GO111MODULE=off CGO_ENABLED=0
export GOPATH=$src/.go GOCACHE=$src/.gocache GOFLAGS=
mkdir -p .go/src/k8s.io .go/bin
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
cd .go/src/k8s.io/kubernetes

rm -rf vendor/github.com/modern-go/reflect2
cp -r "$reflect2" vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod

openapi=pkg/generated/openapi/zz_generated.openapi.go
if [ ! -f "$openapi" ]; then
  echo "building openapi-gen" >&2
  go build -o .go/bin/openapi-gen ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  dirs=$(find -H . \( -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) \) \
           -type f -name '*.go' -print \
         | sed 's|^./staging/src|vendor|; s|^./||' \
         | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
         | sed 's|^vendor/|staging/src/|' \
         | xargs grep --color=never -l '^// *+k8s:openapi-gen=' \
         | sed 's|^staging/src/|vendor/|' \
         | xargs -n1 dirname | LC_ALL=C sort -u \
         | sed 's|^|k8s.io/kubernetes/|' | paste -sd,)
  echo "generating $openapi" >&2
  .go/bin/openapi-gen --logtostderr -i "$dirs" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    -r "$src/.go/openapi_violations.report"
fi
echo "building kube-apiserver" >&2
go build -o "$out.tmp" \
  -ldflags "-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=v1.20.2 -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMajor=1 -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMinor=20" \
  ./cmd/kube-apiserver
mv "$out.tmp" "$out"
