"""The embedded backend: each replica is a worker process on this machine, reached over a Unix socket.

Per function a ReplicaSet holds the ready replicas, each with a fixed number of request slots, and a FIFO of
requests waiting for a slot. A request that finds the function asleep wakes it at once (no scaler tick) and
waits up to its cold-start timeout. When every worker slot is taken, a replica is taken back to make room by the
rule of ``functions/slots.py``: replicas beyond their tenant's fair share of the slots (by plan weight) go first,
``min_scale`` ones included, the least recently used idle first; then an idle function sleeps early. A replica
with requests in flight is never taken, and while another tenant holds less than its share a tenant starts no
replica beyond its own, so a ``min_scale`` that cannot fit beside the others waits instead of taking slots back.

Paddle Lite (``config.device``/``config.fallback``): a replica is a Paddle Inference worker (the primary) or a
Paddle Lite one, from a pool of its own (``WorkerPool(engine="lite")``: no Paddle import, CPU only, its own slots).
``device=lite``: every replica is a Lite one. ``fallback=cold``: a request that finds no primary replica ready
also starts a Lite replica at once (Lite loads in ~0.15 s), and whichever is ready first answers; once a primary
replica is ready the Lite one is retired (it finishes what it holds). ``fallback=capacity``: when no primary
replica can be had (every worker slot taken, or the tenant's max_replicas reached) a Lite replica answers instead
of the request queueing or being refused, while the primary start waits for room; it is retired as above.
Lite fallback replicas are not counted in ``replicas`` (the scaler's number) nor in the tenant's max_replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functions.backends.base import PASSED_RESPONSE_HEADERS, Forwarded, Outgoing, WakeListener
from functions.backends.pool import (
    NoCapacity,
    WorkerGone,
    WorkerPool,
    WorkerProcess,
    WorkerStartError,
    WorkerTimeout,
    WorkerUnreachable,
    worker_env,
)
from functions.backends.template import WorkerTemplate
from functions.deploy import prepare_model
from functions.errors import FunctionTimeout, GatewayTimeout, Unavailable
from functions.registry import FunctionRecord
from functions.settings import Settings
from functions.slots import HeldReplica, Slots, TenantSlots, must_yield, reclaimable, start_limit
from runtime.spec import Manifest

log = logging.getLogger("paddlefn.local")


PADDLE, LITE = "paddle", "lite"  # load parameter `engine` of a replica


class _NotWanted(Exception):
    """A replica start that waited for room was called off (scaled down or deleted meanwhile, or nobody waits for it
    and its tenant holds its fair share while another tenant is short of its own)."""


def primary_engine(fn: FunctionRecord) -> str:
    return LITE if fn.config.device == "lite" else PADDLE


def lite_slots(fn: FunctionRecord) -> int:
    """Requests a Lite replica takes at once (it never batches)."""
    return fn.config.container_concurrency or 2 * fn.config.target_concurrency


@dataclass(eq=False)
class Replica:
    worker: WorkerProcess
    slots: int
    in_flight: int = 0
    draining: bool = False
    engine: str = PADDLE
    idle_since: float = field(default_factory=time.monotonic)  # when its last request ended


@dataclass(eq=False)
class ReplicaSet:
    fn: FunctionRecord
    replicas: list[Replica] = field(default_factory=list)  # primary replicas (Lite ones for device=lite)
    starting: int = 0
    claiming: int = 0  # of the starting ones, those without a worker yet
    desired: int = 0
    fallback: list[Replica] = field(default_factory=list)  # Lite replicas answering for the primary
    fallback_starting: int = 0
    waiters: deque[asyncio.Future[Replica]] = field(default_factory=deque)
    last_used: float = field(default_factory=time.monotonic)
    _start_watchers: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.replicas) + self.starting

    @property
    def busy(self) -> bool:
        return bool(self.waiters) or any(r.in_flight for r in [*self.replicas, *self.fallback])

    def acquire_nowait(self) -> Replica | None:
        """A free slot of a primary replica; failing that, of a Lite fallback replica (only while one runs)."""
        free = [r for r in self.replicas if not r.draining and r.in_flight < r.slots]
        if not free:
            free = [r for r in self.fallback if not r.draining and r.in_flight < r.slots]
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

    def start_ended(self) -> asyncio.Future[None]:
        """Resolves when the next replica start of this set ends (ready, failed or called off)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._start_watchers.append(future)
        return future

    def notify_start_ended(self) -> None:
        watchers, self._start_watchers = self._start_watchers, []
        for future in watchers:
            if not future.done():
                future.set_result(None)

    def fail_waiters(self, error: Exception) -> None:
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One template forks the workers of both pools (a Lite worker is runtime.server too, without Paddle).
        self.template = (
            WorkerTemplate(worker_env(settings), settings.data_dir / "logs" / "template.log")
            if settings.worker_start == "fork"
            else None
        )
        self.pool = WorkerPool(settings, on_exit=self._worker_exited, template=self.template)
        self.lite_pool = WorkerPool(
            settings, on_exit=self._worker_exited, engine=LITE, template=self.template
        )
        self._sets: dict[tuple[str, str], ReplicaSet] = {}
        self._replica_quota: Callable[[str], int] | None = None  # tenant -> max_replicas
        self._weight_of: Callable[[str], int] | None = None  # tenant -> plan weight (fair shares of slots)
        self._listeners: list[WakeListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.pool.refill()
        self._spawn_task(self._reap_fallbacks(), "reap-lite-fallbacks")
        self._spawn_task(self.pool.watch_memory(), "watch-worker-memory")

    async def _reap_fallbacks(self) -> None:
        """A Lite replica that stood in for a busy primary (fallback=capacity) goes once it has been idle for the
        scale-down delay while its primary runs; one that stood in for a sleeping function goes with it."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for rs in list(self._sets.values()):
                if not rs.replicas:
                    continue
                for replica in list(rs.fallback):
                    if (
                        replica.in_flight == 0
                        and now - replica.idle_since >= self.settings.scale_down_delay_s
                    ):
                        log.info("%s: idle Lite fallback replica retired", rs.fn.label)
                        self._retire(rs, replica)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rs in self._sets.values():
            rs.fail_waiters(Unavailable("the platform is shutting down", retry_after=5))
        await asyncio.gather(self.pool.close(), self.lite_pool.close())
        if self.template is not None:
            await self.template.close()
            self.template.close_lifeline()

    def on_wake(self, listener: WakeListener) -> None:
        self._listeners.append(listener)

    def set_replica_quota(self, max_replicas_of: Callable[[str], int]) -> None:
        """The tenant's max_replicas: with fallback=capacity, a primary start beyond it waits while Lite answers.
        (Other functions keep the scaler's rule: a sleeping function may always wake to one replica.) A tenant's
        demand for worker slots counts no more than it (functions/slots.py)."""
        self._replica_quota = max_replicas_of

    def set_slot_weights(self, weight_of: Callable[[str], int]) -> None:
        """The tenant's plan weight: its share of contended worker slots (functions/slots.py); 1 without it."""
        self._weight_of = weight_of

    def capacity(self) -> dict[str, int]:
        return {"total": self.pool.capacity, "in_use": self.pool.used, "idle_warm": len(self.pool.idle),
                "lite_total": self.lite_pool.capacity, "lite_in_use": self.lite_pool.used,
                "lite_idle_warm": len(self.lite_pool.idle)}  # fmt: skip

    def memory(self) -> dict[str, Any]:
        """The memory budget of warm workers and what they are measured to take (MiB; PSS)."""
        m = self.pool.memory
        return {"budget_mb": m.budget_mb, "used_mb": round(m.used_mb, 1), "per_worker_mb": round(m.worker_mb, 1),
                "template_mb": round(m.template_mb, 1), "worker_start": self.settings.worker_start,
                "template_pid": self.template.pid if self.template is not None and self.template.alive else None,
                "limited_by": "max_workers" if self.settings.max_workers else "memory"}  # fmt: skip

    def _pool(self, engine: str) -> WorkerPool:
        return self.lite_pool if engine == LITE else self.pool

    def replicas(self, fn: FunctionRecord) -> int:
        rs = self._sets.get(fn.key)
        return rs.count if rs else 0

    def replica_info(self, fn: FunctionRecord) -> list[dict[str, Any]]:
        rs = self._sets.get(fn.key)
        if rs is None:
            return []
        return [
            {"pid": r.worker.pid, "in_flight": r.in_flight, "slots": r.slots, "engine": r.engine,
             "fallback": r in rs.fallback}
            for r in [*rs.replicas, *rs.fallback]
        ]  # fmt: skip

    def lite_replicas(self, fn: FunctionRecord) -> int:
        """Lite fallback replicas running or starting (on top of ``replicas``)."""
        rs = self._sets.get(fn.key)
        return len(rs.fallback) + rs.fallback_starting if rs else 0

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
        if fn.config.uses_lite:
            self.lite_pool.activate(self.settings.lite_pool_size)
        return rs

    async def prepare(
        self, fn: FunctionRecord, *, device: str, batching: bool, on_stage: Callable[[str], None]
    ) -> Manifest:
        """Prepare in a process confined like FN's workers, as the tenant's user, seeing only the function's own
        folder (writable: it writes the serving folder), with CPU, file-size and process limits."""
        confine = None
        if self._confining():
            uid = self._uid(fn)
            version_dir = fn.artifact_dir
            await asyncio.to_thread(_chown_tree, version_dir, uid)
            mib = 1024 * 1024
            confine = {
                "data_dir": str(self.settings.data_dir.resolve()),
                "uid": uid,
                "cpu_seconds": max(1, int(self.settings.deploy_timeout_s)),
                "max_file_mb": self.settings.max_unpacked_bytes // mib + 64,
                "max_processes": self.settings.tenant_max_processes,
                "max_memory_mb": self.settings.worker_memory_mb,  # the same memory limit as its workers
            }
        return await prepare_model(
            self.settings, fn.artifact_dir / "model", fn.serving_dir,
            device=device, batching=batching, on_stage=on_stage, confine=confine, template=self.template,
        )  # fmt: skip

    def _confining(self) -> bool:
        isolation = self.settings.worker_isolation
        return isolation == "required" or (isolation == "auto" and os.geteuid() == 0)

    def _uid(self, fn: FunctionRecord) -> int:
        return self.settings.tenant_uid_base + fn.tenant_id

    async def deployed(self, fn: FunctionRecord) -> None:
        # As Knative's initial scale: a new function starts one replica so its first request is warm.
        await self.set_replicas(fn, max(fn.config.min_scale, 1))
        # Wait for the first one (the platform says READY only then), however its start ends: a start that
        # fails or is called off (fair shares) leaves a ready function whose first request starts one.
        rs = self._sets.get(fn.key)
        while rs is not None and rs.starting and not rs.replicas:
            ended = rs.start_ended()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended, self._cold_timeout(fn))
            if not ended.done():
                return

    async def removed(self, fn: FunctionRecord) -> None:
        rs = self._sets.pop(fn.key, None)
        if rs is None:
            return
        rs.desired = 0
        rs.fail_waiters(Unavailable(f"function {fn.label} was deleted"))
        await asyncio.gather(*(r.worker.stop() for r in [*rs.replicas, *rs.fallback]), return_exceptions=True)

    async def reconfigured(self, fn: FunctionRecord) -> None:
        rs = self._sets.get(fn.key)
        if rs is None:
            return
        restart = self._load_parameters(rs.fn, primary_engine(rs.fn)) != self._load_parameters(
            fn, primary_engine(fn)
        )
        self._set(fn)
        for replica in rs.replicas:
            replica.slots = lite_slots(fn) if replica.engine == LITE else fn.config.slots_per_replica
        for replica in rs.fallback:
            replica.slots = lite_slots(fn)
        if fn.config.fallback == "none" or fn.config.device == "lite":
            self._retire_fallback(rs)
        if restart:  # workers load with the settings they were given: new ones pick up the change
            wanted = rs.desired
            for replica in list(rs.replicas):
                self._retire(rs, replica)
            await self.set_replicas(fn, wanted)
        rs.hand_out()

    async def set_replicas(self, fn: FunctionRecord, count: int) -> None:
        """Run COUNT replicas: starts stop at the tenant's fair share while another tenant is short of its own
        (``clamp_replicas``; the scaler asks again later); scale-downs are not held."""
        rs = self._set(fn)
        rs.desired = count
        for _ in range(self.clamp_replicas(fn, count) - rs.count):
            rs.starting += 1
            rs.claiming += 1
            self._spawn_task(self._start_replica(rs), f"start-{fn.label}")
        surplus = len(rs.replicas) + rs.starting - count
        if surplus > 0:
            # Idle replicas go first; busy ones stop taking requests and exit when their last one ends.
            for replica in sorted(rs.replicas, key=lambda r: r.in_flight)[:surplus]:
                self._retire(rs, replica)
        if count == 0:  # the function sleeps: Lite stand-ins go with it
            self._retire_fallback(rs)

    def _retire(self, rs: ReplicaSet, replica: Replica) -> None:
        if replica in rs.replicas:
            rs.replicas.remove(replica)
        if replica in rs.fallback:
            rs.fallback.remove(replica)
        replica.draining = True
        if replica.in_flight == 0:
            self._spawn_task(replica.worker.stop(), f"stop-worker-{replica.worker.id}")

    def _kill(self, rs: ReplicaSet, replica: Replica, why: str) -> None:
        """End REPLICA now (SIGKILL): it overran; the function's next request starts a fresh one."""
        log.warning("%s: worker %d killed: %s", rs.fn.label, replica.worker.id, why)
        replica.worker.stopping = True
        replica.worker.kill()
        self._retire(rs, replica)
        rs.desired = min(rs.desired, rs.count)
        if rs.waiters and rs.count == 0:  # requests queued behind it get a fresh replica
            self._spawn_task(self.set_replicas(rs.fn, 1), f"restart-{rs.fn.label}")

    def _retire_fallback(self, rs: ReplicaSet) -> None:
        for replica in list(rs.fallback):
            log.info("%s: Lite fallback replica (worker %d) retired", rs.fn.label, replica.worker.id)
            self._retire(rs, replica)

    # ---------------------------------------------------------------- Lite fallback

    def _want_fallback(self, rs: ReplicaSet, why: str) -> None:
        """Start a Lite replica to answer for the primary, unless one runs or starts already."""
        fn = rs.fn
        if fn.config.fallback == "none" or fn.config.device == "lite" or rs.fallback or rs.fallback_starting:
            return
        log.info("%s: starting a Lite fallback replica (%s)", fn.label, why)
        rs.fallback_starting += 1
        self._spawn_task(self._start_fallback(rs), f"start-lite-{fn.label}")

    async def _start_fallback(self, rs: ReplicaSet) -> None:
        fn = rs.fn
        worker: WorkerProcess | None = None
        try:
            worker = await self.lite_pool.take()
            await worker.load(fn.name, self._load_parameters(fn, LITE), timeout=self._cold_timeout(fn))
        except Exception as exc:
            rs.fallback_starting -= 1
            reason = str(exc) if isinstance(exc, (WorkerStartError, NoCapacity)) else repr(exc)
            log.error("no Lite fallback replica for %s: %s", fn.label, reason)
            if worker is not None:
                await worker.stop(grace=1)
            return  # the primary still comes (or fails waiters itself)
        rs.fallback_starting -= 1
        unwanted = self._sets.get(fn.key) is not rs or rs.desired == 0 or (rs.replicas and not rs.waiters)
        if unwanted or rs.fn.config.fallback == "none":
            await worker.stop()  # the primary was quicker, or the function went away meanwhile
            return
        rs.fallback.append(Replica(worker, slots=lite_slots(rs.fn), engine=LITE))
        log.info("%s: Lite fallback replica ready (worker %d)", fn.label, worker.id)
        rs.hand_out()

    def _tenant_replicas(self, tenant: str) -> int:
        return sum(rs.count for rs in self._sets.values() if rs.fn.tenant == tenant)

    def _over_quota(self, rs: ReplicaSet, starting_self: int) -> bool:
        """Whether the tenant's primary replicas (not counting STARTING_SELF of RS's own starts) already fill
        its max_replicas; only asked for fallback=capacity."""
        if self._replica_quota is None:
            return False
        return self._tenant_replicas(rs.fn.tenant) - starting_self >= self._replica_quota(rs.fn.tenant)

    def _primary_blocked(self, rs: ReplicaSet) -> str | None:
        """Why no further primary replica can be had now (fallback=capacity), or None."""
        if self.pool.full and not self._victims(rs, PADDLE):
            return f"all {self.pool.capacity} worker slots are busy"
        if self._over_quota(rs, 0):
            return f"tenant '{rs.fn.tenant}' is at its max_replicas"
        return None

    # ---------------------------------------------------------------- primary replicas

    async def _start_replica(self, rs: ReplicaSet) -> None:
        try:
            await self._start_primary(rs)
        finally:
            rs.notify_start_ended()

    async def _start_primary(self, rs: ReplicaSet) -> None:
        fn = rs.fn
        engine = primary_engine(fn)
        worker: WorkerProcess | None = None
        try:
            if fn.config.fallback == "capacity" and engine == PADDLE:
                await self._wait_for_quota(rs)
            worker = await self._take_worker(rs, engine)
            waiting = any(not w.done() for w in rs.waiters)
            parameters = {**self._load_parameters(fn, engine), "warm_up": not waiting}
            await worker.load(fn.name, parameters, timeout=self._cold_timeout(fn))
        except _NotWanted:
            rs.starting -= 1
            rs.claiming -= 1  # raised only before a worker was taken
            return
        except Exception as exc:
            rs.starting -= 1
            if worker is None:
                rs.claiming -= 1
            reason = str(exc) if isinstance(exc, (WorkerStartError, Unavailable)) else repr(exc)
            log.error("could not start a replica of %s: %s", fn.label, reason)
            if worker is not None:
                await worker.stop(grace=1)
            if isinstance(exc, Unavailable):
                rs.fail_waiters(exc)
            else:
                rs.fail_waiters(Unavailable(f"function {fn.label} could not start: {reason}", retry_after=5))
            rs.desired = min(rs.desired, rs.count)
            if (
                rs.count == 0
            ):  # no primary is coming: the Lite stand-in goes too (the next request tries again)
                self._retire_fallback(rs)
            return
        rs.starting -= 1
        if self._sets.get(fn.key) is not rs or (rs.count >= rs.desired and not rs.waiters):
            await worker.stop()  # scaled down or deleted while it started
            return
        slots = lite_slots(rs.fn) if engine == LITE else rs.fn.config.slots_per_replica
        rs.replicas.append(Replica(worker, slots=slots, engine=engine))
        if rs.fallback:  # the primary is here: Lite stood in long enough
            self._retire_fallback(rs)
        rs.hand_out()

    def _still_wanted(self, rs: ReplicaSet) -> bool:
        return self._sets.get(rs.fn.key) is rs and rs.count <= max(rs.desired, 1 if rs.waiters else 0)

    async def _wait_for_quota(self, rs: ReplicaSet) -> None:
        """fallback=capacity: beyond the tenant's max_replicas the start waits (Lite answers meanwhile)."""
        while rs.fn.config.fallback == "capacity" and self._over_quota(rs, 1):
            self._want_fallback(rs, f"tenant '{rs.fn.tenant}' is at its max_replicas")
            changed = self.pool.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)  # plans may change too: look again each second
            if not self._still_wanted(rs):
                raise _NotWanted

    async def _take_worker(self, rs: ReplicaSet, engine: str = PADDLE) -> WorkerProcess:
        """A worker for a start of RS: a free one, or one freed by taking a replica back (``_evict_one``). A start
        of a tenant holding its fair share leaves free slots to a tenant short of its own: it waits if a request
        waits for it, else it is called off (the scaler asks again once the slot is not needed)."""
        pool = self._pool(engine)
        deadline = time.monotonic() + self._cold_timeout(rs.fn)
        while True:
            changed = pool.changed
            if must_yield(self._slot_state(engine), rs.fn.tenant):
                if not any(not w.done() for w in rs.waiters):
                    raise _NotWanted
                reason = f"tenant '{rs.fn.tenant}' holds its fair share of the {pool.capacity} worker slots"
            else:
                try:
                    worker = await pool.take()
                except NoCapacity as exc:
                    reason = str(exc)
                    # Evict only when no slot is already on its way (a retiring worker exiting, a pool refill):
                    # otherwise each look would put another replica to sleep for the same one slot.
                    if not pool.freeing and not self._evict_one(rs, engine):
                        log.info("no worker slot for %s: %s; waiting", rs.fn.label, reason)
                else:
                    rs.claiming -= 1
                    return worker
            capacity_fallback = rs.fn.config.fallback == "capacity" and engine == PADDLE
            if capacity_fallback:  # Lite answers now; the primary takes the next free slot
                self._want_fallback(rs, f"all {pool.capacity} worker slots are busy")
            remaining = deadline - time.monotonic()
            if capacity_fallback and (rs.fallback or rs.fallback_starting):
                remaining = 1.0  # no deadline while Lite stands in; look again each second
                if not self._still_wanted(rs):
                    raise _NotWanted from None
            if remaining <= 0:
                raise Unavailable(
                    f"no capacity: all {pool.capacity} worker slots are busy with active functions ({reason})",
                    retry_after=5,
                ) from None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))  # and look again each second

    # ---------------------------------------------------------------- fair shares of worker slots

    def clamp_replicas(self, fn: FunctionRecord, count: int) -> int:
        """COUNT, or fewer where the starts it takes would go beyond the tenant's fair share of worker slots while
        another tenant is short of its own (functions/slots.py ``start_limit``). Never fewer than the function
        runs, and a sleeping function with a request waiting may always wake to one replica."""
        rs = self._sets.get(fn.key)
        current = rs.count if rs else 0
        if count <= current:
            return count
        engine = primary_engine(fn)
        asked = sum(
            s.count
            for s in self._sets.values()
            if s.fn.tenant == fn.tenant and primary_engine(s.fn) == engine
        )
        room = max(0, start_limit(self._slot_state(engine, asking=(fn, count)), fn.tenant) - asked)
        waking = rs is not None and current == 0 and any(not w.done() for w in rs.waiters)
        return max(current + min(count - current, room), 1 if waking else 0)

    def _slot_state(self, engine: str, asking: tuple[FunctionRecord, int] | None = None) -> Slots:
        """The worker slots of ENGINE's pool as functions/slots.py sees them (ASKING: a function asking for that
        many replicas, counted in its tenant's demand)."""
        held: dict[str, int] = {}
        wanted: dict[str, int] = {}
        waiting: set[str] = set()
        replicas: list[HeldReplica] = []
        if asking is not None and asking[0].key not in self._sets:
            wanted[asking[0].tenant] = asking[1]
        for rs in self._sets.values():
            fn = rs.fn
            if primary_engine(fn) != engine:
                continue
            tenant = fn.tenant
            want = max(rs.desired, fn.config.min_scale, 1 if any(not w.done() for w in rs.waiters) else 0)
            if asking is not None and asking[0].key == fn.key:
                want = max(want, asking[1])
            wanted[tenant] = wanted.get(tenant, 0) + want
            held[tenant] = held.get(tenant, 0) + len(rs.replicas) + rs.starting - rs.claiming
            if rs.claiming:
                waiting.add(tenant)
            spare = 0 if rs.busy else len(rs.replicas) - fn.config.min_scale
            for i, r in enumerate(sorted(rs.replicas, key=lambda r: r.idle_since)):
                replicas.append(HeldReplica(r, tenant, fn.key, r.in_flight, r.idle_since, spare=i < spare))
        tenants = {
            t: TenantSlots(
                weight=self._weight_of(t) if self._weight_of else 1,
                held=max(0, held.get(t, 0)),
                wanted=min(w, self._replica_quota(t)) if self._replica_quota else w,
                waiting=t in waiting,
            )
            for t, w in wanted.items()
        }
        pool = self._pool(engine)
        free = pool.capacity - pool.used + sum(1 for w in pool.idle if w.alive)
        return Slots(pool.capacity, tenants, tuple(replicas), max(0, free))

    def _victims(self, rs: ReplicaSet, engine: str) -> list[Replica]:
        """Replicas that may be taken back for a start of RS, first to go first (functions/slots.py)."""
        taken = reclaimable(self._slot_state(engine), rs.fn.tenant, rs.fn.key)
        return [r for r in taken if isinstance(r, Replica)]

    def _evict_one(self, rs: ReplicaSet, engine: str = PADDLE) -> bool:
        """Take one replica back to give its worker to a start of RS: beyond its tenant's fair share first."""
        victims = self._victims(rs, engine)
        if not victims:
            return False
        replica = victims[0]
        victim = next(v for v in self._sets.values() if replica in v.replicas)
        log.info(
            "capacity pressure: a replica of %s stops to free a worker for %s", victim.fn.label, rs.fn.label
        )
        victim.desired = max(0, victim.desired - 1)
        self._retire(victim, replica)
        return True

    def _load_parameters(self, fn: FunctionRecord, engine: str) -> dict[str, Any]:
        # Absolute: a confined worker leaves its working folder for "/" (runtime.isolation).
        params: dict[str, Any] = {
            "model_dir": str(fn.serving_dir.resolve()),
            "cpu_threads": self.settings.cpu_threads,
        }
        if engine == LITE:
            params["engine"] = LITE
        if self._confining():
            params["confine"] = {
                "tenant_dir": str((self.settings.data_dir / "tenants" / fn.tenant).resolve()),
                "data_dir": str(self.settings.data_dir.resolve()),
                "uid": self._uid(fn),
                "required": self.settings.worker_isolation == "required",
                "max_processes": self.settings.tenant_max_processes,
            }
        if fn.config.batching and engine == PADDLE:
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
            asleep = not rs.replicas and not rs.fallback
            future = rs.wait()
            if asleep and rs.starting == 0:
                for listener in self._listeners:
                    listener(fn)
                await self.set_replicas(fn, max(rs.desired, 1))
            if fn.config.fallback == "cold" and not rs.replicas:
                self._want_fallback(rs, "the primary replica is cold-starting")
            elif fn.config.fallback == "capacity" and rs.replicas and rs.starting == 0:
                blocked = self._primary_blocked(rs)
                if blocked:  # every primary replica is busy and no other can be had: Lite instead of a queue
                    self._want_fallback(rs, blocked)
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
            status, body, answer_headers = await replica.worker.post(
                request.path, request.body, request.headers, request.timeout_s
            )
        except WorkerTimeout:
            # It is still computing, and would make the next request time out too: replace it.
            self._kill(rs, replica, f"a request ran past its {request.timeout_s:g} s limit")
            raise FunctionTimeout(
                f"function {fn.label} took longer than {request.timeout_s:g} s to answer; its worker was "
                "stopped and is replaced",
                # To the microsecond, as workers report theirs: 16.1 * 1000 is 16100.000000000002 in floats,
                # which the exact round-up to whole milliseconds would bill as 16101.
                compute_ms=round(request.timeout_s * 1000, 3),
            ) from None
        except WorkerGone:
            raise Unavailable(
                f"the replica of {fn.label} stopped while handling this request "
                f"({replica.worker.exit_reason()}); retry",
                retry_after=1,
            ) from None
        except WorkerUnreachable as exc:  # the platform's fault, not the replica's: say so
            raise Unavailable(
                f"could not reach the replica of {fn.label}: {exc}; retry", retry_after=1
            ) from None
        finally:
            self._release(rs, replica)
        headers = {k: v for k in PASSED_RESPONSE_HEADERS if (v := answer_headers.get(k)) is not None}
        return Forwarded(
            status=status,
            body=body,
            headers=headers,
            engine=answer_headers.get("x-paddlefn-engine", ""),
            device=answer_headers.get("x-paddlefn-device", ""),
            compute_ms=float(answer_headers.get("x-paddlefn-compute-ms", 0.0)),
            cold_start_s=cold_start,
        )

    def _release(self, rs: ReplicaSet, replica: Replica) -> None:
        replica.in_flight -= 1
        replica.idle_since = time.monotonic()
        rs.last_used = time.monotonic()
        if replica.draining:
            if replica.in_flight == 0 and replica.worker.alive:
                self._spawn_task(replica.worker.stop(), f"stop-worker-{replica.worker.id}")
        else:
            rs.hand_out()

    def _worker_exited(self, worker: WorkerProcess) -> None:
        for rs in self._sets.values():
            for replica in rs.fallback:
                if replica.worker is worker:
                    rs.fallback.remove(replica)
                    return
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


def _chown_tree(folder: Path, uid: int) -> None:
    """FOLDER and everything in it to UID (the tenant's own upload: its confined preparation writes beside it)."""
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)
