"""The embedded backend's replica policy, pure: ``step(state, event, now, rules) -> (state, effects)``.

Who gets a worker slot, who is evicted to make room, when a Lite replica stands in, which requests go to which
replica: every such decision is made here, from plain data and an explicit ``now`` (as ``scaler/policy.py``
and Knative's ``Scale(now)``). ``functions/backends/local.py`` is the driver: it turns what happens (a request
arrives, a worker is loaded, a process exits) into events, and performs the effects (take a worker, stop one,
give a waiting request its replica, fail the waiting requests). Nothing here awaits, reads a clock or touches a
process, so the rules are tested as tables and with random traffic (tests/test_replica_policy.py). The data
(state, events, effects) is in ``replica_state.py``.

State: per function its ``Spec``, the replicas the scaler wants (``desired``), the requests waiting for a slot
and when it was last used; per replica its phase:

    CLAIMING --Take--> LOADING --Loaded--> READY --retire--> DRAINING --Exited--> (gone)
       |                  |                                    ^
       +-- called off     +-- StartFailed / retired -----------+

A CLAIMING replica waits for a worker slot and holds none; LOADING, READY and DRAINING ones hold one (DRAINING:
it takes no more requests and its worker exits once the last one ends). The slots in use of a pool are the
workers its replicas hold plus the ones the pool itself holds for nobody (pre-warmed, ``PoolView.unassigned``).

The rules:
- A start takes a worker only while one is idle, or no slot is on its way and slots in use are below the
  pool's capacity (read fresh at every event: it may change at runtime). So slots in use never exceed capacity,
  except after capacity shrinks: then nothing starts and idle replicas beyond it are shed, LRU first, under the
  same protections as evictions.
- Fair shares of slots between tenants are ``functions/slots.py``'s: a tenant holding its share leaves a freed
  slot to a tenant short of its own, and the victims of an eviction are chosen by its ``reclaimable`` order
  (beyond a tenant's share first, then the least recently used idle function sleeps early).
- Never evicted (nor shed): a replica of a function that is serving (requests in flight or waiting), and a
  replica ready for less than ``Rules.min_residency_s`` (default 10 s). A woken function serves its burst
  before it can be put back to sleep, so functions cannot evict each other in a loop (thrashing).
- One eviction per start that found no worker, less the slots already on their way (a stopping worker, a pool
  refill): never several replicas for one slot.
- When nothing can be evicted the start waits, and its requests with it, until the function's cold-start
  timeout; then they fail with 503 and a Retry-After of when the first protected replica becomes evictable.

Bound on evictions: a replica evicted at time t became ready at or before t - R (R = ``min_residency_s``), so
every replica evicted within a window [t0, t0 + R) already held a slot at t0; there are at most C of those (C =
the largest capacity in force, as slots in use never exceed it). Hence at most C evictions per R seconds, at
most C * ceil(60 / R) per minute (24 for 4 slots and the default 10 s), whatever the traffic.

Lite (``Spec.fallback``): ``cold``: a request that finds no primary ready also starts a Lite replica, and
whichever is ready first answers; ``capacity``: when no primary can be had (no slot, or the tenant at its
``max_replicas``) a Lite replica answers instead of the requests waiting, and the primary start waits without a
deadline. A ready primary retires the Lite replicas (a Lite one that stood in beside ready primaries goes after
``scale_down_delay_s`` idle). Lite replicas come from their own pool, are never evicted for a primary, and do
not count in ``count`` (the scaler's number) or the tenant's ``max_replicas``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from functions.backends.replica_state import (
    COUNTED,
    HOLDS_WORKER,
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
    Function,
    GiveUp,
    Key,
    Loaded,
    Overran,
    Phase,
    PoolView,
    Remove,
    Replica,
    Rules,
    Scale,
    StartFailed,
    State,
    Stop,
    Take,
    TakeFailed,
    Tenant,
    Tick,
    Woke,
)
from functions.slots import HeldReplica, Slots, TenantSlots, must_yield, reclaimable, start_limit

# ---------------------------------------------------------------- the entry points


def step(state: State, event: Event, now: float, rules: Rules) -> tuple[State, list[Effect]]:
    """The new state and the effects of EVENT at NOW."""
    work = _Step(state, now, rules)
    work.handle(event)
    work.advance()
    return work.result()


def clamp(state: State, key: Key, count: int, now: float, rules: Rules) -> int:
    """COUNT, or fewer where the starts would go beyond the tenant's fair share of worker slots while another
    tenant is short of its own (``slots.start_limit``); never fewer than run, and a sleeping function with a
    request waiting may always wake to one replica."""
    return _Step(state, now, rules).clamp(key, count)


def waiting_for_slot(state: State, key: Key, now: float, rules: Rules) -> tuple[str | None, int]:
    """Why KEY's start still waits for a worker slot, and in how many seconds to retry; (None, 0) when none of
    its starts waits for one (it is loading, or none is coming)."""
    work = _Step(state, now, rules)
    f = work.functions.get(key)
    if f is None or not work.of(key, Phase.CLAIMING, fallback=False):
        return None, 0
    engine, tenant = f.spec.engine, f.spec.tenant
    capacity = work.pool(engine).capacity
    if must_yield(work.slots(engine), tenant):
        return f"tenant '{tenant}' holds its fair share of the {capacity} worker slots", 5
    return (
        f"all {capacity} worker slots are held by functions that are serving or were woken less than "
        f"{rules.min_residency_s:g} s ago"
    ), work.retry_after(engine)


def count(state: State, key: Key) -> int:
    """Primary replicas running or starting: the scaler's number."""
    return sum(1 for r in _of_key(state.replicas, key) if not r.fallback and r.phase in COUNTED)


