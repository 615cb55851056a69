"""The platform's end of the worker template (``runtime/zygote.py``): starts it, asks it for forks, and tracks
the forked workers, which are the template's children, not ours.

A forked worker is watched through a pidfd the template sends with each fork: the pidfd becomes readable when
the process exits, and signals sent through it can never reach a recycled pid. Its exit status comes from the
template, which reaps it; when the template died first, the status is unknown (reported as such).

If the template dies it is started again on the next fork; the workers it forked keep serving (they watch the
platform's lifeline pipe, not the template).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.zygote import receive, send

log = logging.getLogger("paddlefn.template")

STATUS_UNKNOWN = 255  # exit code of a forked worker whose template died before it could say


class TemplateUnavailable(RuntimeError):
    """The template could not be started or could not fork; the pool spawns workers instead."""


class ForkedProcess:
    """What the pool needs of ``asyncio.subprocess.Process``, for a process forked by the template."""

    def __init__(self, pid: int, pidfd: int, template: WorkerTemplate) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._template = template
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(pidfd, self._on_exit)
        self._fallback: asyncio.TimerHandle | None = None

    def _on_exit(self) -> None:
        """The process ended; its status follows from the template (or never, if the template is gone)."""
        self._loop.remove_reader(self._pidfd)
        if self.returncode is None and self._fallback is None:
            delay = 2.0 if self._template.alive else 0.0
            self._fallback = self._loop.call_later(delay, self.set_returncode, STATUS_UNKNOWN)

    def set_returncode(self, code: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = code
        if self._fallback is not None:
            self._fallback.cancel()
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class WorkerTemplate:
    """One template process; ``fork`` starts it when it is not running."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, start_timeout_s: float = 300.0) -> None:
        self._env = dict(env)
        self._log_path = log_path
        self._start_timeout_s = start_timeout_s
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._starting: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}  # reaped before its "forked" reply was handled
        self._ids = 0
        # The lifeline: forked workers exit when its write end (held only by us) closes with this process.
        self._lifeline_r, self._lifeline_w = os.pipe()
        self.info: dict[str, Any] = {}

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None and self._control is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def fork(self, argv: list[str], ready_fd: int, log_fd: int) -> ForkedProcess:
        """A new worker running ``runtime.server`` with ARGV (its ``--ready-fd`` is READY_FD)."""
        return await self._fork({"argv": argv}, [ready_fd, log_fd])

    async def fork_prepare(self, argv: list[str], stdio: tuple[int, int, int]) -> ForkedProcess:
        """``runtime.prepare`` with ARGV on the descriptors STDIO (stdin, stdout, stderr), in its own session."""
        return await self._fork({"module": "runtime.prepare", "argv": argv}, list(stdio))

    async def _fork(self, request: dict[str, Any], fds: list[int]) -> ForkedProcess:
        await self._ensure_started()
        control = self._control
        if control is None:
            raise TemplateUnavailable("the worker template is not running")
        self._ids += 1
        request_id = self._ids
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            send(control, {"op": "fork", "id": request_id, **request}, fds)
            pid, pidfd = await asyncio.wait_for(future, 30)
        except (OSError, TimeoutError) as exc:
            raise TemplateUnavailable(f"the worker template did not fork: {exc!r}") from None
        finally:
            self._pending.pop(request_id, None)
        child = ForkedProcess(pid, pidfd, self)
        self._children[pid] = child
        if (code := self._early_exits.pop(pid, None)) is not None:
            child.set_returncode(code)
        return child

    async def _ensure_started(self) -> None:
        if self.alive:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start(), name="worker-template-start")
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        await self._forget_dead()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        args = [sys.executable, "-m", "runtime.zygote", "--control-fd", str(theirs.fileno()),
                "--lifeline-fd", str(self._lifeline_r), "--parent-pid", str(os.getpid())]  # fmt: skip
        with self._log_path.open("ab") as log_file:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *args, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(theirs.fileno(), self._lifeline_r), env=self._env,
                )  # fmt: skip
            finally:
                theirs.close()
        self._control = ours
        loop.add_reader(ours.fileno(), self._on_message)
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self._ready), self._start_timeout_s)
        except (TimeoutError, TemplateUnavailable) as exc:
            await self.close()
            raise TemplateUnavailable(f"the worker template did not start: {exc}") from None
        log.info("worker template (pid %d) ready: imports took %.2f s", self._process.pid,
                 self.info.get("import_seconds", 0.0))  # fmt: skip

    def _on_message(self) -> None:
        control = self._control
        if control is None:
            return
        try:
            message, fds = receive(control, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            message, fds = None, []
        if message is None:
            self._lost("the worker template exited")
            return
        op = message.get("op")
        if op == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(message)
        elif op == "forked":
            future = self._pending.get(int(message.get("id", -1)))  # type: ignore[call-overload]
            if "pid" in message and fds:
                pid = int(message["pid"])  # type: ignore[call-overload]
                if future is not None and not future.done():
                    future.set_result((pid, fds[0]))
                    return
                os.close(fds[0])  # nobody waits for it any more: the child exits with its ready pipe unread
            elif future is not None and not future.done():
                future.set_exception(OSError(str(message.get("error", "fork failed"))))
        elif op == "exited":
            pid, code = int(message["pid"]), int(message["code"])  # type: ignore[call-overload]
            child = self._children.pop(pid, None)
            if child is not None:
                child.set_returncode(code)
            else:
                self._early_exits[pid] = code
        for fd in fds[1:] if op == "forked" else fds:
            os.close(fd)

    def _lost(self, why: str) -> None:
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(control.fileno())
            control.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(OSError(why))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(TemplateUnavailable(why))
        # Children still running report their end through their pidfds, without a status.
        for child in self._children.values():
            if child._fallback is not None:
                child._fallback.cancel()
                child.set_returncode(STATUS_UNKNOWN)
        self._children.clear()
        log.warning("%s; the next worker start starts it again", why)

    async def _forget_dead(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
            self._process = None
        self._early_exits.clear()

    async def close(self) -> None:
        """Stop the template (workers it forked are stopped by their pool, or exit with the lifeline)."""
        if self._control is not None:
            self._lost("the worker template was stopped")
        await self._forget_dead()

    def close_lifeline(self) -> None:
        """Let every forked worker exit (used when the platform shuts down)."""
        for fd in (self._lifeline_w, self._lifeline_r):
            with contextlib.suppress(OSError):
                os.close(fd)
