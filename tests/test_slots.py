"""functions.slots: fair shares of worker slots and who gives a slot back, as tables of plain data."""

from __future__ import annotations

import pytest

from functions.slots import HeldReplica, Slots, TenantSlots, fair_shares, must_yield, reclaimable, start_limit


def idle(rid: str, tenant: str, since: float, function: str = "f", *, spare: bool = False) -> HeldReplica:
    return HeldReplica(rid, tenant, function, in_flight=0, idle_since=since, spare=spare)


def busy(rid: str, tenant: str, since: float = 0.0, function: str = "f") -> HeldReplica:
    return HeldReplica(rid, tenant, function, in_flight=1, idle_since=since)


def slots(
    capacity: int, free: int = 0, replicas: tuple[HeldReplica, ...] = (), **tenants: TenantSlots
) -> Slots:
    return Slots(capacity, tenants, replicas, free)


T = TenantSlots


@pytest.mark.parametrize(
    ("state", "shares"),
    [
        # Demand fits the machine: every share is the demand, whatever the weights.
        (slots(8, a=T(wanted=3), b=T(wanted=2, weight=5)), {"a": 3, "b": 2}),
        # The issue: min_scale 8 on 4 slots against one wake-up. The wake-up gets its slot.
        (slots(4, a=T(held=4, wanted=8), b=T(wanted=1, waiting=True)), {"a": 3, "b": 1}),
        # Max-min: a small demand is met in full, the rest is split evenly.
        (slots(7, a=T(wanted=1), b=T(wanted=5), c=T(wanted=5)), {"a": 1, "b": 3, "c": 3}),
        # Weights share what is contended: 3:1.
        (slots(4, a=T(wanted=4, weight=3), b=T(wanted=4)), {"a": 3, "b": 1}),
        # No weight shuts another tenant out: every tenant with demand has a slot before any has two.
        (slots(4, a=T(wanted=9, weight=1000), b=T(wanted=9), c=T(wanted=9)), {"a": 2, "b": 1, "c": 1}),
        # An odd slot goes to whoever holds it now (no needless move) ...
        (slots(3, a=T(held=1, wanted=2), b=T(held=2, wanted=2)), {"a": 1, "b": 2}),
        # ... unless the other tenant is waiting for a slot.
        (slots(3, a=T(held=1, wanted=2, waiting=True), b=T(held=2, wanted=2)), {"a": 2, "b": 1}),
        # Fewer slots than tenants: a waiting wake-up still gets one (the idle holder yields it).
        (slots(1, a=T(held=1, wanted=1), b=T(wanted=1, waiting=True)), {"a": 0, "b": 1}),
        # No demand, no share.
        (slots(4, a=T(held=1, wanted=0), b=T(wanted=2)), {"a": 0, "b": 2}),
    ],
)
def test_fair_shares_are_weighted_max_min_over_demand(state: Slots, shares: dict[str, int]) -> None:
    assert fair_shares(state) == shares


A_MIN_SCALE_4 = (idle("a1", "a", 1.0), idle("a2", "a", 2.0), idle("a3", "a", 3.0), idle("a4", "a", 4.0))


