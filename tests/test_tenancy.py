"""Tenancy through the real API: every endpoint answered per key kind, quotas at their edges, the audit log."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.conftest import deploy, example, make_tenant, oip_body


@pytest.fixture
def two_tenants(platform, models):
    acme = make_tenant(platform, "acme")
    globex = make_tenant(platform, "globex")
    deploy(acme, "classify", models["mlp"])
    return acme, globex


def endpoints(key_id: str) -> list[tuple[str, str, dict]]:
    """Every /v1 and data-plane endpoint that touches tenant acme's things, with a harmless body."""
    fn = "/t/acme/v2/models/classify"
    return [
        ("GET", "/v1/tenants/acme", {}),
        ("GET", "/v1/tenants/acme/keys", {}),
        ("POST", "/v1/tenants/acme/keys", {"json": {"name": "probe"}}),
        ("DELETE", f"/v1/tenants/acme/keys/{key_id}-nope", {}),
        ("GET", "/v1/tenants/acme/functions", {}),
        ("GET", "/v1/tenants/acme/functions/classify", {}),
        ("PATCH", "/v1/tenants/acme/functions/classify", {"json": {"idle_timeout_s": 60}}),
        ("GET", "/v1/tenants/acme/usage", {}),
        ("GET", "/v1/tenants/acme/invoices/2026-11", {}),
        ("GET", "/v1/tenants/acme/audit", {}),
        ("GET", "/v1/tenants/acme/functions/classify/stats", {}),
        ("GET", "/v1/tenants/acme/edge-devices", {}),
        ("DELETE", f"/v1/tenants/acme/edge-devices/{key_id}-nope", {}),
        ("GET", fn, {}),
        ("GET", f"{fn}/ready", {}),
        ("POST", f"{fn}/infer", {"json": {"inputs": []}}),
    ]


def test_every_endpoint_answers_by_who_asks(platform, two_tenants):
    acme, globex = two_tenants
    own_key_id = acme.key.split("_")[1]
    with platform.admin() as admin, httpx.Client(base_url=platform.url) as anonymous:
        for method, path, kwargs in endpoints(own_key_id):
            nobody = anonymous.request(method, path, **kwargs)
            assert nobody.status_code == 401, (method, path, nobody.text)
            assert "Bearer" in nobody.json()["error"] or "key" in nobody.json()["error"]

            other = globex.http.request(method, path, **kwargs)
            assert other.status_code == 404, (
                method,
                path,
                other.text,
            )  # 404, never 403: names cannot be probed

            own = acme.http.request(method, path, **kwargs)
            as_admin = admin.request(method, path, **kwargs)
            for r in (own, as_admin):
                if path.endswith("-nope"):
                    assert r.status_code == 404, (method, path, r.text)
                elif path.endswith("/infer"):
                    assert r.status_code == 400  # authorised; the empty request is bad input, said so
                else:
                    assert r.status_code in (200, 201), (method, path, r.text)

        admin_only = [("GET", "/v1/tenants"), ("GET", "/v1/capacity"), ("GET", "/v1/plans"), ("GET", "/v1/audit"),
                      ("GET", "/metrics"), ("PUT", "/v1/plans/gold"), ("PUT", "/v1/tenants/acme/plan"),
                      ("POST", "/v1/tenants"), ("DELETE", "/v1/tenants/globex")]  # fmt: skip
        for method, path in admin_only:
            body = {"json": {"plan": "default"}} if path.endswith("/plan") else {"json": {"name": "probe"}}
            if method in ("GET", "DELETE"):
                body = {}
            assert acme.http.request(method, path, **body).status_code == 403, path
            assert anonymous.request(method, path, **body).status_code == 401, path
        assert admin.get("/v1/tenants").status_code == 200


def test_an_invoke_only_key_cannot_manage_and_a_public_function_can_only_be_invoked(
    platform, two_tenants, models
):
    acme, _ = two_tenants
    r = acme.http.post("/v1/tenants/acme/keys", json={"name": "app", "scopes": ["invoke"]})
    invoker = platform.client(r.json()["key"])
    inputs, _ = example(models["mlp"])
    assert invoker.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs)).status_code == 200
    denied = invoker.get("/v1/tenants/acme/functions")
    assert denied.status_code == 403 and "manage" in denied.json()["error"]

    acme.http.patch("/v1/tenants/acme/functions/classify", json={"public": True})
    with httpx.Client(base_url=platform.url) as anonymous:
        assert anonymous.post("/t/acme/v2/models/classify/infer", json=oip_body(inputs)).status_code == 200
        assert anonymous.get("/v1/tenants/acme/functions/classify").status_code == 401

    keys = acme.http.get("/v1/tenants/acme/keys").json()["keys"]
    app_key = next(k for k in keys if k["name"] == "app")
    assert app_key["last_used_at"] is not None or app_key["created_at"]  # shown, never the secret
    assert all("key" not in k and "secret_hash" not in k for k in keys)


def put_plan(platform, name: str, limits: dict, tenant: str) -> None:
    with platform.admin() as admin:
        assert admin.put(f"/v1/plans/{name}", json={"limits": limits}).status_code == 200
        assert admin.put(f"/v1/tenants/{tenant}/plan", json={"plan": name}).status_code == 200


