"""functions.backends.replicas: the replica policy as tables of events with a fake clock, and random traffic.

The property test drives the policy as the driver would (requests arrive, end and give up; workers load and exit;
the clock moves; the pool's capacity changes) and checks after every event: no replica of a function with
requests in flight or waiting is evicted, none within the minimum residency of becoming ready, slots in use stay
within capacity, and evictions stay within the bound of the module docstring (at most C per residency window).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from functions.backends.replica_state import (
    LITE,
    PADDLE,
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
    Loaded,
    Phase,
    PoolView,
    Rules,
    Scale,
    Spec,
    State,
    Stop,
    Take,
    Tenant,
    Tick,
    Woke,
)
from functions.backends.replicas import count, in_use, of, step
from functions.clock import ManualClock

RULES = Rules(min_residency_s=10.0, scale_down_delay_s=30.0)


class Sim:
    """The policy with a fake clock, played as its driver would: effects are recorded, takes finish on ``load``."""

    def __init__(self, capacity: int = 2, lite: int = 2, rules: Rules = RULES) -> None:
        self.clock = ManualClock(0.0)
        self.rules = rules
        self.state = State(pools={PADDLE: PoolView(capacity), LITE: PoolView(lite)})
        self.effects: list[Effect] = []

    def __call__(self, event: Event) -> list[Effect]:
        self.state, effects = step(self.state, event, self.clock.now(), self.rules)
        self.effects += effects
        return effects

    def deploy(self, key: Hashable, tenant: str = "acme", **spec: object) -> None:
        self(Configure(key, Spec(tenant, label=f"{tenant}/{key}", **spec)))  # type: ignore[arg-type]

    def load(self) -> list[Effect]:
        """Every replica loading becomes ready."""
        effects: list[Effect] = []
        for r in list(self.state.replicas.values()):
            if r.phase == Phase.LOADING:
                effects += self(Loaded(r.id))
        return effects

    def warm(self, key: Hashable, tenant: str = "acme", **spec: object) -> int:
        """A deployed function with one ready replica, used once; its replica's id."""
        self.deploy(key, tenant, **spec)
        self(Scale(key, 1))
        self.load()
        [dispatch] = [e for e in self(Arrive(key)) if isinstance(e, Dispatch)]
        self(Done(dispatch.replica))
        return dispatch.replica

    def advance(self, seconds: float) -> list[Effect]:
        self.clock.advance(seconds)
        return self(Tick())


def stops(effects: list[Effect], cause: Cause = Cause.EVICTED) -> list[int]:
    return [e.replica for e in effects if isinstance(e, Stop) and e.cause == cause]


def takes(effects: list[Effect]) -> list[Take]:
    return [e for e in effects if isinstance(e, Take)]


# ---------------------------------------------------------------- tables


def test_a_request_to_a_warm_function_goes_to_its_replica_at_once() -> None:
    sim = Sim()
    rid = sim.warm("f")
    assert sim(Arrive("f")) == [Dispatch("f", rid)]


def test_a_request_to_a_sleeping_function_wakes_it_and_waits_for_the_replica() -> None:
    sim = Sim()
    sim.deploy("f")
    effects = sim(Arrive("f"))
    assert effects[0] == Woke("f")
    [take] = takes(effects)
    assert take.engine == PADDLE and take.warm_up is False  # someone waits: no warm-up run first
    assert sim.load() == [Dispatch("f", take.replica)]


def test_under_pressure_the_least_recently_used_idle_function_sleeps_first() -> None:
    sim = Sim(capacity=2)
    older = sim.warm("older")
    sim.clock.advance(1)
    sim.warm("newer")
    sim.deploy("waking")
    sim.clock.advance(20)  # both past their residency
    effects = sim(Arrive("waking"))
    assert stops(effects) == [older]
    assert not takes(effects)  # its slot is on its way, not free yet
    assert sim.state.functions["older"].desired == 0  # it sleeps; the scaler does not bring it back by itself
    [take] = takes(sim(Exited(older)))  # the freed slot goes to the waiting start at once
    assert take.key == "waking"


def test_a_function_serving_requests_is_never_evicted() -> None:
    sim = Sim(capacity=2)
    sim.warm("busy")
    sim.warm("queued")
    sim(Arrive("busy"))  # in flight
    sim.deploy("waking")
    sim.clock.advance(60)
    assert stops(sim(Arrive("waking"))) == [sim.state.replicas[2].id]  # the idle one goes, not the busy one
    assert of(sim.state, "busy", Phase.READY)


