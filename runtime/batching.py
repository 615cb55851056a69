"""Dynamic batching: stack concurrent requests along the batch dimension and run them as one.

Requests join a batch only with others whose inputs agree on every dimension but the first (the signature).
A batch closes when it holds ``max_batch_size`` rows or ``max_queue_delay`` has passed since its first request
arrived; with a delay of 0 a batch is whatever queued while the previous one ran (adaptive batching). Each
request is charged its share of the batch's compute time, in proportion to its rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    signature: Signature
    future: asyncio.Future[tuple[dict[str, np.ndarray], float]]
    arrived: float  # time.monotonic() when the request was queued


class DynamicBatcher:
    def __init__(
        self, run: RunFn, executor: Executor, *, max_batch_size: int, max_queue_delay_s: float
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._held: deque[_Pending] = deque()  # taken from the queue but did not fit the last batch

    async def infer(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Outputs for this request's rows and its share of the batch's compute seconds."""
        rows = int(next(iter(inputs.values())).shape[0])
        signature = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))
        future: asyncio.Future[tuple[dict[str, np.ndarray], float]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(_Pending(inputs, rows, signature, future, time.monotonic()))
        return await future

    async def run(self) -> None:
        """The batching loop; owned by the server's lifespan."""
        while True:
            batch = await self._collect()
            await self._execute(batch)

    async def _collect(self) -> list[_Pending]:
        first = self._held.popleft() if self._held else await self._queue.get()
        batch, rows = [first], first.rows
        # The delay counts from the first request's arrival: one that waited while the previous batch ran
        # does not wait a whole delay again.
        deadline = first.arrived + self.max_queue_delay_s
        while rows < self.max_batch_size:
            item = self._next_nowait()
            if item is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item.signature != first.signature or rows + item.rows > self.max_batch_size:
                self._held.append(item)
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _next_nowait(self) -> _Pending | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _execute(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # callers that gave up are not run
        if not live:
            return
        if len(live) == 1:
            stacked = live[0].inputs
        else:
            stacked = {name: np.concatenate([p.inputs[name] for p in live]) for name in live[0].inputs}
        total = sum(p.rows for p in live)
        loop = asyncio.get_running_loop()
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, _timed, self._run, stacked)
            parts = _split(outputs, [p.rows for p in live], total)
        except Exception as exc:
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, part in zip(live, parts, strict=True):
            if not p.future.done():
                p.future.set_result((part, seconds * p.rows / total))


def _timed(run: RunFn, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    start = time.perf_counter()
    outputs = run(inputs)
    return outputs, time.perf_counter() - start


class BatchShapeError(RuntimeError):
    """A batched model returned an output whose first dimension is not the batch."""


def _split(outputs: dict[str, np.ndarray], rows: list[int], total: int) -> list[dict[str, np.ndarray]]:
    if len(rows) == 1:
        return [outputs]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise BatchShapeError(
                f"output '{name}' has shape {list(array.shape)}, not the batch of {total} first: "
                "this model cannot be batched; deploy it with batching off"
            )
    bounds = np.cumsum(rows)[:-1]
    pieces = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(rows))]
