"""Invoice periods: calendar months in UTC, ``"YYYY-MM"``, and the moment each one closes.

A month's invoice closes GRACE after the month ends (records still in flight land meanwhile) and never changes
after that; the ledger files a record that arrives later for it in the open month instead (the month of ``now``).
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta

from functions import names
from functions.bounds import shown

PERIOD = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")  # matched whole (fullmatch): no trailing newline
LAST = "9999-11"  # the last month whose end (the first of the next one) a datetime can hold


def period_of(moment: datetime) -> str:
    """The period MOMENT (zone-aware) falls in. Zero-padded by hand: strftime writes year 1 as "1"."""
    utc = moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def parse_period(text: str) -> tuple[datetime, datetime]:
    """``"2026-11"`` -> (start, end) of that month in UTC; ValueError with the expected form otherwise."""
    match = PERIOD.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(names.problem("period", text) or f"{shown(text)} is not a month: use YYYY-MM")
    year, month = int(match.group(1)), int(match.group(2))
    if year == 0 or text > LAST:
        raise ValueError(f"'{text}' is out of range: use a month from 0001-01 to {LAST}")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


@functools.lru_cache(
    maxsize=1024
)  # pure, asked on every record (Ledger.record); bounded: clients name periods
def closes_at(period: str, grace: timedelta) -> datetime:
    return parse_period(period)[1] + grace


def is_over(period: str, grace: timedelta, now: datetime) -> bool:
    """Whether PERIOD's invoice has closed by NOW (whether or not anyone has read it yet)."""
    return now >= closes_at(period, grace)
