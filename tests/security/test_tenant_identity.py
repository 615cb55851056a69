"""A tenant is its id, not its name: one created under a deleted tenant's name starts empty (no usage, invoices,
audit entries, functions or keys of the old one) and gets an id, and so a worker uid, that no tenant had before;
the admin still reads the deleted tenant's invoices and audit entries by its id. A database from before tenant
ids were recorded upgrades without handing the deleted tenant's records to its successor.

All through real platform processes on real databases (SQLite; PostgreSQL too where its binaries are found)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from functions.auth import new_key
from functions.settings import Settings
from functions.store.db import MIGRATIONS, make_engine
from tests.conftest import PlatformProcess, deploy, example, free_port, make_tenant, oip_body, platform_env
from tests.test_postgres import postgres_url  # noqa: F401  (a fixture: the database parameter asks for it)


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def tenant_id(p: PlatformProcess, name: str) -> int:
    with p.admin() as admin:
        return int(admin.get(f"/v1/tenants/{name}").json()["id"])


def audit_actions(entries: list[dict]) -> list[tuple[str, str]]:
    return [(e["action"], e["outcome"]) for e in entries]


# ---------------------------------------------------------------------------- delete, then create again


@pytest.fixture(scope="module")
def recreated(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[SimpleNamespace]:
    """acme with a function, traffic, a second key and its own plan; deleted; then acme created again. What the
    new acme sees right after its creation is kept in `fresh`."""
    data_dir = tmp_path_factory.mktemp("recreated") / "data"
    p = PlatformProcess(data_dir, free_port(), platform_env(), ["--pool-size", "1"]).start()
    try:
        old = make_tenant(p, "acme")
        deploy(old, "classify", models["mlp"], {"idle_timeout_s": 600})
        body = oip_body(example(models["mlp"])[0])
        for _ in range(3):
            assert old.http.post("/t/acme/v2/models/classify/infer", json=body).status_code == 200
        assert old.http.post("/v1/tenants/acme/keys", json={"name": "ci"}).status_code == 201
        with p.admin() as admin:
            assert admin.put("/v1/plans/gold", json={"limits": {"max_functions": 3}}).status_code == 200
            assert admin.put("/v1/tenants/acme/plan", json={"plan": "gold"}).status_code == 200
        old_id = tenant_id(p, "acme")
        old_invoice = old.http.get(f"/v1/tenants/acme/invoices/{this_month()}").json()
        assert old_invoice["requests"] == 3

        with p.admin() as admin:
            assert admin.delete("/v1/tenants/acme").status_code == 204
        new = make_tenant(p, "acme")
        paths = ["/v1/tenants/acme", "/v1/tenants/acme/usage", f"/v1/tenants/acme/invoices/{this_month()}",
                 "/v1/tenants/acme/audit", "/v1/tenants/acme/functions", "/v1/tenants/acme/keys",
                 "/v1/tenants/acme/edge-devices"]  # fmt: skip
        fresh = {path: new.http.get(path).json() for path in paths}
        yield SimpleNamespace(
            platform=p, old=old, old_id=old_id, old_invoice=old_invoice, new=new, fresh=fresh
        )
    finally:
        p.stop()


def test_a_tenant_created_again_under_a_deleted_ones_name_starts_empty(recreated):
    fresh = recreated.fresh
    view = fresh["/v1/tenants/acme"]
    assert view["plan"] == "default" and view["limits"]["max_functions"] == 20  # not the old one's gold plan
    assert fresh["/v1/tenants/acme/usage"]["rows"] == []
    invoice = fresh[f"/v1/tenants/acme/invoices/{this_month()}"]
    assert invoice["lines"] == [] and invoice["requests"] == 0 and invoice["plan"] == "default"
    entries = fresh["/v1/tenants/acme/audit"]["entries"]
    assert audit_actions(entries) == [("tenant.create", "ok")]  # its own creation, nothing of the old acme
    assert {e["tenant_id"] for e in entries} == {view["id"]}
    assert fresh["/v1/tenants/acme/functions"]["functions"] == []
    assert [k["name"] for k in fresh["/v1/tenants/acme/keys"]["keys"]] == ["first key"]
    assert fresh["/v1/tenants/acme/edge-devices"]["devices"] == []
    assert recreated.old.http.get("/v1/tenants/acme").status_code == 401  # the old keys are gone for good


def test_it_gets_an_id_the_deleted_newest_tenant_had_not_so_its_workers_run_as_another_user(
    recreated, models
):
    p, new = recreated.platform, recreated.new
    new_id = recreated.fresh["/v1/tenants/acme"]["id"]
    assert (
        new_id > recreated.old_id
    )  # the old acme was the newest tenant: SQLite used to hand out its id again

    deploy(new, "classify", models["mlp"], {"idle_timeout_s": 600})
    body = oip_body(example(models["mlp"])[0])
    for _ in range(2):
        assert new.http.post("/t/acme/v2/models/classify/infer", json=body).status_code == 200
    if os.geteuid() == 0:  # worker isolation is on: the tenant's files belong to its own user
        base = Settings.tenant_uid_base
        assert (p.data_dir / "tenants" / "acme").stat().st_uid == base + new_id != base + recreated.old_id
    usage = new.http.get("/v1/tenants/acme/usage").json()["rows"]
    assert [(r["function"], r["requests"]) for r in usage] == [("classify", 2)]  # its own traffic only
    assert new.http.get(f"/v1/tenants/acme/invoices/{this_month()}").json()["requests"] == 2


def test_the_admin_still_reads_the_deleted_tenants_invoice_and_audit_by_its_id(recreated):
    p, old_id = recreated.platform, recreated.old_id
    with p.admin() as admin:
        deleted = admin.get("/v1/deleted-tenants").json()["tenants"]
        [entry] = [t for t in deleted if t["id"] == old_id]
        assert (entry["name"], entry["plan"]) == ("acme", "gold") and entry["deleted_at"]

        invoice = admin.get(f"/v1/deleted-tenants/{old_id}/invoices/{this_month()}").json()
        assert invoice == recreated.old_invoice  # its three requests, at its plan's prices
        as_csv = admin.get(f"/v1/deleted-tenants/{old_id}/invoices/{this_month()}", params={"format": "csv"})
        assert as_csv.status_code == 200 and as_csv.text.splitlines()[1].startswith(
            f"acme,{this_month()},classify,"
        )

        audit = admin.get("/v1/audit", params={"tenant_id": old_id}).json()["entries"]
        actions = audit_actions(audit)
        for expected in ("tenant.create", "function.create", "function.deploy", "key.create", "tenant.plan",
                         "tenant.delete"):  # fmt: skip
            assert (expected, "ok") in actions, expected
        assert {e["tenant_id"] for e in audit} == {old_id}
        by_name = admin.get("/v1/audit", params={"tenant": "acme"}).json()["entries"]
        assert {e["tenant_id"] for e in by_name} == {old_id, tenant_id(p, "acme")}  # every acme, told apart

        assert admin.get("/v1/deleted-tenants/999999/invoices/2026-11").status_code == 404
    assert recreated.new.http.get("/v1/deleted-tenants").status_code == 403
    assert recreated.new.http.get(f"/v1/deleted-tenants/{old_id}/invoices/{this_month()}").status_code == 403
    assert recreated.new.http.get("/v1/audit", params={"tenant_id": old_id}).status_code == 403


# ---------------------------------------------------------------------------- ids, on each database


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    (tmp_path / "state").mkdir()
    return f"sqlite:///{tmp_path / 'state' / 'paddlefn.db'}"


def create(p: PlatformProcess, name: str) -> int:
    with p.admin() as admin:
        r = admin.post("/v1/tenants", json={"name": name})
    assert r.status_code == 201, r.text
    return int(r.json()["tenant"]["id"])


def delete(p: PlatformProcess, name: str) -> None:
    with p.admin() as admin:
        assert admin.delete(f"/v1/tenants/{name}").status_code == 204


def test_a_deleted_newest_tenants_id_is_never_given_again_not_even_after_a_restart(
    platform_factory, database, tmp_path
):
    p = platform_factory(data_dir=tmp_path / "state", PADDLEFN_DATABASE_URL=database)
    first, second = create(p, "first"), create(p, "second")
    delete(p, "second")
    again = create(p, "second")
    assert len({first, second, again}) == 3 and again > second
    p.stop()

    restarted = platform_factory(data_dir=tmp_path / "state", PADDLEFN_DATABASE_URL=database)
    delete(restarted, "second")
    third = create(restarted, "third")
    assert third > again
    with restarted.admin() as admin:
        deleted = admin.get("/v1/deleted-tenants").json()["tenants"]
    assert [(t["id"], t["name"]) for t in deleted] == [(again, "second"), (second, "second")]


# ---------------------------------------------------------------------------- upgrading an existing database


def old_database(url: str) -> dict[str, object]:
    """A database at migration 0004 (records by tenant name) in the state the bug left: acme deleted, then created
    again under the same id; the old acme's usage, frozen invoice and audit entries still carry only 'acme'."""
    now = datetime.now(UTC).replace(tzinfo=None)
    this_month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last = (this_month_start - timedelta(days=1)).replace(day=1)  # the month before
    before = (last - timedelta(days=1)).replace(day=1)  # and the one before that: the old acme's
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
    key = new_key()
    t = {name: sa.table(name, *(sa.column(c, kind) for c, kind in cols.items())) for name, cols in {
        "tenants": {"id": sa.Integer, "name": sa.String, "plan": sa.String, "created_at": sa.DateTime},
        "api_keys": {"id": sa.String, "tenant_id": sa.Integer, "name": sa.String, "secret_hash": sa.String,
                     "scopes": sa.String, "created_at": sa.DateTime},
        "usage_records": {c: sa.String for c in ("request_id", "tenant", "function", "period", "device", "source")}
        | {c: sa.BigInteger for c in ("duration_us", "compute_us", "billed_ms", "status", "bytes_in", "bytes_out")}
        | {"started_at": sa.DateTime, "cold_start": sa.Boolean, "billable": sa.Boolean},
        "invoices": {"tenant": sa.String, "period": sa.String, "document": sa.JSON, "closed_at": sa.DateTime},
        "audit_log": {"at": sa.DateTime, "actor": sa.String, "tenant": sa.String, "action": sa.String,
                      "target": sa.String, "outcome": sa.String, "detail": sa.String},
    }.items()}  # fmt: skip

    def usage(request_id: str, at: datetime) -> dict[str, object]:
        return {"request_id": request_id, "tenant": "acme", "function": "classify", "period": at.strftime("%Y-%m"),
                "started_at": at, "duration_us": 3000, "compute_us": 2000, "billed_ms": 2, "device": "cpu",
                "cold_start": False, "status": 200, "billable": True, "bytes_in": 10, "bytes_out": 10,
                "source": "gateway"}  # fmt: skip

    def audit(at: datetime, action: str) -> dict[str, object]:
        return {"at": at, "actor": "admin", "tenant": "acme", "action": action, "target": "acme", "outcome": "ok",
                "detail": ""}  # fmt: skip

    created = last + timedelta(days=4)  # the new acme, with the old one's id 1
    old_document = {"tenant": "acme", "period": before.strftime("%Y-%m"), "requests": 2, "total_micros": 4242}
    with engine.begin() as c:
        c.execute(sa.insert(t["tenants"]).values(id=1, name="acme", plan="default", created_at=created))
        c.execute(sa.insert(t["api_keys"]).values(id=key.id, tenant_id=1, name="first key",
                                                  secret_hash=key.secret_hash, scopes="invoke,manage",
                                                  created_at=created))  # fmt: skip
        c.execute(sa.insert(t["usage_records"]), [usage("old-1", before + timedelta(days=3)),
                                                  usage("old-2", before + timedelta(days=4)),
                                                  usage("new-1", created + timedelta(days=1))])  # fmt: skip
        closed = last + timedelta(days=1)
        c.execute(sa.insert(t["invoices"]).values(tenant="acme", period=before.strftime("%Y-%m"),
                                                  document=old_document, closed_at=closed))  # fmt: skip
        c.execute(sa.insert(t["audit_log"]), [audit(before, "tenant.create"), audit(last, "tenant.delete"),
                                              audit(created + timedelta(seconds=1), "tenant.create")])  # fmt: skip
    engine.dispose()
    return {"key": key.token, "before": before.strftime("%Y-%m"), "last": last.strftime("%Y-%m"),
            "old_document": old_document, "since": before.isoformat() + "Z"}  # fmt: skip


