"""Which functions are active, from metric samples and wake signals: the scaler's state between ticks.

KEDA asks two questions per ScaledObject: *is it active?* (0 <-> 1, answered here with ``scaler.policy``) and
*how much load?* (1 <-> N: the metric value that KEDA's HPA divides by the target). The board answers both
from plain data, with time passed in as ``now`` so every rule is testable with a fake clock.

- A sample carries sums over all gateway replicas: requests in flight (waiting included), waiting, and
  requests answered within the activity window. Answered requests count as demand even when none was in
  flight at the scrape (something served them: KEDA must not let its cooldown run out under quick traffic),
  and they are how "last request" is known without one query per function.
- Functions absent from a tick's samples had nothing going on. An inactive one without min_scale cannot
  change state without a sample or a wake, so the tick skips it: the tick's cost follows the busy functions.
- A wake signal (a request found its function asleep) counts as a request and turns the function active at
  once; watchers (``StreamIsActive`` streams) hear about every change of activity without waiting for a tick.
- Who waits for the idle timeout: by default KEDA (``cooldownPeriod`` carries it) and the scaler reports
  activity within ``activity_window_s`` (a scrape interval or two, so sparse traffic does not flicker).
  A ScaledObject may also set ``idleTimeout`` in its trigger metadata to have the scaler wait itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scaler.policy import Load, Scaling, State, decide

Key = tuple[str, str]  # (tenant, function)


@dataclass(frozen=True)
class Sample:
    """One function's numbers in one Prometheus answer (sums over gateway replicas)."""

    in_flight: float = 0.0  # being served or waiting (paddlefn_in_flight_requests)
    pending: float = 0.0  # waiting for a replica (paddlefn_pending_requests)
    recent: float = 0.0  # requests answered within the activity window (increase of paddlefn_requests_total)


@dataclass
class Entry:
    scaling: Scaling  # as the ScaledObject states it, resolved for 0 <-> 1 (see Board.configure)
    last_request_at: float | None = None
    concurrency: float = 0.0  # requests in flight, waiting included, at the last tick (KEDA's HPA metric)
    state: State = field(default_factory=State)
    active: bool = False
    watchers: set[asyncio.Queue[bool]] = field(default_factory=set)


class Board:
    def __init__(self, activity_window_s: float = 30.0) -> None:
        self.activity_window_s = activity_window_s
        self._entries: dict[Key, Entry] = {}

    def _entry(self, key: Key) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = Entry(self._resolve(Scaling()))
        return entry

    def _resolve(self, scaling: Scaling) -> Scaling:
        # Built once per ScaledObject, not per tick: a tick decides for every busy function.
        return Scaling(
            min_scale=scaling.min_scale,
            max_scale=scaling.max_scale,
            target=scaling.target,
            # The scaler's own idle wait is never shorter than the activity window (see the module docstring).
            idle_timeout_s=max(scaling.idle_timeout_s, self.activity_window_s),
            scale_down_delay_s=0.0,  # 1 <-> N belongs to KEDA's HPA; here only 0 <-> 1 is decided
        )

    def configure(self, key: Key, scaling: Scaling) -> None:
        """Scaling settings as KEDA's ScaledObject states them (they arrive with every call)."""
        entry = self._entry(key)
        resolved = self._resolve(scaling)
        if entry.scaling != resolved:
            entry.scaling = resolved

    def observe(self, samples: Mapping[Key, Sample], now: float) -> None:
        """Take one tick's samples; a function absent from them has no load (its series went stale)."""
        busy: set[Key] = set()
        fresh = State(now)  # what the policy answers for demand; immutable, so one for the whole tick
        for key, sample in samples.items():
            entry = self._entry(key)
            entry.concurrency = max(sample.in_flight, sample.pending, 0.0)  # in flight counts the waiting too
            # Requests answered lately are demand too: something served them, and KEDA must not let its
            # cooldown run out under traffic too quick to be seen in flight. With demand, the policy always
            # wants at least one replica (test_demand_always_wants_a_replica checks it against
            # scaler.policy.decide), so the tick need not ask it for the busy functions: active, clock restarted.
            if entry.concurrency > 0 or sample.recent > 0:
                entry.last_request_at = now
                entry.state = fresh
                self._set_active(entry, True)
                busy.add(key)
        for key, entry in self._entries.items():
            if key in busy:
                continue
            if key not in samples:
                entry.concurrency = 0.0
            if not entry.active and entry.scaling.min_scale == 0:
                continue  # asleep and nothing happened: nothing to decide (the tick's cost follows the busy)
            last = entry.last_request_at
            if entry.active and last is not None and now - last < entry.scaling.idle_timeout_s:
                continue  # up and not yet idle for its timeout: the policy keeps it (test_not_yet_idle_stays_up)
            self._decide(entry, now)

    def _decide(self, entry: Entry, now: float) -> None:
        """Ask the policy about a function without demand: stay up until the idle timeout, or min_scale."""
        since = None if entry.last_request_at is None else now - entry.last_request_at
        load = Load(seconds_since_request=since)
        decision = decide(load, entry.scaling, 1 if entry.active else 0, entry.state, now)
        entry.state = decision.state
        self._set_active(entry, decision.desired > 0)

    def _set_active(self, entry: Entry, active: bool) -> None:
        if active != entry.active:
            entry.active = active
            for queue in entry.watchers:
                queue.put_nowait(active)

    def wake(self, key: Key, now: float) -> None:
        """A request found KEY asleep: active now, and it counts as a request for the idle timeout."""
        entry = self._entry(key)
        entry.last_request_at = now
        entry.state = State(now)
        self._set_active(entry, True)

    def is_active(self, key: Key) -> bool:
        entry = self._entries.get(key)
        return entry.active if entry else False

    def demand(self, key: Key) -> float:
        """Concurrent requests (served + waiting): KEDA's HPA divides it by the target to get replicas."""
        entry = self._entries.get(key)
        return entry.concurrency if entry else 0.0

    def watch(self, key: Key) -> asyncio.Queue[bool]:
        """A queue that receives every change of KEY's activity; call ``unwatch`` when done."""
        queue: asyncio.Queue[bool] = asyncio.Queue()
        self._entry(key).watchers.add(queue)
        return queue

    def unwatch(self, key: Key, queue: asyncio.Queue[bool]) -> None:
        entry = self._entries.get(key)
        if entry:
            entry.watchers.discard(queue)

    def keys(self) -> Iterable[Key]:
        return self._entries.keys()
