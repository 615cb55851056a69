"""runtime.prepare: deploy-time preparation of real Paddle models (legacy and PIR), the golden check, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.model_files import EXAMPLE_INPUTS, EXAMPLE_OUTPUTS
from runtime.prepare import compare, max_abs_error, synthesise_inputs
from runtime.spec import GOLDEN_INPUTS, GOLDEN_OUTPUTS, MANIFEST_NAME, Manifest, ModelSpec, TensorSpec

MULTI_IO_INPUTS = [
    ("x", "FP32", (-1, 4)),
    ("ids", "INT64", (-1, 3)),
    ("mask", "BOOL", (-1, 3)),
    ("scale", "FP64", (-1, 2)),
]
MULTI_IO_OUTPUTS = [
    ("FP32", (-1, 3)),
    ("INT64", (-1, 3)),
    ("BOOL", (-1, 3)),
    ("FP64", (-1, 2)),
    ("INT32", (-1, 3)),
]


def run_prepare(src: Path, out: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """`python -m runtime.prepare SRC OUT --device cpu ...`: exit status, its last JSON line, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "runtime.prepare", str(src), str(out), "--device", "cpu", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "GLOG_minloglevel": "2"},
        timeout=240,
        check=False,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert lines, (
        f"no JSON line from prepare (status {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
    )
    return done.returncode, json.loads(lines[-1]), done.stderr


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def copy_model(model: Path, tmp_path: Path) -> Path:
    dest = tmp_path / model.name
    shutil.copytree(model, dest)
    return dest


@pytest.mark.parametrize(
    ("kind", "fmt", "program"),
    [("multi_io", "legacy", "model.pdmodel"), ("multi_io_pir", "pir", "model.json")],
)
def test_a_model_prepares_to_a_manifest_with_its_specs(
    models: dict[str, Path], tmp_path: Path, kind: str, fmt: str, program: str
) -> None:
    src = models[kind]
    out = tmp_path / "prepared"
    status, result, stderr = run_prepare(src, out)
    assert status == 0, result.get("error", stderr[-2000:])

    manifest = Manifest.load(out)
    assert result == {
        **manifest.to_json(),
        "prepare_seconds": result["prepare_seconds"],
    }  # the line is the manifest
    assert manifest.format == fmt
    assert manifest.program == program
    assert manifest.params == "model.pdiparams"
    assert manifest.device == "cpu"
    assert manifest.spec.batchable

    assert [(t.name, t.datatype, t.shape) for t in manifest.spec.inputs] == MULTI_IO_INPUTS
    assert [(t.datatype, t.shape) for t in manifest.spec.outputs] == MULTI_IO_OUTPUTS
    # Output names are the ones Paddle Inference reports, which the uploader's examples are keyed by.
    examples = load_npz(src / EXAMPLE_OUTPUTS)
    assert [t.name for t in manifest.spec.outputs] == list(examples)

    assert manifest.golden["compared_with"] == EXAMPLE_OUTPUTS
    assert manifest.golden["max_abs_error"] <= 1e-5
    assert manifest.golden["rtol"] == 1e-3 and manifest.golden["atol"] == 1e-5
    assert manifest.golden["served_program"] in ("optimised", "optimised (no oneDNN)", "original")
    assert (out / manifest.program).is_file() and (out / manifest.params).is_file()
    assert (out / MANIFEST_NAME).is_file()
    assert not (out / "optimized").exists() and not (out / "optimized-plain").exists()  # losers removed

    golden_in = load_npz(out / GOLDEN_INPUTS)
    given_in = load_npz(src / EXAMPLE_INPUTS)
    assert list(golden_in) == list(given_in)
    for name, array in given_in.items():
        np.testing.assert_array_equal(golden_in[name], array)
        assert golden_in[name].dtype == array.dtype
    golden_out = load_npz(out / GOLDEN_OUTPUTS)
    for name, array in examples.items():
        np.testing.assert_array_equal(golden_out[name], array)


