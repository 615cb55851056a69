"""Per-tenant admission at the gateway: a token bucket for the request rate and a cap on concurrent requests.

Both answer 429 with ``Retry-After`` and a message that names the limit and the tenant's current usage. They are
checked before a request is forwarded, so a refused request costs the tenant nothing and is not billed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from functions.errors import TooManyRequests
from functions.plans import Limits


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    size: float
    tokens: float = -1.0  # -1: full on first use
    updated: float = 0.0

    def take(self, now: float) -> float:
        """Take one token; 0.0 if there was one, else the seconds until there will be (nothing taken)."""
        if self.tokens < 0:
            self.tokens, self.updated = self.size, now
        self.tokens = min(self.size, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class _Tenant:
    bucket: TokenBucket
    in_flight: int = 0


@dataclass
class TenantAdmission:
    limits_of: Callable[[str], Limits]
    clock: Callable[[], float] = time.monotonic
    _tenants: dict[str, _Tenant] = field(default_factory=dict)

    def enter(self, tenant: str) -> None:
        """Admit one request of TENANT or raise TooManyRequests; pair with ``leave``."""
        limits = self.limits_of(tenant)
        state = self._tenants.get(tenant)
        if (
            state is None
            or state.bucket.rate != limits.requests_per_second
            or state.bucket.size != limits.burst
        ):
            state = self._tenants[tenant] = _Tenant(TokenBucket(limits.requests_per_second, limits.burst),
                                                    state.in_flight if state else 0)  # fmt: skip
        if state.in_flight >= limits.max_concurrent_requests:
            raise TooManyRequests(
                f"tenant '{tenant}' has {state.in_flight} requests in flight, its plan's limit "
                f"(max_concurrent_requests={limits.max_concurrent_requests}); retry when some finish",
                retry_after=1,
            )
        wait = state.bucket.take(self.clock())
        if wait:
            raise TooManyRequests(
                f"tenant '{tenant}' is over its plan's rate of {limits.requests_per_second:g} requests/s "
                f"(burst {limits.burst}); retry in {wait:.2f} s",
                retry_after=wait,
            )
        state.in_flight += 1

    def leave(self, tenant: str) -> None:
        self._tenants[tenant].in_flight -= 1

    def in_flight(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.in_flight if state else 0
