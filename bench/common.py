"""What the benchmarks share: example models, a real platform or a bare worker in a subprocess, HTTP clients,
percentiles, the machine's description and the result files.

Everything here starts real processes the way a user would (``python -m functions.cli up``,
``python -m runtime.server``), and every process started is stopped again, on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform as pyplatform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PY = sys.executable
ADMIN_KEY = "bench-admin-key-0123456789abcdef"

# The same environment the platform gives its workers (functions.backends.pool.worker_env): one math thread,
# quiet glog. Floors and direct workers use it too, so that every side of a comparison runs the same way.
CHILD_ENV = {**os.environ, "GLOG_minloglevel": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _name in [k for k in CHILD_ENV if k.startswith("PADDLEFN_")]:
    del CHILD_ENV[_name]

# Each script only uses these models; resnet50 is only in the cold-start benchmark.
MODELS = ("mlp", "mobilenet_v3_small", "resnet50")


# ------------------------------------------------------------------ arguments, stopping, results


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--device", choices=["cpu", "gpu"], default="cpu", help="where models run (gpu: a lent GPU)"
    )
    return p


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that the ``finally`` blocks stop every process this script started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    gpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    from importlib.metadata import PackageNotFoundError, version

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    paddle = ""
    for dist in ("paddlepaddle", "paddlepaddle-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            paddle = f"{dist} {version(dist)}"
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "gpu": gpu or "none",
        "loadavg_at_start": os.getloadavg(),
        "python": pyplatform.python_version(),
        "paddle": paddle,
        # Others may be changing the code while a benchmark runs: say which code was measured.
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_uncommitted": git("status", "--porcelain", "--", "functions", "runtime", "scaler").splitlines(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    path = OUT / f"{name}-{result['device']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table; floats get 2 decimals below 10 (sub-millisecond differences), else 1."""

    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def stats_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p99, mean, min and max in milliseconds (p99 of a few samples is close to their max: say n)."""
    a = np.asarray(seconds, dtype=np.float64) * 1000
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


# ------------------------------------------------------------------ models


def example_model(name: str) -> Path:
    """The example model as a user would upload it (built here once, cached under bench/out/models)."""
    out = OUT / "models" / name
    if not (out / "example_outputs.npz").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([PY, "-m", "runtime.examples", name, str(out)], check=True, cwd=ROOT, env=CHILD_ENV,
                       capture_output=True)  # fmt: skip
    return out


def prepared_model(name: str, device: str) -> Path:
    """The model as deploy prepares it (optimised once, golden-checked): what workers and floors load."""
    out = OUT / "prepared" / device / name
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([PY, "-m", "runtime.prepare", str(example_model(name)), str(out), "--device", device],
                       check=True, cwd=ROOT, env=CHILD_ENV, capture_output=True)  # fmt: skip
    return out


def example_inputs(name: str) -> dict[str, np.ndarray]:
    with np.load(example_model(name) / "example_inputs.npz") as data:
        return {k: data[k] for k in data.files}


def binary_request(inputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """An OIP request in the binary tensor extension (runtime.protocol.encode_binary_request)."""
    from runtime.protocol import encode_binary_request

    return encode_binary_request(inputs)


def http_client(**kw: Any) -> httpx.Client:
    """An httpx client with TCP_NODELAY, as requests/urllib3 and most OIP clients set it. httpx writes a request's
    headers and body in two send calls; without NODELAY, Nagle holds the body back until the server ACKs the
    headers, which a delayed ACK can put off by 40 ms."""
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(transport=httpx.HTTPTransport(socket_options=nodelay), timeout=120, **kw)


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(process: subprocess.Popen[Any] | None, grace: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Tenant:
    name: str
    key: str
    http: httpx.Client

    def infer_url(self, base: str, function: str) -> str:
        return f"{base}/t/{self.name}/v2/models/{function}/infer"


class Platform:
    """``python -m functions.cli up`` on a free port with its own data dir, stopped on exit."""

    def __init__(self, *args: str, device: str = "cpu", **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="paddlefn-bench-"))
        self.args = ["--device", device, *args]
        # A fast scaler tick so that sleeping is prompt; wake-ups never wait for it anyway.
        self.env = {**CHILD_ENV, "PADDLEFN_ADMIN_KEY": ADMIN_KEY, "PADDLEFN_SCALER_TICK_S": "0.2",
                    "PADDLEFN_SCALE_DOWN_DELAY_S": "2", **env}  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: list[httpx.Client] = []
        self.admin = self.client(ADMIN_KEY)

    def __enter__(self) -> Platform:
        log = (self.data_dir / "platform.log").open("ab")
        command = [PY, "-m", "functions.cli", "up", "--port", str(self.port), "--data-dir", str(self.data_dir),
                   *self.args]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        log.close()
        try:
            wait_until(self._live, 120, "the platform to start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _live(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the platform exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def __exit__(self, *exc: object) -> None:
        for c in self._clients:
            c.close()
        stop_process(self.process)  # the platform stops its workers; they also die with it (PDEATHSIG)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.data_dir / "platform.log").read_text(errors="replace")[-4000:]
        return ""

    def tenant(self, name: str) -> Tenant:
        """A new tenant, with an HTTP client that carries its key, on a plan whose rate and concurrency limits
        are far above what the benchmarks send (the default plan's 200 requests/s would answer 429s)."""
        r = self.admin.post("/v1/tenants", json={"name": name})
        r.raise_for_status()
        key = r.json()["key"]["key"]
        limits = {"requests_per_second": 1e6, "burst": 1_000_000, "max_concurrent_requests": 10_000}
        if self.admin.put("/v1/plans/bench", json={"limits": limits}).status_code == 200:
            self.admin.put(f"/v1/tenants/{name}/plan", json={"plan": "bench"}).raise_for_status()
        return Tenant(name, key, self.client(key))

    def client(self, key: str) -> httpx.Client:
        c = http_client(base_url=self.url, headers={"authorization": f"Bearer {key}"})
        self._clients.append(c)
        return c

    def deploy(self, tenant: Tenant, name: str, model: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Upload MODEL's folder as a .tar.gz, as a user does, and wait until it is ready."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(model.iterdir()):
                tar.add(path, arcname=path.name)
        r = tenant.http.post(f"/v1/tenants/{tenant.name}/functions", data={"name": name, "config": json.dumps(config)},
                        files={"model": ("model.tar.gz", buf.getvalue(), "application/gzip")})  # fmt: skip
        if r.status_code != 202:
            raise RuntimeError(f"deploy of {name} refused: {r.status_code} {r.text}")
        fn = wait_until(
            lambda: (f := self.function(tenant, name))["status"] != "deploying" and f, 600, "deploy"
        )
        if fn["status"] != "ready":
            raise RuntimeError(f"deploy of {name} failed: {fn.get('error')}")
        return fn

    def function(self, tenant: Tenant, name: str) -> dict[str, Any]:
        result: dict[str, Any] = tenant.http.get(f"/v1/tenants/{tenant.name}/functions/{name}").json()
        return result

    def capacity(self) -> dict[str, Any]:
        result: dict[str, Any] = self.admin.get("/v1/capacity").json()
        return result

    def worker_logs(self) -> list[Path]:
        return sorted((self.data_dir / "logs").glob("worker-*.log"))


class DirectWorker:
    """``python -m runtime.server`` with a prepared model, loaded at start: the worker without the platform.
    On a Unix socket (``uds``, how the platform itself reaches its workers) or a TCP port (the runtime image)."""

    def __init__(
        self,
        model_dir: Path,
        name: str,
        device: str = "cpu",
        uds: Path | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.uds = uds
        self.port = free_port()
        self.url = "http://worker" if uds else f"http://127.0.0.1:{self.port}"
        where = ["--uds", str(uds)] if uds else ["--host", "127.0.0.1", "--port", str(self.port)]
        self.command = [PY, "-m", "runtime.server", *where, "--model-dir", str(model_dir), "--model-name", name,
                        "--device", device, *args]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def client(self, **kw: Any) -> httpx.Client:
        if self.uds:
            return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.uds)), timeout=120, **kw)
        return http_client(**kw)

    def __enter__(self) -> DirectWorker:
        self.process = subprocess.Popen(self.command, env=CHILD_ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_until(self._ready, 300, "the direct worker to load its model", interval=0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the direct worker exited with {self.process.returncode}")
        try:
            with self.client() as c:
                return c.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process)
        if self.uds:
            self.uds.unlink(missing_ok=True)


# ------------------------------------------------------------------ load generation


def closed_loop(
    make_client: Callable[[], httpx.Client],
    url: str,
    body: bytes,
    *,
    clients: int,
    requests: int | None = None,
    seconds: float | None = None,
) -> tuple[list[float], Counter[str], float]:
    """CLIENTS threads, each with its own keep-alive connection (from MAKE_CLIENT), each sending the next request
    as soon as the previous answer arrives, until REQUESTS in all have been answered or SECONDS have passed.
    Returns (latency of each answered request in s, errors by status or exception, wall seconds)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    remaining = [requests if requests is not None else 1 << 62]
    start_gate = threading.Barrier(clients + 1)

    def run() -> None:
        mine: list[float] = []
        with make_client() as http:
            start_gate.wait()
            deadline = time.perf_counter() + (seconds if seconds is not None else 1e9)
            while time.perf_counter() < deadline:
                with lock:
                    if remaining[0] <= 0:
                        break
                    remaining[0] -= 1
                t0 = time.perf_counter()
                try:
                    status = str(http.post(url, content=body).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if status == "200":
                    mine.append(time.perf_counter() - t0)
                else:
                    with lock:
                        errors[status] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0
