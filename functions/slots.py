"""Worker slots under pressure: each tenant's fair share, and which replicas give a slot back to whom.

Pure functions of a snapshot (``Slots``); the local backend builds the snapshot and performs what they decide.

The rule (weighted max-min fairness over the machine's worker slots):

- A tenant's demand (``wanted``) is the replicas its functions want now: their ``min_scale``, what the scaler
  asks for, one for a wake-up that waits; at most its plan's ``max_replicas``. Shares are filled slot by slot:
  the next slot goes to the tenant with demand left that holds the fewest slots per unit of weight (the plan's
  ``weight``, as in the request fair queue). So no tenant's share exceeds its demand, with equal weights every
  tenant with demand has one slot before any has two, and when demand fits the machine every share equals the
  demand. Ties go to a tenant waiting for a slot, then to the one holding more (no needless moves), then by name.
- When a replica start finds no free slot, the replicas that may be taken back for it, first to go first
  (``reclaimable``):
  1. if the start's tenant holds less than its share: idle replicas of tenants holding more than theirs, at
     most each one's excess, the tenant furthest over first; within a tenant its spare replicas first, then the
     least recently used, ``min_scale`` ones included;
  2. idle spare replicas of the start's own tenant (other functions): the slot moves within the tenant;
  3. if the start's tenant holds less than its share: other tenants' idle spare replicas, least recently used
     first (an idle function sleeps early, as before shares existed).
  A replica with requests in flight is never taken. "Spare": beyond what its function keeps when idle (its
  ``min_scale``), in a function with nothing in flight or waiting.
- While another tenant holds less than its share, a tenant starts no replica beyond its own share
  (``start_limit``) and a start of a tenant at its share does not take a freed slot (``must_yield``): a
  ``min_scale`` the machine cannot give everyone waits instead of taking the slot straight back, so slots do not
  go back and forth. Otherwise free slots (and the tenant's own spare replicas) may be used beyond the share.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TenantSlots:
    """One tenant's side of the snapshot."""

    weight: int = 1
    """The plan's ``weight``: share of contended capacity relative to other tenants."""
    held: int = 0
    """Worker slots its replicas hold (ready, or loading a model); not starts still waiting for a slot."""
    wanted: int = 0
    """Replicas its functions want now (min_scale, the scaler's number, a waiting wake-up), within its plan."""
    waiting: bool = False
    """One of its replica starts is waiting for a slot (wins ties for a share)."""


@dataclass(frozen=True)
class HeldReplica:
    """A replica that holds a worker slot."""

    id: Hashable
    tenant: str
    function: Hashable = None
    in_flight: int = 0
    idle_since: float = 0.0
    """When its last request ended (or it started): the least recently used goes first."""
    spare: bool = False
    """Beyond its function's min_scale, in a function with nothing in flight or waiting."""


@dataclass(frozen=True)
class Slots:
    """Worker slots of one pool and who holds or wants them."""

    capacity: int
    tenants: Mapping[str, TenantSlots]
    replicas: tuple[HeldReplica, ...] = ()
    free: int = 0
    """Slots a start can have at once (never taken, or held by a pre-warmed idle worker)."""


def fair_shares(slots: Slots) -> dict[str, int]:
    """Each tenant's share of the slots: weighted max-min fair over ``wanted`` (see the module docstring)."""
    tenants = slots.tenants
    if sum(max(0, t.wanted) for t in tenants.values()) <= slots.capacity:
        # Room for everything wanted: the slot-by-slot filling below would end there too (it is O(capacity x
        # tenants), ~20 ms per call at a thousand slots and fifty tenants).
        return {name: max(0, t.wanted) for name, t in tenants.items()}
    shares = dict.fromkeys(tenants, 0)
    left = {name: max(0, t.wanted) for name, t in tenants.items()}

    def order(name: str) -> tuple[float, bool, int, str]:
        t = tenants[name]
        return (shares[name] / max(1, t.weight), not t.waiting, -t.held, name)

    for _ in range(max(0, slots.capacity)):
        hungry = [name for name in tenants if left[name] > 0]
        if not hungry:
            break
        name = min(hungry, key=order)
        shares[name] += 1
        left[name] -= 1
    return shares


def _short(slots: Slots, shares: dict[str, int], tenant: str) -> bool:
    """Whether some tenant other than TENANT holds less than its share."""
    return any(name != tenant and t.held < shares[name] for name, t in slots.tenants.items())


def start_limit(slots: Slots, tenant: str) -> int:
    """The most replicas TENANT may hold or be starting now: its share while another tenant holds less than
    its own; otherwise also what free slots and its own spare replicas allow."""
    shares = fair_shares(slots)
    share = shares.get(tenant, 0)
    if _short(slots, shares, tenant):
        return share
    own = slots.tenants.get(tenant, TenantSlots())
    spare = sum(1 for r in slots.replicas if r.tenant == tenant and r.spare and r.in_flight == 0)
    return max(share, own.held + max(0, slots.free) + spare)


def must_yield(slots: Slots, tenant: str) -> bool:
    """Whether a start of TENANT should leave a free slot alone: the tenant holds its share or more while
    another tenant holds less than its own."""
    shares = fair_shares(slots)
    own = slots.tenants.get(tenant, TenantSlots())
    return own.held >= shares.get(tenant, 0) and _short(slots, shares, tenant)


def reclaimable(slots: Slots, tenant: str, function: Hashable = None) -> list[Hashable]:
    """Ids of the replicas that may be taken back for one start of FUNCTION of TENANT, first to go first."""
    shares = fair_shares(slots)
    own = slots.tenants.get(tenant, TenantSlots())
    under = own.held < shares.get(tenant, 0)
    rank = {id(r): i for i, r in enumerate(slots.replicas)}  # ties: as given
    idle = [
        r for r in slots.replicas if r.in_flight == 0 and not (r.tenant == tenant and r.function == function)
    ]
    order: list[HeldReplica] = []

    if under:  # 1. beyond other tenants' shares, the furthest over first
        held = {name: t.held for name, t in slots.tenants.items()}
        candidates = [r for r in idle if r.tenant != tenant and r.tenant in slots.tenants]
        while True:
            over = [r for r in candidates if held[r.tenant] > shares[r.tenant]]
            if not over:
                break

            def key(r: HeldReplica) -> tuple[float, str, bool, float, int]:
                excess = (held[r.tenant] - shares[r.tenant]) / max(1, slots.tenants[r.tenant].weight)
                return (-excess, r.tenant, not r.spare, r.idle_since, rank[id(r)])

            pick = min(over, key=key)
            order.append(pick)
            candidates.remove(pick)
            held[pick.tenant] -= 1

    def lru(replicas: list[HeldReplica]) -> list[HeldReplica]:
        return sorted(replicas, key=lambda r: (r.idle_since, rank[id(r)]))

    order += lru([r for r in idle if r.tenant == tenant and r.spare])  # 2. within the tenant
    if under:  # 3. other tenants' idle spare replicas
        taken = {id(r) for r in order}
        order += lru([r for r in idle if r.tenant != tenant and r.spare and id(r) not in taken])
    return [r.id for r in order]
