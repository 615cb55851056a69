"""Paddle Lite inside the platform: device=lite end to end (engine, agreement with Paddle, billed as lite, confined
as the tenant), fallback=cold and fallback=capacity observed from a client, and Lite refused for models without it."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import deploy, example, make_tenant, oip_body, outputs_of, wait_for
from tests.lite_support import needs_lite

pytestmark = [needs_lite, pytest.mark.slow]


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def infer(t, name: str, inputs: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    r = t.http.post(f"/t/{t.name}/v2/models/{name}/infer", json=oip_body(inputs))
    assert r.status_code == 200, r.text
    return r


def assert_right(response, expected: dict[str, np.ndarray], rtol: float, atol: float) -> None:  # type: ignore[no-untyped-def]
    got = outputs_of(response.json())
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=rtol, atol=atol)


def view(t, name: str) -> dict:  # type: ignore[no-untyped-def]
    r = t.http.get(f"/v1/tenants/{t.name}/functions/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_device_lite_serves_with_paddle_lite_agrees_with_paddle_and_is_billed_as_lite(platform, models):
    acme = make_tenant(platform, "acme")
    lite = deploy(acme, "lite", models["mlp"], {"device": "lite"})
    paddle = deploy(acme, "paddle", models["mlp"], {"device": "cpu"})
    assert lite["status"] == "ready" and paddle["status"] == "ready", (lite["error"], paddle["error"])
    assert lite["device"] == "lite" and lite["config"]["fallback"] == "none"
    assert lite["lite"]["available"] is True and lite["lite"]["reason"] is None
    rtol, atol = lite["lite"]["rtol"], lite["lite"]["atol"]

    inputs, expected = example(models["mlp"])
    for _ in range(3):
        r = infer(acme, "lite", inputs)
        assert r.headers["x-paddlefn-engine"] == "paddle-lite"
        assert r.headers["x-paddlefn-device"] == "lite"
        assert r.json()["parameters"] == {"engine": "paddle-lite", "device": "lite"}
        assert_right(r, expected, rtol, atol)
    by_paddle = infer(acme, "paddle", inputs)
    assert by_paddle.headers["x-paddlefn-engine"] == "paddle-inference"
    assert_right(r, outputs_of(by_paddle.json()), rtol, atol)  # Lite agrees with Paddle within the manifest's

    # The Lite replica runs confined as the tenant's own user (the platform runs as root here), host included.
    with platform.admin() as admin:
        warm = {w["function"]: w for w in admin.get("/v1/capacity").json()["warm"]}
    [replica] = warm["lite"]["ready"]
    assert replica["engine"] == "lite" and replica["fallback"] is False
    if os.geteuid() == 0:
        tenant_uid = 200_000 + 1  # the first tenant's id is 1
        assert uid_of(replica["pid"]) == tenant_uid
        hosts = children_of(replica["pid"])
        assert hosts and all(uid_of(h) == tenant_uid for h in hosts)

    invoice = acme.http.get(f"/v1/tenants/acme/invoices/{this_month()}").json()
    lines = {(line["function"], line["device"]): line["requests"] for line in invoice["lines"]}
    assert lines == {("lite", "lite"): 3, ("paddle", "cpu"): 1}


def test_lite_is_refused_with_its_reason_for_a_model_without_it(platform, models):
    acme = make_tenant(platform, "acme")
    fn = deploy(acme, "pir", models["multi_io_pir"])
    assert fn["status"] == "ready"
    assert fn["lite"]["available"] is False
    assert "legacy program format" in fn["lite"]["reason"]
    for patch in ({"device": "lite"}, {"fallback": "cold"}, {"fallback": "capacity"}):
        r = acme.http.patch("/v1/tenants/acme/functions/pir", json=patch)
        assert r.status_code == 400, r.text
        assert "needs a Paddle Lite version of the model" in r.json()["error"]
        assert "legacy program format" in r.json()["error"]
    assert view(acme, "pir")["config"]["device"] == "auto"

    # Asked for at deploy time, the deploy fails with the reason (the model's Lite status is known only then).
    failed = deploy(acme, "pir-lite", models["multi_io_pir"], {"device": "lite"})
    assert failed["status"] == "failed"
    assert "device=lite needs a Paddle Lite version" in failed["error"]
    assert "legacy program format" in failed["error"]

    # A contradiction is refused at once.
    r = acme.http.post(
        "/v1/tenants/acme/functions",
        data={"name": "both", "config": '{"device": "lite", "fallback": "cold"}'},
        files={"model": ("m.tar.gz", b"x", "application/gzip")},
    )
    assert r.status_code == 400 and "use fallback none with device lite" in r.json()["error"]


def test_fallback_cold_answers_from_lite_while_the_primary_wakes_then_switches(platform_factory, models):
    # No pre-warmed Paddle worker: the primary's cold start includes starting Python and Paddle (seconds), as a
    # GPU worker's would, while a Lite worker loads in a fraction of a second.
    p = platform_factory("--idle-timeout", "2s", "--pool-size", "0")
    acme = make_tenant(p, "acme")
    fn = deploy(acme, "classify", models["mlp"], {"fallback": "cold", "device": "cpu", "idle_timeout_s": 1})
    assert fn["status"] == "ready", fn["error"]
    rtol, atol = fn["lite"]["rtol"], fn["lite"]["atol"]
    wait_for(lambda: view(acme, "classify")["state"] == "asleep", 60, what="the function to sleep")
    # Awake from now on (the primary's slow start must not count as idleness).
    assert (
        acme.http.patch("/v1/tenants/acme/functions/classify", json={"idle_timeout_s": 300}).status_code
        == 200
    )

    inputs, expected = example(models["mlp"])
    first = infer(acme, "classify", inputs)
    assert first.headers["x-paddlefn-engine"] == "paddle-lite"
    assert first.headers["x-paddlefn-device"] == "lite"
    assert "x-paddlefn-cold-start-ms" in first.headers
    assert_right(first, expected, rtol, atol)

    # Once the primary is ready the Lite replica is retired and Paddle Inference answers.
    wait_for(lambda: view(acme, "classify")["lite_replicas"] == 0, 120, what="the Lite replica to retire")
    for _ in range(3):
        later = infer(acme, "classify", inputs)
        assert later.headers["x-paddlefn-engine"] == "paddle-inference"
        assert later.headers["x-paddlefn-device"] == "cpu"
        assert_right(later, expected, rtol, atol)

    invoice = acme.http.get(f"/v1/tenants/acme/invoices/{this_month()}").json()
    lines = {(line["function"], line["device"]): line["requests"] for line in invoice["lines"]}
    assert lines == {("classify", "lite"): 1, ("classify", "cpu"): 3}


def test_fallback_capacity_answers_from_lite_when_no_worker_slot_is_free(platform_factory, models):
    p = platform_factory("--max-workers", "1", "--pool-size", "0", "--idle-timeout", "60s")
    acme = make_tenant(p, "acme")
    assert deploy(acme, "hog", models["mlp"], {"min_scale": 1})["status"] == "ready"  # holds the only slot
    flex = deploy(acme, "flex", models["mlp"], {"fallback": "capacity"})
    plain = deploy(acme, "plain", models["mlp"], {"cold_start_timeout_s": 2})
    assert flex["status"] == "ready" and plain["status"] == "ready"
    rtol, atol = flex["lite"]["rtol"], flex["lite"]["atol"]

    inputs, expected = example(models["mlp"])
    for _ in range(2):
        r = infer(acme, "flex", inputs)
        assert r.headers["x-paddlefn-engine"] == "paddle-lite"
        assert_right(r, expected, rtol, atol)
    # Without a fallback the same situation is a refusal after the cold-start timeout, as before.
    refused = acme.http.post("/t/acme/v2/models/plain/infer", json=oip_body(inputs))
    assert refused.status_code in (503, 504), refused.text

    # A slot frees: the primary takes it, Lite is retired, Paddle Inference answers.
    assert acme.http.delete("/v1/tenants/acme/functions/hog").status_code == 204
    assert acme.http.delete("/v1/tenants/acme/functions/plain").status_code == 204
    wait_for(lambda: view(acme, "flex")["lite_replicas"] == 0, 120, what="the primary to replace Lite")
    r = infer(acme, "flex", inputs)
    assert r.headers["x-paddlefn-engine"] == "paddle-inference"
    assert_right(r, expected, rtol, atol)


def test_fallback_capacity_answers_from_lite_when_the_tenant_is_at_max_replicas(platform, models):
    with platform.admin() as admin:
        assert admin.put("/v1/plans/one", json={"limits": {"max_replicas": 1}}).status_code == 200
        acme = make_tenant(platform, "acme")
        r = admin.put("/v1/tenants/acme/plan", json={"plan": "one"})
        assert r.status_code == 200, r.text
    assert deploy(acme, "hog", models["mlp"], {"min_scale": 1})["status"] == "ready"
    flex = deploy(acme, "flex", models["mlp"], {"fallback": "capacity"})
    assert flex["status"] == "ready"

    inputs, expected = example(models["mlp"])
    r = infer(acme, "flex", inputs)
    assert r.headers["x-paddlefn-engine"] == "paddle-lite"
    assert r.headers["x-paddlefn-device"] == "lite"
    assert_right(r, expected, flex["lite"]["rtol"], flex["lite"]["atol"])
    assert view(acme, "flex")["lite_replicas"] == 1
    with platform.admin() as admin:
        warm = {w["function"]: w["ready"] for w in admin.get("/v1/capacity").json()["warm"]}
    assert [(r["engine"], r["fallback"]) for r in warm["flex"]] == [
        ("lite", True)
    ]  # the primary waits for room

    # The hog may sleep now; once it does, flex's primary has room and takes over.
    assert acme.http.patch("/v1/tenants/acme/functions/hog", json={"min_scale": 0}).status_code == 200
    wait_for(lambda: view(acme, "hog")["state"] == "asleep", 60, what="the hog to sleep")
    wait_for(lambda: view(acme, "flex")["lite_replicas"] == 0, 120, what="the primary to replace Lite")
    r = infer(acme, "flex", inputs)
    assert r.headers["x-paddlefn-engine"] == "paddle-inference"
