"""A tenant's model becomes a function: deploy, infer, sleep (worker process gone), wake, same answers."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.conftest import deploy, example, make_tenant, oip_body, outputs_of, wait_for


def replica_pids(platform, tenant: str, function: str) -> list[int]:
    with platform.admin() as admin:
        warm = admin.get("/v1/capacity").json()["warm"]
    return [r["pid"] for w in warm if (w["tenant"], w["function"]) == (tenant, function) for r in w["ready"]]


def process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def test_deploy_infer_sleep_wake_gives_the_same_answers(platform, models):
    acme = make_tenant(platform, "acme")
    fn = deploy(acme, "classify", models["mlp"], {"idle_timeout_s": 2})
    assert fn["status"] == "ready", fn
    assert fn["url"].endswith("/t/acme/v2/models/classify")
    inputs, expected = example(models["mlp"])

    first = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert first.status_code == 200, first.text
    got = outputs_of(first.json())
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
    assert first.headers["x-paddlefn-engine"] == "paddle-inference"

    pids = wait_for(lambda: replica_pids(platform, "acme", "classify"), what="a warm replica")
    # Idle for longer than idle_timeout_s: the replica's process exits.
    wait_for(lambda: acme.http.get("/v1/tenants/acme/functions/classify").json()["state"] == "asleep",
             timeout=30, what="the function to sleep")  # fmt: skip
    wait_for(lambda: not any(process_exists(p) for p in pids), timeout=10, what="the worker process to exit")

    again = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert again.status_code == 200, again.text
    assert "x-paddlefn-cold-start-ms" in again.headers
    for name, want in expected.items():
        np.testing.assert_allclose(outputs_of(again.json())[name], want, rtol=1e-5, atol=1e-6)
    assert acme.http.get("/v1/tenants/acme/functions/classify").json()["state"] == "warm"


def test_every_datatype_and_several_inputs_and_outputs(platform, models):
    acme = make_tenant(platform, "acme")
    for name in ("multi-legacy", "multi-pir"):
        model = models["multi_io" if name == "multi-legacy" else "multi_io_pir"]
        fn = deploy(acme, name, model)
        assert fn["status"] == "ready", fn
        assert [i["datatype"] for i in fn["inputs"]] == ["FP32", "INT64", "BOOL", "FP64"]
        inputs, expected = example(model)
        r = acme.http.post(f"/t/acme/v2/models/{name}/infer", json=oip_body(inputs))
        assert r.status_code == 200, r.text
        got = outputs_of(r.json())
        assert set(got) == set(expected)
        for out, want in expected.items():
            assert got[out].dtype == want.dtype
            np.testing.assert_allclose(got[out], want, rtol=1e-5)


def test_concurrent_clients_all_get_their_own_answers(platform, models):
    acme = make_tenant(platform, "acme")
    deploy(acme, "classify", models["mlp"], {"max_scale": 2})
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((1, 16)).astype("float32") for _ in range(40)]

    def call(x: np.ndarray) -> np.ndarray:
        r = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body({"x": x}))
        assert r.status_code == 200, r.text
        return outputs_of(r.json())["softmax_0.tmp_0"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, batches))
    # The same input always gets the same answer, whichever replica served it.
    solo = [call(x) for x in batches[:5]]
    for a, b in zip(answers[:5], solo, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert all(a.shape == (1, 4) and abs(float(a.sum()) - 1) < 1e-5 for a in answers)
