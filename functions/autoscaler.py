"""The control loop that applies the scaling policy (``scaler.policy``) through a backend, once per tick.

Wake-ups do not wait for it: the backend scales a sleeping function to 1 the moment a request arrives. Scale-ups
stop at the tenant's max_replicas and, where the backend shares worker slots by fair share (functions/slots.py),
at what the backend would start: a min_scale held back for another tenant is not asked for again every tick. The
loop survives a failed step (logged, retried next tick), as a controller must.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from functions.activator import Activator
from functions.audit import SYSTEM, AuditLog
from functions.backends.base import Backend
from functions.clock import SYSTEM_CLOCK, Clock
from functions.metrics import Metrics
from functions.registry import FunctionRecord, Registry
from functions.settings import Settings
from scaler.policy import Load, Scaling, State, decide

log = logging.getLogger("paddlefn.autoscaler")


class Autoscaler:
    def __init__(
        self,
        registry: Registry,
        backend: Backend,
        source: Activator,
        settings: Settings,
        metrics: Metrics,
        *,
        max_replicas_of: Callable[[str], int] | None = None,
        audit: AuditLog | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock  # the activator's: idle times are measured on one clock
        self.max_replicas_of = max_replicas_of  # the tenant's plan limit across all its functions
        self.audit = audit
        self.registry = registry
        self.backend = backend
        self.source = source
        self.settings = settings
        self.metrics = metrics
        self._states: dict[tuple[str, str], State] = {}

    def scaling(self, fn: FunctionRecord) -> Scaling:
        return Scaling(
            min_scale=fn.config.min_scale,
            max_scale=fn.config.max_scale,
            target=fn.config.scaling_target,
            idle_timeout_s=fn.config.idle_timeout_s or self.settings.idle_timeout_s,
            scale_down_delay_s=self.settings.scale_down_delay_s,
        )

    async def step(self, now: float) -> None:
        loads = self.source.loads(now)
        for fn in self.registry.ready():
            load = loads.get(fn.key, Load())
            current = self.backend.replicas(fn)
            decision = decide(load, self.scaling(fn), current, self._states.get(fn.key, State()), now)
            self._states[fn.key] = decision.state
            desired = self._within_fair_share(
                fn, current, self._within_tenant_limit(fn, current, decision.desired)
            )
            if desired != current:
                log.info("%s: %d -> %d replicas (%s)", fn.label, current, desired, decision.reason)
                await self.backend.set_replicas(fn, desired)
                if desired == 0 and self.audit is not None:
                    self.audit.record_soon(SYSTEM, fn.tenant, "function.sleep", fn.name, decision.reason)
            self.metrics.replicas.labels(fn.tenant, fn.name).set(self.backend.replicas(fn))
        capacity = self.backend.capacity()
        for state, value in capacity.items():
            self.metrics.workers.labels(state).set(value)
        if (memory := getattr(self.backend, "memory", None)) is not None:
            m = memory()
            for kind, key in (("budget", "budget_mb"), ("used", "used_mb"), ("per_worker", "per_worker_mb"),
                              ("template", "template_mb")):  # fmt: skip
                self.metrics.worker_memory.labels(kind).set(m[key] * 1024 * 1024)

    def _within_tenant_limit(self, fn: FunctionRecord, current: int, desired: int) -> int:
        """Scale-ups stop at the tenant's max_replicas (a sleeping function may still wake to one replica)."""
        if self.max_replicas_of is None or desired <= max(current, 1):
            return desired
        others = sum(self.backend.replicas(f) for f in self.registry.of_tenant(fn.tenant) if f.key != fn.key)
        room = self.max_replicas_of(fn.tenant) - others
        return max(current, min(desired, room), 1 if current or desired else 0)

    def _within_fair_share(self, fn: FunctionRecord, current: int, desired: int) -> int:
        """Scale-ups stop where the backend would hold the starts back for another tenant's fair share of worker
        slots; once that tenant needs them no more, the next tick asks again."""
        clamp = getattr(self.backend, "clamp_replicas", None)
        if clamp is None or desired <= current:
            return desired
        clamped: int = clamp(fn, desired)
        return clamped

    def forget(self, fn: FunctionRecord) -> None:
        self._states.pop(fn.key, None)

    async def run(self) -> None:
        while True:
            try:
                await self.step(self.clock.now())
            except Exception:
                log.exception("autoscaler step failed; trying again next tick")
            await asyncio.sleep(self.settings.scaler_tick_s)
