"""Prices and the arithmetic that turns usage into money. Integers only: amounts are micro-units (1/1,000,000)
of the plan's currency.

Rounding rules (tested in tests/test_billing_unit.py):
1. Each request's compute time, as reported, is rounded *up* to the next whole millisecond (as per-millisecond
   serverless billing does), from the reported value itself: 29.0001 ms bills 30 ms; 0 ms of compute bills 0 ms.
2. Usage is summed per line item (function x device class) exactly, in whole requests and whole milliseconds.
3. A line item's request charge and compute charge are each converted to money once, rounded half up to a whole
   micro-unit: ``requests * price_per_million_requests / 10**6`` and ``ms * price_per_compute_second / 1000``.
4. The monthly free allowance is a credit of micro-units taken off the subtotal, never below zero.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

DEVICE_CLASSES = ("gpu", "cpu", "lite", "edge")


class Prices(BaseModel):
    """What a plan charges. Defaults are illustrative list prices in USD."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field(default="USD", min_length=3, max_length=3)
    request_per_million_micros: int = Field(default=200_000, ge=0)
    """Price of one million billable requests (200,000 micro-USD = $0.20)."""
    compute_second_micros: dict[str, int] = Field(
        default_factory=lambda: {"gpu": 600, "cpu": 40, "lite": 20, "edge": 10}
    )
    """Price of one second of compute, by device class."""
    free_micros_per_month: int = Field(default=1_000_000, ge=0)
    """Monthly credit taken off each invoice's subtotal ($1.00)."""

    def model_post_init(self, _context: object) -> None:
        unknown = set(self.compute_second_micros) - set(DEVICE_CLASSES)
        if unknown:
            raise ValueError(f"unknown device class {sorted(unknown)}: use {', '.join(DEVICE_CLASSES)}")
        if any(v < 0 for v in self.compute_second_micros.values()):
            raise ValueError("compute prices must not be negative")

    def compute_price(self, device: str) -> int:
        return self.compute_second_micros.get(device, 0)


def billed_ms(compute_ms: float) -> int:
    """Rule 1: a request's compute as reported, in milliseconds, rounded up to whole milliseconds. Exact: math.ceil
    of a float is the integer above its exact binary value. Rounding to whole microseconds first (as the ledger
    stores compute for people) would bill 29.0001 ms as 29."""
    return max(0, math.ceil(compute_ms))


def divide_half_up(numerator: int, denominator: int) -> int:
    """Integer division rounding halves up (numerator >= 0)."""
    return (2 * numerator + denominator) // (2 * denominator)


def request_charge(requests: int, prices: Prices) -> int:
    return divide_half_up(requests * prices.request_per_million_micros, 1_000_000)


def compute_charge(ms: int, device: str, prices: Prices) -> int:
    return divide_half_up(ms * prices.compute_price(device), 1000)


def format_money(micros: int, currency: str) -> str:
    """``1234567, "USD"`` -> ``"1.234567 USD"`` (exact: no float on the way)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d} {currency}"
