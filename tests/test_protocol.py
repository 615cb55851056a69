"""runtime.protocol: OIP v2 requests decoded against a model spec, responses encoded; JSON and binary tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from runtime.protocol import (
    HEADER_LENGTH,
    InferRequest,
    InvalidRequest,
    RequestedOutput,
    decode_request,
    encode_response,
)
from runtime.spec import OIP_TO_NUMPY, ModelSpec, TensorSpec

X_SPEC = ModelSpec(inputs=(TensorSpec("x", "FP32", (-1, 16)),), outputs=(TensorSpec("y", "FP32", (-1, 4)),))
TWO_SPEC = ModelSpec(
    inputs=(TensorSpec("x", "FP32", (-1, 4)), TensorSpec("ids", "INT64", (-1, 3))),
    outputs=(
        TensorSpec("score", "FP32", (-1, 3)),
        TensorSpec("ids2", "INT64", (-1, 3)),
        TensorSpec("flags", "BOOL", (-1, 3)),
    ),
)
ALL_DATATYPES = sorted(OIP_TO_NUMPY)


def random_array(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that use the datatype's range: negative, fractional, tiny and large where it has them."""
    rng = np.random.default_rng(seed)
    dtype = OIP_TO_NUMPY[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    values = rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 4, shape)
    return values.astype(dtype)


def json_body(tensors: dict[str, np.ndarray], **extra: Any) -> bytes:
    doc = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": datatype_of(a), "data": a.ravel().tolist()}
            for n, a in tensors.items()
        ],
        **extra,
    }
    return orjson.dumps(doc)


def binary_body(tensors: dict[str, np.ndarray], **extra: Any) -> tuple[bytes, int]:
    header = orjson.dumps({
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": datatype_of(a),
             "parameters": {"binary_data_size": a.nbytes}}
            for n, a in tensors.items()
        ],
        **extra,
    })  # fmt: skip
    return header + b"".join(np.ascontiguousarray(a).tobytes() for a in tensors.values()), len(header)


def datatype_of(array: np.ndarray) -> str:
    return next(k for k, v in OIP_TO_NUMPY.items() if v == array.dtype)


def spec_for(datatype: str, shape: tuple[int, ...] = (-1, 2, 3)) -> ModelSpec:
    return ModelSpec(
        inputs=(TensorSpec("t", datatype, shape),), outputs=(TensorSpec("out", datatype, shape),)
    )


def parse_response(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The response document and its outputs as arrays, wherever each output's data travelled."""
    if HEADER_LENGTH in headers:
        assert headers["content-type"] == "application/octet-stream"
        length = int(headers[HEADER_LENGTH])
        doc, rest = orjson.loads(body[:length]), body[length:]
    else:
        assert headers["content-type"] == "application/json"
        doc, rest = orjson.loads(body), b""
    arrays, offset = {}, 0
    for out in doc["outputs"]:
        dtype = OIP_TO_NUMPY[out["datatype"]]
        if "data" in out:
            assert "parameters" not in out
            arrays[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            size = out["parameters"]["binary_data_size"]
            arrays[out["name"]] = np.frombuffer(
                rest, dtype, count=size // dtype.itemsize, offset=offset
            ).reshape(out["shape"])
            offset += size
    assert offset == len(rest), "binary outputs do not account for every byte after the header"
    return doc, arrays


def assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        # bit-exact: NaN-free values, and -0.0 vs 0.0 would also be caught by comparing the bytes
        assert got[name].tobytes() == np.ascontiguousarray(array).tobytes(), name


# ---------------------------------------------------------------------------------------------- JSON inputs


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_json_tensor_of_every_datatype_decodes_exactly(datatype: str) -> None:
    array = random_array(datatype, (2, 2, 3))
    request = decode_request(json_body({"t": array}), None, spec_for(datatype))
    assert_identical(request.inputs, {"t": array})
    assert request.batch_size == 2


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_nested_data_is_the_same_as_flat_data(datatype: str) -> None:
    array = random_array(datatype, (2, 2, 3), seed=1)
    body = orjson.dumps(
        {"inputs": [{"name": "t", "shape": [2, 2, 3], "datatype": datatype, "data": array.tolist()}]}
    )
    request = decode_request(body, None, spec_for(datatype))
    assert_identical(request.inputs, {"t": array})


def test_json_integers_fill_float_tensors() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "t", "shape": [1, 2, 3], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 6]}]}
    )
    request = decode_request(body, None, spec_for("FP64"))
    np.testing.assert_array_equal(request.inputs["t"], np.arange(1, 7, dtype=np.float64).reshape(1, 2, 3))
    assert request.inputs["t"].dtype == np.float64


