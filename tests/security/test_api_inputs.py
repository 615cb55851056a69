"""What clients send the control plane, taken at its word no further than it should be (issue #12): names and
periods matched whole, bodies bounded while they are read, errors and stored strings of bounded length, a cap on
keys, scopes that say what they grant, and security headers on every answer.

Through a real platform process on a real socket, as the attacks were made; the rules themselves table-driven."""

from __future__ import annotations

import asyncio
import io
import json
import re
import select
import socket
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import functions.ui
from functions import connections, headers, names
from functions.app import PlatformApp
from functions.bounds import MAX_MESSAGE_CHARS
from functions.errors import install_error_handlers
from scaler import wake
from tests.conftest import ADMIN_KEY, PlatformProcess, Tenant, free_port, make_tenant, platform_env

MiB = 1024 * 1024


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def model_tar(model: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the server took before it answered

    def json(self) -> dict:
        return json.loads(self.body)


def raw_request(
    p: PlatformProcess,
    method: str,
    path: str,
    body: bytes,
    *,
    key: str = ADMIN_KEY,
    chunked: bool = False,
    declare: int | None = None,
) -> Answer:
    """METHOD PATH with BODY on a plain socket, sent in 64 KiB pieces until the server answers (an HTTP client
    would fail writing once the server closes, before it reads the answer). DECLARE: the Content-Length sent."""
    head = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{p.port}", f"authorization: Bearer {key}",
            "content-type: application/json"]  # fmt: skip
    head.append("transfer-encoding: chunked" if chunked else f"content-length: {declare or len(body)}")
    sent = 0
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for start in range(0, len(body), 64 * 1024):
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is there: stop sending
            piece = body[start : start + 64 * 1024]
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            try:
                more = sock.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            data += more
    head_text, _, rest = data.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    fields = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    return Answer(
        int(lines[0].split()[1]), fields, rest[: int(fields.get("content-length", len(rest)))], sent
    )


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


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


# ---------------------------------------------------------------------------- 5. bounded bodies, messages, records


def test_a_10_mb_tenant_name_is_a_413_on_its_length_alone(platform):
    with platform.admin() as admin:
        before = admin.get("/v1/audit").json()["entries"]
    size = len(json.dumps({"name": "a" * (10 * MiB)}))
    answer = raw_request(platform, "POST", "/v1/tenants", b"", declare=size)  # the head only: no byte of body
    assert answer.status == 413
    assert answer.headers["connection"] == "close"
    message = answer.json()["error"]
    assert f"{size} bytes" in message and f"at most {MiB} bytes (PADDLEFN_MAX_JSON_BYTES)" in message
    with platform.admin() as admin:
        assert admin.get("/v1/audit").json()["entries"] == before  # the app never saw it


def test_a_50_mb_patch_without_a_length_is_cut_off_once_it_passes_the_limit(platform, acme):
    body = b'{"idle_timeout_s": 60, "pad": "' + b"x" * (50 * MiB) + b'"}'
    answer = raw_request(
        platform, "PATCH", "/v1/tenants/acme/functions/nope", body, key=acme.key, chunked=True
    )
    assert answer.status == 413, answer.body
    assert (
        answer.sent < 25 * MiB
    )  # refused while reading (what was sent sat in socket buffers), not at the end
    assert f"over {MiB} bytes" in answer.json()["error"]
    # and the control plane answers at once, to this tenant and to others
    assert acme.http.get("/v1/tenants/acme").status_code == 200


def test_a_body_within_the_limit_still_works_sent_whole_or_chunked(platform, acme):
    body = json.dumps({"name": "ci"}).encode()
    for chunked in (False, True):
        answer = raw_request(platform, "POST", "/v1/tenants/acme/keys", body, key=acme.key, chunked=chunked)
        assert answer.status == 201, answer.body
        assert answer.json()["name"] == "ci"


