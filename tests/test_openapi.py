"""The OpenAPI document is complete and true: a valid OpenAPI 3.1 document that describes every route (data plane,
/metrics, portal included), the statuses and bodies a running platform really answers, and a seeded fuzzer run
against it that finds no 5xx and no undocumented answer."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from tests.conftest import (
    ADMIN_KEY,
    PlatformProcess,
    binary_request,
    deploy,
    example,
    free_port,
    make_tenant,
    oip_body,
    platform_env,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models) -> Iterator[tuple[PlatformProcess, Any]]:
    """A platform with tenant acme and its ready function classify (the mlp example)."""
    root = tmp_path_factory.mktemp("openapi")
    p = PlatformProcess(
        root / "data", free_port(), platform_env(), ["--pool-size", "1", "--idle-timeout", "10m"]
    )
    p.start()
    try:
        acme = make_tenant(p, "acme")
        assert deploy(acme, "classify", models["mlp"])["status"] == "ready"
        yield p, acme
    finally:
        p.stop()


@pytest.fixture(scope="module")
def document(served) -> dict[str, Any]:
    p, _ = served
    r = httpx.get(f"{p.url}/openapi.json")
    assert r.status_code == 200
    return r.json()


def operation_for(doc: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The documented operation that answers METHOD PATH (a concrete path): literal paths before templated."""
    matches = []
    for template, item in doc["paths"].items():
        if "servers" in item:  # by host name: the same operations as /t/{tenant}/v2/...
            continue
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            matches.append((template.count("{"), template, item[method.lower()]))
    assert matches, f"{method} {path} is not in the OpenAPI document"
    _, template, op = min(matches, key=lambda m: m[0])
    return template, op


def check_described(doc: dict[str, Any], response: httpx.Response) -> None:
    """The response's status is documented for its operation, and its body is what the document says."""
    request = response.request
    template, op = operation_for(doc, request.method, request.url.path)
    where = f"{request.method} {template} -> {response.status_code}: {response.text[:300]}"
    described = op["responses"].get(str(response.status_code))
    assert described is not None, f"undocumented status: {where}"
    content = described.get("content")
    if not content:
        return
    media = response.headers.get("content-type", "").split(";")[0].strip()
    assert media in content or "*/*" in content, f"undocumented content type {media}: {where}"
    if media == "application/json":
        schema = {**content[media]["schema"], "components": doc["components"]}
        errors = list(Draft202012Validator(schema).iter_errors(response.json()))
        assert not errors, f"{where}\n" + "\n".join(e.message for e in errors[:5])
    if response.status_code >= 400 and media == "application/json" and "error" in response.json():
        assert isinstance(response.json()["error"], str) and response.json()["error"]


def test_the_document_is_valid_openapi_and_says_400_not_422(document):
    validate_spec(document)
    assert document["openapi"].startswith("3.1")
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method == "servers":
                continue
            assert "422" not in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and not path.endswith("/ready"):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }, (method, path, status)
    assert {"InferenceRequest", "InferenceResponse", "ModelMetadata", "Error"} <= set(
        document["components"]["schemas"]
    )
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_every_route_of_the_app_is_in_the_document(document):
    from starlette.routing import Mount, Route

    from functions.app import create_app
    from functions.settings import Settings

    app = create_app(Settings())
    internal = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    seen = set()
    for route in app.routes:
        if isinstance(route, Mount):
            assert "/ui/" in document["paths"] and "/ui/{file}" in document["paths"]
            continue
        routes = getattr(route, "routes", None)
        for r in [route] if routes is None else routes:
            if not isinstance(r, Route) or r.path in internal:
                continue
            for method in set(r.methods or ()) - {"HEAD"}:
                assert method.lower() in document["paths"].get(r.path, {}), (
                    f"{method} {r.path} is undocumented"
                )
                seen.add((method, r.path))
    assert ("POST", "/t/{tenant}/v2/models/{model}/infer") in seen and ("GET", "/metrics") in seen
    # By host name ({function}.{tenant}.{domain}), with that server on each of its paths.
    assert document["paths"]["/v2/models/{model}/infer"]["servers"][0]["url"].startswith("http://{function}.")


