"""The worker template ("zygote"): imports Paddle once, then forks workers on request in a few milliseconds.

A spawned worker pays a Python start and ``import paddle`` (~2 s of CPU, ~133 MB private memory each). This
process pays them once, freezes its heap (``gc.freeze``: the collector then never writes to the template's
objects, so their pages stay shared with every child) and waits on a control socket. Each fork becomes a
worker exactly as ``runtime.server --uds ...`` would after its imports: it brings its device up, binds its
socket, says it is ready on its own ready pipe and waits for a model (which it confines itself for, as
spawned workers do: ``runtime.server.Worker._confine``). The SOCK paper's zygotes, OpenWhisk's stem cells and
Android's zygote are the same idea.

Why forking this process is safe, item by item:
- **Threads.** Only the calling thread survives a fork, so a lock held by another thread would stay locked in
  the child forever. The template has one thread: numpy's OpenBLAS would start a pool, but the platform runs
  us with ``OPENBLAS_NUM_THREADS=1`` and ``OMP_NUM_THREADS`` of the workers, and ``import paddle`` starts none
  (checked on Paddle 3.3). ``_threads()`` is checked before every fork; a template with more refuses to fork
  (the platform then spawns) instead of handing out a child that may deadlock.
- **Device.** No CUDA call is made here (no ``paddle.set_device("gpu")``, no device count): a process must not
  fork after CUDA is initialised. Each child brings the device up itself, while it waits in the pool.
- **Sockets and files.** The template holds only its control socket, its SIGCHLD wake-up pipe and the
  lifeline's read end. The child closes the first two before anything else. Each fork request brings the
  child's own ready pipe and log file (as SCM_RIGHTS descriptors); the template closes its copies right after
  the fork, so no worker ever holds another worker's descriptors.
- **Lifetime.** The template dies with the platform (PR_SET_PDEATHSIG). Workers do not die with the template
  (a restarted template must not take running functions down): each watches the lifeline pipe, whose write end
  only the platform holds, and exits when it reads end-of-file, i.e. when the platform is gone.

Control protocol (SOCK_SEQPACKET, one JSON object per message):
- template -> platform, once: ``{"op": "ready", "pid", "threads", "import_seconds"}``
- platform -> template: ``{"op": "fork", "id", "argv"}`` + descriptors [ready pipe write end, log file]: a worker
  (``runtime.server``); or ``{"op": "fork", "id", "module": "runtime.prepare", "argv"}`` + [stdin, stdout,
  stderr]: a deploy's preparation, in a session of its own (so that a kill reaches what it starts too)
- template -> platform: ``{"op": "forked", "id", "pid"}`` + a pidfd of the child (signals can then never reach
  a recycled pid), or ``{"op": "forked", "id", "error"}``
- template -> platform: ``{"op": "exited", "pid", "code"}`` when it reaps a child (code as Popen.returncode)
"""

from __future__ import annotations

