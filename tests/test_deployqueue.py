"""The fair deploy queue: whose deploy starts next (pure), and the queue's turns end to end (asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from functions.deployqueue import DeployQueue, next_tenant


@pytest.mark.parametrize(
    ("waiting", "running", "last_served", "expected"),
    [
        ({}, {}, {}, None),  # nobody waits
        ({"a": 3}, {}, {}, "a"),
        ({"a": 3, "b": 1}, {"a": 1}, {"a": 0}, "b"),  # a holds its one slot: b goes
        ({"a": 3}, {"a": 1}, {"a": 0}, None),  # a may not take the second slot
        ({"a": 1, "b": 1}, {}, {"a": 5, "b": 2}, "b"),  # served longest ago first
        ({"a": 1, "b": 1}, {}, {"a": 5}, "b"),  # never served beats served
        ({"a": 1, "b": 1}, {"c": 1, "d": 1}, {}, None),  # every slot taken
    ],
)
def test_next_tenant(waiting, running, last_served, expected):
    assert next_tenant(waiting, running, last_served, total=2, per_tenant=1) == expected


def test_one_tenants_burst_does_not_delay_another_and_cancelled_turns_are_given_back():
    async def scenario() -> list[str]:
        queue = DeployQueue(total=2, per_tenant=1)
        started: list[str] = []
        release = asyncio.Event()

        async def deploy(tenant: str, label: str) -> None:
            async with queue.slot(tenant):
                started.append(label)
                await release.wait()

        burst = [asyncio.create_task(deploy("a", f"a{i}")) for i in range(5)]
        await asyncio.sleep(0)
        late = asyncio.create_task(deploy("b", "b0"))
        await asyncio.sleep(0.01)
        assert started == ["a0", "b0"]  # b's one deploy did not wait behind a's burst
        burst[1].cancel()  # a1 gave up while queued: it never starts
        release.set()
        await asyncio.gather(*burst, late, return_exceptions=True)
        return started

    started = asyncio.run(scenario())
    assert "a1" not in started and sorted(started) == ["a0", "a2", "a3", "a4", "b0"]
