"""Helpers shared by the Paddle Lite tests (tests/test_lite_*.py): skip marker, deploy-time prepare, processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from runtime.lite import unavailable_reason

REPO = Path(__file__).resolve().parents[1]

needs_lite = pytest.mark.skipif(
    bool(unavailable_reason()),
    reason=f"Paddle Lite is not set up here ({unavailable_reason()}); `make setup` builds .venv-lite",
)


def prepare(src: Path, out: Path, **env: str) -> dict:
    """Run deploy's prepare step in its own process, as the platform does; return the manifest."""
    result = subprocess.run(
        [sys.executable, "-m", "runtime.prepare", str(src), str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "GLOG_minloglevel": "2", **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextmanager
def process(
    args: list[str], log: Path, ready_url: str, timeout: float = 60
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ARGS (a Python module) and wait until READY_URL answers 200; always stop it afterwards."""
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, *args], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{args} not ready after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
