"""Cold start: a sleeping function's first response, beside the two floors measured in the same run.

- platform: the function is asleep (no worker process); one request is sent and timed until its answer arrives.
  The platform takes a pre-warmed worker from its pool, loads the model (predictor + first run) and forwards.
- fresh-process floor: a new Python that imports Paddle and creates the predictor (what a naive per-pod start
  pays before it can answer); the first run is timed too and reported beside it.
- warm-process floor: predictor creation + first run in a process that has already imported Paddle and brought
  its device up (what a perfect pool pays). A new process per sample, as the pool uses each worker once:
  a second predictor in the same process would profit from caches a real cold start never has.

Samples of the three are interleaved per model, and each is taken when the machine is quiet (the function
asleep, the pool refilled), so load from other work hits all three alike.

    .venv/bin/python bench/cold_start.py [--reps 7] [--models mlp,mobilenet_v3_small,resnet50] [--device gpu]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import (
    CHILD_ENV,
    MODELS,
    PY,
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
    stop_process,
    table,
    wait_until,
    write_result,
)

POOL_SIZE = 1
WARM_GOAL_MS = 50.0  # the cold start may be at most this much above the warm floor
FRESH_GOAL_RATIO = 10.0  # and at least this many times faster than the fresh-process floor
LOADED = re.compile(r"loaded (\S+) in ([\d.]+) s")


# ------------------------------------------------------------------ the floors (bench/floors.py)


def _spawn_child(mode: str, model_dir: Path, device: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, str(Path(__file__).with_name("floors.py")), mode, str(model_dir), "--device", device],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=CHILD_ENV, cwd=ROOT,
    )  # fmt: skip


def _line(process: subprocess.Popen[str], want: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith(want):
        raise RuntimeError(f"floor child said {line!r}, expected {want!r} (exit status {process.poll()})")
    return line


def fresh_floor(model_dir: Path, device: str) -> dict[str, float]:
    process = None
    try:
        t0 = time.perf_counter()
        process = _spawn_child("fresh", model_dir, device)
        _line(process, "imported")
        t_import = time.perf_counter() - t0
        _line(process, "created")
        t_create = time.perf_counter() - t0
        inner = json.loads(_line(process, "{"))
        t_first = time.perf_counter() - t0
        return {"import_s": t_import, "import_create_s": t_create, "import_create_run_s": t_first, **inner}
    finally:
        stop_process(process, grace=10)


def warm_floor(model_dir: Path, device: str) -> dict[str, float]:
    process = None
    try:
        process = _spawn_child("warm", model_dir, device)
        _line(process, "ready")
        time.sleep(0.3)  # let the child's start-up work settle, as a pool worker has long before it is used
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        _line(process, "created")
        inner: dict[str, float] = json.loads(_line(process, "{"))
        inner["create_run_s"] = inner["create_s"] + inner["first_run_s"]
        return inner
    finally:
        stop_process(process, grace=10)


# ------------------------------------------------------------------ the platform's cold start


def new_load_seconds(platform: Platform, function: str, seen: set[tuple[str, int]]) -> float | None:
    """The worker's own 'loaded F in X s' (predictor + first run + manifest) from the log of a new worker."""
    found = None
    for path in platform.worker_logs():
        for i, line in enumerate(path.read_text(errors="replace").splitlines()):
            m = LOADED.search(line)
            if m and m.group(1) == function and (path.name, i) not in seen:
                seen.add((path.name, i))
                found = float(m.group(2))
    return found


def wait_quiet(platform: Platform, tenant: Any, function: str) -> None:
    """Asleep (no replica), the pool full and no worker left running or stopping."""

    def quiet() -> bool:
        workers = platform.capacity()["workers"]
        asleep = platform.function(tenant, function)["state"] == "asleep"
        return asleep and workers["idle_warm"] >= POOL_SIZE and workers["in_use"] == workers["idle_warm"]

    wait_until(quiet, 120, f"{function} to sleep and the pool to refill", interval=0.1)
    time.sleep(0.3)


