"""Density: how many functions stay warm on one machine, what each costs, and how traffic to many of them fares.

Three parts, in one run:
- worker creation: a worker forked from the template (runtime/zygote.py) against one spawned as its own Python
  process (the old way), samples interleaved; timed from the request until the worker says it is ready.
- warm functions: N small functions (mlp) deployed across TENANTS tenants at the platform's default settings
  (idle timeout raised so that none sleeps during the run); after each step the PSS of every warm function's
  worker (``/proc/<pid>/smaps_rollup``) and of the template is read.
- traffic: at the steps named by --traffic, each of the N functions gets one client with Poisson arrivals at
  RATE requests/s that waits for each answer before its next request, for SECONDS; reported: answers, errors,
  the share that paid a cold start (``x-paddlefn-cold-start-ms``), p50/p99, and the platform's count of cold
  starts per minute (each eviction shows as one).

    .venv/bin/python bench/density.py [--warm 20,100,300,1000] [--traffic 20,100] [--seconds 60]
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import (
    CHILD_ENV,
    OUT,
    PY,
    ROOT,
    Platform,
    arg_parser,
    binary_request,
    example_inputs,
    example_model,
    machine,
    stats_ms,
    stop_on_sigterm,
    table,
    write_result,
)
from functions.backends.memory import pss_mb
from functions.backends.pool import worker_env
from functions.backends.template import WorkerTemplate
from functions.settings import Settings

# ------------------------------------------------------------------ worker creation: fork against spawn


async def _fork_once(template: WorkerTemplate, folder: Path, i: int) -> float:
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    with (folder / f"f{i}.log").open("ab") as log:
        child = await template.fork(
            ["--uds", str(folder / f"f{i}.sock"), "--device", "cpu"], write_fd, log.fileno()
        )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        await asyncio.to_thread(ready.readline)
    elapsed = time.perf_counter() - t0
    child.kill()
    await child.wait()
    return elapsed


async def _spawn_once(folder: Path, i: int) -> float:
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        PY, "-m", "runtime.server", "--uds", str(folder / f"s{i}.sock"), "--device", "cpu",
        "--ready-fd", str(write_fd), pass_fds=(write_fd,), env=worker_env(Settings()), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        await asyncio.to_thread(ready.readline)
    elapsed = time.perf_counter() - t0
    process.kill()
    await process.wait()
    return elapsed


def worker_creation(samples: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        folder = Path(tempfile.mkdtemp(prefix="pfn-density-"))
        template = WorkerTemplate(worker_env(Settings()), folder / "template.log")
        forked: list[float] = []
        spawned: list[float] = []
        try:
            await template.fork(
                ["--uds", str(folder / "warm.sock"), "--device", "cpu"], *_null_fds()
            )  # start it
            for i in range(samples):
                forked.append(await _fork_once(template, folder, i))
                if i % 3 == 0:  # spawning costs ~100x more: fewer samples, interleaved all the same
                    spawned.append(await _spawn_once(folder, i))
        finally:
            await template.close()
            template.close_lifeline()
        return {"fork": stats_ms(forked), "spawn": stats_ms(spawned),
                "template_import_s": template.info.get("import_seconds")}  # fmt: skip

    return asyncio.run(run())


def _null_fds() -> tuple[int, int]:
    """A ready pipe nobody reads and /dev/null as the log: the child starts the template and exits with it."""
    _, write_fd = os.pipe()
    return write_fd, os.open(os.devnull, os.O_WRONLY)


# ------------------------------------------------------------------ warm functions


def warm_functions(p: Platform) -> list[dict[str, Any]]:
    return [w for w in p.capacity()["warm"] if w["ready"]]


def memory_of_warm(p: Platform) -> dict[str, Any]:
    warm = warm_functions(p)
    pids = [r["pid"] for w in warm for r in w["ready"]]
    pss = [m for pid in pids if (m := pss_mb(pid)) is not None]
    memory = p.capacity().get("memory", {})
    template_mb = pss_mb(memory["template_pid"]) if memory.get("template_pid") else 0.0
    total = sum(pss) + (template_mb or 0.0)
    return {
        "warm_functions": len(warm),
        "pss_per_function_mb": round(sum(pss) / len(pss), 1) if pss else None,
        "pss_total_mb": round(total, 1),
        "pss_total_per_function_mb": round(total / len(pss), 1) if pss else None,
        "template_mb": round(template_mb or 0.0, 1),
        "capacity_workers": p.capacity()["workers"]["total"],
        "budget_mb": memory.get("budget_mb"),
    }


def deploy_up_to(p: Platform, tenants: list[Any], have: list[tuple[Any, str]], n: int, model: Path) -> float:
    """Deploy functions until N exist (round-robin over the tenants), a few uploads at a time."""
    wanted = [(tenants[i % len(tenants)], f"fn{i}") for i in range(len(have), n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda tn: p.deploy(tn[0], tn[1], model, {}), wanted))
    have.extend(wanted)
    return time.perf_counter() - t0


# ------------------------------------------------------------------ traffic


def traffic(p: Platform, functions: list[tuple[Any, str]], rate: float, seconds: float) -> dict[str, Any]:
    body, headers = binary_request(example_inputs("mlp"))
    cold_before = count_cold_starts(p)

    async def client(http: httpx.AsyncClient, tenant: Any, name: str, rng: random.Random, out: dict) -> None:
        url = tenant.infer_url(p.url, name)
        auth = {**headers, "authorization": f"Bearer {tenant.key}"}
        deadline = time.perf_counter() + seconds
        await asyncio.sleep(rng.expovariate(rate))
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = await http.post(url, content=body, headers=auth)
                status = str(r.status_code)
                cold = "x-paddlefn-cold-start-ms" in r.headers
            except httpx.HTTPError as exc:
                status, cold = type(exc).__name__, False
            elapsed = time.perf_counter() - t0
            if status == "200":
                out["latencies"].append(elapsed)
                out["cold"] += cold
            else:
                out["errors"][status] = out["errors"].get(status, 0) + 1
            await asyncio.sleep(max(0.0, rng.expovariate(rate) - elapsed))  # Poisson arrivals, closed loop

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {"latencies": [], "cold": 0, "errors": {}}
        limits = httpx.Limits(
            max_connections=len(functions) + 10, max_keepalive_connections=len(functions) + 10
        )
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            rng = random.Random(7)
            await asyncio.gather(
                *(client(http, t, n, random.Random(rng.random()), out) for t, n in functions)
            )
        return out

    t0 = time.perf_counter()
    out = asyncio.run(run())
    wall = time.perf_counter() - t0
    answered = len(out["latencies"])
    cold = count_cold_starts(p) - cold_before  # every eviction (or sleep) shows as a later cold start
    return {
        "functions": len(functions),
        "answered": answered,
        "expected_about": round(len(functions) * rate * seconds),
        "errors": out["errors"],
        "cold_share_pct": round(100 * out["cold"] / answered, 2) if answered else None,
        **{k: v for k, v in stats_ms(out["latencies"]).items() if k in ("p50", "p99", "max")},
        "cold_starts": cold,
        "cold_starts_per_min": round(cold / (wall / 60), 1),
    }


def count_cold_starts(p: Platform) -> int:
    text = p.admin.get("/metrics").text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("paddlefn_cold_starts_total")))  # fmt: skip


# ------------------------------------------------------------------ main


def main() -> None:
    parser = arg_parser(__doc__.split("\n")[0])
    parser.add_argument("--warm", default="20,100,300,1000", help="numbers of functions to deploy, in steps")
    parser.add_argument("--traffic", default="20,100", help="steps at which to run the traffic part")
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--rate", type=float, default=0.5, help="requests/s per function (Poisson)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--forks", type=int, default=30, help="worker creation samples (fork)")
    args = parser.parse_args()
    stop_on_sigterm()
    steps = [int(x) for x in args.warm.split(",") if x]
    traffic_at = {int(x) for x in args.traffic.split(",") if x}

    result: dict[str, Any] = {"machine": machine(), "device": "cpu", "args": vars(args)}
    result["worker_creation"] = creation = worker_creation(args.forks)
    print(
        table([{"start": k, **creation[k]} for k in ("fork", "spawn")], ["start", "p50", "p99", "n"]),
        flush=True,
    )

    model = example_model("mlp")
    steps_out: list[dict[str, Any]] = []
    result["steps"] = steps_out
    env = {k: v for k, v in CHILD_ENV.items() if not k.startswith("PADDLEFN_")}
    with Platform("--idle-timeout", "1h", **env) as p:
        p.admin.put("/v1/plans/density", json={"limits": {
            "max_functions": max(steps), "max_replicas": max(steps), "requests_per_second": 1e6,
            "burst": 1_000_000, "max_concurrent_requests": 10_000}}).raise_for_status()  # fmt: skip
        tenants = []
        for i in range(args.tenants):
            t = p.tenant(f"t{i}")
            p.admin.put(f"/v1/tenants/{t.name}/plan", json={"plan": "density"}).raise_for_status()
            tenants.append(t)
        have: list[tuple[Any, str]] = []
        for n in steps:
            try:
                deploy_s = deploy_up_to(p, tenants, have, n, model)
            except Exception as exc:
                steps_out.append({"n": n, "error": repr(exc)[:300]})
                shutil.copy(p.data_dir / "platform.log", OUT / "density-platform.log")  # for the post-mortem
                break
            time.sleep(6)  # one more memory measurement by the platform
            step: dict[str, Any] = {"n": n, "deploy_s": round(deploy_s, 1), **memory_of_warm(p)}
            if n in traffic_at:
                step["traffic"] = traffic(p, have, args.rate, args.seconds)
                step["after_traffic"] = memory_of_warm(p)
            steps_out.append(step)
            print(step, flush=True)
            write_result("density", result)
        shutil.copy(p.data_dir / "platform.log", OUT / "density-platform.log")  # kept: the run's folder goes
    path = write_result("density", result)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
