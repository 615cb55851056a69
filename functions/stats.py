"""Per-minute statistics of one function, for the portal's charts: requests, errors, cold starts, latency
percentiles and the engines that served, computed from the usage ledger (the same records that are billed).

The engine is not stored per request: it follows from the device class the worker reported (``gpu``/``cpu``:
Paddle Inference; ``lite`` and ``edge``: Paddle Lite), so the ledger needs no extra column.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from functions.api import PlatformDep, PrincipalDep
from functions.auth import MANAGE
from functions.store import Store, UsageRecord
from functions.store.models import utcnow

router = APIRouter(prefix="/v1", tags=["stats"])

ENGINE_OF_DEVICE = {
    "gpu": "paddle-inference",
    "cpu": "paddle-inference",
    "lite": "paddle-lite",
    "edge": "paddle-lite",
}
MAX_MINUTES = 24 * 60


def engine_of(device: str) -> str:
    return ENGINE_OF_DEVICE.get(device, device or "unknown")


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted, non-empty list (q in (0, 100])."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def buckets(records: Iterable[Any], start: datetime, minutes: int) -> dict[str, Any]:
    """Per-minute buckets from START (a whole minute, UTC) for MINUTES minutes, empty minutes included.

    Each record has ``started_at`` (aware), ``duration_us``, ``status``, ``cold_start`` and ``device``."""
    durations: list[list[int]] = [[] for _ in range(minutes)]
    rows: list[dict[str, Any]] = [
        {"t": (start + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"), "requests": 0, "errors": 0,
         "cold_starts": 0, "p50_ms": None, "p99_ms": None, "engines": {}}
        for i in range(minutes)
    ]  # fmt: skip
    last: Any = None
    for r in records:
        index = int((r.started_at - start).total_seconds() // 60)
        if not 0 <= index < minutes:
            continue
        row = rows[index]
        row["requests"] += 1
        row["errors"] += int(r.status >= 400)
        row["cold_starts"] += int(bool(r.cold_start))
        engine = engine_of(r.device)
        row["engines"][engine] = row["engines"].get(engine, 0) + 1
        durations[index].append(r.duration_us)
        if last is None or r.started_at >= last.started_at:
            last = r
    everything: list[int] = []
    for row, values in zip(rows, durations, strict=True):
        if values:
            values.sort()
            row["p50_ms"] = round(percentile(values, 50) / 1000, 3)
            row["p99_ms"] = round(percentile(values, 99) / 1000, 3)
            everything.extend(values)
    everything.sort()
    totals = {
        "requests": sum(r["requests"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
        "cold_starts": sum(r["cold_starts"] for r in rows),
        "p50_ms": round(percentile(everything, 50) / 1000, 3) if everything else None,
        "p99_ms": round(percentile(everything, 99) / 1000, 3) if everything else None,
    }
    served = None
    if last is not None:
        served = {
            "engine": engine_of(last.device),
            "device": last.device,
            "at": last.started_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }
    return {"buckets": rows, "totals": totals, "last": served}


def _records(store: Store, tenant_id: int, function: str, start: datetime, end: datetime) -> list[Any]:
    u = UsageRecord
    query = select(u.started_at, u.duration_us, u.status, u.cold_start, u.device).where(
        u.tenant_id == tenant_id, u.function == function, u.started_at >= start, u.started_at < end
    )
    with store.session() as s:
        return list(s.execute(query.execution_options(yield_per=5000)))


@router.get("/tenants/{tenant}/functions/{name}/stats")
async def function_stats(
    tenant: str,
    name: str,
    platform: PlatformDep,
    principal: PrincipalDep,
    minutes: Annotated[int, Query(ge=1, le=MAX_MINUTES, description="how many minutes back, up to now")] = 60,
) -> dict[str, Any]:
    """Per-minute requests, errors, cold starts, p50/p99 latency (ms, cold starts included) and engines."""
    tenant_id = platform.tenant_for(principal, tenant, MANAGE)
    platform.function(tenant, name)  # 404 for an unknown function
    await platform.ledger.flush(tenant_id)  # so that the tenant's last requests are in
    now = utcnow().astimezone(UTC)
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    end = start + timedelta(minutes=minutes)
    records = await asyncio.to_thread(_records, platform.store, tenant_id, name, start, end)
    return {
        "tenant": tenant,
        "function": name,
        "minutes": minutes,
        "bucket_s": 60,
        "start": start.isoformat().replace("+00:00", "Z"),
        "end": end.isoformat().replace("+00:00", "Z"),
        **buckets(records, start, minutes),
    }
