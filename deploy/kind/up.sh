#!/usr/bin/env bash
# A kind cluster with SPIRE, meshcap and the sample (myapi under STRICT mTLS,
# a meshed client calling it), then proof that it works: the client's request
# reaches myapi through meshcap, a plaintext client is refused, and the agent
# on myapi's node shows the pod captured with its SPIFFE ID and mTLS counted.
#
#   deploy/kind/up.sh                 # WITH_ISTIOD=1 also installs istiod
#   deploy/kind/down.sh               # removes it all
#
# Needs docker, kind, kubectl, helm and jq, and a bpf filesystem at
# /sys/fs/bpf on this host. Idempotent: a second run reuses the cluster.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=${MESHCAP_KIND_CLUSTER:-meshcap}
IMAGE=meshcap:dev
ISTIO_VERSION=${ISTIO_VERSION:-1.30.3}
WITH_ISTIOD=${WITH_ISTIOD:-0}
TRUST_DOMAIN=democluster.internal
SAMPLE_NS=meshcap-sample

say() { printf '\n== %s\n' "$*"; }
fail() {
  printf 'up.sh: %s\n' "$*" >&2
  exit 1
}

missing=()
for tool in docker kind kubectl helm jq; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  fail "missing tools: ${missing[*]} (install them and run again)"
fi
docker info >/dev/null 2>&1 || fail "docker is installed but its daemon does not answer (is it running, may this user use it?)"
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" != bpf_fs ]; then
  fail "no bpf filesystem at /sys/fs/bpf on this host; mount one: sudo mount -t bpf bpf /sys/fs/bpf"
fi

say "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing the existing cluster"
else
  kind create cluster --name "$CLUSTER" --config "$ROOT/deploy/kind/cluster.yaml" --wait 120s
fi
CTX="kind-$CLUSTER"
k() { kubectl --context "$CTX" "$@"; }

say "image $IMAGE"
docker build -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "SPIRE (server, controller manager, agents, CSI driver)"
k apply -f "$ROOT/deploy/spire/namespace.yaml"
k apply --server-side -f "$ROOT/deploy/spire/crds/"
k wait --for condition=established --timeout=60s \
  crd/clusterspiffeids.spire.spiffe.io crd/clusterfederatedtrustdomains.spire.spiffe.io \
  crd/clusterstaticentries.spire.spiffe.io
k apply -f "$ROOT/deploy/spire/server.yaml" -f "$ROOT/deploy/spire/agent.yaml" -f "$ROOT/deploy/spire/csi-driver.yaml"
k -n spire-system rollout status statefulset/spire-server --timeout=300s
k -n spire-system rollout status daemonset/spire-agent --timeout=300s
k -n spire-system rollout status daemonset/spiffe-csi-driver --timeout=300s
# The controller manager's admission webhook checks ClusterSPIFFEIDs; it
# answers a little after its pod is ready.
for i in $(seq 1 30); do
  if k apply -f "$ROOT/deploy/spire/clusterspiffeids.yaml"; then
    break
  fi
  [ "$i" -lt 30 ] || fail "the ClusterSPIFFEIDs were not accepted (kubectl -n spire-system logs statefulset/spire-server -c spire-controller-manager)"
  sleep 4
done

if [ "$WITH_ISTIOD" = 1 ]; then
  say "istiod $ISTIO_VERSION (values: deploy/istio/istiod-values.yaml)"
  helm repo add istio https://istio-release.storage.googleapis.com/charts --force-update >/dev/null
  helm --kube-context "$CTX" upgrade --install istio-base istio/base --version "$ISTIO_VERSION" \
    -n istio-system --create-namespace --wait
  helm --kube-context "$CTX" upgrade --install istiod istio/istiod --version "$ISTIO_VERSION" \
    -n istio-system -f "$ROOT/deploy/istio/istiod-values.yaml" --wait --timeout 5m
else
  say "PeerAuthentication CRD (no istiod)"
  k apply --server-side -f "$ROOT/deploy/istio/peerauthentication-crd.yaml"
fi
k wait --for condition=established --timeout=60s crd/peerauthentications.security.istio.io

