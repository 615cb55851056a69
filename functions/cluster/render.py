"""Kubernetes objects of tenants and functions, rendered as plain dicts (pure: no client, no I/O).

Pure so that every object can be validated against the real schemas in tests and shown by ``kubectl diff``;
``functions.backends.knative`` applies them. Per tenant (namespace ``{prefix}{tenant}``):
Namespace, ResourceQuota (GPUs included), LimitRange, NetworkPolicies (ingress only from the platform and Knative;
no traffic at all for preparation pods), ServiceAccount (no token), model PVC.
Per function, either (mode ``knative``) a Knative Service on the shared GPU image plus a Lite CPU Service,
both with the HPA class and the autoscaler-keda extension's ScaledObject override pointing at our external
scaler; or (mode ``deployment``) a Deployment + Service + KEDA ScaledObject per variant, without Knative.
Per deploy: the preparation Job (``prepare_job``), which optimises and golden-checks the tenant's model where the
tenant's code runs (its namespace, ServiceAccount and NetworkPolicies), never in the control plane's pod.

Variants: the *primary* service (named as the function) runs Paddle Inference on the shared image, on a GPU or
on CPU, or Paddle Lite when the function's device is ``lite``; the *fallback* service (``{fn}-lite``, at most one
replica) runs Paddle Lite beside it when the function asks for a fallback and its deploy produced a ``.nb``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from functions.cluster.config import ClusterConfig, TenantQuota

Obj = dict[str, Any]

MANAGED = {"app.kubernetes.io/managed-by": "paddlefn"}
TENANT_LABEL, FUNCTION_LABEL, VARIANT_LABEL, ROLE_LABEL = (
    "paddlefn.dev/tenant",
    "paddlefn.dev/function",
    "paddlefn.dev/variant",
    "paddlefn.dev/role",
)
PREPARE = "prepare"  # ROLE_LABEL of preparation Jobs and their pods (the NetworkPolicy paddlefn-prepare)
# Set by the Job controller on the pods of a Job (Kubernetes 1.27+): how the backend finds them.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
SERVICE_ACCOUNT, MODELS_CLAIM = "paddlefn-function", "models"
PORT = 8080
MODELS_MOUNT = "/models"
PRIMARY, FALLBACK = "primary", "fallback"
# Knative refuses timeoutSeconds above its max-revision-timeout-seconds (600 unless the operator raises it).
KNATIVE_MAX_TIMEOUT_S = 600


@dataclass(frozen=True)
class FunctionSpec:
    """What the renderers need of one function (built from a FunctionRecord by the backend)."""

    tenant: str
    name: str
    version: str
    min_scale: int = 0
    max_scale: int = 4
    target: int = 2  # concurrent requests per replica that the HPA aims for
    container_concurrency: int = 4  # hard per-replica limit (Knative's queue-proxy enforces it)
    idle_timeout_s: float = 900.0
    request_timeout_s: float = 60.0
    cold_start_timeout_s: float = 60.0
    max_batch_size: int = 0  # dynamic batching in the worker (0: off)
    max_queue_delay_ms: float = 2.0
    lite: bool = False  # a Lite fallback service beside the primary (fallback asked for, and a .nb exists)
    gpu: bool = True  # the primary holds a GPU; False (device "cpu", or a plan without GPUs) runs it on CPU
    lite_only: bool = (
        False  # device "lite": the primary itself runs Paddle Lite (CPU), and there is no fallback
    )


def namespace_of(tenant: str, config: ClusterConfig) -> str:
    return dns_label(config.namespace_prefix + tenant)


def dns_label(name: str) -> str:
    """NAME when it fits a DNS label (63), else a prefix and a short hash: still unique, still valid."""
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def _meta(name: str, namespace: str | None, tenant: str, extra: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "labels": {**MANAGED, TENANT_LABEL: tenant, **(extra or {})}}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


# --- tenant ---------------------------------------------------------------------------------------------------


def tenant_objects(tenant: str, config: ClusterConfig, quota: TenantQuota | None = None) -> list[Obj]:
    """Everything a tenant's namespace holds before its first function, in the order to apply them."""
    q = quota or config.quota
    ns = namespace_of(tenant, config)
    namespace: Obj = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": _meta(ns, None, tenant),
    }
    # Baseline enforced (GPU device plugins and Knative's queue-proxy pass it); restricted only warned about.
    namespace["metadata"]["labels"].update(
        {"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/warn": "restricted"}
    )
    hard = {
        "requests.cpu": q.cpu,
        "requests.memory": q.memory,
        "limits.memory": q.memory,
        "requests.nvidia.com/gpu": str(q.gpus),
        "pods": str(q.pods),
        "persistentvolumeclaims": "2",
        "requests.storage": q.storage,
    }
    quota_obj = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _meta("paddlefn-quota", ns, tenant),
                 "spec": {"hard": hard}}  # fmt: skip
    # Defaults for containers that state nothing (a quota on requests rejects pods without them).
    limit_range = {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": _meta("paddlefn-defaults", ns, tenant),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                    "default": {"memory": "512Mi"},
                    "max": {"memory": q.memory},
                }
            ]
        },
    }
    allowed = [config.system_namespace, *config.ingress_namespaces]
    network_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("paddlefn-isolation", ns, tenant),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            # Nothing from other tenants' namespaces: only this namespace, the gateway's and Knative's.
            "ingress": [
                {
                    "from": [{"podSelector": {}}]
                    + [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}
                        for name in allowed
                    ]
                }
            ],
        },
    }
    # Preparation runs the tenant's program, which may name files and do I/O: it gets no network at all (it
    # needs none: the volume is mounted by the kubelet). NetworkPolicies add up, so this only takes away.
    prepare_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("paddlefn-prepare", ns, tenant),
        "spec": {"podSelector": {"matchLabels": {ROLE_LABEL: PREPARE}}, "policyTypes": ["Ingress", "Egress"]},
    }
    service_account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(SERVICE_ACCOUNT, ns, tenant),
        "automountServiceAccountToken": False,  # a model server has no business with the API server
    }
    claim_spec: Obj = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": q.storage}}}
    if config.storage_class:
        claim_spec["storageClassName"] = config.storage_class
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(MODELS_CLAIM, ns, tenant),
             "spec": claim_spec}  # fmt: skip
    return [namespace, quota_obj, limit_range, network_policy, prepare_policy, service_account, claim]


