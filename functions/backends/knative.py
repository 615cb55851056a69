"""The cluster backend: functions run as Knative Services (or Deployments + KEDA ScaledObjects) on Kubernetes.

The only module that imports the ``kubernetes`` client. Objects come from ``functions.cluster.render`` (pure
dicts) and are applied with server-side apply (one PATCH per object, create or update, field manager
``paddlefn``), so re-applying is always safe and fields other controllers own (KEDA's replicas) are left alone.

Deploy preparation (``prepare``) never runs in the control plane's pod, which holds the database URL and the admin
key: it is a Job in the tenant's namespace (``render.prepare_job``), polled until it is over; the platform reads the
manifest it wrote from the shared volume, and turns a failure into a ``DeployFailed`` with the pod's own reason.

Scaling belongs to KEDA, driven by our external scaler (``python -m scaler``): ``set_replicas(fn, n > 0)`` and
a request that finds its function asleep only send the scaler a wake signal; sleeping is KEDA's
``cooldownPeriod``. The embedded autoscaler loop must therefore not run with this backend.

Errors, classified in one place (``_classify``)::

    ClusterError (message)
    ├── PermanentClusterError   4xx but 404/409/429: a rejected object or missing rights; retrying won't help
    └── TemporaryClusterError   429, 5xx, connection errors: retry after ``delay`` seconds
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from functions.backends.base import PASSED_RESPONSE_HEADERS, Forwarded, Outgoing, WakeListener
from functions.clock import SYSTEM_CLOCK, Clock
from functions.cluster import job_status
from functions.cluster.config import ClusterConfig, TenantQuota
from functions.cluster.render import (
    FALLBACK,
    JOB_NAME_LABEL,
    PREPARE,
    FunctionSpec,
    Obj,
    PrepareSpec,
    function_objects,
    function_url,
    prepare_job,
    tenant_objects,
)
from functions.deploy import DeployFailed
from functions.errors import GatewayTimeout
from functions.registry import FunctionRecord
from functions.settings import Settings
from runtime.spec import Manifest

log = logging.getLogger("paddlefn.knative")

FIELD_MANAGER = "paddlefn"
APPLY = "application/apply-patch+yaml"
# (apiVersion, kind) -> (API class, method suffix, namespaced) for the typed clients; custom kinds -> plural.
BUILT_IN: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("CoreV1Api", "namespace", False),
    ("v1", "ResourceQuota"): ("CoreV1Api", "resource_quota", True),
    ("v1", "LimitRange"): ("CoreV1Api", "limit_range", True),
    ("v1", "ServiceAccount"): ("CoreV1Api", "service_account", True),
    ("v1", "PersistentVolumeClaim"): ("CoreV1Api", "persistent_volume_claim", True),
    ("v1", "Service"): ("CoreV1Api", "service", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("NetworkingV1Api", "network_policy", True),
    ("apps/v1", "Deployment"): ("AppsV1Api", "deployment", True),
    ("batch/v1", "Job"): ("BatchV1Api", "job", True),
}
CUSTOM = {
    ("serving.knative.dev/v1", "Service"): "services",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
}
# Deleting these without a propagation policy orphans their pods (batch/v1 keeps that old default).
DELETE_BACKGROUND = {("batch/v1", "Job")}
LOG_TAIL_LINES = 50  # of a preparation pod's log, for its last stage line
# Retry-able causes that reach us as HTTP answers from the API server.
TEMPORARY_STATUS = {429, 500, 502, 503, 504}


class ClusterError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PermanentClusterError(ClusterError):
    """The API server refused (invalid object, forbidden): a person must change something."""


class TemporaryClusterError(ClusterError):
    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


def _classify(exc: Exception, what: str) -> ClusterError:
    """One place that turns the client's exceptions into ours (callers ``raise ... from exc``)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        reason = str(exc.body or exc.reason or "")[:500]
        if status in TEMPORARY_STATUS or status == 0:
            return TemporaryClusterError(f"{what}: API server answered {status}: {reason}")
        return PermanentClusterError(f"{what}: API server answered {status}: {reason}")
    return TemporaryClusterError(f"{what}: {exc}")