def of(state: State, key: Key, *phases: Phase, fallback: bool | None = None) -> list[Replica]:
    """KEY's replicas in PHASES (all phases when none), primaries or fallbacks only when FALLBACK says so."""
    return _of(state.replicas, key, phases, fallback)


def _of(
    replicas: Mapping[int, Replica], key: Key, phases: tuple[Phase, ...], fallback: bool | None
) -> list[Replica]:
    return [
        r
        for r in _of_key(replicas, key)
        if (not phases or r.phase in phases) and (fallback is None or r.fallback == fallback)
    ]


def _of_key(replicas: Mapping[int, Replica], key: Key) -> list[Replica]:
    """KEY's replicas; through the index of a step's result (a state is never changed after its step, so the
    index stays true), which the autoscaler's per-function questions each tick would otherwise scan for."""
    if isinstance(replicas, _Replicas):
        return replicas.of_key(key)
    return [r for r in replicas.values() if r.key == key]


def held(state: State, engine: str) -> int:
    """Workers of ENGINE's pool that replicas hold."""
    return sum(1 for r in state.replicas.values() if r.engine == engine and r.phase in HOLDS_WORKER)


def in_use(state: State, engine: str) -> int:
    """Slots in use of ENGINE's pool, as the policy counts them."""
    pool = state.pools.get(engine)
    return held(state, engine) + (pool.unassigned if pool else 0)


# ---------------------------------------------------------------- the rules


class _Replicas(dict[int, Replica]):
    """A step's replicas by id, with an index by function built when asked and dropped on any change: the rules
    ask for a function's replicas once per function per step (fair shares look at every function), and a scan of
    all replicas each time made a step O(functions x replicas): 64 ms at 1,000 warm functions."""

    def __init__(self, items: Mapping[int, Replica]) -> None:
        super().__init__(items)
        self._by_key: dict[Key, list[Replica]] | None = None

    def __setitem__(self, rid: int, replica: Replica) -> None:
        self._by_key = None
        super().__setitem__(rid, replica)

    def __delitem__(self, rid: int) -> None:
        self._by_key = None
        super().__delitem__(rid)

    def pop(self, rid: int, *default: Replica | None) -> Replica | None:  # type: ignore[override]
        self._by_key = None
        return super().pop(rid, *default)

    def of_key(self, key: Key) -> list[Replica]:
        return self._index().get(key, [])

    def claims(self) -> list[Replica]:
        """The replicas waiting for a slot (CLAIMING): most steps have none."""
        return self._index().get(_CLAIMS, [])

    def _index(self) -> dict[Key, list[Replica]]:
        if self._by_key is None:
            index: dict[Key, list[Replica]] = {}
            for r in self.values():
                index.setdefault(r.key, []).append(r)
                if r.phase == Phase.CLAIMING:
                    index.setdefault(_CLAIMS, []).append(r)
            self._by_key = index
        return self._by_key


