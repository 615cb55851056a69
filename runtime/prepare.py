"""Deploy-time preparation of an uploaded model: read its spec, optimise it once, and prove it (golden check).

Run as its own process (``python -m runtime.prepare SRC OUT``) so that a crash inside Paddle becomes a deploy
failure with a reason, never harm to the platform. On success it writes ``OUT/manifest.json`` (see
``runtime.spec``), the program to serve, the golden inputs and the reference outputs, and prints the manifest as
one JSON line; on failure it prints ``{"error": "..."}`` and exits with status 2.

The golden check: the reference is the uploader's ``example_outputs.npz`` when given (what their own Paddle
produced), else the unoptimised program run here. The optimised program must match it within
``max|out - ref| <= atol + rtol * max|ref|`` for floats (exactly for integers and booleans). Some Paddle switches
silently change results, so a program that fails is never served: the unoptimised one is tried next, and if that
fails too, the deploy fails with the error per output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.model_files import EXAMPLE_INPUTS, EXAMPLE_OUTPUTS, ModelFiles, ModelFormatError, find_model
from runtime.program_check import check_program
from runtime.spec import GOLDEN_INPUTS, GOLDEN_OUTPUTS, Manifest, ModelSpec, TensorSpec, oip_datatype

RTOL = 1e-3
ATOL = 1e-5


class PrepareError(Exception):
    """Deploy cannot go on; the message is shown to the person who uploaded the model."""


Outputs = dict[str, np.ndarray]


@dataclass
class Candidate:
    """A program that could be served: the files, and whether the engine must still run IR passes."""

    label: str
    program: Path
    params: Path
    ir_optim: bool


def prepare(
    src: Path,
    out: Path,
    *,
    device: str = "auto",
    batching: bool = False,
    report: Callable[[str], None] = lambda stage: None,
) -> Manifest:
    """Optimise, check and install the model in SRC into OUT; REPORT is told each stage as it begins
    (``loading``, ``optimising``, ``golden check``, ``converting for Paddle Lite``)."""
    report("loading")
    try:
        files = find_model(src)
        check_program(files)  # the platform checked the upload too; this holds wherever preparation runs
    except ModelFormatError as exc:
        raise PrepareError(str(exc)) from None
    import paddle

    from runtime.engine import cuda_available

    has_gpu = cuda_available()
    if device == "gpu" and not has_gpu:
        raise PrepareError(
            "device=gpu was asked for but this platform has no GPU; deploy with device cpu or auto"
        )
    use_gpu = device == "gpu" or (device == "auto" and has_gpu)
    spec = read_spec(files)
    if batching and not spec.batchable:
        fixed = [t.describe() for t in spec.inputs + spec.outputs if not t.shape or t.shape[0] >= 0]
        raise PrepareError(
            "batching needs a free first (batch) dimension on every input and output; fixed: "
            + ", ".join(fixed)
        )
    golden_inputs = _golden_inputs(files, spec)

    notes: list[str] = []
    if files.example_outputs is not None:
        reference, compared_with = _example_outputs(files.example_outputs, spec), EXAMPLE_OUTPUTS
    else:
        try:
            original = Candidate("original", files.program, files.params, ir_optim=False)
            reference = _runner(original, use_gpu)(golden_inputs)
        except Exception as exc:
            raise PrepareError(f"the model does not run on {_inputs_origin(files)}: {_short(exc)}") from None
        compared_with = "the unoptimised program"

    out.mkdir(parents=True, exist_ok=True)
    report("optimising")
    chosen: Candidate | None = None
    failure = ""
    outputs: Outputs = {}
    for candidate in _candidates(files, out, use_gpu, notes):
        report("golden check")
        try:
            outputs = _runner(candidate, use_gpu)(golden_inputs)
        except Exception as exc:
            notes.append(f"{candidate.label} program did not run: {_short(exc)}")
            failure = f"the model does not run on {_inputs_origin(files)}: {_short(exc)}"
            continue
        error = compare(outputs, reference)
        if not error:
            chosen = candidate
            break
        notes.append(f"{candidate.label} program differs from {compared_with}: {error}")
        failure = f"golden check failed: outputs differ from {compared_with}: {error}"
    if chosen is None:
        raise PrepareError(failure)

    if batching:
        _check_batching(_runner(chosen, use_gpu), golden_inputs, outputs)

    program, params = _install(chosen, out)
    np.savez(out / GOLDEN_INPUTS, **golden_inputs)  # type: ignore[arg-type]  # numpy stubs: **kwds vs allow_pickle
    np.savez(out / GOLDEN_OUTPUTS, **reference)  # type: ignore[arg-type]
    report("converting for Paddle Lite")
    manifest = Manifest(
        format=files.format,
        program=program,
        params=params,
        ir_optim=chosen.ir_optim,
        device="gpu" if use_gpu else "cpu",
        spec=spec,
        paddle_version=paddle.__version__,
        golden={
            "compared_with": compared_with,
            "served_program": chosen.label,
            "max_abs_error": max_abs_error(outputs, reference),
            "rtol": RTOL,
            "atol": ATOL,
        },
        notes=notes,
        lite=_lite(files, out, golden_inputs, reference, spec),
    )
    manifest.save(out)
    return manifest


def _lite(
    files: ModelFiles, out: Path, inputs: dict[str, np.ndarray], reference: Outputs, spec: ModelSpec
) -> dict[str, Any]:
    """Paddle Lite conversion (see runtime.lite.convert); its failure never fails the deploy."""
    from runtime.lite.convert import LITE_VERSION, convert_for_deploy

    if files.format != "legacy":
        return {
            "available": False,
            "version": LITE_VERSION,
            "reason": "Paddle Lite reads only the legacy program format (model.pdmodel), not Paddle 3's "
            "model.json: export with FLAGS_enable_pir_api=0 set before importing paddle, then paddle.jit.save",
        }
    outputs = [t.name for t in spec.outputs]
    return convert_for_deploy(files.program, files.params, out, inputs, reference, outputs)


def read_spec(files: ModelFiles) -> ModelSpec:
    """Inputs and outputs with names, datatypes and shapes, in the order the program declares them."""
    if files.format == "legacy":
        return _legacy_spec(files.program)
    return _pir_spec(files)


def _legacy_spec(program: Path) -> ModelSpec:
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()  # type: ignore[attr-defined]  # generated protobuf module
    try:
        desc.ParseFromString(program.read_bytes())
    except Exception as exc:
        raise PrepareError(f"{program.name} is not a Paddle program: {_short(exc)}") from None
    block = desc.blocks[0]
    variables = {v.name: v for v in block.vars}

    def tensor(name: str) -> TensorSpec:
        var_type = variables[name].type
        # Paddle 3 calls the field dense_tensor; Paddle 2 called it lod_tensor.
        holder = var_type.dense_tensor if var_type.HasField("dense_tensor") else var_type.lod_tensor
        dtype_name = framework_pb2.VarType.Type.Name(holder.tensor.data_type).lower()  # type: ignore[attr-defined]
        numpy_name = {"fp16": "float16", "fp32": "float32", "fp64": "float64", "bool": "bool"}.get(
            dtype_name, dtype_name
        )
        return TensorSpec(name, oip_datatype(numpy_name), tuple(int(d) for d in holder.tensor.dims))

    feeds: list[tuple[int, TensorSpec]] = []
    fetches: list[tuple[int, TensorSpec]] = []
    for op in block.ops:
        if op.type not in ("feed", "fetch"):
            continue
        col = next(a.i for a in op.attrs if a.name == "col")
        if op.type == "feed":
            feeds.append((col, tensor(op.outputs[0].arguments[0])))
        else:
            fetches.append((col, tensor(op.inputs[0].arguments[0])))
    if not feeds or not fetches:
        raise PrepareError(
            f"{program.name} has no feed/fetch ops: save it with paddle.jit.save for inference"
        )
    return ModelSpec(tuple(t for _, t in sorted(feeds)), tuple(t for _, t in sorted(fetches)))


def _pir_spec(files: ModelFiles) -> ModelSpec:
    import paddle

    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        prefix = str(files.program.with_suffix(""))
        program, _feeds, fetch_targets = paddle.static.load_inference_model(prefix, exe)
        inputs = []
        fetch_names: dict[int, str] = {}
        for op in program.global_block().ops:
            attrs = op.attrs()
            if op.name() == "pd_op.data":
                datatype = oip_datatype(_paddle_dtype(attrs["dtype"]))
                inputs.append(TensorSpec(attrs["name"], datatype, tuple(attrs["shape"])))
            elif op.name() == "pd_op.fetch":
                fetch_names[int(attrs["col"])] = attrs["name"]
        outputs = tuple(
            TensorSpec(
                fetch_names.get(i, f"fetch_name_{i}"), oip_datatype(_paddle_dtype(v.dtype)), tuple(v.shape)
            )
            for i, v in enumerate(fetch_targets)
        )
    except PrepareError:
        raise
    except Exception as exc:
        raise PrepareError(
            f"{files.program.name} is not a readable Paddle 3 (PIR) program: {_short(exc)}"
        ) from None
    finally:
        paddle.disable_static()
    return ModelSpec(tuple(inputs), outputs)


def _paddle_dtype(dtype: Any) -> str:
    return str(dtype).replace("paddle.", "").replace("DataType.", "").lower()


def _golden_inputs(files: ModelFiles, spec: ModelSpec) -> dict[str, np.ndarray]:
    if files.example_inputs is None:
        return synthesise_inputs(spec)
    try:
        with np.load(files.example_inputs) as data:
            given = {k: data[k] for k in data.files}
    except Exception as exc:
        raise PrepareError(f"{EXAMPLE_INPUTS} is not a readable .npz file: {_short(exc)}") from None
    expected = {t.name: t for t in spec.inputs}
    if set(given) != set(expected):
        raise PrepareError(
            f"{EXAMPLE_INPUTS} holds {sorted(given)} but the model's inputs are "
            + ", ".join(t.describe() for t in spec.inputs)
        )
    for name, array in given.items():
        want = expected[name]
        if _mismatch(array, want):
            raise PrepareError(
                f"{EXAMPLE_INPUTS}: '{name}' is {array.dtype}{list(array.shape)}, expected {want.describe()}"
            )
    return given


def synthesise_inputs(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for a model uploaded without examples: free dimensions become 1."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for t in spec.inputs:
        shape = tuple(1 if d < 0 else d for d in t.shape)
        if t.dtype.kind == "f":
            inputs[t.name] = rng.standard_normal(shape).astype(t.dtype)
        elif t.dtype.kind == "b":
            inputs[t.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            inputs[t.name] = rng.integers(0, 2, shape).astype(t.dtype)
    return inputs


def _example_outputs(path: Path, spec: ModelSpec) -> Outputs:
    try:
        with np.load(path) as data:
            given = {k: data[k] for k in data.files}
    except Exception as exc:
        raise PrepareError(f"{EXAMPLE_OUTPUTS} is not a readable .npz file: {_short(exc)}") from None
    names = [t.name for t in spec.outputs]
    unknown = sorted(set(given) - set(names))
    if unknown or not given:
        raise PrepareError(f"{EXAMPLE_OUTPUTS} holds {sorted(given)} but the model's outputs are {names}")
    return given


def _mismatch(array: np.ndarray, want: TensorSpec) -> bool:
    if array.dtype != want.dtype or array.ndim != len(want.shape):
        return True
    return any(w >= 0 and d != w for d, w in zip(array.shape, want.shape, strict=True))


def _candidates(files: ModelFiles, out: Path, use_gpu: bool, notes: list[str]) -> Iterator[Candidate]:
    """Optimised first (fastest to load and run), the original program last (always available)."""
    for onednn in [False] if use_gpu else [True, False]:
        target = out / ("optimized" if onednn or use_gpu else "optimized-plain")
        try:
            yield _optimise(files, target, use_gpu=use_gpu, onednn=onednn)
        except Exception as exc:
            notes.append(f"optimisation {'with' if onednn else 'without'} oneDNN failed: {_short(exc)}")
    yield Candidate("original", files.program, files.params, ir_optim=False)


def _optimise(files: ModelFiles, target: Path, *, use_gpu: bool, onednn: bool) -> Candidate:
    from paddle import inference

    shutil.rmtree(target, ignore_errors=True)
    config = inference.Config(str(files.program), str(files.params))
    _device(config, use_gpu)
    if not use_gpu and not onednn:
        config.disable_onednn()
    config.switch_ir_optim(True)
    config.enable_save_optim_model(True)
    config.set_optim_cache_dir(str(target))
    config.disable_glog_info()
    inference.create_predictor(config)
    suffix = ".pdmodel" if files.format == "legacy" else ".json"
    program = target / f"_optimized{suffix}"
    params = target / "_optimized.pdiparams"
    if not program.exists() or not params.exists():
        raise PrepareError(f"Paddle wrote no optimised program into {target.name}")
    label = "optimised" if onednn or use_gpu else "optimised (no oneDNN)"
    return Candidate(label, program, params, ir_optim=False)


def _device(config: Any, use_gpu: bool) -> None:
    if use_gpu:
        config.enable_use_gpu(256, 0)
    else:
        config.disable_gpu()


def _runner(candidate: Candidate, use_gpu: bool) -> Callable[[dict[str, np.ndarray]], Outputs]:
    from paddle import inference

    config = inference.Config(str(candidate.program), str(candidate.params))
    _device(config, use_gpu)
    config.switch_ir_optim(candidate.ir_optim)
    config.disable_glog_info()
    predictor = inference.create_predictor(config)

    def run(inputs: dict[str, np.ndarray]) -> Outputs:
        for name, array in inputs.items():
            handle = predictor.get_input_handle(name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(np.ascontiguousarray(array))
        predictor.run()
        return {n: predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()}

    return run


def compare(outputs: Outputs, reference: Outputs, rtol: float = RTOL, atol: float = ATOL) -> str:
    """Empty when every reference output is matched; else what differs, per output."""
    problems = []
    for name, ref in reference.items():
        got = outputs.get(name)
        if got is None:
            problems.append(f"'{name}' missing (outputs: {sorted(outputs)})")
        elif got.shape != ref.shape:
            problems.append(f"'{name}' has shape {list(got.shape)}, expected {list(ref.shape)}")
        elif ref.dtype.kind in "biu" or got.dtype.kind in "biu":
            if not np.array_equal(got, ref):
                problems.append(f"'{name}' differs in {int(np.sum(got != ref))} of {ref.size} values")
        else:
            err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)), initial=0.0))
            scale = float(np.max(np.abs(ref.astype(np.float64)), initial=0.0))
            limit = atol + rtol * scale
            if not err <= limit:  # also catches NaN
                problems.append(f"'{name}' max |error| {err:.3g} > tolerance {limit:.3g}")
    return "; ".join(problems)


def max_abs_error(outputs: Outputs, reference: Outputs) -> float:
    errors = [
        float(np.max(np.abs(outputs[n].astype(np.float64) - r.astype(np.float64)), initial=0.0))
        for n, r in reference.items()
        if n in outputs and outputs[n].shape == r.shape
    ]
    return max(errors, default=0.0)


def _check_batching(
    run: Callable[[dict[str, np.ndarray]], Outputs], inputs: dict[str, np.ndarray], single: Outputs
) -> None:
    doubled = run({n: np.concatenate([a, a]) for n, a in inputs.items()})
    for name, one in single.items():
        two = doubled[name]
        rows = one.shape[0] if one.ndim else 0
        if two.ndim == 0 or two.shape[0] != 2 * rows:
            raise PrepareError(
                f"batching: output '{name}' does not follow the batch dimension (shape {list(two.shape)} for a "
                f"doubled batch); deploy without batching"
            )
        error = compare({name: two[:rows]}, {name: one}) or compare({name: two[rows:]}, {name: one})
        if error:
            raise PrepareError(f"batching changes results, deploy without batching: {error}")


def _install(chosen: Candidate, out: Path) -> tuple[str, str]:
    """Place the chosen program in OUT and remove the candidates that lost."""
    names = []
    for src, name in ((chosen.program, "model" + chosen.program.suffix), (chosen.params, "model.pdiparams")):
        dest = out / name
        if src.resolve() != dest.resolve():
            dest.unlink(missing_ok=True)
            try:
                os.link(src, dest)  # the original upload may be large: share its blocks when we can
            except OSError:
                shutil.copyfile(src, dest)
        names.append(name)
    for leftover in ("optimized", "optimized-plain"):
        shutil.rmtree(out / leftover, ignore_errors=True)
    return names[0], names[1]


def _inputs_origin(files: ModelFiles) -> str:
    if files.example_inputs is None:
        return f"synthesised inputs (free dimensions set to 1); add {EXAMPLE_INPUTS} with real inputs"
    return EXAMPLE_INPUTS


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    picked = next(
        (ln for ln in lines if "Error" in ln or "error" in ln), lines[0] if lines else type(exc).__name__
    )
    return picked[:400]


def _print_stage(stage: str) -> None:
    """One JSON line per stage on stdout, before the last line (the manifest, or the error): the platform shows
    deploys' progress from them."""
    print(json.dumps({"stage": stage}), flush=True)


