"""Open Inference Protocol v2 tensors: decode a request against a model's spec, encode a response.

JSON tensors (``data`` flat in row-major order, or nested) and the binary tensor extension (tensor bytes after
the JSON header, whose length travels in ``Inference-Header-Content-Length``) are both supported, in and out,
as KServe and Triton clients send them. Every way a request can be wrong raises :class:`InvalidRequest`
with a message that names the tensor and the spec the model expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from runtime.spec import OIP_TO_NUMPY, ModelSpec, TensorSpec, oip_datatype

HEADER_LENGTH = "inference-header-content-length"


class InvalidRequest(ValueError):
    """The request cannot be served as sent; the message says what to change (HTTP 400)."""


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None  # None: every output, in the model's order
    binary_output: bool  # request-wide default for outputs not listed
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        first = next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


def decode_request(body: bytes, header_length: int | None, spec: ModelSpec) -> InferRequest:
    header, binary = _split_body(body, header_length)
    if not isinstance(header, dict):
        raise InvalidRequest("request body must be a JSON object with an 'inputs' list")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest("request must have a non-empty 'inputs' list of tensors")

    expected = {t.name: t for t in spec.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        tensor, used = _decode_input(raw, expected, binary, offset)
        if tensor[0] in inputs:
            raise InvalidRequest(f"input '{tensor[0]}' is given twice")
        inputs[tensor[0]] = tensor[1]
        offset += used
    if offset != len(binary):
        raise InvalidRequest(
            f"binary data is {len(binary)} bytes but the inputs' binary_data_size add up to {offset}"
        )
    missing = [t.describe() for name, t in expected.items() if name not in inputs]
    if missing:
        raise InvalidRequest(f"missing input(s): {', '.join(missing)}")

    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest("'parameters' must be a JSON object")
    request_id = header.get("id")
    return InferRequest(
        id=None if request_id is None else str(request_id),
        inputs=inputs,
        outputs=_decode_outputs(header.get("outputs"), spec, bool(params.get("binary_data_output", False))),
        binary_output=bool(params.get("binary_data_output", False)),
        parameters=params,
    )


def encode_response(
    model_name: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers it needs (content type; header length for binary outputs)."""
    wanted = request.outputs or [RequestedOutput(name, request.binary_output) for name in outputs]
    chunks: list[bytes] = []
    entries = []
    for out in wanted:
        array = np.ascontiguousarray(outputs[out.name])
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": oip_datatype(array.dtype),
            "shape": list(array.shape),
        }
        if out.binary:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": entries}
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = parameters
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def encode_binary_request(inputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A client's OIP request in the binary tensor extension (as tritonclient sends it): a JSON header, then the
    raw tensor bytes; returns (body, headers). For tests, benchmarks and tools: the server never sends one."""
    header = orjson.dumps({
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": oip_datatype(a.dtype),
             "parameters": {"binary_data_size": a.nbytes}}
            for n, a in inputs.items()
        ]
    })  # fmt: skip
    body = header + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
    return body, {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}


def _split_body(body: bytes, header_length: int | None) -> tuple[Any, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
            )
        json_part, binary = body[:header_length], body[header_length:]
    try:
        return orjson.loads(json_part), binary
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request is not valid JSON: {exc}") from None


def _decode_input(
    raw: Any, expected: dict[str, TensorSpec], binary: bytes, offset: int
) -> tuple[tuple[str, np.ndarray], int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise InvalidRequest("each input must be an object with 'name', 'shape', 'datatype' and 'data'")
    name = raw["name"]
    spec = expected.get(name)
    if spec is None:
        takes = ", ".join(t.describe() for t in expected.values())
        raise InvalidRequest(f"unknown input '{name}'; this model takes: {takes}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidRequest(
            f"input '{name}': 'shape' must be a list of integers, expected {spec.describe()}"
        )
    datatype = raw.get("datatype")
    if datatype != spec.datatype:
        hint = "" if datatype in OIP_TO_NUMPY else f" ({datatype!r} is not a supported datatype)"
        raise InvalidRequest(
            f"input '{name}' has datatype {datatype}{hint} but the model expects {spec.describe()}"
        )
    if len(shape) != len(spec.shape) or any(
        d <= 0 or (want >= 0 and d != want) for d, want in zip(shape, spec.shape, strict=False)
    ):
        raise InvalidRequest(f"input '{name}' has shape {shape} but the model expects {spec.describe()}")

    count = math.prod(shape)
    params = raw.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        expected_size = count * spec.dtype.itemsize
        if not isinstance(size, int) or isinstance(size, bool) or size != expected_size:
            raise InvalidRequest(
                f"input '{name}': binary_data_size is {size} but shape {shape} of {spec.datatype} needs "
                f"{expected_size} bytes"
            )
        if offset + size > len(binary):
            raise InvalidRequest(f"input '{name}': the body ends before its {size} bytes of binary data")
        array = np.frombuffer(binary, dtype=spec.dtype, count=count, offset=offset).reshape(shape)
        return (name, array), size
    if "data" not in raw:
        raise InvalidRequest(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    return (name, _json_tensor(name, raw["data"], shape, spec)), 0


def _json_tensor(name: str, data: Any, shape: list[int], spec: TensorSpec) -> np.ndarray:
    try:
        loose = np.asarray(data)
    except ValueError:
        raise InvalidRequest(f"input '{name}': 'data' is a ragged nested list") from None
    if loose.size != math.prod(shape):
        raise InvalidRequest(
            f"input '{name}': shape {shape} needs {math.prod(shape)} values, got {loose.size}"
        )
    kind = loose.dtype.kind
    want = spec.dtype.kind
    if loose.size and not _kind_fits(kind, want):
        raise InvalidRequest(
            f"input '{name}': 'data' holds {_kind_name(kind)} values but {spec.datatype} was declared"
        )
    if loose.size and want in "iuf":
        # A value the datatype cannot hold would wrap around (integers) or become inf (floats): refuse it.
        if want == "f":
            least, most = float(np.finfo(spec.dtype).min), float(np.finfo(spec.dtype).max)
        else:
            least, most = int(np.iinfo(spec.dtype).min), int(np.iinfo(spec.dtype).max)
        low, high = loose.min().item(), loose.max().item()
        if low < least or high > most:
            raise InvalidRequest(
                f"input '{name}': value {low if low < least else high} is out of range for {spec.datatype} "
                f"({least} to {most})"
            )
    return loose.astype(spec.dtype, copy=False).reshape(shape)


def _kind_fits(have: str, want: str) -> bool:
    """JSON gives bools, ints and floats: ints may fill float tensors, nothing else is converted silently."""
    if want == "b":
        return have == "b"
    if want in "iu":
        return have in "iu"
    if want == "f":
        return have in "iuf"
    return False


def _kind_name(kind: str) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point"}.get(kind, "non-numeric")


def _decode_outputs(raw: Any, spec: ModelSpec, default_binary: bool) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("'outputs' must be a list of {'name': ...} objects")
    known = {t.name for t in spec.outputs}
    wanted = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest("each requested output must be an object with a 'name'")
        if item["name"] not in known:
            names = ", ".join(t.name for t in spec.outputs)
            raise InvalidRequest(f"unknown output '{item['name']}'; this model's outputs are: {names}")
        params = item.get("parameters") or {}
        binary = (
            bool(params.get("binary_data", default_binary)) if isinstance(params, dict) else default_binary
        )
        wanted.append(RequestedOutput(item["name"], binary))
    return wanted or None
