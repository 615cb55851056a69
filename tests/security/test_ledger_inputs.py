"""What a hostile or careless edge client can send to the ledger (issue #12), through a real platform process on
real SQLite (and PostgreSQL where its binaries are found): values out of range are 400s that say what to fix,
never 500s; impossible records are refused; late ones are billed in the open month; a request id is a tenant's
own; compute rounds up exactly as the README says.

The device keys are written into the platform's database here, as an export would (only the secret's hash),
so that these tests need no Paddle Lite build: what they exercise is the upload, not the bundle."""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from functions.auth import hash_secret
from functions.billing.ledger import Ledger, row_of
from functions.billing.periods import period_of
from functions.store import EdgeDevice, Store
from functions.store.db import make_engine
from functions.usage import UsageEvent
from tests.conftest import PlatformProcess, free_port, make_tenant, platform_env
from tests.test_postgres import postgres_url  # noqa: F401  (a fixture: the database parameter asks for it)

pytestmark = pytest.mark.slow


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


@dataclass
class Device:
    platform: PlatformProcess
    bundle_id: str
    key: str

    def upload(self, *records: dict[str, object]) -> httpx.Response:
        return self.post({"bundle_id": self.bundle_id, "records": list(records)})

    def post(self, body: object) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.platform.url}/v1/edge/usage", content=content, timeout=60,
                          headers={"authorization": f"Bearer {self.key}"})  # fmt: skip


def add_device(p: PlatformProcess, database: str, tenant: str, function: str = "classify") -> Device:
    """An edge bundle's device key for TENANT's FUNCTION, stored as an export stores it."""
    with p.admin() as admin:
        tenant_id = int(admin.get(f"/v1/tenants/{tenant}").json()["id"])
    bundle_id, secret = "e" + secrets.token_hex(5), secrets.token_urlsafe(32)
    engine = make_engine(database)
    with Session(engine) as s, s.begin():
        s.add(EdgeDevice(bundle_id=bundle_id, tenant_id=tenant_id, function=function, target="x86",
                         secret_hash=hash_secret(secret)))  # fmt: skip
    engine.dispose()
    return Device(p, bundle_id, f"pfe_{bundle_id}_{secret}")


def record(**fields: object) -> dict[str, object]:
    return {
        "request_id": uuid.uuid4().hex,
        "started_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "duration_ms": 3.5,
        "compute_ms": 1.25,
        "status": 200,
        "bytes_in": 100,
        "bytes_out": 200,
        **fields,
    }


def refused(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 400, response.text
    error = str(response.json()["error"])
    for word in words:
        assert word in error, (word, error)
    return error


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PlatformProcess, Device, Device]]:
    """One platform (no workers: nothing here runs a model) with tenants acme and globex, a device each."""
    data_dir = tmp_path_factory.mktemp("ledger-inputs") / "data"
    p = PlatformProcess(data_dir, free_port(), platform_env(), ["--pool-size", "0"]).start()
    try:
        make_tenant(p, "acme")
        make_tenant(p, "globex")
        database = f"sqlite:///{data_dir / 'paddlefn.db'}"
        yield p, add_device(p, database, "acme"), add_device(p, database, "globex")
    finally:
        p.stop()


def invoice(p: PlatformProcess, tenant: str, period: str) -> dict:
    with p.admin() as admin:
        r = admin.get(f"/v1/tenants/{tenant}/invoices/{period}")
    assert r.status_code == 200, r.text
    return dict(r.json())


# ---------------------------------------------------------------------------- out of range: 400, never 500


def test_a_start_outside_utcs_years_is_a_400_naming_the_field(edge):
    _, acme, _ = edge
    for started in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        refused(acme.upload(record(started_at=started)), "records[0].started_at", "UTC")


def test_usage_with_a_start_or_end_outside_utcs_years_is_a_400_naming_the_parameter(edge):
    p, _, _ = edge
    with p.admin() as admin:
        r = admin.get("/v1/tenants/acme/usage", params={"start": "0001-01-01T00:00:00+01:00"})
        refused(r, "start=", "UTC")
        r = admin.get("/v1/tenants/acme/usage", params={"end": "9999-12-31T23:59:59-01:00"})
        refused(r, "end=", "UTC")
        r = admin.get("/v1/tenants/acme/usage", params={"start": "0001-01-01T00:00:00Z"})
        assert r.status_code == 200, r.text  # the same moment in UTC is a fine (if early) start
        assert admin.get("/v1/tenants/acme/invoices/9999-12").status_code == 400


@pytest.mark.parametrize("field", ["bytes_in", "bytes_out"])
def test_byte_counts_past_the_documented_range_are_a_400(edge, field):
    _, acme, _ = edge
    for value in (str(2**63), str(2**40 + 1), "-1", "1" + "0" * 5000):  # as JSON text: no int is too big
        body = json.dumps({"bundle_id": acme.bundle_id, "records": [record(**{field: "N"})]})
        r = acme.post(body.replace('"N"', value).encode())
        assert r.status_code == 400, (value[:20], r.text)
        assert f"records[0].{field}" in r.json()["error"] or "not JSON" in r.json()["error"], r.text
    assert acme.upload(record(**{field: 2**40})).status_code == 200  # the top of the range is fine