def test_a_function_woken_within_the_minimum_residency_is_not_evicted_and_the_start_waits() -> None:
    sim = Sim(capacity=1)
    rid = sim.warm("just-woken")
    sim.deploy("waking")
    sim.clock.advance(4)
    effects = sim(Arrive("waking"))
    assert not stops(effects) and not takes(effects)
    assert sim.state.functions["waking"].waiting == 1
    assert not stops(sim.advance(5.9))  # 9.9 s after it was ready
    assert stops(sim.advance(0.1)) == [rid]  # 10 s: its residency is over


def test_when_nothing_can_be_evicted_the_requests_wait_their_cold_start_timeout_then_get_a_503() -> None:
    sim = Sim(capacity=1)
    sim.warm("busy")
    sim(Arrive("busy"))
    sim.deploy("waking", cold_timeout_s=30.0)
    sim(Arrive("waking"))
    assert not [e for e in sim.advance(29) if isinstance(e, Fail)]
    [fail] = [e for e in sim.advance(1) if isinstance(e, Fail)]
    assert fail.key == "waking" and fail.retry_after == 5
    assert "all 1 worker slots are held by functions that are serving" in fail.message
    assert sim.state.functions["waking"].waiting == 0 and count(sim.state, "waking") == 0


def test_the_retry_after_of_a_503_is_when_the_first_resident_replica_may_go() -> None:
    sim = Sim(capacity=1)
    sim.warm("resident")
    sim.deploy("waking", cold_timeout_s=3.0)
    sim(Arrive("waking"))
    [fail] = [e for e in sim.advance(3) if isinstance(e, Fail)]
    assert fail.retry_after == 7  # ready at 0 s, residency 10 s, now 3 s


def test_one_replica_is_evicted_for_one_start_not_one_per_look() -> None:
    sim = Sim(capacity=3)
    for name in ("a", "b", "c"):
        sim.warm(name)
    sim.deploy("waking")
    sim.clock.advance(20)
    assert len(stops(sim(Arrive("waking")))) == 1
    for _ in range(5):  # the victim has not exited yet: nobody else goes for the same start
        assert not stops(sim.advance(1))


def test_two_starts_short_of_a_slot_evict_two_replicas() -> None:
    sim = Sim(capacity=2)
    sim.warm("a")
    sim.warm("b")
    sim.deploy("x")
    sim.deploy("y")
    sim.clock.advance(20)
    assert len(stops(sim(Arrive("x")))) == 1
    assert len(stops(sim(Arrive("y")))) == 1


def test_no_worker_is_taken_while_the_pool_holds_its_capacity_in_unassigned_or_freeing_workers() -> None:
    sim = Sim(capacity=2)
    sim.warm("a")
    sim.deploy("b")
    sim.state = replace(sim.state, pools={**sim.state.pools, PADDLE: PoolView(2, unassigned=1)})
    assert not takes(sim(Arrive("b")))  # 1 replica + 1 pre-warmed being refilled = 2 of 2
    sim.state = replace(sim.state, pools={**sim.state.pools, PADDLE: PoolView(3, unassigned=2, freeing=True)})
    assert not takes(sim(Tick()))  # refills on their way count from the start: no new worker races past them
    sim.state = replace(sim.state, pools={**sim.state.pools, PADDLE: PoolView(3, unassigned=1, idle=1)})
    assert len(takes(sim(Tick()))) == 1  # the refill is warm: taken


def test_a_start_takes_a_free_slot_beside_a_refill_on_its_way_instead_of_evicting() -> None:
    sim = Sim(capacity=4)
    sim.warm("a")
    sim.deploy("b")
    sim.state = replace(sim.state, pools={**sim.state.pools, PADDLE: PoolView(4, unassigned=1, freeing=True)})
    effects = sim(Arrive("b"))  # 1 replica + 1 refill of 4: room, however long the refill takes
    assert len(takes(effects)) == 1 and not stops(effects)


def test_a_shrinking_capacity_sheds_idle_replicas_least_recently_used_first_but_never_a_protected_one() -> (
    None
):
    sim = Sim(capacity=3)
    first = sim.warm("first")
    sim.clock.advance(1)
    sim.warm("second")
    sim.clock.advance(1)
    third = sim.warm("third")
    sim(Arrive("third"))  # serving
    sim.clock.advance(20)
    sim.state = replace(sim.state, pools={**sim.state.pools, PADDLE: PoolView(1)})
    assert stops(sim(Tick()), Cause.SHED) == [first, first + 1]
    assert of(sim.state, "third", Phase.READY)[0].id == third


