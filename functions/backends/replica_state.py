"""The replica policy's data (``functions/backends/replicas.py``): its state, the events it is told and the
effects it decides, as frozen dataclasses. Plain data only: the rules live in ``replicas``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from enum import Enum

Key = Hashable  # a function's key: (tenant, name) in the platform
PADDLE, LITE = "paddle", "lite"


# ---------------------------------------------------------------- state


class Phase(Enum):
    CLAIMING = "claiming"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


HOLDS_WORKER = (Phase.LOADING, Phase.READY, Phase.DRAINING)
COUNTED = (Phase.CLAIMING, Phase.LOADING, Phase.READY)  # the scaler's "replicas running or starting"


@dataclass(frozen=True)
class Spec:
    """What the policy needs to know of a function's configuration."""

    tenant: str
    label: str = ""
    """For messages: tenant/name."""
    min_scale: int = 0
    engine: str = PADDLE
    """The primary replicas' engine: paddle, or lite for device=lite."""
    fallback: str = "none"
    """none, cold or capacity (see the module docstring)."""
    slots: int = 2
    """Requests a primary replica takes at once."""
    lite_slots: int = 2
    """Requests a Lite fallback replica takes at once."""
    cold_timeout_s: float = 60.0
    """How long a start may wait for a slot before its waiting requests get a 503."""


@dataclass(frozen=True)
class Replica:
    id: int
    key: Key
    engine: str
    phase: Phase
    slots: int
    claimed_at: float
    """When the start was decided: its deadline for a slot counts from here."""
    since: float
    """When it entered its phase: a ready replica's residency counts from here."""
    fallback: bool = False
    in_flight: int = 0
    idle_since: float = 0.0
    stopped: bool = False
    """DRAINING and told to stop (its worker exits soon: a slot on its way)."""


@dataclass(frozen=True)
class Function:
    spec: Spec
    desired: int = 0
    waiting: int = 0
    """Requests waiting for a free slot of a replica, oldest first (the driver holds them)."""
    last_used: float = 0.0


@dataclass(frozen=True)
class PoolView:
    """What the driver saw of a worker pool just before the event."""

    capacity: int
    unassigned: int = 0
    """Workers the pool holds for no replica (pre-warmed idle ones, refills): slots in use too."""
    idle: int = 0
    """Of those, warm ones a take gets at once."""
    freeing: bool = False
    """A slot is on its way: a refill starting, or a worker exiting."""


@dataclass(frozen=True)
class Tenant:
    weight: int = 1
    """The plan's weight: its share of contended slots (functions/slots.py)."""
    max_replicas: int | None = None
    """The plan's max_replicas across the tenant's functions (None: no limit)."""


@dataclass(frozen=True)
class Rules:
    min_residency_s: float = 10.0
    """A replica ready for less than this is never evicted or shed: a woken function serves before it can be
    put back to sleep for another (PADDLEFN_MIN_RESIDENCY_S)."""
    scale_down_delay_s: float = 30.0
    """An idle Lite replica standing in beside ready primaries goes after this long."""


@dataclass(frozen=True)
class State:
    functions: Mapping[Key, Function] = field(default_factory=dict)
    replicas: Mapping[int, Replica] = field(default_factory=dict)
    pools: Mapping[str, PoolView] = field(default_factory=dict)
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    next_id: int = 1


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Configure:
    """A function was deployed or its configuration changed; RESTART: its replicas must load anew."""

    key: Key
    spec: Spec
    restart: bool = False


@dataclass(frozen=True)
class Remove:
    key: Key


@dataclass(frozen=True)
class Scale:
    """The scaler wants COUNT primary replicas (0: sleep)."""

    key: Key
    count: int


@dataclass(frozen=True)
class Arrive:
    """A request arrived: it goes to a free slot at once (``Dispatch``) or waits."""

    key: Key


@dataclass(frozen=True)
class GiveUp:
    """A waiting request left (its timeout, or the client went away)."""

    key: Key


@dataclass(frozen=True)
class Done:
    """A request on REPLICA ended."""

    replica: int


@dataclass(frozen=True)
class TakeFailed:
    """The pool had no worker after all (it changed between the decision and the take): claim again."""

    replica: int


@dataclass(frozen=True)
class Loaded:
    replica: int


@dataclass(frozen=True)
class StartFailed:
    """REPLICA's take or load failed; HOLDS_WORKER: a worker was taken (it is stopped)."""

    replica: int
    key: Key
    message: str
    holds_worker: bool
    retry_after: int = 5


@dataclass(frozen=True)
class Exited:
    """REPLICA's worker process ended; CRASHED: it was not asked to."""

    replica: int
    crashed: bool = False


@dataclass(frozen=True)
class Overran:
    """A request on REPLICA ran past its time limit: the worker is killed and replaced."""

    replica: int


@dataclass(frozen=True)
class Adopt:
    """A worker already serving KEY's model (not from a pool) becomes a ready primary replica."""

    key: Key


@dataclass(frozen=True)
class Tick:
    """Time passed or a pool changed: deadlines, residencies and freed slots are looked at again."""


Event = (
    Configure
    | Remove
    | Scale
    | Arrive
    | GiveUp
    | Done
    | TakeFailed
    | Loaded
    | StartFailed
    | Exited
    | Overran
    | Adopt
    | Tick
)


# ---------------------------------------------------------------- effects


class Cause(Enum):
    EVICTED = "evicted"  # for another function's start
    SHED = "shed"  # the pool's capacity shrank
    SCALED_DOWN = "scaled down"  # the scaler's number
    RETIRED = "retired"  # a Lite stand-in no longer needed, or a restart for a new configuration
    DRAINED = "drained"  # a retired replica's last request ended
    UNWANTED = "unwanted"  # loaded after it was no longer wanted
    FAILED = "failed"  # its start failed
    REMOVED = "removed"  # the function was deleted
    KILLED = "killed"  # a request overran its time limit


@dataclass(frozen=True)
class Dispatch:
    """The oldest waiting request of KEY (the one just arrived, when none waited) goes to REPLICA."""

    key: Key
    replica: int


@dataclass(frozen=True)
class Take:
    """Take a worker of ENGINE's pool for REPLICA and load KEY's model (WARM_UP: nobody waits for it)."""

    replica: int
    key: Key
    engine: str
    warm_up: bool
    why: str = ""


@dataclass(frozen=True)
class Stop:
    """Stop REPLICA's worker (KILL: at once); nothing is in flight on it unless the cause is REMOVED or KILLED."""

    replica: int
    key: Key
    cause: Cause
    why: str = ""
    kill: bool = False


@dataclass(frozen=True)
class Woke:
    """A request found KEY asleep: it is waking (the wake listeners hear of it)."""

    key: Key


@dataclass(frozen=True)
class Fail:
    """Every waiting request of KEY fails with 503 (RETRY_AFTER seconds, when set)."""

    key: Key
    message: str
    retry_after: int | None = None


Effect = Dispatch | Take | Stop | Woke | Fail
