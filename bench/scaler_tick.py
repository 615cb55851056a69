"""The cluster scaler's costs: one tick for 10,000 functions across 1,000 tenants, and wake signal -> active on
``StreamIsActive``.

Tick: a stand-in Prometheus (HTTP server in a thread) answers the scaler's one aggregated query - it refuses
any other query, so the shape measured is the real one - with synthetic vectors of the size a real one would
return (3 series per function); each tick some functions get traffic so counters move. Measured per tick:
HTTP + JSON decode through prometheus-api-client (``PrometheusSource.fetch``), and the board's update with
the policy for every function (``Board.observe``). Goal: under 100 ms.

Wake: the scaler service runs for real (gRPC server, wake endpoint, tick loop over the same 10,000 functions);
a real gRPC client holds ``StreamIsActive`` streams open for 1,000 sleeping functions at once on one connection,
as KEDA does for its ScaledObjects; then, one function at a time, it posts the wake signal over HTTP and times
the stream's ``true``. Goal: under 10 ms. (One Python client process stalls above ~2,000 open streams - five
client processes held 3,500 streams on one scaler without trouble - hence 1,000 here.)

    .venv/bin/python bench/scaler_tick.py [--functions 10000 --tenants 1000 --ticks 30 --wakes 200 --streams 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import httpx
import numpy as np

from scaler.activity import Board, Key, Sample
from scaler.policy import Scaling
from scaler.prometheus import PrometheusSource, build_query, parse
from scaler.proto import externalscaler_pb2 as pb
from scaler.proto import externalscaler_pb2_grpc as pb_grpc
from scaler.service import ScalerService, paused_gc
from scaler.settings import ScalerSettings

SELECTOR = 'job="paddlefn-gateway"'


# Self-contained on purpose: the scaler is measured without the platform's benchmark helpers (or Paddle).
OUT = Path(__file__).resolve().parent / "out"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=OUT.parent.parent, capture_output=True, text=True
        ).stdout.strip()

    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_uncommitted": git("status", "--porcelain", "--", "scaler").splitlines(),
    }


def stats_ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds, dtype=np.float64) * 1000
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "max": float(a.max())}  # fmt: skip


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return (f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows])


def functions(n: int, tenants: int) -> list[Key]:
    return [(f"tenant-{i % tenants:04d}", f"fn-{i:05d}") for i in range(n)]


def answer(busy: list[Key], rng: random.Random) -> bytes:
    """Prometheus' answer to the scaler's query, as Prometheus serialises it: only functions with something
    going on appear (the query's ``> 0``); a busy one has requests in flight and answered, some waiting."""
    now = time.time()
    result: list[dict[str, Any]] = []
    for tenant, fn in busy:
        waiting = rng.randint(1, 3) if rng.random() < 0.05 else 0  # requests wait only during cold starts
        values = (
            ("in_flight", rng.randint(1, 8)),
            ("pending", waiting),
            ("recent", rng.randint(1, 50)),
        )
        for series, value in values:
            if value:
                metric = {"tenant": tenant, "function": fn, "series": series}
                result.append({"metric": metric, "value": [now, f"{value:g}"]})
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


class StandInPrometheus:
    """Serves pre-built answers in turn, only for the scaler's exact query (a different shape gets a 400)."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies, self.served, expected = bodies, 0, build_query(SELECTOR)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query).get("query", [""])[0]
                if query != expected:
                    self.send_response(400)
                    self.end_headers()
                    return
                body = outer.bodies[outer.served % len(outer.bodies)]
                outer.served += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def build_bodies(keys: list[Key], ticks: int, busy_share: float) -> list[bytes]:
    """One answer per tick; the busy set changes from tick to tick, so functions wake and go idle."""
    rng = random.Random(7)
    return [answer(rng.sample(keys, int(len(keys) * busy_share)), rng) for _ in range(ticks)]


def measure_ticks(keys: list[Key], ticks: int, busy_share: float) -> dict[str, Any]:
    bodies = build_bodies(keys, ticks + 1, busy_share)
    prometheus = StandInPrometheus(bodies)
    source = PrometheusSource(prometheus.url, selector=SELECTOR)
    board = Board(activity_window_s=30)
    for key in keys:  # as KEDA's calls would have configured them
        board.configure(key, Scaling(min_scale=0, max_scale=4, target=2, idle_timeout_s=0))
    fetch_s, observe_s, total_s = [], [], []
    # The scaler's own CPU in a fetch, without the stand-in's HTTP serving (a real Prometheus is Go, not Python).
    decode_s = []
    for body in bodies[1:]:
        with paused_gc():
            t0 = time.perf_counter()
            parse(json.loads(body)["data"]["result"])
            decode_s.append(time.perf_counter() - t0)
    try:
        board.observe(source.fetch(), now=0.0)  # warm-up: first sight of every function
        for i in range(ticks):
            with paused_gc():  # as ScalerService.step does
                t0 = time.perf_counter()
                samples = source.fetch()
                t1 = time.perf_counter()
                board.observe(samples, now=float(i + 1))
                t2 = time.perf_counter()
            fetch_s.append(t1 - t0)
            observe_s.append(t2 - t1)
            total_s.append(t2 - t0)
    finally:
        source.close()
        prometheus.close()
    return {
        "answer_bytes": len(bodies[0]),
        "series": bodies[0].count(b'"series"'),
        "fetch_ms": stats_ms(fetch_s),
        "decode_parse_ms": stats_ms(decode_s),
        "observe_ms": stats_ms(observe_s),
        "tick_ms": stats_ms(total_s),
    }


class Busy:
    """The wake bench's background: the same 10% of functions busy in every tick, the rest asleep."""

    def __init__(self, keys: list[Key]) -> None:
        self.samples = {k: Sample(in_flight=2.0, recent=10.0) for k in keys}

    def fetch(self) -> dict[Key, Sample]:
        return self.samples

    def close(self) -> None:
        pass


def ref_of(key: Key) -> pb.ScaledObjectRef:
    tenant, fn = key
    return pb.ScaledObjectRef(
        name=fn, namespace=f"t-{tenant}", scalerMetadata={"tenant": tenant, "function": fn}
    )


async def wake_delays(grpc_port: int, http_port: int, watched: list[Key], wakes: int) -> list[float]:
    """As KEDA does: one StreamIsActive stream per ScaledObject, all open at once on one connection; then
    wake some of the sleeping functions one by one and time each until its stream says so."""
    answers: dict[Key, asyncio.Queue[bool]] = {key: asyncio.Queue() for key in watched}

    async def read(call: Any, key: Key) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for answer in call:
                answers[key].put_nowait(answer.result)

    delays: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        calls = [stub.StreamIsActive(ref_of(key)) for key in watched]
        readers = [asyncio.create_task(read(call, key)) for call, key in zip(calls, watched, strict=True)]
        try:
            for key in watched:
                assert await asyncio.wait_for(answers[key].get(), 30) is False
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
                # The first wake also opens the HTTP connection (tens of ms): a warm-up, not a sample.
                for i, (tenant, fn) in enumerate(random.Random(3).sample(watched, wakes + 1)):
                    sent = time.perf_counter()
                    (await http.post(f"/v1/wake/{tenant}/{fn}")).raise_for_status()
                    assert await asyncio.wait_for(answers[(tenant, fn)].get(), 5) is True
                    if i:
                        delays.append(time.perf_counter() - sent)
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers)
    return delays


