"""The platform's ASGI app: control plane (/v1), data plane (OIP v2), /metrics, in one process."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp

from functions import api, bounds, edge, gateway, headers, openapi, stats, ui
from functions.billing import routes as billing_routes
from functions.errors import install_error_handlers
from functions.platform import Platform
from functions.settings import Settings

# Routes whose bodies are not small JSON, each with a limit of its own that it enforces while it reads: model
# uploads (max_upload_bytes and the plan's max_model_bytes) and edge usage uploads (edge.MAX_BODY_BYTES).
OWN_BODY_LIMITS = [
    ("POST", re.compile(r"/v1/tenants/[^/]+/functions")),
    ("POST", re.compile(r"/v1/edge/usage")),
]


class PlatformApp(FastAPI):
    """FastAPI with the security headers outside its whole middleware stack, so that they are on every answer,
    the 500s of its outermost error middleware included."""

    def build_middleware_stack(self) -> ASGIApp:
        return headers.SecurityHeaders(super().build_middleware_stack())


def create_app(
    settings: Settings,
    platform: Platform | None = None,
    on_started: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    """The app; it builds (or takes) the Platform and owns its start and close through the lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        instance = platform or Platform(settings)
        app.state.platform = instance
        await instance.start()
        if on_started is not None:
            await on_started()
        try:
            yield
        finally:
            await instance.close()

    app = PlatformApp(
        title="paddlefn",
        summary="Serverless inference for PaddlePaddle models",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(api.router)
    app.include_router(billing_routes.router)
    app.include_router(edge.router)
    app.include_router(stats.router)
    ui.mount(app)
    for route in gateway.routes():
        app.router.routes.append(route)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        instance: Platform = request.app.state.platform
        instance.require_admin(instance.authenticate(request.headers.get("authorization")))
        for fn in instance.registry.ready():  # held requests, read at scrape time (the scaler's queue signal)
            instance.metrics.pending.labels(fn.tenant, fn.name).set(instance.backend.pending(fn))
        return Response(generate_latest(instance.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    openapi.install(app, settings)  # the data plane, /metrics, the portal and the real errors too
    app.add_middleware(gateway.HostRouting, domain=settings.domain)
    limit = settings.max_json_bytes
    app.add_middleware(
        bounds.BodyLimit, limit=limit, exempt=OWN_BODY_LIMITS, setting="PADDLEFN_MAX_JSON_BYTES"
    )
    return app
