#!/usr/bin/env bash
# End-to-end check on a real cluster prepared as docs/cluster.md steps 1-5 describe (Knative Serving + Kourier,
# KEDA, the autoscaler-keda extension, RWX model storage, images pushed, the two Secrets). It applies the platform,
# creates a tenant, deploys the example MLP, invokes it, waits for it to scale to zero, and checks that the next
# request wakes it.
#
# NOT RUN by the project's CI and never run by its authors: the development machines have no Kubernetes, no
# Knative/KEDA and no container engine (see docs/cluster.md, "What was verified"). Run it by hand:
#   MODELS_NFS=nfs.example:/exports/paddlefn manifests/e2e.sh     # the export behind paddlefn-data (step 3)
#   MODELS_HOSTPATH=/srv/paddlefn DEVICE=cpu manifests/e2e.sh      # one-node kind/k3s without GPUs
# The tenant's `models` volume is bound to <export>/tenants/<tenant>, as docs/cluster.md step 3 describes.
set -euo pipefail
cd "$(dirname "$0")/.."

NS=paddlefn-system
TENANT=${TENANT:-e2e$(date +%s | tail -c 6)}
FN=classify
DEVICE=${DEVICE:-auto}
IDLE=${IDLE:-45s}
PORT=${PORT:-18080}
PADDLEFN=${PADDLEFN:-.venv/bin/paddlefn}
WORK=$(mktemp -d)
FORWARD_PID=""

cleanup() {
    [ -n "$FORWARD_PID" ] && kill "$FORWARD_PID" 2>/dev/null || true
    "$PADDLEFN" tenants delete "$TENANT" >/dev/null 2>&1 || true
    kubectl delete namespace "t-$TENANT" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    kubectl delete pv "paddlefn-models-$TENANT" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
pods() { kubectl get pods -n "t-$TENANT" -l "paddlefn.dev/function=$FN,paddlefn.dev/variant=primary" \
    --field-selector=status.phase=Running -o name 2>/dev/null | wc -l; }

step "platform"
kubectl get secret -n "$NS" paddlefn-postgres paddlefn-admin >/dev/null
kubectl apply -k manifests/platform
kubectl rollout status -n "$NS" deploy/paddlefn deploy/paddlefn-scaler deploy/paddlefn-prometheus --timeout=5m

kubectl port-forward -n "$NS" svc/paddlefn "$PORT:80" >"$WORK/port-forward.log" 2>&1 &
FORWARD_PID=$!
export PADDLEFN_URL="http://127.0.0.1:$PORT"
export PADDLEFN_KEY
PADDLEFN_KEY=$(kubectl get secret -n "$NS" paddlefn-admin -o jsonpath='{.data.key}' | base64 -d)
for _ in $(seq 50); do curl -fsS "$PADDLEFN_URL/v2/health/ready" >/dev/null 2>&1 && break; sleep 0.2; done

step "tenant $TENANT: its model volume, then the tenant"
if [ -n "${MODELS_NFS:-}" ]; then
    source="nfs: {server: ${MODELS_NFS%%:*}, path: ${MODELS_NFS#*:}/tenants/$TENANT}"
elif [ -n "${MODELS_HOSTPATH:-}" ]; then
    source="hostPath: {path: $MODELS_HOSTPATH/tenants/$TENANT, type: DirectoryOrCreate}"
else
    echo "set MODELS_NFS or MODELS_HOSTPATH: the storage behind paddlefn-data (docs/cluster.md step 3)" >&2
    exit 2
fi
kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: paddlefn-models-$TENANT, labels: {paddlefn.dev/tenant: $TENANT}}
spec:
  capacity: {storage: 50Gi}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  claimRef: {namespace: t-$TENANT, name: models}
  $source
YAML
"$PADDLEFN" tenants create "$TENANT" >/dev/null

step "function $FN (device $DEVICE, idle timeout $IDLE)"
"$PADDLEFN" example-model mlp -o "$WORK/mlp"
"$PADDLEFN" deploy "$WORK/mlp" --tenant "$TENANT" --name "$FN" --idle-timeout "$IDLE" --device "$DEVICE"
kubectl get ksvc,scaledobject -n "t-$TENANT" 2>/dev/null || kubectl get deploy,svc,scaledobject -n "t-$TENANT"
kubectl wait -n "t-$TENANT" --for=condition=Ready "ksvc/$FN" --timeout=10m 2>/dev/null \
    || kubectl rollout status -n "t-$TENANT" "deploy/$FN" --timeout=10m

step "a request is answered"
"$PADDLEFN" invoke "$TENANT/$FN" --example "$WORK/mlp" >"$WORK/first.json"
grep -q '"outputs"' "$WORK/first.json"

step "idle: scales to zero (idle timeout + activity window + KEDA's polling)"
deadline=$((SECONDS + 600))
until [ "$(pods)" -eq 0 ]; do
    [ $SECONDS -lt $deadline ] || { echo "still running after 10 minutes" >&2; exit 1; }
    sleep 5
done
echo "asleep after $((SECONDS)) s of this script"

step "the next request wakes it"
started=$SECONDS
"$PADDLEFN" invoke "$TENANT/$FN" --example "$WORK/mlp" >"$WORK/second.json"
grep -q '"outputs"' "$WORK/second.json"
echo "cold request answered in $((SECONDS - started)) s; running replicas: $(pods)"
kubectl logs -n "$NS" deploy/paddlefn-scaler --tail=20

step "ok"
