"""The one interface the server reaches models through, and the Paddle Inference engine behind it.

An engine is blocking and single-threaded by contract: the server calls ``infer`` from one thread only, so
engines need no locks (Paddle predictors are not thread-safe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.spec import Manifest, ModelSpec


class EngineError(RuntimeError):
    """The model failed on an input that matched its spec (e.g. a free dimension it cannot take)."""


class EngineOutOfMemory(EngineError):
    """The model needed more memory than this worker may use (its address-space limit): the request is refused,
    the worker goes on serving."""


class Engine(Protocol):
    name: str  # "paddle-inference" or "paddle-lite": reported to clients with every response
    device: str  # device class that is billed: "gpu", "cpu" or "lite"
    spec: ModelSpec

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def cuda_available() -> bool:
    """Paddle built with CUDA and at least one device visible (``CUDA_VISIBLE_DEVICES`` respected)."""
    import paddle

    return bool(paddle.is_compiled_with_cuda()) and paddle.device.cuda.device_count() > 0


def warm_up_device(use_gpu: bool) -> None:
    """Bring the device up before any model arrives: on a GPU, the CUDA context and cuBLAS/cuDNN handles
    take most of a cold start (~0.8 s of 0.9 s on an H100), so a pre-warmed worker runs a first tiny kernel."""
    import paddle
    import paddle.inference

    if use_gpu:
        paddle.set_device("gpu:0")
        x = paddle.ones([8, 8], dtype="float32")
        (x @ x).sum().numpy()
        paddle.nn.functional.conv2d(paddle.ones([1, 1, 4, 4]), paddle.ones([1, 1, 3, 3])).numpy()
    else:
        paddle.set_device("cpu")


class PaddleInferenceEngine:
    name = "paddle-inference"

    def __init__(self, folder: Path, manifest: Manifest, *, use_gpu: bool, cpu_threads: int = 1) -> None:
        from paddle import inference

        config = inference.Config(str(folder / manifest.program), str(folder / manifest.params))
        if use_gpu:
            config.enable_use_gpu(256, 0)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(cpu_threads)
        # The program was optimised once at deploy time; running the passes again would cost most of a
        # cold start (ResNet-50 on CPU: 0.74 s with the passes, 0.02 s without).
        config.switch_ir_optim(manifest.ir_optim)
        # enable_memory_optim() and half precision gave wrong outputs on real models: never turn them on.
        config.disable_glog_info()
        self._predictor = inference.create_predictor(config)
        self.device = "gpu" if use_gpu else "cpu"
        self.spec = manifest.spec
        self._inputs = {n: self._predictor.get_input_handle(n) for n in self._predictor.get_input_names()}
        self._outputs = [
            (n, self._predictor.get_output_handle(n)) for n in self._predictor.get_output_names()
        ]
        declared = [t.name for t in self.spec.inputs]
        if sorted(declared) != sorted(self._inputs):
            raise EngineError(f"manifest inputs {declared} do not match the program's {list(self._inputs)}")

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            for name, array in inputs.items():
                handle = self._inputs[name]
                handle.reshape(list(array.shape))
                handle.copy_from_cpu(np.ascontiguousarray(array))
            self._predictor.run()
            return {name: handle.copy_to_cpu() for name, handle in self._outputs}
        except MemoryError as exc:  # Paddle's ResourceExhausted: an allocation over the worker's memory limit
            raise EngineOutOfMemory(_first_line(exc)) from exc
        except (RuntimeError, ValueError, OSError) as exc:
            if _looks_out_of_memory(exc):
                raise EngineOutOfMemory(_first_line(exc)) from exc
            raise EngineError(_first_line(exc)) from exc

    def close(self) -> None:
        self._predictor = None  # type: ignore[assignment]  # dropped: Paddle frees it with the last reference


_OOM_SIGNS = ("error code is 12", "bad_alloc", "out of memory", "cannot allocate memory")


def _looks_out_of_memory(exc: BaseException) -> bool:
    """Allocation failures reach us in several guises; oneDNN's is a bare "could not create a primitive", which
    under an address-space limit is almost always an allocation that failed."""
    import resource

    text = str(exc).lower()
    if any(sign in text for sign in _OOM_SIGNS):
        return True
    limited = resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    return limited and "could not create a primitive" in text


def _first_line(exc: BaseException) -> str:
    """Paddle's errors carry C++ stacks; the useful part is the first non-empty line after 'Error'."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Error" in ln or "error" in ln:
            return ln[:500]
    return (lines[0] if lines else type(exc).__name__)[:500]
