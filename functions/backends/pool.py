"""Worker processes and the pool of pre-warmed ones (as OpenWhisk stem cells or Fission's pool manager).

A worker is started with Paddle imported and its device up, then waits unassigned; taking one from the pool and
loading a model into it is the whole cold start. A worker serves one function for its life and is never reused:
sleeping ends the process, which is the only way Paddle gives back (GPU) memory.

Workers are forked from the worker template (``functions/backends/template.py``, ``runtime/zygote.py``) in a few
milliseconds and share its pages; ``worker_start="spawn"`` (or a template that cannot start) starts each as its
own Python process instead. How many may be warm at once is a memory budget divided by the measured PSS of a
worker (``functions/backends/memory.py``), unless ``max_workers`` says a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx

from functions.backends.memory import (
    INITIAL_WORKER_MB,
    MemoryState,
    default_budget_mb,
    machine_memory_mb,
    pss_mb,
    warm_capacity,
)
from functions.backends.template import TemplateUnavailable, WorkerTemplate
from functions.settings import Settings

log = logging.getLogger("paddlefn.pool")

# Only these reach a worker: tenants' models must not see the platform's secrets (admin key, database URL).
_PASSED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "PYTHONPATH",
)
_PASSED_PREFIXES = ("NVIDIA_", "FLAGS_")

# A taken worker's replacement starts once it has answered its first request (the one that woke it), or this long
# after its load when none comes: a new worker starting (Python, Paddle or the Lite host) competes for the CPU
# with that first request, which on 2 cores made a Lite cold start 30-60 ms slower (bench/RESULTS.md, 2026-12-01).
REFILL_AFTER_LOAD_S = 1.0


class NoCapacity(Exception):
    """Every worker slot is taken; the backend may put an idle function to sleep to make room."""


class WorkerStartError(RuntimeError):
    pass


class WorkerTimeout(Exception):
    """The worker did not answer within the request's time limit."""


class WorkerGone(Exception):
    """The connection to the worker broke: it died (or was killed) while handling the request."""


class WorkerUnreachable(Exception):
    """The platform could not open a connection to a worker for a reason of its own (e.g. it is out of file
    descriptors); the worker itself is not known to be at fault."""

    def __init__(self, os_error: OSError) -> None:
        self.os_error = os_error
        if os_error.errno in (errno.EMFILE, errno.ENFILE):
            reason = f"the platform is out of file descriptors ({os_error.strerror})"
        else:
            reason = (
                f"connecting to its socket failed on the platform's side ({os_error.strerror or os_error})"
            )
        super().__init__(reason)


# What connecting to a worker's Unix socket fails with when the worker is not there to accept: it exited (the
# socket file left behind refuses) or its socket is gone. Any other error (EMFILE above all) is the platform's.
_WORKER_DOWN = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.EPIPE})


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _PASSED_ENV or k.startswith(_PASSED_PREFIXES)}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "GLOG_minloglevel": "2",
            "OMP_NUM_THREADS": str(settings.cpu_threads),
            # numpy's BLAS would start a thread pool at import; the template must have one thread to fork
            # safely (runtime/zygote.py), and numpy only decodes and encodes tensors here.
            "OPENBLAS_NUM_THREADS": "1",
        }
    )
    return env


