"""The scaler as a process: a tick loop (one PromQL query -> the board), KEDA gRPC server, wake endpoint.

Everything runs on one asyncio loop, so the board needs no locks; the blocking Prometheus query runs in a
worker thread. A failed tick is logged and skipped (activity stays as it was) - the loop itself never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import grpc
import uvicorn

from scaler.activity import Board, Key, Sample
from scaler.keda import add_to_server
from scaler.settings import ScalerSettings
from scaler.wake import wake_app

log = logging.getLogger("paddlefn.scaler")


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection during a tick. Decoding a big answer makes tens of thousands of short-lived
    dicts (freed by reference counting, no cycles), and each burst of them triggered collections that walked
    every long-lived object: measured, that doubled or tripled a 10,000-function tick. It runs between ticks."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class MetricSource(Protocol):
    def fetch(self) -> Mapping[Key, Sample]:
        """All functions' samples, in one round trip (blocking)."""

    def close(self) -> None: ...


class ScalerService:
    def __init__(
        self, settings: ScalerSettings, source: MetricSource, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.source = source
        self.clock = clock
        self.board = Board(activity_window_s=settings.activity_window_s)
        self.grpc_port = 0  # the bound port, once started (the setting may ask for port 0)
        self.http_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def step(self) -> None:
        deadline = self.settings.query_timeout_s + 1
        with paused_gc():
            samples = await asyncio.wait_for(asyncio.to_thread(self.source.fetch), deadline)
            self.board.observe(samples, self.clock())

    async def run_ticks(self) -> None:
        failing_since: float | None = None  # a Prometheus outage is logged once a minute, not every tick
        last_logged = 0.0
        while True:
            started = time.perf_counter()
            try:
                await self.step()
                if failing_since is not None:
                    log.info("scaler ticks work again after %.0f s", started - failing_since)
                    failing_since = None
            except Exception as exc:  # SourceError, timeouts, anything: the next tick tries again
                if failing_since is None or started - last_logged >= 60:
                    failing_since = failing_since or started
                    last_logged = started
                    log.warning(
                        "scaler tick failed, activity unchanged: %s", str(exc)[:300] or type(exc).__name__
                    )
            spent = time.perf_counter() - started
            await asyncio.sleep(max(self.settings.tick_s - spent, 0.0))

    async def start(self) -> None:
        # KEDA keeps one StreamIsActive stream open per ScaledObject, all on one connection: allow many.
        self._grpc = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1_000_000)])
        add_to_server(self.board, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(self.settings.grpc_address)
        await self._grpc.start()

        config = uvicorn.Config(
            wake_app(self.board, self.settings.wake_token, self.clock),
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            lifespan="off",
        )
        self._http = uvicorn.Server(config)
        self._tasks.append(asyncio.create_task(self._http.serve()))
        while not self._http.started:  # polled, not slept for: the port is known once it listens
            if self._tasks[0].done():
                self._tasks[0].result()  # raises why it could not start (port taken...)
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self.run_ticks()))
        log.info("scaler: gRPC on %d, wake endpoint on %d", self.grpc_port, self.http_port)

    async def stop(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for task in reversed(self._tasks):
            if task is not self._tasks[0]:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.source.close()