say "meshcap"
helm --kube-context "$CTX" upgrade --install meshcap "$ROOT/deploy/charts/meshcap" \
  -n meshcap-system --create-namespace -f "$ROOT/deploy/kind/meshcap-values.yaml"
k -n meshcap-system rollout status daemonset/meshcap-agent --timeout=300s

say "sample: myapi (STRICT) and its client"
k apply -f "$ROOT/deploy/sample/namespace.yaml"
k apply -f "$ROOT/deploy/sample/"
k -n "$SAMPLE_NS" rollout status deployment/myapi --timeout=300s
k -n "$SAMPLE_NS" rollout status deployment/myapi-client --timeout=300s

say "check: the meshed client reaches myapi through meshcap"
# meshcap hands inbound connections to the app from 127.0.0.6, so myapi's
# /clientip shows where the request came from: through the mesh or not.
url="http://myapi.$SAMPLE_NS.svc:8080/clientip"
answer=""
for _ in $(seq 1 30); do
  answer=$(k -n "$SAMPLE_NS" exec deploy/myapi-client -c client -- curl -sS --max-time 5 "$url" 2>&1 || true)
  case "$answer" in 127.0.0.6:*) break ;; esac
  sleep 2
done
case "$answer" in
  127.0.0.6:*) echo "myapi saw the request from $answer: captured and relayed by meshcap" ;;
  *) fail "myapi-client -> myapi: expected myapi to see 127.0.0.6, got: $answer" ;;
esac

say "check: a pod outside the mesh is refused by myapi's STRICT policy"
if out=$(k -n "$SAMPLE_NS" run plain-client --rm -i --restart=Never --quiet \
  --image=curlimages/curl:8.11.1 -- curl -sS --max-time 5 "$url" 2>&1); then
  fail "a plaintext client reached myapi under STRICT: $out"
fi
echo "refused: $out"

say "check: the agent on myapi's node"
pod_json=$(k -n "$SAMPLE_NS" get pod -l app=myapi -o json)
node=$(jq -r '.items[0].spec.nodeName' <<<"$pod_json")
uid=$(jq -r '.items[0].metadata.uid' <<<"$pod_json")
agent=$(k -n meshcap-system get pod -l app.kubernetes.io/name=meshcap-agent \
  --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
[ -n "$agent" ] || fail "no meshcap agent pod on node $node"
status=$(k -n meshcap-system exec "$agent" -c agent -- meshcap-agent status --json)
want_id="spiffe://$TRUST_DOMAIN/ns/$SAMPLE_NS/sa/myapi"
client_id="spiffe://$TRUST_DOMAIN/ns/$SAMPLE_NS/sa/myapi-client"
report=$(jq -c --arg uid "$uid" '.pods[] | select(.uid == $uid)
  | {captured, spiffe_id, mtls: .mtls, inbound_mtls: (.inbound.mtls // 0),
     refused: (.inbound.plaintext_refused // 0), peers: (.inbound.peer_ids // {})}' <<<"$status")
echo "$agent: $report"
[ -n "$report" ] || fail "agent $agent does not list myapi (uid $uid)"
jq -e '.captured == true' <<<"$report" >/dev/null || fail "myapi is not captured: $report"
jq -e --arg id "$want_id" '.spiffe_id == $id' <<<"$report" >/dev/null ||
  fail "myapi's SPIFFE ID is not $want_id: $report"
jq -e '.inbound_mtls > 0' <<<"$report" >/dev/null || fail "no inbound mTLS connection counted for myapi: $report"
jq -e --arg id "$client_id" '.peers[$id] > 0' <<<"$report" >/dev/null ||
  fail "myapi has no verified connection from $client_id: $report"
jq -e '.refused > 0' <<<"$report" >/dev/null || fail "the plaintext attempt was not counted as refused: $report"

say "OK: myapi is served over mutual TLS with SPIRE identities, and plaintext is refused"
echo "look around:  kubectl --context $CTX -n meshcap-system exec $agent -c agent -- meshcap-agent status"
echo "remove it:    $ROOT/deploy/kind/down.sh"