# --- function -------------------------------------------------------------------------------------------------


def function_objects(fn: FunctionSpec, config: ClusterConfig) -> list[Obj]:
    """The function's objects in the configured mode: GPU first, then the Lite fallback when there is one."""
    fallback = fn.lite and not fn.lite_only and config.lite_fallback
    variants = [PRIMARY, FALLBACK] if fallback else [PRIMARY]
    objects: list[Obj] = []
    for variant in variants:
        if config.mode == "knative":
            objects.append(knative_service(fn, config, variant))
        else:
            objects.extend(deployment_objects(fn, config, variant))
    return objects


def service_name(fn: FunctionSpec, variant: str) -> str:
    # Knative appends "-00001-deployment" to revision names: keep the service name well under 63.
    base = fn.name if variant == PRIMARY else f"{fn.name}-lite"
    if len(base) <= 46:
        return base
    return f"{base[:37].rstrip('-')}-{hashlib.sha256(base.encode()).hexdigest()[:8]}"


def _labels(fn: FunctionSpec, variant: str) -> dict[str, str]:
    return {**MANAGED, TENANT_LABEL: fn.tenant, FUNCTION_LABEL: fn.name, VARIANT_LABEL: variant}


def version_folder(name: str, version: str) -> str:
    """A function version's folder on the tenant's volume, which is the control plane's
    data_dir/tenants/{tenant} (shared RWX storage, docs/cluster.md): model/ as uploaded, serving/ prepared."""
    return f"functions/{name}/{version}"


def _container(fn: FunctionSpec, config: ClusterConfig, variant: str) -> Obj:
    paddle = variant == PRIMARY and not fn.lite_only  # Paddle Inference; else Paddle Lite
    gpu = paddle and fn.gpu
    model_dir = f"{MODELS_MOUNT}/{version_folder(fn.name, fn.version)}/serving"
    args = ["--port", str(PORT), "--model-dir", model_dir, "--model-name", fn.name,
            "--device", "gpu" if gpu else "cpu", "--engine", "paddle" if paddle else "lite"]  # fmt: skip
    if fn.max_batch_size:
        args += [
            "--max-batch-size",
            str(fn.max_batch_size),
            "--max-queue-delay-ms",
            f"{fn.max_queue_delay_ms:g}",
        ]
    cpu, memory = (config.gpu_cpu, config.gpu_memory) if paddle else (config.lite_cpu, config.lite_memory)
    requests: Obj = {"cpu": cpu, "memory": memory}
    limits: Obj = {"memory": memory}
    if gpu:  # extended resources: request = limit, and only whole devices
        requests["nvidia.com/gpu"] = "1"
        limits["nvidia.com/gpu"] = "1"
    return {
        "name": "runtime",
        "image": config.gpu_image if paddle else config.lite_image,
        "args": args,
        "ports": [{"name": "http1", "containerPort": PORT}],
        "env": [
            {"name": "PADDLEFN_TENANT", "value": fn.tenant},
            {"name": "PADDLEFN_FUNCTION", "value": fn.name},
            {"name": "GLOG_minloglevel", "value": "2"},
        ],
        "resources": {"requests": requests, "limits": limits},
        # The OIP ready endpoint turns true once the model is loaded and has run once (cold start included).
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready"},
            "periodSeconds": 1,
            "failureThreshold": max(3, int(fn.cold_start_timeout_s)),
        },
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _volumes() -> list[Obj]:
    return [{"name": "models", "persistentVolumeClaim": {"claimName": MODELS_CLAIM, "readOnly": True}}]


