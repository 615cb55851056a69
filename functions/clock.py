"""The one clock of the request path: the activator and the backends read time only through a ``Clock``, so
their decisions can be driven by tests with a clock that moves only when told (``ManualClock``).

Seconds of ``time.monotonic``: good for durations and deadlines, meaningless as a date.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...


class MonotonicClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = MonotonicClock()


class ManualClock:
    """A clock for tests: it stands still until ``advance``."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._now += seconds
        return self._now
