"""Deploy-time conversion of a legacy Paddle program to a Paddle Lite ``.nb``, and its golden check.

Three steps, each of which can fail without failing the deploy (the model is still served by Paddle Inference;
the manifest's ``lite`` field says why Lite is unavailable):
1. normalise: current Paddle exports leave out attributes that Lite 2.12 reads unconditionally (``relu6``
   has no ``threshold`` any more, and Lite aborts on it). A copy of the ProgramDesc gets the missing
   attributes filled in: first from Paddle's own op definitions (their declared defaults), then from
   ``LITE_EXPECTS`` for attributes Paddle has dropped altogether (values: the defaults Paddle 2.x declared,
   which is what the op computes today). The upload itself is never modified.
2. optimise: ``paddle_lite_opt`` in its own process with a time limit, because it segfaults or aborts on some
   models (DESIGN.md): a crash or a hang becomes a reason, never harm to the deploy.
3. check: the ``.nb`` runs in a Lite host on the golden inputs and must match the reference outputs within
   ``LITE_RTOL``/``LITE_ATOL`` (the same rule as the Paddle golden check, ``runtime.prepare.compare``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from runtime.lite import LITE_VERSION, lite_optimizer, unavailable_reason

# Lite's kernels differ from Paddle's in summation order; measured max error on conv models was 3.4e-5.
LITE_RTOL = 1e-3
LITE_ATOL = 1e-4
# The optimiser takes about a second on MobileNetV3; a hang is cut off well inside the platform's 600 s deploy
# timeout, so that a stuck conversion costs Lite only, never the deploy (tests set it tiny to see that).
OPT_TIMEOUT_S = float(os.environ.get("PADDLEFN_LITE_OPT_TIMEOUT_S", "120"))
NB_NAME = "model.nb"
SOURCE_DIR = "lite"  # normalised legacy program kept for later conversions (e.g. arm, at edge export)

# Attributes Lite 2.12 requires that current Paddle no longer declares: {op: {attr: default}}.
LITE_EXPECTS: dict[str, dict[str, float]] = {
    "relu6": {"threshold": 6.0},  # Paddle 2.x: relu6(threshold=6.0); Paddle 3 fixed it at 6
    "swish": {"beta": 1.0},  # Paddle 2.x: swish(beta=1.0); Paddle 3 fixed it at 1
}
# Bookkeeping attributes every op has; Lite never reads them, so they are not worth filling in.
_SKIP = {"op_role", "op_role_var", "op_namescope", "op_callstack", "op_device", "with_quant_attr"}


class ConversionError(Exception):
    """Lite cannot serve this model; the message is the reason shown to the user."""


def normalise_program(src: Path, dest: Path) -> list[str]:
    """Write SRC's ProgramDesc to DEST with missing attributes filled in; return what was added."""
    from paddle.base import core
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()  # type: ignore[attr-defined]  # generated protobuf: no stubs
    try:
        desc.ParseFromString(src.read_bytes())
    except Exception as exc:
        raise ConversionError(f"{src.name} is not a readable Paddle program: {exc}") from None
    added: dict[str, int] = {}
    for block in desc.blocks:
        for op in block.ops:
            have = {a.name for a in op.attrs}
            for name, value in _missing_defaults(core, op.type, have).items():
                if _append_attr(framework_pb2, op, name, value):
                    key = f"{op.type}.{name}={value!r}"
                    added[key] = added.get(key, 0) + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(desc.SerializeToString())
    return [f"{k} (x{n})" if n > 1 else k for k, n in sorted(added.items())]


def _missing_defaults(core: Any, op_type: str, have: set[str]) -> dict[str, Any]:
    try:
        declared = dict(core.get_op_attrs_default_value(op_type.encode()))
        # "Extra" attributes tune Paddle's own kernels (oneDNN, quantizer); they never change results.
        extra = set(core.get_op_extra_attrs(op_type))
    except Exception:  # ops Paddle no longer knows by this name have no declared defaults
        declared, extra = {}, set()
    declared = {k: v for k, v in declared.items() if k not in extra}
    declared.update(LITE_EXPECTS.get(op_type, {}))
    return {k: v for k, v in declared.items() if k not in have and k not in _SKIP}


def _append_attr(pb: Any, op: Any, name: str, value: Any) -> bool:
    """Add one attribute of a plain type (bool/int/float/str or a list of one); others are left alone."""
    kinds = pb.AttrType
    attr = op.attrs.add()
    attr.name = name
    if isinstance(value, bool):
        attr.type, attr.b = kinds.BOOLEAN, value
    elif isinstance(value, int):
        if -(2**31) <= value < 2**31:
            attr.type, attr.i = kinds.INT, value
        else:
            attr.type, attr.l = kinds.LONG, value
    elif isinstance(value, float):
        attr.type, attr.f = kinds.FLOAT, value
    elif isinstance(value, str):
        attr.type, attr.s = kinds.STRING, value
    elif isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        attr.type = kinds.BOOLEANS
        attr.bools.extend(value)
    elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        attr.type = kinds.INTS
        attr.ints.extend(value)
    elif isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        attr.type = kinds.FLOATS
        attr.floats.extend(value)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        attr.type = kinds.STRINGS
        attr.strings.extend(value)
    else:  # empty lists (type unknown), blocks, scalars: Lite reads none of these without Paddle writing them
        del op.attrs[-1]
        return False
    return True


