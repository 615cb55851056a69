"""functions.connections against a real uvicorn server in a thread: head timeout, keep-alive, connection limit.

The server runs the same protocol class as the platform, on a free port of 127.0.0.1, with a tiny ASGI app; the
tests talk to it with plain sockets, so they see exactly what a client sees (bytes, EOF).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn

from functions.connections import ConnectionGuard, connection_limit, guarded_protocol
from tests.conftest import free_port, wait_for

REQUEST = b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n"
SLOW_REQUEST = b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n"


@dataclass
class Server:
    port: int
    guard: ConnectionGuard
    release: threading.Event  # lets /slow answer

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def app_with_slow_route(release: threading.Event):  # type: ignore[no-untyped-def]
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            await asyncio.to_thread(release.wait, 30)  # set from the test's thread
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[tuple[uvicorn.Server, threading.Thread, threading.Event]] = []

    def start(limit: int = 100, header_timeout_s: float = 30.0, keep_alive_timeout_s: float = 30.0) -> Server:
        guard = ConnectionGuard(limit, header_timeout_s, keep_alive_timeout_s)
        release = threading.Event()
        port = free_port()
        config = uvicorn.Config(
            app_with_slow_route(release),
            host="127.0.0.1",
            port=port,
            http=guarded_protocol(guard),
            lifespan="off",
            log_level="error",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread, release))
        wait_for(lambda: server.started, timeout=10, what="the test server to start")
        return Server(port, guard, release)

    yield start
    for server, thread, release in servers:
        release.set()
        server.should_exit = True
        thread.join(10)


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection; fails if it has not within TIMEOUT."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def response_of(sock: socket.socket, request: bytes | None = REQUEST) -> bytes:
    """Send REQUEST (None: it was sent already) and read its response."""
    if request is not None:
        sock.sendall(request)
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"ok"):
        chunk = sock.recv(65536)
        assert chunk, f"closed before the response was complete: {data!r}"
        data += chunk
    return data


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(serve):
    server = serve(header_timeout_s=0.3)
    with server.connect() as sock:
        assert read_until_closed(sock) == b""  # nothing was asked, so nothing is answered
    assert server.guard.head_timeouts == 1


def test_a_client_trickling_header_lines_is_closed_with_408(serve):
    server = serve(header_timeout_s=0.5)
    with server.connect() as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nhost: test\r\n")
        sock.settimeout(0.1)
        received = b""
        for i in range(100):  # at most 10 s of trickling, far beyond the timeout
            try:
                sock.sendall(b"x-slow-%d: 1\r\n" % i)
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        else:
            pytest.fail("the server kept a trickling request head open for 10 s")
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'"the request head did not arrive in time"' in received


def test_a_kept_alive_connection_serves_requests_then_closes_when_idle(serve):
    server = serve(header_timeout_s=5, keep_alive_timeout_s=0.3)
    with server.connect() as sock:
        assert response_of(sock).startswith(b"HTTP/1.1 200 OK")
        assert response_of(sock).startswith(b"HTTP/1.1 200 OK")  # the same connection, kept alive
        assert read_until_closed(sock) == b""
    assert server.guard.head_timeouts == 0  # closed by the keep-alive timer, not the head one


def test_the_next_request_on_a_kept_alive_connection_has_the_header_timeout_too(serve):
    server = serve(header_timeout_s=0.5, keep_alive_timeout_s=0.5)
    with server.connect() as sock:
        assert response_of(sock).startswith(b"HTTP/1.1 200 OK")
        sock.sendall(b"GET /hello HTTP/1.1\r\n")  # stops uvicorn's keep-alive timer; the head one takes over
        for i in range(100):
            time.sleep(0.1)
            try:
                sock.sendall(b"x-slow-%d: 1\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                break
            if server.guard.head_timeouts:
                break
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")


def test_at_the_limit_a_new_connection_closes_the_longest_idle_one(serve):
    server = serve(limit=3)
    socks = []
    try:
        for n in range(1, 4):
            socks.append(server.connect())
            wait_for(lambda n=n: server.guard.open == n, what=f"{n} connections")
        newest = server.connect()
        socks.append(newest)
        assert read_until_closed(socks[0]) == b""  # the oldest idle one made room
        assert response_of(newest).startswith(b"HTTP/1.1 200 OK")
        wait_for(lambda: server.guard.open == 3, what="3 connections")
        assert server.guard.evicted == 1
    finally:
        for sock in socks:
            sock.close()


def test_a_connection_with_a_request_in_progress_is_never_closed_to_make_room(serve):
    server = serve(limit=2)
    busy, idle = server.connect(), server.connect()
    extra: list[socket.socket] = []
    try:
        busy.sendall(SLOW_REQUEST)
        wait_for(lambda: len(server.guard.idle) == 1, what="the slow request to start")
        extra.append(server.connect())
        assert read_until_closed(idle) == b""  # the idle one went, not the busy one
        extra[0].sendall(SLOW_REQUEST)
        wait_for(lambda: not server.guard.idle, what="both connections to be busy")
        extra.append(server.connect())  # every connection has a request in progress: refused, truthfully
        refused = read_until_closed(extra[1])
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"retry-after: 1" in refused
        assert b"the platform is at its connection limit" in refused
        server.release.set()
        assert response_of(busy, None).startswith(b"HTTP/1.1 200 OK")
        assert server.guard.refused == 1
    finally:
        for sock in (busy, idle, *extra):
            sock.close()


def test_a_websocket_upgrade_is_served_as_plain_http_and_stays_counted(serve):
    server = serve(limit=5)
    with server.connect() as sock:
        upgrade = b"GET /hello HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        assert response_of(sock, upgrade).startswith(b"HTTP/1.1 200 OK")
        assert server.guard.open == 1
    wait_for(lambda: server.guard.open == 0, what="the connection to be uncounted")


@pytest.mark.parametrize(
    ("requested", "open_files", "limit"),
    [
        (0, 20_000, 10_000),  # the default
        (0, 1_048_576, 10_000),
        (0, 1_024, 512),  # never more than half the descriptors
        (500, 20_000, 500),
        (15_000, 20_000, 10_000),
        (3, 1, 1),
    ],
)
def test_connection_limit_leaves_half_the_descriptors(requested, open_files, limit):
    assert connection_limit(requested, open_files) == limit


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from functions.connections import raise_open_file_limit\n"
        "now = raise_open_file_limit()\n"
        "assert now == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0], (now, hard)\n"
        "print(now)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
