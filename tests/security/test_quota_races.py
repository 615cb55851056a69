"""Quotas hold under concurrency: a burst of deploys sent at once never creates more functions than the plan
allows (the check and the count are one step, not a check before an awaited unpack and a count after it)."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tenant


def archive(model: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def put_plan(platform, name: str, limits: dict, tenant: str) -> None:
    with platform.admin() as admin:
        assert admin.put(f"/v1/plans/{name}", json={"limits": limits}).status_code == 200
        assert admin.put(f"/v1/tenants/{tenant}/plan", json={"plan": name}).status_code == 200


def deploy_at_once(platform, tenant, names: list[str], model: bytes) -> list[httpx.Response]:
    """POST one deploy per name, all released together from their own threads and connections."""
    start = threading.Barrier(len(names))
    answers: list[httpx.Response | BaseException] = [RuntimeError("not sent")] * len(names)

    def send(i: int, name: str) -> None:
        with httpx.Client(base_url=platform.url, timeout=120,
                          headers={"authorization": f"Bearer {tenant.key}"}) as http:  # fmt: skip
            http.get("/v2/health/live")  # connected before the barrier: the deploys race, not the handshakes
            start.wait()
            try:
                answers[i] = http.post(
                    f"/v1/tenants/{tenant.name}/functions",
                    data={"name": name},
                    files={"model": ("model.tar.gz", model, "application/gzip")},
                )
            except BaseException as exc:
                answers[i] = exc

    threads = [threading.Thread(target=send, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a in answers:
        assert isinstance(a, httpx.Response), a
    return answers  # type: ignore[return-value]


@pytest.mark.parametrize("limit", [1, 4])
def test_a_burst_of_deploys_creates_exactly_max_functions_and_refuses_the_rest(platform, models, limit):
    acme = make_tenant(platform, "acme")
    put_plan(platform, f"limit{limit}", {"max_functions": limit}, "acme")

    answers = deploy_at_once(platform, acme, [f"f{i}" for i in range(40)], archive(models["mlp"]))

    created = [r for r in answers if r.status_code == 202]
    refused = [r for r in answers if r.status_code != 202]
    assert len(created) == limit, [(r.status_code, r.text[:200]) for r in answers]
    for r in refused:
        assert r.status_code == 403, r.text
        assert f"max_functions={limit}" in r.json()["error"] and "delete one" in r.json()["error"]
    listed = acme.http.get("/v1/tenants/acme/functions").json()["functions"]
    assert sorted(f["name"] for f in listed) == sorted(r.json()["name"] for r in created)
    assert acme.http.get("/v1/tenants/acme").json()["usage"]["functions"] == limit


def test_the_default_limit_holds_under_a_burst_of_deploys(platform, models):
    acme = make_tenant(platform, "acme")
    answers = deploy_at_once(platform, acme, [f"f{i}" for i in range(30)], archive(models["mlp"]))
    limit = acme.http.get("/v1/tenants/acme").json()["limits"]["max_functions"]
    assert sum(r.status_code == 202 for r in answers) == limit == 20
    assert {r.status_code for r in answers} == {202, 403}
    assert len(acme.http.get("/v1/tenants/acme/functions").json()["functions"]) == 20


def test_a_burst_of_deploys_of_one_name_creates_it_once(platform, models):
    acme = make_tenant(platform, "acme")
    answers = deploy_at_once(platform, acme, ["same"] * 12, archive(models["mlp"]))
    assert sorted(r.status_code for r in answers) == [202] + [409] * 11, [r.text[:200] for r in answers]
    for r in answers:
        if r.status_code == 409:
            assert "already exists" in r.json()["error"]
    assert [f["name"] for f in acme.http.get("/v1/tenants/acme/functions").json()["functions"]] == ["same"]


def test_a_failed_upload_gives_its_place_back(platform, models):
    acme = make_tenant(platform, "acme")
    put_plan(platform, "one", {"max_functions": 1}, "acme")
    bad = deploy_at_once(platform, acme, [f"bad{i}" for i in range(5)], b"not an archive")
    # Refused as a bad archive, or, while another holds the one place, as over the limit; never created.
    statuses = {r.status_code for r in bad}
    assert statuses <= {400, 403} and 400 in statuses, [r.text for r in bad]
    assert acme.http.get("/v1/tenants/acme").json()["usage"]["functions"] == 0
    [good] = deploy_at_once(platform, acme, ["good"], archive(models["mlp"]))
    assert good.status_code == 202, good.text
