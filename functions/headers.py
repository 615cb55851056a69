"""Security headers on every answer of the platform: portal, control plane, data plane, errors.

- ``Content-Security-Policy``: scripts, styles and everything else only from this origin, no inline script or
  style, no plugins, no ``<base>``, and no framing (``frame-ancestors 'none'``). The portal (``functions/ui``)
  is ES modules and a stylesheet under ``/ui``, so it runs under this policy as it is; its charts set colours
  through the CSSOM, which a policy does not restrict. FastAPI's API explorers (``/docs``, ``/redoc``) load
  Swagger UI and ReDoc from cdn.jsdelivr.net and start them with an inline script, so those two pages (and
  nothing else) get a policy that allows exactly that.
- ``X-Frame-Options: DENY`` (the same as ``frame-ancestors`` for browsers that predate it),
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``.

``SecurityHeaders`` is a plain ASGI middleware that appends a list of header pairs built once at import: the
data plane pays one list concatenation per response, not a ``BaseHTTPMiddleware`` round trip.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; font-src https://fonts.gstatic.com; "
    "worker-src blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})

COMMON = (
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
)
HEADERS = (("content-security-policy", POLICY), *COMMON)
"""Every answer's security headers, as (name, value); connections.py writes them into its raw answers too."""
_RAW = [(name.encode(), value.encode()) for name, value in HEADERS]
_RAW_DOCS = [(b"content-security-policy", DOCS_POLICY.encode())] + [
    (n.encode(), v.encode()) for n, v in COMMON
]


class SecurityHeaders:
    """Appends the security headers to every HTTP response of APP."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = _RAW_DOCS if scope["path"] in DOCS_PATHS else _RAW

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
