"""What survives what: a worker killed mid-request, a platform restart, a platform killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np

from tests.conftest import binary_request, deploy, example, make_tenant, oip_body, outputs_of, wait_for
from tests.test_lifecycle import process_exists, replica_pids


def busy_replica(platform, tenant, function):
    with platform.admin() as admin:
        for w in admin.get("/v1/capacity").json()["warm"]:
            if (w["tenant"], w["function"]) == (tenant, function):
                for r in w["ready"]:
                    if r["in_flight"]:
                        return r["pid"]
    return None


def test_a_worker_killed_mid_request_costs_that_request_a_503_and_the_next_gets_a_fresh_worker(
    platform, mobilenet
):
    acme = make_tenant(platform, "acme")
    deploy(acme, "vision", mobilenet, {"max_scale": 1})
    big = {"image": np.random.default_rng(0).random((64, 3, 224, 224), dtype=np.float32)}
    body, headers = binary_request(big)  # ~0.5 s of work: long enough to be killed in the middle
    answers: list = []
    slow = threading.Thread(
        target=lambda: answers.append(
            acme.http.post("/t/acme/v2/models/vision/infer", content=body, headers=headers)
        )
    )
    slow.start()
    pid = wait_for(
        lambda: busy_replica(platform, "acme", "vision"), timeout=30, interval=0.01, what="busy replica"
    )
    os.kill(pid, signal.SIGKILL)
    slow.join(60)
    assert answers[0].status_code == 503, answers[0].text
    assert "stopped while handling this request" in answers[0].json()["error"]
    assert "retry-after" in answers[0].headers

    inputs, expected = example(mobilenet)
    r = acme.http.post("/t/acme/v2/models/vision/infer", json=oip_body(inputs))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        outputs_of(r.json())["linear_1.tmp_1"], expected["linear_1.tmp_1"], rtol=1e-4, atol=1e-5
    )
    assert pid not in replica_pids(platform, "acme", "vision")


def test_functions_tenants_and_keys_survive_a_restart(platform_factory, models, tmp_path):
    first = platform_factory("--pool-size", "1", data_dir=tmp_path / "state")
    acme = make_tenant(first, "acme")
    deploy(acme, "classify", models["mlp"])
    first.stop()

    second = platform_factory("--pool-size", "1", data_dir=tmp_path / "state")
    http = second.client(acme.key)  # the same key still works
    fn = http.get("/v1/tenants/acme/functions/classify").json()
    assert fn["status"] == "ready" and fn["state"] == "asleep"
    inputs, expected = example(models["mlp"])
    r = http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        outputs_of(r.json())["softmax_0.tmp_0"], expected["softmax_0.tmp_0"], rtol=1e-5
    )


def test_a_platform_killed_with_sigkill_leaves_no_workers_behind(platform_factory, models, tmp_path):
    p = platform_factory("--pool-size", "2", data_dir=tmp_path / "state")
    acme = make_tenant(p, "acme")
    deploy(acme, "classify", models["mlp"])
    pids = wait_for(lambda: replica_pids(p, "acme", "classify"), what="a warm replica")
    descendants = descendants_of(p.process.pid)  # workers are forked by the template, a child of ours
    assert set(pids) <= set(descendants)
    p.stop(signal.SIGKILL)
    wait_for(lambda: not any(process_exists(c) for c in descendants), timeout=15, what="workers to exit")


def descendants_of(pid: int) -> list[int]:
    children = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [d for c in children for d in (c, *descendants_of(c))]


def test_a_model_over_its_memory_limit_fails_alone_with_a_clear_error(platform_factory, models, mobilenet):
    p = platform_factory("--pool-size", "1", PADDLEFN_WORKER_MEMORY_MB="1500")
    acme = make_tenant(p, "acme")
    globex = make_tenant(p, "globex")
    deploy(acme, "vision", mobilenet)
    deploy(globex, "classify", models["mlp"])
    huge = {"image": np.random.default_rng(1).random((64, 3, 224, 224), dtype=np.float32)}
    body, headers = binary_request(huge)  # its activations need well over 1.5 GB of address space

    r = acme.http.post("/t/acme/v2/models/vision/infer", content=body, headers=headers)
    assert r.status_code == 507, r.text
    assert "ran out of memory" in r.json()["error"] and "smaller batch" in r.json()["error"]

    inputs, _ = example(mobilenet)
    small = acme.http.post("/t/acme/v2/models/vision/infer", json=oip_body(inputs))
    assert small.status_code == 200  # the same worker goes on serving
    other = globex.http.post("/t/globex/v2/models/classify/infer", json=oip_body(example(models["mlp"])[0]))
    assert other.status_code == 200
    usage = acme.http.get("/v1/tenants/acme/usage").json()["rows"][0]
    assert usage["requests"] == 2 and usage["billable_requests"] == 1  # the refused request is not billed
