"""The weighted fair queue on its own: shares follow weights, and a flood does not push a quiet tenant back."""

from __future__ import annotations

import asyncio

import pytest

from functions.fairqueue import FairQueue


async def serve(queue: FairQueue, order: list[str], tenant: str, weight: int) -> None:
    await queue.acquire(tenant, weight, timeout=10)
    order.append(tenant)
    await asyncio.sleep(0)  # hold the slot across a scheduling point, as a real request does
    queue.release()


def run_backlog(weights: dict[str, int], per_tenant: int) -> list[str]:
    async def scenario() -> list[str]:
        queue = FairQueue(capacity=1)
        order: list[str] = []
        await queue.acquire("warm-up", 1, timeout=1)  # capacity taken: everyone below has to queue
        tasks = [
            asyncio.create_task(serve(queue, order, t, w))
            for t, w in weights.items()
            for _ in range(per_tenant)
        ]
        await asyncio.sleep(0)
        queue.release()
        await asyncio.gather(*tasks)
        return order

    return asyncio.run(scenario())


@pytest.mark.parametrize("weights", [{"a": 1, "b": 1}, {"a": 3, "b": 1}, {"a": 1, "b": 2, "c": 5}])
def test_backlogged_tenants_are_served_in_proportion_to_their_weights(weights):
    order = run_backlog(weights, per_tenant=200)
    window = order[:160]  # while every tenant is still backlogged
    total = sum(weights.values())
    for tenant, weight in weights.items():
        share = window.count(tenant) / len(window)
        assert share == pytest.approx(weight / total, abs=0.03), (tenant, share)


def test_a_quiet_tenant_is_served_next_even_behind_a_flood():
    async def scenario() -> int:
        queue = FairQueue(capacity=1)
        order: list[str] = []
        await queue.acquire("flood", 1, timeout=1)
        flood = [asyncio.create_task(serve(queue, order, "flood", 1)) for _ in range(100)]
        await asyncio.sleep(0)
        quiet = asyncio.create_task(serve(queue, order, "quiet", 1))
        await asyncio.sleep(0)
        queue.release()
        await asyncio.gather(*flood, quiet)
        return order.index("quiet")

    assert asyncio.run(scenario()) <= 2


def test_a_waiter_that_times_out_leaves_no_slot_behind():
    async def scenario() -> int:
        queue = FairQueue(capacity=1)
        await queue.acquire("a", 1, timeout=1)
        with pytest.raises(TimeoutError):
            await queue.acquire("b", 1, timeout=0.01)
        queue.release()
        await queue.acquire("c", 1, timeout=1)  # the slot is free again, not held by b's ghost
        return queue.in_use

    assert asyncio.run(scenario()) == 1