def test_a_long_name_under_the_body_limit_is_refused_with_a_short_message_and_a_short_audit_entry(platform):
    name = "a" * (900 * 1024)
    with platform.admin() as admin:
        for _ in range(5):
            r = admin.post("/v1/tenants", json={"name": name})
            assert r.status_code == 400
            assert len(r.text) < 500 and f"({len(name)} characters) is not valid" in r.json()["error"]
        entries = admin.get("/v1/audit", params={"limit": 5}).json()["entries"]
        audit = admin.get("/v1/audit")
    assert [e["action"] for e in entries] == ["tenant.create"] * 5
    for e in entries:
        assert e["outcome"] == "refused" and len(e["tenant"]) <= 63 and len(e["detail"]) < 500
    assert len(audit.content) < 100_000  # it was 51 MB after five 10 MB names


def test_error_messages_are_cut_short_wherever_they_come_from(platform, acme):
    long_key = "k" * 100_000
    r = acme.http.patch("/v1/tenants/acme/functions/nope", json={long_key: 1})
    assert r.status_code == 404 and len(r.text) < MAX_MESSAGE_CHARS + 50
    with platform.admin() as admin:
        r = admin.put("/v1/plans/big", json={"limits": {long_key: 1}, "prices": {"currency": "x" * 100_000}})
        assert r.status_code == 400 and len(r.text) < MAX_MESSAGE_CHARS + 50
        assert "characters)" in r.json()["error"]
        r = admin.post("/v1/tenants", json={"name": ["x" * 100_000]})
        assert r.status_code == 400 and len(r.text) < MAX_MESSAGE_CHARS + 50
    r = acme.http.get(f"/v1/tenants/acme/usage?start={'9' * 20_000}")
    assert r.status_code == 400 and len(r.text) < MAX_MESSAGE_CHARS + 50


def test_model_uploads_keep_their_own_limit_above_the_json_one(platform, acme, models):
    archive = model_tar(models["mlp"])
    padded = archive + b"\0" * (2 * MiB)  # over max_json_bytes: still an upload, judged by the upload limit
    r = acme.http.post(
        "/v1/tenants/acme/functions",
        data={"name": "big", "config": "{}"},
        files={"model": ("model.tar.gz", padded, "application/gzip")},
    )
    assert r.status_code == 202, r.text  # gzip ignores zero padding: a valid upload over 1 MiB
    assert acme.http.delete("/v1/tenants/acme/functions/big").status_code == 204


# ---------------------------------------------------------------------------- 6. a cap on keys per tenant


def test_the_default_plan_allows_20_keys_and_says_so(platform, acme):
    assert acme.http.get("/v1/tenants/acme").json()["limits"]["max_keys"] == 20


def test_keys_beyond_the_plans_max_keys_are_a_409_until_one_is_revoked(platform):
    capped = make_tenant(platform, "capped")
    with platform.admin() as admin:
        assert admin.put("/v1/plans/few-keys", json={"limits": {"max_keys": 3}}).status_code == 200
        assert admin.put("/v1/tenants/capped/plan", json={"plan": "few-keys"}).status_code == 200
    made = [capped.http.post("/v1/tenants/capped/keys", json={"name": f"k{i}"}) for i in range(2)]
    assert [r.status_code for r in made] == [201, 201]  # with the first key: 3

    r = capped.http.post("/v1/tenants/capped/keys", json={"name": "one too many"})
    assert r.status_code == 409
    assert "3 active API keys" in r.json()["error"] and "max_keys=3" in r.json()["error"]
    assert "revoke one" in r.json()["error"]

    # revoking frees a place; churning keys keeps the list bounded (active + the newest revoked ones)
    victim = made[0].json()["id"]
    for i in range(8):
        assert capped.http.delete(f"/v1/tenants/capped/keys/{victim}").status_code == 204
        r = capped.http.post("/v1/tenants/capped/keys", json={"name": f"churn{i}"})
        assert r.status_code == 201, r.text
        victim = r.json()["id"]
    listed = capped.http.get("/v1/tenants/capped/keys").json()["keys"]
    assert len([k for k in listed if k["revoked_at"] is None]) == 3
    assert len([k for k in listed if k["revoked_at"] is not None]) == 3
    assert capped.http.post("/v1/tenants/capped/keys", json={}).status_code == 409


# ---------------------------------------------------------------------------- 7. scopes say what they grant


