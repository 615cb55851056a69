"""The data plane: Open Inference Protocol v2 for every function, at ``/t/{tenant}/v2/...`` and by host name.

A standard OIP client (tritonclient, KServe's) works unchanged with ``http://HOST:PORT/t/{tenant}`` as its base
URL. The gateway does not parse tensors: it authenticates, admits, hands the bytes to a replica (waking the
function if it sleeps) and passes the answer back, so its own cost stays small. Errors are ``{"error": ...}``.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from functions.auth import INVOKE
from functions.backends.base import Forwarded, Outgoing
from functions.errors import (
    Conflict,
    Forbidden,
    FunctionTimeout,
    NotFound,
    PayloadTooLarge,
    PlatformError,
    Unauthorized,
    Unavailable,
)
from functions.registry import DEPLOYING, READY, FunctionRecord
from functions.store.models import utcnow
from functions.usage import UsageEvent

if TYPE_CHECKING:
    from functions.platform import Platform

SERVER_METADATA = {"name": "paddlefn", "version": "1", "extensions": ["binary_tensor_data"]}


def _platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def resolve(platform: Platform, request: Request, tenant: str, name: str) -> FunctionRecord:
    """The function, if the caller may invoke it. Without a key, only public functions exist; with another
    tenant's key, nothing of this tenant exists (404, so names cannot be probed)."""
    principal = platform.authenticate(request.headers.get("authorization"))
    fn = platform.registry.get(tenant, name)
    if fn is not None and fn.config.public:
        return fn
    if principal is None:
        raise Unauthorized(f"function '{name}' needs an API key: send 'Authorization: Bearer <key>'")
    if fn is None or (not principal.is_admin and principal.tenant != tenant):
        raise NotFound(f"function '{name}' not found in tenant '{tenant}'")
    if not principal.is_admin and INVOKE not in principal.scopes:
        raise Forbidden("this key lacks the 'invoke' scope")
    return fn


def _serving(fn: FunctionRecord) -> None:
    if fn.status == DEPLOYING:
        raise Unavailable(f"function {fn.label} is still deploying; retry in a few seconds", retry_after=5)
    if fn.status != READY:
        raise Conflict(f"function {fn.label} failed to deploy and cannot serve: {fn.error}; deploy it again")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def infer(request: Request) -> Response:
    platform = _platform(request)
    started_at = utcnow()
    start = time.perf_counter()
    fn = resolve(platform, request, request.path_params["tenant"], request.path_params["model"])
    _serving(fn)
    # Over the tenant's rate or concurrency: 429 before its body is even read; not forwarded, not billed.
    platform.admission.enter(fn.tenant)
    try:
        return await _admitted(platform, request, fn, started_at, start)
    finally:
        platform.admission.leave(fn.tenant)


async def _admitted(
    platform: Platform, request: Request, fn: FunctionRecord, started_at: Any, start: float
) -> Response:
    """Read the body, hold a fair-queue slot and forward; usage is recorded whatever happens."""
    body = await _read_body(request, platform.settings.max_request_bytes)
    platform.activator.admit(fn, lambda: platform.registry.of_tenant(fn.tenant))
    headers = {"content-type": request.headers.get("content-type", "application/json")}
    header_length = request.headers.get("inference-header-content-length")
    if header_length is not None:
        headers["inference-header-content-length"] = header_length
    settings = platform.settings
    outgoing = Outgoing(
        path=f"/v2/models/{fn.name}/infer",
        body=body,
        headers=headers,
        cold_start_timeout_s=fn.config.cold_start_timeout_s or settings.cold_start_timeout_s,
        timeout_s=fn.config.timeout_s or settings.request_timeout_s,
    )
    request_id = uuid.uuid4().hex

    @contextlib.asynccontextmanager
    async def compute_slot() -> AsyncIterator[None]:
        """A turn in the weighted fair queue (the compute limit); the backend takes it once a replica is ready."""
        try:
            await platform.fair.acquire(
                fn.tenant, platform.limits_of(fn.tenant).weight, outgoing.cold_start_timeout_s
            )
        except TimeoutError:
            raise Unavailable(
                f"the platform is at capacity and function {fn.label} waited its turn for "
                f"{outgoing.cold_start_timeout_s:g} s; retry later",
                retry_after=2,
            ) from None
        try:
            yield
        finally:
            platform.fair.release()

    outgoing.compute_slot = compute_slot
    forwarded = await _forward(platform, fn, outgoing, request_id, started_at, start, len(body))
    out_headers = {
        **forwarded.headers,
        "x-request-id": request_id,
        "x-paddlefn-engine": forwarded.engine,
        "x-paddlefn-device": forwarded.device,
        "x-paddlefn-compute-ms": f"{forwarded.compute_ms:.3f}",
    }
    if forwarded.cold_start_s is not None:
        out_headers["x-paddlefn-cold-start-ms"] = f"{forwarded.cold_start_s * 1000:.1f}"
    return Response(forwarded.body, status_code=forwarded.status, headers=out_headers)


