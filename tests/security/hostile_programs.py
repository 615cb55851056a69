"""Paddle programs a hostile tenant would upload, built here (``python -m tests.security.hostile_programs``).

- ``file-op OUT --op TYPE --attr NAME=VALUE [--sub-block]``: the example mlp with one more op of TYPE whose
  string attribute NAME is VALUE (``read_file`` with ``filename=/etc/shadow``, ``save`` with ``file_path=...``),
  in the main block or in a block of its own (as a ``while`` body would be);
- ``pir-file-op OUT --op TYPE --attr NAME=VALUE``: the same in a Paddle 3 PIR program (``model.json``);
- ``forever OUT``: a program whose ``while`` loop never ends (its condition never changes);
- ``slow OUT``: a ``while`` loop that runs ``n`` times, ``n`` being an input: quick on its example inputs
  (n = 3), as long as the caller likes on others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _example_mlp(out: Path, fmt: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "runtime.examples", "mlp", str(out), "--format", fmt],
        check=True,
        capture_output=True,
    )


def file_op(out: Path, op_type: str, attr: str, value: str, sub_block: bool) -> None:
    _example_mlp(out, "legacy")
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString((out / "model.pdmodel").read_bytes())
    block = desc.blocks[0]
    if sub_block:  # a block of its own, as the body of a while or conditional_block op
        block = desc.blocks.add()
        block.idx, block.parent_idx = len(desc.blocks) - 1, 0
    var = block.vars.add()
    var.name = "stolen"
    var.type.type = (
        framework_pb2.VarType.DENSE_TENSOR if hasattr(framework_pb2.VarType, "DENSE_TENSOR") else 7
    )
    op = block.ops.add()
    op.type = op_type
    io = op.outputs.add() if op_type in ("read_file", "load", "load_combine") else op.inputs.add()
    io.parameter = "Out" if op_type in ("read_file", "load", "load_combine") else "X"
    io.arguments.append("stolen")
    attribute = op.attrs.add()
    attribute.name, attribute.type, attribute.s = attr, framework_pb2.STRING, value
    (out / "model.pdmodel").write_bytes(desc.SerializeToString())


def pir_file_op(out: Path, op_type: str, attr: str, value: str) -> None:
    _example_mlp(out, "pir")
    program = json.loads((out / "model.json").read_text())
    ops = program["program"]["regions"][0]["blocks"][0]["ops"]
    ops.insert(
        len(ops) - 1,
        {"#": f"1.{op_type}", "A": [{"AT": {"#": "0.a_str", "D": value}, "N": attr}], "I": [], "O": [],
         "OA": []},
    )  # fmt: skip
    (out / "model.json").write_text(json.dumps(program))


def loop(out: Path, *, forever: bool) -> None:
    import paddle

    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [1, 4], "float32")
        n = paddle.static.data("n", [1], "int64")
        i = paddle.full([1], 0, "int64")
        step = paddle.full([1], 0 if forever else 1, "int64")  # forever: i never grows

        def cond(i, x):  # type: ignore[no-untyped-def]
            return i < n

        def body(i, x):  # type: ignore[no-untyped-def]
            return [i + step, x * 1.0001]

        _, y = paddle.static.nn.while_loop(cond, body, [i, x])
        one = paddle.nn.initializer.Constant(1.0)  # one parameter, so that there is a .pdiparams file
        y = y * paddle.static.create_parameter([4], "float32", default_initializer=one)
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    out.mkdir(parents=True, exist_ok=True)
    paddle.static.save_inference_model(str(out / "model"), [x, n], [y], exe, program=main)
    inputs = {"x": np.ones((1, 4), np.float32), "n": np.array([3], np.int64)}
    np.savez(out / "example_inputs.npz", **inputs)  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["file-op", "pir-file-op", "forever", "slow"])
    p.add_argument("out", type=Path)
    p.add_argument("--op", default="read_file")
    p.add_argument("--attr", default="filename=/etc/passwd")
    p.add_argument("--sub-block", action="store_true")
    args = p.parse_args()
    name, _, value = args.attr.partition("=")
    if args.kind == "file-op":
        file_op(args.out, args.op, name, value, args.sub_block)
    elif args.kind == "pir-file-op":
        pir_file_op(args.out, args.op, name, value)
    else:
        loop(args.out, forever=args.kind == "forever")


if __name__ == "__main__":
    os.environ.setdefault("FLAGS_enable_pir_api", "0")
    main()
