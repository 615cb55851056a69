"""Every error the platform answers with, and the one place they become HTTP responses.

    PlatformError (status, message, headers)
    ├── BadRequest            400  what to change is in the message
    ├── Unauthorized          401  no key, or a key that is not valid
    ├── Forbidden             403  the key is valid but lacks a scope, or a plan forbids it
    ├── NotFound              404  also for other tenants' things, so names cannot be probed
    ├── Conflict              409
    ├── PayloadTooLarge       413
    ├── TooManyRequests       429  Retry-After
    ├── Unavailable           503  Retry-After: queue full, worker died, no capacity
    └── GatewayTimeout        504  cold start or request over its time limit

Bodies are ``{"error": "<message>"}``, as the Open Inference Protocol answers errors, cut to
``functions.bounds.MAX_MESSAGE_CHARS`` (a message never repeats unbounded input). 4xx are logged without a
traceback; anything unexpected is logged once with one and answered 500.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from functions.bounds import MAX_MESSAGE_CHARS, clip, shown

log = logging.getLogger("paddlefn")


class PlatformError(Exception):
    status = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))}


class BadRequest(PlatformError):
    status = 400


class Unauthorized(PlatformError):
    status = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="paddlefn"'}


class Forbidden(PlatformError):
    status = 403


class NotFound(PlatformError):
    status = 404


class Conflict(PlatformError):
    status = 409


class PayloadTooLarge(PlatformError):
    status = 413


class TooManyRequests(PlatformError):
    status = 429


class Unavailable(PlatformError):
    status = 503


class GatewayTimeout(PlatformError):
    status = 504


class FunctionTimeout(GatewayTimeout):
    """The function computed past its time limit: its worker is replaced, and the compute it burnt is billed."""

    def __init__(self, message: str, *, compute_ms: float) -> None:
        super().__init__(message)
        self.compute_ms = compute_ms


def error_response(exc: PlatformError) -> JSONResponse:
    return JSONResponse(
        {"error": clip(exc.message, MAX_MESSAGE_CHARS)}, status_code=exc.status, headers=exc.headers
    )


def install_error_handlers(app: FastAPI) -> None:
    async def platform_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PlatformError)
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for err in exc.errors()[:10]:
            where = ".".join(p if isinstance(p, str) and len(p) < 40 else shown(p, 40)
                             for p in err.get("loc", ()) if p not in ("body",))  # fmt: skip
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        message = clip("; ".join(problems) or "invalid request", MAX_MESSAGE_CHARS)
        return JSONResponse({"error": message}, status_code=400)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(
            {"error": clip(message, MAX_MESSAGE_CHARS)}, status_code=exc.status_code, headers=exc.headers
        )

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error; it has been logged"}, status_code=500)

    app.add_exception_handler(PlatformError, platform_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
