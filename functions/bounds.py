"""How much of what a client sends the platform reads, repeats and keeps.

- Read: every request body outside the data plane goes through ``BodyLimit``: a body over
  ``settings.max_json_bytes`` is answered 413 as soon as its ``Content-Length`` says so, or as soon as that many
  bytes have arrived, before the app parses anything. Routes with their own limit, enforced while they read
  (model uploads: ``max_upload_bytes`` and the plan's ``max_model_bytes``; edge usage uploads), are left to it.
- Repeated: input shown in an error message goes through ``shown`` (quoted, cut to ``SHOWN_CHARS``), and every
  error message is cut to ``MAX_MESSAGE_CHARS`` where errors become responses (``functions.errors``).
- Kept: strings written to the store are cut to their column's length with ``clip`` (names and other
  identifiers are validated before that, in ``functions.names``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SHOWN_CHARS = 64
MAX_MESSAGE_CHARS = 1000


def clip(text: str, limit: int) -> str:
    """TEXT cut to at most LIMIT characters, ending in '…' when it was cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """VALUE quoted for an error message, cut to about LIMIT characters (saying how long it was)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[:limit] + "…" + length


DATA_PLANE = ("/v2", "/t/")  # OIP requests: the gateway's own limit (max_request_bytes) applies


class BodyLimit:
    """A plain ASGI middleware: request bodies outside the data plane and the EXEMPT routes may have at most
    LIMIT bytes. A body within it is read here (at most LIMIT bytes held) and handed on whole; one over it is
    answered 413 with ``connection: close``, and the app never sees the request."""

    def __init__(
        self, app: ASGIApp, limit: int, exempt: Iterable[tuple[str, re.Pattern[str]]] = (), setting: str = ""
    ) -> None:
        self.app = app
        self.limit = limit
        self.exempt = tuple(exempt)
        self.setting = setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._applies(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send, f"the request body is {declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body ended: no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, f"the request body is over {self.limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()  # after the body: http.disconnect, when it comes

        await self.app(scope, replay, send)

    def _applies(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if path.startswith(DATA_PLANE):
            return False
        method = scope["method"]
        return not any(method == m and pattern.fullmatch(path) for m, pattern in self.exempt)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        setting = f" ({self.setting})" if self.setting else ""
        message = f"{what}; this endpoint takes JSON bodies of at most {self.limit} bytes{setting}"
        response = JSONResponse({"error": message}, status_code=413, headers={"connection": "close"})
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
