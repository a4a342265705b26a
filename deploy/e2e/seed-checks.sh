#!/usr/bin/env bash
# The seed scenarios, end to end on a cluster with deploy/ and deploy/examples applied:
# each request is made from inside a pod, through its node's tunnel, and must be
# answered or refused as the policies say.
set -euo pipefail

failures=0

# request FROM_NAMESPACE FROM_APP URL: exit status of an HTTP GET made inside the pod.
request() {
  kubectl -n "$1" exec "deploy/$2" -- curl -sS -o /dev/null --max-time 5 -w '%{http_code}' "$3"
}

expect_ok() {
  local what=$1; shift
  if code=$(request "$@") && [ "$code" = 200 ]; then
    echo "PASS allowed: $what"
  else
    echo "FAIL expected allowed: $what (got ${code:-no answer})"
    failures=$((failures + 1))
  fi
}

expect_refused() {
  local what=$1; shift
  if code=$(request "$@" 2>/dev/null) && [ "$code" = 200 ]; then
    echo "FAIL expected refused: $what (got $code)"
    failures=$((failures + 1))
  else
    echo "PASS refused: $what"
  fi
}

payments=http://payments.finance.svc.cluster.local
expect_ok      "orders -> payments:9090 (ALLOW orders-to-payments, HBONE)"            shop orders "$payments:9090/hostname"
expect_refused "orders -> payments:8080 (allow-list: no rule for port 8080)"           shop orders "$payments:8080/hostname"
expect_refused "inventory -> payments:9090 (DENY deny-inventory)"                      warehouse inventory "$payments:9090/hostname"
expect_refused "plaintext outsider -> payments:9090 (selector STRICT on app=payments)" plain outsider "$payments:9090/hostname"
expect_ok      "plaintext outsider -> ledger:8080 (namespace finance PERMISSIVE)"     plain outsider "http://ledger.finance.svc.cluster.local:8080/hostname"
expect_refused "plaintext outsider -> orders:8080 (namespace shop STRICT)"             plain outsider "http://orders.shop.svc.cluster.local:8080/hostname"
expect_ok      "inventory -> orders:8080 (meshed, STRICT satisfied by HBONE)"          warehouse inventory "http://orders.shop.svc.cluster.local:8080/hostname"

# Every node's tunnel obtained certificates from the cluster CA.
issued=$(kubectl -n ztunnel-system logs -l app.kubernetes.io/name=ztunnel-ca --tail=-1 | grep -c 'certificate issued' || true)
if [ "$issued" -gt 0 ]; then
  echo "PASS the CA issued $issued certificate(s)"
else
  echo "FAIL the CA issued no certificate"
  failures=$((failures + 1))
fi

if [ "$failures" -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all seed checks passed"
