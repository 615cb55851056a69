"""When worker slots run out, the least recently used idle function sleeps early so a busy one gets a worker."""

from __future__ import annotations

from tests.conftest import deploy, example, make_tenant, oip_body, wait_for


def state(tenant, name: str) -> str:
    return tenant.http.get(f"/v1/tenants/{tenant.name}/functions/{name}").json()["state"]


def test_the_least_recently_used_idle_function_makes_room_instead_of_a_refusal(platform_factory, models):
    p = platform_factory("--max-workers", "2", "--pool-size", "1", "--idle-timeout", "10m")
    acme = make_tenant(p, "acme")
    globex = make_tenant(p, "globex")
    body = oip_body(example(models["mlp"])[0])
    deploy(acme, "older", models["mlp"])
    deploy(acme, "newer", models["mlp"])  # both slots now hold a warm replica
    for name in ("older", "newer"):  # "older" was used longest ago
        assert acme.http.post(f"/t/acme/v2/models/{name}/infer", json=body).status_code == 200

    deploy(globex, "busy", models["mlp"])
    r = globex.http.post("/t/globex/v2/models/busy/infer", json=body)
    assert r.status_code == 200, r.text  # not refused: a slot was freed for it
    wait_for(lambda: state(acme, "older") == "asleep", timeout=30, what="the LRU function to sleep")
    assert state(acme, "newer") == "warm" and state(globex, "busy") == "warm"

    r = acme.http.post("/t/acme/v2/models/older/infer", json=body)  # wakes, taking the LRU slot in turn
    assert r.status_code == 200 and "x-paddlefn-cold-start-ms" in r.headers
    with p.admin() as admin:
        workers = admin.get("/v1/capacity").json()["workers"]
    assert workers["in_use"] <= 2, workers
