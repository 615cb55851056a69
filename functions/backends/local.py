"""The embedded backend: each replica is a worker process on this machine, reached over a Unix socket.

A thin driver of the replica policy (``functions/backends/replicas.py``, pure): what happens here (a request
arrives or ends, a worker is taken or loaded, a process exits, time passes) goes to the policy as an event, and
what the policy decides comes back as effects that this module performs: take a worker from a pool and load the
function's model, stop a worker, give a waiting request its replica, fail the waiting requests, tell the wake
listeners. The rules themselves (fair shares of worker slots, eviction, minimum residency, Lite fallback) are
written down in that module's docstring; the minimum residency is ``Settings.min_residency_s`` (default 10 s).

Concurrency: the policy's state and the requests waiting for a replica belong to the event loop; every event is
applied synchronously (``_step``), so effects are performed in the order they were decided. Worker pools are
read fresh at every event (their capacity may change at runtime) and only through their public interface.

Paddle Lite (``config.device``/``config.fallback``): a replica is a Paddle Inference worker (the primary) or a
Paddle Lite one, from a pool of its own (``WorkerPool(engine="lite")``: no Paddle import, CPU only, its own slots).
Lite fallback replicas are not counted in ``replicas`` (the scaler's number) nor in the tenant's max_replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from functions.backends import replicas as policy
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
from functions.backends.replica_state import (
    COUNTED,
    LITE,
    PADDLE,
    Adopt,
    Arrive,
    Cause,
    Configure,
    Dispatch,
    Done,
    Effect,
    Event,
    Exited,
    Fail,
    GiveUp,
    Key,
    Loaded,
    Overran,
    Phase,
    PoolView,
    Remove,
    Rules,
    Scale,
    Spec,
    StartFailed,
    Stop,
    Take,
    TakeFailed,
    Tenant,
    Tick,
    Woke,
)
from functions.backends.template import WorkerTemplate
from functions.clock import SYSTEM_CLOCK, Clock
from functions.deploy import prepare_model
from functions.errors import FunctionTimeout, GatewayTimeout, Unavailable
from functions.registry import FunctionRecord
from functions.settings import Settings
from runtime.spec import Manifest

log = logging.getLogger("paddlefn.local")


def primary_engine(fn: FunctionRecord) -> str:
    return LITE if fn.config.device == "lite" else PADDLE


def lite_slots(fn: FunctionRecord) -> int:
    """Requests a Lite replica takes at once (it never batches)."""
    return fn.config.container_concurrency or 2 * fn.config.target_concurrency


@dataclass(eq=False)
class Replica:
    """A replica as the driver knows it: the policy's id and, once taken, its worker."""

    id: int
    engine: str
    worker: WorkerProcess | None = None


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.clock = clock
        self.rules = Rules(
            min_residency_s=settings.min_residency_s, scale_down_delay_s=settings.scale_down_delay_s
        )
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
        self._state = policy.State()
        self._functions: dict[Key, FunctionRecord] = {}
        self._waiters: dict[Key, deque[asyncio.Future[Replica]]] = {}
        self._replicas: dict[int, Replica] = {}  # by policy id: those taking or holding a worker
        self._by_worker: dict[WorkerProcess, Replica] = {}
        self._taking = {PADDLE: 0, LITE: 0}  # takes decided whose pool.take() has not been called yet
        self._stops: dict[int, asyncio.Task[Any]] = {}
        self._changed = asyncio.Event()  # set after every step (a deploy waits for its first replica)
        self._replica_quota: Callable[[str], int] | None = None  # tenant -> max_replicas
        self._weight_of: Callable[[str], int] | None = None  # tenant -> plan weight (fair shares of slots)
        self._listeners: list[WakeListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.pool.refill()
        self._spawn_task(self._ticks(), "replica-ticks")
        self._spawn_task(self.pool.watch_memory(), "watch-worker-memory")

    async def _ticks(self) -> None:
        """Tell the policy that time passed (deadlines, residencies, idle Lite replicas) each second, and at once
        when a pool changes (a pre-warmed worker joined: a waiting start may have it)."""
        while True:
            changed = [asyncio.ensure_future(p.changed.wait()) for p in (self.pool, self.lite_pool)]
            try:
                await asyncio.wait(changed, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in changed:
                    waiter.cancel()
            try:
                self._step(Tick())
            except Exception:
                log.exception("replica policy tick failed; trying again")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self._waiters):
            self._fail(Fail(key, "the platform is shutting down", retry_after=5))
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

    # ---------------------------------------------------------------- what the platform reads

    def replicas(self, fn: FunctionRecord) -> int:
        return policy.count(self._state, fn.key)

    def replica_info(self, fn: FunctionRecord) -> list[dict[str, Any]]:
        info = []
        for r in policy.of(self._state, fn.key, Phase.READY):
            worker = self._replicas[r.id].worker if r.id in self._replicas else None
            if worker is not None:
                info.append({"pid": worker.pid, "in_flight": r.in_flight, "slots": r.slots, "engine": r.engine,
                             "fallback": r.fallback})  # fmt: skip
        return info

    def lite_replicas(self, fn: FunctionRecord) -> int:
        """Lite fallback replicas running or starting (on top of ``replicas``)."""
        return len(policy.of(self._state, fn.key, *COUNTED, fallback=True))

    def pending(self, fn: FunctionRecord) -> int:
        f = self._state.functions.get(fn.key)
        return f.waiting if f else 0

    def ready_replicas(self, fn: FunctionRecord) -> int:
        return len(policy.of(self._state, fn.key, Phase.READY, fallback=False))

    def clamp_replicas(self, fn: FunctionRecord, count: int) -> int:
        """COUNT, or fewer where the starts would go beyond the tenant's fair share of worker slots while another
        tenant is short of its own (the autoscaler then does not ask for them every tick)."""
        state = replace(self._state, pools=self._pool_views(), tenants=self._tenants())
        return policy.clamp(state, fn.key, count, self.clock.now(), self.rules)

    # ---------------------------------------------------------------- preparing a model

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

    # ---------------------------------------------------------------- lifecycle of functions

    async def deployed(self, fn: FunctionRecord) -> None:
        # As Knative's initial scale: a new function starts one replica so its first request is warm.
        await self.set_replicas(fn, max(fn.config.min_scale, 1))
        # Wait for the first one (the platform says READY only then) while it loads, however that ends. A start
        # that waits for a slot or for quota (still CLAIMING: the policy decided no Take) is not waited for: the
        # function is ready, and its first request waits for that start (or Lite answers, fallback=capacity).
        deadline = self.clock.now() + self._cold_timeout(fn)
        while policy.of(self._state, fn.key, Phase.LOADING, fallback=False) and not policy.of(
            self._state, fn.key, Phase.READY, fallback=False
        ):
            changed = self._changed
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))

    def _starting(self, key: Key) -> bool:
        return bool(policy.of(self._state, key, Phase.CLAIMING, Phase.LOADING, fallback=False))

    async def removed(self, fn: FunctionRecord) -> None:
        if fn.key not in self._state.functions:
            return
        self._step(Remove(fn.key))
        self._functions.pop(fn.key, None)
        self._waiters.pop(fn.key, None)
        stops = [t for r in policy.of(self._state, fn.key) if (t := self._stops.get(r.id)) is not None]
        await asyncio.gather(*stops, return_exceptions=True)

    async def reconfigured(self, fn: FunctionRecord) -> None:
        old = self._functions.get(fn.key)
        if old is None:
            return
        restart = self._load_parameters(old, primary_engine(old)) != self._load_parameters(
            fn, primary_engine(fn)
        )
        self._known(fn)
        self._step(Configure(fn.key, self._spec(fn), restart=restart))

    async def set_replicas(self, fn: FunctionRecord, count: int) -> None:
        """Run COUNT replicas: starts stop at the tenant's fair share while another tenant is short of its own
        (``clamp_replicas``; the scaler asks again later); scale-downs are not held."""
        self._known(fn)
        self._step(Scale(fn.key, count))

    def adopt(self, fn: FunctionRecord, worker: WorkerProcess) -> None:
        """WORKER, already serving FN's model, becomes one of its ready replicas (not from a pool)."""
        self._known(fn)
        self._step(Adopt(fn.key))
        rid = self._state.next_id - 1
        self._track(Replica(rid, primary_engine(fn), worker))

    def _known(self, fn: FunctionRecord) -> None:
        """FN's record is the current one (it may have been replaced: new config), and the policy knows it."""
        self._functions[fn.key] = fn
        self._waiters.setdefault(fn.key, deque())
        if fn.config.uses_lite:
            self.lite_pool.activate(self.settings.lite_pool_size)
        if fn.key not in self._state.functions:
            self._step(Configure(fn.key, self._spec(fn)))

    def _spec(self, fn: FunctionRecord) -> Spec:
        engine = primary_engine(fn)
        return Spec(
            tenant=fn.tenant,
            label=fn.label,
            min_scale=fn.config.min_scale,
            engine=engine,
            fallback=fn.config.fallback if engine == PADDLE else "none",
            slots=lite_slots(fn) if engine == LITE else fn.config.slots_per_replica,
            lite_slots=lite_slots(fn),
            cold_timeout_s=self._cold_timeout(fn),
        )

    # ---------------------------------------------------------------- the driver

    def _step(self, event: Event) -> None:
        """Apply EVENT to the policy with the pools as they are now, and perform the effects in order."""
        state = replace(self._state, pools=self._pool_views(), tenants=self._tenants())
        self._state, effects = policy.step(state, event, self.clock.now(), self.rules)
        for effect in effects:
            self._apply(effect)
        self._changed.set()
        self._changed = asyncio.Event()

    def _apply(self, effect: Effect) -> None:
        match effect:
            case Dispatch():
                self._dispatch(effect)
            case Take():
                self._taking[effect.engine] += 1
                self._spawn_task(self._start(effect), f"start-{effect.key}")
            case Stop():
                self._stop(effect)
            case Woke():
                self._woke(effect.key)
            case Fail():
                self._fail(effect)

    def _woke(self, key: Key) -> None:
        fn = self._functions.get(key)
        if fn is not None:
            for listener in self._listeners:
                listener(fn)

    def _pool_views(self) -> dict[str, PoolView]:
        """The pools as the policy sees them: their capacity read now, and the workers they hold for no replica
        (pre-warmed, refilling), less the warm ones that takes already decided will get."""
        views = {}
        for engine in (PADDLE, LITE):
            pool = self._pool(engine)
            taking = self._taking[engine]
            held = policy.held(self._state, engine) - taking  # taken or being taken, as the pool counts them
            idle = sum(1 for w in pool.idle if w.alive)
            views[engine] = PoolView(
                capacity=pool.capacity,
                unassigned=max(0, pool.used - held),
                idle=max(0, idle - taking),
                freeing=pool.freeing,
            )
        return views

    def _tenants(self) -> dict[str, Tenant]:
        names = {f.spec.tenant for f in self._state.functions.values()}
        return {
            t: Tenant(
                weight=self._weight_of(t) if self._weight_of else 1,
                max_replicas=self._replica_quota(t) if self._replica_quota else None,
            )
            for t in names
        }

    def _dispatch(self, effect: Dispatch) -> None:
        waiters = self._waiters[effect.key]
        replica = self._replicas[effect.replica]
        # A request that gave up left the queue in the same step that told the policy (``_withdraw``).
        waiters.popleft().set_result(replica)

    def _fail(self, effect: Fail) -> None:
        waiters = self._waiters.get(effect.key, deque())
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_exception(Unavailable(effect.message, retry_after=effect.retry_after))

    def _stop(self, effect: Stop) -> None:
        replica = self._replicas.get(effect.replica)
        fn = self._functions.get(effect.key)
        label = fn.label if fn else effect.key
        if effect.cause in (Cause.EVICTED, Cause.SHED):
            log.info("%s", effect.why)
        else:
            log.info("%s: a replica stops (%s: %s)", label, effect.cause.value, effect.why)
        if replica is None or replica.worker is None:
            return
        worker = replica.worker
        if effect.kill:
            log.warning("%s: worker %d killed: %s", label, worker.id, effect.why)
            worker.stopping = True
            worker.kill()
            return
        grace = 1.0 if effect.cause == Cause.FAILED else 5.0
        task = self._spawn_task(worker.stop(grace=grace), f"stop-worker-{worker.id}")
        self._stops[effect.replica] = task
        task.add_done_callback(lambda _: self._stops.pop(effect.replica, None))

    async def _start(self, take: Take) -> None:
        """Take a worker for a start the policy decided and load the function into it; the outcome is an event."""
        pool = self._pool(take.engine)
        self._taking[take.engine] -= 1
        fn = self._functions.get(take.key)
        if take.why:
            log.info("%s: starting %s", fn.label if fn else take.key, take.why)
        decided = self._state.replicas.get(take.replica)
        if decided is None or decided.phase != Phase.LOADING:  # retired, or its function deleted, meanwhile
            self._step(TakeFailed(take.replica))
            return
        if not (any(w.alive for w in pool.idle) or pool.used < pool.capacity):
            # The pool changed since the decision: nothing is taken past its capacity. Look again once it moves.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.changed.wait(), 1.0)
            self._step(TakeFailed(take.replica))
            return
        replica = Replica(take.replica, take.engine)
        self._replicas[replica.id] = replica
        try:
            worker = await pool.take()
        except NoCapacity:
            del self._replicas[replica.id]
            self._step(TakeFailed(take.replica))
            return
        except Exception as exc:
            del self._replicas[replica.id]
            self._start_failed(take, exc, holds_worker=False)
            return
        self._track(replica, worker)
        if fn is None:
            self._step(Loaded(replica.id))  # its function went away meanwhile: the policy stops it
            return
        try:
            parameters = {**self._load_parameters(fn, take.engine), "warm_up": take.warm_up}
            await worker.load(fn.name, parameters, timeout=self._cold_timeout(fn))
        except Exception as exc:
            self._start_failed(take, exc, holds_worker=True)
            return
        if take.why:
            log.info("%s: %s ready (worker %d)", fn.label, take.why, worker.id)
        self._step(Loaded(replica.id))

    def _track(self, replica: Replica, worker: WorkerProcess | None = None) -> None:
        if worker is not None:
            replica.worker = worker
        self._replicas[replica.id] = replica
        if replica.worker is not None:
            self._by_worker[replica.worker] = replica

    def _start_failed(self, take: Take, exc: Exception, *, holds_worker: bool) -> None:
        fn = self._functions.get(take.key)
        label = fn.label if fn else str(take.key)
        reason = str(exc) if isinstance(exc, (WorkerStartError, Unavailable, NoCapacity)) else repr(exc)
        what = "a Lite fallback replica" if take.why else "a replica"
        log.error("could not start %s of %s: %s", what, label, reason)
        message = f"function {label} could not start: {reason}"
        self._step(StartFailed(take.replica, take.key, message, holds_worker=holds_worker))

    def _worker_exited(self, worker: WorkerProcess) -> None:
        replica = self._by_worker.pop(worker, None)
        if replica is None:
            return
        self._replicas.pop(replica.id, None)
        self._step(Exited(replica.id, crashed=not worker.stopping))

    # ---------------------------------------------------------------- requests

    async def forward(self, fn: FunctionRecord, request: Outgoing) -> Forwarded:
        self._known(fn)
        asleep = not policy.of(self._state, fn.key, Phase.READY)
        future: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        self._waiters[fn.key].append(future)
        self._step(Arrive(fn.key))
        cold_start: float | None = None
        if future.done():
            replica = future.result()
        else:
            started = self.clock.now()
            timeout = request.cold_start_timeout_s if asleep else request.timeout_s
            replica = await self._wait(fn, future, timeout, asleep)
            if asleep:
                cold_start = self.clock.now() - started
        try:
            async with request.compute_slot():
                return await self._post(fn, replica, request, cold_start)
        finally:
            self._step(Done(replica.id))

    async def _wait(
        self, fn: FunctionRecord, future: asyncio.Future[Replica], timeout: float, asleep: bool
    ) -> Replica:
        """The replica the policy gives FUTURE's request, within TIMEOUT; a request that gives up (or whose client
        went away) leaves the queue and tells the policy, in one step."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if future.done():  # given a replica at the last moment
                return future.result()
            self._withdraw(fn, future)
            raise self._not_served(fn, timeout, asleep) from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._step(Done(future.result().id))
            else:
                self._withdraw(fn, future)
            raise

    def _withdraw(self, fn: FunctionRecord, future: asyncio.Future[Replica]) -> None:
        waiters = self._waiters.get(fn.key, deque())
        if future in waiters:
            waiters.remove(future)
            future.cancel()
            self._step(GiveUp(fn.key))

    def _not_served(self, fn: FunctionRecord, timeout: float, asleep: bool) -> Exception:
        """What a request that waited TIMEOUT in vain is told: the truth about why."""
        state = replace(self._state, pools=self._pool_views(), tenants=self._tenants())
        why, retry = policy.waiting_for_slot(state, fn.key, self.clock.now(), self.rules)
        if why is not None:
            return Unavailable(
                f"no worker slot for {fn.label} within {timeout:g} s: {why}; retry", retry_after=retry
            )
        if asleep:
            return GatewayTimeout(
                f"function {fn.label} did not wake within its cold-start timeout of {timeout:g} s"
            )
        return GatewayTimeout(f"no replica of {fn.label} was free within {timeout:g} s")

    async def _post(
        self, fn: FunctionRecord, replica: Replica, request: Outgoing, cold_start: float | None
    ) -> Forwarded:
        worker = replica.worker
        assert worker is not None  # only replicas holding a worker are dispatched to
        try:
            status, body, answer_headers = await worker.post(
                request.path, request.body, request.headers, request.timeout_s
            )
        except WorkerTimeout:
            # It is still computing, and would make the next request time out too: replace it.
            self._step(Overran(replica.id))
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
                f"({worker.exit_reason()}); retry",
                retry_after=1,
            ) from None
        except WorkerUnreachable as exc:  # the platform's fault, not the replica's: say so
            raise Unavailable(
                f"could not reach the replica of {fn.label}: {exc}; retry", retry_after=1
            ) from None
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

    # ---------------------------------------------------------------- workers

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

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _chown_tree(folder: Path, uid: int) -> None:
    """FOLDER and everything in it to UID (the tenant's own upload: its confined preparation writes beside it)."""
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)
