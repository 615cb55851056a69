"""Plans: named price lists (and, with tenancy, quotas) that tenants are put on by the admin.

The plan ``default`` always exists; its prices are ``Prices()``'s defaults until the admin changes them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from functions.billing.pricing import Prices
from functions.errors import BadRequest, NotFound
from functions.store import Plan, Store
from functions.store.models import utcnow

DEFAULT_PLAN = "default"


class PlanBook:
    def __init__(self, store: Store) -> None:
        self.store = store

    def prices(self, name: str) -> Prices:
        with self.store.session() as s:
            row = s.get(Plan, name)
        if row is None:
            if name == DEFAULT_PLAN:
                return Prices()
            raise NotFound(f"plan '{name}' not found")
        return Prices.model_validate(row.prices)

    def all(self) -> dict[str, Prices]:
        with self.store.session() as s:
            plans = {p.name: Prices.model_validate(p.prices) for p in s.scalars(select(Plan))}
        plans.setdefault(DEFAULT_PLAN, Prices())
        return plans

    def put(self, name: str, raw: dict[str, Any]) -> Prices:
        try:
            prices = Prices.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'prices'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise BadRequest(f"invalid prices: {problems}") from None
        with self.store.session() as s:
            s.merge(Plan(name=name, prices=prices.model_dump(), updated_at=utcnow()))
        return prices
