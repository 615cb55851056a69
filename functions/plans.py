"""Plans: what a tenant pays (prices) and what it may use (limits), set by the admin, visible to the tenant.

The plan ``default`` always exists; until the admin changes it, it has the defaults below. A tenant is on
``default`` unless the admin puts it on another plan.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from functions.billing.pricing import Prices
from functions.bounds import clip, shown
from functions.errors import BadRequest, NotFound
from functions.store import Plan as PlanRow
from functions.store import Store
from functions.store.models import utcnow

DEFAULT_PLAN = "default"
GiB = 1 << 30


class Limits(BaseModel):
    """Quotas of one tenant. Exceeding a rate or concurrency limit is a 429 with Retry-After; a plan limit
    (functions, size, storage, GPU) is a 403 or 413, the key limit a 409. Every message names the limit and the
    current usage."""

    model_config = ConfigDict(extra="forbid")

    max_functions: int = Field(default=20, ge=0)
    max_replicas: int = Field(default=8, ge=0)
    """Replicas across all the tenant's functions; the scaler keeps the total within it."""
    max_concurrent_requests: int = Field(default=64, ge=1)
    """Requests of the tenant being served or waiting at once."""
    requests_per_second: float = Field(default=200.0, gt=0)
    """Sustained request rate (token bucket refill)."""
    burst: int = Field(default=400, ge=1)
    """Requests that may arrive at once above the sustained rate (token bucket size)."""
    max_model_bytes: int = Field(default=2 * GiB, ge=0)
    """Largest model archive upload."""
    max_storage_bytes: int = Field(default=20 * GiB, ge=0)
    """Total size of the tenant's unpacked and prepared models."""
    gpu_allowed: bool = True
    """Whether functions may run on a GPU; without it, device=auto means cpu and device=gpu is refused."""
    weight: int = Field(default=1, ge=1, le=1000)
    """Share of contended capacity relative to other backlogged tenants (weighted fair queueing)."""
    max_keys: int = Field(default=20, ge=1, le=10_000)
    """Active (not revoked) API keys of the tenant; one more is a 409 until one is revoked. The key list also
    keeps the max_keys most recently revoked keys; older revoked ones are forgotten (the audit log keeps them)."""


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prices: Prices = Field(default_factory=Prices)
    limits: Limits = Field(default_factory=Limits)


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(shown(p, 40) if len(str(p)) > 40 else str(p) for p in e['loc']) or 'plan'}: "
        f"{clip(e['msg'].removeprefix('Value error, '), 200)}"
        for e in exc.errors()[:10]
    )


class PlanBook:
    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, name: str) -> Plan:
        with self.store.session() as s:
            row = s.get(PlanRow, name)
        if row is None:
            if name == DEFAULT_PLAN:
                return Plan()
            raise NotFound(f"plan '{name}' not found")
        return Plan(prices=Prices.model_validate(row.prices), limits=Limits.model_validate(row.limits or {}))

    def prices(self, name: str) -> Prices:
        return self.get(name).prices

    def all(self) -> dict[str, Plan]:
        with self.store.session() as s:
            names = list(s.scalars(select(PlanRow.name)))
        plans = {name: self.get(name) for name in names}
        plans.setdefault(DEFAULT_PLAN, Plan())
        return plans

    def put(self, name: str, raw: dict[str, Any]) -> Plan:
        """Create or replace plan NAME from ``{"prices": {...}, "limits": {...}}`` (omitted parts: defaults)."""
        try:
            plan = Plan.model_validate(raw)
        except ValidationError as exc:
            raise BadRequest(f"invalid plan: {_problems(exc)}") from None
        with self.store.session() as s:
            s.merge(PlanRow(name=name, prices=plan.prices.model_dump(), limits=plan.limits.model_dump(),
                            updated_at=utcnow()))  # fmt: skip
        return plan
