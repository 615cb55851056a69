"""The runtime worker: one process serves one model over the Open Inference Protocol v2.

Two ways to start it:
- pre-warmed (the embedded platform's pool): ``--uds PATH --ready-fd N``. Paddle is imported and the device brought
  up first; the worker then says so on the ready pipe and waits for a model through the OIP model-repository
  extension (``POST /v2/repository/models/{name}/load``). A cold start is then model load + first run only.
- direct (the Kubernetes runtime image): ``--port 8080 --model-dir /models/fn --model-name fn`` loads at start.

Responses carry the engine and device that served them (``x-paddlefn-engine``, ``x-paddlefn-device``, and the OIP
``parameters``) and the compute time the platform bills (``x-paddlefn-compute-ms``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.batching import BatchShapeError, DynamicBatcher
from runtime.engine import Engine, EngineError, EngineOutOfMemory
from runtime.protocol import HEADER_LENGTH, InvalidRequest, decode_request, encode_response
from runtime.spec import GOLDEN_INPUTS, Manifest, ModelSpec, TensorSpec

if TYPE_CHECKING:
    from runtime.lite.engine import SpareHost

log = logging.getLogger("paddlefn.runtime")

EngineFactory = Callable[[Path, Manifest], Engine]
KEEP_ALIVE_S = 120  # idle keep-alive connections stay open this long (callers close theirs first)


@dataclass
class LoadOptions:
    """What the platform may set when it hands a model to a worker."""

    model_dir: Path
    cpu_threads: int = 1  # math threads per predictor; replicas, not threads, are how functions scale out
    max_batch_size: int = 0  # 0 or 1: no dynamic batching
    max_queue_delay_ms: float = 2.0  # how long a batch waits for more requests after its first
    engine: str = "paddle"  # "paddle" (Paddle Inference) or "lite" (Paddle Lite host, see runtime.lite)
    # Confine the worker to its tenant's files as that tenant's user before loading (runtime.isolation).
    confine: dict[str, Any] | None = None  # {"tenant_dir": ..., "data_dir": ..., "uid": ...}
    # Run the model once on its golden inputs before answering the load. Off when a request is already waiting:
    # that request is the first run, and a warm-up would run the model twice before answering it.
    warm_up: bool = True

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> LoadOptions:
        if not isinstance(params.get("model_dir"), str):
            raise InvalidRequest("load needs parameters.model_dir: the folder holding manifest.json")
        try:
            return cls(
                model_dir=Path(params["model_dir"]),
                cpu_threads=int(params.get("cpu_threads", 1)),
                max_batch_size=int(params.get("max_batch_size", 0)),
                max_queue_delay_ms=float(params.get("max_queue_delay_ms", 2.0)),
                engine=str(params.get("engine", "paddle")),
                confine=params.get("confine"),
                warm_up=bool(params.get("warm_up", True)),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad load parameters: {exc}") from None


@dataclass
class LoadedModel:
    name: str
    engine: Engine
    manifest: Manifest
    batcher: DynamicBatcher | None
    batch_task: asyncio.Task[None] | None
    response_parameters: dict[str, str]
    headers: dict[str, str]


class ModelNotFound(LookupError):
    pass


class Worker:
    """Holds at most one model; all engine calls go through one thread (engines are single-threaded)."""

    def __init__(self, use_gpu: bool) -> None:
        self.use_gpu = use_gpu
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.model: LoadedModel | None = None
        self._load_lock = asyncio.Lock()
        self.lite_spare: SpareHost | None = (
            None  # a Lite host started before the model is known (pool workers)
        )

    def start_lite_spare(self) -> None:
        """Start a spare Paddle Lite host now, while this worker waits for a model (runtime.lite.engine): a load
        then costs Lite's predictor creation, not a CPython 3.7 start and ``import paddlelite`` (~150 ms). Call it
        from the main thread, the one that confines the worker and lives as long as it (see SpareHost); the
        engine thread must not exist yet: it has to be created after confinement to inherit it."""
        from runtime.lite.engine import LiteUnavailable, SpareHost

        try:
            self.lite_spare = SpareHost()
        except LiteUnavailable as exc:  # a load asking for Lite reports the same reason
            log.warning("no spare Paddle Lite host: %s", exc)

    def wait_lite_spare(self) -> None:
        from runtime.lite.engine import LiteUnavailable

        if self.lite_spare is None:
            return
        try:
            info = self.lite_spare.wait_ready()
        except LiteUnavailable as exc:  # a load then starts a host of its own, as without a spare
            log.warning("the spare Paddle Lite host did not start: %s", exc)
            self.lite_spare = None
            return
        log.info("spare Paddle Lite host ready in %.0f ms", info.get("start_ms", 0.0))

    def _make_engine(self, options: LoadOptions, manifest: Manifest) -> Engine:
        if options.engine == "lite":
            from runtime.lite.engine import PaddleLiteEngine

            spare, self.lite_spare = self.lite_spare, None
            return PaddleLiteEngine(options.model_dir, manifest, spare=spare)
        from runtime.engine import PaddleInferenceEngine

        use_gpu = self.use_gpu and manifest.device == "gpu"
        return PaddleInferenceEngine(
            options.model_dir, manifest, use_gpu=use_gpu, cpu_threads=options.cpu_threads
        )

    async def load(self, name: str, options: LoadOptions) -> dict[str, Any]:
        async with self._load_lock:
            if self.model is not None:
                if self.model.name == name:
                    return {"name": name, "already_loaded": True}
                raise InvalidRequest(f"this worker already serves '{self.model.name}'; one model per worker")
            start = time.perf_counter()
            loop = asyncio.get_running_loop()
            confined = False
            if options.confine:
                confined = self._confine(options.confine)
            try:
                manifest = Manifest.load(options.model_dir)
            except (OSError, ValueError, KeyError) as exc:
                raise InvalidRequest(f"cannot read the manifest in {options.model_dir}: {exc}") from None
            engine = await loop.run_in_executor(self.executor, self._make_engine, options, manifest)
            golden = options.model_dir / GOLDEN_INPUTS
            if golden.exists() and options.warm_up:  # the first run pays one-off allocations: do it now
                with np.load(golden) as data:
                    first = {k: data[k] for k in data.files}
                await loop.run_in_executor(self.executor, engine.infer, first)
            batcher = task = None
            if options.max_batch_size > 1 and manifest.spec.batchable:
                batcher = DynamicBatcher(
                    engine.infer,
                    self.executor,
                    max_batch_size=options.max_batch_size,
                    max_queue_delay_s=options.max_queue_delay_ms / 1000,
                )
                task = asyncio.create_task(batcher.run(), name=f"batcher-{name}")
            self.model = LoadedModel(
                name=name,
                engine=engine,
                manifest=manifest,
                batcher=batcher,
                batch_task=task,
                response_parameters={"engine": engine.name, "device": engine.device},
                headers={"x-paddlefn-engine": engine.name, "x-paddlefn-device": engine.device},
            )
            seconds = time.perf_counter() - start
            prestarted = getattr(engine, "host_prestarted", None)  # Paddle Lite: did the spare host take it
            how = "" if prestarted is None else ", spare Lite host" if prestarted else ", new Lite host"
            log.info("loaded %s in %.3f s (%s on %s%s)", name, seconds, engine.name, engine.device, how)
            result = {"name": name, "load_seconds": seconds, "engine": engine.name, "device": engine.device,
                      "confined": confined}  # fmt: skip
            if prestarted is not None:
                result["lite_host_prestarted"] = prestarted
            return result

    @staticmethod
    def _confine(spec: dict[str, Any]) -> bool:
        """Confine as asked; with ``required`` false, a machine that cannot (not root) serves unconfined."""
        from runtime.isolation import Limits, confine

        try:
            limits = Limits(max_processes=int(spec.get("max_processes", Limits.max_processes)))
            confine(Path(spec["tenant_dir"]), Path(spec["data_dir"]), int(spec["uid"]), limits=limits)
        except OSError as exc:
            if spec.get("required"):
                raise InvalidRequest(f"cannot confine the worker: {exc.strerror or exc}") from None
            log.warning("serving unconfined: %s", exc.strerror or exc)
            return False
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad confine parameters: {exc}") from None
        return True

    def get(self, name: str) -> LoadedModel:
        if self.model is None or self.model.name != name:
            raise ModelNotFound(name)
        return self.model

    async def infer(
        self, model: LoadedModel, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float]:
        if model.batcher is not None:
            return await model.batcher.infer(inputs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _timed_infer, model.engine, inputs)

    async def close(self) -> None:
        if self.model and self.model.batch_task:
            self.model.batch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.model.batch_task
        if self.lite_spare is not None:
            self.lite_spare.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _timed_infer(engine: Engine, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    start = time.perf_counter()
    outputs = engine.infer(inputs)
    return outputs, time.perf_counter() - start


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(worker: Worker) -> Starlette:
    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": worker.model is not None}, status_code=200 if worker.model else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(
            {
                "name": "paddlefn-runtime",
                "version": "1",
                "extensions": ["binary_tensor_data", "model_repository"],
            }
        )

    async def model_metadata(request: Request) -> Response:
        model = worker.get(request.path_params["model"])
        spec = model.manifest.spec
        return JSONResponse(
            {
                "name": model.name,
                "versions": ["1"],
                "platform": model.engine.name,
                "inputs": [t.to_json() for t in spec.inputs],
                "outputs": [t.to_json() for t in spec.outputs],
            }
        )

    async def model_ready(request: Request) -> Response:
        worker.get(request.path_params["model"])
        return JSONResponse({"name": request.path_params["model"], "ready": True})

    async def load(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"load body is not JSON: {exc}") from None
        options = LoadOptions.from_parameters((body or {}).get("parameters") or {})
        return JSONResponse(await worker.load(request.path_params["model"], options))

    async def infer(request: Request) -> Response:
        model = worker.get(request.path_params["model"])
        raw_length = request.headers.get(HEADER_LENGTH)
        try:
            header_length = None if raw_length is None else int(raw_length)
        except ValueError:
            raise InvalidRequest(
                f"Inference-Header-Content-Length must be an integer, got {raw_length!r}"
            ) from None
        parsed = decode_request(await request.body(), header_length, model.manifest.spec)
        outputs, seconds = await worker.infer(model, parsed.inputs)
        body, headers = encode_response(model.name, parsed, outputs, model.response_parameters)
        headers.update(model.headers)
        headers["x-paddlefn-compute-ms"] = f"{seconds * 1000:.3f}"
        return Response(body, headers=headers)

    async def invalid(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"model '{exc}' is not loaded in this worker")

    async def engine_failed(request: Request, exc: Exception) -> Response:
        if isinstance(exc, EngineOutOfMemory):
            # 507: the model's own memory need, not the platform's fault and not fixed by retrying as is.
            return _error(507, f"the model ran out of memory on this request (the worker's memory limit); "
                               f"send a smaller batch or ask for a larger limit: {exc}")  # fmt: skip
        return _error(400, f"the model could not run on this input: {exc}")

    async def batch_shape(request: Request, exc: Exception) -> Response:
        return _error(500, str(exc))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await worker.close()

    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            InvalidRequest: invalid,
            ModelNotFound: not_found,
            EngineError: engine_failed,
            BatchShapeError: batch_shape,
        },
    )


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive the platform that started it, even if the platform is SIGKILLed."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _bind(args: argparse.Namespace) -> socket.socket:
    if args.uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.uds)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.uds)
    else:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the listening socket says
        # TCP, and without it every second request on a connection waited ~40 ms for a delayed ACK.
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    sock.listen(512)
    return sock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.server", description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--uds", help="serve on this Unix socket (embedded pool)")
    where.add_argument("--port", type=int, help="serve on this TCP port (Kubernetes)")
    p.add_argument("--host", default="0.0.0.0", help="TCP address to bind with --port")
    p.add_argument("--ready-fd", type=int, help="write one JSON line here once warm (embedded pool)")
    p.add_argument("--parent-pid", type=int, help="exit when this process dies (embedded pool)")
    p.add_argument(
        "--lifeline-fd", type=int, help="exit when this pipe reads end-of-file (forked from runtime.zygote)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="device to bring up")
    p.add_argument(
        "--model-dir", type=Path, help="load this prepared model at start (folder with manifest.json)"
    )
    p.add_argument("--model-name", help="name to serve the model under (default: the folder's name)")
    p.add_argument("--engine", choices=["paddle", "lite"], default="paddle", help="engine for --model-dir")
    p.add_argument("--max-memory-mb", type=int, default=0, help="address-space limit for this process")
    p.add_argument("--cpu-threads", type=int, default=1, help="math threads per predictor")
    p.add_argument("--max-batch-size", type=int, default=0, help="dynamic batching: largest batch (0 = off)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="dynamic batching: wait for more")
    return p.parse_args(argv)


def _warm_protocol() -> None:
    """Decode and encode one tiny request before any model arrives: first calls pay for lazy imports and caches
    that a woken request should not."""
    spec = ModelSpec((TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 4)),))
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[0,1,2,3]}]}'
    parsed = decode_request(body, None, spec)
    encode_response("warm-up", parsed, {"y": parsed.inputs["x"]}, {})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s", force=True
    )
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    if args.max_memory_mb:
        # A model that allocates without bound then fails here, alone, instead of taking the machine down.
        limit = args.max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    started = time.perf_counter()
    use_gpu = False
    if args.engine == "paddle":
        from runtime.engine import cuda_available, warm_up_device

        use_gpu = args.device == "gpu" or (args.device == "auto" and cuda_available())
        warm_up_device(use_gpu)
    sock = _bind(args)
    worker = Worker(use_gpu=use_gpu)
    if args.engine == "lite" and not args.model_dir:  # pre-warmed: the Lite host starts now, beside our start
        worker.start_lite_spare()
    app = create_app(worker)

    import uvicorn

    # The caller (the platform's gateway, Knative's queue-proxy) must be the one to close an idle connection:
    # when the server closes it first, a request sent on it at that moment fails (the platform saw a 503 "the
    # replica stopped" under Poisson traffic with uvicorn's default 5 s). The platform closes idle ones at 30 s.
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_S,
    )  # fmt: skip
    server = uvicorn.Server(config)

    _warm_protocol()
    worker.wait_lite_spare()  # warm means Lite imported too

    async def serve() -> None:
        if args.lifeline_fd is not None:  # forked: the platform holds the write end; EOF means it is gone
            asyncio.get_running_loop().add_reader(args.lifeline_fd, os._exit, 1)
        if args.model_dir:
            options = LoadOptions(
                model_dir=args.model_dir,
                cpu_threads=args.cpu_threads,
                max_batch_size=args.max_batch_size,
                max_queue_delay_ms=args.max_queue_delay_ms,
                engine=args.engine,
            )
            await worker.load(args.model_name or args.model_dir.name, options)
        if args.ready_fd is not None:
            ready = {"pid": os.getpid(), "gpu": use_gpu, "warm_seconds": time.perf_counter() - started}
            with os.fdopen(args.ready_fd, "w") as pipe:
                pipe.write(json.dumps(ready) + "\n")
        await server.serve(sockets=[sock])

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