def test_plan_limits_at_their_edges(platform, two_tenants, models):
    acme, globex = two_tenants
    put_plan(platform, "tiny", {"max_functions": 1, "gpu_allowed": False, "max_model_bytes": 200_000}, "acme")
    seen = acme.http.get("/v1/tenants/acme").json()
    assert seen["plan"] == "tiny" and seen["limits"]["max_functions"] == 1 and seen["usage"]["functions"] == 1

    r = acme.http.post("/v1/tenants/acme/functions", data={"name": "second"},
                       files={"model": ("m.tar.gz", b"x" * 10, "application/gzip")})  # fmt: skip
    assert (
        r.status_code == 403
        and "max_functions=1" in r.json()["error"]
        and "has 1 functions" in r.json()["error"]
    )

    r = acme.http.patch("/v1/tenants/acme/functions/classify", json={"device": "gpu"})
    assert r.status_code == 403 and "gpu_allowed" in r.json()["error"]

    put_plan(platform, "tiny2", {"max_functions": 5, "max_model_bytes": 1000}, "acme")
    r = acme.http.post("/v1/tenants/acme/functions", data={"name": "big"},
                       files={"model": ("m.tar.gz", b"x" * 5000, "application/gzip")})  # fmt: skip
    assert r.status_code == 413 and "max_model_bytes" in r.json()["error"]

    # globex is on the default plan and untouched by acme's
    assert globex.http.get("/v1/tenants/globex").json()["limits"]["max_functions"] == 20


def test_rate_and_concurrency_limits_answer_429_with_retry_after_and_only_for_that_tenant(platform, models):
    acme = make_tenant(platform, "acme")
    globex = make_tenant(platform, "globex")
    deploy(acme, "classify", models["mlp"])
    deploy(globex, "classify", models["mlp"])
    body = oip_body(example(models["mlp"])[0])
    # A refill so slow that no token comes back during the test, even if the first request has to wake the function.
    put_plan(platform, "slow", {"requests_per_second": 0.01, "burst": 3}, "acme")

    codes = [acme.http.post("/t/acme/v2/models/classify/infer", json=body) for _ in range(5)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]  # the burst
    refused = codes[3]
    assert refused.status_code == 429 and codes[4].status_code == 429
    assert 60 <= int(refused.headers["retry-after"]) <= 100  # one token at 0.01/s
    assert "0.01 requests/s" in refused.json()["error"] and "burst 3" in refused.json()["error"]
    assert globex.http.post("/t/globex/v2/models/classify/infer", json=body).status_code == 200

    usage = acme.http.get("/v1/tenants/acme/usage").json()["rows"][0]
    assert usage["requests"] == 3  # refusals never reached the function: not recorded, not billed

    put_plan(platform, "narrow", {"max_concurrent_requests": 1}, "globex")
    big = oip_body({"x": example(models["mlp"])[0]["x"].repeat(2000, axis=0)})
    results: list[int] = []

    def call() -> None:
        results.append(globex.http.post("/t/globex/v2/models/classify/infer", json=big).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 200 in results and 429 in results and set(results) <= {200, 429}


def test_the_audit_log_records_changes_and_each_tenant_sees_only_its_own(platform, two_tenants):
    acme, globex = two_tenants
    acme.http.post("/v1/tenants/acme/keys", json={"name": "ci"})
    globex.http.post("/v1/tenants/globex/keys", json={"name": "secret-project"})
    acme.http.patch("/v1/tenants/acme/functions/classify", json={"max_scale": 0})  # refused: a bad config

    mine = acme.http.get("/v1/tenants/acme/audit").json()["entries"]
    actions = [(e["action"], e["outcome"]) for e in mine]
    assert ("tenant.create", "ok") in actions
    assert ("function.create", "ok") in actions and ("function.deploy", "ok") in actions
    assert ("key.create", "ok") in actions and ("function.update", "refused") in actions
    assert all(e["tenant"] == "acme" for e in mine)
    assert not any("secret-project" in e["target"] for e in mine)
    key_id = acme.key.split("_")[1]
    assert any(e["actor"] == key_id for e in mine)

    with platform.admin() as admin:
        everything = admin.get("/v1/audit", params={"format": "jsonl"})
    assert everything.headers["content-type"].startswith("application/jsonl")
    import json

    lines = [json.loads(line) for line in everything.text.splitlines()]
    assert {e["tenant"] for e in lines} >= {"acme", "globex"}


def test_deleting_a_tenant_removes_its_keys_functions_and_files(platform, two_tenants):
    acme, _ = two_tenants
    with platform.admin() as admin:
        assert admin.delete("/v1/tenants/acme").status_code == 204
        assert "acme" not in [t["name"] for t in admin.get("/v1/tenants").json()["tenants"]]
        audit = admin.get("/v1/audit", params={"tenant": "acme"}).json()["entries"]
    assert ("tenant.delete", "ok") in [(e["action"], e["outcome"]) for e in audit]  # the record outlives it
    assert acme.http.get("/v1/whoami").status_code == 401
    assert acme.http.post("/t/acme/v2/models/classify/infer", json={"inputs": []}).status_code == 401
    assert not (platform.data_dir / "tenants" / "acme").exists()


def test_audit_parameters_out_of_range_are_400s_that_say_so(platform, two_tenants):
    acme, _ = two_tenants
    r = acme.http.get("/v1/tenants/acme/audit", params={"limit": -1})
    assert r.status_code == 400 and "limit" in r.json()["error"]
    r = acme.http.get("/v1/tenants/acme/audit", params={"format": "xml"})
    assert r.status_code == 400 and "format" in r.json()["error"]
