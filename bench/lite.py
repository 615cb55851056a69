"""Paddle Lite against Paddle Inference on the CPU, through the platform (issue #5).

    .venv/bin/python bench/lite.py [--reps 6] [--warm 300]

For mlp and mobilenet_v3_small, one platform with four functions per model:
- ``paddle`` (device cpu) and ``lite`` (device lite): cold start (asleep -> first response) and warm latency;
- ``nofb`` (device cpu) and ``fb`` (device cpu, fallback=cold): the latency a client sees for the first request to
  a sleeping function, without and with the Lite fallback, and which engine answered it.

Samples of the compared sides are interleaved (one of each in turn), so load from elsewhere hits both alike. A
cold sample is taken only when the function is asleep and both pools are refilled.
"""

from __future__ import annotations

import time
from typing import Any

from common import (  # type: ignore[import-not-found]
    Platform,
    arg_parser,
    binary_request,
    example_inputs,
    example_model,
    machine,
    stats_ms,
    stop_on_sigterm,
    table,
    wait_until,
    write_result,
)

MODELS = ("mlp", "mobilenet_v3_small")
POOL_SIZE = 2
SIDES = {
    "paddle": {"device": "cpu"},
    "lite": {"device": "lite"},
    "nofb": {"device": "cpu"},
    "fb": {"device": "cpu", "fallback": "cold"},
}


def ready_for_a_cold_sample(platform: Platform, tenant: Any, function: str) -> bool:
    workers = platform.capacity()["workers"]
    asleep = platform.function(tenant, function)["state"] == "asleep"
    return bool(asleep and workers["idle_warm"] >= POOL_SIZE and workers.get("lite_idle_warm", 1) >= 1)


def main() -> None:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=6, help="cold samples per side and model")
    p.add_argument("--warm", type=int, default=300, help="warm requests per side and model")
    args = p.parse_args()
    stop_on_sigterm()
    rows: list[dict[str, Any]] = []
    with Platform("--pool-size", str(POOL_SIZE), device="cpu", PADDLEFN_LITE_POOL_SIZE="1") as platform:
        tenant = platform.tenant("bench")
        for model in MODELS:
            body, headers = binary_request(example_inputs(model))
            names = {side: f"{model.replace('_', '-')}-{side}" for side in SIDES}
            for side, config in SIDES.items():
                platform.deploy(tenant, names[side], example_model(model), {**config, "idle_timeout_s": 1})
            url = {side: tenant.infer_url(platform.url, names[side]) for side in SIDES}

            cold: dict[str, list[float]] = {side: [] for side in SIDES}
            engines: dict[str, list[str]] = {side: [] for side in SIDES}
            for _ in range(args.reps):
                for side in SIDES:
                    fn = names[side]
                    wait_until(lambda fn=fn: ready_for_a_cold_sample(platform, tenant, fn), 120, "sleep")
                    t0 = time.perf_counter()
                    r = tenant.http.post(url[side], content=body, headers=headers)
                    cold[side].append(time.perf_counter() - t0)
                    r.raise_for_status()
                    engines[side].append(r.headers["x-paddlefn-engine"])

            warm: dict[str, list[float]] = {"paddle": [], "lite": []}
            for _ in range(args.warm):  # interleaved, keeping both warm
                for side in warm:
                    t0 = time.perf_counter()
                    tenant.http.post(url[side], content=body, headers=headers).raise_for_status()
                    warm[side].append(time.perf_counter() - t0)

            for side in SIDES:
                c = stats_ms(cold[side])
                w = stats_ms(warm[side]) if side in warm else {}
                rows.append({
                    "model": model, "function": side, "config": str(SIDES[side]),
                    "cold_p50_ms": c["p50"], "cold_p99_ms": c["p99"],
                    "warm_p50_ms": w.get("p50"), "warm_p99_ms": w.get("p99"),
                    "first_answered_by": ", ".join(sorted(set(engines[side]))),
                })  # fmt: skip

    result = {"benchmark": "lite", "device": "cpu", "machine": machine(), "reps": args.reps, "warm": args.warm,
              "rows": rows}  # fmt: skip
    path = write_result("lite", result)
    print(table(rows, ["model", "function", "cold_p50_ms", "cold_p99_ms", "warm_p50_ms", "warm_p99_ms",
                       "first_answered_by"]))  # fmt: skip
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
