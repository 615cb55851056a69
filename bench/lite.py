"""Paddle Lite against Paddle Inference on the CPU, through the platform (issue #5).

    .venv/bin/python bench/lite.py [--reps 6] [--warm 300]

For mlp and mobilenet_v3_small, one platform with four functions per model:
- ``paddle`` (device cpu) and ``lite`` (device lite): cold start (asleep -> first response) and warm latency;
- ``nofb`` (device cpu) and ``fb`` (device cpu, fallback=cold): the latency a client sees for the first request to
  a sleeping function, without and with the Lite fallback, and which engine answered it.

Samples of the compared sides are interleaved (one of each in turn), so load from elsewhere hits both alike. A
cold sample is taken only when the function is asleep and both pools are refilled.

Beside them, without the platform, on the prepared ``.nb``: Lite's own floor (``bench/lite_floor.py`` under the
Lite interpreter: ``create`` is the predictor creation in a process that has imported Lite, ``first_run`` the first
inference; ``floor`` = create + first run, the least a Lite cold start can cost), and what the engine host adds:
``host_start`` is a fresh ``runtime.lite.engine.LiteHost`` from its start to ready (CPython 3.7 start, ``import
numpy, paddlelite``, predictor creation), ``spare_load`` a pre-started ``SpareHost`` given the ``.nb`` until ready
(what a pooled Lite worker pays now).
"""

from __future__ import annotations

import time
from typing import Any

from common import (  # type: ignore[import-not-found]
    CHILD_ENV,
    ROOT,
    Platform,
    arg_parser,
    binary_request,
    example_inputs,
    example_model,
    machine,
    prepared_model,
    stats_ms,
    stop_on_sigterm,
    table,
    wait_until,
    write_result,
)

MODELS = ("mlp", "mobilenet_v3_small")
FLOOR_PARTS = ("host_start", "spare_load", "create", "first_run", "floor")
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


def host_floor(model: str, reps: int) -> dict[str, Any]:
    """Lite's own floor for MODEL and what its engine host costs (see the module docstring), p50/p99 in ms."""
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT))
    from runtime.lite import lite_python
    from runtime.lite.engine import LiteHost
    from runtime.spec import GOLDEN_INPUTS, Manifest

    try:  # the spare host (absent before the pre-started host came in, commit e0d04a0)
        from runtime.lite.engine import SpareHost
    except ImportError:
        SpareHost = None

    folder = prepared_model(model, "cpu")
    nb = folder / str(Manifest.load(folder).lite["nb"])
    floor_script = [
        str(lite_python()),
        str(ROOT / "bench" / "lite_floor.py"),
        str(nb),
        str(folder / GOLDEN_INPUTS),
    ]
    samples: dict[str, list[float]] = {
        "host_start": [],
        "spare_load": [],
        "create": [],
        "first_run": [],
        "floor": [],
    }
    for _ in range(reps):
        t0 = time.perf_counter()
        host = LiteHost(nb)
        samples["host_start"].append(time.perf_counter() - t0)
        host.close()
        if SpareHost is not None:
            spare = SpareHost()
            spare.wait_ready()
            t0 = time.perf_counter()
            host = LiteHost(nb, spare=spare)
            samples["spare_load"].append(time.perf_counter() - t0)
            host.close()
        out = subprocess.run(floor_script, capture_output=True, text=True, check=True, env=CHILD_ENV).stdout
        timings = json.loads(out.strip().splitlines()[-1])
        samples["create"].append(timings["create_s"])
        samples["first_run"].append(timings["first_run_s"])
        samples["floor"].append(timings["create_s"] + timings["first_run_s"])
    return {"model": model, **{k: stats_ms(v) for k, v in samples.items()}}


def main() -> None:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=6, help="cold samples per side and model")
    p.add_argument("--warm", type=int, default=300, help="warm requests per side and model")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    stop_on_sigterm()
    floors = [host_floor(model, max(args.reps, 5)) for model in models]
    rows: list[dict[str, Any]] = []
    with Platform("--pool-size", str(POOL_SIZE), device="cpu", PADDLEFN_LITE_POOL_SIZE="1") as platform:
        tenant = platform.tenant("bench")
        for model in models:
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
              "rows": rows, "host_floor": floors}  # fmt: skip
    path = write_result("lite", result)
    floor_rows = [
        {"model": f["model"], **{f"{k}_p50_ms": f[k].get("p50") for k in FLOOR_PARTS}} for f in floors
    ]
    print(table(floor_rows, ["model", *(f"{k}_p50_ms" for k in FLOOR_PARTS)]))
    print()
    print(table(rows, ["model", "function", "cold_p50_ms", "cold_p99_ms", "warm_p50_ms", "warm_p99_ms",
                       "first_answered_by"]))  # fmt: skip
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
