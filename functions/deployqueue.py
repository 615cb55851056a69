"""Deploy slots shared fairly across tenants.

Preparing a model is a Paddle process with the model's memory, so the platform runs only ``total`` at once.
A single queue would let one tenant's burst of deploys delay every other tenant's (and two never-ending programs
would hold both slots). So each tenant runs at most ``per_tenant`` deploys at once, and when a slot frees the
tenant that was served longest ago goes next (round-robin); within a tenant, deploys go in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Mapping


def next_tenant(
    waiting: Mapping[str, int],
    running: Mapping[str, int],
    last_served: Mapping[str, int],
    *,
    total: int,
    per_tenant: int,
) -> str | None:
    """Whose deploy starts next: of the tenants with WAITING deploys and fewer than PER_TENANT RUNNING, the one
    served longest ago (never served: first); None when every slot is taken or nobody can go."""
    if sum(running.values()) >= total:
        return None
    ready = [t for t, n in waiting.items() if n > 0 and running.get(t, 0) < per_tenant]
    if not ready:
        return None
    return min(ready, key=lambda t: (last_served.get(t, -1), t))


class DeployQueue:
    """``async with queue.slot(tenant):`` waits for a fair turn, then holds one deploy slot."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total = max(1, total)
        self.per_tenant = max(1, min(per_tenant, self.total))
        self._waiting: defaultdict[str, deque[asyncio.Future[None]]] = defaultdict(deque)
        self._running: defaultdict[str, int] = defaultdict(int)
        self._last_served: dict[str, int] = {}
        self._turns = itertools.count()

    def waiting(self, tenant: str) -> int:
        return sum(1 for f in self._waiting.get(tenant, ()) if not f.done())

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[tenant].append(turn)
        self._dispatch()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted just as it was cancelled: give the slot back
                self._release(tenant)
            else:
                turn.cancel()
                self._dispatch()
            raise
        try:
            yield
        finally:
            self._release(tenant)

    def _release(self, tenant: str) -> None:
        self._running[tenant] -= 1
        if not self._running[tenant]:
            del self._running[tenant]
        self._dispatch()

    def _dispatch(self) -> None:
        for name in list(self._waiting):  # forget turns given up (cancelled deploys)
            turns = self._waiting[name]
            while turns and turns[0].done():
                turns.popleft()
            if not turns:
                del self._waiting[name]
        while True:
            waiting = {t: len(q) for t, q in self._waiting.items()}
            tenant = next_tenant(
                waiting, self._running, self._last_served, total=self.total, per_tenant=self.per_tenant
            )
            if tenant is None:
                return
            queue = self._waiting[tenant]
            turn = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if turn.done():
                continue
            self._running[tenant] += 1
            self._last_served[tenant] = next(self._turns)
            turn.set_result(None)
