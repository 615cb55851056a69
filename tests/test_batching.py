"""runtime.batching.DynamicBatcher: with a fake engine that records its batches, and once with a real Paddle model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import batching
from runtime.batching import BatchShapeError, DynamicBatcher

GUARD_S = 30  # liveness guard for awaits that must finish; never a timing assertion


class FakeEngine:
    """Doubles every input; records what each call received. Optionally blocks until released."""

    def __init__(self, *, block_first: bool = False) -> None:
        self.batches: list[dict[str, np.ndarray]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not block_first:
            self.release.set()

    @property
    def sizes(self) -> list[int]:
        return [int(next(iter(b.values())).shape[0]) for b in self.batches]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append({k: v.copy() for k, v in inputs.items()})
        self.started.set()
        self.release.wait(GUARD_S)
        if any((a < 0).any() for a in inputs.values()):
            raise RuntimeError("negative input: the model cannot take it")
        return {f"{name}_doubled": array * 2 for name, array in inputs.items()}


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="engine")
    yield pool
    pool.shutdown(wait=True)


def with_batcher(
    engine: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    executor: ThreadPoolExecutor,
    body: Callable[[DynamicBatcher], Awaitable[Any]],
    *,
    max_batch_size: int,
    max_queue_delay_s: float,
) -> Any:
    """Run BODY(batcher) in a fresh event loop with the batching loop started; stop it afterwards."""

    async def main() -> Any:
        batcher = DynamicBatcher(
            engine, executor, max_batch_size=max_batch_size, max_queue_delay_s=max_queue_delay_s
        )
        loop_task = asyncio.create_task(batcher.run())
        try:
            return await asyncio.wait_for(body(batcher), GUARD_S)
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task

    return asyncio.run(main())


async def settle() -> None:
    """Let every ready task run until it blocks (requests reach the queue, the loop takes what it can)."""
    for _ in range(20):
        await asyncio.sleep(0)


def rows(value: float, n: int = 1, width: int = 3, dtype: Any = np.float32) -> np.ndarray:
    return np.full((n, width), value, dtype=dtype) + np.arange(n, dtype=dtype)[:, None] / 100


async def queued_then_run(batcher: DynamicBatcher, requests: list[dict[str, np.ndarray]]) -> list[Any]:
    """Submit every request so that all are queued, and wait for all answers."""
    tasks = [asyncio.create_task(batcher.infer(r)) for r in requests]
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_requests_are_batched_up_to_max_batch_size(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine(block_first=True)
    requests = [{"x": rows(i)} for i in range(9)]

    async def body(batcher: DynamicBatcher) -> list[Any]:
        # A full first batch runs at once (however long the delay) and blocks the engine; 9 queue up meanwhile.
        first = asyncio.create_task(batcher.infer({"x": rows(100.0, 4)}))
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        rest = [asyncio.create_task(batcher.infer(r)) for r in requests]
        await settle()
        engine.release.set()
        return await asyncio.gather(first, *rest)

    results = with_batcher(engine, executor, body, max_batch_size=4, max_queue_delay_s=0.05)
    assert engine.sizes == [4, 4, 4, 1]
    np.testing.assert_array_equal(results[0][0]["x_doubled"], rows(100.0, 4) * 2)
    for request, (outputs, _seconds) in zip(requests, results[1:], strict=True):
        assert list(outputs) == ["x_doubled"]
        np.testing.assert_array_equal(outputs["x_doubled"], request["x"] * 2)
    # the engine saw the callers' rows in arrival order
    np.testing.assert_array_equal(engine.batches[1]["x"], np.concatenate([r["x"] for r in requests[:4]]))
    np.testing.assert_array_equal(engine.batches[2]["x"], np.concatenate([r["x"] for r in requests[4:8]]))


def test_requests_of_several_rows_are_split_back_to_their_callers(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine(block_first=True)
    sizes = [1, 2, 3, 2, 1, 4]
    requests = [{"x": rows(10 * i, n), "ids": np.arange(n * 2, dtype=np.int64).reshape(n, 2) + 100 * i}
                for i, n in enumerate(sizes)]  # fmt: skip

    async def body(batcher: DynamicBatcher) -> list[Any]:
        blocker = asyncio.create_task(batcher.infer({"x": rows(5.0, 4), "ids": np.zeros((4, 2), np.int64)}))
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        answers = asyncio.create_task(queued_then_run(batcher, requests))
        await settle()
        engine.release.set()
        await asyncio.gather(blocker, return_exceptions=True)
        return await answers

    results = with_batcher(engine, executor, body, max_batch_size=4, max_queue_delay_s=0.05)
    # 1+2 fit, 3 would make 6: held for the next batch; 3 alone (3+2 > 4); 2+1; 4.
    assert engine.sizes == [4, 3, 3, 3, 4]
    for request, (outputs, _seconds) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(outputs["x_doubled"], request["x"] * 2)
        np.testing.assert_array_equal(outputs["ids_doubled"], request["ids"] * 2)
        assert outputs["ids_doubled"].dtype == np.int64


def test_a_request_waits_within_the_queue_delay_for_company(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine()

    async def body(batcher: DynamicBatcher) -> list[Any]:
        a = asyncio.create_task(batcher.infer({"x": rows(1.0)}))
        await settle()  # A is taken and the batch waits (delay: an hour) for more
        assert not a.done()
        b = asyncio.create_task(batcher.infer({"x": rows(2.0, 3)}))  # 1 + 3 = max: the batch closes
        return await asyncio.gather(a, b)

    (out_a, _), (out_b, _) = with_batcher(engine, executor, body, max_batch_size=4, max_queue_delay_s=3600)
    assert engine.sizes == [4]
    np.testing.assert_array_equal(out_a["x_doubled"], rows(1.0) * 2)
    np.testing.assert_array_equal(out_b["x_doubled"], rows(2.0, 3) * 2)


def test_a_lone_request_is_not_held_for_a_full_batch(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine()

    async def body(batcher: DynamicBatcher) -> list[Any]:
        first = await batcher.infer({"x": rows(1.0)})
        second = await batcher.infer({"x": rows(2.0)})
        return [first, second]

    results = with_batcher(engine, executor, body, max_batch_size=64, max_queue_delay_s=0.01)
    assert engine.sizes == [1, 1]
    np.testing.assert_array_equal(results[1][0]["x_doubled"], rows(2.0) * 2)


def test_delay_zero_batches_what_queued_while_the_engine_ran(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine(block_first=True)

    async def body(batcher: DynamicBatcher) -> list[Any]:
        first = asyncio.create_task(batcher.infer({"x": rows(0.0)}))
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        rest = [asyncio.create_task(batcher.infer({"x": rows(float(i))})) for i in range(1, 6)]
        await settle()
        engine.release.set()
        return await asyncio.gather(first, *rest)

    results = with_batcher(engine, executor, body, max_batch_size=8, max_queue_delay_s=0)
    assert engine.sizes == [1, 5]
    for i, (outputs, _) in enumerate(results):
        np.testing.assert_array_equal(outputs["x_doubled"], rows(float(i)) * 2)


def test_the_delay_counts_from_the_first_requests_arrival(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that already waited longer than the delay (behind a running batch) runs without waiting again."""
    clock = [0.0]
    monkeypatch.setattr(
        batching, "time", types.SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter)
    )
    engine = FakeEngine(block_first=True)

    async def body(batcher: DynamicBatcher) -> list[Any]:
        ab = [asyncio.create_task(batcher.infer({"x": rows(float(i))})) for i in range(2)]  # a full batch
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        c = asyncio.create_task(batcher.infer({"x": rows(3.0)}))  # arrives at t=0 while the engine runs
        await settle()
        clock[0] = 3601.0  # ... and waits past the delay (an hour) for the engine
        engine.release.set()
        out_c = await c  # must not wait for company for another hour
        return [*(await asyncio.gather(*ab)), out_c]

    results = with_batcher(engine, executor, body, max_batch_size=2, max_queue_delay_s=3600)
    assert engine.sizes == [2, 1]
    np.testing.assert_array_equal(results[2][0]["x_doubled"], rows(3.0) * 2)


