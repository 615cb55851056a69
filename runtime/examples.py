"""Ready-to-deploy example models built in code (random weights, fixed seed, nothing downloaded).

``python -m runtime.examples mlp OUT`` writes OUT/model.pdmodel + model.pdiparams (the legacy format, which
Paddle Inference, Paddle 2.6 on GPUs and Paddle Lite all read; ``--format pir`` writes Paddle 3's model.json),
plus example_inputs.npz and example_outputs.npz: the outputs this Paddle produced, which deploy's golden check
compares against.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = ("mlp", "mobilenet_v3_small", "resnet50", "multi_io")


def build(name: str, out: Path, *, fmt: str = "legacy", seed: int = 0) -> Path:
    """Write the example model into OUT; the caller must have set FLAGS_enable_pir_api before importing Paddle."""
    import paddle
    from paddle.static import InputSpec

    builders: dict[str, Callable[[], tuple[Any, list[Any], dict[str, np.ndarray]]]] = {
        "mlp": lambda: _mlp(paddle, InputSpec),
        "mobilenet_v3_small": lambda: _vision(paddle, InputSpec, "mobilenet_v3_small"),
        "resnet50": lambda: _vision(paddle, InputSpec, "resnet50"),
        "multi_io": lambda: _multi_io(paddle, InputSpec),
    }
    if name not in builders:
        raise ValueError(f"unknown example '{name}'; choose one of {', '.join(EXAMPLES)}")
    paddle.seed(seed)
    layer, specs, inputs = builders[name]()
    layer.eval()
    out.mkdir(parents=True, exist_ok=True)
    paddle.jit.save(layer, str(out / "model"), input_spec=specs)
    with paddle.no_grad():
        result = layer(*[paddle.to_tensor(inputs[s.name]) for s in specs])
    results = result if isinstance(result, (list, tuple)) else [result]
    np.savez(out / "example_inputs.npz", **inputs)  # type: ignore[arg-type]  # numpy stubs: **kwds vs allow_pickle
    outputs = dict(zip(_output_names(out, fmt), [r.numpy() for r in results], strict=True))
    np.savez(out / "example_outputs.npz", **outputs)
    for leftover in out.glob("*.pdiparams.info"):
        leftover.unlink()
    return out


def _output_names(out: Path, fmt: str) -> list[str]:
    """The names Paddle Inference will give the outputs (fetch targets), read back from the saved program."""
    if fmt == "pir":
        import paddle

        paddle.enable_static()
        try:
            program, _, _ = paddle.static.load_inference_model(str(out / "model"), paddle.static.Executor())
            cols = {
                int(op.attrs()["col"]): op.attrs()["name"]
                for op in program.global_block().ops
                if op.name() == "pd_op.fetch"
            }
        finally:
            paddle.disable_static()
        return [cols[i] for i in sorted(cols)]
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()  # type: ignore[attr-defined]  # generated protobuf module
    desc.ParseFromString((out / "model.pdmodel").read_bytes())
    fetch = sorted(
        (next(a.i for a in op.attrs if a.name == "col"), op.inputs[0].arguments[0])
        for op in desc.blocks[0].ops
        if op.type == "fetch"
    )
    return [name for _, name in fetch]


def _mlp(paddle: Any, InputSpec: Any) -> tuple[Any, list[Any], dict[str, np.ndarray]]:
    class MLP(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = paddle.nn.Linear(16, 64)
            self.out = paddle.nn.Linear(64, 4)

        def forward(self, x: Any) -> Any:
            return paddle.nn.functional.softmax(self.out(paddle.nn.functional.relu(self.hidden(x))))

    x = np.random.default_rng(1).standard_normal((2, 16)).astype("float32")
    return MLP(), [InputSpec([None, 16], "float32", "x")], {"x": x}


def _vision(paddle: Any, InputSpec: Any, arch: str) -> tuple[Any, list[Any], dict[str, np.ndarray]]:
    import paddle.vision.models as models

    net = getattr(models, arch)(pretrained=False)
    image = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    return net, [InputSpec([None, 3, 224, 224], "float32", "image")], {"image": image}


def _multi_io(paddle: Any, InputSpec: Any) -> tuple[Any, list[Any], dict[str, np.ndarray]]:
    """Several inputs and outputs of different datatypes (FP32, INT64, BOOL, FP64, INT32)."""

    class MultiIO(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.proj = paddle.nn.Linear(4, 3)

        def forward(self, x: Any, ids: Any, mask: Any, scale: Any) -> Any:
            ids_mean = paddle.mean(paddle.cast(ids, "float32"), axis=-1, keepdim=True)
            score = self.proj(x) + ids_mean
            flags = paddle.cast(paddle.cast(mask, "int32") * 0 + 1, "bool")
            return score, ids * 2, flags, scale * 2.0, paddle.cast(ids, "int32") + 1

    rng = np.random.default_rng(1)
    inputs = {
        "x": rng.standard_normal((2, 4)).astype("float32"),
        "ids": rng.integers(0, 100, (2, 3)).astype("int64"),
        "mask": rng.integers(0, 2, (2, 3)).astype(bool),
        "scale": rng.standard_normal((2, 2)).astype("float64"),
    }
    specs = [
        InputSpec([None, 4], "float32", "x"),
        InputSpec([None, 3], "int64", "ids"),
        InputSpec([None, 3], "bool", "mask"),
        InputSpec([None, 2], "float64", "scale"),
    ]
    return MultiIO(), specs, inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.examples", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=EXAMPLES)
    p.add_argument("out", type=Path)
    p.add_argument("--format", choices=["legacy", "pir"], default="legacy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # The program format is chosen when Paddle is imported, so this must come first.
    os.environ["FLAGS_enable_pir_api"] = "0" if args.format == "legacy" else "1"  # noqa: SIM112 (Paddle's spelling)
    os.environ.setdefault("GLOG_minloglevel", "2")
    build(args.name, args.out, fmt=args.format, seed=args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
