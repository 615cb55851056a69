"""Load tracking and admission at the gateway: the embedded platform's metric source for the scaler.

Counts every request from arrival to response per function (in flight, including those waiting for a replica),
remembers the peak between scaler ticks and the time of the last request, and refuses to hold more requests for
a function or a tenant than configured (503 + Retry-After), so one tenant's pile of waiting requests cannot
exhaust the gateway (Knative #13211, #12728).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from functions.clock import SYSTEM_CLOCK, Clock
from functions.errors import Unavailable
from functions.registry import FunctionRecord
from scaler.policy import Load

Key = tuple[str, str]


@dataclass
class _Counts:
    in_flight: int = 0
    peak: int = 0
    last_request: float | None = None  # the clock's monotonic seconds


@dataclass
class Activator:
    max_pending_per_function: int
    max_pending_per_tenant: int
    pending_of: Callable[[FunctionRecord], int]  # requests the backend holds waiting for a replica
    clock: Clock = SYSTEM_CLOCK
    _counts: dict[Key, _Counts] = field(default_factory=dict)

    def admit(self, fn: FunctionRecord, tenant_functions: Callable[[], list[FunctionRecord]]) -> None:
        pending = self.pending_of(fn)
        if pending >= self.max_pending_per_function:
            raise Unavailable(
                f"function {fn.label} already has {pending} requests waiting for a replica (the limit); "
                "retry later",
                retry_after=2,
            )
        if pending:  # only then can the tenant's total be near its limit
            total = sum(self.pending_of(f) for f in tenant_functions())
            if total >= self.max_pending_per_tenant:
                raise Unavailable(
                    f"tenant {fn.tenant} already has {total} requests waiting for replicas (the limit); retry later",
                    retry_after=2,
                )

    def begin(self, fn: FunctionRecord) -> None:
        counts = self._counts.setdefault(fn.key, _Counts())
        counts.in_flight += 1
        counts.peak = max(counts.peak, counts.in_flight)
        counts.last_request = self.clock.now()

    def end(self, fn: FunctionRecord) -> None:
        counts = self._counts[fn.key]
        counts.in_flight -= 1
        counts.last_request = self.clock.now()

    def touch(self, fn: FunctionRecord) -> None:
        """Count a deploy or a wake-up as activity, so the idle timeout starts from it."""
        counts = self._counts.setdefault(fn.key, _Counts())
        counts.last_request = self.clock.now()

    def in_flight(self, fn: FunctionRecord) -> int:
        counts = self._counts.get(fn.key)
        return counts.in_flight if counts else 0

    def forget(self, fn: FunctionRecord) -> None:
        self._counts.pop(fn.key, None)

    def loads(self, now: float) -> dict[Key, Load]:
        """Load per function since the previous call (which resets the peaks)."""
        result = {}
        for key, counts in self._counts.items():
            since = None if counts.last_request is None else max(0.0, now - counts.last_request)
            if counts.in_flight:
                since = 0.0
            result[key] = Load(in_flight=counts.in_flight, peak=counts.peak, seconds_since_request=since)
            counts.peak = counts.in_flight
        return result
