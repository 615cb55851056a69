"""Fixtures of the cluster tests: the scaler in a thread, a real Prometheus process, a metrics endpoint.

Servers run for real on free ports and are polled until they answer, never slept for.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest
import yaml
from prometheus_client import make_wsgi_app

from functions.metrics import Metrics
from scaler.activity import Key, Sample
from scaler.service import ScalerService
from scaler.settings import ScalerSettings
from tests.conftest import free_port

SPECS = Path(__file__).parent / "specs"


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll CHECK until true; returns the seconds it took. Fails the test with WHAT after TIMEOUT."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class FakeSource:
    """Stands in for Prometheus where the test is about the scaler, not PromQL: samples set by the test."""

    samples: dict[Key, Sample] = field(default_factory=dict)
    fetches: int = 0
    closed: bool = False

    def fetch(self) -> Mapping[Key, Sample]:
        self.fetches += 1
        return dict(self.samples)

    def close(self) -> None:
        self.closed = True


class ScalerThread:
    """A ScalerService on its own event loop in a thread, so tests can use blocking gRPC and HTTP clients."""

    def __init__(self, settings: ScalerSettings, source: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.service = ScalerService(settings, source)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.loop.run_forever, name="scaler", daemon=True)

    def start(self) -> ScalerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.service.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.service.http_port}"


@pytest.fixture
def scaler_factory() -> Iterator[Callable[..., ScalerThread]]:
    started: list[ScalerThread] = []

    def make(source: object, **settings: object) -> ScalerThread:
        values = {"grpc_address": "127.0.0.1:0", "http_host": "127.0.0.1", "http_port": 0, "tick_s": 0.1}
        values.update(settings)
        s = ScalerThread(ScalerSettings(**values), source).start()  # type: ignore[arg-type]
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class MetricsEndpoint:
    """The platform's own metrics (functions.metrics.Metrics: same names and labels) on a real HTTP server."""

    metrics: Metrics
    server: WSGIServer
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"


@pytest.fixture
def metrics_endpoint() -> Iterator[MetricsEndpoint]:
    metrics = Metrics()
    server = make_server("127.0.0.1", 0, make_wsgi_app(metrics.registry), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield MetricsEndpoint(metrics, server, thread)
    server.shutdown()
    server.server_close()
    thread.join(5)


@dataclass
class PrometheusProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., PrometheusProcess]]:
    """A real Prometheus (Debian package `prometheus`) scraping the given jobs every 200 ms."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is missing: `apt-get install -y prometheus` (Debian package)")
    started: list[PrometheusProcess] = []

    def make(scrape_configs: list[dict[str, object]], rule_files: tuple[Path, ...] = ()) -> PrometheusProcess:
        port = free_port()
        root = tmp_path / f"prometheus-{port}"
        root.mkdir()
        config = {
            "global": {"scrape_interval": "200ms", "evaluation_interval": "200ms", "scrape_timeout": "150ms"},
            "scrape_configs": scrape_configs,
            "rule_files": [str(p) for p in rule_files],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        log_path = root / "prometheus.log"
        with log_path.open("wb") as log:
            command = [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        p = PrometheusProcess(f"http://127.0.0.1:{port}", process, log_path)
        started.append(p)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited with {process.returncode}:\n{p.log()}")
            try:
                return httpx.get(f"{p.url}/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 30, "prometheus to be ready")
        return p

    yield make
    for p in started:
        p.process.terminate()
        try:
            p.process.wait(15)
        except subprocess.TimeoutExpired:
            p.process.kill()
            p.process.wait()
