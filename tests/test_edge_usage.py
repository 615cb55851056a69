"""Edge bundles through the platform: `paddlefn edge export` -> `paddlefn edge serve` in a separate process ->
infer -> usage uploaded to POST /v1/edge/usage and billed once as device edge, across retried uploads and a
restart of the edge server; device keys (wrong, revoked) and malformed uploads refused."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from runtime.lite.bundle import read_meta
from tests.conftest import deploy, example, free_port, make_tenant, oip_body, outputs_of, wait_for
from tests.lite_support import REPO, needs_lite, process

pytestmark = [needs_lite, pytest.mark.slow]


def this_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def cli(platform, key: str, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {
        "PADDLEFN_URL": platform.url,
        "PADDLEFN_KEY": key,
        "PATH": "/usr/bin:/bin",
        "GLOG_minloglevel": "2",
    }
    return subprocess.run(
        [sys.executable, "-m", "functions.cli", *args], env=env, capture_output=True, text=True, cwd=REPO
    )


def edge_lines(t) -> dict[tuple[str, str], int]:  # type: ignore[no-untyped-def]
    invoice = t.http.get(f"/v1/tenants/{t.name}/invoices/{this_month()}").json()
    return {(line["function"], line["device"]): line["requests"] for line in invoice["lines"]}


def record(status: int = 200, **fields: object) -> dict[str, object]:
    return {
        "request_id": uuid.uuid4().hex,
        "started_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "duration_ms": 3.5,
        "compute_ms": 1.25,
        "status": status,
        "bytes_in": 100,
        "bytes_out": 200,
        "engine": "paddle-lite",
        "device": "edge",
        **fields,
    }


def test_edge_export_serve_upload_billed_once_across_retries_and_restarts(platform, models, tmp_path):
    acme = make_tenant(platform, "acme")
    assert deploy(acme, "classify", models["mlp"])["status"] == "ready"

    bundle = tmp_path / "bundle.tar.gz"
    exported = cli(
        platform, acme.key, "edge", "export", "acme/classify", "--target", "x86", "-o", str(bundle)
    )
    assert exported.returncode == 0, exported.stderr
    [device_key] = re.findall(r"pfe_\w+_[A-Za-z0-9_-]+", exported.stdout)  # printed once
    meta = read_meta(bundle)
    assert meta["device_key"] == device_key and meta["target"] == "x86"
    assert meta["function"] == {"tenant": "acme", "name": "classify", "version": meta["function"]["version"]}
    bundle_id = meta["bundle_id"]
    [device] = acme.http.get("/v1/tenants/acme/edge-devices").json()["devices"]
    assert device["bundle_id"] == bundle_id and device["function"] == "classify" and "key" not in device

    inputs, expected = example(models["mlp"])
    data_dir = tmp_path / "edge-data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = ["-m", "functions.cli", "edge", "serve", str(bundle), "--port", str(port), "--host", "127.0.0.1",
             "--platform", platform.url, "--data-dir", str(data_dir), "--upload-interval", "0.3"]  # fmt: skip

    def infer_at_edge(times: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as edge:
            for _ in range(times):
                r = edge.post("/v2/models/classify/infer", json=oip_body(inputs))
                assert r.status_code == 200, r.text
                assert r.headers["x-paddlefn-engine"] == "paddle-lite"
                for name, want in expected.items():
                    assert outputs_of(r.json())[name] == pytest.approx(want, rel=1e-3, abs=1e-4)

    with process(serve, tmp_path / "edge-1.log", f"{base}/v2/health/ready"):
        infer_at_edge(3)
        wait_for(lambda: edge_lines(acme).get(("classify", "edge")) == 3, 30, what="3 edge requests billed")
    with process(serve, tmp_path / "edge-2.log", f"{base}/v2/health/ready"):  # the edge server restarts
        infer_at_edge(2)
        wait_for(lambda: edge_lines(acme).get(("classify", "edge")) == 5, 30, what="5 edge requests billed")
    assert edge_lines(acme) == {("classify", "edge"): 5}

    # A retried upload (the edge never saw the acknowledgement) counts nothing twice...
    spooled = [
        json.loads(line) for line in (data_dir / "usage.jsonl").read_text().splitlines() if line.strip()
    ]
    assert len(spooled) == 5
    with httpx.Client(base_url=platform.url, headers={"authorization": f"Bearer {device_key}"}) as edge_key:
        again = edge_key.post("/v1/edge/usage", json={"bundle_id": bundle_id, "records": spooled})
    assert again.status_code == 200, again.text
    assert again.json() == {"bundle_id": bundle_id, "received": 5, "new": 0, "duplicates": 5}
    # ...nor does a whole spool sent again by the edge's own uploader.
    (data_dir / "sent.jsonl").unlink()
    upload = subprocess.run(
        [sys.executable, "-m", "runtime.lite.edge", "upload", "--data-dir", str(data_dir), "--platform", platform.url],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert upload.returncode == 0, upload.stderr
    assert edge_lines(acme) == {("classify", "edge"): 5}
    with sqlite3.connect(platform.data_dir / "paddlefn.db") as db:
        rows = db.execute("SELECT device, source, billable, tenant, function FROM usage_records").fetchall()
    assert sorted(set(rows)) == [("edge", f"edge:{bundle_id}", 1, "acme", "classify")] and len(rows) == 5


def test_edge_usage_refuses_wrong_keys_and_malformed_uploads(platform, models, tmp_path):
    acme = make_tenant(platform, "acme")
    globex = make_tenant(platform, "globex")
    assert deploy(acme, "classify", models["mlp"])["status"] == "ready"
    assert deploy(acme, "pir", models["multi_io_pir"])["status"] == "ready"

    # Export: the tenant's own functions only, with Lite only, ready ones only.
    r = acme.http.post("/v1/tenants/acme/functions/pir/edge-bundles", json={"target": "x86"})
    assert r.status_code == 400 and "legacy program format" in r.json()["error"]
    assert globex.http.post("/v1/tenants/acme/functions/classify/edge-bundles", json={}).status_code == 404
    r = acme.http.post("/v1/tenants/acme/functions/classify/edge-bundles", json={"target": "mips"})
    assert r.status_code == 400 and "target" in r.json()["error"]
    r = acme.http.post("/v1/tenants/acme/functions/classify/edge-bundles", json={"target": "x86"})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/gzip"
    key, bundle_id = r.headers["x-paddlefn-device-key"], r.headers["x-paddlefn-bundle-id"]
    (tmp_path / "b.tar.gz").write_bytes(r.content)
    assert read_meta(tmp_path / "b.tar.gz")["device_key"] == key

    def post(token: str | None, body: object) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{platform.url}/v1/edge/usage", content=content, headers=headers, timeout=30)

    good = {"bundle_id": bundle_id, "records": [record()]}
    for token in (None, key[:-1] + ("A" if key[-1] != "A" else "B"), acme.key, "pfe_e0000000000_" + "x" * 43):
        r = post(token, good)
        assert r.status_code == 401, (token, r.text)
    r = post(key, b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = post(key, {"bundle_id": "other", "records": []})
    assert r.status_code == 400 and r.json()["error"].startswith("bundle_id:")
    r = post(key, {"bundle_id": bundle_id, "records": {"a": 1}})
    assert r.status_code == 400 and r.json()["error"].startswith("records:")
    r = post(key, {"bundle_id": bundle_id, "records": [record(), {**record(), "request_id": "nope"}]})
    assert r.status_code == 400 and "records[1].request_id" in r.json()["error"]
    no_start = record()
    del no_start["started_at"]
    r = post(key, {"bundle_id": bundle_id, "records": [no_start]})
    assert r.status_code == 400 and "records[0].started_at" in r.json()["error"]
    r = post(key, {"bundle_id": bundle_id, "records": [record() for _ in range(501)]})
    assert r.status_code == 413 and "at most 500" in r.json()["error"]

    # Accepted: 2xx billed, a 400 the edge answered recorded but not billed.
    r = post(key, {"bundle_id": bundle_id, "records": [record(), record(), record(status=400)]})
    assert r.status_code == 200, r.text
    assert r.json() == {"bundle_id": bundle_id, "received": 3, "new": 3, "duplicates": 0}
    assert edge_lines(acme) == {("classify", "edge"): 2}
    usage = acme.http.get("/v1/tenants/acme/usage", params={"group_by": "device"}).json()["rows"]
    assert [(u["device"], u["requests"], u["billable_requests"]) for u in usage] == [("edge", 3, 2)]

    # Revoked: refused from now on.
    assert acme.http.delete(f"/v1/tenants/acme/edge-devices/{bundle_id}").status_code == 204
    r = post(key, good)
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    [device] = acme.http.get("/v1/tenants/acme/edge-devices").json()["devices"]
    assert device["revoked_at"] is not None and device["last_upload_at"] is not None
    assert globex.http.get("/v1/tenants/acme/edge-devices").status_code == 404


def test_edge_export_cli_reports_what_is_wrong(platform, models, tmp_path: Path):
    acme = make_tenant(platform, "acme")
    out = tmp_path / "b.tar.gz"
    r = cli(platform, acme.key, "edge", "export", "acme/missing", "-o", str(out))
    assert r.returncode == 1 and "not found" in r.stderr and not out.exists()
    r = cli(platform, acme.key, "edge", "export", "acme/missing", "--target", "sparc", "-o", str(out))
    assert r.returncode == 1 and "x86 or arm" in r.stderr