def test_the_prepared_program_serves_the_example_outputs(models: dict[str, Path], tmp_path: Path) -> None:
    from runtime.engine import PaddleInferenceEngine

    out = tmp_path / "prepared"
    status, result, _ = run_prepare(models["multi_io"], out)
    assert status == 0, result
    manifest = Manifest.load(out)
    engine = PaddleInferenceEngine(out, manifest, use_gpu=False)
    try:
        outputs = engine.infer(load_npz(models["multi_io"] / EXAMPLE_INPUTS))
    finally:
        engine.close()
    expected = load_npz(models["multi_io"] / EXAMPLE_OUTPUTS)
    assert list(outputs) == list(expected)
    for spec in manifest.spec.outputs:
        assert outputs[spec.name].dtype == spec.dtype
    assert compare(outputs, expected) == ""


def test_batching_check_passes_for_a_model_with_a_free_batch_dimension(
    models: dict[str, Path], tmp_path: Path
) -> None:
    status, result, _ = run_prepare(models["multi_io"], tmp_path / "prepared", "--batching")
    assert status == 0, result
    assert result["spec"]["inputs"][0]["shape"][0] == -1


def test_a_model_without_examples_is_checked_against_its_unoptimised_program(
    models: dict[str, Path], tmp_path: Path
) -> None:
    src = copy_model(models["mlp"], tmp_path)
    (src / EXAMPLE_INPUTS).unlink()
    (src / EXAMPLE_OUTPUTS).unlink()
    out = tmp_path / "prepared"
    status, result, _ = run_prepare(src, out)
    assert status == 0, result
    manifest = Manifest.load(out)
    assert manifest.golden["compared_with"] == "the unoptimised program"
    assert [(t.name, t.datatype, t.shape) for t in manifest.spec.inputs] == [("x", "FP32", (-1, 16))]
    golden_in = load_npz(out / GOLDEN_INPUTS)
    assert golden_in["x"].shape == (1, 16)  # synthesised: the free dimension set to 1
    np.testing.assert_array_equal(golden_in["x"], synthesise_inputs(manifest.spec)["x"])


@pytest.mark.parametrize("kind", ["multi_io", "multi_io_pir"])
def test_tampered_float_outputs_are_refused_saying_by_how_much(
    models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    src = copy_model(models[kind], tmp_path)
    outputs = load_npz(src / EXAMPLE_OUTPUTS)
    first = next(iter(outputs))  # the FP32 score
    assert outputs[first].dtype == np.float32
    outputs[first] = outputs[first].copy()
    outputs[first][1, 2] += np.float32(0.5)
    np.savez(src / EXAMPLE_OUTPUTS, **outputs)

    status, result, _ = run_prepare(src, tmp_path / "prepared")
    assert status == 2
    assert list(result) == ["error"]
    error = result["error"]
    assert error.startswith(f"golden check failed: outputs differ from {EXAMPLE_OUTPUTS}: "), error
    assert f"'{first}' max |error| 0.5 > tolerance " in error
    assert not (tmp_path / "prepared" / MANIFEST_NAME).exists()


def test_tampered_integer_outputs_are_refused_saying_how_many_values_differ(
    models: dict[str, Path], tmp_path: Path
) -> None:
    src = copy_model(models["multi_io"], tmp_path)
    outputs = load_npz(src / EXAMPLE_OUTPUTS)
    ints = next(name for name, a in outputs.items() if a.dtype == np.int64)
    outputs[ints] = outputs[ints].copy()
    outputs[ints][0, :2] += 1
    np.savez(src / EXAMPLE_OUTPUTS, **outputs)

    status, result, _ = run_prepare(src, tmp_path / "prepared")
    assert status == 2
    assert result["error"] == (
        f"golden check failed: outputs differ from {EXAMPLE_OUTPUTS}: '{ints}' differs in 2 of 6 values"
    )


def test_example_outputs_of_the_wrong_shape_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    src = copy_model(models["mlp"], tmp_path)
    outputs = load_npz(src / EXAMPLE_OUTPUTS)
    name = next(iter(outputs))
    np.savez(src / EXAMPLE_OUTPUTS, **{name: outputs[name][:1]})
    status, result, _ = run_prepare(src, tmp_path / "prepared")
    assert status == 2
    assert result["error"].endswith(f"'{name}' has shape [2, 4], expected [1, 4]")


def test_a_folder_without_a_model_is_refused_naming_the_expected_files(tmp_path: Path) -> None:
    src = tmp_path / "upload"
    src.mkdir()
    (src / "README.txt").write_text("weights coming soon")
    status, result, _ = run_prepare(src, tmp_path / "prepared")
    assert status == 2
    assert result == {
        "error": "no Paddle inference model found: upload model.pdmodel + model.pdiparams (legacy format) or "
        "model.json + model.pdiparams (Paddle 3 PIR), as written by paddle.jit.save"
    }
    assert not (tmp_path / "prepared").exists()


def test_a_program_without_weights_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    src = copy_model(models["mlp"], tmp_path)
    (src / "model.pdiparams").unlink()
    status, result, _ = run_prepare(src, tmp_path / "prepared")
    assert status == 2
    assert result["error"] == "model.pdmodel has no weights beside it: add model.pdiparams to the archive"


def test_example_inputs_that_do_not_match_the_model_are_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    src = copy_model(models["mlp"], tmp_path)
    np.savez(src / EXAMPLE_INPUTS, x=np.zeros((2, 15), np.float32))
    status, result, _ = run_prepare(src, tmp_path / "prepared")
    assert status == 2
    assert result["error"] == f"{EXAMPLE_INPUTS}: 'x' is float32[2, 15], expected x: FP32[?, 16]"

    np.savez(src / EXAMPLE_INPUTS, image=np.zeros((2, 16), np.float32))
    status, result, _ = run_prepare(src, tmp_path / "prepared")
    assert status == 2
    assert result["error"] == f"{EXAMPLE_INPUTS} holds ['image'] but the model's inputs are x: FP32[?, 16]"


def test_gpu_asked_for_on_a_machine_without_one(models: dict[str, Path], tmp_path: Path) -> None:
    import paddle

    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.prepare",
            str(models["mlp"]),
            str(tmp_path / "out"),
            "--device",
            "gpu",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "GLOG_minloglevel": "2"},
        timeout=240,
        check=False,
    )
    assert done.returncode == 2
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "error": "device=gpu was asked for but this platform has no GPU; deploy with device cpu or auto"
    }