def measure_wakes(keys: list[Key], wakes: int, streams: int) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings = ScalerSettings(grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0, tick_s=1.0)
    busy, asleep = keys[: len(keys) // 10], keys[len(keys) // 10 :]
    service = ScalerService(settings, Busy(busy))
    asyncio.run_coroutine_threadsafe(service.start(), loop).result(30)
    try:
        delays = asyncio.run(wake_delays(service.grpc_port, service.http_port, asleep[:streams], wakes))
    finally:
        asyncio.run_coroutine_threadsafe(service.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    return {"open_streams": streams, "wake_to_stream_ms": stats_ms(delays)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--functions", type=int, default=10_000)
    p.add_argument("--tenants", type=int, default=1_000)
    p.add_argument("--ticks", type=int, default=30)
    p.add_argument("--wakes", type=int, default=200)
    p.add_argument("--streams", type=int, default=1000, help="StreamIsActive streams open during the wakes")
    args = p.parse_args()
    keys = functions(args.functions, args.tenants)
    result: dict[str, Any] = {"device": "cpu", "machine": machine(), "functions": args.functions,
                              "tenants": args.tenants, "query": build_query(SELECTOR)}  # fmt: skip
    shares = (0.1, 1.0)  # a typical hour (most functions asleep) and the worst case (all busy at once)
    result["ticks"] = {f"{share:.0%} busy": measure_ticks(keys, args.ticks, share) for share in shares}
    result["wake"] = measure_wakes(keys, args.wakes, args.streams)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    OUT.mkdir(exist_ok=True)
    path = OUT / "scaler_tick-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for label, tick in result["ticks"].items():
        size = f"answer {tick['answer_bytes'] / 1e6:.2f} MB, {tick['series']} series"
        rows.append({"what": f"tick, {label}: fetch ({size})", **tick["fetch_ms"]})
        rows.append({"what": f"tick, {label}: of which JSON decode + parse", **tick["decode_parse_ms"]})
        rows.append({"what": f"tick, {label}: board + policy", **tick["observe_ms"]})
        rows.append({"what": f"tick, {label}: total (goal < 100 ms)", **tick["tick_ms"]})
    streams = result["wake"]["open_streams"]
    what = f"wake signal -> StreamIsActive true, {streams} streams open (goal < 10 ms)"
    rows.append({"what": what, **result["wake"]["wake_to_stream_ms"]})
    print(table(rows, ["what", "n", "p50", "p99", "mean", "max"]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
