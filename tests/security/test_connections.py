"""A connection flood against a real platform: one client's thousands of idle and slowloris connections neither
starve another tenant nor keep their descriptors; and running out of descriptors is reported as what it is.

All traffic goes to 127.0.0.1. Loops are bounded by counts and deadlines; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import selectors
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from functions.backends.base import Outgoing
from functions.backends.local import LocalBackend
from functions.backends.pool import WorkerProcess
from functions.errors import Unavailable, error_response
from functions.registry import FunctionConfig, FunctionRecord
from functions.settings import Settings
from tests.conftest import deploy, example, make_tenant, oip_body, wait_for

IDLE_CONNECTIONS = 3_000
SLOWLORIS_CONNECTIONS = 20
CALLS = 50


@pytest.fixture
def many_sockets() -> Iterator[None]:
    """This test process opens thousands of sockets: its soft open-file limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + SLOWLORIS_CONNECTIONS + 1_000
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {needed} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def infer(url: str, key: str, body: dict[str, object]) -> httpx.Response:
    """One call on a connection of its own: the platform must still accept new connections under the flood."""
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=60) as client:
        return client.post("/t/bee/v2/models/classify/infer", json=body)


def closed_by_server(
    socks: list[socket.socket], timeout: float, enough: int | None = None
) -> tuple[int, dict[socket.socket, bytes]]:
    """Wait until the server has closed ENOUGH of SOCKS (default: all), at most TIMEOUT; returns how many it
    closed and what the closed ones were sent first."""
    enough = len(socks) if enough is None else enough
    received: dict[socket.socket, bytes] = {}
    closed = 0
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while closed < enough and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[sock] = received.get(sock, b"") + chunk
                    continue
                selector.unregister(sock)
                closed += 1
    return closed, received


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


@pytest.mark.slow
def test_idle_and_slowloris_connections_are_closed_while_another_tenant_is_served(
    platform_factory, models, many_sockets
):
    platform = platform_factory(
        "--pool-size", "1", "--header-timeout", "2s", "--keep-alive-timeout", "2s"
    )  # fmt: skip
    bee = make_tenant(platform, "bee")
    assert deploy(bee, "classify", models["mlp"])["status"] == "ready"
    inputs, _ = example(models["mlp"])
    body = oip_body(inputs)
    assert infer(platform.url, bee.key, body).status_code == 200
    address = ("127.0.0.1", platform.port)

    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    statuses = []
    try:
        for _ in range(SLOWLORIS_CONNECTIONS):
            sock = socket.create_connection(address, timeout=30)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            slow.append(sock)
        per_round = IDLE_CONNECTIONS // CALLS
        for n in range(CALLS):
            idle.extend(socket.create_connection(address, timeout=30) for _ in range(per_round))
            for sock in slow:  # one more header line each round, as a slowloris client does
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b"x-trickle-%d: 1\r\n" % n)
            statuses.append(infer(platform.url, bee.key, body).status_code)
        assert statuses == [200] * CALLS  # every one of tenant B's calls, during the whole flood

        closed, _ = closed_by_server(idle, timeout=60)
        assert closed == len(idle), f"{len(idle) - closed} idle connections still open after 60 s"
        slow_cut, answers = closed_by_server(slow, timeout=60)
        assert slow_cut == len(slow), f"{len(slow) - slow_cut} slowloris connections still open after 60 s"
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers.values()), answers
    finally:
        close_all(idle + slow)
    # The descriptors came back too, and the platform serves as before.
    assert platform.process is not None
    wait_for(lambda: open_fds(platform.process.pid) < 1_000, timeout=30, what="the platform's descriptors")
    assert infer(platform.url, bee.key, body).status_code == 200


@pytest.mark.slow
def test_beyond_the_connection_limit_idle_connections_make_room_for_another_tenant(
    platform_factory, models, many_sockets
):
    limit = 200
    # The timeouts far away: only the limit closes anything here.
    platform = platform_factory(
        "--pool-size", "1", "--max-connections", str(limit), "--header-timeout", "10m",
        "--keep-alive-timeout", "10m",
    )  # fmt: skip
    bee = make_tenant(platform, "bee")
    assert deploy(bee, "classify", models["mlp"])["status"] == "ready"
    inputs, _ = example(models["mlp"])
    body = oip_body(inputs)
    assert infer(platform.url, bee.key, body).status_code == 200
    assert platform.process is not None
    before = open_fds(platform.process.pid)
    address = ("127.0.0.1", platform.port)

    flood: list[socket.socket] = []
    statuses = []
    try:
        for _ in range(CALLS):
            flood.extend(socket.create_connection(address, timeout=30) for _ in range(5 * limit // CALLS))
            statuses.append(infer(platform.url, bee.key, body).status_code)
        assert statuses == [200] * CALLS

        # The server holds at most `limit` of the flood: it closed the rest to make room.
        closed, _ = closed_by_server(flood, timeout=60, enough=len(flood) - limit)
        assert closed >= len(flood) - limit, (
            f"{len(flood) - closed} of the flood open, over the limit of {limit}"
        )
        assert open_fds(platform.process.pid) <= before + limit + 10
    finally:
        close_all(flood)
    assert "at the connection limit (200)" in platform.log()


# ------------------------------------------------------------------ running out of descriptors, told truly


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _worker_server(uds: Path) -> web.AppRunner:
    """Stands in for a worker: answers every inference request 200."""

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"outputs": []}, headers={"x-paddlefn-engine": "paddle-inference"})

    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(uds)).start()
    return runner


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """Lower this process's soft open-file limit to the lowest free descriptor: the next one cannot be had."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_platform_out_of_descriptors_answers_503_saying_so_not_that_the_replica_stopped(tmp_path):
    async def scenario() -> tuple[Unavailable, int, Unavailable]:
        backend = LocalBackend(Settings(data_dir=tmp_path / "data"))
        uds = Path(tempfile.mkdtemp(prefix="pfn-test-")) / "w1.sock"  # short: Unix socket paths are limited
        runner = await _worker_server(uds)
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
        worker = WorkerProcess(1, process, uds, tmp_path / "worker-1.log")
        now = datetime.now(UTC)
        fn = FunctionRecord(
            id=1, tenant="bee", name="classify", status="ready", config=FunctionConfig(), version="v1",
            artifact_dir=tmp_path, manifest=None, error=None, created_at=now, updated_at=now,
        )  # fmt: skip
        backend.adopt(fn, worker)
        request = Outgoing("/v2/models/classify/infer", b"{}", {}, cold_start_timeout_s=5, timeout_s=5)
        try:
            with out_of_descriptors(), pytest.raises(Unavailable) as no_fds:
                await backend.forward(fn, request)
            answered = await backend.forward(fn, request)  # the worker was fine all along
            await runner.cleanup()  # now it really is gone
            with pytest.raises(Unavailable) as gone:
                await backend.forward(fn, request)
            return no_fds.value, answered.status, gone.value
        finally:
            process.kill()
            await process.wait()
            await worker.stop(grace=0)
            await backend.close()
            shutil.rmtree(uds.parent, ignore_errors=True)

    no_fds, status, gone = run(scenario())
    assert no_fds.message == (
        "could not reach the replica of bee/classify: the platform is out of file descriptors "
        "(Too many open files); retry"
    )
    response = error_response(no_fds)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert b"stopped" not in response.body
    assert status == 200
    assert "stopped while handling this request" in gone.message  # a worker that did go is still told as such
