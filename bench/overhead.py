"""Warm overhead: what the gateway adds to a request, against calling a worker directly, at 1 and 8 clients.

- gateway: client -> TCP -> platform gateway (key check, admission, metering) -> Unix socket -> warm worker.
- direct (Unix socket): client -> Unix socket -> a worker started by hand with the same prepared model and
  the same settings (one math thread); the way the platform itself reaches its workers.
- direct (TCP): the same worker on a TCP port, as the runtime image serves on Kubernetes; fewer requests,
  because it is slow for a reason unrelated to the gateway (see bench/RESULTS.md).

The model is the mlp (compute ~0.1 ms), so the numbers are almost all request handling. Requests use the
binary tensor extension. The sides alternate in rounds so that drift in the machine's load hits both.

    .venv/bin/python bench/overhead.py [--requests 3000] [--rounds 6] [--device gpu]
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import (
    DirectWorker,
    Platform,
    arg_parser,
    binary_request,
    closed_loop,
    example_inputs,
    example_model,
    http_client,
    machine,
    prepared_model,
    stats_ms,
    stop_on_sigterm,
    table,
    wait_until,
    write_result,
)

MODEL = "mlp"
GOAL_P50_MS = 1.0
CONCURRENCY = (1, 8)


def main() -> int:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="requests per side and concurrency")
    p.add_argument("--rounds", type=int, default=6, help="alternations between the sides")
    p.add_argument("--tcp-requests", type=int, default=200, help="requests to the direct TCP worker")
    args = p.parse_args()
    stop_on_sigterm()
    model_dir = prepared_model(MODEL, args.device)
    body, content_headers = binary_request(example_inputs(MODEL))
    result: dict[str, Any] = {"benchmark": "overhead", "device": args.device, "machine": machine(), "model": MODEL,
                              "requests": args.requests, "rounds": args.rounds, "results": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pfn-bench-") as tmp, \
            Platform("--pool-size", "1", device=args.device) as platform, \
            DirectWorker(model_dir, MODEL, args.device, uds=Path(tmp) / "w.sock") as uds_worker, \
            DirectWorker(model_dir, MODEL, args.device) as tcp_worker:  # fmt: skip
        tenant = platform.tenant("bench")
        # One replica, kept warm: the comparison is of request paths, not of scaling.
        config = {"min_scale": 1, "max_scale": 1, "device": args.device}
        platform.deploy(tenant, MODEL, example_model(MODEL), config)
        wait_until(lambda: platform.function(tenant, MODEL)["state"] == "warm", 120, "a warm replica")
        auth = {"authorization": f"Bearer {tenant.key}", **content_headers}
        sides = {
            "gateway": (lambda: http_client(headers=auth), tenant.infer_url(platform.url, MODEL)),
            "direct (Unix socket)": (lambda: uds_worker.client(headers=content_headers),
                                     f"{uds_worker.url}/v2/models/{MODEL}/infer"),
            "direct (TCP)": (lambda: tcp_worker.client(headers=content_headers),
                             f"{tcp_worker.url}/v2/models/{MODEL}/infer"),
        }  # fmt: skip
        for clients in CONCURRENCY:
            for make, url in sides.values():  # warm-up: connections, caches, the replica's first requests
                closed_loop(make, url, body, clients=clients, requests=max(50, 10 * clients))
            samples: dict[str, list[float]] = {name: [] for name in sides}
            errors: dict[str, Counter[str]] = {name: Counter() for name in sides}
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in order:
                    total = args.tcp_requests if name == "direct (TCP)" else args.requests
                    make, url = sides[name]
                    lat, err, _ = closed_loop(
                        make, url, body, clients=clients, requests=max(1, total // args.rounds)
                    )
                    samples[name] += lat
                    errors[name] += err
            result["results"][str(clients)] = {
                name: {**stats_ms(lat), "errors": dict(errors[name])} for name, lat in samples.items()
            }
            print(f"{clients} client(s) done", file=sys.stderr, flush=True)
    rows = summarise(result)
    path = write_result("overhead", result)
    print(f"## Warm overhead ({args.device}, {MODEL}, ms)\n")
    print(table(rows, ["clients", "path", "n", "p50", "p99", "mean", "errors", "gateway adds p50",
                       "gateway adds p99", "under 1 ms at p50"]))  # fmt: skip
    print(f"\n{path}")
    return 0


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for clients, by_side in result["results"].items():
        gateway, direct = by_side["gateway"], by_side["direct (Unix socket)"]
        added = {"p50": gateway["p50"] - direct["p50"], "p99": gateway["p99"] - direct["p99"]}
        by_side["gateway_adds_ms"] = added
        for name, s in by_side.items():
            if name == "gateway_adds_ms":
                continue
            row = {"clients": clients, "path": name, **s, "errors": sum(s["errors"].values())}
            if name == "gateway":
                row["gateway adds p50"] = added["p50"]
                row["gateway adds p99"] = added["p99"]
                row["under 1 ms at p50"] = added["p50"] < GOAL_P50_MS
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