def test_different_signatures_are_never_mixed(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine(block_first=True)
    requests = [
        {"x": rows(1.0)},
        {"x": rows(2.0, width=5)},  # other inner shape
        {"x": rows(3.0, dtype=np.float64)},  # other dtype
        {"x": rows(4.0)},
        {"x": rows(5.0), "y": rows(0.5)},  # other input names
        {"x": rows(6.0, width=5)},
        {"x": rows(7.0)},
    ]

    async def body(batcher: DynamicBatcher) -> list[Any]:
        blocker = asyncio.create_task(batcher.infer({"x": rows(0.0, width=7)}))
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        answers = asyncio.create_task(queued_then_run(batcher, requests))
        await settle()
        engine.release.set()
        await blocker
        return await answers

    results = with_batcher(engine, executor, body, max_batch_size=8, max_queue_delay_s=0)
    # Neighbours never share a signature here, so every request runs on its own, in arrival order, with
    # exactly its own tensors (a different signature closes the batch and waits for the next one).
    assert engine.sizes == [1] * 8
    for request, batch, (outputs, _) in zip(requests, engine.batches[1:], results, strict=True):
        assert sorted(batch) == sorted(request)
        for name, array in request.items():
            np.testing.assert_array_equal(batch[name], array)
            assert batch[name].dtype == array.dtype
            np.testing.assert_array_equal(outputs[f"{name}_doubled"], array * 2)
            assert outputs[f"{name}_doubled"].dtype == array.dtype


def test_same_signature_requests_batch_together_around_others(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine(block_first=True)
    wide = [{"x": rows(float(i), width=5)} for i in range(3)]
    narrow = [{"x": rows(float(10 + i))} for i in range(3)]

    async def body(batcher: DynamicBatcher) -> list[Any]:
        blocker = asyncio.create_task(batcher.infer({"x": rows(0.0, width=7)}))
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        answers = asyncio.create_task(queued_then_run(batcher, [*wide, *narrow]))
        await settle()
        engine.release.set()
        await blocker
        return await answers

    results = with_batcher(engine, executor, body, max_batch_size=8, max_queue_delay_s=0)
    assert engine.sizes == [1, 3, 3]
    assert [b["x"].shape[1] for b in engine.batches] == [7, 5, 3]
    for request, (outputs, _) in zip([*wide, *narrow], results, strict=True):
        np.testing.assert_array_equal(outputs["x_doubled"], request["x"] * 2)


def test_an_engine_error_reaches_only_the_callers_in_that_batch(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine(block_first=True)
    requests = [{"x": rows(1.0)}, {"x": rows(-1.0)}, {"x": rows(2.0)}, {"x": rows(3.0)}]

    async def body(batcher: DynamicBatcher) -> list[Any]:
        blocker = asyncio.create_task(batcher.infer({"x": rows(0.0)}))
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        answers = asyncio.create_task(queued_then_run(batcher, requests))
        await settle()
        engine.release.set()
        await blocker
        results = await answers
        # the loop survives the error and serves the next request
        results.append(await batcher.infer({"x": rows(4.0)}))
        return results

    results = with_batcher(engine, executor, body, max_batch_size=2, max_queue_delay_s=0)
    assert engine.sizes == [1, 2, 2, 1]
    for failed in results[:2]:  # the poisoned request and the innocent one batched with it
        assert isinstance(failed, RuntimeError)
        assert str(failed) == "negative input: the model cannot take it"
    for request, (outputs, _) in zip(requests[2:], results[2:4], strict=True):
        np.testing.assert_array_equal(outputs["x_doubled"], request["x"] * 2)
    np.testing.assert_array_equal(results[4][0]["x_doubled"], rows(4.0) * 2)


def test_an_output_without_the_batch_dimension_fails_that_batch_with_a_clear_error(
    executor: ThreadPoolExecutor,
) -> None:
    def summing_engine(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"total": np.asarray(inputs["x"].sum())}

    async def body(batcher: DynamicBatcher) -> list[Any]:
        return await queued_then_run(batcher, [{"x": rows(1.0, 2)}, {"x": rows(2.0, 2)}])  # 4 rows: full

    results = with_batcher(summing_engine, executor, body, max_batch_size=4, max_queue_delay_s=3600)
    for failed in results:
        assert isinstance(failed, BatchShapeError)
        assert str(failed) == (
            "output 'total' has shape [], not the batch of 4 first: this model cannot be batched; "
            "deploy it with batching off"
        )


def test_callers_that_gave_up_are_not_run(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine(block_first=True)

    async def body(batcher: DynamicBatcher) -> list[Any]:
        blocker = asyncio.create_task(batcher.infer({"x": rows(0.0)}))
        await asyncio.to_thread(engine.started.wait, GUARD_S)
        tasks = [asyncio.create_task(batcher.infer({"x": rows(float(i))})) for i in range(1, 4)]
        await settle()
        tasks[1].cancel()  # e.g. the client disconnected
        await settle()
        engine.release.set()
        await blocker
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = with_batcher(engine, executor, body, max_batch_size=8, max_queue_delay_s=0)
    assert isinstance(results[1], asyncio.CancelledError)
    assert engine.sizes == [1, 2]
    np.testing.assert_array_equal(engine.batches[1]["x"], np.concatenate([rows(1.0), rows(3.0)]))
    np.testing.assert_array_equal(results[2][0]["x_doubled"], rows(3.0) * 2)


def test_compute_time_is_shared_in_proportion_to_rows(executor: ThreadPoolExecutor) -> None:
    engine = FakeEngine()

    async def body(batcher: DynamicBatcher) -> list[Any]:
        return await queued_then_run(batcher, [{"x": rows(1.0, 1)}, {"x": rows(2.0, 3)}])

    (_, one), (_, three) = with_batcher(engine, executor, body, max_batch_size=4, max_queue_delay_s=3600)
    assert engine.sizes == [4]
    assert one > 0
    assert three == pytest.approx(3 * one)


# ------------------------------------------------------------------------------------- with a real model


@pytest.fixture(scope="module")
def prepared_mlp(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "mlp"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.prepare",
            str(models["mlp"]),
            str(out),
            "--device",
            "cpu",
            "--batching",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "GLOG_minloglevel": "2"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    last = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    assert "error" not in json.loads(last)
    return out


def test_batched_outputs_of_a_real_model_equal_unbatched_ones(
    prepared_mlp: Path, executor: ThreadPoolExecutor
) -> None:
    from runtime.engine import PaddleInferenceEngine
    from runtime.spec import Manifest

    manifest = Manifest.load(prepared_mlp)
    assert manifest.spec.batchable
    engine = PaddleInferenceEngine(prepared_mlp, manifest, use_gpu=False)
    try:
        rng = np.random.default_rng(7)
        requests = [{"x": rng.standard_normal((n, 16)).astype(np.float32)} for n in (1, 3, 2, 1, 1)]
        alone = [engine.infer(r) for r in requests]  # unbatched, one request at a time

        calls: list[int] = []

        def recording(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            calls.append(int(inputs["x"].shape[0]))
            return engine.infer(inputs)

        async def body(batcher: DynamicBatcher) -> list[Any]:
            return await queued_then_run(batcher, requests)

        results = with_batcher(recording, executor, body, max_batch_size=8, max_queue_delay_s=3600)
    finally:
        engine.close()
    assert calls == [8]  # all five requests ran as one batch of 8 rows
    output_name = manifest.spec.outputs[0].name
    for request, single, (batched, _seconds) in zip(requests, alone, results, strict=True):
        assert list(batched) == list(single)
        assert batched[output_name].shape == (request["x"].shape[0], 4)
        assert batched[output_name].dtype == np.float32
        np.testing.assert_allclose(batched[output_name], single[output_name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batched[output_name].sum(axis=1), 1.0, rtol=1e-5)  # softmax rows
