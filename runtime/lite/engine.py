"""The Paddle Lite engine: a ``runtime.engine.Engine`` whose model runs in a host process (Lite interpreter).

The host (``runtime/lite/host.py``) is a child process on two pipes; tensors cross them as raw bytes (see
the framing in host.py). A child process rather than an in-process library because Lite's only working x86
build is for CPython 3.7, and because a Lite crash then costs one request, not the worker: the next request
starts a new host.

Starting a host (CPython 3.7, ``import numpy, paddlelite``) costs ~150 ms, five times Lite's own predictor creation
and first run. So a pre-warmed Lite worker starts a ``SpareHost`` while it waits in the pool, before it is given a
model and before it is confined; ``LiteHost(nb, spare=...)`` hands that spare the ``.nb`` once the worker has
confined itself, and the spare takes on the worker's confinement before it reads anything (host.py,
``confine_like_parent``). Why a spare process per worker and not a fork server of 3.7 hosts: a host forked from a
shared template would be the template's child, not the worker's, so it could not simply inherit (or be checked
against) its worker's namespaces and limits, and the template, root and holding the pipes of every tenant's host,
would be one more privileged process to guard; a spare is the worker's own child from the start, costs one
process per idle Lite worker (its memory is what a warm worker costs anyway), and dies with it.

A spare that died meanwhile, or cannot take on the confinement (a mount namespace cannot be joined by a
multi-threaded process, say), is replaced by a host started as before: by the worker, after it was confined, so
that host inherits the confinement (as does every host started later to replace a crashed one).
"""

from __future__ import annotations

import contextlib
import json
import logging
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

log = logging.getLogger("paddlefn.runtime.lite")


def _host_process(python: Path, *args: str) -> subprocess.Popen[bytes]:
    # stderr goes to ours (the worker's log): Lite reports its own failures there.
    return subprocess.Popen(
        [str(python), str(HOST), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # Quiet glog unless asked. One BLAS thread: numpy (only used here to move bytes) must not start a thread
        # pool at import, as a spare has to be single-threaded to join its worker's mount namespace.
        env={"GLOG_minloglevel": "2", "OPENBLAS_NUM_THREADS": "1", **os.environ},
    )


class LiteUnavailable(InvalidRequest):
    """No Lite interpreter here, or the model has no usable ``.nb`` (a load asking for Lite gets a 400 that
    says why, not a 500)."""


class _HostPipes:
    """A host process and its two pipes: framing, deadlines, and what its death looks like."""

    proc: subprocess.Popen[bytes] | None
    infer_timeout_s: float

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


class SpareHost(_HostPipes):
    """A host started before its model is known (``host.py --wait``): Lite imported, waiting for one ``.nb``.

    Start it from a thread that lives as long as the worker (the host dies with the thread that started it, see
    host.py) and, in a worker that will confine itself, from the thread that confines it (a Linux namespace
    belongs to a thread): in the runtime server, both are its main thread."""

    def __init__(self, *, python: Path | None = None) -> None:
        python = python or lite_python()
        if python is None:
            raise LiteUnavailable(unavailable_reason())
        self.python = python
        self.infer_timeout_s = START_TIMEOUT_S
        self.proc = _host_process(python, "--wait")
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the spare has imported Lite; its message (``start_ms``, ``lite_version``). Raises
        LiteUnavailable when it could not."""
        try:
            header, _ = self._read(timeout_s)
        except EngineError as exc:
            raise LiteUnavailable(f"the spare Paddle Lite host did not start: {exc}") from None
        if not header.get("waiting"):
            self.close()
            raise LiteUnavailable(str(header.get("error", "the spare Lite host did not start")))
        self.info = header
        return header

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def take(self) -> subprocess.Popen[bytes] | None:
        """The process, for a LiteHost to adopt (once); None when it is gone."""
        proc, self.proc = self.proc, None
        return proc

    def close(self) -> None:
        self._stop()


class LiteHost(_HostPipes):
    """One host process serving one ``.nb``; blocking, single-threaded (like every engine).

    With SPARE (a ``SpareHost`` that has waited ready), that process is given the model instead of a new one
    being started; ``prestarted`` says whether it took it."""

    def __init__(
        self,
        nb: Path,
        *,
        python: Path | None = None,
        infer_timeout_s: float = INFER_TIMEOUT_S,
        spare: SpareHost | None = None,
    ) -> None:
        python = python or (spare.python if spare is not None else None) or lite_python()
        if python is None:
            raise LiteUnavailable(unavailable_reason())
        self.nb = nb
        self.python = python
        self.infer_timeout_s = infer_timeout_s
        self.proc = None
        self.info: dict[str, Any] = {}
        self.prestarted = spare is not None and self._adopt(spare)
        if not self.prestarted:
            self.start()

    def _adopt(self, spare: SpareHost) -> bool:
        """Give the spare our .nb; False (the spare is gone) when a new host must be started instead."""
        self.proc = spare.take()
        if self.proc is None or self.proc.poll() is not None:
            log.warning("the spare Paddle Lite host had exited: starting a new one")
            self._stop()
            return False
        env = {k: os.environ[k] for k in ("HOME", "TMPDIR") if k in os.environ}
        try:
            self._write({"op": "load", "nb": str(self.nb), "env": env}, b"")
            header, _ = self._read(START_TIMEOUT_S)
        except EngineError as exc:
            header = {"ok": False, "error": str(exc)}
        if header.get("ok"):
            self.info = header
            return True
        self._stop()
        if header.get("stage") == "load":  # the host was confined and Lite itself refused the model
            raise LiteUnavailable(str(header.get("error", "the Lite host could not load the model")))
        log.warning("the spare Paddle Lite host could not take the model (%s): starting a new one",
                    header.get("error"))  # fmt: skip
        return False

    def start(self) -> None:
        self.proc = _host_process(self.python, str(self.nb))
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


class PaddleLiteEngine:
    """Serves a prepared model's ``.nb`` (``manifest.lite["nb"]``); billed as device class ``lite``."""

    name = "paddle-lite"
    device = "lite"

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        *,
        python: Path | None = None,
        spare: SpareHost | None = None,
    ) -> None:
        lite = manifest.lite or {}
        if not lite.get("available") or not lite.get("nb"):
            if spare is not None:
                spare.close()
            reason = lite.get("reason") or "deploy did not convert it"
            raise LiteUnavailable(f"this model has no Paddle Lite version: {reason}")
        self.spec = manifest.spec
        self._host = LiteHost(Path(model_dir) / str(lite["nb"]), python=python, spare=spare)
        self.host_prestarted = (
            self._host.prestarted
        )  # the worker's spare took the model (a faster cold start)
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