def test_a_tenant_over_its_fair_share_gives_its_min_scale_replica_to_another_tenants_wake_up() -> None:
    sim = Sim(capacity=2)
    sim.deploy("pinned", "hog", min_scale=2)
    sim(Scale("pinned", 2))
    sim.load()
    sim.deploy("sleepy", "quiet")
    sim.clock.advance(20)
    [victim] = stops(sim(Arrive("sleepy")))
    assert sim.state.replicas[victim].key == "pinned"
    assert takes(sim(Exited(victim)))[0].key == "sleepy"
    sim.load()
    # The hog's scaler asks for its min_scale again: held back while the quiet tenant holds its share.
    sim(Scale("pinned", 2))
    assert count(sim.state, "pinned") == 1


def test_fallback_cold_answers_from_lite_while_the_primary_loads_then_retires_it() -> None:
    sim = Sim()
    sim.deploy("f", fallback="cold")
    effects = sim(Arrive("f"))
    assert sorted(t.engine for t in takes(effects)) == [LITE, PADDLE]
    lite = next(t.replica for t in takes(effects) if t.engine == LITE)
    primary = next(t.replica for t in takes(effects) if t.engine == PADDLE)
    assert sim(Loaded(lite)) == [Dispatch("f", lite)]  # Lite is ready first and answers
    assert stops(sim(Loaded(primary)), Cause.RETIRED) == []  # busy: it finishes its request first
    assert stops(sim(Done(lite)), Cause.DRAINED) == [lite]
    assert sim(Arrive("f")) == [Dispatch("f", primary)]


def test_fallback_capacity_answers_from_lite_when_no_slot_can_be_had() -> None:
    sim = Sim(capacity=1)
    sim.warm("hog", min_scale=1)
    sim(Arrive("hog"))  # serving: cannot be evicted
    sim.deploy("flex", fallback="capacity")
    effects = sim(Arrive("flex"))
    [take] = takes(effects)
    assert take.engine == LITE
    assert sim(Loaded(take.replica)) == [Dispatch("flex", take.replica)]
    assert not [e for e in sim.advance(600) if isinstance(e, Fail)]  # no deadline while Lite stands in


def test_a_tenant_at_max_replicas_gets_lite_with_fallback_capacity() -> None:
    sim = Sim(capacity=4)
    sim.state = replace(sim.state, tenants={"acme": Tenant(max_replicas=1)})
    sim.warm("hog", min_scale=1)
    sim.deploy("flex", fallback="capacity")
    assert [t.engine for t in takes(sim(Arrive("flex")))] == [LITE]


def test_a_crashed_replica_with_requests_waiting_is_replaced() -> None:
    sim = Sim()
    rid = sim.warm("f", slots=1)
    sim(Arrive("f"))
    sim(Arrive("f"))  # waits behind the first
    [take] = takes(sim(Exited(rid, crashed=True)))
    assert take.key == "f"


def test_scaling_down_retires_idle_replicas_first_and_busy_ones_after_their_last_request() -> None:
    sim = Sim(capacity=4)
    sim.deploy("f")
    sim(Scale("f", 2))
    sim.load()
    [d] = [e for e in sim(Arrive("f")) if isinstance(e, Dispatch)]
    assert stops(sim(Scale("f", 0)), Cause.SCALED_DOWN) == [r for r in (1, 2) if r != d.replica]
    assert stops(sim(Done(d.replica)), Cause.DRAINED) == [d.replica]


def test_a_request_that_gives_up_leaves_the_queue() -> None:
    sim = Sim(capacity=1)
    sim.warm("busy")
    sim(Arrive("busy"))
    sim.deploy("f")
    sim(Arrive("f"))
    sim(GiveUp("f"))
    assert sim.state.functions["f"].waiting == 0


# ---------------------------------------------------------------- random traffic

FUNCTIONS = [("a", "t1"), ("b", "t1"), ("c", "t2"), ("d", "t2"), ("e", "t3"), ("f", "t4")]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, len(FUNCTIONS) - 1)),
    st.tuples(st.just("complete"), st.integers(0, 50)),
    st.tuples(st.just("give_up"), st.integers(0, len(FUNCTIONS) - 1)),
    st.tuples(st.just("load"), st.integers(0, 50)),
    st.tuples(st.just("exit"), st.integers(0, 50)),
    st.tuples(st.just("crash"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.floats(0.05, 15.0)),
    st.tuples(st.just("capacity"), st.integers(1, 5)),
    st.tuples(st.just("scale"), st.integers(0, len(FUNCTIONS) - 1), st.integers(0, 2)),
)


