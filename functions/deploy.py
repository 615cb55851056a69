"""The deploy pipeline's slow half: prepare an unpacked model in its own process (``runtime.prepare``).

The fast half (safe unpack, format detection) runs while the upload request is still open, so a bad archive is
a 400 at once; this half (optimisation, golden check) runs in the background and ends in ``ready`` or ``failed``
with a reason. A crash or hang inside Paddle ends the subprocess, never the platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from functions.backends.pool import Process, worker_env
from functions.backends.template import TemplateUnavailable, WorkerTemplate
from functions.settings import Settings
from runtime.spec import Manifest

log = logging.getLogger("paddlefn.deploy")


class DeployFailed(Exception):
    """The model cannot be served; the message is the reason shown on the function."""


async def prepare_model(
    settings: Settings,
    model_dir: Path,
    out: Path,
    *,
    device: str,
    batching: bool,
    on_stage: Callable[[str], None] = lambda stage: None,
    confine: dict[str, Any] | None = None,
    template: WorkerTemplate | None = None,
) -> Manifest:
    """Run ``runtime.prepare`` in its own process; ON_STAGE hears each stage it reports as it begins.
    A failure's reason names files relative to the function's folder, never the host's paths.

    CONFINE (``{"data_dir", "uid", ...}``, see ``runtime.prepare --confine``) confines it as the tenant's user to
    the function's own folder before it reads the program: optimising and golden-checking run the tenant's
    program, so they get no more rights than its serving workers.

    TEMPLATE: fork the process from the worker template (Paddle already imported: the ~2 s of a Python start
    and ``import paddle`` are saved on every deploy); without one, or when it cannot fork, it is spawned."""
    args = [str(model_dir), str(out), "--device", device]
    if batching:
        args.append("--batching")
    if confine:
        args += ["--confine", json.dumps(confine)]
    process, stdout_reader, stderr_reader, close_streams = await _start(settings, args, template)
    try:
        stdout, stderr = await asyncio.wait_for(
            _communicate(process, stdout_reader, stderr_reader, on_stage), settings.deploy_timeout_s
        )
    except TimeoutError:
        _kill_group(process)
        await process.wait()
        raise DeployFailed(
            f"preparing the model took longer than {settings.deploy_timeout_s:g} s (optimisation and golden "
            "check) and was stopped; a program that never ends (a while loop whose condition stays true) does this"
        ) from None
    except asyncio.CancelledError:  # the function (or its tenant) was deleted meanwhile
        _kill_group(process)
        raise
    finally:
        close_streams()
    result = _last_json_line(stdout)
    if process.returncode == -signal.SIGXCPU and confine and confine.get("cpu_seconds"):
        raise DeployFailed(
            f"preparing the model used more than its {confine['cpu_seconds']} s of CPU time and was stopped; "
            "a program that never ends (a while loop whose condition stays true) does this"
        )
    if process.returncode and process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise DeployFailed(
            f"Paddle crashed ({name}) while loading or optimising the model; it may use an operator this "
            f"Paddle {device.upper()} build cannot run. Last message: {tail[0][:300]}"
        )
    if result is None:
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise DeployFailed(
            f"preparing the model failed (status {process.returncode}): {' | '.join(tail)[:500]}"
        )
    if "error" in result:
        raise DeployFailed(str(result["error"]))
    return Manifest.load(out)


_OUTPUT_LIMIT = 16 * 1024 * 1024  # the last line is the whole manifest


Started = tuple[Process, asyncio.StreamReader, asyncio.StreamReader, Callable[[], object]]
"""The process, readers of its stdout and stderr, and what closes them once it is done."""


async def _start(settings: Settings, args: list[str], template: WorkerTemplate | None) -> Started:
    """The preparation process and readers of its stdout and stderr; it runs in a session of its own, so that
    a kill of its process group reaches whatever it started too (the Lite converter)."""
    if template is not None:
        try:
            return await _fork(template, args)
        except TemplateUnavailable as exc:
            log.warning("%s; spawning the preparation instead", exc)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime.prepare", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=worker_env(settings), limit=_OUTPUT_LIMIT, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    return process, process.stdout, process.stderr, lambda: None


async def _fork(template: WorkerTemplate, args: list[str]) -> Started:
    # Its stdout and stderr are Unix stream sockets, read as asyncio streams. Not pipes through
    # connect_read_pipe: under uvloop (uvicorn's loop) the pipe transport closes the descriptor itself and
    # the file object wrapping it closes it again, which closed other connections' sockets under load.
    out, out_child = socket.socketpair()
    err, err_child = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        process = await template.fork_prepare(args, (null, out_child.fileno(), err_child.fileno()))
    except BaseException:
        out.close()
        err.close()
        raise
    finally:
        os.close(null)
        out_child.close()
        err_child.close()
    streams = [await asyncio.open_unix_connection(sock=sock, limit=_OUTPUT_LIMIT) for sock in (out, err)]

    def close() -> None:
        for _, writer in streams:
            writer.close()

    return process, streams[0][0], streams[1][0], close


def _kill_group(process: Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _communicate(
    process: Process,
    stdout: asyncio.StreamReader,
    stderr: asyncio.StreamReader,
    on_stage: Callable[[str], None],
) -> tuple[bytes, bytes]:
    """Like ``communicate()``, but passes stage lines (``{"stage": ...}``) on as they arrive."""
    errors = asyncio.ensure_future(stderr.read())
    lines = []
    try:
        async for line in stdout:
            lines.append(line)
            stage = _stage_of(line)
            if stage:
                on_stage(stage)
        await process.wait()
        return b"".join(lines), await errors
    finally:
        errors.cancel()


def _stage_of(line: bytes) -> str | None:
    if not line.startswith(b'{"stage"'):
        return None
    with contextlib.suppress(ValueError):
        parsed = json.loads(line)
        if isinstance(parsed, dict) and isinstance(parsed.get("stage"), str) and len(parsed) == 1:
            return parsed["stage"]
    return None


def _last_json_line(stdout: bytes) -> dict[str, object] | None:
    """The result: the last JSON line that is not a stage report."""
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and _stage_of(line.encode()) is None:
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    return parsed
    return None
