"""The Paddle Lite engine: a ``runtime.engine.Engine`` whose model runs in a host process (Lite interpreter).

The host (``runtime/lite/host.py``) is a child process on two pipes; tensors cross them as raw bytes (see
the framing in host.py). A child process rather than an in-process library because Lite's only working x86
build is for CPython 3.7, and because a Lite crash then costs one request, not the worker: the next request
starts a new host.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine import EngineError
from runtime.lite import HOST, lite_python, unavailable_reason
from runtime.lite.host import FRAME
from runtime.protocol import InvalidRequest
from runtime.spec import Manifest

START_TIMEOUT_S = 60.0
INFER_TIMEOUT_S = 120.0


class LiteUnavailable(InvalidRequest):
    """No Lite interpreter here, or the model has no usable ``.nb`` (a load asking for Lite gets a 400 that
    says why, not a 500)."""


class LiteHost:
    """One host process serving one ``.nb``; blocking, single-threaded (like every engine)."""

    def __init__(
        self, nb: Path, *, python: Path | None = None, infer_timeout_s: float = INFER_TIMEOUT_S
    ) -> None:
        python = python or lite_python()
        if python is None:
            raise LiteUnavailable(unavailable_reason())
        self.nb = nb
        self.python = python
        self.infer_timeout_s = infer_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.start()

    def start(self) -> None:
        # stderr goes to ours (the worker's log): Lite reports its own failures there.
        self.proc = subprocess.Popen(
            [str(self.python), str(HOST), str(self.nb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"GLOG_minloglevel": "2", **os.environ},  # quiet glog unless asked
        )
        try:
            header, _ = self._read(START_TIMEOUT_S)
        except EngineError as exc:  # died or hung while loading: Lite cannot serve this .nb here
            raise LiteUnavailable(f"the Paddle Lite host did not start: {exc}") from None
        if not header.get("ok"):
            self._stop()
            raise LiteUnavailable(str(header.get("error", "the Lite host did not start")))
        self.info = header

    def infer(self, inputs: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float]:
        """Outputs in the order of the model's outputs, and Lite's own compute time in ms."""
        if self.proc is None or self.proc.poll() is not None:
            self._stop()  # the last host died (crash or kill): close its pipes; a new one serves this request
            self.start()
        arrays = [(n, np.ascontiguousarray(a)) for n, a in inputs.items()]
        header = {
            "op": "infer",
            "inputs": [
                {"name": n, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": a.nbytes}
                for n, a in arrays
            ],
        }
        self._write(header, b"".join(a.tobytes() for _, a in arrays))
        reply, payload = self._read(self.infer_timeout_s)
        if not reply.get("ok"):
            raise EngineError(str(reply.get("error", "Paddle Lite failed")))
        outputs, offset = [], 0
        for out in reply["outputs"]:
            dtype = np.dtype(out["dtype"])
            count = int(np.prod(out["shape"], dtype=np.int64))
            outputs.append(np.frombuffer(payload, dtype, count, offset).reshape(out["shape"]).copy())
            offset += int(out["nbytes"])
        return outputs, float(reply.get("compute_ms", 0.0))

    def close(self) -> None:
        self._stop()

    def _write(self, header: dict[str, Any], payload: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        data = json.dumps(header).encode()
        try:
            self.proc.stdin.write(FRAME.pack(len(data), len(payload)) + data + payload)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise EngineError(self._death("while sending the request")) from None

    def _read(self, timeout_s: float) -> tuple[dict[str, Any], bytes]:
        deadline = time.monotonic() + timeout_s
        head = self._read_exact(FRAME.size, deadline, timeout_s)
        json_len, payload_len = FRAME.unpack(head)
        header = json.loads(self._read_exact(json_len, deadline, timeout_s))
        return header, self._read_exact(payload_len, deadline, timeout_s) if payload_len else b""

    def _read_exact(self, n: int, deadline: float, timeout_s: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks: list[bytes] = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._stop(kill=True)  # a hung host would block every later request: end it now
                raise EngineError(f"Paddle Lite did not answer within {timeout_s:g} s")
            chunk = os.read(fd, n)
            if not chunk:
                raise EngineError(self._death("before answering"))
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _death(self, when: str) -> str:
        code = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(5)
        self._stop()
        how = f"status {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = signal.Signals(-code).name  # e.g. SIGSEGV: Lite crashed
        return f"the Paddle Lite host exited ({how}) {when}; the next request starts a new one"

    def _stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if stream:
                    stream.close()  # stdin EOF is the host's signal to exit
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class PaddleLiteEngine:
    """Serves a prepared model's ``.nb`` (``manifest.lite["nb"]``); billed as device class ``lite``."""

    name = "paddle-lite"
    device = "lite"

    def __init__(self, model_dir: Path, manifest: Manifest, *, python: Path | None = None) -> None:
        lite = manifest.lite or {}
        if not lite.get("available") or not lite.get("nb"):
            reason = lite.get("reason") or "deploy did not convert it"
            raise LiteUnavailable(f"this model has no Paddle Lite version: {reason}")
        self.spec = manifest.spec
        self._host = LiteHost(Path(model_dir) / str(lite["nb"]), python=python)
        self.lite_version = str(self._host.info.get("lite_version", ""))
        inputs, outputs = self._host.info.get("inputs", []), self._host.info.get("outputs", [])
        declared = [t.name for t in self.spec.inputs]
        if sorted(inputs) != sorted(declared) or len(outputs) != len(self.spec.outputs):
            self.close()
            raise LiteUnavailable(
                f"the .nb takes {inputs} and gives {len(outputs)} outputs; the manifest declares {declared} "
                f"and {len(self.spec.outputs)} outputs: deploy the model again"
            )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs, _ = self._host.infer(inputs)
        # Lite keeps the program's fetch order, which is the spec's order: name outputs as clients know them.
        return {t.name: a for t, a in zip(self.spec.outputs, outputs, strict=True)}

    def close(self) -> None:
        self._host.close()
