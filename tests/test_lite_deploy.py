"""Paddle Lite at deploy and in the worker: conversion, normalisation, golden agreement, failures as reasons,
and the Lite engine over real HTTP next to Paddle Inference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime.lite.convert import LITE_ATOL, LITE_RTOL, ConversionError, optimise
from runtime.lite.engine import LiteHost, LiteUnavailable, PaddleLiteEngine
from runtime.spec import Manifest
from tests.conftest import binary_request, example, free_port, oip_body, outputs_of
from tests.lite_support import needs_lite, prepare, process

pytestmark = needs_lite


def close_enough(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.max(np.abs(got - want)) <= LITE_ATOL + LITE_RTOL * np.max(np.abs(want)))


@pytest.fixture(scope="module")
def prepared(models, mobilenet, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """name -> (uploaded model, prepared folder, manifest)."""
    root = tmp_path_factory.mktemp("lite-prepared")
    sources = {"mlp": models["mlp"], "mobilenet_v3_small": mobilenet}
    return {name: (src, root / name, prepare(src, root / name)) for name, src in sources.items()}


@pytest.mark.parametrize("name", ["mlp", "mobilenet_v3_small"])
def test_deploy_converts_to_lite_and_lite_agrees_with_paddle(prepared, name):
    src, folder, manifest = prepared[name]
    lite = manifest["lite"]
    assert lite["available"] is True, lite
    assert lite["version"] == "2.12" and lite["target"] == "x86"
    assert (lite["rtol"], lite["atol"]) == (LITE_RTOL, LITE_ATOL)
    assert (folder / lite["nb"]).is_file()
    # Independently of deploy's own check: run the .nb on the uploader's inputs, compare with what their
    # Paddle produced.
    inputs, expected = example(src)
    host = LiteHost(folder / lite["nb"])
    try:
        outputs, compute_ms = host.infer(inputs)
    finally:
        host.close()
    assert compute_ms > 0
    (want,) = expected.values()
    assert outputs[0].shape == want.shape and close_enough(outputs[0], want)
    assert lite["max_abs_error"] <= LITE_ATOL + LITE_RTOL * float(np.max(np.abs(want)))


def test_pir_model_deploys_without_lite_and_says_how_to_export(models, tmp_path):
    manifest = prepare(models["multi_io_pir"], tmp_path / "out")
    assert manifest["program"] == "model.json"  # still deployed, on Paddle Inference
    lite = manifest["lite"]
    assert lite["available"] is False
    assert "legacy" in lite["reason"] and "FLAGS_enable_pir_api=0" in lite["reason"]


def test_lite_outputs_that_differ_from_paddle_are_not_served(models, tmp_path):
    """multi_io has an FP64 output that Lite 2.12 answers wrongly on x86: the golden check must catch it."""
    manifest = prepare(models["multi_io"], tmp_path / "out")
    assert manifest["golden"]["served_program"]  # the Paddle deploy itself succeeded
    lite = manifest["lite"]
    assert lite["available"] is False and lite["reason"], lite
    assert not (tmp_path / "out" / "model.nb").exists()


RELU6_MODEL = textwrap.dedent(
    """
    import os, sys
    os.environ["FLAGS_enable_pir_api"] = "0"  # legacy format: must be set before paddle is imported
    import numpy as np
    import paddle
    from paddle.static import InputSpec

    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 4, 3)
            self.relu6 = paddle.nn.ReLU6()
            self.swish = paddle.nn.Swish()

        def forward(self, x):
            return self.swish(self.relu6(self.conv(x) * 3.0))

    paddle.seed(0)
    net = Net()
    net.eval()
    out = sys.argv[1]
    paddle.jit.save(net, out + "/model", input_spec=[InputSpec([None, 3, 8, 8], "float32", "x")])
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype("float32")
    np.savez(out + "/example_inputs.npz", x=x)
    """
)


def test_relu6_without_threshold_is_normalised_then_converts_and_agrees(tmp_path):
    src = tmp_path / "relu6"
    src.mkdir()
    script = tmp_path / "relu6_model.py"  # a file, not -c: jit.save reads forward's source
    script.write_text(RELU6_MODEL)
    subprocess.run(
        [sys.executable, str(script), str(src)],
        check=True,
        capture_output=True,
        env={**os.environ, "GLOG_minloglevel": "2"},
    )
    for leftover in src.glob("*.info"):
        leftover.unlink()
    # As exported, Lite refuses the program: relu6 lacks the threshold attribute Lite reads.
    with pytest.raises(ConversionError, match="threshold"):
        optimise(src / "model.pdmodel", src / "model.pdiparams", tmp_path / "raw.nb")

    manifest = prepare(src, tmp_path / "out")
    lite = manifest["lite"]
    assert lite["available"] is True, lite
    assert "relu6.threshold=6.0" in lite["normalised"]
    assert "swish.beta=1.0" in lite["normalised"]
    # Deploy compared Lite with Paddle on these inputs; check again here, on outputs that are not trivial.
    with (
        np.load(tmp_path / "out" / "golden_inputs.npz") as i,
        np.load(tmp_path / "out" / "golden_outputs.npz") as o,
    ):
        inputs, (want,) = {k: i[k] for k in i.files}, [o[k] for k in o.files]
    assert np.count_nonzero((want > 0.1) & (want < 5.9)) > 0  # values inside relu6's range, not only clipped
    host = LiteHost(tmp_path / "out" / lite["nb"])
    try:
        got, _ = host.infer(inputs)
    finally:
        host.close()
    assert close_enough(got[0], want)
    # The upload itself is untouched: only the copy under lite/ was normalised.
    with pytest.raises(ConversionError, match="threshold"):
        optimise(src / "model.pdmodel", src / "model.pdiparams", tmp_path / "raw.nb")


def test_optimiser_crash_is_a_reason(tmp_path, models):
    empty = tmp_path / "empty.pdmodel"
    empty.write_bytes(b"")  # a valid, empty ProgramDesc: Lite aborts on it
    with pytest.raises(ConversionError, match=r"crashed \(SIGABRT\).*Check failed"):
        optimise(empty, models["mlp"] / "model.pdiparams", tmp_path / "out.nb")
    assert not (tmp_path / "out.nb").exists()


def test_optimiser_hang_is_cut_off(tmp_path, models):
    fake = tmp_path / "paddle_lite_opt"
    fake.write_text("#!/bin/sh\nsleep 60 &\nsleep 60\n")
    fake.chmod(0o755)
    start = time.monotonic()
    with pytest.raises(ConversionError, match=r"did not finish within 0\.5 s"):
        optimise(models["mlp"] / "model.pdmodel", models["mlp"] / "model.pdiparams", tmp_path / "o.nb",
                 timeout_s=0.5, optimizer=fake)  # fmt: skip
    assert time.monotonic() - start < 10


def test_a_deploy_whose_conversion_times_out_still_deploys(models, tmp_path):
    manifest = prepare(models["mlp"], tmp_path / "out", PADDLEFN_LITE_OPT_TIMEOUT_S="0.001")
    assert manifest["golden"]["served_program"]
    assert manifest["lite"]["available"] is False
    assert "did not finish within" in manifest["lite"]["reason"]


def test_lite_host_answers_bad_requests_and_survives_a_crash(prepared):
    _, folder, manifest = prepared["mlp"]
    host = LiteHost(folder / manifest["lite"]["nb"])
    try:
        assert host.info["lite_version"] == "2.12"
        from runtime.engine import EngineError

        with pytest.raises(EngineError, match="unknown input 'nope'"):
            host.infer({"nope": np.zeros((1, 16), np.float32)})
        x = np.ones((3, 16), np.float32)
        first, _ = host.infer({"x": x})
        assert first[0].shape == (3, 4)
        assert host.proc is not None
        host.proc.kill()  # a Lite segfault looks like this to the engine
        host.proc.wait()
        again, _ = host.infer({"x": x})  # a new host serves the next request
        np.testing.assert_array_equal(again[0], first[0])
    finally:
        proc = host.proc
        host.close()
    assert proc is not None and proc.returncode == 0  # closing its stdin ends the host by itself


def test_a_hung_lite_host_is_cut_off_and_replaced(prepared):
    from runtime.engine import EngineError

    _, folder, manifest = prepared["mlp"]
    host = LiteHost(folder / manifest["lite"]["nb"], infer_timeout_s=0.5)
    try:
        assert host.proc is not None
        hung = host.proc
        os.kill(hung.pid, signal.SIGSTOP)  # stands in for a Lite call that never returns
        with pytest.raises(EngineError, match=r"did not answer within 0\.5 s"):
            host.infer({"x": np.ones((1, 16), np.float32)})
        assert hung.returncode == -signal.SIGKILL
        outputs, _ = host.infer({"x": np.ones((1, 16), np.float32)})
        assert outputs[0].shape == (1, 4)
    finally:
        host.close()


def test_engine_refuses_a_model_without_lite(models, tmp_path):
    prepare(models["multi_io_pir"], tmp_path / "out")
    manifest = Manifest.load(tmp_path / "out")
    with pytest.raises(LiteUnavailable, match="no Paddle Lite version: Paddle Lite reads only the legacy"):
        PaddleLiteEngine(tmp_path / "out", manifest)


@pytest.mark.parametrize("name", ["mlp", "mobilenet_v3_small"])
def test_lite_worker_over_http_loaded_through_the_repository_api(prepared, tmp_path, name):
    src, folder, _ = prepared[name]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["-m", "runtime.server", "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"]
    with (
        process(args, tmp_path / "worker.log", f"{base}/v2/health/live"),
        httpx.Client(base_url=base, timeout=60) as c,
    ):
        r = c.post(
            f"/v2/repository/models/{name}/load",
            json={"parameters": {"model_dir": str(folder), "engine": "lite"}},
        )
        assert r.status_code == 200, r.text
        assert r.json()["engine"] == "paddle-lite" and r.json()["device"] == "lite"
        inputs, expected = example(src)
        body, headers = binary_request(inputs)
        for response in (c.post(f"/v2/models/{name}/infer", json=oip_body(inputs)),
                         c.post(f"/v2/models/{name}/infer", content=body, headers=headers)):  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.headers["x-paddlefn-engine"] == "paddle-lite"
            assert response.headers["x-paddlefn-device"] == "lite"
            assert float(response.headers["x-paddlefn-compute-ms"]) > 0
            assert response.json()["parameters"] == {"engine": "paddle-lite", "device": "lite"}
            for out, want in expected.items():
                assert close_enough(outputs_of(response.json())[out], want)
        bad = c.post(f"/v2/models/{name}/infer", json={"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                                     "data": [1.0]}]})  # fmt: skip
        assert bad.status_code == 400, bad.text
        assert "the model expects" in bad.json()["error"] or "unknown input 'x'" in bad.json()["error"]


def test_lite_and_paddle_workers_answer_the_same_and_say_which_engine(prepared, tmp_path):
    src, folder, _ = prepared["mlp"]
    inputs, _ = example(src)
    answers = {}
    for engine in ("paddle", "lite"):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        args = ["-m", "runtime.server", "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
                "--engine", engine, "--model-dir", str(folder), "--model-name", "mlp"]  # fmt: skip
        with process(args, tmp_path / f"{engine}.log", f"{base}/v2/health/ready"):
            r = httpx.post(f"{base}/v2/models/mlp/infer", json=oip_body(inputs), timeout=60)
        assert r.status_code == 200, r.text
        answers[engine] = r
    assert answers["paddle"].headers["x-paddlefn-engine"] == "paddle-inference"
    assert answers["paddle"].json()["parameters"]["engine"] == "paddle-inference"
    assert answers["lite"].headers["x-paddlefn-engine"] == "paddle-lite"
    assert answers["lite"].json()["parameters"]["engine"] == "paddle-lite"
    paddle_out, lite_out = outputs_of(answers["paddle"].json()), outputs_of(answers["lite"].json())
    assert paddle_out.keys() == lite_out.keys()
    for name in paddle_out:
        assert close_enough(lite_out[name], paddle_out[name])
