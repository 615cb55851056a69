"""Noisy neighbour (issue #3): does one tenant's flood hurt another, and is contended capacity shared by weight?

    .venv/bin/python bench/noisy_neighbour.py [--seconds 20] [--capacity 2]

The platform is started with ``PADDLEFN_MAX_IN_FLIGHT=CAPACITY``: at most that many requests are served at once,
the rest wait in the gateway's weighted fair queue. Tenants a and b each have mobilenet_v3_small.

1. b alone at a steady low rate (paced, 20 requests/s): b's latency p50/p99.
2. a floods (``--flood`` closed-loop clients, ~10x what the capacity serves) while b keeps its steady rate, both
   weight 1: b's latency against (1).
3. a and b both backlogged (flood clients each): each tenant's share of the requests served, with weights 1:1
   and then a:b = 3:1, and Jain's fairness index of weight-normalised throughput (1.0 = perfectly fair).

Goals (issue #3): b's p99 under 1.5x its solo p99; shares within 10% of the weights; Jain's index >= 0.95.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from common import (  # type: ignore[import-not-found]
    Platform,
    Tenant,
    arg_parser,
    binary_request,
    closed_loop,
    example_inputs,
    example_model,
    http_client,
    machine,
    stats_ms,
    stop_on_sigterm,
    table,
    write_result,
)

MODEL = "mobilenet_v3_small"


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def set_weight(platform: Platform, tenant: str, weight: int) -> None:
    limits = {
        "requests_per_second": 1e6,
        "burst": 1_000_000,
        "max_concurrent_requests": 10_000,
        "weight": weight,
    }
    platform.admin.put(f"/v1/plans/w{weight}", json={"limits": limits}).raise_for_status()
    platform.admin.put(f"/v1/tenants/{tenant}/plan", json={"plan": f"w{weight}"}).raise_for_status()


def main() -> None:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--capacity", type=int, default=2, help="PADDLEFN_MAX_IN_FLIGHT")
    p.add_argument("--flood", type=int, default=20, help="closed-loop clients of a flooding tenant")
    args = p.parse_args()
    stop_on_sigterm()
    body, headers = binary_request(example_inputs(MODEL))
    config = {"max_scale": 1, "min_scale": 1, "device": args.device}
    with Platform(
        "--pool-size", "2", device=args.device, PADDLEFN_MAX_IN_FLIGHT=str(args.capacity)
    ) as platform:
        a, b = platform.tenant("a"), platform.tenant("b")
        for t in (a, b):
            platform.deploy(t, "vision", example_model(MODEL), config)
            t.http.headers.update(headers)
        url_a, url_b = a.infer_url(platform.url, "vision"), b.infer_url(platform.url, "vision")
        for t, url in ((a, url_a), (b, url_b)):  # warm both paths
            for _ in range(20):
                t.http.post(url, content=body).raise_for_status()

        solo, solo_errors = paced(b, url_b, body, headers, args.seconds)

        flooding = FloodElsewhere(a.key, url_a, body, headers, args.flood, args.seconds)
        time.sleep(2.0)  # let the flood start and build up
        noisy, noisy_errors = paced(b, url_b, body, headers, args.seconds - 4)
        a_flood = flooding.result()

        shares = []
        for weight_a in (1, 3):
            set_weight(platform, "a", weight_a)
            set_weight(platform, "b", 1)
            floods = {x.name: FloodElsewhere(x.key, u, body, headers, args.flood, args.seconds)
                      for x, u in ((a, url_a), (b, url_b))}  # fmt: skip
            served = {name: f.result() for name, f in floods.items()}
            total = served["a"]["served"] + served["b"]["served"]
            weights = {"a": weight_a, "b": 1}
            share = {k: served[k]["served"] / total for k in ("a", "b")}
            expected = {k: weights[k] / (weight_a + 1) for k in ("a", "b")}
            normalised = [served[k]["served"] / weights[k] for k in ("a", "b")]
            shares.append({
                "weights": f"a:b = {weight_a}:1",
                "served_a": served["a"]["served"], "served_b": served["b"]["served"],
                "share_a": share["a"], "expected_a": expected["a"],
                "share_error": max(abs(share[k] - expected[k]) / expected[k] for k in share),
                "jain": jain(normalised),
            })  # fmt: skip

    s, n = stats_ms(solo), stats_ms(noisy)
    latency = [
        {"b": "alone", "p50_ms": s["p50"], "p99_ms": s["p99"], "n": s["n"], "errors": solo_errors},
        {"b": f"beside a's flood ({args.flood} clients)", "p50_ms": n["p50"], "p99_ms": n["p99"], "n": n["n"],
         "errors": noisy_errors},
    ]  # fmt: skip
    result = {
        "benchmark": "noisy_neighbour", "device": args.device, "machine": machine(), "model": MODEL,
        "capacity": args.capacity, "flood_clients": args.flood, "seconds": args.seconds,
        "b_latency": latency, "p99_ratio": n["p99"] / s["p99"], "a_flood": a_flood, "shares": shares,
        "goals": {
            "b_p99_under_1.5x_solo": n["p99"] / s["p99"] < 1.5,
            "shares_within_10pct": all(x["share_error"] <= 0.10 for x in shares),
            "jain_at_least_0.95": all(x["jain"] >= 0.95 for x in shares),
        },
    }  # fmt: skip
    path = write_result("noisy_neighbour", result)
    print(table(latency, ["b", "p50_ms", "p99_ms", "n", "errors"]))
    print(f"\nb's p99 beside the flood / alone: {result['p99_ratio']:.2f}\n")
    print(table(shares, ["weights", "served_a", "served_b", "share_a", "expected_a", "share_error", "jain"]))
    print(f"\ngoals: {result['goals']}\nwritten to {path}")


def paced(
    t: Tenant, url: str, body: bytes, headers: dict[str, str], seconds: float
) -> tuple[list[float], int]:
    """One client sending 20 requests/s on a fixed schedule (open loop); latencies of the answered ones."""
    latencies: list[float] = []
    errors = 0
    with http_client(headers={"authorization": f"Bearer {t.key}", **headers}) as http:
        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - start < seconds:
            due = start + n / 20.0
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            r = http.post(url, content=body)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            n += 1
    return latencies, errors


def flood(
    key: str, url: str, body: bytes, headers: dict[str, str], clients: int, seconds: float
) -> dict[str, Any]:
    """CLIENTS closed-loop clients for SECONDS; how many requests were served."""
    latencies, errors, wall = closed_loop(
        lambda: http_client(headers={"authorization": f"Bearer {key}", **headers}), url, body,
        clients=clients, seconds=seconds,
    )  # fmt: skip
    return {"served": len(latencies), "errors": dict(errors), "wall": wall}


def _flood_child(queue: Any, *args: Any) -> None:
    queue.put(flood(*args))


class FloodElsewhere:
    """A flood from its own process, so that its client threads do not share the measuring process's GIL (they
    would slow down the measurement of the quiet tenant, not the platform)."""

    def __init__(self, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue = ctx.Queue()
        self.process = ctx.Process(target=_flood_child, args=(self.queue, *args), daemon=True)
        self.process.start()

    def result(self) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.queue.get(timeout=600)
            return result
        finally:
            self.process.join(30)


if __name__ == "__main__":
    main()