def test_extreme_values_of_a_datatype_are_accepted() -> None:
    for datatype in ("INT32", "INT64", "UINT8", "INT8", "INT16"):
        info = np.iinfo(OIP_TO_NUMPY[datatype])
        array = np.array([[[info.min, info.max, 0], [info.min, info.max, -0]]], OIP_TO_NUMPY[datatype])
        assert_identical(
            decode_request(json_body({"t": array}), None, spec_for(datatype)).inputs, {"t": array}
        )
    big = np.array(
        [[[np.finfo(np.float32).max, np.finfo(np.float32).min, np.finfo(np.float32).tiny]] * 2], np.float32
    )
    assert_identical(decode_request(json_body({"t": big}), None, spec_for("FP32")).inputs, {"t": big})


def test_request_id_parameters_and_fixed_dimensions() -> None:
    spec = ModelSpec(inputs=(TensorSpec("img", "FP32", (1, 2, 2)),), outputs=(TensorSpec("o", "FP32", (1,)),))
    array = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    body = json_body({"img": array}, id=42, parameters={"priority": 1})
    request = decode_request(body, None, spec)
    assert request.id == "42"
    assert request.parameters == {"priority": 1}
    assert request.outputs is None
    assert request.binary_output is False
    assert_identical(request.inputs, {"img": array})


def test_several_inputs_in_any_order() -> None:
    x = random_array("FP32", (3, 4))
    ids = random_array("INT64", (3, 3))
    request = decode_request(json_body({"ids": ids, "x": x}), None, TWO_SPEC)
    assert_identical(request.inputs, {"ids": ids, "x": x})
    assert request.batch_size == 3


# -------------------------------------------------------------------------------------------- binary inputs


def test_binary_tensors_of_every_datatype_in_one_request() -> None:
    spec = ModelSpec(
        inputs=tuple(TensorSpec(d.lower(), d, (-1, 5)) for d in ALL_DATATYPES),
        outputs=(TensorSpec("o", "FP32", (-1,)),),
    )
    tensors = {d.lower(): random_array(d, (3, 5), seed=i) for i, d in enumerate(ALL_DATATYPES)}
    body, length = binary_body(tensors)
    request = decode_request(body, length, spec)
    assert_identical(request.inputs, tensors)


def test_binary_and_json_inputs_mixed() -> None:
    x = random_array("FP32", (2, 4))
    ids = random_array("INT64", (2, 3))
    header = orjson.dumps({
        "inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "ids", "shape": [2, 3], "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
        ]
    })  # fmt: skip
    request = decode_request(header + ids.tobytes(), len(header), TWO_SPEC)
    assert_identical(request.inputs, {"x": x, "ids": ids})


def test_header_length_without_binary_data_is_plain_json() -> None:
    body = json_body({"t": random_array("INT32", (1, 2, 3))})
    request = decode_request(body, len(body), spec_for("INT32"))
    assert request.inputs["t"].shape == (1, 2, 3)


# ------------------------------------------------------------------------------------------------ responses


def request_for(outputs: list[RequestedOutput] | None = None, binary: bool = False, id: str | None = None):
    return InferRequest(id=id, inputs={}, outputs=outputs, binary_output=binary)


def model_outputs() -> dict[str, np.ndarray]:
    return {
        "score": random_array("FP32", (2, 3), seed=5),
        "ids2": random_array("INT64", (2, 3), seed=6),
        "flags": random_array("BOOL", (2, 3), seed=7),
    }


