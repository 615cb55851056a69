"""The wake path: the gateway posts here the moment a request finds its function asleep.

``POST /v1/wake/{tenant}/{function}`` turns the function active on the board at once, which reaches every open
``StreamIsActive`` stream immediately: KEDA scales 0 -> 1 without waiting for its polling interval or for
Prometheus to scrape the held request. Answers 202 (idempotent: a second signal while waking is harmless).
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scaler.activity import Board

# Tenant and function names are DNS labels (the platform checks them on create, functions/names.py, whose
# DNS_LABEL this must equal); anything else is a typo. Matched whole: "$" would let a final newline through.
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def wake_app(board: Board, token: str = "", clock: Callable[[], float] = time.monotonic) -> Starlette:
    async def wake(request: Request) -> Response:
        if token:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "missing or wrong wake token"}, status_code=401)
        tenant, function = request.path_params["tenant"], request.path_params["function"]
        if not NAME.fullmatch(tenant) or not NAME.fullmatch(function):
            return JSONResponse({"error": "tenant and function must be DNS labels"}, status_code=400)
        board.wake((tenant, function), clock())
        return JSONResponse({"tenant": tenant, "function": function, "active": True}, status_code=202)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/wake/{tenant}/{function}", wake, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