def model_archive(model: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def test_every_answer_of_a_running_platform_is_described(served, document, models):
    p, acme = served
    inputs, _ = example(models["mlp"])
    binary, binary_headers = binary_request(inputs)
    fn = "/t/acme/v2/models/classify"
    admin = p.admin()
    anonymous = httpx.Client(base_url=p.url, timeout=60)
    nobody = httpx.Client(base_url=p.url, timeout=60, headers={"authorization": "Bearer nope_nope"})
    upload = {"files": {"model": ("m.tar.gz", model_archive(models["mlp"]), "application/gzip")}}
    seen: list[httpx.Response] = []
    with admin, anonymous, nobody:
        calls = [
            (anonymous, "GET", "/v2/health/live", {}),
            (anonymous, "GET", "/v2/health/ready", {}),
            (anonymous, "GET", "/v2", {}),
            (anonymous, "GET", "/t/acme/v2", {}),
            (anonymous, "GET", "/t/acme/v2/health/ready", {}),
            (acme.http, "GET", fn, {}),
            (acme.http, "GET", f"{fn}/versions/1", {}),
            (acme.http, "GET", f"{fn}/ready", {}),
            (acme.http, "POST", f"{fn}/infer", {"json": oip_body(inputs)}),
            (acme.http, "POST", f"{fn}/versions/1/infer", {"content": binary, "headers": binary_headers}),
            (acme.http, "POST", f"{fn}/infer", {"json": {"inputs": []}}),  # 400 from the worker
            (acme.http, "POST", f"{fn}/infer", {"content": b"{not json"}),
            (acme.http, "GET", "/t/acme/v2/models/nothing", {}),
            (anonymous, "POST", f"{fn}/infer", {"json": oip_body(inputs)}),  # 401
            (nobody, "GET", f"{fn}/ready", {}),
            (admin, "GET", "/metrics", {}),
            (acme.http, "GET", "/metrics", {}),  # 403
            (anonymous, "GET", "/metrics", {}),  # 401
            (anonymous, "GET", "/ui/", {}),
            (anonymous, "GET", "/ui/no-such-file.js", {}),
            (admin, "GET", "/v1/whoami", {}),
            (anonymous, "GET", "/v1/whoami", {}),
            (admin, "GET", "/v1/tenants", {}),
            (acme.http, "GET", "/v1/tenants", {}),  # 403
            (admin, "POST", "/v1/tenants", {"json": {"name": "acme"}}),  # 409
            (admin, "POST", "/v1/tenants", {"json": {"name": "Not A Label"}}),  # 400
            (admin, "POST", "/v1/tenants", {"json": {}}),  # 400 (FastAPI's validation, answered 400)
            (admin, "POST", "/v1/tenants", {"content": b"[1,"}),  # 400
            (acme.http, "GET", "/v1/tenants/acme", {}),
            (acme.http, "GET", "/v1/tenants/globex", {}),  # 404
            (acme.http, "POST", "/v1/tenants/acme/keys", {"json": {"name": "ci", "scopes": ["invoke"]}}),
            (acme.http, "POST", "/v1/tenants/acme/keys", {"json": {"scopes": ["root"]}}),  # 400
            (acme.http, "GET", "/v1/tenants/acme/keys", {}),
            (acme.http, "DELETE", "/v1/tenants/acme/keys/nope", {}),  # 404
            (acme.http, "GET", "/v1/tenants/acme/functions", {}),
            (acme.http, "GET", "/v1/tenants/acme/functions/classify", {}),
            (acme.http, "PATCH", "/v1/tenants/acme/functions/classify", {"json": {"idle_timeout_s": 600}}),
            (acme.http, "PATCH", "/v1/tenants/acme/functions/classify", {"json": {"min_scale": -1}}),  # 400
            (
                acme.http,
                "POST",
                "/v1/tenants/acme/functions",
                {"data": {"name": "classify"}, **upload},
            ),  # 409
            (
                acme.http,
                "POST",
                "/v1/tenants/acme/functions",
                {
                    "data": {"name": "x"},
                    "files": {"model": ("m.tar.gz", b"not an archive", "application/gzip")},
                },
            ),
            (acme.http, "POST", "/v1/tenants/acme/functions", {"json": {}}),  # 400: not multipart
            (acme.http, "GET", "/v1/tenants/acme/usage", {}),
            (acme.http, "GET", "/v1/tenants/acme/usage", {"params": {"start": "yesterday"}}),  # 400
            (acme.http, "GET", "/v1/tenants/acme/invoices/2026-11", {}),
            (acme.http, "GET", "/v1/tenants/acme/invoices/2026-11", {"params": {"format": "csv"}}),
            (acme.http, "GET", "/v1/tenants/acme/audit", {"params": {"format": "jsonl", "limit": 5}}),
            (acme.http, "GET", "/v1/tenants/acme/audit", {"params": {"limit": 0}}),  # 400
            (acme.http, "GET", "/v1/tenants/acme/functions/classify/stats", {}),
            (acme.http, "GET", "/v1/tenants/acme/edge-devices", {}),
            (anonymous, "POST", "/v1/edge/usage", {"json": {}}),  # 401
            (admin, "GET", "/v1/capacity", {}),
            (admin, "GET", "/v1/audit", {"params": {"limit": 5}}),
            (admin, "GET", "/v1/plans", {}),
            (admin, "PUT", "/v1/plans/gold", {"json": {"limits": {"max_functions": 3}}}),
            (admin, "PUT", "/v1/plans/bad", {"json": {"limits": {"max_functions": -3}}}),  # 400
            (admin, "PUT", "/v1/tenants/acme/plan", {"json": {"plan": "missing"}}),  # 404
            (admin, "GET", "/v1/deleted-tenants", {}),
            (admin, "GET", "/v1/deleted-tenants/999/invoices/2026-11", {}),  # 404
            (admin, "DELETE", "/v1/tenants/nobody", {}),  # 404
            (admin, "GET", "/v1/nothing-here", {}),  # 404, an endpoint that does not exist (not described)
        ]
        for client, method, path, kwargs in calls:
            seen.append(client.request(method, path, **kwargs))
    statuses = set()
    for r in seen:
        if r.request.url.path == "/v1/nothing-here":
            assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
            continue
        check_described(document, r)
        statuses.add(r.status_code)
    assert {200, 201, 400, 401, 403, 404, 409} <= statuses, statuses


FUZZ_CONFIG = """
[parameters]
"path.tenant" = "acme"
"path.model" = "classify"
"path.name" = "classify"
"""


def test_a_seeded_fuzzer_run_finds_no_server_error_and_no_undocumented_answer(served, tmp_path):
    """Schemathesis against the running platform, as the admin: every documented operation but the deletes
    (they would end the run early), with bounded, seeded examples: FUZZ_EXAMPLES per operation [10] within
    FUZZ_MAX_TIME seconds [30]. `make fuzz` runs a longer one."""
    p, _ = served
    examples, max_time = os.environ.get("FUZZ_EXAMPLES", "10"), os.environ.get("FUZZ_MAX_TIME", "30")
    config = tmp_path / "schemathesis.toml"
    config.write_text(FUZZ_CONFIG)
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{p.url}/openapi.json",
        "-H", f"Authorization: Bearer {ADMIN_KEY}", "--seed", "20261", "-n", examples, "-w", "1",
        "--phases", "examples,coverage,fuzzing", "--checks", checks, "--max-time", max_time,
        "--exclude-path-regex", "^/v2/models/",  # by host name: the same operations as /t/{tenant}/v2/models
        "--exclude-method", "DELETE", "--no-shrink",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=float(max_time) + 120, cwd=tmp_path)
    report = os.environ.get("FUZZ_REPORT")
    if report:
        Path(report).write_text(run.stdout + run.stderr)
    failures = run.stdout.split("= FAILURES =")[-1].split("= WARNINGS =")[0]
    assert run.returncode == 0, (failures if "= FAILURES =" in run.stdout else run.stdout)[
        -12000:
    ] + run.stderr
    assert "Test cases:" in run.stdout and "failure" not in run.stdout.split("Test cases:")[1].split("\n")[1]
    assert json.dumps(p.log()).count("unexpected error") == 0, p.log()