def spec_of(fn: FunctionRecord, settings: Settings, gpu_allowed: bool = True) -> FunctionSpec:
    """The renderer's view of a function record, with platform defaults filled in; GPU_ALLOWED is the
    tenant's plan's say (without it, device "auto" runs on CPU, as in the embedded platform)."""
    c = fn.config
    converted = bool(fn.manifest and fn.manifest.lite.get("available"))
    return FunctionSpec(
        tenant=fn.tenant,
        name=fn.name,
        version=fn.version,
        min_scale=c.min_scale,
        max_scale=c.max_scale,
        target=c.scaling_target,
        container_concurrency=c.slots_per_replica,
        idle_timeout_s=c.idle_timeout_s or settings.idle_timeout_s,
        request_timeout_s=c.timeout_s or settings.request_timeout_s,
        cold_start_timeout_s=c.cold_start_timeout_s or settings.cold_start_timeout_s,
        max_batch_size=c.batching.max_batch_size if c.batching else 0,
        max_queue_delay_ms=c.batching.max_queue_delay_ms if c.batching else 2.0,
        lite=converted and c.fallback != "none",
        # "auto" asks for a GPU on a cluster (that is what the shared image is for), when the plan allows one.
        gpu=c.device == "gpu" or (c.device == "auto" and gpu_allowed),
        lite_only=c.device == "lite",
    )