_CLAIMS: Key = ("", "")  # the index's entry for CLAIMING replicas (no function has an empty name)


class _Step:
    """One step's working copy: the rules below change it and record effects; ``result`` freezes it."""

    def __init__(self, state: State, now: float, rules: Rules) -> None:
        self.functions = dict(state.functions)
        self.replicas = _Replicas(state.replicas)
        self.pools = dict(state.pools)
        self.tenants = state.tenants
        self.next_id = state.next_id
        self.now = now
        self.rules = rules
        self.effects: list[Effect] = []

    def result(self) -> tuple[State, list[Effect]]:
        return State(self.functions, self.replicas, self.pools, self.tenants, self.next_id), self.effects

    # ------------------------------------------------ events

    def handle(self, event: Event) -> None:
        match event:
            case Configure():
                self.configure(event)
            case Remove():
                self.remove(event.key)
            case Scale():
                self.scale(event.key, event.count)
            case Arrive():
                self.arrive(event.key)
            case GiveUp():
                self.give_up(event.key)
            case Done():
                self.done(event.replica)
            case TakeFailed():
                self.take_failed(event.replica)
            case Loaded():
                self.loaded(event.replica)
            case StartFailed():
                self.start_failed(event)
            case Exited():
                self.exited(event.replica, event.crashed)
            case Overran():
                self.overran(event.replica)
            case Adopt():
                self.adopt(event.key)
            case Tick():
                self.reap_fallbacks()

    def configure(self, event: Configure) -> None:
        key, spec = event.key, event.spec
        old = self.functions.get(key)
        self.functions[key] = replace(old, spec=spec) if old else Function(spec, last_used=self.now)
        for r in self.of(key):
            self.put(replace(r, slots=spec.lite_slots if r.engine == LITE else spec.slots))
        if spec.fallback == "none" or spec.engine == LITE:
            self.retire_fallbacks(key)
        if (
            old is not None and event.restart
        ):  # workers load what they were given: new ones pick up the change
            for r in self.of(key, Phase.LOADING, Phase.READY, fallback=False):
                self.retire(r, Cause.RETIRED, "its configuration changed")
            self.scale(key, old.desired)
        self.hand_out(key)

    def adopt(self, key: Key) -> None:
        if key in self.functions:
            r = self.claim(key, fallback=False)
            self.put(replace(r, phase=Phase.READY, idle_since=self.now))
            self.hand_out(key)

    def remove(self, key: Key) -> None:
        f = self.functions.pop(key, None)
        if f is None:
            return
        self.effects.append(Fail(key, f"function {f.spec.label} was deleted"))
        for r in self.of(key):
            if r.phase == Phase.CLAIMING:
                del self.replicas[r.id]
            elif r.phase == Phase.LOADING:
                self.put(replace(r, phase=Phase.DRAINING, since=self.now))  # stopped once it is loaded
            elif not r.stopped:
                self.stop(r, Cause.REMOVED, "its function was deleted")

    def scale(self, key: Key, wanted: int) -> None:
        f = self.functions.get(key)
        if f is None:
            return
        self.functions[key] = replace(f, desired=wanted)
        for _ in range(self.clamp(key, wanted) - self.count(key)):
            self.claim(key, fallback=False)
        surplus = self.count(key) - wanted
        claims = sorted(self.of(key, Phase.CLAIMING, fallback=False), key=lambda r: -r.id)  # newest first
        ready = sorted(self.of(key, Phase.READY, fallback=False), key=lambda r: (r.in_flight, r.idle_since))
        for r in [*claims, *ready][: max(0, surplus)]:  # idle ones first; busy ones finish what they hold
            self.retire(r, Cause.SCALED_DOWN, f"scaled to {wanted}")
        if wanted == 0:  # the function sleeps: Lite stand-ins go with it
            self.retire_fallbacks(key)

    def arrive(self, key: Key) -> None:
        f = self.functions.get(key)
        if f is None:
            return
        f = self.functions[key] = replace(f, last_used=self.now, waiting=f.waiting + 1)
        self.hand_out(key)
        if self.functions[key].waiting == 0:
            return
        asleep = not self.of(key, Phase.READY)
        if asleep and not self.of(key, Phase.CLAIMING, Phase.LOADING, fallback=False):
            self.effects.append(Woke(key))
            self.scale(key, max(f.desired, 1))
        if f.spec.fallback == "cold" and not self.of(key, Phase.READY, fallback=False):
            self.want_fallback(key, "the primary replica is cold-starting")
        elif (
            f.spec.fallback == "capacity"
            and self.of(key, Phase.READY, fallback=False)
            and not self.of(key, Phase.CLAIMING, Phase.LOADING, fallback=False)
        ):
            blocked = self.primary_blocked(key)
            if blocked:  # every primary is busy and no other can be had: Lite instead of a queue
                self.want_fallback(key, blocked)

    def give_up(self, key: Key) -> None:
        f = self.functions.get(key)
        if f is not None:
            self.functions[key] = replace(f, waiting=max(0, f.waiting - 1))

    def done(self, rid: int) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        r = self.put(replace(r, in_flight=max(0, r.in_flight - 1), idle_since=self.now))
        f = self.functions.get(r.key)
        if f is not None:
            self.functions[r.key] = replace(f, last_used=self.now)
        if r.phase == Phase.DRAINING:
            if r.in_flight == 0 and not r.stopped:
                self.stop(r, Cause.DRAINED, "its last request ended")
        else:
            self.hand_out(r.key)

    def take_failed(self, rid: int) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        if r.phase == Phase.LOADING:
            self.put(replace(r, phase=Phase.CLAIMING, since=self.now))
        else:  # retired meanwhile
            del self.replicas[rid]

    def loaded(self, rid: int) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        if r.phase != Phase.LOADING:  # retired or its function deleted while it loaded
            if not r.stopped:
                self.stop(r, Cause.UNWANTED, "no longer wanted when it was ready")
            return
        f = self.functions.get(r.key)
        if f is None:
            self.stop(r, Cause.UNWANTED, "its function went away")
        elif r.fallback:
            primaries = self.of(r.key, Phase.READY, fallback=False)
            if f.desired == 0 or f.spec.fallback == "none" or (primaries and f.waiting == 0):
                self.stop(r, Cause.UNWANTED, "the primary was quicker")
            else:
                self.put(replace(r, phase=Phase.READY, since=self.now, idle_since=self.now))
        elif self.count(r.key) - 1 >= f.desired and f.waiting == 0:
            self.stop(r, Cause.UNWANTED, "scaled down while it started")
        else:
            self.put(replace(r, phase=Phase.READY, since=self.now, idle_since=self.now))
            self.retire_fallbacks(r.key, ready_only=True)  # the primary is here: Lite stood in long enough
        self.hand_out(r.key)

    def start_failed(self, event: StartFailed) -> None:
        r = self.replicas.get(event.replica)
        if r is not None:
            if not event.holds_worker:
                del self.replicas[r.id]
            elif not r.stopped:
                self.stop(r, Cause.FAILED, event.message)
            if r.fallback:
                return  # the primary still comes (or fails the waiting requests itself)
        f = self.functions.get(event.key)
        if f is None:
            return
        self.fail_waiting(event.key, event.message, event.retry_after)

    def exited(self, rid: int, crashed: bool) -> None:
        r = self.replicas.pop(rid, None)
        if r is None or r.fallback or not crashed or r.phase != Phase.READY:
            return  # a crash while loading is the start's failure (StartFailed)
        self.replaced(r.key)

    def overran(self, rid: int) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        r = self.put(replace(r, phase=Phase.DRAINING, since=self.now, stopped=True))
        self.effects.append(Stop(rid, r.key, Cause.KILLED, "a request ran past its time limit", kill=True))
        if not r.fallback:
            self.replaced(r.key)

    def replaced(self, key: Key) -> None:
        """A replica of KEY is gone against the scaler's will: requests queued behind it get a fresh one."""
        f = self.functions.get(key)
        if f is None:
            return
        f = self.functions[key] = replace(f, desired=min(f.desired, self.count(key)))
        if f.waiting and self.count(key) == 0:
            self.scale(key, 1)

    # ------------------------------------------------ requests

    def hand_out(self, key: Key) -> None:
        """Free slots to waiting requests, oldest first: of a primary, else of a Lite stand-in."""
        f = self.functions.get(key)
        while f is not None and f.waiting > 0:
            free = [r for r in self.of(key, Phase.READY, fallback=False) if r.in_flight < r.slots]
            free = free or [r for r in self.of(key, Phase.READY, fallback=True) if r.in_flight < r.slots]
            if not free:
                return
            r = min(free, key=lambda r: (r.in_flight, r.id))
            self.put(replace(r, in_flight=r.in_flight + 1))
            f = self.functions[key] = replace(f, waiting=f.waiting - 1)
            self.effects.append(Dispatch(key, r.id))

    def fail_waiting(self, key: Key, message: str, retry_after: int | None) -> None:
        """KEY's start ended without a replica: its waiting requests fail (unless another start still comes)."""
        f = self.functions[key]
        if f.waiting and not self.of(key, Phase.CLAIMING, Phase.LOADING, fallback=False):
            self.effects.append(Fail(key, message, retry_after))
            f = replace(f, waiting=0)
        self.functions[key] = replace(f, desired=min(f.desired, self.count(key)))
        if self.count(key) == 0:  # no primary is coming: the Lite stand-in goes too (the next request tries)
            self.retire_fallbacks(key)

    # ------------------------------------------------ starts

    def advance(self) -> None:
        """Look at every start waiting for a slot, then at pools over their capacity."""
        self.call_off_unwanted()
        for engine in sorted(self.pools):  # a pool the driver did not describe is not decided on
            self.advance_pool(engine)
            self.shed(engine)

    def call_off_unwanted(self) -> None:
        """Starts still waiting for a slot beyond what their function wants now go, the newest first."""
        claiming = {r.key for r in self.replicas.claims() if not r.fallback}
        for key in claiming & self.functions.keys():  # most steps: none
            f = self.functions[key]
            surplus = self.count(key) - max(f.desired, 1 if f.waiting else 0)
            claims = sorted(self.of(key, Phase.CLAIMING, fallback=False), key=lambda r: -r.id)
            for r in claims[: max(0, surplus)]:
                del self.replicas[r.id]

    def advance_pool(self, engine: str) -> None:
        claims = sorted(
            (r for r in self.replicas.claims() if r.engine == engine), key=lambda r: (r.claimed_at, r.id)
        )
        short = 0  # starts of this pass that found no worker
        for c in claims:
            if c.id not in self.replicas:
                continue
            if self.key_gone(c):
                continue
            reason, no_slot = self.try_start(c, short)
            if reason is None:
                continue
            short += no_slot
            self.wait_or_give_up(c, reason)

    def key_gone(self, c: Replica) -> bool:
        if c.key in self.functions and not c.fallback:
            return False
        del self.replicas[c.id]
        return True

    def try_start(self, c: Replica, short: int) -> tuple[str | None, bool]:
        """Start C when it may have a worker now (None), else the reason it waits and whether that is the lack
        of a slot (SHORT: starts of this pass already short of one)."""
        f = self.functions[c.key]
        tenant = f.spec.tenant
        pool = self.pool(c.engine)
        if self.capacity_fallback(f) and self.over_quota(tenant, exclude=1):
            return f"tenant '{tenant}' is at its max_replicas", False
        if must_yield(self.slots(c.engine), tenant):
            if f.waiting == 0:  # nobody waits for it: the scaler asks again once the slot is not needed
                del self.replicas[c.id]
                return None, False
            return f"tenant '{tenant}' holds its fair share of the {pool.capacity} worker slots", False
        if self.can_take(c.engine):
            self.take(c)
            return None, False
        if short + 1 > self.on_the_way(c.engine) and self.evict_for(c):
            return f"a replica is stopping to free one of the {pool.capacity} worker slots", True
        return (
            f"all {pool.capacity} worker slots are held by functions that are serving or were woken less than "
            f"{self.rules.min_residency_s:g} s ago"
        ), True

    def wait_or_give_up(self, c: Replica, reason: str) -> None:
        f = self.functions[c.key]
        if self.capacity_fallback(f):  # Lite answers now; the primary takes the next free slot, no deadline
            self.want_fallback(c.key, reason)
            if self.of(c.key, Phase.LOADING, Phase.READY, fallback=True):
                return
        if self.now - c.claimed_at < f.spec.cold_timeout_s:
            return
        del self.replicas[c.id]
        retry = self.retry_after(c.engine)
        message = f"no worker slot for {f.spec.label} within {f.spec.cold_timeout_s:g} s: {reason}; retry in {retry} s"
        self.fail_waiting(c.key, message, retry)

    def take(self, c: Replica, why: str = "") -> None:
        pool = self.pool(c.engine)
        if pool.idle > 0:  # a warm one: its slot was in use already, now a replica holds it
            self.pools[c.engine] = replace(pool, idle=pool.idle - 1, unassigned=max(0, pool.unassigned - 1))
        self.put(replace(c, phase=Phase.LOADING, since=self.now))
        f = self.functions[c.key]
        self.effects.append(Take(c.id, c.key, c.engine, warm_up=f.waiting == 0, why=why))

    def claim(self, key: Key, *, fallback: bool) -> Replica:
        spec = self.functions[key].spec
        engine = LITE if fallback else spec.engine
        slots = spec.lite_slots if engine == LITE else spec.slots
        r = Replica(self.next_id, key, engine, Phase.CLAIMING, slots, self.now, self.now, fallback=fallback)
        self.next_id += 1
        return self.put(r)

    # ------------------------------------------------ slots

    def pool(self, engine: str) -> PoolView:
        return self.pools.get(engine) or PoolView(capacity=0)

    def held(self, engine: str) -> int:
        return sum(1 for r in self.replicas.values() if r.engine == engine and r.phase in HOLDS_WORKER)

    def in_use(self, engine: str) -> int:
        return self.held(engine) + self.pool(engine).unassigned

    def can_take(self, engine: str) -> bool:
        """A worker can be had without going over capacity: an idle one, or room. Workers on their way into the
        pool (refills) are counted in ``unassigned`` from the moment they are decided (WorkerPool.refill), so
        they need no wait here: waiting for every refill to end made starts evict others while most slots
        were free (8 evictions while deploying 300 functions under a capacity of 1,083)."""
        pool = self.pool(engine)
        return pool.idle > 0 or self.in_use(engine) < pool.capacity

    def on_the_way(self, engine: str) -> int:
        """Slots that free without another eviction: stopping workers (or the pool's own, as one)."""
        stopping = sum(1 for r in self.replicas.values() if r.engine == engine and r.stopped)
        return max(stopping, 1 if self.pool(engine).freeing else 0)

    def protected(self, r: Replica) -> bool:
        """Never evicted nor shed: serving, or ready for less than the minimum residency."""
        return self.serving(r.key) or self.now - r.since < self.rules.min_residency_s

    def serving(self, key: Key) -> bool:
        f = self.functions.get(key)
        return bool(f and f.waiting) or any(r.in_flight for r in self.of(key))

    def slots(self, engine: str, asking: tuple[Key, int] | None = None) -> Slots:
        """ENGINE's pool as functions/slots.py sees it (ASKING: a function asking for that many replicas);
        protected replicas count as held but are no candidates to be taken back."""
        held: dict[str, int] = {}
        wanted: dict[str, int] = {}
        waiting: set[str] = set()
        candidates: list[HeldReplica] = []
        for key, f in self.functions.items():
            if f.spec.engine != engine:
                continue
            tenant = f.spec.tenant
            want = max(f.desired, f.spec.min_scale, 1 if f.waiting else 0)
            if asking is not None and asking[0] == key:
                want = max(want, asking[1])
            wanted[tenant] = wanted.get(tenant, 0) + want
            held[tenant] = held.get(tenant, 0) + len(self.of(key, Phase.LOADING, Phase.READY, fallback=False))
            if self.of(key, Phase.CLAIMING, fallback=False):
                waiting.add(tenant)
            ready = sorted(self.of(key, Phase.READY, fallback=False), key=lambda r: (r.idle_since, r.id))
            spare = 0 if self.serving(key) else len(ready) - f.spec.min_scale
            for i, r in enumerate(ready):
                if not self.protected(r):
                    candidates.append(
                        HeldReplica(r.id, tenant, key, r.in_flight, r.idle_since, spare=i < spare)
                    )
        tenants = {
            t: TenantSlots(
                weight=self.tenant(t).weight,
                held=held.get(t, 0),
                wanted=min(w, q) if (q := self.tenant(t).max_replicas) is not None else w,
                waiting=t in waiting,
            )
            for t, w in wanted.items()
        }
        pool = self.pool(engine)
        free = pool.capacity - self.in_use(engine) + pool.idle
        return Slots(pool.capacity, tenants, tuple(candidates), max(0, free))

    def tenant(self, name: str) -> Tenant:
        return self.tenants.get(name) or Tenant()

    def clamp(self, key: Key, wanted: int) -> int:
        f = self.functions.get(key)
        current = self.count(key)
        if f is None or wanted <= current:
            return wanted
        engine, tenant = f.spec.engine, f.spec.tenant
        asked = sum(
            self.count(k)
            for k, g in self.functions.items()
            if (g.spec.tenant, g.spec.engine) == (tenant, engine)
        )
        room = max(0, start_limit(self.slots(engine, asking=(key, wanted)), tenant) - asked)
        waking = current == 0 and f.waiting > 0
        return max(current + min(wanted - current, room), 1 if waking else 0)

    def evict_for(self, c: Replica) -> bool:
        """Take one replica back for C's start (functions/slots.py's order, protected ones never)."""
        f = self.functions[c.key]
        victims = reclaimable(self.slots(c.engine), f.spec.tenant, c.key)
        if not victims:
            return False
        victim = next(r for r in self.replicas.values() if r.id == victims[0])
        owner = self.functions[victim.key]
        self.functions[victim.key] = replace(owner, desired=max(0, owner.desired - 1))
        self.retire(
            victim,
            Cause.EVICTED,
            f"capacity pressure: a replica of {owner.spec.label} stops to free a worker for {f.spec.label}",
        )
        return True

    def shed(self, engine: str) -> None:
        """Capacity shrank below the replicas that stay: idle ones go, least recently used first."""
        pool = self.pool(engine)
        staying = [
            r
            for r in self.replicas.values()
            if r.engine == engine and r.phase in (Phase.LOADING, Phase.READY)
        ]
        excess = len(staying) - pool.capacity
        if excess <= 0:
            return
        idle = sorted(
            (r for r in staying if r.phase == Phase.READY and not self.protected(r)),
            key=lambda r: (not r.fallback, r.idle_since, r.id),  # Lite stand-ins first
        )
        for r in idle[:excess]:
            f = self.functions.get(r.key)
            if f is not None and not r.fallback:
                self.functions[r.key] = replace(f, desired=max(0, f.desired - 1))
            self.retire(r, Cause.SHED, f"the pool shrank to {pool.capacity} worker slots")

    def retry_after(self, engine: str) -> int:
        """Seconds until the first replica of ENGINE protected only by its residency may be evicted (5 when
        none is: every holder is serving)."""
        ends = [
            end
            for r in self.replicas.values()
            if r.engine == engine and r.phase == Phase.READY and not self.serving(r.key)
            if (end := r.since + self.rules.min_residency_s - self.now) > 0
        ]
        return max(1, math.ceil(min(ends))) if ends else 5

    # ------------------------------------------------ Lite fallback

    def capacity_fallback(self, f: Function) -> bool:
        return f.spec.fallback == "capacity" and f.spec.engine == PADDLE

    def want_fallback(self, key: Key, why: str) -> None:
        """Start a Lite replica to answer for the primary, unless one runs or starts already."""
        spec = self.functions[key].spec
        if spec.fallback == "none" or spec.engine == LITE:
            return
        if self.of(key, Phase.CLAIMING, Phase.LOADING, Phase.READY, fallback=True):
            return
        c = self.claim(key, fallback=True)
        if self.can_take(LITE):
            self.take(c, why=f"a Lite fallback replica: {why}")
        else:  # Lite is never worth an eviction: the primary still comes
            del self.replicas[c.id]

    def primary_blocked(self, key: Key) -> str | None:
        """Why no further primary replica can be had now (fallback=capacity), or None."""
        f = self.functions[key]
        pool = self.pool(PADDLE)
        if not self.can_take(PADDLE) and not reclaimable(self.slots(PADDLE), f.spec.tenant, key):
            return f"all {pool.capacity} worker slots are busy"
        if self.over_quota(f.spec.tenant, exclude=0):
            return f"tenant '{f.spec.tenant}' is at its max_replicas"
        return None

    def over_quota(self, tenant: str, exclude: int) -> bool:
        """Whether the tenant's primary replicas (less EXCLUDE of the asking start) fill its max_replicas."""
        limit = self.tenant(tenant).max_replicas
        if limit is None:
            return False
        mine = sum(self.count(k) for k, f in self.functions.items() if f.spec.tenant == tenant)
        return mine - exclude >= limit

    def reap_fallbacks(self) -> None:
        """A Lite replica that stood in beside ready primaries goes once idle for the scale-down delay."""
        for key in list(self.functions):
            if not self.of(key, Phase.READY, fallback=False):
                continue
            for r in self.of(key, Phase.READY, fallback=True):
                if r.in_flight == 0 and self.now - r.idle_since >= self.rules.scale_down_delay_s:
                    self.retire(r, Cause.RETIRED, "idle Lite fallback replica")

    def retire_fallbacks(self, key: Key, ready_only: bool = False) -> None:
        phases = (Phase.READY,) if ready_only else (Phase.CLAIMING, Phase.LOADING, Phase.READY)
        for r in self.of(key, *phases, fallback=True):
            self.retire(r, Cause.RETIRED, "Lite fallback replica retired")

    # ------------------------------------------------ replicas

    def of(self, key: Key, *phases: Phase, fallback: bool | None = None) -> list[Replica]:
        return [
            r
            for r in self.replicas.of_key(key)
            if (not phases or r.phase in phases) and (fallback is None or r.fallback == fallback)
        ]

    def count(self, key: Key) -> int:
        return sum(1 for r in self.replicas.of_key(key) if not r.fallback and r.phase in COUNTED)

    def put(self, r: Replica) -> Replica:
        self.replicas[r.id] = r
        return r

    def retire(self, r: Replica, cause: Cause, why: str) -> None:
        """R takes no more requests: a start waiting for a slot is called off, a loading one is stopped once
        loaded, a busy one exits when its last request ends, an idle one now."""
        if r.phase == Phase.CLAIMING:
            del self.replicas[r.id]
        elif r.phase == Phase.LOADING or r.in_flight:
            self.put(replace(r, phase=Phase.DRAINING, since=self.now))
        else:
            self.stop(r, cause, why)

    def stop(self, r: Replica, cause: Cause, why: str) -> None:
        self.put(replace(r, phase=Phase.DRAINING, since=self.now, stopped=True))
        self.effects.append(Stop(r.id, r.key, cause, why))
