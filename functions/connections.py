"""Client connections of the platform's HTTP server: a limit, a request-head timeout, and the open-file limit.

uvicorn alone holds any number of connections for as long as clients like: with httptools, a connection that
sends nothing is never timed out, and its keep-alive timer is reset by every byte, so a client trickling a header
line every few seconds (slowloris) is never timed out either. ``limit_concurrency`` does not help: it accepts every
connection and answers 503 to *requests* once there are too many connections, so an idle flood would turn into
refusals for everyone. Measured before this module: ~20k idle connections took every file descriptor, and other
tenants' requests then failed because the platform could no longer open a socket to its own workers.

``guarded_protocol`` returns uvicorn's httptools protocol with three rules added, shared through one
``ConnectionGuard`` per server:

- a connection must complete its request head within ``header_timeout_s`` of connecting, or of sending the first
  byte of its next request on a kept-alive connection; else it is closed (408 if it had started a request);
- between requests it may stay idle ``keep_alive_timeout_s`` (uvicorn's own keep-alive timer);
- at most ``limit`` connections are held: a new one beyond it closes the longest-idle connection that has no
  request in progress (as nginx reuses keep-alive connections when it runs out), so a flood of idle connections
  displaces itself, not the requests of others. When every connection has a request in progress, the new one is
  answered 503 and closed.

The limit stays well below the process's open-file limit (``connection_limit``) so that descriptors remain for
worker sockets, the database, the usage journal and logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from functions.headers import HEADERS
from functions.settings import Settings

log = logging.getLogger("paddlefn.connections")

DEFAULT_MAX_CONNECTIONS = 10_000
_WARN_EVERY_S = 10.0


def _closing_response(status: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    security = "".join(f"{name}: {value}\r\n" for name, value in HEADERS)
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{security}{extra}connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_REFUSED = _closing_response(
    "503 Service Unavailable",
    "the platform is at its connection limit and every connection has a request in progress; retry",
    "retry-after: 1\r\n",
)
_HEAD_TIMEOUT = _closing_response("408 Request Timeout", "the request head did not arrive in time")


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. macOS caps the soft limit below an unlimited hard one
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_limit(requested: int, open_files: int) -> int:
    """Connections to hold at most: REQUESTED (0: DEFAULT_MAX_CONNECTIONS), and never over half of OPEN_FILES.

    The other half is for what each request needs besides its client connection (a socket to a worker) and for
    the platform's own files; accepting also briefly overshoots the limit by a batch of connections (the listen
    backlog) before the guard sees them."""
    cap = max(1, open_files // 2)
    wanted = requested or DEFAULT_MAX_CONNECTIONS
    if wanted > cap:
        if requested:
            log.warning(
                "max_connections=%d lowered to %d: half of the open-file limit (%d), so that descriptors "
                "remain for worker sockets and files; raise the limit (ulimit -n) for more",
                requested,
                cap,
                open_files,
            )
        return cap
    return wanted


class ConnectionGuard:
    """What the connections of one server share: how many are open, and which are idle, longest-idle first."""

    def __init__(self, limit: int, header_timeout_s: float, keep_alive_timeout_s: float) -> None:
        self.limit = limit
        self.header_timeout_s = header_timeout_s
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self.open = 0
        # Connections with no request in progress, in the order they became idle (a dict keeps insertion order,
        # so the oldest is found in O(1) however many there are).
        self.idle: dict[GuardedProtocol, None] = {}
        self.evicted = 0
        self.refused = 0
        self.head_timeouts = 0
        self._warned_at = -_WARN_EVERY_S

    def make_room(self) -> bool:
        """Close the longest-idle connection; False when none is idle (every one has a request in progress)."""
        if not self.idle:
            self.refused += 1
            self._warn()
            return False
        victim = next(iter(self.idle))
        del self.idle[victim]
        victim.transport.abort()
        self.evicted += 1
        self._warn()
        return True

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "at the connection limit (%d): %d idle connections closed to make room, %d new ones refused "
                "because every connection had a request in progress (totals so far)",
                self.limit,
                self.evicted,
                self.refused,
            )


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guard's rules (see the module docstring)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn arms its keep-alive timer with this attribute; set here because its Config wants whole seconds.
        self.timeout_keep_alive = self.guard.keep_alive_timeout_s  # type: ignore[assignment]
        # No WebSocket upgrades (the platform has no WebSocket routes): an upgraded connection would pass to another
        # protocol, out of the guard's count for good. A request asking for one is served as plain HTTP.
        self.ws_protocol_class = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # bytes of a request head have arrived, and not yet all of it
        self._counted = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        if guard.open >= guard.limit and not guard.make_room():
            transport.write(_REFUSED)
            transport.close()
            return
        guard.open += 1
        self._counted = True
        guard.idle[self] = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.guard.open -= 1
        self.guard.idle.pop(self, None)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._head_started = True
            if self._head_timer is None:
                self._arm_head_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_started = False
        self._cancel_head_timer()
        self.guard.idle.pop(self, None)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._counted and not self.transport.is_closing() and self._between_requests():
            self.guard.idle[self] = None  # idle again, and now the most recently idle

    def _unsupported_upgrade_warning(self) -> None:
        pass  # uvicorn would log two warnings per such request: a client could fill the log with them

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.guard.head_timeouts += 1
        if self._head_started:  # a client that sent nothing gets nothing back
            self.transport.write(_HEAD_TIMEOUT)
        self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A protocol class for ``uvicorn.run(http=...)`` whose connections share GUARD."""
    return type("GuardedHttpToolsProtocol", (GuardedProtocol,), {"guard": guard})


def server_protocol(settings: Settings) -> type[GuardedProtocol]:
    """The protocol for the platform's server: raises the open-file limit, then guards within it."""
    open_files = raise_open_file_limit()
    limit = connection_limit(settings.max_connections, open_files)
    log.info(
        "client connections: at most %d (open-file limit %d), request head within %g s, keep-alive %g s",
        limit,
        open_files,
        settings.header_timeout_s,
        settings.keep_alive_timeout_s,
    )
    return guarded_protocol(ConnectionGuard(limit, settings.header_timeout_s, settings.keep_alive_timeout_s))
