"""What a served model looks like from outside: its tensors, and the manifest that deploy writes.

The manifest is the only contract between deploy (``runtime.prepare``) and serving (``runtime.server``,
the platform's gateway, the Paddle Lite host): a JSON file beside the prepared program. Everything here is
stdlib + numpy so that any process can read it without importing Paddle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
GOLDEN_INPUTS = "golden_inputs.npz"
GOLDEN_OUTPUTS = "golden_outputs.npz"

# Open Inference Protocol datatype <-> numpy dtype. BYTES is left out: Paddle Inference has no string tensors.
OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_OIP: dict[np.dtype[Any], str] = {v: k for k, v in OIP_TO_NUMPY.items()}


def oip_datatype(dtype: np.dtype[Any] | str) -> str:
    """The OIP name of a numpy (or Paddle-style, e.g. ``"float32"``) dtype."""
    try:
        return NUMPY_TO_OIP[np.dtype(dtype)]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"datatype {dtype!s} has no Open Inference Protocol equivalent") from exc


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, OIP datatype and shape (-1 marks a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return OIP_TO_NUMPY[self.datatype]

    def describe(self) -> str:
        dims = ", ".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.name}: {self.datatype}[{dims}]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class ModelSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batchable(self) -> bool:
        """True when every input and output has a free first dimension, so requests can be stacked."""
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] < 0 for t in tensors)

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            tuple(TensorSpec.from_json(t) for t in data["outputs"]),
        )


@dataclass
class Manifest:
    """Written by deploy next to the prepared model; read by every engine that serves it."""

    format: str  # "legacy" (model.pdmodel) or "pir" (model.json)
    program: str  # file name of the program to serve, relative to the manifest's folder
    params: str
    ir_optim: bool  # whether the engine must still run Paddle's IR passes at load time
    device: str  # device class the program was prepared for: "cpu" or "gpu"
    spec: ModelSpec
    paddle_version: str
    golden: dict[str, Any] = field(default_factory=dict)  # tolerance, max error and what was compared
    notes: list[str] = field(default_factory=list)  # things a person should know (e.g. optimisation skipped)
    lite: dict[str, Any] = field(default_factory=dict)  # Paddle Lite conversion result, when attempted

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["spec"] = ModelSpec.from_json(data["spec"])
        return cls(**data)

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        return cls.from_json(json.loads((folder / MANIFEST_NAME).read_text()))