def test_every_number_out_of_its_range_is_a_400_naming_it(edge):
    _, acme, _ = edge
    for field, value in (("status", 99), ("status", 600), ("duration_ms", 86_400_001), ("compute_ms", -1)):
        refused(acme.upload(record(**{field: value})), f"records[0].{field}")


def test_a_body_nested_100000_levels_deep_is_a_400(edge):
    _, acme, _ = edge
    deep = "[" * 100_000 + "]" * 100_000
    refused(
        acme.post(f'{{"bundle_id": "{acme.bundle_id}", "records": [{deep}]}}'.encode()), "not JSON", "depth"
    )
    deepest = "[" * 1000 + "]" * 1000  # as deep as the parser allows, where a string belongs: no repr of it
    refused(acme.post(f'{{"bundle_id": {deepest}, "records": []}}'.encode()), "bundle_id: an array")
    upload = json.dumps({"bundle_id": acme.bundle_id, "records": [record(bundle_id="DEEP")]})
    refused(acme.post(upload.replace('"DEEP"', deepest).encode()), "records[0].bundle_id")


# ---------------------------------------------------------------------------- impossible or out-of-window


def test_a_record_from_the_future_is_a_400_and_a_few_seconds_of_clock_skew_are_not(edge):
    _, acme, _ = edge
    for started in ("2099-01-01T00:00:00Z", (datetime.now(UTC) + timedelta(minutes=6)).isoformat()):
        refused(acme.upload(record(started_at=started)), "records[0]", "set the device's clock")
    ahead = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    assert acme.upload(record(started_at=ahead)).status_code == 200


def test_a_record_before_1970_is_a_400(edge):
    _, acme, _ = edge
    refused(acme.upload(record(started_at="1969-12-31T23:59:59Z")), "records[0].started_at", "1970")


def test_a_record_dated_in_a_long_closed_month_is_billed_in_the_open_month(edge):
    p, _, globex = edge
    before = invoice(p, "globex", this_month())["requests"]
    r = globex.upload(record(started_at="2001-05-01T12:00:00Z"), record(started_at="1970-01-01T00:00:00Z"))
    assert r.status_code == 200, r.text
    assert r.json()["new"] == 2
    assert invoice(p, "globex", this_month())["requests"] == before + 2
    long_ago = invoice(p, "globex", "2001-05")
    assert long_ago["status"] == "closed" and long_ago["requests"] == 0  # closed in 2001, never reopened


def test_compute_longer_than_the_request_took_is_a_400(edge):
    _, acme, _ = edge
    r = acme.upload(record(compute_ms=86_400_000, duration_ms=1))
    refused(r, "records[0]", "compute_ms", "duration_ms")
    assert acme.upload(record(compute_ms=2.5, duration_ms=2.5)).status_code == 200


# ---------------------------------------------------------------------------- request ids and rounding


def test_compute_rounds_up_to_the_millisecond_from_the_reported_value_not_a_rounded_one(edge):
    p, acme, _ = edge
    before = invoice(p, "acme", this_month())["compute_ms"]
    assert acme.upload(record(compute_ms=29.0001, duration_ms=30)).status_code == 200
    assert invoice(p, "acme", this_month())["compute_ms"] == before + 30


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    (tmp_path / "state").mkdir()
    return f"sqlite:///{tmp_path / 'state' / 'paddlefn.db'}"


def test_a_request_id_another_tenant_used_is_billed_to_each_tenant_once(platform_factory, database, tmp_path):
    p = platform_factory("--pool-size", "0", data_dir=tmp_path / "state", PADDLEFN_DATABASE_URL=database)
    make_tenant(p, "acme")
    make_tenant(p, "globex")
    acme, globex = add_device(p, database, "acme"), add_device(p, database, "globex")
    shared = record()
    assert acme.upload(shared).json()["new"] == 1
    assert globex.upload(shared).json() == {"bundle_id": globex.bundle_id, "received": 1, "new": 1,
                                            "duplicates": 0}  # fmt: skip
    assert globex.upload(shared).json()["duplicates"] == 1  # the edge's retry: still once
    assert acme.upload(shared, shared).json()["duplicates"] == 2
    assert invoice(p, "acme", this_month())["requests"] == 1
    assert invoice(p, "globex", this_month())["requests"] == 1