@pytest.mark.parametrize(
    ("state", "claimant", "taken"),
    [
        # A's min_scale replicas beyond its share yield to B's wake-up: only the excess, the LRU first.
        (slots(4, 0, A_MIN_SCALE_4, a=T(held=4, wanted=4), b=T(wanted=1, waiting=True)), ("b", "g"), ["a1"]),
        # A replica with requests in flight is never taken.
        (
            slots(4, 0, (busy("a1", "a"), *A_MIN_SCALE_4[1:]), a=T(held=4, wanted=4), b=T(wanted=1, waiting=True)),
            ("b", "g"),
            ["a2"],
        ),
        (
            slots(2, 0, (busy("a1", "a"), busy("a2", "a")), a=T(held=2, wanted=2), b=T(wanted=1, waiting=True)),
            ("b", "g"),
            [],
        ),
        # Within the tenant over its share, spare replicas go before min_scale ones.
        (
            slots(
                3, 0, (idle("m1", "a", 1.0, "kept"), idle("s1", "a", 5.0, "warm", spare=True), idle("b1", "b", 0.0)),
                a=T(held=2, wanted=2), b=T(held=1, wanted=2, waiting=True),
            ),
            ("b", "f"),
            ["s1"],
        ),
        # Of two tenants over their shares, the one furthest over gives first.
        (
            slots(
                6, 0, (idle("a1", "a", 9.0), idle("a2", "a", 9.5), idle("a3", "a", 9.7), idle("a4", "a", 9.9),
                       idle("c1", "c", 1.0), idle("c2", "c", 2.0)),
                a=T(held=4, wanted=4), b=T(wanted=2, waiting=True), c=T(held=2, wanted=2),
            ),
            ("b", "f"),
            ["a1", "a2"],
        ),
        # A tenant at its share takes nothing from another within its own, not even an idle spare replica ...
        (
            slots(4, 0, (*A_MIN_SCALE_4[:3], idle("b1", "b", 0.0, spare=True)), a=T(held=3, wanted=4, waiting=True),
                  b=T(held=1, wanted=1)),
            ("a", "f2"),
            [],
        ),
        # ... but a slot may move within its own tenant, from an idle function to a waking one (LRU first).
        (
            slots(2, 0, (idle("n1", "acme", 2.0, "newer", spare=True), idle("g1", "globex", 3.0, "busy", spare=True)),
                  acme=T(held=1, wanted=2, waiting=True), globex=T(held=1, wanted=1)),
            ("acme", "older"),
            ["n1"],
        ),
        # Under its share, with the excess of the tenant over its share busy: an idle function elsewhere sleeps.
        (
            slots(4, 0, (busy("a1", "a"), busy("a2", "a"), busy("a3", "a"), idle("c1", "c", 1.0, spare=True)),
                  a=T(held=3, wanted=3), b=T(wanted=1, waiting=True), c=T(held=1, wanted=1)),
            ("b", "f"),
            ["c1"],
        ),
        # The start's own function gives nothing to itself.
        (slots(1, 0, (idle("x1", "a", 1.0, "x", spare=True),), a=T(held=1, wanted=2, waiting=True)), ("a", "x"), []),
    ],
)  # fmt: skip
def test_replicas_beyond_a_share_are_taken_back_first(
    state: Slots, claimant: tuple[str, str], taken: list[str]
) -> None:
    assert reclaimable(state, *claimant) == taken


@pytest.mark.parametrize(
    ("state", "tenant", "limit"),
    [
        # Alone, a tenant may take every slot.
        (slots(4, 4, a=T(wanted=4)), "a", 4),
        # While B waits for its share, A's min_scale stops at A's share.
        (slots(4, 0, a=T(held=3, wanted=4), b=T(wanted=1, waiting=True)), "a", 3),
        # B holds its share and no slot is free: A starts nothing that would have to take B's slot back.
        (slots(4, 0, (idle("b1", "b", 0.0, spare=True),), a=T(held=3, wanted=4), b=T(held=1, wanted=1)), "a", 3),
        # B asleep: A's whole min_scale.
        (slots(4, 1, a=T(held=3, wanted=4), b=T()), "a", 4),
        # Nobody short of its share: a free slot may be used beyond the share, and so may the tenant's own spare.
        (slots(5, 1, a=T(held=3, wanted=5), b=T(held=1, wanted=1)), "a", 4),
        (slots(4, 0, (idle("a3", "a", 0.0, "w", spare=True),), a=T(held=3, wanted=5), b=T(held=1, wanted=1)), "a", 4),
        # The tenant short of its share may start up to it.
        (slots(4, 0, a=T(held=4, wanted=4), b=T(wanted=2, waiting=True)), "b", 2),
    ],
)  # fmt: skip
def test_starts_stop_at_the_share_while_another_tenant_is_short(
    state: Slots, tenant: str, limit: int
) -> None:
    assert start_limit(state, tenant) == limit


@pytest.mark.parametrize(
    ("state", "tenant", "yields"),
    [
        (slots(4, 1, a=T(held=3, wanted=4, waiting=True), b=T(wanted=1, waiting=True)), "a", True),
        (slots(4, 1, a=T(held=3, wanted=4, waiting=True), b=T(wanted=1, waiting=True)), "b", False),
        (slots(4, 1, a=T(held=3, wanted=4, waiting=True), b=T(held=1, wanted=1)), "a", False),
        (slots(4, 1, a=T(held=3, wanted=4, waiting=True)), "a", False),
    ],
)
def test_a_start_at_its_share_leaves_a_free_slot_to_a_tenant_short_of_its_own(
    state: Slots, tenant: str, yields: bool
) -> None:
    assert must_yield(state, tenant) is yields