def test_json_response_with_every_output_in_order() -> None:
    outputs = model_outputs()
    body, headers = encode_response("classify", request_for(id="req-1"), outputs, {"engine": "paddle"})
    doc, arrays = parse_response(body, headers)
    assert headers == {"content-type": "application/json"}
    assert doc["model_name"] == "classify"
    assert doc["model_version"] == "1"
    assert doc["id"] == "req-1"
    assert doc["parameters"] == {"engine": "paddle"}
    assert [(o["name"], o["datatype"], o["shape"]) for o in doc["outputs"]] == [
        ("score", "FP32", [2, 3]),
        ("ids2", "INT64", [2, 3]),
        ("flags", "BOOL", [2, 3]),
    ]
    assert all(isinstance(o["data"], list) and len(o["data"]) == 6 for o in doc["outputs"])  # flat
    assert_identical(arrays, outputs)


def test_response_without_id_has_no_id() -> None:
    body, headers = encode_response("m", request_for(), model_outputs())
    doc, _ = parse_response(body, headers)
    assert "id" not in doc
    assert "parameters" not in doc


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_json_response_round_trips_every_datatype_exactly(datatype: str) -> None:
    array = random_array(datatype, (4, 3), seed=11)
    body, headers = encode_response("m", request_for(), {"out": array})
    doc, arrays = parse_response(body, headers)
    assert doc["outputs"][0]["datatype"] == datatype
    assert_identical(arrays, {"out": array})


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_binary_response_round_trips_every_datatype_exactly(datatype: str) -> None:
    array = random_array(datatype, (4, 3), seed=12)
    body, headers = encode_response("m", request_for(binary=True), {"out": array})
    doc, arrays = parse_response(body, headers)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": array.nbytes}
    assert_identical(arrays, {"out": array})


def test_non_contiguous_outputs_are_sent_in_row_major_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T  # Fortran order view
    for binary in (False, True):
        body, headers = encode_response("m", request_for(binary=binary), {"out": array})
        _, arrays = parse_response(body, headers)
        np.testing.assert_array_equal(arrays["out"], array)


def test_binary_data_output_parameter_makes_every_output_binary() -> None:
    x = random_array("FP32", (2, 4))
    ids = random_array("INT64", (2, 3))
    request = decode_request(
        json_body({"x": x, "ids": ids}, parameters={"binary_data_output": True}), None, TWO_SPEC
    )
    assert request.binary_output is True
    assert request.outputs is None
    outputs = model_outputs()
    body, headers = encode_response("m", request, outputs)
    doc, arrays = parse_response(body, headers)
    assert int(headers[HEADER_LENGTH]) < len(body)
    assert all("data" not in o for o in doc["outputs"])
    assert_identical(arrays, outputs)


def test_outputs_selection_with_per_output_binary_data() -> None:
    x = random_array("FP32", (2, 4))
    ids = random_array("INT64", (2, 3))
    wanted = [{"name": "flags", "parameters": {"binary_data": True}}, {"name": "score"}]
    request = decode_request(json_body({"x": x, "ids": ids}, outputs=wanted), None, TWO_SPEC)
    assert request.outputs == [RequestedOutput("flags", True), RequestedOutput("score", False)]
    outputs = model_outputs()
    body, headers = encode_response("m", request, outputs)
    doc, arrays = parse_response(body, headers)
    # only the selected outputs, in the order asked for; ids2 is left out
    assert [o["name"] for o in doc["outputs"]] == ["flags", "score"]
    assert "data" not in doc["outputs"][0]
    assert "data" in doc["outputs"][1]
    assert_identical(arrays, {"flags": outputs["flags"], "score": outputs["score"]})


def test_request_wide_binary_default_can_be_overridden_per_output() -> None:
    x = random_array("FP32", (2, 4))
    ids = random_array("INT64", (2, 3))
    wanted = [{"name": "ids2"}, {"name": "score", "parameters": {"binary_data": False}}]
    body = json_body({"x": x, "ids": ids}, outputs=wanted, parameters={"binary_data_output": True})
    request = decode_request(body, None, TWO_SPEC)
    assert request.outputs == [RequestedOutput("ids2", True), RequestedOutput("score", False)]
    outputs = model_outputs()
    doc, arrays = parse_response(*encode_response("m", request, outputs))
    assert "data" not in doc["outputs"][0]
    assert len(doc["outputs"][1]["data"]) == outputs["score"].size  # JSON, flat
    assert_identical(arrays, {"ids2": outputs["ids2"], "score": outputs["score"]})


