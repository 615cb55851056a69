"""Worker slots are shared by tenant under pressure: no plan limit lets one tenant starve another's wake-up."""

from __future__ import annotations

import json

from tests.conftest import deploy, example, make_tenant, oip_body, wait_for


def view(tenant, name: str) -> dict:
    r = tenant.http.get(f"/v1/tenants/{tenant.name}/functions/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def ready_replicas(p, tenant: str, name: str) -> int:
    """Replicas of the function that hold a worker and take requests (not ones still starting)."""
    with p.admin() as admin:
        warm = admin.get("/v1/capacity").json()["warm"]
    return sum(len(w["ready"]) for w in warm if (w["tenant"], w["function"]) == (tenant, name))


def log_counts(p) -> tuple[int, int]:
    """How often the platform's log says the hog scaled back up to its min_scale, and gave a replica away."""
    text = p.log_path.read_text(errors="replace")
    return (
        text.count("hog/pinned: 1 -> 2 replicas"),
        text.count("capacity pressure: a replica of hog/pinned stops to free a worker for quiet/sleepy"),
    )


def test_a_tenants_min_scale_cannot_starve_another_tenants_wake_up(platform_factory, models):
    p = platform_factory("--max-workers", "2", "--pool-size", "1", "--idle-timeout", "10m")
    hog = make_tenant(p, "hog")
    quiet = make_tenant(p, "quiet")
    body = oip_body(example(models["mlp"])[0])

    # The hog keeps a min_scale as large as the machine: both worker slots.
    assert deploy(hog, "pinned", models["mlp"], {"min_scale": 2, "max_scale": 2})["status"] == "ready"
    assert deploy(quiet, "sleepy", models["mlp"], {"idle_timeout_s": 5})["status"] == "ready"
    wait_for(lambda: view(quiet, "sleepy")["state"] == "asleep", timeout=60, what="quiet's function to sleep")
    wait_for(
        lambda: ready_replicas(p, "hog", "pinned") == 2, timeout=60, what="the hog to hold every slot again"
    )
    scale_ups, evictions = log_counts(p)

    # The sleeping function still wakes: a min_scale replica beyond the hog's fair share (1 of 2) gives way.
    r = quiet.http.post("/t/quiet/v2/models/sleepy/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert "x-paddlefn-cold-start-ms" in r.headers
    # The hog does not take the slot straight back: the next request finds the function warm, and the hog's
    # scaler does not ask for its min_scale again while the other tenant holds its share.
    again = quiet.http.post("/t/quiet/v2/models/sleepy/infer", json=body)
    assert again.status_code == 200 and "x-paddlefn-cold-start-ms" not in again.headers
    assert log_counts(p) == (scale_ups, evictions + 1)
    assert ready_replicas(p, "hog", "pinned") == 1  # the hog keeps its fair share
    assert hog.http.post("/t/hog/v2/models/pinned/infer", json=body).status_code == 200
    with p.admin() as admin:
        workers = admin.get("/v1/capacity").json()["workers"]
    assert workers["in_use"] <= 2, workers

    # Once the quiet function sleeps again, the hog gets its whole min_scale back.
    wait_for(lambda: view(quiet, "sleepy")["state"] == "asleep", timeout=60, what="quiet's function to sleep")
    wait_for(
        lambda: ready_replicas(p, "hog", "pinned") == 2, timeout=60, what="the hog's min_scale to return"
    )


def test_a_min_scale_no_plan_or_machine_can_hold_is_refused_at_deploy_and_patch(platform_factory, models):
    p = platform_factory("--max-workers", "2", "--pool-size", "0")
    acme = make_tenant(p, "acme")
    with p.admin() as admin:
        assert admin.put("/v1/plans/small", json={"limits": {"max_replicas": 1}}).status_code == 200
    globex = make_tenant(p, "globex")
    with p.admin() as admin:
        assert admin.put("/v1/tenants/globex/plan", json={"plan": "small"}).status_code == 200

    def post(tenant, name: str, config: dict):
        return tenant.http.post(
            f"/v1/tenants/{tenant.name}/functions",
            data={"name": name, "config": json.dumps(config)},
            files={"model": ("model.tar.gz", b"not read", "application/gzip")},
        )

    r = post(acme, "big", {"min_scale": 3, "max_scale": 4})
    assert r.status_code == 400 and "2 worker slots" in r.json()["error"], r.text
    r = post(globex, "big", {"min_scale": 2, "max_scale": 4})
    assert r.status_code == 400 and "max_replicas=1" in r.json()["error"], r.text

    deploy(acme, "fits", models["mlp"], {"min_scale": 0}, wait=False)
    r = acme.http.patch("/v1/tenants/acme/functions/fits", json={"min_scale": 3})
    assert r.status_code == 400 and "2 worker slots" in r.json()["error"], r.text
    r = acme.http.patch("/v1/tenants/acme/functions/fits", json={"min_scale": 2})
    assert r.status_code == 200, r.text