async def _forward(
    platform: Platform,
    fn: FunctionRecord,
    outgoing: Outgoing,
    request_id: str,
    started_at: Any,
    start: float,
    bytes_in: int,
) -> Forwarded:
    """Forward to a replica; whatever happens, the request is counted and its usage recorded before returning."""
    platform.activator.begin(fn)
    in_flight = platform.metrics.in_flight.labels(
        fn.tenant, fn.name
    )  # the KEDA scaler reads it via Prometheus
    in_flight.inc()
    forwarded = None
    status = 500
    overrun_ms = 0.0
    try:
        forwarded = await platform.backend.forward(fn, outgoing)
        status = forwarded.status
    except FunctionTimeout as exc:
        status, overrun_ms = exc.status, exc.compute_ms
        raise
    except PlatformError as exc:
        status = exc.status
        raise
    finally:
        platform.activator.end(fn)
        in_flight.dec()
        fn.last_request_at = utcnow()
        seconds = time.perf_counter() - start
        await _account(platform, fn, request_id, started_at, seconds, status, bytes_in, forwarded, overrun_ms)
    return forwarded


async def _account(
    platform: Platform,
    fn: FunctionRecord,
    request_id: str,
    started_at: Any,
    seconds: float,
    status: int,
    bytes_in: int,
    forwarded: Any,
    overrun_ms: float = 0.0,
) -> None:
    """Metrics and the usage record; OVERRUN_MS is the compute of a request that overran its time limit."""
    m = platform.metrics
    m.requests.labels(fn.tenant, fn.name, str(status)).inc()
    m.latency.labels(fn.tenant, fn.name).observe(seconds)
    cold = forwarded is not None and forwarded.cold_start_s is not None
    if cold:
        m.cold_starts.labels(fn.tenant, fn.name).inc()
        m.cold_start_duration.labels(fn.tenant, fn.name).observe(forwarded.cold_start_s)
    if forwarded is not None and forwarded.compute_ms:
        m.compute.labels(fn.tenant, fn.name, forwarded.device).inc(forwarded.compute_ms / 1000)
    await platform.usage.record(
        UsageEvent(
            request_id=request_id,
            tenant_id=fn.tenant_id,
            tenant=fn.tenant,
            function=fn.name,
            started_at=started_at,
            duration_ms=seconds * 1000,
            compute_ms=forwarded.compute_ms if forwarded else overrun_ms,
            device=(forwarded.device if forwarded else "") or "cpu",
            cold_start=cold,
            status=status,
            bytes_in=bytes_in,
            bytes_out=len(forwarded.body) if forwarded else 0,
        )
    )


async def model_metadata(request: Request) -> Response:
    fn = resolve(_platform(request), request, request.path_params["tenant"], request.path_params["model"])
    _serving(fn)
    assert fn.manifest is not None
    spec = fn.manifest.spec
    return JSONResponse(
        {
            "name": fn.name,
            "versions": ["1"],
            "platform": "paddle",
            "inputs": [t.to_json() for t in spec.inputs],
            "outputs": [t.to_json() for t in spec.outputs],
        }
    )


async def model_ready(request: Request) -> Response:
    fn = resolve(_platform(request), request, request.path_params["tenant"], request.path_params["model"])
    ready = fn.status == READY  # a sleeping function is ready: it wakes on the next request
    return JSONResponse({"name": fn.name, "ready": ready}, status_code=200 if ready else 503)


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    return JSONResponse({"ready": True})


async def server_metadata(request: Request) -> Response:
    return JSONResponse(SERVER_METADATA)


def routes() -> list[Route]:
    model = "/t/{tenant}/v2/models/{model}"
    return [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/t/{tenant}/v2/health/live", live),
        Route("/t/{tenant}/v2/health/ready", ready),
        Route("/t/{tenant}/v2", server_metadata),
        Route(model, model_metadata),
        Route(model + "/versions/{version}", model_metadata),
        Route(model + "/ready", model_ready),
        Route(model + "/versions/{version}/ready", model_ready),
        Route(model + "/infer", infer, methods=["POST"]),
        Route(model + "/versions/{version}/infer", infer, methods=["POST"]),
    ]


class HostRouting:
    """``{function}.{tenant}.{domain}`` + ``/v2/...`` is the same as ``/t/{tenant}/v2/...`` (Knative's naming)."""

    def __init__(self, app: ASGIApp, domain: str) -> None:
        self.app = app
        self.suffix = "." + domain.strip(".").lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v2"):
            host = _host(scope)
            if host.endswith(self.suffix):
                labels = host[: -len(self.suffix)].split(".")
                if len(labels) == 2:
                    function, tenant = labels
                    path = scope["path"]
                    if path.startswith("/v2/models/") and path.split("/")[3] != function:
                        response = JSONResponse(
                            {"error": f"this host serves function '{function}', not '{path.split('/')[3]}'"},
                            status_code=404,
                        )
                        await response(scope, receive, send)
                        return
                    scope = dict(scope, path=f"/t/{tenant}{path}", raw_path=f"/t/{tenant}{path}".encode())
        await self.app(scope, receive, send)


def _host(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"host":
            return value.decode("latin-1").rsplit(":", 1)[0].lower() if b"]" not in value else ""
    return ""
