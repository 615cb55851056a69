"""Ledger throughput and the latency it adds to a request (issue #4).

    .venv/bin/python bench/ledger.py [--records 50000]

1. Sustained throughput: record N usage events as fast as one event loop can, with the background flusher
   moving them into SQLite, until all are committed; records/s = N / elapsed.
2. Added latency: the time ``Ledger.record`` takes on the request path (journal write + buffer), p50/p99, while
   the flusher commits in the background at ~5,000 records/s, beside a no-op sink measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from functions.billing.ledger import Ledger
from functions.store import Store
from functions.usage import DiscardUsage, UsageEvent


def event() -> UsageEvent:
    return UsageEvent(request_id=uuid.uuid4().hex, tenant_id=1, tenant="acme", function="classify",
                      started_at=datetime.now(UTC), duration_ms=3.2, compute_ms=1.7, device="cpu",
                      cold_start=False, status=200, bytes_in=512, bytes_out=128)  # fmt: skip


async def throughput(folder: Path, n: int) -> float:
    store = Store(f"sqlite:///{folder / 'tp.db'}")
    ledger = Ledger(store, folder / "tp-usage", flush_interval_s=0.05)
    await ledger.start()
    start = time.perf_counter()
    for i in range(n):
        await ledger.record(event())
        if i % 500 == 0:
            await asyncio.sleep(0)  # let the flusher run, as a serving loop would
    await ledger.flush()
    elapsed = time.perf_counter() - start
    await ledger.close()
    store.close()
    return n / elapsed


async def added_latency(folder: Path, sink, n: int, rate: float) -> list[float]:
    samples = []
    interval = 1 / rate
    next_at = time.perf_counter()
    for _ in range(n):
        e = event()
        t0 = time.perf_counter()
        await sink.record(e)
        samples.append(time.perf_counter() - t0)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return samples


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000)[int(q * 1000) - 1] * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--latency-samples", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rate = await throughput(folder, args.records)
        store = Store(f"sqlite:///{folder / 'lat.db'}")
        ledger = Ledger(store, folder / "lat-usage", flush_interval_s=0.1)
        await ledger.start()
        with_ledger = await added_latency(folder, ledger, args.latency_samples, rate=5000)
        await ledger.close()
        store.close()
        baseline = await added_latency(folder, DiscardUsage(), args.latency_samples, rate=5000)
    result = {
        "machine": f"{platform.node()} {platform.machine()}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "records_per_s": round(rate),
        "ledger_ms": {"p50": round(pct(with_ledger, 0.5), 4), "p99": round(pct(with_ledger, 0.99), 4)},
        "noop_ms": {"p50": round(pct(baseline, 0.5), 4), "p99": round(pct(baseline, 0.99), 4)},
    }
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "ledger.json").write_text(json.dumps(result, indent=2))
    print(f"| records/s sustained | ledger p50 | ledger p99 | no-op p50 | no-op p99 |\n|---|---|---|---|---|\n"
          f"| {result['records_per_s']:,} | {result['ledger_ms']['p50']} ms | {result['ledger_ms']['p99']} ms "
          f"| {result['noop_ms']['p50']} ms | {result['noop_ms']['p99']} ms |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