def optimise(
    program: Path,
    params: Path,
    nb: Path,
    *,
    target: str = "x86",
    timeout_s: float = OPT_TIMEOUT_S,
    optimizer: Path | None = None,
) -> None:
    """Run ``paddle_lite_opt`` in its own process; write NB or raise ConversionError with the reason."""
    if target not in ("x86", "arm"):
        raise ValueError(f"target must be x86 or arm, not {target!r}")
    optimizer = optimizer or lite_optimizer()
    if optimizer is None:
        raise ConversionError(unavailable_reason())
    nb.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lite-opt-") as tmp:
        out = Path(tmp) / "model"  # the optimiser appends .nb itself
        command = [
            str(optimizer),
            f"--model_file={program.resolve()}",  # resolved: the optimiser runs in a scratch folder
            f"--param_file={params.resolve()}",
            "--optimize_out_type=naive_buffer",
            f"--optimize_out={out}",
            f"--valid_targets={target}",
        ]
        try:
            # A new session, so that on timeout the whole process group (the Python wrapper and anything it
            # started) is killed, not only the wrapper.
            with subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True
            ) as proc:
                try:
                    log, _ = proc.communicate(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    raise ConversionError(
                        f"paddle_lite_opt did not finish within {timeout_s:g} s converting for {target}"
                    ) from None
        except OSError as exc:
            raise ConversionError(f"paddle_lite_opt could not be started: {exc}") from None
        text = log.decode(errors="replace")
        produced = out.with_suffix(".nb")
        if proc.returncode != 0 or not produced.exists():
            raise ConversionError(
                f"paddle_lite_opt {_how(proc.returncode)} converting for {target}: {_why(text)}"
            )
        shutil.move(str(produced), nb)


def _how(code: int) -> str:
    if code < 0 or code > 128:
        number = -code if code < 0 else code - 128
        try:
            return f"crashed ({signal.Signals(number).name})"
        except ValueError:
            return f"crashed (signal {number})"
    return f"failed (status {code})"


def _why(log: str) -> str:
    """Lite's fatal lines read '[F 11/23 ... file.cc:118 Fn] Check failed: ...', the message sometimes on the
    next line: keep the message part."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("[F ") or "Check failed" in ln or "Error" in ln:
            message = ln.split("] ", 1)[1] if ln.startswith("[") and "] " in ln else ln
            if not message.strip() and i + 1 < len(lines):
                message = lines[i + 1]
            return message.strip()[:400]
    return (lines[-1] if lines else "no output")[:400]


def convert_for_deploy(
    program: Path,
    params: Path,
    out: Path,
    golden_inputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    output_names: list[str],
    *,
    timeout_s: float = OPT_TIMEOUT_S,
) -> dict[str, Any]:
    """The manifest's ``lite`` field for a legacy program: normalise, convert for x86 into OUT, check."""
    from runtime.prepare import compare, max_abs_error

    result: dict[str, Any] = {
        "available": False,
        "reason": "",
        "version": LITE_VERSION,
        "target": "x86",
        "rtol": LITE_RTOL,
        "atol": LITE_ATOL,
    }
    reason = unavailable_reason()
    if reason:
        return {**result, "reason": reason}
    source = out / SOURCE_DIR
    try:
        # Keep the normalised source: an edge export for arm converts it again without Paddle.
        result["normalised"] = normalise_program(program, source / "model.pdmodel")
        _link(params, source / "model.pdiparams")
        optimise(source / "model.pdmodel", source / "model.pdiparams", out / NB_NAME, timeout_s=timeout_s)
        outputs = run_nb(out / NB_NAME, golden_inputs, output_names)
    except ConversionError as exc:
        shutil.rmtree(source, ignore_errors=True)
        (out / NB_NAME).unlink(missing_ok=True)
        return {**result, "reason": str(exc)}
    error = compare(outputs, reference, rtol=LITE_RTOL, atol=LITE_ATOL)
    result["max_abs_error"] = max_abs_error(outputs, reference)
    if error:
        (out / NB_NAME).unlink(missing_ok=True)
        return {**result, "reason": f"Paddle Lite's outputs differ from the reference: {error}"}
    return {**result, "available": True, "nb": NB_NAME}


def run_nb(nb: Path, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Run NB once in a Lite host; outputs named by NAMES in the program's order."""
    from runtime.engine import EngineError
    from runtime.lite.engine import LiteHost, LiteUnavailable

    try:
        host = LiteHost(nb)
    except (EngineError, LiteUnavailable) as exc:
        raise ConversionError(f"Paddle Lite cannot load the converted model: {exc}") from None
    try:
        outputs, _ = host.infer(inputs)
    except EngineError as exc:
        raise ConversionError(f"Paddle Lite cannot run the golden inputs: {exc}") from None
    finally:
        host.close()
    if len(outputs) != len(names):
        raise ConversionError(f"Paddle Lite gives {len(outputs)} outputs, the program declares {len(names)}")
    return dict(zip(names, outputs, strict=True))


def _link(src: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)  # weights can be large: share the upload's blocks when we can
    except OSError:
        shutil.copyfile(src, dest)