def _confine(src: Path, out: Path, spec: dict[str, Any]) -> None:
    """Before the tenant's program is even read: see only the function's own folder (SRC and OUT in it), as the
    tenant's user, with no network, at a low priority, within CPU, file-size and process limits."""
    from runtime.isolation import Limits, confine

    folder = src.resolve().parent
    if out.resolve().parent != folder:
        raise SystemExit("--confine needs SRC and OUT side by side in one folder")
    os.nice(10)  # deploys yield the CPU to serving
    limits = Limits(
        max_processes=int(spec.get("max_processes", 256)),
        cpu_seconds=int(spec.get("cpu_seconds", 0)),
        max_file_mb=int(spec.get("max_file_mb", 0)),
        max_memory_mb=int(spec.get("max_memory_mb", 0)),
    )
    confine(folder, Path(spec["data_dir"]), int(spec["uid"]), writable=True, limits=limits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.prepare", description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="unpacked model folder")
    p.add_argument("out", type=Path, help="folder to write the prepared model into")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--batching", action="store_true", help="check that the model can be batched")
    p.add_argument(
        "--confine",
        type=json.loads,
        help='JSON {"data_dir", "uid", "cpu_seconds", "max_file_mb", "max_memory_mb", "max_processes"}: confine '
        "this process to the folder holding SRC and OUT, as that user, first (runtime.isolation)",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    if args.confine:
        # Absolute first: confined, the process leaves its working folder for "/" (runtime.isolation).
        args.src, args.out = args.src.resolve(), args.out.resolve()
        _confine(args.src, args.out, args.confine)
    start = time.perf_counter()
    try:
        manifest = prepare(
            args.src, args.out, device=args.device, batching=args.batching, report=_print_stage
        )
    except PrepareError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 2
    result = manifest.to_json()
    result["prepare_seconds"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
