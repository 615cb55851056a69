"""Waking and scaling under load: a clear 504 past the cold-start timeout, a bounded number of held requests
(503 + Retry-After beyond it), more replicas for more concurrency within max_scale, and back to sleep."""

from __future__ import annotations

import threading

import numpy as np

from tests.conftest import binary_request, deploy, example, make_tenant, oip_body, wait_for


def function_view(tenant, name):
    return tenant.http.get(f"/v1/tenants/{tenant.name}/functions/{name}").json()


def asleep(tenant, name) -> bool:
    return function_view(tenant, name)["state"] == "asleep"


def test_a_wake_up_longer_than_the_cold_start_timeout_is_a_504_and_the_function_still_wakes(platform, models):
    acme = make_tenant(platform, "acme")
    deploy(acme, "classify", models["mlp"], {"idle_timeout_s": 2})
    wait_for(lambda: asleep(acme, "classify"), timeout=30, what="the function to sleep")
    patch = {
        "cold_start_timeout_s": 0.001,
        "idle_timeout_s": 600,
    }  # no wake-up is that fast; stay awake after
    assert acme.http.patch("/v1/tenants/acme/functions/classify", json=patch).status_code == 200
    inputs, _ = example(models["mlp"])
    r = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert r.status_code == 504, r.text
    assert "cold_start_timeout_s" in r.json()["error"] or "wake" in r.json()["error"]
    wait_for(
        lambda: function_view(acme, "classify")["state"] == "warm", timeout=30, what="the wake-up to finish"
    )
    again = acme.http.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs))
    assert again.status_code == 200, (again.text, platform.log()[-3000:])


def test_requests_held_for_a_sleeping_function_are_bounded(platform_factory, models):
    p = platform_factory("--idle-timeout", "2s", "--pool-size", "1", PADDLEFN_MAX_PENDING_PER_FUNCTION="2")
    acme = make_tenant(p, "acme")
    deploy(acme, "classify", models["mlp"], {"max_scale": 1})
    wait_for(lambda: asleep(acme, "classify"), timeout=30, what="the function to sleep")
    body = oip_body(example(models["mlp"])[0])
    answers: list = []
    lock = threading.Lock()

    def call() -> None:
        r = acme.http.post("/t/acme/v2/models/classify/infer", json=body)
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    refused = next(r for r in answers if r.status_code == 503)
    assert "waiting for a replica" in refused.json()["error"] and "retry-after" in refused.headers


def test_more_concurrency_brings_more_replicas_within_max_scale_and_then_sleep(platform, mobilenet):
    acme = make_tenant(platform, "acme")
    deploy(acme, "vision", mobilenet, {"max_scale": 2, "target_concurrency": 1, "idle_timeout_s": 3})
    body, headers = binary_request(
        {"image": np.random.default_rng(2).random((8, 3, 224, 224), dtype=np.float32)}
    )
    stop = threading.Event()
    peak = [0]

    def load() -> None:
        while not stop.is_set():
            acme.http.post("/t/acme/v2/models/vision/infer", content=body, headers=headers)

    def watch() -> bool:
        replicas = function_view(acme, "vision")["replicas"]
        peak[0] = max(peak[0], replicas)
        return replicas == 2

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(watch, timeout=60, interval=0.2, what="a second replica")
        for _ in range(10):  # it never goes past max_scale while the load lasts
            watch()
            threading.Event().wait(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert peak[0] == 2
    wait_for(lambda: asleep(acme, "vision"), timeout=60, what="the function to sleep after the load")
