"""Shared fixtures: example models built by Paddle here (no downloads) and a real platform in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

ADMIN_KEY = "test-admin-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_example(kind: str, out: Path, fmt: str = "legacy") -> Path:
    subprocess.run(
        [sys.executable, "-m", "runtime.examples", kind, str(out), "--format", fmt],
        check=True,
        capture_output=True,
        env={**os.environ, "GLOG_minloglevel": "2"},
    )
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Example models, built once per test session: mlp, multi_io (legacy and PIR)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "mlp": build_example("mlp", root / "mlp"),
        "multi_io": build_example("multi_io", root / "multi_io"),
        "multi_io_pir": build_example("multi_io", root / "multi_io_pir", fmt="pir"),
    }


@pytest.fixture(scope="session")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example("mobilenet_v3_small", tmp_path_factory.mktemp("models") / "mobilenet_v3_small")


def example(model: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(model / "example_inputs.npz") as i, np.load(model / "example_outputs.npz") as o:
        return {k: i[k] for k in i.files}, {k: o[k] for k in o.files}


def oip_body(inputs: dict[str, np.ndarray]) -> dict[str, object]:
    from runtime.spec import oip_datatype

    return {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": oip_datatype(a.dtype), "data": a.ravel().tolist()}
            for n, a in inputs.items()
        ]
    }


def binary_request(inputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """An OIP request in the binary tensor extension (runtime.protocol.encode_binary_request)."""
    from runtime.protocol import encode_binary_request

    return encode_binary_request(inputs)


def outputs_of(response_json: dict[str, object]) -> dict[str, np.ndarray]:
    from runtime.spec import OIP_TO_NUMPY

    result = {}
    for out in response_json["outputs"]:  # type: ignore[attr-defined]
        result[out["name"]] = np.asarray(out["data"], dtype=OIP_TO_NUMPY[out["datatype"]]).reshape(
            out["shape"]
        )
    return result


@dataclass
class PlatformProcess:
    """`paddlefn up` in a subprocess, on a free port, with its own data dir."""

    data_dir: Path
    port: int
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PlatformProcess:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-platform.log"
        command = [sys.executable, "-m", "functions.cli", "up", "--port", str(self.port),
                   "--data-dir", str(self.data_dir), *self.args]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"platform exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"platform did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for c in self.clients:
            c.close()
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path else ""

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def client(self, key: str) -> httpx.Client:
        """A client with KEY; closed when the platform fixture stops."""
        c = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key}"}, timeout=60)
        self.clients.append(c)
        return c


def platform_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLEFN_")}
    env.update({
        "PADDLEFN_ADMIN_KEY": ADMIN_KEY,
        "PADDLEFN_SCALER_TICK_S": "0.2",
        "PADDLEFN_SCALE_DOWN_DELAY_S": "2",
        "GLOG_minloglevel": "2",
    })  # fmt: skip
    env.update(extra)
    return env


@pytest.fixture
def platform_factory(tmp_path: Path) -> Iterator[object]:
    started: list[PlatformProcess] = []

    def make(*args: str, data_dir: Path | None = None, **env: str) -> PlatformProcess:
        p = PlatformProcess(data_dir or tmp_path / "data", free_port(), platform_env(**env), list(args))
        started.append(p.start())
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def platform(platform_factory: object) -> PlatformProcess:
    return platform_factory("--idle-timeout", "3s", "--pool-size", "1")  # type: ignore[operator]


@dataclass
class Tenant:
    name: str
    key: str
    http: httpx.Client


def make_tenant(p: PlatformProcess, name: str) -> Tenant:
    with p.admin() as admin:
        r = admin.post("/v1/tenants", json={"name": name})
        assert r.status_code == 201, r.text
    key = r.json()["key"]["key"]
    return Tenant(name, key, p.client(key))


def deploy(
    t: Tenant, name: str, model: Path, config: dict[str, object] | None = None, wait: bool = True
) -> dict:
    import io
    import json
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    r = t.http.post(
        f"/v1/tenants/{t.name}/functions",
        data={"name": name, "config": json.dumps(config or {})},
        files={"model": ("model.tar.gz", buf.getvalue(), "application/gzip")},
    )
    assert r.status_code == 202, r.text
    if not wait:
        return r.json()
    return wait_status(t, name)


def wait_status(t: Tenant, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fn = t.http.get(f"/v1/tenants/{t.name}/functions/{name}").json()
        if fn["status"] != "deploying":
            return fn
        time.sleep(0.2)
    raise AssertionError(f"{name} still deploying after {timeout} s")


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
