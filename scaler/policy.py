"""The scaling policy: load in, desired replicas out. Pure: time comes in as ``now``, state goes out with the
decision, so every rule can be tested as a table with a fake clock.

Rules, per function and tick:
- demand = the most requests in flight or waiting at once since the last tick; desired =
  ceil(demand / target) within [max(min_scale, 1), max_scale] while there is demand;
- no demand: keep what runs until ``idle_timeout_s`` has passed since the last request, then go to
  ``min_scale`` (0 = asleep: the worker process exits and frees its memory, GPU memory included);
- scale up at once; scale down (but not to sleep) only after demand has stayed lower for
  ``scale_down_delay_s``, so bursts do not thrash;
- a wake signal (a request for a sleeping function) is not a tick: callers scale to 1 on it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """What the metric source saw for one function since the previous tick."""

    in_flight: int = 0
    pending: int = 0  # held waiting for a replica
    peak: int = 0  # most in flight + pending at any moment since the last tick
    seconds_since_request: float | None = None  # None: no request since the platform started


@dataclass(frozen=True)
class Scaling:
    """The function's scaling settings, already resolved against platform defaults."""

    min_scale: int = 0
    max_scale: int = 4
    target: int = 2
    idle_timeout_s: float = 900.0
    scale_down_delay_s: float = 30.0


@dataclass(frozen=True)
class State:
    last_wanted_more_at: float | None = None  # when demand last called for at least the current replicas


@dataclass(frozen=True)
class Decision:
    desired: int
    state: State
    reason: str


def decide(load: Load, scaling: Scaling, current: int, state: State, now: float) -> Decision:
    demand = max(load.peak, load.in_flight + load.pending)
    floor = scaling.min_scale
    if demand > 0:
        wanted = max(math.ceil(demand / scaling.target), floor, 1)
        reason = f"{demand} concurrent / target {scaling.target}"
    elif load.seconds_since_request is None or load.seconds_since_request >= scaling.idle_timeout_s:
        wanted = floor
        reason = "idle" if floor == 0 else f"idle, min_scale {floor}"
        if current > wanted:
            return Decision(wanted, State(None), f"{reason} for {scaling.idle_timeout_s:g} s")
    else:
        wanted = max(floor, min(current, 1))
        reason = "no demand this tick; waiting for the idle timeout"
    wanted = min(wanted, scaling.max_scale)

    if wanted >= current:
        return Decision(wanted, State(now), reason)
    since = state.last_wanted_more_at
    if since is not None and now - since < scaling.scale_down_delay_s:
        return Decision(current, state, f"{reason}; holding {current} for the scale-down delay")
    return Decision(wanted, State(now), reason)
