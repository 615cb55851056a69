"""What one request used, and the sink it goes to before the response leaves (the billing ledger's seam)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class UsageEvent:
    request_id: str
    tenant_id: int  # whose usage it is: a later tenant of the same name has another id
    tenant: str
    function: str
    started_at: datetime
    duration_ms: float  # gateway arrival to response, cold start included
    compute_ms: float  # what the worker spent computing: the billed part
    device: str  # gpu | cpu | lite | edge
    cold_start: bool
    status: int
    bytes_in: int
    bytes_out: int

    @property
    def billable(self) -> bool:
        """Answered requests are billed, and so are requests that computed past their time limit (504 with
        compute: the worker burnt it); not refusals (quota, bad key) nor platform faults."""
        return 200 <= self.status < 300 or (self.status == 504 and self.compute_ms > 0)


class UsageSink(Protocol):
    async def record(self, event: UsageEvent) -> None:
        """Return only once the event is durable (or deliberately dropped); called before the response."""


class DiscardUsage:
    """For deployments that do not bill (and the runtime tests): usage is seen by metrics only."""

    async def record(self, event: UsageEvent) -> None:
        return None