def test_empty_outputs_list_means_every_output() -> None:
    request = decode_request(
        json_body({"t": random_array("FP32", (1, 2, 3))}, outputs=[]), None, spec_for("FP32")
    )
    assert request.outputs is None


def test_request_to_response_round_trip_through_binary_and_json() -> None:
    """What a client sends in binary comes back value-exactly as JSON, and the other way round."""
    x = random_array("FP32", (3, 4), seed=21)
    ids = random_array("INT64", (3, 3), seed=22)
    body, length = binary_body({"x": x, "ids": ids})
    request = decode_request(body, length, TWO_SPEC)
    echoed = {"score": request.inputs["x"][:, :3], "ids2": request.inputs["ids"]}
    _, arrays = parse_response(*encode_response("m", request, echoed))
    assert_identical(arrays, {"score": x[:, :3], "ids2": ids})

    request = decode_request(
        json_body({"x": x, "ids": ids}, parameters={"binary_data_output": True}), None, TWO_SPEC
    )
    _, arrays = parse_response(*encode_response("m", request, dict(request.inputs)))
    assert_identical(arrays, {"x": x, "ids": ids})


# --------------------------------------------------------------------------------------------------- errors


def x_input(**fields: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
    tensor.update(fields)
    return {k: v for k, v in tensor.items() if v is not None}


def body_of(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


FLOATS_64 = np.arange(16, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        pytest.param(
            body_of(x_input(name="y")),
            None,
            "unknown input 'y'; this model takes: x: FP32[?, 16]",
            id="unknown-input",
        ),
        pytest.param(
            body_of(x_input(datatype="FP64")),
            None,
            "input 'x' has datatype FP64 but the model expects x: FP32[?, 16]",
            id="wrong-datatype",
        ),
        pytest.param(
            body_of(x_input(datatype="BYTES")),
            None,
            "input 'x' has datatype BYTES ('BYTES' is not a supported datatype) but the model expects x: FP32[?, 16]",
            id="unsupported-datatype",
        ),
        pytest.param(
            body_of(x_input(datatype=None)),
            None,
            "input 'x' has datatype None (None is not a supported datatype)"
            " but the model expects x: FP32[?, 16]",
            id="no-datatype",
        ),
        pytest.param(
            body_of(x_input(shape=[1, 15], data=[0.5] * 15)),
            None,
            "input 'x' has shape [1, 15] but the model expects x: FP32[?, 16]",
            id="wrong-shape",
        ),
        pytest.param(
            body_of(x_input(shape=[16])),
            None,
            "input 'x' has shape [16] but the model expects x: FP32[?, 16]",
            id="wrong-rank",
        ),
        pytest.param(
            body_of(x_input(shape=[0, 16], data=[])),
            None,
            "input 'x' has shape [0, 16] but the model expects x: FP32[?, 16]",
            id="empty-batch",
        ),
        pytest.param(
            body_of(x_input(shape=[-1, 16])),
            None,
            "input 'x' has shape [-1, 16] but the model expects x: FP32[?, 16]",
            id="negative-dim",
        ),
        pytest.param(
            body_of(x_input(shape="1,16")),
            None,
            "input 'x': 'shape' must be a list of integers, expected x: FP32[?, 16]",
            id="shape-not-a-list",
        ),
        pytest.param(
            body_of(x_input(shape=[1.0, 16])),
            None,
            "input 'x': 'shape' must be a list of integers, expected x: FP32[?, 16]",
            id="shape-of-floats",
        ),
        pytest.param(
            body_of(x_input(shape=[True, 16])),
            None,
            "input 'x': 'shape' must be a list of integers, expected x: FP32[?, 16]",
            id="shape-of-bools",
        ),
        pytest.param(
            body_of(x_input(shape=[2, 16])),
            None,
            "input 'x': shape [2, 16] needs 32 values, got 16",
            id="too-few-values",
        ),
        pytest.param(
            body_of(x_input(data=[0.5] * 17)),
            None,
            "input 'x': shape [1, 16] needs 16 values, got 17",
            id="too-many",
        ),
        pytest.param(
            body_of(x_input(shape=[2, 16], data=[[0.5] * 16, [0.5] * 15])),
            None,
            "input 'x': 'data' is a ragged nested list",
            id="ragged",
        ),
        pytest.param(
            body_of(x_input(data=["a"] * 16)),
            None,
            "input 'x': 'data' holds non-numeric values but FP32 was declared",
            id="strings",
        ),
        pytest.param(
            body_of(x_input(data=[None] * 16)),
            None,
            "input 'x': 'data' holds non-numeric values but FP32 was declared",
            id="nulls",
        ),
        pytest.param(
            body_of(x_input(data=[True] * 16)),
            None,
            "input 'x': 'data' holds boolean values but FP32 was declared",
            id="bools-for-floats",
        ),
        pytest.param(
            body_of(x_input(data=[3.4e39] + [0.0] * 15)),
            None,
            "input 'x': value 3.4e+39 is out of range for FP32 (-3.4028234663852886e+38 to 3.4028234663852886e+38)",
            id="float-overflow",
        ),
        pytest.param(
            body_of(x_input(data=None)),
            None,
            "input 'x' has neither 'data' nor parameters.binary_data_size",
            id="no-data",
        ),
        pytest.param(body_of(x_input(), x_input()), None, "input 'x' is given twice", id="twice"),
        pytest.param(
            body_of(x_input(data=None, parameters={"binary_data_size": 60})) + FLOATS_64,
            len(body_of(x_input(data=None, parameters={"binary_data_size": 60}))),
            "input 'x': binary_data_size is 60 but shape [1, 16] of FP32 needs 64 bytes",
            id="binary-size-mismatch",
        ),
        pytest.param(
            body_of(x_input(data=None, parameters={"binary_data_size": 64.0})) + FLOATS_64,
            len(body_of(x_input(data=None, parameters={"binary_data_size": 64.0}))),
            "input 'x': binary_data_size is 64.0 but shape [1, 16] of FP32 needs 64 bytes",
            id="binary-size-not-an-integer",
        ),
        pytest.param(
            body_of(x_input(data=None, parameters={"binary_data_size": 64})) + FLOATS_64[:40],
            len(body_of(x_input(data=None, parameters={"binary_data_size": 64}))),
            "input 'x': the body ends before its 64 bytes of binary data",
            id="binary-truncated",
        ),
        pytest.param(
            body_of(x_input(data=None, parameters={"binary_data_size": 64})) + FLOATS_64 + b"\0\0\0\0",
            len(body_of(x_input(data=None, parameters={"binary_data_size": 64}))),
            "binary data is 68 bytes but the inputs' binary_data_size add up to 64",
            id="binary-extra-bytes",
        ),
        pytest.param(
            body_of(x_input()) + FLOATS_64,
            len(body_of(x_input())),
            "binary data is 64 bytes but the inputs' binary_data_size add up to 0",
            id="binary-data-nobody-claims",
        ),
        pytest.param(
            body_of(x_input(data=None, parameters={"binary_data_size": 64})),
            None,
            "input 'x': the body ends before its 64 bytes of binary data",
            id="binary-without-header-length",
        ),
        pytest.param(b'{"inputs": [', None, "request is not valid JSON: ", id="malformed-json"),
        pytest.param(b"", None, "request is not valid JSON: ", id="empty-body"),
        pytest.param(
            body_of(x_input()),
            10_000,
            f"Inference-Header-Content-Length is 10000 but the body has {len(body_of(x_input()))} bytes",
            id="header-length-beyond-body",
        ),
        pytest.param(
            body_of(x_input()),
            -1,
            f"Inference-Header-Content-Length is -1 but the body has {len(body_of(x_input()))} bytes",
            id="negative-header-length",
        ),
        pytest.param(
            body_of(x_input()) + FLOATS_64,
            20,
            "request is not valid JSON: ",
            id="header-length-cuts-the-json",
        ),
        pytest.param(
            b"[1, 2]", None, "request body must be a JSON object with an 'inputs' list", id="not-object"
        ),
        pytest.param(b"{}", None, "request must have a non-empty 'inputs' list of tensors", id="no-inputs"),
        pytest.param(
            b'{"inputs": []}', None, "request must have a non-empty 'inputs' list of tensors", id="empty"
        ),
        pytest.param(
            b'{"inputs": ["x"]}',
            None,
            "each input must be an object with 'name', 'shape', 'datatype' and 'data'",
            id="input-not-object",
        ),
        pytest.param(
            body_of(x_input(), parameters=[1]),
            None,
            "'parameters' must be a JSON object",
            id="parameters-not-object",
        ),
        pytest.param(
            body_of(x_input(), outputs={"name": "y"}),
            None,
            "'outputs' must be a list of {'name': ...} objects",
            id="outputs-not-list",
        ),
        pytest.param(
            body_of(x_input(), outputs=[{"name": "z"}]),
            None,
            "unknown output 'z'; this model's outputs are: y",
            id="unknown-output",
        ),
        pytest.param(
            body_of(x_input(), outputs=["y"]),
            None,
            "each requested output must be an object with a 'name'",
            id="output-not-object",
        ),
    ],
)
def test_invalid_requests_say_what_to_change(body: bytes, header_length: int | None, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, header_length, X_SPEC)
    if message.endswith(": "):
        assert str(info.value).startswith(message), str(info.value)
    else:
        assert str(info.value) == message


def test_missing_inputs_are_named_with_their_spec() -> None:
    x = random_array("FP32", (1, 4))
    with pytest.raises(InvalidRequest) as info:
        decode_request(json_body({"x": x}), None, TWO_SPEC)
    assert str(info.value) == "missing input(s): ids: INT64[?, 3]"


def test_unknown_input_lists_every_input_the_model_takes() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(json_body({"image": random_array("FP32", (1, 4))}), None, TWO_SPEC)
    assert str(info.value) == "unknown input 'image'; this model takes: x: FP32[?, 4], ids: INT64[?, 3]"


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT64", [1.5] * 6, "input 't': 'data' holds floating-point values but INT64 was declared"),
        ("INT32", [True] * 6, "input 't': 'data' holds boolean values but INT32 was declared"),
        ("BOOL", [1, 0, 1, 0, 1, 0], "input 't': 'data' holds integer values but BOOL was declared"),
        ("BOOL", [1.0] * 6, "input 't': 'data' holds floating-point values but BOOL was declared"),
        (
            "INT32",
            [3_000_000_000, 0, 0, 0, 0, 0],
            "input 't': value 3000000000 is out of range for INT32 (-2147483648 to 2147483647)",
        ),
        ("UINT8", [0, 0, 0, 0, 0, -1], "input 't': value -1 is out of range for UINT8 (0 to 255)"),
        ("INT8", [0, 0, 128, 0, 0, 0], "input 't': value 128 is out of range for INT8 (-128 to 127)"),
        (
            "FP16",
            [0.0, 7e4, 0, 0, 0, 0],
            "input 't': value 70000.0 is out of range for FP16 (-65504.0 to 65504.0)",
        ),
    ],
)
def test_json_values_are_never_converted_silently(datatype: str, data: list[Any], message: str) -> None:
    body = orjson.dumps({"inputs": [{"name": "t", "shape": [1, 2, 3], "datatype": datatype, "data": data}]})
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, None, spec_for(datatype))
    assert str(info.value) == message


def test_invalid_request_is_a_value_error() -> None:
    assert issubclass(InvalidRequest, ValueError)


def test_the_client_side_binary_encoder_round_trips_through_the_decoder():
    from runtime.protocol import encode_binary_request

    spec = ModelSpec((TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "INT64", (-1,))), ())
    inputs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7, -8], dtype=np.int64)}
    body, headers = encode_binary_request(inputs)
    parsed = decode_request(body, int(headers["inference-header-content-length"]), spec)
    for name, array in inputs.items():
        np.testing.assert_array_equal(parsed.inputs[name], array)
        assert parsed.inputs[name].dtype == array.dtype