# ------------------------------------------------------------------------------- the comparison, in-process


def test_compare_within_tolerance_is_empty() -> None:
    ref = {"y": np.array([[1.0, -2.0, 100.0]], np.float32)}
    close = {"y": ref["y"] + np.float32(0.05)}  # 0.05 <= 1e-5 + 1e-3 * 100
    assert compare(close, ref) == ""
    assert max_abs_error(close, ref) == pytest.approx(0.05, rel=1e-3)


def test_compare_names_every_output_that_differs() -> None:
    ref = {
        "score": np.array([1.0, 2.0], np.float32),
        "ids": np.array([1, 2, 3], np.int64),
        "flags": np.array([True, False]),
        "gone": np.zeros(2, np.float32),
        "shaped": np.zeros((2, 2), np.float64),
    }
    got = {
        "score": np.array([1.0, 2.5], np.float32),
        "ids": np.array([1, 2, 4], np.int64),
        "flags": np.array([True, True]),
        "shaped": np.zeros((2, 3), np.float64),
    }
    assert compare(got, ref).split("; ") == [
        "'score' max |error| 0.5 > tolerance 0.00201",
        "'ids' differs in 1 of 3 values",
        "'flags' differs in 1 of 2 values",
        "'gone' missing (outputs: ['flags', 'ids', 'score', 'shaped'])",
        "'shaped' has shape [2, 3], expected [2, 2]",
    ]


def test_compare_catches_nan() -> None:
    ref = {"y": np.array([1.0, 2.0], np.float32)}
    assert (
        compare({"y": np.array([1.0, np.nan], np.float32)}, ref) == "'y' max |error| nan > tolerance 0.00201"
    )


def test_synthesised_inputs_follow_the_spec_and_are_deterministic() -> None:
    spec = ModelSpec(
        inputs=(
            TensorSpec("image", "FP32", (-1, 3, 4, 4)),
            TensorSpec("ids", "INT64", (-1, 7)),
            TensorSpec("mask", "BOOL", (2, -1)),
        ),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
    )
    first, again = synthesise_inputs(spec), synthesise_inputs(spec)
    assert {k: (v.dtype, v.shape) for k, v in first.items()} == {
        "image": (np.dtype(np.float32), (1, 3, 4, 4)),
        "ids": (np.dtype(np.int64), (1, 7)),
        "mask": (np.dtype(bool), (2, 1)),
    }
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