def cold_sample(platform: Platform, tenant: Any, function: str, body: bytes, headers: dict[str, str],
                seen: set[tuple[str, int]]) -> dict[str, Any]:  # fmt: skip
    wait_quiet(platform, tenant, function)
    url = tenant.infer_url(platform.url, function)
    t0 = time.perf_counter()
    r = tenant.http.post(url, content=body, headers=headers)
    total = time.perf_counter() - t0
    if r.status_code != 200 or "x-paddlefn-cold-start-ms" not in r.headers:
        raise RuntimeError(f"cold request: {r.status_code} {r.text[:300]} {dict(r.headers)}")
    warm = []
    for _ in range(20):  # the same function, now warm: what the rest of its requests see
        t1 = time.perf_counter()
        tenant.http.post(url, content=body, headers=headers).raise_for_status()
        warm.append(time.perf_counter() - t1)
    return {
        "total_s": total,
        "wait_for_replica_s": float(r.headers["x-paddlefn-cold-start-ms"]) / 1000,
        "worker_load_s": new_load_seconds(platform, function, seen),
        "compute_s": float(r.headers.get("x-paddlefn-compute-ms", 0)) / 1000,
        "warm_request_p50_s": sorted(warm)[len(warm) // 2],
    }


def main() -> int:
    p = arg_parser(__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7, help="cold starts (and floor samples) per model")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--max-workers", type=int, default=0,
                   help="platform worker limit (0: its default); 1 stops the pool refilling during a wake-up, "
                        "to see what the refill's process start costs the cold start")  # fmt: skip
    args = p.parse_args()
    stop_on_sigterm()
    models = [m for m in args.models.split(",") if m]
    result: dict[str, Any] = {"benchmark": "cold_start", "device": args.device, "machine": machine(),
                              "reps": args.reps, "pool_size": POOL_SIZE, "models": {}}  # fmt: skip
    for name in models:  # build and prepare outside the timed part
        example_model(name)
        prepared_model(name, args.device)
    extra = ["--max-workers", str(args.max_workers)] if args.max_workers else []
    result["max_workers"] = args.max_workers or "default"
    with Platform(
        "--pool-size", str(POOL_SIZE), "--idle-timeout", "2s", *extra, device=args.device
    ) as platform:
        tenant = platform.tenant("bench")
        seen: set[tuple[str, int]] = set()
        for name in models:
            function = name.replace("_", "-")
            config = {"idle_timeout_s": 1, "max_scale": 1, "device": args.device}
            platform.deploy(tenant, function, example_model(name), config)
            body, headers = binary_request(example_inputs(name))
            cold, warm, fresh = [], [], []
            for rep in range(args.reps):
                cold.append(cold_sample(platform, tenant, function, body, headers, seen))
                # The wake-up took the pool's worker; wait for its replacement so the floors run in quiet.
                wait_until(
                    lambda: platform.capacity()["workers"]["idle_warm"] >= POOL_SIZE, 120, "pool refill"
                )
                warm.append(warm_floor(prepared_model(name, args.device), args.device))
                fresh.append(fresh_floor(prepared_model(name, args.device), args.device))
                print(f"{name} #{rep + 1}: cold {cold[-1]['total_s'] * 1000:.0f} ms, warm floor "
                      f"{warm[-1]['create_run_s'] * 1000:.0f} ms, fresh floor "
                      f"{fresh[-1]['import_create_s'] * 1000:.0f} ms", file=sys.stderr, flush=True)  # fmt: skip
            result["models"][name] = {"cold": cold, "warm_floor": warm, "fresh_floor": fresh}
    rows, parts = summarise(result)
    path = write_result(
        f"cold_start-max-workers-{args.max_workers}" if args.max_workers else "cold_start", result
    )
    print(f"## Cold start ({args.device}, {args.reps} samples each, times in ms)\n")
    print(table(rows, ["model", "cold p50", "cold p99", "warm floor p50", "fresh floor p50",
                       "fresh +first run p50", "cold - warm floor", "fresh / cold",
                       "within 50 ms of warm", "10x faster than fresh"]))  # fmt: skip
    print("\n### Where a cold start's time goes (p50, ms)\n")
    print(table(parts, ["model", "client total", "wait for replica", "worker load", "take + wake overhead",
                        "request after wake", "warm floor create", "warm floor first run",
                        "warm request"]))  # fmt: skip
    print(f"\n{path}")
    return 0


def summarise(result: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, parts = [], []
    for name, m in result["models"].items():

        def p50(samples: list[dict[str, Any]], key: str) -> float:
            return stats_ms([s[key] for s in samples if s[key] is not None]).get("p50", float("nan"))

        cold = stats_ms([s["total_s"] for s in m["cold"]])
        warm = p50(m["warm_floor"], "create_run_s")
        fresh = p50(m["fresh_floor"], "import_create_s")
        summary = {
            "model": name,
            "cold p50": cold["p50"],
            "cold p99": cold["p99"],
            "warm floor p50": warm,
            "fresh floor p50": fresh,
            "fresh +first run p50": p50(m["fresh_floor"], "import_create_run_s"),
            "cold - warm floor": cold["p50"] - warm,
            "fresh / cold": fresh / cold["p50"],
        }
        summary["within 50 ms of warm"] = summary["cold - warm floor"] <= WARM_GOAL_MS
        summary["10x faster than fresh"] = summary["fresh / cold"] >= FRESH_GOAL_RATIO
        m["summary"] = summary
        rows.append(summary)
        for s in m["cold"]:  # per sample, then p50: differences of p50s would mix samples
            load = s["worker_load_s"]
            s["take_wake_overhead_s"] = None if load is None else s["wait_for_replica_s"] - load
            s["after_wake_s"] = s["total_s"] - s["wait_for_replica_s"]
        parts.append({
            "model": name,
            "client total": cold["p50"],
            "wait for replica": p50(m["cold"], "wait_for_replica_s"),
            "worker load": p50(m["cold"], "worker_load_s"),
            "take + wake overhead": p50(m["cold"], "take_wake_overhead_s"),
            "request after wake": p50(m["cold"], "after_wake_s"),
            "warm floor create": p50(m["warm_floor"], "create_s"),
            "warm floor first run": p50(m["warm_floor"], "first_run_s"),
            "warm request": p50(m["cold"], "warm_request_p50_s"),
        })  # fmt: skip
        m["breakdown_p50_ms"] = parts[-1]
    return rows, parts


if __name__ == "__main__":
    sys.exit(main())