class Traffic:
    """The driver's world around the policy: requests in flight, takes loading, workers stopping."""

    def __init__(self, capacity: int) -> None:
        self.sim = Sim(capacity=capacity)
        self.capacity = capacity
        self.max_capacity = capacity
        self.in_flight: list[int] = []  # replica of each request in flight
        self.evictions: list[float] = []
        for name, tenant in FUNCTIONS:
            self.sim.deploy(name, tenant, slots=1, cold_timeout_s=20.0, min_scale=1 if name == "a" else 0)

    def play(self, move: tuple) -> None:  # type: ignore[type-arg]
        sim = self.sim
        kind = move[0]
        replicas = sorted(sim.state.replicas.values(), key=lambda r: r.id)
        if kind == "arrive":
            self.send(Arrive(FUNCTIONS[move[1]][0]))
        elif kind == "complete" and self.in_flight:
            self.send(Done(self.in_flight.pop(move[1] % len(self.in_flight))))
        elif kind == "give_up":
            key = FUNCTIONS[move[1]][0]
            if sim.state.functions[key].waiting:
                self.send(GiveUp(key))
        elif kind == "load":
            loading = [r for r in replicas if r.phase == Phase.LOADING]
            if loading:
                self.send(Loaded(loading[move[1] % len(loading)].id))
        elif kind == "exit":
            stopping = [r for r in replicas if r.stopped]
            if stopping:
                self.send(Exited(stopping[move[1] % len(stopping)].id))
        elif kind == "crash":
            ready = [r for r in replicas if r.phase == Phase.READY]
            if ready:
                rid = ready[move[1] % len(ready)].id
                self.in_flight = [r for r in self.in_flight if r != rid]  # its requests fail with it
                self.send(Exited(rid, crashed=True))
        elif kind == "advance":
            sim.clock.advance(move[1])
            self.send(Tick())
        elif kind == "capacity":
            self.capacity = move[1]
            self.max_capacity = max(self.max_capacity, self.capacity)
            self.send(Tick())
        elif kind == "scale":
            self.send(Scale(FUNCTIONS[move[1]][0], move[2]))

    def send(self, event: Event) -> None:
        sim = self.sim
        stopping = any(r.stopped for r in sim.state.replicas.values())
        sim.state = replace(
            sim.state, pools={**sim.state.pools, PADDLE: PoolView(self.capacity, freeing=stopping)}
        )
        before = sim.state
        effects = sim(event)
        self.check(before, event, effects)

    def check(self, before: State, event: Event, effects: list[Effect]) -> None:
        after, now, residency = self.sim.state, self.sim.clock.now(), self.sim.rules.min_residency_s
        for effect in effects:
            if isinstance(effect, Dispatch):
                r = after.replicas[effect.replica]
                assert r.phase == Phase.READY and r.in_flight <= r.slots
                self.in_flight.append(effect.replica)
            if isinstance(effect, Stop) and effect.cause in (Cause.EVICTED, Cause.SHED):
                victim = before.replicas[effect.replica]
                f = after.functions[victim.key]
                assert f.waiting == 0 and not any(r.in_flight for r in of(after, victim.key)), (
                    "evicted serving"
                )
                assert before.functions[victim.key].waiting == 0 or (
                    isinstance(event, GiveUp) and event.key == victim.key
                )
                assert victim.phase == Phase.READY and now - victim.since >= residency, (
                    "evicted while resident"
                )
                self.evictions.append(now)
        used_before, used_after = in_use(before, PADDLE), in_use(after, PADDLE)
        if takes([e for e in effects if isinstance(e, Take) and e.engine == PADDLE]):
            assert used_after <= self.capacity, f"{used_after} slots in use of {self.capacity}"
        assert used_after <= max(self.capacity, used_before), "slots in use grew past capacity"

    def check_eviction_rate(self) -> None:
        """At most C evictions in any window of the residency's length, so C * ceil(60 / R) a minute."""
        residency = self.sim.rules.min_residency_s
        for i, start in enumerate(self.evictions):
            window = [t for t in self.evictions[i:] if t < start + residency]
            assert len(window) <= self.max_capacity
            minute = [t for t in self.evictions[i:] if t < start + 60]
            assert len(minute) <= self.max_capacity * math.ceil(60 / residency)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.lists(op, max_size=150))
def test_random_traffic_never_evicts_a_serving_or_resident_function_nor_exceeds_capacity(
    capacity: int,
    moves: list[tuple],  # type: ignore[type-arg]
) -> None:
    traffic = Traffic(capacity)
    for move in moves:
        traffic.play(move)
    traffic.check_eviction_rate()