class Process(Protocol):
    """A worker's process: spawned (``asyncio.subprocess.Process``) or forked (``template.ForkedProcess``)."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class WorkerProcess:
    def __init__(self, wid: int, process: Process, uds: Path, log_path: Path) -> None:
        self.id = wid
        self.process = process
        self.uds = uds
        self.log_path = log_path
        self.started_at = time.monotonic()
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(uds)),
            base_url="http://worker",
            timeout=httpx.Timeout(60.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        # The request path uses aiohttp: one round trip over the Unix socket costs ~0.45 ms against ~0.95 ms with
        # httpx's async client (measured here with the mlp model); httpx stays for the rare control calls.
        # Idle connections are closed here (30 s) well before the worker would close them (KEEP_ALIVE_S in
        # runtime/server.py): a request never goes out on a connection the worker is closing.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(uds), limit=0, keepalive_timeout=30),
            auto_decompress=False,
        )
        self.stopping = False
        self.loaded = False  # serves a model (its PSS then says what a warm function costs)
        # Set by the pool when it hands this worker out: start its replacement (see REFILL_AFTER_LOAD_S).
        self.after_load: Callable[[], None] | None = None
        self._refill_timer: asyncio.TimerHandle | None = None

    def _replace(self) -> None:
        """Start this worker's replacement now (once)."""
        callback, self.after_load = self.after_load, None
        if self._refill_timer is not None:
            self._refill_timer.cancel()
            self._refill_timer = None
        if callback is not None:
            callback()

    def _loaded(self) -> None:
        """The model is loaded: the replacement starts after the first request, or REFILL_AFTER_LOAD_S from now."""
        if self.after_load is not None and self._refill_timer is None:
            self._refill_timer = asyncio.get_running_loop().call_later(REFILL_AFTER_LOAD_S, self._replace)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def load(self, name: str, parameters: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            response = await self.client.post(
                f"/v2/repository/models/{name}/load", json={"parameters": parameters}, timeout=timeout
            )
        except httpx.TimeoutException:
            self._replace()
            raise WorkerStartError(f"loading the model took longer than {timeout:g} s") from None
        except httpx.TransportError:
            self._replace()
            raise WorkerStartError(f"the worker died while loading the model: {self.exit_reason()}") from None
        except BaseException:
            self._replace()
            raise
        if response.status_code != 200:
            self._replace()
            raise WorkerStartError(_error_text(response))
        self._loaded()
        result: dict[str, Any] = response.json()
        self.loaded = True
        return result

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One inference request: (status, body, headers); WorkerTimeout, WorkerGone or WorkerUnreachable when
        it fails."""
        try:
            return await self._post(path, body, headers, timeout)
        finally:
            if self.after_load is not None:  # the first request is done: the pool may refill now
                self._replace()

    async def _post(
        self, path: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        try:
            async with self.session.post(
                f"http://worker{path}",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                return response.status, await response.read(), response.headers
        except TimeoutError:
            raise WorkerTimeout from None
        except aiohttp.ClientConnectorError as exc:
            if exc.os_error.errno in _WORKER_DOWN:
                raise WorkerGone from None
            raise WorkerUnreachable(exc.os_error) from exc
        except aiohttp.ClientError:
            raise WorkerGone from None
        except RuntimeError:  # "Session is closed": the worker exited between taking the slot and sending
            if self.session.closed:
                raise WorkerGone from None
            raise

    def kill(self) -> None:
        """SIGKILL, at once (a worker that overran its request's time limit); its watcher cleans up."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def stop(self, grace: float = 5.0) -> None:
        self.stopping = True
        self._replace()  # its replacement is owed now, whether it was loaded or not
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        await self.client.aclose()
        await self.session.close()
        with contextlib.suppress(FileNotFoundError):
            self.uds.unlink()

    def exit_reason(self) -> str:
        code = self.process.returncode
        if code is None:
            return "still running"
        if code < 0:
            name = signal.Signals(-code).name
            why = " (out of memory?)" if name == "SIGKILL" else ""
            text = f"killed by {name}{why}"
        else:
            text = f"exited with status {code}"
        tail = self.log_tail()
        return f"{text}; last log line: {tail}" if tail else text

    def log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:300]


class WorkerPool:
    """Starts workers, keeps ``size`` of them warm and unassigned, and never exceeds ``capacity``.

    ENGINE "paddle": workers import Paddle and bring the device up before they are taken. ENGINE "lite": workers
    for Paddle Lite (``--engine lite``: no Paddle import, CPU only), in a pool of their own (``lite_workers``,
    ``lite_pool_size``), empty until some function uses Lite (``activate``).
    """

    def __init__(
        self,
        settings: Settings,
        on_exit: Callable[[WorkerProcess], None],
        *,
        engine: str = "paddle",
        template: WorkerTemplate | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.template = template
        budget = settings.memory_budget_mb or default_budget_mb(machine_memory_mb())
        self.memory = MemoryState(budget_mb=budget, template_mb=0.0, worker_mb=INITIAL_WORKER_MB, used_mb=0.0)
        if engine == "lite":
            self.size = 0
        else:
            self.size = min(settings.pool_size, self.capacity)
        self._on_exit = on_exit
        self._ids = itertools.count(1)
        self.idle: deque[WorkerProcess] = deque()
        self.live: set[WorkerProcess] = set()
        self._created: weakref.WeakSet[WorkerProcess] = (
            weakref.WeakSet()
        )  # to close every HTTP session at the end
        self.spawning = 0
        self._refilling = 0
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.changed = asyncio.Event()  # set whenever a worker exits or joins the pool (one may be had)
        # Unix socket paths are limited to ~100 bytes, so sockets live in a short temporary folder.
        self._run_dir = Path(tempfile.mkdtemp(prefix="pfn-"))
        self._log_dir = settings.data_dir / "logs"
        self._log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def capacity(self) -> int:
        """Most workers at once: ``max_workers`` (``lite_workers``) when set, else what the memory budget holds
        at the measured cost of a worker (it changes as workers are measured: read it each time)."""
        if self.engine == "lite":
            return self.settings.lite_worker_limit
        return self.settings.max_workers or warm_capacity(self.memory)

    def measure(self) -> MemoryState:
        """Measure the PSS of the template and of live workers (blocking: /proc reads; run it in a thread).
        The cost of a worker is the mean over those serving a model (a pooled one has not loaded its model's
        weights yet); up to SAMPLE of them are read, not all, so that a thousand workers cost little to watch."""
        sample = 64
        live = [w for w in self.live if w.alive]
        loaded = [w for w in live if w.loaded]
        measured = [m for w in (loaded or live)[:sample] if (m := pss_mb(w.pid)) is not None]
        template_pid = self.template.pid if self.template is not None and self.template.alive else None
        template_mb = (pss_mb(template_pid) or 0.0) if template_pid is not None else 0.0
        worker_mb = sum(measured) / len(measured) if measured else self.memory.worker_mb
        self.memory = MemoryState(
            self.memory.budget_mb, template_mb, worker_mb, template_mb + worker_mb * len(live)
        )
        return self.memory

    async def watch_memory(self, every_s: float = 5.0) -> None:
        """Keep ``memory`` (and so ``capacity``) current."""
        while True:
            await asyncio.to_thread(self.measure)
            await asyncio.sleep(every_s)

    @property
    def used(self) -> int:
        return len(self.live) + self.spawning

    @property
    def full(self) -> bool:
        """No worker can be had now: none idle and every slot in use."""
        return not any(w.alive for w in self.idle) and self.used >= self.capacity

    def activate(self, size: int) -> None:
        """Keep SIZE workers warm from now on (the Lite pool starts empty; see the class)."""
        size = min(size, self.capacity)
        if size > self.size:
            self.size = size
            self.refill()

    def refill(self) -> None:
        """Start workers in the background until ``size`` are warm (or capacity is reached); none once the pool
        is closing (a worker stopped by close() would otherwise be replaced, and a dead template started again)."""
        while (
            not self._closing and len(self.idle) + self._refilling < self.size and self.used < self.capacity
        ):
            # Counted as spawning at once, not when the task first runs: otherwise this loop (and any take()
            # before the task runs) would see the slot free and go past capacity.
            self._refilling += 1
            self.spawning += 1
            self._track(asyncio.create_task(self._refill_one(), name="pool-refill"))

    async def _refill_one(self) -> None:
        try:
            worker = await self._start_process()
        except Exception as exc:
            log.error("could not start a pre-warmed worker: %s", exc)
            await asyncio.sleep(1.0)  # do not spin when workers cannot start at all
            return
        finally:
            self.spawning -= 1
            self._refilling -= 1
        self.idle.append(worker)
        self._signal()  # someone may be waiting for a worker

    @property
    def freeing(self) -> bool:
        """A worker is on its way: being started for the pool, or a stopped one about to free its slot."""
        return self._refilling > 0 or any(w.stopping for w in self.live)

    def _signal(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def take(self) -> WorkerProcess:
        """A warm worker: from the pool when one is idle, else a new one (a slower, Python-start cold start).

        The pool is refilled once the taken worker has loaded its model and answered its first request (or
        REFILL_AFTER_LOAD_S after the load), not at once: a new worker importing Paddle would compete for the CPU
        with the very wake-up it replaces (on 2 cores it added 40-90 ms to the load, 30-60 ms to the request)."""
        while self.idle:
            worker = self.idle.popleft()
            if worker.alive:
                worker.after_load = self.refill
                return worker
        if self.used >= self.capacity:
            raise NoCapacity(f"all {self.capacity} worker slots are in use")
        worker = await self._spawn()
        worker.after_load = self.refill
        return worker

    async def _spawn(self) -> WorkerProcess:
        self.spawning += 1
        try:
            return await self._start_process()
        finally:
            self.spawning -= 1

    async def _start_process(self) -> WorkerProcess:
        wid = next(self._ids)
        uds = self._run_dir / f"w{wid}.sock"
        prefix = "lite-worker" if self.engine == "lite" else "worker"
        log_path = self._log_dir / f"{prefix}-{wid}.log"
        read_fd, write_fd = os.pipe()
        argv = [
            "--uds", str(uds),
            "--device", "cpu" if self.engine == "lite" else self.settings.device,
            "--engine", self.engine,
        ]  # fmt: skip
        if self.settings.worker_memory_mb:
            argv += ["--max-memory-mb", str(self.settings.worker_memory_mb)]
        process: Process | None = None
        with log_path.open("ab") as log_file:
            try:
                if self.template is not None:
                    try:
                        process = await self.template.fork(argv, write_fd, log_file.fileno())
                    except TemplateUnavailable as exc:
                        log.warning("%s; spawning worker %d instead", exc, wid)
                if process is None:
                    process = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "runtime.server", *argv,
                        "--ready-fd", str(write_fd), "--parent-pid", str(os.getpid()),
                        stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
                        pass_fds=(write_fd,), env=worker_env(self.settings),
                    )  # fmt: skip
            finally:
                os.close(write_fd)
        worker = WorkerProcess(wid, process, uds, log_path)
        self._created.add(worker)
        self.live.add(worker)
        self._track(asyncio.create_task(self._watch(worker), name=f"watch-worker-{wid}"))
        try:
            line = await asyncio.wait_for(asyncio.to_thread(_read_line, read_fd), 300)
        except TimeoutError:
            await worker.stop(grace=0)
            raise WorkerStartError(
                "a worker took more than 300 s to import Paddle and start its device"
            ) from None
        if not line:
            await worker.process.wait()
            raise WorkerStartError(f"a worker failed to start: {worker.exit_reason()}")
        info = json.loads(line)
        log.info(
            "%s %d (pid %d) warm in %.2f s, gpu=%s",
            prefix,
            wid,
            worker.pid,
            info["warm_seconds"],
            info["gpu"],
        )
        # Open the keep-alive connection and take the worker's HTTP path once now, not on a woken request.
        with contextlib.suppress(httpx.HTTPError):
            await worker.client.get("/v2/health/live", timeout=30)
        return worker

    async def _watch(self, worker: WorkerProcess) -> None:
        await worker.process.wait()
        self.live.discard(worker)
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        if not worker.stopping:
            log.warning("worker %d (pid %d) %s", worker.id, worker.pid, worker.exit_reason())
        self._signal()
        self._on_exit(worker)  # out of its replica set first: no request may pick it once its session closes
        await worker.session.close()  # however it ended; closing twice is harmless
        self.refill()

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            if task.get_name() == "pool-refill":
                task.cancel()
        await asyncio.gather(*(w.stop(grace=3) for w in list(self.live)), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in list(self._created):
            await worker.session.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)


def _read_line(fd: int) -> str:
    with os.fdopen(fd, "r") as pipe:
        return pipe.readline()