def _trigger(fn: FunctionSpec, config: ClusterConfig) -> Obj:
    # external-push: KEDA keeps a StreamIsActive stream open, so a wake signal scales 0 -> 1 at once
    # ("external" works too, but then a wake-up waits for KEDA's next poll of IsActive).
    return {
        "type": config.trigger_type,
        "metadata": {
            "scalerAddress": config.scaler_address,
            "tenant": fn.tenant,
            "function": fn.name,
            "target": str(fn.target),
            "minScale": str(fn.min_scale),
            "maxScale": str(fn.max_scale),
        },
    }


def scaled_object_spec(fn: FunctionSpec, config: ClusterConfig, variant: str, target_name: str) -> Obj:
    max_scale = fn.max_scale if variant == PRIMARY else 1  # the fallback is a stand-in, not a second fleet
    return {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target_name},
        "minReplicaCount": fn.min_scale,
        "maxReplicaCount": max_scale,
        "pollingInterval": config.polling_interval_s,
        # KEDA waits this long after the scaler last said "active" before scaling to 0: the idle timeout.
        "cooldownPeriod": max(1, round(fn.idle_timeout_s)),
        "triggers": [_trigger(fn, config)],
    }


def knative_service(fn: FunctionSpec, config: ClusterConfig, variant: str) -> Obj:
    name = service_name(fn, variant)
    ns = namespace_of(fn.tenant, config)
    labels = _labels(fn, variant)
    # autoscaler-keda turns this override into the revision's ScaledObject (it fills name and scaleTargetRef).
    override = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "spec": {
            k: v for k, v in scaled_object_spec(fn, config, variant, "").items() if k != "scaleTargetRef"
        },
    }
    annotations = {
        "autoscaling.knative.dev/class": "hpa.autoscaling.knative.dev",
        "autoscaling.knative.dev/min-scale": str(fn.min_scale),
        "autoscaling.knative.dev/max-scale": str(fn.max_scale if variant == PRIMARY else 1),
        "autoscaling.knative.dev/scaled-object-override": json.dumps(override, separators=(",", ":")),
        "paddlefn.dev/version": fn.version,
    }
    spec = {
        "containerConcurrency": fn.container_concurrency,
        "timeoutSeconds": min(KNATIVE_MAX_TIMEOUT_S, max(1, round(fn.request_timeout_s))),
        "serviceAccountName": SERVICE_ACCOUNT,
        "containers": [_container(fn, config, variant)],
        "volumes": _volumes(),
    }
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ns,
            # Reached only through the gateway, never from outside the cluster.
            "labels": {**labels, "networking.knative.dev/visibility": "cluster-local"},
        },
        "spec": {"template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}},
    }


def deployment_objects(fn: FunctionSpec, config: ClusterConfig, variant: str) -> list[Obj]:
    """Without Knative: Deployment (KEDA owns its replicas), ClusterIP Service, ScaledObject."""
    name = service_name(fn, variant)
    ns = namespace_of(fn.tenant, config)
    labels = _labels(fn, variant)
    selector = {TENANT_LABEL: fn.tenant, FUNCTION_LABEL: fn.name, VARIANT_LABEL: variant}
    container = _container(fn, config, variant)
    container["readinessProbe"]["httpGet"]["port"] = "http1"
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": {"paddlefn.dev/version": fn.version},
        },
        "spec": {
            # No "replicas": KEDA owns it, and server-side apply would take it back on every update.
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": min(
                        KNATIVE_MAX_TIMEOUT_S, round(fn.request_timeout_s) + 5
                    ),
                    "containers": [container],
                    "volumes": _volumes(),
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": "http1"}]},
    }
    scaled_object = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": scaled_object_spec(fn, config, variant, name),
    }
    return [deployment, service, scaled_object]


