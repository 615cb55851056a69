"""Invoices: one per tenant per calendar month (UTC), built from the ledger's lines and the tenant's prices.

An open month's invoice is computed on demand and may still grow; once the month has ended (plus a grace
period, for records still in flight) the first request for it freezes it and it never changes again.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from functions import names
from functions.billing.ledger import Line
from functions.billing.pricing import Prices, compute_charge, format_money, request_charge


def parse_period(text: str) -> tuple[datetime, datetime]:
    """``"2026-11"`` -> (start, end) of that month in UTC; ValueError with the expected form otherwise."""
    if message := names.problem("period", text):
        raise ValueError(message)
    year, month = int(text[:4]), int(text[5:])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def closes_at(period: str, grace: timedelta) -> datetime:
    return parse_period(period)[1] + grace


def build(
    tenant: str, period: str, lines: list[Line], prices: Prices, *, status: str, plan: str
) -> dict[str, Any]:
    """The invoice document (amounts in micro-units, plus formatted strings for people)."""
    start, end = parse_period(period)
    items: list[dict[str, Any]] = []
    for line in lines:
        requests = request_charge(line.requests, prices)
        compute = compute_charge(line.billed_ms, line.device, prices)
        items.append({
            "function": line.function,
            "device": line.device,
            "requests": line.requests,
            "compute_ms": line.billed_ms,
            "request_charge_micros": requests,
            "compute_charge_micros": compute,
            "amount_micros": requests + compute,
        })  # fmt: skip
    subtotal = sum(i["amount_micros"] for i in items)
    allowance = min(subtotal, prices.free_micros_per_month)
    total = subtotal - allowance
    return {
        "tenant": tenant,
        "period": period,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "status": status,  # open | closed
        "plan": plan,
        "currency": prices.currency,
        "prices": prices.model_dump(),
        "lines": items,
        "requests": sum(i["requests"] for i in items),
        "compute_ms": sum(i["compute_ms"] for i in items),
        "subtotal_micros": subtotal,
        "free_allowance_micros": allowance,
        "total_micros": total,
        "total": format_money(total, prices.currency),
    }


def to_csv(invoice: dict[str, Any]) -> str:
    """Line items, then subtotal, allowance and total rows; amounts as exact decimals of the currency."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    currency = invoice["currency"]
    writer.writerow(["tenant", "period", "function", "device", "requests", "compute_ms",
                     "request_charge", "compute_charge", "amount", "currency"])  # fmt: skip
    money = lambda micros: format_money(micros, currency).split()[0]  # noqa: E731
    for item in invoice["lines"]:
        writer.writerow([invoice["tenant"], invoice["period"], item["function"], item["device"], item["requests"],
                         item["compute_ms"], money(item["request_charge_micros"]),
                         money(item["compute_charge_micros"]), money(item["amount_micros"]), currency])  # fmt: skip
    for label, key in (("subtotal", "subtotal_micros"), ("free allowance", "free_allowance_micros"),
                       ("total", "total_micros")):  # fmt: skip
        sign = -1 if key == "free_allowance_micros" else 1
        writer.writerow([invoice["tenant"], invoice["period"], label, "", "", "", "", "",
                         money(sign * invoice[key]), currency])  # fmt: skip
    return out.getvalue()
