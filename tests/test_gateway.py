"""The data plane as clients see it: standard OIP clients, host names, and a clear 4xx for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton

from tests.conftest import deploy, example, make_tenant, oip_body, outputs_of


@pytest.fixture
def acme(platform, models):
    tenant = make_tenant(platform, "acme")
    deploy(tenant, "multi", models["multi_io"])
    deploy(tenant, "classify", models["mlp"])
    return tenant


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_works_unchanged_with_the_tenant_base_url(platform, models, acme, binary):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{platform.port}/t/acme")
    auth = {"Authorization": f"Bearer {acme.key}"}
    try:
        assert client.is_server_live(headers=auth)
        assert client.is_model_ready("multi", headers=auth)
        meta = client.get_model_metadata("multi", headers=auth)
        assert [i["name"] for i in meta["inputs"]] == ["x", "ids", "mask", "scale"]
        inputs, expected = example(models["multi_io"])
        request = []
        for spec in meta["inputs"]:
            tensor = triton.InferInput(spec["name"], list(inputs[spec["name"]].shape), spec["datatype"])
            tensor.set_data_from_numpy(inputs[spec["name"]], binary_data=binary)
            request.append(tensor)
        wanted = [triton.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]]
        result = client.infer("multi", request, outputs=wanted, headers=auth)
        for name, want in expected.items():
            got = result.as_numpy(name)
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-5)
    finally:
        client.close()


def test_functions_answer_at_their_host_name_too(platform, models, acme):
    inputs, expected = example(models["mlp"])
    r = acme.http.post(
        "/v2/models/classify/infer",
        json=oip_body(inputs),
        headers={"host": f"classify.acme.fn.localhost:{platform.port}"},
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        outputs_of(r.json())["softmax_0.tmp_0"], expected["softmax_0.tmp_0"], rtol=1e-5
    )
    wrong = acme.http.post(
        "/v2/models/multi/infer", json=oip_body(inputs), headers={"host": "classify.acme.fn.localhost"}
    )
    assert wrong.status_code == 404 and "serves function 'classify'" in wrong.json()["error"]


def good_body(models):
    return oip_body(example(models["mlp"])[0])


BAD_TENSORS = [
    ({"inputs": [{"name": "y", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]},
     "unknown input 'y'; this model takes: x: FP32[?, 16]"),
    ({"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32", "data": [0.0] * 15}]},
     "input 'x' has shape [1, 15] but the model expects x: FP32[?, 16]"),
    ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "INT64", "data": [0] * 16}]},
     "input 'x' has datatype INT64 but the model expects x: FP32[?, 16]"),
    ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 15}]},
     "input 'x': shape [1, 16] needs 16 values, got 15"),
    ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ["a"] * 16}]},
     "input 'x': 'data' holds non-numeric values but FP32 was declared"),
    ({"inputs": []}, "request must have a non-empty 'inputs' list of tensors"),
    ({"outputs": [{"name": "x"}]}, "request must have a non-empty 'inputs' list of tensors"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), BAD_TENSORS)
def test_a_bad_tensor_gets_a_400_that_names_it_and_the_expected_spec(acme, body, message):
    r = acme.http.post("/t/acme/v2/models/classify/infer", json=body)
    assert r.status_code == 400
    assert r.json()["error"] == message


def test_malformed_json_is_a_400(acme):
    headers = {"content-type": "application/json"}
    r = acme.http.post("/t/acme/v2/models/classify/infer", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_who_may_call_what(platform, models, acme):
    other = make_tenant(platform, "other")
    body = good_body(models)
    cases = [
        (None, "/t/acme/v2/models/classify/infer", 401),
        ("pfn_000000000000_notarealsecretnotarealsecret", "/t/acme/v2/models/classify/infer", 401),
        (other.key, "/t/acme/v2/models/classify/infer", 404),  # another tenant's function does not exist
        (other.key, "/t/acme/v2/models/nothing/infer", 404),
        (acme.key, "/t/acme/v2/models/nothing/infer", 404),
        (acme.key, "/t/nobody/v2/models/classify/infer", 404),
        (acme.key, "/t/acme/v2/models/classify/infer", 200),
    ]
    for key, path, status in cases:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        with platform.client("") as c:
            r = c.post(path, json=body, headers=headers or {"authorization": ""})
        assert r.status_code == status, (key, path, r.text)
        assert "error" in r.json() or status == 200


def test_a_revoked_key_stops_working_at_once(platform, acme, models):
    created = acme.http.post("/v1/tenants/acme/keys", json={"name": "ci", "scopes": ["invoke"]}).json()
    ci = platform.client(created["key"])
    assert ci.post("/t/acme/v2/models/classify/infer", json=good_body(models)).status_code == 200
    assert ci.get("/v1/tenants/acme/functions").status_code == 403  # invoke-only key cannot manage
    assert acme.http.delete(f"/v1/tenants/acme/keys/{created['id']}").status_code == 204
    r = ci.post("/t/acme/v2/models/classify/infer", json=good_body(models))
    assert r.status_code == 401


def test_a_body_over_the_limit_is_a_413(platform_factory, models):
    small = platform_factory("--pool-size", "1", PADDLEFN_MAX_REQUEST_BYTES="2000")
    acme = make_tenant(small, "acme")
    deploy(acme, "classify", models["mlp"])
    x = np.zeros((100, 16), dtype="float32")
    r = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body({"x": x}))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert acme.http.post("/t/acme/v2/models/classify/infer", json=good_body(models)).status_code == 200


def test_metrics_count_requests_and_cold_starts_by_tenant_and_function(platform, acme, models):
    assert acme.http.post("/t/acme/v2/models/classify/infer", json=good_body(models)).status_code == 200
    assert acme.http.get("/metrics").status_code == 403  # a tenant key cannot read everyone's metrics
    with platform.admin() as admin:
        text = admin.get("/metrics").text
    assert 'paddlefn_requests_total{code="200",function="classify",tenant="acme"} 1.0' in text
    assert 'paddlefn_request_duration_seconds_count{function="classify",tenant="acme"} 1.0' in text
    assert "paddlefn_cold_start_duration_seconds_bucket" in text or "paddlefn_cold_starts_total" in text