def test_an_existing_database_upgrades_without_handing_a_deleted_tenants_records_to_its_successor(
    platform_factory, database, tmp_path
):
    old = old_database(database)
    p = platform_factory(data_dir=tmp_path / "state", PADDLEFN_DATABASE_URL=database)
    acme = p.client(str(old["key"]))  # its key survived the upgrade (SQLite copies the tenants table)

    usage = acme.get("/v1/tenants/acme/usage", params={"start": old["since"]}).json()["rows"]
    assert [(r["function"], r["requests"]) for r in usage] == [("classify", 1)]  # new-1 only
    assert acme.get(f"/v1/tenants/acme/invoices/{old['last']}").json()["requests"] == 1
    mine = acme.get(f"/v1/tenants/acme/invoices/{old['before']}").json()
    assert mine["requests"] == 0 and mine != old["old_document"]  # acme did not exist yet that month
    assert audit_actions(acme.get("/v1/tenants/acme/audit").json()["entries"]) == [("tenant.create", "ok")]

    with p.admin() as admin:
        [gone] = admin.get("/v1/deleted-tenants").json()["tenants"]
        assert gone["name"] == "acme" and gone["id"] > 1  # a new id: its old one is the live acme's
        assert (
            admin.get(f"/v1/deleted-tenants/{gone['id']}/invoices/{old['before']}").json()
            == old["old_document"]
        )
        audit = admin.get("/v1/audit", params={"tenant_id": gone["id"]}).json()["entries"]
        assert audit_actions(audit) == [("tenant.create", "ok"), ("tenant.delete", "ok")]
    assert create(p, "newco") > gone["id"]  # ids handed out during the upgrade are never handed out again
