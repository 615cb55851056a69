"""Billing as the API and CLI see it: usage reports and invoices for a tenant, prices from its plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from functions.billing import invoices
from functions.billing.ledger import Ledger
from functions.billing.periods import closes_at, parse_period, period_of
from functions.errors import BadRequest
from functions.plans import PlanBook
from functions.store.models import utcnow


@dataclass(frozen=True)
class Account:
    """Whose usage and invoices: one tenant by its id (never reused), with the name and plan it has, or had when
    it was deleted."""

    id: int
    name: str
    plan: str


class Billing:
    def __init__(
        self,
        ledger: Ledger,
        plans: PlanBook,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.ledger = ledger
        self.plans = plans
        self.clock = clock

    async def usage(
        self, account: Account, start: datetime | None, end: datetime | None, group_by: str
    ) -> dict[str, Any]:
        now = self.clock()
        start = start or parse_period(period_of(now))[0]  # default: this month so far
        end = end or now + timedelta(seconds=1)
        if start.tzinfo is None or end.tzinfo is None:
            raise BadRequest("start and end need a time zone, e.g. 2026-11-01T00:00:00Z")
        if end <= start:
            raise BadRequest(f"end ({end.isoformat()}) must come after start ({start.isoformat()})")
        try:
            rows = await self.ledger.usage(account.id, start, end, group_by)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return {"tenant": account.name, "start": start.isoformat(), "end": end.isoformat(),
                "group_by": group_by, "rows": rows}  # fmt: skip

    async def invoice(self, account: Account, period: str) -> dict[str, Any]:
        try:
            start, _ = parse_period(period)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        now = self.clock()
        if start > now:
            raise BadRequest(f"{period} has not begun; invoices exist for this month and earlier ones")
        tenant, plan = account.name, account.plan
        prices = self.plans.prices(plan)
        if self.ledger.is_closed(account.id, period) or now >= closes_at(period, self.ledger.grace):
            return await self.ledger.close_period(
                account.id,
                tenant,
                period,
                lambda lines: invoices.build(tenant, period, lines, prices, status="closed", plan=plan),
            )
        lines = await self.ledger.lines(account.id, period)
        return invoices.build(tenant, period, lines, prices, status="open", plan=plan)
