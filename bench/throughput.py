"""Throughput through the gateway at 8 concurrent clients, with and without dynamic batching.

Each model is deployed twice (plain, and with ``"batching": true``: the platform's defaults, max batch 32,
2 ms queue delay) and pinned to one replica (min_scale = max_scale = 1), so the comparison is batching
against no batching on the same single worker, not the autoscaler adding replicas. For reference, the same
worker is also run without the platform (``runtime.server`` on a Unix socket, same batching settings), and the
predictor alone is timed at batch 1 and 8: together they say whether the model or the request path limits.
Eight closed-loop clients (each sends its next request when the previous answer arrives) run for a fixed time
per configuration; the configurations alternate in rounds. Requests use the binary tensor extension, one
example (batch 1) each.

    .venv/bin/python bench/throughput.py [--seconds 10] [--rounds 2] [--device gpu]
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import (
    CHILD_ENV,
    PY,
    ROOT,
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

MODELS = ("mlp", "mobilenet_v3_small")
CLIENTS = 8

# The predictor alone, in a worker-like process (one math thread): rows per second at batch 1 and batch 8.
# It says how much batching can give at most on this device, apart from any request handling.
ENGINE_CEILING = """
import json, sys, time
from pathlib import Path
import numpy as np
from runtime.engine import PaddleInferenceEngine, warm_up_device
from runtime.spec import GOLDEN_INPUTS, Manifest
folder, use_gpu = Path(sys.argv[1]), sys.argv[2] == "gpu"
warm_up_device(use_gpu)
engine = PaddleInferenceEngine(folder, Manifest.load(folder), use_gpu=use_gpu, cpu_threads=1)
with np.load(folder / GOLDEN_INPUTS) as data:
    one = {k: data[k][:1] for k in data.files}
result = {}
for batch in (1, 8):
    inputs = {k: np.concatenate([a] * batch) for k, a in one.items()}
    for _ in range(3):
        engine.infer(inputs)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        engine.infer(inputs)
        runs += 1
    result[batch] = runs * batch / (time.perf_counter() - start)
print(json.dumps(result))
"""


def engine_ceiling(model_dir: Path, device: str) -> dict[str, float]:
    out = subprocess.run([PY, "-c", ENGINE_CEILING, str(model_dir), device], env=CHILD_ENV, cwd=ROOT,
                         capture_output=True, text=True, check=True)  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per configuration and round")
    p.add_argument("--rounds", type=int, default=2, help="alternations between the configurations")
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    stop_on_sigterm()
    models = [m for m in args.models.split(",") if m]
    ceilings = {}
    for name in models:  # before the platform starts, so that nothing else runs meanwhile
        ceilings[name] = engine_ceiling(prepared_model(name, args.device), args.device)
    result: dict[str, Any] = {"benchmark": "throughput", "device": args.device, "machine": machine(),
                              "clients": CLIENTS, "seconds": args.seconds, "rounds": args.rounds,
                              "results": {}}  # fmt: skip
    body_of = {name: binary_request(example_inputs(name)) for name in models}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pfn-bench-")))
        # Enough worker slots for every function's one replica plus the pool, so none is put to sleep early.
        platform = stack.enter_context(
            Platform("--pool-size", "1", "--max-workers", str(2 * len(models) + 1), device=args.device)
        )
        tenant = platform.tenant("bench")
        # Each target: (model, batching, path, client factory, URL).
        targets: dict[str, tuple[str, bool, str, Callable[[], httpx.Client], str]] = {}
        for name in models:
            headers = body_of[name][1]
            auth = {"authorization": f"Bearer {tenant.key}", **headers}
            for batching in (False, True):
                function = name.replace("_", "-") + ("-batched" if batching else "")
                config = {"min_scale": 1, "max_scale": 1, "device": args.device, "batching": batching}
                platform.deploy(tenant, function, example_model(name), config)
                targets[f"gateway {function}"] = (name, batching, "gateway",
                                                  partial(http_client, headers=auth),
                                                  tenant.infer_url(platform.url, function))  # fmt: skip
                # The same worker without the platform (Unix socket), for reference: what the gateway costs.
                extra = ("--max-batch-size", "32", "--max-queue-delay-ms", "2") if batching else ()
                worker = stack.enter_context(
                    DirectWorker(
                        prepared_model(name, args.device),
                        name,
                        args.device,
                        uds=tmp / f"{function}.sock",
                        args=extra,
                    )
                )
                targets[f"direct {function}"] = (name, batching, "direct (Unix socket)",
                                                 partial(worker.client, headers=headers),
                                                 f"{worker.url}/v2/models/{name}/infer")  # fmt: skip
        for function in [t.split(" ", 1)[1] for t in targets if t.startswith("gateway ")]:
            wait_until(lambda: platform.function(tenant, function)["state"] == "warm", 120, "warm replicas")  # noqa: B023
        samples: dict[str, dict[str, Any]] = {
            t: {"latencies": [], "done": 0, "errors": Counter(), "wall": 0.0} for t in targets
        }

        def run(target: str, seconds: float) -> tuple[list[float], Counter[str], float]:
            name, _, _, make_client, url = targets[target]
            return closed_loop(make_client, url, body_of[name][0], clients=CLIENTS, seconds=seconds)

        for target in targets:  # warm-up: connections, and the first batches of each replica
            run(target, 1.0)
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for target in order:
                lat, errors, wall = run(target, args.seconds)
                s = samples[target]
                s["latencies"] += lat
                s["done"] += len(lat)
                s["errors"] += errors
                s["wall"] += wall
                print(f"{target} round {r + 1}: {len(lat) / wall:.0f} req/s", file=sys.stderr, flush=True)
        for target, (name, batching, path, _, _) in targets.items():
            s = samples[target]
            result["results"][target] = {
                "model": name,
                "batching": batching,
                "path": path,
                "requests": s["done"],
                "errors": dict(s["errors"]),
                "seconds": s["wall"],
                "throughput_rps": s["done"] / s["wall"],
                "latency_ms": stats_ms(s["latencies"]),
                "engine_only_rows_per_s": ceilings[name],
            }
    rows = summarise(result)
    out = write_result("throughput", result)
    print(f"## Throughput ({args.device}, {CLIENTS} concurrent clients, 1 replica)\n")
    print(table(rows, ["model", "path", "batching", "req/s", "p50 ms", "p99 ms", "errors", "batching speed-up",
                       "engine only, batch 1 / 8 (rows/s)"]))  # fmt: skip
    print(f"\n{out}")
    return 0


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    plain = {
        (r["model"], r["path"]): r["throughput_rps"] for r in result["results"].values() if not r["batching"]
    }
    for r in result["results"].values():
        row = {
            "model": r["model"],
            "path": r["path"],
            "batching": "on (max 32, 2 ms)" if r["batching"] else "off",
            "req/s": r["throughput_rps"],
            "p50 ms": r["latency_ms"].get("p50"),
            "p99 ms": r["latency_ms"].get("p99"),
            "errors": sum(r["errors"].values()),
            "engine only, batch 1 / 8 (rows/s)": "{:.0f} / {:.0f}".format(
                *r["engine_only_rows_per_s"].values()
            ),
        }
        base = plain.get((r["model"], r["path"]))
        if r["batching"] and base:
            row["batching speed-up"] = f"{r['throughput_rps'] / base:.2f}x"
            r["speedup_over_plain"] = r["throughput_rps"] / base
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
