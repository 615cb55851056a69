"""Per-minute statistics for the portal's charts: buckets, percentiles and engines from ledger records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from functions.stats import buckets, engine_of, percentile

START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def record(
    second: float, ms: float, status: int = 200, cold: bool = False, device: str = "cpu"
) -> SimpleNamespace:
    return SimpleNamespace(
        started_at=START + timedelta(seconds=second), duration_us=round(ms * 1000), status=status,
        cold_start=cold, device=device,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([5], 50, 5), ([5], 99, 5), ([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 99, 4), (list(range(1, 101)), 99, 99),
     (list(range(1, 101)), 50, 50), (list(range(1, 201)), 99, 198)],
)  # fmt: skip
def test_percentiles_are_nearest_rank(values: list[int], q: float, expected: int) -> None:
    assert percentile(values, q) == expected


def test_every_minute_has_a_bucket_and_empty_ones_have_no_latency() -> None:
    result = buckets([], START, 3)
    assert [b["t"] for b in result["buckets"]] == [
        "2026-11-23T10:00:00Z",
        "2026-11-23T10:01:00Z",
        "2026-11-23T10:02:00Z",
    ]
    assert all(b["requests"] == 0 and b["p50_ms"] is None and b["engines"] == {} for b in result["buckets"])
    assert result["totals"] == {"requests": 0, "errors": 0, "cold_starts": 0, "p50_ms": None, "p99_ms": None}
    assert result["last"] is None


def test_requests_errors_cold_starts_latency_and_engines_per_minute() -> None:
    records = [
        record(1, 900.0, cold=True), record(2, 4.0), record(3, 6.0, status=400), record(59.9, 5.0, device="lite"),
        record(61, 8.0, device="gpu"), record(150, 7.0, status=503),
        record(-1, 1.0), record(180, 1.0),  # outside the window: ignored
    ]  # fmt: skip
    result = buckets(records, START, 3)
    first, second, third = result["buckets"]
    assert (first["requests"], first["errors"], first["cold_starts"]) == (4, 1, 1)
    assert (first["p50_ms"], first["p99_ms"]) == (5.0, 900.0)
    assert first["engines"] == {"paddle-inference": 3, "paddle-lite": 1}
    assert (second["requests"], second["p50_ms"], second["engines"]) == (1, 8.0, {"paddle-inference": 1})
    assert (third["requests"], third["errors"]) == (1, 1)
    assert result["totals"] == {"requests": 6, "errors": 2, "cold_starts": 1, "p50_ms": 6.0, "p99_ms": 900.0}
    assert result["last"] == {"engine": "paddle-inference", "device": "cpu", "at": "2026-11-23T10:02:30Z"}


def test_engine_follows_the_device_class() -> None:
    assert [engine_of(d) for d in ("gpu", "cpu", "lite", "edge", "")] == [
        "paddle-inference", "paddle-inference", "paddle-lite", "paddle-lite", "unknown",
    ]  # fmt: skip
