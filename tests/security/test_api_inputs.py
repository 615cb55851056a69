"""What clients send the control plane, taken at its word no further than it should be (issue #12): names and
periods matched whole, bodies bounded while they are read, errors and stored strings of bounded length, a cap on
keys, scopes that say what they grant, and security headers on every answer.

Through a real platform process on a real socket, as the attacks were made; the rules themselves table-driven."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from functions import names
from scaler import wake
from tests.conftest import PlatformProcess, Tenant, free_port, make_tenant, platform_env


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def model_tar(model: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One platform for the module (starting one costs seconds), with tenant acme."""
    data_dir = tmp_path_factory.mktemp("api-inputs") / "data"
    p = PlatformProcess(data_dir, free_port(), platform_env(), ["--pool-size", "1"]).start()
    try:
        yield SimpleNamespace(platform=p, acme=make_tenant(p, "acme"))
    finally:
        p.stop()


@pytest.fixture
def platform(shared: SimpleNamespace) -> PlatformProcess:
    return shared.platform


@pytest.fixture
def acme(shared: SimpleNamespace) -> Tenant:
    return shared.acme


# ---------------------------------------------------------------------------- 2. names and periods, matched whole


@pytest.mark.parametrize(
    ("kind", "value", "valid"),
    [
        ("tenant", "acme", True),
        ("tenant", "a", True),
        ("tenant", "a-1", True),
        ("tenant", "a" * 63, True),
        ("tenant", "a" * 64, False),
        ("tenant", "xss\n", False),  # re.match with "$" let this through
        ("tenant", "xss\r", False),
        ("tenant", "\nxss", False),
        ("tenant", "Acme", False),
        ("tenant", "acme-", False),
        ("tenant", "1acme", False),
        ("tenant", "", False),
        ("function", "fn\n", False),
        ("function", "classify", True),
        ("plan", "gold\n", False),
        ("plan", "gold", True),
        ("key", "", True),
        ("key", "ci deploys (prod) ✓", True),
        ("key", "x" * 100, True),
        ("key", "x" * 101, False),
        ("key", "ci\n", False),
        ("key", "ci\x00", False),
        ("key", "ci\u2028", False),
        ("period", "2026-12", True),
        ("period", "2026-12\n", False),
        ("period", "2026-13", False),
        ("period", "\u0662\u0660\u0662\u0666-01", False),  # Arabic-Indic digits are \d, not a year
    ],
)
def test_names_and_periods_are_matched_whole(kind, value, valid):
    assert (names.problem(kind, value) is None) is valid


def test_a_refused_name_is_shown_cut_short_with_the_rule():
    message = names.problem("tenant", "a" * 10_000_000)
    assert message is not None and len(message) < 300
    assert "10000000 characters" in message and "lowercase letters" in message


def test_the_scalers_copy_of_the_name_rule_is_the_platforms():
    assert wake.NAME.pattern == names.DNS_LABEL  # the scaler may import nothing of ours, so it keeps a copy


def test_a_tenant_name_ending_in_a_newline_is_refused_and_gets_no_folder(platform):
    with platform.admin() as admin:
        r = admin.post("/v1/tenants", json={"name": "xss\n"})
        assert r.status_code == 400 and "tenant name 'xss\\n' is not valid" in r.json()["error"]
        assert [t["name"] for t in admin.get("/v1/tenants").json()["tenants"]] == ["acme"]
    assert sorted(p.name for p in (platform.data_dir / "tenants").iterdir()) == ["acme"]


def test_a_function_name_ending_in_a_newline_is_refused_before_anything_is_unpacked(platform, acme, models):
    r = acme.http.post(
        "/v1/tenants/acme/functions",
        data={"name": "fn\n", "config": "{}"},
        files={"model": ("model.tar.gz", model_tar(models["mlp"]), "application/gzip")},
    )
    assert r.status_code == 400 and "function name 'fn\\n' is not valid" in r.json()["error"]
    assert acme.http.get("/v1/tenants/acme/functions").json()["functions"] == []
    assert not list((platform.data_dir / "tenants" / "acme").glob("functions/*"))


def test_key_and_plan_names_with_a_newline_are_refused(platform, acme):
    r = acme.http.post("/v1/tenants/acme/keys", json={"name": "ci\nX-Injected: 1"})
    assert r.status_code == 400 and "key name" in r.json()["error"] and "one line" in r.json()["error"]
    with platform.admin() as admin:
        r = admin.put("/v1/plans/gold%0A", json={})
        assert r.status_code == 400 and "plan name 'gold\\n' is not valid" in r.json()["error"]
        assert "gold\n" not in admin.get("/v1/plans").json()["plans"]
        r = admin.put("/v1/tenants/acme/plan", json={"plan": "default\n"})
        assert r.status_code == 400 and "plan name" in r.json()["error"]


def test_a_period_ending_in_a_newline_is_a_400_not_a_dropped_connection(platform, acme):
    for path in (f"/v1/tenants/acme/invoices/{this_month()}%0A", "/v1/tenants/acme/invoices/2026-12%0A"):
        r = acme.http.get(path, params={"format": "csv"})
        assert r.status_code == 400, r.text
        assert "is not valid: a month as YYYY-MM" in r.json()["error"]
    r = acme.http.get(f"/v1/tenants/acme/invoices/{this_month()}", params={"format": "csv"})
    assert r.status_code == 200
    assert r.headers["content-disposition"] == f'attachment; filename="invoice-acme-{this_month()}.csv"'


def test_a_file_name_in_a_header_keeps_only_safe_characters():
    assert names.file_name("invoice-acme-2026-12.csv") == "invoice-acme-2026-12.csv"
    assert names.file_name('invoice-xss\n"; x=1-2026-12.csv') == "invoice-xss____x_1-2026-12.csv"