def test_a_database_from_before_upgrades_to_one_key_per_tenant_and_request_id_keeping_its_records(database):
    from alembic import command
    from alembic.config import Config

    from functions.store.db import MIGRATIONS

    engine = make_engine(database)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    row = {"request_id": "r1", "tenant_id": 1, "tenant": "acme", "function": "classify", "period": "2026-11",
           "started_at": datetime(2026, 11, 2), "duration_us": 3000, "compute_us": 2000, "billed_ms": 2,
           "device": "cpu", "cold_start": False, "status": 200, "billable": True, "bytes_in": 1, "bytes_out": 1,
           "source": "gateway"}  # fmt: skip
    insert = sa.text(
        f"INSERT INTO usage_records ({', '.join(row)}) VALUES ({', '.join(':' + c for c in row)})"
    )
    with engine.begin() as c:
        config.attributes["connection"] = c
        command.upgrade(config, "0005")
        c.execute(insert, row)
        with pytest.raises(sa.exc.IntegrityError), c.begin_nested():
            c.execute(insert, {**row, "tenant_id": 2})  # before: one request id for all tenants
        command.upgrade(config, "head")
        c.execute(insert, {**row, "tenant_id": 2})  # now: each tenant's own
        with pytest.raises(sa.exc.IntegrityError), c.begin_nested():
            c.execute(insert, row)  # and still once per tenant
        kept = c.execute(
            sa.text("SELECT tenant_id, request_id, billed_ms FROM usage_records ORDER BY 1")
        ).all()
    engine.dispose()
    assert [tuple(r) for r in kept] == [(1, "r1", 2), (2, "r1", 2)]


# ---------------------------------------------------------------------------- one tenant's writes, another's reads


def ledger_event(request_id: str, tenant_id: int) -> UsageEvent:
    return UsageEvent(request_id=request_id, tenant_id=tenant_id, tenant=f"t{tenant_id}", function="classify",
                      started_at=datetime.now(UTC), duration_ms=4.0, compute_ms=2.5, device="cpu",
                      cold_start=False, status=200, bytes_in=1, bytes_out=1)  # fmt: skip


def test_a_read_of_one_tenant_is_not_held_up_by_another_tenants_upload_stuck_committing(tmp_path):
    """Tenant A's edge upload is stuck in the database (another connection holds SQLite's write lock, as a long
    commit would); tenant B's usage and invoice are read meanwhile, and A's upload completes once the lock goes.
    With one lock for the whole ledger, B's read waited for A's upload."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    a, b = 1, 2

    async def scenario() -> tuple[list[dict], list[object], int]:
        ledger = Ledger(store, tmp_path / "usage", flush_interval_s=3600)
        await ledger.start()
        await ledger.record(ledger_event("b-1", b))
        await ledger.flush()  # B's record is in: reading it needs no write
        blocker = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, held
        upload = asyncio.create_task(ledger.add_external([row_of(ledger_event("a-1", a), source="edge:e1")]))
        await asyncio.sleep(0.2)  # A's upload is now waiting on the database, holding whatever it holds
        assert not upload.done()
        period = period_of(datetime.now(UTC))
        start = datetime.now(UTC) - timedelta(days=1)
        guard = (
            20  # s: not a speed limit, only so that a regression fails instead of hanging till SQLite's 30 s
        )
        usage = await asyncio.wait_for(
            ledger.usage(b, start, datetime.now(UTC) + timedelta(1), "function"), guard
        )
        lines = await asyncio.wait_for(ledger.lines(b, period), guard)
        assert not upload.done()  # B read everything while A's write was still stuck
        blocker.execute("COMMIT")
        blocker.close()
        new = await upload
        await ledger.close()
        return usage, lines, new

    usage, lines, new = asyncio.run(scenario())
    store.close()
    assert [(u["function"], u["requests"]) for u in usage] == [("classify", 1)]
    assert [(line.function, line.requests) for line in lines] == [("classify", 1)]
    assert new == 1


def test_one_tenants_uploads_and_invoices_do_not_take_another_tenants_lock(tmp_path):
    """While tenant A's lock is held (as A's upload or month-closing holds it), B uploads and closes a month;
    A's own upload waits for A's lock, and is then counted once."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    a, b = 1, 2

    async def scenario() -> tuple[int, dict, int]:
        ledger = Ledger(store, tmp_path / "usage", flush_interval_s=3600)
        await ledger.start()
        async with ledger._tenant_locks[a]:
            upload_a = asyncio.create_task(
                ledger.add_external([row_of(ledger_event("a-1", a), source="edge")])
            )
            new_b = await asyncio.wait_for(
                ledger.add_external([row_of(ledger_event("b-1", b), source="edge")]), 20
            )
            closed_b = await asyncio.wait_for(
                ledger.close_period(b, "t2", "2001-05", lambda lines: {"n": 0}), 20
            )
            await asyncio.sleep(0.1)
            assert not upload_a.done()  # A's lock is A's: its own upload waits for it
        new_a = await upload_a
        await ledger.close()
        return new_b, closed_b, new_a

    new_b, closed_b, new_a = asyncio.run(scenario())
    store.close()
    assert (new_b, closed_b, new_a) == (1, {"n": 0}, 1)