import argparse
import array
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import time
import traceback

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def send(sock: socket.socket, message: dict[str, object], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(message).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def receive(sock: socket.socket, flags: int = 0) -> tuple[dict[str, object] | None, list[int]]:
    """One message and the descriptors it carried; (None, []) when the other end closed."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS, flags)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


def _import_everything() -> None:
    """What every worker needs, imported (and first-called) once here, before any fork."""
    import numpy  # noqa: F401
    import paddle
    import paddle.inference
    import starlette.applications  # noqa: F401
    import uvicorn
    import uvicorn.lifespan.on
    import uvicorn.loops.auto
    import uvicorn.protocols.http.h11_impl
    import uvicorn.protocols.http.httptools_impl  # noqa: F401

    import runtime.engine
    import runtime.lite.engine
    import runtime.prepare
    import runtime.server

    paddle.set_device("cpu")  # a CPU-only call: no device context exists until a child asks for one
    runtime.server._warm_protocol()


MODULES = ("runtime.server", "runtime.prepare")  # what a fork may run; nothing else is imported on request


def _become(
    control: socket.socket,
    wake: tuple[int, int],
    lifeline_fd: int,
    module: str,
    argv: list[str],
    fds: list[int],
) -> None:
    """In the child: drop what belongs to the template, then run MODULE as its own process would. Never
    returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        control.close()
        for fd in wake:
            os.close(fd)
        _name_process(b"pfn-prepare" if module == "runtime.prepare" else b"pfn-worker")
        _only_own_descriptors(fds, lifeline_fd)
        if module == "runtime.prepare":
            os.setsid()  # its own process group: a timeout kills the Lite converter it starts as well
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.close(lifeline_fd)  # a preparation ends with its deploy's timeout, not with a lifeline
            import runtime.prepare

            code = runtime.prepare.main(argv)
            return
        ready_fd, log_fd = fds
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        import runtime.server

        code = 0
        runtime.server.main([*argv, "--ready-fd", str(ready_fd), "--lifeline-fd", str(lifeline_fd)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # whatever happens, the child must never return into the template
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # exiting anyway
                stream.flush()
        os._exit(code)


def _only_own_descriptors(fds: list[int], lifeline_fd: int) -> None:
    """Leave the child only its own descriptors. Libraries imported by the template keep copies of its stdio
    (duplicates of fds 0-2, opened at import): re-pointed at the child's own stdio (its last fd: the log, or the
    preparation's stderr), so that one worker never writes into the template's log or holds its file. Anything
    else the template had open is closed."""
    own = fds[-1]
    stdio = {}
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            info = os.fstat(fd)
            stdio[(info.st_dev, info.st_ino)] = fd
    keep = {0, 1, 2, lifeline_fd, *fds}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            info = os.fstat(fd)
        except OSError:
            continue  # the descriptor of the listing itself, already closed
        if (info.st_dev, info.st_ino) in stdio:
            os.dup2(own, fd)
        else:
            os.close(fd)


def _name_process(name: bytes) -> None:
    """What ``ps -o comm`` and ``/proc/<pid>/comm`` show: a fork keeps the template's command line."""
    import ctypes

    pr_set_name = 15
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_name, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _fork(
    control: socket.socket,
    wake: tuple[int, int],
    lifeline_fd: int,
    request: dict[str, object],
    fds: list[int],
) -> None:
    request_id = request.get("id")
    argv = request.get("argv")
    module = request.get("module", "runtime.server")
    try:
        if (
            module not in MODULES
            or len(fds) != (2 if module == "runtime.server" else 3)
            or not isinstance(argv, list)
            or not all(isinstance(a, str) for a in argv)
        ):
            send(control, {"op": "forked", "id": request_id, "error": "bad fork request"})
            return
        if (threads := _threads()) != 1:
            send(control, {"op": "forked", "id": request_id,
                           "error": f"the template has {threads} threads; forking it could deadlock"})  # fmt: skip
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become(control, wake, lifeline_fd, str(module), argv, fds)
        pidfd = os.pidfd_open(pid)  # before any reaping: the pid cannot have been recycled yet
        try:
            send(control, {"op": "forked", "id": request_id, "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)
    finally:
        for fd in fds:
            os.close(fd)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send(control, {"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def serve(control: socket.socket, lifeline_fd: int) -> int:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler (not SIG_IGN) so that children stay reapable
    while True:
        readable, _, _ = select.select([control.fileno(), wake_r, lifeline_fd], [], [])
        if lifeline_fd in readable:
            return 0  # the platform is gone
        if wake_r in readable:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            _reap(control)
        if control.fileno() in readable:
            request, fds = receive(control)
            if request is None:
                return 0  # the platform closed its end
            if request.get("op") == "fork":
                _fork(control, (wake_r, wake_w), lifeline_fd, request, fds)
            else:
                for fd in fds:
                    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.zygote", description=__doc__.split("\n")[0])
    p.add_argument("--control-fd", type=int, required=True, help="SOCK_SEQPACKET socket to the platform")
    p.add_argument("--lifeline-fd", type=int, required=True, help="read end of the platform's lifeline pipe")
    p.add_argument("--parent-pid", type=int, required=True, help="exit when this process dies")
    args = p.parse_args(argv)
    from runtime.server import _die_with_parent

    _die_with_parent(args.parent_pid)
    control = socket.socket(fileno=args.control_fd)
    started = time.perf_counter()
    _import_everything()
    gc.collect()
    gc.freeze()  # from here on the collector leaves the template's objects (and their pages) alone
    send(control, {"op": "ready", "pid": os.getpid(), "threads": _threads(),
                   "import_seconds": round(time.perf_counter() - started, 3)})  # fmt: skip
    return serve(control, args.lifeline_fd)


if __name__ == "__main__":
    sys.exit(main())