@pytest.fixture(scope="module")
def scoped(shared: SimpleNamespace) -> Tenant:
    return make_tenant(shared.platform, "scoped")


@pytest.mark.parametrize(
    ("scopes", "status", "granted", "says"),
    [
        ([], 400, None, "scopes is empty"),  # it used to grant both
        (["admin"], 400, None, "unknown scope"),
        (["invoke", "bogus"], 400, None, "unknown scope"),
        (["invoke"], 201, ["invoke"], None),
        (["manage", "invoke"], 201, ["invoke", "manage"], None),
        (None, 201, ["invoke", "manage"], None),
        ("left out", 201, ["invoke", "manage"], None),
    ],
)
def test_scopes_are_what_was_asked_and_an_empty_list_is_refused(
    platform, scoped, scopes, status, granted, says
):
    with platform.admin() as admin:
        before = len(admin.get("/v1/tenants/scoped/keys").json()["keys"])
        body = {"name": "s"} if scopes == "left out" else {"name": "s", "scopes": scopes}
        r = admin.post("/v1/tenants/scoped/keys", json=body)
        assert r.status_code == status, r.text
        if granted is not None:
            assert r.json()["scopes"] == granted
            assert admin.delete(f"/v1/tenants/scoped/keys/{r.json()['id']}").status_code == 204
        else:
            assert says in r.json()["error"] and "invoke" in r.json()["error"]
            assert len(admin.get("/v1/tenants/scoped/keys").json()["keys"]) == before


# ---------------------------------------------------------------------------- 8. security headers on every answer

SECURITY = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def assert_secure(got: dict[str, str] | httpx.Headers, policy: str = headers.POLICY) -> None:
    for name, value in SECURITY.items():
        assert got[name] == value, name
    assert got["content-security-policy"] == policy
    assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy


def test_every_kind_of_answer_carries_the_security_headers(platform, acme):
    with httpx.Client(base_url=platform.url) as anyone:
        answers = [
            anyone.get("/ui/"),  # the portal
            anyone.get("/ui/js/main.js"),
            anyone.get("/v1/whoami"),  # 401
            anyone.get("/v2/health/live"),  # the data plane
            anyone.post("/t/acme/v2/models/nope/infer", json={}),  # 401 on the data plane
            anyone.get("/no/such/page"),  # 404
            anyone.delete("/v1/whoami"),  # 405
            acme.http.get("/v1/tenants/acme"),  # 200
            acme.http.post("/t/acme/v2/models/nope/infer", json={}),  # 404
        ]
    for r in answers:
        assert_secure(r.headers)
    assert_secure(
        raw_request(platform, "POST", "/v1/tenants", b"", declare=10 * MiB).headers
    )  # BodyLimit's 413


def test_the_api_explorer_pages_get_the_policy_they_need_and_no_more(platform):
    with httpx.Client(base_url=platform.url) as anyone:
        for path in ("/docs", "/redoc"):
            r = anyone.get(path)
            assert r.status_code == 200
            assert_secure(r.headers, headers.DOCS_POLICY)
        assert_secure(anyone.get("/openapi.json").headers)


def test_a_500_carries_the_security_headers_too():
    """The 500 of FastAPI's outermost error middleware, which app middleware never sees: PlatformApp puts the
    headers outside it."""
    app = PlatformApp()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a platform bug")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom")

    r = asyncio.run(call())
    assert r.status_code == 500
    assert_secure(r.headers)


def test_the_connection_guards_own_answers_carry_them():
    for raw in (connections._REFUSED, connections._HEAD_TIMEOUT):
        head = raw.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
        assert_secure({name.lower(): value for name, value in (line.split(": ", 1) for line in head)})


def test_the_portal_has_no_inline_script_or_event_handler():
    """An inline one would need 'unsafe-inline', which the policy does not give (the browser test checks that
    the portal runs under it)."""
    static = Path(functions.ui.__file__).parent / "static"
    for page in static.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), page
        assert not re.search(r"\son[a-z]+\s*=", text), page
        assert "javascript:" not in text, page
        assert "style=" not in text, page