# --- deploy preparation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSpec:
    """What one deploy's preparation Job needs (built from a FunctionRecord by the backend)."""

    tenant: str
    name: str
    version: str
    device: str = "auto"  # runtime.prepare --device: auto, cpu or gpu (only gpu holds a GPU)
    batching: bool = False  # runtime.prepare --batching: check that the model batches
    deadline_s: float = 600.0  # the platform's deploy timeout: the Job's activeDeadlineSeconds


def prepare_job_name(p: PrepareSpec) -> str:
    return dns_label(f"prepare-{p.name}-{p.version}")  # a Job's name becomes a label value: at most 63


def prepare_paths(p: PrepareSpec) -> tuple[str, str]:
    """The model folder (read-only) and the out folder (the only writable one) as the Job's container sees
    them: where a function's own container would see them."""
    folder = f"{MODELS_MOUNT}/{version_folder(p.name, p.version)}"
    return f"{folder}/model", f"{folder}/serving"


def _threads(cpu: str) -> int:
    """Whole cores in a CPU quantity ("2", "1.5", "500m"), at least 1: Paddle's thread count."""
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return max(1, math.ceil(cores))


def prepare_job(p: PrepareSpec, config: ClusterConfig) -> Obj:
    """The batch/v1 Job that runs ``python -m runtime.prepare`` on the tenant's model, as the tenant: in its
    namespace, with its ServiceAccount (no token), under its NetworkPolicies (no traffic at all) and quota.

    Run once (``backoffLimit: 0``), cut off at the deploy timeout (``activeDeadlineSeconds``), removed by
    Kubernetes if the platform cannot delete it (``ttlSecondsAfterFinished``). Only this version's model
    folder is mounted (read-only) and its serving folder (writable); the root filesystem is read-only and
    /tmp an emptyDir. On a failure the last lines of its output (the ``{"error": ...}`` line) become the
    pod's termination message (``FallbackToLogsOnError``), which the backend turns into the deploy's reason.
    No platform secret reaches it: its only variables are below.
    """
    ns = namespace_of(p.tenant, config)
    labels = {**MANAGED, TENANT_LABEL: p.tenant, FUNCTION_LABEL: p.name, ROLE_LABEL: PREPARE}
    model_dir, out_dir = prepare_paths(p)
    folder = version_folder(p.name, p.version)
    args = ["-m", "runtime.prepare", model_dir, out_dir, "--device", p.device]
    if p.batching:
        args.append("--batching")
    quantities: Obj = {"cpu": config.prepare_cpu, "memory": config.prepare_memory}
    if p.device == "gpu":  # a GPU golden check needs the device; "auto" and "cpu" prepare on the CPU
        quantities["nvidia.com/gpu"] = "1"
    container = {
        "name": PREPARE,
        "image": config.prepare_image or config.gpu_image,
        "command": ["python"],
        "args": args,
        "env": [
            {"name": "PADDLEFN_TENANT", "value": p.tenant},
            {"name": "PADDLEFN_FUNCTION", "value": p.name},
            {"name": "GLOG_minloglevel", "value": "2"},
            {"name": "OMP_NUM_THREADS", "value": str(_threads(config.prepare_cpu))},
        ],
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "models", "mountPath": model_dir, "subPath": f"{folder}/model", "readOnly": True},
            {"name": "models", "mountPath": out_dir, "subPath": f"{folder}/serving"},
            {"name": "scratch", "mountPath": "/tmp"},  # HOME=/tmp in the image: Paddle's caches, temp files
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": prepare_job_name(p),
            "namespace": ns,
            "labels": labels,
            "annotations": {"paddlefn.dev/version": p.version},
        },
        "spec": {
            "activeDeadlineSeconds": max(1, math.ceil(p.deadline_s)),
            "backoffLimit": 0,  # a failed golden check fails again: the reason goes to the tenant at once
            "ttlSecondsAfterFinished": config.prepare_ttl_s,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,  # no variables naming the namespace's services either
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [
                        {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_CLAIM}},
                        {"name": "scratch", "emptyDir": {"sizeLimit": config.prepare_scratch}},
                    ],
                },
            },
        },
    }


def function_url(fn: FunctionSpec, config: ClusterConfig, variant: str = PRIMARY) -> str:
    """Where the gateway reaches a replica from inside the cluster (Knative's or our Service's DNS name)."""
    ns = namespace_of(fn.tenant, config)
    return config.function_url.format(service=service_name(fn, variant), namespace=ns).rstrip("/")
