"""Weighted fair queueing of requests across tenants when the platform's serving capacity is contended.

At most ``capacity`` requests are forwarded at once. While there is room, a request goes straight through. When
there is none, it waits in its tenant's FIFO; each waiting request gets a virtual start tag
``max(virtual time, tenant's last tag) + 1 / weight`` (start-time fair queueing), and every freed slot goes to
the waiting request with the smallest tag. Over any busy period each backlogged tenant is served in proportion
to its weight, and a tenant that floods only lengthens its own queue: a quiet tenant's next request is tagged
near the current virtual time, ahead of the flood.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(order=True)
class _Waiter:
    tag: float
    seq: int
    tenant: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._heap: list[_Waiter] = []
        self._last_tag: dict[str, float] = {}
        self._vtime = 0.0
        self._seq = itertools.count()
        self.served: dict[str, int] = {}  # requests dispatched per tenant, for operators and benchmarks

    def waiting(self) -> int:
        return sum(1 for w in self._heap if not w.future.done())

    async def acquire(self, tenant: str, weight: int, timeout: float) -> None:
        """Wait for a slot (TimeoutError after TIMEOUT seconds); pair with ``release``."""
        if self.in_use < self.capacity and not self._heap:
            self._dispatch(tenant)
            return
        tag = max(self._vtime, self._last_tag.get(tenant, 0.0)) + 1.0 / weight
        self._last_tag[tenant] = tag
        waiter = _Waiter(tag, next(self._seq), tenant, asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        self._pump()  # room may have been left by waiters that gave up
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # granted at the same moment it gave up: hand the slot on
            else:
                waiter.future.cancel()
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._pump()

    def _pump(self) -> None:
        while self._heap and self.in_use < self.capacity:
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():  # gave up waiting
                continue
            self._vtime = waiter.tag
            self._dispatch(waiter.tenant)
            waiter.future.set_result(None)

    def _dispatch(self, tenant: str) -> None:
        self.in_use += 1
        self.served[tenant] = self.served.get(tenant, 0) + 1
