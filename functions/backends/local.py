"""The embedded backend: each replica is a worker process on this machine, reached over a Unix socket.

Per function a ReplicaSet holds the ready replicas, each with a fixed number of request slots, and a FIFO of
requests waiting for a slot. A request that finds the function asleep wakes it at once (no scaler tick) and
waits up to its cold-start timeout. When every worker slot is taken, the least recently used idle function is
put to sleep early to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from functions.backends.base import PASSED_RESPONSE_HEADERS, Forwarded, Outgoing, WakeListener
from functions.backends.pool import NoCapacity, WorkerPool, WorkerProcess, WorkerStartError
from functions.errors import GatewayTimeout, Unavailable
from functions.registry import FunctionRecord
from functions.settings import Settings

log = logging.getLogger("paddlefn.local")


@dataclass(eq=False)
class Replica:
    worker: WorkerProcess
    slots: int
    in_flight: int = 0
    draining: bool = False


@dataclass(eq=False)
class ReplicaSet:
    fn: FunctionRecord
    replicas: list[Replica] = field(default_factory=list)
    starting: int = 0
    desired: int = 0
    waiters: deque[asyncio.Future[Replica]] = field(default_factory=deque)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def count(self) -> int:
        return len(self.replicas) + self.starting

    @property
    def busy(self) -> bool:
        return bool(self.waiters) or any(r.in_flight for r in self.replicas)

    def acquire_nowait(self) -> Replica | None:
        free = [r for r in self.replicas if not r.draining and r.in_flight < r.slots]
        if not free:
            return None
        replica = min(free, key=lambda r: r.in_flight)
        replica.in_flight += 1
        return replica

    def wait(self) -> asyncio.Future[Replica]:
        future: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        return future

    def hand_out(self) -> None:
        """Give free slots to waiting requests, oldest first."""
        while self.waiters:
            if self.waiters[0].done():  # gave up (timeout or client gone)
                self.waiters.popleft()
                continue
            replica = self.acquire_nowait()
            if replica is None:
                return
            self.waiters.popleft().set_result(replica)

    def fail_waiters(self, error: Exception) -> None:
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = WorkerPool(settings, on_exit=self._worker_exited)
        self._sets: dict[tuple[str, str], ReplicaSet] = {}
        self._listeners: list[WakeListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.pool.refill()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rs in self._sets.values():
            rs.fail_waiters(Unavailable("the platform is shutting down", retry_after=5))
        await self.pool.close()

    def on_wake(self, listener: WakeListener) -> None:
        self._listeners.append(listener)

    def capacity(self) -> dict[str, int]:
        return {"total": self.pool.capacity, "in_use": self.pool.used, "idle_warm": len(self.pool.idle)}

    def replicas(self, fn: FunctionRecord) -> int:
        rs = self._sets.get(fn.key)
        return rs.count if rs else 0

    def replica_info(self, fn: FunctionRecord) -> list[dict[str, Any]]:
        rs = self._sets.get(fn.key)
        if rs is None:
            return []
        return [{"pid": r.worker.pid, "in_flight": r.in_flight, "slots": r.slots} for r in rs.replicas]

    def pending(self, fn: FunctionRecord) -> int:
        rs = self._sets.get(fn.key)
        return sum(1 for w in rs.waiters if not w.done()) if rs else 0

    def ready_replicas(self, fn: FunctionRecord) -> int:
        rs = self._sets.get(fn.key)
        return len(rs.replicas) if rs else 0

    def _set(self, fn: FunctionRecord) -> ReplicaSet:
        rs = self._sets.get(fn.key)
        if rs is None:
            rs = self._sets[fn.key] = ReplicaSet(fn)
        rs.fn = fn  # the record may have been replaced (new config)
        return rs

    async def deployed(self, fn: FunctionRecord) -> None:
        # As Knative's initial scale: a new function starts one replica so its first request is warm.
        await self.set_replicas(fn, max(fn.config.min_scale, 1))

    async def removed(self, fn: FunctionRecord) -> None:
        rs = self._sets.pop(fn.key, None)
        if rs is None:
            return
        rs.desired = 0
        rs.fail_waiters(Unavailable(f"function {fn.label} was deleted"))
        await asyncio.gather(*(r.worker.stop() for r in rs.replicas), return_exceptions=True)

    async def reconfigured(self, fn: FunctionRecord) -> None:
        rs = self._sets.get(fn.key)
        if rs is None:
            return
        restart = self._load_parameters(rs.fn) != self._load_parameters(fn)
        rs.fn = fn
        for replica in rs.replicas:
            replica.slots = fn.config.slots_per_replica
        if restart:  # workers load with the settings they were given: new ones pick up the change
            wanted = rs.desired
            for replica in list(rs.replicas):
                self._retire(rs, replica)
            await self.set_replicas(fn, wanted)
        rs.hand_out()

    async def set_replicas(self, fn: FunctionRecord, count: int) -> None:
        rs = self._set(fn)
        rs.desired = count
        for _ in range(count - rs.count):
            rs.starting += 1
            self._spawn_task(self._start_replica(rs), f"start-{fn.label}")
        surplus = len(rs.replicas) + rs.starting - count
        if surplus > 0:
            # Idle replicas go first; busy ones stop taking requests and exit when their last one ends.
            for replica in sorted(rs.replicas, key=lambda r: r.in_flight)[:surplus]:
                self._retire(rs, replica)

    def _retire(self, rs: ReplicaSet, replica: Replica) -> None:
        if replica in rs.replicas:
            rs.replicas.remove(replica)
        replica.draining = True
        if replica.in_flight == 0:
            self._spawn_task(replica.worker.stop(), f"stop-worker-{replica.worker.id}")

    async def _start_replica(self, rs: ReplicaSet) -> None:
        fn = rs.fn
        worker: WorkerProcess | None = None
        try:
            worker = await self._take_worker(rs)
            await worker.load(fn.name, self._load_parameters(fn), timeout=self._cold_timeout(fn))
        except Exception as exc:
            rs.starting -= 1
            reason = str(exc) if isinstance(exc, (WorkerStartError, Unavailable)) else repr(exc)
            log.error("could not start a replica of %s: %s", fn.label, reason)
            if worker is not None:
                await worker.stop(grace=1)
            if isinstance(exc, Unavailable):
                rs.fail_waiters(exc)
            else:
                rs.fail_waiters(Unavailable(f"function {fn.label} could not start: {reason}", retry_after=5))
            rs.desired = min(rs.desired, rs.count)
            return
        rs.starting -= 1
        if self._sets.get(fn.key) is not rs or (rs.count >= rs.desired and not rs.waiters):
            await worker.stop()  # scaled down or deleted while it started
            return
        rs.replicas.append(Replica(worker, slots=rs.fn.config.slots_per_replica))
        rs.hand_out()

    async def _take_worker(self, rs: ReplicaSet) -> WorkerProcess:
        deadline = time.monotonic() + self._cold_timeout(rs.fn)
        while True:
            try:
                return await self.pool.take()
            except NoCapacity as exc:
                changed = self.pool.changed
                if not self._evict_one(exclude=rs):
                    log.info("no worker slot for %s: %s; waiting", rs.fn.label, exc)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(
                        f"no capacity: all {self.pool.capacity} worker slots are busy with active functions",
                        retry_after=5,
                    ) from None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)

    def _evict_one(self, exclude: ReplicaSet) -> bool:
        """Put the least recently used idle function to sleep early, to give its worker to a busy one."""
        idle = [
            rs
            for rs in self._sets.values()
            if rs is not exclude and len(rs.replicas) > rs.fn.config.min_scale and not rs.busy
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda rs: rs.last_used)
        replica = victim.replicas[0]
        log.info("capacity pressure: %s sleeps early to free a worker", victim.fn.label)
        victim.desired = max(0, victim.desired - 1)
        self._retire(victim, replica)
        return True

    def _load_parameters(self, fn: FunctionRecord) -> dict[str, Any]:
        params: dict[str, Any] = {"model_dir": str(fn.serving_dir), "cpu_threads": self.settings.cpu_threads}
        isolation = self.settings.worker_isolation
        if isolation == "required" or (isolation == "auto" and os.geteuid() == 0):
            params["confine"] = {
                "tenant_dir": str((self.settings.data_dir / "tenants" / fn.tenant).resolve()),
                "data_dir": str(self.settings.data_dir.resolve()),
                "uid": self.settings.tenant_uid_base + fn.tenant_id,
                "required": isolation == "required",
            }
        if fn.config.batching:
            params["max_batch_size"] = fn.config.batching.max_batch_size
            params["max_queue_delay_ms"] = fn.config.batching.max_queue_delay_ms
        return params

    def _cold_timeout(self, fn: FunctionRecord) -> float:
        """How long a replica may take to load. Never shorter than the platform's default: a request that gave
        up waiting (504) does not abandon the wake-up, so the next request finds the function warm."""
        return max(fn.config.cold_start_timeout_s or 0.0, self.settings.cold_start_timeout_s)

    async def forward(self, fn: FunctionRecord, request: Outgoing) -> Forwarded:
        rs = self._set(fn)
        rs.last_used = time.monotonic()
        cold_start: float | None = None
        replica = rs.acquire_nowait()
        if replica is None:
            asleep = not rs.replicas
            future = rs.wait()
            if asleep and rs.starting == 0:
                for listener in self._listeners:
                    listener(fn)
                await self.set_replicas(fn, max(rs.desired, 1))
            started = time.perf_counter()
            timeout = request.cold_start_timeout_s if asleep else request.timeout_s
            try:
                replica = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                if asleep:
                    raise GatewayTimeout(
                        f"function {fn.label} did not wake within its cold-start timeout of {timeout:g} s"
                    ) from None
                raise GatewayTimeout(f"no replica of {fn.label} was free within {timeout:g} s") from None
            if asleep:
                cold_start = time.perf_counter() - started
        try:
            response = await replica.worker.client.post(
                request.path, content=request.body, headers=request.headers, timeout=request.timeout_s
            )
        except httpx.TimeoutException:
            raise GatewayTimeout(f"function {fn.label} took longer than {request.timeout_s:g} s to answer") from None
        except httpx.TransportError:
            raise Unavailable(
                f"the replica of {fn.label} stopped while handling this request "
                f"({replica.worker.exit_reason()}); retry",
                retry_after=1,
            ) from None
        finally:
            self._release(rs, replica)
        headers = {k: v for k in PASSED_RESPONSE_HEADERS if (v := response.headers.get(k)) is not None}
        return Forwarded(
            status=response.status_code,
            body=response.content,
            headers=headers,
            engine=response.headers.get("x-paddlefn-engine", ""),
            device=response.headers.get("x-paddlefn-device", ""),
            compute_ms=float(response.headers.get("x-paddlefn-compute-ms", 0.0)),
            cold_start_s=cold_start,
        )

    def _release(self, rs: ReplicaSet, replica: Replica) -> None:
        replica.in_flight -= 1
        rs.last_used = time.monotonic()
        if replica.draining:
            if replica.in_flight == 0 and replica.worker.alive:
                self._spawn_task(replica.worker.stop(), f"stop-worker-{replica.worker.id}")
        else:
            rs.hand_out()

    def _worker_exited(self, worker: WorkerProcess) -> None:
        for rs in self._sets.values():
            for replica in rs.replicas:
                if replica.worker is worker:
                    rs.replicas.remove(replica)
                    if not worker.stopping:
                        # A crash: the next request wakes a fresh worker, as do requests already waiting.
                        rs.desired = min(rs.desired, rs.count)
                        if rs.waiters and rs.count == 0:
                            self._spawn_task(self.set_replicas(rs.fn, 1), f"restart-{rs.fn.label}")
                    return

    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
