"""Settings of the cluster deployment (the ``knative`` backend): one object, from ``PADDLEFN_K8S_*`` variables.

Kept apart from ``functions.settings`` so the embedded platform never carries Kubernetes knobs; the backend
builds it once at start (``ClusterConfig.from_env()``) and the renderers take it as a plain argument.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from functions.plans import Limits


@dataclass(frozen=True)
class TenantQuota:
    """What one tenant's namespace may use at most (a ResourceQuota) and its model storage."""

    gpus: int = 4
    """requests.nvidia.com/gpu: GPUs that the tenant's replicas may hold at once."""
    cpu: str = "32"
    """requests.cpu of all the tenant's pods."""
    memory: str = "128Gi"
    """requests.memory (and limits.memory) of all the tenant's pods."""
    pods: int = 64
    """Pods at once (replicas of all functions, GPU and Lite)."""
    storage: str = "50Gi"
    """Size of the tenant's model volume."""


def quota_from_limits(limits: Limits, base: TenantQuota = TenantQuota()) -> TenantQuota:
    """A tenant's namespace quota from its plan's limits (functions.plans.Limits): GPUs as many as replicas
    (none when the plan forbids GPUs), pods for each replica and its Lite stand-in, storage as the plan's."""
    gib = -(
        -limits.max_storage_bytes // 2**30
    )  # rounded up: the quota must not be below what the plan allows
    return replace(
        base,
        gpus=limits.max_replicas if limits.gpu_allowed else 0,
        pods=max(1, 2 * limits.max_replicas),
        storage=f"{max(1, gib)}Gi",
    )


@dataclass(frozen=True)
class ClusterConfig:
    mode: str = "knative"
    """"knative": each function a Knative Service (+ Lite); "deployment": Deployment + Service + ScaledObject."""
    namespace_prefix: str = "t-"
    """A tenant's namespace is this prefix + the tenant name."""
    system_namespace: str = "paddlefn-system"
    """Namespace of the control plane, gateway and scaler (allowed into tenant namespaces)."""
    ingress_namespaces: tuple[str, ...] = ("knative-serving", "kourier-system")
    """Namespaces whose pods may reach functions besides the gateway: Knative's activator and ingress."""
    gpu_image: str = "ghcr.io/paddlefn/runtime-gpu:0.1.0"
    """Shared Paddle GPU runtime image (runtime/docker/Dockerfile.gpu)."""
    lite_image: str = "ghcr.io/paddlefn/runtime-lite:0.1.0"
    """Paddle Lite CPU image for the fallback service (runtime/docker/Dockerfile.lite)."""
    lite_fallback: bool = True
    """Render a Lite CPU service beside each GPU function (when the function's model converted to .nb)."""
    scaler_address: str = "paddlefn-scaler.paddlefn-system.svc.cluster.local:8090"
    """Where KEDA reaches our external scaler (gRPC)."""
    scaler_wake_url: str = "http://paddlefn-scaler.paddlefn-system.svc.cluster.local:8091"
    """Where the gateway posts wake signals."""
    scaler_wake_token: str = ""
    """Bearer token for wake signals (the scaler's PADDLEFN_SCALER_WAKE_TOKEN); empty: none."""
    function_url: str = "http://{service}.{namespace}.svc.cluster.local"
    """How the gateway reaches a function's service ({service}, {namespace}); e.g. via Knative's local gateway."""
    storage_class: str = ""
    """StorageClass of the tenants' model volumes (ReadWriteMany: the control plane writes, replicas read)."""
    gpu_cpu: str = "2"
    """CPU request of a GPU replica."""
    gpu_memory: str = "8Gi"
    """Memory request and limit of a GPU replica."""
    lite_cpu: str = "1"
    """CPU request of a Lite replica."""
    lite_memory: str = "1Gi"
    """Memory request and limit of a Lite replica."""
    trigger_type: str = "external-push"
    """KEDA trigger: "external-push" streams wake-ups (StreamIsActive); "external" only polls IsActive."""
    polling_interval_s: int = 15
    """KEDA's pollingInterval; wake-ups do not wait for it (external-push streams them)."""
    prepare_image: str = ""
    """Image of deploy-preparation Jobs (``python -m runtime.prepare``); empty: the shared runtime image
    (gpu_image). It has no Paddle Lite converter, so models prepared on it get no .nb (docs/cluster.md)."""
    prepare_cpu: str = "2"
    """CPU request and limit of a deploy-preparation Job (optimisation and golden check of one model)."""
    prepare_memory: str = "8Gi"
    """Memory request and limit of a deploy-preparation Job: a model that needs more fails with a reason."""
    prepare_scratch: str = "4Gi"
    """Size limit of a preparation Job's /tmp (an emptyDir: the root filesystem is read-only)."""
    prepare_ttl_s: int = 600
    """ttlSecondsAfterFinished of preparation Jobs: Kubernetes removes one the platform could not delete."""
    prepare_poll_s: float = 1.0
    """How often the platform reads a preparation Job's status (and its pod's log, for the stage)."""
    prepare_grace_s: float = 30.0
    """How long past the deploy timeout the platform waits for Kubernetes to report a Job's deadline."""
    quota: TenantQuota = TenantQuota()
    """Per-tenant quota when the tenant's plan sets none."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> ClusterConfig:
        """Defaults, then PADDLEFN_K8S_<FIELD> variables (tuples comma-separated), then overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"PADDLEFN_K8S_{f.name.upper()}")
            if raw is None or f.name == "quota":
                continue
            kind = str(f.type)
            if kind.startswith("tuple"):
                values[f.name] = tuple(p.strip() for p in raw.split(",") if p.strip())
            elif kind == "int":
                values[f.name] = int(raw)
            elif kind == "float":
                values[f.name] = float(raw)
            elif kind == "bool":
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update(overrides)
        config = replace(cls(), **values)
        if config.mode not in ("knative", "deployment"):
            raise ValueError(f"PADDLEFN_K8S_MODE={config.mode!r}: use 'knative' or 'deployment'")
        if config.trigger_type not in ("external-push", "external"):
            raise ValueError(
                f"PADDLEFN_K8S_TRIGGER_TYPE={config.trigger_type!r}: use 'external-push' or 'external'"
            )
        return config