class KubeObjects:
    """Apply and delete rendered objects through the official client's typed APIs (blocking calls)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        names = ("CoreV1Api", "NetworkingV1Api", "AppsV1Api", "BatchV1Api", "CustomObjectsApi")
        self._apis = {name: getattr(client, name)(api_client) for name in names}

    def apply(self, obj: Obj) -> None:
        key, meta = (obj["apiVersion"], obj["kind"]), obj["metadata"]
        what = f"apply {obj['kind']} {meta.get('namespace', '')}/{meta['name']}"
        options = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY}
        try:
            if key in CUSTOM:
                group, version = obj["apiVersion"].split("/")
                self._apis["CustomObjectsApi"].patch_namespaced_custom_object(
                    group, version, meta["namespace"], CUSTOM[key], meta["name"], obj, **options
                )
                return
            api, suffix, namespaced = BUILT_IN[key]
            if namespaced:
                method = getattr(self._apis[api], f"patch_namespaced_{suffix}")
                method(meta["name"], meta["namespace"], obj, **options)
            else:
                getattr(self._apis[api], f"patch_{suffix}")(meta["name"], obj, **options)
        except Exception as exc:
            raise _classify(exc, what) from exc

    def delete(self, obj: Obj) -> None:
        """Delete OBJ; one already gone is fine."""
        from kubernetes.client.exceptions import ApiException

        key, meta = (obj["apiVersion"], obj["kind"]), obj["metadata"]
        try:
            if key in CUSTOM:
                group, version = obj["apiVersion"].split("/")
                self._apis["CustomObjectsApi"].delete_namespaced_custom_object(
                    group, version, meta["namespace"], CUSTOM[key], meta["name"]
                )
                return
            api, suffix, namespaced = BUILT_IN[key]
            if namespaced:
                options = {"propagation_policy": "Background"} if key in DELETE_BACKGROUND else {}
                method = getattr(self._apis[api], f"delete_namespaced_{suffix}")
                method(meta["name"], meta["namespace"], **options)
            else:
                getattr(self._apis[api], f"delete_{suffix}")(meta["name"])
        except ApiException as exc:
            if exc.status != 404:
                raise _classify(exc, f"delete {obj['kind']} {meta['name']}") from exc
        except Exception as exc:
            raise _classify(exc, f"delete {obj['kind']} {meta['name']}") from exc

    def read(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        """The object as the API server's JSON (status included), or None when there is none."""
        from kubernetes.client.exceptions import ApiException

        api, suffix, _ = BUILT_IN[(api_version, kind)]
        method = getattr(self._apis[api], f"read_namespaced_{suffix}")
        try:
            return _json_of(method(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _classify(exc, f"read {kind} {namespace}/{name}") from exc
        except Exception as exc:
            raise _classify(exc, f"read {kind} {namespace}/{name}") from exc

    def list_pods(self, namespace: str, label_selector: str) -> list[Obj]:
        try:
            answer = self._apis["CoreV1Api"].list_namespaced_pod(
                namespace, label_selector=label_selector, _preload_content=False
            )
            return list(_json_of(answer).get("items") or [])
        except Exception as exc:
            raise _classify(exc, f"list pods {namespace} {label_selector}") from exc

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        # Raw: the typed client parses a log that happens to be one JSON line into a dict.
        try:
            answer = self._apis["CoreV1Api"].read_namespaced_pod_log(
                name, namespace, container=container, tail_lines=tail_lines, _preload_content=False
            )
            return bytes(answer.data).decode(errors="replace")
        except Exception as exc:
            raise _classify(exc, f"read the log of pod {namespace}/{name}") from exc

    def close(self) -> None:
        self.api_client.close()


def _json_of(answer: Any) -> Obj:
    parsed = json.loads(answer.data)
    if not isinstance(parsed, dict):
        raise TemporaryClusterError(f"the API server answered {type(parsed).__name__}, not an object")
    return parsed


def default_api_client() -> Any:
    """In a pod: its ServiceAccount; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KnativeBackend:
    name = "knative"

    def __init__(
        self,
        settings: Settings,
        config: ClusterConfig | None = None,
        api_client_factory: Callable[[], Any] = default_api_client,
        quota_of: Callable[[str], TenantQuota | None] = lambda tenant: None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.config = config or ClusterConfig.from_env()
        self._api_client_factory = api_client_factory
        self._quota_of = quota_of  # the tenant's plan quota, when plans carry one
        self._kube: KubeObjects | None = None
        self._http: httpx.AsyncClient | None = None
        self._tenants: set[str] = set()  # tenants whose namespace objects this process has applied
        # When each function last answered through this gateway: KEDA cannot have put it to sleep within its
        # cooldown (the idle timeout) after that, so it is surely up; later it may be asleep.
        self._last_answer: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], int] = {}
        self._listeners: list[WakeListener] = []

    @property
    def kube(self) -> KubeObjects:
        if self._kube is None:
            raise RuntimeError("KnativeBackend.start() was not called")
        return self._kube

    async def start(self) -> None:
        self._kube = KubeObjects(await asyncio.to_thread(self._api_client_factory))
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self._kube is not None:
            self._kube.close()

    # --- objects --------------------------------------------------------------------------------------------

    async def ensure_tenant(self, tenant: str) -> None:
        """Namespace and its guard rails (idempotent; also the hook for 'tenant created')."""
        for obj in tenant_objects(tenant, self.config, self._quota_of(tenant)):
            await asyncio.to_thread(self.kube.apply, obj)
        self._tenants.add(tenant)

    async def remove_tenant(self, tenant: str) -> None:
        """Deleting the namespace deletes everything in it (the hook for 'tenant deleted')."""
        namespace = tenant_objects(tenant, self.config)[0]
        await asyncio.to_thread(self.kube.delete, namespace)
        self._tenants.discard(tenant)

    async def deployed(self, fn: FunctionRecord) -> None:
        if fn.tenant not in self._tenants:
            await self.ensure_tenant(fn.tenant)
        quota = self._quota_of(fn.tenant)
        spec = spec_of(fn, self.settings, gpu_allowed=quota is None or quota.gpus > 0)
        wanted = function_objects(spec, self.config)
        for obj in wanted:
            await asyncio.to_thread(self.kube.apply, obj)
        # A new version without a Lite model must not leave the old version's Lite service answering.
        names = {(o["kind"], o["metadata"]["name"]) for o in wanted}
        for obj in function_objects(replace(spec, lite=True, lite_only=False), self.config):
            if (obj["kind"], obj["metadata"]["name"]) not in names:
                await asyncio.to_thread(self.kube.delete, obj)

    async def reconfigured(self, fn: FunctionRecord) -> None:
        await self.deployed(fn)  # apply is create-or-update; Knative rolls a new revision when it must

    async def removed(self, fn: FunctionRecord) -> None:
        # Whatever an earlier version had: both variants.
        everything = replace(spec_of(fn, self.settings), lite=True, lite_only=False)
        for obj in reversed(function_objects(everything, self.config)):
            await asyncio.to_thread(self.kube.delete, obj)
        # A deploy still preparing: its Job goes too (its wait then ends with "deleted before it finished").
        await asyncio.to_thread(
            self.kube.delete, prepare_job(PrepareSpec(fn.tenant, fn.name, fn.version), self.config)
        )
        self._last_answer.pop(fn.key, None)

    # --- deploy preparation: a Job in the tenant's namespace ----------------------------------------------------

    async def prepare(
        self, fn: FunctionRecord, *, device: str, batching: bool, on_stage: Callable[[str], None]
    ) -> Manifest:
        """Optimise and golden-check FN's uploaded model in a Job that runs as the tenant (never in this pod);
        ON_STAGE hears where it is. The Job is deleted when it is over, and when the deploy is cancelled."""
        if fn.tenant not in self._tenants:
            await self.ensure_tenant(fn.tenant)
        spec = PrepareSpec(fn.tenant, fn.name, fn.version, device, batching, self.settings.deploy_timeout_s)
        job = prepare_job(spec, self.config)
        # The Job's writable mount is a subPath: the platform makes it, as it made model/, so that it is the
        # platform's (and the runtime image's) user's, not one the kubelet makes as root.
        await asyncio.to_thread(fn.serving_dir.mkdir, parents=True, exist_ok=True)
        on_stage(job_status.PREPARING)
        try:
            await asyncio.to_thread(self.kube.apply, job)
            await self._await_job(job, device, on_stage)
        finally:  # also on CancelledError, which goes on up once the Job is gone
            await self._delete_quietly(job)
        try:
            return await asyncio.to_thread(Manifest.load, fn.serving_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DeployFailed(
                f"the preparation Job succeeded but its result is not in {fn.serving_dir} ({exc}): the platform's "
                "data volume and the tenant's models volume must be the same storage (docs/cluster.md)"
            ) from exc

    async def _await_job(self, job: Obj, device: str, on_stage: Callable[[str], None]) -> None:
        """Poll the Job and its pod until the Job is over; return on success, raise DeployFailed otherwise."""
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        timeout_s = self.settings.deploy_timeout_s
        deadline = self.clock.now() + timeout_s + self.config.prepare_grace_s
        shown, printed = job_status.PREPARING, None
        pod: job_status.PodView | None = None
        while True:
            try:
                status = await asyncio.to_thread(self.kube.read, "batch/v1", "Job", namespace, name)
                if status is None:
                    raise DeployFailed(
                        f"the preparation Job {namespace}/{name} was deleted before it finished"
                    )
                pods = await asyncio.to_thread(self.kube.list_pods, namespace, f"{JOB_NAME_LABEL}={name}")
                pod = job_status.pod_view(pods, PREPARE) or pod
                view = job_status.job_view(status)
                if view.outcome == job_status.SUCCEEDED:
                    return
                if view.outcome == job_status.FAILED:
                    memory = self.config.prepare_memory
                    reason = job_status.failure_reason(
                        view, pod, timeout_s=timeout_s, memory=memory, device=device
                    )
                    log.info("preparation Job %s/%s failed (%s): %s", namespace, name, view.reason, reason)
                    raise DeployFailed(reason)
                if pod is not None and pod.phase == "Running":
                    printed = await self._printed_stage(namespace, pod.name) or printed
            except TemporaryClusterError as exc:  # the next poll may well get through
                log.warning("preparation Job %s/%s: %s", namespace, name, exc.message)
            stage = job_status.stage_of(pod, printed)
            if stage != shown:
                on_stage(stage)
                shown = stage
            if self.clock.now() > deadline:  # Kubernetes should have ended it by now: we give up ourselves
                raise DeployFailed(job_status.timeout_reason(timeout_s, pod))
            await asyncio.sleep(self.config.prepare_poll_s)

    async def _printed_stage(self, namespace: str, pod: str) -> str | None:
        """The last stage runtime.prepare printed, or None (the log can be missing: stages are a courtesy)."""
        try:
            text = await asyncio.to_thread(self.kube.pod_log, namespace, pod, PREPARE, LOG_TAIL_LINES)
        except ClusterError as exc:
            log.debug("no log of preparation pod %s/%s: %s", namespace, pod, exc.message)
            return None
        return job_status.last_stage(text)

    async def _delete_quietly(self, job: Obj) -> None:
        """Delete the Job and its pod; on failure its ttlSecondsAfterFinished removes it later."""
        try:
            await asyncio.to_thread(self.kube.delete, job)
        except ClusterError as exc:
            log.warning("could not delete preparation Job %s: %s", job["metadata"]["name"], exc.message)

    # --- scaling: KEDA's, through our scaler -----------------------------------------------------------------

    def on_wake(self, listener: WakeListener) -> None:
        self._listeners.append(listener)

    async def set_replicas(self, fn: FunctionRecord, count: int) -> None:
        if count > 0:
            await self._signal_wake(fn)

    async def _signal_wake(self, fn: FunctionRecord) -> None:
        assert self._http is not None
        url = f"{self.config.scaler_wake_url}/v1/wake/{fn.tenant}/{fn.name}"
        token = self.config.scaler_wake_token
        headers = {"authorization": f"Bearer {token}"} if token else None
        try:
            response = await self._http.post(url, headers=headers, timeout=2.0)
            if response.status_code != 202:
                log.warning("wake signal for %s: scaler answered %d", fn.label, response.status_code)
        except httpx.HTTPError as exc:  # KEDA's polling still wakes it, only later
            log.warning("wake signal for %s did not reach the scaler: %s", fn.label, exc)

    def replicas(self, fn: FunctionRecord) -> int:
        """1 while the function is surely up (answered within its idle timeout), else 0: KEDA knows more."""
        return 0 if self._maybe_asleep(fn) else 1

    def _maybe_asleep(self, fn: FunctionRecord) -> bool:
        last = self._last_answer.get(fn.key)
        idle_timeout = fn.config.idle_timeout_s or self.settings.idle_timeout_s
        return last is None or self.clock.now() - last >= idle_timeout

    def replica_info(self, fn: FunctionRecord) -> list[dict[str, Any]]:
        return []  # replicas are pods that Kubernetes lists: kubectl get pods -l paddlefn.dev/function=...

    def pending(self, fn: FunctionRecord) -> int:
        return self._pending.get(fn.key, 0)

    def capacity(self) -> dict[str, int]:
        return {}  # the cluster's, seen with kubectl; the ResourceQuota bounds each tenant

    # --- data plane -----------------------------------------------------------------------------------------

    async def forward(self, fn: FunctionRecord, request: Outgoing) -> Forwarded:
        # Knative's activator holds a request for a waking revision out of our sight: the compute slot is held
        # for the whole call, wake-up included.
        async with request.compute_slot():
            return await self._forward(fn, request)

    async def _forward(self, fn: FunctionRecord, request: Outgoing) -> Forwarded:
        assert self._http is not None
        spec = spec_of(fn, self.settings)
        urls = [function_url(spec, self.config) + request.path]
        started = self.clock.now()
        # Possibly asleep: signal the scaler before the first try, because the request may not fail fast (an
        # ingress or Knative's activator can hold it) and KEDA would otherwise wake it only at its next poll.
        cold = self._maybe_asleep(fn)
        if cold:
            await self._wake(fn)
        self._pending[fn.key] = self._pending.get(fn.key, 0) + cold
        try:
            while True:
                timeout = request.timeout_s + (request.cold_start_timeout_s if cold else 0.0)
                response = await self._try(urls, request, fn, timeout)
                if response is not None:
                    break
                if not cold:  # it was up a moment ago and is gone: it is waking now
                    cold = True
                    self._pending[fn.key] += 1
                    await self._wake(fn)
                if (
                    spec.lite and self.config.lite_fallback and len(urls) == 1
                ):  # the CPU stand-in wakes faster
                    urls.append(function_url(spec, self.config, FALLBACK) + request.path)
                if self.clock.now() - started > request.cold_start_timeout_s:
                    raise GatewayTimeout(
                        f"function {fn.label} did not wake within its cold-start timeout of "
                        f"{request.cold_start_timeout_s:g} s"
                    )
                await asyncio.sleep(0.05)
        finally:
            self._pending[fn.key] -= cold
        self._last_answer[fn.key] = self.clock.now()
        return self._forwarded(response, self.clock.now() - started if cold else None)

    async def _wake(self, fn: FunctionRecord) -> None:
        for listener in self._listeners:
            listener(fn)
        await self._signal_wake(fn)

    async def _try(
        self, urls: list[str], request: Outgoing, fn: FunctionRecord, timeout: float
    ) -> httpx.Response | None:
        """The first answer from a replica behind URLS, or None when none has an endpoint yet."""
        assert self._http is not None
        for url in urls:
            try:
                response = await self._http.post(
                    url, content=request.body, headers=request.headers, timeout=timeout
                )
            except httpx.TimeoutException:
                raise GatewayTimeout(
                    f"function {fn.label} took longer than {request.timeout_s:g} s to answer"
                ) from None
            except httpx.TransportError:
                continue
            # No endpoint yet: connection refused, or Knative/the ingress answering 502/503 while at 0.
            if response.status_code not in (502, 503):
                return response
        return None

    @staticmethod
    def _forwarded(response: httpx.Response, cold_start_s: float | None) -> Forwarded:
        headers = {k: v for k in PASSED_RESPONSE_HEADERS if (v := response.headers.get(k)) is not None}
        return Forwarded(
            status=response.status_code,
            body=response.content,
            headers=headers,
            engine=response.headers.get("x-paddlefn-engine", ""),
            device=response.headers.get("x-paddlefn-device", ""),
            compute_ms=float(response.headers.get("x-paddlefn-compute-ms", 0.0)),
            cold_start_s=cold_start_s,
        )
